/* gpumem demo: what a user sees when an unmodified CUDA program runs under the shim.
 *
 * It finds the driver the way cudart does (dlopen libcuda.so.1, cuGetProcAddress_v2, entry points
 * by name), so it runs unchanged on a real GPU and on the fake driver of the test suite. It
 * allocates and frees in a loop (pooled: watch the hit rate), round-trips data, asks for more than
 * GPUMEM_LIMIT (an out-of-memory error, not a crash), copies into a buffer it already freed and
 * past the end of another (refused, where the driver would have let both corrupt pool memory), and
 * "forgets" two buffers, which the exit report lists. Run it with scripts/demo.sh. */
#include <cuda.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpumem.h"

static CUresult (*get_proc)(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *);

static void *entry(const char *name)
{
    void *fn = NULL;
    CUdriverProcAddressQueryResult status;
    if (get_proc(name, &fn, 13000, 0, &status) != CUDA_SUCCESS || !fn) {
        fprintf(stderr, "demo: the driver has no %s\n", name);
        exit(1);
    }
    return fn;
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static struct {
    CUresult (*init)(unsigned);
    CUresult (*device_get)(CUdevice *, int);
    CUresult (*device_name)(char *, int, CUdevice);
    CUresult (*retain)(CUcontext *, CUdevice);
    CUresult (*set_current)(CUcontext);
    CUresult (*alloc)(CUdeviceptr *, size_t);
    CUresult (*free_)(CUdeviceptr);
    CUresult (*htod)(CUdeviceptr, const void *, size_t);
    CUresult (*dtoh)(void *, CUdeviceptr, size_t);
    CUresult (*mem_info)(size_t *, size_t *);
    CUresult (*error_name)(CUresult, const char **);
} cu;

static const char *err(CUresult rc)
{
    const char *name = "?";
    cu.error_name(rc, &name);
    return name;
}

#define CHECK(call) \
    do { \
        CUresult rc_ = (call); \
        if (rc_ != CUDA_SUCCESS) { \
            fprintf(stderr, "demo: %s failed: %s\n", #call, err(rc_)); \
            return 1; \
        } \
    } while (0)

static int bind_driver(void)
{
    void *h = dlopen("libcuda.so.1", RTLD_NOW);
    if (!h) {
        fprintf(stderr, "demo: cannot load libcuda.so.1: %s\n", dlerror());
        return 1;
    }
    *(void **)&get_proc = dlsym(h, "cuGetProcAddress_v2");
    if (!get_proc) return 1;
    *(void **)&cu.init = entry("cuInit");
    *(void **)&cu.device_get = entry("cuDeviceGet");
    *(void **)&cu.device_name = entry("cuDeviceGetName");
    *(void **)&cu.retain = entry("cuDevicePrimaryCtxRetain");
    *(void **)&cu.set_current = entry("cuCtxSetCurrent");
    *(void **)&cu.alloc = entry("cuMemAlloc");
    *(void **)&cu.free_ = entry("cuMemFree");
    *(void **)&cu.htod = entry("cuMemcpyHtoD");
    *(void **)&cu.dtoh = entry("cuMemcpyDtoH");
    *(void **)&cu.mem_info = entry("cuMemGetInfo");
    *(void **)&cu.error_name = entry("cuGetErrorName");
    return 0;
}

static int churn(void)
{
    static const size_t sizes[] = {256, 4096, 65536, 1 << 20, 8 << 20};
    enum { ROUNDS = 2000 };
    double t0 = now_us();
    for (int i = 0; i < ROUNDS; i++) {
        CUdeviceptr p;
        CHECK(cu.alloc(&p, sizes[i % 5]));
        CHECK(cu.free_(p));
    }
    printf("  %d cuMemAlloc+cuMemFree pairs: %.2f us per pair\n", ROUNDS, (now_us() - t0) / ROUNDS);
    return 0;
}

static int round_trip(void)
{
    enum { N = 1 << 20 };
    unsigned char *in = malloc(N), *out = malloc(N);
    for (int i = 0; i < N; i++) in[i] = (unsigned char)(i * 7);
    CUdeviceptr d;
    CHECK(cu.alloc(&d, N));
    CHECK(cu.htod(d, in, N));
    CHECK(cu.dtoh(out, d, N));
    printf("  1 MiB round trip through device memory: %s\n", memcmp(in, out, N) ? "MISMATCH" : "identical");
    CHECK(cu.free_(d));
    free(in);
    free(out);
    return 0;
}

/* Bugs a pool would hide: the driver sees one big segment, so it accepts both copies. */
static int bad_copies(void)
{
    static unsigned char data[8192];
    CUdeviceptr a, b;
    CHECK(cu.alloc(&a, 4096));
    CHECK(cu.alloc(&b, 4096));
    CHECK(cu.free_(a));
    CUresult rc = cu.htod(a, data, sizeof data / 2);
    printf("  cuMemcpyHtoD into the freed buffer -> %s\n", err(rc));
    rc = cu.htod(b, data, sizeof data);
    printf("  cuMemcpyHtoD of 8192 bytes into a 4096-byte buffer -> %s\n", err(rc));
    CHECK(cu.free_(b));
    return 0;
}

static void print_stats(void)
{
    gpumem_status (*get_stats)(int, gpumem_stats *);
    *(void **)&get_stats = dlsym(RTLD_DEFAULT, "gpumem_get_stats");
    gpumem_stats st;
    if (!get_stats || get_stats(0, &st) != GPUMEM_OK) {
        printf("  (not running under the gpumem shim: no pool statistics)\n");
        return;
    }
    printf("  pool: %llu allocations, %llu hits, %llu misses, %llu segment(s), peak reserved %.1f MiB\n",
           (unsigned long long)st.allocations, (unsigned long long)st.pool_hits,
           (unsigned long long)st.pool_misses, (unsigned long long)st.segments,
           (double)st.bytes_reserved_peak / 1048576.0);
}

int main(void)
{
    if (bind_driver()) return 1;
    CUdevice dev;
    CUcontext ctx;
    char name[128];
    CHECK(cu.init(0));
    CHECK(cu.device_get(&dev, 0));
    CHECK(cu.device_name(name, sizeof name, dev));
    CHECK(cu.retain(&ctx, dev));
    CHECK(cu.set_current(ctx));
    size_t free_b, total_b;
    CHECK(cu.mem_info(&free_b, &total_b));
    printf("gpumem demo on %s: cuMemGetInfo says %.0f MiB total, %.0f MiB free\n", name,
           (double)total_b / 1048576.0, (double)free_b / 1048576.0);

    printf("1. pooled allocations\n");
    if (churn() || round_trip()) return 1;
    print_stats();

    printf("2. asking for more than the limit\n");
    CUdeviceptr big;
    CUresult rc = cu.alloc(&big, total_b + ((size_t)64 << 20));
    printf("  cuMemAlloc(%.0f MiB) -> %s%s\n", (double)(total_b + ((size_t)64 << 20)) / 1048576.0, err(rc),
           rc == CUDA_ERROR_OUT_OF_MEMORY ? " (as the driver would say; the program carries on)" : "");
    if (rc == CUDA_SUCCESS) cu.free_(big);

    printf("3. copies into freed memory and past the end (refused, each with a line on stderr)\n");
    fflush(stdout);
    if (bad_copies()) return 1;

    printf("4. two buffers the program forgets to free (see the report below)\n");
    CUdeviceptr forgotten[2];
    CHECK(cu.alloc(&forgotten[0], 3000));
    CHECK(cu.alloc(&forgotten[1], 5 << 20));
    printf("demo: done\n");
    fflush(stdout);
    return 0;
}
