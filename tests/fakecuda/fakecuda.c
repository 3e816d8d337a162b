/* fakecuda: a host-memory fake of the CUDA driver API, built as libcuda.so.1, so that gpumem's
 * shim can be tested on machines without a GPU.
 *
 * Model
 *  - Device memory is host memory: a CUdeviceptr is the host address of an aligned_alloc block
 *    (512 B aligned, 2 MiB aligned from 2 MiB up), so tests may read and write it directly.
 *  - Each stream is a FIFO of work items run in order by its own worker thread (started on the
 *    first enqueue). Every context owns a legacy default stream. The per-thread default stream
 *    (handle CU_STREAM_PER_THREAD, or 0 passed to a _ptsz/_ptds entry point) is a separate
 *    stream per (thread, context), created on first use and retired when its thread exits.
 *    Streams are independent: the legacy stream does not implicitly order against other
 *    streams (no blocking/non-blocking distinction).
 *  - Synchronous copies and memsets are enqueued on the legacy (or, for _ptds, the per-thread)
 *    stream and waited for, so they run after everything queued there before them.
 *  - Pageable host memory (host memory the fake does not know: neither cuMemHostAlloc'd nor
 *    registered) behaves as the real driver documents: a copy into it (D2H, H2H), async or not,
 *    returns when the data is there; an async copy out of it snapshots the source at the call, so
 *    the call returns once the source has been consumed while the copy itself waits its turn.
 *  - Test knobs: a delay for every copy (a slow DMA) and injected copy errors (fakecuda.h).
 *  - cuMemFree_v2 waits for every stream of the allocation's context, as the real one does;
 *    cuMemFreeAsync frees when the stream reaches it.
 *  - Stream capture only flips a per-stream state; captured work still runs. While a capture in
 *    global (or, from the capturing thread, thread-local) mode is active, cuCtxSynchronize and
 *    cuMemFree_v2 fail with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED like the real driver, and so do
 *    cuStreamSynchronize/cuStreamQuery on the capturing stream.
 *  - One global mutex guards all state; g_done is broadcast whenever a work item completes.
 *  - fork(): the lock is held across it; the child gets a fresh, uninitialized driver.
 *  - Contexts are never freed (only marked dead) so stale handles are detected, not followed.
 *  - cuGetProcAddress hands out the addresses of this library's own exported functions through
 *    hidden aliases, so they equal what dlsym(libcuda.so.1, "<versioned name>") returns even
 *    when a preloaded shim interposes the same names. Internal code never calls an exported
 *    function, for the same reason. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <cuda.h>

#include "fakecuda.h"

/* cuda.h maps cuGetProcAddress to cuGetProcAddress_v2; the old 4-argument one is exported too. */
#undef cuGetProcAddress

#define FK_API __attribute__((visibility("default")))

/* Exported names that cuda.h declares only for its own internal build, declared here so the
 * definitions are checked (the _ptsz/_ptds ones are in fakecuda.h). */
CUresult CUDAAPI cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion,
                                 cuuint64_t flags);
CUresult CUDAAPI cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev);
CUresult CUDAAPI cuCtxCreate_v3(CUcontext *pctx, CUexecAffinityParam *paramsArray, int numParams,
                                unsigned int flags, CUdevice dev);

/* ================================================================ state */

#define FK_MAX_DEVICES 8
#define FK_STACK_MAX 64
#define FK_SMALL_ALIGN ((size_t)512)
#define FK_BIG_ALIGN ((size_t)2 << 20)
#define FK_PITCH_ALIGN ((size_t)512)
#define FK_VMM_GRANULARITY ((size_t)2 << 20)
#define FK_DRIVER_VERSION 13000

/* A_REGISTERED: program memory pinned by cuMemHostRegister (never freed by the fake).
 * A_IPC: another process's A_DEVICE memory mapped by cuIpcOpenMemHandle (freed by the close). */
typedef enum { A_DEVICE, A_MANAGED, A_ASYNC, A_HOST, A_VMM, A_REGISTERED, A_IPC } fk_akind;

typedef struct fk_ctx {
    struct fk_ctx *next; /* g_ctxs; never unlinked */
    int dev;
    bool primary;
    bool alive;          /* created and not destroyed; primary: retained at least once */
    int prim_refs;
    unsigned flags;
    struct fk_stream *legacy;
    uint64_t id;         /* cuCtxGetId: new at every activation, so a reset primary gets a new one */
} fk_ctx;

typedef struct fk_alloc {
    uintptr_t base;
    size_t size;         /* what was asked for (pitch * height for pitched) */
    fk_akind kind;
    int dev;
    fk_ctx *ctx;         /* NULL for cuMemCreate handles */
    bool freeing;        /* a free is under way (async free queued, or cuMemFree waiting) */
    uint64_t id;         /* unique, to recognise the record after the lock was dropped */
    struct fk_alloc *vnext; /* g_vmm list (cuMemCreate handles only) */
    size_t map_len;      /* A_DEVICE, A_IPC: the memory is an mmap of this length (IPC section) */
    int memfd;           /* A_DEVICE: the memfd behind it, open while it lives (another process
                          * maps it through /proc/<pid>/fd/<memfd>) */
    bool sync_memops;    /* cuPointerSetAttribute(CU_POINTER_ATTRIBUTE_SYNC_MEMOPS) */
    int ipc_pid;         /* A_IPC: the exporter and its allocation id (the key of a reopen) */
    uint64_t ipc_id;
    unsigned ipc_refs;   /* A_IPC: opens not yet closed */
} fk_alloc;

typedef struct fk_event {
    struct fk_event *next;
    fk_ctx *ctx;
    uint64_t rec_gen;    /* bumped by each record */
    uint64_t done_gen;   /* highest record whose marker has run */
    int refs;            /* the handle + pending markers and waiters */
    bool destroyed;
} fk_event;

typedef enum { W_COPY, W_SET8, W_SET16, W_SET32, W_FILL, W_EVENT, W_WAIT, W_FREE } fk_wkind;

typedef struct fk_work {
    struct fk_work *next;
    fk_wkind kind;
    uint64_t seq;
    uintptr_t dst, src;
    size_t n;            /* bytes (W_SET16/W_SET32: 16-/32-bit words) */
    uint32_t val;
    unsigned delay_us;
    fk_event *ev;
    uint64_t gen;
    uint64_t alloc_id;   /* W_FREE: which allocation at dst */
    bool chk_dst, chk_src;
    void *owned;         /* W_COPY from a snapshot of pageable memory: freed once it has run */
} fk_work;

typedef struct fk_stream {
    struct fk_stream *next; /* g_streams */
    uint64_t uid;
    fk_ctx *ctx;
    fk_work *head, *tail;
    uint64_t enq_seq, done_seq;
    pthread_cond_t cv;   /* wakes the worker */
    bool worker, stop, destroyed, legacy;
    const void *owner;   /* per-thread default stream: the owning thread's token */
    bool capturing;
    CUstreamCaptureMode capture_mode;
    const void *capture_thread;
} fk_stream;

typedef struct fk_device {
    fk_ctx *primary;
    unsigned primary_flags;
    uint64_t in_use;
} fk_device;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_done = PTHREAD_COND_INITIALIZER;
static atomic_bool g_inited;
static int g_ndev = 1;
static uint64_t g_capacity = (uint64_t)1 << 30;
static long g_fail_after = -1;
static uint64_t g_alloc_attempts;
static fk_device g_dev[FK_MAX_DEVICES];
static fk_ctx *g_ctxs;
static fk_stream *g_streams;
static fk_event *g_events;
static fk_alloc **g_allocs; /* sorted by base: interior pointer lookups */
static size_t g_nallocs, g_allocs_cap;
static fk_alloc *g_vmm;
static uint64_t g_next_id = 1;
static fakecuda_counters_t g_cnt;
static uint64_t g_copies_pending;   /* W_COPY items queued and not yet run */
static unsigned g_copy_delay_us;    /* fakecuda_set_copy_delay */
static unsigned g_copy_fail_skip, g_copy_fail_count; /* fakecuda_fail_copies */
static CUresult g_copy_fail_code;

static __thread fk_ctx *tl_stack[FK_STACK_MAX];
static __thread int tl_depth;
static __thread char tl_token; /* its address names the calling thread while it lives */

static pthread_once_t g_key_once = PTHREAD_ONCE_INIT;
static pthread_key_t g_ptds_key;

#define LOCK() pthread_mutex_lock(&g_mu)
#define UNLOCK() pthread_mutex_unlock(&g_mu)

/* Every entry point but version/error/proc-address queries needs cuInit first. */
static CUresult enter(void)
{
    if (!atomic_load(&g_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    LOCK();
    return CUDA_SUCCESS;
}

static CUresult leave(CUresult r)
{
    UNLOCK();
    return r;
}

/* ================================================================ environment */

static uint64_t env_u64(const char *name, uint64_t def)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return def;
    char *end;
    unsigned long long v = strtoull(s, &end, 0);
    if (end == s)
        return def;
    switch (*end) { /* binary suffixes keep test settings readable */
    case 'k': case 'K': v <<= 10; break;
    case 'm': case 'M': v <<= 20; break;
    case 'g': case 'G': v <<= 30; break;
    default: break;
    }
    return v;
}

static long env_long(const char *name, long def)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return def;
    char *end;
    long v = strtol(s, &end, 0);
    return end == s ? def : v;
}

/* Called with g_mu held. The fault-injection count restarts when forced or when the setting
 * changed, so repeated cuInit calls (shim and program both call it) do not reset it. */
static void env_load(bool force)
{
    g_capacity = env_u64("FAKECUDA_MEM", (uint64_t)1 << 30);
    long n = env_long("FAKECUDA_DEVICES", 1);
    g_ndev = n < 0 ? 1 : n > FK_MAX_DEVICES ? FK_MAX_DEVICES : (int)n;
    long fail = env_long("FAKECUDA_FAIL_ALLOC_AFTER", -1);
    if (fail < 0)
        fail = -1;
    if (force || fail != g_fail_after)
        g_alloc_attempts = 0;
    g_fail_after = fail;
}

/* ================================================================ allocation registry */

/* Index of the first allocation whose base is above p. */
static size_t reg_upper(uintptr_t p)
{
    size_t lo = 0, hi = g_nallocs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (g_allocs[mid]->base <= p)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* The live allocation containing p (interior pointers included), or NULL. */
static fk_alloc *reg_find(uintptr_t p)
{
    size_t i = reg_upper(p);
    if (i == 0)
        return NULL;
    fk_alloc *a = g_allocs[i - 1];
    return p - a->base < a->size ? a : NULL;
}

/* The allocation starting exactly at p: frees take base pointers only. */
static fk_alloc *reg_find_base(uintptr_t p)
{
    fk_alloc *a = reg_find(p);
    return a && a->base == p ? a : NULL;
}

static bool reg_insert(fk_alloc *a)
{
    if (g_nallocs == g_allocs_cap) {
        size_t cap = g_allocs_cap ? g_allocs_cap * 2 : 64;
        fk_alloc **v = realloc(g_allocs, cap * sizeof *v);
        if (!v)
            return false;
        g_allocs = v;
        g_allocs_cap = cap;
    }
    size_t i = reg_upper(a->base);
    memmove(&g_allocs[i + 1], &g_allocs[i], (g_nallocs - i) * sizeof *g_allocs);
    g_allocs[i] = a;
    g_nallocs++;
    return true;
}

static void reg_remove(fk_alloc *a)
{
    size_t i = reg_upper(a->base);
    if (i == 0 || g_allocs[i - 1] != a)
        return;
    i--;
    memmove(&g_allocs[i], &g_allocs[i + 1], (g_nallocs - i - 1) * sizeof *g_allocs);
    g_nallocs--;
}

/* [p, p+n) inside one live allocation that a device may touch. */
static bool dev_range_ok(uintptr_t p, size_t n)
{
    fk_alloc *a = reg_find(p);
    return a && n <= a->size - (p - a->base);
}

static bool counts_as_device(fk_akind k)
{
    return k != A_HOST && k != A_REGISTERED && k != A_IPC;
}

static void shared_unmap(fk_alloc *a);

/* Unregister and free the block. Called with g_mu held. */
static void alloc_release(fk_alloc *a)
{
    if (a->kind == A_VMM) {
        fk_alloc **pp = &g_vmm;
        while (*pp && *pp != a)
            pp = &(*pp)->vnext;
        if (*pp)
            *pp = a->vnext;
    } else {
        reg_remove(a);
    }
    if (counts_as_device(a->kind))
        g_dev[a->dev].in_use -= a->size;
    if (a->map_len)
        shared_unmap(a);
    else if (a->kind != A_REGISTERED)
        free((void *)a->base);
    free(a);
}

static size_t round_up(size_t v, size_t a)
{
    return (v + a - 1) / a * a;
}

/* cuMemAlloc memory is a memfd mapped shared, `align`-aligned, so that another process can map
 * the same pages (cuIpcOpenMemHandle opens /proc/<pid>/fd/<memfd>). The memfd's name carries the
 * allocation id, so an importer can tell a reused descriptor from the one it was handed. */
static void *shared_map(size_t size, size_t align, uint64_t id, int *fd_out, size_t *len_out)
{
    char name[48];
    snprintf(name, sizeof name, "fakecuda-%llu", (unsigned long long)id);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t len = round_up(size, page), span = len + (align > page ? align : 0);
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)len) != 0) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    char *r = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) {
        close(fd);
        return NULL;
    }
    char *at = (char *)round_up((uintptr_t)r, align > page ? align : page);
    if (at > r)
        munmap(r, (size_t)(at - r));
    if (r + span > at + len)
        munmap(at + len, (size_t)(r + span - (at + len)));
    if (mmap(at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
        munmap(at, len);
        close(fd);
        return NULL;
    }
    *fd_out = fd;
    *len_out = len;
    return at;
}

static void shared_unmap(fk_alloc *a)
{
    munmap((void *)a->base, a->map_len);
    if (a->kind == A_DEVICE)
        close(a->memfd);
}

/* The common path of every device allocation entry point: fault injection, capacity, memory.
 * Called with g_mu held after argument and context checks. */
static CUresult dev_alloc(int dev, fk_ctx *c, size_t size, fk_akind kind, fk_alloc **out)
{
    g_alloc_attempts++;
    if (g_fail_after >= 0 && g_alloc_attempts > (uint64_t)g_fail_after)
        return CUDA_ERROR_OUT_OF_MEMORY;
    if (size > g_capacity || g_dev[dev].in_use > g_capacity - size)
        return CUDA_ERROR_OUT_OF_MEMORY;
    size_t align = size >= FK_BIG_ALIGN ? FK_BIG_ALIGN : FK_SMALL_ALIGN;
    if (size > SIZE_MAX - align)
        return CUDA_ERROR_OUT_OF_MEMORY;
    fk_alloc *a = malloc(sizeof *a);
    uint64_t id = g_next_id++;
    int fd = -1;
    size_t map_len = 0;
    void *mem = kind == A_DEVICE ? shared_map(size, align, id, &fd, &map_len)
                                 : aligned_alloc(align, round_up(size, align));
    if (a && mem)
        *a = (fk_alloc){.base = (uintptr_t)mem, .size = size, .kind = kind, .dev = dev,
                        .ctx = c, .id = id, .map_len = map_len, .memfd = fd};
    if (!a || !mem || (kind != A_VMM && !reg_insert(a))) {
        free(a);
        if (mem && map_len) {
            munmap(mem, map_len);
            close(fd);
        } else {
            free(mem);
        }
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    g_dev[dev].in_use += size;
    *out = a;
    return CUDA_SUCCESS;
}

/* ================================================================ contexts */

static bool ctx_known(const fk_ctx *c)
{
    for (fk_ctx *x = g_ctxs; x; x = x->next)
        if (x == c)
            return true;
    return false;
}

/* The calling thread's current context, or the error the real driver gives. */
static CUresult cur_ctx(fk_ctx **out)
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
static CUresult arg_ctx(CUcontext h, fk_ctx **out)
{
    if (!h)
        return cur_ctx(out);
    fk_ctx *c = (fk_ctx *)h;
    if (!ctx_known(c))
        return CUDA_ERROR_INVALID_CONTEXT;
    if (!c->alive)
        return CUDA_ERROR_CONTEXT_IS_DESTROYED;
    *out = c;
    return CUDA_SUCCESS;
}

static bool dev_ok(CUdevice d)
{
    return d >= 0 && d < g_ndev;
}

/* ================================================================ streams and workers */

static fk_stream *stream_new(fk_ctx *c, bool legacy, const void *owner)
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

static void stream_unlink_free(fk_stream *s)
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

/* Wait until work up to `target` has run or the stream is gone (it drains before it goes). */
static void wait_stream_until(fk_stream *s, uint64_t target)
{
    uint64_t uid = s->uid;
    while (stream_alive(s, uid) && s->done_seq < target)
        pthread_cond_wait(&g_done, &g_mu);
}

static void ev_unref(fk_event *e)
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

static void fill_halves(uintptr_t dst, uint16_t v, size_t halves)
{
    uint16_t *p = (uint16_t *)dst;
    for (size_t i = 0; i < halves; i++)
        p[i] = v;
}

static void fill_words(uintptr_t dst, uint32_t v, size_t words)
{
    uint32_t *p = (uint32_t *)dst;
    for (size_t i = 0; i < words; i++)
        p[i] = v;
}

static void sleep_us(unsigned us)
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
            sleep_us(w->delay_us);
        memmove((void *)w->dst, (const void *)w->src, w->n);
        break;
    case W_SET8: memset((void *)w->dst, (int)w->val, w->n); break;
    case W_SET16: fill_halves(w->dst, (uint16_t)w->val, w->n); break;
    case W_SET32: fill_words(w->dst, w->val, w->n); break;
    case W_FILL:
        sleep_us(w->delay_us);
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
        ev_unref(w->ev);
        break;
    case W_WAIT: /* cuStreamWaitEvent: hold this stream until the event's record has run */
        while (w->ev->done_gen < w->gen)
            pthread_cond_wait(&g_done, &g_mu);
        ev_unref(w->ev);
        break;
    case W_FREE: {
        fk_alloc *a = reg_find_base(w->dst);
        if (a && a->id == w->alloc_id) /* its context may have been torn down meanwhile */
            alloc_release(a);
        break;
    }
    case W_COPY:
        g_copies_pending--;
        free(w->owned);
        break;
    default: break;
    }
}

static void *worker_main(void *arg)
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
static bool worker_start(fk_stream *s)
{
    pthread_attr_t attr;
    sigset_t all, old;
    pthread_t t;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&t, &attr, worker_main, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return rc == 0;
}

/* Append a copy of *tmpl to the stream; *seq_out gets its sequence number. */
static CUresult enqueue(fk_stream *s, const fk_work *tmpl, uint64_t *seq_out)
{
    fk_work *w = malloc(sizeof *w);
    if (!w)
        return CUDA_ERROR_OUT_OF_MEMORY;
    if (!s->worker) {
        if (!worker_start(s)) {
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

/* Let the worker drain and free the stream; without a worker nothing is pending. */
static void stream_retire(fk_stream *s)
{
    s->destroyed = true;
    s->stop = true;
    if (s->worker)
        pthread_cond_signal(&s->cv);
    else
        stream_unlink_free(s);
}

/* Thread exit: retire the thread's per-thread default streams. */
static void ptds_thread_exit(void *token)
{
    LOCK();
    for (fk_stream *s = g_streams, *next; s; s = next) {
        next = s->next;
        if (s->owner == token && !s->destroyed)
            stream_retire(s);
    }
    UNLOCK();
}

static void ptds_key_init(void)
{
    pthread_key_create(&g_ptds_key, ptds_thread_exit);
}

/* The calling thread's per-thread default stream in c, created on first use. */
static fk_stream *ptds_stream(fk_ctx *c)
{
    for (fk_stream *s = g_streams; s; s = s->next)
        if (s->ctx == c && s->owner == &tl_token && !s->destroyed)
            return s;
    pthread_once(&g_key_once, ptds_key_init);
    pthread_setspecific(g_ptds_key, &tl_token);
    return stream_new(c, false, &tl_token);
}

/* Map a stream handle to a stream. 0 means the legacy stream for the classic entry points and
 * the per-thread stream for _ptsz/_ptds ones; 1 and 2 name those two explicitly. */
static CUresult resolve_stream(CUstream h, bool ptds, fk_stream **out)
{
    if (!h)
        h = ptds ? CU_STREAM_PER_THREAD : CU_STREAM_LEGACY;
    if (h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD) {
        fk_ctx *c;
        CUresult r = cur_ctx(&c);
        if (r)
            return r;
        *out = h == CU_STREAM_LEGACY ? c->legacy : ptds_stream(c);
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

/* Wait for all work queued in c's streams up to now (later submissions are not waited for). */
static CUresult wait_ctx(fk_ctx *c)
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
static bool capture_forbids_sync(void)
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

static CUresult ctx_activate(fk_ctx *c)
{
    c->legacy = stream_new(c, true, NULL);
    if (!c->legacy)
        return CUDA_ERROR_OUT_OF_MEMORY;
    c->alive = true;
    c->id = g_next_id++;
    return CUDA_SUCCESS;
}

static void ctx_free_allocs(fk_ctx *c)
{
    for (size_t i = g_nallocs; i-- > 0;)
        if (g_allocs[i]->ctx == c)
            alloc_release(g_allocs[i]);
}

static void ctx_free_events(fk_ctx *c)
{
    for (fk_event *e = g_events, *next; e; e = next) {
        next = e->next;
        if (e->ctx == c && !e->destroyed) {
            e->destroyed = true;
            ev_unref(e);
        }
    }
}

/* Destroy or reset: finish queued work, stop the workers, free what the context owned.
 * The caller has already marked c dead, so nothing new is queued meanwhile. */
static void ctx_teardown(fk_ctx *c)
{
    wait_ctx(c);
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
    ctx_free_allocs(c);
    ctx_free_events(c);
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

/* ================================================================ fork */

/* A fork while another thread is inside the fake (holding g_mu, or a worker between two items)
 * would leave the child a lock no thread will ever release. So g_mu, the fake's only lock, is
 * held across fork(), and the child starts from a driver that knows nothing of the parent: like
 * a real driver's child it has no usable context and must call cuInit again; the parent's
 * streams have no worker threads in it, their events can never complete. */
static void fork_prepare(void)
{
    LOCK();
}

static void fork_parent(void)
{
    UNLOCK();
}

/* Forgets rather than frees: the parent's records may be mid-update by threads that do not exist
 * here (and the memory behind its allocations may be shared with it through memfds). Contexts
 * stay listed, dead, so that a handle from before the fork is refused, not followed. */
static void fork_child(void)
{
    UNLOCK(); /* taken by this same thread in fork_prepare; released, not re-created, so that
               * ThreadSanitizer (which saw it taken) sees it released */
    pthread_cond_init(&g_done, NULL); /* its waiters were other threads: gone */
    for (fk_ctx *c = g_ctxs; c; c = c->next) {
        c->alive = false;
        c->prim_refs = 0;
        c->legacy = NULL;
    }
    for (int i = 0; i < FK_MAX_DEVICES; i++) {
        g_dev[i].primary = NULL;
        g_dev[i].in_use = 0;
    }
    g_streams = NULL;
    g_events = NULL;
    g_nallocs = 0;
    g_vmm = NULL;
    g_copies_pending = 0;
    tl_depth = 0; /* the forking thread's context stack: the only thread the child has */
    atomic_store(&g_inited, false);
}

/* At load, so before the shim's own handlers: prepare handlers run in reverse order, so the
 * shim's locks (taken before it calls the driver) are taken before g_mu, as in normal use. */
__attribute__((constructor)) static void fork_handlers_install(void)
{
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}

/* ================================================================ init, version, devices */

/* Every cuMemAlloc allocation holds a memfd (IPC): let a test with many of them have them. */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

FK_API CUresult CUDAAPI cuInit(unsigned int flags)
{
    if (flags)
        return CUDA_ERROR_INVALID_VALUE;
    LOCK();
    env_load(false); /* tests set the environment before the first cuInit */
    raise_fd_limit();
    CUresult r = g_ndev > 0 ? CUDA_SUCCESS : CUDA_ERROR_NO_DEVICE;
    if (r == CUDA_SUCCESS)
        atomic_store(&g_inited, true);
    UNLOCK();
    return r;
}

FK_API CUresult CUDAAPI cuDriverGetVersion(int *v)
{
    if (!v)
        return CUDA_ERROR_INVALID_VALUE;
    *v = FK_DRIVER_VERSION;
    return CUDA_SUCCESS;
}

FK_API CUresult CUDAAPI cuDeviceGet(CUdevice *dev, int ordinal)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!dev)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(ordinal))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    *dev = ordinal;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDeviceGetCount(int *count)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!count)
        return leave(CUDA_ERROR_INVALID_VALUE);
    *count = g_ndev;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDeviceGetName(char *name, int len, CUdevice dev)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!name || len <= 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    snprintf(name, (size_t)len, "FakeCUDA Device %d", dev);
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!bytes)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    *bytes = g_capacity;
    return leave(CUDA_SUCCESS);
}

/* An H100-like device; anything not listed is 0. */
static int device_attribute(CUdevice_attribute a, CUdevice dev)
{
    switch (a) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: return 9;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: return 0;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: return 132;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: return 1024;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: return 32;
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: return 1;
    case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: return 1;
    case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY: return 1;
    case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: return 1;
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: return 1;
    case CU_DEVICE_ATTRIBUTE_TEXTURE_PITCH_ALIGNMENT: return (int)FK_PITCH_ALIGN;
    case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: return dev;
    default: return 0;
    }
}

FK_API CUresult CUDAAPI cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!pi || attrib <= 0 || attrib >= CU_DEVICE_ATTRIBUTE_MAX)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    *pi = device_attribute(attrib, dev);
    return leave(CUDA_SUCCESS);
}

/* ================================================================ primary contexts */

FK_API CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!pctx)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    fk_device *d = &g_dev[dev];
    if (!d->primary && !(d->primary = ctx_new(dev, true)))
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    if (d->primary->prim_refs == 0 && (r = ctx_activate(d->primary)))
        return leave(r);
    d->primary->prim_refs++;
    d->primary->flags = d->primary_flags;
    *pctx = (CUcontext)d->primary; /* the same handle every time, as in the real driver */
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!dev_ok(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    fk_ctx *c = g_dev[dev].primary;
    if (!c || c->prim_refs == 0)
        return leave(CUDA_ERROR_INVALID_CONTEXT);
    if (--c->prim_refs == 0) { /* last reference: the context and its memory go away */
        c->alive = false;
        ctx_teardown(c);
    }
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDevicePrimaryCtxReset_v2(CUdevice dev)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!dev_ok(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    fk_ctx *c = g_dev[dev].primary;
    if (c && c->alive) {
        c->alive = false;
        c->prim_refs = 0;
        ctx_teardown(c);
    }
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int *flags, int *active)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!flags || !active)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    *flags = g_dev[dev].primary_flags;
    *active = g_dev[dev].primary && g_dev[dev].primary->prim_refs > 0;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDevicePrimaryCtxSetFlags_v2(CUdevice dev, unsigned int flags)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!dev_ok(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    g_dev[dev].primary_flags = flags;
    if (g_dev[dev].primary)
        g_dev[dev].primary->flags = flags;
    return leave(CUDA_SUCCESS);
}

/* ================================================================ contexts */

/* All cuCtxCreate versions: a new context, pushed on the calling thread's stack. */
static CUresult ctx_create(CUcontext *pctx, unsigned flags, CUdevice dev)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!pctx)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    if (tl_depth == FK_STACK_MAX)
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    fk_ctx *c = ctx_new(dev, false);
    if (!c)
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    if ((r = ctx_activate(c)))
        return leave(r);
    c->flags = flags;
    tl_stack[tl_depth++] = c;
    *pctx = (CUcontext)c;
    return leave(CUDA_SUCCESS);
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
    CUresult r = enter();
    if (r)
        return r;
    fk_ctx *c = (fk_ctx *)h;
    if (!c || !ctx_known(c) || c->primary)
        return leave(CUDA_ERROR_INVALID_CONTEXT);
    if (!c->alive)
        return leave(CUDA_ERROR_CONTEXT_IS_DESTROYED);
    c->alive = false;
    ctx_teardown(c);
    if (tl_depth > 0 && tl_stack[tl_depth - 1] == c) /* popped if current, as documented */
        tl_depth--;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuCtxSetCurrent(CUcontext h)
{
    CUresult r = enter();
    if (r)
        return r;
    fk_ctx *c = (fk_ctx *)h;
    if (c && (!ctx_known(c) || !c->alive))
        return leave(CUDA_ERROR_INVALID_CONTEXT);
    if (!c) { /* NULL pops, as documented */
        if (tl_depth > 0)
            tl_depth--;
    } else if (tl_depth == 0) {
        tl_stack[tl_depth++] = c;
    } else {
        tl_stack[tl_depth - 1] = c;
    }
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuCtxGetCurrent(CUcontext *pctx)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!pctx)
        return leave(CUDA_ERROR_INVALID_VALUE);
    *pctx = tl_depth ? (CUcontext)tl_stack[tl_depth - 1] : NULL;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuCtxPushCurrent_v2(CUcontext h)
{
    CUresult r = enter();
    if (r)
        return r;
    fk_ctx *c = (fk_ctx *)h;
    if (!c || !ctx_known(c) || !c->alive)
        return leave(CUDA_ERROR_INVALID_CONTEXT);
    if (tl_depth == FK_STACK_MAX)
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    tl_stack[tl_depth++] = c;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuCtxPopCurrent_v2(CUcontext *pctx)
{
    CUresult r = enter();
    if (r)
        return r;
    if (tl_depth == 0)
        return leave(CUDA_ERROR_INVALID_CONTEXT);
    fk_ctx *c = tl_stack[--tl_depth];
    if (pctx)
        *pctx = (CUcontext)c;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuCtxGetId(CUcontext h, unsigned long long *id)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!id)
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = arg_ctx(h, &c)))
        return leave(r);
    *id = c->id;
    return leave(CUDA_SUCCESS);
}

static CUresult ctx_get_device(CUdevice *dev, CUcontext h)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!dev)
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = arg_ctx(h, &c)))
        return leave(r);
    *dev = c->dev;
    return leave(CUDA_SUCCESS);
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
    CUresult r = enter();
    if (r)
        return r;
    fk_ctx *c;
    if ((r = arg_ctx(h, &c)))
        return leave(r);
    g_cnt.ctx_sync_calls++;
    if (capture_forbids_sync())
        return leave(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    return leave(wait_ctx(c));
}

FK_API CUresult CUDAAPI cuCtxSynchronize(void)
{
    return ctx_synchronize(NULL);
}

FK_API CUresult CUDAAPI cuCtxSynchronize_v2(CUcontext ctx)
{
    return ctx_synchronize(ctx);
}

/* ================================================================ streams */

static CUresult stream_create(CUstream *ph, unsigned flags)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!ph || (flags & ~(unsigned)CU_STREAM_NON_BLOCKING))
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = cur_ctx(&c)))
        return leave(r);
    fk_stream *s = stream_new(c, false, NULL);
    if (!s)
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    *ph = (CUstream)s;
    return leave(CUDA_SUCCESS);
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
    CUresult r = enter();
    if (r)
        return r;
    fk_stream *s;
    if (h == NULL || h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD)
        return leave(CUDA_ERROR_INVALID_HANDLE);
    if ((r = resolve_stream(h, false, &s)))
        return leave(r);
    stream_retire(s); /* returns at once; queued work still runs, like the real driver */
    return leave(CUDA_SUCCESS);
}

static CUresult stream_sync(CUstream h, bool ptds)
{
    CUresult r = enter();
    if (r)
        return r;
    fk_stream *s;
    if ((r = resolve_stream(h, ptds, &s)))
        return leave(r);
    g_cnt.stream_sync_calls++;
    if (s->capturing)
        return leave(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    wait_stream_until(s, s->enq_seq);
    return leave(CUDA_SUCCESS);
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
    CUresult r = enter();
    if (r)
        return r;
    fk_stream *s;
    if ((r = resolve_stream(h, ptds, &s)))
        return leave(r);
    if (s->capturing)
        return leave(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    return leave(s->done_seq == s->enq_seq ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY);
}

FK_API CUresult CUDAAPI cuStreamQuery(CUstream h)
{
    return stream_query(h, false);
}

FK_API CUresult CUDAAPI cuStreamQuery_ptsz(CUstream h)
{
    return stream_query(h, true);
}

static CUresult stream_is_capturing(CUstream h, CUstreamCaptureStatus *st, bool ptds)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!st)
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_stream *s;
    if ((r = resolve_stream(h, ptds, &s)))
        return leave(r);
    *st = s->capturing ? CU_STREAM_CAPTURE_STATUS_ACTIVE : CU_STREAM_CAPTURE_STATUS_NONE;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuStreamIsCapturing(CUstream h, CUstreamCaptureStatus *st)
{
    return stream_is_capturing(h, st, false);
}

FK_API CUresult CUDAAPI cuStreamIsCapturing_ptsz(CUstream h, CUstreamCaptureStatus *st)
{
    return stream_is_capturing(h, st, true);
}

static CUresult stream_begin_capture(CUstream h, CUstreamCaptureMode mode, bool ptds)
{
    CUresult r = enter();
    if (r)
        return r;
    if ((unsigned)mode > CU_STREAM_CAPTURE_MODE_RELAXED)
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_stream *s;
    if ((r = resolve_stream(h, ptds, &s)))
        return leave(r);
    if (s->legacy) /* the legacy stream cannot be captured */
        return leave(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    if (s->capturing)
        return leave(CUDA_ERROR_ILLEGAL_STATE);
    s->capturing = true;
    s->capture_mode = mode;
    s->capture_thread = &tl_token;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuStreamBeginCapture_v2(CUstream h, CUstreamCaptureMode mode)
{
    return stream_begin_capture(h, mode, false);
}

FK_API CUresult CUDAAPI cuStreamBeginCapture_v2_ptsz(CUstream h, CUstreamCaptureMode mode)
{
    return stream_begin_capture(h, mode, true);
}

/* Capture into an existing graph: the fake keeps no graph, so only the stream's state changes. */
FK_API CUresult CUDAAPI cuStreamBeginCaptureToGraph(CUstream h, CUgraph graph, const CUgraphNode *deps,
                                                    const CUgraphEdgeData *edge_data, size_t ndeps,
                                                    CUstreamCaptureMode mode)
{
    (void)edge_data;
    if (!graph || (ndeps && !deps))
        return CUDA_ERROR_INVALID_VALUE;
    return stream_begin_capture(h, mode, false);
}

FK_API CUresult CUDAAPI cuStreamBeginCaptureToGraph_ptsz(CUstream h, CUgraph graph,
                                                         const CUgraphNode *deps,
                                                         const CUgraphEdgeData *edge_data,
                                                         size_t ndeps, CUstreamCaptureMode mode)
{
    (void)edge_data;
    if (!graph || (ndeps && !deps))
        return CUDA_ERROR_INVALID_VALUE;
    return stream_begin_capture(h, mode, true);
}

/* Ends the capture; there is no graph, so *graph is NULL. */
static CUresult stream_end_capture(CUstream h, CUgraph *graph, bool ptds)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!graph)
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_stream *s;
    if ((r = resolve_stream(h, ptds, &s)))
        return leave(r);
    if (!s->capturing)
        return leave(CUDA_ERROR_ILLEGAL_STATE);
    s->capturing = false;
    *graph = NULL;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuStreamEndCapture(CUstream h, CUgraph *graph)
{
    return stream_end_capture(h, graph, false);
}

FK_API CUresult CUDAAPI cuStreamEndCapture_ptsz(CUstream h, CUgraph *graph)
{
    return stream_end_capture(h, graph, true);
}

/* ================================================================ events */

static fk_event *event_lookup(CUevent h)
{
    for (fk_event *e = g_events; e; e = e->next)
        if (e == (fk_event *)h && !e->destroyed)
            return e;
    return NULL;
}

FK_API CUresult CUDAAPI cuEventCreate(CUevent *ph, unsigned int flags)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!ph || (flags & ~0xFu))
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = cur_ctx(&c)))
        return leave(r);
    fk_event *e = calloc(1, sizeof *e);
    if (!e)
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    e->ctx = c;
    e->refs = 1;
    e->next = g_events;
    g_events = e;
    *ph = (CUevent)e;
    return leave(CUDA_SUCCESS);
}

/* A marker in the stream: the event completes when the stream reaches it. */
static CUresult event_record(CUevent h, CUstream hs, bool ptds)
{
    CUresult r = enter();
    if (r)
        return r;
    fk_event *e = event_lookup(h);
    if (!e)
        return leave(CUDA_ERROR_INVALID_HANDLE);
    fk_stream *s;
    if ((r = resolve_stream(hs, ptds, &s)))
        return leave(r);
    g_cnt.event_record_calls++;
    fk_work w = {.kind = W_EVENT, .ev = e, .gen = e->rec_gen + 1};
    if ((r = enqueue(s, &w, NULL)))
        return leave(r);
    e->rec_gen++;
    e->refs++;
    return leave(CUDA_SUCCESS);
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
    CUresult r = enter();
    if (r)
        return r;
    fk_event *e = event_lookup(h);
    if (!e)
        return leave(CUDA_ERROR_INVALID_HANDLE);
    return leave(e->done_gen >= e->rec_gen ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY);
}

FK_API CUresult CUDAAPI cuEventSynchronize(CUevent h)
{
    CUresult r = enter();
    if (r)
        return r;
    fk_event *e = event_lookup(h);
    if (!e)
        return leave(CUDA_ERROR_INVALID_HANDLE);
    uint64_t target = e->rec_gen;
    e->refs++; /* a concurrent destroy must not free it under us */
    while (e->done_gen < target)
        pthread_cond_wait(&g_done, &g_mu);
    ev_unref(e);
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuEventDestroy_v2(CUevent h)
{
    CUresult r = enter();
    if (r)
        return r;
    fk_event *e = event_lookup(h);
    if (!e)
        return leave(CUDA_ERROR_INVALID_HANDLE);
    e->destroyed = true; /* pending markers keep it until they have run */
    ev_unref(e);
    return leave(CUDA_SUCCESS);
}

static CUresult stream_wait_event(CUstream hs, CUevent h, unsigned flags, bool ptds)
{
    CUresult r = enter();
    if (r)
        return r;
    if (flags & ~(unsigned)CU_EVENT_WAIT_EXTERNAL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_event *e = event_lookup(h);
    if (!e)
        return leave(CUDA_ERROR_INVALID_HANDLE);
    fk_stream *s;
    if ((r = resolve_stream(hs, ptds, &s)))
        return leave(r);
    if (e->done_gen >= e->rec_gen) /* nothing to wait for */
        return leave(CUDA_SUCCESS);
    fk_work w = {.kind = W_WAIT, .ev = e, .gen = e->rec_gen};
    if ((r = enqueue(s, &w, NULL)))
        return leave(r);
    e->refs++;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuStreamWaitEvent(CUstream s, CUevent ev, unsigned int flags)
{
    return stream_wait_event(s, ev, flags, false);
}

FK_API CUresult CUDAAPI cuStreamWaitEvent_ptsz(CUstream s, CUevent ev, unsigned int flags)
{
    return stream_wait_event(s, ev, flags, true);
}

/* ================================================================ device memory */

/* cuMemAlloc, cuMemAllocPitch and cuMemAllocManaged: the current context's device. */
static CUresult alloc_in_ctx(CUdeviceptr *dptr, size_t size, fk_akind kind)
{
    CUresult r = enter();
    if (r)
        return r;
    g_cnt.alloc_calls++;
    if (!dptr || size == 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = cur_ctx(&c)))
        return leave(r);
    fk_alloc *a;
    if ((r = dev_alloc(c->dev, c, size, kind, &a)))
        return leave(r);
    *dptr = a->base;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuMemAlloc_v2(CUdeviceptr *dptr, size_t size)
{
    return alloc_in_ctx(dptr, size, A_DEVICE);
}

FK_API CUresult CUDAAPI cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width,
                                           size_t height, unsigned int elem)
{
    if (!pitch || width == 0 || height == 0 || (elem != 4 && elem != 8 && elem != 16)) {
        CUresult r = enter(); /* still counted, and NOT_INITIALIZED still wins */
        if (r)
            return r;
        g_cnt.alloc_calls++;
        return leave(CUDA_ERROR_INVALID_VALUE);
    }
    size_t p = round_up(width, FK_PITCH_ALIGN), total;
    if (__builtin_mul_overflow(p, height, &total))
        total = SIZE_MAX; /* fails the capacity check */
    CUresult r = alloc_in_ctx(dptr, total, A_DEVICE);
    if (r == CUDA_SUCCESS)
        *pitch = p;
    return r;
}

FK_API CUresult CUDAAPI cuMemAllocManaged(CUdeviceptr *dptr, size_t size, unsigned int flags)
{
    if (flags != CU_MEM_ATTACH_GLOBAL && flags != CU_MEM_ATTACH_HOST) {
        CUresult r = enter();
        if (r)
            return r;
        g_cnt.alloc_calls++;
        return leave(CUDA_ERROR_INVALID_VALUE);
    }
    return alloc_in_ctx(dptr, size, A_MANAGED);
}

/* Stream-ordered allocation: the memory exists at once (the pool is ignored). */
static CUresult alloc_async(CUdeviceptr *dptr, size_t size, CUstream h, bool ptds)
{
    CUresult r = enter();
    if (r)
        return r;
    g_cnt.alloc_calls++;
    if (!dptr || size == 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_stream *s;
    if ((r = resolve_stream(h, ptds, &s)))
        return leave(r);
    fk_alloc *a;
    if ((r = dev_alloc(s->ctx->dev, s->ctx, size, A_ASYNC, &a)))
        return leave(r);
    *dptr = a->base;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuMemAllocAsync(CUdeviceptr *dptr, size_t size, CUstream s)
{
    return alloc_async(dptr, size, s, false);
}

FK_API CUresult CUDAAPI cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t size, CUstream s)
{
    return alloc_async(dptr, size, s, true);
}

FK_API CUresult CUDAAPI cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t size, CUmemoryPool pool,
                                                CUstream s)
{
    (void)pool;
    return alloc_async(dptr, size, s, false);
}

FK_API CUresult CUDAAPI cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t size,
                                                     CUmemoryPool pool, CUstream s)
{
    (void)pool;
    return alloc_async(dptr, size, s, true);
}

/* cuMemFree: the implicit barrier. Waits for every stream of the allocation's context. */
FK_API CUresult CUDAAPI cuMemFree_v2(CUdeviceptr p)
{
    CUresult r = enter();
    if (r)
        return r;
    g_cnt.free_calls++;
    if (p == 0) /* like free(NULL) in the real driver */
        return leave(CUDA_SUCCESS);
    fk_ctx *c;
    if ((r = cur_ctx(&c)))
        return leave(r);
    if (capture_forbids_sync())
        return leave(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    fk_alloc *a = reg_find_base(p);
    if (!a || a->freeing || a->kind == A_HOST || a->kind == A_IPC) /* IPC: cuIpcCloseMemHandle */
        return leave(CUDA_ERROR_INVALID_VALUE);
    a->freeing = true; /* a racing second free now fails instead of freeing twice */
    uint64_t id = a->id;
    r = wait_ctx(a->ctx);
    a = reg_find_base(p); /* the lock was dropped: it may have gone with its context */
    if (a && a->id == id)
        alloc_release(a);
    return leave(r);
}

/* Queued behind the stream's work; freed when the worker reaches it. */
static CUresult free_async(CUdeviceptr p, CUstream h, bool ptds)
{
    CUresult r = enter();
    if (r)
        return r;
    g_cnt.free_calls++;
    fk_stream *s;
    if ((r = resolve_stream(h, ptds, &s)))
        return leave(r);
    fk_alloc *a = reg_find_base(p);
    if (!a || a->freeing || (a->kind != A_DEVICE && a->kind != A_ASYNC))
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_work w = {.kind = W_FREE, .dst = p, .alloc_id = a->id};
    if ((r = enqueue(s, &w, NULL)))
        return leave(r);
    a->freeing = true;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuMemFreeAsync(CUdeviceptr p, CUstream s)
{
    return free_async(p, s, false);
}

FK_API CUresult CUDAAPI cuMemFreeAsync_ptsz(CUdeviceptr p, CUstream s)
{
    return free_async(p, s, true);
}

FK_API CUresult CUDAAPI cuMemGetInfo_v2(size_t *free_bytes, size_t *total)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!free_bytes || !total)
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = cur_ctx(&c)))
        return leave(r);
    uint64_t used = g_dev[c->dev].in_use;
    *free_bytes = used < g_capacity ? g_capacity - used : 0;
    *total = g_capacity;
    return leave(CUDA_SUCCESS);
}

/* ================================================================ pinned host memory */

static CUresult host_alloc(void **pp, size_t size, unsigned flags)
{
    CUresult r = enter();
    if (r)
        return r;
    g_cnt.host_alloc_calls++;
    if (!pp || size == 0 || (flags & ~(unsigned)(CU_MEMHOSTALLOC_PORTABLE |
                                                 CU_MEMHOSTALLOC_DEVICEMAP |
                                                 CU_MEMHOSTALLOC_WRITECOMBINED)))
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = cur_ctx(&c)))
        return leave(r);
    fk_alloc *a = calloc(1, sizeof *a);
    void *mem = aligned_alloc(FK_SMALL_ALIGN, round_up(size, FK_SMALL_ALIGN));
    if (!a || !mem) {
        free(a);
        free(mem);
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    *a = (fk_alloc){.base = (uintptr_t)mem, .size = size, .kind = A_HOST, .dev = c->dev,
                    .ctx = c, .id = g_next_id++};
    if (!reg_insert(a)) {
        free(a);
        free(mem);
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    *pp = mem;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuMemAllocHost_v2(void **pp, size_t size)
{
    return host_alloc(pp, size, 0);
}

FK_API CUresult CUDAAPI cuMemHostAlloc(void **pp, size_t size, unsigned int flags)
{
    return host_alloc(pp, size, flags);
}

FK_API CUresult CUDAAPI cuMemFreeHost(void *p)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!p) /* like free(NULL) in the real driver */
        return leave(CUDA_SUCCESS);
    fk_ctx *c;
    if ((r = cur_ctx(&c)))
        return leave(r);
    fk_alloc *a = reg_find_base((uintptr_t)p);
    if (!a || a->kind != A_HOST)
        return leave(CUDA_ERROR_INVALID_VALUE);
    alloc_release(a);
    return leave(CUDA_SUCCESS);
}

/* Host registration: the range becomes pinned memory the driver knows (pointer queries answer
 * for it) until unregistered; its memory stays the program's. */
FK_API CUresult CUDAAPI cuMemHostRegister_v2(void *p, size_t size, unsigned int flags)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!p || size == 0 || (flags & ~(unsigned)(CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP |
                                               CU_MEMHOSTREGISTER_IOMEMORY | CU_MEMHOSTREGISTER_READ_ONLY)))
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = cur_ctx(&c)))
        return leave(r);
    uintptr_t base = (uintptr_t)p;
    if (reg_find(base) || reg_find(base + size - 1))
        return leave(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED);
    fk_alloc *a = calloc(1, sizeof *a);
    if (!a)
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    *a = (fk_alloc){.base = base, .size = size, .kind = A_REGISTERED, .dev = c->dev, .ctx = c,
                    .id = g_next_id++};
    if (!reg_insert(a)) {
        free(a);
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuMemHostUnregister(void *p)
{
    CUresult r = enter();
    if (r)
        return r;
    fk_alloc *a = p ? reg_find_base((uintptr_t)p) : NULL;
    if (!a || a->kind != A_REGISTERED)
        return leave(CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED);
    alloc_release(a);
    return leave(CUDA_SUCCESS);
}

/* ================================================================ virtual memory handles */

FK_API CUresult CUDAAPI cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *prop,
                                                      CUmemAllocationGranularity_flags option)
{
    CUresult r = enter();
    if (r)
        return r;
    (void)option;
    if (!g || !prop)
        return leave(CUDA_ERROR_INVALID_VALUE);
    *g = FK_VMM_GRANULARITY;
    return leave(CUDA_SUCCESS);
}

/* A handle to physical memory (host memory here); it is never mapped by this fake. */
FK_API CUresult CUDAAPI cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                                    const CUmemAllocationProp *prop, unsigned long long flags)
{
    CUresult r = enter();
    if (r)
        return r;
    g_cnt.alloc_calls++;
    if (!handle || !prop || flags || size == 0 || size % FK_VMM_GRANULARITY ||
        prop->type != CU_MEM_ALLOCATION_TYPE_PINNED ||
        prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(prop->location.id))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    fk_alloc *a;
    if ((r = dev_alloc(prop->location.id, NULL, size, A_VMM, &a)))
        return leave(r);
    a->vnext = g_vmm;
    g_vmm = a;
    *handle = (CUmemGenericAllocationHandle)a->id;
    return leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuMemRelease(CUmemGenericAllocationHandle handle)
{
    CUresult r = enter();
    if (r)
        return r;
    g_cnt.free_calls++;
    for (fk_alloc *a = g_vmm; a; a = a->vnext) {
        if (a->id == handle) {
            alloc_release(a);
            return leave(CUDA_SUCCESS);
        }
    }
    return leave(CUDA_ERROR_INVALID_VALUE);
}

/* ================================================================ copies and memsets */

/* fakecuda_fail_copies: the injected error for this copy, or CUDA_SUCCESS. */
static CUresult copy_fault(void)
{
    if (!g_copy_fail_count)
        return CUDA_SUCCESS;
    if (g_copy_fail_skip) {
        g_copy_fail_skip--;
        return CUDA_SUCCESS;
    }
    g_copy_fail_count--;
    return g_copy_fail_code;
}

/* Host memory the fake does not know (neither pinned nor registered) is pageable, and the real
 * driver's documented behaviour for it is kept: a copy into pageable memory returns only once the
 * data is there, and an asynchronous copy out of pageable memory returns once the source has been
 * consumed (snapshotted here), so the program may overwrite it at once. */
static CUresult copy_pageable(fk_work *w, bool *sync)
{
    bool dst_pageable = !w->chk_dst && !reg_find(w->dst);
    bool src_pageable = !w->chk_src && !reg_find(w->src);
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

/* Validate, count and queue one copy/memset/fill; `sync` waits for it like the blocking APIs.
 * chk_dst/chk_src say which side must lie inside a live allocation. */
static CUresult mem_op(CUstream h, bool ptds, fk_work w, bool sync)
{
    CUresult r = enter();
    if (r)
        return r;
    if (w.kind == W_COPY)
        g_cnt.copy_calls++;
    fk_stream *s;
    if ((r = resolve_stream(h, ptds, &s)))
        return leave(r);
    if (w.n == 0)
        return leave(CUDA_SUCCESS);
    size_t unit = w.kind == W_SET32 ? 4 : w.kind == W_SET16 ? 2 : 1;
    size_t bytes = w.n * unit;
    if (unit > 1 && (w.n > SIZE_MAX / unit || w.dst % unit))
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!w.dst || (w.kind == W_COPY && !w.src) || (w.chk_dst && !dev_range_ok(w.dst, bytes)) ||
        (w.chk_src && !dev_range_ok(w.src, bytes)))
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (w.kind == W_COPY) {
        if ((r = copy_fault()))
            return leave(r);
        if ((r = copy_pageable(&w, &sync)))
            return leave(r);
    }
    uint64_t seq;
    if ((r = enqueue(s, &w, &seq))) {
        free(w.owned);
        return leave(r);
    }
    if (sync)
        wait_stream_until(s, seq);
    return leave(CUDA_SUCCESS);
}

static fk_work copy_work(uintptr_t dst, uintptr_t src, size_t n, bool chk_dst, bool chk_src)
{
    return (fk_work){.kind = W_COPY, .dst = dst, .src = src, .n = n, .chk_dst = chk_dst,
                     .chk_src = chk_src};
}

static fk_work set_work(fk_wkind kind, uintptr_t dst, uint32_t v, size_t n)
{
    return (fk_work){.kind = kind, .dst = dst, .val = v, .n = n, .chk_dst = true};
}

#define HTOD(d, s, n) copy_work((d), (uintptr_t)(s), (n), true, false)
#define DTOH(d, s, n) copy_work((uintptr_t)(d), (s), (n), false, true)
#define DTOD(d, s, n) copy_work((d), (s), (n), true, true)
#define UNIFIED(d, s, n) copy_work((d), (s), (n), false, false) /* either side, unchecked */

FK_API CUresult CUDAAPI cuMemcpyHtoD_v2(CUdeviceptr d, const void *s, size_t n)
{
    return mem_op(NULL, false, HTOD(d, s, n), true);
}

FK_API CUresult CUDAAPI cuMemcpyHtoD_v2_ptds(CUdeviceptr d, const void *s, size_t n)
{
    return mem_op(NULL, true, HTOD(d, s, n), true);
}

FK_API CUresult CUDAAPI cuMemcpyDtoH_v2(void *d, CUdeviceptr s, size_t n)
{
    return mem_op(NULL, false, DTOH(d, s, n), true);
}

FK_API CUresult CUDAAPI cuMemcpyDtoH_v2_ptds(void *d, CUdeviceptr s, size_t n)
{
    return mem_op(NULL, true, DTOH(d, s, n), true);
}

FK_API CUresult CUDAAPI cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n)
{
    return mem_op(NULL, false, DTOD(d, s, n), true);
}

FK_API CUresult CUDAAPI cuMemcpyDtoD_v2_ptds(CUdeviceptr d, CUdeviceptr s, size_t n)
{
    return mem_op(NULL, true, DTOD(d, s, n), true);
}

FK_API CUresult CUDAAPI cuMemcpy(CUdeviceptr d, CUdeviceptr s, size_t n)
{
    return mem_op(NULL, false, UNIFIED(d, s, n), true);
}

FK_API CUresult CUDAAPI cuMemcpy_ptds(CUdeviceptr d, CUdeviceptr s, size_t n)
{
    return mem_op(NULL, true, UNIFIED(d, s, n), true);
}

FK_API CUresult CUDAAPI cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void *s, size_t n, CUstream h)
{
    return mem_op(h, false, HTOD(d, s, n), false);
}

FK_API CUresult CUDAAPI cuMemcpyHtoDAsync_v2_ptsz(CUdeviceptr d, const void *s, size_t n,
                                                  CUstream h)
{
    return mem_op(h, true, HTOD(d, s, n), false);
}

FK_API CUresult CUDAAPI cuMemcpyDtoHAsync_v2(void *d, CUdeviceptr s, size_t n, CUstream h)
{
    return mem_op(h, false, DTOH(d, s, n), false);
}

FK_API CUresult CUDAAPI cuMemcpyDtoHAsync_v2_ptsz(void *d, CUdeviceptr s, size_t n, CUstream h)
{
    return mem_op(h, true, DTOH(d, s, n), false);
}

FK_API CUresult CUDAAPI cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream h)
{
    return mem_op(h, false, DTOD(d, s, n), false);
}

FK_API CUresult CUDAAPI cuMemcpyDtoDAsync_v2_ptsz(CUdeviceptr d, CUdeviceptr s, size_t n,
                                                  CUstream h)
{
    return mem_op(h, true, DTOD(d, s, n), false);
}

FK_API CUresult CUDAAPI cuMemcpyAsync(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream h)
{
    return mem_op(h, false, UNIFIED(d, s, n), false);
}

FK_API CUresult CUDAAPI cuMemcpyAsync_ptsz(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream h)
{
    return mem_op(h, true, UNIFIED(d, s, n), false);
}

FK_API CUresult CUDAAPI cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n)
{
    return mem_op(NULL, false, set_work(W_SET8, d, v, n), true);
}

FK_API CUresult CUDAAPI cuMemsetD8_v2_ptds(CUdeviceptr d, unsigned char v, size_t n)
{
    return mem_op(NULL, true, set_work(W_SET8, d, v, n), true);
}

FK_API CUresult CUDAAPI cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream h)
{
    return mem_op(h, false, set_work(W_SET8, d, v, n), false);
}

FK_API CUresult CUDAAPI cuMemsetD8Async_ptsz(CUdeviceptr d, unsigned char v, size_t n, CUstream h)
{
    return mem_op(h, true, set_work(W_SET8, d, v, n), false);
}

FK_API CUresult CUDAAPI cuMemsetD16_v2(CUdeviceptr d, unsigned short v, size_t n)
{
    return mem_op(NULL, false, set_work(W_SET16, d, v, n), true);
}

FK_API CUresult CUDAAPI cuMemsetD16_v2_ptds(CUdeviceptr d, unsigned short v, size_t n)
{
    return mem_op(NULL, true, set_work(W_SET16, d, v, n), true);
}

FK_API CUresult CUDAAPI cuMemsetD16Async(CUdeviceptr d, unsigned short v, size_t n, CUstream h)
{
    return mem_op(h, false, set_work(W_SET16, d, v, n), false);
}

FK_API CUresult CUDAAPI cuMemsetD16Async_ptsz(CUdeviceptr d, unsigned short v, size_t n, CUstream h)
{
    return mem_op(h, true, set_work(W_SET16, d, v, n), false);
}

FK_API CUresult CUDAAPI cuMemsetD32_v2(CUdeviceptr d, unsigned int v, size_t n)
{
    return mem_op(NULL, false, set_work(W_SET32, d, v, n), true);
}

FK_API CUresult CUDAAPI cuMemsetD32_v2_ptds(CUdeviceptr d, unsigned int v, size_t n)
{
    return mem_op(NULL, true, set_work(W_SET32, d, v, n), true);
}

FK_API CUresult CUDAAPI cuMemsetD32Async(CUdeviceptr d, unsigned int v, size_t n, CUstream h)
{
    return mem_op(h, false, set_work(W_SET32, d, v, n), false);
}

FK_API CUresult CUDAAPI cuMemsetD32Async_ptsz(CUdeviceptr d, unsigned int v, size_t n, CUstream h)
{
    return mem_op(h, true, set_work(W_SET32, d, v, n), false);
}

/* ================================================================ pitched, peer and 2D-memset copies */

/* A pitched (2D/3D) copy runs as one row copy per row of every slice, queued together under the
 * lock, so it is ordered on its stream like one copy; pageable sides behave per row as in
 * copy_pageable. Each host/device side is validated as the real driver documents (pitch at
 * least X + WidthInBytes when there are several rows, slices of at least Height rows), a DEVICE
 * side must lie in one live allocation over its whole span, UNIFIED sides are unchecked like
 * cuMemcpy's. The fake has no CUDA arrays: an ARRAY side is an invalid handle. */
typedef struct fk_pside {
    CUmemorytype type;
    uintptr_t host, dev;
    size_t x, y, z, pitch, rows; /* rows: rows per slice of a 3D side; 0 for 2D */
    uintptr_t start;             /* resolved: the first byte, and the span's length */
    size_t extent;
} fk_pside;

typedef struct fk_pitched {
    bool given; /* false: the descriptor pointer was NULL */
    fk_pside side[2]; /* dst, src */
    size_t width, height, depth;
    bool peer;        /* a 3D peer copy: check the contexts */
    CUcontext ctx[2];
} fk_pitched;

#define FK_PSIDE(d, s, z_, rows_)                                                                  \
    ((fk_pside){.type = (d)->s##MemoryType, .host = (uintptr_t)(d)->s##Host, .dev = (d)->s##Device, \
                .x = (d)->s##XInBytes, .y = (d)->s##Y, .z = (z_), .pitch = (d)->s##Pitch, .rows = (rows_)})

static fk_pitched fk_from_2d(const CUDA_MEMCPY2D *d)
{
    return (fk_pitched){true, {FK_PSIDE(d, dst, 0, 0), FK_PSIDE(d, src, 0, 0)}, d->WidthInBytes, d->Height, 1,
                        false, {NULL, NULL}};
}

static fk_pitched fk_from_3d(const CUDA_MEMCPY3D *d)
{
    return (fk_pitched){true,
                        {FK_PSIDE(d, dst, d->dstZ, d->dstHeight), FK_PSIDE(d, src, d->srcZ, d->srcHeight)},
                        d->WidthInBytes, d->Height, d->Depth, false, {NULL, NULL}};
}

static fk_pitched fk_from_3d_peer(const CUDA_MEMCPY3D_PEER *d)
{
    return (fk_pitched){true,
                        {FK_PSIDE(d, dst, d->dstZ, d->dstHeight), FK_PSIDE(d, src, d->srcZ, d->srcHeight)},
                        d->WidthInBytes, d->Height, d->Depth, true, {d->dstContext, d->srcContext}};
}

/* *out = a * b + c; false when it wraps. */
static bool fk_mul_add(size_t a, size_t b, size_t c, size_t *out)
{
    return !__builtin_mul_overflow(a, b, out) && !__builtin_add_overflow(*out, c, out);
}

/* Resolve and validate one side: start = base + X + (Z * rows + Y) * pitch, extent =
 * ((Depth - 1) * rows + Height - 1) * pitch + WidthInBytes. */
static CUresult pside_resolve(fk_pside *s, const fk_pitched *pc)
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
    if (!fk_mul_add(s->z, s->rows, s->y, &before) || !fk_mul_add(before, s->pitch, s->x, &off) ||
        __builtin_add_overflow(base, off, &s->start) ||
        !fk_mul_add(pc->depth - 1, s->rows, pc->height - 1, &after) ||
        !fk_mul_add(after, s->pitch, pc->width, &s->extent))
        return CUDA_ERROR_INVALID_VALUE;
    if (s->type == CU_MEMORYTYPE_DEVICE && !dev_range_ok(s->start, s->extent))
        return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

/* One row copy per row; *last gets the last one's sequence number, *wait is set when a row's
 * destination is pageable memory (the call then returns once the data is there). */
static CUresult pitched_enqueue(fk_stream *s, const fk_pitched *pc, uint64_t *last, bool *wait)
{
    const fk_pside *d = &pc->side[0], *r = &pc->side[1];
    for (size_t z = 0; z < pc->depth; z++) {
        for (size_t y = 0; y < pc->height; y++) {
            uintptr_t dst = d->start + (z * d->rows + y) * d->pitch, src = r->start + (z * r->rows + y) * r->pitch;
            fk_work w = copy_work(dst, src, pc->width, d->type == CU_MEMORYTYPE_DEVICE,
                                  r->type == CU_MEMORYTYPE_DEVICE);
            CUresult rc = copy_pageable(&w, wait);
            if (!rc)
                rc = enqueue(s, &w, last);
            if (rc) {
                free(w.owned);
                return rc;
            }
        }
    }
    return CUDA_SUCCESS;
}

static CUresult pitched_copy(CUstream h, bool ptds, fk_pitched pc, bool sync)
{
    CUresult r = enter();
    if (r)
        return r;
    g_cnt.copy_calls++;
    fk_stream *s;
    fk_ctx *c;
    if ((r = resolve_stream(h, ptds, &s)))
        return leave(r);
    if (!pc.given)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (pc.peer && ((r = arg_ctx(pc.ctx[0], &c)) || (r = arg_ctx(pc.ctx[1], &c))))
        return leave(r);
    if (!pc.width || !pc.height || !pc.depth)
        return leave(CUDA_SUCCESS);
    for (int i = 0; i < 2; i++)
        if ((r = pside_resolve(&pc.side[i], &pc)))
            return leave(r);
    if ((r = copy_fault()))
        return leave(r);
    uint64_t last = 0;
    if ((r = pitched_enqueue(s, &pc, &last, &sync)))
        return leave(r);
    if (sync)
        wait_stream_until(s, last);
    return leave(CUDA_SUCCESS);
}

#define FK_PITCHED(name, desc_t, conv, ptds)                    \
    FK_API CUresult CUDAAPI name(const desc_t *p)               \
    {                                                           \
        return pitched_copy(NULL, ptds, p ? conv(p) : (fk_pitched){0}, true); \
    }
#define FK_PITCHED_ASYNC(name, desc_t, conv, ptds)              \
    FK_API CUresult CUDAAPI name(const desc_t *p, CUstream h)   \
    {                                                           \
        return pitched_copy(h, ptds, p ? conv(p) : (fk_pitched){0}, false); \
    }

FK_PITCHED(cuMemcpy2D_v2, CUDA_MEMCPY2D, fk_from_2d, false)
FK_PITCHED(cuMemcpy2D_v2_ptds, CUDA_MEMCPY2D, fk_from_2d, true)
FK_PITCHED(cuMemcpy2DUnaligned_v2, CUDA_MEMCPY2D, fk_from_2d, false)
FK_PITCHED(cuMemcpy2DUnaligned_v2_ptds, CUDA_MEMCPY2D, fk_from_2d, true)
FK_PITCHED_ASYNC(cuMemcpy2DAsync_v2, CUDA_MEMCPY2D, fk_from_2d, false)
FK_PITCHED_ASYNC(cuMemcpy2DAsync_v2_ptsz, CUDA_MEMCPY2D, fk_from_2d, true)
FK_PITCHED(cuMemcpy3D_v2, CUDA_MEMCPY3D, fk_from_3d, false)
FK_PITCHED(cuMemcpy3D_v2_ptds, CUDA_MEMCPY3D, fk_from_3d, true)
FK_PITCHED_ASYNC(cuMemcpy3DAsync_v2, CUDA_MEMCPY3D, fk_from_3d, false)
FK_PITCHED_ASYNC(cuMemcpy3DAsync_v2_ptsz, CUDA_MEMCPY3D, fk_from_3d, true)
FK_PITCHED(cuMemcpy3DPeer, CUDA_MEMCPY3D_PEER, fk_from_3d_peer, false)
FK_PITCHED(cuMemcpy3DPeer_ptds, CUDA_MEMCPY3D_PEER, fk_from_3d_peer, true)
FK_PITCHED_ASYNC(cuMemcpy3DPeerAsync, CUDA_MEMCPY3D_PEER, fk_from_3d_peer, false)
FK_PITCHED_ASYNC(cuMemcpy3DPeerAsync_ptsz, CUDA_MEMCPY3D_PEER, fk_from_3d_peer, true)

/* cuMemcpyPeer: a device-to-device copy once both context handles are valid (the fake's memory
 * is one address space, so the contexts say nothing else). */
static CUresult peer_copy(CUdeviceptr d, CUcontext dc, CUdeviceptr s, CUcontext sc, size_t n, CUstream h,
                          bool ptds, bool sync)
{
    fk_ctx *c;
    CUresult r = enter();
    if (r)
        return r;
    if (!(r = arg_ctx(dc, &c)))
        r = arg_ctx(sc, &c);
    if (r)
        g_cnt.copy_calls++; /* mem_op counts the others */
    UNLOCK();
    return r ? r : mem_op(h, ptds, DTOD(d, s, n), sync);
}

FK_API CUresult CUDAAPI cuMemcpyPeer(CUdeviceptr d, CUcontext dc, CUdeviceptr s, CUcontext sc, size_t n)
{
    return peer_copy(d, dc, s, sc, n, NULL, false, true);
}

FK_API CUresult CUDAAPI cuMemcpyPeer_ptds(CUdeviceptr d, CUcontext dc, CUdeviceptr s, CUcontext sc, size_t n)
{
    return peer_copy(d, dc, s, sc, n, NULL, true, true);
}

FK_API CUresult CUDAAPI cuMemcpyPeerAsync(CUdeviceptr d, CUcontext dc, CUdeviceptr s, CUcontext sc, size_t n,
                                          CUstream h)
{
    return peer_copy(d, dc, s, sc, n, h, false, false);
}

FK_API CUresult CUDAAPI cuMemcpyPeerAsync_ptsz(CUdeviceptr d, CUcontext dc, CUdeviceptr s, CUcontext sc,
                                               size_t n, CUstream h)
{
    return peer_copy(d, dc, s, sc, n, h, true, false);
}

/* cuMemsetD2D*: Height rows of Width elements, dstPitch bytes apart, one memset per row; the
 * whole span, (Height - 1) * pitch + Width * element size, in one live allocation. */
static CUresult set2d(CUstream h, bool ptds, fk_wkind kind, CUdeviceptr d, size_t pitch, uint32_t v, size_t w,
                      size_t hgt, bool sync)
{
    CUresult r = enter();
    if (r)
        return r;
    fk_stream *s;
    if ((r = resolve_stream(h, ptds, &s)))
        return leave(r);
    if (!w || !hgt)
        return leave(CUDA_SUCCESS);
    size_t unit = kind == W_SET32 ? 4 : kind == W_SET16 ? 2 : 1, row, n;
    if (!d || d % unit || __builtin_mul_overflow(w, unit, &row) || (hgt > 1 && (pitch < row || pitch % unit)) ||
        !fk_mul_add(hgt - 1, pitch, row, &n) || !dev_range_ok(d, n))
        return leave(CUDA_ERROR_INVALID_VALUE);
    uint64_t last = 0;
    for (size_t y = 0; y < hgt; y++) {
        fk_work work = set_work(kind, d + y * pitch, v, w);
        if ((r = enqueue(s, &work, &last)))
            return leave(r);
    }
    if (sync)
        wait_stream_until(s, last);
    return leave(CUDA_SUCCESS);
}

#define FK_SET2D(name, t, kind, ptds)                                                       \
    FK_API CUresult CUDAAPI name(CUdeviceptr d, size_t pitch, t v, size_t w, size_t h)      \
    {                                                                                       \
        return set2d(NULL, ptds, kind, d, pitch, v, w, h, true);                            \
    }
#define FK_SET2D_ASYNC(name, t, kind, ptds)                                                           \
    FK_API CUresult CUDAAPI name(CUdeviceptr d, size_t pitch, t v, size_t w, size_t h, CUstream hs)   \
    {                                                                                                 \
        return set2d(hs, ptds, kind, d, pitch, v, w, h, false);                                       \
    }

FK_SET2D(cuMemsetD2D8_v2, unsigned char, W_SET8, false)
FK_SET2D(cuMemsetD2D8_v2_ptds, unsigned char, W_SET8, true)
FK_SET2D(cuMemsetD2D16_v2, unsigned short, W_SET16, false)
FK_SET2D(cuMemsetD2D16_v2_ptds, unsigned short, W_SET16, true)
FK_SET2D(cuMemsetD2D32_v2, unsigned int, W_SET32, false)
FK_SET2D(cuMemsetD2D32_v2_ptds, unsigned int, W_SET32, true)
FK_SET2D_ASYNC(cuMemsetD2D8Async, unsigned char, W_SET8, false)
FK_SET2D_ASYNC(cuMemsetD2D8Async_ptsz, unsigned char, W_SET8, true)
FK_SET2D_ASYNC(cuMemsetD2D16Async, unsigned short, W_SET16, false)
FK_SET2D_ASYNC(cuMemsetD2D16Async_ptsz, unsigned short, W_SET16, true)
FK_SET2D_ASYNC(cuMemsetD2D32Async, unsigned int, W_SET32, false)
FK_SET2D_ASYNC(cuMemsetD2D32Async_ptsz, unsigned int, W_SET32, true)

/* ================================================================ pointer queries */

FK_API CUresult CUDAAPI cuMemGetAddressRange_v2(CUdeviceptr *pbase, size_t *psize, CUdeviceptr p)
{
    CUresult r = enter();
    if (r)
        return r;
    fk_ctx *c;
    if ((r = cur_ctx(&c)))
        return leave(r);
    fk_alloc *a = reg_find(p);
    if (!a)
        return leave(CUDA_ERROR_NOT_FOUND);
    if (pbase)
        *pbase = a->base;
    if (psize)
        *psize = a->size;
    return leave(CUDA_SUCCESS);
}

/* One attribute of a known allocation; booleans are written as unsigned int. */
static CUresult ptr_attr(void *data, CUpointer_attribute attr, const fk_alloc *a, CUdeviceptr p)
{
    bool host_ok = a->kind == A_HOST || a->kind == A_MANAGED || a->kind == A_REGISTERED;
    switch (attr) {
    case CU_POINTER_ATTRIBUTE_CONTEXT: *(CUcontext *)data = (CUcontext)a->ctx; break;
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
        *(unsigned *)data =
            a->kind == A_HOST || a->kind == A_REGISTERED ? CU_MEMORYTYPE_HOST : CU_MEMORYTYPE_DEVICE;
        break;
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER: *(CUdeviceptr *)data = p; break;
    case CU_POINTER_ATTRIBUTE_HOST_POINTER:
        if (!host_ok)
            return CUDA_ERROR_INVALID_VALUE;
        *(void **)data = (void *)p;
        break;
    case CU_POINTER_ATTRIBUTE_IS_MANAGED: *(unsigned *)data = a->kind == A_MANAGED; break;
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: *(int *)data = a->dev; break;
    case CU_POINTER_ATTRIBUTE_BUFFER_ID: *(unsigned long long *)data = a->id; break;
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR: *(CUdeviceptr *)data = a->base; break;
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE: *(size_t *)data = a->size; break;
    case CU_POINTER_ATTRIBUTE_MAPPED: *(unsigned *)data = 1; break;
    case CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:
        *(unsigned *)data = a->kind == A_DEVICE;
        break;
    case CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE: *(CUmemoryPool *)data = NULL; break;
    /* What the H200 answered for cuMemAlloc memory (docs/gpu-runs/identity_probe_driver.txt). */
    case CU_POINTER_ATTRIBUTE_SYNC_MEMOPS: *(unsigned *)data = a->sync_memops; break;
    case CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES: *(unsigned long long *)data = 0; break;
    case CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE:
        *(unsigned *)data = a->kind == A_DEVICE;
        break;
    case CU_POINTER_ATTRIBUTE_ACCESS_FLAGS:
        *(unsigned *)data = counts_as_device(a->kind) || a->kind == A_IPC ? 3 : 0;
        break;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

FK_API CUresult CUDAAPI cuPointerGetAttribute(void *data, CUpointer_attribute attr, CUdeviceptr p)
{
    CUresult r = enter();
    if (r)
        return r;
    if (!data)
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if (attr == CU_POINTER_ATTRIBUTE_DEVICE_POINTER && (r = cur_ctx(&c)))
        return leave(r);
    const fk_alloc *a = reg_find(p);
    if (!a)
        return leave(CUDA_ERROR_INVALID_VALUE);
    return leave(ptr_attr(data, attr, a, p));
}

/* Unknown pointers are not an error here: the documented defaults are written instead. */
static void ptr_attr_default(void *data, CUpointer_attribute attr)
{
    switch (attr) {
    case CU_POINTER_ATTRIBUTE_CONTEXT: *(CUcontext *)data = NULL; break;
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE: *(unsigned *)data = 0; break;
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER: *(CUdeviceptr *)data = 0; break;
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE: break; /* untouched, as the driver (H200, 580) does */
    case CU_POINTER_ATTRIBUTE_HOST_POINTER: *(void **)data = NULL; break;
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: *(int *)data = -2; break;
    case CU_POINTER_ATTRIBUTE_BUFFER_ID: *(unsigned long long *)data = 0; break;
    case CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE: *(CUmemoryPool *)data = NULL; break;
    default: *(unsigned *)data = 0; break;
    }
}

FK_API CUresult CUDAAPI cuPointerGetAttributes(unsigned int n, CUpointer_attribute *attrs,
                                               void **data, CUdeviceptr p)
{
    CUresult r = enter();
    if (r)
        return r;
    if (n == 0 || !attrs || !data)
        return leave(CUDA_ERROR_INVALID_VALUE);
    const fk_alloc *a = reg_find(p);
    for (unsigned i = 0; i < n; i++) {
        if (!data[i])
            return leave(CUDA_ERROR_INVALID_VALUE);
        if (!a || ptr_attr(data[i], attrs[i], a, p) != CUDA_SUCCESS)
            ptr_attr_default(data[i], attrs[i]);
    }
    return leave(CUDA_SUCCESS);
}

/* Only SYNC_MEMOPS can be set, on memory the fake knows (what the driver allows). */
FK_API CUresult CUDAAPI cuPointerSetAttribute(const void *value, CUpointer_attribute attr,
                                              CUdeviceptr p)
{
    CUresult r = enter();
    if (r)
        return r;
    fk_alloc *a = reg_find(p);
    if (!value || !a || attr != CU_POINTER_ATTRIBUTE_SYNC_MEMOPS)
        return leave(CUDA_ERROR_INVALID_VALUE);
    a->sync_memops = *(const unsigned *)value != 0;
    return leave(CUDA_SUCCESS);
}

/* The fake maps no VMM handles to addresses, so no address has an allocation handle (the driver
 * answers CUDA_ERROR_INVALID_VALUE for cuMemAlloc memory too). */
FK_API CUresult CUDAAPI cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *handle, void *addr)
{
    (void)addr;
    CUresult r = enter();
    if (r)
        return r;
    (void)handle;
    return leave(CUDA_ERROR_INVALID_VALUE);
}

/* ================================================================ IPC
 * A handle names a whole cuMemAlloc allocation (an interior pointer gives the same handle, as on
 * the driver): magic, size at bytes 16..23 (where the driver keeps it), exporter pid, its memfd and
 * the allocation id. The importer opens /proc/<pid>/fd/<memfd>, checks the memfd's name against the
 * id, and maps it: an A_IPC allocation of its current context, refcounted per (pid, id). */

#define FK_IPC_MAGIC "fakecuda-ipc-v1"

typedef struct {
    char magic[16];
    uint64_t size;
    int32_t pid, fd;
    uint64_t id;
    char zero[24];
} fk_ipc_handle;
_Static_assert(sizeof(fk_ipc_handle) == CU_IPC_HANDLE_SIZE, "fake IPC handle size");

FK_API CUresult CUDAAPI cuIpcGetMemHandle(CUipcMemHandle *handle, CUdeviceptr p)
{
    CUresult r = enter();
    if (r)
        return r;
    fk_ctx *c;
    if ((r = cur_ctx(&c)))
        return leave(r);
    const fk_alloc *a = reg_find(p);
    if (!handle || !a || a->kind != A_DEVICE || a->freeing)
        return leave(CUDA_ERROR_INVALID_VALUE);
    fk_ipc_handle h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, FK_IPC_MAGIC, sizeof h.magic);
    h.size = a->size;
    h.pid = (int32_t)getpid();
    h.fd = a->memfd;
    h.id = a->id;
    memcpy(handle, &h, sizeof h);
    return leave(CUDA_SUCCESS);
}

static fk_alloc *ipc_find_open(fk_ctx *c, int pid, uint64_t id)
{
    for (size_t i = 0; i < g_nallocs; i++) {
        fk_alloc *a = g_allocs[i];
        if (a->kind == A_IPC && a->ctx == c && a->ipc_pid == pid && a->ipc_id == id)
            return a;
    }
    return NULL;
}

/* The exporter's memfd, if it still is the allocation the handle names. */
static int ipc_open_exporter_fd(const fk_ipc_handle *h)
{
    char path[64], link[128], want[96];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)h->pid, (int)h->fd);
    ssize_t n = readlink(path, link, sizeof link - 1);
    if (n <= 0)
        return -1;
    link[n] = 0;
    snprintf(want, sizeof want, "/memfd:fakecuda-%llu ", (unsigned long long)h->id);
    if (strncmp(link, want, strlen(want)) != 0)
        return -1;
    return open(path, O_RDWR | O_CLOEXEC);
}

static CUresult ipc_map(fk_ctx *c, const fk_ipc_handle *h, CUdeviceptr *out)
{
    int fd = ipc_open_exporter_fd(h);
    if (fd < 0)
        return CUDA_ERROR_INVALID_VALUE;
    struct stat st;
    size_t len = round_up(h->size, (size_t)sysconf(_SC_PAGESIZE));
    void *m = fstat(fd, &st) == 0 && (uint64_t)st.st_size >= len
                  ? mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                  : MAP_FAILED;
    close(fd);
    if (m == MAP_FAILED)
        return CUDA_ERROR_INVALID_VALUE;
    fk_alloc *a = malloc(sizeof *a);
    if (a)
        *a = (fk_alloc){.base = (uintptr_t)m, .size = h->size, .kind = A_IPC, .dev = c->dev,
                        .ctx = c, .id = g_next_id++, .map_len = len, .memfd = -1,
                        .ipc_pid = h->pid, .ipc_id = h->id, .ipc_refs = 1};
    if (!a || !reg_insert(a)) {
        free(a);
        munmap(m, len);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *out = a->base;
    return CUDA_SUCCESS;
}

static CUresult ipc_open(CUdeviceptr *out, CUipcMemHandle handle, unsigned flags)
{
    CUresult r = enter();
    if (r)
        return r;
    fk_ctx *c;
    if ((r = cur_ctx(&c)))
        return leave(r);
    fk_ipc_handle h;
    memcpy(&h, &handle, sizeof h);
    static const char zero[sizeof h.zero];
    if (!out || (flags & ~(unsigned)CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS) ||
        memcmp(h.magic, FK_IPC_MAGIC, sizeof h.magic) != 0 || h.size == 0 || h.pid <= 0 ||
        memcmp(h.zero, zero, sizeof zero) != 0) /* every byte is checked: garbage is refused */
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (h.pid == (int32_t)getpid()) /* the driver's answer for a handle of this process */
        return leave(CUDA_ERROR_INVALID_CONTEXT);
    fk_alloc *a = ipc_find_open(c, h.pid, h.id);
    if (a) {
        a->ipc_refs++;
        *out = a->base;
        return leave(CUDA_SUCCESS);
    }
    return leave(ipc_map(c, &h, out));
}

FK_API CUresult CUDAAPI cuIpcOpenMemHandle_v2(CUdeviceptr *out, CUipcMemHandle handle,
                                              unsigned int flags)
{
    return ipc_open(out, handle, flags);
}

#undef cuIpcOpenMemHandle
CUresult CUDAAPI cuIpcOpenMemHandle(CUdeviceptr *out, CUipcMemHandle handle, unsigned int flags);
FK_API CUresult CUDAAPI cuIpcOpenMemHandle(CUdeviceptr *out, CUipcMemHandle handle,
                                           unsigned int flags)
{
    return ipc_open(out, handle, flags);
}

FK_API CUresult CUDAAPI cuIpcCloseMemHandle(CUdeviceptr p)
{
    CUresult r = enter();
    if (r)
        return r;
    fk_ctx *c;
    if ((r = cur_ctx(&c)))
        return leave(r);
    fk_alloc *a = reg_find_base(p);
    if (!a || a->kind != A_IPC)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (--a->ipc_refs == 0) {
        wait_ctx(a->ctx); /* no queued copy may touch the mapping after it is gone */
        a = reg_find_base(p);
        if (a && a->kind == A_IPC && a->ipc_refs == 0)
            alloc_release(a);
    }
    return leave(CUDA_SUCCESS);
}

/* ================================================================ errors */

#define FK_ERRORS(X)                                                                          \
    X(CUDA_SUCCESS, "no error")                                                               \
    X(CUDA_ERROR_INVALID_VALUE, "invalid argument")                                           \
    X(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")                                              \
    X(CUDA_ERROR_NOT_INITIALIZED, "initialization error")                                     \
    X(CUDA_ERROR_DEINITIALIZED, "driver shutting down")                                       \
    X(CUDA_ERROR_NO_DEVICE, "no CUDA-capable device is detected")                             \
    X(CUDA_ERROR_INVALID_DEVICE, "invalid device ordinal")                                    \
    X(CUDA_ERROR_INVALID_CONTEXT, "invalid device context")                                   \
    X(CUDA_ERROR_CONTEXT_ALREADY_CURRENT, "context already current")                          \
    X(CUDA_ERROR_INVALID_HANDLE, "invalid resource handle")                                   \
    X(CUDA_ERROR_ILLEGAL_STATE, "the operation cannot be performed in the present state")     \
    X(CUDA_ERROR_NOT_FOUND, "named symbol not found")                                         \
    X(CUDA_ERROR_ALREADY_MAPPED, "resource already mapped")                                   \
    X(CUDA_ERROR_MAP_FAILED, "mapping of buffer object failed")                               \
    X(CUDA_ERROR_NOT_READY, "device not ready")                                               \
    X(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal memory access was encountered")                 \
    X(CUDA_ERROR_LAUNCH_FAILED, "unspecified launch failure")                                 \
    X(CUDA_ERROR_CONTEXT_IS_DESTROYED, "context is destroyed")                                \
    X(CUDA_ERROR_NOT_PERMITTED, "operation not permitted")                                    \
    X(CUDA_ERROR_NOT_SUPPORTED, "operation not supported")                                    \
    X(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "operation not permitted when stream is capturing") \
    X(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,                                                  \
      "operation failed due to a previous error during capture")                              \
    X(CUDA_ERROR_UNKNOWN, "unknown error")

typedef struct { CUresult code; const char *name, *text; } fk_error;
#define FK_ERROR_ENTRY(code, text) {code, #code, text},
static const fk_error g_errors[] = {FK_ERRORS(FK_ERROR_ENTRY)};

static const fk_error *error_find(CUresult code)
{
    for (size_t i = 0; i < sizeof g_errors / sizeof *g_errors; i++)
        if (g_errors[i].code == code)
            return &g_errors[i];
    return NULL;
}

/* Like the real driver these work before cuInit. */
FK_API CUresult CUDAAPI cuGetErrorName(CUresult error, const char **pstr)
{
    if (!pstr)
        return CUDA_ERROR_INVALID_VALUE;
    const fk_error *e = error_find(error);
    *pstr = e ? e->name : NULL;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

FK_API CUresult CUDAAPI cuGetErrorString(CUresult error, const char **pstr)
{
    if (!pstr)
        return CUDA_ERROR_INVALID_VALUE;
    const fk_error *e = error_find(error);
    *pstr = e ? e->text : NULL;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* ================================================================ test-only entry points */

FK_API CUresult fakecuda_launch_fill(CUstream s, CUdeviceptr p, unsigned char value, size_t n,
                                     unsigned delay_us)
{
    fk_work w = set_work(W_FILL, p, value, n);
    w.delay_us = delay_us;
    return mem_op(s, false, w, false);
}

FK_API void fakecuda_counters(fakecuda_counters_t *out)
{
    if (!out)
        return;
    LOCK();
    *out = g_cnt;
    out->copies_pending = g_copies_pending;
    out->bytes_in_use = 0;
    for (int i = 0; i < FK_MAX_DEVICES; i++)
        out->bytes_in_use += g_dev[i].in_use;
    UNLOCK();
}

FK_API void fakecuda_reset_counters(void)
{
    LOCK();
    memset(&g_cnt, 0, sizeof g_cnt);
    UNLOCK();
}

FK_API void fakecuda_set_copy_delay(unsigned delay_us)
{
    LOCK();
    g_copy_delay_us = delay_us;
    UNLOCK();
}

FK_API void fakecuda_fail_copies(unsigned after, unsigned count, CUresult code)
{
    LOCK();
    g_copy_fail_skip = after;
    g_copy_fail_count = count;
    g_copy_fail_code = code;
    UNLOCK();
}

FK_API void fakecuda_reload_env(void)
{
    LOCK();
    env_load(true);
    UNLOCK();
}

/* The pre-CUDA-11 ABI of the primary-context calls and the pre-4.0 cuCtxDestroy: cudart 13 still
 * asks cuGetProcAddress for "cuDevicePrimaryCtxRelease"/"Reset" at version 7000 and gets these. */
#undef cuDevicePrimaryCtxRelease
#undef cuDevicePrimaryCtxReset
#undef cuCtxDestroy
/* Called through hidden aliases: a call to the exported v2 names would go through the PLT to a
 * preloaded shim's hook, and the shim must see only the v1 entry point it was handed. */
extern __typeof__(cuDevicePrimaryCtxRelease_v2) fk_primary_release
    __attribute__((alias("cuDevicePrimaryCtxRelease_v2"), visibility("hidden")));
extern __typeof__(cuDevicePrimaryCtxReset_v2) fk_primary_reset
    __attribute__((alias("cuDevicePrimaryCtxReset_v2"), visibility("hidden")));
extern __typeof__(cuCtxDestroy_v2) fk_ctx_destroy __attribute__((alias("cuCtxDestroy_v2"), visibility("hidden")));
FK_API CUresult CUDAAPI cuDevicePrimaryCtxRelease(CUdevice dev) { return fk_primary_release(dev); }
FK_API CUresult CUDAAPI cuDevicePrimaryCtxReset(CUdevice dev) { return fk_primary_reset(dev); }
FK_API CUresult CUDAAPI cuCtxDestroy(CUcontext ctx) { return fk_ctx_destroy(ctx); }

/* ================================================================ cuGetProcAddress */

FK_API CUresult CUDAAPI cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion,
                                            cuuint64_t flags,
                                            CUdriverProcAddressQueryResult *status);

/* Base name, the CUDA version that introduced this variant, per-thread-stream variant or not,
 * and the exported function. Versions are those of cudaTypedefs.h (PFN_<name>_v<version>). */
#define FK_PROCS(X)                                                                 \
    X("cuInit", 2000, 0, cuInit)                                                    \
    X("cuDriverGetVersion", 2020, 0, cuDriverGetVersion)                            \
    X("cuDeviceGet", 2000, 0, cuDeviceGet)                                          \
    X("cuDeviceGetCount", 2000, 0, cuDeviceGetCount)                                \
    X("cuDeviceGetName", 2000, 0, cuDeviceGetName)                                  \
    X("cuDeviceTotalMem", 3020, 0, cuDeviceTotalMem_v2)                             \
    X("cuDeviceGetAttribute", 2000, 0, cuDeviceGetAttribute)                        \
    X("cuDevicePrimaryCtxRetain", 7000, 0, cuDevicePrimaryCtxRetain)                \
    X("cuDevicePrimaryCtxRelease", 7000, 0, cuDevicePrimaryCtxRelease)              \
    X("cuDevicePrimaryCtxRelease", 11000, 0, cuDevicePrimaryCtxRelease_v2)          \
    X("cuDevicePrimaryCtxReset", 7000, 0, cuDevicePrimaryCtxReset)                  \
    X("cuDevicePrimaryCtxReset", 11000, 0, cuDevicePrimaryCtxReset_v2)              \
    X("cuDevicePrimaryCtxGetState", 7000, 0, cuDevicePrimaryCtxGetState)            \
    X("cuDevicePrimaryCtxSetFlags", 11000, 0, cuDevicePrimaryCtxSetFlags_v2)        \
    X("cuCtxCreate", 3020, 0, cuCtxCreate_v2)                                       \
    X("cuCtxCreate", 11040, 0, cuCtxCreate_v3)                                      \
    X("cuCtxCreate", 12050, 0, cuCtxCreate_v4)                                      \
    X("cuCtxDestroy", 2000, 0, cuCtxDestroy)                                        \
    X("cuCtxDestroy", 4000, 0, cuCtxDestroy_v2)                                     \
    X("cuCtxSetCurrent", 4000, 0, cuCtxSetCurrent)                                  \
    X("cuCtxGetCurrent", 4000, 0, cuCtxGetCurrent)                                  \
    X("cuCtxPushCurrent", 4000, 0, cuCtxPushCurrent_v2)                             \
    X("cuCtxPopCurrent", 4000, 0, cuCtxPopCurrent_v2)                               \
    X("cuCtxGetDevice", 2000, 0, cuCtxGetDevice)                                    \
    X("cuCtxGetId", 12000, 0, cuCtxGetId)                                           \
    X("cuCtxGetDevice", 13000, 0, cuCtxGetDevice_v2)                                \
    X("cuCtxSynchronize", 2000, 0, cuCtxSynchronize)                                \
    X("cuCtxSynchronize", 13000, 0, cuCtxSynchronize_v2)                            \
    X("cuStreamCreate", 2000, 0, cuStreamCreate)                                    \
    X("cuStreamCreateWithPriority", 5050, 0, cuStreamCreateWithPriority)            \
    X("cuStreamDestroy", 4000, 0, cuStreamDestroy_v2)                               \
    X("cuStreamSynchronize", 2000, 0, cuStreamSynchronize)                          \
    X("cuStreamSynchronize", 7000, 1, cuStreamSynchronize_ptsz)                     \
    X("cuStreamQuery", 2000, 0, cuStreamQuery)                                      \
    X("cuStreamQuery", 7000, 1, cuStreamQuery_ptsz)                                 \
    X("cuStreamWaitEvent", 3020, 0, cuStreamWaitEvent)                              \
    X("cuStreamWaitEvent", 7000, 1, cuStreamWaitEvent_ptsz)                         \
    X("cuStreamIsCapturing", 10000, 0, cuStreamIsCapturing)                         \
    X("cuStreamIsCapturing", 10000, 1, cuStreamIsCapturing_ptsz)                    \
    X("cuStreamBeginCapture", 10010, 0, cuStreamBeginCapture_v2)                    \
    X("cuStreamBeginCapture", 10010, 1, cuStreamBeginCapture_v2_ptsz)               \
    X("cuStreamBeginCaptureToGraph", 12030, 0, cuStreamBeginCaptureToGraph)         \
    X("cuStreamBeginCaptureToGraph", 12030, 1, cuStreamBeginCaptureToGraph_ptsz)    \
    X("cuStreamEndCapture", 10000, 0, cuStreamEndCapture)                           \
    X("cuStreamEndCapture", 10000, 1, cuStreamEndCapture_ptsz)                      \
    X("cuEventCreate", 2000, 0, cuEventCreate)                                      \
    X("cuEventRecord", 2000, 0, cuEventRecord)                                      \
    X("cuEventRecord", 7000, 1, cuEventRecord_ptsz)                                 \
    X("cuEventQuery", 2000, 0, cuEventQuery)                                        \
    X("cuEventSynchronize", 2000, 0, cuEventSynchronize)                            \
    X("cuEventDestroy", 4000, 0, cuEventDestroy_v2)                                 \
    X("cuMemAlloc", 3020, 0, cuMemAlloc_v2)                                         \
    X("cuMemAllocPitch", 3020, 0, cuMemAllocPitch_v2)                               \
    X("cuMemFree", 3020, 0, cuMemFree_v2)                                           \
    X("cuMemGetInfo", 3020, 0, cuMemGetInfo_v2)                                     \
    X("cuMemAllocHost", 3020, 0, cuMemAllocHost_v2)                                 \
    X("cuMemHostAlloc", 2020, 0, cuMemHostAlloc)                                    \
    X("cuMemFreeHost", 2000, 0, cuMemFreeHost)                                      \
    X("cuMemAllocManaged", 6000, 0, cuMemAllocManaged)                              \
    X("cuMemAllocAsync", 11020, 0, cuMemAllocAsync)                                 \
    X("cuMemAllocAsync", 11020, 1, cuMemAllocAsync_ptsz)                            \
    X("cuMemAllocFromPoolAsync", 11020, 0, cuMemAllocFromPoolAsync)                 \
    X("cuMemAllocFromPoolAsync", 11020, 1, cuMemAllocFromPoolAsync_ptsz)            \
    X("cuMemFreeAsync", 11020, 0, cuMemFreeAsync)                                   \
    X("cuMemFreeAsync", 11020, 1, cuMemFreeAsync_ptsz)                              \
    X("cuMemcpyHtoD", 3020, 0, cuMemcpyHtoD_v2)                                     \
    X("cuMemcpyHtoD", 7000, 1, cuMemcpyHtoD_v2_ptds)                                \
    X("cuMemcpyDtoH", 3020, 0, cuMemcpyDtoH_v2)                                     \
    X("cuMemcpyDtoH", 7000, 1, cuMemcpyDtoH_v2_ptds)                                \
    X("cuMemcpyDtoD", 3020, 0, cuMemcpyDtoD_v2)                                     \
    X("cuMemcpyDtoD", 7000, 1, cuMemcpyDtoD_v2_ptds)                                \
    X("cuMemcpy", 4000, 0, cuMemcpy)                                                \
    X("cuMemcpy", 7000, 1, cuMemcpy_ptds)                                           \
    X("cuMemcpyHtoDAsync", 3020, 0, cuMemcpyHtoDAsync_v2)                           \
    X("cuMemcpyHtoDAsync", 7000, 1, cuMemcpyHtoDAsync_v2_ptsz)                      \
    X("cuMemcpyDtoHAsync", 3020, 0, cuMemcpyDtoHAsync_v2)                           \
    X("cuMemcpyDtoHAsync", 7000, 1, cuMemcpyDtoHAsync_v2_ptsz)                      \
    X("cuMemcpyDtoDAsync", 3020, 0, cuMemcpyDtoDAsync_v2)                           \
    X("cuMemcpyDtoDAsync", 7000, 1, cuMemcpyDtoDAsync_v2_ptsz)                      \
    X("cuMemcpyAsync", 4000, 0, cuMemcpyAsync)                                      \
    X("cuMemcpyAsync", 7000, 1, cuMemcpyAsync_ptsz)                                 \
    X("cuMemsetD8", 3020, 0, cuMemsetD8_v2)                                         \
    X("cuMemsetD8", 7000, 1, cuMemsetD8_v2_ptds)                                    \
    X("cuMemsetD8Async", 3020, 0, cuMemsetD8Async)                                  \
    X("cuMemsetD8Async", 7000, 1, cuMemsetD8Async_ptsz)                             \
    X("cuMemsetD16", 3020, 0, cuMemsetD16_v2)                                       \
    X("cuMemsetD16", 7000, 1, cuMemsetD16_v2_ptds)                                  \
    X("cuMemsetD16Async", 3020, 0, cuMemsetD16Async)                                \
    X("cuMemsetD16Async", 7000, 1, cuMemsetD16Async_ptsz)                           \
    X("cuMemHostRegister", 6050, 0, cuMemHostRegister_v2)                           \
    X("cuMemHostUnregister", 4000, 0, cuMemHostUnregister)                          \
    X("cuMemsetD32", 3020, 0, cuMemsetD32_v2)                                       \
    X("cuMemsetD32", 7000, 1, cuMemsetD32_v2_ptds)                                  \
    X("cuMemsetD32Async", 3020, 0, cuMemsetD32Async)                                \
    X("cuMemsetD32Async", 7000, 1, cuMemsetD32Async_ptsz)                           \
    X("cuMemcpy2D", 3020, 0, cuMemcpy2D_v2)                                         \
    X("cuMemcpy2D", 7000, 1, cuMemcpy2D_v2_ptds)                                    \
    X("cuMemcpy2DUnaligned", 3020, 0, cuMemcpy2DUnaligned_v2)                       \
    X("cuMemcpy2DUnaligned", 7000, 1, cuMemcpy2DUnaligned_v2_ptds)                  \
    X("cuMemcpy2DAsync", 3020, 0, cuMemcpy2DAsync_v2)                               \
    X("cuMemcpy2DAsync", 7000, 1, cuMemcpy2DAsync_v2_ptsz)                          \
    X("cuMemcpy3D", 3020, 0, cuMemcpy3D_v2)                                         \
    X("cuMemcpy3D", 7000, 1, cuMemcpy3D_v2_ptds)                                    \
    X("cuMemcpy3DAsync", 3020, 0, cuMemcpy3DAsync_v2)                               \
    X("cuMemcpy3DAsync", 7000, 1, cuMemcpy3DAsync_v2_ptsz)                          \
    X("cuMemcpy3DPeer", 4000, 0, cuMemcpy3DPeer)                                    \
    X("cuMemcpy3DPeer", 7000, 1, cuMemcpy3DPeer_ptds)                               \
    X("cuMemcpy3DPeerAsync", 4000, 0, cuMemcpy3DPeerAsync)                          \
    X("cuMemcpy3DPeerAsync", 7000, 1, cuMemcpy3DPeerAsync_ptsz)                     \
    X("cuMemcpyPeer", 4000, 0, cuMemcpyPeer)                                        \
    X("cuMemcpyPeer", 7000, 1, cuMemcpyPeer_ptds)                                   \
    X("cuMemcpyPeerAsync", 4000, 0, cuMemcpyPeerAsync)                              \
    X("cuMemcpyPeerAsync", 7000, 1, cuMemcpyPeerAsync_ptsz)                         \
    X("cuMemsetD2D8", 3020, 0, cuMemsetD2D8_v2)                                     \
    X("cuMemsetD2D8", 7000, 1, cuMemsetD2D8_v2_ptds)                                \
    X("cuMemsetD2D8Async", 3020, 0, cuMemsetD2D8Async)                              \
    X("cuMemsetD2D8Async", 7000, 1, cuMemsetD2D8Async_ptsz)                         \
    X("cuMemsetD2D16", 3020, 0, cuMemsetD2D16_v2)                                   \
    X("cuMemsetD2D16", 7000, 1, cuMemsetD2D16_v2_ptds)                              \
    X("cuMemsetD2D16Async", 3020, 0, cuMemsetD2D16Async)                            \
    X("cuMemsetD2D16Async", 7000, 1, cuMemsetD2D16Async_ptsz)                       \
    X("cuMemsetD2D32", 3020, 0, cuMemsetD2D32_v2)                                   \
    X("cuMemsetD2D32", 7000, 1, cuMemsetD2D32_v2_ptds)                              \
    X("cuMemsetD2D32Async", 3020, 0, cuMemsetD2D32Async)                            \
    X("cuMemsetD2D32Async", 7000, 1, cuMemsetD2D32Async_ptsz)                       \
    X("cuMemGetAddressRange", 3020, 0, cuMemGetAddressRange_v2)                     \
    X("cuPointerGetAttribute", 4000, 0, cuPointerGetAttribute)                      \
    X("cuPointerGetAttributes", 7000, 0, cuPointerGetAttributes)                    \
    X("cuPointerSetAttribute", 6000, 0, cuPointerSetAttribute)                      \
    X("cuMemRetainAllocationHandle", 11000, 0, cuMemRetainAllocationHandle)         \
    X("cuIpcGetMemHandle", 4010, 0, cuIpcGetMemHandle)                              \
    X("cuIpcOpenMemHandle", 4010, 0, cuIpcOpenMemHandle)                            \
    X("cuIpcOpenMemHandle", 11000, 0, cuIpcOpenMemHandle_v2)                        \
    X("cuIpcCloseMemHandle", 4010, 0, cuIpcCloseMemHandle)                          \
    X("cuMemCreate", 10020, 0, cuMemCreate)                                         \
    X("cuMemRelease", 10020, 0, cuMemRelease)                                       \
    X("cuMemGetAllocationGranularity", 10020, 0, cuMemGetAllocationGranularity)     \
    X("cuGetErrorName", 6000, 0, cuGetErrorName)                                    \
    X("cuGetErrorString", 6000, 0, cuGetErrorString)                                \
    X("cuGetProcAddress", 11030, 0, cuGetProcAddress)                               \
    X("cuGetProcAddress", 12000, 0, cuGetProcAddress_v2)

/* Hidden aliases: taking their address binds to this library even if a preloaded shim
 * interposes the exported names, so cuGetProcAddress agrees with dlsym on libcuda.so.1. */
#define FK_ALIAS(name, ver, ptds, fn) \
    extern __typeof__(fn) fn##__self __attribute__((alias(#fn), visibility("hidden")));
FK_PROCS(FK_ALIAS)

typedef struct {
    const char *name;
    int version;
    bool ptds;
    void (*fn)(void);
} fk_proc;

#define FK_PROC_ENTRY(name, ver, ptds, fn) {name, ver, ptds, (void (*)(void))fn##__self},
static const fk_proc g_procs[] = {FK_PROCS(FK_PROC_ENTRY)};

/* The newest variant of `sym` introduced at or before `version`; *seen says the name exists. */
static const fk_proc *proc_best(const char *sym, int version, bool ptds, bool *seen)
{
    const fk_proc *best = NULL;
    for (size_t i = 0; i < sizeof g_procs / sizeof *g_procs; i++) {
        const fk_proc *e = &g_procs[i];
        if (strcmp(e->name, sym) != 0)
            continue;
        *seen = true;
        if (e->ptds == ptds && e->version <= version && (!best || e->version > best->version))
            best = e;
    }
    return best;
}

/* Per-thread-stream lookups fall back to the plain variant where there is no _ptsz/_ptds one. */
static CUresult proc_lookup(const char *sym, void **pfn, int version, cuuint64_t flags,
                            CUdriverProcAddressQueryResult *status)
{
    CUdriverProcAddressQueryResult st = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    if (!sym || !pfn || (flags & ~(cuuint64_t)(CU_GET_PROC_ADDRESS_LEGACY_STREAM |
                                               CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM)))
        return CUDA_ERROR_INVALID_VALUE;
    bool seen = false;
    const fk_proc *e = NULL;
    if (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM)
        e = proc_best(sym, version, true, &seen);
    if (!e)
        e = proc_best(sym, version, false, &seen);
    *pfn = NULL;
    if (e) {
        _Static_assert(sizeof(void *) == sizeof e->fn, "function and data pointers differ");
        memcpy(pfn, &e->fn, sizeof *pfn);
        st = CU_GET_PROC_ADDRESS_SUCCESS;
    } else if (seen) {
        st = CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT;
    }
    if (status)
        *status = st;
    return e ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}

FK_API CUresult CUDAAPI cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion,
                                            cuuint64_t flags,
                                            CUdriverProcAddressQueryResult *status)
{
    return proc_lookup(symbol, pfn, cudaVersion, flags, status);
}

FK_API CUresult CUDAAPI cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion,
                                         cuuint64_t flags)
{
    return proc_lookup(symbol, pfn, cudaVersion, flags, NULL);
}
