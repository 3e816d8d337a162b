/* fake_copy.c: the cuMemcpy* and cuMemset* family. A few shared implementations and the
 * exported entry points, which are generated from the rows of fake_copy.def: each variant
 * (sync/async, legacy/per-thread stream, _v2, 2D/3D/peer) is one row there, so adding a variant
 * is adding a row, and all variants of one shape behave alike by construction.
 *
 *   copy_submit    validate, count and queue one linear copy, memset or test fill; wait if SYNC
 *   copy_peer      cuMemcpyPeer*: check both contexts, then copy_submit
 *   copy_set2d     cuMemsetD2D*: one memset per row
 *   copy_pitched   cuMemcpy2D*, cuMemcpy3D*, cuMemcpy3DPeer*: one row copy per row of each slice
 *
 * Every copy goes through state_copy_fault (fakecuda_fail_copies) after its arguments were
 * validated, and copy_pageable gives pageable host memory the real driver's documented
 * behaviour (see fake_internal.h). The work itself runs on the stream's worker (fake_work.c). */
#include "fake_internal.h"

#include <stdlib.h>
#include <string.h>

/* ================================================================ linear copies and memsets */

/* Host memory the fake does not know (neither pinned nor registered) is pageable, and the real
 * driver's documented behaviour for it is kept: a copy into pageable memory returns only once the
 * data is there, and an asynchronous copy out of pageable memory returns once the source has been
 * consumed (snapshotted here), so the program may overwrite it at once. */
static CUresult copy_pageable(fk_work *w, bool *sync)
{
    bool dst_pageable = !w->chk_dst && !mem_find(w->dst);
    bool src_pageable = !w->chk_src && !mem_find(w->src);
    w->delay_us = g_copy_delay_us;
    if (dst_pageable)
        *sync = true;
    if (!src_pageable || *sync)
        return CUDA_SUCCESS;
    if (!(w->owned = malloc(w->n)))
        return CUDA_ERROR_OUT_OF_MEMORY;
    memcpy(w->owned, (const void *)w->src, w->n);
    w->src = (uintptr_t)w->owned;
    return CUDA_SUCCESS;
}

/* The arguments of a linear copy, memset or fill: memset elements aligned and not overflowing,
 * no null pointer, and each checked side (chk_dst/chk_src) inside one live allocation. */
static CUresult copy_check_linear(const fk_work *w)
{
    size_t unit = w->kind == W_SET32 ? 4 : w->kind == W_SET16 ? 2 : 1;
    size_t bytes = w->n * unit;
    if (unit > 1 && (w->n > SIZE_MAX / unit || w->dst % unit))
        return CUDA_ERROR_INVALID_VALUE;
    if (!w->dst || (w->kind == W_COPY && !w->src) || (w->chk_dst && !mem_range_ok(w->dst, bytes)) ||
        (w->chk_src && !mem_range_ok(w->src, bytes)))
        return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

/* Validate, count and queue one copy/memset/fill; `sync` waits for it like the blocking APIs. */
CUresult copy_submit(CUstream h, bool ptds, fk_work w, bool sync)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (w.kind == W_COPY)
        g_cnt.copy_calls++;
    fk_stream *s;
    if ((r = stream_resolve(h, ptds, &s)))
        return state_leave(r);
    if (w.n == 0)
        return state_leave(CUDA_SUCCESS);
    if ((r = copy_check_linear(&w)))
        return state_leave(r);
    if (w.kind == W_COPY) {
        if ((r = state_copy_fault()))
            return state_leave(r);
        if ((r = copy_pageable(&w, &sync)))
            return state_leave(r);
    }
    uint64_t seq;
    if ((r = work_enqueue(s, &w, &seq))) {
        free(w.owned);
        return state_leave(r);
    }
    if (sync)
        stream_wait_until(s, seq);
    return state_leave(CUDA_SUCCESS);
}

static fk_work copy_work(uintptr_t dst, uintptr_t src, size_t n, bool chk_dst, bool chk_src)
{
    return (fk_work){.kind = W_COPY, .dst = dst, .src = src, .n = n, .chk_dst = chk_dst,
                     .chk_src = chk_src};
}

fk_work copy_set_work(fk_wkind kind, uintptr_t dst, uint32_t v, size_t n)
{
    return (fk_work){.kind = kind, .dst = dst, .val = v, .n = n, .chk_dst = true};
}

/* cuMemcpyPeer: a device-to-device copy once both context handles are valid (the fake's memory
 * is one address space, so the contexts say nothing else). */
static CUresult copy_peer(CUcontext dc, CUcontext sc, CUstream h, bool ptds, fk_work w, bool sync)
{
    fk_ctx *c;
    CUresult r = state_enter();
    if (r)
        return r;
    if (!(r = ctx_arg(dc, &c)))
        r = ctx_arg(sc, &c);
    if (r)
        g_cnt.copy_calls++; /* copy_submit counts the others */
    UNLOCK();
    return r ? r : copy_submit(h, ptds, w, sync);
}

/* ================================================================ pitched memsets */

/* *out = a * b + c; false when it wraps. */
static bool copy_mul_add(size_t a, size_t b, size_t c, size_t *out)
{
    return !__builtin_mul_overflow(a, b, out) && !__builtin_add_overflow(*out, c, out);
}

/* cuMemsetD2D*: Height rows of Width elements, dstPitch bytes apart, one memset per row; the
 * whole span, (Height - 1) * pitch + Width * element size, in one live allocation. */
static CUresult copy_set2d(CUstream h, bool ptds, fk_wkind kind, CUdeviceptr d, size_t pitch, uint32_t v,
                           size_t w, size_t hgt, bool sync)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_stream *s;
    if ((r = stream_resolve(h, ptds, &s)))
        return state_leave(r);
    if (!w || !hgt)
        return state_leave(CUDA_SUCCESS);
    size_t unit = kind == W_SET32 ? 4 : kind == W_SET16 ? 2 : 1, row, n;
    if (!d || d % unit || __builtin_mul_overflow(w, unit, &row) || (hgt > 1 && (pitch < row || pitch % unit)) ||
        !copy_mul_add(hgt - 1, pitch, row, &n) || !mem_range_ok(d, n))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    uint64_t last = 0;
    for (size_t y = 0; y < hgt; y++) {
        fk_work work = copy_set_work(kind, d + y * pitch, v, w);
        if ((r = work_enqueue(s, &work, &last)))
            return state_leave(r);
    }
    if (sync)
        stream_wait_until(s, last);
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ pitched (2D/3D) copies */

/* A pitched (2D/3D) copy runs as one row copy per row of every slice, queued together under the
 * lock, so it is ordered on its stream like one copy; pageable sides behave per row as in
 * copy_pageable. Each host/device side is validated as the real driver documents (pitch at
 * least X + WidthInBytes when there are several rows, slices of at least Height rows), a DEVICE
 * side must lie in one live allocation over its whole span, UNIFIED sides are unchecked like
 * cuMemcpy's. The fake has no CUDA arrays: an ARRAY side is an invalid handle. */
typedef struct copy_side {
    CUmemorytype type;
    uintptr_t host, dev;
    size_t x, y, z, pitch, rows; /* rows: rows per slice of a 3D side; 0 for 2D */
    uintptr_t start;             /* resolved: the first byte, and the span's length */
    size_t extent;
} copy_side;

/* The three descriptor types, brought to one shape. */
typedef struct copy_pdesc {
    bool given; /* false: the descriptor pointer was NULL */
    copy_side side[2]; /* dst, src */
    size_t width, height, depth;
    bool peer;        /* a 3D peer copy: check the contexts */
    CUcontext ctx[2];
} copy_pdesc;

#define COPY_SIDE(d, s, z_, rows_)                                                                 \
    ((copy_side){.type = (d)->s##MemoryType, .host = (uintptr_t)(d)->s##Host, .dev = (d)->s##Device, \
                 .x = (d)->s##XInBytes, .y = (d)->s##Y, .z = (z_), .pitch = (d)->s##Pitch, .rows = (rows_)})

static copy_pdesc copy_from_2d(const CUDA_MEMCPY2D *d)
{
    return (copy_pdesc){true, {COPY_SIDE(d, dst, 0, 0), COPY_SIDE(d, src, 0, 0)}, d->WidthInBytes, d->Height, 1,
                        false, {NULL, NULL}};
}

static copy_pdesc copy_from_3d(const CUDA_MEMCPY3D *d)
{
    return (copy_pdesc){true,
                        {COPY_SIDE(d, dst, d->dstZ, d->dstHeight), COPY_SIDE(d, src, d->srcZ, d->srcHeight)},
                        d->WidthInBytes, d->Height, d->Depth, false, {NULL, NULL}};
}

static copy_pdesc copy_from_3d_peer(const CUDA_MEMCPY3D_PEER *d)
{
    return (copy_pdesc){true,
                        {COPY_SIDE(d, dst, d->dstZ, d->dstHeight), COPY_SIDE(d, src, d->srcZ, d->srcHeight)},
                        d->WidthInBytes, d->Height, d->Depth, true, {d->dstContext, d->srcContext}};
}

/* Resolve and validate one side: start = base + X + (Z * rows + Y) * pitch, extent =
 * ((Depth - 1) * rows + Height - 1) * pitch + WidthInBytes. */
static CUresult copy_side_resolve(copy_side *s, const copy_pdesc *pc)
{
    if (s->type == CU_MEMORYTYPE_ARRAY)
        return CUDA_ERROR_INVALID_HANDLE;
    if (s->type != CU_MEMORYTYPE_HOST && s->type != CU_MEMORYTYPE_DEVICE && s->type != CU_MEMORYTYPE_UNIFIED)
        return CUDA_ERROR_INVALID_VALUE;
    uintptr_t base = s->type == CU_MEMORYTYPE_HOST ? s->host : s->dev;
    bool several = pc->height > 1 || pc->depth > 1;
    size_t row_end, before, off, after;
    if (!base || __builtin_add_overflow(s->x, pc->width, &row_end) || (several && s->pitch < row_end) ||
        (pc->depth > 1 && s->rows < pc->height))
        return CUDA_ERROR_INVALID_VALUE;
    if (!copy_mul_add(s->z, s->rows, s->y, &before) || !copy_mul_add(before, s->pitch, s->x, &off) ||
        __builtin_add_overflow(base, off, &s->start) ||
        !copy_mul_add(pc->depth - 1, s->rows, pc->height - 1, &after) ||
        !copy_mul_add(after, s->pitch, pc->width, &s->extent))
        return CUDA_ERROR_INVALID_VALUE;
    if (s->type == CU_MEMORYTYPE_DEVICE && !mem_range_ok(s->start, s->extent))
        return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

/* One row copy per row; *last gets the last one's sequence number, *wait is set when a row's
 * destination is pageable memory (the call then returns once the data is there). */
static CUresult copy_pitched_enqueue(fk_stream *s, const copy_pdesc *pc, uint64_t *last, bool *wait)
{
    const copy_side *d = &pc->side[0], *r = &pc->side[1];
    for (size_t z = 0; z < pc->depth; z++) {
        for (size_t y = 0; y < pc->height; y++) {
            uintptr_t dst = d->start + (z * d->rows + y) * d->pitch, src = r->start + (z * r->rows + y) * r->pitch;
            fk_work w = copy_work(dst, src, pc->width, d->type == CU_MEMORYTYPE_DEVICE,
                                  r->type == CU_MEMORYTYPE_DEVICE);
            CUresult rc = copy_pageable(&w, wait);
            if (!rc)
                rc = work_enqueue(s, &w, last);
            if (rc) {
                free(w.owned);
                return rc;
            }
        }
    }
    return CUDA_SUCCESS;
}

static CUresult copy_pitched(CUstream h, bool ptds, copy_pdesc pc, bool sync)
{
    CUresult r = state_enter();
    if (r)
        return r;
    g_cnt.copy_calls++;
    fk_stream *s;
    fk_ctx *c;
    if ((r = stream_resolve(h, ptds, &s)))
        return state_leave(r);
    if (!pc.given)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (pc.peer && ((r = ctx_arg(pc.ctx[0], &c)) || (r = ctx_arg(pc.ctx[1], &c))))
        return state_leave(r);
    if (!pc.width || !pc.height || !pc.depth)
        return state_leave(CUDA_SUCCESS);
    for (int i = 0; i < 2; i++)
        if ((r = copy_side_resolve(&pc.side[i], &pc)))
            return state_leave(r);
    if ((r = state_copy_fault()))
        return state_leave(r);
    uint64_t last = 0;
    if ((r = copy_pitched_enqueue(s, &pc, &last, &sync)))
        return state_leave(r);
    if (sync)
        stream_wait_until(s, last);
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ the entry points (fake_copy.def) */

/* What the columns of a row mean to the generated function. */
#define COPY_STREAM_PARAM_SYNC               /* no stream parameter */
#define COPY_STREAM_PARAM_ASYNC , CUstream h
#define COPY_STREAM_ARG_SYNC NULL            /* 0: the default stream of the row's kind */
#define COPY_STREAM_ARG_ASYNC h
#define COPY_WAIT_SYNC true
#define COPY_WAIT_ASYNC false
#define COPY_PTDS_LEGACY false
#define COPY_PTDS_PER_THREAD true

/* Directions: the pointer types, and which side must lie in a live allocation. */
#define COPY_DST_T_HTOD CUdeviceptr
#define COPY_SRC_T_HTOD const void *
#define COPY_CHK_DST_HTOD true
#define COPY_CHK_SRC_HTOD false
#define COPY_DST_T_DTOH void *
#define COPY_SRC_T_DTOH CUdeviceptr
#define COPY_CHK_DST_DTOH false
#define COPY_CHK_SRC_DTOH true
#define COPY_DST_T_DTOD CUdeviceptr
#define COPY_SRC_T_DTOD CUdeviceptr
#define COPY_CHK_DST_DTOD true
#define COPY_CHK_SRC_DTOD true
#define COPY_DST_T_ANY CUdeviceptr /* unified addressing: either side, unchecked */
#define COPY_SRC_T_ANY CUdeviceptr
#define COPY_CHK_DST_ANY false
#define COPY_CHK_SRC_ANY false

/* Memset elements: the value's type and the work item. */
#define COPY_VALUE_T_D8 unsigned char
#define COPY_KIND_D8 W_SET8
#define COPY_VALUE_T_D16 unsigned short
#define COPY_KIND_D16 W_SET16
#define COPY_VALUE_T_D32 unsigned int
#define COPY_KIND_D32 W_SET32

/* Pitched descriptors: CUDA_<argument> and its conversion. */
#define COPY_FROM_MEMCPY2D copy_from_2d
#define COPY_FROM_MEMCPY3D copy_from_3d
#define COPY_FROM_MEMCPY3D_PEER copy_from_3d_peer

/* The work item of a LINEAR or PEER row. */
#define COPY_WORK(dir, d, s, n) \
    copy_work((uintptr_t)(d), (uintptr_t)(s), n, COPY_CHK_DST_##dir, COPY_CHK_SRC_##dir)

/* One generator per shape: the exported function of a row, a single call into the shape's
 * implementation. */
#define COPY_GEN_LINEAR(fn, call, stream, dir)                                        \
    FK_API CUresult CUDAAPI fn(COPY_DST_T_##dir d, COPY_SRC_T_##dir s,               \
                               size_t n COPY_STREAM_PARAM_##call)                    \
    {                                                                                \
        return copy_submit(COPY_STREAM_ARG_##call, COPY_PTDS_##stream,               \
                           COPY_WORK(dir, d, s, n), COPY_WAIT_##call);               \
    }
#define COPY_GEN_PEER(fn, call, stream, dir)                                          \
    FK_API CUresult CUDAAPI fn(COPY_DST_T_##dir d, CUcontext dc, COPY_SRC_T_##dir s, \
                               CUcontext sc, size_t n COPY_STREAM_PARAM_##call)      \
    {                                                                                \
        return copy_peer(dc, sc, COPY_STREAM_ARG_##call, COPY_PTDS_##stream,         \
                         COPY_WORK(dir, d, s, n), COPY_WAIT_##call);                 \
    }
#define COPY_GEN_MEMSET(fn, call, stream, elem)                                       \
    FK_API CUresult CUDAAPI fn(CUdeviceptr d, COPY_VALUE_T_##elem v,                 \
                               size_t n COPY_STREAM_PARAM_##call)                    \
    {                                                                                \
        return copy_submit(COPY_STREAM_ARG_##call, COPY_PTDS_##stream,               \
                           copy_set_work(COPY_KIND_##elem, d, v, n),                 \
                           COPY_WAIT_##call);                                        \
    }
#define COPY_GEN_MEMSET2D(fn, call, stream, elem)                                     \
    FK_API CUresult CUDAAPI fn(CUdeviceptr d, size_t pitch, COPY_VALUE_T_##elem v,   \
                               size_t width, size_t height COPY_STREAM_PARAM_##call) \
    {                                                                                \
        return copy_set2d(COPY_STREAM_ARG_##call, COPY_PTDS_##stream,                \
                          COPY_KIND_##elem, d, pitch, v, width, height,              \
                          COPY_WAIT_##call);                                         \
    }
#define COPY_GEN_PITCHED(fn, call, stream, desc)                                      \
    FK_API CUresult CUDAAPI fn(const CUDA_##desc *p COPY_STREAM_PARAM_##call)        \
    {                                                                                \
        return copy_pitched(COPY_STREAM_ARG_##call, COPY_PTDS_##stream,              \
                            p ? COPY_FROM_##desc(p) : (copy_pdesc){0},               \
                            COPY_WAIT_##call);                                       \
    }

/* Each row: the function, and the hidden alias its cuGetProcAddress row takes it through. */
#define FK_COPY(shape, fn, name, ver, call, stream, arg) \
    COPY_GEN_##shape(fn, call, stream, arg)              \
    FK_PROC_ALIAS(name, ver, COPY_PTDS_##stream, fn)
#include "fake_copy.def"
#undef FK_COPY

/* ================================================================ cuGetProcAddress rows */

const fk_proc copy_procs[] = {
#define FK_COPY(shape, fn, name, ver, call, stream, arg) FK_PROC_ROW(name, ver, COPY_PTDS_##stream, fn)
#include "fake_copy.def"
#undef FK_COPY
    {NULL, 0, false, NULL}};
