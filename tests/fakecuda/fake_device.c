/* fake_device.c: cuInit, the driver version and the devices (count, name, memory, attributes).
 *
 * The devices are FAKECUDA_DEVICES identical H100-like GPUs of FAKECUDA_MEM bytes each; cuInit
 * re-reads the environment on every call so that a test can set it before the first one. */
#include "fake_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

bool dev_ok(CUdevice d)
{
    return d >= 0 && d < g_ndev;
}

/* Every cuMemAlloc allocation holds a memfd (IPC): let a test with many of them have them. */
static void dev_raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

FK_API CUresult CUDAAPI cuInit(unsigned int flags)
{
    if (flags)
        return CUDA_ERROR_INVALID_VALUE;
    LOCK();
    state_env_load(false); /* tests set the environment before the first cuInit */
    dev_raise_fd_limit();
    CUresult r = g_ndev > 0 ? CUDA_SUCCESS : CUDA_ERROR_NO_DEVICE;
    if (r == CUDA_SUCCESS)
        atomic_store(&g_inited, true);
    UNLOCK();
    return r;
}

FK_API CUresult CUDAAPI cuDriverGetVersion(int *v)
{
    if (!v)
        return CUDA_ERROR_INVALID_VALUE;
    *v = FK_DRIVER_VERSION;
    return CUDA_SUCCESS;
}

FK_API CUresult CUDAAPI cuDeviceGet(CUdevice *dev, int ordinal)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!dev)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(ordinal))
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    *dev = ordinal;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDeviceGetCount(int *count)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!count)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    *count = g_ndev;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDeviceGetName(char *name, int len, CUdevice dev)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!name || len <= 0)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(dev))
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    snprintf(name, (size_t)len, "FakeCUDA Device %d", dev);
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!bytes)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(dev))
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    *bytes = g_capacity;
    return state_leave(CUDA_SUCCESS);
}

/* FAKECUDA_VISIBLE: the physical device behind ordinal `dev` (a malformed entry counts as its
 * own ordinal). */
int dev_physical(CUdevice dev)
{
    const char *list = getenv("FAKECUDA_VISIBLE");
    for (int i = 0; list && *list; i++) {
        char *end;
        long v = strtol(list, &end, 10);
        if (i == dev) return end == list || v < 0 ? dev : (int)v;
        list = strchr(end, ',');
        if (list) list++;
    }
    return dev;
}

static CUresult dev_uuid(CUuuid *uuid, CUdevice dev)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!uuid)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(dev))
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    fakecuda_uuid_of_physical(dev_physical(dev), (unsigned char *)uuid->bytes);
    return state_leave(CUDA_SUCCESS);
}

int dev_ordinal_of_physical(int physical)
{
    for (int i = 0; i < g_ndev; i++)
        if (dev_physical(i) == physical) return i;
    return -1;
}

FK_API CUresult CUDAAPI cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev) { return dev_uuid(uuid, dev); }
#undef cuDeviceGetUuid /* cuda.h renames it to the _v2 ABI, which is the same here */
FK_API CUresult CUDAAPI cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) { return dev_uuid(uuid, dev); }

/* An H100-like device; anything not listed is 0. */
static int dev_attribute(CUdevice_attribute a, CUdevice dev)
{
    switch (a) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: return 9;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: return 0;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: return 132;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: return 1024;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: return 32;
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: return 1;
    case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: return 1;
    case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY: return 1;
    case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: return 1;
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: return g_no_vmm ? 0 : 1;
    case CU_DEVICE_ATTRIBUTE_TEXTURE_PITCH_ALIGNMENT: return (int)FK_PITCH_ALIGN;
    case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: return dev;
    default: return 0;
    }
}

FK_API CUresult CUDAAPI cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!pi || attrib <= 0 || attrib >= CU_DEVICE_ATTRIBUTE_MAX)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(dev))
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    *pi = dev_attribute(attrib, dev);
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ cuGetProcAddress rows */

#define DEV_PROCS(X)                                        \
    X("cuInit", 2000, 0, cuInit)                            \
    X("cuDriverGetVersion", 2020, 0, cuDriverGetVersion)    \
    X("cuDeviceGet", 2000, 0, cuDeviceGet)                  \
    X("cuDeviceGetCount", 2000, 0, cuDeviceGetCount)        \
    X("cuDeviceGetName", 2000, 0, cuDeviceGetName)          \
    X("cuDeviceGetUuid", 9020, 0, cuDeviceGetUuid)          \
    X("cuDeviceGetUuid", 11040, 0, cuDeviceGetUuid_v2)      \
    X("cuDeviceTotalMem", 3020, 0, cuDeviceTotalMem_v2)     \
    X("cuDeviceGetAttribute", 2000, 0, cuDeviceGetAttribute)
FK_PROC_TABLE(dev_procs, DEV_PROCS);
