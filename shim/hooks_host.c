/* Pinned host memory: cuMemAllocHost/cuMemHostAlloc/cuMemFreeHost (cudaMallocHost, cudaHostAlloc,
 * cudaFreeHost) are served by the pinned pool (manager/engine/pinned.c), tracked for the leak report;
 * cuMemHostRegister/Unregister go to the driver and, when it accepts them, are recorded so
 * gm_host_is_pinned knows the range. Whatever the pool cannot judge goes to the driver, which
 * answers with its own error. */
#include "shim.h"
#include "gm_pinned.h"

/* Whether the pool takes the call. Bad arguments and a thread without a context go to the
 * driver, for its own answer. */
static bool pool_takes(void **pp, size_t size, unsigned flags, uintptr_t *ctx, int *device)
{
    return shim_active() && pp && size && !(flags & ~GM_HOSTALLOC_KNOWN) &&
           gm_mgr.backend->current(ctx, device) == CUDA_SUCCESS;
}

CUresult cuMemAllocHost_v2(void **pp, size_t bytesize)
{
    SHIM_REQUIRE_REAL(cuMemAllocHost_v2);
    uintptr_t ctx;
    int device;
    if (!pool_takes(pp, bytesize, 0, &ctx, &device)) return shim_real_cuMemAllocHost_v2(pp, bytesize);
    SHIM_TRACE("cuMemAllocHost_v2 size=%zu", bytesize);
    return (CUresult)gm_pinned_alloc(ctx, device, bytesize, 0, GM_CALLSITE(), !shim_capture_active(), pp);
}

CUresult cuMemHostAlloc(void **pp, size_t bytesize, unsigned int flags)
{
    SHIM_REQUIRE_REAL(cuMemHostAlloc);
    uintptr_t ctx;
    int device;
    if (!pool_takes(pp, bytesize, flags, &ctx, &device)) return shim_real_cuMemHostAlloc(pp, bytesize, flags);
    SHIM_TRACE("cuMemHostAlloc size=%zu flags=%#x", bytesize, flags);
    return (CUresult)gm_pinned_alloc(ctx, device, bytesize, flags, GM_CALLSITE(), !shim_capture_active(), pp);
}

CUresult cuMemFreeHost(void *p)
{
    SHIM_REQUIRE_REAL(cuMemFreeHost);
    if (!p) return CUDA_SUCCESS; /* like free(NULL) */
    if (!shim_active()) return shim_real_cuMemFreeHost(p);
    SHIM_TRACE("cuMemFreeHost ptr=%p", p);
    gm_answer a = gm_pinned_free(p, !shim_capture_active(), (uintptr_t)__builtin_return_address(0));
    return a.owner == GM_NOT_OURS ? shim_real_cuMemFreeHost(p) : (CUresult)a.status;
}

CUresult cuMemHostRegister_v2(void *p, size_t bytesize, unsigned int flags)
{
    SHIM_REQUIRE_REAL(cuMemHostRegister_v2);
    CUresult rc = shim_real_cuMemHostRegister_v2(p, bytesize, flags);
    uintptr_t ctx;
    int device;
    if (rc == CUDA_SUCCESS && shim_active() && gm_mgr.backend->current(&ctx, &device) == CUDA_SUCCESS) {
        SHIM_TRACE("cuMemHostRegister_v2 ptr=%p size=%zu", p, bytesize);
        gm_pinned_registered(ctx, device, p, bytesize);
    }
    return rc;
}

CUresult cuMemHostUnregister(void *p)
{
    SHIM_REQUIRE_REAL(cuMemHostUnregister);
    CUresult rc = shim_real_cuMemHostUnregister(p);
    if (rc == CUDA_SUCCESS && shim_active()) gm_pinned_unregistered(p);
    return rc;
}
