/* api_alloc_kinds: the allocations gpumem does not pool but must still count and limit — VMM
 * handles (cuMemCreate, JAX's platform allocator), allocations from an explicit memory pool
 * (cuMemAllocFromPoolAsync, per-thread-stream variant too) — and what happens when the driver
 * refuses one of them: the limit's reservation is given back, nothing is tracked, and the
 * program gets the driver's own error. Also: a flood of invalid frees is logged only up to the
 * cap, and every one of them still gets CUDA_ERROR_INVALID_VALUE. */
#include "api_test.h"
#include "fakecuda.h"

#define MiB ((size_t)1 << 20)

static CUmemAllocationProp device_prop(void)
{
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;
    return prop;
}

Test(alloc_kinds, vmm_handles_are_tracked_and_released)
{
    api_start();
    CUmemAllocationProp prop = device_prop();
    CUmemGenericAllocationHandle h;
    OK(cuMemCreate(&h, 2 * MiB, &prop, 0));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 2 * MiB, "the handle's bytes count as allocated");
    cr_assert_eq(st.allocations, 1);
    OK(cuMemRelease(h));
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.frees, 1);
}

Test(alloc_kinds, vmm_handle_over_the_limit_is_refused_without_a_driver_call)
{
    setenv("GPUMEM_LIMIT", "4MiB", 1);
    api_start();
    CUmemAllocationProp prop = device_prop();
    CUmemGenericAllocationHandle h;
    fakecuda_reset_counters();
    ERR(cuMemCreate(&h, 8 * MiB, &prop, 0), CUDA_ERROR_OUT_OF_MEMORY);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.limit_rejections, 1);
    cr_assert_eq(st.bytes_requested, 0);
    OK(cuMemCreate(&h, 2 * MiB, &prop, 0));
    OK(cuMemRelease(h));
}

/* The driver refuses (here: fault injection): the reservation made for the limit goes back. */
Test(alloc_kinds, vmm_handle_the_driver_refuses_is_not_tracked)
{
    setenv("GPUMEM_LIMIT", "4MiB", 1);
    setenv("FAKECUDA_FAIL_ALLOC_AFTER", "0", 1);
    api_start();
    CUmemAllocationProp prop = device_prop();
    CUmemGenericAllocationHandle h;
    ERR(cuMemCreate(&h, 2 * MiB, &prop, 0), CUDA_ERROR_OUT_OF_MEMORY);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.allocations, 0);
    cr_assert_eq(st.limit_rejections, 0, "the limit did not refuse it: the driver did");
}

Test(alloc_kinds, managed_allocation_the_driver_refuses_is_not_tracked)
{
    setenv("FAKECUDA_FAIL_ALLOC_AFTER", "0", 1);
    api_start();
    CUdeviceptr p;
    ERR(cuMemAllocManaged(&p, MiB, CU_MEM_ATTACH_GLOBAL), CUDA_ERROR_OUT_OF_MEMORY);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 0);
    cr_assert_eq(st.bytes_requested, 0);
}

static void from_pool(bool per_thread)
{
    api_start();
    CUstream s;
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    CUmemoryPool pool = (CUmemoryPool)(uintptr_t)0x1234; /* the fake takes any pool */
    CUdeviceptr p;
    typedef CUresult (*from_pool_fn)(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
    typedef CUresult (*free_fn)(CUdeviceptr, CUstream);
    from_pool_fn alloc = (from_pool_fn)dlsym(RTLD_DEFAULT, per_thread ? "cuMemAllocFromPoolAsync_ptsz"
                                                                     : "cuMemAllocFromPoolAsync");
    free_fn release = (free_fn)dlsym(RTLD_DEFAULT, per_thread ? "cuMemFreeAsync_ptsz" : "cuMemFreeAsync");
    cr_assert(alloc && release);
    OK(alloc(&p, 3 * MiB, pool, per_thread ? NULL : s));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 3 * MiB, "an allocation from an explicit pool is counted");
    cr_assert_eq(st.segments, 0, "and not pooled by gpumem");
    OK(release(p, per_thread ? NULL : s));
    OK(cuStreamSynchronize(s));
    cr_assert_eq(api_stats_or_fail().bytes_requested, 0);
}

Test(alloc_kinds, allocation_from_an_explicit_pool_is_tracked)
{
    from_pool(false);
}

Test(alloc_kinds, allocation_from_an_explicit_pool_ptsz_is_tracked)
{
    from_pool(true);
}

/* More invalid frees than the log cap: every one is refused, the log stops after 100 lines and
 * says so once (a loop of bad frees must not flood a service's log). */
Test(alloc_kinds, invalid_free_flood_is_refused_and_capped_in_the_log)
{
    api_start();
    CUdeviceptr p;
    OK(cuMemAlloc(&p, 4096));
    char path[] = "/tmp/gpumem-flood-XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    fflush(stderr);
    int saved = dup(2);
    dup2(fd, 2);
    for (int i = 0; i < 120; i++)
        ERR(cuMemFree(p + 512), CUDA_ERROR_INVALID_VALUE);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    close(fd);
    char *log = api_read_file(path);
    unlink(path);
    cr_assert(log);
    cr_assert_eq(api_count_lines(log, "not a live allocation"), 100, "%s", log);
    cr_assert_eq(api_count_lines(log, "further invalid frees are not logged"), 1);
    free(log);
    OK(cuMemFree(p));
}
