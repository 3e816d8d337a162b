/* staging_check: pageable host <-> device copies through every copy entry point, to be run with
 * and without the gpumem shim (which stages large pageable copies through pinned buffers) and the
 * outputs compared: stdout is deterministic, one line per case and size with the checksum of the
 * bytes read back and whether they are the bytes expected. Timings go to stderr.
 *
 * The cases hold the driver's documented semantics for pageable memory:
 *   h2d, d2h            blocking cuMemcpyHtoD / cuMemcpyDtoH
 *   h2d_async_consumed  cuMemcpyHtoDAsync returns once the source is consumed: the source is
 *                       overwritten right after the call, the device must hold the original
 *   d2h_after_memset    cuMemcpyDtoHAsync after a memset on the same stream: the host sees the
 *                       memset's bytes as soon as the call returns (no stream sync)
 *   h2d_then_memset     a memset after an H2D on the same stream wins over it
 *   ptsz                the per-thread default stream entry points with stream 0
 *   unified             cuMemcpy / cuMemcpyAsync with a pageable side
 * Sizes straddle the default 4 MiB staging minimum and chunk, up to 256 MiB.
 * Exit status: 0 when every case read back the expected bytes, 1 otherwise.
 *
 * Build: cc -O2 -o staging_check staging_check.c -I$CUDA/include -lcuda
 */
#include <cuda.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Exported by libcuda; cuda.h declares them only under CUDA_API_PER_THREAD_DEFAULT_STREAM. */
CUresult CUDAAPI cuMemcpyHtoDAsync_v2_ptsz(CUdeviceptr dst, const void *src, size_t n, CUstream s);
CUresult CUDAAPI cuMemcpyDtoHAsync_v2_ptsz(void *dst, CUdeviceptr src, size_t n, CUstream s);
CUresult CUDAAPI cuStreamSynchronize_ptsz(CUstream s);

#define MiB ((size_t)1 << 20)

static int failures;

static void die(const char *what, CUresult r, int line)
{
    const char *name = NULL;
    cuGetErrorName(r, &name);
    fflush(stdout);
    fprintf(stderr, "staging_check: line %d: %s -> %s (%d)\n", line, what, name ? name : "?", (int)r);
    printf("staging_check: FAIL: line %d: %s -> %s\n", line, what, name ? name : "?");
    exit(1);
}

#define CK(call) \
    do { \
        CUresult ck_ = (call); \
        if (ck_ != CUDA_SUCCESS) die(#call, ck_, __LINE__); \
    } while (0)

static void fill(unsigned char *p, size_t n, uint32_t seed)
{
    uint64_t x = 0x9E3779B97F4A7C15ull * (seed + 1);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        memcpy(p + i, &x, 8);
    }
    for (; i < n; i++) p[i] = (unsigned char)(seed * 31 + i);
}

static uint64_t fnv1a(const unsigned char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static void report(const char *name, size_t n, const unsigned char *got, const unsigned char *want)
{
    int equal = memcmp(got, want, n) == 0;
    failures += !equal;
    printf("%-20s %10zu fnv=%016llx equal=%d\n", name, n, (unsigned long long)fnv1a(got, n), equal);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

int main(void)
{
    CUdevice dev;
    CUcontext ctx;
    CUstream s;
    CK(cuInit(0));
    CK(cuDeviceGet(&dev, 0));
    CK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CK(cuCtxSetCurrent(ctx));
    CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    CUevent landed; /* orders the non-blocking stream after the legacy stream's copy */
    CK(cuEventCreate(&landed, CU_EVENT_DISABLE_TIMING));

    const size_t sizes[] = {MiB + 3, 4 * MiB - 1, 4 * MiB, 4 * MiB + 1, 12 * MiB + 7, 33 * MiB - 5,
                            64 * MiB + 3, 256 * MiB};
    const size_t max = 256 * MiB;
    unsigned char *src = malloc(max), *want = malloc(max), *back = malloc(max);
    CUdeviceptr d;
    if (!src || !want || !back) {
        printf("staging_check: FAIL: out of host memory\n");
        return 1;
    }
    CK(cuMemAlloc(&d, max));
    memset(src, 0, max); /* every page touched once, as a program's buffers are */
    memset(back, 0, max);

    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        size_t n = sizes[k];
        uint32_t seed = (uint32_t)k * 8;
        double t0 = now_ms();

        fill(src, n, seed);
        CK(cuMemcpyHtoD(d, src, n));
        memset(back, 0, n);
        CK(cuMemcpyDtoH(back, d, n));
        report("h2d+d2h", n, back, src);

        fill(want, n, seed + 1);
        memcpy(src, want, n);
        CK(cuMemcpyHtoDAsync(d, src, n, s));
        memset(src, 0xFF, n);
        CK(cuStreamSynchronize(s));
        CK(cuMemcpyDtoH(back, d, n));
        report("h2d_async_consumed", n, back, want);

        uint32_t word = 0xC0FFEE00u + (uint32_t)k;
        CK(cuMemsetD32Async(d, word, n / 4, s));
        memset(back, 0, n);
        CK(cuMemcpyDtoHAsync(back, d, n / 4 * 4, s)); /* no sync: a pageable D2H returns when done */
        for (size_t i = 0; i < n / 4; i++) memcpy(want + 4 * i, &word, 4);
        report("d2h_after_memset", n / 4 * 4, back, want);

        fill(src, n, seed + 2);
        CK(cuMemcpyHtoDAsync(d, src, n, s));
        CK(cuMemsetD8Async(d, 0x5A, n / 2, s));
        CK(cuStreamSynchronize(s));
        CK(cuMemcpyDtoH(back, d, n));
        memset(want, 0x5A, n / 2);
        memcpy(want + n / 2, src + n / 2, n - n / 2);
        report("h2d_then_memset", n, back, want);

        fill(src, n, seed + 3);
        CK(cuMemcpyHtoDAsync_v2_ptsz(d, src, n, NULL));
        memset(back, 0, n);
        CK(cuMemcpyDtoHAsync_v2_ptsz(back, d, n, NULL));
        CK(cuStreamSynchronize_ptsz(NULL));
        report("ptsz", n, back, src);

        fill(src, n, seed + 4);
        CK(cuMemcpy(d, (CUdeviceptr)(uintptr_t)src, n));
        /* A pageable H2D may return before its DMA has landed (the driver's documented return
         * point); `s` is non-blocking, so the readback must wait for the legacy stream's copy.
         * Without this wait the driver itself read stale bytes once (H200, 4 MiB + 1, no shim). */
        CK(cuEventRecord(landed, NULL));
        CK(cuStreamWaitEvent(s, landed, 0));
        memset(back, 0, n);
        CK(cuMemcpyAsync((CUdeviceptr)(uintptr_t)back, d, n, s));
        CK(cuStreamSynchronize(s));
        report("unified", n, back, src);

        fprintf(stderr, "staging_check: %zu B: %.1f ms\n", n, now_ms() - t0);
    }
    CK(cuMemFree(d));
    CK(cuEventDestroy(landed));
    CK(cuStreamDestroy(s));
    free(src);
    free(want);
    free(back);
    printf("staging_check: %s\n", failures ? "FAIL" : "OK");
    return failures ? 1 : 0;
}
