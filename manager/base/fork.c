/* One pthread_atfork for all of gpumem, running the registered handlers in the order of
 * gm_fork_order (see gm_base.h). Registration order no longer decides the lock order.
 *
 * No lock of ours is held while the handlers run: a handler takes locks that other threads hold
 * while they register (a heap's lock, for one), so a registry lock here would close a cycle.
 * Entries are published with one atomic store each; a fork snapshots them in `prepare` so the
 * same handlers see parent/child (glibc runs the handlers of concurrent forks one fork at a time). */
#include "gm_base.h"

static _Atomic(const gm_fork_handlers *) table[GM_FORK_ORDERS];
static const gm_fork_handlers *running[GM_FORK_ORDERS]; /* the snapshot of the fork under way */

static void run_prepare(void)
{
    for (int i = 0; i < GM_FORK_ORDERS; i++) {
        running[i] = atomic_load(&table[i]);
        if (running[i] && running[i]->prepare) running[i]->prepare();
    }
}

static void run_parent(void)
{
    for (int i = GM_FORK_ORDERS; i-- > 0;)
        if (running[i] && running[i]->parent) running[i]->parent();
}

static void run_child(void)
{
    for (int i = GM_FORK_ORDERS; i-- > 0;)
        if (running[i] && running[i]->child) running[i]->child();
}

static void install(void) { pthread_atfork(run_prepare, run_parent, run_child); }

void gm_fork_register(gm_fork_order order, const gm_fork_handlers *handlers)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    if ((unsigned)order >= GM_FORK_ORDERS) return;
    pthread_once(&once, install);
    atomic_store(&table[order], handlers);
}
