/* A context going away (cuCtxDestroy, the primary context released or reset, cudaDeviceReset):
 * everything gpumem keeps per context goes with it. The heap hands its cached segments back
 * while the context is still alive, keeps its leaks for the exit report (the driver frees their
 * memory with the context) and forgets its pool; the pinned blocks the driver frees with the
 * context are forgotten; the context's stager is released. */
#include <stdlib.h>
#include <string.h>

#include "gm_engine.h"
#include "gm_pinned.h"
#include "gm_staging.h"

static void keep_leak(void *cx, const gm_record *rec)
{
    gm_orphans_keep(((gm_heap *)cx)->device, GM_MEMORY_DEVICE, rec);
}

static void keep_leaks_locked(gm_heap *heap)
{
    gm_heap_each_live_locked(heap, keep_leak, heap);
}

static void heap_teardown(gm_heap *heap, bool ctx_alive)
{
    if (ctx_alive && !atomic_load(&gm_mgr.exiting)) gm_release_cached(heap, 0);
    pthread_mutex_lock(&heap->grow_lock);
    pthread_mutex_lock(&heap->lock);
    keep_leaks_locked(heap);
    /* Blocks still live die with the context: the driver frees their classic segments itself;
     * the expandable ranges are the process's, unmapped and freed here. */
    gm_vmm_ranges ranges;
    gm_vmm_take_ranges_locked(heap, &ranges);
    gm_heap_reset_locked(heap);
    heap->bound = false;
    pthread_mutex_unlock(&heap->lock);
    if (!atomic_load(&gm_mgr.exiting)) gm_vmm_release_ranges(heap, &ranges);
    else free(ranges.holes);
    pthread_mutex_unlock(&heap->grow_lock);
}

void gm_context_teardown(uintptr_t ctx, bool ctx_alive)
{
    gm_heap *heap = gm_heap_of_ctx(ctx);
    if (heap) heap_teardown(heap, ctx_alive);
    gm_pinned_drop_ctx(ctx);
    gm_staging_drop_context(ctx, ctx_alive);
}
