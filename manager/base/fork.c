/* One pthread_atfork for all of gpumem, running the registered handlers in the order of
 * gm_fork_order (see gm_base.h). Registration order no longer decides the lock order. */
#include <pthread.h>

#include "gm_base.h"

typedef struct fork_handlers {
    void (*prepare)(void), (*parent)(void), (*child)(void);
} fork_handlers;

static fork_handlers handlers[GM_FORK_ORDERS];
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static bool installed;

static void run_prepare(void)
{
    pthread_mutex_lock(&registry_lock); /* no registration while a fork is under way */
    for (int i = 0; i < GM_FORK_ORDERS; i++)
        if (handlers[i].prepare) handlers[i].prepare();
}

static void run_parent(void)
{
    for (int i = GM_FORK_ORDERS; i-- > 0;)
        if (handlers[i].parent) handlers[i].parent();
    pthread_mutex_unlock(&registry_lock);
}

static void run_child(void)
{
    for (int i = GM_FORK_ORDERS; i-- > 0;)
        if (handlers[i].child) handlers[i].child();
    pthread_mutex_init(&registry_lock, NULL);
}

void gm_fork_register(gm_fork_order order, void (*prepare)(void), void (*parent)(void),
                      void (*child)(void))
{
    if ((unsigned)order >= GM_FORK_ORDERS) return;
    pthread_mutex_lock(&registry_lock);
    handlers[order] = (fork_handlers){prepare, parent, child};
    if (!installed) installed = pthread_atfork(run_prepare, run_parent, run_child) == 0;
    pthread_mutex_unlock(&registry_lock);
}
