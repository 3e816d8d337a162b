/* CUDA backend: the real driver, reached through libcuda.so.1 opened with the real dlsym (never
 * through our own dlsym/cuGetProcAddress hooks, which would route our calls back into the shim).
 *
 * Fences for the fast free mode are events recorded on the legacy default stream, which orders
 * after prior work on every blocking stream (the per-thread default streams included), plus on
 * every non-blocking stream the program created (the shim registers them as they are made). */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#include <cuda.h>

#include "gm_backend.h"
#include "gpumem.h"

/* ------------------------------------------------------------------ resolving the driver */

static gm_dlsym_fn real_dlsym_fn;
static void *driver_handle;

/* glibc versions under which dlsym has been published on the architectures we build for. */
static const char *const dlsym_versions[] = {"GLIBC_2.34", "GLIBC_2.2.5", "GLIBC_2.17", "GLIBC_2.0"};

/* This runs very early: a sanitizer runtime asks dlsym(RTLD_NEXT, ...) while setting itself up,
 * before its own dlopen and memory tracking work. So: no dlopen, no instrumentation. */
GM_NO_SANITIZE static gm_dlsym_fn resolve_dlsym(void)
{
    gm_dlsym_fn fn = NULL;
    for (size_t i = 0; i < sizeof dlsym_versions / sizeof *dlsym_versions && !fn; i++)
        fn = (gm_dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", dlsym_versions[i]);
    return fn;
}

/* No pthread_once: ThreadSanitizer's start-up reaches this through our dlsym before its
 * pthread_once interceptor can run (it segfaults). Threads that race here all resolve the same
 * address, so resolving twice is harmless; the atomics make the publication well defined. */
GM_NO_SANITIZE gm_dlsym_fn gm_real_dlsym(void)
{
    gm_dlsym_fn fn = __atomic_load_n(&real_dlsym_fn, __ATOMIC_ACQUIRE);
    if (!fn) {
        fn = resolve_dlsym();
        __atomic_store_n(&real_dlsym_fn, fn, __ATOMIC_RELEASE);
    }
    return fn;
}

void *gm_driver_handle(void)
{
    void *h = __atomic_load_n(&driver_handle, __ATOMIC_ACQUIRE);
    if (!h) {
        h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
        if (!h) return NULL;
        void *expected = NULL;
        if (!__atomic_compare_exchange_n(&driver_handle, &expected, h, false, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE)) {
            dlclose(h);
            h = expected;
        }
    }
    return h;
}

void *gm_driver_sym(const char *name)
{
    gm_dlsym_fn real = gm_real_dlsym();
    void *h = gm_driver_handle();
    return real && h ? real(h, name) : NULL;
}

/* ------------------------------------------------------------------ the entry points we use */

static struct {
    CUresult (*ctx_get_current)(CUcontext *);
    CUresult (*ctx_get_device)(CUdevice *);
    CUresult (*ctx_push)(CUcontext);
    CUresult (*ctx_pop)(CUcontext *);
    CUresult (*ctx_synchronize)(void);
    CUresult (*stream_synchronize)(CUstream);
    CUresult (*mem_alloc)(CUdeviceptr *, size_t);
    CUresult (*mem_free)(CUdeviceptr);
    CUresult (*mem_get_info)(size_t *, size_t *);
    CUresult (*event_create)(CUevent *, unsigned int);
    CUresult (*event_record)(CUevent, CUstream);
    CUresult (*event_query)(CUevent);
    CUresult (*event_synchronize)(CUevent);
    CUresult (*event_destroy)(CUevent);
    CUresult (*ctx_set_current)(CUcontext);
    CUresult (*host_alloc)(void **, size_t, unsigned);
    CUresult (*host_free)(void *);
    CUresult (*stream_create)(CUstream *, unsigned);
    CUresult (*stream_destroy)(CUstream);
    CUresult (*stream_wait_event)(CUstream, CUevent, unsigned);
    CUresult (*copy_h2d_async)(CUdeviceptr, const void *, size_t, CUstream);
    CUresult (*copy_d2h_async)(void *, CUdeviceptr, size_t, CUstream);
    CUresult (*copy_d2d_async)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
    CUresult (*pointer_get_attribute)(void *, CUpointer_attribute, CUdeviceptr);
    /* Optional: answered as unknown where the driver lacks them. */
    CUresult (*pointer_get_attributes)(unsigned, CUpointer_attribute *, void **, CUdeviceptr);
    CUresult (*stream_is_capturing)(CUstream, CUstreamCaptureStatus *);
    CUresult (*ctx_get_id)(CUcontext, unsigned long long *); /* CUDA 12.0 on */
    CUresult (*init)(unsigned);
    CUresult (*device_get_count)(int *);
    CUresult (*device_get)(CUdevice *, int);
    CUresult (*device_get_uuid)(CUuuid *, CUdevice);
    CUresult (*device_total_mem)(size_t *, CUdevice);
} drv;

static bool bind_optional(void)
{
    *(void **)&drv.pointer_get_attributes = gm_driver_sym("cuPointerGetAttributes");
    *(void **)&drv.stream_is_capturing = gm_driver_sym("cuStreamIsCapturing");
    *(void **)&drv.ctx_get_id = gm_driver_sym("cuCtxGetId");
    *(void **)&drv.init = gm_driver_sym("cuInit");
    *(void **)&drv.device_get_count = gm_driver_sym("cuDeviceGetCount");
    *(void **)&drv.device_get = gm_driver_sym("cuDeviceGet");
    *(void **)&drv.device_get_uuid = gm_driver_sym("cuDeviceGetUuid_v2");
    if (!drv.device_get_uuid) *(void **)&drv.device_get_uuid = gm_driver_sym("cuDeviceGetUuid");
    *(void **)&drv.device_total_mem = gm_driver_sym("cuDeviceTotalMem_v2");
    return true;
}

static bool bind_driver(void)
{
#define BIND(field, name) (*(void **)&drv.field = gm_driver_sym(name)) != NULL
    return BIND(ctx_get_current, "cuCtxGetCurrent") && BIND(ctx_get_device, "cuCtxGetDevice") &&
           BIND(ctx_push, "cuCtxPushCurrent_v2") && BIND(ctx_pop, "cuCtxPopCurrent_v2") &&
           BIND(ctx_synchronize, "cuCtxSynchronize") &&
           BIND(stream_synchronize, "cuStreamSynchronize") && BIND(mem_alloc, "cuMemAlloc_v2") &&
           BIND(mem_free, "cuMemFree_v2") && BIND(mem_get_info, "cuMemGetInfo_v2") &&
           BIND(event_create, "cuEventCreate") && BIND(event_record, "cuEventRecord") &&
           BIND(event_query, "cuEventQuery") && BIND(event_synchronize, "cuEventSynchronize") &&
           BIND(event_destroy, "cuEventDestroy_v2") && BIND(ctx_set_current, "cuCtxSetCurrent") &&
           BIND(host_alloc, "cuMemHostAlloc") && BIND(host_free, "cuMemFreeHost") &&
           BIND(stream_create, "cuStreamCreate") && BIND(stream_destroy, "cuStreamDestroy_v2") &&
           BIND(stream_wait_event, "cuStreamWaitEvent") &&
           BIND(copy_h2d_async, "cuMemcpyHtoDAsync_v2") &&
           BIND(copy_d2h_async, "cuMemcpyDtoHAsync_v2") &&
           BIND(copy_d2d_async, "cuMemcpyDtoDAsync_v2") &&
           BIND(pointer_get_attribute, "cuPointerGetAttribute") && bind_optional();
#undef BIND
}

/* ------------------------------------------------------------------ running in a context */

/* Makes `ctx` current for the duration of a call when it is not already. */
static bool enter_ctx(uintptr_t ctx, bool *pushed)
{
    CUcontext cur = NULL;
    *pushed = false;
    if (drv.ctx_get_current(&cur) == CUDA_SUCCESS && (uintptr_t)cur == ctx) return true;
    if (drv.ctx_push((CUcontext)ctx) != CUDA_SUCCESS) return false;
    *pushed = true;
    return true;
}

static void leave_ctx(bool pushed)
{
    CUcontext ignored;
    if (pushed) drv.ctx_pop(&ignored);
}

static __thread uintptr_t tl_ctx;
static __thread int tl_device;

static int cuda_current(uintptr_t *ctx, int *device)
{
    CUcontext cur = NULL;
    CUresult rc = drv.ctx_get_current(&cur);
    if (rc != CUDA_SUCCESS) return rc;
    if (!cur) return CUDA_ERROR_INVALID_CONTEXT;
    if ((uintptr_t)cur != tl_ctx) { /* cuCtxGetDevice only when the context changed */
        CUdevice dev = 0;
        rc = drv.ctx_get_device(&dev);
        if (rc != CUDA_SUCCESS) return rc;
        tl_ctx = (uintptr_t)cur;
        tl_device = dev;
    }
    *ctx = tl_ctx;
    *device = tl_device;
    return CUDA_SUCCESS;
}

static int cuda_alloc(uintptr_t ctx, size_t size, uintptr_t *out)
{
    bool pushed;
    if (!enter_ctx(ctx, &pushed)) return CUDA_ERROR_INVALID_CONTEXT;
    CUdeviceptr p = 0;
    CUresult rc = drv.mem_alloc(&p, size);
    leave_ctx(pushed);
    if (rc == CUDA_SUCCESS) *out = (uintptr_t)p;
    return rc;
}

static int cuda_free(uintptr_t ctx, uintptr_t ptr)
{
    bool pushed;
    if (!enter_ctx(ctx, &pushed)) return CUDA_ERROR_INVALID_CONTEXT;
    CUresult rc = drv.mem_free((CUdeviceptr)ptr);
    leave_ctx(pushed);
    return rc;
}

static int cuda_sync(uintptr_t ctx)
{
    bool pushed;
    if (!enter_ctx(ctx, &pushed)) return CUDA_ERROR_INVALID_CONTEXT;
    CUresult rc = drv.ctx_synchronize();
    leave_ctx(pushed);
    return rc;
}

static int cuda_sync_current(void) { return drv.ctx_synchronize(); }

static int cuda_stream_sync(uintptr_t ctx, uintptr_t stream)
{
    bool pushed;
    if (!enter_ctx(ctx, &pushed)) return CUDA_ERROR_INVALID_CONTEXT;
    CUresult rc = drv.stream_synchronize((CUstream)stream);
    leave_ctx(pushed);
    return rc;
}

static int cuda_mem_info(uintptr_t ctx, size_t *free_bytes, size_t *total_bytes)
{
    bool pushed;
    if (!enter_ctx(ctx, &pushed)) return CUDA_ERROR_INVALID_CONTEXT;
    CUresult rc = drv.mem_get_info(free_bytes, total_bytes);
    leave_ctx(pushed);
    return rc;
}

/* ------------------------------------------------------------------ streams the program made */

typedef struct stream_entry {
    uintptr_t stream;
    uintptr_t ctx;
    UT_hash_handle hh;
} stream_entry;

static pthread_mutex_t streams_lock = PTHREAD_MUTEX_INITIALIZER;
static stream_entry *streams;
static _Atomic size_t stream_count;

void gm_cuda_stream_created(uintptr_t ctx, uintptr_t stream, unsigned flags)
{
    /* Blocking streams are ordered behind the legacy stream's event already. */
    if (!(flags & CU_STREAM_NON_BLOCKING)) return;
    stream_entry *e = malloc(sizeof *e);
    if (!e) return;
    e->stream = stream;
    e->ctx = ctx;
    pthread_mutex_lock(&streams_lock);
    HASH_ADD(hh, streams, stream, sizeof e->stream, e);
    atomic_fetch_add(&stream_count, 1);
    pthread_mutex_unlock(&streams_lock);
}

void gm_cuda_stream_destroyed(uintptr_t stream)
{
    stream_entry *e = NULL;
    pthread_mutex_lock(&streams_lock);
    HASH_FIND(hh, streams, &stream, sizeof stream, e);
    if (e) {
        HASH_DELETE(hh, streams, e);
        atomic_fetch_sub(&stream_count, 1);
    }
    pthread_mutex_unlock(&streams_lock);
    free(e);
}

/* ------------------------------------------------------------------ fences */

struct gm_fence {
    uintptr_t ctx;
    size_t n, cap;
    CUevent events[];
};

/* Recycled events, so a fence costs event records, not event creations. */
static pthread_mutex_t spare_lock = PTHREAD_MUTEX_INITIALIZER;
static struct spare_event { CUevent ev; uintptr_t ctx; } spare[256];
static size_t nspare;

static CUresult event_take(uintptr_t ctx, CUevent *ev)
{
    pthread_mutex_lock(&spare_lock);
    for (size_t i = nspare; i-- > 0;) {
        if (spare[i].ctx == ctx) {
            *ev = spare[i].ev;
            spare[i] = spare[--nspare];
            pthread_mutex_unlock(&spare_lock);
            return CUDA_SUCCESS;
        }
    }
    pthread_mutex_unlock(&spare_lock);
    return drv.event_create(ev, CU_EVENT_DISABLE_TIMING);
}

static void event_give(uintptr_t ctx, CUevent ev)
{
    pthread_mutex_lock(&spare_lock);
    if (nspare < sizeof spare / sizeof *spare) {
        spare[nspare].ev = ev;
        spare[nspare].ctx = ctx;
        nspare++;
        ev = NULL;
    }
    pthread_mutex_unlock(&spare_lock);
    if (ev) drv.event_destroy(ev);
}

static CUresult fence_add(gm_fence *f, CUstream stream)
{
    if (f->n == f->cap) return CUDA_ERROR_OUT_OF_MEMORY;
    CUevent ev;
    CUresult rc = event_take(f->ctx, &ev);
    if (rc != CUDA_SUCCESS) return rc;
    rc = drv.event_record(ev, stream);
    if (rc != CUDA_SUCCESS) {
        event_give(f->ctx, ev);
        return rc;
    }
    f->events[f->n++] = ev;
    return CUDA_SUCCESS;
}

static void cuda_fence_destroy(gm_fence *f)
{
    for (size_t i = 0; i < f->n; i++) event_give(f->ctx, f->events[i]);
    free(f);
}

static int cuda_fence_record(uintptr_t ctx, gm_fence **out)
{
    size_t cap = 2 + atomic_load(&stream_count);
    gm_fence *f = malloc(sizeof *f + cap * sizeof(CUevent));
    if (!f) return CUDA_ERROR_OUT_OF_MEMORY;
    f->ctx = ctx;
    f->n = 0;
    f->cap = cap;
    bool pushed;
    if (!enter_ctx(ctx, &pushed)) {
        free(f);
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    CUresult rc = fence_add(f, CU_STREAM_LEGACY);
    pthread_mutex_lock(&streams_lock);
    for (stream_entry *e = streams; e && rc == CUDA_SUCCESS; e = e->hh.next)
        if (e->ctx == ctx) rc = fence_add(f, (CUstream)e->stream);
    pthread_mutex_unlock(&streams_lock);
    leave_ctx(pushed);
    if (rc != CUDA_SUCCESS) {
        cuda_fence_destroy(f);
        return rc;
    }
    *out = f;
    return CUDA_SUCCESS;
}

static int cuda_fence_query(gm_fence *f)
{
    for (size_t i = 0; i < f->n; i++) {
        CUresult rc = drv.event_query(f->events[i]);
        if (rc == CUDA_ERROR_NOT_READY) return 1;
        if (rc != CUDA_SUCCESS) return rc;
    }
    return 0;
}

static int cuda_fence_wait(gm_fence *f)
{
    for (size_t i = 0; i < f->n; i++) {
        CUresult rc = drv.event_synchronize(f->events[i]);
        if (rc != CUDA_SUCCESS) return rc;
    }
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------ transfers */

/* Runs `call` with `ctx` current; the result of the call, or INVALID_CONTEXT. */
#define IN_CTX(ctx, call) \
    do { \
        bool pushed_; \
        if (!enter_ctx((ctx), &pushed_)) return CUDA_ERROR_INVALID_CONTEXT; \
        CUresult rc_ = (call); \
        leave_ctx(pushed_); \
        return rc_; \
    } while (0)

static int cuda_host_alloc(uintptr_t ctx, size_t size, unsigned flags, void **out)
{
    IN_CTX(ctx, drv.host_alloc(out, size, flags));
}

static int cuda_host_free(uintptr_t ctx, void *p) { IN_CTX(ctx, drv.host_free(p)); }

static int cuda_stream_create(uintptr_t ctx, uintptr_t *out)
{
    IN_CTX(ctx, drv.stream_create((CUstream *)out, CU_STREAM_NON_BLOCKING));
}

static int cuda_stream_destroy(uintptr_t ctx, uintptr_t stream)
{
    IN_CTX(ctx, drv.stream_destroy((CUstream)stream));
}

static int cuda_event_create(uintptr_t ctx, uintptr_t *out)
{
    IN_CTX(ctx, drv.event_create((CUevent *)out, CU_EVENT_DISABLE_TIMING));
}

static int cuda_event_destroy(uintptr_t ctx, uintptr_t event)
{
    IN_CTX(ctx, drv.event_destroy((CUevent)event));
}

static int cuda_event_record(uintptr_t ctx, uintptr_t event, uintptr_t stream)
{
    IN_CTX(ctx, drv.event_record((CUevent)event, (CUstream)stream));
}

static int cuda_event_query(uintptr_t event)
{
    CUresult rc = drv.event_query((CUevent)event);
    return rc == CUDA_ERROR_NOT_READY ? 1 : (int)rc;
}

static int cuda_event_synchronize(uintptr_t event) { return drv.event_synchronize((CUevent)event); }

static int cuda_stream_wait_event(uintptr_t ctx, uintptr_t stream, uintptr_t event)
{
    IN_CTX(ctx, drv.stream_wait_event((CUstream)stream, (CUevent)event, 0));
}

static CUresult copy_async_now(gm_copy_dir dir, uintptr_t dst, uintptr_t src, size_t n, CUstream s)
{
    switch (dir) {
    case GM_COPY_H2D: return drv.copy_h2d_async((CUdeviceptr)dst, (const void *)src, n, s);
    case GM_COPY_D2H: return drv.copy_d2h_async((void *)dst, (CUdeviceptr)src, n, s);
    case GM_COPY_D2D: return drv.copy_d2d_async((CUdeviceptr)dst, (CUdeviceptr)src, n, s);
    default: return CUDA_ERROR_INVALID_VALUE;
    }
}

static int cuda_copy_async(uintptr_t ctx, gm_copy_dir dir, uintptr_t dst, uintptr_t src, size_t n,
                           uintptr_t stream)
{
    IN_CTX(ctx, copy_async_now(dir, dst, src, n, (CUstream)stream));
}

/* The driver answers INVALID_VALUE for host memory it never saw (neither pinned nor registered). */
static bool driver_knows(uintptr_t p)
{
    unsigned type = 0;
    return drv.pointer_get_attribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)p) ==
           CUDA_SUCCESS;
}

static int cuda_host_range_is_pageable(const void *p, size_t n)
{
    uintptr_t a = (uintptr_t)p;
    if (!a || !n) return 0;
    return !driver_knows(a) && !driver_knows(a + n - 1);
}

static int cuda_set_current(uintptr_t ctx) { return drv.ctx_set_current((CUcontext)ctx); }

static int cuda_address_range(uintptr_t p, uintptr_t *start, size_t *size, uintptr_t *owner)
{
    CUdeviceptr base = 0;
    size_t bytes = 0;
    CUcontext ctx = NULL;
    CUpointer_attribute attrs[3] = {CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                                    CU_POINTER_ATTRIBUTE_CONTEXT};
    void *data[3] = {&base, &bytes, &ctx};
    if (!drv.pointer_get_attributes) return CUDA_ERROR_NOT_FOUND;
    CUresult rc = drv.pointer_get_attributes(3, attrs, data, (CUdeviceptr)p);
    if (rc != CUDA_SUCCESS) return rc;
    if (!base) return CUDA_ERROR_INVALID_VALUE; /* host memory: no device range */
    *start = (uintptr_t)base;
    *size = bytes;
    if (ctx) *owner = (uintptr_t)ctx;
    return CUDA_SUCCESS;
}

static int cuda_stream_capturing(uintptr_t stream)
{
    CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
    if (!drv.stream_is_capturing) return CUDA_ERROR_NOT_FOUND;
    CUresult rc = drv.stream_is_capturing((CUstream)stream, &status);
    if (rc != CUDA_SUCCESS) return rc;
    return status == CU_STREAM_CAPTURE_STATUS_NONE ? 0 : 1;
}

static int cuda_ctx_id(uintptr_t ctx, unsigned long long *id)
{
    *id = 0;
    return drv.ctx_get_id ? drv.ctx_get_id((CUcontext)ctx, id) : CUDA_SUCCESS;
}

/* One query, with cuPointerGetAttribute where the plural is missing. */
static gm_memory_kind cuda_memory_kind(uintptr_t p)
{
    unsigned type = 0, managed = 0;
    CUpointer_attribute attrs[2] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_IS_MANAGED};
    void *data[2] = {&type, &managed};
    CUresult r = drv.pointer_get_attributes
                     ? drv.pointer_get_attributes(2, attrs, data, (CUdeviceptr)p)
                     : drv.pointer_get_attribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)p);
    if (r != CUDA_SUCCESS || type == 0) return GM_MEMKIND_UNKNOWN;
    if (managed || type == CU_MEMORYTYPE_DEVICE || type == CU_MEMORYTYPE_ARRAY) return GM_MEMKIND_DEVICE;
    return type == CU_MEMORYTYPE_HOST ? GM_MEMKIND_PINNED_HOST : GM_MEMKIND_UNKNOWN;
}

/* cuInit is idempotent and cheap once done; NVML callers (nvidia-smi) may not have called it. */
static int cuda_device_count(int *count)
{
    if (!drv.init || !drv.device_get_count) return CUDA_ERROR_NOT_FOUND;
    CUresult rc = drv.init(0);
    return rc != CUDA_SUCCESS ? (int)rc : (int)drv.device_get_count(count);
}

static int cuda_device_uuid(int device, unsigned char uuid[16])
{
    if (!drv.init || !drv.device_get || !drv.device_get_uuid) return CUDA_ERROR_NOT_FOUND;
    CUdevice dev;
    CUuuid id;
    CUresult rc = drv.init(0);
    if (rc == CUDA_SUCCESS) rc = drv.device_get(&dev, device);
    if (rc == CUDA_SUCCESS) rc = drv.device_get_uuid(&id, dev);
    if (rc == CUDA_SUCCESS) memcpy(uuid, id.bytes, 16);
    return (int)rc;
}

/* ------------------------------------------------------------------ VMM (expandable segments) */

static struct {
    pthread_once_t once;
    bool ok;
    CUresult (*device_get_attribute)(int *, CUdevice_attribute, CUdevice);
    CUresult (*granularity)(size_t *, const CUmemAllocationProp *, CUmemAllocationGranularity_flags);
    CUresult (*reserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*va_free)(CUdeviceptr, size_t);
    CUresult (*create)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
                       unsigned long long);
    CUresult (*release)(CUmemGenericAllocationHandle);
    CUresult (*map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
    CUresult (*unmap)(CUdeviceptr, size_t);
    CUresult (*set_access)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    /* IPC (optional: without them chunks are not exportable) */
    CUresult (*retain)(CUmemGenericAllocationHandle *, void *);
    CUresult (*export_fd)(void *, CUmemGenericAllocationHandle, CUmemAllocationHandleType,
                          unsigned long long);
    CUresult (*import_fd)(CUmemGenericAllocationHandle *, void *, CUmemAllocationHandleType);
    _Atomic int shareable; /* 1: chunks are created exportable; -1: the driver refused */
} vmm = {.once = PTHREAD_ONCE_INIT};

static void vmm_bind(void)
{
#define VBIND(field, name) (*(void **)&vmm.field = gm_driver_sym(name)) != NULL
    vmm.ok = VBIND(device_get_attribute, "cuDeviceGetAttribute") &&
             VBIND(granularity, "cuMemGetAllocationGranularity") &&
             VBIND(reserve, "cuMemAddressReserve") && VBIND(va_free, "cuMemAddressFree") &&
             VBIND(create, "cuMemCreate") && VBIND(release, "cuMemRelease") &&
             VBIND(map, "cuMemMap") && VBIND(unmap, "cuMemUnmap") &&
             VBIND(set_access, "cuMemSetAccess");
    bool ipc = VBIND(retain, "cuMemRetainAllocationHandle") &&
               VBIND(export_fd, "cuMemExportToShareableHandle") &&
               VBIND(import_fd, "cuMemImportFromShareableHandle");
#undef VBIND
    atomic_store(&vmm.shareable, ipc ? 1 : -1);
}

static CUmemAllocationProp vmm_prop(CUdevice dev)
{
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = dev;
    return prop;
}

/* The device of `ctx`, which is made current for the call (leave_ctx afterwards). */
static CUresult vmm_enter(uintptr_t ctx, bool *pushed, CUdevice *dev)
{
    pthread_once(&vmm.once, vmm_bind);
    if (!vmm.ok) return CUDA_ERROR_NOT_SUPPORTED;
    if (!enter_ctx(ctx, pushed)) return CUDA_ERROR_INVALID_CONTEXT;
    CUresult rc = drv.ctx_get_device(dev);
    if (rc != CUDA_SUCCESS) leave_ctx(*pushed);
    return rc;
}

static int cuda_vmm_granularity(uintptr_t ctx, size_t *g)
{
    bool pushed;
    CUdevice dev;
    CUresult rc = vmm_enter(ctx, &pushed, &dev);
    if (rc != CUDA_SUCCESS) return rc;
    int supported = 0;
    rc = vmm.device_get_attribute(&supported, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev);
    if (rc == CUDA_SUCCESS && !supported) rc = CUDA_ERROR_NOT_SUPPORTED;
    CUmemAllocationProp prop = vmm_prop(dev);
    if (rc == CUDA_SUCCESS) rc = vmm.granularity(g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
    leave_ctx(pushed);
    return rc;
}

static int cuda_va_reserve(uintptr_t ctx, size_t size, size_t align, uintptr_t *base)
{
    bool pushed;
    CUdevice dev;
    CUresult rc = vmm_enter(ctx, &pushed, &dev);
    if (rc != CUDA_SUCCESS) return rc;
    CUdeviceptr p = 0;
    rc = vmm.reserve(&p, size, align, 0, 0);
    leave_ctx(pushed);
    if (rc == CUDA_SUCCESS) *base = (uintptr_t)p;
    return rc;
}

static int cuda_va_free(uintptr_t ctx, uintptr_t base, size_t size)
{
    (void)ctx; /* a virtual range is the process's, not the context's */
    pthread_once(&vmm.once, vmm_bind);
    return vmm.ok ? vmm.va_free((CUdeviceptr)base, size) : CUDA_ERROR_NOT_SUPPORTED;
}

static CUmemAccessDesc access_for(int device)
{
    CUmemAccessDesc access;
    memset(&access, 0, sizeof access);
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    return access;
}

/* cuMemCreate, exportable (CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) while the driver allows
 * it: one that refuses the handle type (NOT_SUPPORTED, NOT_PERMITTED or INVALID_VALUE, as in some
 * containers) gets chunks without it from then on, which IPC cannot export. */
static CUresult vmm_create(CUmemGenericAllocationHandle *h, size_t size, CUdevice dev)
{
    CUmemAllocationProp prop = vmm_prop(dev);
    if (atomic_load(&vmm.shareable) > 0) {
        prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        CUresult rc = vmm.create(h, size, &prop, 0);
        if (rc != CUDA_ERROR_NOT_SUPPORTED && rc != CUDA_ERROR_NOT_PERMITTED && rc != CUDA_ERROR_INVALID_VALUE)
            return rc;
        int was = 1;
        if (atomic_compare_exchange_strong(&vmm.shareable, &was, -1))
            gm_log(GM_WARN, "GPUMEM_EXPANDABLE=1: the driver refuses exportable memory (cuMemCreate "
                   "with POSIX file descriptors: %d); blocks of expandable segments cannot be "
                   "exported through CUDA IPC", (int)rc);
        prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
    }
    return vmm.create(h, size, &prop, 0);
}

static int cuda_vmm_map(uintptr_t ctx, uintptr_t addr, size_t size, uint64_t peers)
{
    bool pushed;
    CUdevice dev;
    CUresult rc = vmm_enter(ctx, &pushed, &dev);
    if (rc != CUDA_SUCCESS) return rc;
    CUmemGenericAllocationHandle h = 0;
    rc = vmm_create(&h, size, dev);
    if (rc == CUDA_SUCCESS) {
        rc = vmm.map((CUdeviceptr)addr, size, 0, h, 0);
        if (rc == CUDA_SUCCESS) {
            CUmemAccessDesc access[65];
            size_t n = 0;
            access[n++] = access_for(dev);
            for (int d = 0; d < 64; d++)
                if ((peers >> d & 1) && d != dev) access[n++] = access_for(d);
            rc = vmm.set_access((CUdeviceptr)addr, size, access, n);
            if (rc != CUDA_SUCCESS) vmm.unmap((CUdeviceptr)addr, size);
        }
        vmm.release(h); /* the mapping holds the memory from now on */
    }
    leave_ctx(pushed);
    return rc;
}

static int cuda_vmm_grant(uintptr_t ctx, uintptr_t addr, size_t size, int device)
{
    (void)ctx;
    pthread_once(&vmm.once, vmm_bind);
    if (!vmm.ok) return CUDA_ERROR_NOT_SUPPORTED;
    CUmemAccessDesc access = access_for(device);
    return vmm.set_access((CUdeviceptr)addr, size, &access, 1);
}

static int cuda_vmm_unmap(uintptr_t ctx, uintptr_t addr, size_t size)
{
    (void)ctx;
    pthread_once(&vmm.once, vmm_bind);
    return vmm.ok ? vmm.unmap((CUdeviceptr)addr, size) : CUDA_ERROR_NOT_SUPPORTED;
}

static int cuda_vmm_revoke(uintptr_t ctx, uintptr_t addr, size_t size, int device)
{
    (void)ctx;
    pthread_once(&vmm.once, vmm_bind);
    if (!vmm.ok) return CUDA_ERROR_NOT_SUPPORTED;
    CUmemAccessDesc access = access_for(device);
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_NONE;
    return vmm.set_access((CUdeviceptr)addr, size, &access, 1);
}

static int cuda_vmm_export(uintptr_t ctx, uintptr_t addr, int *fd)
{
    bool pushed;
    CUdevice dev;
    CUresult rc = vmm_enter(ctx, &pushed, &dev);
    if (rc != CUDA_SUCCESS) return rc;
    CUmemGenericAllocationHandle h = 0;
    if (atomic_load(&vmm.shareable) < 0) rc = CUDA_ERROR_NOT_SUPPORTED;
    else rc = vmm.retain(&h, (void *)addr);
    if (rc == CUDA_SUCCESS) {
        rc = vmm.export_fd(fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
        vmm.release(h);
    }
    leave_ctx(pushed);
    return rc;
}

static int cuda_vmm_import(uintptr_t ctx, int fd, uintptr_t addr, size_t size)
{
    bool pushed;
    CUdevice dev;
    CUresult rc = vmm_enter(ctx, &pushed, &dev);
    if (rc != CUDA_SUCCESS) return rc;
    CUmemGenericAllocationHandle h = 0;
    rc = vmm.import_fd ? vmm.import_fd(&h, (void *)(intptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
                       : CUDA_ERROR_NOT_SUPPORTED;
    if (rc == CUDA_SUCCESS) {
        rc = vmm.map((CUdeviceptr)addr, size, 0, h, 0);
        if (rc == CUDA_SUCCESS) {
            CUmemAccessDesc access = access_for(dev);
            rc = vmm.set_access((CUdeviceptr)addr, size, &access, 1);
            if (rc != CUDA_SUCCESS) vmm.unmap((CUdeviceptr)addr, size);
        }
        vmm.release(h); /* the mapping holds the memory from now on */
    }
    leave_ctx(pushed);
    return rc;
}

static int cuda_device_total(int device, size_t *bytes)
{
    if (!drv.init || !drv.device_get || !drv.device_total_mem) return CUDA_ERROR_NOT_FOUND;
    CUdevice dev;
    CUresult rc = drv.init(0);
    if (rc == CUDA_SUCCESS) rc = drv.device_get(&dev, device);
    if (rc == CUDA_SUCCESS) rc = drv.device_total_mem(bytes, dev);
    return (int)rc;
}

static const gm_backend cuda_backend = {
    .name = "cuda",
    .current = cuda_current,
    .mem_alloc = cuda_alloc,
    .mem_free = cuda_free,
    .synchronize = cuda_sync,
    .synchronize_current = cuda_sync_current,
    .stream_synchronize = cuda_stream_sync,
    .mem_info = cuda_mem_info,
    .fence_record = cuda_fence_record,
    .fence_query = cuda_fence_query,
    .fence_wait = cuda_fence_wait,
    .fence_destroy = cuda_fence_destroy,
    .host_alloc = cuda_host_alloc,
    .host_free = cuda_host_free,
    .stream_create = cuda_stream_create,
    .stream_destroy = cuda_stream_destroy,
    .event_create = cuda_event_create,
    .event_destroy = cuda_event_destroy,
    .event_record = cuda_event_record,
    .event_query = cuda_event_query,
    .event_synchronize = cuda_event_synchronize,
    .stream_wait_event = cuda_stream_wait_event,
    .copy_async = cuda_copy_async,
    .host_range_is_pageable = cuda_host_range_is_pageable,
    .set_current = cuda_set_current,
    .address_range = cuda_address_range,
    .stream_capturing = cuda_stream_capturing,
    .ctx_id = cuda_ctx_id,
    .memory_kind = cuda_memory_kind,
    .device_count = cuda_device_count,
    .device_uuid = cuda_device_uuid,
    .device_total = cuda_device_total,
    .vmm_granularity = cuda_vmm_granularity,
    .va_reserve = cuda_va_reserve,
    .va_free = cuda_va_free,
    .vmm_map = cuda_vmm_map,
    .vmm_unmap = cuda_vmm_unmap,
    .vmm_grant = cuda_vmm_grant,
    .vmm_revoke = cuda_vmm_revoke,
    .vmm_export = cuda_vmm_export,
    .vmm_import = cuda_vmm_import,
};

static pthread_once_t bind_once = PTHREAD_ONCE_INIT;
static bool bound;

static void bind_once_fn(void) { bound = bind_driver(); }

const gm_backend *gm_cuda_backend(void)
{
    pthread_once(&bind_once, bind_once_fn);
    return bound ? &cuda_backend : NULL;
}
