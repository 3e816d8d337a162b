/* The body of the threaded stress test, shared by the Criterion test and the plain program that
 * the ThreadSanitizer setup runs (Criterion itself cannot start under TSan). */
#ifndef GM_THREADS_CORE_H
#define GM_THREADS_CORE_H
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "gm_api.h"

#define THREADS 8
static int ops_per_thread = 20000; /* the TSan program lowers it: TSan is ~20x slower */
#define OPS_PER_THREAD ops_per_thread
#define SLOTS 32

static gm_heap *heap;

static void *worker(void *arg)
{
    uint64_t seed = (uint64_t)(uintptr_t)arg * 0x9E3779B97F4A7C15ull + 1;
    uintptr_t held[SLOTS] = {0};
    size_t held_size[SLOTS] = {0};
    unsigned char tag = (unsigned char)(uintptr_t)arg;
    for (int op = 0; op < OPS_PER_THREAD; op++) {
        seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
        int slot = (int)(seed % SLOTS);
        if (held[slot]) {
            unsigned char *p = (unsigned char *)held[slot];
            for (size_t i = 0; i < held_size[slot]; i += 97)
                if (p[i] != tag) return (void *)1; /* someone else wrote into our block */
            if (!gm_answer_ok(gm_free(heap, held[slot], GM_FREE_BARRIER, NULL))) return (void *)2;
            held[slot] = 0;
        } else {
            size_t size = 1 + (size_t)((seed >> 20) % (seed % 7 == 0 ? (3u << 20) : 8192u));
            if (gm_alloc(heap, size, 0, 0, &held[slot]) != GPUMEM_OK) return (void *)3;
            memset((void *)held[slot], tag, size);
            held_size[slot] = size;
        }
    }
    for (int s = 0; s < SLOTS; s++)
        if (held[s] && !gm_answer_ok(gm_free(heap, held[s], GM_FREE_BARRIER, NULL))) return (void *)2;
    return NULL;
}


/* Runs THREADS workers; returns the first failure code (0 = all good). */
static long run_workers(void)
{
    pthread_t t[THREADS];
    long failure = 0;
    for (uintptr_t i = 0; i < THREADS; i++)
        if (pthread_create(&t[i], NULL, worker, (void *)(i + 1)) != 0) return 100;
    for (int i = 0; i < THREADS; i++) {
        void *ret = NULL;
        pthread_join(t[i], &ret);
        if (ret && !failure) failure = (long)(uintptr_t)ret;
    }
    return failure;
}
#endif
