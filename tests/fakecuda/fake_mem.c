/* fake_mem.c: device memory. The allocation registry (g_allocs, sorted by address, so that an
 * interior pointer finds its allocation), the memfd that backs cuMemAlloc memory, the common
 * allocation path with its capacity check and fault injection, the allocation and free entry
 * points (plain, pitched, managed, stream-ordered), cuMemGetInfo, and VMM handles (cuMemCreate).
 *
 * Host memory the driver knows (pinned, registered) is in fake_host.c and IPC mappings in
 * fake_ipc.c; both are records of this same registry, told apart by fk_alloc.kind. */
#include "fake_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/mman.h>

/* ================================================================ allocation registry */

/* Index of the first allocation whose base is above p. */
static size_t mem_upper(uintptr_t p)
{
    size_t lo = 0, hi = g_nallocs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (g_allocs[mid]->base <= p)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* The live allocation containing p (interior pointers included), or NULL. */
fk_alloc *mem_find(uintptr_t p)
{
    size_t i = mem_upper(p);
    if (i == 0)
        return NULL;
    fk_alloc *a = g_allocs[i - 1];
    return p - a->base < a->size ? a : NULL;
}

/* The allocation starting exactly at p: frees take base pointers only. */
fk_alloc *mem_find_base(uintptr_t p)
{
    fk_alloc *a = mem_find(p);
    return a && a->base == p ? a : NULL;
}

bool mem_insert(fk_alloc *a)
{
    if (g_nallocs == g_allocs_cap) {
        size_t cap = g_allocs_cap ? g_allocs_cap * 2 : 64;
        fk_alloc **v = realloc(g_allocs, cap * sizeof *v);
        if (!v)
            return false;
        g_allocs = v;
        g_allocs_cap = cap;
    }
    size_t i = mem_upper(a->base);
    memmove(&g_allocs[i + 1], &g_allocs[i], (g_nallocs - i) * sizeof *g_allocs);
    g_allocs[i] = a;
    g_nallocs++;
    return true;
}

static void mem_remove(fk_alloc *a)
{
    size_t i = mem_upper(a->base);
    if (i == 0 || g_allocs[i - 1] != a)
        return;
    i--;
    memmove(&g_allocs[i], &g_allocs[i + 1], (g_nallocs - i - 1) * sizeof *g_allocs);
    g_nallocs--;
}

/* [p, p+n) inside one live allocation that a device may touch. */
bool mem_range_ok(uintptr_t p, size_t n)
{
    fk_alloc *a = mem_find(p);
    if (!a)
        return false;
    /* Mappings side by side in a reserved range are one contiguous range to a device. */
    while (a->kind == A_MAPPED && n > a->size - (p - a->base)) {
        uintptr_t end = a->base + a->size;
        fk_alloc *next = mem_find(end);
        if (!next || next->kind != A_MAPPED || next->base != end)
            return false;
        n -= end - p;
        p = end;
        a = next;
    }
    return n <= a->size - (p - a->base);
}

/* Whether the kind counts against a device's capacity (host and imported memory do not). */
bool mem_counts_as_device(fk_akind k)
{
    return k != A_HOST && k != A_REGISTERED && k != A_IPC && k != A_MAPPED;
}

/* ================================================================ memfd backing */

/* cuMemAlloc memory is a memfd mapped shared, `align`-aligned, so that another process can map
 * the same pages (cuIpcOpenMemHandle opens /proc/<pid>/fd/<memfd>). The memfd's name carries the
 * allocation id, so an importer can tell a reused descriptor from the one it was handed. */
static void *mem_memfd_map(size_t size, size_t align, uint64_t id, int *fd_out, size_t *len_out)
{
    char name[48];
    snprintf(name, sizeof name, "fakecuda-%llu", (unsigned long long)id);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t len = fk_round_up(size, page), span = len + (align > page ? align : 0);
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)len) != 0) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    char *r = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) {
        close(fd);
        return NULL;
    }
    char *at = (char *)fk_round_up((uintptr_t)r, align > page ? align : page);
    if (at > r)
        munmap(r, (size_t)(at - r));
    if (r + span > at + len)
        munmap(at + len, (size_t)(r + span - (at + len)));
    if (mmap(at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
        munmap(at, len);
        close(fd);
        return NULL;
    }
    *fd_out = fd;
    *len_out = len;
    return at;
}

/* An mmap'd allocation: a memfd-backed A_DEVICE block or an A_IPC mapping of another process's. */
static void mem_memfd_unmap(fk_alloc *a)
{
    munmap((void *)a->base, a->map_len);
    if (a->kind == A_DEVICE || a->kind == A_VMM)
        close(a->memfd);
}

/* ================================================================ release */

/* Unregister and free the block. Called with g_mu held. */
void mem_release(fk_alloc *a)
{
    if (a->kind == A_VMM) {
        fk_alloc **pp = &g_vmm;
        while (*pp && *pp != a)
            pp = &(*pp)->vnext;
        if (*pp)
            *pp = a->vnext;
    } else {
        mem_remove(a);
    }
    if (mem_counts_as_device(a->kind) && !a->imported)
        g_dev[a->dev].in_use -= a->size;
    if (a->imported) { /* an fd of another process's memory, never mapped here by itself */
        close(a->memfd);
        free(a);
        return;
    }
    if (a->kind == A_MAPPED) { /* the range stays reserved; the handle may go with its last map */
        mmap((void *)a->base, a->size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
        fk_alloc *h = a->handle;
        free(a);
        if (--h->maps == 0 && h->released)
            mem_release(h);
        return;
    }
    if (a->map_len)
        mem_memfd_unmap(a);
    else if (a->kind != A_REGISTERED)
        free((void *)a->base);
    free(a);
}

/* Context teardown: everything the context owned goes with it. */
void mem_free_ctx(fk_ctx *c)
{
    for (size_t i = g_nallocs; i-- > 0;)
        if (g_allocs[i]->ctx == c)
            mem_release(g_allocs[i]);
}

/* ================================================================ allocation */

/* The common path of every device allocation entry point: fault injection, capacity, memory.
 * Called with g_mu held after argument and context checks. */
static CUresult mem_alloc_device(int dev, fk_ctx *c, size_t size, fk_akind kind, fk_alloc **out)
{
    if (state_alloc_fault())
        return CUDA_ERROR_OUT_OF_MEMORY;
    if (size > g_capacity || g_dev[dev].in_use > g_capacity - size)
        return CUDA_ERROR_OUT_OF_MEMORY;
    size_t align = size >= FK_BIG_ALIGN ? FK_BIG_ALIGN : FK_SMALL_ALIGN;
    if (size > SIZE_MAX - align)
        return CUDA_ERROR_OUT_OF_MEMORY;
    fk_alloc *a = malloc(sizeof *a);
    uint64_t id = g_next_id++;
    int fd = -1;
    size_t map_len = 0;
    void *mem = kind == A_DEVICE || kind == A_VMM ? mem_memfd_map(size, align, id, &fd, &map_len)
                                 : aligned_alloc(align, fk_round_up(size, align));
    if (a && mem)
        *a = (fk_alloc){.base = (uintptr_t)mem, .size = size, .kind = kind, .dev = dev,
                        .ctx = c, .id = id, .map_len = map_len, .memfd = fd};
    if (!a || !mem || (kind != A_VMM && !mem_insert(a))) {
        free(a);
        if (mem && map_len) {
            munmap(mem, map_len);
            close(fd);
        } else {
            free(mem);
        }
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    g_dev[dev].in_use += size;
    *out = a;
    return CUDA_SUCCESS;
}

/* The memory of a graph allocation node (fake_graph.c), with g_mu held. */
CUresult mem_alloc_graph(int dev, fk_ctx *c, size_t size, fk_alloc **out)
{
    return mem_alloc_device(dev, c, size, A_GRAPH, out);
}

/* cuMemAlloc, cuMemAllocPitch and cuMemAllocManaged: the current context's device. */
static CUresult mem_alloc_in_ctx(CUdeviceptr *dptr, size_t size, fk_akind kind)
{
    CUresult r = state_enter();
    if (r)
        return r;
    g_cnt.alloc_calls++;
    if (!dptr || size == 0)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    fk_alloc *a;
    if ((r = mem_alloc_device(c->dev, c, size, kind, &a)))
        return state_leave(r);
    *dptr = a->base;
    return state_leave(CUDA_SUCCESS);
}

/* A call refused for its arguments before mem_alloc_in_ctx: still counted, and NOT_INITIALIZED
 * still wins over INVALID_VALUE. */
static CUresult mem_alloc_refused(void)
{
    CUresult r = state_enter();
    if (r)
        return r;
    g_cnt.alloc_calls++;
    return state_leave(CUDA_ERROR_INVALID_VALUE);
}

FK_API CUresult CUDAAPI cuMemAlloc_v2(CUdeviceptr *dptr, size_t size)
{
    return mem_alloc_in_ctx(dptr, size, A_DEVICE);
}

FK_API CUresult CUDAAPI cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width,
                                           size_t height, unsigned int elem)
{
    if (!pitch || width == 0 || height == 0 || (elem != 4 && elem != 8 && elem != 16))
        return mem_alloc_refused();
    size_t p = fk_round_up(width, FK_PITCH_ALIGN), total;
    if (__builtin_mul_overflow(p, height, &total))
        total = SIZE_MAX; /* fails the capacity check */
    CUresult r = mem_alloc_in_ctx(dptr, total, A_DEVICE);
    if (r == CUDA_SUCCESS)
        *pitch = p;
    return r;
}

FK_API CUresult CUDAAPI cuMemAllocManaged(CUdeviceptr *dptr, size_t size, unsigned int flags)
{
    if (flags != CU_MEM_ATTACH_GLOBAL && flags != CU_MEM_ATTACH_HOST)
        return mem_alloc_refused();
    return mem_alloc_in_ctx(dptr, size, A_MANAGED);
}

/* Stream-ordered allocation: the memory exists at once (the pool is ignored). */
static CUresult mem_alloc_async(CUdeviceptr *dptr, size_t size, CUstream h, bool ptds)
{
    CUresult r = state_enter();
    if (r)
        return r;
    g_cnt.alloc_calls++;
    if (!dptr || size == 0)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_stream *s;
    if ((r = stream_resolve(h, ptds, &s)))
        return state_leave(r);
    fk_alloc *a;
    if ((r = mem_alloc_device(s->ctx->dev, s->ctx, size, A_ASYNC, &a)))
        return state_leave(r);
    *dptr = a->base;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuMemAllocAsync(CUdeviceptr *dptr, size_t size, CUstream s)
{
    return mem_alloc_async(dptr, size, s, false);
}

FK_API CUresult CUDAAPI cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t size, CUstream s)
{
    return mem_alloc_async(dptr, size, s, true);
}

FK_API CUresult CUDAAPI cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t size, CUmemoryPool pool,
                                                CUstream s)
{
    (void)pool;
    return mem_alloc_async(dptr, size, s, false);
}

FK_API CUresult CUDAAPI cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t size,
                                                     CUmemoryPool pool, CUstream s)
{
    (void)pool;
    return mem_alloc_async(dptr, size, s, true);
}

/* ================================================================ free and info */

/* cuMemFree: the implicit barrier. Waits for every stream of the allocation's context. */
FK_API CUresult CUDAAPI cuMemFree_v2(CUdeviceptr p)
{
    CUresult r = state_enter();
    if (r)
        return r;
    g_cnt.free_calls++;
    if (p == 0) /* like free(NULL) in the real driver */
        return state_leave(CUDA_SUCCESS);
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    if (stream_capture_forbids_sync())
        return state_leave(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    fk_alloc *a = mem_find_base(p);
    if (!a || a->freeing || a->kind == A_HOST || a->kind == A_IPC) /* IPC: cuIpcCloseMemHandle */
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (a->kind == A_GRAPH) { /* the barrier, then the graph allocation's own rules */
        if (!a->graph_live || a->graph_freed_in_owner)
            return state_leave(CUDA_ERROR_INVALID_VALUE);
        uint64_t gid = a->id;
        r = stream_wait_ctx(a->ctx);
        a = mem_find_base(p);
        if (r == CUDA_SUCCESS)
            r = a && a->id == gid ? graph_mem_free(a) : CUDA_ERROR_INVALID_VALUE;
        return state_leave(r);
    }
    a->freeing = true; /* a racing second free now fails instead of freeing twice */
    uint64_t id = a->id;
    r = stream_wait_ctx(a->ctx);
    a = mem_find_base(p); /* the lock was dropped: it may have gone with its context */
    if (a && a->id == id)
        mem_release(a);
    return state_leave(r);
}

/* Queued behind the stream's work; freed when the worker reaches it. */
static CUresult mem_free_async(CUdeviceptr p, CUstream h, bool ptds)
{
    CUresult r = state_enter();
    if (r)
        return r;
    g_cnt.free_calls++;
    fk_stream *s;
    if ((r = stream_resolve(h, ptds, &s)))
        return state_leave(r);
    fk_alloc *a = mem_find_base(p);
    if (a && a->kind == A_GRAPH) /* no longer live at once (the fake has no work to order it after) */
        return state_leave(graph_mem_free(a));
    if (!a || a->freeing || (a->kind != A_DEVICE && a->kind != A_ASYNC))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_work w = {.kind = W_FREE, .dst = p, .alloc_id = a->id};
    if ((r = work_enqueue(s, &w, NULL)))
        return state_leave(r);
    a->freeing = true;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuMemFreeAsync(CUdeviceptr p, CUstream s)
{
    return mem_free_async(p, s, false);
}

FK_API CUresult CUDAAPI cuMemFreeAsync_ptsz(CUdeviceptr p, CUstream s)
{
    return mem_free_async(p, s, true);
}

FK_API CUresult CUDAAPI cuMemGetInfo_v2(size_t *free_bytes, size_t *total)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!free_bytes || !total)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    uint64_t used = g_dev[c->dev].in_use;
    *free_bytes = used < g_capacity ? g_capacity - used : 0;
    *total = g_capacity;
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ virtual memory handles */

FK_API CUresult CUDAAPI cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *prop,
                                                      CUmemAllocationGranularity_flags option)
{
    CUresult r = state_enter();
    if (r)
        return r;
    (void)option;
    if (!g || !prop)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    *g = FK_VMM_GRANULARITY;
    return state_leave(CUDA_SUCCESS);
}

/* A handle to physical memory (host memory here); it is never mapped by this fake. */
FK_API CUresult CUDAAPI cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                                    const CUmemAllocationProp *prop, unsigned long long flags)
{
    CUresult r = state_enter();
    if (r)
        return r;
    g_cnt.alloc_calls++;
    if (!handle || !prop || flags || size == 0 || size % FK_VMM_GRANULARITY ||
        prop->type != CU_MEM_ALLOCATION_TYPE_PINNED ||
        prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
        (prop->requestedHandleTypes & ~(unsigned)CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(prop->location.id))
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    if (prop->requestedHandleTypes && g_no_shareable) /* as a driver without the handle type */
        return state_leave(CUDA_ERROR_NOT_SUPPORTED);
    fk_alloc *a;
    if ((r = mem_alloc_device(prop->location.id, NULL, size, A_VMM, &a)))
        return state_leave(r);
    a->handle_refs = 1;
    a->shareable = prop->requestedHandleTypes != 0;
    a->vnext = g_vmm;
    g_vmm = a;
    *handle = (CUmemGenericAllocationHandle)a->id;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuMemRelease(CUmemGenericAllocationHandle handle)
{
    CUresult r = state_enter();
    if (r)
        return r;
    g_cnt.free_calls++;
    for (fk_alloc *a = g_vmm; a; a = a->vnext) {
        if (a->id == handle && !a->released) {
            if (--a->handle_refs)
                return state_leave(CUDA_SUCCESS);
            if (a->maps) /* the mappings keep the memory until they go */
                a->released = true;
            else
                mem_release(a);
            return state_leave(CUDA_SUCCESS);
        }
    }
    return state_leave(CUDA_ERROR_INVALID_VALUE);
}

static fk_alloc *vmm_handle(CUmemGenericAllocationHandle handle)
{
    for (fk_alloc *a = g_vmm; a; a = a->vnext)
        if (a->id == handle && !a->released)
            return a;
    return NULL;
}

/* The handle of the memory mapped at addr, one reference more (cuMemRelease drops it). */
FK_API CUresult CUDAAPI cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *handle, void *addr)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_alloc *m = mem_find((uintptr_t)addr);
    if (!handle || !m || m->kind != A_MAPPED) /* cuMemAlloc memory too, as on the driver */
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_alloc *h = m->handle;
    h->released = false; /* the mapping kept it: a reference again */
    h->handle_refs++;
    *handle = (CUmemGenericAllocationHandle)h->id;
    return state_leave(CUDA_SUCCESS);
}

/* A file descriptor of the handle's memory (a dup of its memfd): only for handles created with
 * that handle type requested, as on the driver. */
FK_API CUresult CUDAAPI cuMemExportToShareableHandle(void *out, CUmemGenericAllocationHandle handle,
                                                     CUmemAllocationHandleType type,
                                                     unsigned long long flags)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_alloc *h = vmm_handle(handle);
    if (!out || flags || !h || type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR || !h->shareable)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    int fd = fcntl(h->memfd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    *(int *)out = fd;
    return state_leave(CUDA_SUCCESS);
}

/* A handle of the memory behind a descriptor cuMemExportToShareableHandle made (in any process):
 * the fake's memfds are recognised by name. The memory is the exporter's device's: it counts
 * against no capacity here. The descriptor stays the caller's. */
FK_API CUresult CUDAAPI cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *handle,
                                                       void *os_handle,
                                                       CUmemAllocationHandleType type)
{
    CUresult r = state_enter();
    if (r)
        return r;
    int fd = (int)(intptr_t)os_handle;
    char path[64], link[128];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, link, sizeof link - 1);
    struct stat st;
    if (!handle || type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR || n <= 0 ||
        (link[n] = 0, strncmp(link, "/memfd:fakecuda-", 16) != 0) || fstat(fd, &st) != 0 ||
        st.st_size <= 0 || st.st_size % FK_VMM_GRANULARITY)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_alloc *a = malloc(sizeof *a);
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    fk_ctx *c = NULL;
    if (!a || own < 0) {
        free(a);
        if (own >= 0)
            close(own);
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    *a = (fk_alloc){.size = (size_t)st.st_size, .kind = A_VMM, .dev = ctx_current(&c) ? 0 : c->dev,
                    .id = g_next_id++, .memfd = own, .handle_refs = 1, .shareable = true,
                    .imported = true, .vnext = g_vmm};
    g_vmm = a;
    *handle = (CUmemGenericAllocationHandle)a->id;
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ virtual address ranges */

/* cuMemAddressReserve ranges: an mmap(PROT_NONE) each; cuMemMap maps a handle's memfd into one
 * (MAP_FIXED, still PROT_NONE) and cuMemSetAccess makes it readable and writable, so memory used
 * before its access was set faults as it would on a device. */
typedef struct fk_vrange {
    uintptr_t base;
    size_t size;
    struct fk_vrange *next;
} fk_vrange;
static fk_vrange *g_vranges;

static fk_vrange *vrange_of(uintptr_t p, size_t n)
{
    for (fk_vrange *v = g_vranges; v; v = v->next)
        if (p >= v->base && n <= v->size && p - v->base <= v->size - n)
            return v;
    return NULL;
}

FK_API CUresult CUDAAPI cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment,
                                            CUdeviceptr addr, unsigned long long flags)
{
    CUresult r = state_enter();
    if (r)
        return r;
    (void)addr; /* a hint */
    if (!ptr || size == 0 || size % FK_VMM_GRANULARITY || flags ||
        (alignment && (alignment & (alignment - 1))))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    size_t align = alignment > FK_VMM_GRANULARITY ? alignment : FK_VMM_GRANULARITY;
    char *m = mmap(NULL, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    fk_vrange *v = malloc(sizeof *v);
    if (m == MAP_FAILED || !v) {
        if (m != MAP_FAILED)
            munmap(m, size + align);
        free(v);
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    uintptr_t at = fk_round_up((uintptr_t)m, align);
    if (at > (uintptr_t)m)
        munmap(m, at - (uintptr_t)m);
    if ((uintptr_t)m + size + align > at + size)
        munmap((void *)(at + size), (uintptr_t)m + size + align - (at + size));
    *v = (fk_vrange){at, size, g_vranges};
    g_vranges = v;
    *ptr = at;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuMemAddressFree(CUdeviceptr ptr, size_t size)
{
    CUresult r = state_enter();
    if (r)
        return r;
    for (fk_vrange **pv = &g_vranges; *pv; pv = &(*pv)->next) {
        fk_vrange *v = *pv;
        if (v->base != ptr || v->size != size)
            continue;
        for (size_t i = 0; i < g_nallocs; i++) /* the driver wants every mapping gone first */
            if (g_allocs[i]->kind == A_MAPPED && g_allocs[i]->base - v->base < v->size)
                return state_leave(CUDA_ERROR_INVALID_VALUE);
        munmap((void *)v->base, v->size);
        *pv = v->next;
        free(v);
        return state_leave(CUDA_SUCCESS);
    }
    return state_leave(CUDA_ERROR_INVALID_VALUE);
}

FK_API CUresult CUDAAPI cuMemMap(CUdeviceptr ptr, size_t size, size_t offset,
                                 CUmemGenericAllocationHandle handle, unsigned long long flags)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_alloc *h = NULL;
    for (fk_alloc *a = g_vmm; a; a = a->vnext)
        if (a->id == handle && !a->released)
            h = a;
    if (!h || flags || size == 0 || size % FK_VMM_GRANULARITY || offset % FK_VMM_GRANULARITY ||
        offset > h->size || size > h->size - offset || !vrange_of(ptr, size))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (mem_find(ptr) || mem_find(ptr + size - 1))
        return state_leave(CUDA_ERROR_ALREADY_MAPPED);
    g_map_attempts++;
    if (g_fail_map_after >= 0 && g_map_attempts > (uint64_t)g_fail_map_after)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    fk_alloc *m = malloc(sizeof *m);
    if (!m)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    *m = (fk_alloc){.base = ptr, .size = size, .kind = A_MAPPED, .dev = h->dev, .id = g_next_id++,
                    .memfd = -1, .handle = h};
    if (mmap((void *)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED, h->memfd, (off_t)offset) == MAP_FAILED ||
        !mem_insert(m)) {
        mmap((void *)ptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
        free(m);
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    h->maps++;
    return state_leave(CUDA_SUCCESS);
}

/* Every byte of [ptr, ptr+size) in mappings that start and end within it. */
static bool mapped_exactly(uintptr_t ptr, size_t size)
{
    for (uintptr_t p = ptr; p < ptr + size;) {
        fk_alloc *a = mem_find(p);
        if (!a || a->kind != A_MAPPED || a->base != p || a->size > ptr + size - p)
            return false;
        p += a->size;
    }
    return true;
}

FK_API CUresult CUDAAPI cuMemUnmap(CUdeviceptr ptr, size_t size)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (size == 0 || !mapped_exactly(ptr, size))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    for (uintptr_t p = ptr; p < ptr + size;) {
        fk_alloc *a = mem_find(p);
        p += a->size;
        g_cnt.free_calls++;
        mem_release(a);
    }
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc,
                                       size_t count)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!desc || count == 0 || size == 0 || !mapped_exactly(ptr, size))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    int prot = PROT_NONE;
    unsigned devices = 0, named = 0;
    for (size_t i = 0; i < count; i++) {
        if (desc[i].location.type != CU_MEM_LOCATION_TYPE_DEVICE || !dev_ok(desc[i].location.id))
            return state_leave(CUDA_ERROR_INVALID_DEVICE);
        named |= 1u << desc[i].location.id;
        if (desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_NONE)
            devices |= 1u << desc[i].location.id;
        if (desc[i].flags == CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
            prot = PROT_READ | PROT_WRITE;
        else if (desc[i].flags == CU_MEM_ACCESS_FLAGS_PROT_READ && prot == PROT_NONE)
            prot = PROT_READ;
    }
    /* Each device named gets its setting; the others keep theirs. The host sees the mapping
     * while any device may access it (this fake's one protection: the widest). */
    for (uintptr_t p = ptr; p < ptr + size;) {
        fk_alloc *a = mem_find(p);
        a->access = (a->access & ~named) | devices;
        if (devices)
            a->prot |= prot;
        if (!a->access)
            a->prot = PROT_NONE;
        if (mprotect((void *)a->base, a->size, a->prot) != 0)
            return state_leave(CUDA_ERROR_INVALID_VALUE);
        p += a->size;
    }
    return state_leave(CUDA_SUCCESS);
}

/* fakecuda_vmm_access: the devices that may access the mapping at p (0: no mapping). */
FK_API unsigned fakecuda_vmm_access(CUdeviceptr p)
{
    pthread_mutex_lock(&g_mu);
    fk_alloc *a = mem_find(p);
    unsigned m = a && a->kind == A_MAPPED ? a->access : 0;
    pthread_mutex_unlock(&g_mu);
    return m;
}

/* ================================================================ cuGetProcAddress rows */

#define MEM_PROCS(X)                                                                \
    X("cuMemAlloc", 3020, 0, cuMemAlloc_v2)                                         \
    X("cuMemAllocPitch", 3020, 0, cuMemAllocPitch_v2)                               \
    X("cuMemFree", 3020, 0, cuMemFree_v2)                                           \
    X("cuMemGetInfo", 3020, 0, cuMemGetInfo_v2)                                     \
    X("cuMemAllocManaged", 6000, 0, cuMemAllocManaged)                              \
    X("cuMemAllocAsync", 11020, 0, cuMemAllocAsync)                                 \
    X("cuMemAllocAsync", 11020, 1, cuMemAllocAsync_ptsz)                            \
    X("cuMemAllocFromPoolAsync", 11020, 0, cuMemAllocFromPoolAsync)                 \
    X("cuMemAllocFromPoolAsync", 11020, 1, cuMemAllocFromPoolAsync_ptsz)            \
    X("cuMemFreeAsync", 11020, 0, cuMemFreeAsync)                                   \
    X("cuMemFreeAsync", 11020, 1, cuMemFreeAsync_ptsz)                              \
    X("cuMemCreate", 10020, 0, cuMemCreate)                                         \
    X("cuMemRelease", 10020, 0, cuMemRelease)                                       \
    X("cuMemGetAllocationGranularity", 10020, 0, cuMemGetAllocationGranularity)   \
    X("cuMemAddressReserve", 10020, 0, cuMemAddressReserve)                         \
    X("cuMemAddressFree", 10020, 0, cuMemAddressFree)                               \
    X("cuMemMap", 10020, 0, cuMemMap)                                               \
    X("cuMemUnmap", 10020, 0, cuMemUnmap)                                           \
    X("cuMemSetAccess", 10020, 0, cuMemSetAccess)                                   \
    X("cuMemRetainAllocationHandle", 11000, 0, cuMemRetainAllocationHandle)         \
    X("cuMemExportToShareableHandle", 10020, 0, cuMemExportToShareableHandle)       \
    X("cuMemImportFromShareableHandle", 10020, 0, cuMemImportFromShareableHandle)
FK_PROC_TABLE(mem_procs, MEM_PROCS);
