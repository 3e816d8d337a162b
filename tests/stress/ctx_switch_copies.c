/* Staged copies from threads that switch contexts (issue 10), as a plain program on the real
 * preload path: it runs with libgpumem_shim.so preloaded in front of the fake driver.
 *
 * Eight threads share four contexts (cuCtxCreate). Each thread holds two pool blocks, allocated
 * in two different contexts (by the main thread, before the threads start). Every round it makes
 * a random context current, copies a fresh pattern of 4-6 MiB (staged: GPUMEM_STAGING_MIN is
 * 4 MiB) from pageable memory into a block of another context, scribbles over the source at once (H2D returns once the source is consumed),
 * makes another random context current, copies the block back and checks every byte. The entry
 * points vary: blocking, per-thread default stream, unified, and asynchronous on the legacy
 * stream, the per-thread stream or a stream of the thread's own. After an asynchronous H2D the
 * D2H's stream waits for an event recorded after it, which is what the driver asks of a program
 * that moves work between contexts. A blocking H2D is followed by the D2H with no wait of the
 * program's: the fake completes its own before returning, and staged copies of one block must
 * stay in call order whatever context each is made from.
 *
 * The DMAs are made slow (fakecuda_set_copy_delay), so that a staged copy whose last DMAs are
 * still in flight when it returns is caught every run, not one run in four.
 *
 * Arguments: [rounds per thread] (default 40). Exit status 0: every byte was right, and the
 * copies were staged (the shim's copy statistics say so). */
#include <dlfcn.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda.h>

#include "fakecuda.h"
#include "gpumem.h"

#define THREADS 8
#define CONTEXTS 4
#define BLOCKS 2
#define MiB ((size_t)1 << 20)
#define MIN_BYTES (4 * MiB)
#define MAX_BYTES (6 * MiB)
#define DMA_DELAY_US 150u

static CUcontext ctxs[CONTEXTS];
static int rounds = 40;

typedef struct thread_state {
    int id;
    unsigned seed;
    CUdeviceptr block[BLOCKS];
    int owner[BLOCKS];          /* the context each block was allocated in */
    CUstream stream[CONTEXTS];  /* one program stream per context */
    CUevent h2d_done[CONTEXTS]; /* recorded after an asynchronous H2D, in that context */
    uint64_t *src, *back;
    long wrong_rounds, failed_calls;
} thread_state;

#define CALL(ts, call) \
    do { \
        CUresult rc_ = (call); \
        if (rc_ != CUDA_SUCCESS) { \
            fprintf(stderr, "thread %d: %s failed with %d\n", (ts)->id, #call, (int)rc_); \
            (ts)->failed_calls++; \
            return false; \
        } \
    } while (0)

/* Word i of round r's pattern of thread t: no two rounds, threads or offsets share one. */
static uint64_t pattern(int t, int r, size_t i)
{
    return ((uint64_t)(t + 1) << 56) ^ ((uint64_t)(r + 1) << 36) ^ (i * 0x9E3779B97F4A7C15ull);
}

static void fill(uint64_t *p, size_t words, int t, int r)
{
    for (size_t i = 0; i < words; i++) p[i] = pattern(t, r, i);
}

/* Counts the wrong words and reports the first one. */
static size_t verify(const thread_state *ts, int r, size_t words, const int at[2], int blk, const int via[2])
{
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < words; i++) {
        if (ts->back[i] == pattern(ts->id, r, i)) continue;
        if (bad++ == 0) first = i;
    }
    if (bad)
        fprintf(stderr, "thread %d round %d: %zu of %zu words wrong (first at byte %zu: %#" PRIx64
                        " for %#" PRIx64 "); H2D %d in context %d, D2H %d in context %d, block of context %d\n",
                ts->id, r, bad, words, first * 8, ts->back[first], pattern(ts->id, r, first), via[0], at[0],
                via[1], at[1], ts->owner[blk]);
    return bad;
}

static int pick_other_than(thread_state *ts, int not_this)
{
    int c;
    do c = (int)(rand_r(&ts->seed) % CONTEXTS);
    while (c == not_this);
    return c;
}

/* H2D into `d` in the current context `x` through one of five entry points (*via). An asynchronous
 * one leaves an event behind for the D2H's stream to wait on; *ev gets it (NULL: none). */
static bool copy_in(thread_state *ts, int x, CUdeviceptr d, size_t n, CUevent *ev, int *via)
{
    *ev = NULL;
    CUstream s = NULL;
    switch (*via = (int)(rand_r(&ts->seed) % 5)) {
    case 0: CALL(ts, cuMemcpyHtoD(d, ts->src, n)); return true;
    case 1: CALL(ts, cuMemcpyHtoD_v2_ptds(d, ts->src, n)); return true;
    case 2: CALL(ts, cuMemcpy(d, (CUdeviceptr)(uintptr_t)ts->src, n)); return true;
    case 3: CALL(ts, cuMemcpyHtoDAsync(d, ts->src, n, NULL)); break;
    default: CALL(ts, cuMemcpyHtoDAsync(d, ts->src, n, s = ts->stream[x])); break;
    }
    CALL(ts, cuEventRecord(ts->h2d_done[x], s));
    *ev = ts->h2d_done[x];
    return true;
}

/* D2H out of `d` in the current context `y`; the stream waits for `ev` first where there is one.
 * *via gets the entry point used. */
static bool copy_out(thread_state *ts, int y, CUdeviceptr d, size_t n, CUevent ev, int *via)
{
    int v = *via = (int)(rand_r(&ts->seed) % 6);
    CUstream s = v == 4 ? ts->stream[y] : (v == 1 || v == 5) ? CU_STREAM_PER_THREAD : NULL;
    if (ev) CALL(ts, cuStreamWaitEvent(s, ev, 0));
    switch (v) {
    case 0: CALL(ts, cuMemcpyDtoH(ts->back, d, n)); break;
    case 1: CALL(ts, cuMemcpyDtoH_v2_ptds(ts->back, d, n)); break;
    case 2: CALL(ts, cuMemcpy((CUdeviceptr)(uintptr_t)ts->back, d, n)); break;
    case 3: CALL(ts, cuMemcpyDtoHAsync(ts->back, d, n, NULL)); break;
    case 4: CALL(ts, cuMemcpyDtoHAsync(ts->back, d, n, s)); break;
    default: CALL(ts, cuMemcpyDtoHAsync_v2_ptsz(ts->back, d, n, NULL)); break;
    }
    return true;
}

/* One round: H2D in context x, D2H in context y, both into/out of a block of a third context
 * where the thread has one (it always has one not owned by x). */
static bool one_round(thread_state *ts, int r)
{
    int x = (int)(rand_r(&ts->seed) % CONTEXTS);
    int blk = ts->owner[0] == x ? 1 : ts->owner[1] == x ? 0 : (int)(rand_r(&ts->seed) % BLOCKS);
    int y = pick_other_than(ts, ts->owner[blk]);
    size_t n = (MIN_BYTES + (rand_r(&ts->seed) % (MAX_BYTES - MIN_BYTES))) & ~(size_t)7;
    size_t words = n / 8;
    fill(ts->src, words, ts->id, r);
    memset(ts->back, 0x5a, n);
    CUevent ev;
    int via[2], at[2] = {x, y};
    CALL(ts, cuCtxSetCurrent(ctxs[x]));
    if (!copy_in(ts, x, ts->block[blk], n, &ev, &via[0])) return false;
    memset(ts->src, 0xa5, n); /* consumed: the program may reuse it at once */
    CALL(ts, cuCtxSetCurrent(ctxs[y]));
    if (!copy_out(ts, y, ts->block[blk], n, ev, &via[1])) return false;
    if (verify(ts, r, words, at, blk, via)) ts->wrong_rounds++;
    return true;
}

/* The thread's blocks, in two contexts, allocated by the main thread before the copying threads
 * start: the test is about the copies, and the pools grow the same way every run. */
static bool alloc_blocks(thread_state *ts)
{
    for (int k = 0; k < BLOCKS; k++) {
        ts->owner[k] = (ts->id + k) % CONTEXTS;
        CALL(ts, cuCtxSetCurrent(ctxs[ts->owner[k]]));
        CALL(ts, cuMemAlloc(&ts->block[k], MAX_BYTES));
    }
    return true;
}

/* Streams and events in every context. */
static bool thread_setup(thread_state *ts)
{
    for (int c = 0; c < CONTEXTS; c++) {
        CALL(ts, cuCtxSetCurrent(ctxs[c]));
        CALL(ts, cuStreamCreate(&ts->stream[c], CU_STREAM_NON_BLOCKING));
        CALL(ts, cuEventCreate(&ts->h2d_done[c], CU_EVENT_DISABLE_TIMING));
    }
    ts->src = malloc(MAX_BYTES);
    ts->back = malloc(MAX_BYTES);
    return ts->src && ts->back;
}

static void thread_teardown(thread_state *ts)
{
    for (int c = 0; c < CONTEXTS; c++) {
        cuCtxSetCurrent(ctxs[c]);
        if (ts->stream[c]) cuStreamSynchronize(ts->stream[c]);
        if (ts->stream[c]) cuStreamDestroy(ts->stream[c]);
        if (ts->h2d_done[c]) cuEventDestroy(ts->h2d_done[c]);
    }
    for (int k = 0; k < BLOCKS; k++) {
        cuCtxSetCurrent(ctxs[ts->owner[k]]);
        if (ts->block[k]) cuMemFree(ts->block[k]);
    }
    free(ts->src);
    free(ts->back);
}

static void *worker(void *arg)
{
    thread_state *ts = arg;
    if (!ts->failed_calls && thread_setup(ts))
        for (int r = 0; r < rounds && one_round(ts, r); r++) {
        }
    thread_teardown(ts);
    return NULL;
}

static bool make_contexts(void)
{
    CUdevice dev;
    if (cuInit(0) != CUDA_SUCCESS || cuDeviceGet(&dev, 0) != CUDA_SUCCESS) return false;
    for (int c = 0; c < CONTEXTS; c++)
        if (cuCtxCreate(&ctxs[c], NULL, 0, dev) != CUDA_SUCCESS) return false;
    return true;
}

/* Staged H2D and D2H calls, from the shim's statistics; -1 when the shim is not preloaded. */
static long long staged_calls(void)
{
    gpumem_status (*get)(int, gpumem_copy_stats *);
    *(void **)&get = dlsym(RTLD_DEFAULT, "gpumem_get_copy_stats");
    gpumem_copy_stats st;
    if (!get || get(0, &st) != GPUMEM_OK) return -1;
    return (long long)(st.total[GPUMEM_COPY_H2D].staged_calls + st.total[GPUMEM_COPY_D2H].staged_calls);
}

int main(int argc, char **argv)
{
    if (argc > 1) rounds = atoi(argv[1]);
    if (!make_contexts()) {
        fprintf(stderr, "cannot create %d contexts\n", CONTEXTS);
        return 1;
    }
    fakecuda_set_copy_delay(DMA_DELAY_US);
    thread_state ts[THREADS] = {0};
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) {
        ts[i] = (thread_state){.id = i, .seed = 0x51ed + 7919u * (unsigned)i};
        alloc_blocks(&ts[i]);
    }
    for (int i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, worker, &ts[i]);
    long wrong = 0, failed = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        wrong += ts[i].wrong_rounds;
        failed += ts[i].failed_calls;
    }
    long long staged = staged_calls();
    printf("%d threads x %d rounds over %d contexts: %ld rounds with wrong bytes, %ld failed calls, "
           "%lld staged copies\n", THREADS, rounds, CONTEXTS, wrong, failed, staged);
    if (staged < 0) {
        fprintf(stderr, "gpumem_get_copy_stats is not reachable: is the shim preloaded?\n");
        return 1;
    }
    bool staging_on = !getenv("GPUMEM_STAGING") || strcmp(getenv("GPUMEM_STAGING"), "0") != 0;
    if (staging_on && staged < (long long)THREADS * rounds) {
        fprintf(stderr, "expected at least %d staged copies\n", THREADS * rounds);
        return 1;
    }
    return wrong || failed ? 1 : 0;
}
