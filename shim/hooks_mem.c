/* Allocation family: cuMemAlloc/Pitch/Free are served by the pool; managed, stream-ordered and
 * VMM allocations pass through to the driver but count against the limit and are tracked for
 * leaks; queries report the user's block, never a pool segment. */
#include <string.h>

#include "gm_ipc.h"
#include "shim.h"

#define CALLER ((uintptr_t)__builtin_return_address(0))

/* One line per refused free, with the caller, so a double free is found like under
 * compute-sanitizer; capped so a loop cannot flood the log. */
static void report_bad_free(const char *api, CUdeviceptr p, uintptr_t caller)
{
    gm_stats_invalid_free(api, (uintptr_t)p, "", "double free, or a pointer inside a block", caller);
}

/* A pass-through allocation the driver just freed: forgotten (a graph allocation through
 * hooks_graph.c, whose graph may still hold its bytes; `in_graph`: the graph a captured
 * cuMemFreeAsync added its free node to). */
static void untrack_freed(gm_heap *hint, CUdeviceptr dptr, gm_alloc_kind kind, CUgraph in_graph)
{
    if (kind == GM_KIND_GRAPH) shim_graph_freed(hint, dptr, in_graph);
    else gm_untrack(hint, (uintptr_t)dptr, kind);
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
    gm_answer a = hint ? gm_free_current(hint, (uintptr_t)dptr, &kind)
                       : gm_free(NULL, (uintptr_t)dptr, GM_FREE_BARRIER, &kind);
    if (a.owner == GM_NOT_OURS) return shim_real_cuMemFree_v2(dptr);
    if (a.owner == GM_PASSTHROUGH) {
        CUresult res = shim_real_cuMemFree_v2(dptr);
        if (res == CUDA_SUCCESS) untrack_freed(hint, dptr, kind, NULL);
        return res;
    }
    if (a.status == CUDA_ERROR_INVALID_VALUE) report_bad_free("cuMemFree", dptr, CALLER);
    return (CUresult)a.status;
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
    uintptr_t stream = shim_stream(a->stream, a->per_thread);
    /* Captured, the driver adds an allocation node to the graph being built: a graph allocation,
     * counted as one made by cuGraphAddMemAllocNode (hooks_graph.c). */
    CUgraph graph = NULL;
    if (shim_capture_active() && shim_graph_capturing(a->stream, a->per_thread, &graph))
        return shim_graph_alloc(heap, graph, a->dptr, a->size, stream, site, call_real_async, a);
    return alloc_tracked_passthrough(heap, a->dptr, a->size, GM_KIND_ASYNC, stream, site, call_real_async, a);
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
    gm_answer a = gm_free(hint, (uintptr_t)dptr, shim_stream(stream, per_thread), &kind);
    if (a.owner == GM_NOT_OURS) return real(dptr, stream);
    if (a.owner == GM_PASSTHROUGH) {
        /* Captured, the driver adds a free node to the graph being built. */
        CUgraph graph = NULL;
        if (kind == GM_KIND_GRAPH && shim_capture_active()) shim_graph_capturing(stream, per_thread, &graph);
        CUresult res = real(dptr, stream);
        if (res == CUDA_SUCCESS) untrack_freed(hint, dptr, kind, graph);
        return res;
    }
    if (a.status == CUDA_ERROR_INVALID_VALUE) report_bad_free("cuMemFreeAsync", dptr, caller);
    return (CUresult)a.status;
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
    if (heap) gm_heap_mem_info(heap, *free_bytes, *total_bytes, free_bytes, total_bytes);
    return res;
}

/* The device's memory as the program should size itself: the limit where one is set (cudart's
 * cudaGetDeviceProperties().totalGlobalMem and so PyTorch's total_memory come from here). The
 * device handle is its ordinal, as the limit's device numbers are. */
CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    SHIM_REQUIRE_REAL(cuDeviceTotalMem_v2);
    CUresult res = shim_real_cuDeviceTotalMem_v2(bytes, dev);
    if (res == CUDA_SUCCESS && shim_active()) *bytes = (size_t)gm_device_visible_total((int)dev, *bytes);
    return res;
}

/* ------------------------------------------------------------------ allocation identity
 * A pooled block is not a driver allocation: every query that reveals allocation identity
 * answers for the block as the driver would for a separate allocation (docs/compatibility.md,
 * "Allocation identity"). Pool memory outside every live block's requested size (freed, or a
 * block's rounding slack) is memory the driver would not know; what the driver reports about the
 * physical mapping (MAPPING_*, MEMORY_BLOCK_ID) is shared by separate allocations too, so it passes
 * through. */

/* The block at `ptr`: pool memory first, then blocks imported from another process. */
static gm_answer block_identity(CUdeviceptr ptr, gm_block_identity *id)
{
    gm_answer a = gm_block_identity_get((uintptr_t)ptr, id);
    return a.owner == GM_NOT_OURS ? gm_ipc_lookup((uintptr_t)ptr, id) : a;
}

CUresult cuMemGetAddressRange_v2(CUdeviceptr *pbase, size_t *psize, CUdeviceptr dptr)
{
    SHIM_REQUIRE_REAL(cuMemGetAddressRange_v2);
    if (!shim_active()) return shim_real_cuMemGetAddressRange_v2(pbase, psize, dptr);
    gm_block_identity id;
    gm_answer a = block_identity(dptr, &id);
    if (a.owner == GM_NOT_OURS) return shim_real_cuMemGetAddressRange_v2(pbase, psize, dptr);
    if (a.status != CUDA_SUCCESS) return CUDA_ERROR_NOT_FOUND; /* no allocation there */
    if (pbase) *pbase = (CUdeviceptr)id.base;
    if (psize) *psize = id.size;
    return CUDA_SUCCESS;
}

/* The block's own answer for an attribute that tells allocations apart; false: ask the driver
 * (its answer for the segment is its answer for a separate allocation there). Imported blocks
 * keep the driver's SYNC_MEMOPS: the flag is the mapping's. */
static bool block_attribute(void *data, CUpointer_attribute attr, const gm_block_identity *id,
                            bool pooled)
{
    switch (attr) {
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR: *(CUdeviceptr *)data = (CUdeviceptr)id->base; return true;
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE: *(size_t *)data = id->size; return true;
    case CU_POINTER_ATTRIBUTE_BUFFER_ID: *(unsigned long long *)data = id->buffer_id; return true;
    case CU_POINTER_ATTRIBUTE_SYNC_MEMOPS:
        if (!pooled) return false;
        *(unsigned *)data = id->sync_memops;
        return true;
    default: return false;
    }
}

CUresult cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr ptr)
{
    SHIM_REQUIRE_REAL(cuPointerGetAttribute);
    if (!data || !shim_active()) return shim_real_cuPointerGetAttribute(data, attribute, ptr);
    gm_block_identity id;
    gm_answer a = gm_block_identity_get((uintptr_t)ptr, &id);
    bool pooled = a.owner == GM_OURS;
    if (!pooled) a = gm_ipc_lookup((uintptr_t)ptr, &id);
    if (a.owner == GM_NOT_OURS) return shim_real_cuPointerGetAttribute(data, attribute, ptr);
    if (a.status != CUDA_SUCCESS) return CUDA_ERROR_INVALID_VALUE; /* every attribute, as the driver */
    if (block_attribute(data, attribute, &id, pooled)) return CUDA_SUCCESS;
    return shim_real_cuPointerGetAttribute(data, attribute, ptr);
}

/* What the driver writes for a pointer it does not know (it returns CUDA_SUCCESS). */
static void attribute_unknown(void *data, CUpointer_attribute attr)
{
    switch (attr) {
    case CU_POINTER_ATTRIBUTE_CONTEXT: *(CUcontext *)data = NULL; break;
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER: *(CUdeviceptr *)data = 0; break;
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE: break; /* the H200's driver leaves these untouched */
    case CU_POINTER_ATTRIBUTE_HOST_POINTER: *(void **)data = NULL; break;
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: *(int *)data = -2; break;
    case CU_POINTER_ATTRIBUTE_BUFFER_ID: *(unsigned long long *)data = 0; break;
    case CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE: *(CUmemoryPool *)data = NULL; break;
    default: *(unsigned *)data = 0; break;
    }
}

CUresult cuPointerGetAttributes(unsigned int n, CUpointer_attribute *attributes, void **data,
                                CUdeviceptr ptr)
{
    SHIM_REQUIRE_REAL(cuPointerGetAttributes);
    if (!n || !attributes || !data || !shim_active())
        return shim_real_cuPointerGetAttributes(n, attributes, data, ptr);
    gm_block_identity id;
    gm_answer a = gm_block_identity_get((uintptr_t)ptr, &id);
    bool pooled = a.owner == GM_OURS;
    if (!pooled) a = gm_ipc_lookup((uintptr_t)ptr, &id);
    if (a.owner == GM_NOT_OURS) return shim_real_cuPointerGetAttributes(n, attributes, data, ptr);
    for (unsigned i = 0; i < n; i++)
        if (!data[i]) return CUDA_ERROR_INVALID_VALUE;
    if (a.status != CUDA_SUCCESS) { /* freed or slack: a pointer the driver would not know */
        for (unsigned i = 0; i < n; i++) attribute_unknown(data[i], attributes[i]);
        return CUDA_SUCCESS;
    }
    CUresult res = shim_real_cuPointerGetAttributes(n, attributes, data, ptr);
    for (unsigned i = 0; i < n && res == CUDA_SUCCESS; i++)
        block_attribute(data[i], attributes[i], &id, pooled);
    return res;
}

/* SYNC_MEMOPS on a live block is set on its segment (every sync of the segment's memory becomes
 * synchronous: stronger than asked, never wrong) and remembered on the block, which answers it. */
CUresult cuPointerSetAttribute(const void *value, CUpointer_attribute attribute, CUdeviceptr ptr)
{
    SHIM_REQUIRE_REAL(cuPointerSetAttribute);
    if (!value || !shim_active()) return shim_real_cuPointerSetAttribute(value, attribute, ptr);
    gm_block_identity id;
    gm_answer a = gm_block_identity_get((uintptr_t)ptr, &id);
    if (a.owner == GM_NOT_OURS) return shim_real_cuPointerSetAttribute(value, attribute, ptr);
    if (a.status != CUDA_SUCCESS) return CUDA_ERROR_INVALID_VALUE;
    CUresult res = shim_real_cuPointerSetAttribute(value, attribute, ptr);
    if (res == CUDA_SUCCESS && attribute == CU_POINTER_ATTRIBUTE_SYNC_MEMOPS)
        gm_block_set_sync_memops((uintptr_t)ptr, *(const unsigned *)value != 0);
    return res;
}

/* cuMemAlloc memory has no allocation handle (the driver: CUDA_ERROR_INVALID_VALUE); answered
 * here so that it does not depend on how segments are backed. */
CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *handle, void *addr)
{
    SHIM_REQUIRE_REAL(cuMemRetainAllocationHandle);
    if (!shim_active()) return shim_real_cuMemRetainAllocationHandle(handle, addr);
    gm_block_identity id;
    if (gm_block_identity_get((uintptr_t)addr, &id).owner == GM_NOT_OURS)
        return shim_real_cuMemRetainAllocationHandle(handle, addr);
    return CUDA_ERROR_INVALID_VALUE;
}
