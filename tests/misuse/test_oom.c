/* misuse_oom: running out of memory. The device refusing (FAKECUDA_FAIL_ALLOC_AFTER) and the
 * limit refusing both give CUDA_ERROR_OUT_OF_MEMORY cleanly: nothing is half-allocated, nothing
 * leaks, and the process goes on. */
#include "fakecuda.h"
#include "misuse_capture.h"

#define MiB ((size_t)1 << 20)

Test(misuse_oom, device_out_of_memory)
{
    CUdeviceptr a, b;
    setenv("FAKECUDA_FAIL_ALLOC_AFTER", "1", 1);
    api_start();
    OK(cuMemAlloc(&a, 4096));
    ERR(cuMemAlloc(&b, 8 * MiB), CUDA_ERROR_OUT_OF_MEMORY);
    ERR(cuMemAlloc(&b, 2 * MiB), CUDA_ERROR_OUT_OF_MEMORY);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 1);
    cr_assert_eq(st.bytes_requested, 4096);
    cr_assert_geq(st.backend_ooms, 1);
    cr_assert_eq(st.bytes_reserved, counters().bytes_in_use,
                 "reserved %llu but the device holds %llu: a failed request left a reservation",
                 (unsigned long long)st.bytes_reserved, (unsigned long long)counters().bytes_in_use);
    OK(cuMemsetD8(a, 0x42, 4096));
    cr_assert(api_all_bytes((void *)a, 0x42, 4096));
    OK(cuMemFree(a));
    api_release_cached_fn release = (api_release_cached_fn)(uintptr_t)api_shim_sym("gpumem_release_cached");
    cr_assert_not_null(release);
    release();
    cr_assert_eq(counters().bytes_in_use, 0, "everything handed back");
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_reserved, 0);
}

Test(misuse_oom, device_out_of_memory_leaks_nothing)
{
    const char *env[] = {"FAKECUDA_FAIL_ALLOC_AFTER=1", "GPUMEM_REPORT=stderr", NULL};
    api_child c = api_scenario_ok("device_oom", env);
    ASSERT_LEAKS(c.err, 0, 0);
    api_child_free(&c);
}

Test(misuse_oom, limit_smaller_than_the_request)
{
    CUdeviceptr p;
    setenv("GPUMEM_LIMIT", "1MiB", 1);
    api_start();
    fakecuda_reset_counters();
    ERR(cuMemAlloc(&p, 2 * MiB), CUDA_ERROR_OUT_OF_MEMORY);
    ERR(cuMemAlloc(&p, 1 * MiB + 1), CUDA_ERROR_OUT_OF_MEMORY);
    cr_assert_eq(counters().alloc_calls, 0, "a request over the limit never reaches the device");
    gpumem_stats st = api_stats_or_fail();
    cr_assert_geq(st.limit_rejections, 2);
    cr_assert_eq(st.bytes_reserved, 0);
    cr_assert_eq(st.allocations, 0);
}

/* A limit below the 2 MiB small-segment size must still serve requests that fit under it: the
 * documentation says only an allocation that would cross the limit fails. */
Test(misuse_oom, small_request_under_a_tiny_limit)
{
    CUdeviceptr p;
    setenv("GPUMEM_LIMIT", "1MiB", 1);
    api_start();
    OK(cuMemAlloc(&p, 4096));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_leq(st.bytes_reserved, MiB);
    OK(cuMemFree(p));
}
