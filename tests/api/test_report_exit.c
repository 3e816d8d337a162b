/* api_report_exit: the leak report. At exit it closes with
 * "LEAK SUMMARY: <bytes> bytes leaked in <n> allocations" (bytes = sum of requested sizes); it
 * goes where GPUMEM_REPORT says (stderr, a file whose %p is the pid, or nowhere); a context
 * destroyed with allocations live, or a device reset, reports them at that point and they stay
 * in the exit summary. */
#include "api_test.h"

Test(report_exit, three_leaks_on_stderr)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", NULL};
    api_child c = api_scenario_ok("leak3", env);
    ASSERT_LEAKS(c.err, 6000, 3);
    cr_assert(strstr(c.err, "leak report (at exit)"), "%s", c.err);
    /* One group per call site, largest first. */
    cr_assert_eq(api_count_lines(c.err, "allocated from:"), 3, "%s", c.err);
    const char *l3 = strstr(c.err, "Leak of 3000 byte(s) in 1 allocation(s) on device 0");
    const char *l2 = strstr(c.err, "Leak of 2000 byte(s) in 1 allocation(s) on device 0");
    const char *l1 = strstr(c.err, "Leak of 1000 byte(s) in 1 allocation(s) on device 0");
    cr_assert(l1 && l2 && l3, "%s", c.err);
    cr_assert(l3 < l2 && l2 < l1, "largest first:\n%s", c.err);
    cr_assert(strstr(c.err, "Leak of 4000") == NULL, "a freed block is no leak:\n%s", c.err);
    api_child_free(&c);
}

Test(report_exit, report_file_named_by_pid)
{
    char dir[64], env_report[128], path[160];
    cr_assert(api_tmpdir(dir, sizeof dir, "report"));
    snprintf(env_report, sizeof env_report, "GPUMEM_REPORT=%s/r.%%p.txt", dir);
    const char *env[] = {env_report, NULL};
    api_child c = api_scenario_ok("leak3", env);
    snprintf(path, sizeof path, "%s/r.%ld.txt", dir, (long)c.pid);
    char *text = api_read_file(path);
    unlink(path);
    int others = rmdir(dir); /* fails if anything else was written there */
    cr_assert_not_null(text, "no report at %s", path);
    ASSERT_LEAKS(text, 6000, 3);
    cr_assert(strstr(c.err, "LEAK SUMMARY") == NULL, "the report went to stderr too:\n%s", c.err);
    cr_assert_eq(others, 0, "other files were written in %s", dir);
    free(text);
    api_child_free(&c);
}

Test(report_exit, report_off_prints_nothing)
{
    const char *env[] = {"GPUMEM_REPORT=off", NULL};
    api_child c = api_scenario_ok("leak3", env);
    cr_assert_str_eq(c.err, "", "GPUMEM_REPORT=off, yet stderr has:\n%s", c.err);
    api_child_free(&c);
}

/* Position of the first line containing `needle` at or after `from`, or NULL. */
static const char *find_from(const char *from, const char *needle)
{
    return from ? strstr(from, needle) : NULL;
}

Test(report_exit, destroyed_context_reports_its_leaks)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", NULL};
    api_child c = api_scenario_ok("ctx_destroy", env);
    const char *before = strstr(c.err, "MARK before-destroy");
    const char *after = strstr(c.err, "MARK after-destroy");
    cr_assert(before && after, "%s", c.err);
    const char *at_destroy = find_from(before, "leak report (context destroyed)");
    cr_assert(at_destroy && at_destroy < after, "no report when the context was destroyed:\n%s", c.err);
    const char *summary1 = find_from(at_destroy, "LEAK SUMMARY: 3000 bytes leaked in 2 allocations");
    cr_assert(summary1 && summary1 < after, "the destroyed context's leaks:\n%s", c.err);
    const char *at_exit = find_from(after, "leak report (at exit)");
    cr_assert_not_null(at_exit, "%s", c.err);
    cr_assert_not_null(find_from(at_exit, "LEAK SUMMARY: 3500 bytes leaked in 3 allocations"),
                       "the exit summary keeps the destroyed context's leaks:\n%s", c.err);
    cr_assert_eq(api_count_lines(c.err, "LEAK SUMMARY:"), 2, "%s", c.err);
    api_child_free(&c);
}

static void check_reset_report(const char *scenario)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", NULL};
    api_child c = api_scenario_ok(scenario, env);
    const char *before = strstr(c.err, "MARK before-reset");
    const char *after = strstr(c.err, "MARK after-reset");
    cr_assert(before && after, "%s", c.err);
    const char *at_reset = find_from(before, "leak report (device reset)");
    cr_assert(at_reset && at_reset < after, "no report at the device reset:\n%s", c.err);
    const char *summary1 = find_from(at_reset, "LEAK SUMMARY: 3000 bytes leaked in 2 allocations");
    cr_assert(summary1 && summary1 < after, "the reset context's leaks:\n%s", c.err);
    const char *at_exit = find_from(after, "leak report (at exit)");
    cr_assert_not_null(at_exit, "%s", c.err);
    cr_assert_not_null(find_from(at_exit, "LEAK SUMMARY: 3700 bytes leaked in 3 allocations"),
                       "the exit summary keeps the reset context's leaks:\n%s", c.err);
    cr_assert_eq(api_count_lines(c.err, "LEAK SUMMARY:"), 2, "%s", c.err);
    api_child_free(&c);
}

Test(report_exit, device_reset_reports_its_leaks)
{
    check_reset_report("primary_reset");
}

/* cudaDeviceReset in cudart 13 reaches the v1 entry point (looked up at version 7000). */
Test(report_exit, device_reset_through_cudarts_v1_entry_point)
{
    check_reset_report("primary_reset_v1");
}
