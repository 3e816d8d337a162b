/* Expandable segments (GPUMEM_EXPANDABLE=1) on the host backend, whose VMM emulation reserves
 * with mmap(PROT_NONE) and maps with mprotect: growth at a range's end, data across growth, the
 * limit in mapped bytes, trims (OOM retry, GPUMEM_MAX_CACHED, the limit), teardown, and every
 * fallback: no VMM, a map failing half way, an exhausted range. Each test is its own process. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "gm_api.h"

#define MiB ((size_t)1 << 20)

static gm_heap *heap;
static bool range_set; /* a test chose the range size itself */

/* The host backend's device is 1 TiB when unlimited, and so would be each range: ThreadSanitizer's
 * address space has no room for that, so ranges here are 64 GiB unless a test says otherwise. */
static void set_range(size_t bytes)
{
    gm_vmm_set_range_size(bytes);
    range_set = true;
}

static void start(const char *const *env)
{
    if (!range_set) gm_vmm_set_range_size((size_t)64 << 30);
    setenv("GPUMEM_EXPANDABLE", "1", 1);
    for (; env && env[0]; env += 2) setenv(env[0], env[1], 1);
    gm_config_reset_for_tests();
    cr_assert(gm_manager_init(gm_host_backend()));
    heap = gm_heap_get(1, 0);
    cr_assert_not_null(heap);
}

static int try_alloc(size_t size, uintptr_t *p) { return gm_alloc(heap, size, 0, 0, p); }

static uintptr_t alloc_ok(size_t size)
{
    uintptr_t p = 0;
    int rc = try_alloc(size, &p);
    cr_assert_eq(rc, GPUMEM_OK, "alloc(%zu) failed with %d", size, rc);
    return p;
}

static void free_ok(uintptr_t p) { cr_assert(gm_answer_ok(gm_free(heap, p, GM_FREE_BARRIER, NULL))); }

static gpumem_stats stats(void)
{
    gpumem_stats st;
    cr_assert_eq(gpumem_get_stats(0, &st), GPUMEM_OK);
    return st;
}

Test(expandable, a_larger_block_reuses_the_freed_space_and_maps_only_what_it_misses)
{
    start(NULL);
    uintptr_t a = alloc_ok(3 * MiB), b = alloc_ok(3 * MiB);
    cr_expect_eq(b, a + 3 * MiB, "one range: blocks are contiguous");
    cr_expect_eq(gm_host_backend_vmm_mapped(), 8 * MiB, "one step of GPUMEM_SEGMENT_MIN mapped");
    cr_expect_eq(gm_host_backend_alloc_calls(), 0, "no classic segment");
    free_ok(a);
    free_ok(b);
    uintptr_t c = alloc_ok(20 * MiB);
    cr_expect_eq(c, a, "carved from the start of the range, merged with the new chunks");
    cr_expect_eq(gm_host_backend_vmm_mapped(), 20 * MiB, "only the 12 MiB it missed were mapped");
    gpumem_stats st = stats();
    cr_expect_eq(st.bytes_reserved, 20 * MiB, "reserved = mapped");
    cr_expect_eq(st.segments, 1);
    free_ok(c);
}

Test(expandable, data_stays_intact_across_growth)
{
    start(NULL);
    uintptr_t a = alloc_ok(5 * MiB);
    memset((void *)a, 0xa5, 5 * MiB);
    uintptr_t b = alloc_ok(40 * MiB);
    memset((void *)b, 0x5a, 40 * MiB);
    const unsigned char *pa = (const unsigned char *)a;
    for (size_t i = 0; i < 5 * MiB; i += 4093) cr_assert_eq(pa[i], 0xa5, "byte %zu", i);
    cr_expect_eq(b, a + 5 * MiB);
    free_ok(a);
    free_ok(b);
}

Test(expandable, small_requests_have_a_range_of_their_own)
{
    start(NULL);
    uintptr_t s = alloc_ok(4096), l = alloc_ok(4 * MiB);
    gm_segment *ss = gm_pool_segment_containing(&heap->pool, s), *ls = gm_pool_segment_containing(&heap->pool, l);
    cr_assert(ss && ls && ss != ls);
    cr_expect(ss->small && ss->expandable && ls->expandable && !ls->small);
    cr_expect_eq(ss->size, 2 * MiB, "GPUMEM_SMALL_SEGMENT mapped at once");
}

Test(expandable, the_limit_counts_mapped_bytes)
{
    start((const char *const[]){"GPUMEM_LIMIT", "20MiB", NULL});
    uintptr_t a = alloc_ok(7 * MiB);
    cr_expect_eq(stats().bytes_reserved, 8 * MiB);
    uintptr_t b = alloc_ok(11 * MiB); /* misses 10 MiB: 18 MiB mapped */
    cr_expect_eq(stats().bytes_reserved, 18 * MiB);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 18 * MiB);
    uintptr_t c = 0;
    cr_expect_eq(try_alloc(4 * MiB, &c), GPUMEM_ERROR_OUT_OF_MEMORY, "22 MiB would pass the limit");
    cr_expect_eq(stats().limit_rejections, 1);
    cr_expect_eq(stats().bytes_reserved, 18 * MiB, "nothing stayed reserved");
    free_ok(b); /* the tail from 8 MiB on is free: trimmed by the retry */
    c = alloc_ok(4 * MiB);
    cr_expect_eq(c, a + 7 * MiB, "reused the freed space");
    cr_expect_leq(stats().bytes_reserved, 20 * MiB);
    cr_expect_eq(stats().bytes_reserved, gm_host_backend_vmm_mapped());
    free_ok(a);
    free_ok(c);
}

Test(expandable, at_the_limit_the_end_of_the_range_is_trimmed_and_the_grow_retried)
{
    start((const char *const[]){"GPUMEM_LIMIT", "16MiB", NULL});
    uintptr_t s = alloc_ok(4096); /* small range: 2 MiB */
    uintptr_t a = alloc_ok(12 * MiB);
    free_ok(s);
    free_ok(a);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 14 * MiB);
    uintptr_t b = alloc_ok(15 * MiB); /* the small range's chunk must go */
    cr_expect_eq(b, a);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 16 * MiB);
    cr_expect_geq(stats().release_retries, 1);
    free_ok(b);
}

Test(expandable, device_oom_trims_and_retries)
{
    gm_host_backend_configure(16 * MiB, -1);
    start(NULL);
    uintptr_t s = alloc_ok(4096);
    uintptr_t a = alloc_ok(10 * MiB);
    free_ok(s);
    free_ok(a);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 12 * MiB);
    uintptr_t b = alloc_ok(16 * MiB); /* needs 6 more: only 4 left until the small chunk goes */
    cr_expect_eq(b, a);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 16 * MiB);
    cr_expect_geq(stats().backend_ooms, 1);
    free_ok(b);
}

Test(expandable, above_max_cached_the_free_tail_is_unmapped)
{
    start((const char *const[]){"GPUMEM_MAX_CACHED", "0", NULL});
    uintptr_t a = alloc_ok(3 * MiB), b = alloc_ok(3 * MiB);
    free_ok(b);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 4 * MiB, "the whole chunks after a went");
    free_ok(a);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 0);
    cr_expect_eq(stats().bytes_reserved, 0);
    cr_expect_eq(stats().segments, 0);
    uintptr_t c = alloc_ok(3 * MiB);
    cr_expect_eq(c, a, "the range is kept: mapped again from its start");
    free_ok(c);
}

/* Free chunks below a live block go too (holes: unmapped, the range keeps its extent), and a
 * request they can serve maps them again before anything is mapped at the end. */
Test(expandable, interior_free_chunks_are_unmapped_and_mapped_again_for_a_request)
{
    start(NULL);
    uintptr_t a = alloc_ok(3 * MiB), b = alloc_ok(6 * MiB), c = alloc_ok(3 * MiB);
    memset((void *)a, 0x11, 3 * MiB);
    memset((void *)c, 0x33, 3 * MiB);
    free_ok(b); /* [3, 9): its whole chunks [4, 8) */
    cr_expect_gt(gpumem_release_cached(), 4 * MiB - 1);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 8 * MiB, "12 MiB used to the end, 4 of them a hole now");
    cr_expect_eq(stats().bytes_reserved, 8 * MiB, "the limit counts mapped bytes");
    uintptr_t e = alloc_ok(5 * MiB); /* the hole and its slivers make 6 MiB */
    cr_expect_eq(e, a + 3 * MiB, "the hole was mapped again, not the range's end");
    cr_expect_eq(gm_host_backend_vmm_mapped(), 12 * MiB);
    cr_expect_eq(stats().bytes_reserved, 12 * MiB);
    memset((void *)e, 0x55, 5 * MiB);
    const unsigned char *pa = (const unsigned char *)a, *pc = (const unsigned char *)c;
    cr_expect(pa[0] == 0x11 && pa[3 * MiB - 1] == 0x11 && pc[0] == 0x33 && pc[3 * MiB - 1] == 0x33,
              "the neighbours kept their data");
    free_ok(e);
    free_ok(a);
    free_ok(c);
}

Test(expandable, above_max_cached_interior_chunks_go_and_teardown_skips_the_holes)
{
    start((const char *const[]){"GPUMEM_MAX_CACHED", "0", NULL});
    alloc_ok(3 * MiB); /* leaked */
    uintptr_t b = alloc_ok(6 * MiB);
    alloc_ok(3 * MiB); /* leaked */
    free_ok(b);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 8 * MiB, "the hole went at once");
    cr_expect_eq(stats().bytes_cached_free, 2 * MiB, "only the slivers stay cached");
    gm_context_teardown(1, true);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 0, "every mapped chunk unmapped once, no hole twice");
    cr_expect_eq(gm_host_backend_in_use(), 0);
}

Test(expandable, without_vmm_classic_segments_serve)
{
    gm_host_backend_configure_vmm(false, -1);
    start(NULL);
    uintptr_t a = alloc_ok(3 * MiB);
    memset((void *)a, 1, 3 * MiB);
    cr_expect_eq(gm_host_backend_vmm_maps(), 0);
    cr_expect_eq(gm_host_backend_alloc_calls(), 1);
    gm_segment *seg = gm_pool_segment_containing(&heap->pool, a);
    cr_expect(seg && !seg->expandable);
    free_ok(a);
}

Test(expandable, a_map_failing_half_way_loses_nothing)
{
    start((const char *const[]){"GPUMEM_LIMIT", "64MiB", NULL});
    uintptr_t a = alloc_ok(3 * MiB); /* 4 chunks mapped */
    gm_host_backend_configure_vmm(true, 2); /* 2 more maps, then every one fails */
    uintptr_t b = 0;
    cr_expect_eq(try_alloc(20 * MiB, &b), GPUMEM_ERROR_OUT_OF_MEMORY, "the device's error");
    gpumem_stats st = stats();
    cr_expect_eq(st.bytes_reserved, gm_host_backend_vmm_mapped(), "the limit holds what is mapped");
    cr_expect_eq(heap->vr[0].mapped, gm_host_backend_vmm_mapped());
    memset((void *)a, 7, 3 * MiB); /* still mapped and usable */
    gm_host_backend_configure_vmm(true, -1);
    b = alloc_ok(20 * MiB);
    cr_expect_eq(b, a + 3 * MiB);
    memset((void *)b, 8, 20 * MiB);
    cr_expect_eq(stats().bytes_reserved, gm_host_backend_vmm_mapped());
    free_ok(a);
    free_ok(b);
}

Test(expandable, an_exhausted_range_falls_back_to_classic_segments)
{
    set_range(8 * MiB);
    start(NULL);
    uintptr_t a = alloc_ok(6 * MiB), b = alloc_ok(6 * MiB);
    cr_expect_eq(gm_host_backend_alloc_calls(), 1, "the second came from a classic segment");
    gm_segment *sa = gm_pool_segment_containing(&heap->pool, a), *sb = gm_pool_segment_containing(&heap->pool, b);
    cr_assert(sa && sb);
    cr_expect(sa->expandable && !sb->expandable);
    memset((void *)a, 1, 6 * MiB);
    memset((void *)b, 2, 6 * MiB);
    free_ok(a);
    free_ok(b);
    cr_expect_eq(gm_release_cached(heap, 0), 8 * MiB + 8 * MiB);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 0);
    cr_expect_eq(gm_host_backend_in_use(), 0);
}

Test(expandable, teardown_unmaps_every_chunk_and_frees_the_ranges)
{
    start(NULL);
    alloc_ok(4096);            /* leaked */
    uintptr_t a = alloc_ok(9 * MiB); /* leaked */
    (void)a;
    cr_expect_gt(gm_host_backend_vmm_mapped(), 0);
    gm_context_teardown(1, true);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 0, "live blocks' chunks too: VMM memory outlives a context");
    cr_expect_eq(gm_host_backend_in_use(), 0);
    cr_expect_eq(heap->vr[0].base, 0);
    cr_expect_eq(heap->vr[1].base, 0);
}

Test(expandable, lookups_answer_each_block_as_its_own_allocation)
{
    start(NULL);
    uintptr_t a = alloc_ok(3 * MiB), b = alloc_ok(5000);
    (void)b;
    uintptr_t c = alloc_ok(2 * MiB);
    uintptr_t base = 0;
    size_t size = 0;
    gm_answer ans = gm_lookup(c + 100, &base, &size);
    cr_expect(ans.owner == GM_OURS && ans.status == GPUMEM_OK);
    cr_expect_eq(base, c);
    cr_expect_eq(size, 2 * MiB);
    free_ok(a);
    ans = gm_lookup(a + 10, &base, &size);
    cr_expect(ans.owner == GM_OURS && ans.status == GPUMEM_ERROR_INVALID_VALUE, "freed memory");
    ans = gm_lookup(heap->vr[0].base + heap->vr[0].mapped + 4096, &base, &size);
    cr_expect_eq(ans.owner, GM_NOT_OURS, "unmapped virtual range is no pool memory");
}

Test(expandable, a_buffer_at_the_end_of_its_range_grows_in_place_by_mapping_behind_it)
{
    start(NULL);
    gpumem_buffer *buf = NULL;
    gpumem_buffer_config cfg;
    gpumem_buffer_config_init(&cfg);
    cfg.initial_capacity = 256 * MiB;
    cr_assert_eq(gpumem_buffer_create(&buf, "grows", &cfg, NULL), GPUMEM_OK);
    void *before = NULL, *after = NULL;
    cr_assert_eq(gpumem_buffer_resize(buf, 256 * MiB), GPUMEM_OK);
    cr_assert_eq(gpumem_buffer_ptr(buf, &before), GPUMEM_OK);
    memset(before, 0x3c, 256 * MiB);
    uint64_t mapped = gm_host_backend_vmm_mapped();
    cr_assert_eq(gpumem_buffer_reserve(buf, 512 * MiB), GPUMEM_OK);
    cr_assert_eq(gpumem_buffer_ptr(buf, &after), GPUMEM_OK);
    gpumem_buffer_info info;
    cr_assert_eq(gpumem_buffer_get_info(buf, &info), GPUMEM_OK);
    cr_expect_eq(after, before, "same pointer");
    cr_expect_eq(info.copies, 0, "no copy");
    cr_expect_eq(info.grows_in_place, 1);
    cr_expect_geq(info.capacity, 512 * MiB);
    cr_expect_eq(gm_host_backend_vmm_mapped() - mapped, info.capacity - 256 * MiB, "mapped what it grew by");
    const unsigned char *p = after;
    for (size_t i = 0; i < 256 * MiB; i += 65521) cr_assert_eq(p[i], 0x3c, "byte %zu", i);
    memset((char *)after + 256 * MiB, 1, info.capacity - 256 * MiB); /* the new part is mapped */
    cr_expect_eq(gpumem_buffer_destroy(buf), GPUMEM_OK);
}

Test(expandable, a_buffer_with_a_block_after_it_still_moves)
{
    start(NULL);
    gpumem_buffer *buf = NULL;
    gpumem_buffer_config cfg;
    gpumem_buffer_config_init(&cfg);
    cfg.initial_capacity = 4 * MiB;
    cr_assert_eq(gpumem_buffer_create(&buf, "blocked", &cfg, NULL), GPUMEM_OK);
    cr_assert_eq(gpumem_buffer_resize(buf, 4 * MiB), GPUMEM_OK);
    uintptr_t after = alloc_ok(4 * MiB + 4 * MiB); /* right behind the buffer */
    void *before = NULL, *moved = NULL;
    cr_assert_eq(gpumem_buffer_ptr(buf, &before), GPUMEM_OK);
    cr_expect_eq((uintptr_t)before + 4 * MiB, after);
    cr_assert_eq(gpumem_buffer_reserve(buf, 16 * MiB), GPUMEM_OK);
    cr_assert_eq(gpumem_buffer_ptr(buf, &moved), GPUMEM_OK);
    gpumem_buffer_info info;
    cr_assert_eq(gpumem_buffer_get_info(buf, &info), GPUMEM_OK);
    cr_expect_neq(moved, before);
    cr_expect_eq(info.copies, 1);
    cr_expect_eq(gpumem_buffer_destroy(buf), GPUMEM_OK);
    free_ok(after);
}

/* Threads growing and trimming the same ranges at once (GPUMEM_MAX_CACHED=0: every free trims):
 * every block keeps its bytes, nothing is lost, and the limit still equals what is mapped. */
static void *churn_thread(void *arg)
{
    uint64_t rng = (uintptr_t)arg * 0x9E3779B97F4A7C15ull + 1;
    uintptr_t mine[16] = {0};
    size_t sizes[16] = {0};
    for (int op = 0; op < 4000; op++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        int i = (int)(rng % 16);
        if (mine[i]) {
            unsigned char *p = (unsigned char *)mine[i];
            unsigned char want = (unsigned char)(i + (uintptr_t)arg * 16);
            if (p[0] != want || p[sizes[i] - 1] != want) return (void *)1;
            if (!gm_answer_ok(gm_free(heap, mine[i], GM_FREE_BARRIER, NULL))) return (void *)2;
            mine[i] = 0;
        } else {
            size_t size = rng >> 40 & 1 ? 4096 + (rng >> 20) % MiB : MiB + (rng >> 20) % (12 * MiB);
            if (gm_alloc(heap, size, 0, 0, &mine[i]) != GPUMEM_OK) return (void *)3;
            sizes[i] = size;
            unsigned char v = (unsigned char)(i + (uintptr_t)arg * 16);
            ((unsigned char *)mine[i])[0] = v;
            ((unsigned char *)mine[i])[size - 1] = v;
        }
    }
    for (int i = 0; i < 16; i++)
        if (mine[i]) gm_free(heap, mine[i], GM_FREE_BARRIER, NULL);
    return NULL;
}

Test(expandable, threads_grow_and_trim_the_ranges_at_once)
{
    start((const char *const[]){"GPUMEM_MAX_CACHED", "0", NULL});
    pthread_t t[4];
    for (uintptr_t i = 0; i < 4; i++) cr_assert_eq(pthread_create(&t[i], NULL, churn_thread, (void *)i), 0);
    for (int i = 0; i < 4; i++) {
        void *rc;
        pthread_join(t[i], &rc);
        cr_expect_null(rc, "thread %d failed (%p)", i, rc);
    }
    gpumem_stats st = stats();
    cr_expect_eq(st.bytes_allocated, 0);
    cr_expect_eq(st.bytes_reserved, gm_host_backend_vmm_mapped());
    cr_expect_eq(gm_host_backend_vmm_mapped(), gm_host_backend_in_use());
    cr_expect_eq(gm_host_backend_alloc_calls(), 0, "never fell back");
    gm_release_cached(heap, 0);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 0);
    cr_expect_eq(heap->vr[0].mapped + heap->vr[1].mapped, 0);
}

Test(expandable, the_chunk_size_is_a_setting)
{
    start((const char *const[]){"GPUMEM_EXPANDABLE_CHUNK", "8MiB", "GPUMEM_MAX_CACHED", "0", NULL});
    uintptr_t a = alloc_ok(3 * MiB);
    cr_expect_eq(heap->vmm_chunk, 8 * MiB);
    cr_expect_eq(gm_host_backend_vmm_maps(), 1, "one 8 MiB map");
    uintptr_t b = alloc_ok(10 * MiB); /* misses 5 MiB: one more chunk */
    cr_expect_eq(gm_host_backend_vmm_maps(), 2);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 16 * MiB);
    free_ok(b); /* free from 3 MiB on: the whole chunk [8, 16) is trimmed, a keeps [0, 8) */
    cr_expect_eq(gm_host_backend_vmm_mapped(), 8 * MiB, "the chunk [8, 16) went");
    free_ok(a);
    cr_expect_eq(gm_host_backend_vmm_mapped(), 0);
}
