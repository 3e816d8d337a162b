/* staging.c: pageable host <-> device copies pipelined through pinned staging buffers. */
#ifndef GM_STAGING_H
#define GM_STAGING_H

#include "gm_engine.h"

/* Copies n bytes (dir GM_COPY_H2D: dst device, src host; GM_COPY_D2H: dst host, src device) with
 * the driver's semantics for a pageable copy enqueued on `stream` (0 = legacy default stream,
 * CU_STREAM_PER_THREAD for the per-thread one) of `ctx`, the caller's current context; `sync` for
 * the blocking entry points. The context that owns the device memory stages it (its transfer
 * stream orders every staged copy of that memory). Returns GM_NOT_OURS when the copy is not
 * staged (staging off, smaller than GPUMEM_STAGING_MIN, the host side not pageable, a stream
 * capturing...): the caller forwards it to the driver. Otherwise the copy's CUresult. */
gm_answer gm_staged_copy(uintptr_t ctx, gm_copy_dir dir, uintptr_t dst, uintptr_t src, size_t n,
                         uintptr_t stream, bool sync);

/* The context is going away (destroyed, reset, or its primary context released): its staging
 * stream, events, pinned buffers and worker threads go first, through the driver while
 * `ctx_alive`. Waits for a staged copy of that context's memory in flight. */
void gm_staging_drop_context(uintptr_t ctx, bool ctx_alive);

#endif
