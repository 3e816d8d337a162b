/* Many threads allocate, write, check and free at once, in strict and fast mode: a block must
 * never be handed to two owners (each owner's pattern survives until it frees), and the counters
 * balance at the end. Also built under ThreadSanitizer by the tsan setup. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "gm_internal.h"

#define THREADS 8
#define OPS_PER_THREAD 20000
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
            if (gm_free(heap, held[slot], GM_FREE_BARRIER, NULL) != GPUMEM_OK) return (void *)2;
            held[slot] = 0;
        } else {
            size_t size = 1 + (size_t)((seed >> 20) % (seed % 7 == 0 ? (3u << 20) : 8192u));
            if (gm_alloc(heap, size, 0, 0, &held[slot]) != GPUMEM_OK) return (void *)3;
            memset((void *)held[slot], tag, size);
            held_size[slot] = size;
        }
    }
    for (int s = 0; s < SLOTS; s++)
        if (held[s] && gm_free(heap, held[s], GM_FREE_BARRIER, NULL) != GPUMEM_OK) return (void *)2;
    return NULL;
}

static void run_threads(const char *free_sync)
{
    setenv("GPUMEM_FREE_SYNC", free_sync, 1);
    setenv("GPUMEM_REPORT", "off", 1);
    gm_config_reset_for_tests();
    cr_assert(gm_manager_init(gm_host_backend()));
    heap = gm_heap_get(1, 0);
    pthread_t t[THREADS];
    for (uintptr_t i = 0; i < THREADS; i++)
        cr_assert_eq(pthread_create(&t[i], NULL, worker, (void *)(i + 1)), 0);
    for (int i = 0; i < THREADS; i++) {
        void *ret = NULL;
        pthread_join(t[i], &ret);
        cr_expect_null(ret, "thread %d failed with code %ld", i, (long)(uintptr_t)ret);
    }
    gpumem_stats st;
    gpumem_get_stats(0, &st);
    cr_expect_eq(st.allocations, st.frees);
    cr_expect_eq(st.bytes_allocated, 0);
    cr_expect_eq(st.bytes_requested, 0);
    cr_expect_eq(st.bytes_reserved, gm_host_backend_in_use());
}

Test(threads, strict_mode, .timeout = 300) { run_threads("1"); }

Test(threads, fast_mode, .timeout = 300)
{
    gm_host_backend_set_fence_delay(3); /* fences complete after a few queries */
    run_threads("0");
}
