/* Unit tests of the caching pool on the host backend: splitting, coalescing, the growth-factor
 * sequence, dedicated segments, release-and-retry, cache trimming, strict and fast free modes,
 * lookups and misuse. Criterion runs each test in its own process, so every test starts with a
 * fresh manager configured by its own environment. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "freed_log.h"
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

/* The heap's pending list (thread caches off: test_tcache.c checks their fences). */
Test(pool, fast_free_waits_for_fence)
{
    static const char *const env[] = {"GPUMEM_FREE_SYNC", "0", "GPUMEM_THREAD_CACHE", "0", NULL};
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
    uint64_t waits = gm_host_backend_sync_calls() + gm_host_backend_fence_waits();
    cr_expect_eq(alloc_ok(2 * MiB - 512), a, "at the limit the pool waits for the fence instead of failing");
    cr_expect_eq(gm_host_backend_sync_calls() + gm_host_backend_fence_waits(), waits + 1, "one wait");
    cr_expect_eq(stats().fence_waits, 1, "the statistics count it");
}

static uint64_t waits_now(void) { return gm_host_backend_sync_calls() + gm_host_backend_fence_waits(); }

/* A small block may grow the pool while its fence is in flight; when that grow meets the limit,
 * the allocation synchronizes once and takes the pending block (alloc.c's wait before failing). */
Test(pool, fast_free_small_block_at_the_limit_synchronizes_once)
{
    static const char *const env[] = {"GPUMEM_FREE_SYNC", "0", "GPUMEM_LIMIT", "2MiB", NULL};
    start(env);
    gm_host_backend_set_fence_delay(1000000);
    enum { MAX = 2048 };
    static uintptr_t live[MAX];
    int n = 0;
    for (uintptr_t p = 0; n < MAX && gm_alloc(heap, 2048, 0, 0, &p) == GPUMEM_OK; n++) live[n] = p;
    cr_assert(n > 0 && n < MAX, "%d blocks of 2 KiB fill a 2 MiB limit", n);
    cr_expect_eq(stats().fence_waits, 0, "nothing was pending while it filled");
    free_ok(live[0]);
    uint64_t waits = waits_now();
    cr_expect_eq(alloc_ok(2048), live[0], "the pending block, once the context is synchronized");
    cr_expect_eq(waits_now(), waits + 1, "one wait");
    cr_expect_eq(stats().fence_waits, 1, "the statistics count it");
    for (int i = 0; i < n; i++) free_ok(live[i]);
}

/* ---- fast mode's fence batching (manager/engine/fence.c) */

/* The heap's own fences: thread caches off (tests/unit/test_tcache.c has theirs). */
static void start_fast(const char *batch, int fence_delay)
{
    const char *env[] = {"GPUMEM_FREE_SYNC", "0", "GPUMEM_FENCE_BATCH", batch, "GPUMEM_THREAD_CACHE", "0", NULL};
    start(env);
    gm_host_backend_set_fence_delay(fence_delay);
    gm_fence_set_recent_ns(UINT64_MAX / 2); /* every miss counts as part of a tight loop, however
                                             * slowly this machine runs the test */
}


/* After the loop: every block back, exact figures, nothing left over once the fences are waited. */
static void expect_all_returned(uint64_t pairs)
{
    gpumem_stats st = stats();
    cr_expect_eq(st.allocations, pairs);
    cr_expect_eq(st.frees, pairs);
    cr_expect_eq(st.bytes_allocated, 0);
    cr_expect_eq(st.bytes_requested, 0);
    pthread_mutex_lock(&heap->lock);
    gm_tcache_flush_all_locked(heap, false); /* blocks waiting in the thread's cache join the heap's */
    gm_retire_pending_locked(heap, true);
    cr_expect_eq(heap->pool.pending_bytes, 0);
    cr_expect_eq(heap->pool.pending_blocks, 0);
    pthread_mutex_unlock(&heap->lock);
    gm_release_cached(heap, 0);
    cr_expect_eq(stats().bytes_reserved, 0);
    cr_expect_eq(gm_host_backend_in_use(), 0);
}

Test(pool, fast_free_batches_fences_in_a_tight_loop)
{
    start_fast("1GiB", 0); /* fences complete at once, as on an idle device */
    enum { PAIRS = 320 };
    uint64_t records = gm_host_backend_fence_records();
    for (int i = 0; i < PAIRS; i++) free_ok(alloc_ok(1 * MiB));
    records = gm_host_backend_fence_records() - records;
    cr_expect_leq(records, PAIRS / 16 + 3, "%llu fences for %d frees: one per 16 expected",
                  (unsigned long long)records, PAIRS);
    cr_expect_geq(records, PAIRS / 16 - 1, "the freed blocks are reused, not only new memory taken");
    /* 16 blocks wait at most, one is live: 17 MiB in 2 MiB small segments */
    cr_expect_leq(stats().segments, 9, "%zu segments", (size_t)stats().segments);
    cr_expect_eq(waits_now(), 0, "an idle device is never waited for");
    cr_expect_eq(stats().fences, records, "the statistics count every fence recorded");
    cr_expect_eq(stats().fence_waits, 0);
    expect_all_returned(PAIRS);
}

/* The device is busy: fences complete only when waited for. Blocks keep being freed and
 * allocated; none may come back before a wait since its free, and the bytes waiting stay
 * within GPUMEM_FENCE_BATCH. */
Test(pool, fast_free_never_reuses_before_the_fence_and_bounds_pending_bytes)
{
    start_fast("32MiB", 1000000);
    enum { PAIRS = 400 };
    static freed_block freed[PAIRS];
    uint64_t fences_before = gm_host_backend_fence_records(), waits_before = waits_now();
    for (int i = 0; i < PAIRS; i++) {
        size_t size = (i % 3 + 1) * 256 * 1024; /* 256, 512 and 768 KiB */
        uintptr_t p = alloc_ok(size);
        expect_not_freed_since_the_last_wait(freed, i, p, size, waits_now());
        free_ok(p);
        freed[i] = (freed_block){p, size, waits_now()};
        cr_assert_leq(heap->pool.pending_bytes, 32 * MiB, "pair %d: %llu bytes wait for fences", i,
                      (unsigned long long)heap->pool.pending_bytes);
    }
    cr_expect_gt(waits_now(), 0, "past the batch the pool waited");
    cr_expect_gt(gm_host_backend_fence_records(), fences_before);
    cr_expect_leq(stats().bytes_reserved, 32 * MiB + 4 * MiB, "the pool grew for the pending blocks only");
    cr_expect_leq(gm_host_backend_fences_live(), 1, "at most one fence in flight");
    cr_expect_eq(stats().fence_waits, waits_now() - waits_before, "the statistics count every wait");
    cr_expect_eq(stats().fences, gm_host_backend_fence_records() - fences_before);
    expect_all_returned(PAIRS);
}

/* A block too large to batch is fenced at its free: when the GPU has passed that fence by the
 * time the block is wanted again, the allocation takes it without waiting, though a fence it
 * recorded itself would not have completed (the device is busy with later work). */
Test(pool, fast_free_fences_a_large_block_at_its_free)
{
    start_fast("1GiB", 0);
    free_ok(alloc_ok(1 * MiB)); /* a first pair: the heap learns its batch (64 MiB blocks batch) */
    free_ok(alloc_ok(1 * MiB));
    uintptr_t a = alloc_ok(128 * MiB);
    uint64_t records = gm_host_backend_fence_records();
    free_ok(a);
    cr_expect_eq(gm_host_backend_fence_records(), records + 1, "the large free recorded a fence");
    gm_host_backend_set_fence_delay(1000000); /* from now on the device is busy with new work */
    uint64_t waits = waits_now();
    cr_expect_eq(alloc_ok(128 * MiB), a, "the block comes back through the fence of its free");
    cr_expect_eq(waits_now(), waits, "without a wait");
    cr_expect_eq(stats().fence_waits, 0);
    /* Small blocks still batch: no fence at their frees. */
    records = gm_host_backend_fence_records();
    uintptr_t small = alloc_ok(1 * MiB);
    free_ok(small);
    cr_expect_eq(gm_host_backend_fence_records(), records, "a small free records no fence");
    free_ok(a);
    /* A fence in flight that has not completed is kept: no second one. */
    uintptr_t b = alloc_ok(256 * MiB);
    records = gm_host_backend_fence_records();
    free_ok(b);
    cr_expect_leq(gm_host_backend_fence_records(), records + 1);
    cr_expect_leq(gm_host_backend_fences_live(), 1, "at most one fence in flight");
    gm_host_backend_set_fence_delay(0);
    expect_all_returned(6);
}

/* While a stream capture is in progress a free records no fence: an event recorded on a
 * capturing stream would become a node of the program's graph. */
Test(pool, fast_free_records_no_fence_during_a_capture)
{
    start_fast("1GiB", 0);
    free_ok(alloc_ok(1 * MiB)); /* the heap learns its batch */
    free_ok(alloc_ok(1 * MiB));
    uintptr_t a = alloc_ok(128 * MiB);
    gm_capture_note(true);
    uint64_t records = gm_host_backend_fence_records();
    free_ok(a);
    cr_expect_eq(gm_host_backend_fence_records(), records, "no fence while capturing");
    gm_capture_note(false);
    a = alloc_ok(128 * MiB); /* after the capture: the miss fences, as without the change */
    uintptr_t b = alloc_ok(128 * MiB);
    records = gm_host_backend_fence_records();
    free_ok(b);
    cr_expect_eq(gm_host_backend_fence_records(), records + 1, "and a large free fences again");
    free_ok(a);
    expect_all_returned(5);
}

/* A miss during a capture (the library's own allocations do not pass through) neither records a
 * fence nor synchronizes, which would invalidate the capture: it takes new memory. */
Test(pool, fast_miss_during_a_capture_neither_fences_nor_waits)
{
    start_fast("0", 1000000); /* batch 0: outside a capture every miss fences and waits */
    uintptr_t a = alloc_ok(1 * MiB), other = alloc_ok(1 * MiB); /* the small segment is full */
    free_ok(a);
    gm_capture_note(true);
    uint64_t records = gm_host_backend_fence_records(), waits = waits_now();
    uintptr_t b = alloc_ok(1 * MiB);
    cr_expect_neq(b, a, "the pending block is not reused");
    cr_expect_eq(gm_host_backend_fence_records(), records, "no fence while capturing");
    cr_expect_eq(waits_now(), waits, "no wait while capturing");
    gm_capture_note(false);
    uintptr_t c = alloc_ok(1 * MiB); /* the other half of b's new segment */
    uintptr_t d = alloc_ok(1 * MiB); /* a miss: now it fences and waits, and takes a */
    cr_expect_eq(d, a, "after the capture the miss fences and waits again");
    cr_expect_gt(waits_now(), waits);
    free_ok(b);
    free_ok(c);
    free_ok(d);
    free_ok(other);
    gm_host_backend_set_fence_delay(0);
    expect_all_returned(5);
}

Test(pool, fast_free_batch_0_takes_no_memory_for_fences)
{
    start_fast("0", 0);
    for (int i = 0; i < 100; i++) free_ok(alloc_ok(1 * MiB));
    cr_expect_eq(stats().segments, 1, "both halves of one small segment serve the loop");
    gm_host_backend_set_fence_delay(1000000); /* busy: each miss waits for its fence */
    uint64_t waits = waits_now();
    for (int i = 0; i < 100; i++) free_ok(alloc_ok(1 * MiB));
    cr_expect_eq(stats().segments, 1);
    cr_expect_geq(waits_now() - waits, 40, "one wait per miss (two pairs)");
    expect_all_returned(200);
}

/* GPUMEM_MAX_CACHED bounds the batch: what a fence retires is not handed back at once. */
Test(pool, fast_free_batch_within_max_cached)
{
    const char *env[] = {"GPUMEM_FREE_SYNC", "0", "GPUMEM_MAX_CACHED", "2MiB", NULL};
    start(env);
    gm_fence_set_recent_ns(UINT64_MAX / 2);
    uint64_t calls = gm_host_backend_alloc_calls();
    for (int i = 0; i < 200; i++) free_ok(alloc_ok(256 * 1024));
    cr_expect_leq(gm_host_backend_alloc_calls() - calls, 1, "segments are not taken and handed back in turn");
    cr_expect_leq(stats().bytes_reserved, 2 * MiB);
    expect_all_returned(200);
}

Test(pool, fast_free_rare_misses_fence_at_once)
{
    start_fast("1GiB", 0);
    gm_fence_set_recent_ns(0); /* no miss is recent */
    for (int i = 0; i < 100; i++) free_ok(alloc_ok(1 * MiB));
    cr_expect_eq(stats().segments, 1, "no memory is taken when a fence per miss costs little");
    expect_all_returned(100);
}

Test(pool, fast_free_large_blocks_do_not_batch)
{
    start_fast("16MiB", 0); /* blocks above 1 MiB would multiply their memory for a batch */
    for (int i = 0; i < 100; i++) free_ok(alloc_ok(4 * MiB));
    cr_expect_eq(stats().segments, 1, "the 8 MiB segment serves the loop alone");
    expect_all_returned(100);
}

/* At the limit the batch is 1/64 of it, and a loop that fills the rest waits for each fence
 * instead of failing. */
/* The heap's own pending list (test_tcache.c: the same through a thread cache). */
Test(pool, fast_free_at_the_limit_waits_instead_of_failing)
{
    const char *env[] = {"GPUMEM_FREE_SYNC", "0", "GPUMEM_LIMIT", "16MiB", "GPUMEM_THREAD_CACHE", "0", NULL};
    start(env);
    gm_host_backend_set_fence_delay(1000000);
    gm_fence_set_recent_ns(UINT64_MAX / 2);
    uintptr_t big = alloc_ok(12 * MiB);
    uint64_t waits = waits_now();
    for (int i = 0; i < 100; i++) free_ok(alloc_ok(1 * MiB));
    gpumem_stats st = stats();
    cr_expect_leq(st.bytes_reserved, 16 * MiB);
    cr_expect_eq(st.limit_rejections, 0, "no allocation failed");
    cr_expect_geq(waits_now() - waits, 40, "%llu waits", (unsigned long long)(waits_now() - waits));
    free_ok(big);
    expect_all_returned(101);
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
