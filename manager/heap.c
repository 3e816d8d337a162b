/* The caching pool of one context: segments reserved from the device, carved into 512-B aligned
 * blocks kept in two-level segregated bins (TLSF), split on allocation and coalesced with free
 * neighbours on free. Small requests (<= 1 MiB) come from small segments so they do not break up
 * the large ones, as in PyTorch's allocator.
 *
 * Locking: every *_locked function runs under heap->lock. Backend calls (which can block for
 * long: a real cudaMalloc is 80 us, cudaFree is a device barrier) run with the lock dropped. */
#include <stdlib.h>
#include <string.h>

#include "gm_internal.h"

/* ------------------------------------------------------------------ size arithmetic */

size_t gm_round_size(size_t size)
{
    const size_t max = (size_t)1 << 46; /* 64 TiB: beyond any device, keeps the bins finite */
    if (size == 0 || size > max) return 0;
    return (size + GM_ALIGN - 1) & ~(size_t)(GM_ALIGN - 1);
}

static size_t round_up(size_t v, size_t to) { return (v + to - 1) / to * to; }

static int floor_log2(uint64_t x) { return 63 - __builtin_clzll(x); }

/* Bin of a block of `size` bytes (size >= 512, so the first level is >= 9). */
static void bin_of(size_t size, int *fl, int *sl)
{
    int f = floor_log2(size);
    *fl = f;
    *sl = (int)((size >> (f - 4)) & (GM_SL_COUNT - 1));
}

/* ------------------------------------------------------------------ bins */

static gm_bins *bins_for(gm_heap *heap, const gm_segment *seg)
{
    return seg->small ? &heap->small_bins : &heap->large_bins;
}

static void bins_insert(gm_bins *bins, gm_block *b)
{
    int fl, sl;
    bin_of(b->size, &fl, &sl);
    b->bin_fl = (uint8_t)fl;
    b->bin_sl = (uint8_t)sl;
    b->fprev = NULL;
    b->fnext = bins->heads[fl][sl];
    if (b->fnext) b->fnext->fprev = b;
    bins->heads[fl][sl] = b;
    bins->fl_bitmap |= 1ull << fl;
    bins->sl_bitmap[fl] |= (uint16_t)(1u << sl);
}

static void bins_remove(gm_bins *bins, gm_block *b)
{
    int fl = b->bin_fl, sl = b->bin_sl;
    if (b->fprev) b->fprev->fnext = b->fnext;
    else bins->heads[fl][sl] = b->fnext;
    if (b->fnext) b->fnext->fprev = b->fprev;
    b->fprev = b->fnext = NULL;
    if (!bins->heads[fl][sl]) {
        bins->sl_bitmap[fl] &= (uint16_t)~(1u << sl);
        if (!bins->sl_bitmap[fl]) bins->fl_bitmap &= ~(1ull << fl);
    }
}

/* The first non-empty bin at or above (fl, sl): every block there is at least that bin's size. */
static gm_block *bins_first_from(const gm_bins *bins, int fl, int sl)
{
    uint32_t sl_map = sl < GM_SL_COUNT ? (uint32_t)bins->sl_bitmap[fl] & (~0u << sl) : 0;
    if (!sl_map) {
        uint64_t fl_map = fl + 1 < GM_FL_COUNT ? bins->fl_bitmap & (~0ull << (fl + 1)) : 0;
        if (!fl_map) return NULL;
        fl = __builtin_ctzll(fl_map);
        sl_map = bins->sl_bitmap[fl];
    }
    return bins->heads[fl][__builtin_ctz(sl_map)];
}

/* Best fit to within one bin (1/16 of the size): the smallest fitting block of the request's own
 * bin, else the head of the next non-empty bin up. The own-bin scan is bounded so a long list of
 * equal blocks cannot make allocation linear. */
static gm_block *bins_find(const gm_bins *bins, size_t size)
{
    int fl, sl;
    bin_of(size, &fl, &sl);
    gm_block *best = NULL;
    int scanned = 0;
    for (gm_block *b = bins->heads[fl][sl]; b && scanned < 32; b = b->fnext, scanned++) {
        if (b->size == size) return b;
        if (b->size > size && (!best || b->size < best->size)) best = b;
    }
    if (best) return best;
    return bins_first_from(bins, fl, sl + 1);
}

/* ------------------------------------------------------------------ block headers */

static gm_block *block_new(gm_heap *heap)
{
    gm_block *b = heap->spare_blocks;
    if (b) heap->spare_blocks = b->fnext;
    else b = malloc(sizeof *b);
    if (b) { /* the record is filled on allocation; clear only what the pool reads */
        b->prev = b->next = b->fprev = b->fnext = NULL;
        b->seg = NULL;
        b->state = GM_BLOCK_FREE;
        b->fence_epoch = 0;
        b->rec.ptr = 0;
    }
    return b;
}

static void block_recycle(gm_heap *heap, gm_block *b)
{
    b->fnext = heap->spare_blocks;
    heap->spare_blocks = b;
}

/* ------------------------------------------------------------------ segments */

static size_t segment_index(const gm_heap *heap, uintptr_t addr)
{
    size_t lo = 0, hi = heap->nsegments;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (heap->segments[mid]->base <= addr) lo = mid + 1;
        else hi = mid;
    }
    return lo; /* first segment with base > addr */
}

static gm_segment *segment_containing(const gm_heap *heap, uintptr_t addr)
{
    size_t i = segment_index(heap, addr);
    if (i == 0) return NULL;
    gm_segment *s = heap->segments[i - 1];
    return addr < s->base + s->size ? s : NULL;
}

static void widen_pool_range(uintptr_t base, size_t size)
{
    uintptr_t lo = atomic_load(&gm_mgr.pool_lo), hi = atomic_load(&gm_mgr.pool_hi);
    /* lo 0: no segment yet (the range [0, 0) holds nothing). */
    while ((lo == 0 || base < lo) && !atomic_compare_exchange_weak(&gm_mgr.pool_lo, &lo, base)) {}
    while (base + size > hi && !atomic_compare_exchange_weak(&gm_mgr.pool_hi, &hi, base + size)) {}
}

static bool segments_insert(gm_heap *heap, gm_segment *seg)
{
    if (heap->nsegments == heap->segments_cap) {
        size_t cap = heap->segments_cap ? heap->segments_cap * 2 : 16;
        gm_segment **grown = realloc(heap->segments, cap * sizeof *grown);
        if (!grown) return false;
        heap->segments = grown;
        heap->segments_cap = cap;
    }
    size_t i = segment_index(heap, seg->base);
    memmove(&heap->segments[i + 1], &heap->segments[i], (heap->nsegments - i) * sizeof seg);
    heap->segments[i] = seg;
    __atomic_store_n(&heap->nsegments, heap->nsegments + 1, __ATOMIC_RELAXED);
    widen_pool_range(seg->base, seg->size); /* before any block of it is handed out */
    return true;
}

static void segments_remove(gm_heap *heap, gm_segment *seg)
{
    size_t i = segment_index(heap, seg->base) - 1;
    memmove(&heap->segments[i], &heap->segments[i + 1], (heap->nsegments - i - 1) * sizeof seg);
    __atomic_store_n(&heap->nsegments, heap->nsegments - 1, __ATOMIC_RELAXED);
}

/* Adds a fresh segment of `size` bytes at `base` as one free block. */
static bool heap_add_segment_locked(gm_heap *heap, uintptr_t base, size_t size, bool small)
{
    gm_segment *seg = calloc(1, sizeof *seg);
    gm_block *b = block_new(heap);
    if (seg) {
        seg->base = base; /* before the insert: the sorted array is ordered by base */
        seg->size = size;
        seg->small = small;
        seg->first = b;
    }
    if (!seg || !b || !segments_insert(heap, seg)) {
        free(seg);
        if (b) block_recycle(heap, b);
        return false;
    }
    b->addr = base;
    b->size = size;
    b->seg = seg;
    b->state = GM_BLOCK_FREE;
    bins_insert(bins_for(heap, seg), b);
    heap->c.segments++;
    heap->c.bytes_free += size;
    return true;
}

/* ------------------------------------------------------------------ growth */

/* Size of the next segment for a request of `rounded` bytes: small requests get a small segment;
 * large ones the growth-factor sequence (each new shared segment is the previous one times
 * GPUMEM_GROWTH_FACTOR, between GPUMEM_SEGMENT_MIN and _MAX); requests of GPUMEM_DEDICATED_MIN or
 * more, or larger than the sequence's segment, get a segment sized to themselves. */
size_t gm_next_segment_size(gm_heap *heap, size_t rounded)
{
    const gm_config *cfg = gm_mgr.cfg;
    if (rounded <= GM_SMALL_MAX) return round_up(cfg->small_segment, GM_SEGMENT_ALIGN);
    size_t own = round_up(rounded, GM_SEGMENT_ALIGN);
    if (rounded >= cfg->dedicated_min) return own;
    /* Read without the heap lock (growth runs unlocked: a backend call never holds it); a value
     * another thread is advancing only picks the previous step of the sequence. */
    size_t next = __atomic_load_n(&heap->next_large_segment, __ATOMIC_RELAXED);
    if (!next) next = cfg->segment_min;
    next = round_up(next, GM_SEGMENT_ALIGN);
    return own > next ? own : next;
}

static void advance_growth_locked(gm_heap *heap, size_t used)
{
    const gm_config *cfg = gm_mgr.cfg;
    double grown = (double)used * cfg->growth_factor;
    size_t next = grown >= (double)cfg->segment_max ? cfg->segment_max : (size_t)grown;
    if (next < cfg->segment_min) next = cfg->segment_min;
    __atomic_store_n(&heap->next_large_segment, next, __ATOMIC_RELAXED);
}

/* Reserve `size` against the limit, handing cached segments back first if that is what it takes. */
static bool reserve_with_release(gm_heap *heap, size_t size)
{
    if (gm_limit_reserve(heap->device, size)) return true;
    if (gm_heap_release_cached(heap, 0) == 0) return false;
    pthread_mutex_lock(&heap->lock);
    heap->c.release_retries++;
    pthread_mutex_unlock(&heap->lock);
    if (gm_trace_on) gm_trace_instant("oom retry", heap->device, size, NULL);
    return gm_limit_reserve(heap->device, size);
}

/* One backend allocation of `size`, retried once after releasing cached segments on OOM. */
static int backend_alloc_with_release(gm_heap *heap, size_t size, uintptr_t *base)
{
    const gm_backend *be = gm_mgr.backend;
    int rc = be->mem_alloc(heap->ctx, size, base);
    if (rc != GPUMEM_ERROR_OUT_OF_MEMORY) return rc;
    pthread_mutex_lock(&heap->lock);
    heap->c.backend_ooms++;
    pthread_mutex_unlock(&heap->lock);
    if (gm_trace_on) gm_trace_instant("device oom", heap->device, size, NULL);
    if (gm_heap_release_cached(heap, 0) == 0) return rc;
    pthread_mutex_lock(&heap->lock);
    heap->c.release_retries++;
    pthread_mutex_unlock(&heap->lock);
    if (gm_trace_on) gm_trace_instant("oom retry", heap->device, size, NULL);
    return be->mem_alloc(heap->ctx, size, base);
}

/* Tries one segment size: limit, then device. */
static int try_segment(gm_heap *heap, size_t size, bool small, size_t rounded)
{
    uintptr_t base = 0;
    if (!reserve_with_release(heap, size)) return GPUMEM_ERROR_OUT_OF_MEMORY;
    int rc = backend_alloc_with_release(heap, size, &base);
    if (rc != GPUMEM_OK) {
        gm_limit_unreserve(heap->device, size);
        return rc;
    }
    pthread_mutex_lock(&heap->lock);
    bool ok = heap_add_segment_locked(heap, base, size, small);
    if (ok && !small && size < gm_mgr.cfg->dedicated_min && size > rounded)
        advance_growth_locked(heap, size);
    pthread_mutex_unlock(&heap->lock);
    if (!ok) {
        gm_mgr.backend->mem_free(heap->ctx, base);
        gm_limit_unreserve(heap->device, size);
        return GPUMEM_ERROR_OUT_OF_MEMORY;
    }
    return GPUMEM_OK;
}

/* Adds a segment able to hold `rounded` bytes. Never crosses the limit: when the growth-factor
 * size does not fit (limit or device), falls back to a segment sized to the request. */
int gm_heap_grow(gm_heap *heap, size_t rounded)
{
    bool small = rounded <= GM_SMALL_MAX;
    size_t want = gm_next_segment_size(heap, rounded);
    size_t own = round_up(rounded, GM_SEGMENT_ALIGN);
    size_t headroom = gm_limit_headroom(heap->device);
    if (want > headroom && own <= headroom) want = own;
    int rc = try_segment(heap, want, small, rounded);
    if (rc == GPUMEM_ERROR_OUT_OF_MEMORY && want > own) rc = try_segment(heap, own, small, rounded);
    if (rc == GPUMEM_ERROR_OUT_OF_MEMORY && own > rounded) /* last resort: exactly the request */
        rc = try_segment(heap, rounded, small, rounded);
    if (rc == GPUMEM_ERROR_OUT_OF_MEMORY) {
        pthread_mutex_lock(&heap->lock);
        bool limited = gm_limit_headroom(heap->device) < rounded;
        if (limited) heap->c.limit_rejections++;
        pthread_mutex_unlock(&heap->lock);
        if (limited && gm_trace_on) gm_trace_instant("limit rejection", heap->device, rounded, NULL);
    }
    return rc;
}

/* ------------------------------------------------------------------ allocation */

/* Carves `rounded` bytes out of free block `b`, leaving the tail free. */
/* Cuts `b` after its first `at` bytes: the rest becomes a block of its own right after it, in
 * `state` and in no bin yet. NULL (and `b` unchanged) when no block header can be had. */
static gm_block *cut_tail_locked(gm_heap *heap, gm_block *b, size_t at, uint8_t state)
{
    gm_block *tail = block_new(heap);
    if (!tail) return NULL;
    tail->addr = b->addr + at;
    tail->size = b->size - at;
    tail->seg = b->seg;
    tail->state = state;
    tail->prev = b;
    tail->next = b->next;
    if (b->next) b->next->prev = tail;
    b->next = tail;
    b->size = at;
    return tail;
}

static void split_block_locked(gm_heap *heap, gm_block *b, size_t rounded)
{
    if (b->size - rounded < GM_ALIGN) return;
    gm_block *tail = cut_tail_locked(heap, b, rounded, GM_BLOCK_FREE);
    if (tail) bins_insert(bins_for(heap, b->seg), tail); /* else the slack stays inside: correct */
}

int gm_heap_alloc_locked(gm_heap *heap, size_t rounded, gm_block **out)
{
    gm_bins *bins = rounded <= GM_SMALL_MAX ? &heap->small_bins : &heap->large_bins;
    gm_block *b = bins_find(bins, rounded);
    if (!b) return GPUMEM_ERROR_OUT_OF_MEMORY;
    bins_remove(bins, b);
    split_block_locked(heap, b, rounded);
    b->state = GM_BLOCK_LIVE;
    b->seg->used += b->size;
    heap->c.bytes_free -= b->size;
    *out = b;
    return GPUMEM_OK;
}

/* ------------------------------------------------------------------ free and coalescing */

static void merge_into_prev_locked(gm_heap *heap, gm_block *prev, gm_block *b)
{
    prev->size += b->size;
    prev->next = b->next;
    if (b->next) b->next->prev = prev;
    block_recycle(heap, b);
}

/* Returns a LIVE or PENDING block to the bins, merged with free neighbours. */
void gm_heap_free_block_locked(gm_heap *heap, gm_block *b)
{
    gm_bins *bins = bins_for(heap, b->seg);
    if (b->state == GM_BLOCK_LIVE) {
        gm_heap_live_changed_locked(heap);
        b->seg->used -= b->size;
        heap->c.bytes_free += b->size;
    }
    b->state = GM_BLOCK_FREE;
    gm_block *next = b->next;
    if (next && next->state == GM_BLOCK_FREE) {
        bins_remove(bins, next);
        merge_into_prev_locked(heap, b, next);
    }
    gm_block *prev = b->prev;
    if (prev && prev->state == GM_BLOCK_FREE) {
        bins_remove(bins, prev);
        merge_into_prev_locked(heap, prev, b);
        b = prev;
    }
    bins_insert(bins, b);
}

/* Fast mode: the block waits for a fence covering all work enqueued before this free. */
void gm_heap_pend_block_locked(gm_heap *heap, gm_block *b)
{
    gm_heap_live_changed_locked(heap);
    b->seg->used -= b->size;
    heap->c.bytes_free += b->size;
    b->state = GM_BLOCK_PENDING;
    b->fence_epoch = heap->epoch + 1;
    b->fprev = NULL;
    b->fnext = heap->pending_head;
    if (b->fnext) b->fnext->fprev = b;
    heap->pending_head = b;
    heap->pending_bytes += b->size;
}

/* Moves pending blocks covered by `epoch` to the bins. */
static bool retire_upto_locked(gm_heap *heap, uint32_t epoch)
{
    bool any = false;
    gm_block *b = heap->pending_head;
    while (b) {
        gm_block *next = b->fnext;
        if ((int32_t)(b->fence_epoch - epoch) <= 0) {
            if (b->fprev) b->fprev->fnext = b->fnext;
            else heap->pending_head = b->fnext;
            if (b->fnext) b->fnext->fprev = b->fprev;
            heap->pending_bytes -= b->size;
            gm_heap_free_block_locked(heap, b);
            any = true;
        }
        b = next;
    }
    return any;
}

static void fence_drop_locked(gm_heap *heap)
{
    if (heap->fence) gm_mgr.backend->fence_destroy(heap->fence);
    heap->fence = NULL;
}

/* Retires what the outstanding fence covers if it has completed, and records a new fence for
 * blocks freed since. With `wait`, synchronizes the context (lock dropped) and retires every
 * block freed before the wait began. Returns true when some block became reusable. */
bool gm_heap_retire_pending_locked(gm_heap *heap, bool wait)
{
    const gm_backend *be = gm_mgr.backend;
    if (!heap->pending_head) return false;
    if (wait) {
        uint32_t covered = ++heap->epoch;
        pthread_mutex_unlock(&heap->lock);
        int rc = be->synchronize(heap->ctx);
        pthread_mutex_lock(&heap->lock);
        if (rc != GPUMEM_OK) return false;
        return retire_upto_locked(heap, covered);
    }
    bool any = false;
    if (heap->fence && be->fence_query(heap->fence) == 0) {
        any = retire_upto_locked(heap, heap->fence_epoch);
        fence_drop_locked(heap);
    }
    if (!heap->fence && heap->pending_head) {
        gm_fence *f = NULL;
        /* Queried at once: on an idle device the fence is usually complete by then, and a miss
         * answered now spares a new segment (measured on the H100: dropping this query made
         * fast-mode pairs of >= 1 MiB 2.6x slower, 0.72 -> 1.9 us). */
        if (be->fence_record(heap->ctx, &f) == GPUMEM_OK) {
            heap->fence = f;
            heap->fence_epoch = ++heap->epoch;
            if (be->fence_query(f) == 0) {
                any |= retire_upto_locked(heap, heap->fence_epoch);
                fence_drop_locked(heap);
            }
        }
    }
    return any;
}

/* ------------------------------------------------------------------ release */

/* Detaches fully free segments (largest first would need sorting; address order is fine since
 * every one of them goes) until the cached free bytes in them are at most `keep_cached`. */
size_t gm_heap_collect_free_segments_locked(gm_heap *heap, uint64_t keep_cached,
                                            gm_segment **out, size_t max)
{
    uint64_t idle = 0;
    for (size_t i = 0; i < heap->nsegments; i++)
        if (heap->segments[i]->used == 0 && heap->segments[i]->first->state == GM_BLOCK_FREE)
            idle += heap->segments[i]->size;
    size_t n = 0;
    for (size_t i = heap->nsegments; i-- > 0 && idle > keep_cached && n < max;) {
        gm_segment *seg = heap->segments[i];
        gm_block *only = seg->first;
        if (seg->used != 0 || only->state != GM_BLOCK_FREE || only->next) continue;
        bins_remove(bins_for(heap, seg), only);
        block_recycle(heap, only);
        segments_remove(heap, seg);
        heap->c.segments--;
        heap->c.segments_released++;
        heap->c.bytes_free -= seg->size;
        idle -= seg->size;
        out[n++] = seg;
    }
    return n;
}

void gm_heap_release_segments(gm_heap *heap, gm_segment **segs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!atomic_load(&gm_mgr.exiting)) gm_mgr.backend->mem_free(heap->ctx, segs[i]->base);
        gm_limit_unreserve(heap->device, segs[i]->size);
        free(segs[i]);
    }
}

size_t gm_heap_release_cached(gm_heap *heap, uint64_t keep_cached)
{
    gm_segment *batch[64];
    size_t released = 0, n;
    do {
        pthread_mutex_lock(&heap->lock);
        n = gm_heap_collect_free_segments_locked(heap, keep_cached, batch, 64);
        pthread_mutex_unlock(&heap->lock);
        for (size_t i = 0; i < n; i++) released += batch[i]->size;
        gm_heap_release_segments(heap, batch, n);
    } while (n == 64);
    return released;
}

/* ------------------------------------------------------------------ queries */

gm_block *gm_heap_block_containing_locked(gm_heap *heap, uintptr_t ptr)
{
    gm_segment *seg = segment_containing(heap, ptr);
    if (!seg) return NULL;
    gm_block *b = seg->first;
    while (b && ptr >= b->addr + b->size) b = b->next;
    return b;
}

static size_t largest_in(const gm_bins *bins)
{
    if (!bins->fl_bitmap) return 0;
    int fl = floor_log2(bins->fl_bitmap);
    int sl = floor_log2(bins->sl_bitmap[fl]);
    size_t best = 0;
    for (gm_block *b = bins->heads[fl][sl]; b; b = b->fnext)
        if (b->size > best) best = b->size;
    return best;
}

size_t gm_heap_largest_free_locked(const gm_heap *heap)
{
    size_t a = largest_in(&heap->small_bins), b = largest_in(&heap->large_bins);
    return a > b ? a : b;
}

/* ------------------------------------------------------------------ life cycle */

void gm_heap_init(gm_heap *heap, uintptr_t ctx, int device)
{
    memset(heap, 0, sizeof *heap);
    pthread_mutex_init(&heap->lock, NULL);
    heap->ctx = ctx;
    heap->device = device;
    heap->bound = true;
    heap->solo = true;
    gm_live_init(heap);
}

/* Forgets every segment, block and record without calling the backend (the context is gone, or
 * this is a fork child). Limit reservations of the segments are returned. */
void gm_heap_reset_locked(gm_heap *heap)
{
    gm_heap_live_changed_locked(heap);
    gm_record *rec, *tmp;
    HASH_ITER(hh, heap->live, rec, tmp) {
        HASH_DELETE(hh, heap->live, rec);
        if (rec == &heap->sentinel) continue;
        if (!heap->solo) gm_device_note_allocated(heap->device, -(int64_t)rec->size);
        if (!rec->block) {
            gm_limit_unreserve(heap->device, rec->size);
            gm_record_delete(rec);
        }
    }
    for (size_t i = 0; i < heap->nsegments; i++) {
        gm_segment *seg = heap->segments[i];
        for (gm_block *b = seg->first, *next; b; b = next) {
            next = b->next;
            free(b);
        }
        gm_limit_unreserve(heap->device, seg->size);
        free(seg);
    }
    for (gm_block *b = heap->spare_blocks, *next; b; b = next) {
        next = b->fnext;
        free(b);
    }
    if (heap->fence && !atomic_load(&gm_mgr.exiting)) gm_mgr.backend->fence_destroy(heap->fence);
    free(heap->segments);
    uint64_t released = heap->c.segments_released + heap->c.segments;
    gm_heap_counters keep = heap->c;
    memset(&heap->small_bins, 0, sizeof heap->small_bins);
    memset(&heap->large_bins, 0, sizeof heap->large_bins);
    heap->segments = NULL;
    __atomic_store_n(&heap->nsegments, 0, __ATOMIC_RELAXED);
    heap->segments_cap = 0;
    __atomic_store_n(&heap->next_large_segment, 0, __ATOMIC_RELAXED);
    heap->pending_head = NULL;
    heap->pending_bytes = 0;
    heap->fence = NULL;
    heap->spare_blocks = NULL;
    heap->quarantine = NULL; /* its blocks were in the segments freed above */
    gm_live_init(heap);
    memset(&heap->c, 0, sizeof heap->c);
    /* Lifetime counters survive so the exit statistics still tell what happened. */
    heap->c.allocations = keep.allocations;
    heap->c.frees = keep.frees;
    heap->c.pool_hits = keep.pool_hits;
    heap->c.pool_misses = keep.pool_misses;
    heap->c.bytes_allocated_peak = keep.bytes_allocated_peak;
    heap->c.segments_released = released;
    heap->c.release_retries = keep.release_retries;
    heap->c.limit_rejections = keep.limit_rejections;
    heap->c.backend_ooms = keep.backend_ooms;
}

/* ------------------------------------------------------------------ checked copies */

/* Probes of the live table on each side of an interior pointer before walking a segment's block
 * list: a pointer within 4 KiB of either end of its block is found in a few hash lookups instead
 * of a walk over every block in front of it (a small segment can hold 4096). */
#define GM_INTERIOR_PROBES 8

/* The blocks this thread last found by probing or walking: a program that copies into the same
 * buffer at many offsets (rows of a matrix, a framework's own sub-allocations) walks once. Only
 * addresses are kept and each is re-validated through the live table, so a stale entry costs a
 * hash probe, never a wrong answer. */
#define GM_RECENT 4
static __thread struct { const gm_heap *heap; uintptr_t base, end; } tl_recent[GM_RECENT];
static __thread unsigned tl_recent_next;

/* The block of the live record at `addr`, if it is a pool block of `seg` (NULL: any segment). */
static gm_block *live_block_at(gm_heap *heap, const gm_segment *seg, uintptr_t addr)
{
    gm_record *rec = gm_live_find(heap, addr);
    return rec && rec->block && (!seg || rec->block->seg == seg) ? rec->block : NULL;
}

static gm_block *recent_block(gm_heap *heap, uintptr_t ptr)
{
    for (int i = 0; i < GM_RECENT; i++) {
        if (tl_recent[i].heap != heap || ptr < tl_recent[i].base || ptr >= tl_recent[i].end) continue;
        gm_block *b = live_block_at(heap, NULL, tl_recent[i].base);
        if (b && ptr < b->addr + b->size) return b;
    }
    return NULL;
}

static void remember_block(const gm_heap *heap, const gm_block *b)
{
    unsigned i = tl_recent_next++ % GM_RECENT;
    tl_recent[i].heap = heap;
    tl_recent[i].base = b->addr;
    tl_recent[i].end = b->addr + b->size;
}

/* A live block near `ptr` (which is in `seg` and not a live block's base): the nearest one below
 * or above it within GM_INTERIOR_PROBES 512-B steps, or NULL. */
static gm_block *live_block_near(gm_heap *heap, const gm_segment *seg, uintptr_t ptr)
{
    uintptr_t down = (ptr - 1) & ~(uintptr_t)(GM_ALIGN - 1); /* the first base below ptr */
    uintptr_t up = (ptr | (GM_ALIGN - 1)) + 1;               /* the first base above it */
    for (int i = 0; i < GM_INTERIOR_PROBES; i++, down -= GM_ALIGN, up += GM_ALIGN) {
        gm_block *b = down >= seg->base && down < ptr ? live_block_at(heap, seg, down) : NULL;
        if (!b && up < seg->base + seg->size) b = live_block_at(heap, seg, up);
        if (b) return b;
    }
    return NULL;
}

/* Like gm_heap_block_containing_locked, faster for the pointers copies use: a block's own base
 * costs one hash probe; a pointer outside every segment, one more and a binary search over the
 * segments; a pointer inside a block this thread used lately, one more; a pointer near either end of a live
 * block, a few; otherwise the segment's block list is walked from the nearest live block found
 * (blocks tile their segment: forward from one below, backward from one above), else from the
 * segment's first block. `*live` tells that the block was found through the live table (it is
 * live); otherwise the caller checks. */
gm_block *gm_heap_block_at_locked(gm_heap *heap, uintptr_t ptr, bool *live)
{
    *live = true;
    gm_record *rec = gm_live_find(heap, ptr);
    if (rec) return rec->block; /* NULL: a tracked allocation that is not pooled */
    gm_segment *seg = segment_containing(heap, ptr);
    if (!seg) return NULL;
    gm_block *b = recent_block(heap, ptr);
    if (b) return b;
    b = live_block_near(heap, seg, ptr);
    if (b && b->addr <= ptr && ptr < b->addr + b->size) {
        remember_block(heap, b);
        return b;
    }
    *live = false;
    if (b && b->addr > ptr) {
        while (b && b->addr > ptr) b = b->prev;
    } else {
        for (b = b ? b : seg->first; b && ptr >= b->addr + b->size;) b = b->next;
    }
    if (b && b->state == GM_BLOCK_LIVE) remember_block(heap, b);
    return b;
}

/* ------------------------------------------------------------------ resizing a live block */
/* Named buffers (buffers.c) grow a live block into the free block right after it, and shrink one
 * by handing its tail back, so neither needs a copy or a new pointer. The block's record then
 * reads as if the block had been allocated at its new size. */

size_t gm_heap_room_after_locked(const gm_block *b)
{
    const gm_block *next = b->next;
    return next && next->state == GM_BLOCK_FREE ? next->size : 0;
}

/* Statistics and the tag see the old size freed and the new one allocated; a resize is neither
 * an allocation nor a free of its own, so those counts are put back. */
static void record_resized_locked(gm_heap *heap, gm_record *rec, size_t requested)
{
    gm_heap_live_changed_locked(heap);
    gm_stats_on_free(heap, rec);
    rec->size = rec->block->size;
    rec->requested = requested;
    gm_stats_on_alloc(heap, rec, true);
    heap->c.allocations--;
    heap->c.frees--;
    heap->c.pool_hits--;
    if (rec->tag) gm_tag_on_resize(rec->tag);
}

int gm_heap_extend_block_locked(gm_heap *heap, gm_block *b, size_t new_rounded, size_t requested)
{
    if (b->state != GM_BLOCK_LIVE || !b->rec.block) return GPUMEM_ERROR_INVALID_VALUE;
    size_t grow = new_rounded > b->size ? new_rounded - b->size : 0;
    if (grow > gm_heap_room_after_locked(b)) return GPUMEM_ERROR_OUT_OF_MEMORY;
    if (grow) {
        gm_block *next = b->next;
        gm_bins *bins = bins_for(heap, b->seg);
        bins_remove(bins, next);
        if (next->size == grow) {
            merge_into_prev_locked(heap, b, next);
        } else { /* the neighbour keeps what is left, further up */
            next->addr += grow;
            next->size -= grow;
            bins_insert(bins, next);
            b->size += grow;
        }
        b->seg->used += grow;
        heap->c.bytes_free -= grow;
    }
    record_resized_locked(heap, &b->rec, requested);
    return GPUMEM_OK;
}

int gm_heap_shrink_block_locked(gm_heap *heap, gm_block *b, size_t new_rounded, size_t requested,
                                bool pend)
{
    if (b->state != GM_BLOCK_LIVE || !b->rec.block || new_rounded == 0 || new_rounded > b->size ||
        new_rounded % GM_ALIGN)
        return GPUMEM_ERROR_INVALID_VALUE;
    if (new_rounded < b->size) {
        /* The tail starts as part of the live block (counted in seg->used) and leaves it the way a
         * freed block does, so it waits for the barrier or the fence like any other free. */
        gm_block *tail = cut_tail_locked(heap, b, new_rounded, GM_BLOCK_LIVE);
        if (!tail) return GPUMEM_ERROR_OUT_OF_MEMORY;
        if (pend) gm_heap_pend_block_locked(heap, tail);
        else gm_heap_free_block_locked(heap, tail);
    }
    record_resized_locked(heap, &b->rec, requested);
    return GPUMEM_OK;
}
