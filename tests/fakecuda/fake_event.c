/* fake_event.c: events (cuEvent*) and cuStreamWaitEvent.
 *
 * An event counts its records: cuEventRecord queues a W_EVENT marker carrying the next record
 * number (rec_gen), and the marker, when its stream reaches it, raises done_gen; the event is
 * complete when done_gen has caught up with rec_gen. cuStreamWaitEvent queues a W_WAIT item that
 * holds its stream until the record it saw has run. Markers and waiters hold references, so a
 * destroyed event lives on until the last of them has run (event_unref frees it). */
#include "fake_internal.h"

#include <stdlib.h>

/* ================================================================ lifetime */

void event_unref(fk_event *e)
{
    if (--e->refs > 0)
        return;
    fk_event **pp = &g_events;
    while (*pp && *pp != e)
        pp = &(*pp)->next;
    if (*pp)
        *pp = e->next;
    free(e);
}

/* Context teardown: the context's events are destroyed as if by cuEventDestroy. */
void event_free_ctx(fk_ctx *c)
{
    for (fk_event *e = g_events, *next; e; e = next) {
        next = e->next;
        if (e->ctx == c && !e->destroyed) {
            e->destroyed = true;
            event_unref(e);
        }
    }
}

static fk_event *event_lookup(CUevent h)
{
    for (fk_event *e = g_events; e; e = e->next)
        if (e == (fk_event *)h && !e->destroyed)
            return e;
    return NULL;
}

/* ================================================================ entry points */

FK_API CUresult CUDAAPI cuEventCreate(CUevent *ph, unsigned int flags)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!ph || (flags & ~0xFu))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    fk_event *e = calloc(1, sizeof *e);
    if (!e)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    e->ctx = c;
    e->refs = 1;
    e->next = g_events;
    g_events = e;
    *ph = (CUevent)e;
    return state_leave(CUDA_SUCCESS);
}

/* A marker in the stream: the event completes when the stream reaches it. */
static CUresult event_record(CUevent h, CUstream hs, bool ptds)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_event *e = event_lookup(h);
    if (!e)
        return state_leave(CUDA_ERROR_INVALID_HANDLE);
    fk_stream *s;
    if ((r = stream_resolve(hs, ptds, &s)))
        return state_leave(r);
    g_cnt.event_record_calls++;
    fk_work w = {.kind = W_EVENT, .ev = e, .gen = e->rec_gen + 1};
    if ((r = work_enqueue(s, &w, NULL)))
        return state_leave(r);
    e->rec_gen++;
    e->refs++;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuEventRecord(CUevent h, CUstream s)
{
    return event_record(h, s, false);
}

FK_API CUresult CUDAAPI cuEventRecord_ptsz(CUevent h, CUstream s)
{
    return event_record(h, s, true);
}

FK_API CUresult CUDAAPI cuEventQuery(CUevent h)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_event *e = event_lookup(h);
    if (!e)
        return state_leave(CUDA_ERROR_INVALID_HANDLE);
    return state_leave(e->done_gen >= e->rec_gen ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY);
}

FK_API CUresult CUDAAPI cuEventSynchronize(CUevent h)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_event *e = event_lookup(h);
    if (!e)
        return state_leave(CUDA_ERROR_INVALID_HANDLE);
    uint64_t target = e->rec_gen;
    e->refs++; /* a concurrent destroy must not free it under us */
    while (e->done_gen < target)
        pthread_cond_wait(&g_done, &g_mu);
    event_unref(e);
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuEventDestroy_v2(CUevent h)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_event *e = event_lookup(h);
    if (!e)
        return state_leave(CUDA_ERROR_INVALID_HANDLE);
    e->destroyed = true; /* pending markers keep it until they have run */
    event_unref(e);
    return state_leave(CUDA_SUCCESS);
}

static CUresult event_stream_wait(CUstream hs, CUevent h, unsigned flags, bool ptds)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (flags & ~(unsigned)CU_EVENT_WAIT_EXTERNAL)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_event *e = event_lookup(h);
    if (!e)
        return state_leave(CUDA_ERROR_INVALID_HANDLE);
    fk_stream *s;
    if ((r = stream_resolve(hs, ptds, &s)))
        return state_leave(r);
    if (e->done_gen >= e->rec_gen) /* nothing to wait for */
        return state_leave(CUDA_SUCCESS);
    fk_work w = {.kind = W_WAIT, .ev = e, .gen = e->rec_gen};
    if ((r = work_enqueue(s, &w, NULL)))
        return state_leave(r);
    e->refs++;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuStreamWaitEvent(CUstream s, CUevent ev, unsigned int flags)
{
    return event_stream_wait(s, ev, flags, false);
}

FK_API CUresult CUDAAPI cuStreamWaitEvent_ptsz(CUstream s, CUevent ev, unsigned int flags)
{
    return event_stream_wait(s, ev, flags, true);
}

/* ================================================================ cuGetProcAddress rows */

#define EVENT_PROCS(X)                                                              \
    X("cuStreamWaitEvent", 3020, 0, cuStreamWaitEvent)                              \
    X("cuStreamWaitEvent", 7000, 1, cuStreamWaitEvent_ptsz)                         \
    X("cuEventCreate", 2000, 0, cuEventCreate)                                      \
    X("cuEventRecord", 2000, 0, cuEventRecord)                                      \
    X("cuEventRecord", 7000, 1, cuEventRecord_ptsz)                                 \
    X("cuEventQuery", 2000, 0, cuEventQuery)                                        \
    X("cuEventSynchronize", 2000, 0, cuEventSynchronize)                            \
    X("cuEventDestroy", 4000, 0, cuEventDestroy_v2)
FK_PROC_TABLE(event_procs, EVENT_PROCS);
