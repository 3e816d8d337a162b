/* gpumem-bench expandable: classic segments against expandable ones (GPUMEM_EXPANDABLE), in one
 * run. Each figure comes from a worker process (this program re-executed with the setting), so
 * both modes start from a fresh manager. Library mode: the engine linked in, no shim; on the
 * CUDA backend when libcuda.so.1 loads and has a device (a GPU, or the fake driver through
 * LD_LIBRARY_PATH), else on the host backend (`--host` forces it; its VMM emulation maps with
 * mprotect).
 *
 *   churn   the same live bytes (256 MiB) in ever fewer, larger blocks: 2 MiB blocks, then 4, 8,
 *           ... 128 MiB, each step freeing the previous step's blocks, with a small long-lived
 *           block (256 KiB, kept to the end) after every fourth large one. Peak reserved over
 *           peak allocated; goal with expandable segments <= 1.10.
 *   pair    a pool hit: alloc+free of 64 KiB and of 4 MiB, host backend, rounds alternating
 *           between the modes; median of the rounds' medians, with their range.
 *   grow    what one mapped chunk costs: a 64 MiB block in a fresh range (32 chunks of 2 MiB),
 *           released and grown again; against one classic 64 MiB segment.
 *   buffer  a named buffer of 256 MiB, full, reserved to 512 MiB: classic segments move it (a new
 *           block and a 256 MiB copy); expandable ones map behind it (same pointer, no copy).
 *           Median of 5 (each from a fresh buffer, the cached memory handed back first).
 *   lookup  the lookup's last resort (a checked copy into freed memory far from any live block):
 *           8192 live 64 KiB blocks, 128 in the middle freed, gm_lookup of a pointer in the middle
 *           of that hole; a classic 2 MiB small segment holds 32 blocks, a range all of them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"
#include "gm_api.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)

typedef int (*drv_init_fn)(unsigned);
typedef int (*drv_device_get_fn)(int *, int);
typedef int (*drv_retain_fn)(void **, int);
typedef int (*drv_set_current_fn)(void *);

static const char *backend_name = "host";

static bool start_cuda(void)
{
    const gm_backend *be = gm_cuda_backend();
    drv_init_fn init = (drv_init_fn)gm_driver_sym("cuInit");
    drv_device_get_fn device_get = (drv_device_get_fn)gm_driver_sym("cuDeviceGet");
    drv_retain_fn retain = (drv_retain_fn)gm_driver_sym("cuDevicePrimaryCtxRetain");
    drv_set_current_fn set_current = (drv_set_current_fn)gm_driver_sym("cuCtxSetCurrent");
    int dev = 0;
    void *ctx = NULL;
    if (!be || !init || !device_get || !retain || !set_current) return false;
    if (init(0) || device_get(&dev, 0) || retain(&ctx, dev) || set_current(ctx)) return false;
    backend_name = "cuda";
    return gm_manager_init(be);
}

static gm_heap *start(bool host)
{
    if (host || !start_cuda()) {
        gm_manager_init(gm_host_backend());
        gm_host_backend_configure(0, -1);
    }
    uintptr_t ctx;
    int device;
    if (gm_mgr.backend->current(&ctx, &device) != GPUMEM_OK) return NULL;
    return gm_heap_get(ctx, device);
}

static uintptr_t must_alloc(gm_heap *heap, size_t n)
{
    uintptr_t p = 0;
    if (gm_alloc(heap, n, 0, 0, &p) != GPUMEM_OK) {
        fprintf(stderr, "gpumem-bench: allocation of %zu bytes failed\n", n);
        exit(1);
    }
    return p;
}

static void must_free(gm_heap *heap, uintptr_t p) { gm_free(heap, p, GM_FREE_BARRIER, NULL); }

/* ------------------------------------------------------------------ workers */

static int worker_churn(gm_heap *heap)
{
    const size_t live = 256 * MiB;
    uintptr_t *big = calloc(live / (2 * MiB), sizeof *big), *small = calloc(1024, sizeof *small);
    size_t nsmall = 0, nbig = 0;
    for (size_t block = 2 * MiB; block <= 128 * MiB; block *= 2) {
        for (size_t i = 0; i < nbig; i++) must_free(heap, big[i]);
        nbig = live / block;
        for (size_t i = 0; i < nbig; i++) {
            big[i] = must_alloc(heap, block);
            if (i % 4 == 3) small[nsmall++] = must_alloc(heap, 256 * KiB);
        }
    }
    gpumem_stats st;
    gpumem_get_stats(0, &st);
    printf("backend=%s peak_reserved=%llu peak_allocated=%llu ratio=%.3f segments=%llu\n", backend_name,
           (unsigned long long)st.bytes_reserved_peak, (unsigned long long)st.bytes_allocated_peak,
           (double)st.bytes_reserved_peak / (double)st.bytes_allocated_peak,
           (unsigned long long)st.segments);
    for (size_t i = 0; i < nbig; i++) must_free(heap, big[i]);
    for (size_t i = 0; i < nsmall; i++) must_free(heap, small[i]);
    free(big);
    free(small);
    return 0;
}

static double pair_median_ns(gm_heap *heap, size_t size)
{
    enum { N = 20000, REPS = 9 };
    double med[REPS];
    must_free(heap, must_alloc(heap, size)); /* warm: the segment is cached */
    for (int r = 0; r < REPS; r++) {
        uint64_t t0 = now_ns();
        for (int i = 0; i < N; i++) must_free(heap, must_alloc(heap, size));
        med[r] = (double)(now_ns() - t0) / N;
    }
    qsort(med, REPS, sizeof *med, cmp_double);
    return med[REPS / 2];
}

static int worker_pair(gm_heap *heap)
{
    printf("pair_64k_ns=%.1f pair_4m_ns=%.1f\n", pair_median_ns(heap, 64 * KiB), pair_median_ns(heap, 4 * MiB));
    return 0;
}

static int worker_grow(gm_heap *heap)
{
    enum { REPS = 9 };
    double per[REPS];
    must_free(heap, must_alloc(heap, 4096)); /* the manager and the small class are set up */
    for (int r = 0; r < REPS; r++) {
        gm_release_cached(heap, 0);
        uint64_t t0 = now_ns();
        uintptr_t p = must_alloc(heap, 64 * MiB);
        per[r] = (double)(now_ns() - t0);
        must_free(heap, p);
    }
    gm_release_cached(heap, 0);
    qsort(per, REPS, sizeof *per, cmp_double);
    printf("backend=%s grow_64m_us=%.1f grow_64m_us_min=%.1f grow_64m_us_max=%.1f\n", backend_name, per[REPS / 2] / 1e3,
           per[0] / 1e3, per[REPS - 1] / 1e3);
    return 0;
}

static int worker_buffer(gm_heap *heap)
{
    enum { REPS = 5 };
    double us[REPS];
    int in_place = 0;
    for (int r = 0; r < REPS; r++) {
        gm_release_cached(heap, 0);
        gpumem_buffer *b = NULL;
        gpumem_buffer_config cfg;
        gpumem_buffer_config_init(&cfg);
        cfg.initial_capacity = 256 * MiB;
        if (gpumem_buffer_create(&b, "bench", &cfg, NULL) != GPUMEM_OK ||
            gpumem_buffer_resize(b, 256 * MiB) != GPUMEM_OK)
            return 1;
        uint64_t t0 = now_ns();
        if (gpumem_buffer_reserve(b, 512 * MiB) != GPUMEM_OK) return 1;
        gm_mgr.backend->synchronize(heap->ctx); /* until a copy, if any, has completed */
        us[r] = (double)(now_ns() - t0) / 1e3;
        gpumem_buffer_info info;
        gpumem_buffer_get_info(b, &info);
        in_place += info.grows_in_place == 1 && info.copies == 0;
        gpumem_buffer_destroy(b);
    }
    qsort(us, REPS, sizeof *us, cmp_double);
    printf("backend=%s buffer_us=%.1f buffer_us_min=%.1f buffer_us_max=%.1f in_place=%d/%d\n", backend_name,
           us[REPS / 2], us[0], us[REPS - 1], in_place, REPS);
    return 0;
}

static int worker_lookup(gm_heap *heap)
{
    enum { N = 8192, HOLE = 128, Q = 2000, REPS = 9 };
    uintptr_t *p = calloc(N, sizeof *p);
    for (int i = 0; i < N; i++) p[i] = must_alloc(heap, 64 * KiB);
    for (int i = N / 2; i < N / 2 + HOLE; i++) must_free(heap, p[i]);
    uintptr_t probe = p[N / 2 + HOLE / 2] + 4096, base;
    size_t size;
    double ns[REPS];
    for (int r = 0; r < REPS; r++) {
        uint64_t t0 = now_ns();
        for (int q = 0; q < Q; q++)
            if (gm_lookup(probe, &base, &size).status != GPUMEM_ERROR_INVALID_VALUE) return 1;
        ns[r] = (double)(now_ns() - t0) / Q;
    }
    qsort(ns, REPS, sizeof *ns, cmp_double);
    printf("backend=%s lookup_ns=%.1f lookup_ns_min=%.1f lookup_ns_max=%.1f\n", backend_name, ns[REPS / 2],
           ns[0], ns[REPS - 1]);
    for (int i = 0; i < N; i++)
        if (i < N / 2 || i >= N / 2 + HOLE) must_free(heap, p[i]);
    /* The middle of live 1.5 MiB blocks (large class), 16 of them in turn so the per-thread cache
     * of recent blocks (4) never answers: 2048 such blocks in one range, or 2-3 per classic segment. */
    enum { L = 2048 };
    for (int i = 0; i < L; i++) p[i] = must_alloc(heap, 3 * MiB / 2);
    for (int r = 0; r < REPS; r++) {
        uint64_t t0 = now_ns();
        for (int q = 0; q < Q; q++)
            if (gm_lookup(p[L / 2 + q % 16] + 700 * KiB, &base, &size).status != GPUMEM_OK) return 1;
        ns[r] = (double)(now_ns() - t0) / Q;
    }
    qsort(ns, REPS, sizeof *ns, cmp_double);
    printf("interior_ns=%.1f interior_ns_min=%.1f interior_ns_max=%.1f\n", ns[REPS / 2], ns[0], ns[REPS - 1]);
    for (int i = 0; i < L; i++) must_free(heap, p[i]);
    free(p);
    return 0;
}

/* ------------------------------------------------------------------ the parent */

/* Runs this program as a worker with GPUMEM_EXPANDABLE=`mode`; its stdout into `out`. */
static bool run_worker(const char *what, int mode, bool host, char *out, size_t cap)
{
    int fd[2];
    if (pipe(fd) != 0) return false;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd[1], 1);
        close(fd[0]);
        setenv("GPUMEM_EXPANDABLE", mode ? "1" : "0", 1);
        setenv("GPUMEM_REPORT", "off", 1);
        char *args[] = {"gpumem-bench", "expandable", "--worker", (char *)what, host ? "--host" : NULL, NULL};
        execv("/proc/self/exe", args);
        _exit(127);
    }
    close(fd[1]);
    size_t n = 0;
    ssize_t got;
    while (n + 1 < cap && (got = read(fd[0], out + n, cap - 1 - n)) > 0) n += (size_t)got;
    out[n] = '\0';
    close(fd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

static double field(const char *text, const char *key)
{
    const char *at = strstr(text, key);
    return at ? strtod(at + strlen(key), NULL) : -1;
}

static void median_range(double *v, int n, double *med, double *lo, double *hi)
{
    bench_spread s = bench_spread_of(v, n);
    *med = s.median;
    *lo = s.lo;
    *hi = s.hi;
}

int bench_expandable(int argc, char **argv)
{
    bool host = false;
    const char *worker = NULL;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--host") == 0) host = true;
        else if (strcmp(argv[i], "--worker") == 0 && i + 1 < argc) worker = argv[++i];
    }
    if (worker) {
        gm_heap *heap = start(host || strcmp(worker, "pair") == 0);
        if (!heap) return 1;
        if (strcmp(worker, "churn") == 0) return worker_churn(heap);
        if (strcmp(worker, "pair") == 0) return worker_pair(heap);
        if (strcmp(worker, "grow") == 0) return worker_grow(heap);
        if (strcmp(worker, "buffer") == 0) return worker_buffer(heap);
        if (strcmp(worker, "lookup") == 0) return worker_lookup(heap);
        return 2;
    }
    char out[512];
    printf("gpumem-bench expandable (classic = GPUMEM_EXPANDABLE=0, expandable = 1)\n");
    for (int mode = 0; mode <= 1; mode++) {
        if (!run_worker("churn", mode, host, out, sizeof out)) return 1;
        printf("churn %-10s %s", mode ? "expandable" : "classic", out);
    }
    enum { ROUNDS = 7 };
    double p64[2][ROUNDS], p4m[2][ROUNDS];
    for (int r = 0; r < ROUNDS; r++)
        for (int mode = 0; mode <= 1; mode++) {
            if (!run_worker("pair", mode, true, out, sizeof out)) return 1;
            p64[mode][r] = field(out, "pair_64k_ns=");
            p4m[mode][r] = field(out, "pair_4m_ns=");
        }
    for (int mode = 0; mode <= 1; mode++) {
        double m, lo, hi, m4, lo4, hi4;
        median_range(p64[mode], ROUNDS, &m, &lo, &hi);
        median_range(p4m[mode], ROUNDS, &m4, &lo4, &hi4);
        printf("pair  %-10s 64KiB %.1f ns [%.1f, %.1f], 4MiB %.1f ns [%.1f, %.1f] (host backend, %d alternating rounds)\n",
               mode ? "expandable" : "classic", m, lo, hi, m4, lo4, hi4, ROUNDS);
    }
    for (int mode = 0; mode <= 1; mode++) {
        if (!run_worker("grow", mode, host, out, sizeof out)) return 1;
        double us = field(out, "grow_64m_us=");
        printf("grow  %-10s 64 MiB in %.1f us (median of 9, [%.1f, %.1f], %s backend)", mode ? "expandable" : "classic",
               us, field(out, "grow_64m_us_min="), field(out, "grow_64m_us_max="),
               strstr(out, "backend=cuda") ? "cuda" : "host");
        if (mode) printf(": %.2f us per 2 MiB chunk", us / 32);
        printf("\n");
    }
    for (int mode = 0; mode <= 1; mode++) {
        if (!run_worker("buffer", mode, host, out, sizeof out)) return 1;
        const char *ip = strstr(out, "in_place=");
        printf("buffer %-10s 256 MiB -> 512 MiB in %.1f us (median of 5, [%.1f, %.1f]), %.*s\n",
               mode ? "expandable" : "classic", field(out, "buffer_us="), field(out, "buffer_us_min="),
               field(out, "buffer_us_max="), ip ? (int)strcspn(ip, "\n") : 0, ip ? ip : "");
    }
    for (int mode = 0; mode <= 1; mode++) {
        if (!run_worker("lookup", mode, true, out, sizeof out)) return 1;
        printf("lookup %-10s freed memory far from a live block: %.1f ns (median of 9, [%.1f, %.1f], host backend)\n",
               mode ? "expandable" : "classic", field(out, "lookup_ns="), field(out, "lookup_ns_min="),
               field(out, "lookup_ns_max="));
        printf("lookup %-10s the middle of a live 1.5 MiB block: %.1f ns (median of 9, [%.1f, %.1f], host backend)\n",
               mode ? "expandable" : "classic", field(out, "interior_ns="), field(out, "interior_ns_min="),
               field(out, "interior_ns_max="));
    }
    return 0;
}
