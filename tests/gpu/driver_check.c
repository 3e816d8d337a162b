/* driver_check: a pure CUDA driver-API program (no runtime), to be run with and without the gpumem
 * shim and the outputs compared. stdout is deterministic (no pointers, no free-memory figures: those
 * go to stderr). Any unexpected driver error: message, exit 1.
 *
 *   driver_check [--leak N]
 *     --leak N   leave N allocations of 1000 + i*4096 bytes (i = 0..N-1) live at exit and print
 *                "expected_leak_bytes=<sum> expected_leak_allocs=<N>"
 *
 * Build: nvcc -x c -O2 -o driver_check driver_check.c -lcuda
 *    or: cc -O2 -I$CUDA/include -o driver_check driver_check.c -L$CUDA/lib64/stubs -lcuda
 */
#include <cuda.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *err_name(CUresult r)
{
    const char *s = NULL;
    if (cuGetErrorName(r, &s) != CUDA_SUCCESS || !s) return "CUDA_ERROR_<unknown>";
    return s;
}

static void die(const char *what, CUresult r, int line)
{
    fflush(stdout);
    fprintf(stderr, "driver_check: line %d: %s -> %s (%d)\n", line, what, err_name(r), (int)r);
    printf("driver_check: FAIL: line %d: %s -> %s\n", line, what, err_name(r));
    fflush(stdout);
    exit(1);
}

static void fail(const char *msg)
{
    fflush(stdout);
    fprintf(stderr, "driver_check: %s\n", msg);
    printf("driver_check: FAIL: %s\n", msg);
    fflush(stdout);
    exit(1);
}

#define CK(call)                                          \
    do {                                                  \
        CUresult ck_r_ = (call);                          \
        if (ck_r_ != CUDA_SUCCESS) die(#call, ck_r_, __LINE__); \
    } while (0)

#define KiB ((size_t)1024)
#define MiB ((size_t)1024 * 1024)

static uint8_t pat(uint32_t seed, size_t i)
{
    uint32_t h = (uint32_t)i * 2654435761u ^ (seed * 0x9E3779B9u);
    h ^= h >> 15;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    return (uint8_t)h;
}

static uint64_t fnv(const uint8_t *p, size_t n)
{
    uint64_t f = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) f = (f ^ p[i]) * 1099511628211ull;
    return f;
}

int main(int argc, char **argv)
{
    long leak = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--leak") && i + 1 < argc) {
            char *end;
            leak = strtol(argv[++i], &end, 10);
            if (*end || leak < 0 || leak > 100000) {
                fprintf(stderr, "usage: driver_check [--leak N]\n");
                return 2;
            }
        } else {
            fprintf(stderr, "usage: driver_check [--leak N]\n");
            return 2;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    int failed = 0;

    CK(cuInit(0));
    int ndev = 0;
    CK(cuDeviceGetCount(&ndev));
    if (ndev < 1) fail("no CUDA device");
    CUdevice dev;
    CK(cuDeviceGet(&dev, 0));
    CUcontext ctx;
    CK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CK(cuCtxSetCurrent(ctx));

    /* ---- allocations of several sizes, memset, copies both ways */
    static const size_t sizes[] = {1, 511, 4 * KiB, MiB, MiB + 1, 3 * MiB + 12345, 64 * MiB};
    enum { N = sizeof sizes / sizeof sizes[0] };
    const size_t max = 64 * MiB;
    CUdeviceptr d[N];
    uint8_t *h1 = malloc(max), *h2 = malloc(max);
    if (!h1 || !h2) fail("host malloc failed");

    for (int k = 0; k < N; k++) CK(cuMemAlloc(&d[k], sizes[k]));
    for (int a = 0; a < N; a++)
        for (int b = a + 1; b < N; b++)
            if (d[a] < d[b] + sizes[b] && d[b] < d[a] + sizes[a]) fail("two live allocations overlap");

    for (int k = 0; k < N; k++) {
        size_t sz = sizes[k];
        unsigned char v = (unsigned char)(k * 37 + 1);
        CK(cuMemsetD8(d[k], v, sz));
        memset(h1, ~v, sz);
        CK(cuMemcpyDtoH(h1, d[k], sz));
        for (size_t i = 0; i < sz; i++)
            if (h1[i] != v) fail("cuMemsetD8 + cuMemcpyDtoH: wrong byte");
        for (size_t i = 0; i < sz; i++) h1[i] = pat(100u + (uint32_t)k, i);
        CK(cuMemcpyHtoD(d[k], h1, sz));
        memset(h2, 0, sz);
        CK(cuMemcpyDtoH(h2, d[k], sz));
        if (memcmp(h1, h2, sz)) fail("cuMemcpyHtoD + cuMemcpyDtoH: data differs");
        printf("size=%zu memset=ok checksum=%016llx\n", sz, (unsigned long long)fnv(h2, sz));
    }
    /* every allocation still holds its own pattern after the work on the others */
    for (int k = 0; k < N; k++) {
        CK(cuMemcpyDtoH(h2, d[k], sizes[k]));
        for (size_t i = 0; i < sizes[k]; i++)
            if (h2[i] != pat(100u + (uint32_t)k, i)) fail("an allocation was disturbed by work on another");
    }
    printf("allocations: %d intact\n", (int)N);

    /* ---- cuMemGetInfo: the figures change from run to run, so only the sanity goes to stdout */
    size_t mfree = 0, mtotal = 0;
    CK(cuMemGetInfo(&mfree, &mtotal));
    fprintf(stderr, "driver_check: cuMemGetInfo free=%zu total=%zu\n", mfree, mtotal);
    int info_ok = mtotal > 0 && mfree <= mtotal;
    printf("mem_info_ok=%d\n", info_ok);
    if (!info_ok) failed = 1;

    /* ---- cuMemGetAddressRange on an interior pointer */
    for (int k = 0; k < N; k++) {
        size_t off = sizes[k] / 2;
        CUdeviceptr base = 0;
        size_t size = 0;
        CK(cuMemGetAddressRange(&base, &size, d[k] + off));
        size_t got_off = (size_t)(d[k] + off - base);
        int ok = base == d[k] && size == sizes[k];
        printf("addr_range requested=%zu interior_offset=%zu base_offset=%zu size=%zu ok=%d\n", sizes[k], off,
               got_off, size, ok);
        if (!ok) failed = 1;
    }

    /* ---- managed and stream-ordered allocations through the driver */
    CUdeviceptr m = 0;
    CK(cuMemAllocManaged(&m, 64 * KiB + 7, CU_MEM_ATTACH_GLOBAL));
    CK(cuMemsetD8(m, 0x3C, 64 * KiB + 7));
    CK(cuCtxSynchronize());
    {
        const uint8_t *mp = (const uint8_t *)(uintptr_t)m;
        for (size_t i = 0; i < 64 * KiB + 7; i++)
            if (mp[i] != 0x3C) fail("managed memory: wrong byte");
    }
    CK(cuMemFree(m));
    printf("managed: ok\n");

    int pools = 0;
    CK(cuDeviceGetAttribute(&pools, CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, dev));
    if (pools) {
        CUstream s;
        CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
        CUdeviceptr a = 0;
        CK(cuMemAllocAsync(&a, 2 * MiB + 5, s));
        CK(cuMemsetD8Async(a, 0x77, 2 * MiB + 5, s));
        CK(cuMemcpyDtoHAsync(h1, a, 2 * MiB + 5, s));
        CK(cuMemFreeAsync(a, s));
        CK(cuStreamSynchronize(s));
        for (size_t i = 0; i < 2 * MiB + 5; i++)
            if (h1[i] != 0x77) fail("cuMemAllocAsync memory: wrong byte");
        CK(cuStreamDestroy(s));
        printf("async: ok\n");
    } else {
        printf("async: unsupported\n");
    }

    for (int k = 0; k < N; k++) CK(cuMemFree(d[k]));

    /* ---- double free: the driver answers CUDA_ERROR_INVALID_VALUE */
    CUdeviceptr x = 0;
    CK(cuMemAlloc(&x, 4 * KiB));
    CK(cuMemFree(x));
    CUresult r = cuMemFree(x);
    printf("double_free=%s\n", r == CUDA_SUCCESS ? "CUDA_SUCCESS" : err_name(r));
    if (r != CUDA_ERROR_INVALID_VALUE) failed = 1;
    /* the context must still work after that error */
    CK(cuMemAlloc(&x, 4 * KiB));
    CK(cuMemsetD8(x, 1, 4 * KiB));
    CK(cuCtxSynchronize());
    CK(cuMemFree(x));

    if (leak > 0) {
        unsigned long long total = 0;
        for (long i = 0; i < leak; i++) {
            size_t n = 1000 + (size_t)i * 4096;
            CUdeviceptr p;
            CK(cuMemAlloc(&p, n));
            CK(cuMemsetD8(p, 0, n));
            total += n;
        }
        CK(cuCtxSynchronize());
        printf("expected_leak_bytes=%llu expected_leak_allocs=%ld\n", total, leak);
    }
    /* The primary context is left retained: a leak run must reach exit with its allocations live. */
    free(h1);
    free(h2);
    if (failed) {
        printf("driver_check: FAIL\n");
        return 1;
    }
    printf("driver_check: OK\n");
    return 0;
}
