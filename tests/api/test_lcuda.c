/* api_lcuda: a program linked with -lcuda (the fake), run with the shim preloaded, so its driver
 * calls bind to the shim's exported hooks: pooling, the data path, pointer queries, memory info
 * under a limit, pitch, managed and stream-ordered allocations, stream-ordered frees of pool
 * blocks, and the copy counters of the exit report. */
#include "api_test.h"
#include "fakecuda.h"

#define MiB ((size_t)1 << 20)

static fakecuda_counters_t counters(void)
{
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    return c;
}

/* ---------------------------------------------------------------- pooling and the data path */

#define NBLOCKS 300

static size_t block_size(int i)
{
    if (i % 10 == 9) /* large class: 1 MiB + something, up to ~3 MiB */
        return MiB + 1 + (size_t)(i * 7919) % (2 * MiB);
    return 1 + (size_t)(i * 104729) % 65536;
}

Test(lcuda, many_sizes_are_pooled_and_round_trip)
{
    static CUdeviceptr p[NBLOCKS];
    static unsigned char buf[3 * MiB + 4096];
    api_start();
    fakecuda_reset_counters();
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < NBLOCKS; i++) {
            size_t n = block_size(i);
            OK(cuMemAlloc(&p[i], n));
            cr_assert_eq(p[i] % 512, 0, "block %d at %#llx is not 512-B aligned", i,
                         (unsigned long long)p[i]);
            api_fill_pattern(buf, n, (uint32_t)(round * NBLOCKS + i));
            OK(cuMemcpyHtoD(p[i], buf, n));
        }
        /* No two live blocks overlap, and every block still holds its own data. */
        for (int i = 0; i < NBLOCKS; i++)
            for (int j = i + 1; j < NBLOCKS; j++)
                if (!(p[i] + block_size(i) <= p[j] || p[j] + block_size(j) <= p[i]))
                    cr_assert_fail("blocks %d and %d overlap", i, j);
        for (int i = 0; i < NBLOCKS; i++) {
            size_t n = block_size(i);
            memset(buf, 0, n);
            OK(cuMemcpyDtoH(buf, p[i], n));
            size_t bad = api_check_pattern(buf, n, (uint32_t)(round * NBLOCKS + i));
            cr_assert_eq(bad, n, "block %d (%zu B) corrupted at byte %zu", i, n, bad);
        }
        gpumem_stats st = api_stats_or_fail();
        cr_assert_eq(st.allocations, (uint64_t)(round + 1) * NBLOCKS);
        cr_assert_eq(st.frees, (uint64_t)round * NBLOCKS);
        for (int i = 0; i < NBLOCKS; i++)
            OK(cuMemFree(p[i]));
    }
    gpumem_stats st = api_stats_or_fail();
    fakecuda_counters_t k = counters();
    cr_assert_eq(st.allocations, 2 * NBLOCKS);
    cr_assert_eq(st.frees, 2 * NBLOCKS);
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.bytes_allocated, 0);
    cr_assert_eq(st.pool_hits + st.pool_misses, 2 * NBLOCKS, "hits %llu misses %llu",
                 (unsigned long long)st.pool_hits, (unsigned long long)st.pool_misses);
    cr_assert_geq(st.pool_hits, NBLOCKS, "the second round must be served from the pool");
    cr_assert_lt(k.alloc_calls * 10, 2 * NBLOCKS,
                 "%llu driver allocations for %d cuMemAlloc calls: no pooling",
                 (unsigned long long)k.alloc_calls, 2 * NBLOCKS);
    cr_assert_eq(k.free_calls, 0, "pool blocks must not be freed to the driver");
    cr_assert_gt(st.bytes_reserved, 0);
    cr_assert_eq(st.bytes_cached_free, st.bytes_reserved, "everything is free and cached");
}

/* A pointer fetched with cuGetProcAddress and the -lcuda export are the same hook: every
 * allocation is counted once, whichever way it was made. */
Test(lcuda, getproc_and_export_count_once)
{
    void *fn = NULL;
    CUdriverProcAddressQueryResult q;
    api_start();
    OK(cuGetProcAddress("cuMemAlloc", &fn, 13000, 0, &q));
    cr_assert_eq(q, CU_GET_PROC_ADDRESS_SUCCESS);
    cr_assert_eq(fn, (void *)(uintptr_t)&cuMemAlloc_v2,
                 "cuGetProcAddress(cuMemAlloc) must be the hook the -lcuda export binds to");
    CUresult (*alloc)(CUdeviceptr *, size_t) = (CUresult(*)(CUdeviceptr *, size_t))(uintptr_t)fn;
    OK(cuGetProcAddress("cuMemFree", &fn, 13000, 0, &q));
    CUresult (*release)(CUdeviceptr) = (CUresult(*)(CUdeviceptr))(uintptr_t)fn;
    CUdeviceptr a[20];
    for (int i = 0; i < 10; i++)
        OK(cuMemAlloc(&a[i], 1000 + (size_t)i));
    for (int i = 10; i < 20; i++)
        OK(alloc(&a[i], 1000 + (size_t)i));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 20);
    for (int i = 0; i < 20; i += 2)
        OK(release(a[i]));
    for (int i = 1; i < 20; i += 2)
        OK(cuMemFree(a[i]));
    st = api_stats_or_fail();
    cr_assert_eq(st.frees, 20);
    cr_assert_eq(st.bytes_requested, 0);
}

/* ---------------------------------------------------------------- pointer queries */

Test(lcuda, address_range_of_interior_pointers)
{
    CUdeviceptr a, b, c, base = 0;
    size_t size = 0;
    api_start();
    OK(cuMemAlloc(&a, 10000));
    OK(cuMemAlloc(&b, 3 * MiB + 5));
    OK(cuMemAlloc(&c, 1));
    OK(cuMemGetAddressRange(&base, &size, a + 1234));
    cr_assert_eq(base, a);
    cr_assert_eq(size, 10000, "the requested size, not the block's or the segment's");
    OK(cuMemGetAddressRange(&base, &size, a));
    cr_assert_eq(base, a);
    cr_assert_eq(size, 10000);
    OK(cuMemGetAddressRange(&base, &size, a + 9999));
    cr_assert_eq(base, a);
    OK(cuMemGetAddressRange(&base, &size, b + 2 * MiB + 7));
    cr_assert_eq(base, b);
    cr_assert_eq(size, 3 * MiB + 5);
    OK(cuMemGetAddressRange(&base, &size, c));
    cr_assert_eq(base, c);
    cr_assert_eq(size, 1);
    OK(cuMemGetAddressRange(NULL, &size, a + 5));
    cr_assert_eq(size, 10000);

    CUdeviceptr start = 0;
    size_t rsize = 0;
    OK(cuPointerGetAttribute(&start, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, a + 1234));
    cr_assert_eq(start, a);
    OK(cuPointerGetAttribute(&rsize, CU_POINTER_ATTRIBUTE_RANGE_SIZE, a + 1234));
    cr_assert_eq(rsize, 10000);
    OK(cuPointerGetAttribute(&start, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, b + MiB));
    cr_assert_eq(start, b);
    OK(cuPointerGetAttribute(&rsize, CU_POINTER_ATTRIBUTE_RANGE_SIZE, b + MiB));
    cr_assert_eq(rsize, 3 * MiB + 5);
    int ordinal = -1;
    OK(cuPointerGetAttribute(&ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, a + 1234));
    cr_assert_eq(ordinal, 0, "other attributes are the driver's");

    CUpointer_attribute attrs[2] = {CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                                    CU_POINTER_ATTRIBUTE_RANGE_SIZE};
    start = 0;
    rsize = 0;
    void *data[2] = {&start, &rsize};
    OK(cuPointerGetAttributes(2, attrs, data, c));
    cr_assert_eq(start, c);
    cr_assert_eq(rsize, 1);

    OK(cuMemFree(a));
    ERR(cuMemGetAddressRange(&base, &size, a + 1234), CUDA_ERROR_NOT_FOUND);
    OK(cuMemFree(b));
    OK(cuMemFree(c));
}

/* ---------------------------------------------------------------- limits */

Test(lcuda, mem_info_under_a_limit)
{
    size_t free0 = 0, total = 0, free1 = 0, free2 = 0;
    CUdeviceptr a, b, big;
    setenv("GPUMEM_LIMIT", "256MiB", 1);
    api_start();
    OK(cuMemGetInfo(&free0, &total));
    cr_assert_eq(total, 256 * MiB, "total is the limit: %zu", total);
    cr_assert_eq(free0, 256 * MiB, "nothing taken yet: %zu", free0);
    OK(cuMemAlloc(&a, 64 * MiB));
    OK(cuMemGetInfo(&free1, &total));
    cr_assert_eq(total, 256 * MiB);
    cr_assert_leq(free1, free0 - 64 * MiB, "free %zu after taking 64 MiB of %zu", free1, free0);
    OK(cuMemAlloc(&b, 100 * MiB));
    OK(cuMemGetInfo(&free2, &total));
    cr_assert_leq(free2, free1 - 100 * MiB, "free %zu after taking 100 MiB more of %zu", free2, free1);

    ERR(cuMemAlloc(&big, 300 * MiB), CUDA_ERROR_OUT_OF_MEMORY);
    ERR(cuMemAlloc(&big, 100 * MiB), CUDA_ERROR_OUT_OF_MEMORY);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.limit_bytes, 256 * MiB);
    cr_assert_geq(st.limit_rejections, 2);
    cr_assert_leq(st.bytes_reserved, 256 * MiB);

    /* The process goes on: its blocks still work, and freed (cached) memory is handed back to
     * make room for a request the limit would otherwise refuse. */
    OK(cuMemsetD8(a + 63 * MiB, 0x3C, MiB));
    cr_assert(api_all_bytes((void *)(a + 63 * MiB), 0x3C, MiB));
    OK(cuMemFree(a));
    OK(cuMemFree(b));
    OK(cuMemAlloc(&big, 200 * MiB));
    OK(cuMemsetD8(big + 199 * MiB, 0x11, MiB));
    OK(cuMemFree(big));
    st = api_stats_or_fail();
    cr_assert_leq(st.bytes_reserved_peak, 256 * MiB, "peak %llu over the limit",
                  (unsigned long long)st.bytes_reserved_peak);
}

Test(lcuda, pitch_is_padded_and_pooled)
{
    CUdeviceptr p, q, base;
    size_t pitch = 0, pitch2 = 0, size = 0;
    api_start();
    fakecuda_reset_counters();
    OK(cuMemAllocPitch(&p, &pitch, 1000, 10, 4));
    cr_assert_geq(pitch, 1000);
    cr_assert_eq(pitch % 512, 0, "pitch %zu", pitch);
    OK(cuMemAllocPitch(&q, &pitch2, 513, 7, 16));
    cr_assert_eq(pitch2, 1024);
    OK(cuMemGetAddressRange(&base, &size, p + pitch * 9 + 999));
    cr_assert_eq(base, p);
    cr_assert_geq(size, pitch * 10);
    static unsigned char buf[16384];
    api_fill_pattern(buf, pitch * 10, 3);
    OK(cuMemcpyHtoD(p, buf, pitch * 10));
    memset(buf, 0, sizeof buf);
    OK(cuMemcpyDtoH(buf, p, pitch * 10));
    cr_assert_eq(api_check_pattern(buf, pitch * 10, 3), pitch * 10);
    cr_assert_eq(counters().alloc_calls, 1, "two pitched allocations, one pool segment");
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 2);
    OK(cuMemFree(p));
    OK(cuMemFree(q));
}

/* Managed and stream-ordered allocations count against the limit. */
Test(lcuda, managed_and_async_count_against_the_limit)
{
    CUdeviceptr m, a, p;
    CUstream s;
    setenv("GPUMEM_LIMIT", "64MiB", 1);
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAllocManaged(&m, 40 * MiB, CU_MEM_ATTACH_GLOBAL));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 1, "the managed allocation is tracked");
    cr_assert_eq(st.bytes_requested, 40 * MiB);
    cr_assert_geq(st.bytes_reserved, 40 * MiB);
    ERR(cuMemAlloc(&p, 30 * MiB), CUDA_ERROR_OUT_OF_MEMORY);
    ERR(cuMemAllocAsync(&a, 30 * MiB, s), CUDA_ERROR_OUT_OF_MEMORY);
    ERR(cuMemAllocManaged(&a, 30 * MiB, CU_MEM_ATTACH_GLOBAL), CUDA_ERROR_OUT_OF_MEMORY);
    OK(cuMemFree(m));
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.frees, 1);

    OK(cuMemAllocAsync(&a, 40 * MiB, s));
    ERR(cuMemAlloc(&p, 30 * MiB), CUDA_ERROR_OUT_OF_MEMORY);
    OK(cuMemsetD8Async(a, 0x77, 40 * MiB, s));
    OK(cuStreamSynchronize(s));
    cr_assert(api_all_bytes((void *)a, 0x77, 40 * MiB));
    OK(cuMemFreeAsync(a, s));
    OK(cuStreamSynchronize(s));
    OK(cuMemAlloc(&p, 30 * MiB));
    OK(cuMemFree(p));
    st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 3);
    cr_assert_eq(st.frees, 3);
    cr_assert_eq(st.bytes_requested, 0);
}

/* ---------------------------------------------------------------- stream-ordered frees */

Test(lcuda, free_async_of_a_pool_block)
{
    CUdeviceptr p, q;
    CUstream s;
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&p, MiB));
    fakecuda_reset_counters();
    OK(fakecuda_launch_fill(s, p, 0x5D, MiB, 100000));
    OK(cuMemFreeAsync(p, s));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.frees, 1);
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(counters().free_calls, 0, "a pool block is never freed to the driver");
    /* The block may be reused once the stream has passed the free: the fill is over then. */
    OK(cuMemAlloc(&q, MiB));
    if (q == p)
        cr_assert(api_all_bytes((void *)p, 0x5D, MiB), "block reused before its stream's work ran");
    OK(cuMemsetD8(q, 0x01, MiB));
    OK(cuCtxSynchronize());
    cr_assert(api_all_bytes((void *)q, 0x01, MiB), "reused block overwritten by earlier work");
    ERR(cuMemFreeAsync(p == q ? 0xdead000 : p, s), CUDA_ERROR_INVALID_VALUE);
    OK(cuMemFreeAsync(q, s));
    OK(cuStreamSynchronize(s));
    st = api_stats_or_fail();
    cr_assert_eq(st.frees, 2);

    /* The per-thread default stream variant, 0 meaning that thread's stream. */
    OK(cuMemAlloc(&p, 4096));
    OK(cuMemFreeAsync_ptsz(p, 0));
    st = api_stats_or_fail();
    cr_assert_eq(st.frees, 3);
    cr_assert_eq(st.bytes_requested, 0);
}

/* ---------------------------------------------------------------- the exit report */

Test(lcuda, exit_report_counts_copies)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", NULL};
    api_child c = api_scenario_ok("copies", env);
    /* The unified cuMemcpy between two device buffers is classified: it counts as D2D. */
    const char *want = "copies on device 0: H2D 2064 B in 3 calls, D2H 500 B in 1 calls, D2D 400 B in 2 calls";
    cr_assert_eq(api_count_lines(c.err, "copies on device"), 1, "one copies line expected in:\n%s", c.err);
    cr_assert(strstr(c.err, want), "expected '%s' in:\n%s", want, c.err);
    ASSERT_LEAKS(c.err, 0, 0);
    api_child_free(&c);
}

Test(lcuda, managed_and_async_freed_are_not_leaks)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", "GPUMEM_LIMIT=64MiB", NULL};
    api_child c = api_scenario_ok("managed_async", env);
    ASSERT_LEAKS(c.err, 0, 0);
    api_child_free(&c);
    c = api_scenario_ok("managed_async_leak", env);
    ASSERT_LEAKS(c.err, 3000, 2);
    api_child_free(&c);
}
