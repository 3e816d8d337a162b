/* Pageable host <-> device copies through pinned staging buffers.
 *
 * The driver stages pageable copies itself, on the calling thread: 7-9 GB/s H2D and 1-14 GB/s
 * D2H on the H100s measured, whose pinned copies move 54 GB/s, and whose host threads each move
 * about 8 GB/s through memcpy. Here a large copy is cut into pieces; several host threads (the
 * caller and a small pool kept per context) copy pieces between the pageable side and pinned
 * buffers of their own while the DMAs of earlier pieces run on a transfer stream of ours, so host
 * copies and DMAs overlap and the host side is no longer one thread's memcpy.
 *
 * The driver's documented semantics for pageable memory are kept:
 *  - H2D: a stream sync is performed before the source is read (earlier work on the caller's
 *    stream may write the source: a host function, or a kernel where the GPU reaches pageable
 *    memory). The call returns once every source byte sits in a pinned buffer; the DMAs may still
 *    run, and later work on the caller's stream waits for them (an event the stream waits on).
 *  - D2H: the DMAs wait for earlier work on the caller's stream (an event: no host wait); the
 *    call returns only when every byte is in the destination.
 *  - The blocking entry points behave the same: for pageable memory the driver documents exactly
 *    these two behaviours for cuMemcpyHtoD/DtoH too.
 *  - An error: the first one is returned; pieces not started are not copied, and the transfer
 *    stream is drained first, so no DMA touches the caller's memory or a buffer after the call.
 *
 * Per context, made on its first staged copy: one non-blocking transfer stream, two events, one
 * pinned allocation cut into two buffers per thread (each buffer with its event), and the pool of
 * GPUMEM_STAGING_THREADS - 1 workers. One staged copy runs at a time per context (the link is
 * the bottleneck, a second copy would only share it); each thread owns its two buffers, so pieces
 * never contend for a buffer.
 *
 * A copy is staged by the context that owns its device memory, not by the caller's current
 * context (issue 10). An H2D returns with its last DMAs still in flight on the transfer stream,
 * ordered before later work on the caller's stream only. Staged by the caller's context, a later
 * staged copy of the same memory from another context (its own transfer stream, its own
 * caller's stream) was ordered after nothing: a thread that switched contexts between an H2D
 * and the D2H of the same block read it back before the DMAs had landed. Staged by the owner,
 * every staged copy of a block goes through one transfer stream, in call order. The caller's
 * stream stays in the caller's context: what is recorded on it or made to wait is done there
 * (a stream 0 made in the owner's context would be the owner's legacy stream), and where the
 * two contexts differ the caller's stream is waited for from the host, since our events belong
 * to the owner and an event is recorded only on a stream of its own context. */
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/mman.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "gm_staging.h"

#define PIECE_MIN ((size_t)256 << 10) /* below this a piece costs more in driver calls than it moves */
#define PIECE_ALIGN ((size_t)64 << 10)
#define BUFFER_ALIGN ((size_t)4096)

/* One staged copy, shared by the threads that work on it. */
typedef struct stage_job {
    gm_copy_dir dir;
    uintptr_t dev;           /* the device side */
    unsigned char *host;     /* the pageable side */
    size_t n, piece, pieces;
    _Atomic size_t next;     /* next piece to claim */
    _Atomic int error;       /* first driver error; 0 none */
} stage_job;

typedef struct stage_buf {
    unsigned char *mem;
    uintptr_t event;         /* recorded after the last DMA that reads or writes mem */
} stage_buf;

struct stager;
typedef struct stage_worker {
    struct stager *st;
    int slot;                /* which buffer pair; the caller is slot 0 */
    pthread_t thread;
} stage_worker;

typedef struct stager {
    struct stager *next;     /* the registry */
    uintptr_t ctx;
    unsigned long long ctx_id; /* the driver's unique id of the context (0 where none) */
    int users;               /* callers between lookup and release (registry lock) */
    bool dropped;            /* unlinked: its context is going away */

    pthread_mutex_t copy_lock; /* one staged copy at a time in this context */
    bool broken;             /* setup or a drain failed: copies go to the driver */
    int threads;             /* host threads per copy, the caller included */
    size_t chunk;            /* bytes per buffer */
    uintptr_t stream, start_ev, done_ev;
    void *pinned;
    stage_buf *bufs;         /* 2 per thread */

    pthread_mutex_t pool_lock;
    pthread_cond_t work_cv, idle_cv;
    stage_job *job;
    uint64_t generation;     /* bumped per job: the workers' signal */
    int busy;                /* workers still on the current job */
    bool stop;
    int nworkers;
    stage_worker *workers;
} stager;

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t registry_cv = PTHREAD_COND_INITIALIZER;
static stager *registry;

/* ------------------------------------------------------------------ what the driver says */

/* A range the driver would refuse goes to the driver, which then answers with its own error and
 * writes nothing, where pieces would have written the part before the bad end. *owner gets the
 * context the allocation belongs to, where the driver names one (where it names none, *owner is
 * left alone). A backend without an allocation table (host) takes any range as whole. */
static bool device_range_whole(uintptr_t p, size_t n, uintptr_t *owner)
{
    uintptr_t start = 0;
    size_t size = 0;
    int rc = gm_mgr.backend->address_range(p, &start, &size, owner);
    if (rc == GPUMEM_ERROR_NOT_SUPPORTED) return true;
    if (rc != GPUMEM_OK) return false;
    return p >= start && p - start <= size && n <= size - (p - start);
}

/* Capturing, or the capture state of an implicit stream being illegal: the driver's business. */
static bool stream_is_plain(uintptr_t stream)
{
    return gm_mgr.backend->stream_capturing(stream) == 0;
}

/* Every page of [p, p+n) is mapped in this process: msync answers ENOMEM for a range with a hole,
 * in one system call (about a microsecond, against milliseconds for the copy). A pointer that is
 * not memory at all then goes to the driver, which answers for it, instead of faulting in our
 * memcpy. (Protections are not checked: a read-only destination still faults, as it would in
 * the program's own memcpy.) */
static bool host_range_mapped(uintptr_t p, size_t n)
{
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), start = p & ~(page - 1);
    return msync((void *)start, p + n - start, MS_ASYNC) == 0;
}

/* Everything that makes staging wrong or pointless, cheapest first. *owner: the context that owns
 * the device side (left as the caller's where the driver does not say, and on the host backend). */
static bool should_stage(gm_copy_dir dir, uintptr_t dst, uintptr_t src, size_t n, uintptr_t stream,
                         uintptr_t *owner)
{
    const gm_config *cfg = gm_mgr.cfg;
    if (!cfg || !cfg->staging || n == 0 || n < cfg->staging_min) return false;
    if (dir != GM_COPY_H2D && dir != GM_COPY_D2H) return false;
    if (!gm_mgr.backend || atomic_load(&gm_mgr.exiting)) return false;
    uintptr_t host = dir == GM_COPY_H2D ? src : dst, dev = dir == GM_COPY_H2D ? dst : src;
    if (!host || !dev || n - 1 > UINTPTR_MAX - host) return false;
    /* Memory the driver knows (pinned, registered, managed, device) is not ours to memcpy. */
    if (gm_mgr.backend->host_range_is_pageable((const void *)host, n) != 1) return false;
    if (!host_range_mapped(host, n)) return false;
    return device_range_whole(dev, n, owner) && stream_is_plain(stream);
}

/* ------------------------------------------------------------------ copying out */

/* A D2H piece goes from its buffer into the program's memory with streaming stores: a plain
 * memcpy first reads every destination line it writes (read for ownership), a third of its
 * memory traffic; on the H100 host measured one thread moved 14.4 GB/s this way against 8.7 with
 * memcpy (4 threads: 39 against 28). Pieces are large and written whole, so the cache has nothing
 * to offer. H2D keeps memcpy: it fills a buffer that stays hot in the cache for the DMA, where
 * streaming stores measured no faster. Processors without AVX2 use memcpy. */
#if defined(__x86_64__)
#define STREAM_MIN ((size_t)64 << 10)

__attribute__((target("avx2"))) static void stream_copy_avx2(unsigned char *d, const unsigned char *s, size_t n)
{
    for (; n >= 128; d += 128, s += 128, n -= 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)s), b = _mm256_loadu_si256((const __m256i *)(s + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(s + 64)), e = _mm256_loadu_si256((const __m256i *)(s + 96));
        _mm256_stream_si256((__m256i *)d, a);
        _mm256_stream_si256((__m256i *)(d + 32), b);
        _mm256_stream_si256((__m256i *)(d + 64), c);
        _mm256_stream_si256((__m256i *)(d + 96), e);
    }
    memcpy(d, s, n);
}

static void copy_out(void *dst, const void *src, size_t n)
{
    static _Atomic int avx2 = -1; /* every thread that asks gets the same answer */
    int has = atomic_load_explicit(&avx2, memory_order_relaxed);
    if (has < 0) atomic_store_explicit(&avx2, has = __builtin_cpu_supports("avx2") != 0, memory_order_relaxed);
    if (n < STREAM_MIN || !has) {
        memcpy(dst, src, n);
        return;
    }
    unsigned char *d = dst;
    const unsigned char *s = src;
    size_t head = (size_t)(-(uintptr_t)d & 31); /* streaming stores want aligned destinations */
    memcpy(d, s, head);
    stream_copy_avx2(d + head, s + head, n - head);
    _mm_sfence(); /* the stores are visible before the copy reports done */
}
#else
static void copy_out(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
#endif

/* ------------------------------------------------------------------ the pieces */

/* Small copies still use every thread (a 4 MiB copy in one piece would be one thread's memcpy);
 * large ones use whole buffers. */
static size_t piece_size(size_t n, int threads, size_t chunk)
{
    size_t ways = 2 * (size_t)threads, per = n / ways + (n % ways != 0);
    per = (per + PIECE_ALIGN - 1) / PIECE_ALIGN * PIECE_ALIGN;
    if (per < PIECE_MIN) per = PIECE_MIN;
    return per < chunk ? per : chunk;
}

static void job_fail(stage_job *job, int rc)
{
    int none = 0;
    atomic_compare_exchange_strong(&job->error, &none, rc);
}

/* The next piece, unless the copy failed meanwhile. */
static bool claim(stage_job *job, size_t *off, size_t *len)
{
    if (atomic_load_explicit(&job->error, memory_order_relaxed)) return false;
    size_t i = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
    if (i >= job->pieces) return false;
    *off = i * job->piece;
    *len = job->n - *off < job->piece ? job->n - *off : job->piece;
    return true;
}

/* Host -> device: wait until the buffer's last DMA has read it, fill it, DMA it. Alternating two
 * buffers lets the memcpy of one overlap the DMA of the other. */
static void h2d_slot(stager *st, stage_job *job, int slot)
{
    const gm_backend *be = gm_mgr.backend;
    stage_buf *mine = &st->bufs[2 * slot];
    size_t off, len;
    for (unsigned k = 0; claim(job, &off, &len); k ^= 1) {
        stage_buf *b = &mine[k];
        int rc = be->event_synchronize(b->event);
        if (rc == GPUMEM_OK) {
            memcpy(b->mem, job->host + off, len);
            rc = be->copy_async(st->ctx, GM_COPY_H2D, job->dev + off, (uintptr_t)b->mem, len, st->stream);
        }
        if (rc == GPUMEM_OK) rc = be->event_record(st->ctx, b->event, st->stream);
        if (rc != GPUMEM_OK) {
            job_fail(job, rc);
            return;
        }
    }
}

/* Device -> host: keep two DMAs of this thread in flight; copy each out as its event completes. */
static void d2h_slot(stager *st, stage_job *job, int slot)
{
    const gm_backend *be = gm_mgr.backend;
    stage_buf *mine = &st->bufs[2 * slot];
    struct { size_t off, len; } flight[2];
    unsigned head = 0, count = 0;
    for (;;) {
        size_t off, len;
        while (count < 2 && claim(job, &off, &len)) {
            unsigned k = (head + count) & 1;
            int rc = be->copy_async(st->ctx, GM_COPY_D2H, (uintptr_t)mine[k].mem, job->dev + off, len, st->stream);
            if (rc == GPUMEM_OK) rc = be->event_record(st->ctx, mine[k].event, st->stream);
            if (rc != GPUMEM_OK) {
                job_fail(job, rc);
                return;
            }
            flight[k].off = off;
            flight[k].len = len;
            count++;
        }
        if (count == 0 || atomic_load_explicit(&job->error, memory_order_relaxed)) return;
        int rc = be->event_synchronize(mine[head].event);
        if (rc != GPUMEM_OK) {
            job_fail(job, rc);
            return;
        }
        copy_out(job->host + flight[head].off, mine[head].mem, flight[head].len);
        head ^= 1;
        count--;
    }
}

static void run_slot(stager *st, stage_job *job, int slot)
{
    if (job->dir == GM_COPY_H2D) h2d_slot(st, job, slot);
    else d2h_slot(st, job, slot);
}

/* ------------------------------------------------------------------ the worker pool */

static void *worker_main(void *arg)
{
    stage_worker *w = arg;
    stager *st = w->st;
    /* A worker that cannot make the context current claims no pieces; the others do them. */
    bool usable = gm_mgr.backend->set_current(st->ctx) == GPUMEM_OK;
    uint64_t seen = 0;
    pthread_mutex_lock(&st->pool_lock);
    for (;;) {
        while (!st->stop && st->generation == seen) pthread_cond_wait(&st->work_cv, &st->pool_lock);
        if (st->stop) break;
        seen = st->generation;
        stage_job *job = st->job;
        pthread_mutex_unlock(&st->pool_lock);
        if (usable) run_slot(st, job, w->slot);
        pthread_mutex_lock(&st->pool_lock);
        if (--st->busy == 0) pthread_cond_signal(&st->idle_cv);
    }
    pthread_mutex_unlock(&st->pool_lock);
    return NULL;
}

/* Signals blocked: the program's handlers run on its own threads, never on ours. */
static void start_workers(stager *st)
{
    st->workers = calloc((size_t)st->threads, sizeof *st->workers);
    if (!st->workers) return;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (int slot = 1; slot < st->threads; slot++) {
        stage_worker *w = &st->workers[st->nworkers];
        w->st = st;
        w->slot = slot;
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) break;
        st->nworkers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static void stop_workers(stager *st)
{
    pthread_mutex_lock(&st->pool_lock);
    st->stop = true;
    pthread_cond_broadcast(&st->work_cv);
    pthread_mutex_unlock(&st->pool_lock);
    for (int i = 0; i < st->nworkers; i++) pthread_join(st->workers[i].thread, NULL);
    st->nworkers = 0;
}

/* The caller works slot 0 while the workers take the others; returns when all are done. */
static void run_job(stager *st, stage_job *job)
{
    pthread_mutex_lock(&st->pool_lock);
    st->job = job;
    st->generation++;
    st->busy = st->nworkers;
    pthread_cond_broadcast(&st->work_cv);
    pthread_mutex_unlock(&st->pool_lock);
    run_slot(st, job, 0);
    pthread_mutex_lock(&st->pool_lock);
    while (st->busy > 0) pthread_cond_wait(&st->idle_cv, &st->pool_lock);
    st->job = NULL;
    pthread_mutex_unlock(&st->pool_lock);
}

/* ------------------------------------------------------------------ per-context state */

static size_t buffer_stride(size_t chunk) { return (chunk + BUFFER_ALIGN - 1) / BUFFER_ALIGN * BUFFER_ALIGN; }

/* Stream, events, buffers and workers; false: the caller releases what was made. */
static bool stager_setup(stager *st)
{
    const gm_backend *be = gm_mgr.backend;
    size_t nbufs = 2 * (size_t)st->threads, stride = buffer_stride(st->chunk);
    st->bufs = calloc(nbufs, sizeof *st->bufs);
    if (!st->bufs) return false;
    int rc = be->stream_create(st->ctx, &st->stream);
    if (rc == GPUMEM_OK) rc = be->event_create(st->ctx, &st->start_ev);
    if (rc == GPUMEM_OK) rc = be->event_create(st->ctx, &st->done_ev);
    if (rc == GPUMEM_OK) rc = be->host_alloc(st->ctx, nbufs * stride, 0, &st->pinned);
    for (size_t i = 0; i < nbufs && rc == GPUMEM_OK; i++) {
        st->bufs[i].mem = (unsigned char *)st->pinned + i * stride;
        rc = be->event_create(st->ctx, &st->bufs[i].event);
    }
    if (rc != GPUMEM_OK) {
        gm_log(GM_WARN, "pinned staging is off in context %p: setting it up failed with error %d "
                        "(%zu MiB of pinned memory, a stream and %zu events); copies go to the driver",
               (void *)st->ctx, rc, nbufs * stride >> 20, nbufs + 2);
        return false;
    }
    start_workers(st);
    gm_log(GM_INFO, "pinned staging in context %p: %d host threads, %zu buffers of %zu B (%zu MiB pinned)",
           (void *)st->ctx, st->nworkers + 1, nbufs, st->chunk, nbufs * stride >> 20);
    return true;
}

/* Workers, stream, events and buffers; the driver is called only for a context still alive. */
static void stager_release(stager *st, bool ctx_alive)
{
    const gm_backend *be = gm_mgr.backend;
    stop_workers(st);
    if (ctx_alive && !atomic_load(&gm_mgr.exiting)) {
        if (st->stream) be->stream_synchronize(st->ctx, st->stream);
        for (size_t i = 0; st->bufs && i < 2 * (size_t)st->threads; i++)
            if (st->bufs[i].event) be->event_destroy(st->ctx, st->bufs[i].event);
        if (st->start_ev) be->event_destroy(st->ctx, st->start_ev);
        if (st->done_ev) be->event_destroy(st->ctx, st->done_ev);
        if (st->stream) be->stream_destroy(st->ctx, st->stream);
        if (st->pinned) be->host_free(st->ctx, st->pinned);
    }
    free(st->bufs);
    free(st->workers);
    st->bufs = NULL;
    st->workers = NULL;
    st->pinned = NULL;
    st->stream = st->start_ev = st->done_ev = 0;
}

static void stager_delete(stager *st, bool ctx_alive)
{
    stager_release(st, ctx_alive);
    pthread_mutex_destroy(&st->copy_lock);
    pthread_mutex_destroy(&st->pool_lock);
    pthread_cond_destroy(&st->work_cv);
    pthread_cond_destroy(&st->idle_cv);
    free(st);
}

static stager *stager_new(uintptr_t ctx, unsigned long long ctx_id)
{
    stager *st = calloc(1, sizeof *st);
    if (!st) return NULL;
    st->ctx = ctx;
    st->ctx_id = ctx_id;
    st->threads = gm_mgr.cfg->staging_threads;
    st->chunk = (size_t)gm_mgr.cfg->staging_chunk;
    pthread_mutex_init(&st->copy_lock, NULL);
    pthread_mutex_init(&st->pool_lock, NULL);
    pthread_cond_init(&st->work_cv, NULL);
    pthread_cond_init(&st->idle_cv, NULL);
    if (!stager_setup(st)) { /* kept, broken, so that setup is not retried on every copy */
        stager_release(st, true);
        st->broken = true;
    }
    return st;
}

/* A fork child has none of the parent's threads or streams: it forgets the stagers (without
 * calling the driver) and makes its own on its first staged copy. */
static void registry_lock_for_fork(void) { pthread_mutex_lock(&registry_lock); }
static void registry_unlock_after_fork(void) { pthread_mutex_unlock(&registry_lock); }
static void registry_forget_in_child(void)
{
    registry = NULL;
    pthread_mutex_init(&registry_lock, NULL);
    pthread_cond_init(&registry_cv, NULL);
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void install_atfork(void)
{
    static const gm_fork_handlers handlers = {registry_lock_for_fork, registry_unlock_after_fork,
                                              registry_forget_in_child};
    gm_fork_register(GM_FORK_STAGING, &handlers);
}

/* Waits until no caller holds an unlinked stager, then frees it. */
static void stager_retire(stager *st, bool ctx_alive)
{
    pthread_mutex_lock(&registry_lock);
    while (st->users > 0) pthread_cond_wait(&registry_cv, &registry_lock);
    pthread_mutex_unlock(&registry_lock);
    /* A broken stager's stream may still hold DMAs: its resources are left to the context. */
    stager_delete(st, ctx_alive && !st->broken);
}

static stager *unlink_locked(uintptr_t ctx)
{
    stager **pp = &registry;
    while (*pp && (*pp)->ctx != ctx) pp = &(*pp)->next;
    stager *st = *pp;
    if (st) {
        *pp = st->next;
        st->dropped = true;
    }
    return st;
}

/* The context's stager, made on first use, held until stager_put. One left by an earlier context
 * with the same handle is forgotten without a driver call: its stream and buffers died with it. */
static stager *stager_get(uintptr_t ctx)
{
    unsigned long long id = 0;
    if (gm_mgr.backend->ctx_id(ctx, &id) != GPUMEM_OK) return NULL;
    pthread_once(&atfork_once, install_atfork);
    pthread_mutex_lock(&registry_lock);
    stager *st = registry, *stale = NULL;
    while (st && st->ctx != ctx) st = st->next;
    if (st && st->ctx_id != id) {
        stale = unlink_locked(ctx);
        st = NULL;
    }
    if (!st && (st = stager_new(ctx, id)) != NULL) {
        st->next = registry;
        registry = st;
    }
    if (st) st->users++;
    pthread_mutex_unlock(&registry_lock);
    if (stale) stager_retire(stale, false);
    return st;
}

static void stager_put(stager *st)
{
    pthread_mutex_lock(&registry_lock);
    if (--st->users == 0 && st->dropped) pthread_cond_broadcast(&registry_cv);
    pthread_mutex_unlock(&registry_lock);
}

void gm_staging_drop_context(uintptr_t ctx, bool ctx_alive)
{
    pthread_mutex_lock(&registry_lock);
    stager *st = unlink_locked(ctx);
    pthread_mutex_unlock(&registry_lock);
    if (st) stager_retire(st, ctx_alive);
}

/* ------------------------------------------------------------------ one staged copy */

/* After a failure: no DMA may still touch the caller's memory or a buffer when we return. A stream
 * that cannot be drained leaves staging off in this context. */
static int drain(stager *st, int rc)
{
    if (gm_mgr.backend->stream_synchronize(st->ctx, st->stream) != GPUMEM_OK) {
        st->broken = true;
        gm_log(GM_WARN, "pinned staging is off in context %p: its transfer stream failed", (void *)st->ctx);
    }
    return rc;
}

/* The caller's side of a copy: its stream, in its context (the one current when it called; a
 * stream 0 or CU_STREAM_PER_THREAD means that context's). */
typedef struct caller {
    uintptr_t ctx, stream;
} caller;

/* Our work comes after earlier work on the caller's stream: the host waits for it (H2D: the
 * driver's stream sync before a pageable source is read), or else the transfer stream does (D2H:
 * no host wait). In the stager's own context an event of ours on the caller's stream marks the
 * point. In another context an event of ours cannot be recorded there (an event is recorded only
 * on a stream of its own context), so the host synchronizes the caller's stream: the same wait,
 * with the host in it for a D2H as well, which returns only when its bytes have landed anyway. */
static int after_caller(stager *st, const caller *c, bool host_waits)
{
    const gm_backend *be = gm_mgr.backend;
    if (c->ctx != st->ctx) return be->stream_synchronize(c->ctx, c->stream);
    int rc = be->event_record(c->ctx, st->start_ev, c->stream);
    if (rc != GPUMEM_OK) return rc;
    return host_waits ? be->event_synchronize(st->start_ev) : be->stream_wait_event(st->ctx, st->stream, st->start_ev);
}

static int stage_h2d(stager *st, stage_job *job, const caller *c)
{
    const gm_backend *be = gm_mgr.backend;
    /* The driver's stream sync before a pageable source is read. After it the transfer stream
     * needs no wait of its own: everything before the copy on the caller's stream is complete. */
    int rc = after_caller(st, c, true);
    if (rc != GPUMEM_OK) return rc;
    run_job(st, job);
    rc = atomic_load(&job->error);
    if (rc != GPUMEM_OK) return drain(st, rc);
    /* Later work on the caller's stream waits for the last DMA; a later staged copy of this memory,
     * from any context, is behind it on our transfer stream. The wait is enqueued in the caller's
     * context (an event may be waited for from another context's stream). */
    rc = be->event_record(st->ctx, st->done_ev, st->stream);
    if (rc == GPUMEM_OK) rc = be->stream_wait_event(c->ctx, c->stream, st->done_ev);
    return rc == GPUMEM_OK ? rc : drain(st, rc);
}

static int stage_d2h(stager *st, stage_job *job, const caller *c)
{
    int rc = after_caller(st, c, false);
    if (rc != GPUMEM_OK) return rc;
    run_job(st, job);
    rc = atomic_load(&job->error);
    /* Success: every DMA completed before its piece was copied out, so later work on the caller's
     * stream needs no wait (it is enqueued after we return). */
    return rc == GPUMEM_OK ? rc : drain(st, rc);
}

gm_answer gm_staged_copy(uintptr_t ctx, gm_copy_dir dir, uintptr_t dst, uintptr_t src, size_t n,
                         uintptr_t stream, bool sync)
{
    (void)sync; /* pageable copies: the blocking entry points have the same semantics (above) */
    uintptr_t owner = ctx;
    if (!should_stage(dir, dst, src, n, stream, &owner)) return gm_not_ours();
    const caller c = {ctx, stream};
    stager *st = stager_get(owner); /* the memory's context stages it (top of the file) */
    if (!st) return gm_not_ours();
    gm_answer a = gm_not_ours(); /* a broken stager leaves the copy to the driver */
    pthread_mutex_lock(&st->copy_lock);
    if (!st->broken) {
        stage_job job = {
            .dir = dir,
            .dev = dir == GM_COPY_H2D ? dst : src,
            .host = (unsigned char *)(dir == GM_COPY_H2D ? src : dst),
            .n = n,
            .piece = piece_size(n, st->nworkers + 1, st->chunk),
        };
        job.pieces = (n + job.piece - 1) / job.piece;
        a = gm_ours(dir == GM_COPY_H2D ? stage_h2d(st, &job, &c) : stage_d2h(st, &job, &c));
    }
    pthread_mutex_unlock(&st->copy_lock);
    stager_put(st);
    return a;
}
