/* Pinned host memory: cuMemHostAlloc/cuMemAllocHost/cuMemFreeHost (cudaHostAlloc, cudaMallocHost,
 * cudaFreeHost) and host registration. Forwarded for now; the pinned pool hooks in here. */
#include "shim.h"

CUresult cuMemAllocHost_v2(void **pp, size_t bytesize)
{
    SHIM_REQUIRE_REAL(cuMemAllocHost_v2);
    return shim_real_cuMemAllocHost_v2(pp, bytesize);
}

CUresult cuMemHostAlloc(void **pp, size_t bytesize, unsigned int flags)
{
    SHIM_REQUIRE_REAL(cuMemHostAlloc);
    return shim_real_cuMemHostAlloc(pp, bytesize, flags);
}

CUresult cuMemFreeHost(void *p)
{
    SHIM_REQUIRE_REAL(cuMemFreeHost);
    return shim_real_cuMemFreeHost(p);
}

CUresult cuMemHostRegister_v2(void *p, size_t bytesize, unsigned int flags)
{
    SHIM_REQUIRE_REAL(cuMemHostRegister_v2);
    return shim_real_cuMemHostRegister_v2(p, bytesize, flags);
}

CUresult cuMemHostUnregister(void *p)
{
    SHIM_REQUIRE_REAL(cuMemHostUnregister);
    return shim_real_cuMemHostUnregister(p);
}
