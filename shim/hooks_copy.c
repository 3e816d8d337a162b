/* Copy and memset family: checked, staged, forwarded and counted.
 *
 * Every copy goes through copy_run: the device sides are checked against the pool (a copy into
 * freed pool memory or past the end of its block is refused, see manager/transfer.c); unified
 * copies (cuMemcpy, cuMemcpyAsync) are classified side by side; a large pageable host <-> device
 * copy may be staged through pinned buffers (manager/staging.c); what the driver accepted is
 * counted per device, direction and host-memory kind. Memsets are checked only. */
#include "gm_staging.h"
#include "gm_transfer.h"
#include "shim.h"

/* One copy as the hook received it. */
typedef struct copy_op {
    const char *api;
    gm_copy_dir dir; /* GM_COPY_DEFAULT: a unified copy, classified here */
    uintptr_t dst, src;
    size_t n;
    CUstream stream;
    bool async, per_thread;
} copy_op;

typedef CUresult (*forward_fn)(const copy_op *op);

/* Where the copy goes, once both sides are known. */
typedef struct copy_class {
    gpumem_copy_direction dir;
    gpumem_host_memory host; /* of the host side; H2H: pinned only if both are */
    int device;              /* -1: not known yet (no side is ours) */
} copy_class;

/* ------------------------------------------------------------------ classification */

/* A side gpumem does not own, of a unified copy: the driver knows device, managed and pinned
 * memory; anything it does not know is pageable host memory. One query, only for unified calls. */
static bool driver_says_device(uintptr_t p, bool *pinned)
{
    unsigned type = 0, managed = 0;
    CUpointer_attribute attrs[2] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_IS_MANAGED};
    void *data[2] = {&type, &managed};
    CUresult r = CUDA_ERROR_NOT_SUPPORTED;
    if (shim_real_cuPointerGetAttributes) r = shim_real_cuPointerGetAttributes(2, attrs, data, (CUdeviceptr)p);
    else if (shim_real_cuPointerGetAttribute)
        r = shim_real_cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)p);
    *pinned = false;
    if (r != CUDA_SUCCESS || type == 0) return false;
    if (managed || type == CU_MEMORYTYPE_DEVICE || type == CU_MEMORYTYPE_ARRAY) return true;
    *pinned = type == CU_MEMORYTYPE_HOST;
    return false;
}

/* Is a side of a unified copy device memory? Pool memory is; then gpumem's own knowledge of
 * pinned host memory; then the driver. */
static bool unified_side_is_device(const gm_span *s, uintptr_t p, size_t n, bool *pinned)
{
    *pinned = false;
    if (s->status != GM_SPAN_NOT_OURS) return true;
    if (gm_host_is_pinned((const void *)p, n)) {
        *pinned = true;
        return false;
    }
    return driver_says_device(p, pinned);
}

static gpumem_host_memory host_kind(uintptr_t p, size_t n)
{
    return gm_host_is_pinned((const void *)p, n) ? GPUMEM_HOST_PINNED : GPUMEM_HOST_PAGEABLE;
}

static copy_class classify(const copy_op *op, const gm_xfer *x)
{
    const gm_span *d = &x->side[GM_XFER_DST], *s = &x->side[GM_XFER_SRC];
    copy_class c = {GPUMEM_COPY_D2D, GPUMEM_HOST_PAGEABLE, -1};
    switch (op->dir) {
    case GM_COPY_H2D: c.dir = GPUMEM_COPY_H2D; c.host = host_kind(op->src, op->n); break;
    case GM_COPY_D2H: c.dir = GPUMEM_COPY_D2H; c.host = host_kind(op->dst, op->n); break;
    case GM_COPY_D2D: break;
    default: {
        bool dst_pinned, src_pinned;
        bool dst_dev = unified_side_is_device(d, op->dst, op->n, &dst_pinned);
        bool src_dev = unified_side_is_device(s, op->src, op->n, &src_pinned);
        if (dst_dev && src_dev) break;
        c.dir = dst_dev ? GPUMEM_COPY_H2D : src_dev ? GPUMEM_COPY_D2H : GPUMEM_COPY_H2H;
        bool pinned = c.dir == GPUMEM_COPY_H2D ? src_pinned
                    : c.dir == GPUMEM_COPY_D2H ? dst_pinned
                                               : dst_pinned && src_pinned;
        c.host = pinned ? GPUMEM_HOST_PINNED : GPUMEM_HOST_PAGEABLE;
    }
    }
    c.device = x->device;
    return c;
}

/* The calling thread's current device: copies of memory gpumem does not own count there. */
static int current_device(void)
{
    uintptr_t ctx;
    int device = 0;
    if (gm_mgr.backend->current(&ctx, &device) != CUDA_SUCCESS) return 0;
    return device;
}

static void count(const copy_op *op, const copy_class *c, uint64_t t0, bool staged)
{
    uint64_t ticks = op->async ? 0 : gm_copy_clock() - t0;
    int device = c->device >= 0 ? c->device : current_device();
    gm_copy_count(device, c->dir, c->host, op->n, !op->async, ticks, staged);
}

/* ------------------------------------------------------------------ staging hand-off */

static bool worth_staging(const copy_op *op, const copy_class *c)
{
    const gm_copy_settings *cfg = &gm_mgr.copy;
    return (c->dir == GPUMEM_COPY_H2D || c->dir == GPUMEM_COPY_D2H) && c->host == GPUMEM_HOST_PAGEABLE &&
           cfg->staging && op->n >= cfg->staging_min && op->n > 0 && !shim_capture_active();
}

/* GM_NOT_OURS when the stager did not take the copy; otherwise the copy's result. */
static int try_staging(const copy_op *op, const copy_class *c)
{
    uintptr_t ctx;
    int device;
    if (gm_mgr.backend->current(&ctx, &device) != CUDA_SUCCESS) return GM_NOT_OURS;
    uintptr_t stream = op->async ? shim_stream(op->stream, op->per_thread)
                                 : (op->per_thread ? (uintptr_t)CU_STREAM_PER_THREAD : 0);
    gm_copy_dir dir = c->dir == GPUMEM_COPY_H2D ? GM_COPY_H2D : GM_COPY_D2H;
    return gm_staged_copy(ctx, dir, op->dst, op->src, op->n, stream, !op->async);
}

/* ------------------------------------------------------------------ the copy path */

static inline __attribute__((always_inline)) CUresult copy_run(const copy_op *op, forward_fn forward,
                                                               const gm_callsite *site)
{
    if (__builtin_expect(!atomic_load_explicit(&shim_ready, memory_order_relaxed), 0)) return forward(op);
    SHIM_TRACE("%s dst=%#lx src=%#lx bytes=%zu", op->api, (unsigned long)op->dst, (unsigned long)op->src, op->n);
    gm_xfer x = {.api = op->api, .site = site};
    x.side[GM_XFER_DST] = (gm_span){.ptr = op->dir == GM_COPY_D2H ? 0 : op->dst, .n = op->n};
    x.side[GM_XFER_SRC] = (gm_span){.ptr = op->dir == GM_COPY_H2D ? 0 : op->src, .n = op->n};
    if (gm_xfer_check(&x) != GPUMEM_OK) return CUDA_ERROR_INVALID_VALUE;
    copy_class c = classify(op, &x);
    uint64_t t0 = op->async ? 0 : gm_copy_clock();
    if (__builtin_expect(worth_staging(op, &c), 0)) {
        int rc = try_staging(op, &c);
        if (rc != GM_NOT_OURS) {
            if (rc == CUDA_SUCCESS) count(op, &c, t0, true);
            return (CUresult)rc;
        }
    }
    CUresult rc = forward(op);
    if (rc == CUDA_SUCCESS) count(op, &c, t0, false);
    return rc;
}

/* One hook per exported entry point: `fwd` calls the driver's own with the op's fields. */
#define COPY_HOOK(name, dir_, async_, ptds_, params, dst_, src_, n_, stream_, fwd) \
    static CUresult forward_##name(const copy_op *op) { return shim_real_##name fwd; } \
    CUresult name params \
    { \
        SHIM_REQUIRE_REAL(name); \
        copy_op op = {#name, dir_, (uintptr_t)(dst_), (uintptr_t)(src_), n_, stream_, async_, ptds_}; \
        return copy_run(&op, forward_##name, GM_CALLSITE()); \
    }

#define H2D_ARGS ((CUdeviceptr)op->dst, (const void *)op->src, op->n)
#define D2H_ARGS ((void *)op->dst, (CUdeviceptr)op->src, op->n)
#define D2D_ARGS ((CUdeviceptr)op->dst, (CUdeviceptr)op->src, op->n)
#define H2D_ASYNC_ARGS ((CUdeviceptr)op->dst, (const void *)op->src, op->n, op->stream)
#define D2H_ASYNC_ARGS ((void *)op->dst, (CUdeviceptr)op->src, op->n, op->stream)
#define D2D_ASYNC_ARGS ((CUdeviceptr)op->dst, (CUdeviceptr)op->src, op->n, op->stream)

COPY_HOOK(cuMemcpyHtoD_v2, GM_COPY_H2D, false, false, (CUdeviceptr dst, const void *src, size_t n), dst, src, n, NULL, H2D_ARGS)
COPY_HOOK(cuMemcpyHtoD_v2_ptds, GM_COPY_H2D, false, true, (CUdeviceptr dst, const void *src, size_t n), dst, src, n, NULL, H2D_ARGS)
COPY_HOOK(cuMemcpyDtoH_v2, GM_COPY_D2H, false, false, (void *dst, CUdeviceptr src, size_t n), dst, src, n, NULL, D2H_ARGS)
COPY_HOOK(cuMemcpyDtoH_v2_ptds, GM_COPY_D2H, false, true, (void *dst, CUdeviceptr src, size_t n), dst, src, n, NULL, D2H_ARGS)
COPY_HOOK(cuMemcpyDtoD_v2, GM_COPY_D2D, false, false, (CUdeviceptr dst, CUdeviceptr src, size_t n), dst, src, n, NULL, D2D_ARGS)
COPY_HOOK(cuMemcpyDtoD_v2_ptds, GM_COPY_D2D, false, true, (CUdeviceptr dst, CUdeviceptr src, size_t n), dst, src, n, NULL, D2D_ARGS)
COPY_HOOK(cuMemcpy, GM_COPY_DEFAULT, false, false, (CUdeviceptr dst, CUdeviceptr src, size_t n), dst, src, n, NULL, D2D_ARGS)
COPY_HOOK(cuMemcpy_ptds, GM_COPY_DEFAULT, false, true, (CUdeviceptr dst, CUdeviceptr src, size_t n), dst, src, n, NULL, D2D_ARGS)
COPY_HOOK(cuMemcpyHtoDAsync_v2, GM_COPY_H2D, true, false, (CUdeviceptr dst, const void *src, size_t n, CUstream s), dst, src, n, s, H2D_ASYNC_ARGS)
COPY_HOOK(cuMemcpyHtoDAsync_v2_ptsz, GM_COPY_H2D, true, true, (CUdeviceptr dst, const void *src, size_t n, CUstream s), dst, src, n, s, H2D_ASYNC_ARGS)
COPY_HOOK(cuMemcpyDtoHAsync_v2, GM_COPY_D2H, true, false, (void *dst, CUdeviceptr src, size_t n, CUstream s), dst, src, n, s, D2H_ASYNC_ARGS)
COPY_HOOK(cuMemcpyDtoHAsync_v2_ptsz, GM_COPY_D2H, true, true, (void *dst, CUdeviceptr src, size_t n, CUstream s), dst, src, n, s, D2H_ASYNC_ARGS)
COPY_HOOK(cuMemcpyDtoDAsync_v2, GM_COPY_D2D, true, false, (CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s), dst, src, n, s, D2D_ASYNC_ARGS)
COPY_HOOK(cuMemcpyDtoDAsync_v2_ptsz, GM_COPY_D2D, true, true, (CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s), dst, src, n, s, D2D_ASYNC_ARGS)
COPY_HOOK(cuMemcpyAsync, GM_COPY_DEFAULT, true, false, (CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s), dst, src, n, s, D2D_ASYNC_ARGS)
COPY_HOOK(cuMemcpyAsync_ptsz, GM_COPY_DEFAULT, true, true, (CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s), dst, src, n, s, D2D_ASYNC_ARGS)

/* ------------------------------------------------------------------ memsets */

/* The destination range of a memset of `count` elements of `elem` bytes, checked like a copy's.
 * A count whose byte size overflows is left to the driver, which refuses it. */
static inline __attribute__((always_inline)) CUresult set_check(const char *api, CUdeviceptr d, size_t count,
                                                                size_t elem, const gm_callsite *site)
{
    if (!atomic_load_explicit(&shim_ready, memory_order_relaxed) || count > SIZE_MAX / elem) return CUDA_SUCCESS;
    SHIM_TRACE("%s dst=%#llx count=%zu", api, (unsigned long long)d, count);
    gm_xfer x = {.api = api, .memset = true, .site = site};
    x.side[GM_XFER_DST] = (gm_span){.ptr = (uintptr_t)d, .n = count * elem};
    return gm_xfer_check(&x) == GPUMEM_OK ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

#define SET_HOOK(name, elem, params, args) \
    CUresult name params \
    { \
        SHIM_REQUIRE_REAL(name); \
        CUresult rc = set_check(#name, d, n, elem, GM_CALLSITE()); \
        return rc == CUDA_SUCCESS ? shim_real_##name args : rc; \
    }

SET_HOOK(cuMemsetD8_v2, 1, (CUdeviceptr d, unsigned char v, size_t n), (d, v, n))
SET_HOOK(cuMemsetD8_v2_ptds, 1, (CUdeviceptr d, unsigned char v, size_t n), (d, v, n))
SET_HOOK(cuMemsetD16_v2, 2, (CUdeviceptr d, unsigned short v, size_t n), (d, v, n))
SET_HOOK(cuMemsetD16_v2_ptds, 2, (CUdeviceptr d, unsigned short v, size_t n), (d, v, n))
SET_HOOK(cuMemsetD32_v2, 4, (CUdeviceptr d, unsigned int v, size_t n), (d, v, n))
SET_HOOK(cuMemsetD32_v2_ptds, 4, (CUdeviceptr d, unsigned int v, size_t n), (d, v, n))
SET_HOOK(cuMemsetD8Async, 1, (CUdeviceptr d, unsigned char v, size_t n, CUstream s), (d, v, n, s))
SET_HOOK(cuMemsetD8Async_ptsz, 1, (CUdeviceptr d, unsigned char v, size_t n, CUstream s), (d, v, n, s))
SET_HOOK(cuMemsetD16Async, 2, (CUdeviceptr d, unsigned short v, size_t n, CUstream s), (d, v, n, s))
SET_HOOK(cuMemsetD16Async_ptsz, 2, (CUdeviceptr d, unsigned short v, size_t n, CUstream s), (d, v, n, s))
SET_HOOK(cuMemsetD32Async, 4, (CUdeviceptr d, unsigned int v, size_t n, CUstream s), (d, v, n, s))
SET_HOOK(cuMemsetD32Async_ptsz, 4, (CUdeviceptr d, unsigned int v, size_t n, CUstream s), (d, v, n, s))
