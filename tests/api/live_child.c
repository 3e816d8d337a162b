/* live_child <scenario> [report file]: the programs of api_report_live (reports while the program
 * runs, and at out-of-memory). Run with LD_PRELOAD=libgpumem_shim.so on the fake driver and the
 * GPUMEM_* settings of the case; it checks what it can itself and exits 0, or prints
 * "live_child: CHECK FAILED ..." on stderr and exits 90. Each scenario prints "MARK <name>" lines
 * on stderr between its steps, so the test can tell which report came when.
 *
 * The allocation sites are functions of their own (noinline), so the tests find their names in
 * the reports' stacks. */
#include <pthread.h>
#include <stdatomic.h>

#define API_CHILD_NAME "live_child"
#include "api_common.h"
#include "api_threads_work.h"


static CUcontext g_primary;
static const char *g_report; /* the report file (GPUMEM_REPORT), to wait for a live report */

static void start(void)
{
    CUdevice dev;
    CK(cuInit(0));
    CK(cuDeviceGet(&dev, 0));
    CK(cuDevicePrimaryCtxRetain(&g_primary, dev));
    CK(cuCtxSetCurrent(g_primary));
}

static void mark(const char *what)
{
    fprintf(stderr, "MARK %s\n", what);
}

static gpumem_stats stats(void)
{
    gpumem_stats st;
    CHECK(api_stats(&st), "gpumem_get_stats not reachable");
    return st;
}

/* Occurrences of `needle` in `text`, in one pass (the file grows to megabytes in the storm, and
 * strstr under ThreadSanitizer measures the whole rest of the text at every call). */
static int count_in(const char *text, const char *needle)
{
    size_t m = strlen(needle);
    int n = 0;
    for (const char *p = text; p && *p; p++)
        if (*p == needle[0] && strncmp(p, needle, m) == 0) n++;
    return n;
}

/* Reports (text or JSON) in `text`. */
static int reports_in(const char *text)
{
    return text ? count_in(text, "LEAK SUMMARY:") + count_in(text, "\"format\":\"gpumem-report\"") : 0;
}

/* Waits (at most 10 s) until the report file holds `n` lines containing `needle` (NULL: `n`
 * reports). */
static void wait_for(const char *needle, int n)
{
    CHECK(g_report, "no report file given");
    for (int i = 0; i < 2000; i++) {
        char *text = api_read_file(g_report);
        int have = !text ? 0 : needle ? count_in(text, needle) : reports_in(text);
        free(text);
        if (have >= n) return;
        api_sleep_ms(5);
    }
    CHECK(false, "no %d lines '%s' in %s after 10 s", n, needle, g_report);
}

static __attribute__((noinline)) CUdeviceptr hold_weights(size_t n)
{
    CUdeviceptr p = 0;
    CK(cuMemAlloc(&p, n));
    return p;
}

static __attribute__((noinline)) CUdeviceptr hold_cache(size_t n)
{
    CUdeviceptr p = 0;
    CK(cuMemAlloc(&p, n));
    return p;
}

/* `n` allocations of `size` from one call site (the count is read at run time, so the loop is
 * not unrolled into several sites). */
static volatile int three = 3;
static __attribute__((noinline)) void hold_more(int n, size_t size)
{
    for (int i = 0; i < n; i++) hold_weights(size);
}

static __attribute__((noinline)) CUresult try_alloc(CUdeviceptr *p, size_t n)
{
    return cuMemAlloc(p, n);
}

/* ---------------------------------------------------------------- on demand */

/* Two live groups, a signal, then the program goes on: frees one, allocates another, exits. */
static int signal_live(void)
{
    start();
    CUdeviceptr w = hold_weights(5000);
    CUdeviceptr c = hold_cache(3000);
    (void)w;
    mark("before-signal");
    CHECK(raise(SIGUSR1) == 0, "raise");
    wait_for(NULL, 1);
    mark("after-signal");
    CK(cuMemFree(c));
    CUdeviceptr c2 = hold_cache(1000);
    (void)c2;
    return 0;
}

/* The same with SIGUSR2 sent twice: the second report shows the growth since the first. */
static int signal_growth(void)
{
    start();
    CUdeviceptr w = hold_weights(5000);
    CUdeviceptr c = hold_cache(3000);
    (void)w;
    CHECK(raise(SIGUSR2) == 0, "raise");
    wait_for(NULL, 1);
    CK(cuMemFree(c));
    hold_more(three, 4096);
    CHECK(raise(SIGUSR2) == 0, "raise");
    wait_for(NULL, 2);
    return 0;
}

/* The program had its own handler: it still runs, once per signal. */
static volatile sig_atomic_t own_handled;
static void own_handler(int sig)
{
    (void)sig;
    own_handled++;
}

static int signal_chained(void)
{
    CHECK(signal(SIGUSR1, own_handler) != SIG_ERR, "signal");
    start();
    hold_weights(5000);
    CHECK(raise(SIGUSR1) == 0, "raise");
    wait_for(NULL, 1);
    CHECK(own_handled == 1, "the program's handler ran %d times", (int)own_handled);
    return 0;
}

/* A system call interrupted by the signal is restarted (SA_RESTART): a read from a pipe that
 * the writer fills after the signal returns the data, not EINTR. */
typedef struct late_writer {
    int fd;
    pthread_t reader;
} late_writer;

static void *write_late(void *arg)
{
    late_writer *lw = arg;
    api_sleep_ms(100);
    pthread_kill(lw->reader, SIGUSR1); /* while the reader sits in read() */
    api_sleep_ms(100);
    CHECK(write(lw->fd, "x", 1) == 1, "write");
    return NULL;
}

static int signal_restart(void)
{
    start();
    hold_weights(5000);
    int fds[2];
    CHECK(pipe(fds) == 0, "pipe");
    late_writer lw = {fds[1], pthread_self()};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, write_late, &lw) == 0, "pthread_create");
    char c = 0;
    ssize_t r = read(fds[0], &c, 1);
    CHECK(r == 1 && c == 'x', "read returned %zd (%s): the signal interrupted it", r, r < 0 ? strerror(errno) : "");
    pthread_join(t, NULL);
    wait_for(NULL, 1);
    return 0;
}

/* Signals while four threads allocate, write, read back, check and free: no deadlock, no
 * corrupted block, every allocation counted. */
typedef struct signaler {
    _Atomic bool stop;
    int sent;
} signaler;

#define STORM_SIGNALS 400

static void *send_signals(void *arg)
{
    signaler *s = arg;
    while (!atomic_load(&s->stop) && s->sent < STORM_SIGNALS) {
        kill(getpid(), SIGUSR1); /* to the process: any thread, mostly one inside an allocation */
        s->sent++;
        api_sleep_ms(2);
    }
    return NULL;
}

/* Under ThreadSanitizer every memory access is checked: fewer iterations, the same races. */
#if defined(__SANITIZE_THREAD__)
#define STORM_ITERS 400
#else
#define STORM_ITERS 3000
#endif

static int storm(void)
{
    start();
    CUdeviceptr kept = hold_weights(7777);
    (void)kept;
    signaler s = {false, 0};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, send_signals, &s) == 0, "pthread_create");
    api_worker workers[4];
    char err[256];
    api_run_workers(g_primary, 4, STORM_ITERS, workers, err, sizeof err);
    atomic_store(&s.stop, true);
    pthread_join(t, NULL);
    CHECK(!err[0], "%s", err);
    unsigned long allocs = 0, frees = 0;
    for (int i = 0; i < 4; i++) {
        allocs += workers[i].allocs;
        frees += workers[i].frees;
    }
    CHECK(allocs == frees && allocs > STORM_ITERS, "workers: %lu allocations, %lu frees", allocs, frees);
    gpumem_stats st = stats();
    CHECK(st.allocations == allocs + 1 && st.frees == frees, "stats: %llu allocations, %llu frees; expected %lu, %lu",
          (unsigned long long)st.allocations, (unsigned long long)st.frees, allocs + 1, frees);
    CHECK(st.bytes_requested == 7777, "bytes_requested %llu", (unsigned long long)st.bytes_requested);
    /* One more report after the storm: it must list exactly the one block left. */
    wait_for("leak report (signal)", 1);
    int before;
    {
        char *text = api_read_file(g_report);
        before = reports_in(text);
        free(text);
    }
    mark("storm-over");
    CHECK(raise(SIGUSR1) == 0, "raise");
    wait_for(NULL, before + 1);
    printf("signals=%d\n", s.sent);
    return 0;
}

/* A fork child has no reporter: a signal to it does nothing (no handler of the program), and
 * the parent's reporter still answers the parent. */
static int fork_child(void)
{
    start();
    hold_weights(5000);
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        CHECK(raise(SIGUSR1) == 0, "raise in the child");
        api_sleep_ms(200);
        _exit(0);
    }
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid, "waitpid");
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the fork child ended with status %#x", status);
    api_sleep_ms(100);
    char *text = api_read_file(g_report);
    int have = reports_in(text);
    free(text);
    CHECK(have == 0, "the child's signal made %d reports", have);
    CHECK(raise(SIGUSR1) == 0, "raise");
    wait_for(NULL, 1);
    return 0;
}

/* ---------------------------------------------------------------- growth between reports */

/* GPUMEM_REPORT_INTERVAL=1: the first report, then 3 more allocations of 4096 from one stack
 * and a free from another before the second. */
static int interval_growth(void)
{
    start();
    hold_weights(4096);
    CUdeviceptr c = hold_cache(3000);
    wait_for(NULL, 1);
    hold_more(three, 4096);
    CK(cuMemFree(c));
    wait_for(NULL, 2);
    return 0;
}

/* ---------------------------------------------------------------- out of memory */

/* Under GPUMEM_LIMIT=64MiB: 40 MiB from hold_weights, 8 MiB from hold_cache, then 32 MiB is
 * refused, then a burst of 20 more refusals (a program probing what fits). */
static int oom_limit(void)
{
    start();
    typedef gpumem_status (*push_fn)(const char *);
    typedef gpumem_status (*pop_fn)(void);
    push_fn push = (push_fn)(uintptr_t)api_shim_sym("gpumem_tag_push");
    pop_fn pop = (pop_fn)(uintptr_t)api_shim_sym("gpumem_tag_pop");
    CHECK(push && pop, "gpumem_tag_push/pop not reachable");
    hold_weights((size_t)40 << 20);
    CHECK(push("kv-cache") == GPUMEM_OK, "tag push");
    hold_cache((size_t)8 << 20);
    CHECK(pop() == GPUMEM_OK, "tag pop");
    CUdeviceptr p = 0;
    mark("before-oom");
    CHECK(try_alloc(&p, (size_t)32 << 20) == CUDA_ERROR_OUT_OF_MEMORY, "32 MiB fits under the limit?");
    mark("after-oom");
    for (int i = 0; i < 20; i++)
        CHECK(try_alloc(&p, ((size_t)30 << 20) - (size_t)i * (256 << 10)) == CUDA_ERROR_OUT_OF_MEMORY, "burst %d", i);
    mark("after-burst");
    return 0;
}

/* The same failure twice, 1.2 s apart, with a burst of 5 in between. */
static int oom_spaced(void)
{
    start();
    hold_weights((size_t)40 << 20);
    CUdeviceptr p = 0;
    for (int i = 0; i < 6; i++) CHECK(try_alloc(&p, (size_t)32 << 20) == CUDA_ERROR_OUT_OF_MEMORY, "%d", i);
    api_sleep_ms(1200);
    CHECK(try_alloc(&p, (size_t)32 << 20) == CUDA_ERROR_OUT_OF_MEMORY, "after the pause");
    return 0;
}

/* The device runs out (FAKECUDA_MEM=64MiB, no limit): 40 MiB held, 48 MiB asked for. */
static int oom_device(void)
{
    start();
    hold_weights((size_t)40 << 20);
    CUdeviceptr p = 0;
    mark("before-oom");
    CHECK(try_alloc(&p, (size_t)48 << 20) == CUDA_ERROR_OUT_OF_MEMORY, "48 MiB fits in 64 MiB?");
    mark("after-oom");
    return 0;
}

/* The first device allocation after 2 fails (FAKECUDA_FAIL_ALLOC_AFTER=2). */
static int oom_fail_after(void)
{
    start();
    hold_weights((size_t)1 << 20);     /* a small segment: the first driver allocation */
    hold_cache((size_t)12 << 20);      /* a large segment: the second */
    CUdeviceptr p = 0;
    mark("before-oom");
    CHECK(try_alloc(&p, (size_t)300 << 20) == CUDA_ERROR_OUT_OF_MEMORY, "the third driver allocation succeeded");
    mark("after-oom");
    return 0;
}

static int plain(void)
{
    start();
    hold_weights(1000);
    return 0;
}

int main(int argc, char **argv)
{
    static const struct {
        const char *name;
        int (*run)(void);
    } scenarios[] = {
        {"signal_live", signal_live}, {"signal_growth", signal_growth}, {"signal_chained", signal_chained},
        {"signal_restart", signal_restart}, {"storm", storm}, {"fork_child", fork_child},
        {"interval_growth", interval_growth}, {"oom_limit", oom_limit}, {"oom_spaced", oom_spaced},
        {"oom_device", oom_device}, {"oom_fail_after", oom_fail_after}, {"plain", plain},
    };
    if (argc < 2) {
        fprintf(stderr, "usage: live_child <scenario> [report file]\n");
        return 2;
    }
    g_report = argc > 2 ? argv[2] : NULL;
    for (size_t i = 0; i < sizeof scenarios / sizeof *scenarios; i++)
        if (strcmp(argv[1], scenarios[i].name) == 0) return scenarios[i].run();
    fprintf(stderr, "live_child: unknown scenario %s\n", argv[1]);
    return 2;
}
