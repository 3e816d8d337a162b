/* gpumem-bench transfer: pageable host <-> device copies, the driver's own (cuMemcpyHtoD_v2 /
 * cuMemcpyDtoH_v2) against pinned staging (gm_staged_copy), side by side in one process on the
 * real driver, alternating call by call so that both see the same machine state and noise.
 *
 *  - Large copies (16, 64, 256 MiB): GB/s, median of the repetitions, and the ratio. A copy is
 *    timed until its data is where it goes (the copy, then cuCtxSynchronize: a pageable H2D may
 *    return before its DMA is done, for the driver as for us).
 *  - Small copies (4 KiB .. 4 MiB): microseconds per copy. Below GPUMEM_STAGING_MIN the staged path
 *    declines (GM_NOT_OURS) and the driver copies, as in the hooks: the cost of asking is measured.
 *  - Every staged copy's bytes are checked against the driver's.
 *
 * The last lines are key=value: transfer_<dir>_<size>MiB_ratio=<staged / driver bandwidth>, the
 * 256 MiB ones last. Exit status 0, 1 when bytes differed, 2 without a usable GPU. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda.h>

#include "bench.h"
#include "gm_api.h"
#include "gm_staging.h"

#define MiB ((size_t)1 << 20)

static struct {
    CUresult (*init)(unsigned);
    CUresult (*device_get)(CUdevice *, int);
    CUresult (*device_name)(char *, int, CUdevice);
    CUresult (*retain)(CUcontext *, CUdevice);
    CUresult (*set_current)(CUcontext);
    CUresult (*ctx_sync)(void);
    CUresult (*mem_alloc)(CUdeviceptr *, size_t);
    CUresult (*mem_free)(CUdeviceptr);
    CUresult (*htod)(CUdeviceptr, const void *, size_t);
    CUresult (*dtoh)(void *, CUdeviceptr, size_t);
} drv;

static uintptr_t ctx;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double median(double *v, size_t n)
{
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* The driver, a current context and the engine on the CUDA backend; 2 with a message if not. */
static int start(char *name, size_t cap)
{
    const gm_backend *be = gm_cuda_backend();
    if (!be) {
        fprintf(stderr, "gpumem-bench transfer: no CUDA driver (libcuda.so.1 cannot be loaded)\n");
        return 2;
    }
#define BIND(field, sym) (*(void **)&drv.field = gm_driver_sym(sym)) != NULL
    if (!(BIND(init, "cuInit") && BIND(device_get, "cuDeviceGet") && BIND(device_name, "cuDeviceGetName") &&
          BIND(retain, "cuDevicePrimaryCtxRetain") && BIND(set_current, "cuCtxSetCurrent") &&
          BIND(ctx_sync, "cuCtxSynchronize") && BIND(mem_alloc, "cuMemAlloc_v2") &&
          BIND(mem_free, "cuMemFree_v2") && BIND(htod, "cuMemcpyHtoD_v2") && BIND(dtoh, "cuMemcpyDtoH_v2"))) {
        fprintf(stderr, "gpumem-bench transfer: the driver lacks an entry point this benchmark needs\n");
        return 2;
    }
#undef BIND
    CUdevice dev;
    CUcontext c;
    CUresult rc = drv.init(0);
    if (rc == CUDA_SUCCESS) rc = drv.device_get(&dev, 0);
    if (rc == CUDA_SUCCESS) rc = drv.retain(&c, dev);
    if (rc == CUDA_SUCCESS) rc = drv.set_current(c);
    if (rc != CUDA_SUCCESS) {
        fprintf(stderr, "gpumem-bench transfer: no usable GPU (driver error %d)\n", (int)rc);
        return 2;
    }
    if (drv.device_name(name, (int)cap, dev) != CUDA_SUCCESS) snprintf(name, cap, "device 0");
    ctx = (uintptr_t)c;
    gm_manager_init(be);
    return 0;
}

/* ---------------------------------------------------------------- one copy each way */

/* The staged copy, or the driver's where the stager declines (exactly what the hooks do). */
static CUresult gpumem_copy(gm_copy_dir dir, void *host, CUdeviceptr dev, size_t n)
{
    uintptr_t dst = dir == GM_COPY_H2D ? (uintptr_t)dev : (uintptr_t)host;
    uintptr_t src = dir == GM_COPY_H2D ? (uintptr_t)host : (uintptr_t)dev;
    gm_answer a = gm_staged_copy(ctx, dir, dst, src, n, 0, true);
    if (a.owner == GM_OURS) return (CUresult)a.status;
    return dir == GM_COPY_H2D ? drv.htod(dev, host, n) : drv.dtoh(host, dev, n);
}

static CUresult driver_copy(gm_copy_dir dir, void *host, CUdeviceptr dev, size_t n)
{
    return dir == GM_COPY_H2D ? drv.htod(dev, host, n) : drv.dtoh(host, dev, n);
}

/* Seconds until the data is in place. */
static double timed(bool staged, gm_copy_dir dir, void *host, CUdeviceptr dev, size_t n, bool wait)
{
    double t0 = now_s();
    CUresult rc = staged ? gpumem_copy(dir, host, dev, n) : driver_copy(dir, host, dev, n);
    if (rc == CUDA_SUCCESS && wait) rc = drv.ctx_sync();
    double t = now_s() - t0;
    if (rc != CUDA_SUCCESS) {
        fprintf(stderr, "gpumem-bench transfer: %s %s of %zu B failed with %d\n", staged ? "staged" : "driver",
                gm_copy_dir_name(dir), n, (int)rc);
        exit(3);
    }
    return t;
}

/* Alternating pairs, the order flipped every pair; medians of both. */
static void side_by_side(gm_copy_dir dir, void *host, CUdeviceptr dev, size_t n, int reps, bool wait,
                         double *driver_s, double *staged_s)
{
    double *d = malloc((size_t)reps * sizeof *d), *s = malloc((size_t)reps * sizeof *s);
    timed(false, dir, host, dev, n, wait); /* warm both paths (the stager is made on first use) */
    timed(true, dir, host, dev, n, wait);
    for (int i = 0; i < reps; i++) {
        if (i % 2) {
            s[i] = timed(true, dir, host, dev, n, wait);
            d[i] = timed(false, dir, host, dev, n, wait);
        } else {
            d[i] = timed(false, dir, host, dev, n, wait);
            s[i] = timed(true, dir, host, dev, n, wait);
        }
    }
    *driver_s = median(d, (size_t)reps);
    *staged_s = median(s, (size_t)reps);
    free(d);
    free(s);
}

/* ---------------------------------------------------------------- bytes */

static void fill(unsigned char *p, size_t n, uint32_t seed)
{
    uint64_t x = 0x9E3779B97F4A7C15ull * (seed + 1);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        memcpy(p + i, &x, 8);
    }
    for (; i < n; i++) p[i] = (unsigned char)(seed + i);
}

/* Staged H2D then the driver's D2H, and the driver's H2D then a staged D2H: the same bytes. */
static bool bytes_agree(unsigned char *host, unsigned char *back, CUdeviceptr dev, size_t n, uint32_t seed)
{
    fill(host, n, seed);
    if (gpumem_copy(GM_COPY_H2D, host, dev, n) || drv.ctx_sync() || drv.dtoh(back, dev, n)) return false;
    if (memcmp(host, back, n) != 0) return false;
    fill(host, n, seed + 1);
    memset(back, 0, n);
    if (drv.htod(dev, host, n) || drv.ctx_sync() || gpumem_copy(GM_COPY_D2H, back, dev, n)) return false;
    return memcmp(host, back, n) == 0;
}

/* ---------------------------------------------------------------- the mode */

typedef struct {
    size_t n;
    double ratio[2];
} large_row;

int bench_transfer(int argc, char **argv)
{
    (void)argc, (void)argv;
    char name[256];
    setenv("GPUMEM_REPORT", "off", 0); /* the exit report is not what this mode measures */
    int rc = start(name, sizeof name);
    if (rc) return rc;
    const gm_config *cfg = gm_mgr.cfg;
    printf("gpumem-bench transfer on %s: pageable copies, the driver's own against pinned staging\n", name);
    printf("staging %s, GPUMEM_STAGING_MIN %llu B, chunk %llu B, %d host threads (pinned: %llu MiB)\n",
           cfg->staging ? "on" : "OFF", (unsigned long long)cfg->staging_min,
           (unsigned long long)cfg->staging_chunk, cfg->staging_threads,
           (unsigned long long)(2 * (uint64_t)cfg->staging_threads * cfg->staging_chunk >> 20));

    const size_t big = 256 * MiB;
    unsigned char *host = malloc(big), *back = malloc(big);
    CUdeviceptr dev = 0;
    if (!host || !back || drv.mem_alloc(&dev, big) != CUDA_SUCCESS) {
        fprintf(stderr, "gpumem-bench transfer: cannot allocate 256 MiB on the host and the device\n");
        return 2;
    }
    fill(host, big, 1); /* touched once: the pages exist before anything is timed */
    memset(back, 0, big);

    bool agree = true;
    const size_t check_sizes[] = {4 * MiB - 1, 4 * MiB + 1, 13 * MiB + 5, 64 * MiB + 3, big};
    for (size_t i = 0; i < sizeof check_sizes / sizeof *check_sizes; i++) {
        bool ok = bytes_agree(host, back, dev, check_sizes[i], (uint32_t)i * 2 + 3);
        printf("bytes %zu: %s\n", check_sizes[i], ok ? "equal" : "DIFFER");
        agree &= ok;
    }

    printf("\n%-9s %-4s %12s %12s %8s\n", "size", "dir", "driver GB/s", "staged GB/s", "ratio");
    const size_t large[] = {16 * MiB, 64 * MiB, big};
    const int large_reps[] = {21, 15, 9};
    large_row rows[3];
    for (size_t i = 0; i < 3; i++) {
        rows[i].n = large[i];
        for (int d = 0; d < 2; d++) {
            gm_copy_dir dir = d ? GM_COPY_D2H : GM_COPY_H2D;
            double ts, tg;
            side_by_side(dir, d ? back : host, dev, large[i], large_reps[i], true, &ts, &tg);
            rows[i].ratio[d] = ts / tg;
            printf("%-3zu MiB   %-4s %12.2f %12.2f %8.2f\n", large[i] / MiB, gm_copy_dir_name(dir),
                   (double)large[i] / ts * 1e-9, (double)large[i] / tg * 1e-9, ts / tg);
        }
    }

    printf("\n%-9s %-4s %12s %12s %8s  (microseconds per blocking copy; gpumem = staged, or the driver below the minimum)\n",
           "size", "dir", "driver", "gpumem", "ratio");
    const size_t small[] = {4 << 10, 64 << 10, 256 << 10, MiB, 4 * MiB};
    const int small_reps[] = {2001, 1001, 501, 201, 101};
    for (size_t i = 0; i < sizeof small / sizeof *small; i++) {
        for (int d = 0; d < 2; d++) {
            gm_copy_dir dir = d ? GM_COPY_D2H : GM_COPY_H2D;
            double ts, tg;
            side_by_side(dir, d ? back : host, dev, small[i], small_reps[i], true, &ts, &tg);
            printf("%-5zu KiB %-4s %12.2f %12.2f %8.2f\n", small[i] >> 10, gm_copy_dir_name(dir), ts * 1e6,
                   tg * 1e6, ts / tg);
        }
    }

    printf("\n");
    for (size_t i = 0; i < 3; i++)
        for (int d = 0; d < 2; d++)
            printf("transfer_%s_%zuMiB_ratio=%.2f\n", d ? "d2h" : "h2d", rows[i].n / MiB, rows[i].ratio[d]);
    drv.mem_free(dev);
    free(host);
    free(back);
    if (!agree) fprintf(stderr, "gpumem-bench transfer: staged copies gave different bytes\n");
    return agree ? 0 : 1;
}
