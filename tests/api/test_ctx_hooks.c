/* api_ctx_hooks: the context and stream hooks that only some programs reach. A primary context's
 * last release destroys it (cudart's cudaDeviceReset and frameworks' teardown), and the pool
 * must forget that context's segments without a driver call; a release that leaves it alive must
 * keep them. cudart 13 fetches the v1 entry points (cuCtxDestroy, cuDevicePrimaryCtxRelease and
 * Reset at version 7000): they must do what the v2 ones do. Streams made with a priority are
 * fenced in fast mode like any other; a capture into an existing graph stops pooling like a plain
 * capture. */
#include "api_test.h"
#include "fakecuda.h"

static fakecuda_counters_t counters(void)
{
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    return c;
}

typedef CUresult (*dev_fn)(CUdevice);
typedef CUresult (*ctx_fn)(CUcontext);

/* The hook the shim answers dlsym with: what a program resolving the v1 name at run time gets. */
static void *hook(const char *name)
{
    void *fn = dlsym(RTLD_DEFAULT, name);
    cr_assert(fn, "dlsym(%s)", name);
    return fn;
}

static CUdevice device0(void)
{
    CUdevice dev;
    OK(cuInit(0));
    OK(cuDeviceGet(&dev, 0));
    return dev;
}

/* Retains the primary context `times` times, makes it current, and takes one pool segment. */
static CUdeviceptr primary_with_block(CUdevice dev, int times)
{
    CUcontext ctx;
    for (int i = 0; i < times; i++)
        OK(cuDevicePrimaryCtxRetain(&ctx, dev));
    OK(cuCtxSetCurrent(ctx));
    CUdeviceptr p;
    OK(cuMemAlloc(&p, 4096));
    cr_assert_eq(api_stats_or_fail().segments, 1);
    return p;
}

static void release_drops_heap(dev_fn release)
{
    CUdevice dev = device0();
    primary_with_block(dev, 1);
    fakecuda_reset_counters();
    OK(release(dev));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.segments, 0, "the destroyed context's segment is forgotten");
    cr_assert_eq(st.bytes_reserved, 0);
    cr_assert_eq(counters().free_calls, 0, "no driver call for memory the driver already freed");
}

Test(ctx_hooks, last_primary_release_drops_the_heap)
{
    release_drops_heap(cuDevicePrimaryCtxRelease_v2);
}

Test(ctx_hooks, v1_primary_release_drops_the_heap)
{
    release_drops_heap((dev_fn)hook("cuDevicePrimaryCtxRelease"));
}

Test(ctx_hooks, release_that_keeps_the_context_keeps_the_heap)
{
    CUdevice dev = device0();
    CUdeviceptr p = primary_with_block(dev, 2);
    OK(cuDevicePrimaryCtxRelease_v2(dev));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.segments, 1, "the context is alive: its heap stays");
    cr_assert_eq(st.bytes_requested, 4096);
    unsigned char b[16] = {7};
    OK(cuMemcpyHtoD(p, b, sizeof b));
    OK(cuMemFree(p));
}

Test(ctx_hooks, v1_primary_reset_drops_the_heap)
{
    CUdevice dev = device0();
    primary_with_block(dev, 1);
    OK(((dev_fn)hook("cuDevicePrimaryCtxReset"))(dev));
    cr_assert_eq(api_stats_or_fail().segments, 0);
}

Test(ctx_hooks, v1_ctx_destroy_drops_the_heap)
{
    CUdevice dev = device0();
    CUcontext ctx;
    OK(cuCtxCreate(&ctx, NULL, 0, dev));
    CUdeviceptr p;
    OK(cuMemAlloc(&p, 4096));
    cr_assert_eq(api_stats_or_fail().segments, 1);
    OK(((ctx_fn)hook("cuCtxDestroy"))(ctx));
    cr_assert_eq(api_stats_or_fail().segments, 0);
}

/* Fast mode: a block freed while a kernel on a priority stream still writes it is not handed out
 * again until the fence on that stream has passed. */
Test(ctx_hooks, priority_stream_is_fenced_in_fast_mode)
{
    setenv("GPUMEM_FREE_SYNC", "0", 1);
    api_start();
    CUstream s;
    OK(cuStreamCreateWithPriority(&s, CU_STREAM_NON_BLOCKING, -1));
    CUdeviceptr x, y;
    OK(cuMemAlloc(&x, 4096));
    OK(fakecuda_launch_fill(s, x, 0xAB, 4096, 300000));
    OK(cuMemFree(x));
    OK(cuMemAlloc(&y, 4096));
    cr_assert_neq(y, x, "x was handed out while the stream still wrote it");
    OK(cuStreamSynchronize(s));
    cr_assert(api_all_bytes((void *)x, 0xAB, 4096));
    OK(cuMemFree(y));
    OK(cuStreamDestroy(s));
}

static void capture_to_graph_passes_through(bool per_thread)
{
    typedef CUresult (*begin_fn)(CUstream, CUgraph, const CUgraphNode *, const CUgraphEdgeData *,
                                 size_t, CUstreamCaptureMode);
    typedef CUresult (*end_fn)(CUstream, CUgraph *);
    begin_fn begin = (begin_fn)hook(per_thread ? "cuStreamBeginCaptureToGraph_ptsz" : "cuStreamBeginCaptureToGraph");
    end_fn end = (end_fn)hook(per_thread ? "cuStreamEndCapture_ptsz" : "cuStreamEndCapture");
    api_start();
    CUstream s;
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    CUdeviceptr warm, q;
    OK(cuMemAlloc(&warm, 4096));
    OK(cuMemFree(warm));
    fakecuda_reset_counters();
    CUgraph into;
    OK(cuGraphCreate(&into, 0));
    OK(begin(s, into, NULL, NULL, 0, CU_STREAM_CAPTURE_MODE_RELAXED));
    OK(cuMemAlloc(&q, 4096));
    cr_assert_eq(counters().alloc_calls, 1, "during capture cuMemAlloc reaches the driver");
    OK(cuMemFree(q));
    CUgraph g;
    OK(end(s, &g));
    OK(cuMemAlloc(&q, 4096));
    cr_assert_eq(counters().alloc_calls, 1, "pooled again after the capture");
    OK(cuMemFree(q));
}

Test(ctx_hooks, capture_to_graph_passes_through)
{
    capture_to_graph_passes_through(false);
}

Test(ctx_hooks, capture_to_graph_ptsz_passes_through)
{
    capture_to_graph_passes_through(true);
}

Test(ctx_hooks, capture_to_graph_bad_arguments_get_the_drivers_error)
{
    api_start();
    CUstream s;
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    ERR(cuStreamBeginCaptureToGraph(s, NULL, NULL, NULL, 0, CU_STREAM_CAPTURE_MODE_RELAXED),
        CUDA_ERROR_INVALID_VALUE);
    fakecuda_reset_counters();
    CUdeviceptr p;
    OK(cuMemAlloc(&p, 4096));
    cr_assert_eq(counters().alloc_calls, 1, "a capture that never began does not stop pooling");
    OK(cuMemAlloc(&p, 4096));
    cr_assert_eq(counters().alloc_calls, 1);
}
