/* fake_ctx.c: contexts. Primary contexts (retain/release/reset, one per device), created contexts
 * (cuCtxCreate_v2..v4, cuCtxDestroy) and the per-thread context stack (tl_stack), plus
 * cuCtxSynchronize.
 *
 * A context is never freed, only marked dead, so that a stale handle is refused rather than
 * followed; g_ctxs lists every context ever made. Destroying or resetting one waits for its
 * queued work, retires its streams and frees its memory and events (ctx_teardown). */
#include "fake_internal.h"

#include <stdlib.h>

/* Exported names that cuda.h declares only for its own internal build, declared here so the
 * definitions are checked. */
CUresult CUDAAPI cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev);
CUresult CUDAAPI cuCtxCreate_v3(CUcontext *pctx, CUexecAffinityParam *paramsArray, int numParams,
                                unsigned int flags, CUdevice dev);

/* ================================================================ lookup */

static bool ctx_known(const fk_ctx *c)
{
    for (fk_ctx *x = g_ctxs; x; x = x->next)
        if (x == c)
            return true;
    return false;
}

/* The calling thread's current context, or the error the real driver gives. */
CUresult ctx_current(fk_ctx **out)
{
    if (tl_depth == 0 || !tl_stack[tl_depth - 1])
        return CUDA_ERROR_INVALID_CONTEXT;
    fk_ctx *c = tl_stack[tl_depth - 1];
    if (!c->alive)
        return CUDA_ERROR_CONTEXT_IS_DESTROYED;
    *out = c;
    return CUDA_SUCCESS;
}

/* A handle passed in by the caller: NULL means the current context. */
CUresult ctx_arg(CUcontext h, fk_ctx **out)
{
    if (!h)
        return ctx_current(out);
    fk_ctx *c = (fk_ctx *)h;
    if (!ctx_known(c))
        return CUDA_ERROR_INVALID_CONTEXT;
    if (!c->alive)
        return CUDA_ERROR_CONTEXT_IS_DESTROYED;
    *out = c;
    return CUDA_SUCCESS;
}

/* ================================================================ life cycle */

static CUresult ctx_activate(fk_ctx *c)
{
    c->legacy = stream_new(c, true, NULL);
    if (!c->legacy)
        return CUDA_ERROR_OUT_OF_MEMORY;
    c->alive = true;
    c->id = g_next_id++;
    return CUDA_SUCCESS;
}

/* Destroy or reset: finish queued work, stop the workers, free what the context owned.
 * The caller has already marked c dead, so nothing new is queued meanwhile. */
static void ctx_teardown(fk_ctx *c)
{
    stream_wait_ctx(c);
    for (fk_stream *s = g_streams, *next; s; s = next) {
        next = s->next;
        if (s->ctx == c && !s->destroyed)
            stream_retire(s);
    }
    for (bool busy = true; busy;) {
        busy = false;
        for (fk_stream *s = g_streams; s; s = s->next)
            busy |= s->ctx == c;
        if (busy)
            pthread_cond_wait(&g_done, &g_mu);
    }
    c->legacy = NULL;
    mem_free_ctx(c);
    array_free_ctx(c);
    event_free_ctx(c);
}

static fk_ctx *ctx_new(int dev, bool primary)
{
    fk_ctx *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->dev = dev;
    c->primary = primary;
    c->next = g_ctxs;
    g_ctxs = c;
    return c;
}

/* ================================================================ primary contexts */

FK_API CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!pctx)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(dev))
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    fk_device *d = &g_dev[dev];
    if (!d->primary && !(d->primary = ctx_new(dev, true)))
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    if (d->primary->prim_refs == 0 && (r = ctx_activate(d->primary)))
        return state_leave(r);
    d->primary->prim_refs++;
    d->primary->flags = d->primary_flags;
    *pctx = (CUcontext)d->primary; /* the same handle every time, as in the real driver */
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!dev_ok(dev))
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    fk_ctx *c = g_dev[dev].primary;
    if (!c || c->prim_refs == 0)
        return state_leave(CUDA_ERROR_INVALID_CONTEXT);
    if (--c->prim_refs == 0) { /* last reference: the context and its memory go away */
        c->alive = false;
        ctx_teardown(c);
    }
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDevicePrimaryCtxReset_v2(CUdevice dev)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!dev_ok(dev))
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    fk_ctx *c = g_dev[dev].primary;
    if (c && c->alive) {
        c->alive = false;
        c->prim_refs = 0;
        ctx_teardown(c);
    }
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int *flags, int *active)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!flags || !active)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(dev))
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    *flags = g_dev[dev].primary_flags;
    *active = g_dev[dev].primary && g_dev[dev].primary->prim_refs > 0;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDevicePrimaryCtxSetFlags_v2(CUdevice dev, unsigned int flags)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!dev_ok(dev))
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    g_dev[dev].primary_flags = flags;
    if (g_dev[dev].primary)
        g_dev[dev].primary->flags = flags;
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ created contexts */

/* All cuCtxCreate versions: a new context, pushed on the calling thread's stack. */
static CUresult ctx_create(CUcontext *pctx, unsigned flags, CUdevice dev)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!pctx)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(dev))
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    if (tl_depth == FK_STACK_MAX)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    fk_ctx *c = ctx_new(dev, false);
    if (!c)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    if ((r = ctx_activate(c)))
        return state_leave(r);
    c->flags = flags;
    tl_stack[tl_depth++] = c;
    *pctx = (CUcontext)c;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev)
{
    return ctx_create(pctx, flags, dev);
}

FK_API CUresult CUDAAPI cuCtxCreate_v3(CUcontext *pctx, CUexecAffinityParam *params, int n,
                                       unsigned int flags, CUdevice dev)
{
    (void)params; /* affinity is meaningless here */
    (void)n;
    return ctx_create(pctx, flags, dev);
}

FK_API CUresult CUDAAPI cuCtxCreate_v4(CUcontext *pctx, CUctxCreateParams *params,
                                       unsigned int flags, CUdevice dev)
{
    (void)params;
    return ctx_create(pctx, flags, dev);
}

FK_API CUresult CUDAAPI cuCtxDestroy_v2(CUcontext h)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_ctx *c = (fk_ctx *)h;
    if (!c || !ctx_known(c) || c->primary)
        return state_leave(CUDA_ERROR_INVALID_CONTEXT);
    if (!c->alive)
        return state_leave(CUDA_ERROR_CONTEXT_IS_DESTROYED);
    c->alive = false;
    ctx_teardown(c);
    if (tl_depth > 0 && tl_stack[tl_depth - 1] == c) /* popped if current, as documented */
        tl_depth--;
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ peer access */

FK_API CUresult CUDAAPI cuCtxEnablePeerAccess(CUcontext peer, unsigned int flags)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_ctx *c, *p = (fk_ctx *)peer;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    if (flags)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (!p || !ctx_known(p) || !p->alive)
        return state_leave(CUDA_ERROR_INVALID_CONTEXT);
    if (p->dev == c->dev)
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    if (c->peers & (1u << p->dev))
        return state_leave(CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED);
    c->peers |= 1u << p->dev;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuCtxDisablePeerAccess(CUcontext peer)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_ctx *c, *p = (fk_ctx *)peer;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    if (!p || !ctx_known(p) || !p->alive)
        return state_leave(CUDA_ERROR_INVALID_CONTEXT);
    if (p->dev == c->dev || !(c->peers & (1u << p->dev)))
        return state_leave(CUDA_ERROR_PEER_ACCESS_NOT_ENABLED);
    c->peers &= ~(1u << p->dev);
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ the context stack */

FK_API CUresult CUDAAPI cuCtxSetCurrent(CUcontext h)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_ctx *c = (fk_ctx *)h;
    if (c && (!ctx_known(c) || !c->alive))
        return state_leave(CUDA_ERROR_INVALID_CONTEXT);
    if (!c) { /* NULL pops, as documented */
        if (tl_depth > 0)
            tl_depth--;
    } else if (tl_depth == 0) {
        tl_stack[tl_depth++] = c;
    } else {
        tl_stack[tl_depth - 1] = c;
    }
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuCtxGetCurrent(CUcontext *pctx)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!pctx)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    *pctx = tl_depth ? (CUcontext)tl_stack[tl_depth - 1] : NULL;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuCtxPushCurrent_v2(CUcontext h)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_ctx *c = (fk_ctx *)h;
    if (!c || !ctx_known(c) || !c->alive)
        return state_leave(CUDA_ERROR_INVALID_CONTEXT);
    if (tl_depth == FK_STACK_MAX)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    tl_stack[tl_depth++] = c;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuCtxPopCurrent_v2(CUcontext *pctx)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (tl_depth == 0)
        return state_leave(CUDA_ERROR_INVALID_CONTEXT);
    fk_ctx *c = tl_stack[--tl_depth];
    if (pctx)
        *pctx = (CUcontext)c;
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ queries and synchronize */

FK_API CUresult CUDAAPI cuCtxGetId(CUcontext h, unsigned long long *id)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!id)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = ctx_arg(h, &c)))
        return state_leave(r);
    *id = c->id;
    return state_leave(CUDA_SUCCESS);
}

static CUresult ctx_get_device(CUdevice *dev, CUcontext h)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!dev)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = ctx_arg(h, &c)))
        return state_leave(r);
    *dev = c->dev;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuCtxGetDevice(CUdevice *dev)
{
    return ctx_get_device(dev, NULL);
}

FK_API CUresult CUDAAPI cuCtxGetDevice_v2(CUdevice *dev, CUcontext ctx)
{
    return ctx_get_device(dev, ctx);
}

static CUresult ctx_synchronize(CUcontext h)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_ctx *c;
    if ((r = ctx_arg(h, &c)))
        return state_leave(r);
    g_cnt.ctx_sync_calls++;
    if (stream_capture_forbids_sync())
        return state_leave(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    return state_leave(stream_wait_ctx(c));
}

FK_API CUresult CUDAAPI cuCtxSynchronize(void)
{
    return ctx_synchronize(NULL);
}

FK_API CUresult CUDAAPI cuCtxSynchronize_v2(CUcontext ctx)
{
    return ctx_synchronize(ctx);
}

/* ================================================================ the old ABI */

/* The pre-CUDA-11 ABI of the primary-context calls and the pre-4.0 cuCtxDestroy: cudart 13 still
 * asks cuGetProcAddress for "cuDevicePrimaryCtxRelease"/"Reset" at version 7000 and gets these. */
#undef cuDevicePrimaryCtxRelease
#undef cuDevicePrimaryCtxReset
#undef cuCtxDestroy
/* Called through hidden aliases: a call to the exported v2 names would go through the PLT to a
 * preloaded shim's hook, and the shim must see only the v1 entry point it was handed. */
extern __typeof__(cuDevicePrimaryCtxRelease_v2) ctx_primary_release
    __attribute__((alias("cuDevicePrimaryCtxRelease_v2"), visibility("hidden")));
extern __typeof__(cuDevicePrimaryCtxReset_v2) ctx_primary_reset
    __attribute__((alias("cuDevicePrimaryCtxReset_v2"), visibility("hidden")));
extern __typeof__(cuCtxDestroy_v2) ctx_destroy __attribute__((alias("cuCtxDestroy_v2"), visibility("hidden")));
FK_API CUresult CUDAAPI cuDevicePrimaryCtxRelease(CUdevice dev) { return ctx_primary_release(dev); }
FK_API CUresult CUDAAPI cuDevicePrimaryCtxReset(CUdevice dev) { return ctx_primary_reset(dev); }
FK_API CUresult CUDAAPI cuCtxDestroy(CUcontext ctx) { return ctx_destroy(ctx); }

/* ================================================================ cuGetProcAddress rows */

#define CTX_PROCS(X)                                                              \
    X("cuDevicePrimaryCtxRetain", 7000, 0, cuDevicePrimaryCtxRetain)              \
    X("cuDevicePrimaryCtxRelease", 7000, 0, cuDevicePrimaryCtxRelease)            \
    X("cuDevicePrimaryCtxRelease", 11000, 0, cuDevicePrimaryCtxRelease_v2)        \
    X("cuDevicePrimaryCtxReset", 7000, 0, cuDevicePrimaryCtxReset)                \
    X("cuDevicePrimaryCtxReset", 11000, 0, cuDevicePrimaryCtxReset_v2)            \
    X("cuDevicePrimaryCtxGetState", 7000, 0, cuDevicePrimaryCtxGetState)          \
    X("cuDevicePrimaryCtxSetFlags", 11000, 0, cuDevicePrimaryCtxSetFlags_v2)      \
    X("cuCtxCreate", 3020, 0, cuCtxCreate_v2)                                     \
    X("cuCtxCreate", 11040, 0, cuCtxCreate_v3)                                    \
    X("cuCtxCreate", 12050, 0, cuCtxCreate_v4)                                    \
    X("cuCtxDestroy", 2000, 0, cuCtxDestroy)                                      \
    X("cuCtxDestroy", 4000, 0, cuCtxDestroy_v2)                                   \
    X("cuCtxEnablePeerAccess", 4000, 0, cuCtxEnablePeerAccess)                    \
    X("cuCtxDisablePeerAccess", 4000, 0, cuCtxDisablePeerAccess)                  \
    X("cuCtxSetCurrent", 4000, 0, cuCtxSetCurrent)                                \
    X("cuCtxGetCurrent", 4000, 0, cuCtxGetCurrent)                                \
    X("cuCtxPushCurrent", 4000, 0, cuCtxPushCurrent_v2)                           \
    X("cuCtxPopCurrent", 4000, 0, cuCtxPopCurrent_v2)                             \
    X("cuCtxGetDevice", 2000, 0, cuCtxGetDevice)                                  \
    X("cuCtxGetId", 12000, 0, cuCtxGetId)                                         \
    X("cuCtxGetDevice", 13000, 0, cuCtxGetDevice_v2)                              \
    X("cuCtxSynchronize", 2000, 0, cuCtxSynchronize)                              \
    X("cuCtxSynchronize", 13000, 0, cuCtxSynchronize_v2)
FK_PROC_TABLE(ctx_procs, CTX_PROCS);
