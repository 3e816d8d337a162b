/* The backend seam (mimalloc's "prim"): everything the engine asks of a device goes through one
 * of these tables. The CUDA backend talks to the real libcuda.so.1, never through our hooks; the
 * host backend serves tests, demos and benchmarks from plain host memory with fault injection.
 *
 * Every call names the context it acts on (`ctx`, the driver's CUcontext or the host backend's
 * device cookie) so a pool can be served from any thread. Return values are CUresult numbers. */
#ifndef GM_BACKEND_H
#define GM_BACKEND_H

#include "gm_base.h"

typedef struct gm_fence gm_fence; /* opaque: events recorded on every known stream */

typedef enum { GM_MEMKIND_UNKNOWN = 0, GM_MEMKIND_DEVICE, GM_MEMKIND_PINNED_HOST } gm_memory_kind;

/* Copy directions (the unified cuMemcpy/cuMemcpyAsync are "default" until classified). */
typedef enum { GM_COPY_H2D = 0, GM_COPY_D2H, GM_COPY_D2D, GM_COPY_DEFAULT, GM_COPY_DIRS } gm_copy_dir;

typedef struct gm_backend {
    const char *name;
    /* The calling thread's current context and its device; INVALID_CONTEXT when none. */
    int (*current)(uintptr_t *ctx, int *device);
    int (*mem_alloc)(uintptr_t ctx, size_t size, uintptr_t *out);
    int (*mem_free)(uintptr_t ctx, uintptr_t ptr);
    /* Wait for all work in the context: the barrier that cudaFree implies. */
    int (*synchronize)(uintptr_t ctx);
    /* The same for the calling thread's current context (no lookup: the caller just made it). */
    int (*synchronize_current)(void);
    /* Wait for one stream (0 = legacy default stream). */
    int (*stream_synchronize)(uintptr_t ctx, uintptr_t stream);
    int (*mem_info)(uintptr_t ctx, size_t *free_bytes, size_t *total_bytes);
    /* Fast free mode: a fence covers all work enqueued on every known stream before it. */
    int (*fence_record)(uintptr_t ctx, gm_fence **out);
    int (*fence_query)(gm_fence *fence); /* 0 complete, 1 pending, else a CUresult */
    int (*fence_wait)(gm_fence *fence);
    void (*fence_destroy)(gm_fence *fence);

    /* ---- transfers: pinned staging, the pinned host pool, readback channels. Streams and
     * events are opaque handles (CUstream/CUevent on the CUDA backend); stream 0 is the legacy
     * default stream. Every call makes `ctx` current for its duration when it is not. */
    /* Pinned host memory straight from the driver (flags: CU_MEMHOSTALLOC_*). */
    int (*host_alloc)(uintptr_t ctx, size_t size, unsigned flags, void **out);
    int (*host_free)(uintptr_t ctx, void *p);
    /* A non-blocking stream of our own (never ordered behind the legacy stream implicitly). */
    int (*stream_create)(uintptr_t ctx, uintptr_t *out);
    int (*stream_destroy)(uintptr_t ctx, uintptr_t stream);
    int (*event_create)(uintptr_t ctx, uintptr_t *out); /* timing disabled */
    int (*event_destroy)(uintptr_t ctx, uintptr_t event);
    int (*event_record)(uintptr_t ctx, uintptr_t event, uintptr_t stream);
    int (*event_query)(uintptr_t event);       /* 0 complete, 1 pending, else a CUresult */
    int (*event_synchronize)(uintptr_t event);
    int (*stream_wait_event)(uintptr_t ctx, uintptr_t stream, uintptr_t event);
    /* An asynchronous copy on `stream` (dir H2D, D2H or D2D; host sides must be pinned). */
    int (*copy_async)(uintptr_t ctx, gm_copy_dir dir, uintptr_t dst, uintptr_t src, size_t n,
                      uintptr_t stream);
    /* 1 when the driver knows neither end of host range [p, p+n) (plain pageable memory: safe to
     * read and write from the host), 0 when it does (pinned, registered, managed, device). */
    int (*host_range_is_pageable)(const void *p, size_t n);
    /* Makes `ctx` current on the calling thread (the staging workers). */
    int (*set_current)(uintptr_t ctx);

    /* ---- what the checked and staged copies ask of memory the pool does not own */
    /* The allocation that holds device address `p`: its start, size and owning context (left
     * alone where the driver names none). GPUMEM_ERROR_NOT_SUPPORTED where the backend keeps no
     * allocation table (host: any range counts as one allocation); another error where the
     * driver does not know `p`. */
    int (*address_range)(uintptr_t p, uintptr_t *start, size_t *size, uintptr_t *ctx);
    /* 0 when `stream` is not capturing, 1 when it is, else the driver's error (for instance the
     * capture state of an implicit stream is illegal). */
    int (*stream_capturing)(uintptr_t stream);
    /* The driver's never-reused id of `ctx` (a reset primary context keeps its handle, not its
     * id); 0 where the driver has no such id. */
    int (*ctx_id)(uintptr_t ctx, unsigned long long *id);
    /* What the driver knows of address `p`: device memory (managed and arrays included), pinned
     * host memory, or nothing (plain pageable host memory). */
    gm_memory_kind (*memory_kind)(uintptr_t p);

    /* ---- which device is which: the shared budget and NVML key devices by UUID, since
     * CUDA_VISIBLE_DEVICES renumbers ordinals per process. Both initialise the driver if needed. */
    int (*device_count)(int *count);
    int (*device_uuid)(int device, unsigned char uuid[16]); /* cuDeviceGetUuid's bytes */
    /* cuDeviceTotalMem: the size a percentage limit is taken of, whoever asks first (NVML's
     * total is larger: it counts memory the driver keeps for itself). */
    int (*device_total)(int device, size_t *bytes);

    /* ---- virtual memory management: expandable segments (GPUMEM_EXPANDABLE). The CUDA
     * backend calls the driver's own entry points (cuMemAddressReserve, cuMemCreate, cuMemMap,
     * cuMemSetAccess, cuMemUnmap, cuMemRelease, cuMemAddressFree), never our hooks. */
    /* GPUMEM_OK and the minimum mapping granularity of `ctx`'s device where the device supports
     * VMM (CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED) and every entry point is
     * there; GPUMEM_ERROR_NOT_SUPPORTED otherwise. */
    int (*vmm_granularity)(uintptr_t ctx, size_t *granularity);
    /* A virtual range of `size` bytes aligned to `align`, nothing mapped. */
    int (*va_reserve)(uintptr_t ctx, size_t size, size_t align, uintptr_t *base);
    int (*va_free)(uintptr_t ctx, uintptr_t base, size_t size);
    /* Physical memory of `size` bytes (a multiple of the granularity) created on `ctx`'s device,
     * mapped at `addr` and made readable and writable by that device and by every device of the
     * bit mask `peers`; the handle is released at once, so the mapping alone holds the memory.
     * On failure nothing stays mapped. */
    int (*vmm_map)(uintptr_t ctx, uintptr_t addr, size_t size, uint64_t peers);
    /* Makes the mapped range [addr, addr+size) readable and writable by `device` too (peer
     * access), keeping the access of the others. */
    int (*vmm_grant)(uintptr_t ctx, uintptr_t addr, size_t size, int device);
    /* Unmaps exactly one earlier vmm_map (or vmm_import): the memory goes back to the device
     * once no other process maps it either. */
    int (*vmm_unmap)(uintptr_t ctx, uintptr_t addr, size_t size);
    /* Takes the access of `device` to the mapped range away again (peer access disabled). */
    int (*vmm_revoke)(uintptr_t ctx, uintptr_t addr, size_t size, int device);
    /* ---- IPC of expandable segments. vmm_map creates its chunks with the POSIX file
     * descriptor handle type requested where the driver allows it (else without, logged once);
     * vmm_export gives a descriptor of the chunk mapped at `addr` (cuMemRetainAllocationHandle,
     * cuMemExportToShareableHandle), the caller closes it; GPUMEM_ERROR_NOT_SUPPORTED where the
     * chunks could not be made exportable. vmm_import maps such a descriptor (another process's
     * chunk, `size` bytes) at `addr` of a range reserved with va_reserve, readable and writable
     * by `ctx`'s device; the descriptor stays the caller's. NULL where the backend has no IPC. */
    int (*vmm_export)(uintptr_t ctx, uintptr_t addr, int *fd);
    int (*vmm_import)(uintptr_t ctx, int fd, uintptr_t addr, size_t size);
} gm_backend;

/* Host backend: capacity in bytes per device (0 = effectively unlimited) and deterministic fault
 * injection: the (fail_after+1)-th mem_alloc from now on fails with OUT_OF_MEMORY (-1 = never). */
const gm_backend *gm_host_backend(void);
void gm_host_backend_configure(uint64_t capacity, long fail_after);
uint64_t gm_host_backend_in_use(void);
/* The host backend's VMM emulation (reserve: mmap PROT_NONE; map: mprotect): `supported` false
 * answers NOT_SUPPORTED; the (map_fail_after+1)-th vmm_map from now on fails with
 * OUT_OF_MEMORY (-1 = never). Counts vmm_map calls and bytes mapped now. */
void gm_host_backend_configure_vmm(bool supported, long map_fail_after);
uint64_t gm_host_backend_vmm_maps(void);
uint64_t gm_host_backend_vmm_mapped(void);
uint64_t gm_host_backend_alloc_calls(void);
uint64_t gm_host_backend_sync_calls(void); /* the calling thread's synchronizations */
void gm_host_backend_set_fence_delay(int queries); /* fences complete after this many queries */
/* Fences recorded, waited for (fence_wait) and not yet destroyed, since the start. */
uint64_t gm_host_backend_fence_records(void);
uint64_t gm_host_backend_fence_waits(void);
uint64_t gm_host_backend_fences_live(void);

/* CUDA backend, bound to the real driver entry points the shim resolved (or, in library mode,
 * to libcuda.so.1 opened by the backend itself). NULL when the driver cannot be loaded. */
const gm_backend *gm_cuda_backend(void);

/* The real dlsym (libc's), the driver's handle and real entry points by exported name. */
typedef void *(*gm_dlsym_fn)(void *handle, const char *name);
gm_dlsym_fn gm_real_dlsym(void);
void *gm_driver_handle(void);
void *gm_driver_sym(const char *name);

/* Streams the program creates: fences of the fast free mode cover the non-blocking ones. */
void gm_cuda_stream_created(uintptr_t ctx, uintptr_t stream, unsigned flags);
void gm_cuda_stream_destroyed(uintptr_t stream);

#endif
