/* Named, resizable buffers (buffers.c): what they need from the pool (heap.c) beyond gm_alloc and
 * gm_free, resizing a live pool block where it lies. */
#ifndef GM_BUFFERS_H
#define GM_BUFFERS_H

#include "gm_internal.h"

/* Free bytes right after live block `b` in its segment (0 when the neighbour is live, pending
 * on a fence, or absent). */
size_t gm_heap_room_after_locked(const gm_block *b);

/* Grows live pool block `b` to `new_rounded` bytes (a multiple of 512) into the free block after
 * it, keeping its address; its record then says `requested` bytes. OUT_OF_MEMORY, with nothing
 * changed, when the free neighbour is too small. */
int gm_heap_extend_block_locked(gm_heap *heap, gm_block *b, size_t new_rounded, size_t requested);

/* Shrinks live pool block `b` to `new_rounded` bytes (a multiple of 512, > 0), its record to
 * `requested`. The tail is freed like a freed block: `pend` (fast mode) leaves it waiting for a
 * fence; otherwise it is reusable at once, so in strict mode the caller synchronizes the context
 * first. OUT_OF_MEMORY (out of host memory for a block header), with nothing changed. */
int gm_heap_shrink_block_locked(gm_heap *heap, gm_block *b, size_t new_rounded, size_t requested,
                                bool pend);

#endif
