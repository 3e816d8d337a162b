/* fake_work.c: the engine. What each kind of work item does (copy, memset, a test's "kernel",
 * an event marker, an event wait, a stream-ordered free), the worker thread that runs one
 * stream's queue in order, and work_enqueue, the only way work gets onto a stream.
 *
 * A worker moves the bytes of an item without the lock, like a real copy engine, and takes the
 * lock for the bookkeeping around it; g_done is broadcast after every item, which is what all
 * the waits of the fake (stream, context, event) sleep on. */
#include "fake_internal.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ================================================================ running one item */

static void work_fill_halves(uintptr_t dst, uint16_t v, size_t halves)
{
    uint16_t *p = (uint16_t *)dst;
    for (size_t i = 0; i < halves; i++)
        p[i] = v;
}

static void work_fill_words(uintptr_t dst, uint32_t v, size_t words)
{
    uint32_t *p = (uint32_t *)dst;
    for (size_t i = 0; i < words; i++)
        p[i] = v;
}

static void work_sleep_us(unsigned us)
{
    struct timespec ts = {us / 1000000u, (long)(us % 1000000u) * 1000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

/* The data-moving part of a work item, run without the lock like a real engine would. */
static void work_run_unlocked(const fk_work *w)
{
    switch (w->kind) {
    case W_COPY:
        if (w->delay_us)
            work_sleep_us(w->delay_us);
        memmove((void *)w->dst, (const void *)w->src, w->n);
        break;
    case W_SET8: memset((void *)w->dst, (int)w->val, w->n); break;
    case W_SET16: work_fill_halves(w->dst, (uint16_t)w->val, w->n); break;
    case W_SET32: work_fill_words(w->dst, w->val, w->n); break;
    case W_FILL:
        work_sleep_us(w->delay_us);
        memset((void *)w->dst, (int)w->val, w->n);
        break;
    default: break;
    }
}

/* The bookkeeping part of a work item, run with the lock held. */
static void work_run_locked(const fk_work *w)
{
    switch (w->kind) {
    case W_EVENT:
        if (w->ev->done_gen < w->gen)
            w->ev->done_gen = w->gen;
        event_unref(w->ev);
        break;
    case W_WAIT: /* cuStreamWaitEvent: hold this stream until the event's record has run */
        while (w->ev->done_gen < w->gen)
            pthread_cond_wait(&g_done, &g_mu);
        event_unref(w->ev);
        break;
    case W_FREE: {
        fk_alloc *a = mem_find_base(w->dst);
        if (a && a->id == w->alloc_id) /* its context may have been torn down meanwhile */
            mem_release(a);
        break;
    }
    case W_COPY:
        g_copies_pending--;
        free(w->owned);
        break;
    default: break;
    }
}

/* ================================================================ the worker thread */

static void *work_thread_main(void *arg)
{
    fk_stream *s = arg;
    LOCK();
    for (;;) {
        while (!s->head && !s->stop)
            pthread_cond_wait(&s->cv, &g_mu);
        fk_work *w = s->head;
        if (!w)
            break; /* stopped and drained */
        s->head = w->next;
        if (!s->head)
            s->tail = NULL;
        UNLOCK();
        work_run_unlocked(w);
        LOCK();
        work_run_locked(w);
        s->done_seq = w->seq;
        free(w);
        pthread_cond_broadcast(&g_done);
    }
    stream_unlink_free(s); /* a retired stream frees itself once drained */
    pthread_cond_broadcast(&g_done);
    UNLOCK();
    return NULL;
}

/* Detached, with signals blocked so the program's handlers run on its own threads. */
static bool work_thread_start(fk_stream *s)
{
    pthread_attr_t attr;
    sigset_t all, old;
    pthread_t t;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&t, &attr, work_thread_main, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return rc == 0;
}

/* ================================================================ enqueue */

/* Append a copy of *tmpl to the stream; *seq_out gets its sequence number. The stream's worker
 * is started by its first item. Called with g_mu held. */
CUresult work_enqueue(fk_stream *s, const fk_work *tmpl, uint64_t *seq_out)
{
    fk_work *w = malloc(sizeof *w);
    if (!w)
        return CUDA_ERROR_OUT_OF_MEMORY;
    if (!s->worker) {
        if (!work_thread_start(s)) {
            free(w);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        s->worker = true;
    }
    *w = *tmpl;
    w->next = NULL;
    w->seq = ++s->enq_seq;
    if (w->kind == W_COPY)
        g_copies_pending++;
    if (s->tail)
        s->tail->next = w;
    else
        s->head = w;
    s->tail = w;
    if (seq_out)
        *seq_out = w->seq;
    pthread_cond_signal(&s->cv);
    return CUDA_SUCCESS;
}
