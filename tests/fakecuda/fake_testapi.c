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

/* Whether a kernel of context `c` may touch [p, p+n) on the real driver: memory of its own
 * device, host and managed memory, and another device's memory once `c` enabled peer access to
 * it (cuCtxEnablePeerAccess, or an IPC open with CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS); a cuMemMap
 * mapping only where cuMemSetAccess gave c's device access, whatever peer access says. */
static CUresult kernel_may_touch(const fk_ctx *c, uintptr_t p, size_t n)
{
    const fk_alloc *a = mem_find(p);
    if (!a || p + n > a->base + a->size) return CUDA_ERROR_ILLEGAL_ADDRESS;
    if (a->kind == A_MAPPED) return a->access & (1u << c->dev) ? CUDA_SUCCESS : CUDA_ERROR_ILLEGAL_ADDRESS;
    if (a->kind == A_HOST || a->kind == A_REGISTERED || a->kind == A_MANAGED || a->dev == c->dev)
        return CUDA_SUCCESS;
    return c->peers & (1u << a->dev) ? CUDA_SUCCESS : CUDA_ERROR_ILLEGAL_ADDRESS;
}

FK_API CUresult fakecuda_launch_kernel_fill(CUstream s, CUdeviceptr p, unsigned char value, size_t n)
{
    CUresult r = state_enter();
    if (r) return r;
    fk_stream *st;
    if ((r = stream_resolve(s, false, &st)) == CUDA_SUCCESS) r = kernel_may_touch(st->ctx, (uintptr_t)p, n);
    state_leave(CUDA_SUCCESS);
    return r ? r : fakecuda_launch_fill(s, p, value, n, 0);
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
