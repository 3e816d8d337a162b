/* Host backend: "device" memory is host memory, for tests, demos and the pool benchmark. A
 * configurable capacity and deterministic fault injection let tests drive every out-of-memory
 * path. It has one device (0), whose context cookie is 1. Fences complete after a set number of
 * queries, so tests can exercise fast-mode reuse. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "gm_backend.h"
#include "gpumem.h"

static _Atomic uint64_t capacity;      /* per backend, 0 = unlimited */
static _Atomic uint64_t in_use;
static _Atomic long fail_after = -1;   /* allocations left before faults begin; -1 never */
static _Atomic uint64_t alloc_calls;
/* Per thread: a counter that threads freeing at once shared would cost each of them the cache line. */
static _Thread_local uint64_t sync_calls;
static _Atomic int fence_queries_until_done;
static _Atomic uint64_t fence_records, fence_waits, fences_live;

struct gm_fence {
    int queries_left;
};

/* Sizes of live host allocations, so free can return capacity. A header in front of each
 * block keeps this O(1) without a table. */
#define HOST_HEADER 512

void gm_host_backend_configure(uint64_t cap, long fail)
{
    atomic_store(&capacity, cap);
    atomic_store(&fail_after, fail);
}

void gm_host_backend_set_fence_delay(int queries) { atomic_store(&fence_queries_until_done, queries); }
uint64_t gm_host_backend_in_use(void) { return atomic_load(&in_use); }
uint64_t gm_host_backend_alloc_calls(void) { return atomic_load(&alloc_calls); }
uint64_t gm_host_backend_sync_calls(void) { return sync_calls; }
uint64_t gm_host_backend_fence_records(void) { return atomic_load(&fence_records); }
uint64_t gm_host_backend_fence_waits(void) { return atomic_load(&fence_waits); }
uint64_t gm_host_backend_fences_live(void) { return atomic_load(&fences_live); }

static int host_current(uintptr_t *ctx, int *device)
{
    *ctx = 1; /* one device, one "context" */
    *device = 0;
    return GPUMEM_OK;
}

static bool take_fault(void)
{
    long left = atomic_load(&fail_after);
    while (left >= 0) {
        if (left == 0) return true;
        if (atomic_compare_exchange_weak(&fail_after, &left, left - 1)) return false;
    }
    return false;
}

static int host_alloc(uintptr_t ctx, size_t size, uintptr_t *out)
{
    (void)ctx;
    atomic_fetch_add(&alloc_calls, 1);
    if (take_fault()) return GPUMEM_ERROR_OUT_OF_MEMORY;
    uint64_t cap = atomic_load(&capacity);
    uint64_t now = atomic_fetch_add(&in_use, size) + size;
    if (cap && now > cap) {
        atomic_fetch_sub(&in_use, size);
        return GPUMEM_ERROR_OUT_OF_MEMORY;
    }
    char *p = aligned_alloc(HOST_HEADER, HOST_HEADER + ((size + HOST_HEADER - 1) & ~(size_t)(HOST_HEADER - 1)));
    if (!p) {
        atomic_fetch_sub(&in_use, size);
        return GPUMEM_ERROR_OUT_OF_MEMORY;
    }
    *(size_t *)p = size;
    *out = (uintptr_t)(p + HOST_HEADER);
    return GPUMEM_OK;
}

static int host_free(uintptr_t ctx, uintptr_t ptr)
{
    (void)ctx;
    char *p = (char *)ptr - HOST_HEADER;
    atomic_fetch_sub(&in_use, *(size_t *)p);
    free(p);
    return GPUMEM_OK;
}

static int host_sync(uintptr_t ctx)
{
    (void)ctx; /* host memory is never busy */
    sync_calls++;
    return GPUMEM_OK;
}

static int host_sync_current(void) { return host_sync(0); }

static int host_stream_sync(uintptr_t ctx, uintptr_t stream)
{
    (void)stream;
    return host_sync(ctx);
}

static int host_mem_info(uintptr_t ctx, size_t *free_bytes, size_t *total_bytes)
{
    (void)ctx;
    uint64_t cap = atomic_load(&capacity);
    uint64_t total = cap ? cap : (uint64_t)1 << 40;
    uint64_t used = atomic_load(&in_use);
    *total_bytes = (size_t)total;
    *free_bytes = (size_t)(used > total ? 0 : total - used);
    return GPUMEM_OK;
}

static int host_fence_record(uintptr_t ctx, gm_fence **out)
{
    (void)ctx;
    gm_fence *f = malloc(sizeof *f);
    if (!f) return GPUMEM_ERROR_OUT_OF_MEMORY;
    f->queries_left = atomic_load(&fence_queries_until_done);
    atomic_fetch_add(&fence_records, 1);
    atomic_fetch_add(&fences_live, 1);
    *out = f;
    return GPUMEM_OK;
}

static int host_fence_query(gm_fence *f)
{
    if (f->queries_left <= 0 || atomic_load(&fence_queries_until_done) == 0) return 0;
    f->queries_left--;
    return 1;
}

static int host_fence_wait(gm_fence *f)
{
    f->queries_left = 0;
    atomic_fetch_add(&fence_waits, 1);
    return GPUMEM_OK;
}

static void host_fence_destroy(gm_fence *f)
{
    atomic_fetch_sub(&fences_live, 1);
    free(f);
}

/* Transfers: "device" memory is host memory, so a copy is a memcpy done at once and every stream
 * and event is complete as soon as work is enqueued. Handles are distinct non-zero numbers. */
static _Atomic uintptr_t next_handle = 1;

static int host_pinned_alloc(uintptr_t ctx, size_t size, unsigned flags, void **out)
{
    (void)ctx, (void)flags;
    if (!size) return GPUMEM_ERROR_INVALID_VALUE;
    *out = aligned_alloc(4096, (size + 4095) & ~(size_t)4095);
    return *out ? GPUMEM_OK : GPUMEM_ERROR_OUT_OF_MEMORY;
}

static int host_pinned_free(uintptr_t ctx, void *p)
{
    (void)ctx;
    free(p);
    return GPUMEM_OK;
}

static int host_handle_new(uintptr_t ctx, uintptr_t *out)
{
    (void)ctx;
    *out = atomic_fetch_add(&next_handle, 1);
    return GPUMEM_OK;
}

static int host_handle_drop(uintptr_t ctx, uintptr_t h)
{
    (void)ctx;
    return h ? GPUMEM_OK : GPUMEM_ERROR_INVALID_VALUE;
}

static int host_event_record(uintptr_t ctx, uintptr_t ev, uintptr_t stream)
{
    (void)ctx, (void)stream;
    return ev ? GPUMEM_OK : GPUMEM_ERROR_INVALID_VALUE;
}

static int host_event_query(uintptr_t ev) { return ev ? 0 : GPUMEM_ERROR_INVALID_VALUE; }

static int host_stream_wait_event(uintptr_t ctx, uintptr_t stream, uintptr_t ev)
{
    (void)ctx, (void)stream;
    return ev ? GPUMEM_OK : GPUMEM_ERROR_INVALID_VALUE;
}

static int host_copy_async(uintptr_t ctx, gm_copy_dir dir, uintptr_t dst, uintptr_t src, size_t n,
                           uintptr_t stream)
{
    (void)ctx, (void)stream;
    if (dir == GM_COPY_DEFAULT || dir >= GM_COPY_DIRS || !dst || !src) return GPUMEM_ERROR_INVALID_VALUE;
    memmove((void *)dst, (const void *)src, n);
    return GPUMEM_OK;
}

static int host_range_is_pageable(const void *p, size_t n) { return p && n; }

static int host_set_current(uintptr_t ctx) { return ctx == 1 ? GPUMEM_OK : GPUMEM_ERROR_INVALID_CONTEXT; }

/* Host memory keeps no allocation table, captures nothing and has no context ids. */
static int host_address_range(uintptr_t p, uintptr_t *start, size_t *size, uintptr_t *ctx)
{
    (void)p, (void)start, (void)size, (void)ctx;
    return GPUMEM_ERROR_NOT_SUPPORTED;
}

static int host_stream_capturing(uintptr_t stream)
{
    (void)stream;
    return 0;
}

static int host_ctx_id(uintptr_t ctx, unsigned long long *id)
{
    (void)ctx;
    *id = 0;
    return GPUMEM_OK;
}

static gm_memory_kind host_memory_kind(uintptr_t p)
{
    (void)p;
    return GM_MEMKIND_UNKNOWN;
}

static int host_device_count(int *count)
{
    *count = 1;
    return GPUMEM_OK;
}

/* A fixed UUID: the host backend's one device is the same device in every process. */
static int host_device_uuid(int device, unsigned char uuid[16])
{
    if (device != 0) return GPUMEM_ERROR_INVALID_VALUE;
    static const unsigned char id[16] = {'g', 'p', 'u', 'm', 'e', 'm', '-', 'h', 'o', 's', 't', 0, 0, 0, 0, 1};
    memcpy(uuid, id, 16);
    return GPUMEM_OK;
}

/* ------------------------------------------------------------------ VMM emulation */

static _Atomic bool vmm_off;
static _Atomic long map_fail_after = -1;
static _Atomic uint64_t vmm_maps, vmm_mapped;

void gm_host_backend_configure_vmm(bool supported, long fail)
{
    atomic_store(&vmm_off, !supported);
    atomic_store(&map_fail_after, fail);
}

uint64_t gm_host_backend_vmm_maps(void) { return atomic_load(&vmm_maps); }
uint64_t gm_host_backend_vmm_mapped(void) { return atomic_load(&vmm_mapped); }

#define HOST_GRANULARITY ((size_t)2 << 20)

static int host_vmm_granularity(uintptr_t ctx, size_t *g)
{
    (void)ctx;
    if (atomic_load(&vmm_off)) return GPUMEM_ERROR_NOT_SUPPORTED;
    *g = HOST_GRANULARITY;
    return GPUMEM_OK;
}

static int host_va_reserve(uintptr_t ctx, size_t size, size_t align, uintptr_t *base)
{
    (void)ctx;
    if (align < HOST_GRANULARITY) align = HOST_GRANULARITY;
    char *r = mmap(NULL, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) return GPUMEM_ERROR_OUT_OF_MEMORY;
    uintptr_t at = ((uintptr_t)r + align - 1) & ~(uintptr_t)(align - 1);
    if (at > (uintptr_t)r) munmap(r, at - (uintptr_t)r);
    if ((uintptr_t)r + size + align > at + size)
        munmap((void *)(at + size), (uintptr_t)r + size + align - (at + size));
    *base = at;
    return GPUMEM_OK;
}

static int host_va_free(uintptr_t ctx, uintptr_t base, size_t size)
{
    (void)ctx;
    return munmap((void *)base, size) == 0 ? GPUMEM_OK : GPUMEM_ERROR_INVALID_VALUE;
}

static bool take_map_fault(void)
{
    long left = atomic_load(&map_fail_after);
    while (left >= 0) {
        if (left == 0) return true;
        if (atomic_compare_exchange_weak(&map_fail_after, &left, left - 1)) return false;
    }
    return false;
}

static int host_vmm_map(uintptr_t ctx, uintptr_t addr, size_t size, uint64_t peers)
{
    (void)ctx;
    (void)peers; /* one device */
    atomic_fetch_add(&vmm_maps, 1);
    if (take_map_fault()) return GPUMEM_ERROR_OUT_OF_MEMORY;
    uint64_t cap = atomic_load(&capacity);
    uint64_t now = atomic_fetch_add(&in_use, size) + size;
    if ((cap && now > cap) || mprotect((void *)addr, size, PROT_READ | PROT_WRITE) != 0) {
        atomic_fetch_sub(&in_use, size);
        return GPUMEM_ERROR_OUT_OF_MEMORY;
    }
    atomic_fetch_add(&vmm_mapped, size);
    return GPUMEM_OK;
}

static int host_vmm_unmap(uintptr_t ctx, uintptr_t addr, size_t size)
{
    (void)ctx;
    /* Fresh zero pages next time, and the memory back to the system, as an unmap would. */
    if (mmap((void *)addr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
             -1, 0) == MAP_FAILED)
        return GPUMEM_ERROR_INVALID_VALUE;
    atomic_fetch_sub(&in_use, size);
    atomic_fetch_sub(&vmm_mapped, size);
    return GPUMEM_OK;
}

static int host_vmm_grant(uintptr_t ctx, uintptr_t addr, size_t size, int device)
{
    (void)ctx;
    (void)addr;
    (void)size;
    return device == 0 ? GPUMEM_OK : GPUMEM_ERROR_INVALID_VALUE;
}

static int host_vmm_revoke(uintptr_t ctx, uintptr_t addr, size_t size, int device)
{
    return host_vmm_grant(ctx, addr, size, device); /* one device: nothing to take away */
}

static int host_device_total(int device, size_t *bytes)
{
    if (device != 0) return GPUMEM_ERROR_INVALID_VALUE;
    size_t f;
    return host_mem_info(1, &f, bytes);
}

static const gm_backend host_backend = {
    .name = "host",
    .current = host_current,
    .mem_alloc = host_alloc,
    .mem_free = host_free,
    .synchronize = host_sync,
    .synchronize_current = host_sync_current,
    .stream_synchronize = host_stream_sync,
    .mem_info = host_mem_info,
    .fence_record = host_fence_record,
    .fence_query = host_fence_query,
    .fence_wait = host_fence_wait,
    .fence_destroy = host_fence_destroy,
    .host_alloc = host_pinned_alloc,
    .host_free = host_pinned_free,
    .stream_create = host_handle_new,
    .stream_destroy = host_handle_drop,
    .event_create = host_handle_new,
    .event_destroy = host_handle_drop,
    .event_record = host_event_record,
    .event_query = host_event_query,
    .event_synchronize = host_event_query,
    .stream_wait_event = host_stream_wait_event,
    .copy_async = host_copy_async,
    .host_range_is_pageable = host_range_is_pageable,
    .set_current = host_set_current,
    .address_range = host_address_range,
    .stream_capturing = host_stream_capturing,
    .ctx_id = host_ctx_id,
    .memory_kind = host_memory_kind,
    .device_count = host_device_count,
    .device_uuid = host_device_uuid,
    .device_total = host_device_total,
    .vmm_granularity = host_vmm_granularity,
    .va_reserve = host_va_reserve,
    .va_free = host_va_free,
    .vmm_map = host_vmm_map,
    .vmm_unmap = host_vmm_unmap,
    .vmm_grant = host_vmm_grant,
    .vmm_revoke = host_vmm_revoke, /* no IPC: vmm_export and vmm_import stay NULL */
};

const gm_backend *gm_host_backend(void) { return &host_backend; }
