/* The base layer: the fork registry runs handlers in the written-down order whatever the order
 * they were registered in; the pid pattern. */
#include <criterion/criterion.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "gm_base.h"

static char trail[64];
static size_t ntrail;
static void mark(char c) { if (ntrail < sizeof trail - 1) trail[ntrail++] = c; }

static void prep_heaps(void) { mark('H'); }
static void prep_buffers(void) { mark('B'); }
static void prep_copies(void) { mark('C'); }
static void child_heaps(void) { mark('h'); }
static void child_buffers(void) { mark('b'); }
static void child_copies(void) { mark('c'); }

Test(base, fork_handlers_run_in_lock_order)
{
    static const gm_fork_handlers copies = {prep_copies, NULL, child_copies};
    static const gm_fork_handlers heaps = {prep_heaps, NULL, child_heaps};
    static const gm_fork_handlers buffers = {prep_buffers, NULL, child_buffers};
    gm_fork_register(GM_FORK_COPIES, &copies);
    gm_fork_register(GM_FORK_HEAPS, &heaps);
    gm_fork_register(GM_FORK_BUFFERS, &buffers);
    int fds[2];
    cr_assert_eq(pipe(fds), 0);
    ntrail = 0;
    pid_t pid = fork();
    if (pid == 0) { /* prepare ascending (outermost lock first), then child descending */
        ssize_t w = write(fds[1], trail, ntrail);
        _exit(w == (ssize_t)ntrail ? 0 : 1);
    }
    cr_assert_gt(pid, 0);
    close(fds[1]);
    char got[64] = {0};
    ssize_t n = read(fds[0], got, sizeof got - 1);
    int status = 0;
    waitpid(pid, &status, 0);
    cr_assert_gt(n, 0);
    cr_expect_str_eq(got, "BHCchb");
    trail[ntrail] = 0;
    cr_expect_str_eq(trail, "BHC", "the parent ran the prepare handlers only");
}

Test(base, pid_pattern)
{
    char out[64], want[64];
    gm_expand_pid("gpumem.%p.json", out, sizeof out);
    snprintf(want, sizeof want, "gpumem.%ld.json", (long)getpid());
    cr_expect_str_eq(out, want);
    gm_expand_pid("plain", out, sizeof out);
    cr_expect_str_eq(out, "plain");
}
