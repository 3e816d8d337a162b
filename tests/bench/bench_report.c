/* gpumem-bench report [N]: a report of the live allocations written on GPUMEM_REPORT_SIGNAL
 * (issue 13), on the host backend in this process: N live allocations (default 100000) from 64
 * call stacks, then SIGUSR1 raised and the time until the reporter thread has written the report
 * (to /dev/null: the whole text report, frames symbolized) measured. The first report runs
 * addr2line; the later ones find the names cached. Also: alloc+free pairs that hit the pool
 * while reports are being written back to back, against the same pairs with none.
 * Last lines: signal_report_first_ms=<X>, signal_report_ms_median=<Y>,
 * pool_pair_ratio_during_reports=<Z>. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "gm_api.h"

#define STACKS 64
#define ROUNDS 7

static gm_heap *heap;

/* Allocation `i` comes from one of 64 call stacks: a recursion of depth i % 64. */
static __attribute__((noinline)) uintptr_t alloc_at_depth(int depth, size_t size)
{
    if (depth > 0) {
        uintptr_t p = alloc_at_depth(depth - 1, size);
        __asm__ volatile("" ::: "memory"); /* not a tail call: every depth is a frame */
        return p;
    }
    uintptr_t p = 0;
    if (gm_alloc(heap, size, 0, GM_CALLSITE(), &p) != GPUMEM_OK) {
        fprintf(stderr, "gpumem-bench report: allocation failed\n");
        exit(2);
    }
    return p;
}

static double one_report_ms(void)
{
    uint64_t before = gm_reporter_reports_written();
    uint64_t t0 = now_ns();
    raise(SIGUSR1);
    while (gm_reporter_reports_written() == before) {
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
    return (double)(now_ns() - t0) / 1e6;
}

/* ns per alloc+free pair that hits the pool, `n` pairs. */
static double pairs_ns(int n)
{
    uint64_t t0 = now_ns();
    for (int i = 0; i < n; i++) {
        uintptr_t p;
        if (gm_alloc(heap, 4096, 0, GM_CALLSITE(), &p) != GPUMEM_OK) exit(2);
        gm_free(heap, p, GM_FREE_BARRIER, NULL);
    }
    return (double)(now_ns() - t0) / n;
}

int bench_report(int argc, char **argv)
{
    long n = argc >= 1 ? strtol(argv[0], NULL, 10) : 100000;
    if (n < 1) n = 100000;
    setenv("GPUMEM_REPORT_SIGNAL", "SIGUSR1", 1);
    setenv("GPUMEM_REPORT", "/dev/null", 1);
    setenv("GPUMEM_OOM_REPORT", "0", 1);
    if (!gm_report_start(gm_host_backend())) return 2;
    heap = gm_heap_get(1, 0);
    uint64_t t0 = now_ns();
    for (long i = 0; i < n; i++) alloc_at_depth((int)(i % STACKS), 512 + (size_t)(i % 7) * 512);
    printf("%ld live allocations from %d call stacks made in %.1f ms\n", n, STACKS, (double)(now_ns() - t0) / 1e6);

    double first = one_report_ms();
    double t[ROUNDS];
    for (int r = 0; r < ROUNDS; r++) t[r] = one_report_ms();
    qsort(t, ROUNDS, sizeof *t, cmp_double);
    printf("signal report of %ld live allocations: first %.2f ms (addr2line), then median %.2f ms, max %.2f ms over %d\n",
           n, first, t[ROUNDS / 2], t[ROUNDS - 1], ROUNDS);

    /* Pool hits with no report, then while a signal arrives every 1000 pairs. */
    double quiet[ROUNDS], busy[ROUNDS];
    pairs_ns(10000);
    for (int r = 0; r < ROUNDS; r++) {
        quiet[r] = pairs_ns(20000);
        double sum = 0;
        for (int k = 0; k < 20; k++) {
            raise(SIGUSR1);
            sum += pairs_ns(1000);
        }
        busy[r] = sum / 20;
    }
    qsort(quiet, ROUNDS, sizeof *quiet, cmp_double);
    qsort(busy, ROUNDS, sizeof *busy, cmp_double);
    printf("pool-hit alloc+free pair: %.0f ns without reports, %.0f ns while reports are written (medians)\n",
           quiet[ROUNDS / 2], busy[ROUNDS / 2]);
    printf("signal_report_first_ms=%.2f\n", first);
    printf("signal_report_ms_median=%.2f\n", t[ROUNDS / 2]);
    printf("pool_pair_ratio_during_reports=%.2f\n", busy[ROUNDS / 2] / quiet[ROUNDS / 2]);
    return 0;
}
