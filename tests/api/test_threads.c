/* api_threads: 8 threads allocate, write, verify and free concurrently through cuMemAlloc /
 * cuMemFree on the primary context (each thread makes it current): no corruption, statistics
 * that balance, and an exit report without leaks. */
#include "api_test.h"
#include "api_threads_work.h"
#include "fakecuda.h"

static void run_and_check(int nthreads, int iters)
{
    api_worker w[8];
    char err[256];
    CUcontext ctx = api_start();
    api_run_workers(ctx, nthreads, iters, w, err, sizeof err);
    cr_assert(!err[0], "%s", err);
    unsigned long allocs = 0, frees = 0;
    for (int i = 0; i < nthreads; i++) {
        cr_assert_gt(w[i].allocs, 0, "thread %d did nothing", i);
        allocs += w[i].allocs;
        frees += w[i].frees;
    }
    cr_assert_eq(allocs, frees);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, allocs, "shim counted %llu allocations, threads made %lu",
                 (unsigned long long)st.allocations, allocs);
    cr_assert_eq(st.frees, frees);
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.bytes_allocated, 0);
    cr_assert_eq(st.pool_hits + st.pool_misses, allocs);
    cr_assert_eq(st.bytes_cached_free, st.bytes_reserved, "all reserved memory is free again");
    fakecuda_counters_t k;
    fakecuda_counters(&k);
    cr_assert_lt(k.alloc_calls * 10, allocs, "%llu driver allocations for %lu cuMemAlloc calls",
                 (unsigned long long)k.alloc_calls, allocs);
}

Test(threads, eight_threads_strict_free)
{
    run_and_check(8, 300);
}

Test(threads, eight_threads_fast_free)
{
    setenv("GPUMEM_FREE_SYNC", "0", 1);
    run_and_check(8, 300);
}

/* Threads on contexts of their own (one heap each on the same device): the device's statistics
 * add up over the heaps, and destroying a context without leaks reports nothing. */
static void *own_context_thread(void *arg)
{
    api_worker *w = arg;
    CUcontext ctx;
    if (cuCtxCreate(&ctx, NULL, 0, 0) != CUDA_SUCCESS) {
        snprintf(w->err, sizeof w->err, "cuCtxCreate failed");
        return NULL;
    }
    w->ctx = ctx;
    api_worker_main(w);
    if (!w->err[0] && cuCtxDestroy(ctx) != CUDA_SUCCESS)
        snprintf(w->err, sizeof w->err, "cuCtxDestroy failed");
    return NULL;
}

Test(threads, threads_with_their_own_contexts)
{
    pthread_t t[4];
    api_worker w[5];
    CUcontext primary = api_start();
    for (int i = 0; i < 4; i++) {
        memset(&w[i], 0, sizeof w[i]);
        w[i].id = i;
        w[i].iters = 200;
        cr_assert_eq(pthread_create(&t[i], NULL, own_context_thread, &w[i]), 0);
    }
    memset(&w[4], 0, sizeof w[4]);
    w[4].id = 4;
    w[4].iters = 200;
    w[4].ctx = primary;
    api_worker_main(&w[4]);
    unsigned long allocs = w[4].allocs;
    cr_assert(!w[4].err[0], "%s", w[4].err);
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        cr_assert(!w[i].err[0], "%s", w[i].err);
        allocs += w[i].allocs;
    }
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, allocs, "device 0 counted %llu allocations over 5 heaps, made %lu",
                 (unsigned long long)st.allocations, allocs);
    cr_assert_eq(st.frees, allocs);
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.bytes_allocated, 0);
    /* The destroyed contexts' segments went with them: only the primary's remain reserved. */
    cr_assert_eq(st.bytes_reserved, st.bytes_cached_free);
    fakecuda_counters_t k;
    fakecuda_counters(&k);
    cr_assert_eq(st.bytes_reserved, k.bytes_in_use, "reserved %llu, device holds %llu",
                 (unsigned long long)st.bytes_reserved, (unsigned long long)k.bytes_in_use);
}

Test(threads, exit_report_has_no_leaks)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", NULL};
    api_child c = api_scenario_ok("threads", env);
    ASSERT_LEAKS(c.err, 0, 0);
    api_child_free(&c);
}
