/* fakecuda's private header: the types, the shared state and the internal functions that the
 * files of the fake driver share. Tests include fakecuda.h, never this.
 *
 * fakecuda is a host-memory fake of the CUDA driver API, built as libcuda.so.1, so that gpumem's
 * shim can be tested on machines without a GPU.
 *
 * Model
 *  - Device memory is host memory: a CUdeviceptr is the host address of an aligned_alloc block
 *    (512 B aligned, 2 MiB aligned from 2 MiB up), so tests may read and write it directly.
 *  - Each stream is a FIFO of work items run in order by its own worker thread (started on the
 *    first enqueue). Every context owns a legacy default stream. The per-thread default stream
 *    (handle CU_STREAM_PER_THREAD, or 0 passed to a _ptsz/_ptds entry point) is a separate
 *    stream per (thread, context), created on first use and retired when its thread exits.
 *    Streams are independent: the legacy stream does not implicitly order against other
 *    streams (no blocking/non-blocking distinction).
 *  - Synchronous copies and memsets are enqueued on the legacy (or, for _ptds, the per-thread)
 *    stream and waited for, so they run after everything queued there before them.
 *  - Pageable host memory (host memory the fake does not know: neither cuMemHostAlloc'd nor
 *    registered) behaves as the real driver documents: a copy into it (D2H, H2H), async or not,
 *    returns when the data is there; an async copy out of it snapshots the source at the call, so
 *    the call returns once the source has been consumed while the copy itself waits its turn.
 *  - Test knobs: a delay for every copy (a slow DMA) and injected copy errors (fakecuda.h).
 *  - cuMemFree_v2 waits for every stream of the allocation's context, as the real one does;
 *    cuMemFreeAsync frees when the stream reaches it.
 *  - Stream capture flips a per-stream state and hands out a graph (fake_graph.c) that stays
 *    empty: captured work still runs. While a capture in
 *    global (or, from the capturing thread, thread-local) mode is active, cuCtxSynchronize and
 *    cuMemFree_v2 fail with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED like the real driver, and so do
 *    cuStreamSynchronize/cuStreamQuery on the capturing stream.
 *  - One global mutex guards all state; g_done is broadcast whenever a work item completes.
 *  - fork(): the lock is held across it; the child gets a fresh, uninitialized driver.
 *  - Contexts are never freed (only marked dead) so stale handles are detected, not followed.
 *  - cuGetProcAddress hands out the addresses of this library's own exported functions through
 *    hidden aliases, so they equal what dlsym(libcuda.so.1, "<versioned name>") returns even
 *    when a preloaded shim interposes the same names. Internal code never calls an exported
 *    function, for the same reason.
 *
 * Files (each internal name starts with its file's prefix; g_ and tl_ are the shared state)
 *   fake_state.c    state_   the global state and its lock, the environment, fault injection, fork
 *   fake_device.c   dev_     cuInit, the driver version, devices and their attributes
 *   fake_ctx.c      ctx_     primary and created contexts, the per-thread context stack
 *   fake_stream.c   stream_  stream handles and lookup, per-thread default streams, capture, waits
 *   fake_work.c     work_    work items and the worker thread that runs each stream's queue
 *   fake_event.c    event_   events and cuStreamWaitEvent
 *   fake_mem.c      mem_     the allocation registry, memfd-backed device memory, alloc and free,
 *                            VMM handles
 *   fake_host.c     host_    pinned (cuMemHostAlloc) and registered host memory
 *   fake_ptr.c      ptr_     address-range and pointer-attribute queries
 *   fake_copy.c     copy_    the cuMemcpy* and cuMemset* family; its entry points are the rows of
 *                            fake_copy.def
 *   fake_ipc.c      ipc_     cuIpc*MemHandle between processes
 *   fake_array.c    array_   CUDA arrays and mipmapped arrays, their memory requirements
 *   fake_graph.c    graph_   graphs: memory allocation and free nodes, instantiation, launch, the
 *                            graphs of stream captures
 *   fake_error.c    error_   cuGetErrorName, cuGetErrorString
 *   fake_proc.c     proc_    cuGetProcAddress over the entry-point tables of all the files
 *   fake_testapi.c           the fakecuda_* entry points of fakecuda.h
 *
 * Locking: every entry point that needs cuInit starts with state_enter() (which takes g_mu) and
 * returns through state_leave(). Functions documented "with g_mu held" expect exactly that. */
#ifndef FAKE_INTERNAL_H
#define FAKE_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cuda.h>

#include "fakecuda.h"

/* Exported entry points. The library is built with -fvisibility=default too, so everything not
 * static is exported unless declared hidden: the internal declarations below are. */
#define FK_API __attribute__((visibility("default")))

#define FK_MAX_DEVICES 8
#define FK_STACK_MAX 64
#define FK_SMALL_ALIGN ((size_t)512)
#define FK_BIG_ALIGN ((size_t)2 << 20)
#define FK_PITCH_ALIGN ((size_t)512)
#define FK_VMM_GRANULARITY ((size_t)2 << 20)
#define FK_DRIVER_VERSION 13000

/* ================================================================ types */

/* A_REGISTERED: program memory pinned by cuMemHostRegister (never freed by the fake).
 * A_IPC: another process's A_DEVICE memory mapped by cuIpcOpenMemHandle (freed by the close).
 * A_GRAPH: the memory of a graph allocation node (fake_graph.c says when it is live and freed). */
/* A_VMM: a cuMemCreate handle (memfd-backed, in g_vmm, not in g_allocs). A_MAPPED: one cuMemMap
 * of a handle into a cuMemAddressReserve range (in g_allocs; its memory is the handle's). */
typedef enum { A_DEVICE, A_MANAGED, A_ASYNC, A_HOST, A_VMM, A_REGISTERED, A_IPC, A_GRAPH, A_MAPPED } fk_akind;

typedef struct fk_ctx {
    struct fk_ctx *next; /* g_ctxs; never unlinked */
    int dev;
    bool primary;
    bool alive;          /* created and not destroyed; primary: retained at least once */
    int prim_refs;
    unsigned flags;
    struct fk_stream *legacy;
    uint64_t id;         /* cuCtxGetId: new at every activation, so a reset primary gets a new one */
    unsigned peers;      /* contexts' devices this context enabled peer access to (bit per device) */
} fk_ctx;

typedef struct fk_alloc {
    uintptr_t base;
    size_t size;         /* what was asked for (pitch * height for pitched) */
    fk_akind kind;
    int dev;
    fk_ctx *ctx;         /* NULL for cuMemCreate handles */
    bool freeing;        /* a free is under way (async free queued, or cuMemFree waiting) */
    uint64_t id;         /* unique, to recognise the record after the lock was dropped */
    struct fk_alloc *vnext; /* g_vmm list (cuMemCreate handles only) */
    size_t map_len;      /* A_DEVICE, A_IPC: the memory is an mmap of this length (IPC section) */
    int memfd;           /* A_DEVICE: the memfd behind it, open while it lives (another process
                          * maps it through /proc/<pid>/fd/<memfd>) */
    bool sync_memops;    /* cuPointerSetAttribute(CU_POINTER_ATTRIBUTE_SYNC_MEMOPS) */
    int ipc_pid;         /* A_IPC: the exporter and its allocation id (the key of a reopen); its
                          * `dev` is the exporter's device (where the memory is), its `ctx` the
                          * importer's context (whose device reaches it through peer access) */
    uint64_t ipc_id;
    unsigned ipc_refs;   /* A_IPC: opens not yet closed */
    void *graph_owner;   /* A_GRAPH: the graph of its allocation node; NULL once destroyed */
    void *graph_free_node; /* A_GRAPH: the free node for it, in any graph; NULL: none */
    bool graph_live;     /* A_GRAPH: a launch made it and nothing freed it since */
    bool graph_freed_in_owner; /* A_GRAPH: its free node is in its own graph */
    unsigned maps;       /* A_VMM: live cuMemMap mappings of the handle */
    bool released;       /* A_VMM: the last handle reference released; freed with the last mapping */
    unsigned handle_refs; /* A_VMM: cuMemCreate/Import and cuMemRetainAllocationHandle not released */
    bool shareable;      /* A_VMM: created with requestedHandleTypes POSIX_FILE_DESCRIPTOR */
    bool imported;       /* A_VMM: cuMemImportFromShareableHandle (another process's memory) */
    struct fk_alloc *handle; /* A_MAPPED: the A_VMM handle mapped */
    unsigned access;     /* A_MAPPED: devices given access by cuMemSetAccess (bit per device) */
    int prot;            /* A_MAPPED: the mprotect of the mapping */
} fk_alloc;

typedef struct fk_event {
    struct fk_event *next;
    fk_ctx *ctx;
    uint64_t rec_gen;    /* bumped by each record */
    uint64_t done_gen;   /* highest record whose marker has run */
    int refs;            /* the handle + pending markers and waiters */
    bool destroyed;
} fk_event;

typedef enum { W_COPY, W_SET8, W_SET16, W_SET32, W_FILL, W_EVENT, W_WAIT, W_FREE } fk_wkind;

typedef struct fk_work {
    struct fk_work *next;
    fk_wkind kind;
    uint64_t seq;
    uintptr_t dst, src;
    size_t n;            /* bytes (W_SET16/W_SET32: 16-/32-bit words) */
    uint32_t val;
    unsigned delay_us;
    fk_event *ev;
    uint64_t gen;
    uint64_t alloc_id;   /* W_FREE: which allocation at dst */
    bool chk_dst, chk_src;
    void *owned;         /* W_COPY from a snapshot of pageable memory: freed once it has run */
} fk_work;

typedef struct fk_stream {
    struct fk_stream *next; /* g_streams */
    uint64_t uid;
    fk_ctx *ctx;
    fk_work *head, *tail;
    uint64_t enq_seq, done_seq;
    pthread_cond_t cv;   /* wakes the worker */
    bool worker, stop, destroyed, legacy;
    const void *owner;   /* per-thread default stream: the owning thread's token */
    bool capturing;
    CUgraph capture_graph; /* what the capture builds (cuStreamGetCaptureInfo, EndCapture) */
    uint64_t capture_id;
    CUstreamCaptureMode capture_mode;
    const void *capture_thread;
} fk_stream;

typedef struct fk_device {
    fk_ctx *primary;
    unsigned primary_flags;
    uint64_t in_use;
} fk_device;

/* One cuGetProcAddress answer: base name, the CUDA version that introduced this variant (those
 * of cudaTypedefs.h, PFN_<name>_v<version>), per-thread-stream variant or not, and the function. */
typedef struct fk_proc {
    const char *name;
    int version;
    bool ptds;
    void (*fn)(void);
} fk_proc;

/* Each file ends with the list of the entry points it defines, as rows
 * X("<base name>", <version>, <per-thread: 0/1>, <exported function>), and turns it into its
 * table with FK_PROC_TABLE. The table must be built in the file that defines the functions: the
 * hidden alias it takes each address through has to be in the same translation unit as its
 * target. Taking the alias's address binds to this library even when a preloaded shim
 * interposes the exported name, so cuGetProcAddress agrees with dlsym on libcuda.so.1. */
#define FK_PROC_ALIAS(name, ver, ptds, fn) \
    extern __typeof__(fn) fn##__self __attribute__((alias(#fn), visibility("hidden")));
#define FK_PROC_ROW(name, ver, ptds, fn) {name, ver, ptds, (void (*)(void))fn##__self},
#define FK_PROC_TABLE(table, LIST) \
    LIST(FK_PROC_ALIAS)            \
    const fk_proc table[] = {LIST(FK_PROC_ROW){NULL, 0, false, NULL}}

static inline size_t fk_round_up(size_t v, size_t a)
{
    return (v + a - 1) / a * a;
}

/* Everything below is internal to the library: not exported despite -fvisibility=default. */
#pragma GCC visibility push(hidden)

/* ================================================================ fake_state.c: shared state */

extern pthread_mutex_t g_mu;           /* the one lock: guards everything below */
extern pthread_cond_t g_done;          /* broadcast whenever a work item completes */
extern atomic_bool g_inited;           /* cuInit succeeded (and no fork since) */
extern int g_ndev;                     /* FAKECUDA_DEVICES */
extern uint64_t g_capacity;            /* FAKECUDA_MEM, per device */
extern long g_fail_after;              /* FAKECUDA_FAIL_ALLOC_AFTER, -1 = never */
extern long g_fail_map_after;          /* FAKECUDA_FAIL_MAP_AFTER: cuMemMap calls before faults, -1 never */
extern uint64_t g_map_attempts;
extern bool g_no_vmm;                  /* FAKECUDA_NO_VMM: VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED is 0 */
extern bool g_no_shareable;            /* FAKECUDA_NO_SHAREABLE: cuMemCreate refuses handle types */
extern uint64_t g_alloc_attempts;      /* device allocations tried since the count restarted */
extern fk_device g_dev[FK_MAX_DEVICES];
extern fk_ctx *g_ctxs;                 /* every context ever made (fake_ctx.c) */
extern fk_stream *g_streams;           /* live and draining streams (fake_stream.c) */
extern fk_event *g_events;             /* events with a reference left (fake_event.c) */
extern fk_alloc **g_allocs;            /* sorted by base: interior pointer lookups (fake_mem.c) */
extern size_t g_nallocs, g_allocs_cap;
extern fk_alloc *g_vmm;                /* cuMemCreate handles (fake_mem.c) */
extern uint64_t g_next_id;             /* allocation, stream and context ids */
extern fakecuda_counters_t g_cnt;      /* fakecuda_counters */
extern uint64_t g_copies_pending;      /* W_COPY items queued and not yet run */
extern unsigned g_copy_delay_us;       /* fakecuda_set_copy_delay */
extern unsigned g_copy_fail_skip, g_copy_fail_count; /* fakecuda_fail_copies */
extern CUresult g_copy_fail_code;

extern __thread fk_ctx *tl_stack[FK_STACK_MAX]; /* the calling thread's context stack */
extern __thread int tl_depth;
extern __thread char tl_token; /* its address names the calling thread while it lives */

#define LOCK() pthread_mutex_lock(&g_mu)
#define UNLOCK() pthread_mutex_unlock(&g_mu)

CUresult state_enter(void);
CUresult state_leave(CUresult r);
void state_env_load(bool force);
bool state_alloc_fault(void);
CUresult state_copy_fault(void);

/* ================================================================ fake_device.c */

bool dev_ok(CUdevice d);
int dev_physical(CUdevice dev);           /* FAKECUDA_VISIBLE: the physical device of an ordinal */
int dev_ordinal_of_physical(int physical); /* and back; -1 when this process does not see it */

/* ================================================================ fake_ctx.c */

CUresult ctx_current(fk_ctx **out);
CUresult ctx_arg(CUcontext h, fk_ctx **out);

/* ================================================================ fake_stream.c */

fk_stream *stream_new(fk_ctx *c, bool legacy, const void *owner);
void stream_unlink_free(fk_stream *s);
void stream_retire(fk_stream *s);
CUresult stream_resolve(CUstream h, bool ptds, fk_stream **out);
void stream_wait_until(fk_stream *s, uint64_t target);
CUresult stream_wait_ctx(fk_ctx *c);
bool stream_capture_forbids_sync(void);

/* ================================================================ fake_work.c */

CUresult work_enqueue(fk_stream *s, const fk_work *tmpl, uint64_t *seq_out);

/* ================================================================ fake_event.c */

void event_unref(fk_event *e);
void event_free_ctx(fk_ctx *c);

/* ================================================================ fake_mem.c */

fk_alloc *mem_find(uintptr_t p);
fk_alloc *mem_find_base(uintptr_t p);
bool mem_insert(fk_alloc *a);
bool mem_range_ok(uintptr_t p, size_t n);
bool mem_counts_as_device(fk_akind k);
void mem_release(fk_alloc *a);
void mem_free_ctx(fk_ctx *c);
void array_free_ctx(fk_ctx *c);      /* fake_array.c */
void array_forget_in_child(void);
CUresult mem_alloc_graph(int dev, fk_ctx *c, size_t size, fk_alloc **out);

/* ================================================================ fake_graph.c */

CUgraph graph_new_for_capture(void);
bool graph_valid(CUgraph h);
CUresult graph_mem_free(fk_alloc *a);      /* cuMemFree(Async) of an A_GRAPH allocation */
void graph_mem_free_by_node(fk_alloc *a);
void graph_forget_in_child(void);

/* ================================================================ fake_copy.c */

fk_work copy_set_work(fk_wkind kind, uintptr_t dst, uint32_t v, size_t n);
CUresult copy_submit(CUstream h, bool ptds, fk_work w, bool sync);

/* ================================================================ entry-point tables (fake_proc.c) */

extern const fk_proc dev_procs[], ctx_procs[], stream_procs[], event_procs[], mem_procs[],
    host_procs[], ptr_procs[], copy_procs[], ipc_procs[], error_procs[], proc_procs[], array_procs[],
    graph_procs[];

#pragma GCC visibility pop

#endif
