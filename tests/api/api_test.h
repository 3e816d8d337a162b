/* Criterion side of the API tests. Every Test() runs in its own process (Criterion forks), which
 * inherits LD_PRELOAD, so each starts with a fresh shim, manager and fake driver; a test sets
 * GPUMEM_* / FAKECUDA_* with setenv before its first driver call, since both read the
 * environment once (the shim at its first hooked call, the fake at cuInit). */
#ifndef API_TEST_H
#define API_TEST_H

#include <criterion/criterion.h>

#include "api_common.h"

#define OK(call) cr_assert_eq((call), CUDA_SUCCESS, "%s", #call)
#define ERR(call, code) cr_assert_eq((call), (code), "%s", #call)

/* cuInit, the primary context of device 0 retained and current. */
static inline CUcontext api_start(void)
{
    CUcontext ctx = NULL;
    CUdevice dev;
    OK(cuInit(0));
    OK(cuDeviceGet(&dev, 0));
    OK(cuDevicePrimaryCtxRetain(&ctx, dev));
    OK(cuCtxSetCurrent(ctx));
    return ctx;
}

static inline gpumem_stats api_stats_or_fail(void)
{
    gpumem_stats st;
    cr_assert(api_stats(&st), "gpumem_get_stats is not reachable: is the shim preloaded?");
    return st;
}

/* Runs api_child <scenario> with the environment overrides and returns its result; the child's
 * stderr is shown when the run failed. */
static inline api_child api_scenario(const char *scenario, const char *const *overrides,
                                     double timeout_s)
{
    api_child c;
    const char *args[] = {scenario, NULL};
    cr_assert(api_run(API_CHILD_PATH, args, overrides, timeout_s, &c), "cannot start %s",
              API_CHILD_PATH);
    cr_assert(!c.timed_out, "scenario %s hung (killed after %.0f s); stderr:\n%s", scenario,
              timeout_s, c.err);
    return c;
}

/* api_scenario, then: exited with status 0. */
static inline api_child api_scenario_ok(const char *scenario, const char *const *overrides)
{
    api_child c = api_scenario(scenario, overrides, 20.0);
    cr_assert(api_exited_ok(&c), "scenario %s failed (status %#x); stderr:\n%s", scenario,
              c.status, c.err);
    return c;
}

/* The report as gpumem_report writes it now (for programs linked with libgpumem). */
static inline char *api_report_text(void)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert_not_null(f);
    gpumem_report(f);
    fclose(f);
    return buf;
}

/* `text` has exactly one LEAK SUMMARY line and it is the expected one. */
#define ASSERT_LEAKS(text, bytes, count) \
    do { \
        char want_[128]; \
        api_leak_line(want_, sizeof want_, (bytes), (count)); \
        cr_assert_eq(api_count_lines((text), "LEAK SUMMARY:"), 1, \
                     "expected one LEAK SUMMARY line in:\n%s", (text)); \
        cr_assert(strstr((text), want_) != NULL, "expected '%s' in:\n%s", want_, (text)); \
    } while (0)

#endif
