/* api_copies: checked and counted copies (issue 5, parts 1 and 2), through the real preload path
 * on the fake driver.
 *
 * Checks: every copy and memset entry point refuses a range that starts in freed pool memory or
 * runs past the end of its allocation (its requested size, what cuMemGetAddressRange reports)
 * with CUDA_ERROR_INVALID_VALUE and one logged line naming the call, followed by the caller's
 * stack; nothing of it reaches the driver; it is counted. In-range interior copies go through
 * with the right data; memory gpumem does not pool gets the driver's own answer;
 * GPUMEM_CHECK_COPIES=0 lets everything through.
 *
 * Counters: exact calls, bytes and timed (blocking) calls per device, direction (H2D, D2H, D2D,
 * H2H) and host-memory kind (pageable, pinned), in gpumem_get_copy_stats and in the report. */
#include <pthread.h>

#include "fakecuda.h"
#include "misuse_capture.h"

/* ---------------------------------------------------------------- helpers */

typedef gpumem_status (*copy_stats_fn)(int device, gpumem_copy_stats *out);

static gpumem_copy_stats copy_stats(int device)
{
    copy_stats_fn fn = (copy_stats_fn)(uintptr_t)api_shim_sym("gpumem_get_copy_stats");
    cr_assert_not_null(fn, "gpumem_get_copy_stats is not reachable: is the shim preloaded?");
    gpumem_copy_stats st;
    cr_assert_eq(fn(device, &st), GPUMEM_OK);
    return st;
}

static void hex(char *buf, size_t cap, uintptr_t p)
{
    snprintf(buf, cap, "%#llx", (unsigned long long)p);
}

/* The expected counters, kept as the test makes its copies. */
static void expect(gpumem_copy_stats *e, gpumem_copy_direction d, gpumem_host_memory k, size_t bytes,
                   bool timed)
{
    /* The copies of the counter test touch the same bytes from unordered streams (the per-thread
     * stream, a program stream): wait for each before the next, since only the counters are under
     * test here and ThreadSanitizer rightly calls overlapping DMAs a race. */
    cr_assert_eq(cuCtxSynchronize(), CUDA_SUCCESS);
    gpumem_copy_counter *cs[2] = {&e->total[d], d == GPUMEM_COPY_D2D ? NULL : &e->host[d][k]};
    for (int i = 0; i < 2 && cs[i]; i++) {
        cs[i]->calls++;
        cs[i]->bytes += bytes;
        if (timed) {
            cs[i]->timed_calls++;
            cs[i]->timed_bytes += bytes;
        }
    }
}

static const char *const dir_name[] = {"H2D", "D2H", "D2D", "H2H"};
static const char *const kind_name[] = {"pageable", "pinned"};

static void assert_counter(const gpumem_copy_counter *got, const gpumem_copy_counter *want, const char *what)
{
    cr_assert_eq(got->calls, want->calls, "%s calls: %llu, want %llu", what, (unsigned long long)got->calls,
                 (unsigned long long)want->calls);
    cr_assert_eq(got->bytes, want->bytes, "%s bytes: %llu, want %llu", what, (unsigned long long)got->bytes,
                 (unsigned long long)want->bytes);
    cr_assert_eq(got->timed_calls, want->timed_calls, "%s timed calls: %llu, want %llu", what,
                 (unsigned long long)got->timed_calls, (unsigned long long)want->timed_calls);
    cr_assert_eq(got->timed_bytes, want->timed_bytes, "%s timed bytes", what);
    cr_assert_eq(got->time_ns > 0, want->timed_calls > 0, "%s time %llu ns for %llu timed calls", what,
                 (unsigned long long)got->time_ns, (unsigned long long)want->timed_calls);
    cr_assert_eq(got->staged_calls, want->staged_calls, "%s staged calls", what);
    cr_assert_eq(got->staged_bytes, want->staged_bytes, "%s staged bytes", what);
}

static void assert_stats(const gpumem_copy_stats *got, const gpumem_copy_stats *want)
{
    char what[64];
    for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++) {
        snprintf(what, sizeof what, "%s total", dir_name[d]);
        assert_counter(&got->total[d], &want->total[d], what);
        for (int k = 0; k < GPUMEM_HOST_KINDS; k++) {
            snprintf(what, sizeof what, "%s %s", dir_name[d], kind_name[k]);
            assert_counter(&got->host[d][k], &want->host[d][k], what);
        }
    }
    cr_assert_eq(got->refused_copies, want->refused_copies);
    cr_assert_eq(got->refused_memsets, want->refused_memsets);
}

/* ---------------------------------------------------------------- every checked entry point */

/* One call with its bad range on `bad` (the other side, if any, is fine: `good` or `host`). */
typedef CUresult (*call_fn)(CUdeviceptr bad, CUdeviceptr good, void *host, size_t n, CUstream s);

typedef struct checked_call {
    const char *api;  /* the exported name, as the logged line says it */
    const char *role; /* "destination" or "source" */
    bool memset;
    call_fn call;
} checked_call;

static CUresult htod(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)s; return cuMemcpyHtoD(b, h, n); }
static CUresult htod_ptds(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)s; return cuMemcpyHtoD_v2_ptds(b, h, n); }
static CUresult htod_async(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g; return cuMemcpyHtoDAsync(b, h, n, s); }
static CUresult htod_async_ptsz(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)s; return cuMemcpyHtoDAsync_v2_ptsz(b, h, n, 0); }
static CUresult dtoh(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)s; return cuMemcpyDtoH(h, b, n); }
static CUresult dtoh_ptds(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)s; return cuMemcpyDtoH_v2_ptds(h, b, n); }
static CUresult dtoh_async(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g; return cuMemcpyDtoHAsync(h, b, n, s); }
static CUresult dtoh_async_ptsz(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)s; return cuMemcpyDtoHAsync_v2_ptsz(h, b, n, 0); }
static CUresult dtod_dst(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)h, (void)s; return cuMemcpyDtoD(b, g, n); }
static CUresult dtod_src(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)h, (void)s; return cuMemcpyDtoD(g, b, n); }
static CUresult dtod_ptds(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)h, (void)s; return cuMemcpyDtoD_v2_ptds(b, g, n); }
static CUresult dtod_async(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)h; return cuMemcpyDtoDAsync(g, b, n, s); }
static CUresult dtod_async_ptsz(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)h, (void)s; return cuMemcpyDtoDAsync_v2_ptsz(b, g, n, 0); }
static CUresult unified_h2d(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)s; return cuMemcpy(b, (CUdeviceptr)(uintptr_t)h, n); }
static CUresult unified_d2d_src(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)h, (void)s; return cuMemcpy_ptds(g, b, n); }
static CUresult unified_async_d2h(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g; return cuMemcpyAsync((CUdeviceptr)(uintptr_t)h, b, n, s); }
static CUresult unified_async_ptsz(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)h, (void)s; return cuMemcpyAsync_ptsz(b, g, n, 0); }
static CUresult set8(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)h, (void)s; return cuMemsetD8(b, 0x77, n); }
static CUresult set8_ptds(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)h, (void)s; return cuMemsetD8_v2_ptds(b, 0x77, n); }
static CUresult set16(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)h, (void)s; return cuMemsetD16(b, 0x7777, n / 2); }
static CUresult set16_ptds(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)h, (void)s; return cuMemsetD16_v2_ptds(b, 0x7777, n / 2); }
static CUresult set32(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)h, (void)s; return cuMemsetD32(b, 0x77777777u, n / 4); }
static CUresult set32_ptds(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)h, (void)s; return cuMemsetD32_v2_ptds(b, 0x77777777u, n / 4); }
static CUresult set8_async(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)h; return cuMemsetD8Async(b, 0x77, n, s); }
static CUresult set8_async_ptsz(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)h, (void)s; return cuMemsetD8Async_ptsz(b, 0x77, n, 0); }
static CUresult set16_async(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)h; return cuMemsetD16Async(b, 0x7777, n / 2, s); }
static CUresult set16_async_ptsz(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)h, (void)s; return cuMemsetD16Async_ptsz(b, 0x7777, n / 2, 0); }
static CUresult set32_async(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)h; return cuMemsetD32Async(b, 0x77777777u, n / 4, s); }
static CUresult set32_async_ptsz(CUdeviceptr b, CUdeviceptr g, void *h, size_t n, CUstream s) { (void)g, (void)h, (void)s; return cuMemsetD32Async_ptsz(b, 0x77777777u, n / 4, 0); }

static const checked_call calls[] = {
    {"cuMemcpyHtoD_v2", "destination", false, htod},
    {"cuMemcpyHtoD_v2_ptds", "destination", false, htod_ptds},
    {"cuMemcpyHtoDAsync_v2", "destination", false, htod_async},
    {"cuMemcpyHtoDAsync_v2_ptsz", "destination", false, htod_async_ptsz},
    {"cuMemcpyDtoH_v2", "source", false, dtoh},
    {"cuMemcpyDtoH_v2_ptds", "source", false, dtoh_ptds},
    {"cuMemcpyDtoHAsync_v2", "source", false, dtoh_async},
    {"cuMemcpyDtoHAsync_v2_ptsz", "source", false, dtoh_async_ptsz},
    {"cuMemcpyDtoD_v2", "destination", false, dtod_dst},
    {"cuMemcpyDtoD_v2", "source", false, dtod_src},
    {"cuMemcpyDtoD_v2_ptds", "destination", false, dtod_ptds},
    {"cuMemcpyDtoDAsync_v2", "source", false, dtod_async},
    {"cuMemcpyDtoDAsync_v2_ptsz", "destination", false, dtod_async_ptsz},
    {"cuMemcpy", "destination", false, unified_h2d},
    {"cuMemcpy_ptds", "source", false, unified_d2d_src},
    {"cuMemcpyAsync", "source", false, unified_async_d2h},
    {"cuMemcpyAsync_ptsz", "destination", false, unified_async_ptsz},
    {"cuMemsetD8_v2", "destination", true, set8},
    {"cuMemsetD8_v2_ptds", "destination", true, set8_ptds},
    {"cuMemsetD16_v2", "destination", true, set16},
    {"cuMemsetD16_v2_ptds", "destination", true, set16_ptds},
    {"cuMemsetD32_v2", "destination", true, set32},
    {"cuMemsetD32_v2_ptds", "destination", true, set32_ptds},
    {"cuMemsetD8Async", "destination", true, set8_async},
    {"cuMemsetD8Async_ptsz", "destination", true, set8_async_ptsz},
    {"cuMemsetD16Async", "destination", true, set16_async},
    {"cuMemsetD16Async_ptsz", "destination", true, set16_async_ptsz},
    {"cuMemsetD32Async", "destination", true, set32_async},
    {"cuMemsetD32Async_ptsz", "destination", true, set32_async_ptsz},
};
#define NCALLS (sizeof calls / sizeof *calls)

/* The first line of `log` that contains `needle` (a copy), or NULL. */
static char *line_with(const char *log, const char *needle)
{
    const char *hit = strstr(log, needle);
    if (!hit) return NULL;
    const char *start = hit;
    while (start > log && start[-1] != '\n') start--;
    size_t len = strcspn(start, "\n");
    return strndup(start, len);
}

/* Whether the pc at the start of `text` ("0x...") lies in this test program (not in gpumem, the
 * driver or libc): the logged stack starts at the program's call. */
static bool in_this_program(const char *text)
{
    Dl_info pc_info, self;
    void *pc = (void *)(uintptr_t)strtoull(text, NULL, 16);
    if (!dladdr((char *)pc - 1, &pc_info) || !dladdr((void *)(uintptr_t)&in_this_program, &self)) return false;
    return pc_info.dli_fbase == self.dli_fbase;
}

/* Runs `c` on `bad` and checks the refusal: the code, one problem line naming the call, the role,
 * the pointer and `words`, followed by frame #0 in this program; nothing reached the driver. */
static void assert_refused(const checked_call *c, CUdeviceptr bad, CUdeviceptr good, void *host, size_t n,
                           CUstream s, const char *words)
{
    char want[160], ptr[32];
    fakecuda_reset_counters();
    stderr_capture cap;
    capture_begin(&cap);
    CUresult r = c->call(bad, good, host, n, s);
    char *err = capture_end(&cap);
    cr_assert_eq(r, CUDA_ERROR_INVALID_VALUE, "%s (%s): %d, want CUDA_ERROR_INVALID_VALUE; stderr:\n%s", c->api,
                 c->role, r, err);
    cr_assert_eq(counters().copy_calls, 0, "%s reached the driver", c->api);
    snprintf(want, sizeof want, "gpumem: %s: %s ", c->api, c->role);
    cr_assert_eq(api_count_lines(err, "refused with CUDA_ERROR_INVALID_VALUE"), 1, "one refusal line expected:\n%s", err);
    char *line = line_with(err, want);
    cr_assert_not_null(line, "no line starting '%s' in:\n%s", want, err);
    hex(ptr, sizeof ptr, bad);
    cr_assert(strstr(line, ptr), "the line does not name %s: %s", ptr, line);
    cr_assert(strstr(line, words), "the line does not say '%s': %s", words, line);
    const char *frame0 = strstr(err, "\n    #0 0x");
    cr_assert_not_null(frame0, "no stack under the line:\n%s", err);
    cr_assert(in_this_program(frame0 + strlen("\n    #0 ")), "frame #0 is not in this program:\n%s", err);
    free(line);
    free(err);
}

/* ---------------------------------------------------------------- refused: freed pool memory */

Test(copies, every_entry_point_refuses_freed_pool_memory)
{
    CUdeviceptr keep, p;
    CUstream s;
    static unsigned char host[8192];
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&keep, 4096)); /* keeps the segment, so the freed block stays pool memory */
    OK(cuMemAlloc(&p, 4096));
    OK(cuMemsetD8(p, 0x11, 4096));
    OK(cuMemFree(p));
    size_t copies_n = 0, memsets_n = 0;
    for (size_t i = 0; i < NCALLS; i++) {
        assert_refused(&calls[i], p, keep, host, 4096, s, "lies in freed pool memory");
        if (calls[i].memset) memsets_n++;
        else copies_n++;
    }
    OK(cuStreamSynchronize(s));
    cr_assert(api_all_bytes((void *)(uintptr_t)p, 0x11, 4096), "a refused call wrote the freed block");
    gpumem_copy_stats st = copy_stats(0);
    cr_assert_eq(st.refused_copies, copies_n);
    cr_assert_eq(st.refused_memsets, memsets_n);
    for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++) cr_assert_eq(st.total[d].calls, 0, "a refused copy was counted");
    OK(cuMemFree(keep));
}

Test(copies, a_range_starting_in_a_live_block_is_fine_but_a_freed_neighbour_is_not)
{
    CUdeviceptr a, b, c;
    static unsigned char host[4096];
    api_start();
    OK(cuMemAlloc(&a, 4096));
    OK(cuMemAlloc(&b, 4096));
    OK(cuMemAlloc(&c, 4096));
    cr_assert_eq(b, a + 4096, "blocks are expected to be adjacent in the segment");
    OK(cuMemFree(b));
    OK(cuMemcpyHtoD(a, host, 4096));
    /* Starts in freed b (between live a and live c). */
    assert_refused(&calls[0], b + 512, a, host, 1024, NULL, "lies in freed pool memory");
    /* Starts in live a, runs into freed b. */
    assert_refused(&calls[0], a + 2048, a, host, 4096, NULL, "runs 2048 bytes past the end of its allocation");
    OK(cuMemFree(a));
    OK(cuMemFree(c));
}

/* ---------------------------------------------------------------- refused: past the end */

Test(copies, every_entry_point_refuses_a_range_past_the_end)
{
    CUdeviceptr p, good, base = 0;
    size_t size = 0;
    CUstream s;
    static unsigned char host[8192];
    char words[160], block[32];
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&good, 8192));
    OK(cuMemAlloc(&p, 3000)); /* a 3072-B block: 72 B of slack past the requested end */
    OK(cuMemGetAddressRange(&base, &size, p + 1000));
    cr_assert_eq(base, p);
    cr_assert_eq(size, 3000);
    hex(block, sizeof block, p);
    /* [p+1000, p+3004): 4 bytes past the requested end, still inside the block's slack. */
    snprintf(words, sizeof words, "+ 2004 bytes runs 4 bytes past the end of its allocation %s (3000 bytes)", block);
    for (size_t i = 0; i < NCALLS; i++) assert_refused(&calls[i], p + 1000, good, host, 2004, s, words);
    gpumem_copy_stats st = copy_stats(0);
    cr_assert_eq(st.refused_copies + st.refused_memsets, NCALLS);
    OK(cuStreamSynchronize(s));
    OK(cuMemFree(p));
    OK(cuMemFree(good));
}

Test(copies, past_the_end_cases)
{
    CUdeviceptr p;
    static unsigned char host[8192];
    char words[160], block[32];
    api_start();
    OK(cuMemAlloc(&p, 3000));
    hex(block, sizeof block, p);
    snprintf(words, sizeof words, "runs 1 bytes past the end of its allocation %s (3000 bytes)", block);
    assert_refused(&calls[0], p, p, host, 3001, NULL, words);
    assert_refused(&calls[0], p + 2999, p, host, 2, NULL, words);
    assert_refused(&calls[0], p + 3000, p, host, 8, NULL, "starts at the end of its allocation");
    assert_refused(&calls[0], p + 3008, p, host, 8, NULL, "starts 8 bytes past the end of its allocation");
    /* A length that wraps the address space is past the end, not a small range. */
    assert_refused(&calls[17], p + 8, p, host, SIZE_MAX - 4, NULL, "past the end of its allocation");
    gpumem_copy_stats st = copy_stats(0);
    cr_assert_eq(st.refused_copies, 4);
    cr_assert_eq(st.refused_memsets, 1);
    OK(cuMemFree(p));
}

/* ---------------------------------------------------------------- allowed */

Test(copies, interior_ranges_inside_the_allocation_go_through_with_the_right_data)
{
    CUdeviceptr p, q;
    CUstream s;
    static unsigned char in[8192], out[8192];
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&p, 6000));
    OK(cuMemAlloc(&q, 6000));
    api_fill_pattern(in, sizeof in, 5);
    OK(cuMemsetD8(p, 0, 6000));
    OK(cuMemcpyHtoD(p + 1000, in, 5000)); /* exactly up to the end */
    OK(cuMemcpyDtoD(q + 100, p + 1000, 5000));
    OK(cuMemcpyDtoHAsync(out, q + 100, 5000, s));
    OK(cuStreamSynchronize(s));
    cr_assert_eq(api_check_pattern(out, 5000, 5), 5000, "the data did not survive the interior copies");
    OK(cuMemsetD32(p + 4, 0x01020304u, 1499)); /* [p+4, p+6000) */
    OK(cuMemcpy((CUdeviceptr)(uintptr_t)out, p + 5996, 4));
    cr_assert_eq(memcmp(out, &(uint32_t){0x01020304u}, 4), 0);
    OK(cuMemsetD16(p + 5998, 0xABCD, 1));
    OK(cuMemcpyDtoH(out, p + 5998, 2));
    cr_assert_eq(memcmp(out, &(uint16_t){0xABCD}, 2), 0);
    OK(cuMemcpyHtoD(p, in, 0)); /* nothing touched: fine anywhere */
    gpumem_copy_stats st = copy_stats(0);
    cr_assert_eq(st.refused_copies + st.refused_memsets, 0);
    OK(cuMemFree(p));
    OK(cuMemFree(q));
}

Test(copies, memory_gpumem_does_not_pool_gets_the_drivers_answer)
{
    CUdeviceptr a, m;
    CUstream s;
    static unsigned char host[8192];
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAllocAsync(&a, 4096, s)); /* stream-ordered: passed through to the driver */
    OK(cuMemAllocManaged(&m, 4096, CU_MEM_ATTACH_GLOBAL));
    OK(cuStreamSynchronize(s));
    stderr_capture cap;
    capture_begin(&cap);
    OK(cuMemcpyHtoD(a, host, 4096));
    OK(cuMemcpyDtoD(m, a, 4096));
    fakecuda_reset_counters();
    CUresult past = cuMemcpyHtoD(a + 1024, host, 4096); /* the fake checks its own allocations */
    OK(cuMemFreeAsync(a, s));
    OK(cuStreamSynchronize(s));
    CUresult freed = cuMemcpyHtoD(a, host, 16);
    char *err = capture_end(&cap);
    cr_assert_eq(past, CUDA_ERROR_INVALID_VALUE);
    cr_assert_eq(freed, CUDA_ERROR_INVALID_VALUE);
    cr_assert_eq(counters().copy_calls, 2, "both bad copies should have reached the driver");
    cr_assert_eq(err[0], '\0', "gpumem logged about memory it does not own:\n%s", err);
    gpumem_copy_stats st = copy_stats(0);
    cr_assert_eq(st.refused_copies, 0);
    cr_assert_eq(st.total[GPUMEM_COPY_H2D].calls, 1, "only the accepted copy counts");
    cr_assert_eq(st.total[GPUMEM_COPY_D2D].calls, 1);
    free(err);
    OK(cuMemFree(m));
}

Test(copies, without_the_pool_the_driver_judges)
{
    setenv("GPUMEM_POOL", "0", 1);
    CUdeviceptr p;
    static unsigned char host[4096];
    api_start();
    OK(cuMemAlloc(&p, 4096));
    OK(cuMemFree(p));
    stderr_capture cap;
    capture_begin(&cap);
    fakecuda_reset_counters();
    CUresult r = cuMemcpyHtoD(p, host, 4096);
    char *err = capture_end(&cap);
    cr_assert_eq(r, CUDA_ERROR_INVALID_VALUE, "the fake refuses freed memory itself: %d", r);
    cr_assert_eq(counters().copy_calls, 1);
    cr_assert_eq(err[0], '\0', "nothing to log without a pool:\n%s", err);
    cr_assert_eq(copy_stats(0).refused_copies, 0);
    free(err);
}

Test(copies, check_off_lets_everything_through)
{
    setenv("GPUMEM_CHECK_COPIES", "0", 1);
    CUdeviceptr keep, p, q;
    static unsigned char host[8192];
    api_start();
    OK(cuMemAlloc(&keep, 4096));
    OK(cuMemAlloc(&q, 3000));
    OK(cuMemAlloc(&p, 4096));
    OK(cuMemFree(p));
    stderr_capture cap;
    capture_begin(&cap);
    fakecuda_reset_counters();
    OK(cuMemcpyHtoD(p, host, 4096));    /* freed pool memory: still a live fake allocation */
    OK(cuMemcpyHtoD(q, host, 3072));    /* past the requested end */
    OK(cuMemsetD8(p, 1, 4096));
    char *err = capture_end(&cap);
    cr_assert_eq(counters().copy_calls, 2);
    cr_assert_eq(err[0], '\0', "nothing is logged with the check off:\n%s", err);
    gpumem_copy_stats st = copy_stats(0);
    cr_assert_eq(st.refused_copies + st.refused_memsets, 0);
    cr_assert_eq(st.total[GPUMEM_COPY_H2D].calls, 2);
    cr_assert_eq(st.total[GPUMEM_COPY_H2D].bytes, 4096 + 3072);
    free(err);
    OK(cuMemFree(q));
    OK(cuMemFree(keep));
}

Test(copies, logging_stops_after_a_hundred_but_counting_does_not)
{
    CUdeviceptr keep, p;
    api_start();
    OK(cuMemAlloc(&keep, 4096));
    OK(cuMemAlloc(&p, 4096));
    OK(cuMemFree(p));
    stderr_capture cap;
    capture_begin(&cap);
    for (int i = 0; i < 105; i++) ERR(cuMemsetD8(p, 0, 16), CUDA_ERROR_INVALID_VALUE);
    char *err = capture_end(&cap);
    cr_assert_eq(api_count_lines(err, "refused with CUDA_ERROR_INVALID_VALUE"), 100);
    cr_assert_eq(api_count_lines(err, "further refused copies and memsets are counted, not logged"), 1);
    cr_assert_eq(copy_stats(0).refused_memsets, 105);
    free(err);
    OK(cuMemFree(keep));
}

/* ---------------------------------------------------------------- counters */

Test(copies, counters_are_exact_per_direction_kind_and_timing)
{
    CUdeviceptr a, b, m;
    CUstream s;
    static unsigned char page[8192], page2[8192];
    void *pin = NULL, *pin2 = NULL;
    gpumem_copy_stats want;
    memset(&want, 0, sizeof want);
    const gpumem_host_memory PG = GPUMEM_HOST_PAGEABLE, PN = GPUMEM_HOST_PINNED;
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&a, 8192));
    OK(cuMemAlloc(&b, 8192));
    OK(cuMemHostAlloc(&pin, 8192, 0));
    OK(cuMemHostAlloc(&pin2, 8192, 0));
    CUdeviceptr hp = (CUdeviceptr)(uintptr_t)page, hp2 = (CUdeviceptr)(uintptr_t)page2;
    CUdeviceptr pn = (CUdeviceptr)(uintptr_t)pin, pn2 = (CUdeviceptr)(uintptr_t)pin2;

    OK(cuMemcpyHtoD(a, page, 1000));               expect(&want, GPUMEM_COPY_H2D, PG, 1000, true);
    OK(cuMemcpyHtoD_v2_ptds(a, page, 1000));       expect(&want, GPUMEM_COPY_H2D, PG, 1000, true);
    OK(cuMemcpyHtoDAsync(a, page, 300, s));        expect(&want, GPUMEM_COPY_H2D, PG, 300, false);
    OK(cuMemcpyDtoH(page, a, 500));                expect(&want, GPUMEM_COPY_D2H, PG, 500, true);
    OK(cuMemcpyDtoHAsync_v2_ptsz(page, b, 64, 0)); expect(&want, GPUMEM_COPY_D2H, PG, 64, false);
    OK(cuMemcpyDtoD(b, a, 700));                   expect(&want, GPUMEM_COPY_D2D, PG, 700, true);
    OK(cuMemcpyDtoDAsync(b, a, 100, s));           expect(&want, GPUMEM_COPY_D2D, PG, 100, false);
    /* Unified copies, classified side by side (the driver knows pinned memory). */
    OK(cuMemcpy(a, hp, 50));                       expect(&want, GPUMEM_COPY_H2D, PG, 50, true);
    OK(cuMemcpy(hp, a, 60));                       expect(&want, GPUMEM_COPY_D2H, PG, 60, true);
    OK(cuMemcpy(b, a, 70));                        expect(&want, GPUMEM_COPY_D2D, PG, 70, true);
    OK(cuMemcpy(hp2, hp, 80));                     expect(&want, GPUMEM_COPY_H2H, PG, 80, true);
    OK(cuMemcpy(a, pn, 90));                       expect(&want, GPUMEM_COPY_H2D, PN, 90, true);
    OK(cuMemcpyAsync(pn, a, 110, s));              expect(&want, GPUMEM_COPY_D2H, PN, 110, false);
    OK(cuMemcpy_ptds(pn2, pn, 120));               expect(&want, GPUMEM_COPY_H2H, PN, 120, true);
    OK(cuMemcpy(pn, hp, 130));                     expect(&want, GPUMEM_COPY_H2H, PG, 130, true);
    /* Memory gpumem tracks but does not pool counts on the current device. */
    OK(cuMemAllocManaged(&m, 4096, CU_MEM_ATTACH_GLOBAL));
    OK(cuMemcpyHtoD(m, page, 40));                 expect(&want, GPUMEM_COPY_H2D, PG, 40, true);
    OK(cuMemcpyAsync(m, a, 20, s));                expect(&want, GPUMEM_COPY_D2D, PG, 20, false);
    /* Failed and refused copies do not count. */
    ERR(cuMemcpyHtoD(0, page, 10), CUDA_ERROR_INVALID_VALUE);
    stderr_capture cap;
    capture_begin(&cap);
    ERR(cuMemcpyHtoD(a + 8000, page, 500), CUDA_ERROR_INVALID_VALUE);
    free(capture_end(&cap));
    want.refused_copies = 1;
    OK(cuStreamSynchronize(s));
    OK(cuCtxSynchronize());
    gpumem_copy_stats got = copy_stats(0);
    assert_stats(&got, &want);
    gpumem_copy_stats other = copy_stats(1);
    for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++) cr_assert_eq(other.total[d].calls, 0);
    ERR(((copy_stats_fn)(uintptr_t)api_shim_sym("gpumem_get_copy_stats"))(-1, &other), GPUMEM_ERROR_INVALID_VALUE);
    ERR(((copy_stats_fn)(uintptr_t)api_shim_sym("gpumem_get_copy_stats"))(0, NULL), GPUMEM_ERROR_INVALID_VALUE);
    OK(cuMemFree(m));
    OK(cuMemFree(a));
    OK(cuMemFree(b));
    OK(cuMemFreeHost(pin));
    OK(cuMemFreeHost(pin2));
}

/* Explicit H2D/D2H copies do not ask the driver about the host side (that would cost a driver
 * call per copy): they rely on gpumem's own knowledge of pinned memory (manager/engine/pinned.c's
 * gm_host_is_pinned: the pinned pool, cuMemHostAlloc pass-through, cuMemHostRegister). */
Test(copies, explicit_copies_from_pinned_memory_count_as_pinned)
{
    CUdeviceptr a;
    CUstream s;
    void *pin = NULL;
    static unsigned char reg[3 * 4096] __attribute__((aligned(4096)));
    const size_t registered = 2 * 4096; /* the last page stays pageable */
    gpumem_copy_stats want;
    memset(&want, 0, sizeof want);
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&a, 8192));
    OK(cuMemHostAlloc(&pin, 8192, 0));
    OK(cuMemHostRegister(reg, registered, 0));
    OK(cuMemcpyHtoD(a, pin, 4096));         expect(&want, GPUMEM_COPY_H2D, GPUMEM_HOST_PINNED, 4096, true);
    OK(cuMemcpyHtoDAsync(a, reg, 1000, s)); expect(&want, GPUMEM_COPY_H2D, GPUMEM_HOST_PINNED, 1000, false);
    OK(cuMemcpyDtoH(pin, a, 2000));         expect(&want, GPUMEM_COPY_D2H, GPUMEM_HOST_PINNED, 2000, true);
    OK(cuMemcpyDtoHAsync(reg + 100, a, 300, s)); expect(&want, GPUMEM_COPY_D2H, GPUMEM_HOST_PINNED, 300, false);
    /* Across the end of the registered range: partly pageable, so pageable. */
    OK(cuMemcpyDtoH(reg + registered - 100, a, 200)); expect(&want, GPUMEM_COPY_D2H, GPUMEM_HOST_PAGEABLE, 200, true);
    OK(cuStreamSynchronize(s));
    OK(cuMemHostUnregister(reg));
    OK(cuMemcpyHtoD(a, reg, 64));           expect(&want, GPUMEM_COPY_H2D, GPUMEM_HOST_PAGEABLE, 64, true);
    gpumem_copy_stats got = copy_stats(0);
    assert_stats(&got, &want);
    OK(cuMemFreeHost(pin));
    OK(cuMemFree(a));
}

Test(copies, a_staged_copy_counts_once_as_pageable)
{
    const size_t n = (size_t)8 << 20; /* over GPUMEM_STAGING_MIN (4 MiB): a staging candidate */
    CUdeviceptr a;
    unsigned char *page = malloc(n);
    cr_assert_not_null(page);
    api_fill_pattern(page, n, 9);
    api_start();
    OK(cuMemAlloc(&a, n));
    OK(cuMemcpyHtoD(a, page, n));
    memset(page, 0, n);
    OK(cuMemcpyDtoH(page, a, n));
    cr_assert_eq(api_check_pattern(page, n, 9), n);
    gpumem_copy_stats st = copy_stats(0);
    for (int d = GPUMEM_COPY_H2D; d <= GPUMEM_COPY_D2H; d++) {
        const gpumem_copy_counter *c = &st.host[d][GPUMEM_HOST_PAGEABLE];
        cr_assert_eq(c->calls, 1, "%s counted %llu times", dir_name[d], (unsigned long long)c->calls);
        cr_assert_eq(c->bytes, n);
        cr_assert_eq(c->timed_calls, 1);
        cr_assert_leq(c->staged_calls, 1);
        cr_assert_eq(c->staged_bytes, c->staged_calls * n);
        cr_assert_eq(st.total[d].calls, 1);
    }
    OK(cuMemFree(a));
    free(page);
}

Test(copies, counted_per_device)
{
    setenv("FAKECUDA_DEVICES", "2", 1);
    CUdevice d0, d1;
    CUcontext c0, c1;
    CUdeviceptr a0, a1;
    static unsigned char page[4096];
    OK(cuInit(0));
    OK(cuDeviceGet(&d0, 0));
    OK(cuDeviceGet(&d1, 1));
    OK(cuDevicePrimaryCtxRetain(&c0, d0));
    OK(cuDevicePrimaryCtxRetain(&c1, d1));
    OK(cuCtxSetCurrent(c0));
    OK(cuMemAlloc(&a0, 4096));
    OK(cuMemcpyHtoD(a0, page, 100));
    OK(cuCtxSetCurrent(c1));
    OK(cuMemAlloc(&a1, 4096));
    OK(cuMemcpyHtoD(a1, page, 200));
    OK(cuMemcpyDtoH(page, a1, 300));
    /* Device 0's pool memory copied while device 1 is current: counted where the memory is. */
    OK(cuMemcpyDtoH(page, a0, 400));
    /* Memory gpumem does not own: the current device. */
    OK(cuMemcpy((CUdeviceptr)(uintptr_t)page, (CUdeviceptr)(uintptr_t)(page + 2048), 500));
    gpumem_copy_stats s0 = copy_stats(0), s1 = copy_stats(1);
    cr_assert_eq(s0.total[GPUMEM_COPY_H2D].bytes, 100);
    cr_assert_eq(s0.total[GPUMEM_COPY_D2H].bytes, 400);
    cr_assert_eq(s1.total[GPUMEM_COPY_H2D].bytes, 200);
    cr_assert_eq(s1.total[GPUMEM_COPY_D2H].bytes, 300);
    cr_assert_eq(s1.total[GPUMEM_COPY_H2H].bytes, 500);
    cr_assert_eq(s0.total[GPUMEM_COPY_H2H].calls, 0);
    OK(cuMemFree(a1));
    OK(cuCtxSetCurrent(c0));
    OK(cuMemFree(a0));
}

#define THREADS 4
#define PER_THREAD 1000

static void *copy_worker(void *arg)
{
    CUdeviceptr p = *(CUdeviceptr *)arg;
    unsigned char b[8] = {0};
    CUcontext ctx;
    CUdevice dev;
    if (cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) || cuCtxSetCurrent(ctx)) return (void *)1;
    for (int i = 0; i < PER_THREAD; i++)
        if (cuMemcpyHtoD(p, b, sizeof b)) return (void *)1;
    return NULL;
}

Test(copies, threads_that_ended_still_count)
{
    CUdeviceptr p[THREADS];
    pthread_t t[THREADS];
    api_start();
    for (int i = 0; i < THREADS; i++) OK(cuMemAlloc(&p[i], 512));
    for (int i = 0; i < THREADS; i++) cr_assert_eq(pthread_create(&t[i], NULL, copy_worker, &p[i]), 0);
    for (int i = 0; i < THREADS; i++) {
        void *r;
        pthread_join(t[i], &r);
        cr_assert_null(r, "a worker's copy failed");
    }
    gpumem_copy_stats st = copy_stats(0);
    cr_assert_eq(st.total[GPUMEM_COPY_H2D].calls, THREADS * PER_THREAD);
    cr_assert_eq(st.total[GPUMEM_COPY_H2D].bytes, THREADS * PER_THREAD * 8);
    for (int i = 0; i < THREADS; i++) OK(cuMemFree(p[i]));
}

Test(copies, a_fork_child_starts_with_its_own_counters)
{
    CUdeviceptr p;
    static unsigned char page[64];
    api_start();
    OK(cuMemAlloc(&p, 512));
    OK(cuMemcpyHtoD(p, page, 64));
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        gpumem_copy_stats st;
        copy_stats_fn fn = (copy_stats_fn)(uintptr_t)api_shim_sym("gpumem_get_copy_stats");
        _exit(fn(0, &st) != GPUMEM_OK || st.total[GPUMEM_COPY_H2D].calls != 0 ? 1 : 0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the child saw its parent's copies");
    cr_assert_eq(copy_stats(0).total[GPUMEM_COPY_H2D].calls, 1);
    OK(cuMemFree(p));
}

/* ---------------------------------------------------------------- the report */

typedef size_t (*report_fn)(FILE *out);

static char *report_text(void)
{
    report_fn fn = (report_fn)(uintptr_t)api_shim_sym("gpumem_report");
    cr_assert_not_null(fn);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert_not_null(f);
    fn(f);
    fclose(f);
    return buf;
}

/* Copies of each kind, one refused copy and one refused memset. */
static void report_workload(void)
{
    CUdeviceptr keep, p;
    static unsigned char page[4096];
    void *pin = NULL;
    api_start();
    OK(cuMemAlloc(&keep, 4096));
    OK(cuMemAlloc(&p, 4096));
    OK(cuMemHostAlloc(&pin, 4096, 0));
    OK(cuMemcpyHtoD(keep, page, 4096));
    OK(cuMemcpy(keep, (CUdeviceptr)(uintptr_t)pin, 1024));
    OK(cuMemcpyDtoH(page, keep, 2048));
    OK(cuMemcpyDtoD(p, keep, 512));
    OK(cuMemFree(p));
    stderr_capture cap;
    capture_begin(&cap);
    ERR(cuMemcpyHtoD(p, page, 16), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemsetD8(p, 0, 16), CUDA_ERROR_INVALID_VALUE);
    free(capture_end(&cap));
    OK(cuMemFreeHost(pin));
}

Test(copies, text_report_lines)
{
    report_workload();
    char *text = report_text();
    const char *want[] = {
        "copies on device 0: H2D 5120 B in 2 calls, D2H 2048 B in 1 calls, D2D 512 B in 1 calls\n",
        "  H2D: pageable 4096 B in 1 calls, pinned 1024 B in 1 calls; blocking 5120 B in 2 calls took ",
        "  D2H: pageable 2048 B in 1 calls; blocking 2048 B in 1 calls took ",
        "  D2D: blocking 512 B in 1 calls took ",
        "  refused 1 copies and 1 memsets touching freed pool memory or running past the end of an allocation",
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++)
        cr_assert(strstr(text, want[i]), "expected '%s' in:\n%s", want[i], text);
    cr_assert_eq(api_count_lines(text, "copies on device"), 1, "%s", text);
    cr_assert_eq(api_count_lines(text, "H2H"), 0, "no H2H copies were made:\n%s", text);
    free(text);
}

Test(copies, json_report_member)
{
    setenv("GPUMEM_REPORT_FORMAT", "json", 1);
    report_workload();
    char *text = report_text();
    const char *want[] = {
        "\"copies\":{\"devices\":[{\"device\":0,\"refused_copies\":1,\"refused_memsets\":1,"
        "\"H2D\":{\"calls\":2,\"bytes\":5120,\"timed_calls\":2,\"timed_bytes\":5120,\"time_ns\":",
        ",\"pageable\":{\"calls\":1,\"bytes\":4096,\"timed_calls\":1,\"timed_bytes\":4096,\"time_ns\":",
        ",\"pinned\":{\"calls\":1,\"bytes\":1024,\"timed_calls\":1,\"timed_bytes\":1024,\"time_ns\":",
        "\"D2D\":{\"calls\":1,\"bytes\":512,\"timed_calls\":1,\"timed_bytes\":512,\"time_ns\":",
        "\"H2H\":{\"calls\":0,\"bytes\":0,",
        "}],\"H2D\":{\"calls\":2,\"bytes\":5120},\"D2H\":{\"calls\":1,\"bytes\":2048},"
        "\"D2D\":{\"calls\":1,\"bytes\":512},\"H2H\":{\"calls\":0,\"bytes\":0},"
        "\"refused_copies\":1,\"refused_memsets\":1}",
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++)
        cr_assert(strstr(text, want[i]), "expected '%s' in:\n%s", want[i], text);
    free(text);
}
