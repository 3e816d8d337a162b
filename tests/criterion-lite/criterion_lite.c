/* The runner of criterion-lite (see criterion/criterion.h): every registered test runs in a
 * forked child, one at a time, like Criterion's own processes; a child that fails a check, dies
 * of a signal (a sanitizer's abort included) or outlives its time fails the test. Arguments, if
 * any, are "suite::name" filters. */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/wait.h>
#include <unistd.h>

#include "criterion/criterion.h"

/* Criterion's default per-test limit is none; a hung test must still name itself. */
#define CRL_TEST_SECONDS 300
#define CRL_SKIPPED 77 /* a child's exit status: cr_skip_test */

static crl_test *head, **tail = &head;
static bool failed; /* in the child: a cr_expect failed */

void crl_register(crl_test *t)
{
    *tail = t; /* in registration order, which is source order */
    tail = &t->next;
}

void crl_fail(bool fatal, const char *file, int line, const char *what, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "[----] %s:%d: Assertion failed: %s", file, line, what);
    if (fmt[0]) {
        fputs(": ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
    }
    fputc('\n', stderr);
    failed = true;
    if (fatal) exit(1);
}

void crl_skip(const char *fmt, ...)
{
    va_list ap;
    fputs("[SKIP] ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(CRL_SKIPPED);
}

static bool selected(const crl_test *t, int argc, char **argv)
{
    char full[256];
    snprintf(full, sizeof full, "%s::%s", t->suite_name, t->test_name);
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], full) == 0) return true;
    return argc < 2;
}

/* Runs one test in a child; true when it passed. */
static bool run_one(const crl_test *t)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) return false;
    if (pid == 0) {
        alarm(t->timeout > 0 ? (unsigned)t->timeout + 1 : CRL_TEST_SECONDS);
        if (t->init) t->init();
        t->fn();
        if (t->fini) t->fini();
        exit(failed ? 1 : 0); /* exit, not _exit: the shim's exit handlers run as in a program */
    }
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return false;
    if (WIFEXITED(status) && (WEXITSTATUS(status) == 0 || WEXITSTATUS(status) == CRL_SKIPPED))
        return true;
    if (WIFSIGNALED(status))
        fprintf(stderr, "[FAIL] %s::%s: killed by signal %d%s\n", t->suite_name, t->test_name,
                WTERMSIG(status), WTERMSIG(status) == SIGALRM ? " (timed out)" : "");
    else
        fprintf(stderr, "[FAIL] %s::%s: exit status %d\n", t->suite_name, t->test_name, WEXITSTATUS(status));
    return false;
}

int main(int argc, char **argv)
{
    int ran = 0, bad = 0;
    for (const crl_test *t = head; t; t = t->next) {
        if (t->disabled || !selected(t, argc, argv)) continue;
        ran++;
        if (!run_one(t)) bad++;
        else fprintf(stderr, "[PASS] %s::%s\n", t->suite_name, t->test_name);
    }
    fprintf(stderr, "[====] Synthesis: Tested: %d | Passing: %d | Failing: %d\n", ran, ran - bad,
            bad);
    return bad || ran == 0 ? 1 : 0;
}
