/* Clocks. Allocation timestamps use the coarse clock: it costs 7 ns against 25 ns for
 * CLOCK_MONOTONIC on the machines measured, and a leak's age needs no more. */
#include <time.h>

#include "gm_base.h"

static uint64_t read_clock(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t gm_coarse_now_ns(void) { return read_clock(CLOCK_MONOTONIC_COARSE); }

uint64_t gm_now_ns(void) { return read_clock(CLOCK_MONOTONIC); }

bool gm_lock_for_report(pthread_mutex_t *m)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += GM_REPORT_WAIT_S;
    return pthread_mutex_timedlock(m, &until) == 0;
}
