/* api_nvml: the limit where NVML looks (issue 12), on the fake NVML (tests/fakecuda/fake_nvml.c,
 * libnvidia-ml.so.1) and the fake driver. This program links the fake NVML, so the shim's
 * exported nvml* functions interpose; nvml_probe (tests/gpu/nvml_probe.c) reaches NVML as
 * nvidia-smi does, through dlopen and dlsym, and holds memory as a group member.
 *
 * Without a limit every answer is the fake's, byte for byte. Under GPUMEM_LIMIT total is the limit
 * and used what this process reserved (its group's, with GPUMEM_SHARED); devices are matched by
 * UUID, since NVML's order is the physical one and CUDA's follows FAKECUDA_VISIBLE. */
#include "api_test.h"
#include "fakenvml.h"
#include "nvml_abi.h"

#define MiB ((unsigned long long)1 << 20)

/* The fake NVML's exports this program links against (there is no nvml.h here). */
nvmlReturn_t nvmlInit_v2(void);
nvmlReturn_t nvmlShutdown(void);
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device);
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory);
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory);
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int *n, nvmlProcessInfo_v1_t *p);
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *n, nvmlProcessInfo_v2_t *p);
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *n, nvmlProcessInfo_t *p);

#define NV_OK(call) cr_assert_eq((call), NVML_SUCCESS, "%s", #call)
#define NV_ERR(call, code) cr_assert_eq((call), (code), "%s", #call)

static nvmlDevice_t nv_device(unsigned index)
{
    nvmlDevice_t d = NULL;
    NV_OK(nvmlInit_v2());
    NV_OK(nvmlDeviceGetHandleByIndex_v2(index, &d));
    return d;
}

static nvmlMemory_t mem_v1(nvmlDevice_t d)
{
    nvmlMemory_t m;
    memset(&m, 0xAB, sizeof m);
    NV_OK(nvmlDeviceGetMemoryInfo(d, &m));
    return m;
}

static nvmlMemory_v2_t mem_v2(nvmlDevice_t d)
{
    nvmlMemory_v2_t m;
    memset(&m, 0xAB, sizeof m); /* the padding after version too: compared byte for byte */
    m.version = nvmlMemory_v2;
    NV_OK(nvmlDeviceGetMemoryInfo_v2(d, &m));
    return m;
}

/* This process's reserved bytes on CUDA device `ordinal`, as gpumem counts them. */
static unsigned long long reserved_on(int ordinal)
{
    api_get_stats_fn fn = (api_get_stats_fn)(uintptr_t)api_shim_sym("gpumem_get_stats");
    gpumem_stats st;
    cr_assert(fn && fn(ordinal, &st) == GPUMEM_OK, "gpumem_get_stats");
    return st.bytes_reserved;
}

static CUdeviceptr alloc_on_current(size_t bytes)
{
    CUdeviceptr p = 0;
    OK(cuMemAlloc(&p, bytes));
    return p;
}

static void assert_limited(nvmlDevice_t d, unsigned long long total, unsigned long long used)
{
    nvmlMemory_t m = mem_v1(d);
    cr_assert_eq(m.total, total, "v1 total %llu, expected %llu", m.total, total);
    cr_assert_eq(m.used, used, "v1 used %llu, expected %llu", m.used, used);
    cr_assert_eq(m.free, total - used, "v1 free");
    nvmlMemory_v2_t m2 = mem_v2(d);
    cr_assert_eq(m2.total, total, "v2 total");
    cr_assert_eq(m2.reserved, FAKENVML_RESERVED, "v2 reserved: the driver's");
    cr_assert_eq(m2.used, used, "v2 used %llu, expected %llu", m2.used, used);
    cr_assert_eq(m2.free, total - FAKENVML_RESERVED - used, "v2 free: reserved + used + free = total");
}

/* ---------------------------------------------------------------- without a limit */

/* The fake's own process list of `physical` in the layout of `abi`, over 0xAB bytes. */
static void driver_list(int abi, int physical, void *out, size_t room)
{
    memset(out, 0xAB, room);
    for (unsigned i = 0; i < FAKENVML_PROCS; i++) {
        if (abi == 1) {
            nvmlProcessInfo_v1_t *e = (nvmlProcessInfo_v1_t *)out + i;
            e->pid = FAKENVML_PID(physical, i);
            e->usedGpuMemory = FAKENVML_PROC_BYTES(i);
            continue;
        }
        nvmlProcessInfo_v2_t *e = (nvmlProcessInfo_v2_t *)out + i;
        e->pid = FAKENVML_PID(physical, i);
        e->usedGpuMemory = FAKENVML_PROC_BYTES(i);
        e->gpuInstanceId = e->computeInstanceId = NVML_VALUE_NOT_AVAILABLE_UINT;
    }
}

static nvmlReturn_t list(int abi, nvmlDevice_t d, unsigned *n, void *infos)
{
    switch (abi) {
    case 1: return nvmlDeviceGetComputeRunningProcesses(d, n, infos);
    case 2: return nvmlDeviceGetComputeRunningProcesses_v2(d, n, infos);
    default: return nvmlDeviceGetComputeRunningProcesses_v3(d, n, infos);
    }
}

static void assert_driver_answers(nvmlDevice_t d, int physical)
{
    nvmlMemory_t m = mem_v1(d), want;
    memset(&want, 0xAB, sizeof want);
    want.total = 1024 * MiB;
    want.used = FAKENVML_USED_V1(physical);
    want.free = want.total - want.used;
    cr_assert(memcmp(&m, &want, sizeof m) == 0, "v1 of NVML index %d is not the driver's", physical);
    nvmlMemory_v2_t m2 = mem_v2(d), want2;
    memset(&want2, 0xAB, sizeof want2);
    want2.version = nvmlMemory_v2;
    want2.total = 1024 * MiB;
    want2.reserved = FAKENVML_RESERVED;
    want2.used = FAKENVML_USED_V2(physical);
    want2.free = want2.total - want2.reserved - want2.used;
    cr_assert(memcmp(&m2, &want2, sizeof m2) == 0, "v2 of NVML index %d is not the driver's", physical);
    for (int abi = 1; abi <= 3; abi++) {
        unsigned char got[4 * sizeof(nvmlProcessInfo_v2_t)], exp[sizeof got];
        memset(got, 0xAB, sizeof got);
        driver_list(abi, physical, exp, sizeof exp);
        unsigned n = 4;
        NV_OK(list(abi, d, &n, got));
        cr_assert_eq(n, FAKENVML_PROCS, "v%d count", abi);
        cr_assert(memcmp(got, exp, sizeof got) == 0, "v%d list of index %d is not the driver's", abi, physical);
        n = 0;
        NV_ERR(list(abi, d, &n, NULL), NVML_ERROR_INSUFFICIENT_SIZE);
        cr_assert_eq(n, FAKENVML_PROCS, "v%d count query", abi);
    }
}

Test(nvml, no_limit_leaves_the_drivers_answers_byte_for_byte)
{
    setenv("FAKECUDA_MEM", "1G", 1);
    setenv("FAKECUDA_DEVICES", "2", 1);
    api_start();
    alloc_on_current(1 << 20); /* the manager is up and holds memory */
    cr_assert_gt(reserved_on(0), 0, "is the shim preloaded?");
    for (unsigned i = 0; i < 2; i++) assert_driver_answers(nv_device(i), (int)i);
}

Test(nvml, a_limit_above_the_device_leaves_the_drivers_total)
{
    setenv("FAKECUDA_MEM", "1G", 1);
    setenv("GPUMEM_LIMIT", "8GiB", 1);
    api_start();
    nvmlMemory_t m = mem_v1(nv_device(0));
    cr_assert_eq(m.total, 1024 * MiB, "the device's total, never above it");
}

/* ---------------------------------------------------------------- under a limit */

Test(nvml, the_limit_and_this_processs_usage_v1_and_v2)
{
    setenv("FAKECUDA_MEM", "1G", 1);
    setenv("GPUMEM_LIMIT", "256MiB", 1);
    api_start();
    nvmlDevice_t d = nv_device(0);
    assert_limited(d, 256 * MiB, 0);
    alloc_on_current(10 << 20);
    unsigned long long r = reserved_on(0);
    cr_assert_geq(r, 10 * MiB);
    assert_limited(d, 256 * MiB, r);
    /* no group: the driver's process list */
    nvmlProcessInfo_v2_t got[4], exp[4];
    memset(got, 0xAB, sizeof got);
    driver_list(3, 0, exp, sizeof exp);
    unsigned n = 4;
    NV_OK(nvmlDeviceGetComputeRunningProcesses_v3(d, &n, got));
    cr_assert(n == FAKENVML_PROCS && memcmp(got, exp, sizeof got) == 0, "the driver's list without a group");
}

/* Like nvidia-smi: NVML only, CUDA never started by the program. */
Test(nvml, the_limit_for_a_program_that_never_starts_cuda)
{
    setenv("FAKECUDA_MEM", "1G", 1);
    setenv("GPUMEM_LIMIT", "256MiB", 1);
    assert_limited(nv_device(0), 256 * MiB, 0);
}

Test(nvml, devices_are_matched_by_uuid)
{
    setenv("FAKECUDA_MEM", "1G", 1);
    setenv("FAKECUDA_DEVICES", "2", 1);
    setenv("FAKECUDA_VISIBLE", "1,0", 1); /* CUDA ordinal 0 is physical 1 = NVML index 1 */
    setenv("GPUMEM_LIMIT", "0:100MiB,1:200MiB", 1);
    api_start();
    alloc_on_current(4 << 20);
    unsigned long long r = reserved_on(0);
    assert_limited(nv_device(0), 200 * MiB, 0); /* physical 0 = CUDA ordinal 1 */
    assert_limited(nv_device(1), 100 * MiB, r);
}

Test(nvml, mig_handles_pass_through)
{
    setenv("FAKECUDA_MEM", "1G", 1);
    setenv("FAKENVML_MIG", "1", 1);
    setenv("GPUMEM_LIMIT", "256MiB", 1);
    api_start();
    alloc_on_current(1 << 20);
    assert_driver_answers(nv_device(0), 0);
}

Test(nvml, bad_input_gets_the_drivers_errors)
{
    setenv("GPUMEM_LIMIT", "256MiB", 1);
    api_start();
    nvmlMemory_t m;
    NV_ERR(nvmlDeviceGetMemoryInfo((nvmlDevice_t)&m, &m), NVML_ERROR_UNINITIALIZED); /* before nvmlInit */
    nvmlDevice_t d = nv_device(0);
    NV_ERR(nvmlDeviceGetMemoryInfo(d, NULL), NVML_ERROR_INVALID_ARGUMENT);
    NV_ERR(nvmlDeviceGetMemoryInfo_v2(d, NULL), NVML_ERROR_INVALID_ARGUMENT);
    NV_ERR(nvmlDeviceGetMemoryInfo((nvmlDevice_t)&m, &m), NVML_ERROR_INVALID_ARGUMENT); /* not a handle */
    nvmlMemory_v2_t m2 = {.version = 1};
    NV_ERR(nvmlDeviceGetMemoryInfo_v2(d, &m2), NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    NV_ERR(nvmlDeviceGetComputeRunningProcesses_v3(d, NULL, NULL), NVML_ERROR_INVALID_ARGUMENT);
    unsigned n = 3;
    NV_ERR(nvmlDeviceGetComputeRunningProcesses_v3(d, &n, NULL), NVML_ERROR_INVALID_ARGUMENT);
}

/* ---------------------------------------------------------------- through dlopen, as nvidia-smi */

static char *probe(const char *const *args, const char *const *env)
{
    api_child c;
    cr_assert(api_run(NVML_PROBE_PATH, args, env, 20.0, &c), "cannot start nvml_probe");
    cr_assert(api_exited_ok(&c), "nvml_probe failed (%#x):\n%s\n%s", c.status, c.out, c.err);
    free(c.err);
    return c.out;
}

static unsigned long long probe_value(const char *out, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof pat, "%s=", key);
    const char *p = out;
    for (const char *q; (q = strstr(p, pat)) != NULL; p = q + 1)
        if (q == out || q[-1] == ' ' || q[-1] == '\n') return strtoull(q + strlen(pat), NULL, 10);
    cr_assert_fail("no %s in:\n%s", key, out);
    return 0;
}

Test(nvml, dlopen_and_dlsym_reach_the_hooks)
{
    const char *args[] = {"--alloc", "10", "0", NULL};
    const char *env[] = {"FAKECUDA_MEM=1G", "GPUMEM_LIMIT=256MiB", NULL};
    char *out = probe(args, env);
    unsigned long long r = probe_value(out, "reserved");
    cr_assert_geq(r, 10 * MiB, "%s", out);
    cr_assert_eq(probe_value(out, "v1_total_0"), 256 * MiB, "%s", out);
    cr_assert_eq(probe_value(out, "v1_used_0"), r, "%s", out);
    cr_assert_eq(probe_value(out, "v2_total_0"), 256 * MiB, "%s", out);
    cr_assert_eq(probe_value(out, "v2_used_0"), r, "%s", out);
    cr_assert_eq(probe_value(out, "v2_sum_ok_0"), 1, "%s", out);
    free(out);
    const char *no_shim[] = {"FAKECUDA_MEM=1G", "GPUMEM_LIMIT=256MiB", "LD_PRELOAD", NULL};
    out = probe(args, no_shim);
    cr_assert_eq(probe_value(out, "v1_total_0"), 1024 * MiB, "without the shim: the fake's\n%s", out);
    free(out);
}

Test(nvml, dlopen_without_a_limit_answers_as_without_the_shim)
{
    const char *args[] = {"0", "1", NULL};
    const char *shim[] = {"FAKECUDA_MEM=1G", "FAKECUDA_DEVICES=2", NULL};
    const char *none[] = {"FAKECUDA_MEM=1G", "FAKECUDA_DEVICES=2", "LD_PRELOAD", NULL};
    char *with = probe(args, shim), *without = probe(args, none);
    cr_assert_str_eq(with, without);
    cr_assert_eq(probe_value(with, "procs_v3_1"), FAKENVML_PROCS, "%s", with);
    free(with);
    free(without);
}

/* ---------------------------------------------------------------- a group (GPUMEM_SHARED) */

typedef struct holder {
    pid_t pid;
    FILE *to, *from;
    unsigned long long reserved;
} holder;

/* nvml_probe --alloc MIB --hold: a member holding memory until its stdin closes. */
static void holder_start(holder *h, const char *mib)
{
    int in[2], out[2];
    /* close-on-exec: a later holder must not keep this one's stdin open (dup2 clears it on 0, 1) */
    cr_assert(pipe2(in, O_CLOEXEC) == 0 && pipe2(out, O_CLOEXEC) == 0);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    char *argv[] = {(char *)NVML_PROBE_PATH, "--alloc", (char *)mib, "--hold", "0", NULL};
    int rc = posix_spawn(&h->pid, NVML_PROBE_PATH, &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    cr_assert_eq(rc, 0, "cannot start nvml_probe");
    close(in[0]);
    close(out[1]);
    h->to = fdopen(in[1], "w");
    h->from = fdopen(out[0], "r");
    char line[256];
    cr_assert_not_null(fgets(line, sizeof line, h->from), "the holder died");
    cr_assert_eq(sscanf(line, "reserved=%llu", &h->reserved), 1, "holder said '%s'", line);
    cr_assert_not_null(fgets(line, sizeof line, h->from), "the holder died");
    cr_assert_str_eq(line, "ready\n");
}

static void holder_stop(holder *h)
{
    fclose(h->to);
    char line[512];
    while (fgets(line, sizeof line, h->from)) {
    }
    fclose(h->from);
    int status = 0;
    cr_assert(api_wait_timeout(h->pid, &status, 10.0), "the holder did not exit");
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "holder status %#x", status);
}

/* The list in layout `abi` holds exactly these members (any order), MIG ids "not available". */
static void assert_members(int abi, nvmlDevice_t d, const holder *hs, unsigned nh)
{
    nvmlProcessInfo_v2_t buf[8];
    unsigned n = 0;
    NV_ERR(list(abi, d, &n, NULL), nh ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS);
    cr_assert_eq(n, nh, "v%d count query: %u, expected %u", abi, n, nh);
    if (nh > 1) {
        memset(buf, 0xAB, sizeof buf);
        n = nh - 1;
        NV_ERR(list(abi, d, &n, buf), NVML_ERROR_INSUFFICIENT_SIZE);
        cr_assert_eq(n, nh, "v%d: the room needed", abi);
        cr_assert(api_all_bytes(buf, 0xAB, sizeof buf), "v%d: nothing written when the room is short", abi);
    }
    n = 8;
    NV_OK(list(abi, d, &n, buf));
    cr_assert_eq(n, nh, "v%d count", abi);
    for (unsigned k = 0; k < nh; k++) {
        unsigned pid = abi == 1 ? ((nvmlProcessInfo_v1_t *)buf)[k].pid : buf[k].pid;
        unsigned long long bytes = abi == 1 ? ((nvmlProcessInfo_v1_t *)buf)[k].usedGpuMemory : buf[k].usedGpuMemory;
        bool found = false;
        for (unsigned j = 0; j < nh; j++) found |= hs[j].pid == (pid_t)pid && hs[j].reserved == bytes;
        cr_assert(found, "v%d entry %u: pid %u with %llu bytes is no member", abi, k, pid, bytes);
        if (abi > 1)
            cr_assert(buf[k].gpuInstanceId == NVML_VALUE_NOT_AVAILABLE_UINT &&
                      buf[k].computeInstanceId == NVML_VALUE_NOT_AVAILABLE_UINT, "v%d MIG ids", abi);
    }
}

Test(nvml, a_group_shows_its_usage_and_its_members)
{
    char dir[64], path[96];
    cr_assert(api_tmpdir(dir, sizeof dir, "nvml"));
    snprintf(path, sizeof path, "%s/ledger", dir);
    setenv("FAKECUDA_MEM", "1G", 1);
    setenv("GPUMEM_LIMIT", "256MiB", 1);
    setenv("GPUMEM_SHARED", path, 1);
    holder hs[2];
    holder_start(&hs[0], "10");
    holder_start(&hs[1], "40");
    cr_assert(hs[0].reserved >= 10 * MiB && hs[1].reserved >= 40 * MiB);
    nvmlDevice_t d = nv_device(0);
    assert_limited(d, 256 * MiB, hs[0].reserved + hs[1].reserved);
    for (int abi = 1; abi <= 3; abi++) assert_members(abi, d, hs, 2);
    /* bad input in a group: still the driver's errors */
    NV_ERR(nvmlDeviceGetComputeRunningProcesses_v2(d, NULL, NULL), NVML_ERROR_INVALID_ARGUMENT);
    unsigned n = 2;
    NV_ERR(nvmlDeviceGetComputeRunningProcesses(d, &n, NULL), NVML_ERROR_INVALID_ARGUMENT);
    nvmlProcessInfo_v2_t one[2];
    NV_ERR(nvmlDeviceGetComputeRunningProcesses_v3((nvmlDevice_t)one, &n, one), NVML_ERROR_INVALID_ARGUMENT);
    /* a member that leaves takes its share with it */
    holder_stop(&hs[0]);
    assert_limited(d, 256 * MiB, hs[1].reserved);
    for (int abi = 1; abi <= 3; abi++) assert_members(abi, d, &hs[1], 1);
    holder_stop(&hs[1]);
    assert_limited(d, 256 * MiB, 0);
    assert_members(3, d, NULL, 0);
    unlink(path);
    rmdir(dir);
}
