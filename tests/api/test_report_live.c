/* api_report_live: reports while the program runs and at out-of-memory (issue 13).
 *
 * GPUMEM_REPORT_SIGNAL: a signal makes the running program write a report of its live
 * allocations (reason "signal") where GPUMEM_REPORT says, and it carries on to its own exit
 * report; the program's own handler still runs and its system calls are restarted; a signal
 * storm during a multi-threaded allocation storm loses, corrupts and deadlocks nothing.
 * GPUMEM_REPORT_INTERVAL: reports every interval, each after the first with the growth of every
 * group. GPUMEM_OOM_REPORT: one "who holds the memory" report at an out-of-memory failure (limit
 * or device), rate-limited by GPUMEM_OOM_REPORT_INTERVAL. Every scenario runs in live_child, a
 * process of its own, whose report file the test reads. */
#include "api_test.h"

typedef struct live_run {
    api_child c;
    char *report; /* the report file's text ("" when none was written) */
} live_run;

/* Runs live_child <scenario> <report file> with GPUMEM_REPORT=<that file> and `overrides`;
 * `ok`: it must exit 0. */
static live_run run_live(const char *scenario, const char *const *overrides, bool ok)
{
    char dir[64], path[128], dest[160];
    cr_assert(api_tmpdir(dir, sizeof dir, "live"));
    snprintf(path, sizeof path, "%s/report.txt", dir);
    snprintf(dest, sizeof dest, "GPUMEM_REPORT=%s", path);
    const char *env[16];
    size_t n = 0;
    env[n++] = dest;
    for (const char *const *o = overrides; o && *o && n < 15; o++) env[n++] = *o;
    env[n] = NULL;
    const char *args[] = {scenario, path, NULL};
    live_run r;
    cr_assert(api_run(LIVE_CHILD_PATH, args, env, 60.0, &r.c), "cannot start %s", LIVE_CHILD_PATH);
    cr_assert(!r.c.timed_out, "scenario %s hung (killed after 60 s); stderr:\n%s", scenario, r.c.err);
    r.report = api_read_file(path);
    if (!r.report) r.report = strdup("");
    unlink(path);
    rmdir(dir);
    if (ok)
        cr_assert(api_exited_ok(&r.c), "scenario %s failed (status %#x); stderr:\n%s\nreport:\n%s", scenario,
                  r.c.status, r.c.err, r.report);
    return r;
}

/* Occurrences of `needle` in `text`, in one pass (see live_child.c: strstr under
 * ThreadSanitizer is quadratic over a report file of megabytes). */
static int count_in(const char *text, const char *needle)
{
    size_t m = strlen(needle);
    int n = 0;
    for (const char *p = text; *p; p++)
        if (*p == needle[0] && strncmp(p, needle, m) == 0) n++;
    return n;
}

/* The last occurrence of `needle` in `text`, or NULL. */
static const char *last_of(const char *text, const char *needle)
{
    size_t m = strlen(needle);
    const char *last = NULL;
    for (const char *p = text; *p; p++)
        if (*p == needle[0] && strncmp(p, needle, m) == 0) last = p;
    return last;
}

static void live_free(live_run *r)
{
    api_child_free(&r->c);
    free(r->report);
}

/* The text from `from` to the next report heading (or the end), as a new string. */
static char *one_report(const char *from)
{
    cr_assert_not_null(from);
    const char *next = strstr(from + 1, "==gpumem== pid");
    size_t n = next ? (size_t)(next - from) : strlen(from);
    char *s = strndup(from, n);
    cr_assert_not_null(s);
    return s;
}

/* ---------------------------------------------------------------- on demand */

Test(report_live, signal_lists_the_live_allocations_and_the_program_carries_on)
{
    const char *env[] = {"GPUMEM_REPORT_SIGNAL=SIGUSR1", NULL};
    live_run r = run_live("signal_live", env, true);
    const char *sig = strstr(r.report, "leak report (signal)");
    const char *at_exit = strstr(r.report, "leak report (at exit)");
    cr_assert(sig && at_exit && sig < at_exit, "a signal report, then the exit report:\n%s", r.report);
    char *first = one_report(sig);
    cr_assert(strstr(first, "Leak of 5000 byte(s) in 1 allocation(s) on device 0 allocated from:"), "%s", first);
    cr_assert(strstr(first, "Leak of 3000 byte(s) in 1 allocation(s) on device 0 allocated from:"), "%s", first);
    cr_assert(strstr(first, " in hold_weights live_child+0x") && strstr(first, " in hold_cache live_child+0x"),
              "the stacks name the allocating functions:\n%s", first);
    cr_assert(strstr(first, "LEAK SUMMARY: 8000 bytes leaked in 2 allocations"), "%s", first);
    cr_assert(strstr(first, "since the last report") == NULL, "the first report has no growth:\n%s", first);
    /* The program went on: freed the 3000, allocated 1000, and its exit report says so. */
    char *last = one_report(at_exit);
    cr_assert(strstr(last, "LEAK SUMMARY: 6000 bytes leaked in 2 allocations"), "%s", last);
    cr_assert_eq(api_count_lines(r.report, "LEAK SUMMARY:"), 2, "%s", r.report);
    cr_assert(strstr(r.c.err, "MARK after-signal"), "%s", r.c.err);
    free(first);
    free(last);
    live_free(&r);
}

Test(report_live, signal_report_in_json_has_reason_signal_and_growth)
{
    const char *env[] = {"GPUMEM_REPORT_SIGNAL=usr2", "GPUMEM_REPORT_FORMAT=json", NULL};
    live_run r = run_live("signal_growth", env, true);
    cr_assert_eq(api_count_lines(r.report, "\"format\":\"gpumem-report\""), 3, "two signal reports and the exit one:\n%s",
                 r.report);
    cr_assert_eq(api_count_lines(r.report, "\"reason\":\"signal\""), 2, "%s", r.report);
    cr_assert_eq(api_count_lines(r.report, "\"reason\":\"at exit\""), 1, "%s", r.report);
    const char *first = r.report, *second = strchr(first, '\n') + 1;
    char *line1 = strndup(first, (size_t)(second - first));
    cr_assert(strstr(line1, "\"growth\"") == NULL, "the first report has no growth:\n%s", line1);
    cr_assert(strstr(line1, "\"function\":\"hold_weights\""), "%s", line1);
    /* Second: the 3000 freed, three more 4096 from one stack. */
    cr_assert(strstr(second, "\"bytes\":12288,\"allocations\":3,\"suppressed\":false,\"suppression\":null,\"tag\":null,"
                             "\"growth\":{\"bytes\":12288,\"allocations\":3}"),
              "%s", second);
    cr_assert(strstr(second, "\"bytes\":5000,\"allocations\":1,\"suppressed\":false,\"suppression\":null,\"tag\":null,"
                             "\"growth\":{\"bytes\":0,\"allocations\":0}"),
              "%s", second);
    cr_assert(strstr(second, "\"growth\":{\"bytes\":9288,\"allocations\":2,\"gone_groups\":1,\"gone_bytes\":3000,"
                             "\"gone_allocations\":1}"),
              "%s", second);
    free(line1);
    live_free(&r);
}

Test(report_live, the_programs_own_handler_still_runs)
{
    const char *env[] = {"GPUMEM_REPORT_SIGNAL=USR1", NULL};
    live_run r = run_live("signal_chained", env, true);
    cr_assert_eq(api_count_lines(r.report, "leak report (signal)"), 1, "%s", r.report);
    live_free(&r);
}

Test(report_live, an_interrupted_read_is_restarted)
{
    const char *env[] = {"GPUMEM_REPORT_SIGNAL=USR1", NULL};
    live_run r = run_live("signal_restart", env, true);
    cr_assert_eq(api_count_lines(r.report, "leak report (signal)"), 1, "%s", r.report);
    live_free(&r);
}

/* Without the option the signal keeps its default action: it ends the program. */
Test(report_live, off_by_default_the_signal_is_the_programs)
{
    live_run r = run_live("signal_live", NULL, false);
    cr_assert(WIFSIGNALED(r.c.status) && WTERMSIG(r.c.status) == SIGUSR1, "status %#x; stderr:\n%s", r.c.status,
              r.c.err);
    cr_assert_str_eq(r.report, "", "%s", r.report);
    live_free(&r);
}

Test(report_live, signal_storm_during_an_allocation_storm)
{
    const char *env[] = {"GPUMEM_REPORT_SIGNAL=USR1", NULL};
    live_run r = run_live("storm", env, true);
    cr_assert(strstr(r.c.out, "signals="), "%s", r.c.out);
    int reports = count_in(r.report, "leak report (signal)");
    cr_assert_geq(reports, 2, "signal reports: %d\n%s", reports, r.c.err);
    /* Every report is whole: one summary line per heading. */
    cr_assert_eq(count_in(r.report, "LEAK SUMMARY:"), reports + 1, "%s", r.c.err);
    cr_assert_eq(count_in(r.report, "==gpumem== pid"), reports + 1, "%s", r.c.err);
    /* The report after the storm and the exit report: exactly the one block left. */
    char *last_signal = one_report(last_of(r.report, "leak report (signal)"));
    cr_assert(strstr(last_signal, "LEAK SUMMARY: 7777 bytes leaked in 1 allocations"), "%s", last_signal);
    char *at_exit = one_report(last_of(r.report, "leak report (at exit)"));
    cr_assert(strstr(at_exit, "LEAK SUMMARY: 7777 bytes leaked in 1 allocations"), "%s", at_exit);
    free(last_signal);
    free(at_exit);
    live_free(&r);
}

Test(report_live, a_fork_child_has_no_reporter)
{
    const char *env[] = {"GPUMEM_REPORT_SIGNAL=USR1", NULL};
    live_run r = run_live("fork_child", env, true);
    cr_assert_eq(api_count_lines(r.report, "leak report (signal)"), 1, "only the parent's:\n%s", r.report);
    live_free(&r);
}

/* ---------------------------------------------------------------- growth between reports */

Test(report_live, interval_reports_show_growth)
{
    const char *env[] = {"GPUMEM_REPORT_INTERVAL=1", NULL};
    live_run r = run_live("interval_growth", env, true);
    const char *first = strstr(r.report, "leak report (interval)");
    cr_assert_not_null(first, "%s", r.report);
    const char *second = strstr(first + 1, "leak report (interval)");
    cr_assert_not_null(second, "%s", r.report);
    char *one = one_report(first), *two = one_report(second);
    cr_assert(strstr(one, "since the last report") == NULL, "%s", one);
    const char *grown = strstr(two, "Leak of 12288 byte(s) in 3 allocation(s) on device 0 allocated from:");
    cr_assert_not_null(grown, "%s", two);
    const char *line = strstr(grown, "  +12288 bytes in 3 allocations since the last report\n");
    const char *next = strstr(grown + 1, "Leak of");
    cr_assert(line && (!next || line < next), "the growth line follows the group's frames:\n%s", two);
    cr_assert(strstr(two, "Gone since the last report: 3000 bytes in 1 allocations of 1 call stack(s) no longer live"),
              "%s", two);
    cr_assert(strstr(two, "In all: +9288 bytes in 2 allocations since the last report"), "%s", two);
    cr_assert_eq(api_count_lines(two, "since the last report"), 3, "an unchanged group has no growth line:\n%s", two);
    free(one);
    free(two);
    live_free(&r);
}

/* ---------------------------------------------------------------- out of memory */

static void check_holders(const char *report, const char *cause, const char *top)
{
    cr_assert_eq(api_count_lines(report, "out of memory on device 0"), 1, "exactly one OOM report:\n%s", report);
    const char *oom = strstr(report, "out of memory on device 0");
    cr_assert(strstr(oom, cause), "'%s' expected:\n%s", cause, oom);
    const char *first = strstr(oom, "allocated from:\n    #0 0x");
    cr_assert_not_null(first, "%s", oom);
    const char *eol = strchr(first + strlen("allocated from:\n"), '\n');
    cr_assert(eol && strstr(first, top) && strstr(first, top) < eol, "the top stack is %s's:\n%s", top, oom);
}

Test(report_live, limit_rejection_writes_one_holder_report_despite_a_burst)
{
    const char *env[] = {"GPUMEM_LIMIT=64MiB", NULL};
    live_run r = run_live("oom_limit", env, true);
    check_holders(r.report, "33554432 bytes requested, refused by GPUMEM_LIMIT", " in hold_weights ");
    cr_assert(strstr(r.report, "  limit 67108864 B, reserved 50331648 B, allocated 50331648 B, cached free 0 B "
                               "(largest free block 0 B); live 50331648 B in 2 allocations"),
              "%s", r.report);
    cr_assert(strstr(r.report, "8388608 bytes in 1 allocation(s) tagged \"kv-cache\" allocated from:"), "%s", r.report);
    cr_assert(strstr(r.report, "  tags by live bytes: (untagged) 41943040 B in 1; kv-cache 8388608 B in 1\n"), "%s",
              r.report);
    live_free(&r);
}

Test(report_live, every_failure_is_reported_with_interval_0)
{
    const char *env[] = {"GPUMEM_LIMIT=64MiB", "GPUMEM_OOM_REPORT_INTERVAL=0", NULL};
    live_run r = run_live("oom_limit", env, true);
    cr_assert_eq(api_count_lines(r.report, "out of memory on device 0"), 21, "%s", r.report);
    live_free(&r);
}

Test(report_live, off_writes_no_holder_report)
{
    const char *env[] = {"GPUMEM_LIMIT=64MiB", "GPUMEM_OOM_REPORT=off", NULL};
    live_run r = run_live("oom_limit", env, true);
    cr_assert_eq(api_count_lines(r.report, "out of memory"), 0, "%s", r.report);
    cr_assert(strstr(r.report, "limit rejections 21"), "the rejections are still counted:\n%s", r.report);
    live_free(&r);
}

Test(report_live, the_next_report_counts_the_failures_not_reported)
{
    const char *env[] = {"GPUMEM_LIMIT=64MiB", "GPUMEM_OOM_REPORT_INTERVAL=1", "GPUMEM_REPORT_FORMAT=json", NULL};
    live_run r = run_live("oom_spaced", env, true);
    cr_assert_eq(api_count_lines(r.report, "\"format\":\"gpumem-oom\""), 2, "%s", r.report);
    cr_assert_eq(api_count_lines(r.report, "\"cause\":\"limit\",\"request_bytes\":33554432,\"limit_bytes\":67108864,"), 2,
                 "%s", r.report);
    const char *first = strstr(r.report, "\"not_reported\":0,");
    const char *second = strstr(r.report, "\"not_reported\":5,");
    cr_assert(first && second && first < second, "%s", r.report);
    cr_assert(strstr(second, "\"holders\":[{\"bytes\":41943040,\"allocations\":1,\"tag\":null,\"frames\":[{\"pc\":"), "%s",
              second);
    live_free(&r);
}

Test(report_live, device_oom_writes_one_holder_report)
{
    const char *env[] = {"FAKECUDA_MEM=67108864", NULL};
    live_run r = run_live("oom_device", env, true);
    check_holders(r.report, "50331648 bytes requested, refused by the device", " in hold_weights ");
    cr_assert(strstr(r.report, "limit none, reserved 41943040 B, allocated 41943040 B"), "%s", r.report);
    live_free(&r);
}

Test(report_live, injected_device_failure_writes_one_holder_report)
{
    const char *env[] = {"FAKECUDA_FAIL_ALLOC_AFTER=2", NULL};
    live_run r = run_live("oom_fail_after", env, true);
    check_holders(r.report, "314572800 bytes requested, refused by the device", " in hold_cache ");
    live_free(&r);
}

/* ---------------------------------------------------------------- bad values */

static void expect_refused(const char *setting, const char *message)
{
    const char *env[] = {setting, NULL};
    live_run r = run_live("plain", env, false);
    cr_assert(WIFEXITED(r.c.status) && WEXITSTATUS(r.c.status) == 2, "%s: status %#x; stderr:\n%s", setting,
              r.c.status, r.c.err);
    cr_assert(strstr(r.c.err, message), "%s: expected '%s' in:\n%s", setting, message, r.c.err);
    live_free(&r);
}

Test(report_live, bad_values_are_refused)
{
    expect_refused("GPUMEM_REPORT_SIGNAL=SIGTERM", "gpumem: GPUMEM_REPORT_SIGNAL='SIGTERM' is not valid: expected one of off/SIGUSR1/USR1/SIGUSR2/USR2");
    expect_refused("GPUMEM_REPORT_SIGNAL=10", "GPUMEM_REPORT_SIGNAL='10' is not valid");
    expect_refused("GPUMEM_REPORT_SIGNAL=", "GPUMEM_REPORT_SIGNAL='' is not valid: the value is empty");
    expect_refused("GPUMEM_REPORT_INTERVAL=-1", "GPUMEM_REPORT_INTERVAL='-1' is not valid");
    expect_refused("GPUMEM_REPORT_INTERVAL=86401", "GPUMEM_REPORT_INTERVAL='86401' is not valid: out of range; expected a whole decimal number from 0 to 86400");
    expect_refused("GPUMEM_REPORT_INTERVAL=1.5", "GPUMEM_REPORT_INTERVAL='1.5' is not valid");
    expect_refused("GPUMEM_OOM_REPORT=sometimes", "GPUMEM_OOM_REPORT='sometimes' is not valid");
    expect_refused("GPUMEM_OOM_REPORT_INTERVAL=10s", "GPUMEM_OOM_REPORT_INTERVAL='10s' is not valid");
    expect_refused("GPUMEM_OOM_REPORT_INTERVAL=100000", "GPUMEM_OOM_REPORT_INTERVAL='100000' is not valid: out of range");
}
