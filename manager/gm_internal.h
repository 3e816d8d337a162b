/* gpumem internals: the engine's types and the functions each concern exports to the others.
 * One source file per concern: heap.c (the caching pool), limits.c, tracking.c, stats.c,
 * config.c, report.c, manager.c (the entry points the shim and the public API call), and the
 * backends (backend_cuda.c, backend_host.c). */
#ifndef GM_INTERNAL_H
#define GM_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* uthash's default (Jenkins) hash is slow for the 8-byte pointer keys of the hot path. */
static inline unsigned gm_hash_bytes(const void *key, size_t len)
{
    uint64_t h = 0x9E3779B97F4A7C15ull ^ len;
    const unsigned char *p = (const unsigned char *)key;
    if (len == sizeof(uint64_t)) {
        uint64_t v;
        __builtin_memcpy(&v, p, sizeof v);
        h = (v >> 9) * 0x9E3779B97F4A7C15ull; /* blocks are 512-B aligned: drop the zero bits */
        return (unsigned)(h >> 32);
    }
    for (size_t i = 0; i < len; i++) h = (h ^ p[i]) * 0x100000001B3ull;
    return (unsigned)(h ^ (h >> 32));
}
#define HASH_FUNCTION(keyptr, keylen, hashv) ((hashv) = gm_hash_bytes((keyptr), (size_t)(keylen)))
#include <uthash.h>

#include "gm_backend.h"
#include "gm_config.h"
#include "gpumem.h"

#define GM_HIDDEN __attribute__((visibility("hidden")))
/* Code that runs inside dlsym before a sanitizer runtime has initialized. */
#define GM_NO_SANITIZE __attribute__((no_sanitize("address", "undefined", "thread")))

/* Returned by lookups for a pointer gpumem does not own: the caller passes it to the driver. */
#define GM_NOT_OURS (-1)
/* Returned by gm_free for a tracked pass-through allocation (async, managed, VMM): the caller frees
 * it through the driver and then calls gm_untrack. */
#define GM_PASSTHROUGH (-2)

#define GM_ALIGN 512u                     /* every block starts and ends on 512 B */
#define GM_SMALL_MAX ((size_t)1 << 20)    /* requests <= 1 MiB are "small" */
#define GM_SEGMENT_ALIGN ((size_t)2 << 20) /* segments are whole 2 MiB pages */
#define GM_MAX_HEAPS 256

/* ---------------------------------------------------------------- logging (manager.c) */
void gm_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define GM_ERROR 0
#define GM_WARN 0
#define GM_INFO 1
#define GM_DEBUG 2
#define GM_TRACE 3
uint64_t gm_now_ns(void);
uint64_t gm_coarse_now_ns(void);

/* ---------------------------------------------------------------- call sites (stacks.c) */
/* Where a hooked call came from: its return address and its own frame (the unwind starts
 * there). GM_CALLSITE() is used inside the hooked entry point itself. */
typedef struct gm_callsite {
    uintptr_t pc;
    const void *frame;
} gm_callsite;
#define GM_CALLSITE() \
    (&(gm_callsite){(uintptr_t)__builtin_return_address(0), __builtin_frame_address(0)})
uint32_t gm_stack_capture(const gm_callsite *site); /* depot id, 0 when off or full */
size_t gm_stack_get(uint32_t id, uintptr_t *pc, size_t max);
void gm_stack_warm_up(void);

/* ---------------------------------------------------------------- tracking (tracking.c) */
typedef enum {
    GM_KIND_POOL = 0,   /* carved from a pool segment */
    GM_KIND_DIRECT,     /* pooling off or stream capture: a driver allocation of its own */
    GM_KIND_ASYNC,      /* cuMemAllocAsync / FromPoolAsync: stream-ordered, passed through */
    GM_KIND_MANAGED,    /* cuMemAllocManaged */
    GM_KIND_VMM,        /* cuMemCreate handle (the value is the handle, not an address) */
    GM_KIND_COUNT
} gm_alloc_kind;


struct gm_block;

/* One live allocation, as the leak report sees it. Pool blocks embed theirs. */
typedef struct gm_record {
    uintptr_t ptr;
    size_t requested;       /* what the program asked for */
    size_t size;            /* what it occupies (rounded) */
    uintptr_t stream;
    uint64_t time_ns;
    uintptr_t caller;       /* return address of the hooked call */
    uint32_t stack_id;      /* call-stack depot id; 0 = not captured */
    uint8_t kind;           /* gm_alloc_kind */
    uint16_t tag;           /* the thread's tag when it was made (tags.c); 0 = none */
    struct gm_block *block; /* pool block, NULL for other kinds */
    UT_hash_handle hh;      /* heap->live, keyed by ptr */
} gm_record;

/* ---------------------------------------------------------------- the caching pool (heap.c) */
/* QUARANTINE: freed by the program while another process still has it open through IPC; it
 * goes back to the bins once no importer is left (ipc.c). */
typedef enum { GM_BLOCK_FREE = 0, GM_BLOCK_LIVE, GM_BLOCK_PENDING, GM_BLOCK_QUARANTINE } gm_block_state;

struct gm_segment;

typedef struct gm_block {
    uintptr_t addr;
    size_t size;
    struct gm_block *prev, *next;   /* address-order neighbours in the segment */
    struct gm_block *fprev, *fnext; /* free bin or pending list */
    struct gm_segment *seg;
    uint8_t state;
    uint8_t bin_fl, bin_sl;         /* bin indices while free */
    uint32_t fence_epoch;           /* fast mode: fence that must complete before reuse */
    /* Identity, set at every allocation (what the driver tells apart for separate allocations):
     * CU_POINTER_ATTRIBUTE_BUFFER_ID, SYNC_MEMOPS, and the IPC registry slot (ipc.c) + 1. */
    uint8_t sync_memops;
    uint32_t ipc_slot;
    uint64_t buffer_id;
    gm_record rec;                  /* valid while LIVE */
} gm_block;

typedef struct gm_segment {
    uintptr_t base;
    size_t size;
    size_t used;         /* bytes in LIVE or PENDING blocks */
    bool small;
    gm_block *first;     /* address-ordered block list */
} gm_segment;

/* Two-level segregated bins (TLSF): first level = power of two, second = 16 linear steps. */
#define GM_FL_COUNT 48
#define GM_SL_COUNT 16

typedef struct gm_bins {
    uint64_t fl_bitmap;
    uint16_t sl_bitmap[GM_FL_COUNT];
    gm_block *heads[GM_FL_COUNT][GM_SL_COUNT];
} gm_bins;

typedef struct gm_heap_counters {
    uint64_t allocations, frees, pool_hits, pool_misses;
    uint64_t segments, segments_released;
    uint64_t bytes_requested, bytes_allocated;
    uint64_t bytes_allocated_peak; /* kept here while the heap is its device's only one */
    uint64_t bytes_free;          /* free bytes in segments (bins + pending) */
    uint64_t release_retries, limit_rejections, backend_ooms;
} gm_heap_counters;

/* One per driver context (per device on the host backend): pool, live table and counters under
 * one lock, so an alloc or a free takes a single uncontended lock. */
typedef struct gm_heap {
    pthread_mutex_t lock;
    uintptr_t ctx;
    int device;
    bool bound;                 /* false once its context was destroyed */
    bool solo;                  /* the device's only heap: its counters are the device's, so the
                                 * hot path needs no device-wide atomics */
    _Atomic uint64_t live_gen;  /* bumped (under the lock) whenever a live block stops being live
                                 * or changes size: a checked copy may trust what it learnt about
                                 * a live block without the lock while this is unchanged. Near
                                 * `device`: a copy hook reads both. */
    gm_bins small_bins, large_bins;
    gm_segment **segments;      /* sorted by base */
    size_t nsegments, segments_cap;
    size_t next_large_segment;  /* growth-factor sequence */
    gm_block *pending_head;     /* fast mode: freed, waiting for a fence */
    uint64_t pending_bytes;
    gm_fence *fence;            /* newest fence covering pending blocks with epoch <= fence_epoch */
    uint32_t fence_epoch, epoch;
    gm_block *spare_blocks;     /* recycled block headers */
    gm_block *quarantine;       /* freed blocks other processes still have open (ipc.c), by fnext */
    uint64_t buffer_seq;        /* buffer ids of this heap's blocks (gm_buffer_id) */
    uint32_t index;             /* in gm_mgr.heaps: makes buffer ids unique across heaps */
    gm_record *live;            /* uthash by ptr; never empty: see sentinel */
    gm_record sentinel;         /* ptr 0, keeps uthash from freeing its table on every last delete */
    gm_heap_counters c;
} gm_heap;

/* ---------------------------------------------------------------- devices, limits (limits.c) */
typedef struct gm_device {
    _Atomic uint64_t reserved;      /* bytes taken from the device by this process */
    _Atomic uint64_t reserved_peak;
    _Atomic uint64_t allocated;     /* bytes handed out, every heap of the device */
    _Atomic uint64_t allocated_peak;
    _Atomic uint64_t limit;         /* 0 = none; resolved at first use */
    _Atomic bool limit_resolved;
    _Atomic uint64_t bytes_by_kind[GM_KIND_COUNT];
} gm_device;

gm_device *gm_device_get(int device); /* NULL when out of range */
/* Resolves the device's limit once (percentages need the device's total). */
void gm_limit_init_device(int device, uint64_t device_total);
/* Take `bytes` of the device's limit; false when that would cross it. */
bool gm_limit_reserve(int device, uint64_t bytes);
void gm_limit_unreserve(int device, uint64_t bytes);
uint64_t gm_limit_headroom(int device); /* bytes still below the limit; UINT64_MAX if none */
void gm_device_note_allocated(int device, int64_t delta);

/* ---------------------------------------------------------------- the engine (manager.c) */
/* What every copy hook reads, copied from the configuration into the manager's first cache line
 * (the configuration itself spreads over kilobytes of path strings). */
typedef struct gm_copy_settings {
    bool check;          /* GPUMEM_CHECK_COPIES */
    bool staging;        /* GPUMEM_STAGING */
    uint64_t staging_min;
} gm_copy_settings;

/* The first cache line is what every hooked copy reads: keep it that way. */
typedef struct gm_manager {
    const gm_backend *backend;
    const gm_config *cfg;
    gm_copy_settings copy;
    /* Lowest and highest address of any pool segment ever made (never narrowed): a pointer
     * outside is not pool memory, known without a lock. */
    _Atomic uintptr_t pool_lo, pool_hi;
    _Atomic size_t nheaps;          /* next to heaps[0]: the hot path reads both */
    gm_heap *heaps[GM_MAX_HEAPS];
    pthread_mutex_t heaps_lock;
    _Atomic bool exiting;           /* after exit began: never call the backend again */
} gm_manager;

extern gm_manager gm_mgr;

/* Sets the backend once; later calls with another backend are refused (returns false). */
bool gm_manager_init(const gm_backend *backend);
/* The heap of a context, created on first use. NULL when the table is full. */
gm_heap *gm_heap_get(uintptr_t ctx, int device);
/* Heap that tracks `ptr` exactly (locked on return), or NULL. Tries `hint` first. */
gm_heap *gm_heap_find_locked(uintptr_t ptr, gm_heap *hint, gm_record **rec_out);

/* Pooled allocation of `size` bytes (pooling off: a direct allocation that is still tracked). */
int gm_alloc(gm_heap *heap, size_t size, uintptr_t stream, const gm_callsite *site, uintptr_t *out);
/* Free a pointer from any kind gm_alloc/gm_track produced. GM_NOT_OURS if not tracked.
 * `stream` != GM_FREE_BARRIER for a stream-ordered free (cuMemFreeAsync). */
#define GM_FREE_BARRIER ((uintptr_t)-1)
int gm_free(gm_heap *hint, uintptr_t ptr, uintptr_t stream, gm_alloc_kind *kind_out);
/* gm_free with a barrier, where `current` is the heap of the calling thread's current context
 * (looked up in this same call): the barrier then needs no context lookup. */
int gm_free_current(gm_heap *current, uintptr_t ptr, gm_alloc_kind *kind_out);

/* Pass-through allocations (async, managed, VMM, captured): reserve against the limit first,
 * then record or abort. */
int gm_track_reserve(gm_heap *heap, size_t size);
void gm_track_commit(gm_heap *heap, uintptr_t ptr, size_t size, gm_alloc_kind kind,
                     uintptr_t stream, const gm_callsite *site);
void gm_track_abort(gm_heap *heap, size_t size);
/* Forget a pass-through record; returns its kind or GM_NOT_OURS. */
int gm_untrack(gm_heap *hint, uintptr_t ptr, gm_alloc_kind kind);

/* The live block containing `ptr` (interior pointers too): its start and requested size.
 * GPUMEM_OK, GM_NOT_OURS (not in our segments), or GPUMEM_ERROR_INVALID_VALUE (inside a segment
 * but not within a live block's requested size: freed memory, or a block's rounding slack, which
 * the driver does not count as part of a separate allocation either). */
int gm_lookup(uintptr_t ptr, uintptr_t *base, size_t *size);

/* What the driver would tell apart for a separate allocation: gm_block_identity answers like
 * gm_lookup and fills this. */
typedef struct gm_block_identity {
    uintptr_t base;
    size_t size;        /* requested */
    uint64_t buffer_id;
    bool sync_memops;
    uintptr_t ctx;      /* the heap's context */
    uintptr_t seg_base; /* the driver allocation it lives in */
    size_t seg_size;
} gm_block_identity;
int gm_block_identity_get(uintptr_t ptr, gm_block_identity *out);
/* Runs `fn` on the live block at `ptr` with its heap locked (the codes of gm_lookup; `fn` runs only
 * for GPUMEM_OK). */
int gm_with_live_block(uintptr_t ptr, void (*fn)(gm_heap *, gm_block *, void *), void *cx);
/* Records cuPointerSetAttribute(SYNC_MEMOPS) on the live block at `ptr` (same codes). */
int gm_block_set_sync_memops(uintptr_t ptr, bool on);

/* Buffer ids never equal one the driver gives (small counters): the high bit is set, then the
 * heap's index, then a per-heap counter bumped under the heap lock (no locked instruction on the
 * allocation path). Index 0xFFFF is kept for blocks imported from other processes (ipc.c). */
#define GM_BUFFER_ID_BIT (1ull << 63)
static inline uint64_t gm_buffer_id_next_locked(gm_heap *heap)
{
    return GM_BUFFER_ID_BIT | ((uint64_t)(heap->index & 0xFFFF) << 47) | (++heap->buffer_seq & ((1ull << 47) - 1));
}

/* Context going away (a leak check point): report its leaks, keep them for the exit report, hand
 * its cached segments back while the context is still alive, forget its records. */
void gm_heap_drop(uintptr_t ctx, const char *why, bool ctx_alive);

/* Bytes this process can still obtain on `device` (limit and cached free memory considered). */
void gm_mem_info(gm_heap *heap, size_t driver_free, size_t driver_total, size_t *free_out,
                 size_t *total_out);

static inline void gm_heap_live_changed_locked(gm_heap *heap)
{
    /* Only lock holders write it: a release store, no locked instruction on the hot path. */
    uint64_t g = atomic_load_explicit(&heap->live_gen, memory_order_relaxed);
    atomic_store_explicit(&heap->live_gen, g + 1, memory_order_release);
}

/* heap.c internals used by manager.c */
int gm_heap_alloc_locked(gm_heap *heap, size_t rounded, gm_block **out);
int gm_heap_grow(gm_heap *heap, size_t rounded); /* called unlocked */
void gm_heap_free_block_locked(gm_heap *heap, gm_block *b);
void gm_heap_pend_block_locked(gm_heap *heap, gm_block *b);
size_t gm_heap_collect_free_segments_locked(gm_heap *heap, uint64_t keep_cached,
                                            gm_segment **out, size_t max);
void gm_heap_release_segments(gm_heap *heap, gm_segment **segs, size_t n); /* unlocked */
size_t gm_heap_release_cached(gm_heap *heap, uint64_t keep_cached);     /* unlocked */
gm_block *gm_heap_block_containing_locked(gm_heap *heap, uintptr_t ptr);
size_t gm_heap_largest_free_locked(const gm_heap *heap);
bool gm_heap_retire_pending_locked(gm_heap *heap, bool wait);
void gm_heap_init(gm_heap *heap, uintptr_t ctx, int device);
void gm_heap_reset_locked(gm_heap *heap); /* forget everything (fork child, dropped context) */
size_t gm_round_size(size_t size);        /* 0 on overflow */
size_t gm_next_segment_size(gm_heap *heap, size_t rounded);

/* tracking.c */
void gm_live_insert(gm_heap *heap, gm_record *rec);
gm_record *gm_live_find(gm_heap *heap, uintptr_t ptr);
void gm_live_remove(gm_heap *heap, gm_record *rec);
gm_record *gm_record_new(void);
void gm_record_delete(gm_record *rec);
void gm_live_init(gm_heap *heap);
/* Iterate live records (the sentinel is skipped). */
#define GM_FOR_EACH_LIVE(heap, rec) \
    for (gm_record *rec = (heap)->live; rec; rec = (gm_record *)rec->hh.next) \
        if (rec->ptr != 0)

/* stats.c */
void gm_stats_collect(int device, gpumem_stats *out);
void gm_stats_on_alloc(gm_heap *heap, const gm_record *rec, bool hit);
void gm_stats_on_free(gm_heap *heap, const gm_record *rec);
/* A second heap appeared on `device`: its heaps switch to the device-wide atomic counters. */
void gm_stats_share_device_locked(int device);

/* transfer.c: checked and counted copies (more in gm_transfer.h) */
void gm_copy_totals(gm_copy_dir dir, uint64_t *calls, uint64_t *bytes);
const char *gm_copy_dir_name(gm_copy_dir dir);
void gm_copy_report_text(FILE *out); /* the report's copy lines */
void gm_copy_report_json(FILE *out); /* the report's "copies" member */

/* pinned.c: the pinned host memory pool (more in gm_pinned.h) */
typedef enum { GM_LEAK_DEVICE = 0, GM_LEAK_PINNED_HOST } gm_leak_memory;
const char *gm_leak_memory_name(int memory); /* "device", "pinned_host" */
/* Calls `fn` for every live pinned host allocation, with the device current when it was made. */
void gm_pinned_for_each_live(void (*fn)(void *cx, int device, const gm_record *rec), void *cx);
void gm_pinned_report_text(FILE *out); /* the report's pinned-pool line */
void gm_pinned_report_json(FILE *out); /* the report's "pinned" member */
/* True when all of host range [p, p+n) is pinned: the pinned pool, memory the program pinned
 * through the driver (cuMemHostAlloc pass-through) or registered (cuMemHostRegister). */
bool gm_host_is_pinned(const void *p, size_t n);

/* tags.c: names the calling thread pushes; every allocation made meanwhile carries the innermost */
#define GM_TAG_NAME_MAX 127
#define GM_TAG_DEPTH_MAX 64
#define GM_TAGS_MAX 4096
int gm_tag_push(const char *name);      /* gm_tag_intern + gm_tag_push_id */
int gm_tag_intern(const char *name, uint16_t *id); /* validates and interns; no lock once known */
int gm_tag_push_id(uint16_t id);
int gm_tag_pop(void);
uint16_t gm_tag_current(void);
const char *gm_tag_name(uint16_t id); /* NULL for 0 */
uint16_t gm_tag_find(const char *name);
uint32_t gm_tag_count(void);          /* ids 1 .. count-1 are in use */
void gm_tag_on_alloc(uint16_t id, uint64_t bytes);
void gm_tag_on_free(uint16_t id, uint64_t bytes);
void gm_tag_on_resize(uint16_t id);
void gm_tag_usage_get(uint16_t id, gpumem_tag_usage *out);
void gm_tags_report_text(FILE *out);
void gm_tags_report_json(FILE *out, void (*json_string)(FILE *, const char *));

/* trace.c: the timeline (GPUMEM_TRACE) */
extern bool gm_trace_on;
void gm_trace_open(void);
void gm_trace_counter(int device, uint64_t allocated, uint64_t reserved);
void gm_trace_instant(const char *name, int device, uint64_t bytes, const char *reason);
void gm_trace_close(void);
/* `pattern` with %p replaced by the process id. */
void gm_expand_pid(const char *pattern, char *out, size_t cap);
const char *gm_program_path(void); /* /proc/self/exe, resolved once */
extern _Atomic uint64_t gm_invalid_frees;

/* api.c: what every public entry point needs first */
int gm_api_ready(void);                  /* the manager started (library mode: on the real driver) */
int gm_api_current_heap(gm_heap **out);  /* the heap of the calling thread's current context */

/* report.c */
/* One call stack in the report's frame format ("    #i 0x.. in fn module+0x.. (file:line)\n"),
 * from the program's own call on, names and lines resolved like the leak report's (addr2line
 * once per module, cached). */
size_t gm_report_format_stack(char *out, size_t cap, const uintptr_t *pc, size_t n);
size_t gm_report_write(FILE *out, int only_device, uintptr_t only_ctx, const char *why);
/* Leaks of a context that went away stay in the exit report. Called with heap->lock held. */
void gm_report_keep_orphans_locked(gm_heap *heap);
void gm_report_forget_orphans(void); /* fork child: the parent's contexts are not ours */
/* Registers the report to run when the process exits (on_exit: it sees the exit status, for
 * GPUMEM_LEAK_EXITCODE). */
void gm_report_install_exit_hook(void);

#endif
