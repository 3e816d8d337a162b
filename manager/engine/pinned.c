/* The pinned host memory pool behind cuMemHostAlloc / cuMemAllocHost / cuMemFreeHost.
 *
 * Pinning memory is slow in the driver (it locks pages and maps them for DMA; cudaFreeHost also
 * synchronizes the device), so programs that allocate staging buffers per step pay it every step.
 * The pool keeps freed blocks and hands them out again.
 *
 * Design (docs/architecture.md, "Pinned host memory"):
 * - One driver allocation per block, rounded to a size class: multiples of 4 KiB up to 16 KiB,
 *   then four classes per power of two (waste < 25 %, about 12 % on average; PyTorch's
 *   CachingHostAllocator rounds to powers of two, up to 50 %). No splitting: every cached block
 *   can go back to the driver on its own (GPUMEM_PINNED_MAX_CACHED is exact, nothing fragments),
 *   and a block is a whole driver allocation, so pointer queries keep working on it.
 * - Blocks are cached per (owning context, flags, class). A block belongs to the context that was
 *   current when the driver made it and dies with it, so it is only reused in that context: a
 *   program never gets memory that another context's destruction would free. The pool always adds
 *   CU_MEMHOSTALLOC_PORTABLE (a block is pinned for every context, never less than asked), so
 *   requests with and without PORTABLE share blocks; DEVICEMAP and WRITECOMBINED change what the
 *   memory is and are kept apart.
 * - cudaFreeHost's barrier is kept like cudaFree's: strict mode (GPUMEM_FREE_SYNC=1) synchronizes
 *   before a block is cached; fast mode records a fence instead, and reuse prefers a block whose
 *   fence completed, else waits for one (cheaper than the driver's allocation, which synchronizes).
 * - Cached bytes beyond GPUMEM_PINNED_MAX_CACHED go back to the driver, oldest first; on a driver
 *   out-of-memory the whole cache goes back and the request is retried once.
 *
 * Every block, live or cached, pass-through allocations and registered ranges are in one sorted
 * range table; gm_host_is_pinned reads it under a sequence lock (no store, no lock: copy hooks on
 * every thread call it). It changes only when the driver is called, not on pool hits. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gm_pinned.h"

#define PINNED_PAGE ((size_t)4096)
#define REUSE_SCAN 8 /* cached blocks of a class looked at for one whose fence completed */

typedef enum { PB_POOLED = 0, PB_DIRECT, PB_REGISTERED } pb_kind;
typedef enum { PB_LIVE = 0, PB_FREEING, PB_CACHED, PB_RANGE } pb_state;

struct pinned_bin;

typedef struct pinned_block {
    uintptr_t addr;
    size_t size;            /* the driver allocation, or the registered range */
    uintptr_t ctx;          /* owner: the driver frees the block with this context */
    int device;
    unsigned flags;         /* what the driver was given */
    uint8_t kind, state;
    bool dropped;           /* context destroyed while a free was in flight */
    bool unsynced;          /* freed during stream capture: synchronize before reuse */
    gm_fence *fence;        /* fast mode: reused once complete */
    struct pinned_bin *bin;
    struct pinned_block *bprev, *bnext; /* the bin's cached blocks, newest first */
    struct pinned_block *lprev, *lnext; /* every cached block, newest first (release order) */
    gm_record rec;          /* while live: the leak record; rec.hh links the live table */
} pinned_block;

typedef struct bin_key {
    uint64_t ctx, size, flags; /* no padding: uthash compares the bytes */
} bin_key;

typedef struct pinned_bin {
    bin_key key;
    pinned_block *head;
    UT_hash_handle hh;
} pinned_bin;

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static gm_live live;              /* records embedded in blocks */
static pinned_bin *bins;
static pinned_block *lru_head, *lru_tail;
static gm_pinned_stats st;

static pinned_block *block_of(gm_record *rec)
{
    return (pinned_block *)(void *)((char *)rec - offsetof(pinned_block, rec));
}

/* ------------------------------------------------------------------ size classes */

size_t gm_pinned_class_size(size_t size)
{
    if (size <= PINNED_PAGE) return PINNED_PAGE;
    if (size > ((size_t)1 << 62)) return 0;
    unsigned k = 63u - (unsigned)__builtin_clzll((unsigned long long)(size - 1)); /* 2^k < size <= 2^(k+1) */
    size_t step = ((size_t)1 << k) >> 2;
    if (step < PINNED_PAGE) step = PINNED_PAGE;
    return (size + step - 1) & ~(step - 1);
}

/* ------------------------------------------------------------------ the range table
 *
 * Sorted, disjoint [base, end) slots. Writers hold pool_lock and bump `range_seq` to odd before
 * and to even after a change; readers retry when it moved. Every slot field is atomic, so a
 * reader racing a writer reads stale values, never torn ones, and retries. Arrays that grew are
 * kept (never freed): a reader may still hold one; they total less than the current array. */

typedef struct range_slot {
    _Atomic uintptr_t base, end;
} range_slot;

typedef struct range_array {
    size_t cap;
    struct range_array *retired;
    range_slot slot[];
} range_array;

static _Atomic(range_array *) ranges;
static _Atomic size_t nranges;
static _Atomic unsigned range_seq;
static pinned_block **range_owner; /* parallel to the slots; read and written under pool_lock */

#define RELAXED memory_order_relaxed

/* Slots are stored with release and loaded with acquire (plain moves on x86): a reader that sees
 * a writer's slot then also sees that writer's odd `range_seq` when it checks it again, which is
 * what a seqlock needs, without fences (ThreadSanitizer does not model fences). */
static uintptr_t slot_base(const range_array *t, size_t i)
{
    return atomic_load_explicit(&t->slot[i].base, memory_order_acquire);
}
static uintptr_t slot_end(const range_array *t, size_t i)
{
    return atomic_load_explicit(&t->slot[i].end, memory_order_acquire);
}

static void slot_set(range_array *t, size_t i, uintptr_t base, uintptr_t end)
{
    atomic_store_explicit(&t->slot[i].base, base, memory_order_release);
    atomic_store_explicit(&t->slot[i].end, end, memory_order_release);
}

/* The acquire half of the increment keeps the slot stores that follow after it. */
static void write_begin(void) { atomic_fetch_add_explicit(&range_seq, 1, memory_order_acq_rel); }

static void write_end(void)
{
    atomic_store_explicit(&range_seq, atomic_load_explicit(&range_seq, RELAXED) + 1, memory_order_release);
}

/* Number of slots whose base is <= a. */
static size_t slots_at_or_below(const range_array *t, size_t n, uintptr_t a)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (slot_base(t, mid) <= a) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* [a, end) covered by consecutive slots without a gap. */
static bool covered(const range_array *t, size_t n, uintptr_t a, uintptr_t end)
{
    size_t i = slots_at_or_below(t, n, a);
    if (i == 0) return false;
    uintptr_t at = a;
    for (i--; i < n; i++) {
        uintptr_t b = slot_base(t, i), e = slot_end(t, i);
        if (b > at || e <= at) return false;
        if (e >= end) return true;
        at = e; /* the next slot must start exactly here */
    }
    return false;
}

/* The last range this thread found pinned, valid while `range_seq` has not moved: a program
 * copies from the same pinned buffers again and again, and this answers without touching the
 * table (whose lines are cold after every driver call). */
static __thread struct {
    unsigned seq;
    uintptr_t lo, hi;
} tl_pinned;

bool gm_host_is_pinned(const void *p, size_t n)
{
    uintptr_t a = (uintptr_t)p, end = a + (n ? n : 1);
    if (!a || end < a || !atomic_load_explicit(&nranges, RELAXED)) return false;
    for (;;) {
        unsigned seq = atomic_load_explicit(&range_seq, memory_order_acquire);
        if (seq & 1) continue; /* a writer is inside: a few hundred ns at most */
        if (seq == tl_pinned.seq && a >= tl_pinned.lo && end <= tl_pinned.hi) return true;
        range_array *t = atomic_load_explicit(&ranges, memory_order_acquire);
        size_t count = atomic_load_explicit(&nranges, memory_order_acquire);
        bool yes = t && covered(t, count < t->cap ? count : t->cap, a, end);
        if (atomic_load_explicit(&range_seq, RELAXED) != seq) continue;
        if (yes) tl_pinned.seq = seq, tl_pinned.lo = a, tl_pinned.hi = end;
        return yes;
    }
}

/* The block whose range contains `a`, or NULL. Under pool_lock. */
static pinned_block *owner_containing_locked(uintptr_t a)
{
    range_array *t = atomic_load_explicit(&ranges, RELAXED);
    size_t n = atomic_load_explicit(&nranges, RELAXED);
    size_t i = t ? slots_at_or_below(t, n, a) : 0;
    if (i == 0 || slot_end(t, i - 1) <= a) return NULL;
    return range_owner[i - 1];
}

/* Room for one more slot; allocation happens before any change, so a failure changes nothing. */
static bool ranges_reserve_locked(void)
{
    range_array *t = atomic_load_explicit(&ranges, RELAXED);
    size_t n = atomic_load_explicit(&nranges, RELAXED);
    if (t && n < t->cap) return true;
    size_t cap = t ? t->cap * 2 : 64;
    pinned_block **owners = realloc(range_owner, cap * sizeof *owners);
    if (!owners) return false;
    range_owner = owners;
    range_array *grown = malloc(sizeof *grown + cap * sizeof grown->slot[0]);
    if (!grown) return false;
    grown->cap = cap;
    grown->retired = t;
    for (size_t i = 0; i < n; i++) slot_set(grown, i, slot_base(t, i), slot_end(t, i));
    /* Same contents: a reader may switch to it at any time. */
    atomic_store_explicit(&ranges, grown, memory_order_release);
    return true;
}

static void ranges_insert_locked(pinned_block *b) /* after ranges_reserve_locked */
{
    range_array *t = atomic_load_explicit(&ranges, RELAXED);
    size_t n = atomic_load_explicit(&nranges, RELAXED);
    size_t pos = slots_at_or_below(t, n, b->addr);
    write_begin();
    for (size_t i = n; i > pos; i--) {
        slot_set(t, i, slot_base(t, i - 1), slot_end(t, i - 1));
        range_owner[i] = range_owner[i - 1];
    }
    slot_set(t, pos, b->addr, b->addr + b->size);
    range_owner[pos] = b;
    atomic_store_explicit(&nranges, n + 1, RELAXED);
    write_end();
}

/* Removes every slot for which `gone` says yes, in one pass; returns them through `out`. */
static size_t ranges_remove_if_locked(bool (*gone)(const pinned_block *, const void *), const void *arg,
                                      pinned_block ***out)
{
    range_array *t = atomic_load_explicit(&ranges, RELAXED);
    size_t n = atomic_load_explicit(&nranges, RELAXED), kept = 0, removed = 0;
    pinned_block **list = NULL;
    for (size_t i = 0; i < n; i++) removed += gone(range_owner[i], arg);
    if (!removed || !(list = malloc(removed * sizeof *list))) {
        *out = NULL;
        return 0;
    }
    removed = 0;
    write_begin();
    for (size_t i = 0; i < n; i++) {
        if (gone(range_owner[i], arg)) {
            list[removed++] = range_owner[i];
            continue;
        }
        slot_set(t, kept, slot_base(t, i), slot_end(t, i));
        range_owner[kept++] = range_owner[i];
    }
    atomic_store_explicit(&nranges, kept, RELAXED);
    write_end();
    *out = list;
    return removed;
}

static void ranges_remove_locked(pinned_block *b)
{
    range_array *t = atomic_load_explicit(&ranges, RELAXED);
    size_t n = atomic_load_explicit(&nranges, RELAXED);
    size_t i = t ? slots_at_or_below(t, n, b->addr) : 0;
    if (i == 0 || range_owner[i - 1] != b) return;
    write_begin();
    for (size_t k = i - 1; k + 1 < n; k++) {
        slot_set(t, k, slot_base(t, k + 1), slot_end(t, k + 1));
        range_owner[k] = range_owner[k + 1];
    }
    atomic_store_explicit(&nranges, n - 1, RELAXED);
    write_end();
}

/* ------------------------------------------------------------------ counters */

static void note_held(int64_t delta)
{
    st.bytes_held += (uint64_t)delta;
    if (st.bytes_held > st.bytes_held_peak) st.bytes_held_peak = st.bytes_held;
}

/* ------------------------------------------------------------------ live table, bins, LRU */

static void live_insert_locked(pinned_block *b)
{
    gm_live_insert(&live, &b->rec);
    st.allocations++;
    st.blocks_live++;
    st.bytes_live += b->rec.requested;
    if (st.bytes_live > st.bytes_live_peak) st.bytes_live_peak = st.bytes_live;
}

static pinned_block *live_find_locked(uintptr_t p)
{
    gm_record *rec = gm_live_find(&live, p);
    return rec ? block_of(rec) : NULL;
}

/* `freed`: by the program (counted as a free), not forgotten with its context. */
static void live_remove_locked(pinned_block *b, bool freed)
{
    gm_live_remove(&live, &b->rec);
    st.frees += freed;
    st.blocks_live--;
    st.bytes_live -= b->rec.requested;
}

static pinned_bin *bin_get_locked(uintptr_t ctx, size_t size, unsigned flags, bool create)
{
    bin_key key = {ctx, size, flags};
    pinned_bin *bin = NULL;
    HASH_FIND(hh, bins, &key, sizeof key, bin);
    if (bin || !create) return bin;
    if (!(bin = calloc(1, sizeof *bin))) return NULL;
    bin->key = key;
    HASH_ADD(hh, bins, key, sizeof key, bin);
    return bin;
}

/* A freed pooled block joins the cache (the bin must exist: it was made at allocation). */
static void cache_insert_locked(pinned_block *b)
{
    b->state = PB_CACHED;
    b->bprev = NULL;
    b->bnext = b->bin->head;
    if (b->bnext) b->bnext->bprev = b;
    b->bin->head = b;
    b->lprev = NULL;
    b->lnext = lru_head;
    if (lru_head) lru_head->lprev = b;
    else lru_tail = b;
    lru_head = b;
    st.bytes_cached += b->size;
    st.blocks_cached++;
}

static void cache_remove_locked(pinned_block *b)
{
    if (b->bprev) b->bprev->bnext = b->bnext;
    else b->bin->head = b->bnext;
    if (b->bnext) b->bnext->bprev = b->bprev;
    if (b->lprev) b->lprev->lnext = b->lnext;
    else lru_head = b->lnext;
    if (b->lnext) b->lnext->lprev = b->lprev;
    else lru_tail = b->lprev;
    b->bprev = b->bnext = b->lprev = b->lnext = NULL;
    st.bytes_cached -= b->size;
    st.blocks_cached--;
}

/* Oldest cached blocks out of every table until at most `keep` bytes stay cached; returned as a
 * list (through lnext) for release_blocks, which calls the driver after the lock is dropped. */
static pinned_block *trim_cache_locked(uint64_t keep)
{
    pinned_block *out = NULL;
    while (st.bytes_cached > keep && lru_tail) {
        pinned_block *b = lru_tail;
        cache_remove_locked(b);
        ranges_remove_locked(b);
        note_held(-(int64_t)b->size);
        st.driver_frees++;
        st.released++;
        b->lnext = out;
        out = b;
    }
    return out;
}

static size_t release_blocks(pinned_block *list)
{
    size_t bytes = 0;
    for (pinned_block *b = list, *next; b; b = next) {
        next = b->lnext;
        if (b->fence) gm_mgr.backend->fence_destroy(b->fence);
        int rc = gm_mgr.backend->host_free(b->ctx, (void *)b->addr);
        if (rc != GPUMEM_OK)
            gm_log(GM_WARN, "pinned pool: cuMemFreeHost(%p) of a cached block failed with %d", (void *)b->addr, rc);
        bytes += b->size;
        free(b);
    }
    return bytes;
}

/* One block of a destroyed context: forgotten without a driver call (the driver freed it). */
static void forget_block_locked(pinned_block *b, bool exiting)
{
    if (b->kind == PB_REGISTERED) {
        st.registered_ranges--;
        st.registered_bytes -= b->size;
    } else {
        note_held(-(int64_t)b->size);
    }
    if (b->state == PB_LIVE) { /* the program still holds it: a leak, kept for the exit report */
        gm_orphans_keep(b->device, GM_MEMORY_PINNED_HOST, &b->rec);
        live_remove_locked(b, false);
        st.orphaned++;
    } else if (b->state == PB_CACHED) {
        cache_remove_locked(b);
    } else if (b->state == PB_FREEING) {
        b->dropped = true; /* the freeing thread owns it now */
        return;
    }
    if (b->fence && !exiting) gm_mgr.backend->fence_destroy(b->fence);
    free(b);
}

/* [base, end) is about to be recorded: the driver just handed it out or accepted it, so any
 * range of ours overlapping it is stale (its context went away without our seeing it). The table
 * must stay disjoint; stale blocks are forgotten like those of a destroyed context. */
static bool overlaps(const pinned_block *b, const void *arg)
{
    const uintptr_t *span = arg;
    return b->addr < span[1] && span[0] < b->addr + b->size;
}

static void evict_overlaps_locked(uintptr_t base, uintptr_t end)
{
    range_array *t = atomic_load_explicit(&ranges, RELAXED);
    size_t n = atomic_load_explicit(&nranges, RELAXED);
    size_t i = t ? slots_at_or_below(t, n, end - 1) : 0;
    if (i == 0 || slot_end(t, i - 1) <= base) return; /* disjoint slots: only this one can overlap */
    uintptr_t span[2] = {base, end};
    pinned_block **stale = NULL;
    size_t nstale = ranges_remove_if_locked(overlaps, span, &stale);
    for (size_t k = 0; k < nstale; k++) forget_block_locked(stale[k], atomic_load(&gm_mgr.exiting));
    free(stale);
}

/* ------------------------------------------------------------------ init, fork */

static void forget_everything(void);

static void lock_pool(void) { pthread_mutex_lock(&pool_lock); }
static void unlock_pool(void) { pthread_mutex_unlock(&pool_lock); }

/* A fork child has no CUDA context: the parent's pinned memory is not its own (the driver marks
 * it do-not-fork). Forget it without a driver call, with a fresh lock. */
static void child_after_fork(void)
{
    pthread_mutex_init(&pool_lock, NULL);
    forget_everything();
}

static void init_once_fn(void)
{
    gm_live_init(&live);
    static const gm_fork_handlers handlers = {lock_pool, unlock_pool, child_after_fork};
    gm_fork_register(GM_FORK_PINNED, &handlers);
}

static void pinned_init(void) { pthread_once(&init_once, init_once_fn); }

static void forget_everything(void)
{
    gm_live_init(&live); /* before the blocks go: the records are inside them */
    size_t n = atomic_load_explicit(&nranges, RELAXED);
    for (size_t i = 0; i < n; i++) free(range_owner[i]); /* live, freeing and cached blocks, ranges */
    write_begin();
    atomic_store_explicit(&nranges, 0, RELAXED);
    write_end();
    pinned_bin *bin, *tmp;
    HASH_ITER(hh, bins, bin, tmp) {
        HASH_DELETE(hh, bins, bin);
        free(bin);
    }
    lru_head = lru_tail = NULL;
    memset(&st, 0, sizeof st);
}

/* ------------------------------------------------------------------ allocation */

static void fill_record(pinned_block *b, size_t requested, const gm_callsite *site, uint32_t stack_id)
{
    memset(&b->rec, 0, sizeof b->rec);
    gm_record_fill(&b->rec, b->addr, requested, b->size, b->kind == PB_POOLED ? GM_KIND_POOL : GM_KIND_DIRECT,
                   0, site, stack_id, gm_tag_current()); /* the tag groups the report; tag usage counts device memory */
}

/* A cached block of `bin` for a new owner, preferring one whose fence completed (fast mode). If
 * every fence is pending, the first such block comes with its fence in `*wait`: waiting for the
 * work enqueued before its free is cheaper than the driver's allocation, which costs far more and
 * synchronizes too (PyTorch's host allocator allocates instead; it records events only for
 * streams that used the block, where a fence here covers every stream). */
static pinned_block *take_cached_locked(pinned_bin *bin, bool can_sync, gm_fence **wait)
{
    pinned_block *pending = NULL;
    int scanned = 0;
    *wait = NULL;
    for (pinned_block *b = bin->head; b && scanned < REUSE_SCAN; b = b->bnext, scanned++) {
        if (!can_sync && (b->unsynced || b->fence)) continue; /* no event call while capturing */
        if (b->fence && gm_mgr.backend->fence_query(b->fence) == 1) {
            if (!pending) pending = b;
            continue;
        }
        if (b->fence) gm_mgr.backend->fence_destroy(b->fence); /* complete (or failed: nothing to wait for) */
        b->fence = NULL;
        cache_remove_locked(b);
        return b;
    }
    if (pending) {
        *wait = pending->fence;
        pending->fence = NULL;
        cache_remove_locked(pending);
    }
    return pending;
}

/* The driver's allocation, with the cache handed back and one retry on out-of-memory. */
static int driver_alloc(uintptr_t ctx, size_t size, unsigned flags, void **p)
{
    int rc = gm_mgr.backend->host_alloc(ctx, size, flags, p);
    if (rc == GPUMEM_ERROR_OUT_OF_MEMORY && gm_pinned_release_cached() > 0) {
        pthread_mutex_lock(&pool_lock);
        st.oom_retries++;
        pthread_mutex_unlock(&pool_lock);
        rc = gm_mgr.backend->host_alloc(ctx, size, flags, p);
    }
    return rc;
}

/* A new block from the driver: pooled (a class size, PORTABLE added) or passed through. */
static int alloc_from_driver(uintptr_t ctx, int device, size_t requested, size_t size, unsigned flags,
                             pb_kind kind, const gm_callsite *site, uint32_t stack_id, void **out)
{
    void *p = NULL;
    int rc = driver_alloc(ctx, size, flags, &p);
    if (rc != GPUMEM_OK) return rc;
    pinned_block *b = calloc(1, sizeof *b);
    pthread_mutex_lock(&pool_lock);
    pinned_bin *bin = kind == PB_POOLED && b ? bin_get_locked(ctx, size, flags, true) : NULL;
    if (!b || (kind == PB_POOLED && !bin) || !ranges_reserve_locked()) {
        pthread_mutex_unlock(&pool_lock);
        gm_mgr.backend->host_free(ctx, p);
        free(b);
        return GPUMEM_ERROR_OUT_OF_MEMORY;
    }
    *b = (pinned_block){.addr = (uintptr_t)p, .size = size, .ctx = ctx, .device = device,
                        .flags = flags, .kind = (uint8_t)kind, .state = PB_LIVE, .bin = bin};
    fill_record(b, requested, site, stack_id);
    evict_overlaps_locked(b->addr, b->addr + size);
    ranges_insert_locked(b);
    live_insert_locked(b);
    st.driver_allocs++;
    if (kind == PB_POOLED) st.pool_misses++;
    note_held((int64_t)size);
    pthread_mutex_unlock(&pool_lock);
    *out = p;
    return GPUMEM_OK;
}

int gm_pinned_alloc(uintptr_t ctx, int device, size_t size, unsigned flags, const gm_callsite *site,
                    bool can_sync, void **out)
{
    pinned_init();
    uint32_t stack_id = gm_stack_capture(site); /* before the lock: it walks memory and hashes */
    if (!gm_mgr.cfg->pinned_pool)
        return alloc_from_driver(ctx, device, size, size, flags, PB_DIRECT, site, stack_id, out);
    size_t cls = gm_pinned_class_size(size);
    if (!cls) return GPUMEM_ERROR_OUT_OF_MEMORY;
    unsigned pool_flags = flags | GM_HOSTALLOC_PORTABLE;
    pthread_mutex_lock(&pool_lock);
    pinned_bin *bin = bin_get_locked(ctx, cls, pool_flags, false);
    gm_fence *wait = NULL;
    pinned_block *b = bin ? take_cached_locked(bin, can_sync, &wait) : NULL;
    bool sync_first = b && b->unsynced;
    uintptr_t addr = b ? b->addr : 0;
    if (b) {
        b->state = PB_LIVE;
        b->unsynced = false;
        fill_record(b, size, site, stack_id);
        live_insert_locked(b);
        st.pool_hits++;
    }
    pthread_mutex_unlock(&pool_lock);
    if (!b) return alloc_from_driver(ctx, device, size, cls, pool_flags, PB_POOLED, site, stack_id, out);
    /* Outside the lock, with copies: the block is the program's now. It was freed in this context. */
    if (wait) {
        gm_mgr.backend->fence_wait(wait);
        gm_mgr.backend->fence_destroy(wait);
    }
    if (sync_first) gm_mgr.backend->synchronize(ctx); /* freed during a capture */
    *out = (void *)addr;
    return GPUMEM_OK;
}

/* ------------------------------------------------------------------ free */

/* cudaFreeHost's barrier: the work of the block's context and of the caller's. */
static void synchronize_for_free(uintptr_t owner)
{
    uintptr_t cur = 0;
    int device = 0;
    gm_mgr.backend->synchronize(owner);
    if (gm_mgr.backend->current(&cur, &device) == GPUMEM_OK && cur != owner)
        gm_mgr.backend->synchronize_current();
}

static void report_bad_free(uintptr_t p, const pinned_block *o, uintptr_t caller)
{
    char what[160];
    if (p == o->addr)
        snprintf(what, sizeof what, "the pinned block was already freed: a double free");
    else
        snprintf(what, sizeof what, "it points %zu bytes into the %s pinned block at %p of %zu bytes",
                 (size_t)(p - o->addr), o->state == PB_CACHED ? "freed" : "live", (void *)o->addr, o->size);
    gm_stats_invalid_free("cuMemFreeHost", p, "pinned ", what, caller);
}

/* A pointer that is no allocation of ours: inside a pool block (refused) or not ours at all. */
static gm_answer free_unknown_locked(uintptr_t p, uintptr_t caller)
{
    pinned_block *o = owner_containing_locked(p);
    if (!o || o->kind != PB_POOLED) {
        pthread_mutex_unlock(&pool_lock);
        return gm_not_ours(); /* pass-through and registered memory: the driver's answer */
    }
    pinned_block copy = *o;
    st.invalid_frees++;
    pthread_mutex_unlock(&pool_lock);
    report_bad_free(p, &copy, caller);
    return gm_ours(GPUMEM_ERROR_INVALID_VALUE);
}

static int free_direct_locked(pinned_block *b)
{
    ranges_remove_locked(b);
    note_held(-(int64_t)b->size);
    st.driver_frees++;
    pthread_mutex_unlock(&pool_lock);
    int rc = atomic_load(&gm_mgr.exiting) ? GPUMEM_OK : gm_mgr.backend->host_free(b->ctx, (void *)b->addr);
    free(b);
    return rc;
}

gm_answer gm_pinned_free(void *ptr, bool can_sync, uintptr_t caller)
{
    uintptr_t p = (uintptr_t)ptr;
    if (!p || !atomic_load_explicit(&nranges, RELAXED)) return gm_not_ours();
    pinned_init();
    pthread_mutex_lock(&pool_lock);
    pinned_block *b = live_find_locked(p);
    if (!b) return free_unknown_locked(p, caller);
    live_remove_locked(b, true);
    if (b->kind == PB_DIRECT) return gm_ours(free_direct_locked(b));
    b->state = PB_FREEING; /* still in the range table: a second free meanwhile is refused */
    pthread_mutex_unlock(&pool_lock);

    bool exiting = atomic_load(&gm_mgr.exiting), unsynced = false;
    if (!exiting && !can_sync) unsynced = true;
    else if (!exiting && (gm_mgr.cfg->free_sync || gm_mgr.backend->fence_record(b->ctx, &b->fence) != GPUMEM_OK))
        synchronize_for_free(b->ctx);

    pthread_mutex_lock(&pool_lock);
    if (b->dropped) { /* its context went away meanwhile: the driver freed the memory */
        pthread_mutex_unlock(&pool_lock);
        if (b->fence && !exiting) gm_mgr.backend->fence_destroy(b->fence);
        free(b);
        return gm_ours(GPUMEM_OK);
    }
    b->unsynced = unsynced;
    cache_insert_locked(b);
    uint64_t keep = gm_mgr.cfg->pinned_max_cached;
    pinned_block *release = keep != GM_UNLIMITED && !exiting ? trim_cache_locked(keep) : NULL;
    pthread_mutex_unlock(&pool_lock);
    release_blocks(release);
    return gm_ours(GPUMEM_OK);
}

size_t gm_pinned_release_cached(void)
{
    if (!atomic_load_explicit(&nranges, RELAXED) || atomic_load(&gm_mgr.exiting)) return 0;
    pinned_init();
    pthread_mutex_lock(&pool_lock);
    pinned_block *release = trim_cache_locked(0);
    pthread_mutex_unlock(&pool_lock);
    return release_blocks(release);
}

/* ------------------------------------------------------------------ registered ranges */

void gm_pinned_registered(uintptr_t ctx, int device, const void *p, size_t n)
{
    if (!p || !n) return;
    pinned_init();
    pinned_block *b = calloc(1, sizeof *b);
    if (!b) return;
    *b = (pinned_block){.addr = (uintptr_t)p, .size = n, .ctx = ctx, .device = device,
                        .kind = PB_REGISTERED, .state = PB_RANGE};
    pthread_mutex_lock(&pool_lock);
    evict_overlaps_locked(b->addr, b->addr + n);
    if (!ranges_reserve_locked()) {
        pthread_mutex_unlock(&pool_lock);
        free(b);
        return;
    }
    ranges_insert_locked(b);
    st.registered_ranges++;
    st.registered_bytes += n;
    pthread_mutex_unlock(&pool_lock);
}

void gm_pinned_unregistered(const void *p)
{
    if (!p || !atomic_load_explicit(&nranges, RELAXED)) return;
    pthread_mutex_lock(&pool_lock);
    pinned_block *b = owner_containing_locked((uintptr_t)p);
    if (b && b->kind == PB_REGISTERED && b->addr == (uintptr_t)p) {
        ranges_remove_locked(b);
        st.registered_ranges--;
        st.registered_bytes -= b->size;
        free(b);
    }
    pthread_mutex_unlock(&pool_lock);
}

/* ------------------------------------------------------------------ context teardown */

static bool owned_by(const pinned_block *b, const void *arg)
{
    return b->ctx == *(const uintptr_t *)arg;
}

void gm_pinned_drop_ctx(uintptr_t ctx)
{
    if (!atomic_load_explicit(&nranges, RELAXED)) return;
    pinned_init();
    bool exiting = atomic_load(&gm_mgr.exiting);
    pthread_mutex_lock(&pool_lock);
    pinned_block **gone = NULL;
    size_t n = ranges_remove_if_locked(owned_by, &ctx, &gone);
    for (size_t i = 0; i < n; i++) forget_block_locked(gone[i], exiting);
    free(gone);
    pinned_bin *bin, *tmp;
    HASH_ITER(hh, bins, bin, tmp) {
        if (bin->key.ctx != ctx) continue;
        HASH_DELETE(hh, bins, bin);
        free(bin);
    }
    pthread_mutex_unlock(&pool_lock);
    if (n) gm_log(GM_INFO, "pinned pool: forgot %zu block(s) and range(s) of destroyed context %#lx", n,
                  (unsigned long)ctx);
}

/* ------------------------------------------------------------------ queries and the report */

void gm_pinned_stats_get(gm_pinned_stats *out)
{
    pthread_mutex_lock(&pool_lock);
    *out = st;
    pthread_mutex_unlock(&pool_lock);
}

/* At exit another thread may be inside the pool: wait a little, never forever. */
static bool lock_for_report(void)
{
    if (gm_lock_for_report(&pool_lock)) return true;
    gm_log(GM_WARN, "report: the pinned pool is busy in another thread; its leaks are not listed");
    return false;
}

bool gm_pinned_for_each_live(void (*fn)(void *cx, int device, const gm_record *rec), void *cx)
{
    if (!lock_for_report()) return false;
    GM_FOR_EACH_LIVE(&live, rec) fn(cx, block_of(rec)->device, rec);
    pthread_mutex_unlock(&pool_lock);
    return true;
}

bool gm_pinned_stats_for_report(gm_pinned_stats *out)
{
    if (!lock_for_report()) return false;
    *out = st;
    pthread_mutex_unlock(&pool_lock);
    return true;
}
