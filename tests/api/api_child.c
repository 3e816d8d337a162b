/* api_child <scenario>: the scenarios whose outcome shows only after the process ends (the exit
 * report, the exit status, a forked child's report). The API tests spawn it with LD_PRELOAD and
 * the GPUMEM_* settings of the case; it checks what it can itself and exits 0, or prints
 * "api_child: CHECK FAILED ..." on stderr and exits 90. Each leak scenario leaves exactly the
 * allocations its test expects in the exit report. */
#include <pthread.h>

#define API_CHILD_NAME "api_child"
#include "api_common.h"
#include "api_threads_work.h"
#include "fakecuda.h"


static CUcontext g_primary;
static CUdevice g_dev;

static void start(void)
{
    CK(cuInit(0));
    CK(cuDeviceGet(&g_dev, 0));
    CK(cuDevicePrimaryCtxRetain(&g_primary, g_dev));
    CK(cuCtxSetCurrent(g_primary));
}

static fakecuda_counters_t counters(void)
{
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    return c;
}

static gpumem_stats stats(void)
{
    gpumem_stats st;
    CHECK(api_stats(&st), "gpumem_get_stats not reachable");
    return st;
}

/* Allocates and writes `size` bytes (the data path must work for what is reported). */
static CUdeviceptr alloc_written(size_t size, uint32_t seed)
{
    CUdeviceptr p = 0;
    unsigned char *buf = malloc(size);
    CHECK(buf, "malloc");
    CK(cuMemAlloc(&p, size));
    api_fill_pattern(buf, size, seed);
    CK(cuMemcpyHtoD(p, buf, size));
    free(buf);
    return p;
}

static void check_written(CUdeviceptr p, size_t size, uint32_t seed)
{
    unsigned char *buf = malloc(size);
    CHECK(buf, "malloc");
    CK(cuMemcpyDtoH(buf, p, size));
    size_t bad = api_check_pattern(buf, size, seed);
    CHECK(bad == size, "block %#llx corrupted at byte %zu", (unsigned long long)p, bad);
    free(buf);
}

/* ---------------------------------------------------------------- leaks and the report */

/* Three leaks from three call sites: 1000, 2000 and 3000 bytes. */
static int leak3(void)
{
    CUdeviceptr a = 0, b = 0, c = 0, freed = 0;
    start();
    fakecuda_reset_counters();
    CK(cuMemAlloc(&a, 1000));
    CK(cuMemAlloc(&b, 2000));
    CK(cuMemAlloc(&c, 3000));
    CK(cuMemAlloc(&freed, 4000));
    CK(cuMemFree(freed));
    CK(cuMemsetD8(a, 1, 1000));
    gpumem_stats st = stats();
    CHECK(st.bytes_requested == 6000, "bytes_requested %llu", (unsigned long long)st.bytes_requested);
    CHECK(st.allocations == 4 && st.frees == 1, "allocations %llu frees %llu",
          (unsigned long long)st.allocations, (unsigned long long)st.frees);
    /* Printed for the no-pool test, which checks that every allocation reached the driver. */
    fakecuda_counters_t k = counters();
    printf("alloc_calls=%llu free_calls=%llu\n", (unsigned long long)k.alloc_calls,
           (unsigned long long)k.free_calls);
    return 0;
}

/* Copies of every direction, counted in the exit report's copies: line. */
static int copies(void)
{
    CUdeviceptr a, b;
    CUstream s;
    unsigned char buf[1000];
    start();
    CK(cuStreamCreate(&s, 0));
    CK(cuMemAlloc(&a, 4096));
    CK(cuMemAlloc(&b, 4096));
    memset(buf, 7, sizeof buf);
    CK(cuMemcpyHtoD(a, buf, 1000));
    CK(cuMemcpyHtoD(a, buf, 1000));
    CK(cuMemcpyHtoDAsync(b, buf, 64, s));
    CK(cuStreamSynchronize(s));
    CK(cuMemcpyDtoH(buf, a, 500));
    CK(cuMemcpyDtoD(b, a, 300));
    CK(cuMemcpy(a, b, 100));
    CK(cuMemFree(a));
    CK(cuMemFree(b));
    CK(cuStreamDestroy(s));
    return 0;
}

/* Managed and stream-ordered allocations count against GPUMEM_LIMIT=64MiB and, freed, are not
 * leaks; with "leak" one of each is left behind (1000 managed + 2000 async). */
static int managed_async(bool leak)
{
    const size_t mib = (size_t)1 << 20;
    CUdeviceptr m, a, p, lm, la;
    CUstream s;
    start();
    CK(cuStreamCreate(&s, 0));
    CK(cuMemAllocManaged(&m, 40 * mib, CU_MEM_ATTACH_GLOBAL));
    CUresult r = cuMemAlloc(&p, 30 * mib);
    CHECK(r == CUDA_ERROR_OUT_OF_MEMORY, "30 MiB over a 40 MiB managed block under a 64 MiB limit: %d", r);
    CK(cuMemFree(m));
    CK(cuMemAlloc(&p, 30 * mib));
    CK(cuMemFree(p));
    CK(cuMemAllocAsync(&a, 40 * mib, s));
    r = cuMemAlloc(&p, 30 * mib);
    CHECK(r == CUDA_ERROR_OUT_OF_MEMORY, "30 MiB over a 40 MiB async block under a 64 MiB limit: %d", r);
    CK(cuMemFreeAsync(a, s));
    CK(cuStreamSynchronize(s));
    CK(cuMemAlloc(&p, 30 * mib));
    CK(cuMemFree(p));
    if (leak) {
        CK(cuMemAllocManaged(&lm, 1000, CU_MEM_ATTACH_GLOBAL));
        CK(cuMemAllocAsync(&la, 2000, s));
        CK(cuStreamSynchronize(s));
    }
    return 0;
}

/* Allocations made while a stream is being captured pass through and are tracked: one of 4096
 * bytes is leaked, one freed during the capture, and one pooled after it. */
static int capture_leak(void)
{
    CUstream s;
    CUdeviceptr leaked, freed, pooled;
    CUgraph g;
    start();
    CK(cuStreamCreate(&s, 0));
    CK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED));
    CK(cuMemAlloc(&leaked, 4096));
    CK(cuMemAlloc(&freed, 8192));
    CK(cuMemFree(freed));
    CK(cuStreamEndCapture(s, &g));
    CK(cuMemAlloc(&pooled, 512));
    CK(cuMemFree(pooled));
    return 0;
}

/* Graph memory nodes under GPUMEM_LIMIT=64MiB: one graph allocation of 3000 bytes is launched and
 * never freed (the one leak: its graph is destroyed, the allocation outlives it); one is freed by a
 * free node of its graph, one by cuMemFreeAsync after the launch, one never launched goes with its
 * graph, and one over the limit is refused. */
static CUDA_MEM_ALLOC_NODE_PARAMS graph_alloc_params(size_t bytes)
{
    CUDA_MEM_ALLOC_NODE_PARAMS p;
    memset(&p, 0, sizeof p);
    p.poolProps.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
    p.poolProps.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    p.bytesize = bytes;
    return p;
}

static int graph_leak(void)
{
    CUstream s;
    CUgraph g, unlaunched;
    CUgraphNode leak_node, inner_node, outer_node, free_node, refused_node, never_node;
    CUgraphExec e;
    start();
    CK(cuStreamCreate(&s, 0));
    CK(cuGraphCreate(&g, 0));
    CUDA_MEM_ALLOC_NODE_PARAMS leaked = graph_alloc_params(3000);
    CK(cuGraphAddMemAllocNode(&leak_node, g, NULL, 0, &leaked));
    CUDA_MEM_ALLOC_NODE_PARAMS inner = graph_alloc_params(5000), outer = graph_alloc_params(7000);
    CK(cuGraphAddMemAllocNode(&inner_node, g, NULL, 0, &inner));
    CK(cuGraphAddMemFreeNode(&free_node, g, &inner_node, 1, inner.dptr));
    CK(cuGraphAddMemAllocNode(&outer_node, g, NULL, 0, &outer));
    CUDA_MEM_ALLOC_NODE_PARAMS refused = graph_alloc_params((size_t)100 << 20);
    CUresult r = cuGraphAddMemAllocNode(&refused_node, g, NULL, 0, &refused);
    CHECK(r == CUDA_ERROR_OUT_OF_MEMORY, "an allocation node over the limit returned %d", (int)r);
    CK(cuGraphInstantiateWithFlags(&e, g, 0));
    CK(cuGraphLaunch(e, s));
    CK(cuStreamSynchronize(s));
    CK(cuMemsetD8(leaked.dptr, 1, 3000));
    CK(cuMemFreeAsync(outer.dptr, s));
    CK(cuStreamSynchronize(s));
    CK(cuGraphExecDestroy(e));
    CK(cuGraphDestroy(g));
    CK(cuGraphCreate(&unlaunched, 0));
    CUDA_MEM_ALLOC_NODE_PARAMS never = graph_alloc_params(11000);
    CK(cuGraphAddMemAllocNode(&never_node, unlaunched, NULL, 0, &never));
    CK(cuGraphDestroy(unlaunched));
    gpumem_stats st = stats();
    CHECK(st.bytes_requested == 3000, "bytes_requested %llu", (unsigned long long)st.bytes_requested);
    CHECK(st.bytes_reserved == 3000, "bytes_reserved %llu", (unsigned long long)st.bytes_reserved);
    return 0;
}

/* A created context destroyed with 1000 + 2000 bytes live; then 500 leaked in the primary. */
static int ctx_destroy(void)
{
    CUcontext c1;
    CUdeviceptr a, b, p;
    CK(cuInit(0));
    CK(cuDeviceGet(&g_dev, 0));
    CK(cuCtxCreate(&c1, NULL, 0, g_dev));
    a = alloc_written(1000, 1);
    b = alloc_written(2000, 2);
    (void)a;
    (void)b;
    fprintf(stderr, "MARK before-destroy\n");
    fflush(stderr);
    CK(cuCtxDestroy(c1));
    fprintf(stderr, "MARK after-destroy\n");
    fflush(stderr);
    CK(cuDevicePrimaryCtxRetain(&g_primary, g_dev));
    CK(cuCtxSetCurrent(g_primary));
    p = alloc_written(500, 3);
    check_written(p, 500, 3);
    return 0;
}

/* cudaDeviceReset: the primary context goes with 1000 + 2000 bytes live; then, retained again,
 * 700 more leak. */
/* v1: the reset entry point as cudart 13 gets it, cuGetProcAddress at version 7000 (the pre-11.0
 * ABI, a different function from cuDevicePrimaryCtxReset_v2). */
static int primary_reset(bool v1)
{
    CUdeviceptr p;
    CUresult (*reset)(CUdevice) = cuDevicePrimaryCtxReset;
    start();
    if (v1) {
        CUdriverProcAddressQueryResult status;
        CK(cuGetProcAddress_v2("cuDevicePrimaryCtxReset", (void **)&reset, 7000, 0, &status));
        CHECK(reset != cuDevicePrimaryCtxReset, "version 7000 should give the v1 entry point");
    }
    alloc_written(1000, 1);
    alloc_written(2000, 2);
    fprintf(stderr, "MARK before-reset\n");
    fflush(stderr);
    CK(reset(g_dev));
    fprintf(stderr, "MARK after-reset\n");
    fflush(stderr);
    CK(cuDevicePrimaryCtxRetain(&g_primary, g_dev));
    CK(cuCtxSetCurrent(g_primary));
    p = alloc_written(700, 3);
    check_written(p, 700, 3);
    gpumem_stats st = stats();
    CHECK(st.bytes_requested == 700, "after the reset only the new block is live: %llu",
          (unsigned long long)st.bytes_requested);
    return 0;
}

/* One allocation, freed: for the configuration tests (a bad value stops it first). */
static int alloc_one(void)
{
    CUdeviceptr p;
    start();
    CK(cuMemAlloc(&p, 4096));
    CK(cuMemFree(p));
    gpumem_stats st = stats();
    printf("limit_bytes=%llu\n", (unsigned long long)st.limit_bytes);
    return 0;
}

/* FAKECUDA_FAIL_ALLOC_AFTER=1: the device refuses every allocation after the first. */
static int device_oom(void)
{
    CUdeviceptr a, b;
    start();
    CK(cuMemAlloc(&a, 4096));
    CUresult r = cuMemAlloc(&b, (size_t)8 << 20);
    CHECK(r == CUDA_ERROR_OUT_OF_MEMORY, "cuMemAlloc on a failing device -> %d", r);
    r = cuMemAlloc(&b, (size_t)4 << 20);
    CHECK(r == CUDA_ERROR_OUT_OF_MEMORY, "cuMemAlloc on a failing device -> %d", r);
    gpumem_stats st = stats();
    CHECK(st.backend_ooms >= 1, "backend_ooms %llu", (unsigned long long)st.backend_ooms);
    CHECK(st.allocations == 1, "allocations %llu", (unsigned long long)st.allocations);
    CHECK(st.bytes_requested == 4096, "bytes_requested %llu", (unsigned long long)st.bytes_requested);
    CK(cuMemsetD8(a, 0x42, 4096));
    CHECK(api_all_bytes((void *)a, 0x42, 4096), "the first block still works");
    CK(cuMemFree(a));
    return 0;
}

/* 8 threads allocate, write, verify and free concurrently; everything is freed. */
static int threads(void)
{
    api_worker w[8];
    char err[256];
    start();
    api_run_workers(g_primary, 8, 300, w, err, sizeof err);
    CHECK(!err[0], "%s", err);
    unsigned long allocs = 0;
    for (int i = 0; i < 8; i++)
        allocs += w[i].allocs;
    gpumem_stats st = stats();
    CHECK(st.allocations == allocs && st.frees == allocs, "allocations %llu frees %llu, made %lu",
          (unsigned long long)st.allocations, (unsigned long long)st.frees, allocs);
    return 0;
}

/* ---------------------------------------------------------------- fork */

static pid_t fork_and_wait_ok(void (*in_child)(void))
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        alarm(10); /* a deadlocked child dies of SIGALRM instead of hanging the test */
        in_child();
        exit(0);   /* exit, not _exit: the child's exit report is under test */
    }
    int status = 0;
    bool done = api_wait_timeout(pid, &status, 20.0);
    CHECK(done, "fork child %d did not finish", (int)pid);
    CHECK(!WIFSIGNALED(status), "fork child %d died of signal %d (%s)", (int)pid, WTERMSIG(status),
          WTERMSIG(status) == SIGALRM ? "deadlocked: alarm" : "crash");
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "fork child %d exited with %d", (int)pid,
          WEXITSTATUS(status));
    printf("child=%d\n", (int)pid);
    fflush(stdout);
    return pid;
}

/* The child owns none of the parent's memory and its calls return. */
static void child_quiet(void)
{
    gpumem_stats st = stats();
    CHECK(st.bytes_requested == 0, "the child sees the parent's %llu live bytes as its own",
          (unsigned long long)st.bytes_requested);
    CUdeviceptr x = 0;
    CUresult r = cuMemAlloc(&x, 4096); /* whatever the driver says in a child; it must return */
    if (r == CUDA_SUCCESS) {
        r = cuMemFree(x);
        CHECK(r == CUDA_SUCCESS, "cuMemFree in the child -> %d", r);
    }
    st = stats();
    CHECK(st.bytes_requested == 0, "child: %llu bytes live after its own free",
          (unsigned long long)st.bytes_requested);
}

/* Parent: 1000 + 2000 + 300000 live across the fork, then all freed and 5000 leaked. */
static int fork_basic(void)
{
    start();
    CUdeviceptr a = alloc_written(1000, 11), b = alloc_written(2000, 12),
                c = alloc_written(300000, 13);
    fork_and_wait_ok(child_quiet);
    check_written(a, 1000, 11);
    check_written(b, 2000, 12);
    check_written(c, 300000, 13);
    CUdeviceptr d = alloc_written(5000, 14);
    CK(cuMemFree(a));
    CK(cuMemFree(b));
    CK(cuMemFree(c));
    check_written(d, 5000, 14);
    gpumem_stats st = stats();
    CHECK(st.bytes_requested == 5000, "parent bytes_requested %llu", (unsigned long long)st.bytes_requested);
    return 0;
}

static _Atomic bool g_stop;

static void *fork_churn(void *arg)
{
    api_worker *w = arg;
    while (!g_stop) {
        w->iters = 50;
        api_worker_main(w);
        if (w->err[0])
            break;
    }
    return NULL;
}

static void child_stats_only(void)
{
    /* The other threads were mid-allocation: the manager's locks must be usable here. Only the
     * manager is called (the fake driver has no fork handling of its own). */
    gpumem_stats st = stats();
    CHECK(st.bytes_requested == 0, "the child sees the parent's %llu live bytes as its own",
          (unsigned long long)st.bytes_requested);
    api_report_fn report = (api_report_fn)(uintptr_t)api_shim_sym("gpumem_report");
    CHECK(report, "gpumem_report");
    FILE *devnull = fopen("/dev/null", "w");
    CHECK(devnull, "/dev/null");
    size_t live = report(devnull);
    fclose(devnull);
    CHECK(live == 0, "the child reports %zu live allocations", live);
}

/* Forks 8 times while 3 threads allocate; then 777 bytes are leaked by the parent. */
static int fork_threads(void)
{
    pthread_t t[3];
    api_worker w[3];
    start();
    for (int i = 0; i < 3; i++) {
        memset(&w[i], 0, sizeof w[i]);
        w[i].ctx = g_primary;
        w[i].id = i;
        CHECK(pthread_create(&t[i], NULL, fork_churn, &w[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < 8; i++) {
        api_sleep_ms(10);
        fork_and_wait_ok(child_stats_only);
    }
    g_stop = true;
    for (int i = 0; i < 3; i++) {
        pthread_join(t[i], NULL);
        CHECK(!w[i].err[0], "%s", w[i].err);
    }
    alloc_written(777, 5);
    gpumem_stats st = stats();
    CHECK(st.bytes_requested == 777, "parent bytes_requested %llu", (unsigned long long)st.bytes_requested);
    return 0;
}

static void child_nothing(void)
{
}

/* A created context destroyed with 1000 bytes live (kept for the parent's exit report), then a
 * fork: the child allocated nothing. */
static int fork_orphans(void)
{
    CUcontext c1;
    CK(cuInit(0));
    CK(cuDeviceGet(&g_dev, 0));
    CK(cuCtxCreate(&c1, NULL, 0, g_dev));
    alloc_written(1000, 1);
    CK(cuCtxDestroy(c1));
    CK(cuDevicePrimaryCtxRetain(&g_primary, g_dev));
    CK(cuCtxSetCurrent(g_primary));
    CUdeviceptr p = alloc_written(64, 2);
    CK(cuMemFree(p));
    fork_and_wait_ok(child_nothing);
    return 0;
}

/* One leak of 7000 bytes, then exit(0) from a second thread while main still runs. */
static void *exit_now(void *unused)
{
    (void)unused;
    exit(0);
}

static int exit_from_thread(void)
{
    CUdeviceptr p;
    pthread_t t;
    start();
    CK(cuMemAlloc(&p, 7000));
    pthread_create(&t, NULL, exit_now, NULL);
    for (;;) pause();
}

/* Pinned host memory: 3000 B (cuMemAllocHost) and 5000 B (cuMemHostAlloc, DEVICEMAP) leaked;
 * 100 B freed, then freed again (refused by the pool, or by the driver with GPUMEM_PINNED_POOL=0). */
static int pinned_leak(void)
{
    void *a = NULL, *b = NULL, *c = NULL;
    start();
    fakecuda_reset_counters();
    CK(cuMemAllocHost(&a, 3000));
    CK(cuMemHostAlloc(&b, 5000, CU_MEMHOSTALLOC_DEVICEMAP));
    CK(cuMemHostAlloc(&c, 100, 0));
    memset(a, 1, 3000);
    memset(b, 2, 5000);
    CK(cuMemFreeHost(c));
    CUresult r = cuMemFreeHost(c);
    CHECK(r == CUDA_ERROR_INVALID_VALUE, "second cuMemFreeHost returned %d", (int)r);
    printf("host_alloc_calls=%llu\n", (unsigned long long)counters().host_alloc_calls);
    return 0;
}

/* ---------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: api_child <scenario>\n");
        return 64;
    }
    const char *s = argv[1];
    if (!strcmp(s, "leak3")) return leak3();
    if (!strcmp(s, "copies")) return copies();
    if (!strcmp(s, "managed_async")) return managed_async(false);
    if (!strcmp(s, "managed_async_leak")) return managed_async(true);
    if (!strcmp(s, "capture_leak")) return capture_leak();
    if (!strcmp(s, "graph_leak")) return graph_leak();
    if (!strcmp(s, "ctx_destroy")) return ctx_destroy();
    if (!strcmp(s, "primary_reset")) return primary_reset(false);
    if (!strcmp(s, "primary_reset_v1")) return primary_reset(true);
    if (!strcmp(s, "alloc_one")) return alloc_one();
    if (!strcmp(s, "exit_from_thread")) return exit_from_thread();
    if (!strcmp(s, "device_oom")) return device_oom();
    if (!strcmp(s, "threads")) return threads();
    if (!strcmp(s, "fork_basic")) return fork_basic();
    if (!strcmp(s, "fork_threads")) return fork_threads();
    if (!strcmp(s, "fork_orphans")) return fork_orphans();
    if (!strcmp(s, "pinned_leak")) return pinned_leak();
    fprintf(stderr, "api_child: unknown scenario %s\n", s);
    return 64;
}
