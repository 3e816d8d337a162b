/* Copy and memset family: checked, staged, forwarded and counted.
 *
 * Every copy goes through copy_run: the device sides are checked against the pool (a copy into
 * freed pool memory or past the end of its block is refused, see manager/engine/transfer.c); unified
 * copies (cuMemcpy, cuMemcpyAsync) are classified side by side; a large pageable host <-> device
 * copy may be staged through pinned buffers (manager/engine/staging.c); what the driver accepted is
 * counted per device, direction and host-memory kind. Memsets are checked only.
 *
 * Pitched copies (2D, 3D, 3D peer) and 2D memsets are checked over the whole span their rows
 * cover and forwarded to the driver, never staged; peer copies go through copy_run as device to
 * device copies. A descriptor the driver refuses anyway (NULL, an unknown memory type, rows
 * longer than their pitch, a size that wraps) is forwarded unchecked, so the program gets the
 * driver's own error. */
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

typedef gm_copy_class copy_class;

/* ------------------------------------------------------------------ classification */

/* What each side of a linear copy is, as the entry point names it. */
static copy_class classify(const copy_op *op, const gm_xfer *x)
{
    static const gm_side_kind kinds[GM_COPY_DIRS][2] = {
        [GM_COPY_H2D] = {GM_SIDE_DEVICE, GM_SIDE_HOST},
        [GM_COPY_D2H] = {GM_SIDE_HOST, GM_SIDE_DEVICE},
        [GM_COPY_D2D] = {GM_SIDE_DEVICE, GM_SIDE_DEVICE},
        [GM_COPY_DEFAULT] = {GM_SIDE_UNIFIED, GM_SIDE_UNIFIED},
    };
    gm_xfer_side side[2] = {{kinds[op->dir][GM_XFER_DST], op->dst, op->n},
                            {kinds[op->dir][GM_XFER_SRC], op->src, op->n}};
    return gm_xfer_classify(x, side);
}

/* The calling thread's current device: copies of memory gpumem does not own count there. */
static int current_device(void)
{
    uintptr_t ctx;
    int device = 0;
    if (gm_mgr.backend->current(&ctx, &device) != CUDA_SUCCESS) return 0;
    return device;
}

static void count_bytes(const copy_class *c, size_t bytes, bool async, uint64_t t0, bool staged)
{
    uint64_t ticks = async ? 0 : gm_copy_clock() - t0;
    int device = c->device >= 0 ? c->device : current_device();
    gm_copy_count(device, c->dir, c->host, c->peer, bytes, !async, ticks, staged);
}

static void count(const copy_op *op, const copy_class *c, uint64_t t0, bool staged)
{
    count_bytes(c, op->n, op->async, t0, staged);
}

/* ------------------------------------------------------------------ staging hand-off */

static bool worth_staging(const copy_op *op, const copy_class *c)
{
    const gm_copy_settings *cfg = &gm_mgr.copy;
    return (c->dir == GPUMEM_COPY_H2D || c->dir == GPUMEM_COPY_D2H) && c->host == GPUMEM_HOST_PAGEABLE &&
           cfg->staging && op->n >= cfg->staging_min && op->n > 0 && !shim_capture_active();
}

/* GM_NOT_OURS when the stager did not take the copy; otherwise the copy's result. */
static gm_answer try_staging(const copy_op *op, const copy_class *c)
{
    uintptr_t ctx;
    int device;
    if (gm_mgr.backend->current(&ctx, &device) != CUDA_SUCCESS) return gm_not_ours();
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
        gm_answer staged = try_staging(op, &c);
        if (staged.owner == GM_OURS) {
            if (staged.status == CUDA_SUCCESS) count(op, &c, t0, true);
            return (CUresult)staged.status;
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

/* A memset's destination range [d, d+n), checked like a copy's. */
static inline __attribute__((always_inline)) CUresult set_range_check(const char *api, CUdeviceptr d, size_t n,
                                                                      const gm_callsite *site)
{
    gm_xfer x = {.api = api, .memset = true, .site = site};
    x.side[GM_XFER_DST] = (gm_span){.ptr = (uintptr_t)d, .n = n};
    return gm_xfer_check(&x) == GPUMEM_OK ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* The destination range of a memset of `count` elements of `elem` bytes. A count whose byte size
 * overflows is left to the driver, which refuses it. */
static inline __attribute__((always_inline)) CUresult set_check(const char *api, CUdeviceptr d, size_t count,
                                                                size_t elem, const gm_callsite *site)
{
    if (!atomic_load_explicit(&shim_ready, memory_order_relaxed) || count > SIZE_MAX / elem) return CUDA_SUCCESS;
    SHIM_TRACE("%s dst=%#llx count=%zu", api, (unsigned long long)d, count);
    return set_range_check(api, d, count * elem, site);
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

/* ------------------------------------------------------------------ peer copies */

/* A peer copy: a device-to-device copy whose sides may belong to different contexts. Both are
 * checked (the pool looks a pointer up in every heap, whatever the context); forward_* gets the
 * contexts back from the enclosing struct. */
typedef struct peer_op {
    copy_op op; /* first: forward_* casts the copy_op back */
    CUcontext dst_ctx, src_ctx;
} peer_op;

#define PEER_HOOK(name, async_, ptds_, params, stream_, fwd) \
    static CUresult forward_##name(const copy_op *o) \
    { \
        const peer_op *p = (const peer_op *)o; \
        return shim_real_##name fwd; \
    } \
    CUresult name params \
    { \
        SHIM_REQUIRE_REAL(name); \
        peer_op p = {{#name, GM_COPY_D2D, (uintptr_t)dst, (uintptr_t)src, n, stream_, async_, ptds_}, dctx, sctx}; \
        return copy_run(&p.op, forward_##name, GM_CALLSITE()); \
    }

#define PEER_ARGS ((CUdeviceptr)p->op.dst, p->dst_ctx, (CUdeviceptr)p->op.src, p->src_ctx, p->op.n)
#define PEER_ASYNC_ARGS ((CUdeviceptr)p->op.dst, p->dst_ctx, (CUdeviceptr)p->op.src, p->src_ctx, p->op.n, p->op.stream)
#define PEER_PARAMS CUdeviceptr dst, CUcontext dctx, CUdeviceptr src, CUcontext sctx, size_t n

PEER_HOOK(cuMemcpyPeer, false, false, (PEER_PARAMS), NULL, PEER_ARGS)
PEER_HOOK(cuMemcpyPeer_ptds, false, true, (PEER_PARAMS), NULL, PEER_ARGS)
PEER_HOOK(cuMemcpyPeerAsync, true, false, (PEER_PARAMS, CUstream s), s, PEER_ASYNC_ARGS)
PEER_HOOK(cuMemcpyPeerAsync_ptsz, true, true, (PEER_PARAMS, CUstream s), s, PEER_ASYNC_ARGS)

/* ------------------------------------------------------------------ pitched copies (2D, 3D) */

/* One side of a 2D or 3D copy, as its descriptor gives it. */
typedef struct pitched_side {
    CUmemorytype type;
    uintptr_t host, device;
    size_t x, y, z, pitch;
    size_t rows; /* rows per slice of a 3D side (srcHeight/dstHeight); 0 for 2D */
} pitched_side;

/* A 2D or 3D copy: its two sides, [GM_XFER_DST] and [GM_XFER_SRC], and what it moves. */
typedef struct pitched_op {
    pitched_side side[2];
    size_t width, height, depth;
} pitched_op;

#define PITCHED_SIDE(d, s, z_, rows_) \
    ((pitched_side){(d)->s##MemoryType, (uintptr_t)(d)->s##Host, (uintptr_t)(d)->s##Device, (d)->s##XInBytes, \
                    (d)->s##Y, z_, (d)->s##Pitch, rows_})
/* CUDA_MEMCPY3D and CUDA_MEMCPY3D_PEER name these fields alike. */
#define PITCHED_3D(d) \
    ((pitched_op){{PITCHED_SIDE(d, dst, (d)->dstZ, (d)->dstHeight), PITCHED_SIDE(d, src, (d)->srcZ, (d)->srcHeight)}, \
                  (d)->WidthInBytes, (d)->Height, (d)->Depth})

static pitched_op from_2d(const CUDA_MEMCPY2D *d)
{
    return (pitched_op){{PITCHED_SIDE(d, dst, 0, 0), PITCHED_SIDE(d, src, 0, 0)}, d->WidthInBytes, d->Height, 1};
}
static pitched_op from_3d(const CUDA_MEMCPY3D *d) { return PITCHED_3D(d); }
static pitched_op from_3d_peer(const CUDA_MEMCPY3D_PEER *d) { return PITCHED_3D(d); }

/* *out = a * b + c; false when it wraps. */
static bool mul_add(size_t a, size_t b, size_t c, size_t *out)
{
    return !__builtin_mul_overflow(a, b, out) && !__builtin_add_overflow(*out, c, out);
}

/* The bytes one host/device side touches: from the first row's first byte,
 * base + X + (Z * rows + Y) * pitch, to the last row's last, extent =
 * ((Depth - 1) * rows + Height - 1) * pitch + Width bytes on (the padding between rows and
 * slices included: it lies in the same allocation). False for a layout the driver refuses: rows
 * longer than their pitch, slices shorter than Height, a size that wraps. */
static bool side_span(const pitched_side *s, const pitched_op *op, uintptr_t *start, size_t *extent)
{
    size_t row_end, rows_before, offset, rows_after;
    bool several_rows = op->height > 1 || op->depth > 1;
    if (__builtin_add_overflow(s->x, op->width, &row_end) || (several_rows && s->pitch < row_end)) return false;
    if (op->depth > 1 && s->rows < op->height) return false;
    uintptr_t base = s->type == CU_MEMORYTYPE_HOST ? s->host : s->device;
    if (!mul_add(s->z, s->rows, s->y, &rows_before) || !mul_add(rows_before, s->pitch, s->x, &offset) ||
        __builtin_add_overflow(base, offset, start))
        return false;
    *extent = 0;
    if (!op->width || !op->height || !op->depth) return true; /* nothing is touched */
    return mul_add(op->depth - 1, s->rows, op->height - 1, &rows_after) &&
           mul_add(rows_after, s->pitch, op->width, extent);
}

static bool known_type(CUmemorytype t)
{
    return t == CU_MEMORYTYPE_HOST || t == CU_MEMORYTYPE_DEVICE || t == CU_MEMORYTYPE_ARRAY ||
           t == CU_MEMORYTYPE_UNIFIED;
}

/* Is a side device memory (an array is); if host memory, is it pinned? */
static gm_side_kind pitched_side_kind(const pitched_side *s)
{
    return s->type == CU_MEMORYTYPE_HOST ? GM_SIDE_HOST
         : s->type == CU_MEMORYTYPE_UNIFIED ? GM_SIDE_UNIFIED : GM_SIDE_DEVICE;
}

static size_t pitched_bytes(const pitched_op *op)
{
    size_t n;
    if (__builtin_mul_overflow(op->width, op->height, &n) || __builtin_mul_overflow(n, op->depth, &n)) return SIZE_MAX;
    return n;
}

/* What the hook does with a pitched copy once it is checked. */
typedef struct pitched_plan {
    bool counted; /* classified: count it if the driver accepts it */
    copy_class cls;
    size_t bytes;
} pitched_plan;

/* Checks the device and unified sides of a pitched copy against the pool (arrays are never
 * pool memory) and classifies it. CUDA_ERROR_INVALID_VALUE: refused; otherwise forward it,
 * counted when plan->counted. */
static CUresult pitched_check(const char *api, const pitched_op *op, pitched_plan *plan, const gm_callsite *site)
{
    gm_xfer x = {.api = api, .site = site};
    gm_span where[2] = {{0}, {0}}; /* host sides too, for their pinned/pageable kind */
    plan->counted = false;
    if (!atomic_load_explicit(&shim_ready, memory_order_relaxed)) return CUDA_SUCCESS;
    for (int i = 0; i < 2; i++) {
        const pitched_side *s = &op->side[i];
        if (!known_type(s->type)) return CUDA_SUCCESS;
        if (s->type == CU_MEMORYTYPE_ARRAY) continue;
        if (!side_span(s, op, &where[i].ptr, &where[i].n)) return CUDA_SUCCESS;
        if (s->type != CU_MEMORYTYPE_HOST) x.side[i] = where[i];
    }
    SHIM_TRACE("%s dst=%#lx+%zu src=%#lx+%zu", api, (unsigned long)where[0].ptr, where[0].n,
               (unsigned long)where[1].ptr, where[1].n);
    if (gm_xfer_check(&x) != GPUMEM_OK) return CUDA_ERROR_INVALID_VALUE;
    gm_xfer_side side[2];
    for (int i = 0; i < 2; i++) side[i] = (gm_xfer_side){pitched_side_kind(&op->side[i]), where[i].ptr, where[i].n};
    plan->cls = gm_xfer_classify(&x, side);
    plan->bytes = pitched_bytes(op);
    plan->counted = true;
    return CUDA_SUCCESS;
}

/* One hook per exported entry point; `args` forwards the caller's own arguments. */
#define PITCHED_HOOK(name, from, async_, params, args) \
    CUresult name params \
    { \
        SHIM_REQUIRE_REAL(name); \
        pitched_plan plan = {.counted = false}; \
        if (p) { \
            pitched_op op = from(p); \
            CUresult refused = pitched_check(#name, &op, &plan, GM_CALLSITE()); \
            if (refused != CUDA_SUCCESS) return refused; \
        } \
        uint64_t t0 = async_ || !plan.counted ? 0 : gm_copy_clock(); \
        CUresult rc = shim_real_##name args; \
        if (rc == CUDA_SUCCESS && plan.counted) count_bytes(&plan.cls, plan.bytes, async_, t0, false); \
        return rc; \
    }

PITCHED_HOOK(cuMemcpy2D_v2, from_2d, false, (const CUDA_MEMCPY2D *p), (p))
PITCHED_HOOK(cuMemcpy2D_v2_ptds, from_2d, false, (const CUDA_MEMCPY2D *p), (p))
PITCHED_HOOK(cuMemcpy2DUnaligned_v2, from_2d, false, (const CUDA_MEMCPY2D *p), (p))
PITCHED_HOOK(cuMemcpy2DUnaligned_v2_ptds, from_2d, false, (const CUDA_MEMCPY2D *p), (p))
PITCHED_HOOK(cuMemcpy2DAsync_v2, from_2d, true, (const CUDA_MEMCPY2D *p, CUstream s), (p, s))
PITCHED_HOOK(cuMemcpy2DAsync_v2_ptsz, from_2d, true, (const CUDA_MEMCPY2D *p, CUstream s), (p, s))
PITCHED_HOOK(cuMemcpy3D_v2, from_3d, false, (const CUDA_MEMCPY3D *p), (p))
PITCHED_HOOK(cuMemcpy3D_v2_ptds, from_3d, false, (const CUDA_MEMCPY3D *p), (p))
PITCHED_HOOK(cuMemcpy3DAsync_v2, from_3d, true, (const CUDA_MEMCPY3D *p, CUstream s), (p, s))
PITCHED_HOOK(cuMemcpy3DAsync_v2_ptsz, from_3d, true, (const CUDA_MEMCPY3D *p, CUstream s), (p, s))
PITCHED_HOOK(cuMemcpy3DPeer, from_3d_peer, false, (const CUDA_MEMCPY3D_PEER *p), (p))
PITCHED_HOOK(cuMemcpy3DPeer_ptds, from_3d_peer, false, (const CUDA_MEMCPY3D_PEER *p), (p))
PITCHED_HOOK(cuMemcpy3DPeerAsync, from_3d_peer, true, (const CUDA_MEMCPY3D_PEER *p, CUstream s), (p, s))
PITCHED_HOOK(cuMemcpy3DPeerAsync_ptsz, from_3d_peer, true, (const CUDA_MEMCPY3D_PEER *p, CUstream s), (p, s))

/* ------------------------------------------------------------------ 2D memsets */

/* Height rows of Width elements, pitch bytes apart: (Height - 1) * pitch + Width * elem bytes
 * from dst. A pitch shorter than a row or a size that wraps is the driver's to refuse. */
static inline __attribute__((always_inline)) CUresult set2d_check(const char *api, CUdeviceptr d, size_t pitch,
                                                                  size_t w, size_t h, size_t elem,
                                                                  const gm_callsite *site)
{
    size_t row, n;
    if (!atomic_load_explicit(&shim_ready, memory_order_relaxed) || __builtin_mul_overflow(w, elem, &row))
        return CUDA_SUCCESS;
    if (!row || !h) return CUDA_SUCCESS; /* nothing is touched */
    if ((h > 1 && pitch < row) || !mul_add(h - 1, pitch, row, &n)) return CUDA_SUCCESS;
    SHIM_TRACE("%s dst=%#llx pitch=%zu width=%zu height=%zu", api, (unsigned long long)d, pitch, w, h);
    return set_range_check(api, d, n, site);
}

#define SET2D_HOOK(name, elem, params, args) \
    CUresult name params \
    { \
        SHIM_REQUIRE_REAL(name); \
        CUresult rc = set2d_check(#name, d, pitch, w, h, elem, GM_CALLSITE()); \
        return rc == CUDA_SUCCESS ? shim_real_##name args : rc; \
    }

#define SET2D_PARAMS(t) CUdeviceptr d, size_t pitch, t v, size_t w, size_t h

SET2D_HOOK(cuMemsetD2D8_v2, 1, (SET2D_PARAMS(unsigned char)), (d, pitch, v, w, h))
SET2D_HOOK(cuMemsetD2D8_v2_ptds, 1, (SET2D_PARAMS(unsigned char)), (d, pitch, v, w, h))
SET2D_HOOK(cuMemsetD2D16_v2, 2, (SET2D_PARAMS(unsigned short)), (d, pitch, v, w, h))
SET2D_HOOK(cuMemsetD2D16_v2_ptds, 2, (SET2D_PARAMS(unsigned short)), (d, pitch, v, w, h))
SET2D_HOOK(cuMemsetD2D32_v2, 4, (SET2D_PARAMS(unsigned int)), (d, pitch, v, w, h))
SET2D_HOOK(cuMemsetD2D32_v2_ptds, 4, (SET2D_PARAMS(unsigned int)), (d, pitch, v, w, h))
SET2D_HOOK(cuMemsetD2D8Async, 1, (SET2D_PARAMS(unsigned char), CUstream s), (d, pitch, v, w, h, s))
SET2D_HOOK(cuMemsetD2D8Async_ptsz, 1, (SET2D_PARAMS(unsigned char), CUstream s), (d, pitch, v, w, h, s))
SET2D_HOOK(cuMemsetD2D16Async, 2, (SET2D_PARAMS(unsigned short), CUstream s), (d, pitch, v, w, h, s))
SET2D_HOOK(cuMemsetD2D16Async_ptsz, 2, (SET2D_PARAMS(unsigned short), CUstream s), (d, pitch, v, w, h, s))
SET2D_HOOK(cuMemsetD2D32Async, 4, (SET2D_PARAMS(unsigned int), CUstream s), (d, pitch, v, w, h, s))
SET2D_HOOK(cuMemsetD2D32Async_ptsz, 4, (SET2D_PARAMS(unsigned int), CUstream s), (d, pitch, v, w, h, s))
