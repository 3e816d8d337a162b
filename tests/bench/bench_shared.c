/* gpumem-bench shared [N]: the shared budget (GPUMEM_SHARED) on the host backend.
 *
 *  1. Attach: N processes (default 256) start at once; each opens the region and takes its
 *     member slot (its first segment reservation). Reported: the wall time from the first fork to
 *     the last member attached, and each member's own attach time (median, max). Five rounds on
 *     one region, members exiting between rounds.
 *  2. The pool-hit path: alloc+free pairs that hit the pool, in a child without a group and one in
 *     a group, alternated over five rounds: the ledger is asked at segment growth only, so the
 *     two should not differ beyond noise.
 * Last lines: shared_attach_wall_ms_median=<X> and pool_pair_ratio_group_over_solo=<Y>. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"
#include "gm_api.h"

#define ROUNDS 5
#define MAX_MEMBERS 1024

static char region[256];

static void join_group(void)
{
    setenv("GPUMEM_SHARED", region, 1);
    setenv("GPUMEM_LIMIT", "64GiB", 1);
    setenv("GPUMEM_REPORT", "off", 1);
}

/* One member: attach and reserve, report the two times through `fd`, wait for the parent. */
static void member(int fd, int go)
{
    uint64_t t0 = now_ns();
    join_group();
    gm_manager_init(gm_host_backend());
    uintptr_t p;
    if (gm_alloc(gm_heap_get(1, 0), 4096, 0, 0, &p) != GPUMEM_OK) _exit(3);
    uint64_t times[2] = {t0, now_ns()};
    if (write(fd, times, sizeof times) != (ssize_t)sizeof times) _exit(4);
    char c;
    if (read(go, &c, 1) < 0) _exit(5); /* members stay attached until every one has attached */
    _exit(0);
}

/* One round: returns the wall time in ms; member attach times (ms) appended to `each`. */
static double attach_round(int n, double *each)
{
    int times[2], go[2];
    if (pipe(times) != 0 || pipe(go) != 0) exit(2);
    uint64_t start = now_ns(), last = start;
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) exit(2);
        if (pid == 0) {
            close(times[0]);
            close(go[1]);
            member(times[1], go[0]);
        }
    }
    close(times[1]);
    close(go[0]);
    for (int i = 0; i < n; i++) {
        uint64_t t[2];
        if (read(times[0], t, sizeof t) != (ssize_t)sizeof t) {
            fprintf(stderr, "gpumem-bench: member %d did not attach\n", i);
            exit(1);
        }
        each[i] = (double)(t[1] - t[0]) / 1e6;
        if (t[1] > last) last = t[1];
    }
    close(go[1]); /* every member sees end-of-file and exits */
    while (wait(NULL) > 0) {
    }
    close(times[0]);
    return (double)(last - start) / 1e6;
}

/* ------------------------------------------------------------------ the pool-hit path */

static void pool_pairs_child(bool grouped, int fd)
{
    if (grouped) join_group();
    else setenv("GPUMEM_REPORT", "off", 1);
    gm_manager_init(gm_host_backend());
    gm_heap *heap = gm_heap_get(1, 0);
    uintptr_t p;
    double batch[200];
    for (int b = 0; b < 200; b++) {
        uint64_t t0 = now_ns();
        for (int i = 0; i < 1000; i++) {
            if (gm_alloc(heap, 4096, 0, 0, &p) != GPUMEM_OK) _exit(3);
            gm_free(heap, p, GM_FREE_BARRIER, NULL);
        }
        batch[b] = (double)(now_ns() - t0) / 1000.0;
    }
    qsort(batch, 200, sizeof *batch, cmp_double);
    if (write(fd, &batch[100], sizeof(double)) != (ssize_t)sizeof(double)) _exit(4);
    _exit(0);
}

static double pool_pairs(bool grouped)
{
    int fds[2];
    if (pipe(fds) != 0) exit(2);
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        pool_pairs_child(grouped, fds[1]);
    }
    close(fds[1]);
    double ns = 0;
    if (read(fds[0], &ns, sizeof ns) != (ssize_t)sizeof ns) exit(1);
    close(fds[0]);
    waitpid(pid, NULL, 0);
    return ns;
}

static void print_spread(const char *what, double *v, int n, const char *unit, const char *of)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    printf("%-40s median %9.3f %s  (min %.3f, max %.3f, %d %s)\n", what, v[n / 2], unit, v[0], v[n - 1], n, of);
}

int bench_shared(int argc, char **argv)
{
    int n = argc >= 1 ? atoi(argv[0]) : 256;
    if (n < 1 || n > MAX_MEMBERS) {
        fprintf(stderr, "gpumem-bench shared: N must be 1..%d\n", MAX_MEMBERS);
        return 2;
    }
    const char *dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(region, sizeof region, "%s/gpumem-bench-shared.%ld", dir, (long)getpid());
    unlink(region);
    static double each[ROUNDS * MAX_MEMBERS];
    double wall[ROUNDS], solo[ROUNDS], group[ROUNDS], ratio[ROUNDS];
    for (int r = 0; r < ROUNDS; r++) wall[r] = attach_round(n, each + r * n);
    for (int r = 0; r < ROUNDS; r++) { /* alternated, so drift hits both */
        solo[r] = pool_pairs(false);
        group[r] = pool_pairs(true);
        ratio[r] = group[r] / solo[r];
    }
    unlink(region);
    printf("gpumem-bench shared: %d members, region %s\n", n, region);
    print_spread("attach: all members, wall", wall, ROUNDS, "ms", "rounds");
    print_spread("attach: one member (open+map+slot)", each, ROUNDS * n, "ms", "members");
    print_spread("pool pair 4 KiB, no group", solo, ROUNDS, "ns", "rounds");
    print_spread("pool pair 4 KiB, in a group", group, ROUNDS, "ns", "rounds");
    print_spread("pool pair ratio group/solo", ratio, ROUNDS, "x", "rounds");
    printf("shared_attach_wall_ms_median=%.3f\n", wall[ROUNDS / 2]);
    printf("pool_pair_ratio_group_over_solo=%.3f\n", ratio[ROUNDS / 2]);
    return 0;
}
