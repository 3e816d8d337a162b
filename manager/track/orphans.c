/* Leaks of destroyed contexts (device heaps and pinned blocks alike), kept for the exit report:
 * the driver freed their memory with the context, but the program never freed them. */
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "gm_track.h"

static pthread_mutex_t orphans_lock = PTHREAD_MUTEX_INITIALIZER;
static gm_leak_group *groups;
static size_t ngroups, groups_cap;

gm_leak_group gm_leak_group_of(int device, gm_memory memory, const gm_record *rec)
{
    return (gm_leak_group){device, (uint8_t)memory, rec->tag, rec->caller, rec->stack_id,
                           rec->requested, 1};
}

/* A fork child: the parent's contexts are not the child's, nor are their leaks. */
static void forget_in_child(void)
{
    pthread_mutex_init(&orphans_lock, NULL);
    free(groups);
    groups = NULL;
    ngroups = groups_cap = 0;
}

static void lock_for_fork(void) { pthread_mutex_lock(&orphans_lock); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&orphans_lock); }

static void register_fork(void)
{
    static const gm_fork_handlers handlers = {lock_for_fork, unlock_after_fork, forget_in_child};
    gm_fork_register(GM_FORK_ORPHANS, &handlers);
}

static bool same_group(const gm_leak_group *a, const gm_leak_group *b)
{
    return a->device == b->device && a->memory == b->memory && a->tag == b->tag &&
           a->caller == b->caller && a->stack_id == b->stack_id;
}

/* Linear: contexts die rarely and the groups are few (one per distinct call stack). */
static void merge_locked(const gm_leak_group *g)
{
    for (size_t i = 0; i < ngroups; i++)
        if (same_group(&groups[i], g)) {
            groups[i].bytes += g->bytes;
            groups[i].count += g->count;
            return;
        }
    if (ngroups == groups_cap) {
        size_t cap = groups_cap ? groups_cap * 2 : 16;
        gm_leak_group *grown = realloc(groups, cap * sizeof *grown);
        if (!grown) return; /* out of host memory: the leak goes unlisted, nothing else is lost */
        groups = grown;
        groups_cap = cap;
    }
    groups[ngroups++] = *g;
}

void gm_orphans_keep(int device, gm_memory memory, const gm_record *rec)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork);
    gm_leak_group g = gm_leak_group_of(device, memory, rec);
    pthread_mutex_lock(&orphans_lock);
    merge_locked(&g);
    pthread_mutex_unlock(&orphans_lock);
}

bool gm_orphans_for_each(void (*fn)(void *cx, const gm_leak_group *g), void *cx)
{
    if (!gm_lock_for_report(&orphans_lock)) return false;
    for (size_t i = 0; i < ngroups; i++) fn(cx, &groups[i]);
    pthread_mutex_unlock(&orphans_lock);
    return true;
}
