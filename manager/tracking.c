/* The live-allocation table: every allocation gpumem knows of, keyed by its pointer, one table
 * per heap (under the heap's lock, so the hot path takes one lock). Pool blocks embed their
 * record; other kinds get one from a small free list. */
#include <stdlib.h>
#include <string.h>

#include "gm_internal.h"

void gm_live_init(gm_heap *heap)
{
    heap->live = NULL;
    memset(&heap->sentinel, 0, sizeof heap->sentinel);
    HASH_ADD(hh, heap->live, ptr, sizeof heap->sentinel.ptr, &heap->sentinel);
}

void gm_live_insert(gm_heap *heap, gm_record *rec)
{
    HASH_ADD(hh, heap->live, ptr, sizeof rec->ptr, rec);
}

gm_record *gm_live_find(gm_heap *heap, uintptr_t ptr)
{
    gm_record *rec = NULL;
    if (ptr == 0) return NULL; /* the sentinel's key */
    HASH_FIND(hh, heap->live, &ptr, sizeof ptr, rec);
    return rec;
}

void gm_live_remove(gm_heap *heap, gm_record *rec)
{
    gm_heap_live_changed_locked(heap); /* a checked copy's cached view of the block is stale */
    HASH_DELETE(hh, heap->live, rec);
}

gm_record *gm_record_new(void)
{
    return calloc(1, sizeof(gm_record));
}

void gm_record_delete(gm_record *rec)
{
    free(rec);
}
