/* The modes of gpumem-bench that live in their own files (one per concern). Each takes the
 * arguments after the mode name and returns the process exit status. */
#ifndef GPUMEM_BENCH_H
#define GPUMEM_BENCH_H

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* qsort order of doubles, for medians. */
static inline int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median and range of `n` values (at most BENCH_SPREAD_MAX; `v` is left as it is). */
#define BENCH_SPREAD_MAX 64
typedef struct { double median, lo, hi; } bench_spread;
static inline bench_spread bench_spread_of(const double *v, int n)
{
    double c[BENCH_SPREAD_MAX];
    if (n <= 0) return (bench_spread){0, 0, 0};
    if (n > BENCH_SPREAD_MAX) n = BENCH_SPREAD_MAX;
    for (int i = 0; i < n; i++) c[i] = v[i];
    qsort(c, (size_t)n, sizeof *c, cmp_double);
    return (bench_spread){c[n / 2], c[0], c[n - 1]};
}

int bench_transfer(int argc, char **argv); /* pageable copies through pinned staging against the driver's own (256 MiB both ways, and small copies) */
int bench_checks(int argc, char **argv); /* cost of the copy range check on the hook path */
int bench_pinned(int argc, char **argv); /* pinned host alloc+free: the driver's own against the pinned pool */
int bench_shared(int argc, char **argv); /* the shared budget: N processes attaching at once, and the pool-hit path in a group */
int bench_report(int argc, char **argv); /* a report of many live allocations on GPUMEM_REPORT_SIGNAL: time to write it, pool hits meanwhile */
int bench_expandable(int argc, char **argv); /* classic against expandable segments: churn peak ratio, pool-hit pair, grow cost per chunk */
int bench_buffers(int argc, char **argv); /* buffer growth: resize with data copy, in-place growth, tracking memory overhead */

#endif
