/* nvml_probe: what NVML says of each device's memory and compute processes, reached as
 * nvidia-smi reaches NVML (dlopen("libnvidia-ml.so.1") and dlsym of each name; this program links
 * neither NVML nor CUDA). Run by the api tests on the fake NVML (tests/api/test_nvml.c) and by the
 * GPU checks on the real one (tests/gpu/meson.build), with and without the shim.
 *
 *   nvml_probe [--alloc MIB [--cuda-device N]] [--hold] INDEX...
 *
 * --alloc: first cuMemAlloc MIB MiB on CUDA device N (libcuda.so.1, also through dlopen) and print
 * gpumem's bytes_reserved there ("reserved=", -1 without the shim). --hold: then print "ready" and
 * wait for stdin to close before asking NVML (a member of a GPUMEM_SHARED group, held open).
 * For each NVML index: KEY_INDEX=value lines (v1_total_0=...), the process lists as
 * procs_vN_INDEX=COUNT and procs_vN_INDEX_list=pid:bytes,...; last line "nvml_probe: OK". */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* RTLD_DEFAULT */
#endif
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpumem.h"
#include "nvml_abi.h"

#define MiB (1ull << 20)

static void *nvml;

static void die(const char *what, int rc)
{
    printf("error=%s rc=%d\n", what, rc);
    exit(1);
}

static void *sym(void *lib, const char *name)
{
    void *p = dlsym(lib, name);
    if (!p) die(name, -1);
    return p;
}

/* ------------------------------------------------------------------ holding memory */

static long long alloc_on(int device, unsigned long long mib)
{
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW);
    if (!cuda) die("dlopen libcuda.so.1", -1);
    int (*init)(unsigned) = (int (*)(unsigned))sym(cuda, "cuInit");
    int (*get)(int *, int) = (int (*)(int *, int))sym(cuda, "cuDeviceGet");
    int (*retain)(void **, int) = (int (*)(void **, int))sym(cuda, "cuDevicePrimaryCtxRetain");
    int (*set)(void *) = (int (*)(void *))sym(cuda, "cuCtxSetCurrent");
    int (*alloc)(unsigned long long *, size_t) = (int (*)(unsigned long long *, size_t))sym(cuda, "cuMemAlloc_v2");
    int dev = 0, rc;
    void *ctx = NULL;
    unsigned long long p = 0;
    if ((rc = init(0)) || (rc = get(&dev, device)) || (rc = retain(&ctx, dev)) || (rc = set(ctx)))
        die("cuda start", rc);
    if ((rc = alloc(&p, (size_t)(mib * MiB)))) die("cuMemAlloc", rc);
    gpumem_status (*stats)(int, gpumem_stats *) =
        (gpumem_status (*)(int, gpumem_stats *))dlsym(RTLD_DEFAULT, "gpumem_get_stats");
    gpumem_stats st;
    if (!stats || stats(device, &st) != GPUMEM_OK) return -1;
    return (long long)st.bytes_reserved;
}

/* ------------------------------------------------------------------ NVML */

static void memory(nvmlDevice_t d, unsigned i)
{
    nvmlReturn_t (*v1)(nvmlDevice_t, nvmlMemory_t *) =
        (nvmlReturn_t (*)(nvmlDevice_t, nvmlMemory_t *))sym(nvml, "nvmlDeviceGetMemoryInfo");
    nvmlReturn_t (*v2)(nvmlDevice_t, nvmlMemory_v2_t *) =
        (nvmlReturn_t (*)(nvmlDevice_t, nvmlMemory_v2_t *))sym(nvml, "nvmlDeviceGetMemoryInfo_v2");
    nvmlMemory_t m;
    nvmlReturn_t rc = v1(d, &m);
    if (rc) die("nvmlDeviceGetMemoryInfo", rc);
    printf("v1_total_%u=%llu v1_used_%u=%llu v1_free_%u=%llu\n", i, m.total, i, m.used, i, m.free);
    printf("v1_total_mib_%u=%llu\n", i, m.total / MiB);
    nvmlMemory_v2_t m2 = {.version = nvmlMemory_v2};
    rc = v2(d, &m2);
    if (rc) die("nvmlDeviceGetMemoryInfo_v2", rc);
    printf("v2_total_%u=%llu v2_reserved_%u=%llu v2_used_%u=%llu v2_free_%u=%llu\n", i, m2.total, i,
           m2.reserved, i, m2.used, i, m2.free);
    printf("v2_total_mib_%u=%llu v2_sum_ok_%u=%d\n", i, m2.total / MiB, i,
           m2.reserved + m2.used + m2.free == m2.total);
}

/* The list through NVML's protocol: a count query, then a buffer of that size. */
static void processes(nvmlDevice_t d, unsigned i, int abi)
{
    static const char *names[] = {"", "nvmlDeviceGetComputeRunningProcesses",
                                  "nvmlDeviceGetComputeRunningProcesses_v2",
                                  "nvmlDeviceGetComputeRunningProcesses_v3"};
    nvmlReturn_t (*fn)(nvmlDevice_t, unsigned *, void *) =
        (nvmlReturn_t (*)(nvmlDevice_t, unsigned *, void *))sym(nvml, names[abi]);
    size_t stride = abi == 1 ? sizeof(nvmlProcessInfo_v1_t) : sizeof(nvmlProcessInfo_v2_t);
    unsigned n = 0;
    nvmlReturn_t rc = fn(d, &n, NULL);
    if (rc != NVML_SUCCESS && rc != NVML_ERROR_INSUFFICIENT_SIZE) die(names[abi], rc);
    unsigned char *buf = calloc(n + 1, stride);
    n = n + 1; /* room for one more: a process may have started meanwhile */
    if (!buf || (rc = fn(d, &n, buf))) die(names[abi], rc);
    printf("procs_v%d_%u=%u procs_v%d_%u_list=", abi, i, n, abi, i);
    for (unsigned k = 0; k < n; k++) {
        const nvmlProcessInfo_v1_t *e = (const void *)(buf + k * stride);
        printf("%s%u:%llu", k ? "," : "", e->pid, e->usedGpuMemory);
    }
    printf("\n");
    free(buf);
}

static void device(unsigned i)
{
    nvmlReturn_t (*handle)(unsigned, nvmlDevice_t *) =
        (nvmlReturn_t (*)(unsigned, nvmlDevice_t *))sym(nvml, "nvmlDeviceGetHandleByIndex_v2");
    nvmlReturn_t (*uuid)(nvmlDevice_t, char *, unsigned) =
        (nvmlReturn_t (*)(nvmlDevice_t, char *, unsigned))sym(nvml, "nvmlDeviceGetUUID");
    nvmlDevice_t d;
    char text[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    nvmlReturn_t rc = handle(i, &d);
    if (rc || (rc = uuid(d, text, sizeof text))) die("device", rc);
    printf("uuid_%u=%s\n", i, text);
    memory(d, i);
    for (int abi = 1; abi <= 3; abi++) processes(d, i, abi);
}

int main(int argc, char **argv)
{
    int a = 1, cuda_device = 0;
    unsigned long long mib = 0;
    int hold = 0;
    for (; a < argc && strncmp(argv[a], "--", 2) == 0; a++) {
        if (strcmp(argv[a], "--alloc") == 0 && a + 1 < argc) mib = strtoull(argv[++a], NULL, 10);
        else if (strcmp(argv[a], "--cuda-device") == 0 && a + 1 < argc) cuda_device = atoi(argv[++a]);
        else if (strcmp(argv[a], "--hold") == 0) hold = 1;
        else die(argv[a], -1);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (mib) printf("reserved=%lld\n", alloc_on(cuda_device, mib));
    if (hold) {
        printf("ready\n");
        while (getchar() != EOF) {
        }
    }
    nvml = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!nvml) die("dlopen libnvidia-ml.so.1", -1);
    nvmlReturn_t (*init)(void) = (nvmlReturn_t (*)(void))sym(nvml, "nvmlInit_v2");
    nvmlReturn_t rc = init();
    if (rc) die("nvmlInit_v2", rc);
    for (; a < argc; a++) device((unsigned)atoi(argv[a]));
    ((nvmlReturn_t (*)(void))sym(nvml, "nvmlShutdown"))();
    printf("nvml_probe: OK\n");
    return 0;
}
