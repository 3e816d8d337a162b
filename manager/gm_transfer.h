/* transfer.c: checked and counted copies. The shim's copy and memset hooks (shim/hooks_copy.c)
 * ask the pool where each device side of a copy lies (gm_xfer_check), refuse what touches freed
 * pool memory or runs past the end of its block, and count what the driver accepted
 * (gm_copy_count) per device, direction and host-memory kind. */
#ifndef GM_TRANSFER_H
#define GM_TRANSFER_H

#include "gm_internal.h"

/* ---------------------------------------------------------------- where a device range lies */

/* What the pool knows of one device range [ptr, ptr+n). */
typedef enum {
    GM_SPAN_NOT_OURS = 0, /* outside every pool segment: the driver's business */
    GM_SPAN_LIVE,         /* inside one live pool block, within its requested size */
    GM_SPAN_PAST_END,     /* starts in a live block but runs past its requested size */
    GM_SPAN_FREED         /* starts in pool memory no live block covers (freed, or pending reuse) */
} gm_span_status;

typedef struct gm_span {
    uintptr_t ptr; /* in */
    size_t n;      /* in: bytes */
    /* out */
    uint8_t status; /* gm_span_status */
    int device;     /* device of the heap whose segment holds ptr (when not NOT_OURS) */
    uintptr_t base; /* LIVE/PAST_END: the allocation; FREED: start of the free region */
    size_t size;    /* LIVE/PAST_END: its requested size; FREED: the free region's size */
} gm_span;

/* Resolves `count` (1 or 2; more are ignored) spans against every heap's pool segments, taking each heap's lock at
 * most once: the heap that answered this thread last is tried first, and heaps without segments
 * are skipped without their lock. Fast path: the block base in the live table (one hash probe);
 * interior pointers fall back to the segment's block list. (manager.c) */
void gm_pool_find_spans(gm_span *spans, size_t count);

/* The pool block containing `ptr` in this heap (live, free or pending), or NULL. Faster than
 * gm_heap_block_containing_locked for block bases, for pointers into blocks this thread used
 * lately and for pointers near a live block's start. `*live` is set when the block was found
 * through the live table (so it is live); otherwise the caller checks its state. (heap.c) */
gm_block *gm_heap_block_at_locked(gm_heap *heap, uintptr_t ptr, bool *live);

/* ---------------------------------------------------------------- the check */

/* One copy or memset as the check sees it. */
typedef struct gm_xfer {
    const char *api;         /* the hooked entry point, named in the logged line */
    bool memset;             /* a memset: only the destination is written */
    /* [GM_XFER_DST], [GM_XFER_SRC]; ptr = 0 for a side that cannot be device memory (the host
     * side of an explicit H2D/D2H copy, a memset's source). */
    gm_span side[2];
    const gm_callsite *site; /* the hooked call's caller, for the logged stack */
    int device;              /* out: the device to count the copy on; -1: the current context's */
} gm_xfer;
#define GM_XFER_DST 0
#define GM_XFER_SRC 1

/* Looks both sides up (gm_pool_find_spans). When a side is FREED or PAST_END and
 * GPUMEM_CHECK_COPIES is on, logs one line naming the call, the range and the block, followed by
 * the caller's stack, counts it as refused and returns GPUMEM_ERROR_INVALID_VALUE (the caller
 * returns that without calling the driver). Otherwise GPUMEM_OK. Zero-byte sides are not looked
 * up (nothing is touched). Sets x->device: the device of a side gpumem pools (the destination's
 * first), else the only device gpumem has a heap for, else -1. With the check off and a single
 * device, nothing is looked up (the spans stay NOT_OURS). */
int gm_xfer_check(gm_xfer *x);

/* ---------------------------------------------------------------- the counters */

/* A cheap monotonic tick counter for timing blocking copies (the TSC on x86-64: ~7 ns against
 * ~20 ns for clock_gettime); gm_copy_ticks_to_ns converts sums of differences. */
static inline uint64_t gm_copy_clock(void)
{
#if defined(__x86_64__)
    return __builtin_ia32_rdtsc();
#else
    return gm_now_ns();
#endif
}
uint64_t gm_copy_ticks_to_ns(uint64_t ticks);

/* Counts one copy the driver (or the stager) accepted. `kind` is ignored for D2D. `ticks` is the
 * wall time of a blocking copy in gm_copy_clock units, with `timed` set; async copies pass
 * timed = false (their time would need events). Per-thread counters, no locked instruction. */
void gm_copy_count(int device, gpumem_copy_direction dir, gpumem_host_memory kind, size_t bytes,
                   bool timed, uint64_t ticks, bool staged);

/* The counters of one device, summed over threads (device out of range: all zero). */
void gm_copy_stats_collect(int device, gpumem_copy_stats *out);

const char *gm_copy_direction_name(gpumem_copy_direction dir); /* "H2D", "D2H", "D2D", "H2H" */
const char *gm_host_memory_name(gpumem_host_memory kind);      /* "pageable", "pinned" */

#endif
