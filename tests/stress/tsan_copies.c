/* Checked copies under threads, as a plain program for the ThreadSanitizer setup. Each thread
 * allocates, checks copies into its own blocks, frees, and checks again, while the others do the
 * same in the same heap, so the lock-free memo of live blocks (engine/lookup.c) is validated against
 * frees and reuse happening concurrently. A check of a block its thread still holds must never be
 * refused; a copy past its end must always be; a freed block may be refused or, when another
 * thread already got the same address back, accepted: both are right. TSan reports races itself. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "gm_api.h"
#include "gm_transfer.h"

#define THREADS 3
#define ROUNDS 4000
#define HELD 8

static gm_heap *heap;

static int check(uintptr_t p, size_t n)
{
    gm_xfer x = {.api = "tsan_copies", .site = NULL};
    x.side[GM_XFER_DST] = (gm_span){.ptr = p, .n = n};
    return gm_xfer_check(&x);
}

static void *worker(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    uintptr_t held[HELD] = {0};
    size_t size[HELD] = {0};
    long wrong = 0;
    for (int r = 0; r < ROUNDS; r++) {
        int i = (int)(rand_r(&seed) % HELD);
        if (held[i]) { /* still ours: every check of it must pass, past its end must not */
            if (check(held[i], size[i]) != GPUMEM_OK) wrong++;
            if (check(held[i] + size[i] / 2, size[i] / 2) != GPUMEM_OK) wrong++;
            if (check(held[i], size[i] + 1) == GPUMEM_OK) wrong++;
            gm_free(heap, held[i], GM_FREE_BARRIER, NULL);
            check(held[i], size[i]); /* freed: refused, or another thread's again: no answer is wrong */
            held[i] = 0;
        } else {
            size[i] = 512 + (size_t)(rand_r(&seed) % (64 * 1024));
            if (gm_alloc(heap, size[i], 0, NULL, &held[i]) != GPUMEM_OK) return (void *)-1;
        }
    }
    for (int i = 0; i < HELD; i++)
        if (held[i]) gm_free(heap, held[i], GM_FREE_BARRIER, NULL);
    return (void *)wrong;
}

int main(void)
{
    setenv("GPUMEM_REPORT", "off", 1);
    gm_manager_init(gm_host_backend());
    heap = gm_heap_get(1, 0);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1));
    long wrong = 0;
    for (int i = 0; i < THREADS; i++) {
        void *r;
        pthread_join(t[i], &r);
        wrong += (long)r;
    }
    gpumem_copy_stats st;
    gpumem_get_copy_stats(0, &st);
    printf("checked copies under %d threads: %ld wrong answers, %llu refused in all\n", THREADS, wrong,
           (unsigned long long)st.refused_copies);
    return wrong != 0 || st.refused_copies < (unsigned long long)THREADS;
}
