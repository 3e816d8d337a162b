/* Unit tests of pinned staging (manager/engine/staging.c), calling gm_staged_copy directly.
 *
 * Two setups, one per test process (Criterion runs each test in its own):
 *  - the host backend: the pipeline itself (pieces, buffers, threads, fork, dropping a context);
 *  - the CUDA backend in front of the fake driver (tests/fakecuda, loaded by path before the
 *    backend opens "libcuda.so.1", so the backend binds to it): streams run asynchronously on
 *    worker threads there, copies can be slowed down and made to fail, so stream order, the
 *    return points of H2D and D2H and the error paths are observable. The fake's entry points are
 *    looked up with dlsym: this program links the engine only.
 *
 * Staged and unstaged copies are told apart by the fake's copy-call counter: an unstaged copy is
 * one driver call, a staged one a call per piece. */
#include <criterion/criterion.h>
#include <sys/mman.h>
#include <dlfcn.h>
#include <libgen.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../fakecuda/fakecuda.h"
#include "gm_api.h"
#include "gm_staging.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)
#define CHUNK (64 * KiB)

/* ---------------------------------------------------------------- patterns */

static unsigned char pattern(uint32_t seed, size_t i)
{
    uint32_t x = seed * 2654435761u + (uint32_t)i * 40503u;
    x ^= x >> 13;
    return (unsigned char)(x ^ (x >> 7));
}

static void fill_pattern(void *p, size_t n, uint32_t seed)
{
    for (size_t i = 0; i < n; i++) ((unsigned char *)p)[i] = pattern(seed, i);
}

/* Index of the first byte off the pattern, or n. */
static size_t check_pattern(const void *p, size_t n, uint32_t seed)
{
    for (size_t i = 0; i < n; i++)
        if (((const unsigned char *)p)[i] != pattern(seed, i)) return i;
    return n;
}

static bool all_bytes(const void *p, unsigned char v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (((const unsigned char *)p)[i] != v) return false;
    return true;
}

static void set_env(const char *const *env)
{
    for (; env && env[0]; env += 2) setenv(env[0], env[1], 1);
    gm_config_reset_for_tests();
}

/* Sizes around every chunk boundary up to past the point where every buffer (2 per thread) has
 * been used twice. */
static size_t boundary_sizes(size_t chunk, int threads, size_t *out)
{
    size_t n = 0;
    out[n++] = 1;
    for (size_t k = 1; k <= 4 * (size_t)threads + 1; k++) {
        out[n++] = k * chunk - 1;
        out[n++] = k * chunk;
        out[n++] = k * chunk + 1;
    }
    return n;
}

/* ================================================================ the host backend */

static void host_start(const char *const *env)
{
    set_env(env);
    cr_assert(gm_manager_init(gm_host_backend()));
}

/* A staged round trip on the host backend, where "device" memory is host memory. */
static void host_round_trip(size_t n, uint32_t seed)
{
    unsigned char *src = malloc(n), *dev = malloc(n), *back = malloc(n);
    cr_assert(src && dev && back);
    fill_pattern(src, n, seed);
    memset(back, 0, n);
    cr_assert(gm_answer_is(gm_staged_copy(1, GM_COPY_H2D, (uintptr_t)dev, (uintptr_t)src, n, 0, false), gm_ours(GPUMEM_OK)),
                 "H2D of %zu B", n);
    cr_assert_eq(check_pattern(dev, n, seed), n, "H2D of %zu B: wrong byte", n);
    cr_assert(gm_answer_is(gm_staged_copy(1, GM_COPY_D2H, (uintptr_t)back, (uintptr_t)dev, n, 0, true), gm_ours(GPUMEM_OK)),
                 "D2H of %zu B", n);
    cr_assert_eq(check_pattern(back, n, seed), n, "D2H of %zu B: wrong byte", n);
    free(src);
    free(dev);
    free(back);
}

Test(staging_host, sizes_around_every_chunk_boundary)
{
    host_start((const char *[]){"GPUMEM_STAGING_CHUNK", "64KiB", "GPUMEM_STAGING_MIN", "0",
                                "GPUMEM_STAGING_THREADS", "3", NULL});
    size_t sizes[64];
    size_t count = boundary_sizes(CHUNK, 3, sizes);
    for (size_t i = 0; i < count; i++) host_round_trip(sizes[i], (uint32_t)i + 1);
}

Test(staging_host, pieces_smaller_than_a_chunk_and_one_thread)
{
    host_start((const char *[]){"GPUMEM_STAGING_CHUNK", "4MiB", "GPUMEM_STAGING_MIN", "0",
                                "GPUMEM_STAGING_THREADS", "1", NULL});
    const size_t sizes[] = {4 * MiB, 4 * MiB + 1, 5 * MiB + 3, 9 * MiB - 1, 300 * KiB};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) host_round_trip(sizes[i], (uint32_t)i + 7);
}

Test(staging_host, adaptive_pieces_with_many_threads)
{
    host_start((const char *[]){"GPUMEM_STAGING_CHUNK", "1MiB", "GPUMEM_STAGING_MIN", "0",
                                "GPUMEM_STAGING_THREADS", "8", NULL});
    const size_t sizes[] = {1, 255 * KiB, 256 * KiB + 1, 3 * MiB + 17, 16 * MiB + 4095};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) host_round_trip(sizes[i], (uint32_t)i + 11);
}

Test(staging_host, what_is_not_staged)
{
    host_start((const char *[]){"GPUMEM_STAGING_MIN", "1MiB", NULL});
    static unsigned char a[2 * MiB], b[2 * MiB];
    /* Below the minimum, no bytes, a direction that has no pageable side, no pointer. */
    cr_expect(gm_answer_is(gm_staged_copy(1, GM_COPY_H2D, (uintptr_t)a, (uintptr_t)b, MiB - 1, 0, false), gm_not_ours()));
    cr_expect(gm_answer_is(gm_staged_copy(1, GM_COPY_H2D, (uintptr_t)a, (uintptr_t)b, 0, 0, false), gm_not_ours()));
    cr_expect(gm_answer_is(gm_staged_copy(1, GM_COPY_D2D, (uintptr_t)a, (uintptr_t)b, MiB, 0, false), gm_not_ours()));
    cr_expect(gm_answer_is(gm_staged_copy(1, GM_COPY_DEFAULT, (uintptr_t)a, (uintptr_t)b, MiB, 0, false), gm_not_ours()));
    cr_expect(gm_answer_is(gm_staged_copy(1, GM_COPY_H2D, (uintptr_t)a, 0, MiB, 0, false), gm_not_ours()));
    cr_expect(gm_answer_is(gm_staged_copy(1, GM_COPY_D2H, 0, (uintptr_t)b, MiB, 0, false), gm_not_ours()));
    /* At the minimum it is staged. */
    fill_pattern(b, MiB, 3);
    cr_expect(gm_answer_is(gm_staged_copy(1, GM_COPY_H2D, (uintptr_t)a, (uintptr_t)b, MiB, 0, false), gm_ours(GPUMEM_OK)));
    cr_expect_eq(check_pattern(a, MiB, 3), MiB);
}

Test(staging_host, host_memory_that_is_not_mapped_is_left_to_the_driver)
{
    host_start((const char *[]){"GPUMEM_STAGING_MIN", "64KiB", NULL});
    static unsigned char dev[4 * MiB];
    /* A range with an unmapped page in the middle: gpumem must not memcpy it. */
    unsigned char *m = mmap(NULL, 3 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(m, MAP_FAILED);
    cr_assert_eq(munmap(m + MiB, MiB), 0);
    cr_expect(gm_answer_is(gm_staged_copy(1, GM_COPY_H2D, (uintptr_t)dev, (uintptr_t)m, 3 * MiB, 0, false), gm_not_ours()));
    cr_expect(gm_answer_is(gm_staged_copy(1, GM_COPY_D2H, (uintptr_t)m + 512, (uintptr_t)dev, 2 * MiB, 0, true), gm_not_ours()));
    /* The mapped part alone is staged. */
    fill_pattern(m, MiB, 5);
    cr_expect(gm_answer_is(gm_staged_copy(1, GM_COPY_H2D, (uintptr_t)dev, (uintptr_t)m, MiB, 0, false), gm_ours(GPUMEM_OK)));
    cr_expect_eq(check_pattern(dev, MiB, 5), MiB);
    munmap(m, MiB);
    munmap(m + 2 * MiB, MiB);
}

Test(staging_host, off_stages_nothing)
{
    host_start((const char *[]){"GPUMEM_STAGING", "0", "GPUMEM_STAGING_MIN", "0", NULL});
    static unsigned char a[8 * MiB], b[8 * MiB];
    cr_expect(gm_answer_is(gm_staged_copy(1, GM_COPY_H2D, (uintptr_t)a, (uintptr_t)b, sizeof a, 0, false), gm_not_ours()));
    cr_expect(gm_answer_is(gm_staged_copy(1, GM_COPY_D2H, (uintptr_t)a, (uintptr_t)b, sizeof a, 0, true), gm_not_ours()));
}

/* A fork child has none of the parent's worker threads: its first staged copy makes its own pool
 * (a child that reused the parent's would wait forever for workers that do not exist). */
Test(staging_host, fork_child_stages_with_threads_of_its_own)
{
    host_start((const char *[]){"GPUMEM_STAGING_CHUNK", "64KiB", "GPUMEM_STAGING_MIN", "0",
                                "GPUMEM_STAGING_THREADS", "4", NULL});
    host_round_trip(20 * CHUNK + 5, 1);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        alarm(10);
        size_t n = 20 * CHUNK + 5;
        unsigned char *src = malloc(n), *dev = malloc(n);
        fill_pattern(src, n, 9);
        gm_answer a = gm_staged_copy(1, GM_COPY_H2D, (uintptr_t)dev, (uintptr_t)src, n, 0, false);
        _exit(gm_answer_ok(a) && check_pattern(dev, n, 9) == n ? 0 : 1);
    }
    int status = 0;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %#x", status);
    host_round_trip(20 * CHUNK + 5, 2); /* and the parent's pool still works */
}

Test(staging_host, dropped_context_is_made_again)
{
    host_start((const char *[]){"GPUMEM_STAGING_CHUNK", "64KiB", "GPUMEM_STAGING_MIN", "0", NULL});
    host_round_trip(10 * CHUNK, 1);
    gm_staging_drop_context(1, true);
    gm_staging_drop_context(1, true); /* nothing left to drop */
    gm_staging_drop_context(77, false);
    host_round_trip(10 * CHUNK + 1, 2);
}

typedef struct {
    int id;
    int failures;
} host_worker_arg;

static void *host_copier(void *p)
{
    host_worker_arg *a = p;
    size_t n = 13 * CHUNK + (size_t)a->id * 999;
    unsigned char *src = malloc(n), *dev = malloc(n), *back = malloc(n);
    for (int round = 0; round < 20; round++) {
        uint32_t seed = (uint32_t)(a->id * 100 + round);
        fill_pattern(src, n, seed);
        a->failures += !gm_answer_ok(gm_staged_copy(1, GM_COPY_H2D, (uintptr_t)dev, (uintptr_t)src, n, 0, false));
        a->failures += !gm_answer_ok(gm_staged_copy(1, GM_COPY_D2H, (uintptr_t)back, (uintptr_t)dev, n, 0, true));
        a->failures += check_pattern(back, n, seed) != n;
    }
    free(src);
    free(dev);
    free(back);
    return NULL;
}

Test(staging_host, concurrent_copies_do_not_mix)
{
    host_start((const char *[]){"GPUMEM_STAGING_CHUNK", "64KiB", "GPUMEM_STAGING_MIN", "0",
                                "GPUMEM_STAGING_THREADS", "3", NULL});
    enum { N = 4 };
    pthread_t t[N];
    host_worker_arg args[N];
    for (int i = 0; i < N; i++) {
        args[i] = (host_worker_arg){.id = i};
        cr_assert_eq(pthread_create(&t[i], NULL, host_copier, &args[i]), 0);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        cr_expect_eq(args[i].failures, 0, "thread %d: %d failures", i, args[i].failures);
    }
}

/* ================================================================ the fake driver */

static struct {
    __typeof__(&cuInit) init;
    __typeof__(&cuDeviceGet) device_get;
    __typeof__(&cuDevicePrimaryCtxRetain) retain;
    __typeof__(&cuDevicePrimaryCtxReset_v2) reset;
    __typeof__(&cuCtxSetCurrent) set_current;
    __typeof__(&cuMemAlloc_v2) alloc;
    __typeof__(&cuMemFree_v2) free;
    __typeof__(&cuMemAllocHost_v2) alloc_host;
    __typeof__(&cuMemFreeHost) free_host;
    __typeof__(&cuMemHostRegister_v2) host_register;
    __typeof__(&cuMemHostUnregister) host_unregister;
    __typeof__(&cuMemcpyHtoD_v2) htod;
    __typeof__(&cuMemcpyDtoH_v2) dtoh;
    __typeof__(&cuMemcpyDtoDAsync_v2) dtod_async;
    __typeof__(&cuMemcpyHtoDAsync_v2) htod_async;
    __typeof__(&cuMemcpyDtoHAsync_v2) dtoh_async;
    __typeof__(&cuStreamCreate) stream_create;
    __typeof__(&cuStreamDestroy_v2) stream_destroy;
    __typeof__(&cuStreamSynchronize) stream_sync;
    __typeof__(&cuCtxSynchronize) ctx_sync;
    __typeof__(&cuStreamBeginCapture_v2) begin_capture;
    __typeof__(&cuStreamEndCapture) end_capture;
    __typeof__(&fakecuda_launch_fill) launch_fill;
    __typeof__(&fakecuda_counters) counters;
    __typeof__(&fakecuda_reset_counters) reset_counters;
    __typeof__(&fakecuda_set_copy_delay) copy_delay;
    __typeof__(&fakecuda_fail_copies) fail_copies;
} fk;

static CUcontext g_ctx;
#define CTX ((uintptr_t)g_ctx)
#define OK(call) cr_assert_eq((call), CUDA_SUCCESS, "%s", #call)

/* The fake lies next to this program's directory: <build>/tests/fakecuda/libcuda.so.1. */
static void *load_fake(void)
{
    char exe[PATH_MAX], path[PATH_MAX + 32];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    cr_assert(n > 0);
    exe[n] = 0;
    snprintf(path, sizeof path, "%s/fakecuda/libcuda.so.1", dirname(exe));
    void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    cr_assert_not_null(h, "cannot load the fake driver: %s", dlerror());
    return h;
}

static void bind_fake(void *h)
{
#define SYM(field, name) cr_assert_not_null(*(void **)&fk.field = dlsym(h, name), "%s", name)
    SYM(init, "cuInit");
    SYM(device_get, "cuDeviceGet");
    SYM(retain, "cuDevicePrimaryCtxRetain");
    SYM(reset, "cuDevicePrimaryCtxReset_v2");
    SYM(set_current, "cuCtxSetCurrent");
    SYM(alloc, "cuMemAlloc_v2");
    SYM(free, "cuMemFree_v2");
    SYM(alloc_host, "cuMemAllocHost_v2");
    SYM(free_host, "cuMemFreeHost");
    SYM(host_register, "cuMemHostRegister_v2");
    SYM(host_unregister, "cuMemHostUnregister");
    SYM(htod, "cuMemcpyHtoD_v2");
    SYM(dtoh, "cuMemcpyDtoH_v2");
    SYM(dtod_async, "cuMemcpyDtoDAsync_v2");
    SYM(htod_async, "cuMemcpyHtoDAsync_v2");
    SYM(dtoh_async, "cuMemcpyDtoHAsync_v2");
    SYM(stream_create, "cuStreamCreate");
    SYM(stream_destroy, "cuStreamDestroy_v2");
    SYM(stream_sync, "cuStreamSynchronize");
    SYM(ctx_sync, "cuCtxSynchronize");
    SYM(begin_capture, "cuStreamBeginCapture_v2");
    SYM(end_capture, "cuStreamEndCapture");
    SYM(launch_fill, "fakecuda_launch_fill");
    SYM(counters, "fakecuda_counters");
    SYM(reset_counters, "fakecuda_reset_counters");
    SYM(copy_delay, "fakecuda_set_copy_delay");
    SYM(fail_copies, "fakecuda_fail_copies");
#undef SYM
}

/* The default settings of these tests: 64 KiB pieces, 3 threads (6 buffers), everything staged. */
static const char *const fake_env[] = {"GPUMEM_STAGING_CHUNK", "64KiB", "GPUMEM_STAGING_MIN", "0",
                                       "GPUMEM_STAGING_THREADS", "3", NULL};

static void fake_start(const char *const *env)
{
    set_env(env ? env : fake_env);
    bind_fake(load_fake());
    const gm_backend *be = gm_cuda_backend();
    cr_assert_not_null(be, "the CUDA backend did not bind to the fake driver");
    cr_assert(gm_manager_init(be));
    CUdevice dev;
    OK(fk.init(0));
    OK(fk.device_get(&dev, 0));
    OK(fk.retain(&g_ctx, dev));
    OK(fk.set_current(g_ctx));
}

static uint64_t copy_calls(void)
{
    fakecuda_counters_t c;
    fk.counters(&c);
    return c.copy_calls;
}

static uint64_t copies_pending(void)
{
    fakecuda_counters_t c;
    fk.counters(&c);
    return c.copies_pending;
}

static CUdeviceptr dev_alloc(size_t n)
{
    CUdeviceptr d = 0;
    OK(fk.alloc(&d, n));
    return d;
}

static gm_answer staged(gm_copy_dir dir, uintptr_t dst, uintptr_t src, size_t n, CUstream s)
{
    return gm_staged_copy(CTX, dir, dst, src, n, (uintptr_t)s, false);
}

/* The same bytes through the staged path and through the driver's own copy, both ways; the
 * staged one takes one driver copy per piece, the driver's one. */
static void compare_with_driver(size_t n, uint32_t seed, CUstream s)
{
    unsigned char *src = malloc(n), *back_staged = malloc(n), *back_driver = malloc(n);
    cr_assert(src && back_staged && back_driver);
    fill_pattern(src, n, seed);
    memset(back_staged, 0xEE, n);
    memset(back_driver, 0xDD, n);
    CUdeviceptr d_staged = dev_alloc(n), d_driver = dev_alloc(n);
    size_t pieces = (n + CHUNK - 1) / CHUNK;

    uint64_t before = copy_calls();
    cr_assert(gm_answer_is(staged(GM_COPY_H2D, d_staged, (uintptr_t)src, n, s), gm_ours(GPUMEM_OK)), "staged H2D of %zu B", n);
    cr_assert_eq(copy_calls() - before, pieces, "staged H2D of %zu B: driver copies", n);
    OK(fk.htod(d_driver, src, n));
    OK(fk.stream_sync(s));
    cr_assert_eq(memcmp((void *)d_staged, (void *)d_driver, n), 0, "H2D of %zu B differs from the driver's", n);
    cr_assert_eq(check_pattern((void *)d_staged, n, seed), n);

    before = copy_calls();
    cr_assert(gm_answer_is(staged(GM_COPY_D2H, (uintptr_t)back_staged, d_staged, n, s), gm_ours(GPUMEM_OK)), "staged D2H of %zu B", n);
    cr_assert_eq(copy_calls() - before, pieces, "staged D2H of %zu B: driver copies", n);
    OK(fk.dtoh(back_driver, d_driver, n));
    cr_assert_eq(memcmp(back_staged, back_driver, n), 0, "D2H of %zu B differs from the driver's", n);

    OK(fk.free(d_staged));
    OK(fk.free(d_driver));
    free(src);
    free(back_staged);
    free(back_driver);
}

Test(staging_fake, identical_to_the_driver_around_every_chunk_boundary)
{
    fake_start(NULL);
    CUstream s;
    OK(fk.stream_create(&s, 0));
    size_t sizes[64];
    size_t count = boundary_sizes(CHUNK, 3, sizes);
    for (size_t i = 0; i < count; i++) compare_with_driver(sizes[i], (uint32_t)i + 1, i % 2 ? s : NULL);
    OK(fk.stream_destroy(s));
}

Test(staging_fake, per_thread_default_stream)
{
    fake_start(NULL);
    compare_with_driver(7 * CHUNK + 3, 5, CU_STREAM_PER_THREAD);
}

Test(staging_fake, off_stages_nothing)
{
    const char *env[] = {"GPUMEM_STAGING", "0", "GPUMEM_STAGING_MIN", "0", NULL};
    fake_start(env);
    size_t n = 4 * MiB;
    unsigned char *h = malloc(n);
    CUdeviceptr d = dev_alloc(n);
    cr_expect(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)h, n, NULL), gm_not_ours()));
    cr_expect(gm_answer_is(staged(GM_COPY_D2H, (uintptr_t)h, d, n, NULL), gm_not_ours()));
    cr_expect_eq(copy_calls(), 0);
    free(h);
}

Test(staging_fake, below_the_minimum_goes_to_the_driver)
{
    const char *env[] = {"GPUMEM_STAGING_CHUNK", "64KiB", "GPUMEM_STAGING_MIN", "1MiB", NULL};
    fake_start(env);
    unsigned char *h = malloc(MiB);
    CUdeviceptr d = dev_alloc(MiB);
    cr_expect(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)h, MiB - 1, NULL), gm_not_ours()));
    cr_expect_eq(copy_calls(), 0);
    cr_expect(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)h, MiB, NULL), gm_ours(GPUMEM_OK)));
    cr_expect_eq(copy_calls(), MiB / CHUNK);
    free(h);
}

/* Memory the driver knows is never memcpy'd by us: pinned, registered, device memory on the host
 * side of the copy. */
Test(staging_fake, host_memory_the_driver_knows_is_not_staged)
{
    fake_start(NULL);
    size_t n = 16 * CHUNK;
    CUdeviceptr d = dev_alloc(n), d2 = dev_alloc(n);
    void *pinned = NULL;
    OK(fk.alloc_host(&pinned, n));
    cr_expect(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)pinned, n, NULL), gm_not_ours()));
    cr_expect(gm_answer_is(staged(GM_COPY_D2H, (uintptr_t)pinned, d, n, NULL), gm_not_ours()));
    /* A pinned range that starts inside pageable memory is refused too (its end is known). */
    void *registered = malloc(2 * n);
    OK(fk.host_register((char *)registered + n, n, 0));
    cr_expect(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)registered + n, n, NULL), gm_not_ours()));
    cr_expect(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)registered + 8, n, NULL), gm_not_ours()));
    /* Device memory as the "host" side. */
    cr_expect(gm_answer_is(staged(GM_COPY_H2D, d, d2, n, NULL), gm_not_ours()));
    cr_expect(gm_answer_is(staged(GM_COPY_D2H, d2, d, n, NULL), gm_not_ours()));
    cr_expect_eq(copy_calls(), 0);
    OK(fk.host_unregister((char *)registered + n));
    OK(fk.free_host(pinned));
    free(registered);
}

/* A device range no one allocation holds goes to the driver, which refuses all of it (pieces
 * would have written the part before the bad end). */
Test(staging_fake, device_range_the_driver_would_refuse_is_left_to_it)
{
    fake_start(NULL);
    size_t n = 8 * CHUNK;
    unsigned char *h = malloc(n + 1);
    CUdeviceptr d = dev_alloc(n);
    cr_expect(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)h, n + 1, NULL), gm_not_ours()));
    cr_expect(gm_answer_is(staged(GM_COPY_H2D, d + 512, (uintptr_t)h, n, NULL), gm_not_ours()));
    cr_expect(gm_answer_is(staged(GM_COPY_D2H, (uintptr_t)h, d + n - 1, 2, NULL), gm_not_ours()));
    cr_expect(gm_answer_is(staged(GM_COPY_H2D, (uintptr_t)h, (uintptr_t)h, n, NULL), gm_not_ours()), "host memory as device");
    OK(fk.free(d));
    cr_expect(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)h, n, NULL), gm_not_ours()), "freed device memory");
    cr_expect_eq(copy_calls(), 0);
    free(h);
}

Test(staging_fake, capturing_stream_is_left_to_the_driver)
{
    fake_start(NULL);
    size_t n = 8 * CHUNK;
    unsigned char *h = malloc(n);
    CUdeviceptr d = dev_alloc(n);
    CUstream s;
    OK(fk.stream_create(&s, 0));
    OK(fk.begin_capture(s, CU_STREAM_CAPTURE_MODE_RELAXED));
    cr_expect(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)h, n, s), gm_not_ours()));
    cr_expect(gm_answer_is(staged(GM_COPY_D2H, (uintptr_t)h, d, n, s), gm_not_ours()));
    CUgraph g;
    OK(fk.end_capture(s, &g));
    cr_expect_eq(copy_calls(), 0);
    cr_expect(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)h, n, s), gm_ours(GPUMEM_OK)), "after the capture");
    free(h);
}

/* A stream handle the driver does not know: its own error, as its copy would answer. */
Test(staging_fake, unknown_stream_gets_the_drivers_error)
{
    fake_start(NULL);
    size_t n = 8 * CHUNK;
    unsigned char *h = malloc(n);
    CUdeviceptr d = dev_alloc(n);
    CUstream s;
    OK(fk.stream_create(&s, 0));
    OK(fk.stream_destroy(s));
    gm_answer a = staged(GM_COPY_H2D, d, (uintptr_t)h, n, s);
    cr_expect(gm_answer_is(a, gm_not_ours()) || gm_answer_is(a, gm_ours(CUDA_ERROR_INVALID_HANDLE)),
              "got owner %d status %d", a.owner, a.status);
    cr_expect_eq(copy_calls(), 0);
    free(h);
}

/* ---------------------------------------------------------------- stream order */

/* D2H after a slow "kernel" on the caller's stream sees what the kernel wrote. */
static void d2h_after_fill(CUstream s, bool sync)
{
    size_t n = 9 * CHUNK + 7;
    unsigned char *h = malloc(n);
    memset(h, 0, n);
    CUdeviceptr d = dev_alloc(n);
    memset((void *)d, 0x11, n);
    OK(fk.launch_fill(s, d, 0xA5, n, 50 * 1000));
    cr_assert(gm_answer_is(gm_staged_copy(CTX, GM_COPY_D2H, (uintptr_t)h, d, n, (uintptr_t)s, sync), gm_ours(GPUMEM_OK)));
    cr_expect(all_bytes(h, 0xA5, n), "the D2H did not wait for the fill before it on its stream");
    OK(fk.ctx_sync());
    OK(fk.free(d));
    free(h);
}

Test(staging_fake, d2h_waits_for_earlier_work_on_its_stream)
{
    fake_start(NULL);
    CUstream s;
    OK(fk.stream_create(&s, 0));
    d2h_after_fill(s, false);
    d2h_after_fill(NULL, true);
    d2h_after_fill(CU_STREAM_PER_THREAD, false);
    OK(fk.stream_destroy(s));
}

/* H2D after a slow fill of the same memory: the fill's bytes are overwritten (the DMAs waited). */
Test(staging_fake, h2d_comes_after_earlier_work_on_its_stream)
{
    fake_start(NULL);
    size_t n = 9 * CHUNK + 7;
    unsigned char *h = malloc(n);
    fill_pattern(h, n, 4);
    CUdeviceptr d = dev_alloc(n);
    CUstream s;
    OK(fk.stream_create(&s, 0));
    OK(fk.launch_fill(s, d, 0xA5, n, 50 * 1000));
    cr_assert(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)h, n, s), gm_ours(GPUMEM_OK)));
    OK(fk.stream_sync(s));
    cr_expect_eq(check_pattern((void *)d, n, 4), n, "a fill before the H2D ran after it");
    OK(fk.stream_destroy(s));
    free(h);
}

/* With slow DMAs, later work on the caller's stream still comes after the staged H2D: a fill
 * enqueued right after it ends with the fill's bytes, and a device-side reader (a D2D copy)
 * enqueued after it reads the H2D's data. */
Test(staging_fake, later_work_on_the_stream_waits_for_the_h2d)
{
    fake_start(NULL);
    fk.copy_delay(2000);
    size_t n = 12 * CHUNK + 1;
    unsigned char *h = malloc(n);
    fill_pattern(h, n, 6);
    CUdeviceptr d = dev_alloc(n), reader = dev_alloc(n);
    CUstream s;
    OK(fk.stream_create(&s, 0));

    cr_assert(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)h, n, s), gm_ours(GPUMEM_OK)));
    OK(fk.dtod_async(reader, d, n, s));
    OK(fk.stream_sync(s));
    cr_expect_eq(check_pattern((void *)reader, n, 6), n, "a reader after the H2D did not see its data");

    cr_assert(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)h, n, s), gm_ours(GPUMEM_OK)));
    OK(fk.launch_fill(s, d, 0x5A, n, 0));
    OK(fk.stream_sync(s));
    cr_expect(all_bytes((void *)d, 0x5A, n), "a fill after the H2D was overwritten by it");

    cr_assert(gm_answer_is(gm_staged_copy(CTX, GM_COPY_H2D, d, (uintptr_t)h, n, 0, true), gm_ours(GPUMEM_OK)));
    OK(fk.launch_fill(NULL, d, 0x3C, n, 0));
    OK(fk.ctx_sync());
    cr_expect(all_bytes((void *)d, 0x3C, n), "legacy stream: a fill after the blocking H2D was overwritten by it");
    OK(fk.stream_destroy(s));
    free(h);
}

/* The driver's return points: H2D returns once the source is consumed (the program may overwrite
 * it while DMAs still run); D2H only once every byte is in the destination. */
Test(staging_fake, h2d_returns_once_the_source_is_consumed_d2h_once_the_data_is_there)
{
    fake_start(NULL);
    fk.copy_delay(3000);
    size_t n = 16 * CHUNK;
    unsigned char *h = malloc(n), *back = malloc(n);
    fill_pattern(h, n, 8);
    CUdeviceptr d = dev_alloc(n);
    CUstream s;
    OK(fk.stream_create(&s, 0));
    cr_assert(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)h, n, s), gm_ours(GPUMEM_OK)));
    cr_expect_gt(copies_pending(), 0, "the H2D waited for its DMAs (the driver does not)");
    memset(h, 0xFF, n);
    OK(fk.stream_sync(s));
    cr_expect_eq(check_pattern((void *)d, n, 8), n, "the H2D read its source after it returned");

    memset(back, 0, n);
    cr_assert(gm_answer_is(staged(GM_COPY_D2H, (uintptr_t)back, d, n, s), gm_ours(GPUMEM_OK)));
    cr_expect_eq(copies_pending(), 0, "the D2H returned with DMAs in flight");
    cr_expect_eq(check_pattern(back, n, 8), n);
    OK(fk.stream_destroy(s));
    free(h);
    free(back);
}

/* The same return points hold for the fake's own (unstaged) pageable copies, so that staged and
 * unstaged copies are compared under the same rules; pinned memory stays asynchronous. */
Test(staging_fake, the_fake_drivers_own_pageable_copies_keep_the_same_return_points)
{
    fake_start(NULL);
    fk.copy_delay(20 * 1000);
    size_t n = 4 * CHUNK;
    unsigned char *h = malloc(n), *back = malloc(n);
    fill_pattern(h, n, 31);
    CUdeviceptr d = dev_alloc(n);
    CUstream s;
    OK(fk.stream_create(&s, 0));
    OK(fk.htod_async(d, h, n, s));
    cr_expect_eq(copies_pending(), 1, "the async H2D is still queued");
    memset(h, 0xFF, n);
    OK(fk.stream_sync(s));
    cr_expect_eq(check_pattern((void *)d, n, 31), n, "the fake read a pageable source after the call returned");
    memset(back, 0, n);
    OK(fk.dtoh_async(back, d, n, s));
    cr_expect_eq(copies_pending(), 0, "an async D2H into pageable memory returned before its data was there");
    cr_expect_eq(check_pattern(back, n, 31), n);
    void *pinned = NULL;
    OK(fk.alloc_host(&pinned, n));
    OK(fk.dtoh_async(pinned, d, n, s));
    cr_expect_eq(copies_pending(), 1, "an async D2H into pinned memory stays asynchronous");
    OK(fk.stream_sync(s));
    cr_expect_eq(check_pattern(pinned, n, 31), n);
    OK(fk.free_host(pinned));
    OK(fk.stream_destroy(s));
    free(h);
    free(back);
}

/* ---------------------------------------------------------------- errors */

/* A driver error in the middle of a copy: that error comes back, no DMA is still in flight when
 * it does (the caller may free its memory at once), and no buffer is left in use (the next copy
 * is whole). */
static void fails_midway(gm_copy_dir dir)
{
    size_t n = 24 * CHUNK;
    unsigned char *h = malloc(n);
    CUdeviceptr d = dev_alloc(n);
    fill_pattern(h, n, 12);
    memset((void *)d, 0, n);
    fk.copy_delay(1000);
    fk.fail_copies(10, 1, CUDA_ERROR_LAUNCH_FAILED);
    gm_answer a = dir == GM_COPY_H2D ? staged(GM_COPY_H2D, d, (uintptr_t)h, n, NULL)
                                     : staged(GM_COPY_D2H, (uintptr_t)h, d, n, NULL);
    cr_expect(gm_answer_is(a, gm_ours(CUDA_ERROR_LAUNCH_FAILED)), "%s: got owner %d status %d",
              gm_copy_dir_name(dir), a.owner, a.status);
    cr_expect_eq(copies_pending(), 0, "%s returned an error with DMAs in flight", gm_copy_dir_name(dir));

    fk.copy_delay(0);
    fill_pattern(h, n, 13);
    if (dir == GM_COPY_H2D) {
        cr_assert(gm_answer_is(staged(GM_COPY_H2D, d, (uintptr_t)h, n, NULL), gm_ours(GPUMEM_OK)));
        OK(fk.ctx_sync());
        cr_expect_eq(check_pattern((void *)d, n, 13), n, "the copy after the failure");
    } else {
        fill_pattern((void *)d, n, 14);
        cr_assert(gm_answer_is(staged(GM_COPY_D2H, (uintptr_t)h, d, n, NULL), gm_ours(GPUMEM_OK)));
        cr_expect_eq(check_pattern(h, n, 14), n, "the copy after the failure");
    }
    OK(fk.free(d));
    free(h);
}

Test(staging_fake, h2d_error_midway)
{
    fake_start(NULL);
    fails_midway(GM_COPY_H2D);
}

Test(staging_fake, d2h_error_midway)
{
    fake_start(NULL);
    fails_midway(GM_COPY_D2H);
}

/* The first piece fails: nothing was staged yet. */
Test(staging_fake, error_on_the_first_piece)
{
    fake_start(NULL);
    size_t n = 4 * CHUNK;
    unsigned char *h = malloc(n);
    CUdeviceptr d = dev_alloc(n);
    fk.fail_copies(0, 1, CUDA_ERROR_ILLEGAL_ADDRESS);
    cr_expect(gm_answer_is(staged(GM_COPY_D2H, (uintptr_t)h, d, n, NULL), gm_ours(CUDA_ERROR_ILLEGAL_ADDRESS)));
    cr_expect_eq(copies_pending(), 0);
    cr_expect(gm_answer_is(staged(GM_COPY_D2H, (uintptr_t)h, d, n, NULL), gm_ours(GPUMEM_OK)));
    free(h);
}

/* ---------------------------------------------------------------- threads, contexts */

typedef struct {
    int id;
    int failures;
} fake_worker_arg;

static void *fake_copier(void *p)
{
    fake_worker_arg *a = p;
    size_t n = 11 * CHUNK + (size_t)a->id * 4097;
    unsigned char *src = malloc(n), *back = malloc(n);
    CUstream s;
    CUdeviceptr d;
    if (fk.set_current(g_ctx) || fk.stream_create(&s, 0) || fk.alloc(&d, n)) {
        a->failures = 1000;
        return NULL;
    }
    for (int round = 0; round < 10; round++) {
        uint32_t seed = (uint32_t)(a->id * 100 + round);
        fill_pattern(src, n, seed);
        a->failures += !gm_answer_ok(staged(GM_COPY_H2D, d, (uintptr_t)src, n, s));
        a->failures += !gm_answer_ok(staged(GM_COPY_D2H, (uintptr_t)back, d, n, s));
        a->failures += check_pattern(back, n, seed) != n;
    }
    a->failures += fk.free(d) != CUDA_SUCCESS;
    a->failures += fk.stream_destroy(s) != CUDA_SUCCESS;
    free(src);
    free(back);
    return NULL;
}

Test(staging_fake, concurrent_copies_from_several_threads)
{
    fake_start(NULL);
    fk.copy_delay(100);
    enum { N = 4 };
    pthread_t t[N];
    fake_worker_arg args[N];
    for (int i = 0; i < N; i++) {
        args[i] = (fake_worker_arg){.id = i};
        cr_assert_eq(pthread_create(&t[i], NULL, fake_copier, &args[i]), 0);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        cr_expect_eq(args[i].failures, 0, "thread %d: %d failures", i, args[i].failures);
    }
}

/* Dropping the context's staging frees its pinned buffers through the driver; the next staged copy
 * makes them again. */
Test(staging_fake, dropping_a_context_frees_its_buffers)
{
    fake_start(NULL);
    fakecuda_counters_t c;
    compare_with_driver(5 * CHUNK, 1, NULL);
    fk.counters(&c);
    cr_expect_eq(c.host_alloc_calls, 1, "one pinned allocation for all buffers");
    gm_staging_drop_context(CTX, true);
    compare_with_driver(5 * CHUNK, 2, NULL);
    fk.counters(&c);
    cr_expect_eq(c.host_alloc_calls, 2);
}

/* A reset primary context comes back with the same handle; the stream and buffers made in the old
 * one are gone, so staging must not use them (nobody told it of the reset): it makes new ones. */
Test(staging_fake, a_reset_primary_context_gets_new_buffers)
{
    fake_start(NULL);
    fakecuda_counters_t c;
    compare_with_driver(5 * CHUNK, 1, NULL);
    CUcontext before = g_ctx;
    OK(fk.reset(0));
    OK(fk.retain(&g_ctx, 0));
    OK(fk.set_current(g_ctx));
    cr_assert_eq(g_ctx, before, "the fake hands out the same primary handle again");
    compare_with_driver(5 * CHUNK, 2, NULL);
    compare_with_driver(9 * CHUNK + 1, 3, NULL);
    fk.counters(&c);
    cr_expect_eq(c.host_alloc_calls, 2, "staging made new buffers once in the new context");
}
