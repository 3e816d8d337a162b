/* misuse_args: bad arguments and calls out of order get the driver's own error codes through
 * the shim: NULL or zero-size requests, calls before cuInit, calls without a current context. */
#include <pthread.h>

#include "fakecuda.h"
#include "misuse_capture.h"

Test(misuse_args, null_pointer_and_zero_size)
{
    CUdeviceptr p = 0;
    size_t pitch;
    api_start();
    ERR(cuMemAlloc(NULL, 4096), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemAlloc(&p, 0), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemAllocManaged(NULL, 4096, CU_MEM_ATTACH_GLOBAL), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemAllocManaged(&p, 0, CU_MEM_ATTACH_GLOBAL), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemAllocAsync(NULL, 4096, 0), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemAllocAsync(&p, 0, 0), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemAllocPitch(&p, &pitch, 0, 10, 4), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemAllocPitch(&p, &pitch, 100, 10, 3), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemAllocPitch(&p, NULL, 100, 10, 4), CUDA_ERROR_INVALID_VALUE);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 0, "refused requests are not allocations");
    cr_assert_eq(st.bytes_reserved, 0);
}

Test(misuse_args, calls_before_cuInit)
{
    CUdeviceptr p = 0;
    size_t f, t, pitch;
    char buf[16];
    ERR(cuMemAlloc(&p, 4096), CUDA_ERROR_NOT_INITIALIZED);
    ERR(cuMemAllocPitch(&p, &pitch, 100, 10, 4), CUDA_ERROR_NOT_INITIALIZED);
    ERR(cuMemAllocManaged(&p, 4096, CU_MEM_ATTACH_GLOBAL), CUDA_ERROR_NOT_INITIALIZED);
    ERR(cuMemAllocAsync(&p, 4096, 0), CUDA_ERROR_NOT_INITIALIZED);
    ERR(cuMemFree((CUdeviceptr)0x10000), CUDA_ERROR_NOT_INITIALIZED);
    ERR(cuMemFreeAsync((CUdeviceptr)0x10000, 0), CUDA_ERROR_NOT_INITIALIZED);
    ERR(cuMemGetInfo(&f, &t), CUDA_ERROR_NOT_INITIALIZED);
    ERR(cuMemGetAddressRange(&p, &f, (CUdeviceptr)0x10000), CUDA_ERROR_NOT_INITIALIZED);
    ERR(cuMemcpyHtoD((CUdeviceptr)0x10000, buf, sizeof buf), CUDA_ERROR_NOT_INITIALIZED);
    ERR(cuMemcpyDtoH(buf, (CUdeviceptr)0x10000, sizeof buf), CUDA_ERROR_NOT_INITIALIZED);
    ERR(cuStreamBeginCapture((CUstream)0x10, CU_STREAM_CAPTURE_MODE_RELAXED), CUDA_ERROR_NOT_INITIALIZED);
    /* And then the process works normally. */
    api_start();
    OK(cuMemAlloc(&p, 4096));
    OK(cuMemFree(p));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 1);
}

Test(misuse_args, no_current_context)
{
    CUdeviceptr p = 0;
    size_t f, t, pitch;
    OK(cuInit(0));
    ERR(cuMemAlloc(&p, 4096), CUDA_ERROR_INVALID_CONTEXT);
    ERR(cuMemAllocPitch(&p, &pitch, 100, 10, 4), CUDA_ERROR_INVALID_CONTEXT);
    ERR(cuMemAllocManaged(&p, 4096, CU_MEM_ATTACH_GLOBAL), CUDA_ERROR_INVALID_CONTEXT);
    ERR(cuMemFree((CUdeviceptr)0x10000), CUDA_ERROR_INVALID_CONTEXT);
    ERR(cuMemGetInfo(&f, &t), CUDA_ERROR_INVALID_CONTEXT);
    ERR(cuMemGetAddressRange(&p, &f, (CUdeviceptr)0x10000), CUDA_ERROR_INVALID_CONTEXT);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 0);
}

static void *alloc_without_context(void *arg)
{
    CUdeviceptr p = 0;
    *(CUresult *)arg = cuMemAlloc(&p, 4096);
    return NULL;
}

/* A thread that never made a context current gets INVALID_CONTEXT although another thread has
 * one (a context is per thread). */
Test(misuse_args, other_thread_without_context)
{
    pthread_t t;
    CUresult r = CUDA_SUCCESS;
    CUdeviceptr p;
    api_start();
    OK(cuMemAlloc(&p, 4096));
    cr_assert_eq(pthread_create(&t, NULL, alloc_without_context, &r), 0);
    pthread_join(t, NULL);
    cr_assert_eq(r, CUDA_ERROR_INVALID_CONTEXT, "cuMemAlloc on a thread without context -> %d", r);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 1);
    OK(cuMemFree(p));
}
