/* ipc.c: CUDA IPC of pooled blocks. The driver's IPC handle names a whole driver allocation, which
 * for a pooled block is its segment; exporting that would make another process write into the
 * wrong block. So:
 *
 *  - a block at its segment's start is exported with the driver's own handle (exact for any
 *    receiver: the segment starts where the block does);
 *  - any other block gets a gpumem handle, which the driver is sure to refuse, naming a slot of the
 *    exporter's registry file (<GPUMEM_IPC_DIR>/gpumem-ipc.<pid>.<nonce>): the driver's handle of
 *    the segment, the block's offset and requested size, and a count of importers;
 *  - a receiver under gpumem opens the segment once per context (an import table, refcounted)
 *    and hands out mapping base + offset; its range queries answer the block.
 *
 * A block of an expandable segment (VMM memory: the driver has no legacy handle of it) always
 * gets a gpumem handle; its slot names the chunks it lies in, and a receiver under gpumem gets
 * them as file descriptors from the exporter's chunk server (a unix socket, ipc.c) and maps them.
 *
 * A block freed while some importer still has it open is kept from reuse (quarantine) until the
 * importers are gone. */
#ifndef GM_IPC_H
#define GM_IPC_H

#include "gm_engine.h"

#define GM_IPC_HANDLE_SIZE 64

/* The driver's IPC entry points, as the shim resolved them (the engine makes no driver call of
 * its own here). Return values are CUresult numbers. */
typedef struct gm_ipc_driver {
    int (*get_handle)(unsigned char out[GM_IPC_HANDLE_SIZE], uintptr_t ptr);
    int (*open_handle)(uintptr_t *out, const unsigned char handle[GM_IPC_HANDLE_SIZE],
                       unsigned flags);
    int (*close_handle)(uintptr_t ptr);
    int (*address_range)(uintptr_t ptr, uintptr_t *base, size_t *size);
} gm_ipc_driver;

/* Export `ptr`: GM_NOT_OURS (not pool memory: ask the driver), else GPUMEM_ERROR_INVALID_VALUE
 * (pool memory outside every live block), the driver's error, or GPUMEM_OK with the handle in
 * `out`. */
gm_answer gm_ipc_export(uintptr_t ptr, const gm_ipc_driver *drv, unsigned char out[GM_IPC_HANDLE_SIZE]);

/* Open `handle` in context `ctx` (gpumem's or the driver's own): the driver's codes. */
int gm_ipc_open(uintptr_t ctx, const unsigned char handle[GM_IPC_HANDLE_SIZE], unsigned flags,
                const gm_ipc_driver *drv, uintptr_t *out);

/* Close a pointer gm_ipc_open returned: GM_NOT_OURS (ask the driver), else GPUMEM_OK or
 * GPUMEM_ERROR_INVALID_VALUE (one close too many, or a pointer inside an imported segment). */
gm_answer gm_ipc_close(uintptr_t ptr, const gm_ipc_driver *drv);

/* An imported block containing `ptr`: GM_NOT_OURS, else GPUMEM_OK (base, size, buffer_id filled)
 * or GPUMEM_ERROR_INVALID_VALUE (inside an imported segment, outside every block opened in it). */
gm_answer gm_ipc_lookup(uintptr_t ptr, gm_block_identity *out);

/* Exporter side, under the heap lock: block `b` (with an IPC slot) was freed. True when another
 * process still has it open: it is then kept on heap->quarantine instead of going back to the
 * pool. */
bool gm_ipc_quarantine_locked(gm_heap *heap, gm_block *b);
/* Returns quarantined blocks no importer holds any more to the pool; true when some went back. */
bool gm_ipc_reclaim_locked(gm_heap *heap);

#endif
