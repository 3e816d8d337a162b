/* Tests of the fake CUDA driver itself (tests/fakecuda), linked directly against it, no shim.
 * The shim's tests trust these semantics, so they are pinned down here: error codes, capacity
 * and fault injection, stream order and barriers, and cuGetProcAddress agreeing with dlsym.
 * Criterion runs every test in its own process, so each starts with a fresh fake. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <criterion/criterion.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fakecuda.h"

/* cuda.h maps cuGetProcAddress to the 5-argument _v2; the fake also exports the original. */
#undef cuGetProcAddress
CUresult CUDAAPI cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion,
                                 cuuint64_t flags);

#define OK(call) cr_assert_eq((call), CUDA_SUCCESS, "%s", #call)
#define ERR(call, code) cr_assert_eq((call), (code), "%s", #call)

static CUcontext g_ctx;

/* cuInit and a current primary context, with the environment as the test set it. */
static void start(void)
{
    CUdevice dev;
    OK(cuInit(0));
    OK(cuDeviceGet(&dev, 0));
    OK(cuDevicePrimaryCtxRetain(&g_ctx, dev));
    OK(cuCtxSetCurrent(g_ctx));
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static fakecuda_counters_t counters(void)
{
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    return c;
}

static bool all_bytes(const void *p, unsigned char v, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != v)
            return false;
    return true;
}

/* ---------------------------------------------------------------- init and contexts */

Test(fakecuda, before_init)
{
    CUdeviceptr p;
    int v = 0;
    const char *s = NULL;
    ERR(cuMemAlloc(&p, 16), CUDA_ERROR_NOT_INITIALIZED);
    ERR(cuCtxSynchronize(), CUDA_ERROR_NOT_INITIALIZED);
    OK(cuDriverGetVersion(&v)); /* these work before cuInit, as in the real driver */
    cr_assert_eq(v, 13000);
    OK(cuGetErrorName(CUDA_ERROR_OUT_OF_MEMORY, &s));
    cr_assert_str_eq(s, "CUDA_ERROR_OUT_OF_MEMORY");
    OK(cuGetErrorString(CUDA_ERROR_INVALID_VALUE, &s));
    cr_assert_str_eq(s, "invalid argument");
    ERR(cuGetErrorName((CUresult)123456, &s), CUDA_ERROR_INVALID_VALUE);
    ERR(cuInit(1), CUDA_ERROR_INVALID_VALUE);
}

Test(fakecuda, no_current_context)
{
    CUdeviceptr p;
    size_t f, t;
    CUcontext c = (CUcontext)1;
    OK(cuInit(0));
    OK(cuCtxGetCurrent(&c));
    cr_assert_null(c);
    ERR(cuMemAlloc(&p, 16), CUDA_ERROR_INVALID_CONTEXT);
    ERR(cuMemGetInfo(&f, &t), CUDA_ERROR_INVALID_CONTEXT);
    ERR(cuCtxSynchronize(), CUDA_ERROR_INVALID_CONTEXT);
    ERR(cuStreamSynchronize(0), CUDA_ERROR_INVALID_CONTEXT);
    ERR(cuCtxPopCurrent(&c), CUDA_ERROR_INVALID_CONTEXT);
}

Test(fakecuda, devices_and_attributes)
{
    int n = 0, v = 0;
    char name[64];
    size_t total = 0;
    setenv("FAKECUDA_DEVICES", "3", 1);
    setenv("FAKECUDA_MEM", "64M", 1);
    OK(cuInit(0));
    OK(cuDeviceGetCount(&n));
    cr_assert_eq(n, 3);
    ERR(cuDeviceGet(&v, 3), CUDA_ERROR_INVALID_DEVICE);
    OK(cuDeviceGetName(name, sizeof name, 2));
    cr_assert_str_eq(name, "FakeCUDA Device 2");
    OK(cuDeviceTotalMem(&total, 1));
    cr_assert_eq(total, (size_t)64 << 20);
    OK(cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 0));
    cr_assert_eq(v, 9);
    OK(cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING, 0));
    cr_assert_eq(v, 1);
    OK(cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 0));
    cr_assert_gt(v, 0);
    ERR(cuDeviceGetAttribute(NULL, CU_DEVICE_ATTRIBUTE_WARP_SIZE, 0), CUDA_ERROR_INVALID_VALUE);
}

Test(fakecuda, no_device)
{
    setenv("FAKECUDA_DEVICES", "0", 1);
    ERR(cuInit(0), CUDA_ERROR_NO_DEVICE);
}

Test(fakecuda, primary_context_lifecycle)
{
    CUcontext a, b;
    CUdeviceptr p;
    unsigned flags;
    int active;
    OK(cuInit(0));
    OK(cuDevicePrimaryCtxRetain(&a, 0));
    OK(cuDevicePrimaryCtxRetain(&b, 0));
    cr_assert_eq(a, b, "the primary context handle is stable");
    OK(cuDevicePrimaryCtxGetState(0, &flags, &active));
    cr_assert_eq(active, 1);
    OK(cuCtxSetCurrent(a));
    OK(cuMemAlloc(&p, 4096));
    OK(cuDevicePrimaryCtxRelease(0));
    cr_assert_eq(counters().bytes_in_use, 4096);
    OK(cuDevicePrimaryCtxRelease(0)); /* the last reference frees its memory */
    cr_assert_eq(counters().bytes_in_use, 0);
    OK(cuDevicePrimaryCtxGetState(0, &flags, &active));
    cr_assert_eq(active, 0);
    ERR(cuMemAlloc(&p, 16), CUDA_ERROR_CONTEXT_IS_DESTROYED);
    ERR(cuDevicePrimaryCtxRelease(0), CUDA_ERROR_INVALID_CONTEXT);
    OK(cuDevicePrimaryCtxRetain(&b, 0));
    cr_assert_eq(a, b);
    OK(cuMemAlloc(&p, 16)); /* current again once retained */
    OK(cuDevicePrimaryCtxReset(0));
    cr_assert_eq(counters().bytes_in_use, 0);
}

Test(fakecuda, created_contexts_and_stack)
{
    CUcontext c1, c2, cur, popped;
    CUdevice dev;
    CUdeviceptr p;
    setenv("FAKECUDA_DEVICES", "2", 1);
    OK(cuInit(0));
    OK(cuCtxCreate(&c1, NULL, 0, 0));
    OK(cuCtxCreate(&c2, NULL, 0, 1)); /* pushed on top of c1 */
    OK(cuCtxGetDevice(&dev));
    cr_assert_eq(dev, 1);
    OK(cuMemAlloc(&p, 1000));
    OK(cuPointerGetAttribute(&dev, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, p));
    cr_assert_eq(dev, 1);
    OK(cuCtxPopCurrent(&popped));
    cr_assert_eq(popped, c2);
    OK(cuCtxGetCurrent(&cur));
    cr_assert_eq(cur, c1);
    OK(cuCtxDestroy(c2)); /* frees its memory too */
    cr_assert_eq(counters().bytes_in_use, 0);
    ERR(cuCtxDestroy(c2), CUDA_ERROR_CONTEXT_IS_DESTROYED);
    ERR(cuCtxPushCurrent(c2), CUDA_ERROR_INVALID_CONTEXT);
    ERR(cuCtxSetCurrent((CUcontext)&cur), CUDA_ERROR_INVALID_CONTEXT);
    OK(cuCtxDestroy(c1)); /* current: popped */
    OK(cuCtxGetCurrent(&cur));
    cr_assert_null(cur);
}

/* ---------------------------------------------------------------- allocation */

Test(fakecuda, alloc_free_error_codes, .init = start)
{
    CUdeviceptr p, big;
    ERR(cuMemAlloc(NULL, 16), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemAlloc(&p, 0), CUDA_ERROR_INVALID_VALUE);
    OK(cuMemAlloc(&p, 100));
    cr_assert_eq(p % 512, 0);
    memset((void *)p, 0x5A, 100); /* device memory is host memory */
    OK(cuMemAlloc(&big, (size_t)3 << 20));
    cr_assert_eq(big % ((size_t)2 << 20), 0, "2 MiB and up is 2 MiB aligned");
    ERR(cuMemFree(p + 8), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemFree(0xdead0000), CUDA_ERROR_INVALID_VALUE);
    OK(cuMemFree(0)); /* free(NULL) semantics, as in the real driver */
    OK(cuMemFree(p));
    ERR(cuMemFree(p), CUDA_ERROR_INVALID_VALUE);
    OK(cuMemFree(big));
    cr_assert_eq(counters().bytes_in_use, 0);
}

Test(fakecuda, pitch_managed_host)
{
    CUdeviceptr p, m;
    size_t pitch = 0;
    void *h;
    unsigned type = 0, managed = 0;
    start();
    OK(cuMemAllocPitch(&p, &pitch, 100, 3, 4));
    cr_assert_eq(pitch, 512);
    ERR(cuMemAllocPitch(&p, &pitch, 100, 3, 3), CUDA_ERROR_INVALID_VALUE);
    OK(cuMemAllocManaged(&m, 64, CU_MEM_ATTACH_GLOBAL));
    OK(cuPointerGetAttribute(&managed, CU_POINTER_ATTRIBUTE_IS_MANAGED, m));
    cr_assert_eq(managed, 1);
    cr_assert_eq(counters().bytes_in_use, 512 * 3 + 64);
    OK(cuMemAllocHost(&h, 256));
    OK(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)h));
    cr_assert_eq(type, CU_MEMORYTYPE_HOST);
    cr_assert_eq(counters().bytes_in_use, 512 * 3 + 64, "pinned host memory is not device memory");
    ERR(cuMemFree((CUdeviceptr)h), CUDA_ERROR_INVALID_VALUE);
    OK(cuMemFreeHost(h));
    ERR(cuMemFreeHost(h), CUDA_ERROR_INVALID_VALUE);
    OK(cuMemFreeHost(NULL));
    OK(cuMemHostAlloc(&h, 10, CU_MEMHOSTALLOC_PORTABLE));
    OK(cuMemFreeHost(h));
    cr_assert_eq(counters().host_alloc_calls, 2);
    OK(cuMemFree(p));
    OK(cuMemFree(m));
}

Test(fakecuda, capacity_and_mem_get_info)
{
    CUdeviceptr a, b;
    size_t f, t;
    setenv("FAKECUDA_MEM", "1M", 1);
    start();
    OK(cuMemAlloc(&a, 768 << 10));
    ERR(cuMemAlloc(&b, 512 << 10), CUDA_ERROR_OUT_OF_MEMORY);
    OK(cuMemGetInfo(&f, &t));
    cr_assert_eq(t, (size_t)1 << 20);
    cr_assert_eq(f, (size_t)256 << 10);
    OK(cuMemAlloc(&b, 256 << 10)); /* exactly full */
    OK(cuMemGetInfo(&f, &t));
    cr_assert_eq(f, 0);
    OK(cuMemFree(a));
    OK(cuMemFree(b));
    OK(cuMemAlloc(&a, 1 << 20));
    OK(cuMemFree(a));
}

Test(fakecuda, env_reread_by_cuinit_and_reload)
{
    size_t f, t;
    setenv("FAKECUDA_MEM", "1M", 1);
    start();
    setenv("FAKECUDA_MEM", "2M", 1);
    OK(cuInit(0));
    OK(cuMemGetInfo(&f, &t));
    cr_assert_eq(t, (size_t)2 << 20);
    setenv("FAKECUDA_MEM", "4096", 1);
    fakecuda_reload_env();
    OK(cuMemGetInfo(&f, &t));
    cr_assert_eq(t, 4096);
}

Test(fakecuda, fail_alloc_after)
{
    CUdeviceptr p[4];
    CUstream s;
    CUmemGenericAllocationHandle h;
    CUmemAllocationProp prop = {.type = CU_MEM_ALLOCATION_TYPE_PINNED,
                                .location = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = 0}};
    setenv("FAKECUDA_FAIL_ALLOC_AFTER", "2", 1);
    start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&p[0], 64));
    OK(cuMemAllocAsync(&p[1], 64, s));
    ERR(cuMemAlloc(&p[2], 64), CUDA_ERROR_OUT_OF_MEMORY);
    ERR(cuMemAllocManaged(&p[2], 64, CU_MEM_ATTACH_GLOBAL), CUDA_ERROR_OUT_OF_MEMORY);
    ERR(cuMemAllocFromPoolAsync(&p[2], 64, NULL, s), CUDA_ERROR_OUT_OF_MEMORY);
    ERR(cuMemCreate(&h, (size_t)2 << 20, &prop, 0), CUDA_ERROR_OUT_OF_MEMORY);
    OK(cuInit(0)); /* an unchanged setting does not restart the count */
    ERR(cuMemAlloc(&p[2], 64), CUDA_ERROR_OUT_OF_MEMORY);
    fakecuda_reload_env(); /* this does */
    OK(cuMemAlloc(&p[2], 64));
    OK(cuMemAlloc(&p[3], 64));
    ERR(cuMemAlloc(&p[0], 64), CUDA_ERROR_OUT_OF_MEMORY);
    cr_assert_eq(counters().alloc_calls, 10);
}

Test(fakecuda, vmm_handles, .init = start)
{
    CUmemGenericAllocationHandle h;
    size_t g = 0;
    CUmemAllocationProp prop = {.type = CU_MEM_ALLOCATION_TYPE_PINNED,
                                .location = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = 0}};
    OK(cuMemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    ERR(cuMemCreate(&h, g / 2, &prop, 0), CUDA_ERROR_INVALID_VALUE);
    OK(cuMemCreate(&h, 2 * g, &prop, 0));
    cr_assert_eq(counters().bytes_in_use, 2 * g);
    OK(cuMemRelease(h));
    ERR(cuMemRelease(h), CUDA_ERROR_INVALID_VALUE);
    cr_assert_eq(counters().bytes_in_use, 0);
}

/* ---------------------------------------------------------------- copies */

Test(fakecuda, sync_copies_and_memsets, .init = start)
{
    CUdeviceptr a, b;
    unsigned char host[256], back[256];
    uint32_t words[4];
    for (int i = 0; i < 256; i++)
        host[i] = (unsigned char)i;
    OK(cuMemAlloc(&a, 256));
    OK(cuMemAlloc(&b, 256));
    OK(cuMemcpyHtoD(a, host, 256));
    OK(cuMemcpyDtoD(b, a, 256));
    OK(cuMemcpyDtoH(back, b, 256));
    cr_assert_arr_eq(back, host, 256);
    OK(cuMemcpy((CUdeviceptr)back, a + 16, 16)); /* unified: any direction */
    cr_assert_arr_eq(back, host + 16, 16);
    OK(cuMemsetD8(a, 0x11, 256));
    cr_assert(all_bytes((void *)a, 0x11, 256));
    OK(cuMemsetD32(b, 0xdeadbeef, 4));
    memcpy(words, (void *)b, sizeof words);
    cr_assert_eq(words[3], 0xdeadbeef);
    ERR(cuMemsetD32(b + 1, 0, 1), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemcpyHtoD(a + 200, host, 100), CUDA_ERROR_INVALID_VALUE); /* runs past the end */
    ERR(cuMemcpyDtoH(back, 0x1000, 1), CUDA_ERROR_INVALID_VALUE);
    OK(cuMemcpyHtoD(a, NULL, 0));
    OK(cuMemcpyHtoD_v2_ptds(a, host, 8));
    cr_assert_eq(counters().copy_calls, 8);
}

Test(fakecuda, async_fill_runs_in_stream_order, .init = start)
{
    CUstream s;
    CUdeviceptr p;
    const size_t n = 4096;
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&p, n));
    memset((void *)p, 0, n);
    OK(fakecuda_launch_fill(s, p, 0xAB, n, 100 * 1000));
    OK(cuMemsetD8Async(p, 0xCD, n / 2, s)); /* queued behind the slow fill */
    ERR(cuStreamQuery(s), CUDA_ERROR_NOT_READY);
    OK(cuCtxSynchronize());
    OK(cuStreamQuery(s));
    cr_assert(all_bytes((void *)p, 0xCD, n / 2));
    cr_assert(all_bytes((void *)p + n / 2, 0xAB, n / 2));
    OK(cuStreamDestroy(s));
    ERR(cuStreamSynchronize(s), CUDA_ERROR_INVALID_HANDLE);
}

Test(fakecuda, sync_copy_waits_for_legacy_stream, .init = start)
{
    CUdeviceptr p;
    unsigned char back[64];
    OK(cuMemAlloc(&p, 64));
    OK(fakecuda_launch_fill(0, p, 0x77, 64, 50 * 1000));
    OK(cuMemcpyDtoH(back, p, 64)); /* ordered after the fill on stream 0 */
    cr_assert(all_bytes(back, 0x77, 64));
}

Test(fakecuda, events, .init = start)
{
    CUstream s;
    CUevent ev, idle;
    CUdeviceptr p;
    OK(cuStreamCreate(&s, 0));
    OK(cuEventCreate(&ev, 0));
    OK(cuEventCreate(&idle, 0));
    OK(cuEventQuery(idle)); /* never recorded: complete */
    OK(cuMemAlloc(&p, 512));
    OK(fakecuda_launch_fill(s, p, 0x42, 512, 100 * 1000));
    OK(cuEventRecord(ev, s));
    ERR(cuEventQuery(ev), CUDA_ERROR_NOT_READY);
    OK(cuEventSynchronize(ev));
    OK(cuEventQuery(ev));
    cr_assert(all_bytes((void *)p, 0x42, 512));
    OK(fakecuda_launch_fill(s, p, 0x43, 512, 50 * 1000));
    OK(cuEventRecord(ev, s));
    OK(cuEventDestroy(ev)); /* with a record pending: released once it runs */
    ERR(cuEventQuery(ev), CUDA_ERROR_INVALID_HANDLE);
    OK(cuStreamSynchronize(s));
    cr_assert_eq(counters().event_record_calls, 2);
    cr_assert_eq(counters().stream_sync_calls, 1);
}

Test(fakecuda, stream_wait_event, .init = start)
{
    CUstream a, b;
    CUevent ev;
    CUdeviceptr p;
    OK(cuStreamCreate(&a, 0));
    OK(cuStreamCreate(&b, CU_STREAM_NON_BLOCKING));
    OK(cuEventCreate(&ev, CU_EVENT_DISABLE_TIMING));
    OK(cuMemAlloc(&p, 256));
    OK(fakecuda_launch_fill(a, p, 1, 256, 100 * 1000));
    OK(cuEventRecord(ev, a));
    OK(cuStreamWaitEvent(b, ev, 0));
    OK(cuMemsetD8Async(p, 2, 256, b)); /* must land after a's fill */
    OK(cuCtxSynchronize());
    cr_assert(all_bytes((void *)p, 2, 256));
}

/* The barrier the shim relies on: cuMemFree waits for work on every stream of the context. */
Test(fakecuda, mem_free_waits_for_other_streams, .init = start)
{
    CUstream s;
    CUdeviceptr victim, busy;
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&victim, 64));
    OK(cuMemAlloc(&busy, 1024));
    memset((void *)busy, 0, 1024);
    double t0 = now_ms();
    OK(fakecuda_launch_fill(s, busy, 0xEE, 1024, 150 * 1000));
    OK(cuMemFree(victim));
    cr_assert_geq(now_ms() - t0, 140.0, "cuMemFree returned before the pending work ran");
    cr_assert(all_bytes((void *)busy, 0xEE, 1024));
    fakecuda_counters_t c = counters();
    cr_assert_eq(c.ctx_sync_calls, 0, "the implicit barrier is not an explicit sync call");
    cr_assert_eq(c.free_calls, 1);
}

Test(fakecuda, free_async_is_stream_ordered, .init = start)
{
    CUstream s;
    CUdeviceptr p;
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAllocAsync(&p, 4096, s));
    OK(fakecuda_launch_fill(s, p, 9, 4096, 80 * 1000));
    OK(cuMemFreeAsync(p, s));
    ERR(cuMemFreeAsync(p, s), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemFree(p), CUDA_ERROR_INVALID_VALUE);
    cr_assert_eq(counters().bytes_in_use, 4096, "released only when the stream gets there");
    OK(cuStreamSynchronize(s));
    cr_assert_eq(counters().bytes_in_use, 0);
}

/* 0 in a _ptsz entry point is this thread's own stream, not the legacy one. */
Test(fakecuda, per_thread_default_stream_is_separate, .init = start)
{
    CUdeviceptr p, q; /* two buffers: the two streams are not ordered with each other */
    OK(cuMemAlloc(&p, 64));
    OK(cuMemAlloc(&q, 64));
    OK(fakecuda_launch_fill(0, p, 1, 64, 200 * 1000));
    ERR(cuStreamQuery(0), CUDA_ERROR_NOT_READY);
    OK(cuStreamQuery_ptsz(0));
    OK(cuStreamQuery(CU_STREAM_PER_THREAD));
    ERR(cuStreamQuery_ptsz(CU_STREAM_LEGACY), CUDA_ERROR_NOT_READY);
    OK(fakecuda_launch_fill(CU_STREAM_PER_THREAD, q, 2, 64, 0));
    OK(cuStreamSynchronize_ptsz(0));
    cr_assert(all_bytes((void *)q, 2, 64));
    OK(cuCtxSynchronize()); /* covers both default streams */
    OK(cuStreamQuery(0));
    cr_assert(all_bytes((void *)p, 1, 64));
}

Test(fakecuda, capture_state, .init = start)
{
    CUstream s;
    CUstreamCaptureStatus st;
    CUgraph g = (CUgraph)1;
    CUdeviceptr p;
    OK(cuMemAlloc(&p, 64));
    OK(cuStreamCreate(&s, 0));
    ERR(cuStreamBeginCapture(0, CU_STREAM_CAPTURE_MODE_GLOBAL),
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    ERR(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL), CUDA_ERROR_ILLEGAL_STATE);
    OK(cuStreamIsCapturing(s, &st));
    cr_assert_eq(st, CU_STREAM_CAPTURE_STATUS_ACTIVE);
    ERR(cuCtxSynchronize(), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    ERR(cuMemFree(p), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    ERR(cuStreamSynchronize(s), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    OK(cuStreamEndCapture(s, &g));
    cr_assert_not_null(g, "the capture's graph (empty: captured work ran at once)");
    OK(cuGraphDestroy(g));
    ERR(cuGraphDestroy(g), CUDA_ERROR_INVALID_VALUE);
    ERR(cuStreamEndCapture(s, &g), CUDA_ERROR_ILLEGAL_STATE);
    OK(cuStreamIsCapturing_ptsz(s, &st));
    cr_assert_eq(st, CU_STREAM_CAPTURE_STATUS_NONE);
    OK(cuStreamBeginCapture_v2_ptsz(s, CU_STREAM_CAPTURE_MODE_RELAXED));
    OK(cuCtxSynchronize()); /* relaxed mode forbids nothing */
    OK(cuStreamEndCapture_ptsz(s, &g));
    OK(cuMemFree(p));
}

/* ---------------------------------------------------------------- pointer queries */

Test(fakecuda, address_range_and_attributes, .init = start)
{
    CUdeviceptr p, base = 0, start_addr = 0;
    size_t size = 0, range = 0;
    CUcontext c = NULL;
    int ord = -1;
    unsigned type = 0;
    OK(cuMemAlloc(&p, 1000));
    OK(cuMemGetAddressRange(&base, &size, p + 123));
    cr_assert_eq(base, p);
    cr_assert_eq(size, 1000);
    OK(cuMemGetAddressRange(NULL, &size, p + 999));
    ERR(cuMemGetAddressRange(&base, &size, p + 1000), CUDA_ERROR_NOT_FOUND);
    OK(cuPointerGetAttribute(&start_addr, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, p + 500));
    OK(cuPointerGetAttribute(&range, CU_POINTER_ATTRIBUTE_RANGE_SIZE, p + 500));
    OK(cuPointerGetAttribute(&c, CU_POINTER_ATTRIBUTE_CONTEXT, p + 500));
    OK(cuPointerGetAttribute(&ord, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, p + 500));
    OK(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, p + 500));
    cr_assert_eq(start_addr, p);
    cr_assert_eq(range, 1000);
    cr_assert_eq(c, g_ctx);
    cr_assert_eq(ord, 0);
    cr_assert_eq(type, CU_MEMORYTYPE_DEVICE);
    ERR(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)&type),
        CUDA_ERROR_INVALID_VALUE);
    CUpointer_attribute attrs[2] = {CU_POINTER_ATTRIBUTE_CONTEXT,
                                    CU_POINTER_ATTRIBUTE_MEMORY_TYPE};
    void *data[2] = {&c, &type};
    OK(cuPointerGetAttributes(2, attrs, data, (CUdeviceptr)&type)); /* unknown: defaults */
    cr_assert_null(c);
    cr_assert_eq(type, 0);
    OK(cuMemFree(p));
    ERR(cuMemGetAddressRange(&base, &size, p + 123), CUDA_ERROR_NOT_FOUND);
}

/* ---------------------------------------------------------------- cuGetProcAddress */

static void *lib_sym(const char *name)
{
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    cr_assert_not_null(h, "libcuda.so.1 is not loaded: %s", dlerror());
    void *f = dlsym(h, name);
    dlclose(h);
    cr_assert_not_null(f, "%s is not exported", name);
    return f;
}

static void *proc(const char *sym, int version, cuuint64_t flags)
{
    void *f = NULL;
    CUdriverProcAddressQueryResult st = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    cr_assert_eq(cuGetProcAddress_v2(sym, &f, version, flags, &st), CUDA_SUCCESS, "%s", sym);
    cr_assert_eq(st, CU_GET_PROC_ADDRESS_SUCCESS);
    return f;
}

Test(fakecuda, get_proc_address_matches_dlsym)
{
    cr_assert_eq(proc("cuMemAlloc", 13000, 0), lib_sym("cuMemAlloc_v2"));
    cr_assert_eq(proc("cuMemAlloc", 13000, CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM),
                 lib_sym("cuMemAlloc_v2"), "no _ptsz variant: the plain one");
    cr_assert_eq(proc("cuMemcpyHtoDAsync", 13000, 2), lib_sym("cuMemcpyHtoDAsync_v2_ptsz"));
    cr_assert_eq(proc("cuMemcpyHtoDAsync", 13000, 1), lib_sym("cuMemcpyHtoDAsync_v2"));
    cr_assert_eq(proc("cuMemcpyHtoD", 12000, 2), lib_sym("cuMemcpyHtoD_v2_ptds"));
    cr_assert_eq(proc("cuStreamBeginCapture", 12000, 2), lib_sym("cuStreamBeginCapture_v2_ptsz"));
    cr_assert_eq(proc("cuMemFreeAsync", 11020, 2), lib_sym("cuMemFreeAsync_ptsz"));
    cr_assert_eq(proc("cuMemGetInfo", 13000, 0), lib_sym("cuMemGetInfo_v2"));
    cr_assert_eq(proc("cuCtxCreate", 13000, 0), lib_sym("cuCtxCreate_v4"));
    cr_assert_eq(proc("cuCtxCreate", 12000, 0), lib_sym("cuCtxCreate_v3"));
    cr_assert_eq(proc("cuCtxCreate", 11000, 0), lib_sym("cuCtxCreate_v2"));
    cr_assert_eq(proc("cuCtxSynchronize", 13000, 0), lib_sym("cuCtxSynchronize_v2"));
    cr_assert_eq(proc("cuCtxSynchronize", 12080, 0), lib_sym("cuCtxSynchronize"));
    cr_assert_eq(proc("cuGetProcAddress", 12000, 0), lib_sym("cuGetProcAddress_v2"));
    cr_assert_eq(proc("cuGetProcAddress", 11080, 0), lib_sym("cuGetProcAddress"));
    cr_assert_eq(proc("cuDevicePrimaryCtxRelease", 13000, 0),
                 lib_sym("cuDevicePrimaryCtxRelease_v2"));
}

Test(fakecuda, get_proc_address_failures)
{
    void *f = (void *)1;
    CUdriverProcAddressQueryResult st = CU_GET_PROC_ADDRESS_SUCCESS;
    ERR(cuGetProcAddress_v2("cuNoSuchThing", &f, 13000, 0, &st), CUDA_ERROR_NOT_FOUND);
    cr_assert_null(f);
    cr_assert_eq(st, CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);
    ERR(cuGetProcAddress_v2("cuMemAllocAsync", &f, 11000, 0, &st), CUDA_ERROR_NOT_FOUND);
    cr_assert_eq(st, CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT);
    ERR(cuGetProcAddress_v2("cuMemAlloc", &f, 13000, 4, &st), CUDA_ERROR_INVALID_VALUE);
    ERR(cuGetProcAddress_v2(NULL, &f, 13000, 0, &st), CUDA_ERROR_INVALID_VALUE);
}

/* The old 4-argument entry point, and calling through a returned pointer. */
Test(fakecuda, get_proc_address_v1_and_call)
{
    typedef CUresult (*init_fn)(unsigned);
    typedef CUresult (*ver_fn)(int *);
    void *f = NULL;
    int v = 0;
    OK(cuGetProcAddress("cuInit", &f, 11030, 0));
    OK(((init_fn)f)(0));
    OK(cuGetProcAddress("cuDriverGetVersion", &f, 11030, 0));
    OK(((ver_fn)f)(&v));
    cr_assert_eq(v, 13000);
    ERR(cuGetProcAddress("cuNope", &f, 11030, 0), CUDA_ERROR_NOT_FOUND);
}

/* ---------------------------------------------------------------- threads */

struct worker_arg {
    CUcontext ctx;
    int id;
    int failures;
};

/* Each thread: own stream, per-thread default stream, allocations, copies, frees. */
static void *thread_body(void *p)
{
    struct worker_arg *a = p;
    unsigned char buf[1024], back[1024];
    CUstream s;
    if (cuCtxSetCurrent(a->ctx) || cuStreamCreate(&s, 0)) {
        a->failures = 1;
        return NULL;
    }
    for (int i = 0; i < 50; i++) {
        CUdeviceptr d;
        memset(buf, a->id + i, sizeof buf);
        a->failures += cuMemAlloc(&d, sizeof buf) != CUDA_SUCCESS;
        a->failures += cuMemcpyHtoDAsync(d, buf, sizeof buf, s) != CUDA_SUCCESS;
        a->failures += fakecuda_launch_fill(s, d + 512, (unsigned char)i, 512, 10) != CUDA_SUCCESS;
        a->failures += cuStreamSynchronize(s) != CUDA_SUCCESS;
        a->failures += cuMemcpyDtoHAsync_v2_ptsz(back, d, 16, CU_STREAM_PER_THREAD) != 0;
        a->failures += cuMemcpyDtoH_v2_ptds(back, d, sizeof back) != CUDA_SUCCESS;
        a->failures += back[0] != (unsigned char)(a->id + i) || back[600] != (unsigned char)i;
        a->failures += (i % 2 ? cuMemFree(d) : cuMemFreeAsync_ptsz(d, 0)) != CUDA_SUCCESS;
    }
    a->failures += cuStreamDestroy(s) != CUDA_SUCCESS;
    return NULL;
}

Test(fakecuda, threads_smoke, .init = start)
{
    enum { N = 4 };
    pthread_t t[N];
    struct worker_arg args[N];
    for (int i = 0; i < N; i++) {
        args[i] = (struct worker_arg){.ctx = g_ctx, .id = i * 10};
        cr_assert_eq(pthread_create(&t[i], NULL, thread_body, &args[i]), 0);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        cr_assert_eq(args[i].failures, 0, "thread %d", i);
    }
    OK(cuCtxSynchronize());
    cr_assert_eq(counters().bytes_in_use, 0);
    cr_assert_eq(counters().alloc_calls, N * 50);
}

Test(fakecuda, memset_d16_and_alignment, .init = start)
{
    CUdeviceptr d;
    OK(cuMemAlloc(&d, 64));
    OK(cuMemsetD16(d, 0xBEEF, 8));
    OK(cuMemsetD16Async(d + 16, 0x1234, 4, NULL));
    OK(cuCtxSynchronize());
    uint16_t h[12];
    OK(cuMemcpyDtoH(h, d, sizeof h));
    for (int i = 0; i < 8; i++) cr_assert_eq(h[i], 0xBEEF);
    for (int i = 8; i < 12; i++) cr_assert_eq(h[i], 0x1234);
    ERR(cuMemsetD16(d + 1, 0, 2), CUDA_ERROR_INVALID_VALUE); /* 2-byte aligned only */
    ERR(cuMemsetD16(d, 0, 33), CUDA_ERROR_INVALID_VALUE);    /* past the end */
    OK(cuMemFree(d));
}

Test(fakecuda, host_register, .init = start)
{
    size_t n = 8192;
    char *p = malloc(n);
    cr_assert_not_null(p);
    unsigned type = 0;
    ERR(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)p),
        CUDA_ERROR_INVALID_VALUE);
    OK(cuMemHostRegister(p, n, 0));
    OK(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(p + 100)));
    cr_assert_eq(type, CU_MEMORYTYPE_HOST);
    ERR(cuMemHostRegister(p + 4096, 16, 0), CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED);
    ERR(cuMemHostRegister(p, n, 0x80), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemHostUnregister(p + 1), CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED);
    OK(cuMemHostUnregister(p));
    ERR(cuMemHostUnregister(p), CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED);
    p[n - 1] = 1; /* still the program's memory */
    free(p);
}

/* ---------------------------------------------------------------- fork */

static atomic_bool g_hammer_stop;

/* Keeps the fake's lock busy: allocations, memsets run by the stream worker, frees. */
static void *hammer(void *arg)
{
    CUcontext ctx = arg;
    long failures = 0;
    cuCtxSetCurrent(ctx);
    while (!atomic_load(&g_hammer_stop)) {
        CUdeviceptr d;
        failures += cuMemAlloc(&d, 4096) != CUDA_SUCCESS;
        failures += cuMemsetD8Async(d, 7, 4096, NULL) != CUDA_SUCCESS;
        failures += cuMemFree(d) != CUDA_SUCCESS;
    }
    return (void *)(intptr_t)failures;
}

/* In the child: the driver answers (a lock left held by the hammer would hang here), has no
 * context from the parent, and starts afresh, workers included. Exit status: which step failed. */
static int fork_child_body(void)
{
    int v = 0, n = 0;
    CUcontext cur = (CUcontext)1, ctx;
    CUdevice dev;
    CUdeviceptr d;
    if (cuDriverGetVersion(&v) != CUDA_SUCCESS || v <= 0) return 10;
    if (cuInit(0) != CUDA_SUCCESS) return 11;
    if (cuDeviceGetCount(&n) != CUDA_SUCCESS || n < 1) return 12;
    if (cuCtxGetCurrent(&cur) != CUDA_SUCCESS || cur != NULL) return 13;
    if (cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) || cuCtxSetCurrent(ctx)) return 14;
    if (cuMemAlloc(&d, 4096)) return 15;
/* TSan lets no thread start in the child of a multi-threaded fork; under ASan a thread started
 * there hangs now and then in the sanitizer's own thread registry (its lock taken by a parent
 * thread at the fork): the normal build runs this part. */
#if !defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__)
    if (cuMemsetD8(d, 9, 4096) || cuCtxSynchronize()) return 16; /* a new stream worker */
    if (((unsigned char *)(uintptr_t)d)[4095] != 9) return 17;
#endif
    if (cuMemFree(d)) return 18;
    return 0;
}

/* Waits up to `seconds` for the child; a child still running is killed and reported hung. */
static int wait_child(pid_t pid, double seconds)
{
    int status = 0;
    for (double waited = 0; waited < seconds; waited += 0.001) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) return status;
        if (r < 0) return -1;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -2;
}

/* A fork while another thread is inside the fake must not leave the child a lock no thread will
 * release (a real driver's child simply has no usable context). */
Test(fakecuda, fork_while_another_thread_is_inside, .init = start, .timeout = 120)
{
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, hammer, g_ctx), 0);
    for (int i = 0; i < 200; i++) {
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
            alarm(5); /* belt and braces: a hung child dies even if the parent is gone */
            _exit(fork_child_body());
        }
        int status = wait_child(pid, 5.0);
        cr_assert_neq(status, -2, "fork %d: the child hung in the fake driver (deadlock)", i);
        cr_assert(WIFEXITED(status), "fork %d: the child died of signal %d%s", i,
                  WTERMSIG(status), WTERMSIG(status) == SIGALRM ? " (hung: deadlock)" : "");
        cr_assert_eq(WEXITSTATUS(status), 0, "fork %d: the child failed at step %d", i,
                     WEXITSTATUS(status));
    }
    atomic_store(&g_hammer_stop, true);
    void *failures;
    pthread_join(t, &failures);
    cr_assert_eq((intptr_t)failures, 0, "the parent's calls failed meanwhile");
    OK(cuCtxSynchronize());
}

/* Graph memory nodes, as cuda.h documents them: the address at the node's creation, live from a
 * launch until freed (a relaunch of an unfreed one fails unless AUTO_FREE_ON_LAUNCH), one free
 * node per address in all graphs, a graph's own free node keeps outside frees away, destruction
 * frees only what is not live. */
static CUDA_MEM_ALLOC_NODE_PARAMS fk_alloc_params(size_t bytes)
{
    CUDA_MEM_ALLOC_NODE_PARAMS p;
    memset(&p, 0, sizeof p);
    p.poolProps.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
    p.poolProps.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    p.bytesize = bytes;
    return p;
}

static uint64_t fk_in_use(void)
{
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    return c.bytes_in_use;
}

Test(fakecuda, graph_memory_nodes, .init = start)
{
    CUgraph g, g2;
    CUgraphNode a, b, f;
    CUgraphExec e, e2;
    OK(cuGraphCreate(&g, 0));
    ERR(cuGraphCreate(&g2, 1), CUDA_ERROR_INVALID_VALUE);
    OK(cuGraphCreate(&g2, 0));
    CUDA_MEM_ALLOC_NODE_PARAMS pa = fk_alloc_params(1 << 20), pb = fk_alloc_params(4096);
    OK(cuGraphAddMemAllocNode(&a, g, NULL, 0, &pa));
    OK(cuGraphAddMemAllocNode(&b, g, &a, 1, &pb));
    cr_assert(pa.dptr && pb.dptr && pa.dptr != pb.dptr);
    cr_assert_eq(fk_in_use(), (1 << 20) + 4096, "backed from the node's creation");
    CUDA_MEM_ALLOC_NODE_PARAMS huge = fk_alloc_params((size_t)2 << 30);
    ERR(cuGraphAddMemAllocNode(&f, g, NULL, 0, &huge), CUDA_ERROR_OUT_OF_MEMORY);
    CUDA_MEM_ALLOC_NODE_PARAMS bad = fk_alloc_params(0);
    ERR(cuGraphAddMemAllocNode(&f, g, NULL, 0, &bad), CUDA_ERROR_INVALID_VALUE);
    OK(cuGraphAddMemFreeNode(&f, g, &b, 1, pb.dptr));
    ERR(cuGraphAddMemFreeNode(&f, g, NULL, 0, pb.dptr), CUDA_ERROR_INVALID_VALUE); /* twice */
    ERR(cuGraphAddMemFreeNode(&f, g2, NULL, 0, pb.dptr), CUDA_ERROR_INVALID_VALUE); /* freed in its graph */
    ERR(cuGraphAddMemFreeNode(&f, g, NULL, 0, pa.dptr + 512), CUDA_ERROR_INVALID_VALUE); /* no node's address */
    ERR(cuMemFree(pa.dptr), CUDA_ERROR_INVALID_VALUE); /* not live before a launch */
    OK(cuGraphInstantiateWithFlags(&e, g, 0));
    ERR(cuGraphInstantiateWithFlags(&e2, g, 0), CUDA_ERROR_INVALID_VALUE); /* one instantiation */
    OK(cuGraphLaunch(e, 0));
    ERR(cuGraphLaunch(e, 0), CUDA_ERROR_INVALID_VALUE); /* a's allocation is unfreed */
    ERR(cuMemFree(pb.dptr), CUDA_ERROR_INVALID_VALUE); /* freed in its own graph */
    OK(cuMemFree(pa.dptr));
    OK(cuGraphLaunch(e, 0));
    /* A free node in another graph frees it when that graph is launched. */
    OK(cuGraphAddMemFreeNode(&f, g2, NULL, 0, pa.dptr));
    OK(cuGraphInstantiateWithFlags(&e2, g2, 0));
    OK(cuGraphLaunch(e2, 0));
    ERR(cuMemFree(pa.dptr), CUDA_ERROR_INVALID_VALUE);
    OK(cuGraphExecDestroy(e));
    ERR(cuGraphExecDestroy(e), CUDA_ERROR_INVALID_VALUE);
    OK(cuGraphDestroy(g));
    cr_assert_eq(fk_in_use(), 0, "nothing live: every address went with its node");
    OK(cuGraphExecDestroy(e2));
    OK(cuGraphDestroy(g2));
    ERR(cuGraphDestroy(g), CUDA_ERROR_INVALID_VALUE);
}

Test(fakecuda, graph_allocation_outlives_its_graph, .init = start)
{
    CUgraph g;
    CUgraphNode a, n;
    CUgraphExec e;
    OK(cuGraphCreate(&g, 0));
    CUDA_MEM_ALLOC_NODE_PARAMS p = fk_alloc_params(8192);
    OK(cuGraphAddMemAllocNode(&a, g, NULL, 0, &p));
    OK(cuGraphInstantiateWithFlags(&e, g, CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH));
    OK(cuGraphLaunch(e, 0));
    OK(cuGraphLaunch(e, 0)); /* auto free on launch */
    CUDA_MEM_ALLOC_NODE_PARAMS back;
    OK(cuGraphMemAllocNodeGetParams(a, &back));
    cr_assert_eq(back.dptr, p.dptr);
    CUgraphNodeParams empty;
    memset(&empty, 0, sizeof empty);
    empty.type = CU_GRAPH_NODE_TYPE_EMPTY;
    ERR(cuGraphAddNode(&n, g, NULL, NULL, 0, &empty), CUDA_ERROR_NOT_SUPPORTED);
    OK(cuGraphExecDestroy(e));
    OK(cuGraphDestroy(g));
    CUdeviceptr base;
    size_t size;
    OK(cuMemGetAddressRange(&base, &size, p.dptr + 100));
    cr_assert_eq(size, 8192, "live: graph destruction does not free it");
    OK(cuMemsetD8(p.dptr, 3, 8192));
    OK(cuMemFreeAsync(p.dptr, 0));
    ERR(cuMemGetAddressRange(&base, &size, p.dptr), CUDA_ERROR_NOT_FOUND);
    cr_assert_eq(fk_in_use(), 0);
}

Test(fakecuda, capture_builds_a_graph_and_answers_its_info, .init = start)
{
    CUstream s;
    CUstreamCaptureStatus st;
    CUgraph g = NULL, into, got = NULL;
    cuuint64_t id = 0;
    OK(cuStreamCreate(&s, 0));
    OK(cuStreamGetCaptureInfo(s, &st, NULL, NULL, NULL, NULL, NULL));
    cr_assert_eq(st, CU_STREAM_CAPTURE_STATUS_NONE);
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED));
    OK(cuStreamGetCaptureInfo(s, &st, &id, &g, NULL, NULL, NULL));
    cr_assert_eq(st, CU_STREAM_CAPTURE_STATUS_ACTIVE);
    cr_assert(g && id);
    OK(cuStreamEndCapture(s, &got));
    cr_assert_eq(got, g);
    OK(cuGraphCreate(&into, 0));
    ERR(cuStreamBeginCaptureToGraph(s, (CUgraph)(uintptr_t)0x1000, NULL, NULL, 0, CU_STREAM_CAPTURE_MODE_RELAXED),
        CUDA_ERROR_INVALID_VALUE);
    OK(cuStreamBeginCaptureToGraph_ptsz(s, into, NULL, NULL, 0, CU_STREAM_CAPTURE_MODE_RELAXED));
    OK(cuStreamGetCaptureInfo_v3_ptsz(s, &st, NULL, &got, NULL, NULL, NULL));
    cr_assert_eq(got, into);
    OK(cuStreamEndCapture(s, &got));
    cr_assert_eq(got, into);
    OK(cuGraphDestroy(g));
    OK(cuGraphDestroy(into));
}
