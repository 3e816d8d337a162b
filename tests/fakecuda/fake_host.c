/* fake_host.c: host memory the driver knows. Pinned allocations (cuMemAllocHost,
 * cuMemHostAlloc, cuMemFreeHost) and registered program memory (cuMemHostRegister/Unregister).
 *
 * Both are records of the allocation registry (fake_mem.c), A_HOST and A_REGISTERED, so that
 * pointer queries answer for them and copies treat them as pinned rather than pageable
 * (fake_copy.c). Neither counts against a device's capacity. */
#include "fake_internal.h"

#include <stdlib.h>

static CUresult host_alloc(void **pp, size_t size, unsigned flags)
{
    CUresult r = state_enter();
    if (r)
        return r;
    g_cnt.host_alloc_calls++;
    if (!pp || size == 0 || (flags & ~(unsigned)(CU_MEMHOSTALLOC_PORTABLE |
                                                 CU_MEMHOSTALLOC_DEVICEMAP |
                                                 CU_MEMHOSTALLOC_WRITECOMBINED)))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    fk_alloc *a = calloc(1, sizeof *a);
    void *mem = aligned_alloc(FK_SMALL_ALIGN, fk_round_up(size, FK_SMALL_ALIGN));
    if (!a || !mem) {
        free(a);
        free(mem);
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    *a = (fk_alloc){.base = (uintptr_t)mem, .size = size, .kind = A_HOST, .dev = c->dev,
                    .ctx = c, .id = g_next_id++};
    if (!mem_insert(a)) {
        free(a);
        free(mem);
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    *pp = mem;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuMemAllocHost_v2(void **pp, size_t size)
{
    return host_alloc(pp, size, 0);
}

FK_API CUresult CUDAAPI cuMemHostAlloc(void **pp, size_t size, unsigned int flags)
{
    return host_alloc(pp, size, flags);
}

FK_API CUresult CUDAAPI cuMemFreeHost(void *p)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!p) /* like free(NULL) in the real driver */
        return state_leave(CUDA_SUCCESS);
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    fk_alloc *a = mem_find_base((uintptr_t)p);
    if (!a || a->kind != A_HOST)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    mem_release(a);
    return state_leave(CUDA_SUCCESS);
}

/* Host registration: the range becomes pinned memory the driver knows (pointer queries answer
 * for it) until unregistered; its memory stays the program's. */
FK_API CUresult CUDAAPI cuMemHostRegister_v2(void *p, size_t size, unsigned int flags)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!p || size == 0 || (flags & ~(unsigned)(CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP |
                                               CU_MEMHOSTREGISTER_IOMEMORY | CU_MEMHOSTREGISTER_READ_ONLY)))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    uintptr_t base = (uintptr_t)p;
    if (mem_find(base) || mem_find(base + size - 1))
        return state_leave(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED);
    fk_alloc *a = calloc(1, sizeof *a);
    if (!a)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    *a = (fk_alloc){.base = base, .size = size, .kind = A_REGISTERED, .dev = c->dev, .ctx = c,
                    .id = g_next_id++};
    if (!mem_insert(a)) {
        free(a);
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuMemHostUnregister(void *p)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_alloc *a = p ? mem_find_base((uintptr_t)p) : NULL;
    if (!a || a->kind != A_REGISTERED)
        return state_leave(CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED);
    mem_release(a);
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ cuGetProcAddress rows */

#define HOST_PROCS(X)                                                               \
    X("cuMemAllocHost", 3020, 0, cuMemAllocHost_v2)                                 \
    X("cuMemHostAlloc", 2020, 0, cuMemHostAlloc)                                    \
    X("cuMemFreeHost", 2000, 0, cuMemFreeHost)                                      \
    X("cuMemHostRegister", 6050, 0, cuMemHostRegister_v2)                           \
    X("cuMemHostUnregister", 4000, 0, cuMemHostUnregister)
FK_PROC_TABLE(host_procs, HOST_PROCS);
