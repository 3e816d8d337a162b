/* fake_stream.c: streams. The stream registry (g_streams), what a CUstream handle means (the
 * legacy stream, the per-thread default stream, a created stream), waiting for a stream or for a
 * whole context, stream capture, and the cuStream* entry points (cuStreamWaitEvent is with the
 * events, in fake_event.c).
 *
 * A stream's queue and its worker thread are in fake_work.c. A destroyed stream is only retired:
 * its worker drains the queue and then frees it, so work queued before cuStreamDestroy still
 * runs, as on the real driver. */
#include "fake_internal.h"

#include <stdlib.h>

static pthread_once_t stream_ptds_once = PTHREAD_ONCE_INIT;
static pthread_key_t stream_ptds_key;

/* ================================================================ registry */

fk_stream *stream_new(fk_ctx *c, bool legacy, const void *owner)
{
    fk_stream *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->uid = g_next_id++;
    s->ctx = c;
    s->legacy = legacy;
    s->owner = owner;
    pthread_cond_init(&s->cv, NULL);
    s->next = g_streams;
    g_streams = s;
    return s;
}

void stream_unlink_free(fk_stream *s)
{
    fk_stream **pp = &g_streams;
    while (*pp && *pp != s)
        pp = &(*pp)->next;
    if (*pp)
        *pp = s->next;
    pthread_cond_destroy(&s->cv);
    free(s);
}

/* Still registered and the same stream (uid guards against a reused address). */
static bool stream_alive(const fk_stream *s, uint64_t uid)
{
    for (fk_stream *x = g_streams; x; x = x->next)
        if (x == s && x->uid == uid)
            return true;
    return false;
}

/* Let the worker drain and free the stream; without a worker nothing is pending. */
void stream_retire(fk_stream *s)
{
    s->destroyed = true;
    s->stop = true;
    if (s->worker)
        pthread_cond_signal(&s->cv);
    else
        stream_unlink_free(s);
}

/* ================================================================ per-thread default streams */

/* Thread exit: retire the thread's per-thread default streams. */
static void stream_ptds_thread_exit(void *token)
{
    LOCK();
    for (fk_stream *s = g_streams, *next; s; s = next) {
        next = s->next;
        if (s->owner == token && !s->destroyed)
            stream_retire(s);
    }
    UNLOCK();
}

static void stream_ptds_key_init(void)
{
    pthread_key_create(&stream_ptds_key, stream_ptds_thread_exit);
}

/* The calling thread's per-thread default stream in c, created on first use. */
static fk_stream *stream_ptds(fk_ctx *c)
{
    for (fk_stream *s = g_streams; s; s = s->next)
        if (s->ctx == c && s->owner == &tl_token && !s->destroyed)
            return s;
    pthread_once(&stream_ptds_once, stream_ptds_key_init);
    pthread_setspecific(stream_ptds_key, &tl_token);
    return stream_new(c, false, &tl_token);
}

/* ================================================================ handles */

/* Map a stream handle to a stream. 0 means the legacy stream for the classic entry points and
 * the per-thread stream for _ptsz/_ptds ones; 1 and 2 name those two explicitly. */
CUresult stream_resolve(CUstream h, bool ptds, fk_stream **out)
{
    if (!h)
        h = ptds ? CU_STREAM_PER_THREAD : CU_STREAM_LEGACY;
    if (h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD) {
        fk_ctx *c;
        CUresult r = ctx_current(&c);
        if (r)
            return r;
        *out = h == CU_STREAM_LEGACY ? c->legacy : stream_ptds(c);
        return *out ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
    }
    for (fk_stream *s = g_streams; s; s = s->next) {
        if (s == (fk_stream *)h && !s->destroyed && !s->legacy && !s->owner) {
            *out = s;
            return CUDA_SUCCESS;
        }
    }
    return CUDA_ERROR_INVALID_HANDLE;
}

/* ================================================================ waiting */

/* Wait until work up to `target` has run or the stream is gone (it drains before it goes). */
void stream_wait_until(fk_stream *s, uint64_t target)
{
    uint64_t uid = s->uid;
    while (stream_alive(s, uid) && s->done_seq < target)
        pthread_cond_wait(&g_done, &g_mu);
}

/* Wait for all work queued in c's streams up to now (later submissions are not waited for). */
CUresult stream_wait_ctx(fk_ctx *c)
{
    size_t n = 0, i = 0;
    for (fk_stream *s = g_streams; s; s = s->next)
        n += s->ctx == c;
    if (n == 0)
        return CUDA_SUCCESS;
    struct snap { fk_stream *s; uint64_t uid, target; } *v = malloc(n * sizeof *v);
    if (!v)
        return CUDA_ERROR_OUT_OF_MEMORY;
    for (fk_stream *s = g_streams; s; s = s->next)
        if (s->ctx == c)
            v[i++] = (struct snap){s, s->uid, s->enq_seq};
    for (i = 0; i < n; i++) {
        while (stream_alive(v[i].s, v[i].uid) && v[i].s->done_seq < v[i].target)
            pthread_cond_wait(&g_done, &g_mu);
    }
    free(v);
    return CUDA_SUCCESS;
}

/* Is a synchronising call from this thread illegal because of an active capture? */
bool stream_capture_forbids_sync(void)
{
    for (fk_stream *s = g_streams; s; s = s->next) {
        if (!s->capturing)
            continue;
        if (s->capture_mode == CU_STREAM_CAPTURE_MODE_GLOBAL)
            return true;
        if (s->capture_mode == CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
            s->capture_thread == &tl_token)
            return true;
    }
    return false;
}

/* ================================================================ create and destroy */

static CUresult stream_create(CUstream *ph, unsigned flags)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!ph || (flags & ~(unsigned)CU_STREAM_NON_BLOCKING))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    fk_stream *s = stream_new(c, false, NULL);
    if (!s)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    *ph = (CUstream)s;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuStreamCreate(CUstream *ph, unsigned int flags)
{
    return stream_create(ph, flags);
}

FK_API CUresult CUDAAPI cuStreamCreateWithPriority(CUstream *ph, unsigned int flags, int priority)
{
    (void)priority; /* one queue per stream: priorities change nothing here */
    return stream_create(ph, flags);
}

FK_API CUresult CUDAAPI cuStreamDestroy_v2(CUstream h)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_stream *s;
    if (h == NULL || h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD)
        return state_leave(CUDA_ERROR_INVALID_HANDLE);
    if ((r = stream_resolve(h, false, &s)))
        return state_leave(r);
    stream_retire(s); /* returns at once; queued work still runs, like the real driver */
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ synchronize and query */

static CUresult stream_sync(CUstream h, bool ptds)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_stream *s;
    if ((r = stream_resolve(h, ptds, &s)))
        return state_leave(r);
    g_cnt.stream_sync_calls++;
    if (s->capturing)
        return state_leave(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    stream_wait_until(s, s->enq_seq);
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuStreamSynchronize(CUstream h)
{
    return stream_sync(h, false);
}

FK_API CUresult CUDAAPI cuStreamSynchronize_ptsz(CUstream h)
{
    return stream_sync(h, true);
}

static CUresult stream_query(CUstream h, bool ptds)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_stream *s;
    if ((r = stream_resolve(h, ptds, &s)))
        return state_leave(r);
    if (s->capturing)
        return state_leave(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    return state_leave(s->done_seq == s->enq_seq ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY);
}

FK_API CUresult CUDAAPI cuStreamQuery(CUstream h)
{
    return stream_query(h, false);
}

FK_API CUresult CUDAAPI cuStreamQuery_ptsz(CUstream h)
{
    return stream_query(h, true);
}

/* ================================================================ capture */

static CUresult stream_is_capturing(CUstream h, CUstreamCaptureStatus *st, bool ptds)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!st)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_stream *s;
    if ((r = stream_resolve(h, ptds, &s)))
        return state_leave(r);
    *st = s->capturing ? CU_STREAM_CAPTURE_STATUS_ACTIVE : CU_STREAM_CAPTURE_STATUS_NONE;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuStreamIsCapturing(CUstream h, CUstreamCaptureStatus *st)
{
    return stream_is_capturing(h, st, false);
}

FK_API CUresult CUDAAPI cuStreamIsCapturing_ptsz(CUstream h, CUstreamCaptureStatus *st)
{
    return stream_is_capturing(h, st, true);
}

/* `into`: the graph of cuStreamBeginCaptureToGraph, NULL for a new one. */
static CUresult stream_begin_capture(CUstream h, CUstreamCaptureMode mode, bool ptds, CUgraph into)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if ((unsigned)mode > CU_STREAM_CAPTURE_MODE_RELAXED || (into && !graph_valid(into)))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_stream *s;
    if ((r = stream_resolve(h, ptds, &s)))
        return state_leave(r);
    if (s->legacy) /* the legacy stream cannot be captured */
        return state_leave(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    if (s->capturing)
        return state_leave(CUDA_ERROR_ILLEGAL_STATE);
    CUgraph g = into ? into : graph_new_for_capture();
    if (!g)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    s->capturing = true;
    s->capture_graph = g;
    s->capture_id = g_next_id++;
    s->capture_mode = mode;
    s->capture_thread = &tl_token;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuStreamBeginCapture_v2(CUstream h, CUstreamCaptureMode mode)
{
    return stream_begin_capture(h, mode, false, NULL);
}

FK_API CUresult CUDAAPI cuStreamBeginCapture_v2_ptsz(CUstream h, CUstreamCaptureMode mode)
{
    return stream_begin_capture(h, mode, true, NULL);
}

/* Capture into an existing graph (which stays empty, as every captured graph of the fake). */
FK_API CUresult CUDAAPI cuStreamBeginCaptureToGraph(CUstream h, CUgraph graph, const CUgraphNode *deps,
                                                    const CUgraphEdgeData *edge_data, size_t ndeps,
                                                    CUstreamCaptureMode mode)
{
    (void)edge_data;
    if (!graph || (ndeps && !deps))
        return CUDA_ERROR_INVALID_VALUE;
    return stream_begin_capture(h, mode, false, graph);
}

FK_API CUresult CUDAAPI cuStreamBeginCaptureToGraph_ptsz(CUstream h, CUgraph graph,
                                                         const CUgraphNode *deps,
                                                         const CUgraphEdgeData *edge_data,
                                                         size_t ndeps, CUstreamCaptureMode mode)
{
    (void)edge_data;
    if (!graph || (ndeps && !deps))
        return CUDA_ERROR_INVALID_VALUE;
    return stream_begin_capture(h, mode, true, graph);
}

/* Ends the capture and hands out its graph. */
static CUresult stream_end_capture(CUstream h, CUgraph *graph, bool ptds)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!graph)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_stream *s;
    if ((r = stream_resolve(h, ptds, &s)))
        return state_leave(r);
    if (!s->capturing)
        return state_leave(CUDA_ERROR_ILLEGAL_STATE);
    s->capturing = false;
    *graph = s->capture_graph;
    s->capture_graph = NULL;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuStreamEndCapture(CUstream h, CUgraph *graph)
{
    return stream_end_capture(h, graph, false);
}

FK_API CUresult CUDAAPI cuStreamEndCapture_ptsz(CUstream h, CUgraph *graph)
{
    return stream_end_capture(h, graph, true);
}

/* What the capture is building: no nodes to depend on in the fake's graphs. */
static CUresult stream_capture_info(CUstream h, CUstreamCaptureStatus *st, cuuint64_t *id, CUgraph *graph,
                                    const CUgraphNode **deps, const CUgraphEdgeData **edges, size_t *ndeps,
                                    bool ptds)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!st)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_stream *s;
    if ((r = stream_resolve(h, ptds, &s)))
        return state_leave(r);
    *st = s->capturing ? CU_STREAM_CAPTURE_STATUS_ACTIVE : CU_STREAM_CAPTURE_STATUS_NONE;
    if (s->capturing) {
        if (id)
            *id = s->capture_id;
        if (graph)
            *graph = s->capture_graph;
        if (deps)
            *deps = NULL;
        if (edges)
            *edges = NULL;
        if (ndeps)
            *ndeps = 0;
    }
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuStreamGetCaptureInfo_v3(CUstream h, CUstreamCaptureStatus *st, cuuint64_t *id,
                                                  CUgraph *graph, const CUgraphNode **deps,
                                                  const CUgraphEdgeData **edges, size_t *ndeps)
{
    return stream_capture_info(h, st, id, graph, deps, edges, ndeps, false);
}

FK_API CUresult CUDAAPI cuStreamGetCaptureInfo_v3_ptsz(CUstream h, CUstreamCaptureStatus *st, cuuint64_t *id,
                                                       CUgraph *graph, const CUgraphNode **deps,
                                                       const CUgraphEdgeData **edges, size_t *ndeps)
{
    return stream_capture_info(h, st, id, graph, deps, edges, ndeps, true);
}

/* ================================================================ cuGetProcAddress rows */

#define STREAM_PROCS(X)                                                             \
    X("cuStreamCreate", 2000, 0, cuStreamCreate)                                    \
    X("cuStreamCreateWithPriority", 5050, 0, cuStreamCreateWithPriority)            \
    X("cuStreamDestroy", 4000, 0, cuStreamDestroy_v2)                               \
    X("cuStreamSynchronize", 2000, 0, cuStreamSynchronize)                          \
    X("cuStreamSynchronize", 7000, 1, cuStreamSynchronize_ptsz)                     \
    X("cuStreamQuery", 2000, 0, cuStreamQuery)                                      \
    X("cuStreamQuery", 7000, 1, cuStreamQuery_ptsz)                                 \
    X("cuStreamIsCapturing", 10000, 0, cuStreamIsCapturing)                         \
    X("cuStreamIsCapturing", 10000, 1, cuStreamIsCapturing_ptsz)                    \
    X("cuStreamBeginCapture", 10010, 0, cuStreamBeginCapture_v2)                    \
    X("cuStreamBeginCapture", 10010, 1, cuStreamBeginCapture_v2_ptsz)               \
    X("cuStreamBeginCaptureToGraph", 12030, 0, cuStreamBeginCaptureToGraph)         \
    X("cuStreamBeginCaptureToGraph", 12030, 1, cuStreamBeginCaptureToGraph_ptsz)    \
    X("cuStreamEndCapture", 10000, 0, cuStreamEndCapture)                           \
    X("cuStreamEndCapture", 10000, 1, cuStreamEndCapture_ptsz)                      \
    X("cuStreamGetCaptureInfo", 12030, 0, cuStreamGetCaptureInfo_v3)                \
    X("cuStreamGetCaptureInfo", 12030, 1, cuStreamGetCaptureInfo_v3_ptsz)
FK_PROC_TABLE(stream_procs, STREAM_PROCS);
