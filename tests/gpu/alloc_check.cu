// alloc_check: a CUDA runtime-API program that exercises device memory the way ordinary programs
// do, so that it can be run with and without the gpumem shim (LD_PRELOAD) and the outputs compared.
//
// stdout is deterministic (no pointers, no timings) except for the lines of --barrier; the
// optional modes print their own key=value lines. Any unexpected CUDA error: message, exit 1.
//
//   alloc_check [--leak N] [--oom BYTES] [--barrier] [--probe]
//     --leak N     leave N allocations of 1000 + i*4096 bytes (i = 0..N-1) live at exit and print
//                  "expected_leak_bytes=<sum> expected_leak_allocs=<N>"
//     --oom BYTES  try one cudaMalloc of BYTES first, print "oom_result=<cudaGetErrorName>", go on
//     --barrier    a ~20 ms kernel on a non-blocking stream writes buffer A at its end while the host
//                  calls cudaFree(B); prints free_waited_ms=<x> and barrier_kept=<1|0> (whether A
//                  held the kernel's result as soon as cudaFree returned)
//     --probe      only the trace probe: one call of each kind between markers on stderr
//     --bad-copies only: copies and a memset into a freed buffer and past a buffer's end, printing
//                  the runtime's answer to each (under the shim: refused by gpumem's copy check)
//                  ("alloc_check: probe begin <name>" / "alloc_check: probe end <name>"), for
//                  GPUMEM_VERBOSE=3 runs; then "alloc_check: OK"
//
// Build: nvcc -O2 -arch=sm_90 -o alloc_check alloc_check.cu              (static cudart)
//        nvcc -O2 -arch=sm_90 -cudart shared -o alloc_check alloc_check.cu (shared cudart)
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

static void die(const char *what, cudaError_t e, int line)
{
    fflush(stdout);
    fprintf(stderr, "alloc_check: line %d: %s -> %s (%s)\n", line, what, cudaGetErrorName(e),
            cudaGetErrorString(e));
    printf("alloc_check: FAIL: line %d: %s -> %s\n", line, what, cudaGetErrorName(e));
    fflush(stdout);
    exit(1);
}

static void fail(const char *msg)
{
    fflush(stdout);
    fprintf(stderr, "alloc_check: %s\n", msg);
    printf("alloc_check: FAIL: %s\n", msg);
    fflush(stdout);
    exit(1);
}

#define CK(call)                                        \
    do {                                                \
        cudaError_t ck_e_ = (call);                     \
        if (ck_e_ != cudaSuccess) die(#call, ck_e_, __LINE__); \
    } while (0)
#define CK_LAUNCH() CK(cudaGetLastError())

static const size_t KiB = 1024, MiB = 1024 * 1024;

// ------------------------------------------------------------------ the byte pattern
__host__ __device__ static inline uint8_t pat(uint32_t seed, size_t i)
{
    uint32_t h = (uint32_t)i * 2654435761u ^ (seed * 0x9E3779B9u) ^ (uint32_t)(i >> 32);
    h ^= h >> 15;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    return (uint8_t)h;
}

__global__ void fill_kernel(uint8_t *p, size_t n, uint32_t seed)
{
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) p[i] = pat(seed, i);
}

// Adds the number of bytes that differ from the pattern (or from `value` when seed == 0) to *bad.
__global__ void verify_kernel(const uint8_t *p, size_t n, uint32_t seed, int value,
                              unsigned long long *bad)
{
    size_t stride = (size_t)gridDim.x * blockDim.x;
    unsigned long long local = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        uint8_t want = seed ? pat(seed, i) : (uint8_t)value;
        if (p[i] != want) local++;
    }
    if (local) atomicAdd(bad, local);
}

__global__ void inc_kernel(uint8_t *p, size_t n)
{
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) p[i] = (uint8_t)(p[i] + 1);
}

__device__ static inline unsigned long long globaltimer_ns()
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__global__ void spin_then_write(int *a, unsigned long long ns, int value)
{
    unsigned long long t0 = globaltimer_ns();
    while (globaltimer_ns() - t0 < ns) {
    }
    *a = value;
    __threadfence_system();
}

static unsigned grid_for(size_t n)
{
    size_t blocks = (n + 255) / 256;
    if (blocks < 1) blocks = 1;
    if (blocks > 1024) blocks = 1024;
    return (unsigned)blocks;
}

static void fill(void *p, size_t n, uint32_t seed, cudaStream_t s)
{
    fill_kernel<<<grid_for(n), 256, 0, s>>>((uint8_t *)p, n, seed);
    CK_LAUNCH();
}

static void verify_dev(const void *p, size_t n, uint32_t seed, int value, unsigned long long *bad,
                       cudaStream_t s)
{
    verify_kernel<<<grid_for(n), 256, 0, s>>>((const uint8_t *)p, n, seed, value, bad);
    CK_LAUNCH();
}

// Host check of the pattern; returns the FNV-1a 64 of the bytes, or exits on a mismatch.
static uint64_t check_host(const uint8_t *h, size_t n, uint32_t seed, int add, const char *what)
{
    uint64_t f = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        uint8_t want = (uint8_t)(pat(seed, i) + add);
        if (h[i] != want) {
            char msg[256];
            snprintf(msg, sizeof msg, "%s: size %zu byte %zu is 0x%02x, expected 0x%02x", what, n, i,
                     h[i], want);
            fail(msg);
        }
        f = (f ^ h[i]) * 1099511628211ull;
    }
    return f;
}

static double now_ms()
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static bool overlaps(uintptr_t a, size_t an, uintptr_t b, size_t bn)
{
    if (an == 0 || bn == 0) return false;
    return a < b + bn && b < a + an;
}

static unsigned long long read_counter(unsigned long long *d_bad)
{
    unsigned long long v = 0;
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(&v, d_bad, sizeof v, cudaMemcpyDeviceToHost));
    CK(cudaMemset(d_bad, 0, sizeof v));
    CK(cudaDeviceSynchronize()); // kernels on non-blocking streams must not race the reset
    return v;
}

// ------------------------------------------------------------------ 1. sizes, copies, checksums
static void sizes_phase(cudaStream_t stream, unsigned long long *d_bad)
{
    static const size_t sizes[] = {1, 511, 512, 4 * KiB, MiB, MiB + 1, 5 * MiB, 64 * MiB, 300 * MiB};
    const int n = (int)(sizeof sizes / sizeof sizes[0]);
    const size_t max = 300 * MiB;
    void *d[sizeof sizes / sizeof sizes[0]];

    uint8_t *pageable = (uint8_t *)malloc(max);
    if (!pageable) fail("malloc of the pageable host buffer failed");
    uint8_t *pinned = NULL;
    CK(cudaMallocHost((void **)&pinned, max));

    for (int k = 0; k < n; k++) CK(cudaMalloc(&d[k], sizes[k]));
    for (int a = 0; a < n; a++)
        for (int b = a + 1; b < n; b++)
            if (overlaps((uintptr_t)d[a], sizes[a], (uintptr_t)d[b], sizes[b]))
                fail("two live buffers of the sizes phase overlap");

    for (int k = 0; k < n; k++) {
        size_t sz = sizes[k];
        uint32_t seed = 1000u + (uint32_t)k;

        // kernel fill, then D2H: synchronous pageable, async pinned, async pageable
        fill(d[k], sz, seed, 0);
        memset(pageable, 0, sz);
        CK(cudaMemcpy(pageable, d[k], sz, cudaMemcpyDeviceToHost));
        uint64_t c1 = check_host(pageable, sz, seed, 0, "cudaMemcpy D2H pageable");
        memset(pinned, 0, sz);
        CK(cudaMemcpyAsync(pinned, d[k], sz, cudaMemcpyDeviceToHost, stream));
        CK(cudaStreamSynchronize(stream));
        if (memcmp(pinned, pageable, sz)) fail("cudaMemcpyAsync D2H to pinned memory: wrong bytes");
        memset(pageable, 0, sz);
        CK(cudaMemcpyAsync(pageable, d[k], sz, cudaMemcpyDeviceToHost, stream));
        CK(cudaStreamSynchronize(stream));
        if (memcmp(pinned, pageable, sz)) fail("cudaMemcpyAsync D2H to pageable memory: wrong bytes");

        // H2D: async from pinned, synchronous from pageable, async from pageable; each checked
        // on the device, with a memset in between so that a copy that did nothing shows
        uint32_t hseed = seed + 100;
        for (size_t i = 0; i < sz; i++) pinned[i] = pat(hseed, i);
        memcpy(pageable, pinned, sz);
        CK(cudaMemset(d[k], 0, sz));
        CK(cudaMemcpyAsync(d[k], pinned, sz, cudaMemcpyHostToDevice, stream));
        verify_dev(d[k], sz, hseed, 0, d_bad, stream);
        CK(cudaStreamSynchronize(stream));
        CK(cudaMemset(d[k], 0, sz));
        CK(cudaMemcpy(d[k], pageable, sz, cudaMemcpyHostToDevice));
        verify_dev(d[k], sz, hseed, 0, d_bad, 0);
        CK(cudaMemset(d[k], 0, sz));
        CK(cudaMemcpyAsync(d[k], pageable, sz, cudaMemcpyHostToDevice, stream));
        verify_dev(d[k], sz, hseed, 0, d_bad, stream);
        CK(cudaStreamSynchronize(stream));

        // memset, then the final state of this buffer: the fill pattern again
        CK(cudaMemset(d[k], 0x5A, sz));
        verify_dev(d[k], sz, 0, 0x5A, d_bad, 0);
        fill(d[k], sz, seed, 0);
        unsigned long long bad = read_counter(d_bad);
        if (bad) {
            char msg[128];
            snprintf(msg, sizeof msg, "size %zu: %llu bytes wrong after H2D copies/memset", sz, bad);
            fail(msg);
        }
        printf("size=%zu checksum=%016llx\n", sz, (unsigned long long)c1);
    }

    // Every buffer must still hold its own pattern after the work done on all the others.
    for (int k = 0; k < n; k++) verify_dev(d[k], sizes[k], 1000u + (uint32_t)k, 0, d_bad, 0);
    unsigned long long bad = read_counter(d_bad);
    printf("sizes: buffers=%d disturbed_bytes=%llu\n", n, bad);
    if (bad) fail("a buffer of the sizes phase was disturbed by work on another");

    for (int k = 0; k < n; k++) CK(cudaFree(d[k]));
    CK(cudaFreeHost(pinned));
    free(pageable);
}

// ------------------------------------------------------------------ 2. free/re-allocate churn
static uint64_t rng_state = 0x2545F4914F6CDD1Dull;
static uint64_t rng()
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void churn_phase(cudaStream_t s1, cudaStream_t s2, unsigned long long *d_bad)
{
    enum { SLOTS = 32, ITER = 1000 };
    static const size_t sizes[] = {1,       100,     511,     512,         513,     4 * KiB,
                                   64 * KiB, MiB - 1, MiB,     MiB + 1,     3 * MiB, 8 * MiB};
    const int nsizes = (int)(sizeof sizes / sizeof sizes[0]);
    struct slot {
        void *p;
        size_t n;
        uint32_t seed;
        cudaStream_t s;
    } slots[SLOTS];
    memset(slots, 0, sizeof slots);
    cudaStream_t streams[3] = {0, s1, s2};
    unsigned allocs = 0, frees = 0, overlaps_seen = 0;
    unsigned long long bytes_allocated = 0;

    for (int it = 0; it < ITER; it++) {
        int k = (int)(rng() % SLOTS);
        if (slots[k].p) {
            // Check its content on its own stream, then free it without waiting: cudaFree's
            // semantics must keep that kernel and the next user of the memory apart.
            verify_dev(slots[k].p, slots[k].n, slots[k].seed, 0, d_bad, slots[k].s);
            CK(cudaFree(slots[k].p));
            slots[k].p = NULL;
            frees++;
        }
        size_t n = sizes[rng() % nsizes];
        void *p = NULL;
        CK(cudaMalloc(&p, n));
        allocs++;
        bytes_allocated += n;
        for (int j = 0; j < SLOTS; j++)
            if (slots[j].p && overlaps((uintptr_t)p, n, (uintptr_t)slots[j].p, slots[j].n)) {
                overlaps_seen++;
                fprintf(stderr, "alloc_check: churn iteration %d: new %zu B block overlaps slot %d (%zu B)\n",
                        it, n, j, slots[j].n);
            }
        slots[k].p = p;
        slots[k].n = n;
        slots[k].seed = 5000u + (uint32_t)it;
        slots[k].s = streams[it % 3];
        fill(p, n, slots[k].seed, slots[k].s);
    }
    for (int k = 0; k < SLOTS; k++)
        if (slots[k].p) verify_dev(slots[k].p, slots[k].n, slots[k].seed, 0, d_bad, slots[k].s);
    unsigned long long bad = read_counter(d_bad);
    for (int k = 0; k < SLOTS; k++)
        if (slots[k].p) {
            CK(cudaFree(slots[k].p));
            frees++;
        }
    printf("churn: iterations=%d allocs=%u frees=%u bytes=%llu overlaps=%u disturbed_bytes=%llu\n", ITER,
           allocs, frees, bytes_allocated, overlaps_seen, bad);
    if (overlaps_seen) fail("live buffers overlapped during the churn");
    if (bad) fail("buffer contents were disturbed during the churn");
}

// ------------------------------------------------------------------ 3. stream-ordered allocator
static void async_phase(cudaStream_t stream)
{
    int dev = 0, supported = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, dev));
    if (!supported) {
        printf("async: unsupported\n");
        return;
    }
    static const size_t sizes[] = {4 * KiB, MiB + 1, 16 * MiB};
    uint8_t *h = NULL;
    CK(cudaMallocHost((void **)&h, 16 * MiB));
    for (int k = 0; k < 3; k++) {
        size_t sz = sizes[k];
        uint32_t seed = 7000u + (uint32_t)k;
        void *p = NULL, *q = NULL;
        CK(cudaMallocAsync(&p, sz, stream));
        fill(p, sz, seed, stream);
        CK(cudaMallocAsync(&q, sz, stream));
        CK(cudaMemcpyAsync(q, p, sz, cudaMemcpyDeviceToDevice, stream));
        CK(cudaFreeAsync(p, stream));
        memset(h, 0, sz);
        CK(cudaMemcpyAsync(h, q, sz, cudaMemcpyDeviceToHost, stream));
        CK(cudaFreeAsync(q, stream));
        CK(cudaStreamSynchronize(stream));
        uint64_t c = check_host(h, sz, seed, 0, "cudaMallocAsync buffer");
        printf("async size=%zu checksum=%016llx\n", sz, (unsigned long long)c);
    }
    CK(cudaFreeHost(h));
}

// ------------------------------------------------------------------ 4. managed memory
static void managed_phase()
{
    const size_t sz = 4 * MiB + 3;
    const uint32_t seed = 9000u;
    uint8_t *m = NULL;
    CK(cudaMallocManaged((void **)&m, sz, cudaMemAttachGlobal));
    for (size_t i = 0; i < sz; i++) m[i] = pat(seed, i);
    inc_kernel<<<grid_for(sz), 256>>>(m, sz);
    CK_LAUNCH();
    CK(cudaDeviceSynchronize());
    uint64_t c = check_host(m, sz, seed, 1, "cudaMallocManaged buffer");
    printf("managed size=%zu checksum=%016llx\n", sz, (unsigned long long)c);
    CK(cudaFree(m));
}

// ------------------------------------------------------------------ --barrier
static void barrier_phase()
{
    const int value = 0x600DF00D;
    cudaStream_t ks, cs;
    CK(cudaStreamCreateWithFlags(&ks, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
    int *a = NULL, *h = NULL;
    void *b = NULL;
    CK(cudaMalloc((void **)&a, 4096));
    CK(cudaMalloc(&b, MiB));
    CK(cudaMallocHost((void **)&h, sizeof(int)));
    // Warm-up: the kernel's module is loaded now, not inside the timed part.
    spin_then_write<<<1, 1, 0, ks>>>(a, 0, 1);
    CK_LAUNCH();
    CK(cudaStreamSynchronize(ks));
    CK(cudaMemset(a, 0, 4096));
    CK(cudaDeviceSynchronize());

    spin_then_write<<<1, 1, 0, ks>>>(a, 20ull * 1000 * 1000, value);
    CK_LAUNCH();
    double t0 = now_ms();
    CK(cudaFree(b));
    double waited = now_ms() - t0;
    cudaError_t q = cudaStreamQuery(ks);
    if (q != cudaSuccess && q != cudaErrorNotReady) die("cudaStreamQuery(ks)", q, __LINE__);
    (void)cudaGetLastError(); // cudaErrorNotReady is an answer, not an error to carry on
    // Read A on another non-blocking stream: this copy does not wait for the spinning kernel, so
    // it sees the kernel's value only if cudaFree already waited for it.
    *h = 0;
    CK(cudaMemcpyAsync(h, a, sizeof(int), cudaMemcpyDeviceToHost, cs));
    CK(cudaStreamSynchronize(cs));
    int kept = (*h == value);
    CK(cudaStreamSynchronize(ks));
    CK(cudaMemcpy(h, a, sizeof(int), cudaMemcpyDeviceToHost));
    if (*h != value) fail("the barrier kernel never wrote its value");
    printf("free_waited_ms=%.1f\n", waited);
    printf("barrier_stream_idle=%d\n", q == cudaSuccess);
    printf("barrier_kept=%d\n", kept);
    CK(cudaFree(a));
    CK(cudaFreeHost(h));
    CK(cudaStreamDestroy(ks));
    CK(cudaStreamDestroy(cs));
}

// ------------------------------------------------------------------ --probe
static void marker(const char *what, const char *name)
{
    fflush(stdout);
    fprintf(stderr, "alloc_check: probe %s %s\n", what, name);
    fflush(stderr);
}

static void probe()
{
    const size_t sz = MiB;
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    uint8_t *pinned = NULL;
    CK(cudaMallocHost((void **)&pinned, sz));
    uint8_t *pageable = (uint8_t *)calloc(1, sz);
    if (!pageable) fail("calloc failed");
    size_t fr = 0, tot = 0;
    // Warm-up: one of each outside the markers, so that lazy initialisation stays out of them.
    void *d = NULL, *m = NULL, *a = NULL;
    CK(cudaMalloc(&d, sz));
    CK(cudaMemcpy(d, pageable, sz, cudaMemcpyHostToDevice));
    CK(cudaMemcpyAsync(pinned, d, sz, cudaMemcpyDeviceToHost, s));
    CK(cudaStreamSynchronize(s));
    CK(cudaMemset(d, 0, sz));
    CK(cudaFree(d));
    CK(cudaMallocAsync(&a, sz, s));
    CK(cudaFreeAsync(a, s));
    CK(cudaStreamSynchronize(s));
    CK(cudaMemGetInfo(&fr, &tot));
    CK(cudaDeviceSynchronize());

    marker("begin", "cudaMalloc");
    CK(cudaMalloc(&d, sz));
    marker("end", "cudaMalloc");
    marker("begin", "cudaMemcpy");
    CK(cudaMemcpy(d, pageable, sz, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(pageable, d, sz, cudaMemcpyDeviceToHost));
    marker("end", "cudaMemcpy");
    marker("begin", "cudaMemcpyAsync");
    CK(cudaMemcpyAsync(d, pinned, sz, cudaMemcpyHostToDevice, s));
    CK(cudaMemcpyAsync(pinned, d, sz, cudaMemcpyDeviceToHost, s));
    marker("end", "cudaMemcpyAsync");
    CK(cudaStreamSynchronize(s));
    marker("begin", "cudaMemset");
    CK(cudaMemset(d, 0, sz));
    marker("end", "cudaMemset");
    marker("begin", "cudaFree");
    CK(cudaFree(d));
    marker("end", "cudaFree");
    marker("begin", "cudaMallocAsync");
    CK(cudaMallocAsync(&a, sz, s));
    marker("end", "cudaMallocAsync");
    marker("begin", "cudaFreeAsync");
    CK(cudaFreeAsync(a, s));
    marker("end", "cudaFreeAsync");
    CK(cudaStreamSynchronize(s));
    marker("begin", "cudaMallocManaged");
    CK(cudaMallocManaged(&m, sz, cudaMemAttachGlobal));
    marker("end", "cudaMallocManaged");
    marker("begin", "cudaFree(managed)");
    CK(cudaFree(m));
    marker("end", "cudaFree(managed)");
    marker("begin", "cudaMemGetInfo");
    CK(cudaMemGetInfo(&fr, &tot));
    marker("end", "cudaMemGetInfo");
    marker("begin", "cudaDeviceSynchronize");
    CK(cudaDeviceSynchronize());
    marker("end", "cudaDeviceSynchronize");

    CK(cudaFreeHost(pinned));
    free(pageable);
    CK(cudaStreamDestroy(s));
    printf("probe: done\n");
}

// ------------------------------------------------------------------ --bad-copies
// Bugs a pool would hide from the driver: B sits right after A in the same pool segment, so
// without gpumem's check both copies would land in valid device memory.
static void bad_copies_phase()
{
    static unsigned char host[8192];
    void *a = NULL, *b = NULL;
    cudaStream_t s;
    CK(cudaStreamCreate(&s));
    CK(cudaMalloc(&a, 4096));
    CK(cudaMalloc(&b, 4096));
    CK(cudaFree(a));
    cudaError_t e = cudaMemcpy(a, host, 2048, cudaMemcpyHostToDevice);
    printf("freed_copy=%s\n", cudaGetErrorName(e));
    (void)cudaGetLastError();
    e = cudaMemcpyAsync(b, host, 8192, cudaMemcpyHostToDevice, s);
    printf("past_end_copy=%s\n", cudaGetErrorName(e));
    (void)cudaGetLastError();
    e = cudaMemcpy(host, (char *)b + 1024, 4096, cudaMemcpyDeviceToHost);
    printf("past_end_readback=%s\n", cudaGetErrorName(e));
    (void)cudaGetLastError();
    e = cudaMemcpy(b, host, 4096, cudaMemcpyHostToDevice);
    printf("good_copy=%s\n", cudaGetErrorName(e));
    CK(cudaStreamSynchronize(s));
    CK(cudaStreamDestroy(s));
    CK(cudaFree(b));
}

// ------------------------------------------------------------------ main
static void usage()
{
    fprintf(stderr, "usage: alloc_check [--leak N] [--oom BYTES] [--barrier] [--probe] [--bad-copies]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    long leak = 0;
    unsigned long long oom = 0;
    bool do_oom = false, do_barrier = false, do_probe = false, do_bad = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--leak") && i + 1 < argc) {
            char *end;
            leak = strtol(argv[++i], &end, 10);
            if (*end || leak < 0 || leak > 100000) usage();
        } else if (!strcmp(argv[i], "--oom") && i + 1 < argc) {
            char *end;
            oom = strtoull(argv[++i], &end, 10);
            if (*end) usage();
            do_oom = true;
        } else if (!strcmp(argv[i], "--barrier")) {
            do_barrier = true;
        } else if (!strcmp(argv[i], "--probe")) {
            do_probe = true;
        } else if (!strcmp(argv[i], "--bad-copies")) {
            do_bad = true;
        } else {
            usage();
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);

    int ndev = 0;
    CK(cudaGetDeviceCount(&ndev));
    CK(cudaSetDevice(0));
    CK(cudaFree(0)); // create the context

    if (do_probe) {
        probe();
        printf("alloc_check: OK\n");
        return 0;
    }
    if (do_bad) {
        bad_copies_phase();
        printf("alloc_check: OK\n");
        return 0;
    }

    if (do_oom) {
        void *p = NULL;
        cudaError_t e = cudaMalloc(&p, (size_t)oom);
        printf("oom_result=%s\n", cudaGetErrorName(e));
        if (e == cudaSuccess) {
            CK(cudaFree(p));
        } else {
            (void)cudaGetLastError(); // clear the runtime's sticky-until-read last error
            if (e != cudaErrorMemoryAllocation) die("cudaMalloc(--oom)", e, __LINE__);
        }
    }

    unsigned long long *d_bad = NULL;
    CK(cudaMalloc((void **)&d_bad, sizeof *d_bad));
    CK(cudaMemset(d_bad, 0, sizeof *d_bad));
    cudaStream_t stream, s1, s2;
    CK(cudaStreamCreate(&stream));
    CK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));

    sizes_phase(stream, d_bad);
    churn_phase(s1, s2, d_bad);
    async_phase(stream);
    managed_phase();
    if (do_barrier) barrier_phase();

    CK(cudaStreamDestroy(stream));
    CK(cudaStreamDestroy(s1));
    CK(cudaStreamDestroy(s2));
    CK(cudaFree(d_bad));
    CK(cudaDeviceSynchronize());

    if (leak > 0) {
        unsigned long long total = 0;
        for (long i = 0; i < leak; i++) {
            size_t n = 1000 + (size_t)i * 4096;
            void *p = NULL;
            CK(cudaMalloc(&p, n));
            CK(cudaMemset(p, 0, n));
            total += n;
        }
        CK(cudaDeviceSynchronize());
        printf("expected_leak_bytes=%llu expected_leak_allocs=%ld\n", total, leak);
    }
    printf("alloc_check: OK\n");
    return 0;
}
