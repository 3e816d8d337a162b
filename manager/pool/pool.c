/* The caching pool (gm_pool.h): segments carved into 512-B aligned blocks kept in two-level
 * segregated bins (TLSF), split on allocation and coalesced with free neighbours on free. Small
 * requests (<= 1 MiB) come from small segments so they do not break up the large ones, as in
 * PyTorch's allocator. Every *_locked function runs under the owner's lock; the pool itself never
 * blocks, never calls a device and reads no global. */
#include <stdlib.h>
#include <string.h>

#include "gm_pool.h"

/* ------------------------------------------------------------------ size arithmetic */

size_t gm_pool_round_size(size_t size)
{
    const size_t max = (size_t)1 << 46; /* 64 TiB: beyond any device, keeps the bins finite */
    if (size == 0 || size > max) return 0;
    return (size + GM_ALIGN - 1) & ~(size_t)(GM_ALIGN - 1);
}

static size_t round_up(size_t v, size_t to) { return (v + to - 1) / to * to; }

static int floor_log2(uint64_t x) { return 63 - __builtin_clzll(x); }

/* Bin of a block of `size` bytes (size >= 512, so the first level is >= 9). */
static void bin_of(size_t size, int *fl, int *sl)
{
    int f = floor_log2(size);
    *fl = f;
    *sl = (int)((size >> (f - 4)) & (GM_SL_COUNT - 1));
}

/* ------------------------------------------------------------------ bins */

static gm_bins *bins_for(gm_pool *pool, const gm_segment *seg)
{
    return seg->small ? &pool->small_bins : &pool->large_bins;
}

static void bins_insert(gm_bins *bins, gm_block *b)
{
    int fl, sl;
    bin_of(b->size, &fl, &sl);
    b->bin_fl = (uint8_t)fl;
    b->bin_sl = (uint8_t)sl;
    b->fprev = NULL;
    b->fnext = bins->heads[fl][sl];
    if (b->fnext) b->fnext->fprev = b;
    bins->heads[fl][sl] = b;
    bins->fl_bitmap |= 1ull << fl;
    bins->sl_bitmap[fl] |= (uint16_t)(1u << sl);
}

static void bins_remove(gm_bins *bins, gm_block *b)
{
    int fl = b->bin_fl, sl = b->bin_sl;
    if (b->fprev) b->fprev->fnext = b->fnext;
    else bins->heads[fl][sl] = b->fnext;
    if (b->fnext) b->fnext->fprev = b->fprev;
    b->fprev = b->fnext = NULL;
    if (!bins->heads[fl][sl]) {
        bins->sl_bitmap[fl] &= (uint16_t)~(1u << sl);
        if (!bins->sl_bitmap[fl]) bins->fl_bitmap &= ~(1ull << fl);
    }
}

/* The first non-empty bin at or above (fl, sl): every block there is at least that bin's size. */
static gm_block *bins_first_from(const gm_bins *bins, int fl, int sl)
{
    uint32_t sl_map = sl < GM_SL_COUNT ? (uint32_t)bins->sl_bitmap[fl] & (~0u << sl) : 0;
    if (!sl_map) {
        uint64_t fl_map = fl + 1 < GM_FL_COUNT ? bins->fl_bitmap & (~0ull << (fl + 1)) : 0;
        if (!fl_map) return NULL;
        fl = __builtin_ctzll(fl_map);
        sl_map = bins->sl_bitmap[fl];
    }
    return bins->heads[fl][__builtin_ctz(sl_map)];
}

/* Best fit to within one bin (1/16 of the size): the smallest fitting block of the request's own
 * bin, else the head of the next non-empty bin up. The own-bin scan is bounded so a long list of
 * equal blocks cannot make allocation linear. */
static gm_block *bins_find(const gm_bins *bins, size_t size)
{
    int fl, sl;
    bin_of(size, &fl, &sl);
    gm_block *best = NULL;
    int scanned = 0;
    for (gm_block *b = bins->heads[fl][sl]; b && scanned < 32; b = b->fnext, scanned++) {
        if (b->size == size) return b;
        if (b->size > size && (!best || b->size < best->size)) best = b;
    }
    if (best) return best;
    return bins_first_from(bins, fl, sl + 1);
}

/* ------------------------------------------------------------------ block headers */

static gm_block *block_new(gm_pool *pool)
{
    gm_block *b = pool->spare_blocks;
    if (b) pool->spare_blocks = b->fnext;
    else b = gm_cache_line_alloc(sizeof *b); /* blocks of threads at work never share a line */
    if (b) { /* the owner fills the record on allocation; clear what the pool reads, and the
              * record's key so a recycled header never looks like a live allocation */
        b->prev = b->next = b->fprev = b->fnext = NULL;
        b->seg = NULL;
        b->state = GM_BLOCK_FREE;
        b->fence_epoch = 0;
        b->rec.ptr = 0;
        b->rec.block = NULL;
        b->tc = NULL; /* the engine reads it of any LIVE block; malloc's memory holds anything */
    }
    return b;
}

static void block_recycle(gm_pool *pool, gm_block *b)
{
    b->fnext = pool->spare_blocks;
    pool->spare_blocks = b;
}

/* ------------------------------------------------------------------ segments */

static size_t segment_index(const gm_pool *pool, uintptr_t addr)
{
    size_t lo = 0, hi = pool->segments;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (pool->by_base[mid]->base <= addr) lo = mid + 1;
        else hi = mid;
    }
    return lo; /* first segment with base > addr */
}

gm_segment *gm_pool_segment_containing(const gm_pool *pool, uintptr_t addr)
{
    size_t i = segment_index(pool, addr);
    if (i == 0) return NULL;
    gm_segment *s = pool->by_base[i - 1];
    return addr < s->base + s->size ? s : NULL;
}

static bool segments_insert(gm_pool *pool, gm_segment *seg)
{
    if (pool->segments == pool->by_base_cap) {
        size_t cap = pool->by_base_cap ? pool->by_base_cap * 2 : 16;
        gm_segment **grown = realloc(pool->by_base, cap * sizeof *grown);
        if (!grown) return false;
        pool->by_base = grown;
        pool->by_base_cap = cap;
    }
    size_t i = segment_index(pool, seg->base);
    memmove(&pool->by_base[i + 1], &pool->by_base[i], (pool->segments - i) * sizeof seg);
    pool->by_base[i] = seg;
    __atomic_store_n(&pool->segments, pool->segments + 1, __ATOMIC_RELAXED);
    return true;
}

static void segments_remove(gm_pool *pool, gm_segment *seg)
{
    size_t i = segment_index(pool, seg->base) - 1;
    memmove(&pool->by_base[i], &pool->by_base[i + 1], (pool->segments - i - 1) * sizeof seg);
    __atomic_store_n(&pool->segments, pool->segments - 1, __ATOMIC_RELAXED);
}

/* Adds a fresh segment of `size` bytes at `base` as one free block. */
static bool add_segment_locked(gm_pool *pool, uintptr_t base, size_t size, bool small)
{
    gm_segment *seg = calloc(1, sizeof *seg);
    gm_block *b = block_new(pool);
    if (seg) {
        seg->base = base; /* before the insert: the sorted array is ordered by base */
        seg->size = size;
        seg->small = small;
        seg->first = b;
        seg->last = b;
    }
    if (!seg || !b || !segments_insert(pool, seg)) {
        free(seg);
        if (b) block_recycle(pool, b);
        return false;
    }
    b->addr = base;
    b->size = size;
    b->seg = seg;
    b->state = GM_BLOCK_FREE;
    bins_insert(bins_for(pool, seg), b);
    pool->bytes_cached_free += size;
    return true;
}

/* ------------------------------------------------------------------ growth */

/* Size of the next segment for a request of `rounded` bytes: small requests get a small segment;
 * large ones the growth-factor sequence (each new shared segment is the previous one times
 * GPUMEM_GROWTH_FACTOR, between GPUMEM_SEGMENT_MIN and _MAX); requests of GPUMEM_DEDICATED_MIN or
 * more, or larger than the sequence's segment, get a segment sized to themselves. */
size_t gm_pool_next_segment_size(const gm_pool *pool, size_t rounded)
{
    const gm_pool_sizing *cfg = &pool->sizing;
    if (rounded <= GM_SMALL_MAX) return round_up(cfg->small_segment, GM_SEGMENT_ALIGN);
    size_t own = round_up(rounded, GM_SEGMENT_ALIGN);
    if (rounded >= cfg->dedicated_min) return own;
    /* Read without the owner's lock (growth runs unlocked: a backend call never holds it); a value
     * another thread is advancing only picks the previous step of the sequence. */
    size_t next = __atomic_load_n(&pool->next_large_segment, __ATOMIC_RELAXED);
    if (!next) next = cfg->segment_min;
    next = round_up(next, GM_SEGMENT_ALIGN);
    return own > next ? own : next;
}

static void advance_growth_locked(gm_pool *pool, size_t used)
{
    const gm_pool_sizing *cfg = &pool->sizing;
    double grown = (double)used * cfg->growth_factor;
    size_t next = grown >= (double)cfg->segment_max ? cfg->segment_max : (size_t)grown;
    if (next < cfg->segment_min) next = cfg->segment_min;
    __atomic_store_n(&pool->next_large_segment, next, __ATOMIC_RELAXED);
}

bool gm_pool_add_segment_locked(gm_pool *pool, uintptr_t base, size_t size, size_t rounded)
{
    bool small = rounded <= GM_SMALL_MAX;
    if (!add_segment_locked(pool, base, size, small)) return false;
    if (!small && size < pool->sizing.dedicated_min && size > rounded) advance_growth_locked(pool, size);
    return true;
}

bool gm_pool_add_expandable_locked(gm_pool *pool, uintptr_t base, size_t size, bool small)
{
    if (!add_segment_locked(pool, base, size, small)) return false;
    gm_segment *seg = gm_pool_segment_containing(pool, base);
    seg->expandable = true;
    return true;
}

static gm_block *last_block(const gm_segment *seg) { return seg->last; }

size_t gm_pool_tail_free_locked(const gm_segment *seg)
{
    const gm_block *b = last_block(seg);
    return b && b->state == GM_BLOCK_FREE ? b->size : 0;
}

bool gm_pool_extend_segment_locked(gm_pool *pool, gm_segment *seg, size_t bytes)
{
    if (!seg->expandable || !bytes) return false;
    gm_bins *bins = bins_for(pool, seg);
    gm_block *last = last_block(seg);
    if (last && last->state == GM_BLOCK_FREE) {
        bins_remove(bins, last);
        last->size += bytes;
        bins_insert(bins, last);
    } else {
        gm_block *b = block_new(pool);
        if (!b) return false;
        b->addr = seg->base + seg->size;
        b->size = bytes;
        b->seg = seg;
        b->state = GM_BLOCK_FREE;
        b->prev = last;
        if (last) last->next = b;
        else seg->first = b;
        seg->last = b;
        bins_insert(bins, b);
    }
    seg->size += bytes;
    pool->bytes_cached_free += bytes;
    return true;
}

/* ------------------------------------------------------------------ holes (expandable) */

static size_t free_size(const gm_block *b) { return b && b->state == GM_BLOCK_FREE ? b->size : 0; }

bool gm_pool_hole_for_locked(const gm_segment *seg, size_t rounded, gm_pool_span *out)
{
    if (!seg->holes) return false;
    for (const gm_block *b = seg->last; b; b = b->prev)
        if (b->state == GM_BLOCK_HOLE && free_size(b->prev) + b->size + free_size(b->next) >= rounded) {
            *out = (gm_pool_span){b->addr, b->size, true};
            return true;
        }
    return false;
}

size_t gm_pool_holes_locked(const gm_segment *seg, gm_pool_span *out, size_t max)
{
    size_t n = 0;
    for (const gm_block *b = seg->first; b && seg->holes && n < max; b = b->next)
        if (b->state == GM_BLOCK_HOLE) out[n++] = (gm_pool_span){b->addr, b->size, true};
    return n;
}

static void merge_into_prev_locked(gm_pool *pool, gm_block *prev, gm_block *b);

bool gm_pool_fill_hole_locked(gm_pool *pool, gm_segment *seg, uintptr_t addr)
{
    gm_block *h = gm_pool_block_containing_locked(pool, addr);
    if (!h || h->seg != seg || h->addr != addr || h->state != GM_BLOCK_HOLE) return false;
    gm_bins *bins = bins_for(pool, seg);
    seg->holes -= h->size;
    pool->bytes_cached_free += h->size;
    h->state = GM_BLOCK_FREE;
    if (free_size(h->next)) {
        bins_remove(bins, h->next);
        merge_into_prev_locked(pool, h, h->next);
    }
    if (free_size(h->prev)) {
        gm_block *prev = h->prev;
        bins_remove(bins, prev);
        merge_into_prev_locked(pool, prev, h);
        h = prev;
    }
    bins_insert(bins, h);
    return true;
}

/* ------------------------------------------------------------------ allocation */

/* Cuts `b` after its first `at` bytes: the rest becomes a block of its own right after it, in
 * `state` and in no bin yet. NULL (and `b` unchanged) when no block header can be had. */
static gm_block *cut_tail_locked(gm_pool *pool, gm_block *b, size_t at, uint8_t state)
{
    gm_block *tail = block_new(pool);
    if (!tail) return NULL;
    tail->addr = b->addr + at;
    tail->size = b->size - at;
    tail->seg = b->seg;
    tail->state = state;
    tail->prev = b;
    tail->next = b->next;
    if (b->next) b->next->prev = tail;
    else b->seg->last = tail;
    b->next = tail;
    b->size = at;
    return tail;
}

static void split_block_locked(gm_pool *pool, gm_block *b, size_t rounded)
{
    if (b->size - rounded < GM_ALIGN) return;
    gm_block *tail = cut_tail_locked(pool, b, rounded, GM_BLOCK_FREE);
    if (tail) bins_insert(bins_for(pool, b->seg), tail); /* else the slack stays inside: correct */
}

int gm_pool_alloc_locked(gm_pool *pool, size_t rounded, gm_block **out)
{
    gm_bins *bins = rounded <= GM_SMALL_MAX ? &pool->small_bins : &pool->large_bins;
    gm_block *b = bins_find(bins, rounded);
    if (!b) return GPUMEM_ERROR_OUT_OF_MEMORY;
    bins_remove(bins, b);
    split_block_locked(pool, b, rounded);
    b->state = GM_BLOCK_LIVE;
    b->seg->used += b->size;
    pool->bytes_cached_free -= b->size;
    *out = b;
    return GPUMEM_OK;
}

/* ------------------------------------------------------------------ free and coalescing */

static void merge_into_prev_locked(gm_pool *pool, gm_block *prev, gm_block *b)
{
    prev->size += b->size;
    prev->next = b->next;
    if (b->next) b->next->prev = prev;
    else prev->seg->last = prev;
    block_recycle(pool, b);
}

/* Returns a LIVE or PENDING block to the bins, merged with free neighbours. */
void gm_pool_free_block_locked(gm_pool *pool, gm_block *b)
{
    gm_bins *bins = bins_for(pool, b->seg);
    if (b->state == GM_BLOCK_LIVE) {
        b->seg->used -= b->size;
        pool->bytes_cached_free += b->size;
    }
    b->state = GM_BLOCK_FREE;
    gm_block *next = b->next;
    if (next && next->state == GM_BLOCK_FREE) {
        bins_remove(bins, next);
        merge_into_prev_locked(pool, b, next);
    }
    gm_block *prev = b->prev;
    if (prev && prev->state == GM_BLOCK_FREE) {
        bins_remove(bins, prev);
        merge_into_prev_locked(pool, prev, b);
        b = prev;
    }
    bins_insert(bins, b);
}

/* Fast mode: the block waits for a fence covering all work enqueued before this free. */
void gm_pool_pend_block_locked(gm_pool *pool, gm_block *b)
{
    b->seg->used -= b->size;
    pool->bytes_cached_free += b->size;
    b->state = GM_BLOCK_PENDING;
    b->fence_epoch = pool->epoch + 1;
    b->fprev = NULL;
    b->fnext = pool->pending_head;
    if (b->fnext) b->fnext->fprev = b;
    pool->pending_head = b;
    pool->pending_bytes += b->size;
    pool->pending_blocks++;
}

/* Moves pending blocks covered by `epoch` to the bins. */
bool gm_pool_retire_upto_locked(gm_pool *pool, uint32_t epoch)
{
    bool any = false;
    gm_block *b = pool->pending_head;
    while (b) {
        gm_block *next = b->fnext;
        if ((int32_t)(b->fence_epoch - epoch) <= 0) {
            if (b->fprev) b->fprev->fnext = b->fnext;
            else pool->pending_head = b->fnext;
            if (b->fnext) b->fnext->fprev = b->fprev;
            pool->pending_bytes -= b->size;
            pool->pending_blocks--;
            gm_pool_free_block_locked(pool, b);
            any = true;
        }
        b = next;
    }
    return any;
}

uint32_t gm_pool_close_epoch_locked(gm_pool *pool) { return ++pool->epoch; }

/* ------------------------------------------------------------------ release */

/* Detaches fully free segments (largest first would need sorting; address order is fine since
 * every one of them goes) until the cached free bytes in them are at most `keep_cached`. */
/* The bytes a trim of expandable `seg` could unmap: the whole chunks of its trailing free block. */
static size_t trimmable_tail(const gm_pool *pool, const gm_segment *seg, gm_block **last_out)
{
    gm_block *last = last_block(seg);
    *last_out = last;
    if (!last || last->state != GM_BLOCK_FREE) return 0;
    size_t chunk = pool->sizing.chunk ? pool->sizing.chunk : GM_SEGMENT_ALIGN;
    uintptr_t from = seg->base + round_up(last->addr - seg->base, chunk);
    uintptr_t end = seg->base + seg->size;
    return from < end ? end - from : 0;
}

static void drop_last_block(gm_pool *pool, gm_segment *seg)
{
    gm_block *last = seg->last;
    if (last->prev) last->prev->next = NULL;
    else seg->first = NULL;
    seg->last = last->prev;
    block_recycle(pool, last);
}

/* Unmaps (from the pool's view) the trimmable tail of expandable `seg` into `*out`; true when
 * the segment went with it (nothing stays mapped). A hole the trim reaches goes too (it is
 * unmapped already): the segment never ends in a hole. */
static bool trim_expandable_locked(gm_pool *pool, gm_segment *seg, gm_pool_span *out)
{
    gm_block *last;
    size_t cut = trimmable_tail(pool, seg, &last);
    uintptr_t end = seg->base + seg->size;
    *out = (gm_pool_span){end - cut, cut, true};
    bins_remove(bins_for(pool, seg), last);
    pool->bytes_cached_free -= cut;
    if (cut == last->size) { /* the whole block goes */
        drop_last_block(pool, seg);
    } else {
        last->size -= cut;
        bins_insert(bins_for(pool, seg), last);
    }
    seg->size -= cut;
    while (seg->last && seg->last->state == GM_BLOCK_HOLE) {
        seg->size -= seg->last->size;
        seg->holes -= seg->last->size;
        drop_last_block(pool, seg);
    }
    if (seg->size) return false;
    segments_remove(pool, seg);
    pool->segments_released++;
    free(seg);
    return true;
}

/* The whole chunks inside interior free block `b` of expandable `seg`: [*from, *to). */
static size_t interior_chunks(const gm_pool *pool, const gm_segment *seg, const gm_block *b,
                              uintptr_t *from, uintptr_t *to)
{
    if (b->state != GM_BLOCK_FREE || !b->next) return 0; /* the last block is the tail's */
    size_t chunk = pool->sizing.chunk ? pool->sizing.chunk : GM_SEGMENT_ALIGN;
    *from = seg->base + round_up(b->addr - seg->base, chunk);
    *to = seg->base + (b->addr + b->size - seg->base) / chunk * chunk;
    return *to > *from ? *to - *from : 0;
}

static uint64_t expandable_idle(const gm_pool *pool, const gm_segment *seg)
{
    gm_block *last;
    uintptr_t from, to;
    uint64_t idle = trimmable_tail(pool, seg, &last);
    for (const gm_block *b = seg->first; b; b = b->next) idle += interior_chunks(pool, seg, b, &from, &to);
    return idle;
}

/* Cuts the whole chunks [from, to) out of free block `b` as a hole (its slivers stay free);
 * false when no block header can be had (nothing changed). */
static bool punch_hole_locked(gm_pool *pool, gm_segment *seg, gm_block *b, uintptr_t from, uintptr_t to)
{
    gm_bins *bins = bins_for(pool, seg);
    bins_remove(bins, b);
    gm_block *right = b->addr + b->size > to ? cut_tail_locked(pool, b, to - b->addr, GM_BLOCK_FREE) : NULL;
    if (b->addr + b->size > to && !right) {
        bins_insert(bins, b);
        return false;
    }
    gm_block *hole = b;
    if (from > b->addr && !(hole = cut_tail_locked(pool, b, from - b->addr, GM_BLOCK_HOLE))) {
        if (right) merge_into_prev_locked(pool, b, right);
        bins_insert(bins, b);
        return false;
    }
    hole->state = GM_BLOCK_HOLE;
    if (hole != b) bins_insert(bins, b);
    if (right) bins_insert(bins, right);
    pool->bytes_cached_free -= to - from;
    seg->holes += to - from;
    return true;
}

/* Releases from expandable `seg`: its tail's whole chunks, then interior ones, highest first. */
static size_t take_expandable_locked(gm_pool *pool, gm_segment *seg, uint64_t *idle, uint64_t keep,
                                     gm_pool_span *out, size_t max)
{
    size_t n = 0;
    gm_block *last;
    while (*idle > keep && n < max && trimmable_tail(pool, seg, &last)) {
        bool gone = trim_expandable_locked(pool, seg, &out[n]);
        *idle -= out[n++].size;
        if (gone) return n;
    }
    uintptr_t from, to;
    for (gm_block *b = seg->last, *prev; b && *idle > keep && n < max; b = prev) {
        prev = b->prev;
        if (!interior_chunks(pool, seg, b, &from, &to) || !punch_hole_locked(pool, seg, b, from, to)) continue;
        out[n++] = (gm_pool_span){from, to - from, true};
        *idle -= to - from;
    }
    return n;
}

size_t gm_pool_take_free_segments_locked(gm_pool *pool, uint64_t keep_cached, gm_pool_span *out,
                                         size_t max)
{
    if (pool->bytes_cached_free <= keep_cached) return 0; /* what is idle is cached: a bound */
    uint64_t idle = 0;
    for (size_t i = 0; i < pool->segments; i++) {
        gm_segment *seg = pool->by_base[i];
        if (seg->expandable) idle += expandable_idle(pool, seg);
        else if (seg->used == 0 && seg->first->state == GM_BLOCK_FREE) idle += seg->size;
    }
    size_t n = 0;
    for (size_t i = pool->segments; i-- > 0 && idle > keep_cached && n < max;) {
        gm_segment *seg = pool->by_base[i];
        if (seg->expandable) {
            n += take_expandable_locked(pool, seg, &idle, keep_cached, out + n, max - n);
            continue;
        }
        gm_block *only = seg->first;
        if (seg->used != 0 || only->state != GM_BLOCK_FREE || only->next) continue;
        bins_remove(bins_for(pool, seg), only);
        block_recycle(pool, only);
        segments_remove(pool, seg);
        pool->segments_released++;
        pool->bytes_cached_free -= seg->size;
        idle -= seg->size;
        out[n++] = (gm_pool_span){seg->base, seg->size, false};
        free(seg);
    }
    return n;
}

/* ------------------------------------------------------------------ queries */

gm_block *gm_pool_block_containing_locked(const gm_pool *pool, uintptr_t ptr)
{
    gm_segment *seg = gm_pool_segment_containing(pool, ptr);
    if (!seg) return NULL;
    gm_block *b = seg->first;
    while (b && ptr >= b->addr + b->size) b = b->next;
    return b;
}

static size_t largest_in(const gm_bins *bins)
{
    if (!bins->fl_bitmap) return 0;
    int fl = floor_log2(bins->fl_bitmap);
    int sl = floor_log2(bins->sl_bitmap[fl]);
    size_t best = 0;
    for (gm_block *b = bins->heads[fl][sl]; b; b = b->fnext)
        if (b->size > best) best = b->size;
    return best;
}

size_t gm_pool_largest_free_locked(const gm_pool *pool)
{
    size_t a = largest_in(&pool->small_bins), b = largest_in(&pool->large_bins);
    return a > b ? a : b;
}

/* ------------------------------------------------------------------ life cycle */

void gm_pool_init(gm_pool *pool, const gm_pool_sizing *sizing)
{
    memset(pool, 0, sizeof *pool);
    pool->sizing = *sizing;
}

uint64_t gm_pool_reset(gm_pool *pool)
{
    uint64_t held = 0;
    for (size_t i = 0; i < pool->segments; i++) {
        gm_segment *seg = pool->by_base[i];
        for (gm_block *b = seg->first, *next; b; b = next) {
            next = b->next;
            free(b);
        }
        held += seg->size - seg->holes; /* holes are unmapped already */
        free(seg);
    }
    for (gm_block *b = pool->spare_blocks, *next; b; b = next) {
        next = b->fnext;
        free(b);
    }
    free(pool->by_base);
    uint64_t released = pool->segments_released + pool->segments;
    gm_pool_sizing sizing = pool->sizing;
    gm_pool_init(pool, &sizing);
    pool->segments_released = released; /* a lifetime counter: the exit statistics still tell */
    return held;
}

/* ------------------------------------------------------------------ resizing a live block */
/* Named buffers (buffers.c) grow a live block into the free block right after it, and shrink one
 * by handing its tail back, so neither needs a copy or a new pointer. The caller updates the
 * block's record. */

size_t gm_pool_room_after_locked(const gm_block *b)
{
    const gm_block *next = b->next;
    return next && next->state == GM_BLOCK_FREE ? next->size : 0;
}

int gm_pool_extend_block_locked(gm_pool *pool, gm_block *b, size_t new_rounded)
{
    if (b->state != GM_BLOCK_LIVE) return GPUMEM_ERROR_INVALID_VALUE;
    size_t grow = new_rounded > b->size ? new_rounded - b->size : 0;
    if (grow > gm_pool_room_after_locked(b)) return GPUMEM_ERROR_OUT_OF_MEMORY;
    if (grow) {
        gm_block *next = b->next;
        gm_bins *bins = bins_for(pool, b->seg);
        bins_remove(bins, next);
        if (next->size == grow) {
            merge_into_prev_locked(pool, b, next);
        } else { /* the neighbour keeps what is left, further up */
            next->addr += grow;
            next->size -= grow;
            bins_insert(bins, next);
            b->size += grow;
        }
        b->seg->used += grow;
        pool->bytes_cached_free -= grow;
    }
    return GPUMEM_OK;
}

int gm_pool_shrink_block_locked(gm_pool *pool, gm_block *b, size_t new_rounded, bool pend)
{
    if (b->state != GM_BLOCK_LIVE || new_rounded == 0 || new_rounded > b->size ||
        new_rounded % GM_ALIGN)
        return GPUMEM_ERROR_INVALID_VALUE;
    if (new_rounded < b->size) {
        /* The tail starts as part of the live block (counted in seg->used) and leaves it the way a
         * freed block does, so it waits for the barrier or the fence like any other free. */
        gm_block *tail = cut_tail_locked(pool, b, new_rounded, GM_BLOCK_LIVE);
        if (!tail) return GPUMEM_ERROR_OUT_OF_MEMORY;
        if (pend) gm_pool_pend_block_locked(pool, tail);
        else gm_pool_free_block_locked(pool, tail);
    }
    return GPUMEM_OK;
}
