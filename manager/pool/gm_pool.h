/* The pool layer: one caching pool of device address space, as a plain resource. Segments the
 * caller obtained from a device are carved into 512-B aligned blocks kept in two-level segregated
 * bins (TLSF), split on allocation and coalesced with free neighbours on free; fast-mode frees
 * wait in a pending list until the caller says their fence has completed.
 *
 * No globals and no policy: the pool never calls the device, the limit, the statistics or the
 * trace. The engine (engine/alloc.c) decides when to grow, what to reserve, when to release, and
 * hands the pool the memory. Every *_locked function runs under the owner's lock (one pool per
 * engine heap, under heap->lock). Below: base and track (a block embeds its leak record). */
#ifndef GM_POOL_H
#define GM_POOL_H

#include "gm_track.h"

#define GM_ALIGN 512u                      /* every block starts and ends on 512 B */
#define GM_SMALL_MAX ((size_t)1 << 20)     /* requests <= 1 MiB are "small" */
#define GM_SEGMENT_ALIGN ((size_t)2 << 20) /* segments are whole 2 MiB pages */

/* LIVE: handed out. PENDING: freed in fast mode, waiting for a fence. QUARANTINE: freed by the
 * program while another process still has it open through IPC (engine/ipc.c keeps it). */
/* A HOLE is whole chunks inside an expandable segment that a release unmapped: no memory behind
 * it, in no bin, never carved; a grow maps it again (gm_pool_fill_hole_locked). */
typedef enum { GM_BLOCK_FREE = 0, GM_BLOCK_LIVE, GM_BLOCK_PENDING, GM_BLOCK_QUARANTINE, GM_BLOCK_HOLE } gm_block_state;

struct gm_segment;

typedef struct gm_block {
    uintptr_t addr;
    size_t size;
    struct gm_block *prev, *next;   /* address-order neighbours in the segment */
    struct gm_block *fprev, *fnext; /* free bin, pending list or quarantine */
    struct gm_segment *seg;
    uint8_t state;
    uint8_t bin_fl, bin_sl;         /* bin indices while free */
    uint32_t fence_epoch;           /* fast mode: the epoch that must complete before reuse */
    /* The engine's, set at every allocation (what the driver tells apart for separate
     * allocations): CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, BUFFER_ID, and the IPC slot + 1. */
    uint8_t sync_memops;
    uint32_t ipc_slot;
    uint64_t buffer_id;
    /* The engine's: the thread cache (engine/tcache.c) whose live table or free bins hold the
     * block; NULL while the pool, the heap's live table, the pending list or the quarantine do.
     * The pool keeps such a block LIVE (taken out of the bins) whether it is in use or cached. */
    struct gm_tcache *tc;
    gm_record rec;                  /* the leak record, valid while LIVE */
} gm_block;

typedef struct gm_segment {
    uintptr_t base;
    size_t size;
    size_t used;         /* bytes in LIVE or PENDING blocks */
    bool small;
    /* Mapped in chunks at the start of a reserved virtual range (GPUMEM_EXPANDABLE): `size` is
     * the bytes mapped now; the engine extends it at its end (gm_pool_extend_segment_locked) and
     * the release trims free chunks off its end. */
    bool expandable;
    size_t holes;        /* expandable: bytes of its HOLE blocks (unmapped; `size` includes them) */
    gm_block *first;     /* address-ordered block list */
    gm_block *last;      /* its last block (an expandable segment grows and trims there) */
} gm_segment;

/* Two-level segregated bins: first level = power of two, second = 16 linear steps. */
#define GM_FL_COUNT 48
#define GM_SL_COUNT 16

typedef struct gm_bins {
    uint64_t fl_bitmap;
    uint16_t sl_bitmap[GM_FL_COUNT];
    gm_block *heads[GM_FL_COUNT][GM_SL_COUNT];
} gm_bins;

/* How segments are sized (GPUMEM_SMALL_SEGMENT, _SEGMENT_MIN/_MAX, _GROWTH_FACTOR,
 * _DEDICATED_MIN), given at init. */
typedef struct gm_pool_sizing {
    size_t small_segment, segment_min, segment_max, dedicated_min;
    double growth_factor;
    size_t chunk; /* expandable segments: the mapping granularity trims are aligned to (0: none) */
} gm_pool_sizing;

typedef struct gm_pool {
    gm_pool_sizing sizing;
    gm_bins small_bins, large_bins;
    gm_segment **by_base;       /* the segments, sorted by base */
    size_t segments, by_base_cap; /* `segments`: how many; read unlocked (relaxed) */
    size_t next_large_segment;  /* the growth-factor sequence; read unlocked (relaxed) */
    gm_block *pending_head;     /* freed in fast mode, waiting for their epoch's fence */
    uint64_t pending_bytes;
    size_t pending_blocks;      /* how many are on the pending list */
    uint32_t epoch;             /* pending blocks freed now wait for epoch + 1 */
    gm_block *spare_blocks;     /* recycled block headers */
    /* What the statistics read (account/stats.def, POOL rows). */
    uint64_t segments_released;
    uint64_t bytes_cached_free; /* free bytes in segments (bins + pending) */
} gm_pool;

/* A segment handed back by gm_pool_take_free_segments_locked, for the caller to free. */
typedef struct gm_pool_span {
    uintptr_t base;
    size_t size;
    bool expandable; /* the mapped tail of an expandable segment: unmap it chunk by chunk */
} gm_pool_span;

void gm_pool_init(gm_pool *pool, const gm_pool_sizing *sizing);
/* Forgets every segment and block (the context is gone, or this is a fork child); returns the
 * bytes of the segments it held. Lifetime counters stay. */
uint64_t gm_pool_reset(gm_pool *pool);
size_t gm_pool_round_size(size_t size); /* to GM_ALIGN; 0 on 0 or beyond 64 TiB */

/* ---- growth */
/* Size of the next segment for a request of `rounded` bytes: small requests get a small
 * segment; large ones the growth-factor sequence, or a segment of their own from dedicated_min
 * on or when larger than the sequence's. Safe without the lock. */
size_t gm_pool_next_segment_size(const gm_pool *pool, size_t rounded);
/* Adds [base, base+size) as one free block; `rounded` is the request it was obtained for (it
 * advances the growth sequence). False when no host memory is left for the bookkeeping. */
bool gm_pool_add_segment_locked(gm_pool *pool, uintptr_t base, size_t size, size_t rounded);

/* An expandable segment: [base, base+size) mapped now, as one free block. */
bool gm_pool_add_expandable_locked(gm_pool *pool, uintptr_t base, size_t size, bool small);
/* Maps `bytes` more at the end of expandable `seg` into the pool: merged with a trailing free
 * block, else a new free block. False when no host memory is left for a block header. */
bool gm_pool_extend_segment_locked(gm_pool *pool, gm_segment *seg, size_t bytes);
/* Free bytes at the end of `seg` (its last block when free), 0 otherwise. */
size_t gm_pool_tail_free_locked(const gm_segment *seg);
/* A hole of expandable `seg` that, mapped again, joins free neighbours into a block of at least
 * `rounded` bytes (the highest such); false when there is none. */
bool gm_pool_hole_for_locked(const gm_segment *seg, size_t rounded, gm_pool_span *out);
/* The hole starting at `addr` is mapped again: free, merged with its free neighbours. False
 * when no hole starts there. */
bool gm_pool_fill_hole_locked(gm_pool *pool, gm_segment *seg, uintptr_t addr);
/* The holes of expandable `seg`, in address order, at most `max` into `out`; returns how many. */
size_t gm_pool_holes_locked(const gm_segment *seg, gm_pool_span *out, size_t max);

/* ---- allocation and free */
/* Best fit to within one bin; GPUMEM_ERROR_OUT_OF_MEMORY when no free block fits. */
int gm_pool_alloc_locked(gm_pool *pool, size_t rounded, gm_block **out);
/* A LIVE or PENDING block back to the bins, merged with free neighbours. */
void gm_pool_free_block_locked(gm_pool *pool, gm_block *b);
/* A LIVE block to the pending list, for the epoch after the current one. */
void gm_pool_pend_block_locked(gm_pool *pool, gm_block *b);
/* Starts a new epoch: blocks pended until now belong to the returned one. */
uint32_t gm_pool_close_epoch_locked(gm_pool *pool);
/* Moves pending blocks of epochs up to `epoch` to the bins; true when any moved. */
bool gm_pool_retire_upto_locked(gm_pool *pool, uint32_t epoch);

/* ---- release */
/* Detaches fully free segments until the cached free bytes in them are at most `keep_cached`;
 * at most `max`, into `out`. The caller returns them to the device. Expandable segments give
 * the whole chunks of their trailing free block first (span.expandable; the segment is gone
 * when nothing stays mapped), then the whole chunks inside interior free blocks, which become
 * holes (the segment keeps its extent). */
size_t gm_pool_take_free_segments_locked(gm_pool *pool, uint64_t keep_cached, gm_pool_span *out,
                                         size_t max);

/* ---- queries */
gm_segment *gm_pool_segment_containing(const gm_pool *pool, uintptr_t addr);
/* The block (of any state) covering `ptr`, by walking its segment; NULL outside every segment. */
gm_block *gm_pool_block_containing_locked(const gm_pool *pool, uintptr_t ptr);
size_t gm_pool_largest_free_locked(const gm_pool *pool);
/* Safe without the lock (relaxed): a free's barrier asks it before taking the heap lock. */
static inline size_t gm_pool_segment_count(const gm_pool *pool)
{
    return __atomic_load_n(&pool->segments, __ATOMIC_RELAXED);
}

/* ---- resizing a live block in place (named buffers grow and shrink without a copy) */
size_t gm_pool_room_after_locked(const gm_block *b); /* the free block right after `b` */
/* Takes `new_rounded - b->size` bytes from the free block after `b`. */
int gm_pool_extend_block_locked(gm_pool *pool, gm_block *b, size_t new_rounded);
/* Hands the tail beyond `new_rounded` back as a freed block: pended (fast mode) or to the bins. */
int gm_pool_shrink_block_locked(gm_pool *pool, gm_block *b, size_t new_rounded, bool pend);

#endif
