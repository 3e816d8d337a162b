/* Unit tests of the caching pool on the host backend: splitting, coalescing, the growth-factor
 * sequence, dedicated segments, release-and-retry, cache trimming, strict and fast free modes,
 * lookups and misuse. Criterion runs each test in its own process, so every test starts with a
 * fresh manager configured by its own environment. */
#include <criterion/criterion.h>
#include <stdlib.h>

#include "gm_api.h"

#define MiB ((size_t)1 << 20)

static gm_heap *heap;

static void start(const char *const *env)
{
    for (; env && env[0]; env += 2) setenv(env[0], env[1], 1);
    gm_config_reset_for_tests();
    cr_assert(gm_manager_init(gm_host_backend()));
    heap = gm_heap_get(1, 0);
    cr_assert_not_null(heap);
}

static uintptr_t alloc_ok(size_t size)
{
    uintptr_t p = 0;
    int rc = gm_alloc(heap, size, 0, 0, &p);
    cr_assert_eq(rc, GPUMEM_OK, "alloc(%zu) failed with %d", size, rc);
    cr_assert_eq(p % GM_ALIGN, 0, "not 512-B aligned");
    return p;
}

static void free_ok(uintptr_t p)
{
    cr_assert(gm_answer_ok(gm_free(heap, p, GM_FREE_BARRIER, NULL)));
}

static gpumem_stats stats(void)
{
    gpumem_stats st;
    cr_assert_eq(gpumem_get_stats(0, &st), GPUMEM_OK);
    return st;
}

Test(pool, rounds_to_512_and_splits_small_segments)
{
    start(NULL);
    uintptr_t a = alloc_ok(1), b = alloc_ok(600), c = alloc_ok(512);
    cr_expect_eq(b, a + 512, "second block follows the first");
    cr_expect_eq(c, b + 1024, "600 B occupies 1024 B");
    gpumem_stats st = stats();
    cr_expect_eq(st.segments, 1);
    cr_expect_eq(st.bytes_reserved, 2 * MiB, "one 2 MiB small segment");
    cr_expect_eq(st.bytes_requested, 1 + 600 + 512);
    cr_expect_eq(st.bytes_allocated, 512 + 1024 + 512);
    cr_expect_eq(st.pool_misses, 1);
    cr_expect_eq(st.pool_hits, 2);
}

Test(pool, coalesces_neighbours_on_free)
{
    /* The pool's own behaviour: no thread cache keeps the freed blocks apart (test_tcache.c). */
    start((const char *const[]){"GPUMEM_THREAD_CACHE", "0", NULL});
    uintptr_t a = alloc_ok(4096), b = alloc_ok(4096), c = alloc_ok(4096);
    free_ok(b);
    cr_expect_eq(stats().largest_free_block, 2 * MiB - 3 * 4096, "b alone is not merged with the tail");
    free_ok(a);
    free_ok(c);
    gpumem_stats st = stats();
    cr_expect_eq(st.largest_free_block, 2 * MiB, "all three merged back into one block");
    cr_expect_float_eq(st.fragmentation, 0.0, 1e-9);
    cr_expect_eq(alloc_ok(1 * MiB), a, "the merged block is reused from its start");
}

Test(pool, fragmentation_is_one_minus_largest_over_total)
{
    start(NULL);
    uintptr_t p[8];
    for (int i = 0; i < 8; i++) p[i] = alloc_ok(64 * 1024);
    for (int i = 0; i < 8; i += 2) free_ok(p[i]);
    gpumem_stats st = stats();
    double expect = 1.0 - (double)st.largest_free_block / (double)st.bytes_cached_free;
    cr_expect_float_eq(st.fragmentation, expect, 1e-12);
    cr_expect_gt(st.fragmentation, 0.0);
}

Test(pool, growth_factor_sequence)
{
    static const char *const env[] = {"GPUMEM_SEGMENT_MIN", "8MiB", "GPUMEM_GROWTH_FACTOR", "2",
                                      "GPUMEM_SEGMENT_MAX", "32MiB", NULL};
    start(env);
    /* 5 MiB blocks: 8 MiB holds one, 16 MiB two more, 32 MiB six, then the cap keeps 32. */
    size_t expect_reserved[] = {8, 24, 24, 24, 56, 56, 56, 56, 56, 56, 88};
    for (size_t i = 0; i < sizeof expect_reserved / sizeof *expect_reserved; i++) {
        alloc_ok(5 * MiB);
        cr_expect_eq(stats().bytes_reserved, expect_reserved[i] * MiB, "after block %zu: %llu", i,
                     (unsigned long long)stats().bytes_reserved);
    }
}

Test(pool, growth_factor_one_keeps_segment_min)
{
    static const char *const env[] = {"GPUMEM_SEGMENT_MIN", "4MiB", "GPUMEM_GROWTH_FACTOR", "1.0", NULL};
    start(env);
    for (int i = 1; i <= 4; i++) {
        alloc_ok(3 * MiB);
        cr_expect_eq(stats().bytes_reserved, (size_t)i * 4 * MiB);
    }
}

Test(pool, dedicated_segment_for_large_requests)
{
    static const char *const env[] = {"GPUMEM_DEDICATED_MIN", "64MiB", NULL};
    start(env);
    uintptr_t p = alloc_ok(100 * MiB + 1);
    gpumem_stats st = stats();
    cr_expect_eq(st.bytes_reserved, 102 * MiB, "own segment, rounded to 2 MiB pages");
    cr_expect_eq(st.segments, 1);
    free_ok(p);
    cr_expect_eq(alloc_ok(90 * MiB), p, "a cached dedicated segment serves a smaller request");
}

Test(pool, limit_is_never_crossed)
{
    static const char *const env[] = {"GPUMEM_LIMIT", "16MiB", NULL};
    start(env);
    uintptr_t a = alloc_ok(10 * MiB);
    uintptr_t b = 0;
    cr_expect_eq(gm_alloc(heap, 10 * MiB, 0, 0, &b), GPUMEM_ERROR_OUT_OF_MEMORY);
    gpumem_stats st = stats();
    cr_expect_leq(st.bytes_reserved, 16 * MiB);
    cr_expect_eq(st.limit_rejections, 1);
    cr_expect_eq(st.limit_bytes, 16 * MiB);
    free_ok(a);
    cr_expect_eq(alloc_ok(10 * MiB), a, "the freed block is reused under the limit");
}

Test(pool, limit_growth_shrinks_to_fit)
{
    static const char *const env[] = {"GPUMEM_LIMIT", "12MiB", "GPUMEM_SEGMENT_MIN", "8MiB", NULL};
    start(env);
    alloc_ok(6 * MiB);           /* segment of 8 MiB */
    alloc_ok(3 * MiB);           /* growth wants 16 MiB: only 4 MiB is left, so a 4 MiB segment */
    cr_expect_eq(stats().bytes_reserved, 12 * MiB);
}

Test(pool, limit_releases_cached_segments_then_retries)
{
    static const char *const env[] = {"GPUMEM_LIMIT", "32MiB", NULL};
    start(env);
    uintptr_t small = alloc_ok(4096);
    uintptr_t big = alloc_ok(20 * MiB);
    free_ok(big);
    free_ok(small);
    uintptr_t p = alloc_ok(30 * MiB); /* needs the cached 20 MiB handed back first */
    gpumem_stats st = stats();
    cr_expect_neq(p, 0);
    cr_expect_geq(st.release_retries, 1);
    cr_expect_leq(st.bytes_reserved, 32 * MiB);
    cr_expect_geq(st.segments_released, 1);
}

Test(pool, backend_oom_releases_cache_and_retries_once)
{
    start(NULL);
    gm_host_backend_configure(40 * MiB, -1);
    uintptr_t big = alloc_ok(24 * MiB);
    free_ok(big);
    alloc_ok(30 * MiB); /* 24 cached + 30 > 40: the device says OOM, the cache goes, retry works */
    gpumem_stats st = stats();
    cr_expect_eq(st.backend_ooms, 1);
    cr_expect_eq(st.release_retries, 1);
    cr_expect_eq(gm_host_backend_in_use(), st.bytes_reserved);
}

Test(pool, injected_fault_fails_cleanly)
{
    start(NULL);
    gm_host_backend_configure(0, 0); /* every device allocation fails from now on */
    uintptr_t p = 0;
    cr_expect_eq(gm_alloc(heap, 4096, 0, 0, &p), GPUMEM_ERROR_OUT_OF_MEMORY);
    gpumem_stats st = stats();
    cr_expect_eq(st.bytes_reserved, 0, "a failed segment leaves no reservation behind");
    cr_expect_eq(st.allocations, 0);
    cr_expect_geq(st.backend_ooms, 1);
}

Test(pool, max_cached_trims_idle_segments)
{
    static const char *const env[] = {"GPUMEM_MAX_CACHED", "0", NULL};
    start(env);
    uintptr_t p = alloc_ok(20 * MiB);
    free_ok(p);
    gpumem_stats st = stats();
    cr_expect_eq(st.bytes_reserved, 0);
    cr_expect_eq(st.segments, 0);
    cr_expect_eq(gm_host_backend_in_use(), 0);
}

Test(pool, strict_free_synchronizes)
{
    start(NULL);
    uintptr_t p = alloc_ok(4096);
    uint64_t before = gm_host_backend_sync_calls();
    free_ok(p);
    cr_expect_eq(gm_host_backend_sync_calls(), before + 1, "one context synchronize per free");
}

Test(pool, fast_free_waits_for_fence)
{
    static const char *const env[] = {"GPUMEM_FREE_SYNC", "0", NULL};
    start(env);
    gm_host_backend_set_fence_delay(1000000); /* fences never complete unless waited on */
    uintptr_t a = alloc_ok(1 * MiB);
    alloc_ok(1 * MiB); /* the 2 MiB small segment is now full */
    uint64_t syncs = gm_host_backend_sync_calls();
    free_ok(a);
    cr_expect_eq(gm_host_backend_sync_calls(), syncs, "fast mode does not synchronize on free");
    uintptr_t b = alloc_ok(1 * MiB);
    cr_expect_neq(b, a, "a pending block is not reused before its fence completes");
    gm_host_backend_set_fence_delay(0);
    alloc_ok(1 * MiB); /* fill the second segment too */
    free_ok(b);
    uintptr_t c = alloc_ok(1 * MiB);
    cr_expect(c == a || c == b, "a completed fence makes the blocks reusable");
    cr_expect_eq(stats().segments, 2);
}

Test(pool, fast_free_waits_when_memory_runs_out)
{
    static const char *const env[] = {"GPUMEM_FREE_SYNC", "0", "GPUMEM_LIMIT", "2MiB", NULL};
    start(env);
    gm_host_backend_set_fence_delay(1000000);
    uintptr_t a = alloc_ok(2 * MiB - 512);
    free_ok(a);
    uint64_t syncs = gm_host_backend_sync_calls();
    cr_expect_eq(alloc_ok(2 * MiB - 512), a, "at the limit the pool waits for the fence instead of failing");
    cr_expect_eq(gm_host_backend_sync_calls(), syncs + 1);
}

Test(pool, lookup_interior_and_freed)
{
    start(NULL);
    uintptr_t a = alloc_ok(1000), b = alloc_ok(3000);
    uintptr_t base = 0;
    size_t size = 0;
    cr_expect(gm_answer_ok(gm_lookup(b + 17, &base, &size)));
    cr_expect_eq(base, b);
    cr_expect_eq(size, 3000, "the user's size, not the block's");
    free_ok(a);
    cr_expect(gm_answer_is(gm_lookup(a + 1, &base, &size), gm_ours(GPUMEM_ERROR_INVALID_VALUE)), "freed pool memory");
    cr_expect(gm_answer_is(gm_lookup(0x10, &base, &size), gm_not_ours()));
}

Test(pool, double_free_and_interior_free_are_refused)
{
    start(NULL);
    uintptr_t a = alloc_ok(4096);
    alloc_ok(4096);
    cr_expect(gm_answer_is(gm_free(heap, a + 512, GM_FREE_BARRIER, NULL), gm_ours(GPUMEM_ERROR_INVALID_VALUE)));
    free_ok(a);
    cr_expect(gm_answer_is(gm_free(heap, a, GM_FREE_BARRIER, NULL), gm_ours(GPUMEM_ERROR_INVALID_VALUE)),
                 "a double free inside a segment must never reach the driver");
    cr_expect(gm_answer_is(gm_free(heap, 0x1000, GM_FREE_BARRIER, NULL), gm_not_ours()));
    cr_expect_eq(stats().frees, 1);
}

Test(pool, zero_and_huge_sizes)
{
    start(NULL);
    uintptr_t p = 0;
    cr_expect_eq(gm_alloc(heap, 0, 0, 0, &p), GPUMEM_ERROR_INVALID_VALUE);
    cr_expect_eq(gm_alloc(heap, SIZE_MAX, 0, 0, &p), GPUMEM_ERROR_OUT_OF_MEMORY);
    cr_expect_eq(gm_alloc(heap, SIZE_MAX - 100, 0, 0, &p), GPUMEM_ERROR_OUT_OF_MEMORY);
    cr_expect_eq(stats().bytes_reserved, 0);
}

Test(pool, pooling_off_tracks_direct_allocations)
{
    static const char *const env[] = {"GPUMEM_POOL", "0", "GPUMEM_LIMIT", "1MiB", NULL};
    start(env);
    uintptr_t a = alloc_ok(1000);
    cr_expect_eq(gm_host_backend_alloc_calls(), 1);
    cr_expect_eq(stats().bytes_reserved, 1000, "no pool: exactly what was asked");
    uintptr_t b = 0;
    cr_expect_eq(gm_alloc(heap, 1 * MiB, 0, 0, &b), GPUMEM_ERROR_OUT_OF_MEMORY);
    free_ok(a);
    cr_expect_eq(gm_host_backend_in_use(), 0);
    cr_expect_eq(stats().bytes_reserved, 0);
}

Test(pool, passthrough_tracking_counts_against_limit)
{
    static const char *const env[] = {"GPUMEM_LIMIT", "1MiB", NULL};
    start(env);
    cr_assert_eq(gm_track_reserve(heap, 800 * 1024), GPUMEM_OK);
    gm_track_commit(heap, 0xABC000, 800 * 1024, GM_KIND_ASYNC, 7, 0);
    cr_expect_eq(gm_track_reserve(heap, 300 * 1024), GPUMEM_ERROR_OUT_OF_MEMORY);
    gm_alloc_kind kind;
    cr_expect_eq(gm_free(heap, 0xABC000, GM_FREE_BARRIER, &kind).owner, GM_PASSTHROUGH);
    cr_expect_eq(kind, GM_KIND_ASYNC);
    cr_expect_eq(gm_untrack(heap, 0xABC000, GM_KIND_ASYNC), GM_OURS);
    cr_expect_eq(stats().bytes_reserved, 0);
    cr_expect_eq(gm_untrack(heap, 0xABC000, GM_KIND_ASYNC), GM_NOT_OURS);
}

/* A graph allocation freed while its graph may make it again: the record goes, the bytes stay
 * reserved with the caller until it hands them back. */
Test(pool, untrack_keep_reserved_leaves_the_bytes_in_the_limit)
{
    static const char *const env[] = {"GPUMEM_LIMIT", "1MiB", NULL};
    start(env);
    cr_assert_eq(gm_track_reserve(heap, 600 * 1024), GPUMEM_OK);
    gm_track_commit(heap, 0xDEF000, 600 * 1024, GM_KIND_GRAPH, 0, 0);
    int device = -1;
    size_t size = 0;
    cr_expect_eq(gm_untrack_keep_reserved(heap, 0xDEF000, GM_KIND_ASYNC, &device, &size), GM_NOT_OURS,
                 "another kind's record is not this one");
    cr_expect_eq(gm_untrack_keep_reserved(heap, 0xDEF000, GM_KIND_GRAPH, &device, &size), GM_OURS);
    cr_expect_eq(device, heap->device);
    cr_expect_eq(size, 600 * 1024);
    gpumem_stats st = stats();
    cr_expect_eq(st.bytes_requested, 0, "no longer live");
    cr_expect_eq(st.frees, 1);
    cr_expect_eq(st.bytes_reserved, 600 * 1024, "still held");
    cr_expect_eq(gm_track_reserve(heap, 600 * 1024), GPUMEM_ERROR_OUT_OF_MEMORY, "the held bytes count");
    gm_limit_unreserve(device, size);
    cr_expect_eq(stats().bytes_reserved, 0);
    cr_expect_eq(gm_track_reserve(heap, 600 * 1024), GPUMEM_OK);
    gm_track_abort(heap, 600 * 1024);
}

Test(pool, report_counts_live_allocations)
{
    start(NULL);
    alloc_ok(1000);
    alloc_ok(24);
    uintptr_t gone = alloc_ok(77);
    free_ok(gone);
    FILE *f = tmpfile();
    cr_assert_not_null(f);
    cr_expect_eq(gm_report_write(f, -1, 0, "test"), 2);
    rewind(f);
    char line[512];
    bool found = false;
    while (fgets(line, sizeof line, f))
        if (strcmp(line, "LEAK SUMMARY: 1024 bytes leaked in 2 allocations\n") == 0) found = true;
    cr_expect(found, "the summary names the requested bytes");
    fclose(f);
}

Test(pool, context_drop_forgets_and_releases)
{
    start(NULL);
    alloc_ok(4096);
    uintptr_t p = alloc_ok(20 * MiB);
    free_ok(p);
    gm_report_context(1, "test drop");
    gm_context_teardown(1, true);
    gpumem_stats st = stats();
    cr_expect_eq(st.bytes_reserved, 0);
    cr_expect_eq(st.bytes_allocated, 0);
    cr_expect_eq(gm_report_write(NULL, -1, 0, "exit"), 1, "the dropped context's leak stays reported");
    cr_expect_eq(gm_host_backend_in_use(), 2 * MiB,
                 "the cached segment went back; the live one is the context's to free");
    gm_heap *again = gm_heap_get(1, 0);
    cr_expect_eq(again, heap, "a new context with the same handle reuses the slot");
}
