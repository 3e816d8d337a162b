/* The pool layer alone (pool/gm_pool.h): a plain resource with no globals and no policy, so it is
 * tested here without a backend, a limit or a manager. It never touches the memory it manages,
 * so the segments are plain numbers. */
#include <criterion/criterion.h>

#include "gm_pool.h"

#define MiB ((size_t)1 << 20)
#define BASE ((uintptr_t)1 << 40)

static gm_pool pool;

static void setup(void)
{
    gm_pool_sizing sizing = {.small_segment = 2 * MiB, .segment_min = 2 * MiB, .segment_max = 64 * MiB,
                             .dedicated_min = 512 * MiB, .growth_factor = 2.0};
    gm_pool_init(&pool, &sizing);
}

static void teardown(void) { gm_pool_reset(&pool); }

TestSuite(pool_layer, .init = setup, .fini = teardown);

static gm_block *take(size_t bytes)
{
    gm_block *b = NULL;
    cr_assert_eq(gm_pool_alloc_locked(&pool, gm_pool_round_size(bytes), &b), GPUMEM_OK, "%zu bytes", bytes);
    cr_assert_eq(b->state, GM_BLOCK_LIVE);
    return b;
}

Test(pool_layer, splits_and_coalesces_back_to_one_block)
{
    cr_assert(gm_pool_add_segment_locked(&pool, BASE, 4 * MiB, 2 * MiB));
    gm_block *a = take(MiB + 1), *b = take(MiB + 1), *c = take(MiB + 1);
    cr_expect_eq(a->addr, BASE);
    cr_expect_eq(b->addr, a->addr + a->size, "blocks tile their segment");
    cr_expect_eq(c->addr, b->addr + b->size);
    cr_expect_eq(pool.bytes_cached_free, 4 * MiB - 3 * a->size);
    gm_pool_free_block_locked(&pool, b);
    gm_pool_free_block_locked(&pool, a);
    gm_pool_free_block_locked(&pool, c);
    gm_block *only = pool.by_base[0]->first;
    cr_expect(only->state == GM_BLOCK_FREE && !only->next && only->size == 4 * MiB, "one free block again");
    cr_expect_eq(pool.bytes_cached_free, 4 * MiB);
    cr_expect_eq(gm_pool_largest_free_locked(&pool), 4 * MiB);
}

Test(pool_layer, no_free_block_is_out_of_memory_and_changes_nothing)
{
    gm_block *b = NULL;
    cr_expect_eq(gm_pool_alloc_locked(&pool, 4096, &b), GPUMEM_ERROR_OUT_OF_MEMORY, "no segment yet");
    cr_assert(gm_pool_add_segment_locked(&pool, BASE, 4 * MiB, 2 * MiB));
    take(3 * MiB);
    cr_expect_eq(gm_pool_alloc_locked(&pool, 2 * MiB, &b), GPUMEM_ERROR_OUT_OF_MEMORY, "1 MiB is left");
    cr_expect_eq(pool.bytes_cached_free, MiB, "the failed request took nothing");
}

Test(pool_layer, small_requests_do_not_break_up_large_segments)
{
    cr_assert(gm_pool_add_segment_locked(&pool, BASE, 8 * MiB, 8 * MiB));
    gm_block *b = NULL;
    cr_expect_eq(gm_pool_alloc_locked(&pool, 4096, &b), GPUMEM_ERROR_OUT_OF_MEMORY,
                 "a small request needs a small segment");
    cr_assert(gm_pool_add_segment_locked(&pool, BASE + 64 * MiB, 2 * MiB, 4096));
    cr_expect_eq(take(4096)->addr, BASE + 64 * MiB);
    cr_expect_eq(take(3 * MiB)->addr, BASE);
}

Test(pool_layer, pending_blocks_wait_for_their_epoch)
{
    cr_assert(gm_pool_add_segment_locked(&pool, BASE, 2 * MiB, 2 * MiB));
    gm_block *a = take(2 * MiB);
    gm_pool_pend_block_locked(&pool, a);
    cr_expect_eq(a->state, GM_BLOCK_PENDING);
    gm_block *b = NULL;
    cr_expect_eq(gm_pool_alloc_locked(&pool, 2 * MiB, &b), GPUMEM_ERROR_OUT_OF_MEMORY, "not before its fence");
    uint32_t covered = gm_pool_close_epoch_locked(&pool);
    cr_expect_not(gm_pool_retire_upto_locked(&pool, covered - 1), "an older epoch does not cover it");
    cr_expect(gm_pool_retire_upto_locked(&pool, covered));
    cr_expect_eq(take(2 * MiB)->addr, BASE, "reusable once its epoch completed");
    cr_expect_null(pool.pending_head);
}

Test(pool_layer, free_segments_go_back_down_to_what_may_stay_cached)
{
    for (int i = 0; i < 3; i++)
        cr_assert(gm_pool_add_segment_locked(&pool, BASE + (uintptr_t)i * 16 * MiB, 4 * MiB, 4 * MiB));
    gm_block *held = take(4 * MiB);
    gm_pool_span spans[4];
    size_t n = gm_pool_take_free_segments_locked(&pool, 4 * MiB, spans, 4);
    cr_expect_eq(n, 1, "8 MiB idle, 4 MiB may stay");
    cr_expect_eq(spans[0].size, 4 * MiB);
    cr_expect_neq(spans[0].base, held->addr, "a segment with a live block never goes");
    cr_expect_eq(gm_pool_segment_count(&pool), 2);
    cr_expect_eq(pool.segments_released, 1);
    n = gm_pool_take_free_segments_locked(&pool, 0, spans, 4);
    cr_expect_eq(n, 1);
    cr_expect_eq(gm_pool_reset(&pool), 4 * MiB, "reset hands back what the pool still held");
    cr_expect_eq(pool.segments_released, 3, "lifetime counters survive a reset");
}

Test(pool_layer, growth_factor_sizes_the_next_segment)
{
    cr_expect_eq(gm_pool_next_segment_size(&pool, 4096), 2 * MiB, "small requests: a small segment");
    cr_expect_eq(gm_pool_next_segment_size(&pool, 3 * MiB), 4 * MiB, "no sequence yet: the request's own");
    cr_assert(gm_pool_add_segment_locked(&pool, BASE, 8 * MiB, 3 * MiB));
    cr_expect_eq(gm_pool_next_segment_size(&pool, 3 * MiB), 16 * MiB, "the last shared one times 2");
    cr_expect_eq(gm_pool_next_segment_size(&pool, 600 * MiB), 600 * MiB, "dedicated: sized to itself");
}

Test(pool_layer, a_live_block_grows_and_shrinks_in_place)
{
    cr_assert(gm_pool_add_segment_locked(&pool, BASE, 4 * MiB, 4 * MiB));
    gm_block *b = take(2 * MiB);
    cr_expect_eq(gm_pool_room_after_locked(b), 2 * MiB);
    cr_expect_eq(gm_pool_extend_block_locked(&pool, b, 3 * MiB), GPUMEM_OK);
    cr_expect_eq(b->size, 3 * MiB);
    cr_expect_eq(gm_pool_extend_block_locked(&pool, b, 5 * MiB), GPUMEM_ERROR_OUT_OF_MEMORY, "past the segment");
    cr_expect_eq(gm_pool_shrink_block_locked(&pool, b, 3 * MiB / 2, false), GPUMEM_OK);
    cr_expect_eq(b->size, 3 * MiB / 2);
    cr_expect_eq(pool.bytes_cached_free, 5 * MiB / 2, "the tail is free again");
    cr_expect_eq(gm_pool_shrink_block_locked(&pool, b, 700, false), GPUMEM_ERROR_INVALID_VALUE, "not 512-B aligned");
}

Test(pool_layer, lookups_find_the_covering_block)
{
    cr_assert(gm_pool_add_segment_locked(&pool, BASE, 2 * MiB, 4096));
    gm_block *a = take(4096), *b = take(4096);
    cr_expect_eq(gm_pool_block_containing_locked(&pool, b->addr + 100), b);
    cr_expect_eq(gm_pool_block_containing_locked(&pool, a->addr + 4095), a);
    cr_expect_null(gm_pool_block_containing_locked(&pool, BASE - 1));
    cr_expect_null(gm_pool_segment_containing(&pool, BASE + 2 * MiB), "the end is outside");
    cr_expect_eq(gm_pool_round_size(1), 512);
    cr_expect_eq(gm_pool_round_size(0), 0);
    cr_expect_eq(gm_pool_round_size(((size_t)1 << 46) + 1), 0, "beyond 64 TiB");
}

/* ---------------------------------------------------------------- expandable segments */

/* The segment's block list tiles it, and `last` is its last block. */
static void check_segment(const gm_segment *seg)
{
    const gm_block *b = seg->first, *prev = NULL;
    uintptr_t at = seg->base;
    for (; b; prev = b, b = b->next) {
        cr_assert_eq(b->addr, at, "blocks tile the segment");
        cr_assert_eq(b->prev, prev);
        at += b->size;
    }
    cr_assert_eq(at, seg->base + seg->size);
    cr_assert_eq(seg->last, prev, "last is the last block");
}

static gm_segment *only_segment(void)
{
    cr_assert_eq(pool.segments, 1);
    check_segment(pool.by_base[0]);
    return pool.by_base[0];
}

Test(pool_layer, an_expandable_segment_extends_into_its_trailing_free_block)
{
    cr_assert(gm_pool_add_expandable_locked(&pool, BASE, 4 * MiB, false));
    gm_segment *seg = only_segment();
    cr_expect(seg->expandable);
    gm_block *a = take(3 * MiB);
    cr_expect_eq(gm_pool_tail_free_locked(seg), MiB);
    gm_block *b = NULL;
    cr_expect_eq(gm_pool_alloc_locked(&pool, 4 * MiB, &b), GPUMEM_ERROR_OUT_OF_MEMORY, "1 MiB is free");
    cr_assert(gm_pool_extend_segment_locked(&pool, seg, 4 * MiB));
    cr_expect_eq(seg->size, 8 * MiB);
    cr_expect_eq(gm_pool_tail_free_locked(seg), 5 * MiB, "merged with the free tail");
    cr_expect_eq(pool.bytes_cached_free, 5 * MiB);
    b = take(5 * MiB);
    cr_expect_eq(b->addr, a->addr + 3 * MiB, "the larger block is contiguous with the earlier one");
    cr_expect_eq(gm_pool_tail_free_locked(seg), 0);
    cr_assert(gm_pool_extend_segment_locked(&pool, seg, 2 * MiB));
    cr_expect_eq(gm_pool_tail_free_locked(seg), 2 * MiB, "a new free block after a live one");
    cr_expect_eq(b->next->addr, BASE + 8 * MiB);
    cr_expect_eq(b->next->prev, b);
    check_segment(seg);
    gm_pool_free_block_locked(&pool, a);
    gm_pool_free_block_locked(&pool, b);
    cr_expect(!seg->first->next && seg->first->size == 10 * MiB, "everything merges again");
    check_segment(seg);
    cr_expect_eq(gm_pool_largest_free_locked(&pool), 10 * MiB);
}

Test(pool_layer, classic_segments_never_extend)
{
    cr_assert(gm_pool_add_segment_locked(&pool, BASE, 4 * MiB, 4 * MiB));
    cr_expect_not(gm_pool_extend_segment_locked(&pool, only_segment(), 2 * MiB));
    cr_expect_eq(only_segment()->size, 4 * MiB);
}

Test(pool_layer, a_trim_takes_the_ends_chunks_then_interior_ones_as_holes)
{
    pool.sizing.chunk = 2 * MiB;
    cr_assert(gm_pool_add_expandable_locked(&pool, BASE, 16 * MiB, false));
    gm_segment *seg = only_segment();
    gm_block *a = take(3 * MiB), *b = take(4 * MiB), *c = take(3 * MiB);
    gm_pool_free_block_locked(&pool, b); /* interior, [3, 7): its whole chunk [4, 6) can go */
    gm_pool_span spans[4];
    size_t n = gm_pool_take_free_segments_locked(&pool, 0, spans, 4);
    cr_assert_eq(n, 2);
    /* c ends at 10 MiB: the tail [10, 16) is free, its whole chunks [10, 16) go first */
    cr_expect_eq(spans[0].base, BASE + 10 * MiB);
    cr_expect_eq(spans[0].size, 6 * MiB);
    cr_expect(spans[0].expandable);
    cr_expect_eq(spans[1].base, BASE + 4 * MiB, "the interior chunk");
    cr_expect_eq(spans[1].size, 2 * MiB);
    cr_expect(spans[1].expandable);
    cr_expect_eq(seg->size, 10 * MiB, "a hole keeps the extent");
    cr_expect_eq(seg->holes, 2 * MiB);
    check_segment(seg);
    gm_block *hole = a->next->next;
    cr_expect_eq(hole->state, GM_BLOCK_HOLE);
    cr_expect_eq(a->next->size, MiB, "the free sliver before the hole");
    cr_expect_eq(hole->next->size, MiB, "and after it");
    cr_expect_eq(pool.bytes_cached_free, 2 * MiB, "the slivers only");
    gm_block *d;
    cr_expect_eq(gm_pool_alloc_locked(&pool, 3 * MiB, &d), GPUMEM_ERROR_OUT_OF_MEMORY, "a hole is never carved");
    gm_pool_span h;
    cr_expect_not(gm_pool_hole_for_locked(seg, 5 * MiB, &h), "the hole and its slivers make 4 MiB");
    cr_assert(gm_pool_hole_for_locked(seg, 4 * MiB, &h));
    cr_expect_eq(h.base, BASE + 4 * MiB);
    cr_expect_eq(h.size, 2 * MiB);
    gm_pool_span listed[4];
    cr_expect_eq(gm_pool_holes_locked(seg, listed, 4), 1);
    cr_expect_eq(listed[0].base, h.base);
    cr_expect_not(gm_pool_fill_hole_locked(&pool, seg, BASE + 3 * MiB), "no hole starts there");
    cr_assert(gm_pool_fill_hole_locked(&pool, seg, h.base)); /* mapped again */
    cr_expect_eq(seg->holes, 0);
    cr_expect_eq(a->next->size, 4 * MiB, "merged with both slivers");
    cr_expect_eq(pool.bytes_cached_free, 4 * MiB);
    check_segment(seg);
    cr_assert_eq(gm_pool_alloc_locked(&pool, 4 * MiB, &d), GPUMEM_OK);
    cr_expect_eq(d->addr, BASE + 3 * MiB);
    gm_pool_free_block_locked(&pool, d);
    n = gm_pool_take_free_segments_locked(&pool, 0, spans, 4); /* the hole again */
    cr_assert_eq(n, 1);
    cr_expect_eq(spans[0].base, BASE + 4 * MiB);
    gm_pool_free_block_locked(&pool, c); /* merges with the sliver after the hole: [6, 10) free */
    n = gm_pool_take_free_segments_locked(&pool, 0, spans, 4);
    cr_assert_eq(n, 1);
    cr_expect_eq(spans[0].base, BASE + 6 * MiB, "the mapped tail; the hole below it is unmapped already");
    cr_expect_eq(spans[0].size, 4 * MiB);
    cr_expect_eq(seg->size, 4 * MiB, "the segment ends where the hole began: never in a hole");
    cr_expect_eq(seg->holes, 0);
    cr_expect_eq(gm_pool_tail_free_locked(seg), MiB, "a's last chunk keeps its free part");
    check_segment(seg);
    cr_expect_eq(pool.bytes_cached_free, MiB);
    gm_pool_free_block_locked(&pool, a);
    n = gm_pool_take_free_segments_locked(&pool, 0, spans, 4);
    cr_assert_eq(n, 1);
    cr_expect_eq(spans[0].base, BASE);
    cr_expect_eq(spans[0].size, 4 * MiB);
    cr_expect_eq(pool.segments, 0, "nothing mapped: the segment is gone");
    cr_expect_eq(pool.bytes_cached_free, 0);
    cr_expect_eq(pool.segments_released, 1);
}

Test(pool_layer, a_reset_counts_no_hole_as_held)
{
    pool.sizing.chunk = 2 * MiB;
    cr_assert(gm_pool_add_expandable_locked(&pool, BASE, 12 * MiB, false));
    take(3 * MiB);
    gm_block *b = take(4 * MiB);
    take(2 * MiB);
    gm_pool_free_block_locked(&pool, b); /* [3, 7): chunk [4, 6) */
    gm_pool_span spans[4];
    cr_assert_eq(gm_pool_take_free_segments_locked(&pool, 0, spans, 4), 2); /* the tail [10, 12), the hole */
    cr_expect_eq(gm_pool_reset(&pool), 8 * MiB, "10 MiB of extent, 2 of them unmapped");
}

Test(pool_layer, a_trim_keeps_what_max_cached_allows)
{
    pool.sizing.chunk = 2 * MiB;
    cr_assert(gm_pool_add_expandable_locked(&pool, BASE, 8 * MiB, true));
    take(4096);
    gm_pool_span spans[4];
    cr_expect_eq(gm_pool_take_free_segments_locked(&pool, 8 * MiB, spans, 4), 0, "under the cache limit");
    cr_expect_eq(gm_pool_take_free_segments_locked(&pool, MiB, spans, 4), 1);
    cr_expect_eq(spans[0].base, BASE + 2 * MiB);
    cr_expect_eq(only_segment()->size, 2 * MiB);
}
