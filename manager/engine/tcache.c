/* Thread caches: what lets threads allocate from one context without sharing a cache line.
 *
 * A heap's lock serializes every allocation and free of its context; two threads each doing
 * pairs contend for it, and for the pool's bins and the heap's counters beside it, so two threads
 * got less done than one (docs/benchmarks.md). Each thread therefore gets a cache per heap, with
 * its own lock (uncontended: only the thread itself takes it on the hot path), its own live
 * table for the pool blocks it allocated, its own counters, and bins of the blocks it freed,
 * kept for its own next allocations of the same rounded size.
 *
 * Exactness is kept by one rule: anything other than the thread's own free that wants a record
 * in a thread cache (a lookup, a checked copy, an IPC export, a resize, another thread's free, a
 * context going away) first moves it into the heap's live table ("adopts" it), under the heap's
 * lock and then the cache's. From then on the record is an ordinary heap record; its counts
 * stay in the cache's counters (gm_record.owner), so the sums stay exact.
 *
 * Cached blocks are memory gpumem holds for the program like the pool's free bins: they count as
 * cached free bytes (cuMemGetInfo, the statistics), and a pool that would grow, hand memory
 * back or go away first takes every cache's blocks back, so the caches never make the pool
 * larger than it would be without them. */
#include <stdlib.h>
#include <string.h>

#include "gm_engine.h"

/* The caches this thread attached, most recent first in the search. */
#define TL_CACHES 8
static __thread struct { const gm_heap *heap; gm_tcache *tc; } tl_caches[TL_CACHES];
static __thread unsigned tl_ncaches;

static pthread_once_t exit_key_once = PTHREAD_ONCE_INIT;
static pthread_key_t exit_key;

/* ------------------------------------------------------------------ bins */

/* The bin of blocks of `rounded` bytes, or GM_TC_BINS. */
static inline unsigned bin_of(const gm_tcache *tc, size_t rounded)
{
    unsigned i = 0;
    while (i < GM_TC_BINS && tc->bin_size[i] != rounded) i++;
    return i;
}

gm_block *gm_tcache_take_locked(gm_tcache *tc, size_t rounded)
{
    unsigned i = bin_of(tc, rounded);
    if (i == GM_TC_BINS) return NULL;
    gm_block *b = tc->bin_head[i];
    if (!gm_fence_tc_ready(tc, b) && !gm_fence_tc_settle_locked(tc, b, tc->bin_count[i])) return NULL;
    tc->bin_head[i] = b->fnext;
    if (!b->fnext) tc->bin_tail[i] = NULL;
    b->fnext = NULL;
    if (--tc->bin_count[i] == 0) tc->bin_size[i] = 0; /* free for another size */
    tc->cached_bytes -= b->size;
    return b;
}

/* GPUMEM_THREAD_CACHE, and never more than GPUMEM_MAX_CACHED: a program that asked for freed
 * memory to go back to the device does not get it held per thread instead. */
uint64_t gm_tcache_keep_at_most(void)
{
    const gm_config *cfg = gm_mgr.cfg;
    return cfg->max_cached < cfg->thread_cache ? cfg->max_cached : cfg->thread_cache;
}

bool gm_tcache_keep_locked(gm_tcache *tc, gm_block *b, bool fenced)
{
    if (tc->cached_bytes + b->size > gm_tcache_keep_at_most()) return false;
    unsigned i = bin_of(tc, b->size);
    if (i == GM_TC_BINS) i = bin_of(tc, 0);
    if (i == GM_TC_BINS || tc->bin_count[i] >= (fenced ? GM_TC_BIN_MAX : GM_TC_BIN_STRICT)) return false;
    tc->bin_size[i] = b->size;
    if (fenced) { /* at the tail: blocks come round in the order they were freed */
        gm_fence_tc_tag(tc, b);
        tc->unfenced++;
        tc->unfenced_bytes += b->size;
        b->fnext = NULL;
        if (tc->bin_tail[i]) tc->bin_tail[i]->fnext = b;
        else tc->bin_head[i] = b;
        tc->bin_tail[i] = b;
    } else { /* at the head: the most recently used block is reused first */
        b->fence_epoch = tc->fence_done;
        b->fnext = tc->bin_head[i];
        if (!b->fnext) tc->bin_tail[i] = b;
        tc->bin_head[i] = b;
    }
    tc->bin_count[i]++;
    tc->cached_bytes += b->size;
    return true;
}

/* The cache's freed blocks back to the heap's pool (heap and cache locked): reusable ones to its
 * bins, and unless `reusable_only` the ones waiting for the cache's fence to its pending list
 * (a fence of the heap's recorded from now on covers them, as it would a free made now). */
static bool flush_locked(gm_heap *heap, gm_tcache *tc, bool reusable_only)
{
    bool any = false;
    for (unsigned i = 0; i < GM_TC_BINS; i++) {
        gm_block **link = &tc->bin_head[i], *last = NULL;
        while (*link) {
            gm_block *b = *link;
            bool ready = gm_fence_tc_ready(tc, b);
            if (reusable_only && !ready) {
                last = b;
                link = &b->fnext;
                continue;
            }
            *link = b->fnext;
            b->fnext = NULL;
            b->tc = NULL;
            tc->bin_count[i]--;
            tc->cached_bytes -= b->size;
            if (ready) gm_pool_free_block_locked(&heap->pool, b);
            else gm_pool_pend_block_locked(&heap->pool, b);
            any = true;
        }
        tc->bin_tail[i] = last;
        if (!tc->bin_count[i]) tc->bin_size[i] = 0;
    }
    if (!reusable_only) tc->unfenced = 0, tc->unfenced_bytes = 0;
    return any;
}

static inline uint32_t cache_count(const gm_heap *heap)
{
    return atomic_load_explicit(&heap->ntcs, memory_order_acquire);
}

/* The sum of one figure over the heap's caches, each read under its lock. */
static uint64_t sum_over_caches(gm_heap *heap, uint64_t (*figure)(const gm_tcache *))
{
    uint64_t sum = 0;
    for (uint32_t i = 0; i < cache_count(heap); i++) {
        gm_tcache *tc = heap->tcs[i];
        pthread_mutex_lock(&tc->lock);
        sum += figure(tc);
        pthread_mutex_unlock(&tc->lock);
    }
    return sum;
}

static uint64_t cached_of(const gm_tcache *tc) { return tc->cached_bytes; }
static uint64_t allocated_of(const gm_tcache *tc) { return tc->c.bytes_allocated; }
static uint64_t live_of(const gm_tcache *tc) { return gm_live_count(&tc->live); }

bool gm_tcache_flush_locked(gm_heap *heap, gm_tcache *tc, bool reusable_only)
{
    pthread_mutex_lock(&tc->lock);
    bool any = tc->cached_bytes && flush_locked(heap, tc, reusable_only);
    pthread_mutex_unlock(&tc->lock);
    return any;
}

bool gm_tcache_flush_all_locked(gm_heap *heap, bool reusable_only)
{
    bool any = false;
    for (uint32_t i = 0; i < cache_count(heap); i++) {
        gm_tcache *tc = heap->tcs[i];
        pthread_mutex_lock(&tc->lock);
        if (tc->cached_bytes) any |= flush_locked(heap, tc, reusable_only);
        pthread_mutex_unlock(&tc->lock);
    }
    return any;
}

/* ------------------------------------------------------------------ attaching */

/* A thread that ends gives its freed blocks back and leaves its cache to the next thread; the
 * live records stay in it until they are freed or adopted. */
static void detach_all(void *unused)
{
    (void)unused;
    for (unsigned i = 0; i < tl_ncaches; i++) {
        gm_heap *heap = (gm_heap *)tl_caches[i].heap;
        gm_tcache *tc = tl_caches[i].tc;
        pthread_mutex_lock(&heap->lock);
        pthread_mutex_lock(&tc->lock);
        flush_locked(heap, tc, false);
        gm_fence_tc_drop_locked(tc, !atomic_load(&gm_mgr.exiting)); /* its blocks went to the heap */
        tc->attached = false;
        pthread_mutex_unlock(&tc->lock);
        pthread_mutex_unlock(&heap->lock);
    }
    tl_ncaches = 0;
}

static void make_exit_key(void) { pthread_key_create(&exit_key, detach_all); }

static gm_tcache *new_cache_locked(gm_heap *heap)
{
    uint32_t n = cache_count(heap);
    for (uint32_t i = 0; i < n; i++)
        if (!heap->tcs[i]->attached) return heap->tcs[i];
    if (n == GM_MAX_TCACHES) return NULL;
    gm_tcache *tc = gm_cache_line_alloc(sizeof *tc); /* its thread's alone: no line shared with another */
    if (!tc) return NULL;
    pthread_mutex_init(&tc->lock, NULL);
    gm_live_init(&tc->live);
    tc->index = (uint16_t)(n + 1);
    tc->heap = heap;
    tc->fence_next = 1; /* fence_done 0: a block tagged with it is reusable */
    heap->tcs[n] = tc;
    atomic_store_explicit(&heap->ntcs, n + 1, memory_order_release);
    return tc;
}

gm_tcache *gm_tcache_peek(const gm_heap *heap)
{
    for (unsigned i = 0; i < tl_ncaches; i++)
        if (tl_caches[i].heap == heap) return tl_caches[i].tc;
    return NULL;
}

static __attribute__((noinline)) gm_tcache *attach(gm_heap *heap)
{
    if (tl_ncaches == TL_CACHES) return NULL;
    pthread_once(&exit_key_once, make_exit_key);
    pthread_mutex_lock(&heap->lock);
    gm_tcache *tc = new_cache_locked(heap);
    if (tc) tc->attached = true;
    pthread_mutex_unlock(&heap->lock);
    if (!tc) return NULL;
    pthread_setspecific(exit_key, (void *)1); /* any value but NULL: the destructor runs */
    tl_caches[tl_ncaches].heap = heap;
    tl_caches[tl_ncaches].tc = tc;
    tl_ncaches++;
    return tc;
}

gm_tcache *gm_tcache_get(gm_heap *heap)
{
    if (__builtin_expect(tl_ncaches && tl_caches[0].heap == heap, 1)) return tl_caches[0].tc;
    gm_tcache *tc = gm_tcache_peek(heap);
    if (tc || !gm_mgr.cfg->thread_cache) return tc;
    return attach(heap);
}

/* ------------------------------------------------------------------ adoption */

/* Moves a live record of `tc` into the heap's table (heap and cache locked). */
static void adopt_locked(gm_heap *heap, gm_tcache *tc, gm_record *rec)
{
    gm_live_remove(&tc->live, rec);
    if (rec->block) rec->block->tc = NULL;
    gm_live_insert(&heap->live, rec);
}

gm_record *gm_heap_live_find_locked(gm_heap *heap, uintptr_t ptr)
{
    gm_record *rec = gm_live_find(&heap->live, ptr);
    for (uint32_t i = 0; !rec && i < cache_count(heap); i++) {
        gm_tcache *tc = heap->tcs[i];
        pthread_mutex_lock(&tc->lock);
        rec = gm_live_find(&tc->live, ptr);
        if (rec) adopt_locked(heap, tc, rec);
        pthread_mutex_unlock(&tc->lock);
    }
    return rec;
}

bool gm_heap_block_live_locked(gm_heap *heap, gm_block *b)
{
    if (b->state != GM_BLOCK_LIVE) return false;
    gm_tcache *tc = b->tc; /* stable: it changes only under the heap lock too */
    if (!tc) return gm_live_find(&heap->live, b->addr) == &b->rec;
    pthread_mutex_lock(&tc->lock);
    bool live = gm_live_find(&tc->live, b->addr) == &b->rec;
    if (live) adopt_locked(heap, tc, &b->rec);
    pthread_mutex_unlock(&tc->lock);
    return live;
}

void gm_tcache_adopt_all_locked(gm_heap *heap)
{
    for (uint32_t i = 0; i < cache_count(heap); i++) {
        gm_tcache *tc = heap->tcs[i];
        pthread_mutex_lock(&tc->lock);
        flush_locked(heap, tc, false);
        gm_fence_tc_drop_locked(tc, !atomic_load(&gm_mgr.exiting)); /* its events are the context's */
        gm_record *rec, *tmp;
        HASH_ITER(hh, tc->live.head, rec, tmp)
            if (rec != &tc->live.sentinel) adopt_locked(heap, tc, rec);
        pthread_mutex_unlock(&tc->lock);
    }
}

size_t gm_heap_live_count_locked(gm_heap *heap)
{
    return gm_live_count(&heap->live) + (size_t)sum_over_caches(heap, live_of);
}

void gm_heap_each_live_locked(gm_heap *heap, void (*fn)(void *cx, const gm_record *rec), void *cx)
{
    GM_FOR_EACH_LIVE(&heap->live, rec) fn(cx, rec);
    for (uint32_t i = 0; i < cache_count(heap); i++) {
        gm_tcache *tc = heap->tcs[i];
        pthread_mutex_lock(&tc->lock);
        GM_FOR_EACH_LIVE(&tc->live, rec) fn(cx, rec);
        pthread_mutex_unlock(&tc->lock);
    }
}

/* ------------------------------------------------------------------ counting */

static gm_tcache *owner_of(const gm_heap *heap, const gm_record *rec)
{
    return rec->owner && rec->owner <= cache_count(heap) ? heap->tcs[rec->owner - 1] : NULL;
}

/* The counters `rec` counts in; a thread cache's come locked (counting_end unlocks them). */
static gm_counting counting_begin(gm_heap *heap, const gm_record *rec, gm_tcache **locked)
{
    *locked = owner_of(heap, rec);
    if (!*locked) return gm_heap_counting(heap);
    pthread_mutex_lock(&(*locked)->lock);
    return gm_tcache_counting(heap, *locked);
}

static void counting_end(gm_tcache *locked)
{
    if (locked) pthread_mutex_unlock(&locked->lock);
}

void gm_heap_count_alloc_locked(gm_heap *heap, const gm_record *rec, bool hit)
{
    gm_tcache *locked;
    gm_stats_on_alloc(counting_begin(heap, rec, &locked), rec, hit);
    counting_end(locked);
}

void gm_heap_count_free_locked(gm_heap *heap, const gm_record *rec)
{
    gm_tcache *locked;
    gm_stats_on_free(counting_begin(heap, rec, &locked), rec);
    counting_end(locked);
}

void gm_heap_count_resize_locked(gm_heap *heap, const gm_record *old, const gm_record *now)
{
    gm_tcache *locked;
    gm_stats_on_resize(counting_begin(heap, now, &locked), old, now);
    counting_end(locked);
}

void gm_tcache_add_stats_locked(gm_heap *heap, gpumem_stats *out, uint64_t *peak)
{
    for (uint32_t i = 0; i < cache_count(heap); i++) {
        gm_tcache *tc = heap->tcs[i];
        pthread_mutex_lock(&tc->lock);
        gm_stats_add_counters(out, &tc->c);
        out->bytes_cached_free += tc->cached_bytes;
        if (tc->c.bytes_allocated_peak > *peak) *peak = tc->c.bytes_allocated_peak;
        pthread_mutex_unlock(&tc->lock);
    }
}

uint64_t gm_tcache_cached_locked(gm_heap *heap) { return sum_over_caches(heap, cached_of); }
uint64_t gm_tcache_allocated_locked(gm_heap *heap) { return sum_over_caches(heap, allocated_of); }

/* ------------------------------------------------------------------ reset */

static bool this_thread_uses(const gm_tcache *tc)
{
    for (unsigned i = 0; i < tl_ncaches; i++)
        if (tl_caches[i].tc == tc) return true;
    return false;
}

void gm_tcache_after_fork(gm_heap *heap)
{
    for (uint32_t i = 0; i < cache_count(heap); i++) {
        gm_tcache *tc = heap->tcs[i];
        pthread_mutex_init(&tc->lock, NULL);
        gm_fence_tc_drop_locked(tc, false); /* the parent's context's events */
        tc->attached = this_thread_uses(tc); /* the other threads are not in the child */
    }
}

void gm_tcache_reset_counts_locked(gm_heap *heap)
{
    for (uint32_t i = 0; i < cache_count(heap); i++) {
        gm_tcache *tc = heap->tcs[i];
        pthread_mutex_lock(&tc->lock);
        tc->c.bytes_requested = tc->c.bytes_allocated = tc->c.unsynced = 0; /* the rest are lifetime counters */
        pthread_mutex_unlock(&tc->lock);
    }
}
