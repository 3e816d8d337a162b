/* Where a pointer lies: the one place that answers, for any address, which pool block holds it,
 * whether that block is live, and what the driver would say of it as a separate allocation.
 * Copy checks, pointer-attribute hooks, IPC export and cudaFree of an interior pointer all ask
 * here. Two per-thread memos make the common questions cheap:
 * - the spans memo (lock-free): the live blocks this thread's copies touched last, trusted while
 *   their heap's live_gen is unchanged;
 * - the recent-blocks memo (under the heap lock): blocks found by probing or walking a segment,
 *   so a program that copies into one buffer at many offsets walks once.
 * A pointer outside [pool_lo, pool_hi) is answered without a lock. */
#include "gm_engine.h"

/* ------------------------------------------------------------------ the block at a pointer */


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
    gm_record *rec = gm_live_find(&heap->live, addr);
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

/* Like gm_pool_block_containing_locked, faster for the pointers copies use: a block's own base
 * costs one hash probe; a pointer outside every segment, one more and a binary search over the
 * segments; a pointer inside a block this thread used lately, one more; a pointer near either end of a live
 * block, a few; otherwise the segment's block list is walked from the nearest live block found
 * (blocks tile their segment: forward from one below, backward from one above), else from the
 * segment's first or last block, whichever end is nearer. `*live` tells that the block was found through the live table (it is
 * live); otherwise the caller checks. */
gm_block *gm_lookup_block_at_locked(gm_heap *heap, uintptr_t ptr, bool *live)
{
    *live = true;
    gm_record *rec = gm_heap_live_find_locked(heap, ptr);
    if (rec) return rec->block; /* NULL: a tracked allocation that is not pooled */
    gm_segment *seg = gm_pool_segment_containing(&heap->pool, ptr);
    if (!seg) return NULL;
    gm_block *b = recent_block(heap, ptr);
    if (b) return b;
    b = live_block_near(heap, seg, ptr);
    if (b && b->addr <= ptr && ptr < b->addr + b->size) {
        remember_block(heap, b);
        return b;
    }
    *live = false;
    if (!b && ptr - seg->base >= seg->size / 2) b = seg->last; /* from the nearer end */
    if (b && b->addr > ptr) {
        while (b && b->addr > ptr) b = b->prev;
    } else {
        for (b = b ? b : seg->first; b && ptr >= b->addr + b->size;) b = b->next;
    }
    if (b && b->state == GM_BLOCK_LIVE) remember_block(heap, b);
    return b;
}

/* ------------------------------------------------------------------ identity */

/* The block of heap `h` at `ptr` if it is live and `ptr` lies within its requested size. */
static gm_answer live_block_in_heap_locked(gm_heap *h, uintptr_t ptr, gm_block **out)
{
    bool live;
    gm_block *b = gm_lookup_block_at_locked(h, ptr, &live);
    if (!b) return gm_not_ours(); /* not in a segment, or a tracked allocation of the driver's */
    if (!live) live = gm_heap_block_live_locked(h, b);
    if (!live || ptr - b->addr >= b->rec.requested) return gm_ours(GPUMEM_ERROR_INVALID_VALUE);
    *out = b;
    return gm_ours(GPUMEM_OK);
}

gm_answer gm_with_live_block(uintptr_t ptr, void (*fn)(gm_heap *, gm_block *, void *), void *cx)
{
    if (ptr < atomic_load_explicit(&gm_mgr.pool_lo, memory_order_relaxed) ||
        ptr >= atomic_load_explicit(&gm_mgr.pool_hi, memory_order_relaxed))
        return gm_not_ours(); /* no segment was ever there */
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        if (gm_pool_segment_count(&h->pool) == 0) continue;
        gm_block *b = NULL;
        pthread_mutex_lock(&h->lock);
        gm_answer a = live_block_in_heap_locked(h, ptr, &b);
        if (a.owner == GM_OURS && a.status == GPUMEM_OK) fn(h, b, cx);
        pthread_mutex_unlock(&h->lock);
        if (a.owner == GM_OURS) return a;
    }
    return gm_not_ours();
}

static void identity_of(gm_heap *h, gm_block *b, void *cx)
{
    *(gm_block_identity *)cx = (gm_block_identity){
        .base = b->addr, .size = b->rec.requested, .buffer_id = b->buffer_id,
        .sync_memops = b->sync_memops, .ctx = h->ctx, .seg_base = b->seg->base,
        .seg_size = b->seg->size, .vmm_chunk = b->seg->expandable ? h->vmm_chunk : 0};
}

gm_answer gm_block_identity_get(uintptr_t ptr, gm_block_identity *out)
{
    return gm_with_live_block(ptr, identity_of, out);
}

static void set_sync_memops(gm_heap *h, gm_block *b, void *cx)
{
    (void)h;
    b->sync_memops = *(bool *)cx;
}

gm_answer gm_block_set_sync_memops(uintptr_t ptr, bool on)
{
    return gm_with_live_block(ptr, set_sync_memops, &on);
}

gm_answer gm_lookup(uintptr_t ptr, uintptr_t *base, size_t *size)
{
    gm_block_identity id;
    gm_answer a = gm_block_identity_get(ptr, &id);
    if (a.owner == GM_OURS && a.status == GPUMEM_OK) {
        *base = id.base;
        *size = id.size;
    }
    return a;
}

/* ------------------------------------------------------------------ checked copies */

/* The heap that held this thread's last checked pointer: heaps are never freed, so a stale hint
 * costs one extra lookup, never a crash. */
static __thread gm_heap *tl_span_heap;

/* What this thread learnt of the live blocks it checked last. An entry is trusted without the
 * heap's lock while the heap's live_gen is what it was when the entry was made: no block of the
 * heap has stopped being live or changed size since, so the block is still live with that size.
 * A program's copies mostly reuse a few buffers, so most checks end here, lock-free. */
typedef struct span_memo {
    gm_heap *heap;
    uint64_t gen;
    uintptr_t base;
    size_t block_size, requested;
} span_memo;
#define SPAN_MEMOS 4
static __thread span_memo tl_memo[SPAN_MEMOS];
static __thread unsigned tl_memo_next;

static void memo_remember_locked(gm_heap *h, const gm_block *b)
{
    span_memo *m = &tl_memo[tl_memo_next++ % SPAN_MEMOS];
    *m = (span_memo){h, atomic_load_explicit(&h->live_gen, memory_order_relaxed), b->addr, b->size,
                     b->rec.requested};
}

static void span_classify_live(gm_span *s, int device, uintptr_t base, size_t requested)
{
    s->device = device;
    s->base = base;
    s->size = requested;
    uintptr_t end = base + requested;
    bool fits = s->ptr < end && s->n <= end - s->ptr;
    s->status = fits ? GM_SPAN_LIVE : GM_SPAN_PAST_END;
}

/* Resolves `s` from the thread's memos or from the pool's address range alone; false when the
 * heap must be asked. */
static bool span_resolve_unlocked(gm_span *s)
{
    if (s->ptr < atomic_load_explicit(&gm_mgr.pool_lo, memory_order_relaxed) ||
        s->ptr >= atomic_load_explicit(&gm_mgr.pool_hi, memory_order_relaxed))
        return true; /* no segment was ever there: GM_SPAN_NOT_OURS */
    for (int i = 0; i < SPAN_MEMOS; i++) {
        span_memo *m = &tl_memo[i];
        if (!m->heap || s->ptr - m->base >= m->block_size) continue;
        if (atomic_load_explicit(&m->heap->live_gen, memory_order_acquire) != m->gen) {
            m->heap = NULL;
            continue;
        }
        span_classify_live(s, m->heap->device, m->base, m->requested);
        return true;
    }
    return false;
}

/* Classifies span `s` against block `b` (which contains s->ptr); the heap is locked. */
static void span_classify_locked(gm_heap *h, gm_block *b, bool known_live, gm_span *s)
{
    s->device = h->device;
    /* A block found by walking may be LIVE while its free is in progress (record already gone). */
    bool live = known_live || gm_heap_block_live_locked(h, b);
    if (!live) {
        s->status = GM_SPAN_FREED;
        s->base = b->addr;
        s->size = b->size;
        return;
    }
    span_classify_live(s, h->device, b->addr, b->rec.requested);
    memo_remember_locked(h, b);
}

/* Resolves the still unresolved spans that lie in `h`; returns how many it resolved. */
static size_t spans_in_heap(gm_heap *h, gm_span *spans, size_t count, bool *done)
{
    if (gm_pool_segment_count(&h->pool) == 0) return 0;
    size_t found = 0;
    pthread_mutex_lock(&h->lock);
    for (size_t i = 0; i < count; i++) {
        if (done[i]) continue;
        bool live;
        gm_block *b = gm_lookup_block_at_locked(h, spans[i].ptr, &live);
        if (!b) continue;
        span_classify_locked(h, b, live, &spans[i]);
        done[i] = true;
        found++;
    }
    pthread_mutex_unlock(&h->lock);
    return found;
}

void gm_lookup_spans(gm_span *spans, size_t count)
{
    bool done[2] = {true, true};
    size_t left = 0;
    if (count > 2) count = 2;
    for (size_t i = 0; i < count; i++) {
        spans[i].status = GM_SPAN_NOT_OURS;
        done[i] = spans[i].ptr == 0 || spans[i].n == 0 || span_resolve_unlocked(&spans[i]);
        left += !done[i];
    }
    gm_heap *hint = tl_span_heap;
    if (left && hint) left -= spans_in_heap(hint, spans, count, done);
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n && left; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        if (h == hint) continue;
        size_t got = spans_in_heap(h, spans, count, done);
        if (got) tl_span_heap = h;
        left -= got;
    }
}
