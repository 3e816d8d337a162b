// readback_bench: the seed's physics case on a real GPU. A simulation loop integrates 1M float4
// positions per step and the host reads every step's positions back and summarises them (bounding
// box, centroid, a checksum), as a renderer or a logger would. Three ways to read back:
//
//   A  cudaMemcpy into pageable memory, each step (the simple way: the host waits for the kernel
//      and the copy, then works while the GPU idles)
//   B  cudaMemcpy into pinned memory, each step (faster copy, still serial)
//   C  a gpumem readback channel: submit frame k, acquire frame k-1, summarise it while the GPU
//      runs step k and copies frame k
//
// It prints each mode's per-step median and mean (wall time of the host loop), the speedups C/A
// and C/B, and checks that mode C summarised exactly the frames mode A did (C sees frame k-1 at
// step k; the last frame comes from gpumem_channel_acquire_latest). Exit status 1 on a mismatch
// or any CUDA/gpumem error.
//
// Build (from the repository root, after the library build in build-gpu/):
//   nvcc -O2 -arch=sm_90 -o build-gpu/readback_bench tests/gpu/readback_bench.cu \
//        -I manager/include -L build-gpu/manager -lgpumem \
//        -Xlinker -rpath -Xlinker "$PWD/build-gpu/manager"
// Run: build-gpu/readback_bench [--steps N] [--warmup N] [--particles N] [--kernel-ms MS]
//                               [--substeps N] [--host-passes N]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "gpumem.h"

static void die_cuda(const char *what, cudaError_t e, int line)
{
    fprintf(stderr, "readback_bench: line %d: %s -> %s (%s)\n", line, what, cudaGetErrorName(e),
            cudaGetErrorString(e));
    exit(1);
}

static void die_gpumem(const char *what, gpumem_status s, int line)
{
    fprintf(stderr, "readback_bench: line %d: %s -> %d (%s)\n", line, what, s, gpumem_strerror(s));
    exit(1);
}

#define CK(call) \
    do { \
        cudaError_t ck_e_ = (call); \
        if (ck_e_ != cudaSuccess) die_cuda(#call, ck_e_, __LINE__); \
    } while (0)
#define GM(call) \
    do { \
        gpumem_status gm_s_ = (call); \
        if (gm_s_ != GPUMEM_OK) die_gpumem(#call, gm_s_, __LINE__); \
    } while (0)

// ------------------------------------------------------------------ the simulation

struct Config {
    int steps = 200;
    int warmup = 10;         // leading steps left out of the timings (still checked)
    int particles = 1 << 20;
    double kernel_ms = 3.0;  // the step kernel is calibrated to about this long
    int substeps = 0;        // 0: calibrate
    int host_passes = 1;     // how many times the host summarises each frame (more host work)
};

__device__ __host__ static inline float anchor_of(int i, int axis)
{
    return (float)((i * (7 + 2 * axis)) % 1024) * 0.01f - 5.0f;
}

__global__ void init_particles(float4 *pos, float4 *vel, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    pos[i] = make_float4(anchor_of(i, 0) + 1.0f, anchor_of(i, 1), anchor_of(i, 2) - 0.5f, 0.0f);
    vel[i] = make_float4(0.0f, 0.1f * (float)(i % 13), 0.0f, 0.0f);
}

// Damped springs towards per-particle anchors, integrated `substeps` times per step (symplectic
// Euler); w holds the speed. Deterministic: the same launches give bit-identical positions.
__global__ void integrate(float4 *pos, float4 *vel, int n, int substeps, float dt)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float4 p = pos[i], v = vel[i];
    const float ax = anchor_of(i, 0), ay = anchor_of(i, 1), az = anchor_of(i, 2);
    const float k = 4.0f + (float)(i & 7), c = 0.05f;
    for (int s = 0; s < substeps; s++) {
        v.x += (-k * (p.x - ax) - c * v.x) * dt;
        v.y += (-k * (p.y - ay) - c * v.y - 0.981f) * dt;
        v.z += (-k * (p.z - az) - c * v.z) * dt;
        p.x += v.x * dt;
        p.y += v.y * dt;
        p.z += v.z * dt;
    }
    p.w = sqrtf(v.x * v.x + v.y * v.y + v.z * v.z);
    pos[i] = p;
    vel[i] = v;
}

struct Sim {
    int n = 0, substeps = 1;
    size_t bytes = 0;
    float4 *pos = nullptr, *vel = nullptr;
    cudaStream_t stream = nullptr; // a blocking stream: cudaMemcpy (legacy stream) waits for it
    int blocks() const { return (n + 255) / 256; }
    void reset()
    {
        init_particles<<<blocks(), 256, 0, stream>>>(pos, vel, n);
        CK(cudaGetLastError());
        CK(cudaStreamSynchronize(stream));
    }
    void step()
    {
        integrate<<<blocks(), 256, 0, stream>>>(pos, vel, n, substeps, 1e-3f);
        CK(cudaGetLastError());
    }
};

// Milliseconds of one step kernel with `substeps`, the median of a few runs.
static double time_kernel(Sim &sim, int substeps)
{
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    sim.substeps = substeps;
    std::vector<float> ms;
    for (int r = 0; r < 5; r++) {
        CK(cudaEventRecord(a, sim.stream));
        sim.step();
        CK(cudaEventRecord(b, sim.stream));
        CK(cudaEventSynchronize(b));
        float t = 0;
        CK(cudaEventElapsedTime(&t, a, b));
        ms.push_back(t);
    }
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

static void calibrate(Sim &sim, const Config &cfg)
{
    if (cfg.substeps > 0) {
        sim.substeps = cfg.substeps;
        return;
    }
    time_kernel(sim, 64); // warm up (clocks, module load)
    double t = time_kernel(sim, 64);
    int s = (int)(64.0 * cfg.kernel_ms / (t > 1e-3 ? t : 1e-3));
    sim.substeps = s < 1 ? 1 : s;
}

// ------------------------------------------------------------------ the host's work

struct Summary {
    float lo[3], hi[3];
    double sum[3];
    uint64_t bits; // a checksum of every word
    bool operator==(const Summary &o) const
    {
        return memcmp(lo, o.lo, sizeof lo) == 0 && memcmp(hi, o.hi, sizeof hi) == 0 &&
               memcmp(sum, o.sum, sizeof sum) == 0 && bits == o.bits;
    }
};

// One running summary. Named members (no arrays indexed at run time) so the compiler keeps them
// in registers.
struct Acc {
    float lox = 3.4e38f, loy = 3.4e38f, loz = 3.4e38f;
    float hix = -3.4e38f, hiy = -3.4e38f, hiz = -3.4e38f;
    double sx = 0, sy = 0, sz = 0;
    uint64_t bits = 0;
    inline void add(const float4 &q)
    {
        lox = std::min(lox, q.x), loy = std::min(loy, q.y), loz = std::min(loz, q.z);
        hix = std::max(hix, q.x), hiy = std::max(hiy, q.y), hiz = std::max(hiz, q.z);
        sx += q.x, sy += q.y, sz += q.z;
        uint32_t w[4];
        memcpy(w, &q, sizeof w);
        bits += (uint64_t)w[0] + 3u * (uint64_t)w[1] + 5u * (uint64_t)w[2] + 7u * (uint64_t)w[3];
    }
};

// Two accumulators (even and odd particles), combined at the end: the same order every time, so
// the result is bit-exact across modes, with half the length of dependency chains.
static Summary summarise_once(const float4 *p, int n)
{
    Acc even, odd;
    int i = 0;
    for (; i + 1 < n; i += 2) {
        even.add(p[i]);
        odd.add(p[i + 1]);
    }
    if (i < n) even.add(p[i]);
    Summary s;
    s.lo[0] = std::min(even.lox, odd.lox), s.lo[1] = std::min(even.loy, odd.loy);
    s.lo[2] = std::min(even.loz, odd.loz);
    s.hi[0] = std::max(even.hix, odd.hix), s.hi[1] = std::max(even.hiy, odd.hiy);
    s.hi[2] = std::max(even.hiz, odd.hiz);
    s.sum[0] = even.sx + odd.sx, s.sum[1] = even.sy + odd.sy, s.sum[2] = even.sz + odd.sz;
    s.bits = even.bits + odd.bits;
    return s;
}

static Summary summarise(const void *data, size_t bytes, const Config &cfg)
{
    const float4 *p = static_cast<const float4 *>(data);
    int n = (int)(bytes / sizeof(float4));
    Summary s = summarise_once(p, n);
    for (int r = 1; r < cfg.host_passes; r++) {
        Summary again = summarise_once(p, n);
        if (!(again == s)) {
            fprintf(stderr, "readback_bench: the host's summary is not repeatable\n");
            exit(1);
        }
    }
    return s;
}

// ------------------------------------------------------------------ the three modes

using Clock = std::chrono::steady_clock;

static double ms_since(Clock::time_point t0)
{
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

struct Result {
    std::vector<double> step_ms; // steps after the warm-up
    std::vector<Summary> frames; // the summary of every frame, by frame number
    double total_ms = 0;         // the whole timed part, last frame's handling included
    std::vector<double> submit_us, acquire_us; // C: host time inside the two channel calls
};

// A and B: the step, a synchronous copy, the host's work; nothing overlaps.
static Result run_sync(Sim &sim, const Config &cfg, void *host)
{
    Result r;
    r.frames.resize(cfg.steps);
    sim.reset();
    Clock::time_point start;
    for (int k = 0; k < cfg.steps; k++) {
        if (k == cfg.warmup) start = Clock::now();
        Clock::time_point t0 = Clock::now();
        sim.step();
        CK(cudaMemcpy(host, sim.pos, sim.bytes, cudaMemcpyDeviceToHost));
        r.frames[k] = summarise(host, sim.bytes, cfg);
        if (k >= cfg.warmup) r.step_ms.push_back(ms_since(t0));
    }
    r.total_ms = ms_since(start);
    return r;
}

// C: step k runs and frame k is copied while the host summarises frame k-1.
static Result run_channel(Sim &sim, const Config &cfg)
{
    Result r;
    r.frames.resize(cfg.steps);
    sim.reset();
    gpumem_channel *ch = nullptr;
    GM(gpumem_channel_create(&ch, GPUMEM_CHANNEL_READBACK, sim.bytes));
    const void *data = nullptr;
    size_t bytes = 0;
    uint64_t frame = 0, submitted = 0;
    Clock::time_point start;
    for (int k = 0; k < cfg.steps; k++) {
        if (k == cfg.warmup) start = Clock::now();
        Clock::time_point t0 = Clock::now();
        sim.step();
        Clock::time_point t1 = Clock::now();
        GM(gpumem_channel_submit(ch, sim.pos, sim.bytes, sim.stream, &submitted));
        Clock::time_point t2 = Clock::now();
        if (submitted != (uint64_t)k) {
            fprintf(stderr, "readback_bench: submit numbered step %d as frame %llu\n", k,
                    (unsigned long long)submitted);
            exit(1);
        }
        gpumem_status st = gpumem_channel_acquire(ch, &data, &bytes, &frame);
        if (k >= cfg.warmup) {
            r.submit_us.push_back(1e3 * std::chrono::duration<double, std::milli>(t2 - t1).count());
            r.acquire_us.push_back(1e3 * ms_since(t2));
        }
        if (st == GPUMEM_OK) {
            r.frames[frame] = summarise(data, bytes, cfg);
        } else if (!(st == GPUMEM_ERROR_NOT_READY && k == 0)) {
            die_gpumem("gpumem_channel_acquire", st, __LINE__);
        }
        if (k >= cfg.warmup) r.step_ms.push_back(ms_since(t0));
    }
    GM(gpumem_channel_acquire_latest(ch, &data, &bytes, &frame));
    r.frames[frame] = summarise(data, bytes, cfg);
    r.total_ms = ms_since(start);
    GM(gpumem_channel_destroy(ch));
    return r;
}

// ------------------------------------------------------------------ report

static double median(std::vector<double> v)
{
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    size_t m = v.size() / 2;
    return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

static double mean(const std::vector<double> &v)
{
    double s = 0;
    for (double x : v) s += x;
    return v.empty() ? 0 : s / (double)v.size();
}

static void print_mode(const char *name, const Result &r, int timed_steps)
{
    printf("mode %-34s median_ms=%7.3f mean_ms=%7.3f per_step_incl_last_ms=%7.3f\n", name,
           median(r.step_ms), mean(r.step_ms), r.total_ms / timed_steps);
}

// Wall time of a few synchronous copies of one frame into `host`, and of the host's summary.
static double time_copy(Sim &sim, void *host)
{
    std::vector<double> ms;
    for (int r = 0; r < 7; r++) {
        Clock::time_point t0 = Clock::now();
        CK(cudaMemcpy(host, sim.pos, sim.bytes, cudaMemcpyDeviceToHost));
        ms.push_back(ms_since(t0));
    }
    return median(ms);
}

static double time_summary(const void *host, size_t bytes, const Config &cfg)
{
    std::vector<double> ms;
    for (int r = 0; r < 7; r++) {
        Clock::time_point t0 = Clock::now();
        volatile uint64_t sink = summarise(host, bytes, cfg).bits;
        (void)sink;
        ms.push_back(ms_since(t0));
    }
    return median(ms);
}

static int parse_args(int argc, char **argv, Config &cfg)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : nullptr;
        if (!v) {
            fprintf(stderr, "readback_bench: %s needs a value\n", a);
            return 1;
        }
        if (!strcmp(a, "--steps")) cfg.steps = atoi(v);
        else if (!strcmp(a, "--warmup")) cfg.warmup = atoi(v);
        else if (!strcmp(a, "--particles")) cfg.particles = atoi(v);
        else if (!strcmp(a, "--kernel-ms")) cfg.kernel_ms = atof(v);
        else if (!strcmp(a, "--substeps")) cfg.substeps = atoi(v);
        else if (!strcmp(a, "--host-passes")) cfg.host_passes = atoi(v);
        else {
            fprintf(stderr, "readback_bench: unknown option %s (--steps --warmup --particles "
                            "--kernel-ms --substeps --host-passes)\n", a);
            return 1;
        }
        i++;
    }
    if (cfg.steps < 2 || cfg.warmup < 0 || cfg.warmup >= cfg.steps || cfg.particles < 1 ||
        cfg.kernel_ms <= 0 || cfg.host_passes < 1) {
        fprintf(stderr, "readback_bench: need steps >= 2, 0 <= warmup < steps, particles >= 1, "
                        "kernel-ms > 0, host-passes >= 1\n");
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    Config cfg;
    if (parse_args(argc, argv, cfg)) return 2;
    cudaDeviceProp prop;
    CK(cudaSetDevice(0));
    CK(cudaGetDeviceProperties(&prop, 0));
    CK(cudaFree(0)); // the primary context exists and is current: the channel is created in it

    Sim sim;
    sim.n = cfg.particles;
    sim.bytes = (size_t)cfg.particles * sizeof(float4);
    CK(cudaMalloc(&sim.pos, sim.bytes));
    CK(cudaMalloc(&sim.vel, sim.bytes));
    CK(cudaStreamCreate(&sim.stream));
    sim.reset();
    calibrate(sim, cfg);
    double kernel_ms = time_kernel(sim, sim.substeps);

    void *pageable = malloc(sim.bytes);
    void *pinned = nullptr;
    if (!pageable) {
        fprintf(stderr, "readback_bench: out of host memory\n");
        return 1;
    }
    memset(pageable, 0, sim.bytes); // touch every page before timing
    CK(cudaMallocHost(&pinned, sim.bytes));
    double copy_pageable_ms = time_copy(sim, pageable);
    double copy_pinned_ms = time_copy(sim, pinned);
    double host_ms = time_summary(pinned, sim.bytes, cfg);

    int timed = cfg.steps - cfg.warmup;
    printf("readback_bench: device=\"%s\" gpumem=%s particles=%d bytes_per_frame=%zu steps=%d "
           "warmup=%d substeps=%d host_passes=%d\n", prop.name, gpumem_version(), cfg.particles,
           sim.bytes, cfg.steps, cfg.warmup, sim.substeps, cfg.host_passes);
    printf("parts: kernel_ms=%.3f copy_pageable_ms=%.3f copy_pinned_ms=%.3f host_summary_ms=%.3f\n",
           kernel_ms, copy_pageable_ms, copy_pinned_ms, host_ms);

    Result a = run_sync(sim, cfg, pageable);
    Result b = run_sync(sim, cfg, pinned);
    Result c = run_channel(sim, cfg);
    print_mode("A (cudaMemcpy, pageable)", a, timed);
    print_mode("B (cudaMemcpy, pinned)", b, timed);
    print_mode("C (gpumem channel, one frame behind)", c, timed);
    double ma = median(a.step_ms), mb = median(b.step_ms), mc = median(c.step_ms);
    printf("channel calls (median): submit_us=%.1f acquire_us=%.1f (acquire waits for frame k-1's "
           "copy when the host is ahead)\n", median(c.submit_us), median(c.acquire_us));
    printf("speedup (median per step): C/A=%.2fx C/B=%.2fx\n", ma / mc, mb / mc);
    printf("speedup (whole run):       C/A=%.2fx C/B=%.2fx\n", a.total_ms / c.total_ms,
           b.total_ms / c.total_ms);

    int mismatches = 0;
    for (int k = 0; k < cfg.steps; k++) {
        bool ab = a.frames[k] == b.frames[k], ac = a.frames[k] == c.frames[k];
        if (!ab || !ac) {
            if (mismatches < 5)
                fprintf(stderr, "readback_bench: frame %d differs (A=B: %d, A=C: %d)\n", k, ab, ac);
            mismatches++;
        }
    }
    printf("checksums: %d frames, B and C (C one frame behind) equal A: %s\n", cfg.steps,
           mismatches ? "NO" : "yes");
    printf("frame %d: bbox=[%.4f %.4f %.4f]..[%.4f %.4f %.4f] checksum=%016llx\n", cfg.steps - 1,
           a.frames.back().lo[0], a.frames.back().lo[1], a.frames.back().lo[2],
           a.frames.back().hi[0], a.frames.back().hi[1], a.frames.back().hi[2],
           (unsigned long long)a.frames.back().bits);

    CK(cudaFreeHost(pinned));
    free(pageable);
    CK(cudaStreamDestroy(sim.stream));
    CK(cudaFree(sim.pos));
    CK(cudaFree(sim.vel));
    return mismatches ? 1 : 0;
}
