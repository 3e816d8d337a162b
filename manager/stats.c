/* Statistics: per-heap counters (kept under the heap lock on the hot path) summed per device,
 * plus the device-wide peaks that limits.c keeps with atomics. */
#include <string.h>

#include "gm_internal.h"

static void trace_device(gm_heap *heap)
{
    gm_device *d = gm_device_get(heap->device);
    uint64_t allocated = heap->solo ? heap->c.bytes_allocated : atomic_load(&d->allocated);
    gm_trace_counter(heap->device, allocated, atomic_load(&d->reserved));
}

static void note_allocated(gm_heap *heap, int64_t delta)
{
    if (!heap->solo) gm_device_note_allocated(heap->device, delta);
    else if (heap->c.bytes_allocated > heap->c.bytes_allocated_peak)
        heap->c.bytes_allocated_peak = heap->c.bytes_allocated;
    if (__builtin_expect(gm_trace_on, 0)) trace_device(heap);
}

void gm_stats_on_alloc(gm_heap *heap, const gm_record *rec, bool hit)
{
    heap->c.allocations++;
    if (rec->kind == GM_KIND_POOL) {
        if (hit) heap->c.pool_hits++;
        else heap->c.pool_misses++;
    }
    heap->c.bytes_requested += rec->requested;
    heap->c.bytes_allocated += rec->size;
    note_allocated(heap, (int64_t)rec->size);
    if (rec->tag) gm_tag_on_alloc(rec->tag, rec->requested);
}

void gm_stats_on_free(gm_heap *heap, const gm_record *rec)
{
    heap->c.frees++;
    heap->c.bytes_requested -= rec->requested;
    heap->c.bytes_allocated -= rec->size;
    note_allocated(heap, -(int64_t)rec->size);
    if (rec->tag) gm_tag_on_free(rec->tag, rec->requested);
}

/* Called under gm_mgr.heaps_lock when a device gets its second heap: from now on every heap of
 * the device counts into the device's atomics, seeded with what the solo heap had counted. */
void gm_stats_share_device_locked(int device)
{
    gm_device *d = gm_device_get(device);
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        if (h->device != device || !h->solo) continue;
        pthread_mutex_lock(&h->lock);
        atomic_fetch_add(&d->allocated, h->c.bytes_allocated);
        uint64_t peak = atomic_load(&d->allocated_peak);
        if (h->c.bytes_allocated_peak > peak) atomic_store(&d->allocated_peak, h->c.bytes_allocated_peak);
        h->solo = false;
        pthread_mutex_unlock(&h->lock);
    }
}

static void add_heap(gpumem_stats *out, gm_heap *heap, uint64_t *total_free, uint64_t *solo_peak)
{
    pthread_mutex_lock(&heap->lock);
    const gm_heap_counters *c = &heap->c;
    out->allocations += c->allocations;
    out->frees += c->frees;
    out->pool_hits += c->pool_hits;
    out->pool_misses += c->pool_misses;
    out->segments += c->segments;
    out->segments_released += c->segments_released;
    out->bytes_requested += c->bytes_requested;
    out->bytes_allocated += c->bytes_allocated;
    out->release_retries += c->release_retries;
    out->limit_rejections += c->limit_rejections;
    out->backend_ooms += c->backend_ooms;
    *total_free += c->bytes_free;
    if (heap->solo) *solo_peak = c->bytes_allocated_peak;
    size_t largest = gm_heap_largest_free_locked(heap);
    if (largest > out->largest_free_block) out->largest_free_block = largest;
    pthread_mutex_unlock(&heap->lock);
}

void gm_stats_collect(int device, gpumem_stats *out)
{
    memset(out, 0, sizeof *out);
    uint64_t total_free = 0, solo_peak = 0;
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) {
        gm_heap *heap = gm_mgr.heaps[i];
        if (heap && heap->device == device) add_heap(out, heap, &total_free, &solo_peak);
    }
    gm_device *d = gm_device_get(device);
    if (d) {
        out->bytes_reserved = atomic_load(&d->reserved);
        out->bytes_reserved_peak = atomic_load(&d->reserved_peak);
        uint64_t shared_peak = atomic_load(&d->allocated_peak);
        out->bytes_allocated_peak = shared_peak > solo_peak ? shared_peak : solo_peak;
        out->limit_bytes = atomic_load(&d->limit);
    }
    out->bytes_cached_free = total_free;
    out->fragmentation = total_free ? 1.0 - (double)out->largest_free_block / (double)total_free : 0.0;
}
