/* misuse_free: frees the program gets wrong. A pool pointer freed twice, or a pointer inside a
 * block, is refused with CUDA_ERROR_INVALID_VALUE and one stderr line naming the pointer, and
 * nothing reaches the driver (which would free a whole pool segment); a pointer gpumem never
 * handed out gets the driver's own answer. */
#include "fakecuda.h"
#include "misuse_capture.h"

static void ptr_text(char *buf, size_t cap, CUdeviceptr p)
{
    snprintf(buf, cap, "%#llx", (unsigned long long)p);
}

Test(misuse_free, double_free_of_a_pool_block)
{
    CUdeviceptr p, keep;
    char hex[32];
    api_start();
    OK(cuMemAlloc(&keep, 4096));
    OK(cuMemAlloc(&p, 4096));
    OK(cuMemFree(p));
    fakecuda_reset_counters();
    stderr_capture cap;
    capture_begin(&cap);
    CUresult r = cuMemFree(p);
    char *err = capture_end(&cap);
    cr_assert_eq(r, CUDA_ERROR_INVALID_VALUE, "double free -> %d", r);
    ptr_text(hex, sizeof hex, p);
    cr_assert_eq(api_count_lines(err, hex), 1, "one line naming %s expected, got:\n%s", hex, err);
    cr_assert_eq(api_line_count(err), 1, "exactly one line expected, got:\n%s", err);
    cr_assert_eq(counters().free_calls, 0, "the double free reached the driver");
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.frees, 1);
    cr_assert_eq(st.bytes_requested, 4096);
    OK(cuMemsetD8(keep, 0x5A, 4096)); /* the segment is still there */
    cr_assert(api_all_bytes((void *)keep, 0x5A, 4096));
    free(err);
    OK(cuMemFree(keep));
}

Test(misuse_free, double_free_async_of_a_pool_block)
{
    CUdeviceptr p;
    CUstream s;
    char hex[32];
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&p, 8192));
    OK(cuMemFreeAsync(p, s));
    fakecuda_reset_counters();
    stderr_capture cap;
    capture_begin(&cap);
    CUresult r = cuMemFreeAsync(p, s);
    char *err = capture_end(&cap);
    cr_assert_eq(r, CUDA_ERROR_INVALID_VALUE);
    ptr_text(hex, sizeof hex, p);
    cr_assert_eq(api_count_lines(err, hex), 1, "%s", err);
    cr_assert_eq(counters().free_calls, 0);
    free(err);
}

Test(misuse_free, interior_pointer)
{
    CUdeviceptr p;
    char hex[32];
    unsigned char buf[8192];
    api_start();
    OK(cuMemAlloc(&p, 8192));
    api_fill_pattern(buf, sizeof buf, 77);
    OK(cuMemcpyHtoD(p, buf, sizeof buf));
    fakecuda_reset_counters();
    CUdeviceptr inner[] = {p + 512, p + 100, p + 8191};
    for (size_t i = 0; i < 3; i++) {
        stderr_capture cap;
        capture_begin(&cap);
        CUresult r = cuMemFree(inner[i]);
        char *err = capture_end(&cap);
        cr_assert_eq(r, CUDA_ERROR_INVALID_VALUE, "cuMemFree(p + %llu) -> %d",
                     (unsigned long long)(inner[i] - p), r);
        ptr_text(hex, sizeof hex, inner[i]);
        cr_assert_eq(api_count_lines(err, hex), 1, "one line naming %s expected:\n%s", hex, err);
        free(err);
    }
    cr_assert_eq(counters().free_calls, 0, "an interior pointer reached the driver");
    /* The block is still valid and whole. */
    CUdeviceptr base;
    size_t size;
    OK(cuMemGetAddressRange(&base, &size, p + 100));
    cr_assert_eq(base, p);
    cr_assert_eq(size, 8192);
    memset(buf, 0, sizeof buf);
    OK(cuMemcpyDtoH(buf, p, sizeof buf));
    cr_assert_eq(api_check_pattern(buf, sizeof buf, 77), sizeof buf);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.frees, 0);
    cr_assert_eq(st.bytes_requested, 8192);
    OK(cuMemFree(p));
}

Test(misuse_free, unknown_pointer_gets_the_drivers_answer)
{
    CUdeviceptr p;
    api_start();
    OK(cuMemAlloc(&p, 4096));
    fakecuda_reset_counters();
    ERR(cuMemFree((CUdeviceptr)0xdead0000), CUDA_ERROR_INVALID_VALUE);
    cr_assert_eq(counters().free_calls, 1, "an unknown pointer is the driver's business");
    OK(cuMemFree(0)); /* free(NULL) semantics, the driver's */
    cr_assert_eq(counters().free_calls, 2);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.frees, 0);
    OK(cuMemFree(p));
}
