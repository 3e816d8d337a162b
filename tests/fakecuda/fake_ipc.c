/* fake_ipc.c: cross-process memory handles (cuIpcGetMemHandle, cuIpcOpenMemHandle(_v2),
 * cuIpcCloseMemHandle).
 *
 * A handle names a whole cuMemAlloc allocation (an interior pointer gives the same handle, as on
 * the driver): magic, size at bytes 16..23 (where the driver keeps it), exporter pid, its memfd and
 * the allocation id. The importer opens /proc/<pid>/fd/<memfd>, checks the memfd's name against the
 * id, and maps it: an A_IPC allocation of its current context, refcounted per (pid, id). This only
 * works because cuMemAlloc memory is memfd-backed (fake_mem.c). */
#include "fake_internal.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define IPC_MAGIC "fakecuda-ipc-v1"

typedef struct {
    char magic[16];
    uint64_t size;
    int32_t pid, fd;
    uint64_t id;
    int32_t physical; /* the exporter's device, as physical number (ordinals differ per process) */
    char zero[20];
} ipc_handle;
_Static_assert(sizeof(ipc_handle) == CU_IPC_HANDLE_SIZE, "fake IPC handle size");

/* ================================================================ export */

FK_API CUresult CUDAAPI cuIpcGetMemHandle(CUipcMemHandle *handle, CUdeviceptr p)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    const fk_alloc *a = mem_find(p);
    if (!handle || !a || a->kind != A_DEVICE || a->freeing)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    ipc_handle h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, IPC_MAGIC, sizeof h.magic);
    h.size = a->size;
    h.pid = (int32_t)getpid();
    h.fd = a->memfd;
    h.id = a->id;
    h.physical = dev_physical(a->dev);
    memcpy(handle, &h, sizeof h);
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ import */

static fk_alloc *ipc_find_open(fk_ctx *c, int pid, uint64_t id)
{
    for (size_t i = 0; i < g_nallocs; i++) {
        fk_alloc *a = g_allocs[i];
        if (a->kind == A_IPC && a->ctx == c && a->ipc_pid == pid && a->ipc_id == id)
            return a;
    }
    return NULL;
}

/* The exporter's memfd, if it still is the allocation the handle names. */
static int ipc_open_exporter_fd(const ipc_handle *h)
{
    char path[64], link[128], want[96];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)h->pid, (int)h->fd);
    ssize_t n = readlink(path, link, sizeof link - 1);
    if (n <= 0)
        return -1;
    link[n] = 0;
    snprintf(want, sizeof want, "/memfd:fakecuda-%llu ", (unsigned long long)h->id);
    if (strncmp(link, want, strlen(want)) != 0)
        return -1;
    return open(path, O_RDWR | O_CLOEXEC);
}

/* Memory of another device is mapped into the current context, as the driver does, and reached
 * through peer access: CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS enables it as cuCtxEnablePeerAccess
 * would (fakecuda_launch_kernel_fill checks it). */
static CUresult ipc_map(fk_ctx *c, const ipc_handle *h, unsigned flags, CUdeviceptr *out)
{
    int home = dev_ordinal_of_physical(h->physical);
    if (home < 0) /* the fake's answer: a device this process does not see cannot be mapped */
        return CUDA_ERROR_INVALID_DEVICE;
    if (home != c->dev && (flags & CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS))
        c->peers |= 1u << home;
    int fd = ipc_open_exporter_fd(h);
    if (fd < 0)
        return CUDA_ERROR_INVALID_VALUE;
    struct stat st;
    size_t len = fk_round_up(h->size, (size_t)sysconf(_SC_PAGESIZE));
    void *m = fstat(fd, &st) == 0 && (uint64_t)st.st_size >= len
                  ? mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                  : MAP_FAILED;
    close(fd);
    if (m == MAP_FAILED)
        return CUDA_ERROR_INVALID_VALUE;
    fk_alloc *a = malloc(sizeof *a);
    if (a)
        *a = (fk_alloc){.base = (uintptr_t)m, .size = h->size, .kind = A_IPC, .dev = home,
                        .ctx = c, .id = g_next_id++, .map_len = len, .memfd = -1,
                        .ipc_pid = h->pid, .ipc_id = h->id, .ipc_refs = 1};
    if (!a || !mem_insert(a)) {
        free(a);
        munmap(m, len);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *out = a->base;
    return CUDA_SUCCESS;
}

static CUresult ipc_open(CUdeviceptr *out, CUipcMemHandle handle, unsigned flags)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    ipc_handle h;
    memcpy(&h, &handle, sizeof h);
    static const char zero[sizeof h.zero];
    if (!out || (flags & ~(unsigned)CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS) ||
        memcmp(h.magic, IPC_MAGIC, sizeof h.magic) != 0 || h.size == 0 || h.pid <= 0 ||
        h.physical < 0 || h.physical >= FK_MAX_DEVICES ||
        memcmp(h.zero, zero, sizeof zero) != 0) /* every byte is checked: garbage is refused */
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (h.pid == (int32_t)getpid()) /* the driver's answer for a handle of this process */
        return state_leave(CUDA_ERROR_INVALID_CONTEXT);
    fk_alloc *a = ipc_find_open(c, h.pid, h.id);
    if (a) {
        a->ipc_refs++;
        *out = a->base;
        return state_leave(CUDA_SUCCESS);
    }
    return state_leave(ipc_map(c, &h, flags, out));
}

FK_API CUresult CUDAAPI cuIpcOpenMemHandle_v2(CUdeviceptr *out, CUipcMemHandle handle,
                                              unsigned int flags)
{
    return ipc_open(out, handle, flags);
}

/* cuda.h maps cuIpcOpenMemHandle to the _v2; the old name is exported too. */
#undef cuIpcOpenMemHandle
CUresult CUDAAPI cuIpcOpenMemHandle(CUdeviceptr *out, CUipcMemHandle handle, unsigned int flags);
FK_API CUresult CUDAAPI cuIpcOpenMemHandle(CUdeviceptr *out, CUipcMemHandle handle,
                                           unsigned int flags)
{
    return ipc_open(out, handle, flags);
}

/* ================================================================ close */

FK_API CUresult CUDAAPI cuIpcCloseMemHandle(CUdeviceptr p)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    fk_alloc *a = mem_find_base(p);
    if (!a || a->kind != A_IPC)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (--a->ipc_refs == 0) {
        stream_wait_ctx(a->ctx); /* no queued copy may touch the mapping after it is gone */
        a = mem_find_base(p);
        if (a && a->kind == A_IPC && a->ipc_refs == 0)
            mem_release(a);
    }
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ cuGetProcAddress rows */

#define IPC_PROCS(X)                                                                \
    X("cuIpcGetMemHandle", 4010, 0, cuIpcGetMemHandle)                              \
    X("cuIpcOpenMemHandle", 4010, 0, cuIpcOpenMemHandle)                            \
    X("cuIpcOpenMemHandle", 11000, 0, cuIpcOpenMemHandle_v2)                        \
    X("cuIpcCloseMemHandle", 4010, 0, cuIpcCloseMemHandle)
FK_PROC_TABLE(ipc_procs, IPC_PROCS);
