/* Reports while the program runs: GPUMEM_REPORT_SIGNAL (on demand, as LeakSanitizer's
 * recoverable leak check) and GPUMEM_REPORT_INTERVAL (every so many seconds, with each group's
 * growth since the previous report, as heaptrack shows per call site).
 *
 * The signal handler does one async-signal-safe thing: it writes a byte to a pipe (non-blocking;
 * a full pipe already holds a wake-up) and passes the signal on to a handler the program had
 * installed before. A thread of ours, started when either option is on and with every signal
 * blocked, waits on the pipe (poll, its timeout the next interval), then reads the tables and
 * symbolizes as the exit report does (report.c, gm_report_write_live): each table under its
 * owner's lock for a moment, so allocating threads only ever wait for one table's walk, and the
 * allocation path itself has nothing added to it. SA_RESTART keeps the program's interrupted
 * system calls going (those the kernel never restarts, such as poll and nanosleep, return EINTR
 * as for any signal).
 *
 * Exit: the exit report takes the live report's turn (gm_reporter_stop) and keeps it, so a live
 * report under way ends before the exit report starts and none starts after it. Fork: the
 * child has no reporter thread; the fork registry's child handler closes its copy of the pipe (a
 * signal to the child then reaches only the program's own handler, if it had one) and makes the
 * turn's lock new. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include "gm_report.h"

static int pipe_fds[2] = {-1, -1};
static _Atomic int wake_fd = -1;          /* what the handler writes to; -1: nobody listens */
static int signo;                         /* GPUMEM_REPORT_SIGNAL's, 0 for none */
/* What the program had installed before us, published before ours is installed (atomics: the
 * handler runs on any thread, with no other ordering to rely on). */
static _Atomic(void (*)(int, siginfo_t *, void *)) program_sigaction;
static _Atomic(void (*)(int)) program_handler;
static pthread_mutex_t turn = PTHREAD_MUTEX_INITIALIZER; /* one live report at a time */
static _Atomic bool stopped;              /* exit began (or this is a fork child) */
static _Atomic uint64_t written;

static void on_signal(int sig, siginfo_t *info, void *uc)
{
    int saved = errno;
    int fd = atomic_load_explicit(&wake_fd, memory_order_relaxed);
    if (fd >= 0) {
        char c = 1;
        ssize_t r = write(fd, &c, 1);
        (void)r;
    }
    errno = saved;
    /* The program's own handler, installed before ours, still runs. */
    void (*act)(int, siginfo_t *, void *) = atomic_load_explicit(&program_sigaction, memory_order_acquire);
    void (*handler)(int) = atomic_load_explicit(&program_handler, memory_order_acquire);
    if (act) act(sig, info, uc);
    else if (handler) handler(sig);
}

static void write_one(const char *why)
{
    pthread_mutex_lock(&turn);
    if (!atomic_load(&stopped)) {
        uint64_t t0 = gm_now_ns();
        gm_report_write_live(why);
        atomic_fetch_add(&written, 1);
        gm_log(GM_INFO, "%s report written in %.3f ms", why, (double)(gm_now_ns() - t0) / 1e6);
    }
    pthread_mutex_unlock(&turn);
}

static void drain(int fd)
{
    char buf[64];
    while (read(fd, buf, sizeof buf) > 0) {}
}

static void *reporter_main(void *arg)
{
    (void)arg;
    uint64_t interval = (uint64_t)gm_mgr.cfg->report_interval * 1000000000ull;
    uint64_t next = interval ? gm_now_ns() + interval : 0;
    int fd = pipe_fds[0];
    while (!atomic_load(&stopped)) {
        int timeout = -1;
        if (interval) {
            uint64_t now = gm_now_ns();
            timeout = next > now ? (int)((next - now + 999999) / 1000000) : 0;
        }
        struct pollfd p = {fd, POLLIN, 0};
        int r = fd >= 0 ? poll(&p, 1, timeout) : poll(NULL, 0, timeout);
        if (atomic_load(&stopped)) break;
        if (r < 0 && errno != EINTR) {
            gm_log(GM_ERROR, "the reporter thread cannot wait (%s); no more reports while running", strerror(errno));
            break;
        }
        if (r > 0 && (p.revents & POLLIN)) {
            drain(fd);
            write_one("signal");
        }
        if (interval && gm_now_ns() >= next) {
            write_one("interval");
            uint64_t now = gm_now_ns();
            next += interval;
            if (next <= now) next = now + interval; /* a report longer than the interval: no burst */
        }
    }
    return NULL;
}

static void forget_in_child(void)
{
    atomic_store(&wake_fd, -1);
    atomic_store(&stopped, true);
    for (int i = 0; i < 2; i++)
        if (pipe_fds[i] >= 0) close(pipe_fds[i]);
    pipe_fds[0] = pipe_fds[1] = -1;
    pthread_mutex_init(&turn, NULL);
}

static const gm_fork_handlers fork_handlers = {NULL, NULL, forget_in_child};

static bool install_handler(void)
{
    if (pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK) != 0) {
        gm_log(GM_ERROR, "GPUMEM_REPORT_SIGNAL: cannot make a pipe (%s); the signal is left alone", strerror(errno));
        return false;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigfillset(&sa.sa_mask); /* nothing else runs on top of ours while it writes its byte */
    atomic_store(&wake_fd, pipe_fds[1]);
    /* The program's action is read before ours is installed: a signal right after finds it. */
    struct sigaction program;
    if (sigaction(signo, NULL, &program) != 0) {
        atomic_store(&wake_fd, -1);
        gm_log(GM_ERROR, "GPUMEM_REPORT_SIGNAL: cannot read the signal's action (%s)", strerror(errno));
        return false;
    }
    if (program.sa_flags & SA_SIGINFO) {
        if (program.sa_sigaction) atomic_store(&program_sigaction, program.sa_sigaction);
    } else if (program.sa_handler != SIG_DFL && program.sa_handler != SIG_IGN) {
        atomic_store(&program_handler, program.sa_handler);
    }
    if (sigaction(signo, &sa, NULL) != 0) {
        atomic_store(&wake_fd, -1);
        gm_log(GM_ERROR, "GPUMEM_REPORT_SIGNAL: cannot install the handler (%s)", strerror(errno));
        return false;
    }
    if (atomic_load(&program_sigaction) || atomic_load(&program_handler))
        gm_log(GM_INFO, "GPUMEM_REPORT_SIGNAL: the program's own handler of %s runs after gpumem's", strsignal(signo));
    return true;
}

static void start_once(void)
{
    const gm_config *cfg = gm_mgr.cfg;
    signo = gm_config_report_signal(cfg);
    if (!signo && !cfg->report_interval) return;
    gm_fork_register(GM_FORK_REPORTER, &fork_handlers);
    if (signo && !install_handler()) signo = 0;
    if (!signo && !cfg->report_interval) return;
    /* The thread takes no signal of the program's: all blocked while it is made, so it inherits that. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    int rc = pthread_create(&t, &attr, reporter_main, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        atomic_store(&wake_fd, -1); /* the handler stays (it passes the signal on) but wakes nobody */
        gm_log(GM_ERROR, "cannot start the reporter thread (%s); no reports while running", strerror(rc));
        return;
    }
    pthread_setname_np(t, "gpumem-report");
}

void gm_reporter_start(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, start_once);
}

bool gm_reporter_stop(void)
{
    atomic_store(&stopped, true);
    /* Kept: the reporter waits for it forever if it wakes now. Not got within the wait (a live
     * report still running): the flag alone keeps a new one from starting. */
    bool got = gm_lock_for_report(&turn);
    atomic_store(&wake_fd, -1);
    return got;
}

uint64_t gm_reporter_reports_written(void) { return atomic_load(&written); }
