/* Allocation family: cuMemAlloc/Pitch/Free are served by the pool; managed, stream-ordered and
 * VMM allocations pass through to the driver but count against the limit and are tracked for
 * leaks; queries report the user's block, never a pool segment. */
#include <string.h>

#include "shim.h"

static inline bool shim_active(void)
{
    shim_init();
    return atomic_load_explicit(&shim_ready, memory_order_relaxed);
}

#define CALLER ((uintptr_t)__builtin_return_address(0))

gm_heap *shim_current_heap(void)
{
    uintptr_t ctx;
    int device;
    if (gm_mgr.backend->current(&ctx, &device) != CUDA_SUCCESS) return NULL;
    return gm_heap_get(ctx, device);
}

/* One line per refused free, with the caller, so a double free is found like under
 * compute-sanitizer; capped so a loop cannot flood the log. */
static void report_bad_free(const char *api, CUdeviceptr p, uintptr_t caller)
{
    static _Atomic unsigned reported;
    unsigned n = atomic_fetch_add(&reported, 1);
    if (n < 100)
        gm_log(GM_ERROR,
               "%s(%#llx): not a live allocation (double free, or a pointer inside a block); "
               "returning CUDA_ERROR_INVALID_VALUE; called from %p",
               api, (unsigned long long)p, (void *)caller);
    else if (n == 100)
        gm_log(GM_ERROR, "further invalid frees are not logged");
}

/* ------------------------------------------------------------------ pooled */

/* Pass-through with tracking (stream capture): the driver decides, we count. */
static CUresult alloc_tracked_passthrough(gm_heap *heap, CUdeviceptr *dptr, size_t size,
                                          gm_alloc_kind kind, uintptr_t stream,
                                          const gm_callsite *site,
                                          CUresult (*call)(void *), void *arg)
{
    int rc = gm_track_reserve(heap, size);
    if (rc != CUDA_SUCCESS) return (CUresult)rc;
    CUresult res = call(arg);
    if (res != CUDA_SUCCESS) {
        gm_track_abort(heap, size);
        return res;
    }
    gm_track_commit(heap, (uintptr_t)*dptr, size, kind, stream, site);
    return CUDA_SUCCESS;
}

typedef struct { CUdeviceptr *dptr; size_t size; } plain_alloc_args;

static CUresult call_real_alloc(void *arg)
{
    plain_alloc_args *a = arg;
    return shim_real_cuMemAlloc_v2(a->dptr, a->size);
}

static CUresult pooled_alloc(CUdeviceptr *dptr, size_t size, const gm_callsite *site)
{
    gm_heap *heap = shim_current_heap();
    if (!heap) return shim_real_cuMemAlloc_v2(dptr, size); /* the driver's own error */
    if (shim_capture_active()) {
        plain_alloc_args a = {dptr, size};
        return alloc_tracked_passthrough(heap, dptr, size, GM_KIND_DIRECT, 0, site,
                                         call_real_alloc, &a);
    }
    uintptr_t p = 0;
    int rc = gm_alloc(heap, size, 0, site, &p);
    if (rc == CUDA_SUCCESS) *dptr = (CUdeviceptr)p;
    return (CUresult)rc;
}

CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
{
    SHIM_REQUIRE_REAL(cuMemAlloc_v2);
    if (!shim_active() || !dptr || bytesize == 0) return shim_real_cuMemAlloc_v2(dptr, bytesize);
    SHIM_TRACE("cuMemAlloc_v2 size=%zu", bytesize);
    return pooled_alloc(dptr, bytesize, GM_CALLSITE());
}

/* Pitch: rows padded to 512 B (what the driver uses on current GPUs), then a pooled block. */
CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height,
                            unsigned int element_size)
{
    SHIM_REQUIRE_REAL(cuMemAllocPitch_v2);
    bool valid = dptr && pitch && width && height &&
                 (element_size == 4 || element_size == 8 || element_size == 16);
    if (!shim_active() || !valid) return shim_real_cuMemAllocPitch_v2(dptr, pitch, width, height, element_size);
    SHIM_TRACE("cuMemAllocPitch_v2 width=%zu height=%zu", width, height);
    size_t row = (width + GM_ALIGN - 1) & ~(size_t)(GM_ALIGN - 1);
    if (row < width || height > SIZE_MAX / row) return CUDA_ERROR_OUT_OF_MEMORY;
    CUresult rc = pooled_alloc(dptr, row * height, GM_CALLSITE());
    if (rc == CUDA_SUCCESS) *pitch = row;
    return rc;
}

CUresult cuMemFree_v2(CUdeviceptr dptr)
{
    SHIM_REQUIRE_REAL(cuMemFree_v2);
    if (!shim_active() || !dptr) return shim_real_cuMemFree_v2(dptr);
    SHIM_TRACE("cuMemFree_v2 ptr=%#llx", (unsigned long long)dptr);
    gm_heap *hint = shim_current_heap();
    gm_alloc_kind kind = GM_KIND_POOL;
    int rc = hint ? gm_free_current(hint, (uintptr_t)dptr, &kind)
                  : gm_free(NULL, (uintptr_t)dptr, GM_FREE_BARRIER, &kind);
    if (rc == GM_NOT_OURS) return shim_real_cuMemFree_v2(dptr);
    if (rc == GM_PASSTHROUGH) {
        CUresult res = shim_real_cuMemFree_v2(dptr);
        if (res == CUDA_SUCCESS) gm_untrack(hint, (uintptr_t)dptr, kind);
        return res;
    }
    if (rc == CUDA_ERROR_INVALID_VALUE) report_bad_free("cuMemFree", dptr, CALLER);
    return (CUresult)rc;
}

/* ------------------------------------------------------------------ tracked pass-through */

typedef struct { CUdeviceptr *dptr; size_t size; unsigned flags; } managed_args;

static CUresult call_real_managed(void *arg)
{
    managed_args *a = arg;
    return shim_real_cuMemAllocManaged(a->dptr, a->size, a->flags);
}

CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags)
{
    SHIM_REQUIRE_REAL(cuMemAllocManaged);
    gm_heap *heap = shim_active() && dptr && bytesize ? shim_current_heap() : NULL;
    if (!heap) return shim_real_cuMemAllocManaged(dptr, bytesize, flags);
    SHIM_TRACE("cuMemAllocManaged size=%zu", bytesize);
    managed_args a = {dptr, bytesize, flags};
    return alloc_tracked_passthrough(heap, dptr, bytesize, GM_KIND_MANAGED, 0, GM_CALLSITE(),
                                     call_real_managed, &a);
}

typedef struct {
    CUdeviceptr *dptr;
    size_t size;
    CUmemoryPool pool; /* NULL: the device's current pool (cuMemAllocAsync) */
    CUstream stream;
    bool per_thread;
} async_args;

static CUresult call_real_async(void *arg)
{
    async_args *a = arg;
    if (a->pool)
        return a->per_thread ? shim_real_cuMemAllocFromPoolAsync_ptsz(a->dptr, a->size, a->pool, a->stream)
                             : shim_real_cuMemAllocFromPoolAsync(a->dptr, a->size, a->pool, a->stream);
    return a->per_thread ? shim_real_cuMemAllocAsync_ptsz(a->dptr, a->size, a->stream)
                         : shim_real_cuMemAllocAsync(a->dptr, a->size, a->stream);
}

static CUresult alloc_async(async_args *a, const gm_callsite *site)
{
    gm_heap *heap = shim_active() && a->dptr && a->size ? shim_current_heap() : NULL;
    if (!heap) return call_real_async(a);
    SHIM_TRACE("cuMemAlloc%sAsync%s size=%zu", a->pool ? "FromPool" : "", a->per_thread ? "_ptsz" : "",
               a->size);
    return alloc_tracked_passthrough(heap, a->dptr, a->size, GM_KIND_ASYNC,
                                     shim_stream(a->stream, a->per_thread), site, call_real_async, a);
}

CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream stream)
{
    SHIM_REQUIRE_REAL(cuMemAllocAsync);
    async_args a = {dptr, bytesize, NULL, stream, false};
    return alloc_async(&a, GM_CALLSITE());
}

CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream stream)
{
    SHIM_REQUIRE_REAL(cuMemAllocAsync_ptsz);
    async_args a = {dptr, bytesize, NULL, stream, true};
    return alloc_async(&a, GM_CALLSITE());
}

CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool, CUstream stream)
{
    SHIM_REQUIRE_REAL(cuMemAllocFromPoolAsync);
    if (!pool) return shim_real_cuMemAllocFromPoolAsync(dptr, bytesize, pool, stream);
    async_args a = {dptr, bytesize, pool, stream, false};
    return alloc_async(&a, GM_CALLSITE());
}

CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                      CUstream stream)
{
    SHIM_REQUIRE_REAL(cuMemAllocFromPoolAsync_ptsz);
    if (!pool) return shim_real_cuMemAllocFromPoolAsync_ptsz(dptr, bytesize, pool, stream);
    async_args a = {dptr, bytesize, pool, stream, true};
    return alloc_async(&a, GM_CALLSITE());
}

/* A stream-ordered free of any tracked pointer: pool blocks return to the pool once the stream
 * has reached this point; stream-ordered allocations go back to the driver. */
static CUresult free_async(CUdeviceptr dptr, CUstream stream, bool per_thread, uintptr_t caller)
{
    CUresult (*real)(CUdeviceptr, CUstream) = per_thread ? shim_real_cuMemFreeAsync_ptsz : shim_real_cuMemFreeAsync;
    if (!shim_active() || !dptr) return real(dptr, stream);
    SHIM_TRACE("cuMemFreeAsync%s ptr=%#llx", per_thread ? "_ptsz" : "", (unsigned long long)dptr);
    gm_heap *hint = shim_current_heap();
    gm_alloc_kind kind = GM_KIND_POOL;
    int rc = gm_free(hint, (uintptr_t)dptr, shim_stream(stream, per_thread), &kind);
    if (rc == GM_NOT_OURS) return real(dptr, stream);
    if (rc == GM_PASSTHROUGH) {
        CUresult res = real(dptr, stream);
        if (res == CUDA_SUCCESS) gm_untrack(hint, (uintptr_t)dptr, kind);
        return res;
    }
    if (rc == CUDA_ERROR_INVALID_VALUE) report_bad_free("cuMemFreeAsync", dptr, caller);
    return (CUresult)rc;
}

CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream stream)
{
    SHIM_REQUIRE_REAL(cuMemFreeAsync);
    return free_async(dptr, stream, false, CALLER);
}

CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream stream)
{
    SHIM_REQUIRE_REAL(cuMemFreeAsync_ptsz);
    return free_async(dptr, stream, true, CALLER);
}

/* VMM: the allocation is a handle; it is tracked under the handle's value. */
CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                     const CUmemAllocationProp *prop, unsigned long long flags)
{
    SHIM_REQUIRE_REAL(cuMemCreate);
    gm_heap *heap = shim_active() && handle && size ? shim_current_heap() : NULL;
    if (!heap) return shim_real_cuMemCreate(handle, size, prop, flags);
    SHIM_TRACE("cuMemCreate size=%zu", size);
    int rc = gm_track_reserve(heap, size);
    if (rc != CUDA_SUCCESS) return (CUresult)rc;
    CUresult res = shim_real_cuMemCreate(handle, size, prop, flags);
    if (res != CUDA_SUCCESS) {
        gm_track_abort(heap, size);
        return res;
    }
    gm_track_commit(heap, (uintptr_t)*handle, size, GM_KIND_VMM, 0, GM_CALLSITE());
    return CUDA_SUCCESS;
}

CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
    SHIM_REQUIRE_REAL(cuMemRelease);
    CUresult res = shim_real_cuMemRelease(handle);
    if (res == CUDA_SUCCESS && shim_active()) {
        SHIM_TRACE("cuMemRelease handle=%#llx", (unsigned long long)handle);
        gm_untrack(shim_current_heap(), (uintptr_t)handle, GM_KIND_VMM);
    }
    return res;
}

/* ------------------------------------------------------------------ queries */

/* total = min(limit, device); free = what this process can still obtain. */
CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes)
{
    SHIM_REQUIRE_REAL(cuMemGetInfo_v2);
    CUresult res = shim_real_cuMemGetInfo_v2(free_bytes, total_bytes);
    if (res != CUDA_SUCCESS || !shim_active() || !free_bytes || !total_bytes) return res;
    gm_heap *heap = shim_current_heap();
    if (heap) gm_mem_info(heap, *free_bytes, *total_bytes, free_bytes, total_bytes);
    return res;
}

CUresult cuMemGetAddressRange_v2(CUdeviceptr *pbase, size_t *psize, CUdeviceptr dptr)
{
    SHIM_REQUIRE_REAL(cuMemGetAddressRange_v2);
    if (!shim_active()) return shim_real_cuMemGetAddressRange_v2(pbase, psize, dptr);
    uintptr_t base;
    size_t size;
    int rc = gm_lookup((uintptr_t)dptr, &base, &size);
    if (rc == GM_NOT_OURS) return shim_real_cuMemGetAddressRange_v2(pbase, psize, dptr);
    if (rc != CUDA_SUCCESS) return CUDA_ERROR_NOT_FOUND; /* freed pool memory: no allocation */
    if (pbase) *pbase = (CUdeviceptr)base;
    if (psize) *psize = size;
    return CUDA_SUCCESS;
}

/* Rewrites a range attribute for a pointer inside a live pool block. */
static CUresult patch_range_attribute(void *data, CUpointer_attribute attr, CUdeviceptr ptr)
{
    if (attr != CU_POINTER_ATTRIBUTE_RANGE_START_ADDR && attr != CU_POINTER_ATTRIBUTE_RANGE_SIZE)
        return CUDA_SUCCESS;
    uintptr_t base;
    size_t size;
    int rc = gm_lookup((uintptr_t)ptr, &base, &size);
    if (rc == GM_NOT_OURS) return CUDA_SUCCESS;
    if (rc != CUDA_SUCCESS) return CUDA_ERROR_INVALID_VALUE;
    if (attr == CU_POINTER_ATTRIBUTE_RANGE_START_ADDR) *(CUdeviceptr *)data = (CUdeviceptr)base;
    else *(size_t *)data = size;
    return CUDA_SUCCESS;
}

CUresult cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr ptr)
{
    SHIM_REQUIRE_REAL(cuPointerGetAttribute);
    CUresult res = shim_real_cuPointerGetAttribute(data, attribute, ptr);
    if (res != CUDA_SUCCESS || !data || !shim_active()) return res;
    return patch_range_attribute(data, attribute, ptr);
}

CUresult cuPointerGetAttributes(unsigned int n, CUpointer_attribute *attributes, void **data,
                                CUdeviceptr ptr)
{
    SHIM_REQUIRE_REAL(cuPointerGetAttributes);
    CUresult res = shim_real_cuPointerGetAttributes(n, attributes, data, ptr);
    if (res != CUDA_SUCCESS || !attributes || !data || !shim_active()) return res;
    for (unsigned i = 0; i < n && res == CUDA_SUCCESS; i++)
        if (data[i]) res = patch_range_attribute(data[i], attributes[i], ptr);
    return res;
}
