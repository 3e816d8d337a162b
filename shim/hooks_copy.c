/* Copy family: forwarded to the driver and counted by direction. The transfers work (checked
 * copies, pinned staging) hooks in here. */
#include "shim.h"

#define COUNT(dir, n) \
    do { \
        if (__builtin_expect(atomic_load_explicit(&shim_ready, memory_order_relaxed), 1)) \
            gm_copy_note((dir), (n)); \
    } while (0)

/* One hook body per (name, direction, parameters, arguments). */
#define COPY_HOOK(name, dir, params, args, bytes) \
    CUresult name params \
    { \
        SHIM_REQUIRE_REAL(name); \
        SHIM_TRACE(#name " bytes=%zu", (size_t)(bytes)); \
        CUresult rc = shim_real_##name args; \
        if (rc == CUDA_SUCCESS) COUNT(dir, bytes); \
        return rc; \
    }

COPY_HOOK(cuMemcpyHtoD_v2, GM_COPY_H2D, (CUdeviceptr dst, const void *src, size_t n), (dst, src, n), n)
COPY_HOOK(cuMemcpyHtoD_v2_ptds, GM_COPY_H2D, (CUdeviceptr dst, const void *src, size_t n), (dst, src, n), n)
COPY_HOOK(cuMemcpyDtoH_v2, GM_COPY_D2H, (void *dst, CUdeviceptr src, size_t n), (dst, src, n), n)
COPY_HOOK(cuMemcpyDtoH_v2_ptds, GM_COPY_D2H, (void *dst, CUdeviceptr src, size_t n), (dst, src, n), n)
COPY_HOOK(cuMemcpyDtoD_v2, GM_COPY_D2D, (CUdeviceptr dst, CUdeviceptr src, size_t n), (dst, src, n), n)
COPY_HOOK(cuMemcpyDtoD_v2_ptds, GM_COPY_D2D, (CUdeviceptr dst, CUdeviceptr src, size_t n), (dst, src, n), n)
COPY_HOOK(cuMemcpy, GM_COPY_DEFAULT, (CUdeviceptr dst, CUdeviceptr src, size_t n), (dst, src, n), n)
COPY_HOOK(cuMemcpy_ptds, GM_COPY_DEFAULT, (CUdeviceptr dst, CUdeviceptr src, size_t n), (dst, src, n), n)
COPY_HOOK(cuMemcpyHtoDAsync_v2, GM_COPY_H2D, (CUdeviceptr dst, const void *src, size_t n, CUstream s), (dst, src, n, s), n)
COPY_HOOK(cuMemcpyHtoDAsync_v2_ptsz, GM_COPY_H2D, (CUdeviceptr dst, const void *src, size_t n, CUstream s), (dst, src, n, s), n)
COPY_HOOK(cuMemcpyDtoHAsync_v2, GM_COPY_D2H, (void *dst, CUdeviceptr src, size_t n, CUstream s), (dst, src, n, s), n)
COPY_HOOK(cuMemcpyDtoHAsync_v2_ptsz, GM_COPY_D2H, (void *dst, CUdeviceptr src, size_t n, CUstream s), (dst, src, n, s), n)
COPY_HOOK(cuMemcpyDtoDAsync_v2, GM_COPY_D2D, (CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s), (dst, src, n, s), n)
COPY_HOOK(cuMemcpyDtoDAsync_v2_ptsz, GM_COPY_D2D, (CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s), (dst, src, n, s), n)
COPY_HOOK(cuMemcpyAsync, GM_COPY_DEFAULT, (CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s), (dst, src, n, s), n)
COPY_HOOK(cuMemcpyAsync_ptsz, GM_COPY_DEFAULT, (CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s), (dst, src, n, s), n)

/* Memsets: forwarded (the checks hook in here). */
#define SET_HOOK(name, params, args) \
    CUresult name params \
    { \
        SHIM_REQUIRE_REAL(name); \
        return shim_real_##name args; \
    }

SET_HOOK(cuMemsetD8_v2, (CUdeviceptr d, unsigned char v, size_t n), (d, v, n))
SET_HOOK(cuMemsetD8_v2_ptds, (CUdeviceptr d, unsigned char v, size_t n), (d, v, n))
SET_HOOK(cuMemsetD16_v2, (CUdeviceptr d, unsigned short v, size_t n), (d, v, n))
SET_HOOK(cuMemsetD16_v2_ptds, (CUdeviceptr d, unsigned short v, size_t n), (d, v, n))
SET_HOOK(cuMemsetD32_v2, (CUdeviceptr d, unsigned int v, size_t n), (d, v, n))
SET_HOOK(cuMemsetD32_v2_ptds, (CUdeviceptr d, unsigned int v, size_t n), (d, v, n))
SET_HOOK(cuMemsetD8Async, (CUdeviceptr d, unsigned char v, size_t n, CUstream s), (d, v, n, s))
SET_HOOK(cuMemsetD8Async_ptsz, (CUdeviceptr d, unsigned char v, size_t n, CUstream s), (d, v, n, s))
SET_HOOK(cuMemsetD16Async, (CUdeviceptr d, unsigned short v, size_t n, CUstream s), (d, v, n, s))
SET_HOOK(cuMemsetD16Async_ptsz, (CUdeviceptr d, unsigned short v, size_t n, CUstream s), (d, v, n, s))
SET_HOOK(cuMemsetD32Async, (CUdeviceptr d, unsigned int v, size_t n, CUstream s), (d, v, n, s))
SET_HOOK(cuMemsetD32Async_ptsz, (CUdeviceptr d, unsigned int v, size_t n, CUstream s), (d, v, n, s))
