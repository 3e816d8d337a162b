/* NVML: the limit where nvidia-smi and other monitoring tools look (docs/compatibility.md, "NVML").
 *
 * Under a limit, a device's memory info is the limit and what this process (or its GPUMEM_SHARED
 * group) reserved; with a group, its compute process list is the group's members. Every answer
 * starts as the driver's: its errors stand, and whatever gpumem does not limit passes through
 * byte for byte. NVML keys devices by its own index order, which is not CUDA's, so a device is
 * identified by its UUID (the engine maps it to this process's CUDA ordinal). */
#include <stdlib.h>
#include <string.h>

#include "shim.h"

/* A hooked entry point this NVML lacks: what NVML's own loader answers then. */
#define NVML_REQUIRE_REAL(name) \
    do { \
        if (!shim_nvml_resolve() || !shim_real_##name) return NVML_ERROR_FUNCTION_NOT_FOUND; \
    } while (0)

/* ------------------------------------------------------------------ which device */

static int hex_value(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" → the 16 bytes cuDeviceGetUuid gives. A MIG
 * device's "MIG-..." is refused: its limit is not the parent GPU's. */
static bool parse_gpu_uuid(const char *text, unsigned char uuid[16])
{
    if (strncmp(text, "GPU-", 4) != 0) return false;
    const char *p = text + 4;
    for (int i = 0; i < 16; i++) {
        if (*p == '-' && (i == 4 || i == 6 || i == 8 || i == 10)) p++;
        int hi = hex_value(p[0]), lo = hi < 0 ? -1 : hex_value(p[1]);
        if (lo < 0) return false;
        uuid[i] = (unsigned char)(hi << 4 | lo);
        p += 2;
    }
    return *p == 0;
}

typedef nvmlReturn_t (*nvml_get_uuid_fn)(nvmlDevice_t, char *, unsigned int);

/* The device's UUID as CUDA numbers it; false where NVML cannot say (a bad handle, NVML not
 * initialised) or for a MIG handle: the driver's answer then stands. */
static bool device_uuid(nvmlDevice_t device, unsigned char uuid[16])
{
    static nvml_get_uuid_fn get_uuid;
    nvml_get_uuid_fn fn = __atomic_load_n(&get_uuid, __ATOMIC_ACQUIRE);
    if (!fn) {
        *(void **)&fn = shim_nvml_sym("nvmlDeviceGetUUID");
        if (!fn) return false;
        __atomic_store_n(&get_uuid, fn, __ATOMIC_RELEASE);
    }
    char text[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    if (fn(device, text, sizeof text) != NVML_SUCCESS) return false;
    text[sizeof text - 1] = 0;
    return parse_gpu_uuid(text, uuid);
}

/* The view under the limit of `device`; false: no limit applies there. */
static bool limited_view(nvmlDevice_t device, unsigned long long driver_total, gm_device_view *v)
{
    unsigned char uuid[16];
    if (!shim_active() || !device_uuid(device, uuid)) return false;
    if (!gm_device_view_by_uuid(uuid, driver_total, v)) return false;
    SHIM_TRACE("nvml view: total=%llu used=%llu", (unsigned long long)v->total,
               (unsigned long long)v->used);
    return true;
}

/* ------------------------------------------------------------------ memory info */

/* total = the limit, used = what the group (or this process) reserved, free = the rest: what can
 * still be obtained under the limit. */
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    NVML_REQUIRE_REAL(nvmlDeviceGetMemoryInfo);
    nvmlReturn_t rc = shim_real_nvmlDeviceGetMemoryInfo(device, memory);
    gm_device_view v;
    if (rc != NVML_SUCCESS || !limited_view(device, memory->total, &v)) return rc;
    memory->total = v.total;
    memory->used = v.used < v.total ? v.used : v.total;
    memory->free = memory->total - memory->used;
    return rc;
}

/* v2 documents total = reserved + used + free, and tools derive one from the others, so that
 * stays true: the driver's reserve (its own memory, never charged to the budget) is kept as the
 * driver says and shown inside the limit; used is the group's; free what remains. Free is then
 * v1's free less the reserve (conservative: the budget would still grant v1's free). */
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    NVML_REQUIRE_REAL(nvmlDeviceGetMemoryInfo_v2);
    nvmlReturn_t rc = shim_real_nvmlDeviceGetMemoryInfo_v2(device, memory);
    gm_device_view v;
    if (rc != NVML_SUCCESS || !limited_view(device, memory->total, &v)) return rc;
    unsigned long long total = v.total;
    unsigned long long reserved = memory->reserved < total ? memory->reserved : total;
    unsigned long long used = v.used < total - reserved ? v.used : total - reserved;
    memory->total = total;
    memory->reserved = reserved;
    memory->used = used;
    memory->free = total - reserved - used;
    return rc;
}

/* ------------------------------------------------------------------ compute processes */

/* The three ABIs differ only in the element type of `infos`. */
static nvmlReturn_t real_processes(int abi, nvmlDevice_t device, unsigned int *count, void *infos)
{
    switch (abi) {
    case 1: return shim_real_nvmlDeviceGetComputeRunningProcesses(device, count, infos);
    case 2: return shim_real_nvmlDeviceGetComputeRunningProcesses_v2(device, count, infos);
    default: return shim_real_nvmlDeviceGetComputeRunningProcesses_v3(device, count, infos);
    }
}

static void put_process(int abi, void *infos, unsigned int i, const gm_group_process *p)
{
    if (abi == 1) {
        ((nvmlProcessInfo_v1_t *)infos)[i] = (nvmlProcessInfo_v1_t){p->pid, p->bytes};
        return;
    }
    /* Not a MIG instance (MIG handles pass through): the IDs NVML gives outside MIG. */
    ((nvmlProcessInfo_v2_t *)infos)[i] =
        (nvmlProcessInfo_v2_t){p->pid, p->bytes, NVML_VALUE_NOT_AVAILABLE_UINT, NVML_VALUE_NOT_AVAILABLE_UINT};
}

/* The group's members on the device, in *out (malloc'ed when `stack` is too small: the caller
 * frees *out unless it is `stack`); -1 without a group. */
static int group_members(const unsigned char uuid[16], gm_group_process *stack, int cap, gm_group_process **out)
{
    *out = stack;
    for (;;) {
        int n = gm_group_processes(uuid, *out, cap);
        if (n <= cap) return n;
        if (*out != stack) free(*out);
        cap = n + 8; /* members may join meanwhile */
        *out = malloc((size_t)cap * sizeof **out);
        if (!*out) {
            *out = stack;
            return gm_group_processes(uuid, stack, 0) < 0 ? -1 : 0;
        }
    }
}

/* NVML's size protocol: *count in = room in `infos` (0 with infos NULL: a count query), out = the
 * number of processes; too little room → NVML_ERROR_INSUFFICIENT_SIZE with the number needed. */
static nvmlReturn_t group_answer(int abi, const gm_group_process *m, int n, unsigned int *count, void *infos)
{
    if (*count < (unsigned)n) {
        *count = (unsigned)n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (int i = 0; i < n; i++) put_process(abi, infos, (unsigned)i, &m[i]);
    *count = (unsigned)n;
    return NVML_SUCCESS;
}

/* With a group: its members holding memory of the device and what each reserved. Bad arguments,
 * a device NVML refuses and everything without a group get the driver's own answer. */
static nvmlReturn_t running_processes(int abi, nvmlDevice_t device, unsigned int *count, void *infos)
{
    unsigned char uuid[16];
    if (!count || (*count && !infos) || !shim_active() || !device_uuid(device, uuid) ||
        gm_group_processes(uuid, NULL, 0) < 0)
        return real_processes(abi, device, count, infos);
    unsigned int probe = 0; /* the driver's verdict on the device (permissions, support) */
    nvmlReturn_t rc = real_processes(abi, device, &probe, NULL);
    if (rc != NVML_SUCCESS && rc != NVML_ERROR_INSUFFICIENT_SIZE) return rc;
    gm_group_process stack[32], *m;
    int n = group_members(uuid, stack, 32, &m);
    rc = n < 0 ? real_processes(abi, device, count, infos) : group_answer(abi, m, n, count, infos);
    if (m != stack) free(m);
    return rc;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int *infoCount,
                                                  nvmlProcessInfo_v1_t *infos)
{
    NVML_REQUIRE_REAL(nvmlDeviceGetComputeRunningProcesses);
    return running_processes(1, device, infoCount, infos);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_v2_t *infos)
{
    NVML_REQUIRE_REAL(nvmlDeviceGetComputeRunningProcesses_v2);
    return running_processes(2, device, infoCount, infos);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos)
{
    NVML_REQUIRE_REAL(nvmlDeviceGetComputeRunningProcesses_v3);
    return running_processes(3, device, infoCount, infos);
}
