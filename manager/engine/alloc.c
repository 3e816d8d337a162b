/* The allocation policy: what gm_alloc and gm_free do around the pool.
 *
 * Allocation: the pool first (a hit costs one uncontended lock); then fast-mode blocks whose
 * fence completed (fence.c, which batches the fences), and blocks IPC no longer holds; then
 * growth. Growth never crosses the limit:
 * the growth-factor segment if the limit and the device allow it, else a segment sized to the
 * request, else exactly the request; each step first takes its bytes from the limit, handing
 * cached segments back when that is what it takes, and retries the device once after handing
 * them back on a device out-of-memory. Backend calls run with the heap lock dropped.
 *
 * Free: cudaFree is a device barrier, and strict mode (GPUMEM_FREE_SYNC=1) keeps it: the
 * context is synchronized before the block can be reused. A stream-ordered free waits for its
 * stream only. Fast mode defers reuse to a fence instead. Cached bytes above GPUMEM_MAX_CACHED
 * go back to the device after a free.
 *
 * To change the limit policy, read this file and account/limits.c; the pool (pool/pool.c) only
 * carves what it is given. */
#include <stdlib.h>
#include <string.h>

#include "gm_engine.h"
#include "gm_ipc.h"

/* ------------------------------------------------------------------ out of memory */

static _Atomic(gm_oom_hook_fn) oom_hook;

void gm_set_oom_hook(gm_oom_hook_fn fn) { atomic_store(&oom_hook, fn); }

/* The failure path only: one atomic load when no hook is installed. */
static __attribute__((noinline, cold)) void notify_oom(gm_heap *heap, size_t bytes, gm_oom_cause cause)
{
    gm_oom_hook_fn fn = atomic_load_explicit(&oom_hook, memory_order_acquire);
    if (fn && !atomic_load(&gm_mgr.exiting)) fn(heap, bytes, cause);
}

static gm_oom_cause oom_cause(gm_heap *heap, size_t rounded)
{
    return gm_limit_headroom(heap->device) < rounded ? GM_OOM_LIMIT : GM_OOM_DEVICE;
}

/* ------------------------------------------------------------------ growth */

static void note_instant(const char *what, int device, size_t bytes)
{
    if (__builtin_expect(gm_trace_on, 0)) gm_trace_instant(what, device, bytes, NULL);
}

static void count_locked_event(gm_heap *heap, uint64_t *counter)
{
    pthread_mutex_lock(&heap->lock);
    (*counter)++;
    pthread_mutex_unlock(&heap->lock);
}

/* Reserve `size` against the limit, handing cached segments back first if that is what it takes. */
static bool reserve_with_release(gm_heap *heap, size_t size)
{
    if (gm_limit_reserve(heap->device, size)) return true;
    if (gm_release_cached(heap, 0) == 0) return false;
    count_locked_event(heap, &heap->c.release_retries);
    note_instant("oom retry", heap->device, size);
    return gm_limit_reserve(heap->device, size);
}

/* One backend allocation of `size`, retried once after releasing cached segments on OOM. */
static int backend_alloc_with_release(gm_heap *heap, size_t size, uintptr_t *base)
{
    const gm_backend *be = gm_mgr.backend;
    int rc = be->mem_alloc(heap->ctx, size, base);
    if (rc != GPUMEM_ERROR_OUT_OF_MEMORY) return rc;
    count_locked_event(heap, &heap->c.backend_ooms);
    note_instant("device oom", heap->device, size);
    if (gm_release_cached(heap, 0) == 0) return rc;
    count_locked_event(heap, &heap->c.release_retries);
    note_instant("oom retry", heap->device, size);
    return be->mem_alloc(heap->ctx, size, base);
}

/* Lowest and highest address of any segment: a pointer outside is no pool memory (lock-free). */
static void widen_pool_range(uintptr_t base, size_t size)
{
    uintptr_t lo = atomic_load(&gm_mgr.pool_lo), hi = atomic_load(&gm_mgr.pool_hi);
    /* lo 0: no segment yet (the range [0, 0) holds nothing). */
    while ((lo == 0 || base < lo) && !atomic_compare_exchange_weak(&gm_mgr.pool_lo, &lo, base)) {}
    while (base + size > hi && !atomic_compare_exchange_weak(&gm_mgr.pool_hi, &hi, base + size)) {}
}

/* Tries one segment size: limit, then device. */
static int try_segment(gm_heap *heap, size_t size, size_t rounded)
{
    uintptr_t base = 0;
    if (!reserve_with_release(heap, size)) return GPUMEM_ERROR_OUT_OF_MEMORY;
    int rc = backend_alloc_with_release(heap, size, &base);
    if (rc != GPUMEM_OK) {
        gm_limit_unreserve(heap->device, size);
        return rc;
    }
    widen_pool_range(base, size); /* before any block of it is handed out */
    pthread_mutex_lock(&heap->lock);
    bool ok = gm_pool_add_segment_locked(&heap->pool, base, size, rounded);
    pthread_mutex_unlock(&heap->lock);
    if (!ok) {
        gm_mgr.backend->mem_free(heap->ctx, base);
        gm_limit_unreserve(heap->device, size);
        return GPUMEM_ERROR_OUT_OF_MEMORY;
    }
    return GPUMEM_OK;
}

static size_t round_to_segment(size_t v) { return (v + GM_SEGMENT_ALIGN - 1) / GM_SEGMENT_ALIGN * GM_SEGMENT_ALIGN; }

/* ------------------------------------------------------------------ expandable segments
 *
 * GPUMEM_EXPANDABLE=1: each heap reserves one virtual range per size class (large, small) the
 * first time it grows, as large as the device, and maps physical chunks of the driver's
 * granularity at the range's mapped end as the pool grows; the pool sees one segment per range,
 * [base, base+mapped), extended at its end (merged with a trailing free block), so the space
 * freed by smaller blocks serves a larger one. The limit counts mapped bytes: a grow reserves
 * its bytes before it maps them and hands back what it did not map. The release trims the
 * whole free chunks at a range's end, then unmaps whole free chunks inside it as holes (the
 * pool skips them); a grow maps a hole again when that makes room, before mapping at the end.
 * `grow_lock`
 * serializes mapping and unmapping; no backend call runs under the heap lock. Where the driver
 * has no VMM, or a range is exhausted, growth falls back to classic segments. */

#define GROW_FALLBACK 1 /* not a CUresult: take a classic segment instead */

static size_t vmm_range_override;

void gm_vmm_set_range_size(size_t bytes) { vmm_range_override = bytes; }

static size_t round_up_to(size_t v, size_t to) { return (v + to - 1) / to * to; }

/* Whether the heap's device can have expandable segments; asks the backend once. */
static bool vmm_ready(gm_heap *heap)
{
    int state = __atomic_load_n(&heap->vmm, __ATOMIC_ACQUIRE);
    if (state) return state > 0;
    const gm_backend *be = gm_mgr.backend;
    size_t g = 0;
    int rc = be->vmm_granularity ? be->vmm_granularity(heap->ctx, &g) : GPUMEM_ERROR_NOT_SUPPORTED;
    pthread_mutex_lock(&heap->lock);
    if (rc == GPUMEM_OK && g) { /* GPUMEM_EXPANDABLE_CHUNK in whole granules and whole 2 MiB */
        size_t chunk = round_up_to((size_t)gm_mgr.cfg->expandable_chunk, g);
        while (chunk % GM_SEGMENT_ALIGN) chunk += g; /* granularities are powers of two: rare */
        heap->vmm_chunk = chunk;
        heap->pool.sizing.chunk = heap->vmm_chunk;
    }
    __atomic_store_n(&heap->vmm, rc == GPUMEM_OK && g ? 1 : -1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&heap->lock);
    if (rc != GPUMEM_OK)
        gm_log(GM_WARN, "GPUMEM_EXPANDABLE=1: device %d has no virtual memory management (%d); "
               "using classic segments", heap->device, rc);
    return rc == GPUMEM_OK && g;
}

/* Reserves the class's range (grow_lock held). False: none can be had (fall back). */
static bool vrange_ready(gm_heap *heap, gm_vrange *r)
{
    if (r->base) return true;
    const gm_backend *be = gm_mgr.backend;
    size_t size = vmm_range_override, total = 0;
    if (!size) size = be->device_total(heap->device, &total) == GPUMEM_OK && total ? total : (size_t)64 << 30;
    if (size > ((size_t)1 << 40)) size = (size_t)1 << 40;
    size = round_up_to(size, heap->vmm_chunk);
    uintptr_t base = 0;
    /* Aligned to the chunk's largest power-of-two factor (a multiple of the granularity): the
     * driver refuses an alignment that is no power of two, such as a 20 MiB chunk's. */
    size_t align = heap->vmm_chunk & (~heap->vmm_chunk + 1);
    int rc = be->va_reserve(heap->ctx, size, align, &base);
    if (rc != GPUMEM_OK) {
        gm_log(GM_WARN, "GPUMEM_EXPANDABLE=1: reserving %zu bytes of virtual range on device %d "
               "failed (%d); using classic segments", size, heap->device, rc);
        return false;
    }
    widen_pool_range(base, size);
    pthread_mutex_lock(&heap->lock);
    r->base = base;
    r->size = size;
    r->mapped = 0;
    pthread_mutex_unlock(&heap->lock);
    return true;
}

/* Free bytes at the end of the class's segment (heap lock held). */
static size_t vrange_tail_free_locked(gm_heap *heap, const gm_vrange *r)
{
    if (!r->mapped) return 0;
    gm_segment *seg = gm_pool_segment_containing(&heap->pool, r->base);
    return seg ? gm_pool_tail_free_locked(seg) : 0;
}

/* Maps `want` bytes (whole chunks) at the mapped end of `r` and hands them to the pool; grow_lock
 * held, the bytes already reserved in the limit. Returns the bytes mapped (a map failing half
 * way keeps the chunks mapped before it) and the first failure in `*rc`. */
static size_t vrange_map_locked(gm_heap *heap, gm_vrange *r, bool small, size_t want, int *rc)
{
    const gm_backend *be = gm_mgr.backend;
    size_t chunk = heap->vmm_chunk, done = 0;
    uintptr_t at = r->base + r->mapped;
    *rc = GPUMEM_OK;
    for (; done < want; done += chunk) {
        *rc = be->vmm_map(heap->ctx, at + done, chunk, heap->vmm_peers);
        if (*rc != GPUMEM_OK) break;
    }
    if (!done) return 0;
    pthread_mutex_lock(&heap->lock);
    bool ok;
    if (r->mapped) {
        gm_segment *seg = gm_pool_segment_containing(&heap->pool, r->base);
        ok = seg && gm_pool_extend_segment_locked(&heap->pool, seg, done);
    } else {
        ok = gm_pool_add_expandable_locked(&heap->pool, r->base, done, small);
    }
    if (ok) r->mapped += done;
    pthread_mutex_unlock(&heap->lock);
    if (!ok) { /* no host memory for the bookkeeping: give the chunks back */
        for (size_t u = 0; u < done; u += chunk) be->vmm_unmap(heap->ctx, at + u, chunk);
        *rc = GPUMEM_ERROR_OUT_OF_MEMORY;
        return 0;
    }
    return done;
}

/* One attempt to make room for `rounded` bytes in the class's range. GPUMEM_OK, a failure, or
 * GROW_FALLBACK (no VMM, no range, the range exhausted). Called unlocked. */
static int grow_expandable_once(gm_heap *heap, size_t rounded, bool small)
{
    gm_vrange *r = &heap->vr[small];
    size_t chunk = heap->vmm_chunk;
    pthread_mutex_lock(&heap->grow_lock);
    if (!vrange_ready(heap, r)) {
        pthread_mutex_unlock(&heap->grow_lock);
        return GROW_FALLBACK;
    }
    pthread_mutex_lock(&heap->lock);
    size_t tail = vrange_tail_free_locked(heap, r), mapped = r->mapped, size = r->size;
    pthread_mutex_unlock(&heap->lock);
    pthread_mutex_unlock(&heap->grow_lock);
    /* What the request misses, in whole chunks; a grow maps at least one step (GPUMEM_SMALL_SEGMENT
     * or GPUMEM_SEGMENT_MIN) where the limit and the range allow. */
    size_t missing = round_up_to(rounded > tail ? rounded - tail : chunk, chunk);
    size_t step = round_up_to(small ? heap->pool.sizing.small_segment : heap->pool.sizing.segment_min, chunk);
    size_t want = missing > step ? missing : step;
    if (want > gm_limit_headroom(heap->device) || mapped + want > size) want = missing;
    if (mapped + missing > size) return GROW_FALLBACK;
    /* The limit first, unlocked: handing cached memory back takes grow_lock. */
    if (!reserve_with_release(heap, want)) return GPUMEM_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&heap->grow_lock);
    pthread_mutex_lock(&heap->lock);
    tail = vrange_tail_free_locked(heap, r); /* another grow or a trim may have come between */
    pthread_mutex_unlock(&heap->lock);
    int rc = GPUMEM_OK;
    size_t need = round_up_to(rounded > tail ? rounded - tail : chunk, chunk), done = 0;
    if (need > want) need = want; /* what was reserved; the caller's loop grows again */
    if (r->mapped + need > r->size) rc = GROW_FALLBACK;
    else if (need) done = vrange_map_locked(heap, r, small, r->mapped + want <= r->size ? want : need, &rc);
    pthread_mutex_unlock(&heap->grow_lock);
    if (done < want) gm_limit_unreserve(heap->device, want - done);
    if (done >= need) return GPUMEM_OK; /* enough even where a later chunk failed */
    return rc == GPUMEM_OK ? GPUMEM_ERROR_OUT_OF_MEMORY : rc;
}

/* Grows the range of the class (`small`) until `rounded` bytes are free at its end, retrying
 * once after handing cached memory back on a device OOM. */
static int grow_expandable_class(gm_heap *heap, size_t rounded, bool small)
{
    if (!vmm_ready(heap)) return GROW_FALLBACK;
    int rc = grow_expandable_once(heap, rounded, small);
    if (rc != GPUMEM_ERROR_OUT_OF_MEMORY || gm_limit_headroom(heap->device) < rounded) return rc;
    count_locked_event(heap, &heap->c.backend_ooms);
    note_instant("device oom", heap->device, rounded);
    if (gm_release_cached(heap, 0) == 0) return rc;
    count_locked_event(heap, &heap->c.release_retries);
    note_instant("oom retry", heap->device, rounded);
    return grow_expandable_once(heap, rounded, small);
}


/* Unmaps `size` bytes at `addr` chunk by chunk (each chunk was one map). */
static void vrange_unmap(gm_heap *heap, uintptr_t addr, size_t size)
{
    size_t chunk = heap->vmm_chunk;
    for (size_t u = 0; u < size; u += chunk) {
        int rc = gm_mgr.backend->vmm_unmap(heap->ctx, addr + u, chunk);
        if (rc != GPUMEM_OK)
            gm_log(GM_WARN, "unmapping %#lx (%zu bytes) of an expandable segment failed (%d)",
                   (unsigned long)(addr + u), chunk, rc);
    }
}

/* Maps the chunks of `hole` again, all or none (grow_lock held); true when they are the pool's
 * again, merged with their free neighbours. */
static bool hole_map_locked(gm_heap *heap, gm_vrange *r, const gm_pool_span *hole)
{
    size_t chunk = heap->vmm_chunk, done = 0;
    for (; done < hole->size; done += chunk)
        if (gm_mgr.backend->vmm_map(heap->ctx, hole->base + done, chunk, heap->vmm_peers) != GPUMEM_OK) break;
    bool ok = done == hole->size;
    if (ok) {
        pthread_mutex_lock(&heap->lock);
        gm_segment *seg = gm_pool_segment_containing(&heap->pool, r->base);
        ok = seg && gm_pool_fill_hole_locked(&heap->pool, seg, hole->base);
        pthread_mutex_unlock(&heap->lock);
    }
    if (!ok) vrange_unmap(heap, hole->base, done);
    return ok;
}

/* The class's hole (free chunks a release unmapped inside the range) that, mapped again, makes
 * room for `rounded`; found under the heap lock. */
static bool hole_for(gm_heap *heap, gm_vrange *r, size_t rounded, gm_pool_span *out)
{
    pthread_mutex_lock(&heap->lock);
    gm_segment *seg = r->mapped ? gm_pool_segment_containing(&heap->pool, r->base) : NULL;
    bool found = seg && gm_pool_hole_for_locked(seg, rounded, out);
    pthread_mutex_unlock(&heap->lock);
    return found;
}

/* Before mapping at the range's end: a hole that makes room for the request is mapped again.
 * GPUMEM_OK, else GROW_FALLBACK (none, or it cannot be had now: grow at the end). */
static int refill_hole(gm_heap *heap, size_t rounded, bool small)
{
    gm_vrange *r = &heap->vr[small];
    gm_pool_span h, again;
    if (!hole_for(heap, r, rounded, &h)) return GROW_FALLBACK;
    if (!reserve_with_release(heap, h.size)) return GROW_FALLBACK; /* unlocked: it may take grow_lock */
    pthread_mutex_lock(&heap->grow_lock);
    bool ok = hole_for(heap, r, rounded, &again) && again.base == h.base && again.size == h.size &&
              hole_map_locked(heap, r, &h);
    pthread_mutex_unlock(&heap->grow_lock);
    if (!ok) gm_limit_unreserve(heap->device, h.size);
    return ok ? GPUMEM_OK : GROW_FALLBACK;
}

static int grow_expandable(gm_heap *heap, size_t rounded)
{
    bool small = rounded <= GM_SMALL_MAX;
    if (vmm_ready(heap) && refill_hole(heap, rounded, small) == GPUMEM_OK) return GPUMEM_OK;
    return grow_expandable_class(heap, rounded, small);
}

void gm_vmm_take_ranges_locked(gm_heap *heap, gm_vmm_ranges *out)
{
    memcpy(out->vr, heap->vr, sizeof out->vr);
    out->holes = NULL;
    out->nholes = 0;
    size_t n = 0;
    for (int i = 0; i < 2; i++) {
        gm_segment *seg = heap->vr[i].mapped ? gm_pool_segment_containing(&heap->pool, heap->vr[i].base) : NULL;
        if (seg) n += seg->holes / heap->vmm_chunk; /* a bound: every hole is a chunk or more */
    }
    if (!n || !(out->holes = malloc(n * sizeof *out->holes))) return;
    for (int i = 0; i < 2; i++) {
        gm_segment *seg = heap->vr[i].mapped ? gm_pool_segment_containing(&heap->pool, heap->vr[i].base) : NULL;
        if (seg) out->nholes += gm_pool_holes_locked(seg, out->holes + out->nholes, n - out->nholes);
    }
}

static bool in_hole(const gm_vmm_ranges *r, uintptr_t addr)
{
    for (size_t i = 0; i < r->nholes; i++)
        if (addr - r->holes[i].base < r->holes[i].size) return true;
    return false;
}

void gm_vmm_release_ranges(gm_heap *heap, gm_vmm_ranges *r)
{
    for (int i = 0; i < 2; i++) {
        const gm_vrange *v = &r->vr[i];
        if (!v->base) continue;
        for (size_t u = 0; u < v->mapped; u += heap->vmm_chunk)
            if (!in_hole(r, v->base + u)) vrange_unmap(heap, v->base + u, heap->vmm_chunk);
        gm_mgr.backend->va_free(heap->ctx, v->base, v->size);
    }
    free(r->holes);
    r->holes = NULL;
}

/* The chunks mapped now (grow_lock held; holes skipped), each given or denied `accessor`. */
static int peer_access_locked(gm_heap *heap, int accessor, bool grant)
{
    const gm_backend *be = gm_mgr.backend;
    gm_vmm_ranges now;
    pthread_mutex_lock(&heap->lock);
    gm_vmm_take_ranges_locked(heap, &now);
    pthread_mutex_unlock(&heap->lock);
    int rc = GPUMEM_OK;
    for (int i = 0; i < 2; i++) {
        const gm_vrange *r = &now.vr[i];
        for (size_t u = 0; u < r->mapped && rc == GPUMEM_OK; u += heap->vmm_chunk) {
            if (in_hole(&now, r->base + u)) continue;
            rc = grant ? be->vmm_grant(heap->ctx, r->base + u, heap->vmm_chunk, accessor)
                       : be->vmm_revoke(heap->ctx, r->base + u, heap->vmm_chunk, accessor);
        }
    }
    free(now.holes);
    return rc;
}

static int peer_change(uintptr_t ctx, int device, int accessor, bool grant)
{
    if (!gm_mgr.cfg->expandable || accessor < 0 || accessor >= 64 || accessor == device) return GPUMEM_OK;
    gm_heap *heap = gm_heap_get(ctx, device); /* chunks mapped from now on follow the bit */
    if (!heap) return GPUMEM_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&heap->grow_lock);
    if (grant) heap->vmm_peers |= 1ull << accessor;
    else heap->vmm_peers &= ~(1ull << accessor);
    int rc = peer_access_locked(heap, accessor, grant);
    pthread_mutex_unlock(&heap->grow_lock);
    return rc;
}

int gm_vmm_grant_peer(uintptr_t ctx, int device, int accessor) { return peer_change(ctx, device, accessor, true); }

int gm_vmm_revoke_peer(uintptr_t ctx, int device, int accessor) { return peer_change(ctx, device, accessor, false); }

/* Adds a segment able to hold `rounded` bytes. Called unlocked. */
static int grow(gm_heap *heap, size_t rounded)
{
    if (gm_mgr.cfg->expandable) {
        int rc = grow_expandable(heap, rounded);
        if (rc != GROW_FALLBACK) {
            if (rc == GPUMEM_ERROR_OUT_OF_MEMORY && gm_limit_headroom(heap->device) < rounded) {
                count_locked_event(heap, &heap->c.limit_rejections);
                note_instant("limit rejection", heap->device, rounded);
            }
            return rc;
        }
    }
    size_t want = gm_pool_next_segment_size(&heap->pool, rounded);
    size_t own = round_to_segment(rounded);
    size_t headroom = gm_limit_headroom(heap->device);
    if (want > headroom && own <= headroom) want = own;
    int rc = try_segment(heap, want, rounded);
    if (rc == GPUMEM_ERROR_OUT_OF_MEMORY && want > own) rc = try_segment(heap, own, rounded);
    if (rc == GPUMEM_ERROR_OUT_OF_MEMORY && own > rounded) /* last resort: exactly the request */
        rc = try_segment(heap, rounded, rounded);
    if (rc == GPUMEM_ERROR_OUT_OF_MEMORY) {
        pthread_mutex_lock(&heap->lock);
        bool limited = gm_limit_headroom(heap->device) < rounded;
        if (limited) heap->c.limit_rejections++;
        pthread_mutex_unlock(&heap->lock);
        if (limited) note_instant("limit rejection", heap->device, rounded);
    }
    return rc;
}

/* ------------------------------------------------------------------ release */

static void release_spans(gm_heap *heap, const gm_pool_span *spans, size_t n)
{
    bool exiting = atomic_load(&gm_mgr.exiting);
    for (size_t i = 0; i < n; i++) {
        if (exiting) {
        } else if (spans[i].expandable) {
            vrange_unmap(heap, spans[i].base, spans[i].size);
        } else {
            gm_mgr.backend->mem_free(heap->ctx, spans[i].base);
        }
        gm_limit_unreserve(heap->device, spans[i].size);
    }
}

/* The range an expandable span was released from ends where its segment ends now (heap lock
 * held): a trim at the end took the span and any hole below it; a hole inside changes nothing. */
static void vrange_trimmed_locked(gm_heap *heap, const gm_pool_span *span)
{
    for (int i = 0; i < 2; i++) {
        gm_vrange *r = &heap->vr[i];
        if (!r->base || span->base < r->base || span->base - r->base >= r->mapped) continue;
        gm_segment *seg = gm_pool_segment_containing(&heap->pool, r->base);
        r->mapped = seg ? seg->size : 0;
    }
}

size_t gm_release_cached(gm_heap *heap, uint64_t keep_cached)
{
    gm_pool_span batch[64];
    size_t released = 0, n;
    /* Expandable ranges: no grow maps while their ends are trimmed and unmapped. */
    bool ranges = __atomic_load_n(&heap->vmm, __ATOMIC_ACQUIRE) > 0;
    if (ranges) pthread_mutex_lock(&heap->grow_lock);
    bool first = true;
    do {
        pthread_mutex_lock(&heap->lock);
        if (first) { /* what the threads' caches hold counts as cached too; above `keep`, it goes */
            first = false;
            uint64_t held = gm_tcache_cached_locked(heap);
            if (held && held + heap->pool.bytes_cached_free > keep_cached)
                gm_tcache_flush_all_locked(heap, false), held = 0; /* the pool can then release them */
            keep_cached -= held;
        }
        n = gm_pool_take_free_segments_locked(&heap->pool, keep_cached, batch, 64);
        for (size_t i = 0; i < n; i++)
            if (batch[i].expandable) vrange_trimmed_locked(heap, &batch[i]);
        pthread_mutex_unlock(&heap->lock);
        for (size_t i = 0; i < n; i++) released += batch[i].size;
        release_spans(heap, batch, n);
    } while (n == 64);
    if (ranges) pthread_mutex_unlock(&heap->grow_lock);
    return released;
}

size_t gm_release_all_cached(void)
{
    size_t released = 0, n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) released += gm_release_cached(gm_mgr.heaps[i], 0);
    return released;
}

static void release_over_cache_limit(gm_heap *heap)
{
    uint64_t keep = gm_mgr.cfg->max_cached;
    if (keep != GM_UNLIMITED && !atomic_load(&gm_mgr.exiting)) gm_release_cached(heap, keep);
}

/* ------------------------------------------------------------------ allocation */

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
            count_locked_event(heap, &heap->c.backend_ooms);
            notify_oom(heap, size, GM_OOM_DEVICE);
        }
        return rc;
    }
    gm_track_commit(heap, p, size, GM_KIND_DIRECT, stream, site);
    *out = p;
    return GPUMEM_OK;
}

/* What an allocation hands out with its block. */
typedef struct gm_handout {
    size_t size;
    uintptr_t stream;
    const gm_callsite *site;
    uint32_t stack_id;
} gm_handout;

/* The block becomes a new live allocation, held and counted by thread cache `tc` (its lock held)
 * or, without one, by the heap (its lock held). */
static void hand_out_locked(gm_heap *heap, gm_tcache *tc, gm_block *b, const gm_handout *h, bool hit)
{
    gm_record_fill(&b->rec, b->addr, h->size, b->size, GM_KIND_POOL, h->stream, h->site, h->stack_id,
                   gm_tag_current());
    b->rec.block = b;
    b->sync_memops = 0;
    b->ipc_slot = 0;
    if (tc) {
        b->rec.owner = tc->index;
        b->buffer_id = gm_buffer_id_make(heap, tc->index, ++tc->buffer_seq);
        gm_live_insert(&tc->live, &b->rec);
        gm_stats_on_alloc(gm_tcache_counting(heap, tc), &b->rec, hit);
    } else {
        b->rec.owner = 0;
        b->buffer_id = gm_buffer_id_next_locked(heap); /* a new allocation to the driver's eyes */
        gm_live_insert(&heap->live, &b->rec);
        gm_stats_on_alloc(gm_heap_counting(heap), &b->rec, hit);
    }
}

/* The hot path of a thread's allocation: a block it freed itself, of this very size, taken under
 * its own cache's lock alone. */
static bool alloc_from_thread_cache(gm_heap *heap, gm_tcache *tc, size_t rounded, const gm_handout *h,
                                    uintptr_t *out)
{
    pthread_mutex_lock(&tc->lock);
    gm_block *b = gm_tcache_take_locked(tc, rounded);
    if (b) hand_out_locked(heap, tc, b, h, true);
    pthread_mutex_unlock(&tc->lock);
    if (b) *out = b->addr;
    return b != NULL;
}

/* A miss takes the other threads' cached blocks at most this often (unless the limit would refuse
 * the growth): often enough that memory one thread freed serves another within a millisecond, so
 * the caches do not raise the pool's peak; rarely enough that two threads that each need the one
 * block the pool has do not take it from each other's cache on every allocation, forever. */
static uint64_t take_interval_ns = 1000000;

void gm_tcache_set_take_interval_ns(uint64_t ns) { take_interval_ns = ns; }

/* Before growing, blocks threads keep freed go back to the pool: the calling thread's own always
 * (splitting one of its blocks beats a new segment), the other threads' where the limit would
 * refuse the growth or take_interval_ns has passed, and all of them after growing failed. Here
 * only the reusable ones: in fast mode a block waiting for its cache's fence stays there (the
 * miss may be the batching that fence.c asks for); at the limit, or after a grow that failed,
 * all of them. */
static bool flush_before_growing_locked(gm_heap *heap, gm_tcache *own, size_t rounded, int *step)
{
    if (*step == 0) {
        *step = 1;
        if (own && gm_tcache_flush_locked(heap, own, true)) return true;
    }
    if (*step == 1) {
        *step = 2;
        uint64_t now = gm_now_ns();
        bool at_limit = gm_limit_headroom(heap->device) < rounded;
        bool due = !heap->tcs_taken_at_ns || now - heap->tcs_taken_at_ns >= take_interval_ns || at_limit;
        /* at the limit the waiting blocks go too: the heap waits for them rather than refuse */
        if (due && gm_tcache_flush_all_locked(heap, !at_limit)) {
            heap->tcs_taken_at_ns = now;
            return true;
        }
    }
    return false;
}

/* A grow that succeeded can still leave this thread without its block: between the grow and the
 * retake of the heap lock, other threads may take the new memory or, under GPUMEM_MAX_CACHED, a
 * free may release it again. Each such round gave memory to someone, so retrying is progress;
 * the bound only stops a pool that cannot use what it grew. (4 gave spurious OOMs with 4 threads
 * churning an expandable range under GPUMEM_MAX_CACHED=0, about 1 run in 10.) */
#define GROWS_PER_ALLOC 64

/* A block of `rounded` bytes from the pool, growing it as needed; the heap is locked on entry
 * and on return. `own`: the calling thread's cache, or NULL. `*hit`: no new segment was needed. */
static int take_block_locked(gm_heap *heap, gm_tcache *own, size_t rounded, gm_block **b, bool *hit)
{
    bool waited = false;
    int flushed = 0; /* flush_before_growing_locked's step; 3: every cache flushed after a failed grow */
    int rc = GPUMEM_OK;
    *hit = true;
    for (int grows = 0; gm_pool_alloc_locked(&heap->pool, rounded, b) != GPUMEM_OK;) {
        if (heap->pool.pending_head && gm_fence_reclaim_locked(heap, rounded)) continue; /* fence.c */
        if (heap->quarantine && gm_ipc_reclaim_locked(heap)) continue;
        if (flushed < 2 && flush_before_growing_locked(heap, own, rounded, &flushed)) continue;
        *hit = false;
        if (grows++ >= GROWS_PER_ALLOC) return GPUMEM_ERROR_OUT_OF_MEMORY;
        pthread_mutex_unlock(&heap->lock);
        rc = grow(heap, rounded);
        pthread_mutex_lock(&heap->lock);
        if (rc == GPUMEM_OK) continue;
        if (flushed < 3 && (flushed = 3, gm_tcache_flush_all_locked(heap, false))) continue;
        if (waited || !heap->pool.pending_head) return rc;
        waited = true; /* fast mode: memory is waiting on fences; wait for them once */
        gm_retire_pending_locked(heap, true);
    }
    return GPUMEM_OK;
}

int gm_alloc(gm_heap *heap, size_t size, uintptr_t stream, const gm_callsite *site, uintptr_t *out)
{
    if (size == 0 || !out) return GPUMEM_ERROR_INVALID_VALUE;
    size_t rounded = gm_pool_round_size(size);
    if (!rounded) return GPUMEM_ERROR_OUT_OF_MEMORY;
    if (!gm_mgr.cfg->pool) return alloc_direct(heap, size, stream, site, out);
    uint32_t stack_id = gm_stack_capture(site); /* before the lock: it walks memory and hashes */
    gm_handout h = {size, stream, site, stack_id};
    gm_tcache *tc = gm_tcache_get(heap);
    if (tc && alloc_from_thread_cache(heap, tc, rounded, &h, out)) return GPUMEM_OK;

    gm_block *b = NULL;
    bool hit;
    pthread_mutex_lock(&heap->lock);
    if (tc && !gm_mgr.cfg->free_sync) gm_fence_learn_batch_locked(heap); /* what its cache may keep */
    int rc = take_block_locked(heap, tc, rounded, &b, &hit);
    if (rc != GPUMEM_OK) {
        pthread_mutex_unlock(&heap->lock);
        if (rc == GPUMEM_ERROR_OUT_OF_MEMORY) notify_oom(heap, size, oom_cause(heap, rounded));
        return rc;
    }
    if (tc) { /* the thread's own: its free goes back to its cache */
        pthread_mutex_lock(&tc->lock);
        gm_fence_tc_learn_locked(heap, tc, gm_tcache_keep_at_most());
        b->tc = tc;
        hand_out_locked(heap, tc, b, &h, hit);
        pthread_mutex_unlock(&tc->lock);
    } else {
        hand_out_locked(heap, NULL, b, &h, hit);
    }
    pthread_mutex_unlock(&heap->lock);
    *out = b->addr;
    return GPUMEM_OK;
}

/* ------------------------------------------------------------------ free */

/* The block's last step out of the live set: another process still has it open through IPC →
 * kept from reuse (quarantine) until it closes; else back to the bins, or (pend) to the fence. */
static void release_block_locked(gm_heap *heap, gm_block *b, bool pend)
{
    if (b->ipc_slot && gm_ipc_quarantine_locked(heap, b)) return;
    if (pend) gm_pool_pend_block_locked(&heap->pool, b);
    else gm_pool_free_block_locked(&heap->pool, b);
}

/* A pool block whose record is already gone; the heap is locked on entry and unlocked on return. */
static void free_pool_block(gm_heap *heap, gm_block *b, uintptr_t stream, bool synced)
{
    bool exiting = atomic_load(&gm_mgr.exiting);
    if (!exiting && stream != GM_FREE_BARRIER) {
        pthread_mutex_unlock(&heap->lock);
        gm_mgr.backend->stream_synchronize(heap->ctx, stream);
        pthread_mutex_lock(&heap->lock);
        release_block_locked(heap, b, false);
    } else if (!exiting && !gm_mgr.cfg->free_sync) {
        size_t size = b->size; /* b may merge away once pended and retired */
        release_block_locked(heap, b, true);
        gm_fence_large_free_locked(heap, size); /* fence.c */
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

/* gm_heap_find_locked with its first step here, where the compiler can inline it: the hint is
 * nearly always the heap. */
static inline gm_heap *find_record_locked(uintptr_t ptr, gm_heap *hint, gm_record **rec)
{
    if (hint) {
        pthread_mutex_lock(&hint->lock);
        *rec = gm_heap_live_find_locked(hint, ptr);
        if (*rec) return hint;
        pthread_mutex_unlock(&hint->lock);
    }
    return gm_heap_find_other_locked(ptr, hint, rec);
}

/* Whether a block freed now may wait in its thread's cache: in strict mode after the barrier
 * (or at exit) it is reusable at once; in fast mode it waits for a fence of the cache's, when
 * it is of a size the cache keeps (gm_fence_tc_learn_locked). */
static bool keep_in_thread_cache(gm_tcache *tc, gm_block *b, bool synced)
{
    if (b->ipc_slot) return false;
    if (synced) return gm_tcache_keep_locked(tc, b, false);
    bool size_kept = b->size <= tc->fast_keep_max || (tc->fast_keep_above && b->size > tc->fast_keep_above);
    if (gm_mgr.cfg->free_sync || !size_kept || !gm_tcache_keep_locked(tc, b, true)) return false;
    gm_fence_tc_after_keep_locked(tc);
    return true;
}

/* The hot path of a thread's free: a block it allocated itself and nothing looked up since.
 * Kept in its cache when it may be (keep_in_thread_cache), else handed to the pool like any
 * other. False when the thread's cache does not hold `ptr`. */
static bool free_to_thread_cache(gm_heap *heap, gm_tcache *tc, uintptr_t ptr, bool synced,
                                 gm_alloc_kind *kind_out)
{
    pthread_mutex_lock(&tc->lock);
    gm_record *rec = gm_live_find(&tc->live, ptr);
    if (!rec) {
        pthread_mutex_unlock(&tc->lock);
        return false;
    }
    if (kind_out) *kind_out = GM_KIND_POOL;
    gm_block *b = rec->block;
    gm_live_remove(&tc->live, rec);
    gm_stats_on_free(gm_tcache_counting(heap, tc), rec);
    bool kept = keep_in_thread_cache(tc, b, synced);
    pthread_mutex_unlock(&tc->lock);
    if (kept) {
        release_over_cache_limit(heap); /* GPUMEM_MAX_CACHED bounds the caches and the pool together */
        return true;
    }
    pthread_mutex_lock(&heap->lock);
    pthread_mutex_lock(&tc->lock);
    b->tc = NULL;
    pthread_mutex_unlock(&tc->lock);
    free_pool_block(heap, b, GM_FREE_BARRIER, synced); /* unlocks */
    return true;
}

static gm_answer free_impl(gm_heap *hint, bool hint_is_current, uintptr_t ptr, uintptr_t stream,
                           gm_alloc_kind *kind_out)
{
    if (!ptr) return gm_not_ours();
    bool barrier = stream == GM_FREE_BARRIER;
    bool synced = false;
    /* Synchronize before the lookup so the common case takes the heap lock once. */
    if (barrier && gm_mgr.cfg->pool && gm_mgr.cfg->free_sync && hint &&
        gm_pool_segment_count(&hint->pool) && !atomic_load(&gm_mgr.exiting)) {
        if (hint_is_current) gm_mgr.backend->synchronize_current();
        else gm_mgr.backend->synchronize(hint->ctx);
        synced = true;
    }
    gm_tcache *tc = hint && barrier && gm_mgr.cfg->pool ? gm_tcache_peek(hint) : NULL;
    if (tc && free_to_thread_cache(hint, tc, ptr, synced || atomic_load(&gm_mgr.exiting), kind_out))
        return gm_ours(GPUMEM_OK);
    gm_record *rec = NULL;
    gm_heap *heap = find_record_locked(ptr, hint, &rec);
    if (!heap) return gm_heap_any_segment_holds(ptr) ? gm_ours(GPUMEM_ERROR_INVALID_VALUE) : gm_not_ours();
    gm_alloc_kind kind = (gm_alloc_kind)rec->kind;
    if (kind_out) *kind_out = kind;
    if (kind != GM_KIND_POOL && kind != GM_KIND_DIRECT) {
        pthread_mutex_unlock(&heap->lock);
        return (gm_answer){GM_PASSTHROUGH, 0};
    }
    gm_heap_untrack_locked(heap, rec);
    gm_heap_count_free_locked(heap, rec);
    if (heap->quarantine) gm_ipc_reclaim_locked(heap); /* a flag test unless IPC kept blocks */
    if (kind == GM_KIND_POOL) {
        free_pool_block(heap, rec->block, stream, synced && heap == hint);
        return gm_ours(GPUMEM_OK);
    }
    pthread_mutex_unlock(&heap->lock);
    int rc = atomic_load(&gm_mgr.exiting) ? GPUMEM_OK : gm_mgr.backend->mem_free(heap->ctx, ptr);
    gm_limit_unreserve(heap->device, rec->size);
    gm_record_delete(rec);
    return gm_ours(rc);
}

gm_answer gm_free(gm_heap *hint, uintptr_t ptr, uintptr_t stream, gm_alloc_kind *kind_out)
{
    return free_impl(hint, false, ptr, stream, kind_out);
}

gm_answer gm_free_current(gm_heap *current, uintptr_t ptr, gm_alloc_kind *kind_out)
{
    return free_impl(current, true, ptr, GM_FREE_BARRIER, kind_out);
}

/* ------------------------------------------------------------------ pass-through tracking */

int gm_track_reserve(gm_heap *heap, size_t size)
{
    if (gm_limit_reserve(heap->device, size)) return GPUMEM_OK;
    if (gm_release_cached(heap, 0) > 0) {
        count_locked_event(heap, &heap->c.release_retries);
        if (gm_limit_reserve(heap->device, size)) return GPUMEM_OK;
    }
    count_locked_event(heap, &heap->c.limit_rejections);
    note_instant("limit rejection", heap->device, size);
    notify_oom(heap, size, GM_OOM_LIMIT);
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
    gm_record_fill(rec, ptr, size, size, kind, stream, site, gm_stack_capture(site), gm_tag_current());
    pthread_mutex_lock(&heap->lock);
    gm_record *old = gm_live_find(&heap->live, ptr);
    if (old) { /* the driver reused an address we still track: our record is stale */
        gm_heap_untrack_locked(heap, old);
        gm_heap_count_free_locked(heap, old);
        if (!old->block) {
            gm_limit_unreserve(heap->device, old->size);
            gm_record_delete(old);
        }
    }
    gm_tcache *tc = gm_tcache_peek(heap); /* one thread's allocations all count in one place */
    rec->owner = tc ? tc->index : 0;
    gm_live_insert(&heap->live, rec);
    gm_heap_count_alloc_locked(heap, rec, false);
    pthread_mutex_unlock(&heap->lock);
}

void gm_track_abort(gm_heap *heap, size_t size)
{
    gm_limit_unreserve(heap->device, size);
}

static gm_owner untrack(gm_heap *hint, uintptr_t ptr, gm_alloc_kind kind, bool keep_reserved,
                        int *device_out, size_t *size_out)
{
    gm_record *rec = NULL;
    gm_heap *heap = gm_heap_find_locked(ptr, hint, &rec);
    if (!heap) return GM_NOT_OURS;
    if (rec->kind != kind) {
        pthread_mutex_unlock(&heap->lock);
        return GM_NOT_OURS;
    }
    gm_heap_untrack_locked(heap, rec);
    gm_heap_count_free_locked(heap, rec);
    pthread_mutex_unlock(&heap->lock);
    if (keep_reserved) {
        *device_out = heap->device;
        *size_out = rec->size;
    } else {
        gm_limit_unreserve(heap->device, rec->size);
    }
    gm_record_delete(rec);
    return GM_OURS;
}

gm_owner gm_untrack(gm_heap *hint, uintptr_t ptr, gm_alloc_kind kind)
{
    return untrack(hint, ptr, kind, false, NULL, NULL);
}

gm_owner gm_untrack_keep_reserved(gm_heap *hint, uintptr_t ptr, gm_alloc_kind kind, int *device_out,
                                  size_t *size_out)
{
    return untrack(hint, ptr, kind, true, device_out, size_out);
}

/* ------------------------------------------------------------------ resizing in place */

/* The live pool block of `heap` at `ptr`, or NULL. */
static gm_block *live_pool_block_locked(gm_heap *heap, uintptr_t ptr)
{
    gm_record *rec = gm_heap_live_find_locked(heap, ptr);
    return rec ? rec->block : NULL;
}

/* The record now reads as if the block had been allocated at its new size. */
static void record_resized_locked(gm_heap *heap, gm_block *b, size_t requested)
{
    gm_record old = b->rec;
    gm_heap_live_changed_locked(heap);
    b->rec.size = b->size;
    b->rec.requested = requested;
    gm_heap_count_resize_locked(heap, &old, &b->rec);
}

/* Expandable segments: a block that ends its range (nothing after it but free space) can grow
 * by mapping behind it. The bytes the range must have free at its end for `want`, else 0. */
static size_t room_to_map_locked(const gm_block *b, size_t want)
{
    if (!gm_mgr.cfg->expandable || !b->seg->expandable) return 0;
    const gm_block *next = b->next;
    if (next && (next->state != GM_BLOCK_FREE || next->next)) return 0;
    size_t rounded = gm_pool_round_size(want);
    return rounded > b->size ? rounded - b->size : 0;
}

int gm_resize_grow_in_place(gm_heap *heap, uintptr_t ptr, size_t need, size_t *cap)
{
    int rc = GPUMEM_ERROR_NOT_SUPPORTED;
    pthread_mutex_lock(&heap->lock);
    gm_block *b = live_pool_block_locked(heap, ptr);
    size_t behind = b && b->size + gm_pool_room_after_locked(b) < gm_pool_round_size(need)
                        ? room_to_map_locked(b, *cap) : 0;
    if (behind) { /* map behind the block first (unlocked), then extend it as below */
        bool small = b->seg->small;
        size_t at_least = room_to_map_locked(b, need);
        pthread_mutex_unlock(&heap->lock);
        if (grow_expandable_class(heap, behind, small) != GPUMEM_OK && at_least && at_least < behind)
            grow_expandable_class(heap, at_least, small);
        pthread_mutex_lock(&heap->lock);
        b = live_pool_block_locked(heap, ptr);
    }
    if (b) {
        size_t target = *cap, reach = b->size + gm_pool_room_after_locked(b);
        size_t want = gm_pool_round_size(target); /* 0: beyond any device */
        if (!want || want > reach) target = want = reach;
        size_t rounded = want > b->size ? want : b->size;
        rc = target < need ? GPUMEM_ERROR_OUT_OF_MEMORY : gm_pool_extend_block_locked(&heap->pool, b, rounded);
        if (rc == GPUMEM_OK) {
            record_resized_locked(heap, b, target);
            *cap = target;
        }
    }
    pthread_mutex_unlock(&heap->lock);
    return rc;
}

int gm_resize_shrink_in_place(gm_heap *heap, uintptr_t ptr, size_t target)
{
    bool exiting = atomic_load(&gm_mgr.exiting);
    bool pend = !gm_mgr.cfg->free_sync && !exiting;
    /* Strict mode: the tail is reusable as soon as it is back in the bins, so first wait for the
     * work that may still use it, as cudaFree would. */
    if (gm_mgr.cfg->pool && !pend && !exiting) gm_mgr.backend->synchronize(heap->ctx);
    pthread_mutex_lock(&heap->lock);
    gm_block *b = live_pool_block_locked(heap, ptr);
    int rc = b ? gm_pool_shrink_block_locked(&heap->pool, b, gm_pool_round_size(target), pend)
               : GPUMEM_ERROR_NOT_SUPPORTED;
    if (rc == GPUMEM_OK) record_resized_locked(heap, b, target);
    pthread_mutex_unlock(&heap->lock);
    return rc;
}

int gm_check_owned(gm_heap *heap, uintptr_t ctx, uintptr_t ptr, size_t requested, uint16_t tag)
{
    pthread_mutex_lock(&heap->lock);
    bool bound = heap->bound && heap->ctx == ctx;
    gm_record *rec = bound && ptr ? gm_heap_live_find_locked(heap, ptr) : NULL;
    bool ours = !ptr || (rec && rec->requested == requested && rec->tag == tag);
    pthread_mutex_unlock(&heap->lock);
    if (!bound) return GPUMEM_ERROR_INVALID_CONTEXT;
    return ours ? GPUMEM_OK : GPUMEM_ERROR_INVALID_VALUE;
}
