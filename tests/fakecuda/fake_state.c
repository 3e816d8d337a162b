/* fake_state.c: the fake driver's global state and its one lock, the environment knobs, fault
 * injection and the fork handlers.
 *
 * All state lives here, in one place, because one mutex (g_mu) guards all of it and because
 * fork_child must forget all of it at once; the files that use each part are named in
 * fake_internal.h. The model of the fake as a whole is described there too. */
#include "fake_internal.h"

#include <stdlib.h>

/* ================================================================ the state */

pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t g_done = PTHREAD_COND_INITIALIZER;
atomic_bool g_inited;
int g_ndev = 1;
uint64_t g_capacity = (uint64_t)1 << 30;
long g_fail_after = -1;
long g_fail_map_after = -1;
uint64_t g_map_attempts;
bool g_no_vmm;
bool g_no_shareable;
uint64_t g_alloc_attempts;
fk_device g_dev[FK_MAX_DEVICES];
fk_ctx *g_ctxs;
fk_stream *g_streams;
fk_event *g_events;
fk_alloc **g_allocs;
size_t g_nallocs, g_allocs_cap;
fk_alloc *g_vmm;
uint64_t g_next_id = 1;
fakecuda_counters_t g_cnt;
uint64_t g_copies_pending;
unsigned g_copy_delay_us;
unsigned g_copy_fail_skip, g_copy_fail_count;
CUresult g_copy_fail_code;

__thread fk_ctx *tl_stack[FK_STACK_MAX];
__thread int tl_depth;
__thread char tl_token;

/* Every entry point but version/error/proc-address queries needs cuInit first. */
CUresult state_enter(void)
{
    if (!atomic_load(&g_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    LOCK();
    return CUDA_SUCCESS;
}

CUresult state_leave(CUresult r)
{
    UNLOCK();
    return r;
}

/* ================================================================ environment */

static uint64_t state_env_u64(const char *name, uint64_t def)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return def;
    char *end;
    unsigned long long v = strtoull(s, &end, 0);
    if (end == s)
        return def;
    switch (*end) { /* binary suffixes keep test settings readable */
    case 'k': case 'K': v <<= 10; break;
    case 'm': case 'M': v <<= 20; break;
    case 'g': case 'G': v <<= 30; break;
    default: break;
    }
    return v;
}

static long state_env_long(const char *name, long def)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return def;
    char *end;
    long v = strtol(s, &end, 0);
    return end == s ? def : v;
}

/* Called with g_mu held. The fault-injection count restarts when forced or when the setting
 * changed, so repeated cuInit calls (shim and program both call it) do not reset it. */
void state_env_load(bool force)
{
    g_capacity = state_env_u64("FAKECUDA_MEM", (uint64_t)1 << 30);
    long n = state_env_long("FAKECUDA_DEVICES", 1);
    g_ndev = n < 0 ? 1 : n > FK_MAX_DEVICES ? FK_MAX_DEVICES : (int)n;
    long fail = state_env_long("FAKECUDA_FAIL_ALLOC_AFTER", -1);
    if (fail < 0)
        fail = -1;
    if (force || fail != g_fail_after)
        g_alloc_attempts = 0;
    g_fail_after = fail;
    long map_fail = state_env_long("FAKECUDA_FAIL_MAP_AFTER", -1);
    if (map_fail < 0)
        map_fail = -1;
    if (force || map_fail != g_fail_map_after)
        g_map_attempts = 0;
    g_fail_map_after = map_fail;
    g_no_vmm = state_env_long("FAKECUDA_NO_VMM", 0) != 0;
    g_no_shareable = state_env_long("FAKECUDA_NO_SHAREABLE", 0) != 0;
}

/* ================================================================ fault injection */

/* FAKECUDA_FAIL_ALLOC_AFTER: counts one device allocation attempt and says whether it must fail
 * with CUDA_ERROR_OUT_OF_MEMORY. Called with g_mu held, before the capacity check. */
bool state_alloc_fault(void)
{
    g_alloc_attempts++;
    return g_fail_after >= 0 && g_alloc_attempts > (uint64_t)g_fail_after;
}

/* fakecuda_fail_copies: the injected error for this copy, or CUDA_SUCCESS. Called with g_mu
 * held, after the copy's arguments were validated and before anything is queued. */
CUresult state_copy_fault(void)
{
    if (!g_copy_fail_count)
        return CUDA_SUCCESS;
    if (g_copy_fail_skip) {
        g_copy_fail_skip--;
        return CUDA_SUCCESS;
    }
    g_copy_fail_count--;
    return g_copy_fail_code;
}

/* ================================================================ fork */

/* A fork while another thread is inside the fake (holding g_mu, or a worker between two items)
 * would leave the child a lock no thread will ever release. So g_mu, the fake's only lock, is
 * held across fork(), and the child starts from a driver that knows nothing of the parent: like
 * a real driver's child it has no usable context and must call cuInit again; the parent's
 * streams have no worker threads in it, their events can never complete. */
static void state_fork_prepare(void)
{
    LOCK();
}

static void state_fork_parent(void)
{
    UNLOCK();
}

/* Forgets rather than frees: the parent's records may be mid-update by threads that do not exist
 * here (and the memory behind its allocations may be shared with it through memfds). Contexts
 * stay listed, dead, so that a handle from before the fork is refused, not followed. */
static void state_fork_child(void)
{
    UNLOCK(); /* taken by this same thread in state_fork_prepare; released, not re-created, so
               * that ThreadSanitizer (which saw it taken) sees it released */
    pthread_cond_init(&g_done, NULL); /* its waiters were other threads: gone */
    for (fk_ctx *c = g_ctxs; c; c = c->next) {
        c->alive = false;
        c->prim_refs = 0;
        c->legacy = NULL;
    }
    for (int i = 0; i < FK_MAX_DEVICES; i++) {
        g_dev[i].primary = NULL;
        g_dev[i].in_use = 0;
    }
    g_streams = NULL;
    g_events = NULL;
    g_nallocs = 0;
    g_vmm = NULL;
    array_forget_in_child();
    graph_forget_in_child();
    g_copies_pending = 0;
    tl_depth = 0; /* the forking thread's context stack: the only thread the child has */
    atomic_store(&g_inited, false);
}

/* At load, so before the shim's own handlers: prepare handlers run in reverse order, so the
 * shim's locks (taken before it calls the driver) are taken before g_mu, as in normal use. */
__attribute__((constructor)) static void state_fork_handlers_install(void)
{
    pthread_atfork(state_fork_prepare, state_fork_parent, state_fork_child);
}
