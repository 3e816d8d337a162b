/* Many threads allocate, write, check and free at once, in strict and fast mode: a block must
 * never be handed to two owners (each owner's pattern survives until it frees), and the counters
 * balance at the end. Also built under ThreadSanitizer by the tsan setup. */
#include <criterion/criterion.h>
#include "threads_core.h"

static void run_threads(const char *free_sync)
{
    setenv("GPUMEM_FREE_SYNC", free_sync, 1);
    setenv("GPUMEM_REPORT", "off", 1);
    gm_config_reset_for_tests();
    cr_assert(gm_manager_init(gm_host_backend()));
    heap = gm_heap_get(1, 0);
    long failure = run_workers();
    cr_expect_eq(failure, 0, "a worker failed with code %ld (1 corrupted block, 2 free, 3 alloc)", failure);
    gpumem_stats st;
    gpumem_get_stats(0, &st);
    cr_expect_eq(st.allocations, st.frees);
    cr_expect_eq(st.bytes_allocated, 0);
    cr_expect_eq(st.bytes_requested, 0);
    cr_expect_eq(st.bytes_reserved, gm_host_backend_in_use());
}

Test(threads, strict_mode, .timeout = 300) { run_threads("1"); }

Test(threads, fast_mode, .timeout = 300)
{
    gm_host_backend_set_fence_delay(3); /* fences complete after a few queries */
    run_threads("0");
}
