/* api_cudart_style: a program NOT linked with -lcuda that finds the driver the way cudart does:
 * dlopen("libcuda.so.1"), dlsym(h, "cuGetProcAddress_v2"), then every entry point by base name
 * through it (CUDA 13000, flags 0, or 2 = per-thread default stream for the stream-ordered and
 * copy calls), after re-fetching cuGetProcAddress itself through cuGetProcAddress_v2. The
 * allocation entry points obtained so must be the shim's hooks (counted once, pooled); names the
 * shim does not hook must come back as the fake's own functions; and dlsym(RTLD_NEXT, ...) from
 * this program must keep its meaning although the shim interposes dlsym. */
#include <criterion/criterion.h>

#include "api_common.h"
#include "fakecuda.h"

#define OK(call) cr_assert_eq((call), CUDA_SUCCESS, "%s", #call)
#define ERR(call, code) cr_assert_eq((call), (code), "%s", #call)

typedef CUresult (*getproc_v2_fn)(const char *, void **, int, cuuint64_t,
                                  CUdriverProcAddressQueryResult *);
typedef CUresult (*getproc_v1_fn)(const char *, void **, int, cuuint64_t);
typedef CUresult (*init_fn)(unsigned);
typedef CUresult (*device_get_fn)(CUdevice *, int);
typedef CUresult (*retain_fn)(CUcontext *, CUdevice);
typedef CUresult (*set_current_fn)(CUcontext);
typedef CUresult (*alloc_fn)(CUdeviceptr *, size_t);
typedef CUresult (*free_fn)(CUdeviceptr);
typedef CUresult (*htod_fn)(CUdeviceptr, const void *, size_t);
typedef CUresult (*dtoh_fn)(void *, CUdeviceptr, size_t);
typedef CUresult (*alloc_async_fn)(CUdeviceptr *, size_t, CUstream);
typedef CUresult (*free_async_fn)(CUdeviceptr, CUstream);
typedef CUresult (*stream_sync_fn)(CUstream);
typedef CUresult (*device_name_fn)(char *, int, CUdevice);
typedef void (*counters_fn)(fakecuda_counters_t *);

static void *g_drv;              /* dlopen("libcuda.so.1") */
static getproc_v2_fn g_getproc;  /* cuGetProcAddress as re-fetched through itself */
static counters_fn g_counters;

/* dlsym into a function pointer without a pedantic object/function cast. */
static void *sym(void *h, const char *name)
{
    return dlsym(h, name);
}

#define AS(type, p) ((type)(uintptr_t)(p))

static void *proc(const char *name, cuuint64_t flags)
{
    void *fn = NULL;
    CUdriverProcAddressQueryResult q = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    cr_assert_eq(g_getproc(name, &fn, 13000, flags, &q), CUDA_SUCCESS, "cuGetProcAddress(%s)", name);
    cr_assert_eq(q, CU_GET_PROC_ADDRESS_SUCCESS, "cuGetProcAddress(%s) status", name);
    cr_assert_not_null(fn, "%s", name);
    return fn;
}

/* The file a function lives in. */
static const char *object_of(void *fn)
{
    Dl_info info;
    if (!fn || !dladdr(fn, &info) || !info.dli_fname)
        return "?";
    return info.dli_fname;
}

static bool from_shim(void *fn)
{
    return strstr(object_of(fn), "libgpumem_shim") != NULL;
}

static bool from_fake(void *fn)
{
    return strstr(object_of(fn), "libcuda.so") != NULL;
}

static fakecuda_counters_t counters(void)
{
    fakecuda_counters_t c;
    g_counters(&c);
    return c;
}

/* The cudart sequence, up to a current primary context. */
static void bootstrap(void)
{
    g_drv = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    cr_assert_not_null(g_drv, "dlopen(libcuda.so.1): %s", dlerror());
    getproc_v2_fn first = AS(getproc_v2_fn, sym(g_drv, "cuGetProcAddress_v2"));
    cr_assert_not_null(first);
    cr_assert(from_shim((void *)(uintptr_t)first), "dlsym(cuGetProcAddress_v2) is %s's",
              object_of((void *)(uintptr_t)first));
    void *again = NULL;
    CUdriverProcAddressQueryResult q;
    OK(first("cuGetProcAddress", &again, 13000, 0, &q));
    cr_assert_eq(q, CU_GET_PROC_ADDRESS_SUCCESS);
    cr_assert(from_shim(again), "cuGetProcAddress re-fetched through itself is %s's, not the shim's",
              object_of(again));
    g_getproc = AS(getproc_v2_fn, again);
    g_counters = AS(counters_fn, sym(g_drv, "fakecuda_counters"));
    cr_assert_not_null(g_counters);

    CUdevice dev;
    CUcontext ctx;
    OK(AS(init_fn, proc("cuInit", 0))(0));
    OK(AS(device_get_fn, proc("cuDeviceGet", 0))(&dev, 0));
    OK(AS(retain_fn, proc("cuDevicePrimaryCtxRetain", 0))(&ctx, dev));
    OK(AS(set_current_fn, proc("cuCtxSetCurrent", 0))(ctx));
}

Test(cudart_style, hooked_entry_points_are_the_shims)
{
    bootstrap();
    static const struct { const char *base, *exported; cuuint64_t flags; } hooked[] = {
        {"cuMemAlloc", "cuMemAlloc_v2", 0},
        {"cuMemAlloc", "cuMemAlloc_v2", 2}, /* no _ptsz variant: the plain one */
        {"cuMemFree", "cuMemFree_v2", 0},
        {"cuMemAllocPitch", "cuMemAllocPitch_v2", 0},
        {"cuMemAllocManaged", "cuMemAllocManaged", 0},
        {"cuMemGetInfo", "cuMemGetInfo_v2", 0},
        {"cuDeviceTotalMem", "cuDeviceTotalMem_v2", 0},
        {"cuArray3DCreate", "cuArray3DCreate_v2", 0},
        {"cuMemGetAddressRange", "cuMemGetAddressRange_v2", 0},
        {"cuPointerGetAttribute", "cuPointerGetAttribute", 0},
        {"cuMemAllocAsync", "cuMemAllocAsync", 0},
        {"cuMemAllocAsync", "cuMemAllocAsync_ptsz", 2},
        {"cuMemFreeAsync", "cuMemFreeAsync", 0},
        {"cuMemFreeAsync", "cuMemFreeAsync_ptsz", 2},
        {"cuMemcpyHtoD", "cuMemcpyHtoD_v2", 0},
        {"cuMemcpyHtoD", "cuMemcpyHtoD_v2_ptds", 2},
        {"cuMemcpyDtoH", "cuMemcpyDtoH_v2_ptds", 2},
        {"cuMemcpyAsync", "cuMemcpyAsync_ptsz", 2},
        {"cuStreamBeginCapture", "cuStreamBeginCapture_v2", 0},
        {"cuStreamBeginCapture", "cuStreamBeginCapture_v2_ptsz", 2},
        {"cuStreamEndCapture", "cuStreamEndCapture_ptsz", 2},
        {"cuCtxDestroy", "cuCtxDestroy_v2", 0},
        {"cuDevicePrimaryCtxReset", "cuDevicePrimaryCtxReset_v2", 0},
        {"cuGetProcAddress", "cuGetProcAddress_v2", 0},
    };
    for (size_t i = 0; i < sizeof hooked / sizeof *hooked; i++) {
        void *fn = proc(hooked[i].base, hooked[i].flags);
        void *exported = sym(g_drv, hooked[i].exported);
        cr_assert(from_shim(fn), "cuGetProcAddress(%s, flags %llu) is %s's, not the shim's",
                  hooked[i].base, (unsigned long long)hooked[i].flags, object_of(fn));
        cr_assert_eq(fn, exported, "cuGetProcAddress(%s, flags %llu) != dlsym(%s)",
                     hooked[i].base, (unsigned long long)hooked[i].flags, hooked[i].exported);
    }
    /* Two variants of one name are two different hooks. */
    cr_assert_neq(proc("cuMemcpyHtoD", 0), proc("cuMemcpyHtoD", 2));
    /* The old 4-argument resolver is hooked too and agrees. */
    getproc_v1_fn v1 = AS(getproc_v1_fn, sym(g_drv, "cuGetProcAddress"));
    cr_assert(from_shim((void *)(uintptr_t)v1));
    void *fn = NULL;
    OK(v1("cuMemAlloc", &fn, 13000, 0));
    cr_assert_eq(fn, proc("cuMemAlloc", 0));
}

Test(cudart_style, unhooked_names_are_the_drivers_own)
{
    bootstrap();
    void *fake = dlopen(FAKECUDA_PATH, RTLD_NOW | RTLD_NOLOAD);
    cr_assert_not_null(fake, "the fake at %s is the libcuda.so.1 that was loaded", FAKECUDA_PATH);
    static const struct { const char *base, *exported; cuuint64_t flags; } plain[] = {
        {"cuDeviceGetName", "cuDeviceGetName", 0},
        {"cuCtxSynchronize", "cuCtxSynchronize_v2", 0}, /* CUDA 13's variant */
        {"cuStreamSynchronize", "cuStreamSynchronize_ptsz", 2},
        {"cuStreamQuery", "cuStreamQuery_ptsz", 2},
        {"cuCtxGetCurrent", "cuCtxGetCurrent", 0},
        {"cuDeviceGetAttribute", "cuDeviceGetAttribute", 0}, /* cuDeviceTotalMem is hooked since issue 12 */
    };
    for (size_t i = 0; i < sizeof plain / sizeof *plain; i++) {
        void *fn = proc(plain[i].base, plain[i].flags);
        void *own = sym(fake, plain[i].exported);
        cr_assert_not_null(own);
        cr_assert_eq(fn, own, "cuGetProcAddress(%s) is not the driver's %s (it is %s's)",
                     plain[i].base, plain[i].exported, object_of(fn));
        cr_assert(from_fake(fn), "%s lives in %s", plain[i].base, object_of(fn));
    }
    char name[64] = "";
    OK(AS(device_name_fn, proc("cuDeviceGetName", 0))(name, sizeof name, 0));
    cr_assert_str_eq(name, "FakeCUDA Device 0");
    /* A handle without the symbol gets no hook either. */
    void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    cr_assert_not_null(libc);
    cr_assert_null(sym(libc, "cuMemAlloc_v2"), "libc has no cuMemAlloc_v2");
    cr_assert_null(sym(g_drv, "cuNoSuchFunction"));
    dlclose(libc);
    dlclose(fake);
}

Test(cudart_style, rtld_next_keeps_its_meaning)
{
    void *next_malloc = dlsym(RTLD_NEXT, "malloc");
    cr_assert_not_null(next_malloc, "dlsym(RTLD_NEXT, malloc)");
    cr_assert_eq(next_malloc, dlsym(RTLD_DEFAULT, "malloc"));
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__) /* they interpose malloc */
    cr_assert(strstr(object_of(next_malloc), "libc.so"), "RTLD_NEXT malloc is %s's",
              object_of(next_malloc));
#endif
    void *next_getpid = dlsym(RTLD_NEXT, "getpid");
    cr_assert(strstr(object_of(next_getpid), "libc.so"), "RTLD_NEXT getpid is %s's",
              object_of(next_getpid));
    cr_assert_eq(AS(pid_t (*)(void), next_getpid)(), getpid());
    /* The search starts after the caller: from this program the next dlsym is the shim's own
     * (preloaded right after the executable); a dlsym forwarded from inside the shim would have
     * found libc's instead. */
    void *next_dlsym = dlsym(RTLD_NEXT, "dlsym");
    cr_assert(from_shim(next_dlsym), "dlsym(RTLD_NEXT, \"dlsym\") from the program is %s's",
              object_of(next_dlsym));
    cr_assert_eq(next_dlsym, (void *)(uintptr_t)&dlsym);
    /* RTLD_NEXT for a hooked name answers with the hook. */
    void *next_alloc = dlsym(RTLD_NEXT, "cuMemAlloc_v2");
    cr_assert(from_shim(next_alloc), "dlsym(RTLD_NEXT, cuMemAlloc_v2) is %s's", object_of(next_alloc));
}

Test(cudart_style, allocations_counted_once_whichever_path)
{
    bootstrap();
    alloc_fn by_proc = AS(alloc_fn, proc("cuMemAlloc", 0));
    alloc_fn by_proc_pt = AS(alloc_fn, proc("cuMemAlloc", 2));
    alloc_fn by_dlsym = AS(alloc_fn, sym(g_drv, "cuMemAlloc_v2"));
    alloc_fn by_default = AS(alloc_fn, dlsym(RTLD_DEFAULT, "cuMemAlloc_v2"));
    free_fn release = AS(free_fn, proc("cuMemFree", 0));
    htod_fn htod = AS(htod_fn, proc("cuMemcpyHtoD", 2));
    dtoh_fn dtoh = AS(dtoh_fn, proc("cuMemcpyDtoH", 2));
    alloc_async_fn alloc_async = AS(alloc_async_fn, proc("cuMemAllocAsync", 2));
    free_async_fn free_async = AS(free_async_fn, proc("cuMemFreeAsync", 2));
    stream_sync_fn sync_pt = AS(stream_sync_fn, proc("cuStreamSynchronize", 2));
    getproc_v1_fn v1 = AS(getproc_v1_fn, sym(g_drv, "cuGetProcAddress"));
    void *fn = NULL;
    OK(v1("cuMemAlloc", &fn, 12000, 0));
    alloc_fn by_v1 = AS(alloc_fn, fn);
    alloc_fn paths[] = {by_proc, by_proc_pt, by_dlsym, by_default, by_v1};
    const int per_path = 40, npaths = (int)(sizeof paths / sizeof *paths);

    fakecuda_counters_t k0 = counters();
    static CUdeviceptr p[200];
    unsigned char buf[4096], back[4096];
    for (int i = 0; i < npaths * per_path; i++) {
        size_t n = 64 + (size_t)(i * 37) % 4000;
        OK(paths[i / per_path](&p[i], n));
        api_fill_pattern(buf, n, (uint32_t)i);
        OK(htod(p[i], buf, n));
        OK(dtoh(back, p[i], n));
        cr_assert_eq(api_check_pattern(back, n, (uint32_t)i), n, "block %d", i);
        gpumem_stats st;
        cr_assert(api_stats(&st));
        if (st.allocations != (uint64_t)i + 1)
            cr_assert_fail("after %d allocations through path %d the shim counted %llu", i + 1,
                           i / per_path, (unsigned long long)st.allocations);
    }
    fakecuda_counters_t k1 = counters();
    cr_assert_lt(k1.alloc_calls - k0.alloc_calls, 5, "%llu driver allocations for %d calls: not pooled",
                 (unsigned long long)(k1.alloc_calls - k0.alloc_calls), npaths * per_path);
    for (int i = 0; i < npaths * per_path; i++)
        OK(release(p[i]));

    /* Stream-ordered, per-thread default stream: tracked once, and freed. */
    CUdeviceptr a;
    OK(alloc_async(&a, 5000, 0));
    gpumem_stats st;
    cr_assert(api_stats(&st));
    cr_assert_eq(st.allocations, (uint64_t)npaths * per_path + 1);
    cr_assert_eq(st.bytes_requested, 5000);
    OK(free_async(a, 0));
    OK(sync_pt(0));
    cr_assert(api_stats(&st));
    cr_assert_eq(st.frees, (uint64_t)npaths * per_path + 1);
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(counters().free_calls - k0.free_calls, 1, "only the async block reaches the driver");
}
