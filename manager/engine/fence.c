/* Fast mode's fences (GPUMEM_FREE_SYNC=0): when a block freed without cudaFree's barrier may be
 * handed out again.
 *
 * A freed block waits on the pool's pending list, tagged with an epoch; a fence (the backend's
 * events on the legacy stream and on every non-blocking stream of the context) recorded after
 * the free covers it, and only once that fence has completed does the block go back to the bins.
 * A fence costs about 1 us (event records and a query), so it is batched:
 *   - only an allocation that finds no free block (a miss) records or asks a fence; a pool hit
 *     never does, and at most one fence is in flight per heap;
 *   - while misses come less than `recent_ns` after the last fence, fewer than
 *     FENCE_BATCH_BLOCKS blocks wait and their bytes stay within the batch (GPUMEM_FENCE_BATCH,
 *     at most 1/FENCE_BATCH_SHARE of the device's limit or memory), a miss takes new memory
 *     instead of fencing, so in a tight alloc/free loop one fence covers FENCE_BATCH_BLOCKS
 *     frees (blocks up to batch/FENCE_BATCH_BLOCKS only: a loop of larger blocks would multiply
 *     its memory for it);
 *   - while the fence in flight has not completed (a busy device), a miss takes new memory
 *     within the batch, and beyond it waits for that fence: the bytes waiting while the pool
 *     grows for them never pass the batch.
 *   - a block too large to batch is fenced at its free already (gm_fence_large_free_locked), so
 *     the miss that wants it back asks a fence the GPU has usually passed instead of waiting.
 * The caller (take_block_locked in alloc.c) still waits for every fence before it fails for
 * lack of memory. Every function runs under the heap lock, but the thread caches' (gm_fence_tc_*,
 * at the end): a block a thread frees itself usually waits in its own cache, for that cache's
 * fence, by the same rules per thread. */
#include "gm_engine.h"

enum {
    FENCE_BATCH_BLOCKS = 16, /* frees one fence covers in a tight loop */
    FENCE_BATCH_SHARE = 64,  /* the batch is at most this fraction of the limit or the memory */
};

/* Misses closer together than this batch; rarer ones fence at once (a 1-us fence per 100 us
 * costs 1%, not worth memory). */
static uint64_t recent_ns = 100000;

void gm_fence_set_recent_ns(uint64_t ns) { recent_ns = ns; }

/* ------------------------------------------------------------------ stream capture */

/* Fence records read-lock it; a capture's start write-locks it across the driver's call. */
static pthread_rwlock_t capture_gate = PTHREAD_RWLOCK_INITIALIZER;
static _Atomic int captures; /* in progress */

void gm_capture_begin_lock(void) { pthread_rwlock_wrlock(&capture_gate); }
void gm_capture_begin_unlock(void) { pthread_rwlock_unlock(&capture_gate); }
void gm_capture_note(bool began) { atomic_fetch_add(&captures, began ? 1 : -1); }

void gm_fence_after_fork(void)
{
    pthread_rwlock_init(&capture_gate, NULL);
    atomic_store(&captures, 0);
}

static bool capturing(void) { return atomic_load(&captures) > 0; }

static void fence_drop_locked(gm_heap *heap)
{
    if (heap->fence) gm_mgr.backend->fence_destroy(heap->fence);
    heap->fence = NULL;
}

/* Synchronizes the context (lock dropped) and retires every block pended before. */
static bool retire_waiting_locked(gm_heap *heap)
{
    uint32_t covered = gm_pool_close_epoch_locked(&heap->pool);
    heap->c.fence_waits++;
    pthread_mutex_unlock(&heap->lock);
    int rc = gm_mgr.backend->synchronize(heap->ctx);
    pthread_mutex_lock(&heap->lock);
    return rc == GPUMEM_OK && gm_pool_retire_upto_locked(&heap->pool, covered);
}

/* The backend's fence on `ctx`, or NULL while a capture is in progress (an event on a capturing
 * stream would join its graph) or when recording failed. */
static gm_fence *record_unless_capturing(uintptr_t ctx)
{
    gm_fence *f = NULL;
    pthread_rwlock_rdlock(&capture_gate);
    int rc = capturing() ? GPUMEM_ERROR_NOT_SUPPORTED : gm_mgr.backend->fence_record(ctx, &f);
    pthread_rwlock_unlock(&capture_gate);
    return rc == GPUMEM_OK ? f : NULL;
}

/* Records a fence over every pending block: the one in flight from now on. */
static bool fence_record_locked(gm_heap *heap, uint64_t now)
{
    gm_fence *f = record_unless_capturing(heap->ctx);
    if (!f) return false;
    heap->fence = f;
    heap->c.fences++;
    heap->fence_epoch = gm_pool_close_epoch_locked(&heap->pool);
    heap->fence_at_ns = now;
    return true;
}

/* Asks the fence in flight; once it has completed, retires what it covers. True when a block
 * moved to the bins. A failed fence is dropped (its blocks wait for the next one). */
static bool fence_poll_locked(gm_heap *heap)
{
    int q = gm_mgr.backend->fence_query(heap->fence);
    if (q == 1) return false;
    bool any = q == 0 && gm_pool_retire_upto_locked(&heap->pool, heap->fence_epoch);
    fence_drop_locked(heap);
    return any;
}

/* Waits for the fence in flight (lock dropped; the fence is this thread's meanwhile, so no
 * other thread asks or destroys it) and retires what it covers; without one, synchronizes. */
static bool fence_wait_locked(gm_heap *heap)
{
    gm_fence *f = heap->fence;
    if (!f) return retire_waiting_locked(heap);
    uint32_t epoch = heap->fence_epoch;
    heap->fence = NULL;
    heap->c.fence_waits++;
    pthread_mutex_unlock(&heap->lock);
    int rc = gm_mgr.backend->fence_wait(f);
    gm_mgr.backend->fence_destroy(f);
    pthread_mutex_lock(&heap->lock);
    return rc == GPUMEM_OK && gm_pool_retire_upto_locked(&heap->pool, epoch);
}

/* The heap's batch: GPUMEM_FENCE_BATCH, at most 1/FENCE_BATCH_SHARE of the device's limit or,
 * without one, of its memory, and at most GPUMEM_MAX_CACHED (else the blocks a fence retires
 * would go back to the device at the next free, and the next misses take them anew). Asks the
 * backend once per device, with the lock dropped. */
static void learn_batch_locked(gm_heap *heap)
{
    int device = heap->device;
    pthread_mutex_unlock(&heap->lock);
    size_t total = 0;
    if (gm_mgr.backend->device_total(device, &total) != GPUMEM_OK) total = 0;
    uint64_t visible = gm_limit_visible_total(device, total ? total : UINT64_MAX);
    uint64_t batch = gm_mgr.cfg->fence_batch, cap = visible / FENCE_BATCH_SHARE;
    if (gm_mgr.cfg->max_cached != GM_UNLIMITED && gm_mgr.cfg->max_cached < cap) cap = gm_mgr.cfg->max_cached;
    pthread_mutex_lock(&heap->lock);
    heap->fence_batch = batch < cap ? batch : cap;
    heap->fence_batch_device = device + 1;
}

/* Whether growing for `rounded` stays below the limit (a grow that crosses it would wait). */
static bool room_to_grow(const gm_heap *heap, size_t rounded)
{
    return gm_limit_headroom(heap->device) >= gm_pool_next_segment_size(&heap->pool, rounded);
}

bool gm_fence_reclaim_locked(gm_heap *heap, size_t rounded)
{
    gm_pool *pool = &heap->pool;
    if (!pool->pending_head) return false;
    if (capturing()) return false; /* no driver call that could touch the capture: grow */
    if (heap->fence_batch_device != heap->device + 1) {
        learn_batch_locked(heap);
        return true; /* the lock was dropped: look again */
    }
    if (heap->fence && fence_poll_locked(heap)) return true;
    uint64_t batch = heap->fence_batch, now = gm_now_ns();
    bool fits = rounded <= batch / FENCE_BATCH_BLOCKS && pool->pending_bytes + rounded <= batch;
    if (!heap->fence) {
        bool recent = heap->fence_at_ns && now - heap->fence_at_ns < recent_ns;
        if (recent && fits && pool->pending_blocks < FENCE_BATCH_BLOCKS && room_to_grow(heap, rounded))
            return false; /* batch: one more block instead of a fence now */
        /* Asked at once: on an idle device the fence has usually completed by then, and a miss
         * answered now spares a new segment. */
        if (fence_record_locked(heap, now) && fence_poll_locked(heap)) return true;
    }
    if (heap->fence && fits) return false; /* not complete: the device is busy; grow meanwhile */
    return fence_wait_locked(heap);
}

/* A training loop frees its largest blocks (logits, their gradients) and allocates them again a
 * step later. Fenced at that allocation, the fence sits behind all the work queued since, so it
 * has not completed, the block does not fit the batch, and the thread waits for the GPU: the
 * launch queue drains (PyTorch's GPT loop, caching off: 2-4 waits a step). Fenced at the free,
 * the GPU has usually passed the fence by then and the allocation only asks it. Costs one fence
 * per large free at most; with the batch not learnt yet (no miss so far), or while a stream
 * capture is in progress, it does nothing (the block then waits for a miss's fence as before). */
void gm_fence_large_free_locked(gm_heap *heap, size_t size)
{
    if (heap->fence_batch_device != heap->device + 1 || size <= heap->fence_batch / FENCE_BATCH_BLOCKS) return;
    if (capturing()) return; /* an event on a capturing stream would join its graph */
    if (heap->fence) fence_poll_locked(heap); /* drops it once complete: its blocks go to the bins */
    if (!heap->fence) fence_record_locked(heap, gm_now_ns());
}

bool gm_retire_pending_locked(gm_heap *heap, bool wait)
{
    if (!heap->pool.pending_head) return false;
    if (capturing()) return false; /* a synchronize would invalidate the capture */
    if (wait) return retire_waiting_locked(heap);
    if (heap->fence && fence_poll_locked(heap)) return true;
    return !heap->fence && fence_record_locked(heap, gm_now_ns()) && fence_poll_locked(heap);
}

/* ------------------------------------------------------------------ thread caches */

/* A cache's fences follow the heap's rules, per thread and without the heap's lock: a block is
 * reused only once a fence recorded after its free has completed; one fence is in flight at
 * most; in a tight loop (fences closer than recent_ns) one fence covers a bin's worth of frees,
 * and an allocation that finds its oldest block still waiting takes new memory from the heap
 * instead (the heap's batch and limit rules apply there, and a miss that would fail flushes
 * the waiting blocks into the heap's pending list first). The sequence numbers are the cache's
 * own: fence_next is the number the next fence gets, fence_done the last one seen complete. */

/* A cache keeps the blocks of which several fit in its bytes, so that one fence covers a few
 * frees, and the blocks the heap would fence at every free anyway (gm_fence_large_free_locked);
 * the ones between wait in the heap, whose batch covers 16 of them with one fence (measured on
 * the H200: 64 MiB blocks kept in a 128 MiB cache cost a fence per pair, 1.8 us against 0.6). */
void gm_fence_tc_learn_locked(const gm_heap *heap, gm_tcache *tc, uint64_t cache_bytes)
{
    if (heap->fence_batch_device != heap->device + 1) return;
    tc->fast_cache_bytes = cache_bytes;
    size_t heap_share = heap->fence_batch / FENCE_BATCH_BLOCKS;
    uint64_t cache_share = cache_bytes / 4;
    tc->fast_keep_max = heap_share < cache_share ? heap_share : (size_t)cache_share;
    tc->fast_keep_above = heap_share;
}

void gm_fence_learn_batch_locked(gm_heap *heap)
{
    if (heap->fence_batch_device != heap->device + 1) learn_batch_locked(heap);
}

void gm_fence_tc_drop_locked(gm_tcache *tc, bool destroy)
{
    if (tc->fence && destroy) gm_mgr.backend->fence_destroy(tc->fence);
    tc->fence = NULL;
}

/* Asks the cache's fence in flight; once complete (or failed: its blocks wait for the next). */
static void tc_poll_locked(gm_tcache *tc)
{
    int q = gm_mgr.backend->fence_query(tc->fence);
    if (q == 1) return;
    if (q == 0) tc->fence_done = tc->fence_seq;
    gm_fence_tc_drop_locked(tc, true);
}

/* Records a fence over every block the cache keeps: the one in flight from now on. */
static bool tc_record_locked(gm_tcache *tc, uint64_t now)
{
    gm_fence *f = record_unless_capturing(tc->heap->ctx);
    if (!f) return false;
    tc->fence = f;
    tc->fence_seq = tc->fence_next++;
    tc->unfenced = 0;
    tc->unfenced_bytes = 0;
    tc->fence_at_ns = now;
    tc->c.fences++;
    return true;
}

bool gm_fence_tc_settle_locked(gm_tcache *tc, const gm_block *head, unsigned queued)
{
    if (tc->fence) tc_poll_locked(tc);
    if (gm_fence_tc_ready(tc, head)) return true;
    if (tc->fence) return false; /* covered by the one in flight, which has not completed: busy */
    uint64_t now = gm_now_ns();
    bool recent = tc->fence_at_ns && now - tc->fence_at_ns < recent_ns;
    /* Batch while the cache has room for one more of them: else it could never fill its bin
     * (large blocks, or GPUMEM_THREAD_CACHE small) and every miss would go to the heap. */
    bool room = queued < GM_TC_BIN_MAX && tc->cached_bytes + head->size <= tc->fast_cache_bytes;
    if (recent && room) return false; /* batch: one more block from the heap */
    if (!tc_record_locked(tc, now)) return false;
    tc_poll_locked(tc); /* on an idle device it has often completed already */
    return gm_fence_tc_ready(tc, head);
}

void gm_fence_tc_after_keep_locked(gm_tcache *tc)
{
    if (tc->unfenced < GM_TC_BIN_MAX / 2 && tc->unfenced_bytes * 2 < tc->fast_cache_bytes) return;
    if (tc->fence) tc_poll_locked(tc);
    if (!tc->fence) tc_record_locked(tc, gm_now_ns());
}
