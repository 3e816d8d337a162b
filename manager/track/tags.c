/* Tags: a name the calling thread pushes so that every allocation it makes meanwhile, through
 * the API or through the shim, carries it ("named buffer tracking for debugging"). The report
 * groups leaks by tag and the statistics keep live bytes per tag.
 *
 * Names are interned once into a fixed table (an id fits the record in 16 bits); ids are never
 * reused, so a record's tag stays readable after the last pop. The per-thread stack is a plain
 * array: push and pop never lock; only interning a new name does. */
#include <stdlib.h>
#include <string.h>

#include "gm_track.h"

typedef struct tag_entry {
    char name[GM_TAG_NAME_MAX + 1];
    _Atomic uint64_t live_bytes, live_allocations, allocations, peak_bytes;
} tag_entry;

static pthread_mutex_t intern_lock = PTHREAD_MUTEX_INITIALIZER;
static tag_entry *table;         /* index 0 is "no tag" */
static _Atomic uint32_t ntags = 1;

static __thread uint16_t stack[GM_TAG_DEPTH_MAX];
static __thread int depth;

/* The id of a known name, without a lock: names are written before `ntags` is raised past them
 * (release/acquire) and never change afterwards. 0 when unknown. */
uint16_t gm_tag_find(const char *name)
{
    uint32_t n = atomic_load_explicit(&ntags, memory_order_acquire);
    for (uint32_t i = 1; name && i < n; i++)
        if (strcmp(table[i].name, name) == 0) return (uint16_t)i;
    return 0;
}

/* Adds a new name under the lock (another thread may have added it meanwhile). 0 when full. */
static uint16_t add_name(const char *name)
{
    pthread_mutex_lock(&intern_lock);
    uint16_t id = gm_tag_find(name);
    uint32_t n = atomic_load(&ntags);
    if (!table) table = calloc(GM_TAGS_MAX, sizeof *table);
    if (!id && table && n < GM_TAGS_MAX) {
        strcpy(table[n].name, name);
        atomic_store_explicit(&ntags, n + 1, memory_order_release);
        id = (uint16_t)n;
    }
    pthread_mutex_unlock(&intern_lock);
    return id;
}

int gm_tag_intern(const char *name, uint16_t *id)
{
    if (!name || !*name || strlen(name) > GM_TAG_NAME_MAX) {
        gm_log(GM_ERROR, "gpumem_tag_push: the tag must be a non-empty name of at most %d bytes (got %s)",
               GM_TAG_NAME_MAX, name ? (*name ? "a longer one" : "\"\"") : "NULL");
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    *id = gm_tag_find(name);
    if (!*id) *id = add_name(name);
    if (!*id) {
        gm_log(GM_ERROR, "gpumem_tag_push(\"%s\"): %d distinct tag names in use, no room for another",
               name, GM_TAGS_MAX - 1);
        return GPUMEM_ERROR_OUT_OF_MEMORY;
    }
    return GPUMEM_OK;
}

int gm_tag_push_id(uint16_t id)
{
    if (depth == GM_TAG_DEPTH_MAX) {
        gm_log(GM_ERROR, "gpumem_tag_push(\"%s\"): more than %d tags pushed on this thread (a pop is missing?)",
               gm_tag_name(id), GM_TAG_DEPTH_MAX);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    stack[depth++] = id;
    return GPUMEM_OK;
}

int gm_tag_push(const char *name)
{
    uint16_t id;
    int rc = gm_tag_intern(name, &id);
    return rc == GPUMEM_OK ? gm_tag_push_id(id) : rc;
}

int gm_tag_pop(void)
{
    if (depth == 0) {
        gm_log(GM_ERROR, "gpumem_tag_pop: no tag pushed on this thread");
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    depth--;
    return GPUMEM_OK;
}

uint16_t gm_tag_current(void) { return depth ? stack[depth - 1] : 0; }

const char *gm_tag_name(uint16_t id)
{
    return id && id < atomic_load(&ntags) ? table[id].name : NULL;
}

uint32_t gm_tag_count(void) { return atomic_load(&ntags); }

void gm_tag_on_alloc(uint16_t id, uint64_t bytes)
{
    tag_entry *t = &table[id];
    uint64_t now = atomic_fetch_add(&t->live_bytes, bytes) + bytes;
    atomic_fetch_add(&t->live_allocations, 1);
    atomic_fetch_add(&t->allocations, 1);
    uint64_t peak = atomic_load(&t->peak_bytes);
    while (now > peak && !atomic_compare_exchange_weak(&t->peak_bytes, &peak, now)) {}
}

/* A block resized in place was counted as freed and allocated again: it is one allocation. */
void gm_tag_on_resize(uint16_t id) { atomic_fetch_sub(&table[id].allocations, 1); }

void gm_tag_on_free(uint16_t id, uint64_t bytes)
{
    atomic_fetch_sub(&table[id].live_bytes, bytes);
    atomic_fetch_sub(&table[id].live_allocations, 1);
}

void gm_tag_usage_get(uint16_t id, gpumem_tag_usage *out)
{
    tag_entry *t = &table[id];
    *out = (gpumem_tag_usage){atomic_load(&t->live_bytes), atomic_load(&t->live_allocations),
                              atomic_load(&t->allocations), atomic_load(&t->peak_bytes)};
}
