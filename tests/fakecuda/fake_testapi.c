/* fake_testapi.c: the test-only entry points declared in fakecuda.h. A "kernel" a test can
 * queue (fakecuda_launch_fill), the call counters, and the knobs: a delay for every copy,
 * injected copy errors, and a re-read of the environment.
 *
 * They are exported but not in the cuGetProcAddress table: only a test that links the fake (or
 * dlsyms it) calls them, never the shim. */
#include "fake_internal.h"

#include <string.h>

FK_API CUresult fakecuda_launch_fill(CUstream s, CUdeviceptr p, unsigned char value, size_t n,
                                     unsigned delay_us)
{
    fk_work w = copy_set_work(W_FILL, p, value, n);
    w.delay_us = delay_us;
    return copy_submit(s, false, w, false);
}

FK_API void fakecuda_counters(fakecuda_counters_t *out)
{
    if (!out)
        return;
    LOCK();
    *out = g_cnt;
    out->copies_pending = g_copies_pending;
    out->bytes_in_use = 0;
    for (int i = 0; i < FK_MAX_DEVICES; i++)
        out->bytes_in_use += g_dev[i].in_use;
    UNLOCK();
}

FK_API void fakecuda_reset_counters(void)
{
    LOCK();
    memset(&g_cnt, 0, sizeof g_cnt);
    UNLOCK();
}

FK_API void fakecuda_set_copy_delay(unsigned delay_us)
{
    LOCK();
    g_copy_delay_us = delay_us;
    UNLOCK();
}

FK_API void fakecuda_fail_copies(unsigned after, unsigned count, CUresult code)
{
    LOCK();
    g_copy_fail_skip = after;
    g_copy_fail_count = count;
    g_copy_fail_code = code;
    UNLOCK();
}

FK_API void fakecuda_reload_env(void)
{
    LOCK();
    state_env_load(true);
    UNLOCK();
}
