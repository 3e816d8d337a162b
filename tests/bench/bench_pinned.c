/* gpumem-bench pinned: what pinned host memory costs in the driver, against the pinned pool.
 *
 * In this process, on the real driver (gm_cuda_backend, the primary context of device 0), for
 * sizes 4 KiB .. 64 MiB: the driver's cuMemHostAlloc and cuMemFreeHost timed separately (the raw
 * cost the pool saves), then alloc+free pairs through the pool that hit its cache, in strict mode
 * (the free synchronizes the idle context, like cudaFreeHost) and fast mode (a fence instead).
 * Medians and p99 in microseconds; the last lines are key=value for scripts.
 *
 *   gpumem-bench pinned [--quick]     --quick: fewer iterations (a smoke run, e.g. on the fake) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench.h"
#include "gm_pinned.h"

typedef struct { double median, p99; } summary;

static summary summarize(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return (summary){v[n / 2], v[(int)((double)(n - 1) * 0.99)]};
}

static const size_t sizes[] = {4096, 65536, 1 << 20, 4 << 20, 16 << 20, 64 << 20};
#define NSIZES (sizeof sizes / sizeof *sizes)

typedef struct {
    summary alloc, free_, strict, fast;
} row;

/* The primary context of device 0, current on this thread. */
static bool open_device(uintptr_t *ctx, int *device)
{
    int (*init)(unsigned), (*dev_get)(int *, int), (*retain)(void **, int), (*set_cur)(void *);
    *(void **)&init = gm_driver_sym("cuInit");
    *(void **)&dev_get = gm_driver_sym("cuDeviceGet");
    *(void **)&retain = gm_driver_sym("cuDevicePrimaryCtxRetain");
    *(void **)&set_cur = gm_driver_sym("cuCtxSetCurrent");
    void *c = NULL;
    int dev = 0;
    if (!init || !dev_get || !retain || !set_cur || init(0) || dev_get(&dev, 0) || retain(&c, dev) || set_cur(c))
        return false;
    return gm_mgr.backend->current(ctx, device) == GPUMEM_OK;
}

/* The driver's own calls, each timed; every block is touched once so it is really there. */
static bool time_raw(uintptr_t ctx, size_t size, int iters, row *r)
{
    double *ta = malloc(sizeof(double) * (size_t)iters), *tf = malloc(sizeof(double) * (size_t)iters);
    bool ok = ta && tf;
    for (int i = -2; ok && i < iters; i++) {
        void *p = NULL;
        uint64_t t0 = now_ns();
        ok = gm_mgr.backend->host_alloc(ctx, size, 0, &p) == GPUMEM_OK;
        uint64_t t1 = now_ns();
        if (!ok) break;
        memset(p, i & 0xff, 64);
        uint64_t t2 = now_ns();
        ok = gm_mgr.backend->host_free(ctx, p) == GPUMEM_OK;
        uint64_t t3 = now_ns();
        if (i >= 0) {
            ta[i] = (double)(t1 - t0) / 1e3;
            tf[i] = (double)(t3 - t2) / 1e3;
        }
    }
    if (ok) {
        r->alloc = summarize(ta, iters);
        r->free_ = summarize(tf, iters);
    }
    free(ta);
    free(tf);
    return ok;
}

/* Pool pairs that hit the cache (the first, a miss, is not timed). */
static bool time_pool(uintptr_t ctx, int device, size_t size, int iters, bool strict, summary *out)
{
    ((gm_config *)gm_mgr.cfg)->free_sync = strict; /* read at every free: switchable between runs */
    double *t = malloc(sizeof(double) * (size_t)iters);
    bool ok = t != NULL;
    for (int i = -2; ok && i < iters; i++) {
        void *p = NULL;
        uint64_t t0 = now_ns();
        ok = gm_pinned_alloc(ctx, device, size, 0, NULL, true, &p) == GPUMEM_OK &&
             gm_answer_ok(gm_pinned_free(p, true, 0));
        if (i >= 0) t[i] = (double)(now_ns() - t0) / 1e3;
    }
    if (ok) *out = summarize(t, iters);
    free(t);
    return ok;
}

int bench_pinned(int argc, char **argv)
{
    bool quick = argc >= 1 && strcmp(argv[0], "--quick") == 0;
    setenv("GPUMEM_REPORT", "off", 1);
    const gm_backend *be = gm_cuda_backend();
    uintptr_t ctx = 0;
    int device = 0;
    if (!be || !gm_manager_init(be) || !open_device(&ctx, &device)) {
        fprintf(stderr, "gpumem-bench pinned: no CUDA driver or device\n");
        return 2;
    }
    row rows[NSIZES];
    printf("pinned host memory, microseconds (median / p99)%s\n", quick ? ", quick run" : "");
    printf("%-10s %18s %18s %18s %18s %9s\n", "size", "driver_alloc", "driver_free", "pool_strict", "pool_fast",
           "speedup");
    double worst_strict = 0, worst_fast = 0, raw_4k = 0;
    for (size_t s = 0; s < NSIZES; s++) {
        int raw_iters = quick ? 5 : sizes[s] >= (16u << 20) ? 30 : 200;
        int pool_iters = quick ? 50 : 5000;
        row *r = &rows[s];
        if (!time_raw(ctx, sizes[s], raw_iters, r) || !time_pool(ctx, device, sizes[s], pool_iters, true, &r->strict) ||
            !time_pool(ctx, device, sizes[s], pool_iters, false, &r->fast)) {
            fprintf(stderr, "gpumem-bench pinned: allocation of %zu bytes failed\n", sizes[s]);
            return 3;
        }
        gm_pinned_release_cached();
        double raw_pair = r->alloc.median + r->free_.median;
        printf("%-10zu %8.2f/%-9.2f %8.2f/%-9.2f %8.3f/%-9.3f %8.3f/%-9.3f %8.0fx\n", sizes[s], r->alloc.median,
               r->alloc.p99, r->free_.median, r->free_.p99, r->strict.median, r->strict.p99, r->fast.median,
               r->fast.p99, raw_pair / r->strict.median);
        if (r->strict.median > worst_strict) worst_strict = r->strict.median;
        if (r->fast.median > worst_fast) worst_fast = r->fast.median;
        if (s == 0) raw_4k = raw_pair;
    }
    printf("pinned_raw_pair_us_median_4KiB=%.2f\n", raw_4k);
    printf("pinned_raw_pair_us_median_64MiB=%.2f\n", rows[NSIZES - 1].alloc.median + rows[NSIZES - 1].free_.median);
    printf("pinned_pool_strict_pair_us_median_worst=%.3f\npinned_pool_fast_pair_us_median_worst=%.3f\n", worst_strict,
           worst_fast);
    return 0;
}
