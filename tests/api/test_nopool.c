/* api_nopool: GPUMEM_POOL=0 keeps tracking and limits only: every cuMemAlloc reaches the driver,
 * every cuMemFree too, the limit is still enforced and leaks are still reported exactly. */
#include "api_test.h"
#include "fakecuda.h"

#define MiB ((size_t)1 << 20)

static fakecuda_counters_t counters(void)
{
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    return c;
}

Test(nopool, every_call_reaches_the_driver)
{
    CUdeviceptr p[50];
    setenv("GPUMEM_POOL", "0", 1);
    api_start();
    fakecuda_reset_counters();
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < 50; i++) {
            size_t n = 1 + (size_t)i * 3001;
            OK(cuMemAlloc(&p[i], n));
            OK(cuMemsetD8(p[i], (unsigned char)i, n));
        }
        for (int i = 0; i < 50; i++)
            cr_assert(api_all_bytes((void *)p[i], (unsigned char)i, 1 + (size_t)i * 3001), "block %d", i);
        for (int i = 0; i < 50; i++)
            OK(cuMemFree(p[i]));
    }
    fakecuda_counters_t k = counters();
    cr_assert_eq(k.alloc_calls, 100, "every cuMemAlloc reaches the driver");
    cr_assert_eq(k.free_calls, 100, "every cuMemFree reaches the driver");
    cr_assert_eq(k.bytes_in_use, 0, "nothing cached");
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 100);
    cr_assert_eq(st.frees, 100);
    cr_assert_eq(st.pool_hits, 0);
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.bytes_reserved, 0);
}

Test(nopool, pitch_and_address_range)
{
    CUdeviceptr p, base;
    size_t pitch, size;
    setenv("GPUMEM_POOL", "0", 1);
    api_start();
    fakecuda_reset_counters();
    OK(cuMemAllocPitch(&p, &pitch, 1000, 10, 8));
    cr_assert_geq(pitch, 1000);
    cr_assert_eq(pitch % 512, 0);
    cr_assert_eq(counters().alloc_calls, 1);
    OK(cuMemGetAddressRange(&base, &size, p + 5000));
    cr_assert_eq(base, p);
    cr_assert_eq(size, pitch * 10);
    OK(cuMemFree(p));
    cr_assert_eq(counters().free_calls, 1);
}

Test(nopool, limit_still_enforced)
{
    CUdeviceptr a, b, c;
    setenv("GPUMEM_POOL", "0", 1);
    setenv("GPUMEM_LIMIT", "16MiB", 1);
    api_start();
    fakecuda_reset_counters();
    OK(cuMemAlloc(&a, 10 * MiB));
    ERR(cuMemAlloc(&b, 10 * MiB), CUDA_ERROR_OUT_OF_MEMORY);
    cr_assert_eq(counters().alloc_calls, 1, "a request over the limit never reaches the driver");
    OK(cuMemAlloc(&c, 6 * MiB));
    ERR(cuMemAlloc(&b, 1), CUDA_ERROR_OUT_OF_MEMORY);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.limit_bytes, 16 * MiB);
    cr_assert_eq(st.bytes_reserved, 16 * MiB);
    cr_assert_geq(st.limit_rejections, 2);
    OK(cuMemFree(a));
    OK(cuMemAlloc(&b, 10 * MiB));
    OK(cuMemFree(b));
    OK(cuMemFree(c));
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_reserved, 0);
    size_t free_b, total;
    OK(cuMemGetInfo(&free_b, &total));
    cr_assert_eq(total, 16 * MiB);
    cr_assert_eq(free_b, 16 * MiB);
}

Test(nopool, leaks_reported_exactly)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", "GPUMEM_POOL=0", NULL};
    api_child c = api_scenario_ok("leak3", env);
    ASSERT_LEAKS(c.err, 6000, 3);
    cr_assert(strstr(c.out, "alloc_calls=4 free_calls=1"), "every call reached the driver: %s", c.out);
    api_child_free(&c);
}
