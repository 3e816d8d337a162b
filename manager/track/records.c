/* Records and the live table (gm_track.h). A table belongs to one owner (a device heap, the
 * pinned pool) and is used under that owner's lock, so the hot path takes one lock. */
#include <stdlib.h>
#include <string.h>

#include "gm_track.h"

const char *gm_memory_name(gm_memory memory)
{
    return memory == GM_MEMORY_PINNED_HOST ? "pinned_host" : "device";
}

void gm_record_fill(gm_record *rec, uintptr_t ptr, size_t requested, size_t size, gm_alloc_kind kind,
                    uintptr_t stream, const gm_callsite *site, uint32_t stack_id)
{
    rec->ptr = ptr;
    rec->requested = requested;
    rec->size = size;
    rec->kind = (uint8_t)kind;
    rec->stream = stream;
    rec->caller = site ? site->pc : 0;
    rec->stack_id = stack_id;
    rec->tag = gm_tag_current();
    rec->time_ns = gm_coarse_now_ns();
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
