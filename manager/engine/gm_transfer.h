/* transfer.c: checked and classified copies. The shim's copy and memset hooks (shim/hooks_copy.c)
 * ask where each device side of a copy lies (gm_xfer_check, through lookup.c), refuse what
 * touches freed pool memory or runs past the end of its block, ask what kind of copy it is
 * (gm_xfer_classify), and count what the driver accepted (account/copies.c). */
#ifndef GM_TRANSFER_H
#define GM_TRANSFER_H

#include "gm_engine.h"

typedef struct gm_xfer {
    const char *api;         /* the hooked entry point, named in the logged line */
    bool memset;             /* a memset: only the destination is written */
    /* [GM_XFER_DST], [GM_XFER_SRC]; ptr = 0 for a side that cannot be device memory (the host
     * side of an explicit H2D/D2H copy, a memset's source). */
    gm_span side[2];
    const gm_callsite *site; /* the hooked call's caller, for the logged stack */
    int device;              /* out: the device to count the copy on; -1: the current context's */
    int peer_device;         /* out: the source's device when both sides are pool memory of two
                              * different devices (a peer copy), else -1 */
} gm_xfer;
#define GM_XFER_DST 0
#define GM_XFER_SRC 1

/* Looks both sides up (gm_lookup_spans). When a side is FREED or PAST_END and
 * GPUMEM_CHECK_COPIES is on, logs one line naming the call, the range and the block, followed by
 * the caller's stack, counts it as refused and returns GPUMEM_ERROR_INVALID_VALUE (the caller
 * returns that without calling the driver). Otherwise GPUMEM_OK. Zero-byte sides are not looked
 * up (nothing is touched). Sets x->device: the device of a side gpumem pools (the destination's
 * first), else the only device gpumem has a heap for, else -1. With the check off and a single
 * device, nothing is looked up (the spans stay NOT_OURS). */
int gm_xfer_check(gm_xfer *x);

/* Where a copy goes, once both sides are known. */
typedef struct gm_copy_class {
    gpumem_copy_direction dir;
    gpumem_host_memory host; /* of the host side; H2H: pinned only if both are */
    int device;              /* -1: not known yet (no side is ours) */
    bool peer;               /* D2D between pool memory of two devices */
} gm_copy_class;
/* A side of a copy as its entry point names it: device memory (arrays included), host memory,
 * or unified (cuMemcpy, CU_MEMORYTYPE_UNIFIED: pool memory, then gpumem's pinned table, then the
 * driver say what it is). */
typedef enum { GM_SIDE_DEVICE = 0, GM_SIDE_HOST, GM_SIDE_UNIFIED } gm_side_kind;
typedef struct gm_xfer_side {
    gm_side_kind kind;
    uintptr_t ptr;
    size_t n;
} gm_xfer_side;
/* Classifies a checked copy (after gm_xfer_check, whose spans answer for pool memory):
 * direction, the host side's kind, the device to count it on. */
gm_copy_class gm_xfer_classify(const gm_xfer *x, const gm_xfer_side side[2]);

#endif
