/* api_barrier: cudaFree's implicit barrier. Strict mode (the default): cuMemFree of a pool block
 * waits for the device like the driver's own cuMemFree, so work queued before it has run when it
 * returns, and a block reused afterwards is not overwritten by older work. Fast mode
 * (GPUMEM_FREE_SYNC=0): cuMemFree returns at once, but a freed block that pending work still
 * writes is not handed out again until that work completed. The "kernel" is
 * fakecuda_launch_fill: it sleeps, then memsets its range. */
#include "api_test.h"
#include "fakecuda.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)

static fakecuda_counters_t counters(void)
{
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    return c;
}

static bool overlaps(CUdeviceptr a, size_t an, CUdeviceptr b, size_t bn)
{
    return a < b + bn && b < a + an;
}

Test(barrier, strict_free_waits_for_earlier_work)
{
    CUstream s;
    CUdeviceptr a, b, c;
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&a, 256 * KiB));
    OK(cuMemAlloc(&b, 64 * KiB));
    OK(cuMemsetD8(a, 0, 256 * KiB));
    fakecuda_reset_counters();
    double t0 = api_now_ms();
    OK(fakecuda_launch_fill(s, a, 0xAB, 256 * KiB, 200000));
    OK(cuMemFree(b));
    double waited = api_now_ms() - t0;
    cr_assert(api_all_bytes((void *)a, 0xAB, 256 * KiB),
              "cuMemFree returned after %.0f ms, before the 200 ms fill had run", waited);
    cr_assert_geq(counters().ctx_sync_calls, 1, "strict mode synchronizes the context");
    OK(cuMemAlloc(&c, 64 * KiB));
    OK(cuMemsetD8(c, 0x11, 64 * KiB));
    OK(cuCtxSynchronize());
    api_sleep_ms(50);
    cr_assert(api_all_bytes((void *)c, 0x11, 64 * KiB), "the reused block was overwritten");
    OK(cuMemFree(a));
    OK(cuMemFree(c));
}

/* The freed block itself is the one the pending work writes. */
Test(barrier, strict_free_of_a_block_being_written)
{
    CUstream s;
    CUdeviceptr x, y;
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&x, 128 * KiB));
    OK(fakecuda_launch_fill(s, x, 0xEE, 128 * KiB, 200000));
    OK(cuMemFree(x));
    OK(cuMemAlloc(&y, 128 * KiB)); /* most likely x again */
    OK(cuMemsetD8(y, 0x22, 128 * KiB));
    OK(cuCtxSynchronize());
    api_sleep_ms(50);
    cr_assert(api_all_bytes((void *)y, 0x22, 128 * KiB),
              "a block freed while being written was overwritten after reuse (y %s x)",
              y == x ? "==" : "!=");
    OK(cuMemFree(y));
}

Test(barrier, fast_free_returns_at_once)
{
    CUstream s;
    CUdeviceptr a, b;
    setenv("GPUMEM_FREE_SYNC", "0", 1);
    api_start();
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    OK(cuMemAlloc(&a, 256 * KiB));
    OK(cuMemAlloc(&b, 64 * KiB));
    OK(cuMemsetD8(a, 0, 256 * KiB));
    fakecuda_reset_counters();
    double t0 = api_now_ms();
    OK(fakecuda_launch_fill(s, a, 0xAB, 256 * KiB, 400000));
    OK(cuMemFree(b));
    double took = api_now_ms() - t0;
    cr_assert_lt(took, 200.0, "fast-mode cuMemFree took %.0f ms", took);
#ifndef __SANITIZE_THREAD__
    /* Peeks at memory the pending fill will write: by timing alone (the fill's worker sleeps
     * first), which ThreadSanitizer rightly calls a race; the time taken above says the same. */
    cr_assert(api_all_bytes((void *)a, 0, 256 * KiB), "the fill cannot have run yet");
#endif
    cr_assert_eq(counters().ctx_sync_calls, 0, "fast mode must not synchronize the context");
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.frees, 1);
    cr_assert_eq(st.bytes_requested, 256 * KiB);
    OK(cuCtxSynchronize());
    cr_assert(api_all_bytes((void *)a, 0xAB, 256 * KiB));
    OK(cuMemFree(a));
}

/* GPUMEM_LIMIT=4MiB leaves room for two 2 MiB small segments: X (1 MiB) is freed while a 300 ms
 * fill on a non-blocking stream still targets it; 1 MiB allocations then take the rest of the
 * pool, and none may overlap X until the fill has completed. When the pool is exhausted the
 * manager waits for the fill and hands X out again. */
Test(barrier, fast_free_fences_reuse_of_a_block_being_written)
{
    CUstream s;
    CUdeviceptr x, p[8];
    int n = 0;
    bool reused = false;
    setenv("GPUMEM_FREE_SYNC", "0", 1);
    setenv("GPUMEM_LIMIT", "4MiB", 1);
    api_start();
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    OK(cuMemAlloc(&x, MiB));
    OK(cuMemsetD8(x, 0, MiB));
    double t0 = api_now_ms();
    OK(fakecuda_launch_fill(s, x, 0xCD, MiB, 300000));
    OK(cuMemFree(x));
    cr_assert_lt(api_now_ms() - t0, 150.0, "fast-mode cuMemFree waited");
    for (n = 0; n < 8; n++) {
        CUresult r = cuMemAlloc(&p[n], MiB);
        if (r == CUDA_ERROR_OUT_OF_MEMORY)
            break;
        cr_assert_eq(r, CUDA_SUCCESS, "cuMemAlloc #%d -> %d", n, r);
        if (overlaps(p[n], MiB, x, MiB)) {
            cr_assert(api_all_bytes((void *)x, 0xCD, MiB),
                      "allocation #%d (%#llx) overlaps the freed block %#llx after %.0f ms, "
                      "while the fill into it was still pending",
                      n, (unsigned long long)p[n], (unsigned long long)x, api_now_ms() - t0);
            reused = true;
        }
        memset((void *)p[n], 0x44, MiB);
    }
    cr_assert(reused, "X was never handed out again (%d blocks before OOM)", n);
    OK(cuCtxSynchronize());
    for (int i = 0; i < n; i++)
        cr_assert(api_all_bytes((void *)p[i], 0x44, MiB), "block %d overwritten", i);
    for (int i = 0; i < n; i++)
        OK(cuMemFree(p[i]));
}

/* After the work completed (cuCtxSynchronize), a block freed in fast mode is handed out again
 * once its fence, recorded by the first allocation that finds the bins empty, has completed; at
 * most one more segment is taken meanwhile. */
Test(barrier, fast_free_block_reusable_after_synchronize)
{
    CUstream s;
    CUdeviceptr x, p[6];
    int found = -1;
    setenv("GPUMEM_FREE_SYNC", "0", 1);
    api_start();
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    OK(cuMemAlloc(&x, MiB)); /* one 2 MiB small segment: x and 1 MiB free */
    OK(fakecuda_launch_fill(s, x, 0xCD, MiB, 100000));
    OK(cuMemFree(x));
    OK(cuCtxSynchronize());
    cr_assert(api_all_bytes((void *)x, 0xCD, MiB));
    fakecuda_reset_counters();
    int n;
    for (n = 0; n < 6 && found < 0; n++) {
        OK(cuMemAlloc(&p[n], MiB));
        if (p[n] == x)
            found = n;
        else
            cr_assert(!overlaps(p[n], MiB, x, MiB), "block %d overlaps x but is not x", n);
        /* the fence's events complete on the fake's stream threads: wait for them, since a fixed
         * sleep loses that race on a loaded machine */
        OK(cuCtxSynchronize());
    }
    cr_assert_geq(found, 0, "x %#llx was not reused in %d allocations", (unsigned long long)x, n);
    cr_assert_leq(counters().alloc_calls, 1, "the pool grew by %llu segments although x was free",
                  (unsigned long long)counters().alloc_calls);
    for (int i = 0; i < n; i++)
        OK(cuMemFree(p[i]));
}
