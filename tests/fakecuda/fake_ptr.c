/* fake_ptr.c: what the driver says about an address. cuMemGetAddressRange, the pointer
 * attributes (cuPointerGetAttribute(s), cuPointerSetAttribute) and cuMemRetainAllocationHandle.
 *
 * Every answer comes from the allocation registry (fake_mem.c), which holds device, managed,
 * stream-ordered, pinned, registered and IPC-mapped memory alike; where the real driver's answer
 * was measured on a GPU, the comment says so. */
#include "fake_internal.h"

FK_API CUresult CUDAAPI cuMemGetAddressRange_v2(CUdeviceptr *pbase, size_t *psize, CUdeviceptr p)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    fk_alloc *a = mem_find(p);
    if (!a)
        return state_leave(CUDA_ERROR_NOT_FOUND);
    if (pbase)
        *pbase = a->base;
    if (psize)
        *psize = a->size;
    return state_leave(CUDA_SUCCESS);
}

/* One attribute of a known allocation; booleans are written as unsigned int. */
static CUresult ptr_attr(void *data, CUpointer_attribute attr, const fk_alloc *a, CUdeviceptr p)
{
    bool host_ok = a->kind == A_HOST || a->kind == A_MANAGED || a->kind == A_REGISTERED;
    switch (attr) {
    case CU_POINTER_ATTRIBUTE_CONTEXT: *(CUcontext *)data = (CUcontext)a->ctx; break;
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
        *(unsigned *)data =
            a->kind == A_HOST || a->kind == A_REGISTERED ? CU_MEMORYTYPE_HOST : CU_MEMORYTYPE_DEVICE;
        break;
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER: *(CUdeviceptr *)data = p; break;
    case CU_POINTER_ATTRIBUTE_HOST_POINTER:
        if (!host_ok)
            return CUDA_ERROR_INVALID_VALUE;
        *(void **)data = (void *)p;
        break;
    case CU_POINTER_ATTRIBUTE_IS_MANAGED: *(unsigned *)data = a->kind == A_MANAGED; break;
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: *(int *)data = a->dev; break;
    case CU_POINTER_ATTRIBUTE_BUFFER_ID: *(unsigned long long *)data = a->id; break;
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR: *(CUdeviceptr *)data = a->base; break;
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE: *(size_t *)data = a->size; break;
    case CU_POINTER_ATTRIBUTE_MAPPED: *(unsigned *)data = 1; break;
    case CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:
        *(unsigned *)data = a->kind == A_DEVICE;
        break;
    case CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE: *(CUmemoryPool *)data = NULL; break;
    /* What the H200 answered for cuMemAlloc memory (docs/gpu-runs/identity_probe_driver.txt). */
    case CU_POINTER_ATTRIBUTE_SYNC_MEMOPS: *(unsigned *)data = a->sync_memops; break;
    case CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES: *(unsigned long long *)data = 0; break;
    case CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE:
        *(unsigned *)data = a->kind == A_DEVICE;
        break;
    case CU_POINTER_ATTRIBUTE_ACCESS_FLAGS:
        *(unsigned *)data = mem_counts_as_device(a->kind) || a->kind == A_IPC ? 3 : 0;
        break;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

FK_API CUresult CUDAAPI cuPointerGetAttribute(void *data, CUpointer_attribute attr, CUdeviceptr p)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!data)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if (attr == CU_POINTER_ATTRIBUTE_DEVICE_POINTER && (r = ctx_current(&c)))
        return state_leave(r);
    const fk_alloc *a = mem_find(p);
    if (!a)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    return state_leave(ptr_attr(data, attr, a, p));
}

/* Unknown pointers are not an error here: the documented defaults are written instead. */
static void ptr_attr_default(void *data, CUpointer_attribute attr)
{
    switch (attr) {
    case CU_POINTER_ATTRIBUTE_CONTEXT: *(CUcontext *)data = NULL; break;
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE: *(unsigned *)data = 0; break;
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER: *(CUdeviceptr *)data = 0; break;
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE: break; /* untouched, as the driver (H200, 580) does */
    case CU_POINTER_ATTRIBUTE_HOST_POINTER: *(void **)data = NULL; break;
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: *(int *)data = -2; break;
    case CU_POINTER_ATTRIBUTE_BUFFER_ID: *(unsigned long long *)data = 0; break;
    case CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE: *(CUmemoryPool *)data = NULL; break;
    default: *(unsigned *)data = 0; break;
    }
}

FK_API CUresult CUDAAPI cuPointerGetAttributes(unsigned int n, CUpointer_attribute *attrs,
                                               void **data, CUdeviceptr p)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (n == 0 || !attrs || !data)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    const fk_alloc *a = mem_find(p);
    for (unsigned i = 0; i < n; i++) {
        if (!data[i])
            return state_leave(CUDA_ERROR_INVALID_VALUE);
        if (!a || ptr_attr(data[i], attrs[i], a, p) != CUDA_SUCCESS)
            ptr_attr_default(data[i], attrs[i]);
    }
    return state_leave(CUDA_SUCCESS);
}

/* Only SYNC_MEMOPS can be set, on memory the fake knows (what the driver allows). */
FK_API CUresult CUDAAPI cuPointerSetAttribute(const void *value, CUpointer_attribute attr,
                                              CUdeviceptr p)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_alloc *a = mem_find(p);
    if (!value || !a || attr != CU_POINTER_ATTRIBUTE_SYNC_MEMOPS)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    a->sync_memops = *(const unsigned *)value != 0;
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ cuGetProcAddress rows */

#define PTR_PROCS(X)                                                                \
    X("cuMemGetAddressRange", 3020, 0, cuMemGetAddressRange_v2)                     \
    X("cuPointerGetAttribute", 4000, 0, cuPointerGetAttribute)                      \
    X("cuPointerGetAttributes", 7000, 0, cuPointerGetAttributes)                    \
    X("cuPointerSetAttribute", 6000, 0, cuPointerSetAttribute)
FK_PROC_TABLE(ptr_procs, PTR_PROCS);
