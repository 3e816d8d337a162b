/* The account layer: what gpumem counts and limits, over plain atomics and per-heap counters.
 * Per-device budgets and byte figures (limits.c), the statistics' counters (stats.c, fields in
 * include/gpumem_stats.def), the timeline (trace.c) and the copy counters (copies.c). Nothing
 * here allocates device memory or knows the pool's structure. Below: base, config, backend
 * (copy directions) and track (records, tags). */
#ifndef GM_ACCOUNT_H
#define GM_ACCOUNT_H

#include "gm_backend.h"
#include "gm_track.h"

/* ---------------------------------------------------------------- devices, limits (limits.c) */
typedef struct gm_device {
    _Atomic uint64_t reserved;      /* bytes taken from the device by this process */
    _Atomic int ledger;             /* its entry in the group's ledger plus 1; 0 without a group
                                     * (set once, before limit_resolved; the publisher reads it) */
    _Atomic uint64_t reserved_peak;
    _Atomic uint64_t allocated;     /* bytes handed out, every heap of the device (shared mode) */
    _Atomic uint64_t allocated_peak;
    _Atomic uint64_t limit;         /* 0 = none; resolved at first use */
    _Atomic bool limit_resolved;
    bool has_uuid;                  /* set once, before limit_resolved */
    unsigned char uuid[16];         /* cuDeviceGetUuid's: the report names the device by it */
} gm_device;

gm_device *gm_device_get(int device); /* NULL when out of range */
/* Resolves the device's limit once (percentages need the device's total) and, in a group, binds
 * the device to the ledger's entry for `uuid` (NULL: the driver named none; the device then
 * counts for this process alone, logged). */
void gm_limit_init_device(int device, uint64_t device_total, const unsigned char *uuid);
/* The device's UUID as NVML spells it ("GPU-..."), once its limit is resolved; false before, or
 * when the driver named none. */
bool gm_device_uuid_text(int device, char out[41]);
/* Take `bytes` of the device's limit (the group's, in a group); false when that would cross it. */
bool gm_limit_reserve(int device, uint64_t bytes);
void gm_limit_unreserve(int device, uint64_t bytes);
uint64_t gm_limit_headroom(int device); /* bytes still below the limit (the group's); UINT64_MAX if none */
/* What a program should see as the device's memory: the driver's total, or the limit where one
 * is set and smaller (cuDeviceTotalMem, hence cudaGetDeviceProperties().totalGlobalMem). */
uint64_t gm_limit_visible_total(int device, uint64_t driver_total);
void gm_device_note_allocated(int device, int64_t delta);

/* ---------------------------------------------------------------- the shared budget (ledger.c)
 * GPUMEM_SHARED names a file every process of a group maps (design: docs/architecture.md,
 * "The shared budget"): per device UUID the group's limit and usage, per member what it reserved
 * there; a member's liveness is a file lock the kernel drops when it dies. Every call but
 * gm_ledger_open is a no-op without a group. */
/* Opens, checks or initialises the region. A malformed path, a file that is no gpumem region,
 * no permission or no space stops the program with one line naming GPUMEM_SHARED and the path. */
void gm_ledger_open(const gm_config *cfg);
bool gm_ledger_on(void);
/* The entry for device `uuid` with `limit` (0 = none), created on first use; a group whose
 * entry holds another limit stops the program naming both values. Returns the entry's index. */
int gm_ledger_bind(const unsigned char uuid[16], uint64_t limit);
/* Takes `bytes` of entry `entry` for this process: false when the group would cross its limit
 * even after the shares of dead members were taken back, or when the ledger has no free slot. */
bool gm_ledger_reserve(int entry, uint64_t bytes);
void gm_ledger_unreserve(int entry, uint64_t bytes);
uint64_t gm_ledger_headroom(int entry); /* limit minus the group's usage; UINT64_MAX if no limit */
typedef struct gm_ledger_figures {
    uint64_t limit, used, peak;
    uint32_t members; /* live members holding memory of it */
} gm_ledger_figures;
/* False when there is no group or it has no entry for `uuid`. */
bool gm_ledger_figures_of(const unsigned char uuid[16], gm_ledger_figures *out);
bool gm_ledger_figures_at(int entry, gm_ledger_figures *out);
/* The group's figures for this process's device `device`: false when it is in no group. */
bool gm_limit_group_figures(int device, gm_ledger_figures *out);
typedef struct gm_ledger_member {
    uint32_t pid;   /* as the member's own pid namespace numbers it */
    uint64_t bytes; /* what it reserved on the device */
} gm_ledger_member;
/* Live members holding memory of device `uuid`: up to `max` written, the number returned. */
int gm_ledger_members_of(const unsigned char uuid[16], gm_ledger_member *out, int max);
/* The region's path, for the report; NULL without a group. */
const char *gm_ledger_path(void);

/* What a member publishes for exporters (gpumem-exporter, gpumem-report top): its figures per
 * device entry and its top call stacks, written by the member alone (a sequence counter makes a
 * reader's copy consistent). Nothing is published before the member's first reservation. */
#define GM_LEDGER_DEVICES 16
#define GM_LEDGER_TOP 4
typedef struct gm_ledger_published {
    uint64_t device; /* the member's CUDA ordinal of the entry's GPU, plus 1; 0 = not published */
    uint64_t allocated, allocated_peak, reserved_peak;
    uint64_t allocations, frees, pool_hits, pool_misses, limit_rejections, backend_ooms;
} gm_ledger_published;
typedef struct gm_ledger_top {
    uint64_t bytes;
    uint32_t count;
    int32_t device;    /* the member's CUDA ordinal */
    char where[112];   /* "function module+0xoff" of the program's first frame, "tag: ..." */
} gm_ledger_top;
/* `figures` is indexed by entry (gm_device.ledger - 1), GM_LEDGER_DEVICES of them. */
void gm_ledger_publish(const gm_ledger_published *figures, const gm_ledger_top *top, int ntop);

/* A reader's copy of a region it is not a member of (read-only; never initialises or repairs). */
typedef struct gm_ledger_view_member {
    uint32_t pid;
    bool alive;            /* its liveness lock is held */
    uint64_t start;        /* clock ticks after boot */
    char comm[16];
    uint64_t published_ns; /* CLOCK_REALTIME of its last publication; 0 = none yet */
    uint64_t reserved[GM_LEDGER_DEVICES];
    gm_ledger_published figures[GM_LEDGER_DEVICES];
    gm_ledger_top top[GM_LEDGER_TOP];
    int ntop;
} gm_ledger_view_member;
typedef struct gm_ledger_view {
    uint64_t generation;
    int ndevices;
    struct {
        unsigned char uuid[16];
        uint64_t limit, used, peak;
    } devices[GM_LEDGER_DEVICES];
    int nmembers;
    gm_ledger_view_member *members; /* malloc'd: gm_ledger_view_free */
} gm_ledger_view;
/* 0, or -1 with a one-line reason in `err` (no such file, not a region, another layout). */
int gm_ledger_view_read(const char *path, gm_ledger_view *out, char *err, size_t cap);
void gm_ledger_view_free(gm_ledger_view *v);
/* "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", NVML's spelling of a UUID (41 bytes with the NUL). */
void gm_ledger_uuid_text(const unsigned char uuid[16], char out[41]);

/* ---------------------------------------------------------------- statistics (stats.c) */
/* One heap's counters, kept under the heap's lock on the hot path: the HEAP rows of
 * gpumem_stats.def, plus the peak the heap keeps while it is its device's only one. */
typedef struct gm_counters {
#define GM_STAT_HEAP(name, doc) uint64_t name;
#define GM_STAT_POOL(name, doc)
#define GM_STAT_DEVICE(name, doc)
#define GM_STAT_DERIVED(type, name, doc)
#include "gpumem_stats.def"
    uint64_t bytes_allocated_peak; /* solo heaps only; shared ones count in gm_device */
    uint64_t unsynced;             /* allocated bytes not yet added to the gm_peak_sync */
} gm_counters;

/* A solo heap's allocated bytes over all the counters that count them (the heap's and its threads'
 * caches', engine/tcache.c), and their peak. Each counter adds its allocations in batches of at
 * most `slack` bytes and its frees at once where they exceed what it has not added yet, so the
 * sum is never above the truth and at most `slack` per counter below it: the peak is a lower
 * bound within that, without a line every thread writes on every pair. */
typedef struct gm_peak_sync {
    _Atomic uint64_t bytes, peak;
} gm_peak_sync;

/* Where an allocation or free counts: the heap's counters, and its device's atomics when the
 * device has several heaps (`solo` false), else `sync` (NULL: none). */
typedef struct gm_counting {
    gm_counters *c;
    int device;
    bool solo;
    gm_peak_sync *sync;
    uint64_t slack;
} gm_counting;
void gm_stats_on_alloc(gm_counting to, const gm_record *rec, bool hit);
void gm_stats_on_free(gm_counting to, const gm_record *rec);
/* A live block resized in place: counted as the old size freed and the new one allocated, but
 * neither an allocation nor a free of its own. `old` is the record before the resize. */
void gm_stats_on_resize(gm_counting to, const gm_record *old, const gm_record *now);
/* Adds one heap's counters into `out` (the HEAP rows). */
void gm_stats_add_counters(gpumem_stats *out, const gm_counters *c);
/* Fills the DEVICE rows and the derived ones once every heap was added (bytes_cached_free and
 * largest_free_block summed and maxed). `solo_peak`: the peak a solo heap kept. */
void gm_stats_finish(gpumem_stats *out, int device, uint64_t solo_peak);
/* A free the program passed that is no live allocation (device or pinned memory): refused by
 * the caller, counted here and logged (the first 100, then one line saying the rest are not).
 * `memory` names what it should have been ("" for device memory, "pinned "). */
void gm_stats_invalid_free(const char *api, uintptr_t p, const char *memory, const char *why,
                           uintptr_t caller);
uint64_t gm_stats_invalid_frees(void);

/* ---------------------------------------------------------------- the timeline (trace.c) */
extern bool gm_trace_on; /* GPUMEM_TRACE names a file that is open */
void gm_trace_open(const gm_config *cfg);
void gm_trace_counter(int device, uint64_t allocated, uint64_t reserved);
void gm_trace_instant(const char *name, int device, uint64_t bytes, const char *reason);
void gm_trace_close(void);

/* ---------------------------------------------------------------- copies (copies.c) */
const char *gm_copy_direction_name(gpumem_copy_direction dir); /* "H2D", "D2H", "D2D", "H2H" */
const char *gm_host_memory_name(gpumem_host_memory kind);      /* "pageable", "pinned" */
const char *gm_copy_dir_name(gm_copy_dir dir);                 /* the above, or "default" */
/* The copy clock: the TSC where there is one (sums of differences are converted at read). */
static inline uint64_t gm_copy_clock(void)
{
#if defined(__x86_64__)
    return __builtin_ia32_rdtsc();
#else
    return gm_now_ns();
#endif
}
uint64_t gm_copy_ticks_to_ns(uint64_t ticks);
/* One copy the driver accepted: `timed` for synchronous ones (their ticks measured). */
/* `peer`: a D2D copy from another device's memory, counted in its peer counter too. */
void gm_copy_count(int device, gpumem_copy_direction dir, gpumem_host_memory kind, bool peer, size_t bytes,
                   bool timed, uint64_t ticks, bool staged);
void gm_copy_note_refused(int device, bool memset_call);
void gm_copy_stats_collect(int device, gpumem_copy_stats *out);
void gm_copy_totals(gm_copy_dir dir, uint64_t *calls, uint64_t *bytes); /* every device */

#endif
