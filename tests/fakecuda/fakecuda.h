/* The fake CUDA driver (tests/fakecuda/fake_*.c, built as libcuda.so.1; fake_internal.h says
 * which file holds what): declarations of its per-thread-default-stream entry points, and its
 * test-only entry points (fake_testapi.c), which let a test stand in for a GPU kernel, read the
 * fake's call counters and re-read its environment knobs. This is the header tests include.
 *
 * Environment (read by cuInit on every call and by fakecuda_reload_env):
 *   FAKECUDA_MEM               capacity per device in bytes, K/M/G suffixes allowed (default 1G)
 *   FAKECUDA_DEVICES           device count, 0..8 (default 1; 0 makes cuInit fail NO_DEVICE)
 *   FAKECUDA_FAIL_ALLOC_AFTER  N: the first N device allocations may succeed, every later one
 *                              returns CUDA_ERROR_OUT_OF_MEMORY (unset or negative: never)
 *   FAKECUDA_FAIL_MAP_AFTER    N: the first N cuMemMap calls may succeed, every later one returns
 *                              CUDA_ERROR_OUT_OF_MEMORY (unset or negative: never)
 *   FAKECUDA_NO_VMM            1: CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED is 0
 *   FAKECUDA_VISIBLE           comma list of physical device numbers, ordinal i being the i-th
 *                              (as CUDA_VISIBLE_DEVICES renumbers a real host; default 0,1,...):
 *                              only the UUIDs follow it, so tests can key devices by UUID */
#ifndef FAKECUDA_H
#define FAKECUDA_H

#include <stddef.h>
#include <stdint.h>

#include <cuda.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The UUID of physical fake device `physical` (cuDeviceGetUuid; the fake NVML answers the same). */
static inline void fakecuda_uuid_of_physical(int physical, unsigned char uuid[16])
{
    static const char stem[12] = {'f', 'a', 'k', 'e', 'c', 'u', 'd', 'a', '-', 'g', 'p', 'u'};
    for (int i = 0; i < 12; i++) uuid[i] = (unsigned char)stem[i];
    uuid[12] = uuid[13] = uuid[14] = 0;
    uuid[15] = (unsigned char)physical;
}

/* The per-thread-default-stream entry points the fake exports. cuda.h declares them only when
 * CUDA_API_PER_THREAD_DEFAULT_STREAM is defined (and then renames the plain calls to them);
 * these declarations let a test call both variants from one file. */
CUresult CUDAAPI cuMemcpyHtoD_v2_ptds(CUdeviceptr dst, const void *src, size_t n);
CUresult CUDAAPI cuMemcpyDtoH_v2_ptds(void *dst, CUdeviceptr src, size_t n);
CUresult CUDAAPI cuMemcpyDtoD_v2_ptds(CUdeviceptr dst, CUdeviceptr src, size_t n);
CUresult CUDAAPI cuMemcpy_ptds(CUdeviceptr dst, CUdeviceptr src, size_t n);
CUresult CUDAAPI cuMemcpyHtoDAsync_v2_ptsz(CUdeviceptr dst, const void *src, size_t n, CUstream s);
CUresult CUDAAPI cuMemcpyDtoHAsync_v2_ptsz(void *dst, CUdeviceptr src, size_t n, CUstream s);
CUresult CUDAAPI cuMemcpyDtoDAsync_v2_ptsz(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s);
CUresult CUDAAPI cuMemcpyAsync_ptsz(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s);
CUresult CUDAAPI cuMemsetD8_v2_ptds(CUdeviceptr dst, unsigned char uc, size_t n);
CUresult CUDAAPI cuMemsetD16_v2_ptds(CUdeviceptr dst, unsigned short us, size_t n);
CUresult CUDAAPI cuMemsetD16Async_ptsz(CUdeviceptr dst, unsigned short us, size_t n, CUstream s);
CUresult CUDAAPI cuMemsetD32_v2_ptds(CUdeviceptr dst, unsigned int ui, size_t n);
CUresult CUDAAPI cuMemsetD8Async_ptsz(CUdeviceptr dst, unsigned char uc, size_t n, CUstream s);
CUresult CUDAAPI cuMemsetD32Async_ptsz(CUdeviceptr dst, unsigned int ui, size_t n, CUstream s);
CUresult CUDAAPI cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t n, CUstream s);
CUresult CUDAAPI cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t n, CUmemoryPool pool,
                                              CUstream s);
CUresult CUDAAPI cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream s);
CUresult CUDAAPI cuStreamSynchronize_ptsz(CUstream s);
CUresult CUDAAPI cuStreamQuery_ptsz(CUstream s);
CUresult CUDAAPI cuStreamWaitEvent_ptsz(CUstream s, CUevent ev, unsigned int flags);
CUresult CUDAAPI cuEventRecord_ptsz(CUevent ev, CUstream s);
CUresult CUDAAPI cuStreamIsCapturing_ptsz(CUstream s, CUstreamCaptureStatus *status);
CUresult CUDAAPI cuStreamBeginCapture_v2_ptsz(CUstream s, CUstreamCaptureMode mode);
CUresult CUDAAPI cuStreamEndCapture_ptsz(CUstream s, CUgraph *graph);
CUresult CUDAAPI cuStreamGetCaptureInfo_v3_ptsz(CUstream s, CUstreamCaptureStatus *status, cuuint64_t *id,
                                                CUgraph *graph, const CUgraphNode **deps,
                                                const CUgraphEdgeData **edges, size_t *ndeps);
CUresult CUDAAPI cuGraphLaunch_ptsz(CUgraphExec exec, CUstream s);
CUresult CUDAAPI cuGraphInstantiateWithParams_ptsz(CUgraphExec *exec, CUgraph graph,
                                                   CUDA_GRAPH_INSTANTIATE_PARAMS *params);
CUresult CUDAAPI cuStreamBeginCaptureToGraph_ptsz(CUstream s, CUgraph graph, const CUgraphNode *deps,
                                                  const CUgraphEdgeData *edges, size_t ndeps,
                                                  CUstreamCaptureMode mode);
CUresult CUDAAPI cuMemcpy2D_v2_ptds(const CUDA_MEMCPY2D *p);
CUresult CUDAAPI cuMemcpy2DUnaligned_v2_ptds(const CUDA_MEMCPY2D *p);
CUresult CUDAAPI cuMemcpy2DAsync_v2_ptsz(const CUDA_MEMCPY2D *p, CUstream s);
CUresult CUDAAPI cuMemcpy3D_v2_ptds(const CUDA_MEMCPY3D *p);
CUresult CUDAAPI cuMemcpy3DAsync_v2_ptsz(const CUDA_MEMCPY3D *p, CUstream s);
CUresult CUDAAPI cuMemcpy3DPeer_ptds(const CUDA_MEMCPY3D_PEER *p);
CUresult CUDAAPI cuMemcpy3DPeerAsync_ptsz(const CUDA_MEMCPY3D_PEER *p, CUstream s);
CUresult CUDAAPI cuMemcpyPeer_ptds(CUdeviceptr dst, CUcontext dst_ctx, CUdeviceptr src, CUcontext src_ctx,
                                   size_t n);
CUresult CUDAAPI cuMemcpyPeerAsync_ptsz(CUdeviceptr dst, CUcontext dst_ctx, CUdeviceptr src,
                                        CUcontext src_ctx, size_t n, CUstream s);
CUresult CUDAAPI cuMemsetD2D8_v2_ptds(CUdeviceptr dst, size_t pitch, unsigned char uc, size_t w, size_t h);
CUresult CUDAAPI cuMemsetD2D16_v2_ptds(CUdeviceptr dst, size_t pitch, unsigned short us, size_t w, size_t h);
CUresult CUDAAPI cuMemsetD2D32_v2_ptds(CUdeviceptr dst, size_t pitch, unsigned int ui, size_t w, size_t h);
CUresult CUDAAPI cuMemsetD2D8Async_ptsz(CUdeviceptr dst, size_t pitch, unsigned char uc, size_t w, size_t h,
                                        CUstream s);
CUresult CUDAAPI cuMemsetD2D16Async_ptsz(CUdeviceptr dst, size_t pitch, unsigned short us, size_t w,
                                         size_t h, CUstream s);
CUresult CUDAAPI cuMemsetD2D32Async_ptsz(CUdeviceptr dst, size_t pitch, unsigned int ui, size_t w, size_t h,
                                         CUstream s);

typedef struct fakecuda_counters {
    uint64_t alloc_calls;        /* calls to device allocation entry points (once initialised) */
    uint64_t free_calls;         /* calls to cuMemFree_v2, cuMemFreeAsync, cuMemRelease */
    uint64_t ctx_sync_calls;     /* explicit cuCtxSynchronize(_v2) calls (not cuMemFree's) */
    uint64_t stream_sync_calls;  /* cuStreamSynchronize(_ptsz) calls */
    uint64_t event_record_calls; /* cuEventRecord(_ptsz) calls */
    uint64_t bytes_in_use;       /* device bytes allocated now, all devices (not a counter) */
    uint64_t host_alloc_calls;   /* cuMemAllocHost_v2 and cuMemHostAlloc calls */
    uint64_t copy_calls;         /* every cuMemcpy* call, synchronous or not */
    uint64_t copies_pending;     /* copies queued on some stream and not yet run (not a counter) */
} fakecuda_counters_t;

/* Enqueue a "kernel" on stream s (0 = the legacy default stream) that sleeps delay_us
 * microseconds and then memsets n bytes at p to value. p..p+n must lie in one live allocation. */
CUresult fakecuda_launch_fill(CUstream s, CUdeviceptr p, unsigned char value, size_t n,
                              unsigned delay_us);

void fakecuda_counters(fakecuda_counters_t *out);

/* fakecuda_launch_fill as a real kernel of the stream's context would run: refused with
 * CUDA_ERROR_ILLEGAL_ADDRESS (the fault the real kernel would raise, here at the launch) when the
 * context may not touch the memory: another device's memory without peer access from the
 * context (cuCtxEnablePeerAccess, an IPC open with CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS), a
 * cuMemMap mapping without cuMemSetAccess for the context's device. */
CUresult fakecuda_launch_kernel_fill(CUstream s, CUdeviceptr p, unsigned char value, size_t n);

/* Zero the counters; bytes_in_use is state, not a counter, and is kept. */
void fakecuda_reset_counters(void);

/* Every copy enqueued from now on sleeps delay_us microseconds on its stream before it moves its
 * bytes (a slow DMA), so tests can see what waits for a copy and what does not. 0 = none. */
void fakecuda_set_copy_delay(unsigned delay_us);

/* Fault injection for copies: after `after` more copy calls succeed, the next `count` calls fail
 * with `code` (checked after argument validation, before anything is queued). count 0 = off. */
void fakecuda_fail_copies(unsigned after, unsigned count, CUresult code);

/* VMM: the devices (bit per device) cuMemSetAccess gave access to the cuMemMap mapping at p;
 * 0 when p is in no mapping. */
unsigned fakecuda_vmm_access(CUdeviceptr p);
/* Re-read the environment now and restart the FAKECUDA_FAIL_ALLOC_AFTER count. */
void fakecuda_reload_env(void);

#ifdef __cplusplus
}
#endif

#endif
