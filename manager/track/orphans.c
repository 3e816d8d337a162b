/* Leaks of destroyed contexts (device heaps and pinned blocks alike), kept for the exit report:
 * the driver freed their memory with the context, but the program never freed them. */
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "gm_track.h"

static pthread_mutex_t orphans_lock = PTHREAD_MUTEX_INITIALIZER;
static gm_leak_groups orphans;

gm_leak_group gm_leak_group_of(int device, gm_memory memory, const gm_record *rec)
{
    return (gm_leak_group){device, (uint8_t)memory, rec->tag, rec->caller, rec->stack_id,
                           rec->requested, 1};
}

/* A fork child: the parent's contexts are not the child's, nor are their leaks. */
static void forget_in_child(void)
{
    pthread_mutex_init(&orphans_lock, NULL);
    free(orphans.at);
    orphans = (gm_leak_groups){0};
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

bool gm_leak_groups_add(gm_leak_groups *set, const gm_leak_group *g)
{
    for (size_t i = 0; i < set->n; i++)
        if (same_group(&set->at[i], g)) {
            set->at[i].bytes += g->bytes;
            set->at[i].count += g->count;
            return true;
        }
    if (set->n == set->cap) {
        size_t cap = set->cap ? set->cap * 2 : 16;
        gm_leak_group *grown = realloc(set->at, cap * sizeof *grown);
        if (!grown) return false; /* out of host memory: the leak goes unlisted, nothing else is lost */
        set->at = grown;
        set->cap = cap;
    }
    set->at[set->n++] = *g;
    return true;
}

void gm_orphans_keep(int device, gm_memory memory, const gm_record *rec)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork);
    gm_leak_group g = gm_leak_group_of(device, memory, rec);
    pthread_mutex_lock(&orphans_lock);
    gm_leak_groups_add(&orphans, &g);
    pthread_mutex_unlock(&orphans_lock);
}

bool gm_orphans_for_each(void (*fn)(void *cx, const gm_leak_group *g), void *cx)
{
    if (!gm_lock_for_report(&orphans_lock)) return false;
    for (size_t i = 0; i < orphans.n; i++) fn(cx, &orphans.at[i]);
    pthread_mutex_unlock(&orphans_lock);
    return true;
}
