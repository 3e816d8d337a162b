/* The threaded stress test as a plain program, for the ThreadSanitizer setup: TSan reports races
 * itself (and fails the run through TSAN_OPTIONS=halt_on_error=1); this checks the results. */
#include <stdio.h>

#include "threads_core.h"

static int run_mode(const char *free_sync)
{
    gpumem_stats st;
    long failure = run_workers();
    gpumem_get_stats(0, &st);
    bool balanced = st.allocations == st.frees && st.bytes_allocated == 0 &&
                    st.bytes_reserved == gm_host_backend_in_use();
    printf("free_sync=%s: workers %s, counters %s\n", free_sync, failure ? "FAILED" : "ok",
           balanced ? "balanced" : "UNBALANCED");
    return failure || !balanced;
}

int main(int argc, char **argv)
{
    const char *free_sync = argc > 1 ? argv[1] : "1";
    ops_per_thread = 3000;
    setenv("GPUMEM_FREE_SYNC", free_sync, 1);
    setenv("GPUMEM_REPORT", "off", 1);
    gm_host_backend_set_fence_delay(3);
    gm_manager_init(gm_host_backend());
    heap = gm_heap_get(1, 0);
    return run_mode(free_sync);
}
