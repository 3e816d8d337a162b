/* The engine layer: the policy that turns the layers below into cudaMalloc/cudaFree semantics.
 * One heap per driver context (heap.c: the heap table, its life cycle, its statistics); the
 * allocation policy (alloc.c: the pool first, then grow within the limit, release cached
 * segments and retry, fast-mode fences, cudaFree's barrier); where a pointer lies (lookup.c:
 * allocation identity, checked-copy spans); a context going away (context.c). The pinned host
 * pool (pinned.c), staged copies (staging.c), checked copies (transfer.c) and IPC of pooled
 * blocks (ipc.c) have headers of their own; each thread's cache of freed blocks is tcache.c.
 * Below: every lower layer. Above: report, api, shim.
 *
 * Within the engine the files call in one direction too:
 *   context.c -> alloc.c -> ipc.c -> lookup.c -> heap.c -> tcache.c;
 *   transfer.c -> lookup.c, pinned.c;  pinned.c and staging.c stand alone. */
#ifndef GM_ENGINE_H
#define GM_ENGINE_H

#include "gm_account.h"
#include "gm_pool.h"

#define GM_MAX_HEAPS 256

/* What an engine call handed a pointer answers: whose the pointer is and, when it is gpumem's,
 * the status (a CUresult number). The two are kept apart: a status is never a route. */
typedef enum gm_owner {
    GM_OURS = 0,    /* gpumem's: `status` is the answer */
    GM_NOT_OURS,    /* not gpumem's: the caller passes the call to the driver */
    GM_PASSTHROUGH  /* a tracked pass-through allocation (async, managed, VMM): the caller frees
                     * it through the driver, then calls gm_untrack */
} gm_owner;
typedef struct gm_answer {
    gm_owner owner;
    int status; /* GM_OURS: GPUMEM_OK or the error to return; otherwise 0 */
} gm_answer;
static inline gm_answer gm_ours(int status) { return (gm_answer){GM_OURS, status}; }
static inline gm_answer gm_not_ours(void) { return (gm_answer){GM_NOT_OURS, 0}; }
static inline bool gm_answer_is(gm_answer a, gm_answer b) { return a.owner == b.owner && a.status == b.status; }
static inline bool gm_answer_ok(gm_answer a) { return a.owner == GM_OURS && a.status == GPUMEM_OK; }

/* ---------------------------------------------------------------- heaps (heap.c) */
/* One per driver context (per device on the host backend): pool, live table and counters under
 * one lock, so an alloc or a free takes a single uncontended lock. Never freed: a destroyed
 * context's heap is unbound and reused. */
/* GPUMEM_EXPANDABLE (alloc.c): a virtual range reserved once per heap and size class, mapped
 * from its start: [base, base+mapped) is the pool's expandable segment of that class. */
typedef struct gm_vrange {
    uintptr_t base;
    size_t size;   /* reserved */
    size_t mapped; /* from base on, in whole chunks */
} gm_vrange;

/* A thread's cache on one heap (tcache.c): the pool blocks it allocated (their records in its own
 * live table, under its own lock) and the blocks it freed for its own next allocations, so a
 * thread's alloc+free pair that hits its cache touches no line another thread writes. */
#define GM_TC_BINS 16     /* sizes a thread keeps at once (any 16: a bin is free again when empty) */
#define GM_TC_BIN_MAX 32  /* blocks of one size in fast mode (a tight loop's fence covers half) */
#define GM_TC_BIN_STRICT 8 /* blocks of one size in strict mode (reusable at once: no batch) */
#define GM_MAX_TCACHES 255 /* per heap; threads beyond it use the heap itself */
/* Allocated bytes a cache counts before it adds them to its heap's sum (gm_peak_sync): the peak
 * with several threads is exact to within this per allocating thread; pairs of blocks up to it
 * never write the shared sum. */
#define GM_TC_PEAK_SLACK ((uint64_t)64 << 20)
typedef struct gm_tcache {
    pthread_mutex_t lock;
    size_t bin_size[GM_TC_BINS];    /* rounded; 0: a free bin. Scanned on every allocation */
    gm_block *bin_head[GM_TC_BINS]; /* by fnext; taken from the head */
    gm_block *bin_tail[GM_TC_BINS]; /* fast mode queues at the tail: the oldest free is asked first */
    uint8_t bin_count[GM_TC_BINS];
    uint64_t cached_bytes;  /* in its bins (fast mode: waiting for a fence too) */
    /* Fast mode (fence.c): a block it keeps carries in fence_epoch the sequence number of the
     * first of its fences recorded after the free; it is reusable once fence_done has reached it. */
    gm_fence *fence;        /* in flight: covers its blocks with fence_epoch <= fence_seq */
    uint32_t fence_seq, fence_next, fence_done;
    uint32_t unfenced;      /* blocks kept since its last fence was recorded */
    uint64_t unfenced_bytes; /* and their bytes */
    uint64_t fence_at_ns;   /* when it last recorded one */
    size_t fast_keep_max;   /* fast mode keeps blocks up to this (0: none) */
    size_t fast_keep_above; /* and above this, which the heap fences at each free (0: none) */
    uint64_t fast_cache_bytes; /* the bytes it may keep (gm_tcache_keep_at_most, when learnt) */
    gm_live live;           /* live blocks it allocated that nothing else has looked up since */
    gm_counters c;          /* every allocation it made, wherever the record lives now */
    uint64_t buffer_seq;
    uint16_t index;         /* 1-based: gm_record.owner */
    bool attached;          /* a running thread uses it (heap lock); a detached one is reused */
    struct gm_heap *heap;
} gm_tcache;

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
    gm_pool pool;
    gm_live live;
    gm_counters c;
    gm_peak_sync allocated_sync; /* solo: bytes allocated over c and the caches', and their peak */
    gm_fence *fence;            /* the fence in flight: covers pending blocks with epoch <= fence_epoch */
    uint32_t fence_epoch;
    uint64_t fence_at_ns;       /* when the last fence was recorded (fence.c: batching) */
    uint64_t tcs_taken_at_ns;   /* when a miss last took the other threads' cached blocks (alloc.c) */
    uint64_t fence_batch;       /* GPUMEM_FENCE_BATCH for this heap's device, learnt once */
    int fence_batch_device;     /* the device fence_batch was learnt for, plus 1; 0: not yet */
    gm_block *quarantine;       /* freed blocks other processes still have open (ipc.c), by fnext */
    uint64_t buffer_seq;        /* buffer ids of this heap's blocks (gm_buffer_id_next_locked) */
    uint32_t index;             /* in gm_mgr.heaps: makes buffer ids unique across heaps */
    /* Expandable segments: `grow_lock` (taken before `lock`, never under it) serializes what
     * maps and unmaps the ranges; `vmm` 0 not asked yet, 1 usable, -1 not (classic segments);
     * `vr[0]` the large class, `vr[1]` the small one; their fields change under both locks. */
    pthread_mutex_t grow_lock;
    int vmm;
    size_t vmm_chunk;
    gm_vrange vr[2];
    uint64_t vmm_peers;         /* devices given access to every chunk (peer access), by bit */
    /* Thread caches: written under the lock, `ntcs` published after the entry (read unlocked). */
    gm_tcache *tcs[GM_MAX_TCACHES];
    _Atomic uint32_t ntcs;
} gm_heap;

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
/* Exit began: from now on no backend call. True for the first caller only. */
bool gm_manager_begin_exit(void);
/* The heap of a context, created on first use. NULL when the table is full. */
gm_heap *gm_heap_get(uintptr_t ctx, int device);
/* The bound heap of `ctx`, or NULL; never creates one. */
gm_heap *gm_heap_of_ctx(uintptr_t ctx);
/* Heap that tracks `ptr` exactly (locked on return), or NULL. Tries `hint` first. */
gm_heap *gm_heap_find_locked(uintptr_t ptr, gm_heap *hint, gm_record **rec_out);
/* The same over every heap but `skip` (a caller that already asked its hint). */
gm_heap *gm_heap_find_other_locked(uintptr_t ptr, const gm_heap *skip, gm_record **rec_out);
/* True when `ptr` lies inside a pool segment of any heap (a freed or interior pool pointer). */
bool gm_heap_any_segment_holds(uintptr_t ptr);
/* Forgets every segment, block and record without a backend call (the context is gone, or
 * this is a fork child); limit reservations are returned. Lifetime counters stay. */
void gm_heap_reset_locked(gm_heap *heap);
/* Where the heap's allocations and frees count. */
static inline gm_counting gm_heap_counting(gm_heap *heap)
{
    return (gm_counting){&heap->c, heap->device, heap->solo, &heap->allocated_sync, 0};
}
static inline void gm_heap_live_changed_locked(gm_heap *heap)
{
    /* Only lock holders write it: a release store, no locked instruction on the hot path. */
    uint64_t g = atomic_load_explicit(&heap->live_gen, memory_order_relaxed);
    atomic_store_explicit(&heap->live_gen, g + 1, memory_order_release);
}
/* Removes a live record (a checked copy's cached view of its block is then stale). */
static inline void gm_heap_untrack_locked(gm_heap *heap, gm_record *rec)
{
    gm_heap_live_changed_locked(heap);
    gm_live_remove(&heap->live, rec);
}
/* Buffer ids never equal one the driver gives (small counters): the high bit is set, then the
 * heap's index, then the thread cache's (0: the heap's own), then a counter of the heap or the
 * thread cache bumped under its lock (no locked instruction on the allocation path). Heap index
 * 0xFFFF is kept for blocks imported from other processes (ipc.c). */
#define GM_BUFFER_ID_BIT (1ull << 63)
static inline uint64_t gm_buffer_id_make(const gm_heap *heap, unsigned tc_index, uint64_t seq)
{
    return GM_BUFFER_ID_BIT | ((uint64_t)(heap->index & 0xFFFF) << 47) |
           ((uint64_t)(tc_index & 0xFFF) << 35) | (seq & ((1ull << 35) - 1));
}
static inline uint64_t gm_buffer_id_next_locked(gm_heap *heap)
{
    return gm_buffer_id_make(heap, 0, ++heap->buffer_seq);
}
/* ---------------------------------------------------------------- thread caches (tcache.c)
 * Lock order: a heap's lock, then a thread cache's (a thread on its hot path takes its own
 * alone). A block's `tc` changes only with both held. A record in a thread cache's live table is
 * moved to the heap's ("adopted") the first time anything but its thread's own free looks it up,
 * so every other path (lookups, checked copies, IPC, resizing, cross-thread frees, reports) sees
 * heap-held records only. GPUMEM_THREAD_CACHE bounds the bytes each thread keeps freed. */
/* Where an allocation a thread cache holds counts (its lock held). */
static inline gm_counting gm_tcache_counting(gm_heap *heap, gm_tcache *tc)
{
    return (gm_counting){&tc->c, heap->device, heap->solo, &heap->allocated_sync, GM_TC_PEAK_SLACK};
}
/* The calling thread's cache on `heap`, attached on first use; NULL when thread caches are off
 * or the heap has no slot left. */
gm_tcache *gm_tcache_get(gm_heap *heap);
/* The calling thread's cache on `heap` if it has one; never attaches. */
gm_tcache *gm_tcache_peek(const gm_heap *heap);
/* A cached block of exactly `rounded` bytes that may be reused now, or NULL (the cache's lock
 * held). In fast mode the oldest block of that size is taken once a fence recorded after its
 * free has completed (fence.c asks or records one). */
gm_block *gm_tcache_take_locked(gm_tcache *tc, size_t rounded);
/* Keeps freed block `b` (held by `tc`) for the thread's next allocation; false when it does not
 * fit (its size's bin is another size's or full, or GPUMEM_THREAD_CACHE would be crossed).
 * `fenced`: fast mode, the block waits for a fence of the cache's (gm_fence_tc_*) before reuse;
 * else it is reusable at once (strict mode after cudaFree's barrier, or at exit). */
bool gm_tcache_keep_locked(gm_tcache *tc, gm_block *b, bool fenced);
/* The bytes one thread cache keeps at most (GPUMEM_THREAD_CACHE within GPUMEM_MAX_CACHED). */
uint64_t gm_tcache_keep_at_most(void);
/* How often a miss may take other threads' cached blocks before growing (alloc.c; tests). */
void gm_tcache_set_take_interval_ns(uint64_t ns);
/* Hands one thread cache's freed blocks back to the pool; true when any went back (heap lock).
 * `reusable_only`: only those reusable now; else a block still waiting for the cache's fence
 * joins the pool's pending list, for a fence of the heap's recorded later. */
bool gm_tcache_flush_locked(gm_heap *heap, gm_tcache *tc, bool reusable_only);
/* The same over every thread cache of the heap. */
bool gm_tcache_flush_all_locked(gm_heap *heap, bool reusable_only);
/* The live record at `ptr` in the heap's table, or adopted from a thread cache (heap lock). */
gm_record *gm_heap_live_find_locked(gm_heap *heap, uintptr_t ptr);
/* Whether pool block `b` is live (adopting it from its thread cache when it is one's). */
bool gm_heap_block_live_locked(gm_heap *heap, gm_block *b);
/* Every thread cache's records moved to the heap's table and its freed blocks to the pool. */
void gm_tcache_adopt_all_locked(gm_heap *heap);
/* Live records of the heap and of its thread caches, and a walk over them (heap lock held). */
size_t gm_heap_live_count_locked(gm_heap *heap);
void gm_heap_each_live_locked(gm_heap *heap, void (*fn)(void *cx, const gm_record *rec), void *cx);
/* Counting an allocation or free where its record says (the heap's counters or a thread
 * cache's, whose lock this takes); heap lock held. */
void gm_heap_count_alloc_locked(gm_heap *heap, const gm_record *rec, bool hit);
void gm_heap_count_free_locked(gm_heap *heap, const gm_record *rec);
void gm_heap_count_resize_locked(gm_heap *heap, const gm_record *old, const gm_record *now);
/* The thread caches' part of a heap's statistics (heap lock held): counters added into `out`,
 * their cached bytes into bytes_cached_free, the highest peak one kept into `*peak`. */
void gm_tcache_add_stats_locked(gm_heap *heap, gpumem_stats *out, uint64_t *peak);
/* Bytes the heap's thread caches hold freed (heap lock held). */
uint64_t gm_tcache_cached_locked(gm_heap *heap);
/* Bytes allocated through the heap's thread caches (heap lock held). */
uint64_t gm_tcache_allocated_locked(gm_heap *heap);
/* A heap reset (after gm_tcache_adopt_all_locked): the caches' current byte counts are zero. */
void gm_tcache_reset_counts_locked(gm_heap *heap);
/* A fork child: fresh locks, and every cache but the calling thread's detached. */
void gm_tcache_after_fork(gm_heap *heap);

/* The statistics of one device: every heap of it, the device's figures, the derived ones. */
void gm_heap_stats(int device, gpumem_stats *out);
/* Bytes this process can still obtain on `device` (limit and cached free memory considered). */
void gm_heap_mem_info(gm_heap *heap, size_t driver_free, size_t driver_total, size_t *free_out,
                 size_t *total_out);

/* ---------------------------------------------------------------- what programs see (view.c)
 * The device's memory as a program should see it under the limit: NVML keys devices by UUID
 * (its index order is not CUDA's, and CUDA_VISIBLE_DEVICES renumbers CUDA's per process). */
/* Resolves the device's limit once (by UUID in a group), given the driver's total. */
void gm_device_prepare(int device, uint64_t driver_total);
/* cuDeviceTotalMem's answer: the limit where one is set and smaller than the driver's total. */
uint64_t gm_device_visible_total(int device, uint64_t driver_total);
typedef struct gm_device_view {
    uint64_t total; /* the limit (never above the driver's total) */
    uint64_t used;  /* bytes the group reserved on it (GPUMEM_SHARED), else this process */
} gm_device_view;
/* True and `out` filled when a limit applies to the device with this UUID (cuDeviceGetUuid's
 * bytes); false when none does or the device is not one this process's CUDA sees: the driver's
 * answer stands. `driver_total`: the driver's own total (a percentage limit needs it). */
bool gm_device_view_by_uuid(const unsigned char uuid[16], uint64_t driver_total, gm_device_view *out);
typedef gm_ledger_member gm_group_process; /* pid, bytes */
/* The members of this process's group (GPUMEM_SHARED) holding memory of the device with this
 * UUID: up to `max` written to `out`, the number there are returned; -1 without a group (the
 * driver's list stands). */
int gm_group_processes(const unsigned char uuid[16], gm_group_process *out, int max);

/* ---------------------------------------------------------------- allocation (alloc.c) */
/* Out of memory: an allocation refused by the limit (GM_OOM_LIMIT) or by the device after the
 * cached segments were handed back and the request retried (GM_OOM_DEVICE). The report layer
 * installs the hook (the engine never calls upward); it runs on the allocating thread with no
 * heap lock held, on the failure path only, and must not allocate device memory. */
typedef enum gm_oom_cause { GM_OOM_LIMIT = 0, GM_OOM_DEVICE } gm_oom_cause;
typedef void (*gm_oom_hook_fn)(gm_heap *heap, size_t bytes, gm_oom_cause cause);
void gm_set_oom_hook(gm_oom_hook_fn fn); /* NULL: none */
/* Pooled allocation of `size` bytes (pooling off: a direct allocation that is still tracked). */
int gm_alloc(gm_heap *heap, size_t size, uintptr_t stream, const gm_callsite *site, uintptr_t *out);
/* Free a pointer from any kind gm_alloc/gm_track produced: GM_NOT_OURS if not tracked,
 * GM_PASSTHROUGH for a pass-through kind (`*kind_out` says which), else the free's status
 * (GPUMEM_ERROR_INVALID_VALUE: inside a pool segment but no live block's start, refused).
 * `stream` != GM_FREE_BARRIER for a stream-ordered free (cuMemFreeAsync). */
#define GM_FREE_BARRIER ((uintptr_t)-1)
gm_answer gm_free(gm_heap *hint, uintptr_t ptr, uintptr_t stream, gm_alloc_kind *kind_out);
/* gm_free with a barrier, where `current` is the heap of the calling thread's current context
 * (looked up in this same call): the barrier then needs no context lookup. */
gm_answer gm_free_current(gm_heap *current, uintptr_t ptr, gm_alloc_kind *kind_out);
/* Pass-through allocations (async, managed, VMM, captured): reserve against the limit first,
 * then record or abort. */
int gm_track_reserve(gm_heap *heap, size_t size);
void gm_track_commit(gm_heap *heap, uintptr_t ptr, size_t size, gm_alloc_kind kind,
                     uintptr_t stream, const gm_callsite *site);
void gm_track_abort(gm_heap *heap, size_t size);
/* Forgets the pass-through record of `kind` at `ptr` (GM_OURS), or finds none (GM_NOT_OURS). */
gm_owner gm_untrack(gm_heap *hint, uintptr_t ptr, gm_alloc_kind kind);
/* gm_untrack, except that the record's bytes stay reserved in the limit of its device: the caller
 * holds them from now on and hands them back with gm_limit_unreserve(*device_out, *size_out) (a
 * graph allocation freed while its graph can still recreate it at the next launch). */
gm_owner gm_untrack_keep_reserved(gm_heap *hint, uintptr_t ptr, gm_alloc_kind kind, int *device_out,
                                  size_t *size_out);
/* Hands fully free cached segments back to the device until at most `keep_cached` bytes stay
 * cached; returns the bytes released. Called unlocked. */
size_t gm_release_cached(gm_heap *heap, uint64_t keep_cached);
size_t gm_release_all_cached(void); /* every heap */
/* A context going away: gm_vmm_take_ranges_locked (heap lock held, before gm_heap_reset_locked
 * forgets the segments) copies the heap's expandable ranges and the holes in them, which are
 * unmapped already; gm_vmm_release_ranges (unlocked, after the reset) unmaps every other chunk
 * and frees the ranges (VMM memory is not freed with a context). */
typedef struct gm_vmm_ranges {
    gm_vrange vr[2];
    gm_pool_span *holes; /* malloc'd; NULL: none (or no memory to list them: unmaps are tried) */
    size_t nholes;
} gm_vmm_ranges;
void gm_vmm_take_ranges_locked(gm_heap *heap, gm_vmm_ranges *out);
void gm_vmm_release_ranges(gm_heap *heap, gm_vmm_ranges *r);
/* Peer access was enabled from a context of `accessor` to context `ctx` (of `device`): the
 * chunks of its expandable segments, mapped now and later, become accessible to `accessor`.
 * Called unlocked; GPUMEM_OK or the driver's error for the chunks mapped now. */
int gm_vmm_grant_peer(uintptr_t ctx, int device, int accessor);
/* Peer access was disabled again: chunks mapped now lose `accessor`'s access, later ones never
 * get it. The same answers. */
int gm_vmm_revoke_peer(uintptr_t ctx, int device, int accessor);
/* Testing: the virtual range reserved per heap and class (0: the device's total memory). */
void gm_vmm_set_range_size(size_t bytes);
/* Fast mode's fences (fence.c). Retires what a completed fence covers and records a new one;
 * with `wait`, synchronizes the context (lock dropped). True when some block became reusable. */
bool gm_retire_pending_locked(gm_heap *heap, bool wait);
/* Fast mode: an allocation of `rounded` bytes found no free block while blocks wait for fences.
 * True: some may have become reusable (look again; the lock may have been dropped). False: take
 * new memory. Batches fences (docs/configuration.md, "Free synchronization"): records or
 * queries one here (and after a large free: gm_fence_large_free_locked), and may wait for the
 * fence in flight (lock dropped) once the pending bytes reach GPUMEM_FENCE_BATCH. */
bool gm_fence_reclaim_locked(gm_heap *heap, size_t rounded);
/* Fast mode: a block of `size` bytes was just pended. One too large to batch gets a fence now
 * (unless one is in flight and still running), so the allocation that wants it back later asks
 * an old fence instead of recording one behind everything queued meanwhile and waiting for it. */
void gm_fence_large_free_locked(gm_heap *heap, size_t size);
/* Stream capture (the shim's capture hooks): no fence is recorded while a capture is in progress,
 * since an event recorded on a capturing stream would become a node of the program's graph.
 * gm_capture_begin_lock is held across the driver's BeginCapture, so no fence record overlaps a
 * capture starting; gm_capture_note(true) inside it when the capture began, (false) when one
 * ended. Meanwhile a miss takes new memory and a large free fences nothing. */
void gm_capture_begin_lock(void);
void gm_capture_begin_unlock(void);
void gm_capture_note(bool began);
void gm_fence_after_fork(void); /* a fork child: no capture, a fresh lock */
/* Testing: misses closer than this to the last fence batch instead of fencing (default 100 us). */
void gm_fence_set_recent_ns(uint64_t ns);
/* Fast mode in a thread cache (fence.c; the cache's lock held, never the heap's): each cache
 * records its own fences, one in flight at most, so a thread's pairs touch no shared line.
 * gm_fence_tc_tag: `b`, just freed, waits for the cache's next fence. gm_fence_tc_ready: its
 * fence has completed. gm_fence_tc_settle: `head`, the oldest block of its size (`queued` of
 * them), is not ready; asks the fence in flight or records one (batching as the heap does);
 * true when it is ready now. gm_fence_tc_after_keep: records a fence early, once half a bin's
 * worth (or half the bytes the cache may keep) waits, so it has completed by the time those
 * blocks come round. gm_fence_tc_drop: the
 * fence forgotten (destroyed unless `destroy` is false: a fork child's belongs to the parent). */
static inline void gm_fence_tc_tag(gm_tcache *tc, gm_block *b) { b->fence_epoch = tc->fence_next; }
static inline bool gm_fence_tc_ready(const gm_tcache *tc, const gm_block *b)
{
    return (int32_t)(b->fence_epoch - tc->fence_done) <= 0;
}
bool gm_fence_tc_settle_locked(gm_tcache *tc, const gm_block *head, unsigned queued);
void gm_fence_tc_after_keep_locked(gm_tcache *tc);
void gm_fence_tc_drop_locked(gm_tcache *tc, bool destroy);
/* Sets which blocks thread cache `tc`, which keeps at most `cache_bytes`, keeps in fast mode
 * (fast_keep_max, fast_keep_above): none while the heap has not learnt its batch (heap and
 * cache locked). */
void gm_fence_tc_learn_locked(const gm_heap *heap, gm_tcache *tc, uint64_t cache_bytes);
/* Learns the heap's batch if it has not yet (the lock dropped meanwhile). */
void gm_fence_learn_batch_locked(gm_heap *heap);

/* Resizing a live pool block in place (named buffers). The block is the live one at `ptr` in
 * `heap`; GPUMEM_ERROR_NOT_SUPPORTED when it is no pool block (it must move instead). */
/* Grows toward `*cap` (at least `need` bytes); on success `*cap` is the capacity reached. */
int gm_resize_grow_in_place(gm_heap *heap, uintptr_t ptr, size_t need, size_t *cap);
/* Shrinks to `target` bytes; the tail is freed with cudaFree's ordering (barrier or fence). */
int gm_resize_shrink_in_place(gm_heap *heap, uintptr_t ptr, size_t target);
/* GPUMEM_OK while `ptr` is still a live allocation of `heap`'s context `ctx` with `requested`
 * bytes and `tag`; GPUMEM_ERROR_INVALID_CONTEXT when the context went away, else
 * GPUMEM_ERROR_INVALID_VALUE (freed behind the owner's back). */
int gm_check_owned(gm_heap *heap, uintptr_t ctx, uintptr_t ptr, size_t requested, uint16_t tag);

/* ---------------------------------------------------------------- lookup (lookup.c) */
/* The live block containing `ptr` (interior pointers too): its start and requested size.
 * GM_NOT_OURS outside our segments; else GPUMEM_OK, or GPUMEM_ERROR_INVALID_VALUE inside a
 * segment but not within a live block's requested size (freed memory, or a block's rounding
 * slack, which the driver does not count as part of a separate allocation either). */
gm_answer gm_lookup(uintptr_t ptr, uintptr_t *base, size_t *size);

/* What the driver would tell apart for a separate allocation: gm_block_identity_get answers
 * like gm_lookup and fills this. */
typedef struct gm_block_identity {
    uintptr_t base;
    size_t size;        /* requested */
    uint64_t buffer_id;
    bool sync_memops;
    uintptr_t ctx;      /* the heap's context */
    uintptr_t seg_base; /* the driver allocation it lives in */
    size_t seg_size;
    size_t vmm_chunk;   /* an expandable segment's chunk bytes; 0: a classic segment */
} gm_block_identity;
gm_answer gm_block_identity_get(uintptr_t ptr, gm_block_identity *out);
/* Runs `fn` on the live block at `ptr` with its heap locked (the answers of gm_lookup; `fn`
 * runs only for GPUMEM_OK). */
gm_answer gm_with_live_block(uintptr_t ptr, void (*fn)(gm_heap *, gm_block *, void *), void *cx);
/* Records cuPointerSetAttribute(SYNC_MEMOPS) on the live block at `ptr` (same answers). */
gm_answer gm_block_set_sync_memops(uintptr_t ptr, bool on);

/* One side of a copy, as the checks see it. */
typedef enum {
    GM_SPAN_NOT_OURS = 0, /* outside every pool segment: the driver's business */
    GM_SPAN_LIVE,         /* inside one live pool block, within its requested size */
    GM_SPAN_PAST_END,     /* starts in a live block but runs past its requested size */
    GM_SPAN_FREED         /* starts in pool memory no live block covers (freed, or pending reuse) */
} gm_span_status;

typedef struct gm_span {
    uintptr_t ptr; /* in */
    size_t n;      /* in: bytes */
    /* out */
    uint8_t status; /* gm_span_status */
    int device;     /* device of the heap whose segment holds ptr (when not NOT_OURS) */
    uintptr_t base; /* LIVE/PAST_END: the allocation; FREED: start of the free region */
    size_t size;    /* LIVE/PAST_END: its requested size; FREED: the free region's size */
} gm_span;
/* Resolves up to two spans (a copy's destination and source). Lock-free for the blocks this
 * thread checked last while they stay live (the heaps' live_gen). */
void gm_lookup_spans(gm_span *spans, size_t count);
/* The block of `heap` that covers `ptr` (any state), fast for the pointers copies use. `*live`
 * tells it was found through the live table (it is live); otherwise the caller checks. */
gm_block *gm_lookup_block_at_locked(gm_heap *heap, uintptr_t ptr, bool *live);

/* ---------------------------------------------------------------- contexts (context.c) */
/* A context going away (destroyed, or its device reset): hands its cached memory back while the
 * context is still alive, keeps its leaks for the exit report, forgets its pool, its pinned
 * blocks and its stager. The leak report of the context is written first, by the caller
 * (report/report.c, gm_report_context). */
void gm_context_teardown(uintptr_t ctx, bool ctx_alive);

#endif
