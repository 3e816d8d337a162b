/* api_staging: pinned staging of pageable copies (issue 5, part 3) through the real preload path
 * on the fake driver: the hooked cuMemcpy* entry points hand large pageable host <-> device copies
 * to manager/engine/staging.c.
 *
 * A staged copy reaches the driver as one copy per piece (GPUMEM_STAGING_CHUNK=64KiB here), an
 * unstaged one as one copy: the fake's copy counter tells them apart. Every copy's bytes are
 * checked against the pattern it carries, so staged and unstaged copies (GPUMEM_STAGING=0, or a
 * pinned host side) are held to the same bytes. Stream order and the driver's return points are
 * checked with slow "kernels" (fakecuda_launch_fill) and slow DMAs (fakecuda_set_copy_delay). */
#include <pthread.h>

#include "api_test.h"
#include "fakecuda.h"

#define KiB ((size_t)1 << 10)
#define CHUNK (64 * KiB)

static const char *const staging_env[] = {"GPUMEM_STAGING_CHUNK", "64KiB", "GPUMEM_STAGING_MIN", "64KiB",
                                          "GPUMEM_STAGING_THREADS", "3", NULL};

static void start_with(const char *const *env)
{
    for (; env && env[0]; env += 2) setenv(env[0], env[1], 1);
    api_start();
}

static fakecuda_counters_t counters(void)
{
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    return c;
}

static size_t pieces(size_t n) { return (n + CHUNK - 1) / CHUNK; }

/* ---------------------------------------------------------------- every hooked entry point */

typedef enum {
    VIA_HTOD, VIA_HTOD_PTDS, VIA_HTOD_ASYNC, VIA_HTOD_ASYNC_PTSZ, VIA_UNIFIED, VIA_UNIFIED_ASYNC, VIA_COUNT
} via;

static const char *const via_name[VIA_COUNT] = {"cuMemcpyHtoD", "cuMemcpyHtoD_v2_ptds", "cuMemcpyHtoDAsync",
                                                "cuMemcpyHtoDAsync_v2_ptsz(0)", "cuMemcpy", "cuMemcpyAsync"};

/* H2D through `v`, then D2H back through the matching entry point, on stream s where there is one;
 * returns the driver copies each direction took. */
static void round_trip(via v, CUdeviceptr d, unsigned char *h, unsigned char *back, size_t n, CUstream s,
                       uint64_t calls[2])
{
    uint64_t c0 = counters().copy_calls;
    switch (v) {
    case VIA_HTOD: OK(cuMemcpyHtoD(d, h, n)); break;
    case VIA_HTOD_PTDS: OK(cuMemcpyHtoD_v2_ptds(d, h, n)); break;
    case VIA_HTOD_ASYNC: OK(cuMemcpyHtoDAsync(d, h, n, s)); break;
    case VIA_HTOD_ASYNC_PTSZ: OK(cuMemcpyHtoDAsync_v2_ptsz(d, h, n, NULL)); break;
    case VIA_UNIFIED: OK(cuMemcpy(d, (CUdeviceptr)(uintptr_t)h, n)); break;
    default: OK(cuMemcpyAsync(d, (CUdeviceptr)(uintptr_t)h, n, s)); break;
    }
    uint64_t c1 = counters().copy_calls;
    switch (v) {
    case VIA_HTOD: OK(cuMemcpyDtoH(back, d, n)); break;
    case VIA_HTOD_PTDS: OK(cuMemcpyDtoH_v2_ptds(back, d, n)); break;
    case VIA_HTOD_ASYNC: OK(cuMemcpyDtoHAsync(back, d, n, s)); break;
    case VIA_HTOD_ASYNC_PTSZ: OK(cuMemcpyDtoHAsync_v2_ptsz(back, d, n, NULL)); break;
    case VIA_UNIFIED: OK(cuMemcpy((CUdeviceptr)(uintptr_t)back, d, n)); break;
    default: OK(cuMemcpyAsync((CUdeviceptr)(uintptr_t)back, d, n, s)); break;
    }
    calls[0] = c1 - c0;
    calls[1] = counters().copy_calls - c1;
}

/* Every entry point, sizes around chunk boundaries: the bytes are right, and each copy took
 * `staged ? pieces : 1` driver copies. */
static void every_entry_point(bool staged)
{
    CUstream s;
    OK(cuStreamCreate(&s, 0));
    const size_t sizes[] = {CHUNK - 1, CHUNK, CHUNK + 1, 7 * CHUNK - 1, 7 * CHUNK, 13 * CHUNK + 1};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        size_t n = sizes[i];
        unsigned char *h = malloc(n), *back = malloc(n);
        CUdeviceptr d;
        OK(cuMemAlloc(&d, n));
        for (int v = 0; v < VIA_COUNT; v++) {
            uint32_t seed = (uint32_t)(i * 16 + (size_t)v + 1);
            api_fill_pattern(h, n, seed);
            memset(back, 0, n);
            uint64_t calls[2];
            round_trip((via)v, d, h, back, n, s, calls);
            OK(cuCtxSynchronize());
            cr_assert_eq(api_check_pattern((void *)d, n, seed), n, "%s, %zu B: device bytes", via_name[v], n);
            cr_assert_eq(api_check_pattern(back, n, seed), n, "%s, %zu B: bytes read back", via_name[v], n);
            size_t want = staged && n >= CHUNK ? pieces(n) : 1;
            cr_assert_eq(calls[0], want, "%s, %zu B: H2D took %llu driver copies, want %zu", via_name[v], n,
                         (unsigned long long)calls[0], want);
            cr_assert_eq(calls[1], want, "%s, %zu B: D2H took %llu driver copies, want %zu", via_name[v], n,
                         (unsigned long long)calls[1], want);
        }
        OK(cuMemFree(d));
        free(h);
        free(back);
    }
    OK(cuStreamDestroy(s));
}

Test(staging, every_hooked_entry_point_stages_large_pageable_copies)
{
    start_with(staging_env);
    every_entry_point(true);
}

Test(staging, off_gives_the_same_bytes_through_the_driver)
{
    start_with(staging_env);
    setenv("GPUMEM_STAGING", "0", 1);
    every_entry_point(false);
}

/* Pinned host memory (gpumem's pinned pool or the driver's) is the driver's fast path already. */
Test(staging, pinned_host_memory_is_not_staged)
{
    start_with(staging_env);
    size_t n = 10 * CHUNK;
    void *pinned = NULL;
    CUdeviceptr d;
    OK(cuMemAllocHost(&pinned, n));
    OK(cuMemAlloc(&d, n));
    api_fill_pattern(pinned, n, 3);
    uint64_t c0 = counters().copy_calls;
    OK(cuMemcpyHtoD(d, pinned, n));
    memset(pinned, 0, n);
    OK(cuMemcpyDtoH(pinned, d, n));
    cr_expect_eq(counters().copy_calls - c0, 2, "one driver copy each way");
    cr_expect_eq(api_check_pattern(pinned, n, 3), n);
    OK(cuMemFree(d));
    OK(cuMemFreeHost(pinned));
}

/* ---------------------------------------------------------------- stream order, return points */

Test(staging, d2h_sees_a_slow_kernel_before_it)
{
    start_with(staging_env);
    size_t n = 9 * CHUNK + 5;
    unsigned char *h = calloc(1, n);
    CUdeviceptr d;
    CUstream s;
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&d, n));
    OK(fakecuda_launch_fill(s, d, 0xA5, n, 50 * 1000));
    OK(cuMemcpyDtoHAsync(h, d, n, s));
    cr_expect(api_all_bytes(h, 0xA5, n), "the staged D2H did not wait for the kernel before it");
    OK(fakecuda_launch_fill(NULL, d, 0x5A, n, 50 * 1000));
    OK(cuMemcpyDtoH(h, d, n));
    cr_expect(api_all_bytes(h, 0x5A, n), "the blocking staged D2H did not wait for the kernel before it");
    OK(cuMemFree(d));
    OK(cuStreamDestroy(s));
    free(h);
}

Test(staging, later_work_waits_for_a_staged_h2d_with_slow_dmas)
{
    start_with(staging_env);
    fakecuda_set_copy_delay(2000);
    size_t n = 12 * CHUNK + 3;
    unsigned char *h = malloc(n);
    api_fill_pattern(h, n, 21);
    CUdeviceptr d, reader;
    CUstream s;
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&d, n));
    OK(cuMemAlloc(&reader, n));
    OK(cuMemcpyHtoDAsync(d, h, n, s));
    memset(h, 0, n); /* the source is consumed when the call returns */
    OK(cuMemcpyDtoDAsync(reader, d, n, s));
    OK(fakecuda_launch_fill(s, d, 0x77, n, 0));
    OK(cuStreamSynchronize(s));
    cr_expect_eq(api_check_pattern((void *)reader, n, 21), n, "a reader after the H2D missed its data");
    cr_expect(api_all_bytes((void *)d, 0x77, n), "a fill after the H2D was overwritten by it");
    OK(cuMemFree(d));
    OK(cuMemFree(reader));
    OK(cuStreamDestroy(s));
    free(h);
}

/* ---------------------------------------------------------------- errors */

Test(staging, a_driver_error_midway_comes_back_with_nothing_in_flight)
{
    start_with(staging_env);
    size_t n = 20 * CHUNK;
    unsigned char *h = malloc(n);
    api_fill_pattern(h, n, 5);
    CUdeviceptr d;
    OK(cuMemAlloc(&d, n));
    fakecuda_set_copy_delay(1000);
    fakecuda_fail_copies(7, 1, CUDA_ERROR_LAUNCH_FAILED);
    ERR(cuMemcpyHtoD(d, h, n), CUDA_ERROR_LAUNCH_FAILED);
    cr_expect_eq(counters().copies_pending, 0, "the H2D failed with DMAs still in flight");
    fakecuda_fail_copies(7, 1, CUDA_ERROR_LAUNCH_FAILED);
    ERR(cuMemcpyDtoH(h, d, n), CUDA_ERROR_LAUNCH_FAILED);
    cr_expect_eq(counters().copies_pending, 0, "the D2H failed with DMAs still in flight");
    fakecuda_set_copy_delay(0);
    api_fill_pattern(h, n, 6);
    OK(cuMemcpyHtoD(d, h, n));
    OK(cuCtxSynchronize());
    cr_expect_eq(api_check_pattern((void *)d, n, 6), n, "the copy after the failures");
    OK(cuMemFree(d));
    free(h);
}

/* A range past the end of its allocation is refused whole, as the driver refuses it: nothing of
 * it is written. */
Test(staging, a_range_past_the_end_is_refused_whole)
{
    start_with(staging_env);
    size_t n = 8 * CHUNK;
    unsigned char *h = malloc(n + CHUNK);
    memset(h, 0x42, n + CHUNK);
    CUdeviceptr d;
    OK(cuMemAlloc(&d, n));
    OK(cuMemsetD8(d, 0, n));
    ERR(cuMemcpyHtoD(d, h, n + CHUNK), CUDA_ERROR_INVALID_VALUE);
    cr_expect(api_all_bytes((void *)d, 0, n), "a refused copy wrote some of its bytes");
    OK(cuMemFree(d));
    free(h);
}

/* ---------------------------------------------------------------- threads */

typedef struct {
    CUcontext ctx;
    int id, failures;
} copier_arg;

static void *copier(void *p)
{
    copier_arg *a = p;
    size_t n = 9 * CHUNK + (size_t)a->id * 513;
    unsigned char *h = malloc(n), *back = malloc(n);
    CUdeviceptr d;
    CUstream s;
    if (cuCtxSetCurrent(a->ctx) || cuStreamCreate(&s, 0) || cuMemAlloc(&d, n)) {
        a->failures = 1000;
        return NULL;
    }
    for (int round = 0; round < 8; round++) {
        uint32_t seed = (uint32_t)(a->id * 50 + round);
        api_fill_pattern(h, n, seed);
        a->failures += cuMemcpyHtoDAsync(d, h, n, s) != CUDA_SUCCESS;
        a->failures += cuMemcpyDtoHAsync(back, d, n, s) != CUDA_SUCCESS;
        a->failures += api_check_pattern(back, n, seed) != n;
    }
    a->failures += cuMemFree(d) != CUDA_SUCCESS;
    a->failures += cuStreamDestroy(s) != CUDA_SUCCESS;
    free(h);
    free(back);
    return NULL;
}

Test(staging, threads_copying_at_once_get_their_own_bytes)
{
    start_with(staging_env);
    CUcontext ctx;
    OK(cuCtxGetCurrent(&ctx));
    enum { N = 4 };
    pthread_t t[N];
    copier_arg args[N];
    for (int i = 0; i < N; i++) {
        args[i] = (copier_arg){.ctx = ctx, .id = i};
        cr_assert_eq(pthread_create(&t[i], NULL, copier, &args[i]), 0);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        cr_expect_eq(args[i].failures, 0, "thread %d: %d failures", i, args[i].failures);
    }
}
