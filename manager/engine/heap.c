/* The manager and its heaps: one heap per driver context, created on first use and kept in a
 * fixed table (never freed: a destroyed context's heap is unbound and its slot reused). A heap
 * holds the context's pool, live table and counters under one lock. Also here: the manager's
 * start (the backend, the configuration, the timeline), fork, the statistics of a device, and
 * what cuMemGetInfo answers under a limit. */
#include <stdlib.h>
#include <string.h>

#include "gm_engine.h"

gm_manager gm_mgr = {.heaps_lock = PTHREAD_MUTEX_INITIALIZER};

static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread uintptr_t tl_ctx;
static __thread gm_heap *tl_heap;

/* ------------------------------------------------------------------ fork */

static void lock_everything(void)
{
    pthread_mutex_lock(&gm_mgr.heaps_lock);
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) pthread_mutex_lock(&gm_mgr.heaps[i]->lock);
}

static void unlock_everything(void)
{
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = n; i-- > 0;) pthread_mutex_unlock(&gm_mgr.heaps[i]->lock);
    pthread_mutex_unlock(&gm_mgr.heaps_lock);
}

/* A fork child inherits no CUDA context, so it owns no device memory: forget the parent's heaps
 * (without calling the driver) and start clean, with fresh locks. */
static void child_after_fork(void)
{
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) {
        gm_heap *heap = gm_mgr.heaps[i];
        pthread_mutex_init(&heap->lock, NULL);
        pthread_mutex_init(&heap->grow_lock, NULL);
        gm_tcache_after_fork(heap);
        heap->fence = NULL; /* events belong to the parent's context */
        gm_heap_reset_locked(heap);
        heap->bound = false;
    }
    pthread_mutex_init(&gm_mgr.heaps_lock, NULL);
    pthread_mutex_init(&init_lock, NULL);
    gm_fence_after_fork();
    tl_heap = NULL;
}

/* ------------------------------------------------------------------ init */

bool gm_manager_init(const gm_backend *backend)
{
    pthread_mutex_lock(&init_lock);
    if (!gm_mgr.backend) {
        const gm_config *cfg = gm_config_get();
        gm_mgr.cfg = cfg;
        gm_mgr.copy = (gm_copy_settings){cfg->check_copies, cfg->staging, cfg->staging_min};
        gm_mgr.backend = backend;
        static const gm_fork_handlers handlers = {lock_everything, unlock_everything, child_after_fork};
        gm_fork_register(GM_FORK_HEAPS, &handlers);
        gm_stack_init(cfg);
        gm_trace_open(cfg);
        gm_ledger_open(cfg);
        gm_log(GM_INFO, "manager ready on the %s backend", backend->name);
    }
    bool same = gm_mgr.backend == backend;
    pthread_mutex_unlock(&init_lock);
    return same;
}

bool gm_manager_begin_exit(void)
{
    return gm_mgr.backend && !atomic_exchange(&gm_mgr.exiting, true);
}

/* ------------------------------------------------------------------ the heap table */

static void heap_init(gm_heap *heap, uintptr_t ctx, int device)
{
    const gm_config *cfg = gm_mgr.cfg;
    gm_pool_sizing sizing = {cfg->small_segment, cfg->segment_min, cfg->segment_max,
                             cfg->dedicated_min, cfg->growth_factor, 0};
    memset(heap, 0, sizeof *heap);
    pthread_mutex_init(&heap->lock, NULL);
    pthread_mutex_init(&heap->grow_lock, NULL);
    heap->ctx = ctx;
    heap->device = device;
    heap->bound = true;
    heap->solo = true;
    gm_pool_init(&heap->pool, &sizing);
    gm_live_init(&heap->live);
}

/* Called under gm_mgr.heaps_lock when a device gets its second heap: from now on every heap of
 * the device counts into the device's atomics, seeded with what the solo heap had counted. */
static void share_device_locked(int device)
{
    gm_device *d = gm_device_get(device);
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        if (h->device != device || !h->solo) continue;
        pthread_mutex_lock(&h->lock);
        atomic_fetch_add(&d->allocated, h->c.bytes_allocated + gm_tcache_allocated_locked(h));
        uint64_t peak = atomic_load(&d->allocated_peak), own = h->c.bytes_allocated_peak;
        uint64_t summed = atomic_load(&h->allocated_sync.peak);
        if (summed > own) own = summed;
        if (own > peak) atomic_store(&d->allocated_peak, own);
        h->solo = false;
        pthread_mutex_unlock(&h->lock);
    }
}

static gm_heap *heap_lookup_or_create_locked(uintptr_t ctx, int device)
{
    size_t n = atomic_load(&gm_mgr.nheaps);
    gm_heap *unbound = NULL;
    for (size_t i = 0; i < n; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        if (h->ctx == ctx && h->bound) return h;
        if (!h->bound && !unbound && (h->device == device || !h->solo)) unbound = h;
    }
    if (unbound) { /* reuse the slot of a destroyed context: heaps are never freed */
        pthread_mutex_lock(&unbound->lock);
        unbound->ctx = ctx;
        unbound->bound = true;
        pthread_mutex_unlock(&unbound->lock);
        if (unbound->device != device) {
            unbound->device = device;
            share_device_locked(device);
        }
        return unbound;
    }
    if (n == GM_MAX_HEAPS) return NULL;
    gm_heap *h = malloc(sizeof *h);
    if (!h) return NULL;
    heap_init(h, ctx, device);
    h->index = (uint32_t)n;
    bool shared = false;
    for (size_t i = 0; i < n; i++) shared |= gm_mgr.heaps[i]->device == device;
    if (shared) {
        share_device_locked(device);
        h->solo = false;
    }
    gm_mgr.heaps[n] = h;
    atomic_store(&gm_mgr.nheaps, n + 1);
    return h;
}

gm_heap *gm_heap_get(uintptr_t ctx, int device)
{
    gm_heap *h = tl_heap;
    if (h && tl_ctx == ctx && h->bound && h->ctx == ctx) return h;
    gm_device *d = gm_device_get(device);
    if (!d) return NULL;
    if (!atomic_load(&d->limit_resolved)) {
        size_t free_b = 0, total_b = 0;
        gm_mgr.backend->mem_info(ctx, &free_b, &total_b);
        gm_device_prepare(device, total_b);
    }
    pthread_mutex_lock(&gm_mgr.heaps_lock);
    h = heap_lookup_or_create_locked(ctx, device);
    pthread_mutex_unlock(&gm_mgr.heaps_lock);
    tl_ctx = ctx;
    tl_heap = h;
    return h;
}

gm_heap *gm_heap_of_ctx(uintptr_t ctx)
{
    gm_heap *heap = NULL;
    pthread_mutex_lock(&gm_mgr.heaps_lock);
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n && !heap; i++)
        if (gm_mgr.heaps[i]->ctx == ctx && gm_mgr.heaps[i]->bound) heap = gm_mgr.heaps[i];
    pthread_mutex_unlock(&gm_mgr.heaps_lock);
    return heap;
}

gm_heap *gm_heap_find_locked(uintptr_t ptr, gm_heap *hint, gm_record **rec_out)
{
    if (hint) {
        pthread_mutex_lock(&hint->lock);
        gm_record *rec = gm_heap_live_find_locked(hint, ptr);
        if (rec) {
            *rec_out = rec;
            return hint;
        }
        pthread_mutex_unlock(&hint->lock);
    }
    return gm_heap_find_other_locked(ptr, hint, rec_out);
}

gm_heap *gm_heap_find_other_locked(uintptr_t ptr, const gm_heap *skip, gm_record **rec_out)
{
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        if (h == skip) continue;
        pthread_mutex_lock(&h->lock);
        gm_record *rec = gm_heap_live_find_locked(h, ptr);
        if (rec) {
            *rec_out = rec;
            return h;
        }
        pthread_mutex_unlock(&h->lock);
    }
    return NULL;
}

bool gm_heap_any_segment_holds(uintptr_t ptr)
{
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        pthread_mutex_lock(&h->lock);
        bool inside = gm_pool_block_containing_locked(&h->pool, ptr) != NULL;
        pthread_mutex_unlock(&h->lock);
        if (inside) return true;
    }
    return false;
}

void gm_heap_reset_locked(gm_heap *heap)
{
    gm_tcache_adopt_all_locked(heap); /* every record in the heap's table, every block in the pool */
    gm_heap_live_changed_locked(heap);
    gm_record *rec, *tmp;
    HASH_ITER(hh, heap->live.head, rec, tmp) {
        HASH_DELETE(hh, heap->live.head, rec);
        if (rec == &heap->live.sentinel) continue;
        if (!heap->solo) gm_device_note_allocated(heap->device, -(int64_t)rec->size);
        if (!rec->block) {
            gm_limit_unreserve(heap->device, rec->size);
            gm_record_delete(rec);
        }
    }
    if (heap->fence && !atomic_load(&gm_mgr.exiting)) gm_mgr.backend->fence_destroy(heap->fence);
    heap->fence = NULL;
    heap->quarantine = NULL; /* its blocks are in the segments the pool forgets now */
    gm_limit_unreserve(heap->device, gm_pool_reset(&heap->pool)); /* mapped bytes included */
    memset(heap->vr, 0, sizeof heap->vr); /* a fork child's are the parent's; a dying context's
                                           * were handed to gm_vmm_release_ranges */
    gm_live_init(&heap->live);
    heap->c.bytes_requested = heap->c.bytes_allocated = heap->c.unsynced = 0; /* the rest are lifetime counters */
    atomic_store(&heap->allocated_sync.bytes, 0); /* its peak is a lifetime figure, as the heap's */
    gm_tcache_reset_counts_locked(heap);
}

/* ------------------------------------------------------------------ statistics */

static void add_heap(gpumem_stats *out, gm_heap *heap, uint64_t *solo_peak)
{
    pthread_mutex_lock(&heap->lock);
    gm_stats_add_counters(out, &heap->c);
    const gm_pool *pool = &heap->pool;
#define GM_STAT_HEAP(name, doc)
#define GM_STAT_POOL(name, doc) out->name += pool->name;
#define GM_STAT_DEVICE(name, doc)
#define GM_STAT_DERIVED(type, name, doc)
#include "gpumem_stats.def"
    if (heap->solo) {
        /* Each thread's cache keeps the peak of what it counted: with one allocating thread (all
         * its allocations count there) that is the device's exact peak. */
        uint64_t peak = heap->c.bytes_allocated_peak, summed = atomic_load(&heap->allocated_sync.peak);
        if (summed > peak) peak = summed;
        gm_tcache_add_stats_locked(heap, out, &peak);
        uint64_t now = heap->c.bytes_allocated + gm_tcache_allocated_locked(heap);
        *solo_peak = peak > now ? peak : now;
    } else {
        uint64_t ignored = 0;
        gm_tcache_add_stats_locked(heap, out, &ignored);
    }
    size_t largest = gm_pool_largest_free_locked(pool);
    if (largest > out->largest_free_block) out->largest_free_block = largest;
    pthread_mutex_unlock(&heap->lock);
}

void gm_heap_stats(int device, gpumem_stats *out)
{
    memset(out, 0, sizeof *out);
    uint64_t solo_peak = 0;
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) {
        gm_heap *heap = gm_mgr.heaps[i];
        if (heap && heap->device == device) add_heap(out, heap, &solo_peak);
    }
    gm_stats_finish(out, device, solo_peak);
}

void gm_heap_mem_info(gm_heap *heap, size_t driver_free, size_t driver_total, size_t *free_out,
                 size_t *total_out)
{
    gpumem_stats st;
    gm_heap_stats(heap->device, &st);
    uint64_t total = driver_total, limit = st.limit_bytes;
    if (limit && limit < total) total = limit;
    uint64_t avail = (uint64_t)driver_free + st.bytes_cached_free;
    if (limit) {
        uint64_t headroom = gm_limit_headroom(heap->device) + st.bytes_cached_free;
        if (headroom < avail) avail = headroom;
    }
    if (avail > total) avail = total;
    *free_out = (size_t)avail;
    *total_out = (size_t)total;
}
