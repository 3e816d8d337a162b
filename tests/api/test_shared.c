/* The shared budget (GPUMEM_SHARED, manager/account/ledger.c) with real processes: members are
 * tests/api/shared_child, driven step by step through pipes, on the fake driver. One budget for
 * the group, SIGKILL reclaim, no overcommit under concurrent growth and release, devices keyed by
 * UUID, the views (cuMemGetInfo, cuDeviceTotalMem), IPC counted once, and every bad input: a
 * one-line error naming the variable and the path, exit status 2, the file left as it was. */
#include <criterion/criterion.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include "api_common.h"

#define MiB (1024ull * 1024ull)
#define OOM "alloc 2" /* CUDA_ERROR_OUT_OF_MEMORY */

typedef struct member {
    pid_t pid;
    FILE *in, *out;
    int err_fd;
} member;

static char dir[256], region[512];
static rlim_t child_fsize; /* non-zero: the next member's file-size limit (no_space_is_refused) */

static void setup(void)
{
    struct rlimit fds;
    if (getrlimit(RLIMIT_NOFILE, &fds) == 0 && fds.rlim_cur < fds.rlim_max) {
        fds.rlim_cur = fds.rlim_max; /* many_members keeps three pipes per member */
        setrlimit(RLIMIT_NOFILE, &fds);
    }
    cr_assert(api_tmpdir(dir, sizeof dir, "shared"));
    snprintf(region, sizeof region, "%s/budget", dir);
}

static void teardown(void)
{
    unlink(region);
    rmdir(dir);
}

/* Starts a member with `env` ("NAME=value" entries, NULL-terminated) added to the test's own. */
static member start_with(const char *const *env, const char *const *steps, bool drop_root)
{
    int in[2], out[2], err[2];
    /* close-on-exec: a later member must not inherit this one's pipe ends (its stdin would
     * never see end-of-file); dup2 clears the flag on the member's own 0, 1 and 2 */
    cr_assert(pipe2(in, O_CLOEXEC) == 0 && pipe2(out, O_CLOEXEC) == 0 && pipe2(err, O_CLOEXEC) == 0);
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        dup2(err[1], 2);
        for (const char *const *e = env; e && *e; e++) putenv((char *)*e);
        if (child_fsize) { /* the member alone: the test's own coverage files must stay whole */
            struct rlimit small = {child_fsize, child_fsize};
            signal(SIGXFSZ, SIG_IGN); /* inherited as ignored: the member sees EFBIG, not a signal */
            setrlimit(RLIMIT_FSIZE, &small);
        }
        if (drop_root && geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0)) _exit(91);
        const char *argv[32] = {SHARED_CHILD_PATH};
        int n = 1;
        for (const char *const *s = steps; s && *s && n < 31; s++) argv[n++] = *s;
        execv(SHARED_CHILD_PATH, (char **)argv);
        _exit(92);
    }
    close(in[0]);
    close(out[1]);
    close(err[1]);
    member m = {pid, fdopen(in[1], "w"), fdopen(out[0], "r"), err[0]};
    return m;
}

/* The group's usual settings: a 64 MiB budget in `region`, segments handed back when free. */
static member start(const char *const *steps)
{
    static char shared[600];
    snprintf(shared, sizeof shared, "GPUMEM_SHARED=%s", region);
    const char *env[] = {shared, "GPUMEM_LIMIT=64MiB", "GPUMEM_MAX_CACHED=0", NULL};
    return start_with(env, steps, false);
}

/* The member's next line (without the newline); fails the test after 20 s. Read a byte at a
 * time from the pipe itself: a stdio buffer would hold lines that poll() cannot see. */
static const char *next_line(member *m)
{
    static char line[512];
    size_t n = 0;
    for (;;) {
        struct pollfd p = {fileno(m->out), POLLIN, 0};
        if (poll(&p, 1, 20000) != 1) {
            char err[2048] = "";
            fcntl(m->err_fd, F_SETFL, O_NONBLOCK);
            ssize_t got = read(m->err_fd, err, sizeof err - 1);
            err[got > 0 ? got : 0] = 0;
            cr_assert_fail("member %d said nothing for 20 s; its stderr: %s", (int)m->pid, err);
        }
        char c;
        cr_assert_eq(read(fileno(m->out), &c, 1), 1, "member %d ended early", (int)m->pid);
        if (c == '\n' || n == sizeof line - 1) break;
        line[n++] = c;
    }
    line[n] = 0;
    return line;
}

static void expect_line(member *m, const char *want)
{
    const char *got = next_line(m);
    cr_assert_str_eq(got, want, "member %d said '%s', expected '%s'", (int)m->pid, got, want);
}

/* Lets a waiting member go on. */
static void resume(member *m)
{
    fputs("go\n", m->in);
    fflush(m->in);
}

/* Waits for the member; returns its exit status (128+signal when killed). `err` gets stderr. */
static int finish(member *m, char *err, size_t cap)
{
    fclose(m->in);
    int status = 0;
    cr_assert(api_wait_timeout(m->pid, &status, 20.0), "member %d did not end", (int)m->pid);
    ssize_t n = read(m->err_fd, err ? err : (char[64]){0}, err ? cap - 1 : 63);
    if (err) err[n > 0 ? n : 0] = 0;
    close(m->err_fd);
    fclose(m->out);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static void finish_ok(member *m)
{
    char err[4096];
    int rc = finish(m, err, sizeof err);
    cr_assert_eq(rc, 0, "member exited %d: %s", rc, err);
}

/* ------------------------------------------------------------------ one budget */

/* Every test gets a fresh directory and region (Test options: criterion-lite, the TSan build's
 * framework, has no TestSuite options). */
#define SHARED_OPTS .init = setup, .fini = teardown

Test(shared, two_members_share_one_limit, SHARED_OPTS, .timeout = 60)
{
    member a = start((const char *[]){"alloc:40M", "wait", "free", NULL});
    expect_line(&a, "alloc 0");
    expect_line(&a, "waiting");
    member b = start((const char *[]){"alloc:40M", "alloc:20M", "info", "wait", "alloc:40M", NULL});
    expect_line(&b, OOM); /* 40 + 40 > 64: refused with the driver's own code */
    expect_line(&b, "alloc 0");
    /* b sees the group's free memory: 64 - 40 (a) - 20 (b) */
    expect_line(&b, "info 4194304 67108864");
    expect_line(&b, "waiting");
    resume(&a);
    expect_line(&a, "free 0");
    finish_ok(&a); /* a's share is back */
    resume(&b);
    expect_line(&b, "alloc 0");
    finish_ok(&b);
}

Test(shared, device_total_is_the_limit, SHARED_OPTS, .timeout = 60)
{
    member a = start((const char *[]){"total", NULL});
    expect_line(&a, "total 67108864");
    finish_ok(&a);
}

Test(shared, exit_gives_the_share_back, SHARED_OPTS, .timeout = 60)
{
    member a = start((const char *[]){"alloc:60M", NULL}); /* never freed: the driver frees it at exit */
    expect_line(&a, "alloc 0");
    finish_ok(&a);
    member b = start((const char *[]){"alloc:60M", NULL});
    expect_line(&b, "alloc 0");
    finish_ok(&b);
}

Test(shared, exit_report_shows_the_group, SHARED_OPTS, .timeout = 60)
{
    static char shared[600];
    snprintf(shared, sizeof shared, "GPUMEM_SHARED=%s", region);
    const char *env[] = {shared, "GPUMEM_LIMIT=64MiB", "GPUMEM_MAX_CACHED=0", "GPUMEM_REPORT=stderr", NULL};
    member a = start((const char *[]){"alloc:40M", "wait", NULL});
    expect_line(&a, "alloc 0");
    expect_line(&a, "waiting");
    member b = start_with(env, (const char *[]){"alloc:10M", NULL}, false);
    expect_line(&b, "alloc 0");
    char err[8192], want[800];
    cr_assert_eq(finish(&b, err, sizeof err), 0, "%s", err);
    snprintf(want, sizeof want, "  group %s: limit 67108864 B, in use 52428800 B, peak 52428800 B, 2 members holding memory",
             region);
    cr_assert_not_null(strstr(err, want), "'%s' not in: %s", want, err);
    resume(&a);
    finish_ok(&a);
}

/* ------------------------------------------------------------------ members that die */

Test(shared, sigkill_share_is_taken_back_at_the_next_allocation, SHARED_OPTS, .timeout = 60)
{
    member a = start((const char *[]){"alloc:60M", "kill", NULL});
    expect_line(&a, "alloc 0");
    cr_assert_eq(finish(&a, NULL, 0), 128 + SIGKILL);
    member b = start((const char *[]){"alloc:60M", "info", NULL});
    expect_line(&b, "alloc 0");
    expect_line(&b, "info 4194304 67108864");
    finish_ok(&b);
}

/* A forked child that outlives the member does not keep the member's share alive: liveness is a
 * lock of the member's own open file, not a pid or a process tree. */
Test(shared, surviving_fork_child_does_not_hold_a_dead_share, SHARED_OPTS, .timeout = 60)
{
    member a = start((const char *[]){"alloc:60M", "fork-sleep", "kill", NULL});
    expect_line(&a, "alloc 0");
    int child = 0;
    cr_assert_eq(sscanf(next_line(&a), "forked %d", &child), 1);
    cr_assert_eq(finish(&a, NULL, 0), 128 + SIGKILL);
    cr_assert_eq(kill(child, 0), 0, "the forked child is alive");
    member b = start((const char *[]){"alloc:60M", NULL});
    expect_line(&b, "alloc 0");
    finish_ok(&b);
    kill(child, SIGKILL);
}

/* A dead member whose slot still names a live pid (the pid was reused) is still dead. */
Test(shared, reused_pid_does_not_keep_a_share, SHARED_OPTS, .timeout = 60)
{
    member a = start((const char *[]){"alloc:60M", "kill", NULL});
    expect_line(&a, "alloc 0");
    cr_assert_eq(finish(&a, NULL, 0), 128 + SIGKILL);
    /* Rewrite the dead member's pid (every slot naming it) to ours, a live process. */
    int fd = open(region, O_RDWR);
    struct stat st;
    cr_assert(fd >= 0 && fstat(fd, &st) == 0);
    unsigned char *r = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    cr_assert(r != MAP_FAILED);
    uint32_t dead = (uint32_t)a.pid, alive = (uint32_t)getpid();
    int rewritten = 0;
    for (off_t i = 0; i + 4 <= st.st_size; i += 4)
        if (memcmp(r + i, &dead, 4) == 0) {
            memcpy(r + i, &alive, 4);
            rewritten++;
        }
    munmap(r, (size_t)st.st_size);
    close(fd);
    cr_assert_geq(rewritten, 1, "the dead member's pid is in the region");
    member b = start((const char *[]){"alloc:60M", NULL});
    expect_line(&b, "alloc 0");
    finish_ok(&b);
}

/* ------------------------------------------------------------------ no overcommit race */

Test(shared, concurrent_growth_never_passes_the_limit, SHARED_OPTS, .timeout = 60)
{
    char counter[600], steps[8][700];
    snprintf(counter, sizeof counter, "%s/held", dir);
    int fd = open(counter, O_RDWR | O_CREAT, 0600);
    cr_assert(fd >= 0 && ftruncate(fd, 8) == 0);
    close(fd);
    member m[8];
    for (int i = 0; i < 8; i++) {
        snprintf(steps[i], sizeof steps[i], "stress:300:%d:%s:%llu", i + 1, counter, 64 * MiB);
        m[i] = start((const char *[]){steps[i], NULL});
    }
    unsigned oks = 0, ooms = 0;
    for (int i = 0; i < 8; i++) {
        unsigned ok = 0, oom = 0;
        cr_assert_eq(sscanf(next_line(&m[i]), "stress %u %u", &ok, &oom), 2);
        oks += ok; /* one member may starve while the others hold the budget */
        ooms += oom;
        finish_ok(&m[i]);
    }
    cr_assert_gt(oks, 8, "the members allocated");
    cr_assert_gt(ooms, 0, "the stress reached the limit");
    unlink(counter);
    /* Everything came back: a newcomer gets the whole budget. */
    member last = start((const char *[]){"alloc:64M", NULL});
    expect_line(&last, "alloc 0");
    finish_ok(&last);
}

/* ------------------------------------------------------------------ devices by UUID */

Test(shared, devices_are_keyed_by_uuid_not_ordinal, SHARED_OPTS, .timeout = 60)
{
    static char shared[600];
    snprintf(shared, sizeof shared, "GPUMEM_SHARED=%s", region);
    const char *swapped[] = {shared, "GPUMEM_LIMIT=64MiB", "GPUMEM_MAX_CACHED=0", "FAKECUDA_DEVICES=2",
                             "FAKECUDA_VISIBLE=1,0", NULL};
    const char *straight[] = {shared, "GPUMEM_LIMIT=64MiB", "GPUMEM_MAX_CACHED=0", "FAKECUDA_DEVICES=2",
                              "FAKECUDA_VISIBLE=0,1", NULL};
    /* a: ordinal 0 is physical device 1 */
    member a = start_with(swapped, (const char *[]){"alloc:40M", "wait", NULL}, false);
    expect_line(&a, "alloc 0");
    expect_line(&a, "waiting");
    /* b: physical 1 is its ordinal 1, shared with a; its ordinal 0 (physical 0) is not */
    member b = start_with(straight, (const char *[]){"dev:1", "alloc:40M", "dev:0", "alloc:40M", NULL}, false);
    expect_line(&b, "dev 0");
    expect_line(&b, OOM);
    expect_line(&b, "dev 0");
    expect_line(&b, "alloc 0");
    finish_ok(&b);
    resume(&a);
    finish_ok(&a);
}

/* ------------------------------------------------------------------ IPC within a group */

Test(shared, memory_opened_through_ipc_counts_once, SHARED_OPTS, .timeout = 60)
{
    member a = start((const char *[]){"alloc:40M", "export", "wait", NULL});
    expect_line(&a, "alloc 0");
    char step[300];
    const char *h = next_line(&a);
    cr_assert(strncmp(h, "handle ", 7) == 0);
    snprintf(step, sizeof step, "import:%s", h + 7);
    expect_line(&a, "waiting");
    member b = start((const char *[]){step, "alloc:20M", "info", NULL});
    expect_line(&b, "import 0");
    expect_line(&b, "alloc 0");
    expect_line(&b, "info 4194304 67108864"); /* 64 - 40 - 20: the import took nothing */
    finish_ok(&b);
    resume(&a);
    finish_ok(&a);
}

/* ------------------------------------------------------------------ many members */

/* SHARED_MEMBERS: 256, fewer in sanitizer builds (each member then costs tens of MiB). */
Test(shared, many_members_attach_at_once, SHARED_OPTS, .timeout = 120)
{
    enum { N = SHARED_MEMBERS };
    static member m[N];
    static char shared[600];
    snprintf(shared, sizeof shared, "GPUMEM_SHARED=%s", region);
    const char *env[] = {shared, "GPUMEM_LIMIT=1GiB", "GPUMEM_MAX_CACHED=0", NULL};
    for (int i = 0; i < N; i++) m[i] = start_with(env, (const char *[]){"alloc:1M", "wait", NULL}, false);
    for (int i = 0; i < N; i++) expect_line(&m[i], "alloc 0");
    for (int i = 0; i < N; i++) expect_line(&m[i], "waiting");
    /* Every member holds one 2 MiB small segment of the group's 1 GiB. */
    member probe = start_with(env, (const char *[]){"info", NULL}, false);
    char want[64];
    snprintf(want, sizeof want, "info %llu 1073741824", 1024 * MiB - N * 2 * MiB);
    expect_line(&probe, want);
    finish_ok(&probe);
    for (int i = 0; i < N; i++) finish_ok(&m[i]);
}

/* No root needed: a member running as an ordinary user (nobody, when the test runs as root)
 * makes and joins a region in a directory it may write. */
Test(shared, an_ordinary_user_makes_and_joins_a_region, SHARED_OPTS, .timeout = 60)
{
    cr_assert_eq(chmod(dir, 0777), 0);
    static char shared[600];
    snprintf(shared, sizeof shared, "GPUMEM_SHARED=%s", region);
    const char *env[] = {shared, "GPUMEM_LIMIT=64MiB", NULL};
    member m = start_with(env, (const char *[]){"alloc:40M", "info", NULL}, true);
    expect_line(&m, "alloc 0");
    expect_line(&m, "info 25165824 67108864"); /* the region counts it: 64 - 40 */
    finish_ok(&m);
    struct stat st;
    cr_assert_eq(stat(region, &st), 0, "the member made the region");
    if (geteuid() == 0) cr_expect_eq(st.st_uid, 65534u, "made by the ordinary user");
}

/* ------------------------------------------------------------------ regions */

/* Runs one member with `env` and expects it to stop with status 2 and one line naming
 * GPUMEM_SHARED, the path and `why`. */
static void expect_refused(const char *const *env, const char *path, const char *why, bool drop_root)
{
    member m = start_with(env, (const char *[]){"alloc:1M", NULL}, drop_root);
    char err[4096];
    int rc = finish(&m, err, sizeof err);
    cr_assert_eq(rc, 2, "exit status %d (stderr: %s)", rc, err);
    char want[700];
    snprintf(want, sizeof want, "GPUMEM_SHARED=%s: ", path);
    cr_assert_not_null(strstr(err, want), "'%s' not in: %s", want, err);
    cr_assert_not_null(strstr(err, why), "'%s' not in: %s", why, err);
    cr_assert_eq(api_line_count(err), 1, "one line: %s", err);
}

Test(shared, limit_that_differs_from_the_group_is_an_error_naming_both, SHARED_OPTS, .timeout = 60)
{
    member a = start((const char *[]){"alloc:1M", "wait", NULL});
    expect_line(&a, "alloc 0");
    expect_line(&a, "waiting");
    static char shared[600];
    snprintf(shared, sizeof shared, "GPUMEM_SHARED=%s", region);
    const char *env[] = {shared, "GPUMEM_LIMIT=32MiB", NULL};
    expect_refused(env, region, "67108864 bytes", false);
    expect_refused(env, region, "33554432 bytes", false);
    resume(&a);
    finish_ok(&a);
}

Test(shared, file_that_is_no_region_is_refused_and_left_alone, SHARED_OPTS, .timeout = 60)
{
    const char text[] = "precious data, not a gpumem region\n";
    FILE *f = fopen(region, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
    static char shared[600];
    snprintf(shared, sizeof shared, "GPUMEM_SHARED=%s", region);
    expect_refused((const char *[]){shared, "GPUMEM_LIMIT=64MiB", NULL}, region, "not a gpumem shared budget", false);
    char *after = api_read_file(region);
    cr_assert_str_eq(after, text);
    free(after);
}

Test(shared, malformed_paths_are_refused, SHARED_OPTS, .timeout = 60)
{
    expect_refused((const char *[]){"GPUMEM_SHARED=relative/budget", NULL}, "relative/budget", "must be absolute", false);
    static char slash[600], missing[600], isdir[600];
    snprintf(slash, sizeof slash, "GPUMEM_SHARED=%s/", dir);
    snprintf(isdir, sizeof isdir, "%s/", dir);
    expect_refused((const char *[]){slash, NULL}, isdir, "names a directory", false);
    snprintf(missing, sizeof missing, "GPUMEM_SHARED=%s/no/such/dir", dir);
    snprintf(isdir, sizeof isdir, "%s/no/such/dir", dir);
    expect_refused((const char *[]){missing, NULL}, isdir, "No such file or directory", false);
    static char fifo[700], fifo_path[600];
    snprintf(fifo_path, sizeof fifo_path, "%s/fifo", dir);
    snprintf(fifo, sizeof fifo, "GPUMEM_SHARED=%s", fifo_path);
    cr_assert_eq(mkfifo(fifo_path, 0600), 0);
    expect_refused((const char *[]){fifo, NULL}, fifo_path, "not a regular file", false);
    unlink(fifo_path);
}

Test(shared, no_permission_is_refused, SHARED_OPTS, .timeout = 60)
{
    int fd = open(region, O_RDWR | O_CREAT, 0600);
    cr_assert(fd >= 0);
    close(fd);
    if (geteuid() != 0) cr_assert_eq(chmod(region, 0400), 0);
    static char shared[600];
    snprintf(shared, sizeof shared, "GPUMEM_SHARED=%s", region);
    /* as root the member drops to nobody, for whom the 0600 file of root is closed */
    expect_refused((const char *[]){shared, NULL}, region, "Permission denied", true);
}

/* A filesystem without room (a full /dev/shm): the file-size limit makes posix_fallocate fail the
 * same way, before anything is mapped. */
Test(shared, no_space_is_refused, SHARED_OPTS, .timeout = 60)
{
    static char shared[600];
    snprintf(shared, sizeof shared, "GPUMEM_SHARED=%s", region);
    child_fsize = 1 << 20; /* under the region's size, above any coverage file a member writes */
    member m = start_with((const char *[]){shared, NULL}, (const char *[]){"alloc:1M", NULL}, false);
    child_fsize = 0;
    char err[4096];
    int rc = finish(&m, err, sizeof err);
    cr_assert_eq(rc, 2, "exit status %d (stderr: %s)", rc, err);
    cr_assert_not_null(strstr(err, "no space for the region"), "%s", err);
}

/* Patches the region's header: the boot it was made in, or its layout version. */
static void patch_region(off_t offset, const void *bytes, size_t n)
{
    int fd = open(region, O_RDWR);
    cr_assert(fd >= 0);
    cr_assert_eq(pwrite(fd, bytes, n, offset), (ssize_t)n);
    close(fd);
}

#define BOOT_ID_OFFSET 32 /* magic[16], layout, header_bytes, region_bytes */
#define LAYOUT_OFFSET 16

Test(shared, region_of_a_previous_boot_is_initialised_again, SHARED_OPTS, .timeout = 60)
{
    member a = start((const char *[]){"alloc:60M", "kill", NULL});
    expect_line(&a, "alloc 0");
    finish(&a, NULL, 0);
    patch_region(BOOT_ID_OFFSET, "00000000-dead-beef", 18);
    static char shared[600];
    snprintf(shared, sizeof shared, "GPUMEM_SHARED=%s", region);
    const char *env[] = {shared, "GPUMEM_LIMIT=64MiB", "GPUMEM_VERBOSE=1", NULL};
    member b = start_with(env, (const char *[]){"alloc:60M", NULL}, false);
    expect_line(&b, "alloc 0");
    char err[8192];
    cr_assert_eq(finish(&b, err, sizeof err), 0, "%s", err);
    cr_assert_not_null(strstr(err, "made before the last boot"), "%s", err);
}

Test(shared, region_of_another_layout_in_use_is_refused_and_unused_is_replaced, SHARED_OPTS, .timeout = 60)
{
    member a = start((const char *[]){"alloc:1M", "wait", NULL});
    expect_line(&a, "alloc 0");
    expect_line(&a, "waiting");
    uint32_t other = 99;
    patch_region(LAYOUT_OFFSET, &other, 4);
    static char shared[600];
    snprintf(shared, sizeof shared, "GPUMEM_SHARED=%s", region);
    expect_refused((const char *[]){shared, "GPUMEM_LIMIT=64MiB", NULL}, region, "another layout (99", false);
    resume(&a);
    finish(&a, NULL, 0);
    member b = start((const char *[]){"alloc:60M", NULL}); /* nobody uses it now: made anew */
    expect_line(&b, "alloc 0");
    finish_ok(&b);
}

Test(shared, unset_keeps_the_limit_per_process, SHARED_OPTS, .timeout = 60)
{
    const char *env[] = {"GPUMEM_LIMIT=64MiB", "GPUMEM_MAX_CACHED=0", NULL};
    member a = start_with(env, (const char *[]){"alloc:40M", "wait", NULL}, false);
    expect_line(&a, "alloc 0");
    expect_line(&a, "waiting");
    member b = start_with(env, (const char *[]){"alloc:40M", NULL}, false);
    expect_line(&b, "alloc 0");
    finish_ok(&b);
    resume(&a);
    finish_ok(&a);
}
