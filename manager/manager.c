/* The engine's entry points: the shim and the public API call these. They pick the heap of a
 * context, run the pool (heap.c) under the heap's lock, keep the live table (tracking.c) and the
 * counters (stats.c) in the same critical section, and keep cudaFree's barrier semantics. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gm_internal.h"
#include "gm_ipc.h"
#include "gm_transfer.h"

gm_manager gm_mgr = {.heaps_lock = PTHREAD_MUTEX_INITIALIZER};

static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread uintptr_t tl_ctx;
static __thread gm_heap *tl_heap;

/* ------------------------------------------------------------------ logging, time */

void gm_log(int level, const char *fmt, ...)
{
    int verbose = gm_mgr.cfg ? gm_mgr.cfg->verbose : 0;
    if (level > verbose) return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof line - 2) n = (int)sizeof line - 2;
    line[n] = '\n';
    /* One write(2) per line: no stdio lock, no allocation, lines from threads do not interleave. */
    ssize_t ignored = write(STDERR_FILENO, "gpumem: ", 8);
    ignored = write(STDERR_FILENO, line, (size_t)n + 1);
    (void)ignored;
}

/* Allocation timestamps: the coarse clock (a few ms resolution) costs 7 ns against 25 ns for
 * CLOCK_MONOTONIC on the machines measured, and a leak's age needs no more. */
uint64_t gm_coarse_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t gm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ small helpers */

_Atomic uint64_t gm_invalid_frees;

void gm_expand_pid(const char *pattern, char *out, size_t cap)
{
    size_t o = 0;
    for (const char *p = pattern; *p && o + 24 < cap; p++) {
        if (p[0] == '%' && p[1] == 'p') {
            o += (size_t)snprintf(out + o, cap - o, "%ld", (long)getpid());
            p++;
        } else {
            out[o++] = *p;
        }
    }
    out[o] = 0;
}

static char program_path[4096];

static void resolve_program_path(void)
{
    ssize_t n = readlink("/proc/self/exe", program_path, sizeof program_path - 1);
    program_path[n > 0 ? n : 0] = 0;
}

const char *gm_program_path(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, resolve_program_path);
    return program_path;
}

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
        heap->fence = NULL; /* events belong to the parent's context */
        gm_heap_reset_locked(heap);
        heap->bound = false;
    }
    pthread_mutex_init(&gm_mgr.heaps_lock, NULL);
    pthread_mutex_init(&init_lock, NULL);
    gm_report_forget_orphans();
    tl_heap = NULL;
}

/* ------------------------------------------------------------------ init, heaps */

bool gm_manager_init(const gm_backend *backend)
{
    pthread_mutex_lock(&init_lock);
    if (!gm_mgr.backend) {
        gm_mgr.cfg = gm_config_get();
        gm_mgr.copy = (gm_copy_settings){gm_mgr.cfg->check_copies, gm_mgr.cfg->staging,
                                         gm_mgr.cfg->staging_min};
        gm_mgr.backend = backend;
        pthread_atfork(lock_everything, unlock_everything, child_after_fork);
        gm_stack_warm_up();
        gm_trace_open();
        gm_report_install_exit_hook();
        gm_log(GM_INFO, "manager ready on the %s backend", backend->name);
    }
    bool same = gm_mgr.backend == backend;
    pthread_mutex_unlock(&init_lock);
    return same;
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
            gm_stats_share_device_locked(device);
        }
        return unbound;
    }
    if (n == GM_MAX_HEAPS) return NULL;
    gm_heap *h = malloc(sizeof *h);
    if (!h) return NULL;
    gm_heap_init(h, ctx, device);
    h->index = (uint32_t)n;
    bool shared = false;
    for (size_t i = 0; i < n; i++) shared |= gm_mgr.heaps[i]->device == device;
    if (shared) {
        gm_stats_share_device_locked(device);
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
        gm_limit_init_device(device, total_b);
    }
    pthread_mutex_lock(&gm_mgr.heaps_lock);
    h = heap_lookup_or_create_locked(ctx, device);
    pthread_mutex_unlock(&gm_mgr.heaps_lock);
    tl_ctx = ctx;
    tl_heap = h;
    return h;
}

gm_heap *gm_heap_find_locked(uintptr_t ptr, gm_heap *hint, gm_record **rec_out)
{
    if (hint) {
        pthread_mutex_lock(&hint->lock);
        gm_record *rec = gm_live_find(hint, ptr);
        if (rec) {
            *rec_out = rec;
            return hint;
        }
        pthread_mutex_unlock(&hint->lock);
    }
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        if (h == hint) continue;
        pthread_mutex_lock(&h->lock);
        gm_record *rec = gm_live_find(h, ptr);
        if (rec) {
            *rec_out = rec;
            return h;
        }
        pthread_mutex_unlock(&h->lock);
    }
    return NULL;
}

/* True when `ptr` lies inside a pool segment of any heap (a freed or interior pool pointer:
 * handing it to the driver could free a whole segment). */
static bool inside_any_segment(uintptr_t ptr)
{
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        pthread_mutex_lock(&h->lock);
        bool inside = gm_heap_block_containing_locked(h, ptr) != NULL;
        pthread_mutex_unlock(&h->lock);
        if (inside) return true;
    }
    return false;
}

/* ------------------------------------------------------------------ allocation */

static void fill_record(gm_record *rec, uintptr_t ptr, size_t requested, size_t size,
                        gm_alloc_kind kind, uintptr_t stream, const gm_callsite *site, uint32_t stack_id)
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

static int alloc_direct(gm_heap *heap, size_t size, uintptr_t stream, const gm_callsite *site,
                        uintptr_t *out)
{
    int rc = gm_track_reserve(heap, size);
    if (rc != GPUMEM_OK) return rc;
    uintptr_t p = 0;
    rc = gm_mgr.backend->mem_alloc(heap->ctx, size, &p);
    if (rc != GPUMEM_OK) {
        gm_track_abort(heap, size);
        if (rc == GPUMEM_ERROR_OUT_OF_MEMORY) {
            pthread_mutex_lock(&heap->lock);
            heap->c.backend_ooms++;
            pthread_mutex_unlock(&heap->lock);
        }
        return rc;
    }
    gm_track_commit(heap, p, size, GM_KIND_DIRECT, stream, site);
    *out = p;
    return GPUMEM_OK;
}

int gm_alloc(gm_heap *heap, size_t size, uintptr_t stream, const gm_callsite *site, uintptr_t *out)
{
    if (size == 0 || !out) return GPUMEM_ERROR_INVALID_VALUE;
    size_t rounded = gm_round_size(size);
    if (!rounded) return GPUMEM_ERROR_OUT_OF_MEMORY;
    if (!gm_mgr.cfg->pool) return alloc_direct(heap, size, stream, site, out);
    uint32_t stack_id = gm_stack_capture(site); /* before the lock: it walks memory and hashes */

    gm_block *b = NULL;
    bool hit = true, waited = false;
    int rc = GPUMEM_OK;
    pthread_mutex_lock(&heap->lock);
    for (int attempt = 0; gm_heap_alloc_locked(heap, rounded, &b) != GPUMEM_OK; attempt++) {
        if (heap->pending_head && gm_heap_retire_pending_locked(heap, false)) continue;
        if (heap->quarantine && gm_ipc_reclaim_locked(heap)) continue;
        hit = false;
        if (attempt >= 4) {
            rc = GPUMEM_ERROR_OUT_OF_MEMORY;
            break;
        }
        pthread_mutex_unlock(&heap->lock);
        rc = gm_heap_grow(heap, rounded);
        pthread_mutex_lock(&heap->lock);
        if (rc == GPUMEM_OK) continue;
        if (waited || !heap->pending_head) break;
        waited = true; /* fast mode: memory is waiting on fences; wait for them once */
        gm_heap_retire_pending_locked(heap, true);
        rc = GPUMEM_OK;
    }
    if (rc != GPUMEM_OK) {
        pthread_mutex_unlock(&heap->lock);
        return rc;
    }
    fill_record(&b->rec, b->addr, size, b->size, GM_KIND_POOL, stream, site, stack_id);
    b->rec.block = b;
    b->buffer_id = gm_buffer_id_next_locked(heap); /* a new allocation to the driver's eyes */
    b->sync_memops = 0;
    b->ipc_slot = 0;
    gm_live_insert(heap, &b->rec);
    gm_stats_on_alloc(heap, &b->rec, hit);
    pthread_mutex_unlock(&heap->lock);
    *out = b->addr;
    return GPUMEM_OK;
}

/* ------------------------------------------------------------------ free */

static void release_over_cache_limit(gm_heap *heap)
{
    uint64_t keep = gm_mgr.cfg->max_cached;
    if (keep != GM_UNLIMITED && !atomic_load(&gm_mgr.exiting)) gm_heap_release_cached(heap, keep);
}

/* The block's last step out of the live set: another process still has it open through IPC →
 * kept from reuse (quarantine) until it closes; else back to the bins, or (pend) to the fence. */
static void release_block_locked(gm_heap *heap, gm_block *b, bool pend)
{
    if (b->ipc_slot && gm_ipc_quarantine_locked(heap, b)) return;
    if (pend) gm_heap_pend_block_locked(heap, b);
    else gm_heap_free_block_locked(heap, b);
}

/* A pool block whose record is already gone; the heap is locked on entry and unlocked on return.
 * Strict mode keeps cudaFree's barrier: the context is synchronized before the block can be
 * reused. A stream-ordered free waits for its stream only. Fast mode defers reuse to a fence. */
static void free_pool_block(gm_heap *heap, gm_block *b, uintptr_t stream, bool synced)
{
    bool exiting = atomic_load(&gm_mgr.exiting);
    if (!exiting && stream != GM_FREE_BARRIER) {
        pthread_mutex_unlock(&heap->lock);
        gm_mgr.backend->stream_synchronize(heap->ctx, stream);
        pthread_mutex_lock(&heap->lock);
        release_block_locked(heap, b, false);
    } else if (!exiting && !gm_mgr.cfg->free_sync) {
        release_block_locked(heap, b, true);
    } else {
        if (!exiting && !synced) {
            pthread_mutex_unlock(&heap->lock);
            gm_mgr.backend->synchronize(heap->ctx);
            pthread_mutex_lock(&heap->lock);
        }
        release_block_locked(heap, b, false);
    }
    pthread_mutex_unlock(&heap->lock);
    release_over_cache_limit(heap);
}

static int free_impl(gm_heap *hint, bool hint_is_current, uintptr_t ptr, uintptr_t stream,
                     gm_alloc_kind *kind_out)
{
    if (!ptr) return GM_NOT_OURS;
    bool barrier = stream == GM_FREE_BARRIER;
    bool synced = false;
    /* Synchronize before the lookup so the common case takes the heap lock once. */
    if (barrier && gm_mgr.cfg->pool && gm_mgr.cfg->free_sync && hint &&
        __atomic_load_n(&hint->nsegments, __ATOMIC_RELAXED) &&
        !atomic_load(&gm_mgr.exiting)) {
        if (hint_is_current) gm_mgr.backend->synchronize_current();
        else gm_mgr.backend->synchronize(hint->ctx);
        synced = true;
    }
    gm_record *rec = NULL;
    gm_heap *heap = gm_heap_find_locked(ptr, hint, &rec);
    if (!heap) {
        if (!inside_any_segment(ptr)) return GM_NOT_OURS;
        atomic_fetch_add(&gm_invalid_frees, 1);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    gm_alloc_kind kind = (gm_alloc_kind)rec->kind;
    if (kind_out) *kind_out = kind;
    if (kind != GM_KIND_POOL && kind != GM_KIND_DIRECT) {
        pthread_mutex_unlock(&heap->lock);
        return GM_PASSTHROUGH;
    }
    gm_live_remove(heap, rec);
    gm_stats_on_free(heap, rec);
    if (heap->quarantine) gm_ipc_reclaim_locked(heap); /* a flag test unless IPC kept blocks */
    if (kind == GM_KIND_POOL) {
        free_pool_block(heap, rec->block, stream, synced && heap == hint);
        return GPUMEM_OK;
    }
    pthread_mutex_unlock(&heap->lock);
    int rc = atomic_load(&gm_mgr.exiting) ? GPUMEM_OK : gm_mgr.backend->mem_free(heap->ctx, ptr);
    gm_limit_unreserve(heap->device, rec->size);
    gm_record_delete(rec);
    return rc;
}

int gm_free(gm_heap *hint, uintptr_t ptr, uintptr_t stream, gm_alloc_kind *kind_out)
{
    return free_impl(hint, false, ptr, stream, kind_out);
}

int gm_free_current(gm_heap *current, uintptr_t ptr, gm_alloc_kind *kind_out)
{
    return free_impl(current, true, ptr, GM_FREE_BARRIER, kind_out);
}

/* ------------------------------------------------------------------ pass-through tracking */

int gm_track_reserve(gm_heap *heap, size_t size)
{
    if (gm_limit_reserve(heap->device, size)) return GPUMEM_OK;
    if (gm_heap_release_cached(heap, 0) > 0) {
        pthread_mutex_lock(&heap->lock);
        heap->c.release_retries++;
        pthread_mutex_unlock(&heap->lock);
        if (gm_limit_reserve(heap->device, size)) return GPUMEM_OK;
    }
    pthread_mutex_lock(&heap->lock);
    heap->c.limit_rejections++;
    pthread_mutex_unlock(&heap->lock);
    if (gm_trace_on) gm_trace_instant("limit rejection", heap->device, size, NULL);
    return GPUMEM_ERROR_OUT_OF_MEMORY;
}

void gm_track_commit(gm_heap *heap, uintptr_t ptr, size_t size, gm_alloc_kind kind,
                     uintptr_t stream, const gm_callsite *site)
{
    gm_record *rec = gm_record_new();
    if (!rec) { /* cannot track: keep the limit honest, lose only the leak record */
        gm_log(GM_WARN, "out of host memory: allocation %#lx not tracked", (unsigned long)ptr);
        return;
    }
    fill_record(rec, ptr, size, size, kind, stream, site, gm_stack_capture(site));
    pthread_mutex_lock(&heap->lock);
    gm_record *old = gm_live_find(heap, ptr);
    if (old) { /* the driver reused an address we still track: our record is stale */
        gm_live_remove(heap, old);
        gm_stats_on_free(heap, old);
        if (!old->block) {
            gm_limit_unreserve(heap->device, old->size);
            gm_record_delete(old);
        }
    }
    gm_live_insert(heap, rec);
    gm_stats_on_alloc(heap, rec, false);
    pthread_mutex_unlock(&heap->lock);
}

void gm_track_abort(gm_heap *heap, size_t size)
{
    gm_limit_unreserve(heap->device, size);
}

int gm_untrack(gm_heap *hint, uintptr_t ptr, gm_alloc_kind kind)
{
    gm_record *rec = NULL;
    gm_heap *heap = gm_heap_find_locked(ptr, hint, &rec);
    if (!heap) return GM_NOT_OURS;
    if (rec->kind != kind) {
        pthread_mutex_unlock(&heap->lock);
        return GM_NOT_OURS;
    }
    gm_live_remove(heap, rec);
    gm_stats_on_free(heap, rec);
    pthread_mutex_unlock(&heap->lock);
    gm_limit_unreserve(heap->device, rec->size);
    gm_record_delete(rec);
    return (int)kind;
}

/* ------------------------------------------------------------------ queries */

/* The block of heap `h` at `ptr` if it is live and `ptr` lies within its requested size. */
static int live_block_in_heap_locked(gm_heap *h, uintptr_t ptr, gm_block **out)
{
    bool live;
    gm_block *b = gm_heap_block_at_locked(h, ptr, &live);
    if (!b) return GM_NOT_OURS; /* not in a segment, or a tracked allocation of the driver's */
    if (!live) live = b->state == GM_BLOCK_LIVE && gm_live_find(h, b->addr) == &b->rec;
    if (!live || ptr - b->addr >= b->rec.requested) return GPUMEM_ERROR_INVALID_VALUE;
    *out = b;
    return GPUMEM_OK;
}

int gm_with_live_block(uintptr_t ptr, void (*fn)(gm_heap *, gm_block *, void *), void *cx)
{
    if (ptr < atomic_load_explicit(&gm_mgr.pool_lo, memory_order_relaxed) ||
        ptr >= atomic_load_explicit(&gm_mgr.pool_hi, memory_order_relaxed))
        return GM_NOT_OURS; /* no segment was ever there */
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        if (__atomic_load_n(&h->nsegments, __ATOMIC_RELAXED) == 0) continue;
        gm_block *b = NULL;
        pthread_mutex_lock(&h->lock);
        int rc = live_block_in_heap_locked(h, ptr, &b);
        if (rc == GPUMEM_OK) fn(h, b, cx);
        pthread_mutex_unlock(&h->lock);
        if (rc != GM_NOT_OURS) return rc;
    }
    return GM_NOT_OURS;
}

static void identity_of(gm_heap *h, gm_block *b, void *cx)
{
    *(gm_block_identity *)cx = (gm_block_identity){
        .base = b->addr, .size = b->rec.requested, .buffer_id = b->buffer_id,
        .sync_memops = b->sync_memops, .ctx = h->ctx, .seg_base = b->seg->base,
        .seg_size = b->seg->size};
}

int gm_block_identity_get(uintptr_t ptr, gm_block_identity *out)
{
    return gm_with_live_block(ptr, identity_of, out);
}

static void set_sync_memops(gm_heap *h, gm_block *b, void *cx)
{
    (void)h;
    b->sync_memops = *(bool *)cx;
}

int gm_block_set_sync_memops(uintptr_t ptr, bool on)
{
    return gm_with_live_block(ptr, set_sync_memops, &on);
}

int gm_lookup(uintptr_t ptr, uintptr_t *base, size_t *size)
{
    gm_block_identity id;
    int rc = gm_block_identity_get(ptr, &id);
    if (rc == GPUMEM_OK) {
        *base = id.base;
        *size = id.size;
    }
    return rc;
}

void gm_mem_info(gm_heap *heap, size_t driver_free, size_t driver_total, size_t *free_out,
                 size_t *total_out)
{
    gpumem_stats st;
    gm_stats_collect(heap->device, &st);
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

/* ------------------------------------------------------------------ context teardown */

void gm_heap_drop(uintptr_t ctx, const char *why, bool ctx_alive)
{
    gm_heap *heap = NULL;
    pthread_mutex_lock(&gm_mgr.heaps_lock);
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n && !heap; i++)
        if (gm_mgr.heaps[i]->ctx == ctx && gm_mgr.heaps[i]->bound) heap = gm_mgr.heaps[i];
    pthread_mutex_unlock(&gm_mgr.heaps_lock);
    if (!heap) return;
    if (HASH_COUNT(heap->live) > 1) gm_report_write(NULL, heap->device, ctx, why);
    if (ctx_alive && !atomic_load(&gm_mgr.exiting)) gm_heap_release_cached(heap, 0);
    pthread_mutex_lock(&heap->lock);
    gm_report_keep_orphans_locked(heap);
    /* Blocks still live die with the context: the driver frees their segments itself. */
    gm_heap_reset_locked(heap);
    heap->bound = false;
    pthread_mutex_unlock(&heap->lock);
}

/* ------------------------------------------------------------------ checked copies */

#include "gm_transfer.h"

/* The heap that held this thread's last checked pointer: heaps are never freed, so a stale hint
 * costs one extra lookup, never a crash. */
static __thread gm_heap *tl_span_heap;

/* What this thread learnt of the live blocks it checked last. An entry is trusted without the
 * heap's lock while the heap's live_gen is what it was when the entry was made: no block of the
 * heap has stopped being live or changed size since, so the block is still live with that size.
 * A program's copies mostly reuse a few buffers, so most checks end here, lock-free. */
typedef struct span_memo {
    gm_heap *heap;
    uint64_t gen;
    uintptr_t base;
    size_t block_size, requested;
} span_memo;
#define SPAN_MEMOS 4
static __thread span_memo tl_memo[SPAN_MEMOS];
static __thread unsigned tl_memo_next;

static void memo_remember_locked(gm_heap *h, const gm_block *b)
{
    span_memo *m = &tl_memo[tl_memo_next++ % SPAN_MEMOS];
    *m = (span_memo){h, atomic_load_explicit(&h->live_gen, memory_order_relaxed), b->addr, b->size,
                     b->rec.requested};
}

static void span_classify_live(gm_span *s, int device, uintptr_t base, size_t requested)
{
    s->device = device;
    s->base = base;
    s->size = requested;
    uintptr_t end = base + requested;
    bool fits = s->ptr < end && s->n <= end - s->ptr;
    s->status = fits ? GM_SPAN_LIVE : GM_SPAN_PAST_END;
}

/* Resolves `s` from the thread's memos or from the pool's address range alone; false when the
 * heap must be asked. */
static bool span_resolve_unlocked(gm_span *s)
{
    if (s->ptr < atomic_load_explicit(&gm_mgr.pool_lo, memory_order_relaxed) ||
        s->ptr >= atomic_load_explicit(&gm_mgr.pool_hi, memory_order_relaxed))
        return true; /* no segment was ever there: GM_SPAN_NOT_OURS */
    for (int i = 0; i < SPAN_MEMOS; i++) {
        span_memo *m = &tl_memo[i];
        if (!m->heap || s->ptr - m->base >= m->block_size) continue;
        if (atomic_load_explicit(&m->heap->live_gen, memory_order_acquire) != m->gen) {
            m->heap = NULL;
            continue;
        }
        span_classify_live(s, m->heap->device, m->base, m->requested);
        return true;
    }
    return false;
}

/* Classifies span `s` against block `b` (which contains s->ptr); the heap is locked. */
static void span_classify_locked(gm_heap *h, const gm_block *b, bool known_live, gm_span *s)
{
    s->device = h->device;
    /* A block found by walking may be LIVE while its free is in progress (record already gone). */
    bool live = known_live || (b->state == GM_BLOCK_LIVE && gm_live_find(h, b->addr) == &b->rec);
    if (!live) {
        s->status = GM_SPAN_FREED;
        s->base = b->addr;
        s->size = b->size;
        return;
    }
    span_classify_live(s, h->device, b->addr, b->rec.requested);
    memo_remember_locked(h, b);
}

/* Resolves the still unresolved spans that lie in `h`; returns how many it resolved. */
static size_t spans_in_heap(gm_heap *h, gm_span *spans, size_t count, bool *done)
{
    if (__atomic_load_n(&h->nsegments, __ATOMIC_RELAXED) == 0) return 0;
    size_t found = 0;
    pthread_mutex_lock(&h->lock);
    for (size_t i = 0; i < count; i++) {
        if (done[i]) continue;
        bool live;
        gm_block *b = gm_heap_block_at_locked(h, spans[i].ptr, &live);
        if (!b) continue;
        span_classify_locked(h, b, live, &spans[i]);
        done[i] = true;
        found++;
    }
    pthread_mutex_unlock(&h->lock);
    return found;
}

void gm_pool_find_spans(gm_span *spans, size_t count)
{
    bool done[2] = {true, true};
    size_t left = 0;
    if (count > 2) count = 2;
    for (size_t i = 0; i < count; i++) {
        spans[i].status = GM_SPAN_NOT_OURS;
        done[i] = spans[i].ptr == 0 || spans[i].n == 0 || span_resolve_unlocked(&spans[i]);
        left += !done[i];
    }
    gm_heap *hint = tl_span_heap;
    if (left && hint) left -= spans_in_heap(hint, spans, count, done);
    size_t n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n && left; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        if (h == hint) continue;
        size_t got = spans_in_heap(h, spans, count, done);
        if (got) tl_span_heap = h;
        left -= got;
    }
}
