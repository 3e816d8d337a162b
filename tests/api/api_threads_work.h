/* The multi-threaded workload of api_threads, shared with api_child (which runs it in a process
 * of its own so that the exit report can be checked): every thread makes the primary context
 * current, then allocates, writes a pattern through cuMemcpyHtoD, reads it back through
 * cuMemcpyDtoH, verifies it and frees, keeping up to API_WORK_LIVE blocks alive at a time. */
#ifndef API_THREADS_WORK_H
#define API_THREADS_WORK_H

#include <pthread.h>

#include "api_common.h"

#define API_WORK_LIVE 16
#define API_WORK_MAX_BYTES ((size_t)3 << 20)

typedef struct api_worker {
    CUcontext ctx;
    int id;
    int iters;
    unsigned long allocs, frees;
    unsigned long long bytes_allocated; /* sum of requested sizes */
    char err[256];                      /* empty when every check passed */
} api_worker;

static inline uint32_t api_xorshift(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

#define WORK_FAIL(w, ...) \
    do { \
        snprintf((w)->err, sizeof (w)->err, __VA_ARGS__); \
        goto out; \
    } while (0)

static void *api_worker_main(void *arg)
{
    api_worker *w = arg;
    CUdeviceptr live[API_WORK_LIVE];
    size_t sizes[API_WORK_LIVE];
    uint32_t seeds[API_WORK_LIVE];
    int n = 0;
    uint32_t rng = 0x9E3779B9u ^ (uint32_t)(w->id * 7919 + 1);
    unsigned char *buf = malloc(API_WORK_MAX_BYTES);
    CUresult r;
    w->err[0] = '\0';
    if (!buf)
        WORK_FAIL(w, "thread %d: out of host memory", w->id);
    if ((r = cuCtxSetCurrent(w->ctx)) != CUDA_SUCCESS)
        WORK_FAIL(w, "thread %d: cuCtxSetCurrent -> %d", w->id, r);
    for (int it = 0; it < w->iters || n > 0; it++) {
        uint32_t x = api_xorshift(&rng);
        bool do_free = n == API_WORK_LIVE || (n > 0 && (it >= w->iters || x % 3 == 0));
        if (do_free) {
            int k = (int)(api_xorshift(&rng) % (uint32_t)n);
            if ((r = cuMemcpyDtoH(buf, live[k], sizes[k])) != CUDA_SUCCESS)
                WORK_FAIL(w, "thread %d: cuMemcpyDtoH -> %d", w->id, r);
            size_t bad = api_check_pattern(buf, sizes[k], seeds[k]);
            if (bad != sizes[k])
                WORK_FAIL(w, "thread %d: block %#llx (%zu B) corrupted at byte %zu", w->id,
                          (unsigned long long)live[k], sizes[k], bad);
            if ((r = cuMemFree(live[k])) != CUDA_SUCCESS)
                WORK_FAIL(w, "thread %d: cuMemFree(%#llx) -> %d", w->id,
                          (unsigned long long)live[k], r);
            w->frees++;
            n--;
            live[k] = live[n];
            sizes[k] = sizes[n];
            seeds[k] = seeds[n];
        } else {
            size_t size = x % 16 == 0 ? ((size_t)1 << 20) + x % ((size_t)2 << 20)
                                      : 1 + x % 65536;
            CUdeviceptr p = 0;
            if ((r = cuMemAlloc(&p, size)) != CUDA_SUCCESS)
                WORK_FAIL(w, "thread %d: cuMemAlloc(%zu) -> %d", w->id, size, r);
            uint32_t seed = ((uint32_t)w->id << 24) ^ (uint32_t)it;
            api_fill_pattern(buf, size, seed);
            if ((r = cuMemcpyHtoD(p, buf, size)) != CUDA_SUCCESS)
                WORK_FAIL(w, "thread %d: cuMemcpyHtoD -> %d", w->id, r);
            w->allocs++;
            w->bytes_allocated += size;
            live[n] = p;
            sizes[n] = size;
            seeds[n] = seed;
            n++;
        }
    }
out:
    free(buf);
    return NULL;
}

/* Runs `nthreads` workers of `iters` iterations each on `ctx`; the first error, or "" */
static inline void api_run_workers(CUcontext ctx, int nthreads, int iters, api_worker *workers,
                                   char *err, size_t errlen)
{
    pthread_t t[64];
    err[0] = '\0';
    for (int i = 0; i < nthreads; i++) {
        memset(&workers[i], 0, sizeof workers[i]);
        workers[i].ctx = ctx;
        workers[i].id = i;
        workers[i].iters = iters;
        if (pthread_create(&t[i], NULL, api_worker_main, &workers[i]) != 0) {
            snprintf(err, errlen, "pthread_create failed");
            nthreads = i;
            break;
        }
    }
    for (int i = 0; i < nthreads; i++) {
        pthread_join(t[i], NULL);
        if (!err[0] && workers[i].err[0])
            snprintf(err, errlen, "%s", workers[i].err);
    }
}

#endif
