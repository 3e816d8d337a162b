/* Unit tests of the per-device limit (manager/account/limits.c): resolution of GPUMEM_LIMIT and
 * GPUMEM_LIMIT_<i> (bytes, percent of the device, none), reserve/unreserve against it, headroom,
 * peaks, overflow, devices out of range, and that threads reserving at once can never pass it
 * together. Criterion runs each test in its own process with its own environment. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdlib.h>

#include "gm_api.h"

#define MiB ((uint64_t)1 << 20)
#define GiB ((uint64_t)1 << 30)

static void start(const char *limit, const char *limit1)
{
    if (limit) setenv("GPUMEM_LIMIT", limit, 1);
    if (limit1) setenv("GPUMEM_LIMIT_1", limit1, 1);
    gm_config_reset_for_tests();
    cr_assert(gm_manager_init(gm_host_backend()));
}

static uint64_t reserved(int device)
{
    return atomic_load(&gm_device_get(device)->reserved);
}

Test(limits, bytes_limit_is_exact)
{
    start("4MiB", NULL);
    gm_limit_init_device(0, 16 * GiB, NULL);
    cr_assert_eq(gm_limit_headroom(0), 4 * MiB);
    cr_assert(gm_limit_reserve(0, 3 * MiB));
    cr_assert(gm_limit_reserve(0, 1 * MiB), "up to the limit exactly");
    cr_assert_not(gm_limit_reserve(0, 1), "one byte past it is refused");
    cr_assert_eq(reserved(0), 4 * MiB, "a refused reservation takes nothing");
    cr_assert_eq(gm_limit_headroom(0), 0);
    gm_limit_unreserve(0, 2 * MiB);
    cr_assert_eq(gm_limit_headroom(0), 2 * MiB);
    cr_assert_eq(atomic_load(&gm_device_get(0)->reserved_peak), 4 * MiB);
}

Test(limits, percent_resolves_against_the_device_total)
{
    start("25%", NULL);
    gm_limit_init_device(0, 8 * GiB, NULL);
    cr_assert_eq(atomic_load(&gm_device_get(0)->limit), 2 * GiB);
    /* resolved once: a later total does not move it */
    gm_limit_init_device(0, 80 * GiB, NULL);
    cr_assert_eq(atomic_load(&gm_device_get(0)->limit), 2 * GiB);
}

Test(limits, tiny_percent_never_reads_as_no_limit)
{
    start("0.0000001%", NULL);
    gm_limit_init_device(0, 1000, NULL);
    cr_assert_eq(atomic_load(&gm_device_get(0)->limit), 1, "a limit rounding to 0 bytes stays a limit");
    cr_assert_not(gm_limit_reserve(0, 2));
}

Test(limits, no_limit_means_unlimited_headroom)
{
    start(NULL, NULL);
    gm_limit_init_device(0, 16 * GiB, NULL);
    cr_assert_eq(gm_limit_headroom(0), UINT64_MAX);
    cr_assert(gm_limit_reserve(0, 64 * GiB), "no limit: the device decides");
    cr_assert_not(gm_limit_reserve(0, UINT64_MAX), "the counter cannot overflow");
    cr_assert_eq(reserved(0), 64 * GiB);
}

Test(limits, per_device_setting_overrides_the_default)
{
    start("4MiB", "8MiB");
    gm_limit_init_device(0, 16 * GiB, NULL);
    gm_limit_init_device(1, 16 * GiB, NULL);
    cr_assert_eq(gm_limit_headroom(0), 4 * MiB);
    cr_assert_eq(gm_limit_headroom(1), 8 * MiB);
    cr_assert(gm_limit_reserve(1, 6 * MiB), "devices are counted apart");
    cr_assert_eq(reserved(0), 0);
}

Test(limits, devices_out_of_range_are_refused)
{
    start("4MiB", NULL);
    cr_assert_null(gm_device_get(-1));
    cr_assert_null(gm_device_get(GM_MAX_DEVICES));
    cr_assert_not(gm_limit_reserve(GM_MAX_DEVICES, 1));
    cr_assert_eq(gm_limit_headroom(-1), 0);
    gm_limit_unreserve(GM_MAX_DEVICES, 1); /* no crash */
    gm_device_note_allocated(-1, 5);
}

Test(limits, allocated_peak_follows_the_high_water_mark)
{
    start(NULL, NULL);
    gm_device_note_allocated(0, 3000);
    gm_device_note_allocated(0, -1000);
    gm_device_note_allocated(0, 500);
    gm_device *d = gm_device_get(0);
    cr_assert_eq(atomic_load(&d->allocated), 2500);
    cr_assert_eq(atomic_load(&d->allocated_peak), 3000);
}

/* Four threads reserve 1 MiB at a time against a 64 MiB limit until refused, then give back a
 * random part and go on: the counter never passes the limit and nothing is lost. */
#define THREADS 4
static _Atomic uint64_t taken[THREADS];
static _Atomic bool over_limit;

static void *hammer(void *arg)
{
    int me = (int)(intptr_t)arg;
    unsigned seed = 7u + (unsigned)me;
    for (int i = 0; i < 20000; i++) {
        if (gm_limit_reserve(0, MiB)) taken[me] += MiB;
        if (reserved(0) > 64 * MiB) over_limit = true;
        if (taken[me] && rand_r(&seed) % 3 == 0) {
            gm_limit_unreserve(0, MiB);
            taken[me] -= MiB;
        }
    }
    return NULL;
}

Test(limits, threads_never_pass_the_limit_together)
{
    start("64MiB", NULL);
    gm_limit_init_device(0, 16 * GiB, NULL);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, hammer, (void *)(intptr_t)i);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    uint64_t sum = 0;
    for (int i = 0; i < THREADS; i++) sum += taken[i];
    cr_assert_not(over_limit, "the reserved bytes passed the limit");
    cr_assert_eq(reserved(0), sum, "every reservation is accounted for");
    cr_assert_leq(atomic_load(&gm_device_get(0)->reserved_peak), 64 * MiB);
}
