/* Statistics: per-heap counters kept under the heap lock on the hot path, the device-wide
 * figures that limits.c keeps with atomics, and how they add up to one gpumem_stats. The fields
 * are listed once, in include/gpumem_stats.def. */
#include <string.h>

#include "gm_account.h"

static _Atomic uint64_t invalid_frees;

static void trace_device(gm_counting to)
{
    gm_device *d = gm_device_get(to.device);
    if (!d) return;
    uint64_t allocated = to.solo ? to.c->bytes_allocated : atomic_load(&d->allocated);
    gm_trace_counter(to.device, allocated, atomic_load(&d->reserved));
}

/* The counter's change into the heap's sum (gm_peak_sync): allocations once they pass the slack,
 * frees once they take more than the counter has not added. */
static void sync_allocated(gm_counting to, int64_t delta)
{
    int64_t u = (int64_t)to.c->unsynced + delta;
    if (u < 0 || (uint64_t)u > to.slack) {
        uint64_t now = atomic_fetch_add_explicit(&to.sync->bytes, (uint64_t)u, memory_order_relaxed) + (uint64_t)u;
        uint64_t peak = atomic_load_explicit(&to.sync->peak, memory_order_relaxed);
        while (u > 0 && now > peak &&
               !atomic_compare_exchange_weak_explicit(&to.sync->peak, &peak, now, memory_order_relaxed,
                                                      memory_order_relaxed)) {}
        u = 0;
    }
    to.c->unsynced = (uint64_t)u;
}

static inline __attribute__((always_inline)) void note_allocated(gm_counting to, int64_t delta)
{
    if (!to.solo) {
        gm_device_note_allocated(to.device, delta);
    } else {
        if (to.c->bytes_allocated > to.c->bytes_allocated_peak) to.c->bytes_allocated_peak = to.c->bytes_allocated;
        if (to.sync) sync_allocated(to, delta);
    }
    if (__builtin_expect(gm_trace_on, 0)) trace_device(to);
}

void gm_stats_on_alloc(gm_counting to, const gm_record *rec, bool hit)
{
    gm_counters *c = to.c;
    c->allocations++;
    if (rec->kind == GM_KIND_POOL) {
        if (hit) c->pool_hits++;
        else c->pool_misses++;
    }
    c->bytes_requested += rec->requested;
    c->bytes_allocated += rec->size;
    note_allocated(to, (int64_t)rec->size);
    if (rec->tag) gm_tag_on_alloc(rec->tag, rec->requested);
}

void gm_stats_on_free(gm_counting to, const gm_record *rec)
{
    gm_counters *c = to.c;
    c->frees++;
    c->bytes_requested -= rec->requested;
    c->bytes_allocated -= rec->size;
    note_allocated(to, -(int64_t)rec->size);
    if (rec->tag) gm_tag_on_free(rec->tag, rec->requested);
}

void gm_stats_on_resize(gm_counting to, const gm_record *old, const gm_record *now)
{
    gm_stats_on_free(to, old);
    gm_stats_on_alloc(to, now, true);
    to.c->allocations--;
    to.c->frees--;
    to.c->pool_hits--;
    if (now->tag) gm_tag_on_resize(now->tag);
}

void gm_stats_add_counters(gpumem_stats *out, const gm_counters *c)
{
#define GM_STAT_HEAP(name, doc) out->name += c->name;
#define GM_STAT_POOL(name, doc)
#define GM_STAT_DEVICE(name, doc)
#define GM_STAT_DERIVED(type, name, doc)
#include "gpumem_stats.def"
}

void gm_stats_finish(gpumem_stats *out, int device, uint64_t solo_peak)
{
    gm_device *d = gm_device_get(device);
    if (d) {
        out->bytes_reserved = atomic_load(&d->reserved);
        out->bytes_reserved_peak = atomic_load(&d->reserved_peak);
        uint64_t shared_peak = atomic_load(&d->allocated_peak);
        out->bytes_allocated_peak = shared_peak > solo_peak ? shared_peak : solo_peak;
        out->limit_bytes = atomic_load(&d->limit);
    }
    uint64_t free_bytes = out->bytes_cached_free;
    out->fragmentation = free_bytes ? 1.0 - (double)out->largest_free_block / (double)free_bytes : 0.0;
}

void gm_stats_invalid_free(const char *api, uintptr_t p, const char *memory, const char *why,
                           uintptr_t caller)
{
    static _Atomic unsigned logged;
    atomic_fetch_add(&invalid_frees, 1);
    unsigned n = atomic_fetch_add(&logged, 1);
    if (n < 100)
        gm_log(GM_ERROR, "%s(%#llx): not a live %sallocation (%s); returning CUDA_ERROR_INVALID_VALUE; "
                         "called from %p", api, (unsigned long long)p, memory, why, (void *)caller);
    else if (n == 100)
        gm_log(GM_ERROR, "further invalid frees are not logged");
}

uint64_t gm_stats_invalid_frees(void) { return atomic_load(&invalid_frees); }
