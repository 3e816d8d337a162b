/* The shim: hooks only. It resolves the real driver, routes memory calls to the manager and
 * translates results into the driver's own CUresult codes. No policy lives here. */
#ifndef GPUMEM_SHIM_H
#define GPUMEM_SHIM_H

#include <cuda.h>
/* cuda.h renames these to their newest ABI; we define every ABI the driver hands out (cudart 13
 * still asks for the primary-context calls at version 7000 and gets the first ones). */
#undef cuGetProcAddress
#undef cuCtxDestroy
#undef cuDevicePrimaryCtxRelease
#undef cuDevicePrimaryCtxReset
#undef cuIpcOpenMemHandle
#undef cuGraphAddNode

#include "gm_report.h"
#include "nvml_abi.h"

#define SHIM_EXPORT __attribute__((visibility("default")))

/* Prototypes of every hook with its exact exported name and ABI. */
SHIM_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize);
SHIM_EXPORT CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height,
                                        unsigned int element_size);
SHIM_EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr);
SHIM_EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags);
SHIM_EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream stream);
SHIM_EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream stream);
SHIM_EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                             CUstream stream);
SHIM_EXPORT CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize,
                                                  CUmemoryPool pool, CUstream stream);
SHIM_EXPORT CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream stream);
SHIM_EXPORT CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream stream);
SHIM_EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                                 const CUmemAllocationProp *prop, unsigned long long flags);
SHIM_EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle handle);
SHIM_EXPORT CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes);
SHIM_EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev);
SHIM_EXPORT CUresult cuMemGetAddressRange_v2(CUdeviceptr *pbase, size_t *psize, CUdeviceptr dptr);
SHIM_EXPORT CUresult cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr ptr);
SHIM_EXPORT CUresult cuPointerGetAttributes(unsigned int n, CUpointer_attribute *attributes,
                                            void **data, CUdeviceptr ptr);
SHIM_EXPORT CUresult cuPointerSetAttribute(const void *value, CUpointer_attribute attribute,
                                           CUdeviceptr ptr);
SHIM_EXPORT CUresult cuArrayCreate_v2(CUarray *handle, const CUDA_ARRAY_DESCRIPTOR *desc);
SHIM_EXPORT CUresult cuArray3DCreate_v2(CUarray *handle, const CUDA_ARRAY3D_DESCRIPTOR *desc);
SHIM_EXPORT CUresult cuArrayDestroy(CUarray handle);
SHIM_EXPORT CUresult cuMipmappedArrayCreate(CUmipmappedArray *handle, const CUDA_ARRAY3D_DESCRIPTOR *desc,
                                            unsigned int levels);
SHIM_EXPORT CUresult cuMipmappedArrayDestroy(CUmipmappedArray handle);
SHIM_EXPORT CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *handle, void *addr);
SHIM_EXPORT CUresult cuGraphAddMemAllocNode(CUgraphNode *node, CUgraph graph, const CUgraphNode *deps,
                                            size_t ndeps, CUDA_MEM_ALLOC_NODE_PARAMS *params);
SHIM_EXPORT CUresult cuGraphAddMemFreeNode(CUgraphNode *node, CUgraph graph, const CUgraphNode *deps,
                                           size_t ndeps, CUdeviceptr dptr);
/* cuGraphAddNode: the CUDA 12.2 ABI; cuGraphAddNode_v2 (12.3, edge data) is what cuda.h 13 names. */
SHIM_EXPORT CUresult cuGraphAddNode(CUgraphNode *node, CUgraph graph, const CUgraphNode *deps, size_t ndeps,
                                    CUgraphNodeParams *params);
SHIM_EXPORT CUresult cuGraphAddNode_v2(CUgraphNode *node, CUgraph graph, const CUgraphNode *deps,
                                       const CUgraphEdgeData *edges, size_t ndeps, CUgraphNodeParams *params);
SHIM_EXPORT CUresult cuGraphDestroy(CUgraph graph);
SHIM_EXPORT CUresult cuGraphInstantiateWithFlags(CUgraphExec *exec, CUgraph graph, unsigned long long flags);
SHIM_EXPORT CUresult cuGraphInstantiateWithParams(CUgraphExec *exec, CUgraph graph,
                                                  CUDA_GRAPH_INSTANTIATE_PARAMS *params);
SHIM_EXPORT CUresult cuGraphInstantiateWithParams_ptsz(CUgraphExec *exec, CUgraph graph,
                                                       CUDA_GRAPH_INSTANTIATE_PARAMS *params);
SHIM_EXPORT CUresult cuGraphExecDestroy(CUgraphExec exec);
SHIM_EXPORT CUresult cuGraphLaunch(CUgraphExec exec, CUstream stream);
SHIM_EXPORT CUresult cuGraphLaunch_ptsz(CUgraphExec exec, CUstream stream);

SHIM_EXPORT CUresult cuIpcGetMemHandle(CUipcMemHandle *handle, CUdeviceptr dptr);
/* cuIpcOpenMemHandle: the CUDA 4.1 ABI; cuIpcOpenMemHandle_v2 (11.0) is what cudart 13 asks for. */
SHIM_EXPORT CUresult cuIpcOpenMemHandle(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int flags);
SHIM_EXPORT CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *pdptr, CUipcMemHandle handle,
                                           unsigned int flags);
SHIM_EXPORT CUresult cuIpcCloseMemHandle(CUdeviceptr dptr);

SHIM_EXPORT CUresult cuCtxDestroy_v2(CUcontext ctx);
SHIM_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev);
SHIM_EXPORT CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev);
SHIM_EXPORT CUresult cuCtxDestroy(CUcontext ctx);
SHIM_EXPORT CUresult cuCtxEnablePeerAccess(CUcontext peer, unsigned int flags);
SHIM_EXPORT CUresult cuCtxDisablePeerAccess(CUcontext peer);
SHIM_EXPORT CUresult cuDevicePrimaryCtxRelease(CUdevice dev);
SHIM_EXPORT CUresult cuDevicePrimaryCtxReset(CUdevice dev);
SHIM_EXPORT CUresult cuStreamCreate(CUstream *stream, unsigned int flags);
SHIM_EXPORT CUresult cuStreamCreateWithPriority(CUstream *stream, unsigned int flags, int priority);
SHIM_EXPORT CUresult cuStreamDestroy_v2(CUstream stream);
SHIM_EXPORT CUresult cuStreamBeginCapture_v2(CUstream stream, CUstreamCaptureMode mode);
SHIM_EXPORT CUresult cuStreamBeginCapture_v2_ptsz(CUstream stream, CUstreamCaptureMode mode);
SHIM_EXPORT CUresult cuStreamBeginCaptureToGraph(CUstream stream, CUgraph graph,
                                                 const CUgraphNode *deps,
                                                 const CUgraphEdgeData *edge_data, size_t ndeps,
                                                 CUstreamCaptureMode mode);
SHIM_EXPORT CUresult cuStreamBeginCaptureToGraph_ptsz(CUstream stream, CUgraph graph,
                                                      const CUgraphNode *deps,
                                                      const CUgraphEdgeData *edge_data,
                                                      size_t ndeps, CUstreamCaptureMode mode);
SHIM_EXPORT CUresult cuStreamEndCapture(CUstream stream, CUgraph *graph);
SHIM_EXPORT CUresult cuStreamEndCapture_ptsz(CUstream stream, CUgraph *graph);

SHIM_EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n);
SHIM_EXPORT CUresult cuMemcpyHtoD_v2_ptds(CUdeviceptr dst, const void *src, size_t n);
SHIM_EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n);
SHIM_EXPORT CUresult cuMemcpyDtoH_v2_ptds(void *dst, CUdeviceptr src, size_t n);
SHIM_EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n);
SHIM_EXPORT CUresult cuMemcpyDtoD_v2_ptds(CUdeviceptr dst, CUdeviceptr src, size_t n);
SHIM_EXPORT CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n);
SHIM_EXPORT CUresult cuMemcpy_ptds(CUdeviceptr dst, CUdeviceptr src, size_t n);
SHIM_EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemcpyHtoDAsync_v2_ptsz(CUdeviceptr dst, const void *src, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemcpyDtoHAsync_v2_ptsz(void *dst, CUdeviceptr src, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemcpyDtoDAsync_v2_ptsz(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemcpyAsync_ptsz(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n);
SHIM_EXPORT CUresult cuMemsetD8_v2_ptds(CUdeviceptr dst, unsigned char v, size_t n);
SHIM_EXPORT CUresult cuMemsetD16_v2(CUdeviceptr dst, unsigned short v, size_t n);
SHIM_EXPORT CUresult cuMemsetD16_v2_ptds(CUdeviceptr dst, unsigned short v, size_t n);
SHIM_EXPORT CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned int v, size_t n);
SHIM_EXPORT CUresult cuMemsetD32_v2_ptds(CUdeviceptr dst, unsigned int v, size_t n);
SHIM_EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemsetD8Async_ptsz(CUdeviceptr dst, unsigned char v, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemsetD16Async(CUdeviceptr dst, unsigned short v, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemsetD16Async_ptsz(CUdeviceptr dst, unsigned short v, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int v, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemsetD32Async_ptsz(CUdeviceptr dst, unsigned int v, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemcpy2D_v2(const CUDA_MEMCPY2D *p);
SHIM_EXPORT CUresult cuMemcpy2D_v2_ptds(const CUDA_MEMCPY2D *p);
SHIM_EXPORT CUresult cuMemcpy2DUnaligned_v2(const CUDA_MEMCPY2D *p);
SHIM_EXPORT CUresult cuMemcpy2DUnaligned_v2_ptds(const CUDA_MEMCPY2D *p);
SHIM_EXPORT CUresult cuMemcpy2DAsync_v2(const CUDA_MEMCPY2D *p, CUstream s);
SHIM_EXPORT CUresult cuMemcpy2DAsync_v2_ptsz(const CUDA_MEMCPY2D *p, CUstream s);
SHIM_EXPORT CUresult cuMemcpy3D_v2(const CUDA_MEMCPY3D *p);
SHIM_EXPORT CUresult cuMemcpy3D_v2_ptds(const CUDA_MEMCPY3D *p);
SHIM_EXPORT CUresult cuMemcpy3DAsync_v2(const CUDA_MEMCPY3D *p, CUstream s);
SHIM_EXPORT CUresult cuMemcpy3DAsync_v2_ptsz(const CUDA_MEMCPY3D *p, CUstream s);
SHIM_EXPORT CUresult cuMemcpy3DPeer(const CUDA_MEMCPY3D_PEER *p);
SHIM_EXPORT CUresult cuMemcpy3DPeer_ptds(const CUDA_MEMCPY3D_PEER *p);
SHIM_EXPORT CUresult cuMemcpy3DPeerAsync(const CUDA_MEMCPY3D_PEER *p, CUstream s);
SHIM_EXPORT CUresult cuMemcpy3DPeerAsync_ptsz(const CUDA_MEMCPY3D_PEER *p, CUstream s);
SHIM_EXPORT CUresult cuMemcpyPeer(CUdeviceptr dst, CUcontext dst_ctx, CUdeviceptr src, CUcontext src_ctx, size_t n);
SHIM_EXPORT CUresult cuMemcpyPeer_ptds(CUdeviceptr dst, CUcontext dst_ctx, CUdeviceptr src, CUcontext src_ctx,
                                       size_t n);
SHIM_EXPORT CUresult cuMemcpyPeerAsync(CUdeviceptr dst, CUcontext dst_ctx, CUdeviceptr src, CUcontext src_ctx,
                                       size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemcpyPeerAsync_ptsz(CUdeviceptr dst, CUcontext dst_ctx, CUdeviceptr src,
                                            CUcontext src_ctx, size_t n, CUstream s);
SHIM_EXPORT CUresult cuMemsetD2D8_v2(CUdeviceptr dst, size_t pitch, unsigned char v, size_t w, size_t h);
SHIM_EXPORT CUresult cuMemsetD2D8_v2_ptds(CUdeviceptr dst, size_t pitch, unsigned char v, size_t w, size_t h);
SHIM_EXPORT CUresult cuMemsetD2D16_v2(CUdeviceptr dst, size_t pitch, unsigned short v, size_t w, size_t h);
SHIM_EXPORT CUresult cuMemsetD2D16_v2_ptds(CUdeviceptr dst, size_t pitch, unsigned short v, size_t w, size_t h);
SHIM_EXPORT CUresult cuMemsetD2D32_v2(CUdeviceptr dst, size_t pitch, unsigned int v, size_t w, size_t h);
SHIM_EXPORT CUresult cuMemsetD2D32_v2_ptds(CUdeviceptr dst, size_t pitch, unsigned int v, size_t w, size_t h);
SHIM_EXPORT CUresult cuMemsetD2D8Async(CUdeviceptr dst, size_t pitch, unsigned char v, size_t w, size_t h,
                                       CUstream s);
SHIM_EXPORT CUresult cuMemsetD2D8Async_ptsz(CUdeviceptr dst, size_t pitch, unsigned char v, size_t w, size_t h,
                                            CUstream s);
SHIM_EXPORT CUresult cuMemsetD2D16Async(CUdeviceptr dst, size_t pitch, unsigned short v, size_t w, size_t h,
                                        CUstream s);
SHIM_EXPORT CUresult cuMemsetD2D16Async_ptsz(CUdeviceptr dst, size_t pitch, unsigned short v, size_t w,
                                             size_t h, CUstream s);
SHIM_EXPORT CUresult cuMemsetD2D32Async(CUdeviceptr dst, size_t pitch, unsigned int v, size_t w, size_t h,
                                        CUstream s);
SHIM_EXPORT CUresult cuMemsetD2D32Async_ptsz(CUdeviceptr dst, size_t pitch, unsigned int v, size_t w,
                                             size_t h, CUstream s);

SHIM_EXPORT CUresult cuMemAllocHost_v2(void **pp, size_t bytesize);
SHIM_EXPORT CUresult cuMemHostAlloc(void **pp, size_t bytesize, unsigned int flags);
SHIM_EXPORT CUresult cuMemFreeHost(void *p);
SHIM_EXPORT CUresult cuMemHostRegister_v2(void *p, size_t bytesize, unsigned int flags);
SHIM_EXPORT CUresult cuMemHostUnregister(void *p);

SHIM_EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int cuda_version,
                                      cuuint64_t flags);
SHIM_EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cuda_version,
                                         cuuint64_t flags, CUdriverProcAddressQueryResult *status);

/* NVML (hooks_nvml.c): the limit where nvidia-smi and other NVML clients look. */
SHIM_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory);
SHIM_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory);
SHIM_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int *infoCount,
                                                              nvmlProcessInfo_v1_t *infos);
SHIM_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
                                                                 nvmlProcessInfo_v2_t *infos);
SHIM_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                                 nvmlProcessInfo_t *infos);

/* shim_real_<name>: the driver's own function, NULL when this driver lacks it. */
#define SHIM_HOOK(name) extern __typeof__(name) *shim_real_##name;
#include "hooks.def"
#undef SHIM_HOOK
/* shim_real_<nvml name>: NVML's own function, resolved by shim_nvml_resolve (NULL until then,
 * and where libnvidia-ml.so.1 lacks it). */
#define SHIM_NVML_HOOK(name) extern __typeof__(name) *shim_real_##name;
#include "hooks_nvml.def"
#undef SHIM_NVML_HOOK

/* ---- resolve.c */
/* Resolves the NVML reals once (opening libnvidia-ml.so.1 if nobody has); false without NVML. */
bool shim_nvml_resolve(void);
/* A real NVML entry point by name (libnvidia-ml.so.1's own, never ours), or NULL. */
void *shim_nvml_sym(const char *name);
extern bool shim_trace; /* GPUMEM_VERBOSE=3 */
void shim_init_slow(void);
extern _Atomic bool shim_ready;
static inline void shim_init(void)
{
    if (__builtin_expect(!atomic_load_explicit(&shim_ready, memory_order_acquire), 0)) shim_init_slow();
}
#define SHIM_TRACE(...) \
    do { \
        if (__builtin_expect(shim_trace, 0)) gm_log(GM_TRACE, "trace " __VA_ARGS__); \
    } while (0)

/* A hooked entry point the driver lacks: answer as a driver without it would. */
#define SHIM_REQUIRE_REAL(name) \
    do { \
        shim_init(); \
        if (!shim_real_##name) return CUDA_ERROR_NOT_SUPPORTED; \
    } while (0)

/* ---- hooks_ctx.c */
/* True while any stream of the process is capturing a graph: allocations then pass through. */
bool shim_capture_active(void);

/* ---- hooks_mem.c */
/* The calling thread's heap, or NULL when it has no current context. */
/* The shim started and found the driver: hooks route to the engine (else they pass through). */
static inline bool shim_active(void)
{
    shim_init();
    return atomic_load_explicit(&shim_ready, memory_order_relaxed);
}

/* The heap of the calling thread's current context (created on first use); NULL without one. */
static inline gm_heap *shim_current_heap(void)
{
    uintptr_t ctx;
    int device;
    if (gm_mgr.backend->current(&ctx, &device) != CUDA_SUCCESS) return NULL;
    return gm_heap_get(ctx, device);
}

/* ---- hooks_graph.c */
/* A graph allocation of `graph` made by `call(arg)`, which writes the driver's address to *dptr:
 * reserved in the limit first (CUDA_ERROR_OUT_OF_MEMORY over it), then tracked as GM_KIND_GRAPH. */
CUresult shim_graph_alloc(gm_heap *heap, CUgraph graph, CUdeviceptr *dptr, size_t size, uintptr_t stream,
                          const gm_callsite *site, CUresult (*call)(void *), void *arg);
/* The driver accepted a free of `dptr`: a free node of `in_graph` (cuMemFreeAsync captured into it
 * included), or with `in_graph` NULL cuMemFree/cuMemFreeAsync of a graph allocation. */
void shim_graph_freed(gm_heap *hint, CUdeviceptr dptr, CUgraph in_graph);
/* True, with the graph being built, when `stream` is capturing. */
bool shim_graph_capturing(CUstream stream, bool per_thread, CUgraph *graph);
/* Stream handle as the engine should see it: 0 in a _ptsz entry point is the per-thread stream. */
static inline uintptr_t shim_stream(CUstream s, bool per_thread)
{
    return (!s && per_thread) ? (uintptr_t)CU_STREAM_PER_THREAD : (uintptr_t)s;
}

#endif
