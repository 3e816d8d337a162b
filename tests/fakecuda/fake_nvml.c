/* The fake NVML (libnvidia-ml.so.1): just enough of the API for gpumem's NVML hooks and their
 * tests, with figures that differ from anything gpumem computes (fakenvml.h). Argument checks
 * and error codes follow NVIDIA's NVML reference. A separate library from the fake libcuda, as
 * on a real host: it shares only the environment and the UUIDs. */
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "fakenvml.h"
#include "nvml_abi.h"

#define NV_API __attribute__((visibility("default")))
#define NV_MAX_DEVICES 8

struct nvmlDevice_st {
    int physical;
};

static struct nvmlDevice_st nv_devices[NV_MAX_DEVICES];
static _Atomic int nv_inits; /* nvmlInit minus nvmlShutdown calls */
static int nv_ndev;
static unsigned long long nv_capacity;
static bool nv_mig;

/* FAKECUDA_MEM as the fake libcuda reads it: a number with an optional K/M/G suffix. */
static unsigned long long nv_env_size(const char *name, unsigned long long def)
{
    const char *s = getenv(name);
    char *end;
    if (!s) return def;
    unsigned long long v = strtoull(s, &end, 0);
    if (end == s) return def;
    switch (*end) {
    case 'K': case 'k': return v << 10;
    case 'M': case 'm': return v << 20;
    case 'G': case 'g': return v << 30;
    default: return v;
    }
}

static void nv_env_load(void)
{
    const char *d = getenv("FAKECUDA_DEVICES");
    long n = d ? strtol(d, NULL, 10) : 1;
    nv_ndev = n < 0 ? 1 : n > NV_MAX_DEVICES ? NV_MAX_DEVICES : (int)n;
    nv_capacity = nv_env_size("FAKECUDA_MEM", 1ull << 30);
    const char *mig = getenv("FAKENVML_MIG");
    nv_mig = mig && strcmp(mig, "1") == 0;
    for (int i = 0; i < NV_MAX_DEVICES; i++) nv_devices[i].physical = i;
}

/* The device behind a handle; NULL for anything that is not one of ours. */
static struct nvmlDevice_st *nv_device(nvmlDevice_t h)
{
    for (int i = 0; i < nv_ndev; i++)
        if (h == &nv_devices[i]) return h;
    return NULL;
}

/* The usual first checks: initialised, a valid handle. */
static nvmlReturn_t nv_check(nvmlDevice_t h)
{
    if (atomic_load(&nv_inits) <= 0) return NVML_ERROR_UNINITIALIZED;
    return nv_device(h) ? NVML_SUCCESS : NVML_ERROR_INVALID_ARGUMENT;
}

/* ------------------------------------------------------------------ library */

NV_API nvmlReturn_t nvmlInit_v2(void)
{
    if (atomic_fetch_add(&nv_inits, 1) == 0) nv_env_load();
    return NVML_SUCCESS;
}

NV_API nvmlReturn_t nvmlInit(void) { return nvmlInit_v2(); }

NV_API nvmlReturn_t nvmlShutdown(void)
{
    int n = atomic_load(&nv_inits);
    while (n > 0 && !atomic_compare_exchange_weak(&nv_inits, &n, n - 1)) {
    }
    return n > 0 ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
}

NV_API const char *nvmlErrorString(nvmlReturn_t r)
{
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument Version Mismatch";
    default: return "Unknown Error";
    }
}

NV_API nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    if (atomic_load(&nv_inits) <= 0) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = (unsigned)nv_ndev;
    return NVML_SUCCESS;
}

NV_API nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

NV_API nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    if (atomic_load(&nv_inits) <= 0) return NVML_ERROR_UNINITIALIZED;
    if (!device || index >= (unsigned)nv_ndev) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &nv_devices[index];
    return NVML_SUCCESS;
}

NV_API nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

/* ------------------------------------------------------------------ identity */

NV_API nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    nvmlReturn_t r = nv_check(device);
    if (r != NVML_SUCCESS) return r;
    if (!uuid) return NVML_ERROR_INVALID_ARGUMENT;
    char text[48];
    fakenvml_uuid_text(device->physical, nv_mig ? "MIG" : "GPU", text);
    if (length < strlen(text) + 1) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(uuid, text, strlen(text) + 1);
    return NVML_SUCCESS;
}

NV_API nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    nvmlReturn_t r = nv_check(device);
    if (r != NVML_SUCCESS) return r;
    if (!name) return NVML_ERROR_INVALID_ARGUMENT;
    char text[48];
    snprintf(text, sizeof text, "FakeNVML Device %d", device->physical);
    if (length < strlen(text) + 1) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(name, text, strlen(text) + 1);
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------ memory */

/* Fields written one by one: padding keeps what the caller had there (the tests compare bytes). */
NV_API nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    nvmlReturn_t r = nv_check(device);
    if (r != NVML_SUCCESS) return r;
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    memory->total = nv_capacity;
    memory->used = FAKENVML_USED_V1(device->physical);
    memory->free = nv_capacity - memory->used;
    return NVML_SUCCESS;
}

NV_API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    nvmlReturn_t r = nv_check(device);
    if (r != NVML_SUCCESS) return r;
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != nvmlMemory_v2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    memory->total = nv_capacity;
    memory->reserved = FAKENVML_RESERVED;
    memory->used = FAKENVML_USED_V2(device->physical);
    memory->free = nv_capacity - memory->reserved - memory->used;
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------ compute processes */

static void nv_put(int abi, void *infos, unsigned i, int physical)
{
    unsigned pid = FAKENVML_PID(physical, i);
    unsigned long long bytes = FAKENVML_PROC_BYTES(i);
    if (abi == 1) {
        nvmlProcessInfo_v1_t *e = (nvmlProcessInfo_v1_t *)infos + i;
        e->pid = pid;
        e->usedGpuMemory = bytes;
        return;
    }
    nvmlProcessInfo_v2_t *e = (nvmlProcessInfo_v2_t *)infos + i;
    e->pid = pid;
    e->usedGpuMemory = bytes;
    e->gpuInstanceId = NVML_VALUE_NOT_AVAILABLE_UINT;
    e->computeInstanceId = NVML_VALUE_NOT_AVAILABLE_UINT;
}

/* NVML's protocol: *count in = room, out = processes; too little room: INSUFFICIENT_SIZE and the
 * number needed; infos may be NULL only when *count is 0. */
static nvmlReturn_t nv_processes(int abi, nvmlDevice_t device, unsigned int *count, void *infos)
{
    nvmlReturn_t r = nv_check(device);
    if (r != NVML_SUCCESS) return r;
    if (!count || (*count && !infos)) return NVML_ERROR_INVALID_ARGUMENT;
    if (*count < FAKENVML_PROCS) {
        *count = FAKENVML_PROCS;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (unsigned i = 0; i < FAKENVML_PROCS; i++) nv_put(abi, infos, i, device->physical);
    *count = FAKENVML_PROCS;
    return NVML_SUCCESS;
}

NV_API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int *infoCount,
                                                         nvmlProcessInfo_v1_t *infos)
{
    return nv_processes(1, device, infoCount, infos);
}

NV_API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
                                                            nvmlProcessInfo_v2_t *infos)
{
    return nv_processes(2, device, infoCount, infos);
}

NV_API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                            nvmlProcessInfo_t *infos)
{
    return nv_processes(3, device, infoCount, infos);
}
