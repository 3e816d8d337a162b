/* api_capture: while a stream is being captured into a graph, cuMemAlloc must not be served from
 * the pool (the graph would capture a pointer the pool hands out again): it passes through to the
 * driver, is tracked (a leak if not freed, freed through the driver by cuMemFree), and once the
 * capture ended allocations are pooled again. */
#include "api_test.h"
#include "fakecuda.h"

static fakecuda_counters_t counters(void)
{
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    return c;
}

/* A warm pool: one segment with room, so pooled allocations need no driver call. */
static void warm_pool(void)
{
    CUdeviceptr p;
    OK(cuMemAlloc(&p, 4096));
    OK(cuMemFree(p));
}

Test(capture, allocations_during_capture_pass_through)
{
    CUstream s;
    CUgraph g;
    CUdeviceptr p, q, r;
    api_start();
    OK(cuStreamCreate(&s, 0));
    warm_pool();
    fakecuda_reset_counters();
    OK(cuMemAlloc(&p, 4096));
    cr_assert_eq(counters().alloc_calls, 0, "warm pool: no driver call");
    OK(cuMemFree(p));

    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED));
    OK(cuMemAlloc(&q, 4096));
    cr_assert_eq(counters().alloc_calls, 1, "during capture cuMemAlloc reaches the driver");
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 4096, "the captured allocation is tracked");
    cr_assert_eq(st.allocations, 3);
    CUdeviceptr base = 0;
    size_t size = 0;
    OK(cuMemGetAddressRange(&base, &size, q + 100));
    cr_assert_eq(base, q);
    cr_assert_eq(size, 4096, "a driver allocation of its own");
    OK(cuMemFree(q));
    cr_assert_eq(counters().free_calls, 1, "freed through the driver");
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.frees, 3);
    OK(cuStreamEndCapture(s, &g));

    OK(cuMemAlloc(&r, 4096));
    cr_assert_eq(counters().alloc_calls, 1, "after the capture allocations are pooled again");
    OK(cuMemFree(r));
    cr_assert_eq(counters().free_calls, 1);
}

Test(capture, captured_allocation_freed_after_the_capture)
{
    CUstream s;
    CUgraph g;
    CUdeviceptr q;
    api_start();
    OK(cuStreamCreate(&s, 0));
    warm_pool();
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED));
    fakecuda_reset_counters();
    OK(cuMemAlloc(&q, 100000));
    OK(cuStreamEndCapture(s, &g));
    OK(cuMemsetD8(q, 9, 100000));
    OK(cuMemFree(q));
    fakecuda_counters_t k = counters();
    cr_assert_eq(k.alloc_calls, 1);
    cr_assert_eq(k.free_calls, 1, "a pass-through block goes back to the driver");
    cr_assert_eq(k.bytes_in_use, (uint64_t)2 << 20, "only the warm pool segment remains");
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0);
    ERR(cuMemFree(q), CUDA_ERROR_INVALID_VALUE);
}

/* Two captures at once: pass-through until both ended. The per-thread default stream can be
 * captured too (through the _ptsz entry points, 0 naming it). */
Test(capture, nested_captures_and_the_per_thread_stream)
{
    CUstream s1, s2;
    CUgraph g;
    CUdeviceptr p[4];
    api_start();
    OK(cuStreamCreate(&s1, 0));
    OK(cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING));
    warm_pool();
    fakecuda_reset_counters();
    OK(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_RELAXED));
    OK(cuStreamBeginCapture_v2_ptsz(0, CU_STREAM_CAPTURE_MODE_RELAXED));
    OK(cuStreamBeginCapture(s2, CU_STREAM_CAPTURE_MODE_RELAXED));
    OK(cuMemAlloc(&p[0], 512));
    cr_assert_eq(counters().alloc_calls, 1);
    OK(cuStreamEndCapture(s1, &g));
    OK(cuMemAlloc(&p[1], 512));
    cr_assert_eq(counters().alloc_calls, 2, "s2 and the per-thread stream still capture");
    OK(cuStreamEndCapture_ptsz(0, &g));
    OK(cuMemAlloc(&p[2], 512));
    cr_assert_eq(counters().alloc_calls, 3, "s2 still captures");
    OK(cuStreamEndCapture(s2, &g));
    OK(cuMemAlloc(&p[3], 512));
    cr_assert_eq(counters().alloc_calls, 3, "no capture left: pooled");
    /* A capture the driver refused (the legacy stream cannot be captured) changes nothing. */
    ERR(cuStreamBeginCapture(0, CU_STREAM_CAPTURE_MODE_RELAXED), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    CUdeviceptr extra;
    OK(cuMemAlloc(&extra, 512));
    cr_assert_eq(counters().alloc_calls, 3, "a refused capture must not turn pooling off");
    OK(cuMemFree(extra));
    for (int i = 0; i < 4; i++)
        OK(cuMemFree(p[i]));
    cr_assert_eq(counters().free_calls, 3);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0);
}

Test(capture, captured_leak_is_reported)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", NULL};
    api_child c = api_scenario_ok("capture_leak", env);
    ASSERT_LEAKS(c.err, 4096, 1);
    api_child_free(&c);
}
