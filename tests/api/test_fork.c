/* api_fork: fork with live allocations, and fork while other threads allocate. The child must
 * not deadlock in the shim (its calls return; a 10 s alarm turns a hang into a failure), must not
 * count the parent's allocations as its own (its exit report shows no leaks), and the parent's
 * report stays exact. The scenarios run in api_child so that both exit reports can be read: each
 * process writes GPUMEM_REPORT=<dir>/r.%p.txt. */
#include <dirent.h>

#include "api_test.h"

typedef struct {
    char dir[64];
    char env_report[128];
} report_dir;

static void report_dir_init(report_dir *d)
{
    cr_assert(api_tmpdir(d->dir, sizeof d->dir, "fork"));
    snprintf(d->env_report, sizeof d->env_report, "GPUMEM_REPORT=%s/r.%%p.txt", d->dir);
}

/* Reads the report of every pid (NULL where there is none), counts the files, then removes the
 * directory, so that nothing is left behind whatever the assertions say afterwards. */
static int collect_reports(report_dir *d, const long *pids, int n, char **texts)
{
    char path[512];
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/r.%ld.txt", d->dir, pids[i]);
        texts[i] = api_read_file(path);
    }
    int files = 0;
    DIR *dir = opendir(d->dir);
    if (dir) {
        for (struct dirent *e; (e = readdir(dir));) {
            if (e->d_name[0] == '.')
                continue;
            files++;
            snprintf(path, sizeof path, "%s/%s", d->dir, e->d_name);
            unlink(path);
        }
        closedir(dir);
    }
    rmdir(d->dir);
    return files;
}

/* The pids the scenario printed as child=<pid>. */
static int child_pids(const char *out, long *pids, int max)
{
    int n = 0;
    for (const char *p = out; (p = strstr(p, "child=")) && n < max; p += 6)
        pids[n++] = strtol(p + 6, NULL, 10);
    return n;
}

/* Runs the scenario and returns the reports: texts[0] the scenario's own, then its children's. */
static int run_fork_scenario(const char *scenario, int expect_children, char **texts)
{
    report_dir d;
    report_dir_init(&d);
    const char *env[] = {d.env_report, NULL};
    api_child c;
    const char *args[] = {scenario, NULL};
    bool started = api_run(API_CHILD_PATH, args, env, 40.0, &c);
    long pids[17] = {0};
    int n = started ? child_pids(c.out, pids + 1, 16) : 0;
    pids[0] = started ? (long)c.pid : 0;
    int files = collect_reports(&d, pids, n + 1, texts);
    cr_assert(started, "cannot start %s", API_CHILD_PATH);
    cr_assert(!c.timed_out, "%s hung; stderr:\n%s", scenario, c.err);
    cr_assert(api_exited_ok(&c), "%s failed (status %#x); stderr:\n%s", scenario, c.status, c.err);
    cr_assert_eq(n, expect_children, "%s forked %d children; stdout:\n%s", scenario, n, c.out);
    cr_assert_eq(files, n + 1, "one report per process expected, found %d files", files);
    for (int i = 0; i <= n; i++)
        cr_assert_not_null(texts[i], "no report for pid %ld", pids[i]);
    api_child_free(&c);
    return n;
}

Test(fork, child_does_not_inherit_the_parents_allocations)
{
    char *texts[17] = {0};
    run_fork_scenario("fork_basic", 1, texts);
    ASSERT_LEAKS(texts[1], 0, 0);
    ASSERT_LEAKS(texts[0], 5000, 1);
}

Test(fork, fork_while_threads_allocate)
{
    char *texts[17] = {0};
    int n = run_fork_scenario("fork_threads", 8, texts);
    for (int i = 1; i <= n; i++)
        ASSERT_LEAKS(texts[i], 0, 0);
    ASSERT_LEAKS(texts[0], 777, 1);
}

/* Leaks of a context the parent destroyed before forking are the parent's, not the child's. */
Test(fork, child_report_excludes_the_parents_destroyed_context_leaks)
{
    char *texts[17] = {0};
    run_fork_scenario("fork_orphans", 1, texts);
    cr_assert(strstr(texts[0], "(context destroyed)"), "%s", texts[0]);
    cr_assert(strstr(texts[0], "LEAK SUMMARY: 1000 bytes leaked in 1 allocations"), "%s", texts[0]);
    ASSERT_LEAKS(texts[1], 0, 0);
}
