/* api_pinned: the pinned host memory pool behind cuMemAllocHost / cuMemHostAlloc / cuMemFreeHost
 * on the fake driver. The fake counts its host allocations (host_alloc_calls), so reuse is seen
 * as a call that did not happen. Leaks of pinned memory are checked in the exit report of an
 * api_child scenario, text and JSON. */
#include <pthread.h>

#include "misuse_capture.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)

static uint64_t host_calls(void)
{
    return counters().host_alloc_calls;
}

static void *host_alloc_ok(size_t size, unsigned flags)
{
    void *p = NULL;
    OK(cuMemHostAlloc(&p, size, flags));
    cr_assert_not_null(p);
    return p;
}

/* ---------------------------------------------------------------- reuse */

Test(pinned, freed_block_is_reused_without_a_driver_call)
{
    api_start();
    fakecuda_reset_counters();
    void *a = NULL;
    OK(cuMemAllocHost(&a, 10000));
    cr_assert_eq(host_calls(), 1);
    OK(cuMemFreeHost(a));
    void *b = NULL;
    OK(cuMemAllocHost(&b, 10000));
    cr_expect_eq(b, a, "the freed block comes back");
    cr_expect_eq(host_calls(), 1, "no second driver call for a pool hit");
    void *c = host_alloc_ok(9000, 0); /* same 12 KiB class, but b is live */
    cr_expect_neq(c, b);
    cr_expect_eq(host_calls(), 2);
    OK(cuMemFreeHost(c));
    void *d = host_alloc_ok(12000, 0); /* 9000 and 12000 share the 12 KiB class */
    cr_expect_eq(d, c);
    cr_expect_eq(host_calls(), 2);
    OK(cuMemFreeHost(b));
    OK(cuMemFreeHost(d));
}

Test(pinned, sizes_and_flags_are_kept_apart)
{
    api_start();
    fakecuda_reset_counters();
    void *plain = host_alloc_ok(4096, 0);
    OK(cuMemFreeHost(plain));
    void *big = host_alloc_ok(1 * MiB, 0);
    cr_expect_neq(big, plain, "a 1 MiB request never gets a 4 KiB block");
    cr_expect_eq(host_calls(), 2);
    void *mapped = host_alloc_ok(4096, CU_MEMHOSTALLOC_DEVICEMAP);
    void *wc = host_alloc_ok(4096, CU_MEMHOSTALLOC_WRITECOMBINED);
    cr_expect(mapped != plain && wc != plain, "other flags never get the plain block");
    cr_expect_eq(host_calls(), 4);
    /* Every pooled block is allocated PORTABLE, so PORTABLE and plain requests share blocks. */
    void *portable = host_alloc_ok(4096, CU_MEMHOSTALLOC_PORTABLE);
    cr_expect_eq(portable, plain);
    cr_expect_eq(host_calls(), 4);
    OK(cuMemFreeHost(mapped));
    void *mapped2 = host_alloc_ok(4096, CU_MEMHOSTALLOC_DEVICEMAP | CU_MEMHOSTALLOC_PORTABLE);
    cr_expect_eq(mapped2, mapped);
    void *wc_mapped = host_alloc_ok(4096, CU_MEMHOSTALLOC_WRITECOMBINED | CU_MEMHOSTALLOC_DEVICEMAP);
    cr_expect_eq(host_calls(), 5, "write-combined + mapped is a class of its own");
    OK(cuMemFreeHost(big));
    OK(cuMemFreeHost(wc));
    OK(cuMemFreeHost(portable));
    OK(cuMemFreeHost(mapped2));
    OK(cuMemFreeHost(wc_mapped));
}

Test(pinned, data_written_is_readable_and_copies_work)
{
    api_start();
    size_t n = 1 * MiB + 123;
    unsigned char *src = host_alloc_ok(n, 0), *dst = NULL;
    OK(cuMemAllocHost((void **)&dst, n));
    api_fill_pattern(src, n, 7);
    CUdeviceptr d = 0;
    OK(cuMemAlloc(&d, n));
    OK(cuMemcpyHtoD(d, src, n));
    memset(dst, 0, n);
    OK(cuMemcpyDtoH(dst, d, n));
    cr_expect_eq(api_check_pattern(dst, n, 7), n, "pinned -> device -> pinned round trip");
    /* A reused block is the same memory: what was written stays readable. */
    OK(cuMemFreeHost(src));
    unsigned char *again = host_alloc_ok(n, 0);
    cr_assert_eq(again, src);
    api_fill_pattern(again, n, 9);
    cr_expect_eq(api_check_pattern(again, n, 9), n);
    OK(cuMemFree(d));
    OK(cuMemFreeHost(again));
    OK(cuMemFreeHost(dst));
}

Test(pinned, driver_pointer_queries_work_on_pool_blocks)
{
    api_start();
    unsigned char *p = host_alloc_ok(5000, CU_MEMHOSTALLOC_DEVICEMAP);
    unsigned type = 0;
    OK(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)(p + 100)));
    cr_expect_eq(type, CU_MEMORYTYPE_HOST);
    CUdeviceptr start = 0;
    OK(cuPointerGetAttribute(&start, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, (CUdeviceptr)(uintptr_t)(p + 100)));
    cr_expect_eq(start, (CUdeviceptr)(uintptr_t)p, "a block is a whole driver allocation");
    OK(cuMemFreeHost(p));
}

/* ---------------------------------------------------------------- bad frees */

Test(pinned, free_null_is_success)
{
    api_start();
    OK(cuMemFreeHost(NULL));
}

Test(pinned, double_free_is_refused_and_logged)
{
    api_start();
    void *p = host_alloc_ok(4096, 0);
    OK(cuMemFreeHost(p));
    stderr_capture cap;
    capture_begin(&cap);
    CUresult rc = cuMemFreeHost(p);
    char *err = capture_end(&cap);
    cr_expect_eq(rc, CUDA_ERROR_INVALID_VALUE);
    cr_expect(strstr(err, "cuMemFreeHost(") && strstr(err, "double free") &&
                  strstr(err, "CUDA_ERROR_INVALID_VALUE"), "logged line:\n%s", err);
    cr_expect_eq(api_count_lines(err, "gpumem:"), 1, "one line:\n%s", err);
    free(err);
    /* The block is still pooled and works. */
    void *q = host_alloc_ok(4096, 0);
    cr_expect_eq(q, p);
    OK(cuMemFreeHost(q));
}

Test(pinned, interior_pointer_is_refused_and_the_block_stays_live)
{
    api_start();
    unsigned char *p = host_alloc_ok(8192, 0);
    memset(p, 0x5a, 8192);
    stderr_capture cap;
    capture_begin(&cap);
    CUresult rc = cuMemFreeHost(p + 64);
    char *err = capture_end(&cap);
    cr_expect_eq(rc, CUDA_ERROR_INVALID_VALUE);
    cr_expect(strstr(err, "points 64 bytes into the live pinned block"), "logged line:\n%s", err);
    free(err);
    cr_expect(api_all_bytes(p, 0x5a, 8192), "the block was not touched");
    OK(cuMemFreeHost(p));
}

Test(pinned, unknown_pointer_gets_the_drivers_answer)
{
    api_start();
    void *heap = malloc(4096);
    stderr_capture cap;
    capture_begin(&cap);
    CUresult rc = cuMemFreeHost(heap);
    char *err = capture_end(&cap);
    cr_expect_eq(rc, CUDA_ERROR_INVALID_VALUE, "the fake driver's answer");
    cr_expect_eq(strstr(err, "gpumem:"), NULL, "gpumem says nothing about memory it never saw:\n%s", err);
    free(err);
    free(heap);
}

/* ---------------------------------------------------------------- options */

Test(pinned, pool_off_passes_every_call_through)
{
    setenv("GPUMEM_PINNED_POOL", "0", 1);
    api_start();
    fakecuda_reset_counters();
    for (int i = 0; i < 3; i++) {
        void *p = NULL;
        OK(cuMemAllocHost(&p, 10000));
        OK(cuMemFreeHost(p));
    }
    cr_expect_eq(host_calls(), 3, "every allocation reached the driver");
    void *p = host_alloc_ok(10000, 0);
    OK(cuMemFreeHost(p));
    cr_expect_eq(cuMemFreeHost(p), CUDA_ERROR_INVALID_VALUE, "a double free gets the driver's answer");
    unsigned type = 0;
    cr_expect_eq(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)p),
                 CUDA_ERROR_INVALID_VALUE, "the memory went back to the driver");
}

Test(pinned, max_cached_hands_the_oldest_blocks_back)
{
    setenv("GPUMEM_PINNED_MAX_CACHED", "64KiB", 1);
    api_start();
    fakecuda_reset_counters();
    void *a = host_alloc_ok(48 * KiB, 0), *b = host_alloc_ok(48 * KiB, 0);
    OK(cuMemFreeHost(a));
    OK(cuMemFreeHost(b)); /* 96 KiB cached > 64 KiB: a, the older, goes back */
    unsigned type = 0;
    cr_expect_eq(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)a),
                 CUDA_ERROR_INVALID_VALUE, "the older block went back to the driver");
    OK(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)b));
    void *c = host_alloc_ok(48 * KiB, 0);
    cr_expect_eq(c, b, "the newer one stayed cached");
    cr_expect_eq(host_calls(), 2);
    void *d = host_alloc_ok(48 * KiB, 0);
    cr_expect_eq(host_calls(), 3, "nothing else was cached");
    /* A block larger than the limit is never kept. */
    void *huge = host_alloc_ok(128 * KiB, 0);
    OK(cuMemFreeHost(huge));
    void *huge2 = host_alloc_ok(128 * KiB, 0);
    cr_expect_eq(host_calls(), 5);
    OK(cuMemFreeHost(c));
    OK(cuMemFreeHost(d));
    OK(cuMemFreeHost(huge2));
}

Test(pinned, max_cached_zero_keeps_nothing)
{
    setenv("GPUMEM_PINNED_MAX_CACHED", "0", 1);
    api_start();
    fakecuda_reset_counters();
    for (int i = 0; i < 3; i++) OK(cuMemFreeHost(host_alloc_ok(4096, 0)));
    cr_expect_eq(host_calls(), 3);
}

/* ---------------------------------------------------------------- contexts */

Test(pinned, blocks_are_reused_only_in_their_own_context)
{
    CUcontext primary = api_start(), c1 = NULL;
    CUdevice dev;
    OK(cuDeviceGet(&dev, 0));
    fakecuda_reset_counters();
    void *p = host_alloc_ok(4096, 0);
    OK(cuMemFreeHost(p));
    OK(cuCtxCreate(&c1, NULL, 0, dev));
    void *q = host_alloc_ok(4096, 0);
    cr_expect_neq(q, p, "a block of the primary context is not handed to another context");
    cr_expect_eq(host_calls(), 2);
    OK(cuMemFreeHost(q));
    /* Destroying c1 frees its pinned memory in the driver: the pool forgets its cached block. */
    OK(cuCtxDestroy(c1));
    OK(cuCtxSetCurrent(primary));
    void *r = host_alloc_ok(4096, 0);
    cr_expect_eq(r, p, "the primary context's block is still there");
    void *s = host_alloc_ok(4096, 0);
    cr_expect_eq(host_calls(), 3, "c1's block was not reused");
    memset(s, 1, 4096); /* real memory */
    OK(cuMemFreeHost(r));
    OK(cuMemFreeHost(s));
}

Test(pinned, device_reset_forgets_the_pool)
{
    CUcontext primary = api_start();
    CUdevice dev;
    OK(cuDeviceGet(&dev, 0));
    void *p = host_alloc_ok(4096, 0);
    OK(cuMemFreeHost(p));
    OK(cuDevicePrimaryCtxReset(dev));
    OK(cuDevicePrimaryCtxRetain(&primary, dev));
    OK(cuCtxSetCurrent(primary));
    fakecuda_reset_counters();
    void *q = host_alloc_ok(4096, 0);
    cr_expect_eq(host_calls(), 1, "the reset freed the cached block; a new one comes from the driver");
    memset(q, 2, 4096);
    OK(cuMemFreeHost(q));
}

/* ---------------------------------------------------------------- stream capture */

/* Strict mode synchronizes the context in cuMemFreeHost, which a capturing stream forbids: a block
 * freed during a capture is synchronized when it is next handed out, after the capture. */
Test(pinned, a_free_during_capture_does_not_synchronize)
{
    CUstream s;
    CUgraph g;
    api_start();
    OK(cuStreamCreate(&s, 0));
    void *p = host_alloc_ok(4096, 0);
    fakecuda_reset_counters();
    OK(cuMemFreeHost(p));
    cr_assert_eq(counters().ctx_sync_calls, 1, "strict mode: cudaFreeHost's barrier");
    void *q = host_alloc_ok(4096, 0);
    cr_assert_eq(q, p);
    fakecuda_reset_counters();
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    OK(cuMemFreeHost(q));
    void *r = host_alloc_ok(4096, 0);
    cr_expect_neq(r, q, "not synchronized yet: not handed out during the capture");
    cr_expect_eq(counters().ctx_sync_calls, 0, "no synchronization while capturing");
    OK(cuStreamEndCapture(s, &g));
    void *t = host_alloc_ok(4096, 0);
    cr_expect_eq(t, q, "after the capture");
    cr_expect_eq(counters().ctx_sync_calls, 1, "synchronized when handed out");
    OK(cuMemFreeHost(r));
    OK(cuMemFreeHost(t));
}

/* ---------------------------------------------------------------- registered memory */

Test(pinned, registered_memory_goes_to_the_driver)
{
    api_start();
    void *mem = aligned_alloc(4096, 64 * KiB);
    OK(cuMemHostRegister(mem, 64 * KiB, 0));
    unsigned type = 0;
    OK(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)mem));
    cr_expect_eq(type, CU_MEMORYTYPE_HOST);
    stderr_capture cap;
    capture_begin(&cap);
    CUresult rc = cuMemFreeHost(mem);
    char *err = capture_end(&cap);
    cr_expect_eq(rc, CUDA_ERROR_INVALID_VALUE, "cuMemFreeHost of registered memory: the driver's answer");
    cr_expect_eq(strstr(err, "gpumem:"), NULL, "%s", err);
    free(err);
    OK(cuMemHostUnregister(mem));
    ERR(cuMemHostUnregister(mem), CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED);
    free(mem);
}

/* ---------------------------------------------------------------- fork */

static _Atomic bool churn_stop;

static void *churn(void *arg)
{
    CUcontext ctx = arg;
    cuCtxSetCurrent(ctx);
    while (!churn_stop) {
        void *p = NULL;
        if (cuMemHostAlloc(&p, 4096 + (size_t)(rand() % 3) * 4096, 0) == CUDA_SUCCESS) cuMemFreeHost(p);
    }
    return NULL;
}

static char *report_text(void)
{
    api_report_fn report = (api_report_fn)(uintptr_t)api_shim_sym("gpumem_report");
    cr_assert_not_null(report);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    report(f);
    fclose(f);
    return buf;
}

/* A fork child forgets the parent's pinned memory (it has no context), and the pool's lock is not
 * inherited held although another thread works the pool during every fork. */
Test(pinned, fork_child_forgets_the_parents_pool)
{
    setenv("GPUMEM_REPORT_FORMAT", "text", 1);
    CUcontext ctx = api_start();
    void *leak = host_alloc_ok(3000, 0);
    (void)leak;
    pthread_t t;
    pthread_create(&t, NULL, churn, ctx);
    for (int i = 0; i < 10; i++) {
        fflush(NULL);
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) { /* only gpumem is called here: the fake driver has no fork handling */
            alarm(10);
            double t0 = api_now_ms();
            char *text = report_text();
            bool quick = api_now_ms() - t0 < 1500; /* the report waits 2 s for a lock held elsewhere */
            bool clean = strstr(text, "pinned host memory") == NULL &&
                         strstr(text, "LEAK SUMMARY: 0 bytes leaked in 0 allocations");
            _exit(quick && clean ? 0 : 1);
        }
        int status = 0;
        cr_assert(api_wait_timeout(pid, &status, 20.0), "child %d hung", (int)pid);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child %d: status %#x", (int)pid, status);
    }
    churn_stop = true;
    pthread_join(t, NULL);
    char *text = report_text();
    cr_expect(strstr(text, "Leak of 3000 byte(s) in 1 allocation(s) of pinned host memory"), "%s", text);
    free(text);
}

/* ---------------------------------------------------------------- the exit report */

/* The scenario leaks 3000 B (cuMemAllocHost) and 5000 B (cuMemHostAlloc DEVICEMAP), frees 100 B
 * and frees it again (refused). */
Test(pinned, leaks_in_the_text_exit_report)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", NULL};
    api_child c = api_scenario_ok("pinned_leak", env);
    ASSERT_LEAKS(c.err, 8000, 2);
    const char *l5 = strstr(c.err, "Leak of 5000 byte(s) in 1 allocation(s) of pinned host memory allocated from:");
    const char *l3 = strstr(c.err, "Leak of 3000 byte(s) in 1 allocation(s) of pinned host memory allocated from:");
    cr_assert(l5 && l3 && l5 < l3, "largest first:\n%s", c.err);
    cr_expect(strstr(l5, "api_child+"), "the stack names the program:\n%s", c.err);
    cr_expect(strstr(c.err, "allocations 3, frees 1, pool hit rate 0.0% (0 hits, 3 misses)"),
              "%s", c.err);
    cr_expect(strstr(c.err, "pinned host (pooled): live 8000 B in 2 (peak 8100 B)"), "%s", c.err);
    cr_expect(strstr(c.err, "invalid frees 1\n"), "%s", c.err);
    cr_expect(strstr(c.out, "host_alloc_calls=3"), "%s", c.out);
    api_child_free(&c);
}

Test(pinned, leaks_in_the_json_exit_report)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", "GPUMEM_REPORT_FORMAT=json", NULL};
    api_child c = api_scenario_ok("pinned_leak", env);
    cr_expect(strstr(c.err, "{\"device\":0,\"memory\":\"pinned_host\",\"bytes\":5000,\"allocations\":1,"), "%s", c.err);
    cr_expect(strstr(c.err, "{\"device\":0,\"memory\":\"pinned_host\",\"bytes\":3000,\"allocations\":1,"), "%s", c.err);
    cr_expect(strstr(c.err, "\"summary\":{\"leaked_bytes\":8000,\"leaked_allocations\":2,"), "%s", c.err);
    cr_expect(strstr(c.err, "\"pinned\":{\"pool\":true,\"allocations\":3,\"frees\":1,\"pool_hits\":0,"
                            "\"pool_misses\":3,\"bytes_live\":8000,\"blocks_live\":2,"), "%s", c.err);
    cr_expect(strstr(c.err, "\"max_cached\":1073741824,"), "%s", c.err);
    cr_expect(strstr(c.err, "\"invalid_frees\":1,\"orphaned\":0,"), "%s", c.err);
    cr_expect(strstr(c.err, ",\"invalid_frees\":1}"), "the process-wide count:\n%s", c.err);
    api_child_free(&c);
}

Test(pinned, pool_off_still_reports_pinned_leaks)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", "GPUMEM_PINNED_POOL=0", NULL};
    api_child c = api_scenario_ok("pinned_leak", env);
    ASSERT_LEAKS(c.err, 8000, 2);
    cr_expect(strstr(c.err, "Leak of 5000 byte(s) in 1 allocation(s) of pinned host memory allocated from:"),
              "%s", c.err);
    cr_expect(strstr(c.err, "pinned host (pass-through): live 8000 B in 2"), "%s", c.err);
    cr_expect(strstr(c.err, "allocations 3, frees 1, pool hit rate 0.0% (0 hits, 0 misses)"), "%s", c.err);
    cr_expect(strstr(c.err, "driver allocs 3, frees 1"), "%s", c.err);
    cr_expect(strstr(c.out, "host_alloc_calls=3"), "%s", c.out);
    api_child_free(&c);
}
