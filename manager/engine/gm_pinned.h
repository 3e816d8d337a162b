/* pinned.c: the pinned host memory pool behind cuMemHostAlloc / cuMemAllocHost / cuMemFreeHost
 * (cudaHostAlloc, cudaMallocHost, cudaFreeHost), the table of pinned host ranges that
 * gm_host_is_pinned answers from (pool blocks, pass-through allocations, cuMemHostRegister
 * ranges), and what the leak report reads of it. */
#ifndef GM_PINNED_H
#define GM_PINNED_H

#include "gm_engine.h"

/* cuMemHostAlloc's flags (the driver's values: CU_MEMHOSTALLOC_*). */
#define GM_HOSTALLOC_PORTABLE 0x01u
#define GM_HOSTALLOC_DEVICEMAP 0x02u
#define GM_HOSTALLOC_WRITECOMBINED 0x04u
#define GM_HOSTALLOC_KNOWN (GM_HOSTALLOC_PORTABLE | GM_HOSTALLOC_DEVICEMAP | GM_HOSTALLOC_WRITECOMBINED)

typedef struct gm_pinned_stats {
    uint64_t allocations, frees;        /* calls served (pooled or passed through) */
    uint64_t pool_hits, pool_misses;    /* pooled allocations served from the cache / the driver */
    uint64_t driver_allocs, driver_frees; /* cuMemHostAlloc / cuMemFreeHost calls gpumem made */
    uint64_t bytes_live, bytes_live_peak; /* requested bytes the program holds */
    uint64_t blocks_live;
    uint64_t bytes_held, bytes_held_peak; /* pinned bytes taken from the driver: live + cached */
    uint64_t bytes_cached, blocks_cached; /* freed, kept for reuse */
    uint64_t released;                  /* cached blocks handed back (GPUMEM_PINNED_MAX_CACHED, OOM) */
    uint64_t oom_retries;               /* driver OOMs retried after handing the cache back */
    uint64_t invalid_frees;             /* double frees and interior pointers refused */
    uint64_t orphaned;                  /* live allocations whose context was destroyed */
    uint64_t registered_ranges, registered_bytes; /* cuMemHostRegister ranges now */
} gm_pinned_stats;

/* The size class a pooled request of `size` bytes is served from (0: too large to round). */
size_t gm_pinned_class_size(size_t size);

/* Pinned host memory of `size` bytes with cuMemHostAlloc `flags`, for context `ctx` (current on
 * the calling thread) of `device`. Pooled unless GPUMEM_PINNED_POOL=0, tracked either way.
 * Returns a CUresult; the caller has checked size > 0 and flags within GM_HOSTALLOC_KNOWN.
 * `can_sync` is false while a stream captures: only cached blocks that need no synchronization and
 * no event call are reused then. */
int gm_pinned_alloc(uintptr_t ctx, int device, size_t size, unsigned flags, const gm_callsite *site,
                    bool can_sync, void **out);

/* Frees what gm_pinned_alloc returned. GM_NOT_OURS: neither our allocation nor inside a pool
 * block (the caller passes it to the driver). GPUMEM_ERROR_INVALID_VALUE: a pool block freed
 * twice, or a pointer inside one (logged with `caller`, counted). `can_sync` is false while a
 * stream captures: the block is then synchronized when it is next handed out instead. */
gm_answer gm_pinned_free(void *p, bool can_sync, uintptr_t caller);

/* cuMemHostRegister / cuMemHostUnregister succeeded: the range is pinned / no longer. */
void gm_pinned_registered(uintptr_t ctx, int device, const void *p, size_t n);
void gm_pinned_unregistered(const void *p);

/* Context `ctx` is being destroyed (or was): the driver frees the pinned memory it owns, so the
 * pool forgets its blocks and ranges; allocations the program still holds stay leaks. */
void gm_pinned_drop_ctx(uintptr_t ctx);

/* Hands every cached block back to the driver; the bytes released. */
size_t gm_pinned_release_cached(void);

void gm_pinned_stats_get(gm_pinned_stats *out);

/* True when all of host range [p, p+n) is pinned: the pinned pool, memory the program pinned
 * through the driver (cuMemHostAlloc pass-through) or registered (cuMemHostRegister). Lock-free. */
bool gm_host_is_pinned(const void *p, size_t n);

/* For the report: every live pinned allocation with the device current when it was made, and
 * the statistics; false when the pool stayed busy in another thread (2 s). */
bool gm_pinned_for_each_live(void (*fn)(void *cx, int device, const gm_record *rec), void *cx);
bool gm_pinned_stats_for_report(gm_pinned_stats *out);

#endif
