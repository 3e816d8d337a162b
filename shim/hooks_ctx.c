/* Contexts and streams: a destroyed or reset context drops its heap (a leak check point); streams
 * the program creates are registered so fast-mode fences cover them; graph capture is tracked so
 * allocations made while a capture is active pass through to the driver. */
#include "shim.h"
#include "gm_pinned.h"
#include "gm_staging.h"

/* ------------------------------------------------------------------ contexts */

/* Everything gpumem keeps per context goes with it: the heap (a leak check point), the pinned
 * blocks the driver frees with the context, the staging stream and buffers. `alive`: the context
 * still exists (before the driver's call), so its resources may be handed back through it. */
static void context_going_away(CUcontext ctx, const char *why, bool alive)
{
    gm_report_context((uintptr_t)ctx, why); /* a leak check point, before the heap goes */
    gm_context_teardown((uintptr_t)ctx, alive);
}

static CUresult ctx_destroy(CUresult (*real)(CUcontext), CUcontext ctx)
{
    if (atomic_load(&shim_ready) && ctx) {
        SHIM_TRACE("cuCtxDestroy ctx=%p", (void *)ctx);
        context_going_away(ctx, "context destroyed", true);
    }
    return real(ctx);
}

CUresult cuCtxDestroy_v2(CUcontext ctx)
{
    SHIM_REQUIRE_REAL(cuCtxDestroy_v2);
    return ctx_destroy(shim_real_cuCtxDestroy_v2, ctx);
}

CUresult cuCtxDestroy(CUcontext ctx)
{
    SHIM_REQUIRE_REAL(cuCtxDestroy);
    return ctx_destroy(shim_real_cuCtxDestroy, ctx);
}

/* The device of context `peer` (made current for the question only); -1 when it cannot be had. */
static int device_of(CUcontext peer)
{
    static CUresult (*push)(CUcontext), (*pop)(CUcontext *), (*get_device)(CUdevice *);
    if (!push) {
        *(void **)&get_device = gm_driver_sym("cuCtxGetDevice");
        *(void **)&pop = gm_driver_sym("cuCtxPopCurrent_v2");
        *(void **)&push = gm_driver_sym("cuCtxPushCurrent_v2");
    }
    CUdevice dev = -1;
    CUcontext ignored;
    if (!push || !pop || !get_device || push(peer) != CUDA_SUCCESS) return -1;
    if (get_device(&dev) != CUDA_SUCCESS) dev = -1;
    pop(&ignored);
    return (int)dev;
}

/* After the driver changed peer access from the current context to `peer` (grant or revoke):
 * the chunks of the peer's expandable segments follow, which cuCtxEnablePeerAccess and
 * cuCtxDisablePeerAccess do not do for VMM memory. */
static void follow_peer_access(const char *what, CUcontext peer, bool grant)
{
    uintptr_t ctx;
    int accessor, peer_dev = device_of(peer);
    if (peer_dev < 0 || gm_mgr.backend->current(&ctx, &accessor) != CUDA_SUCCESS) return;
    SHIM_TRACE("%s peer=%p device %d -> %d", what, (void *)peer, accessor, peer_dev);
    int rc = grant ? gm_vmm_grant_peer((uintptr_t)peer, peer_dev, accessor)
                   : gm_vmm_revoke_peer((uintptr_t)peer, peer_dev, accessor);
    if (rc != GPUMEM_OK)
        gm_log(GM_WARN, "%s: access of device %d to device %d's expandable segments failed (%d)",
               what, accessor, peer_dev, rc);
}

/* Peer access from the current context to `peer`: under GPUMEM_EXPANDABLE=1 the chunks of the
 * peer's expandable segments (mapped now and later) get cuMemSetAccess for the current device. */
CUresult cuCtxEnablePeerAccess(CUcontext peer, unsigned int flags)
{
    SHIM_REQUIRE_REAL(cuCtxEnablePeerAccess);
    CUresult rc = shim_real_cuCtxEnablePeerAccess(peer, flags);
    if (rc == CUDA_SUCCESS && shim_active() && gm_mgr.cfg->expandable)
        follow_peer_access("cuCtxEnablePeerAccess", peer, true);
    return rc;
}

/* Disabled again: the driver takes a peer's access to its ordinary allocations away, so the
 * chunks mapped now lose it too (cuMemSetAccess PROT_NONE for the current device) and chunks
 * mapped later do not get it. */
CUresult cuCtxDisablePeerAccess(CUcontext peer)
{
    SHIM_REQUIRE_REAL(cuCtxDisablePeerAccess);
    CUresult rc = shim_real_cuCtxDisablePeerAccess(peer);
    if (rc == CUDA_SUCCESS && shim_active() && gm_mgr.cfg->expandable)
        follow_peer_access("cuCtxDisablePeerAccess", peer, false);
    return rc;
}

/* The primary context of `dev` if it is active, without changing its reference count. */
static CUcontext active_primary(CUdevice dev)
{
    static CUresult (*get_state)(CUdevice, unsigned *, int *);
    static CUresult (*retain)(CUcontext *, CUdevice);
    static CUresult (*release)(CUdevice);
    if (!get_state) {
        *(void **)&retain = gm_driver_sym("cuDevicePrimaryCtxRetain");
        *(void **)&release = gm_driver_sym("cuDevicePrimaryCtxRelease_v2");
        *(void **)&get_state = gm_driver_sym("cuDevicePrimaryCtxGetState");
    }
    unsigned flags = 0;
    int active = 0;
    CUcontext ctx = NULL;
    if (!get_state || !retain || !release || get_state(dev, &flags, &active) != CUDA_SUCCESS || !active)
        return NULL;
    if (retain(&ctx, dev) != CUDA_SUCCESS) return NULL;
    release(dev);
    return ctx;
}

static bool primary_still_active(CUdevice dev)
{
    unsigned flags = 0;
    int active = 0;
    CUresult (*get_state)(CUdevice, unsigned *, int *);
    *(void **)&get_state = gm_driver_sym("cuDevicePrimaryCtxGetState");
    return get_state && get_state(dev, &flags, &active) == CUDA_SUCCESS && active;
}

/* cudaDeviceReset: the context and everything in it goes away now. */
static CUresult primary_reset(CUresult (*real)(CUdevice), CUdevice dev)
{
    if (atomic_load(&shim_ready)) {
        SHIM_TRACE("cuDevicePrimaryCtxReset dev=%d", dev);
        CUcontext ctx = active_primary(dev);
        if (ctx) context_going_away(ctx, "device reset", true);
    }
    return real(dev);
}

CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev)
{
    SHIM_REQUIRE_REAL(cuDevicePrimaryCtxReset_v2);
    return primary_reset(shim_real_cuDevicePrimaryCtxReset_v2, dev);
}

CUresult cuDevicePrimaryCtxReset(CUdevice dev)
{
    SHIM_REQUIRE_REAL(cuDevicePrimaryCtxReset);
    return primary_reset(shim_real_cuDevicePrimaryCtxReset, dev);
}

/* Only the last release destroys the context: check afterwards, and forget the heap without
 * calling the driver for a context that no longer exists. */
static CUresult primary_release(CUresult (*real)(CUdevice), CUdevice dev)
{
    CUcontext ctx = atomic_load(&shim_ready) ? active_primary(dev) : NULL;
    CUresult rc = real(dev);
    if (rc == CUDA_SUCCESS && ctx && !primary_still_active(dev)) {
        SHIM_TRACE("cuDevicePrimaryCtxRelease_v2 dev=%d destroyed the primary context", dev);
        context_going_away(ctx, "primary context released", false);
    }
    return rc;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    SHIM_REQUIRE_REAL(cuDevicePrimaryCtxRelease_v2);
    return primary_release(shim_real_cuDevicePrimaryCtxRelease_v2, dev);
}

CUresult cuDevicePrimaryCtxRelease(CUdevice dev)
{
    SHIM_REQUIRE_REAL(cuDevicePrimaryCtxRelease);
    return primary_release(shim_real_cuDevicePrimaryCtxRelease, dev);
}

/* ------------------------------------------------------------------ streams */

static void register_stream(CUstream s, unsigned flags)
{
    uintptr_t ctx;
    int device;
    if (atomic_load(&shim_ready) && gm_mgr.backend->current(&ctx, &device) == CUDA_SUCCESS)
        gm_cuda_stream_created(ctx, (uintptr_t)s, flags);
}

CUresult cuStreamCreate(CUstream *stream, unsigned int flags)
{
    SHIM_REQUIRE_REAL(cuStreamCreate);
    CUresult rc = shim_real_cuStreamCreate(stream, flags);
    if (rc == CUDA_SUCCESS) register_stream(*stream, flags);
    return rc;
}

CUresult cuStreamCreateWithPriority(CUstream *stream, unsigned int flags, int priority)
{
    SHIM_REQUIRE_REAL(cuStreamCreateWithPriority);
    CUresult rc = shim_real_cuStreamCreateWithPriority(stream, flags, priority);
    if (rc == CUDA_SUCCESS) register_stream(*stream, flags);
    return rc;
}

CUresult cuStreamDestroy_v2(CUstream stream)
{
    SHIM_REQUIRE_REAL(cuStreamDestroy_v2);
    if (atomic_load(&shim_ready)) gm_cuda_stream_destroyed((uintptr_t)stream);
    return shim_real_cuStreamDestroy_v2(stream);
}

/* ------------------------------------------------------------------ graph capture */

#define MAX_CAPTURES 256
static pthread_mutex_t capture_lock = PTHREAD_MUTEX_INITIALIZER;
static uintptr_t capturing[MAX_CAPTURES];
static _Atomic int ncapturing;

bool shim_capture_active(void)
{
    return atomic_load_explicit(&ncapturing, memory_order_acquire) > 0;
}

static void capture_began(uintptr_t stream)
{
    pthread_mutex_lock(&capture_lock);
    int n = atomic_load(&ncapturing);
    if (n < MAX_CAPTURES) capturing[n] = stream;
    atomic_store(&ncapturing, n + 1);
    gm_capture_note(true);
    pthread_mutex_unlock(&capture_lock);
}

static void capture_ended(uintptr_t stream)
{
    pthread_mutex_lock(&capture_lock);
    int n = atomic_load(&ncapturing);
    for (int i = 0; i < n && i < MAX_CAPTURES; i++) {
        if (capturing[i] == stream) {
            capturing[i] = capturing[n - 1 < MAX_CAPTURES ? n - 1 : MAX_CAPTURES - 1];
            atomic_store(&ncapturing, n - 1);
            gm_capture_note(false);
            break;
        }
    }
    pthread_mutex_unlock(&capture_lock);
}

static uintptr_t capture_key(CUstream s, bool per_thread)
{
    /* The per-thread default stream is a different stream on every thread. */
    return (!s && per_thread) ? (uintptr_t)pthread_self() | 1 : (uintptr_t)s;
}

CUresult cuStreamBeginCapture_v2(CUstream stream, CUstreamCaptureMode mode)
{
    SHIM_REQUIRE_REAL(cuStreamBeginCapture_v2);
    gm_capture_begin_lock(); /* no fence record overlaps the capture's start */
    CUresult rc = shim_real_cuStreamBeginCapture_v2(stream, mode);
    if (rc == CUDA_SUCCESS) capture_began(capture_key(stream, false));
    gm_capture_begin_unlock();
    return rc;
}

CUresult cuStreamBeginCapture_v2_ptsz(CUstream stream, CUstreamCaptureMode mode)
{
    SHIM_REQUIRE_REAL(cuStreamBeginCapture_v2_ptsz);
    gm_capture_begin_lock(); /* no fence record overlaps the capture's start */
    CUresult rc = shim_real_cuStreamBeginCapture_v2_ptsz(stream, mode);
    if (rc == CUDA_SUCCESS) capture_began(capture_key(stream, true));
    gm_capture_begin_unlock();
    return rc;
}

CUresult cuStreamBeginCaptureToGraph(CUstream stream, CUgraph graph, const CUgraphNode *deps,
                                     const CUgraphEdgeData *edge_data, size_t ndeps,
                                     CUstreamCaptureMode mode)
{
    SHIM_REQUIRE_REAL(cuStreamBeginCaptureToGraph);
    gm_capture_begin_lock(); /* no fence record overlaps the capture's start */
    CUresult rc = shim_real_cuStreamBeginCaptureToGraph(stream, graph, deps, edge_data, ndeps, mode);
    if (rc == CUDA_SUCCESS) capture_began(capture_key(stream, false));
    gm_capture_begin_unlock();
    return rc;
}

CUresult cuStreamBeginCaptureToGraph_ptsz(CUstream stream, CUgraph graph, const CUgraphNode *deps,
                                          const CUgraphEdgeData *edge_data, size_t ndeps,
                                          CUstreamCaptureMode mode)
{
    SHIM_REQUIRE_REAL(cuStreamBeginCaptureToGraph_ptsz);
    gm_capture_begin_lock(); /* no fence record overlaps the capture's start */
    CUresult rc = shim_real_cuStreamBeginCaptureToGraph_ptsz(stream, graph, deps, edge_data, ndeps, mode);
    if (rc == CUDA_SUCCESS) capture_began(capture_key(stream, true));
    gm_capture_begin_unlock();
    return rc;
}

/* The capture ends whatever EndCapture returns (an invalidated capture is still over). */
CUresult cuStreamEndCapture(CUstream stream, CUgraph *graph)
{
    SHIM_REQUIRE_REAL(cuStreamEndCapture);
    CUresult rc = shim_real_cuStreamEndCapture(stream, graph);
    capture_ended(capture_key(stream, false));
    return rc;
}

CUresult cuStreamEndCapture_ptsz(CUstream stream, CUgraph *graph)
{
    SHIM_REQUIRE_REAL(cuStreamEndCapture_ptsz);
    CUresult rc = shim_real_cuStreamEndCapture_ptsz(stream, graph);
    capture_ended(capture_key(stream, true));
    return rc;
}
