/* Randomized differential test: >= 1,000,000 alloc/free operations on the pool against a simple
 * reference model (a sorted array of live blocks and plain counters). After every operation the
 * new or freed block is checked; every 1000 operations every invariant is:
 *   - no two live blocks overlap;
 *   - every block is 512-B aligned and lies inside one pool segment;
 *   - every counter (allocations, frees, bytes requested/allocated, hits + misses) equals the
 *     model's, and bytes reserved equals what the host backend has handed out. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "gm_api.h"

#define OPS 1000000
#define MAX_LIVE 2048

typedef struct { uintptr_t p; size_t requested, rounded; } live_t;

static live_t live[MAX_LIVE];
static size_t nlive;
static uint64_t rng = 0x2545F4914F6CDD1Dull;

static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* Mostly small, some medium, a few large sizes, as real programs mix them. */
static size_t random_size(void)
{
    uint64_t r = next_rand();
    switch (r % 16) {
    case 0: return 1 + (size_t)(next_rand() % (64u << 20));  /* up to 64 MiB */
    case 1: case 2: return 1 + (size_t)(next_rand() % (4u << 20));
    default: return 1 + (size_t)(next_rand() % (256u << 10));
    }
}

static size_t find_slot(uintptr_t p)
{
    size_t lo = 0, hi = nlive;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (live[mid].p < p) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static void model_insert(uintptr_t p, size_t requested)
{
    size_t i = find_slot(p);
    size_t rounded = gm_pool_round_size(requested);
    if (i > 0) cr_assert_leq(live[i - 1].p + live[i - 1].rounded, p, "overlaps the block below");
    if (i < nlive) cr_assert_leq(p + rounded, live[i].p, "overlaps the block above");
    memmove(&live[i + 1], &live[i], (nlive - i) * sizeof *live);
    live[i] = (live_t){p, requested, rounded};
    nlive++;
}

static bool expandable_run;

static void check_inside_segment(gm_heap *heap, const live_t *l)
{
    pthread_mutex_lock(&heap->lock);
    /* One expandable segment holds every block of its class: walking it from its start for each
     * of 2048 live blocks every 1000 operations would be quadratic, so take the lookup's way
     * there (the live table, then the block's own segment is checked below). */
    bool live;
    gm_block *b = expandable_run ? gm_lookup_block_at_locked(heap, l->p, &live)
                                 : gm_pool_block_containing_locked(&heap->pool, l->p);
    cr_assert(!b || gm_pool_segment_containing(&heap->pool, l->p) == b->seg);
    cr_assert_not_null(b, "block %#lx not inside any segment", (unsigned long)l->p);
    cr_assert_eq(b->addr, l->p);
    cr_assert_eq(b->state, GM_BLOCK_LIVE);
    cr_assert_geq(b->size, l->rounded);
    cr_assert_leq(l->p + l->rounded, b->seg->base + b->seg->size, "runs past its segment");
    pthread_mutex_unlock(&heap->lock);
}

typedef struct { uint64_t allocs, frees, requested, allocated; } model_counters;

static void check_everything(gm_heap *heap, const model_counters *m)
{
    for (size_t i = 0; i < nlive; i++) {
        cr_assert_eq(live[i].p % GM_ALIGN, 0);
        if (i + 1 < nlive) cr_assert_leq(live[i].p + live[i].rounded, live[i + 1].p);
        check_inside_segment(heap, &live[i]);
    }
    gpumem_stats st;
    gpumem_get_stats(0, &st);
    cr_assert_eq(st.allocations, m->allocs);
    cr_assert_eq(st.frees, m->frees);
    cr_assert_eq(st.bytes_requested, m->requested);
    cr_assert_eq(st.bytes_allocated, m->allocated);
    cr_assert_eq(st.pool_hits + st.pool_misses, m->allocs);
    cr_assert_eq(st.bytes_reserved, gm_host_backend_in_use());
    cr_assert_geq(st.bytes_reserved, st.bytes_allocated);
}

static void run_differential(bool expandable)
{
    expandable_run = expandable;
    setenv("GPUMEM_EXPANDABLE", expandable ? "1" : "0", 1);
    setenv("GPUMEM_MAX_CACHED", "256MiB", 1); /* exercise segment release too */
    setenv("GPUMEM_REPORT", "off", 1);
    gm_config_reset_for_tests();
    cr_assert(gm_manager_init(gm_host_backend()));
    gm_heap *heap = gm_heap_get(1, 0);
    model_counters m = {0};
    for (long op = 0; op < OPS; op++) {
        bool do_alloc = nlive == 0 || (nlive < MAX_LIVE && next_rand() % 100 < 52);
        if (do_alloc) {
            size_t size = random_size();
            uintptr_t p = 0;
            cr_assert_eq(gm_alloc(heap, size, 0, 0, &p), GPUMEM_OK, "op %ld: alloc %zu", op, size);
            model_insert(p, size);
            m.allocs++;
            m.requested += size;
            m.allocated += gm_pool_round_size(size);
        } else {
            size_t i = (size_t)(next_rand() % nlive);
            live_t victim = live[i];
            cr_assert(gm_answer_ok(gm_free(heap, victim.p, GM_FREE_BARRIER, NULL)), "op %ld", op);
            memmove(&live[i], &live[i + 1], (nlive - i - 1) * sizeof *live);
            nlive--;
            m.frees++;
            m.requested -= victim.requested;
            m.allocated -= victim.rounded;
        }
        if (op % 1000 == 999) check_everything(heap, &m);
    }
    while (nlive) {
        cr_assert(gm_answer_ok(gm_free(heap, live[nlive - 1].p, GM_FREE_BARRIER, NULL)));
        m.frees++;
        m.requested -= live[nlive - 1].requested;
        m.allocated -= live[nlive - 1].rounded;
        nlive--;
    }
    check_everything(heap, &m);
    gpumem_stats st;
    gpumem_get_stats(0, &st);
    cr_expect_eq(st.bytes_allocated, 0);
    cr_expect_leq(st.bytes_reserved, (uint64_t)256 << 20, "GPUMEM_MAX_CACHED holds at rest");
    /* The thread's cache keeps some freed blocks for its next allocations (engine/tcache.c);
     * handed back, every segment is whole again. */
    cr_expect_leq(heap->ntcs ? heap->tcs[0]->cached_bytes : 0, (uint64_t)256 << 20);
    pthread_mutex_lock(&heap->lock);
    gm_tcache_flush_all_locked(heap, false);
    pthread_mutex_unlock(&heap->lock);
    for (size_t i = 0; i < heap->pool.segments; i++) { /* every segment coalesced back to one block */
        gm_block *only = heap->pool.by_base[i]->first;
        cr_expect(only->state == GM_BLOCK_FREE && !only->next && only->size == heap->pool.by_base[i]->size,
                  "segment %zu is not one free block", i);
        cr_expect_eq(heap->pool.by_base[i]->expandable, expandable);
    }
    if (expandable) {
        cr_expect_gt(gm_host_backend_vmm_maps(), 0, "the ranges were used");
        cr_expect_eq(gm_host_backend_alloc_calls(), 0, "no classic segment");
        cr_expect_eq(gm_host_backend_vmm_mapped(), gm_host_backend_in_use());
        for (int i = 0; i < 2; i++) {
            gm_segment *seg = heap->vr[i].mapped ? gm_pool_segment_containing(&heap->pool, heap->vr[i].base) : NULL;
            cr_expect_eq(seg ? seg->size : 0, heap->vr[i].mapped, "range %d: its segment is what is mapped", i);
        }
    }
}

Test(differential, million_ops_against_model, .timeout = 600) { run_differential(false); }

/* The same operations on expandable segments (GPUMEM_EXPANDABLE=1, the host backend's VMM). */
Test(differential, million_ops_against_model_expandable, .timeout = 600) { run_differential(true); }
