/* Records and the live table (gm_track.h). A table belongs to one owner (a device heap, the
 * pinned pool) and is used under that owner's lock, so the hot path takes one lock. */
#include <stdlib.h>
#include <string.h>

#include "gm_track.h"

const char *gm_memory_name(gm_memory memory)
{
    return memory == GM_MEMORY_PINNED_HOST ? "pinned_host" : "device";
}

gm_record *gm_record_new(void) { return calloc(1, sizeof(gm_record)); }

void gm_record_delete(gm_record *rec) { free(rec); }

void gm_live_init(gm_live *t)
{
    t->head = NULL;
    memset(&t->sentinel, 0, sizeof t->sentinel);
    HASH_ADD(hh, t->head, ptr, sizeof t->sentinel.ptr, &t->sentinel);
}

void gm_live_insert(gm_live *t, gm_record *rec)
{
    HASH_ADD(hh, t->head, ptr, sizeof rec->ptr, rec);
}

gm_record *gm_live_find(const gm_live *t, uintptr_t ptr)
{
    gm_record *rec = NULL;
    if (ptr == 0) return NULL; /* the sentinel's key */
    HASH_FIND(hh, t->head, &ptr, sizeof ptr, rec);
    return rec;
}

void gm_live_remove(gm_live *t, gm_record *rec)
{
    HASH_DELETE(hh, t->head, rec);
}

size_t gm_live_count(const gm_live *t)
{
    size_t n = HASH_COUNT(t->head);
    return n ? n - 1 : 0;
}
