// multigpu_check: several GPUs of one host under the gpumem shim (issue 16). Needs 2 GPUs; with
// fewer it prints "multigpu_check: SKIP ..." and exits 77 (run_check's --needs-gpus 2 says so
// first). Every process it starts keeps NVLink multicast off (NCCL_NVLS_ENABLE=0,
// TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1), as the multi-GPU machines require.
//
//   multigpu_check            peer copies (cudaMemcpyPeer, PeerAsync, cudaMemcpy with
//                             cudaMemcpyDefault, cudaMemcpy3DPeer) and a kernel of device 1
//                             reading device 0's pooled block through peer access; prints
//                             checksums (identical with and without the shim) and, under the shim,
//                             shim_* lines: its copy counters (D2D and peer, per device)
//   multigpu_check --limits   (under the shim) children with CUDA_VISIBLE_DEVICES=1,0: a limit
//                             keyed by UUID follows the physical device, one keyed by ordinal is
//                             the process's ordinal, an ordinal the process does not see stops it
//                             with exit status 2 and one line
//   multigpu_check --ipc      a pooled block of device 0 opened by a child whose device is 1
//                             (cudaIpcMemLazyEnablePeerAccess): its kernel reads and writes it
//
// stdout: KEY=value lines, one PASS or FAIL line per check, then "multigpu_check: OK".
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures;
static const char *self;

static void check(const char *what, bool ok)
{
    printf("%s: %s\n", what, ok ? "PASS" : "FAIL");
    fflush(stdout);
    if (!ok) failures++;
}

#define CK(x)                                                                                   \
    do {                                                                                        \
        cudaError_t e_ = (x);                                                                   \
        if (e_ != cudaSuccess) {                                                                \
            printf("FATAL %s: %s\n", #x, cudaGetErrorName(e_));                                \
            exit(1);                                                                            \
        }                                                                                       \
    } while (0)

static void no_multicast(void)
{
    setenv("NCCL_NVLS_ENABLE", "0", 1);
    setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1", 1);
    setenv("NVSHMEM_DISABLE_NVLS", "1", 1);
}

__global__ void fill(unsigned *p, size_t n, unsigned seed)
{
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = seed * 2654435761u + (unsigned)i;
}

// dst[i] = src[i] + 1, src on another device (read through peer access).
__global__ void add_one(unsigned *dst, const unsigned *src, size_t n)
{
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = src[i] + 1;
}

static uint64_t checksum(const unsigned *d, size_t n)
{
    unsigned *h = (unsigned *)malloc(n * sizeof *h);
    CK(cudaMemcpy(h, d, n * sizeof *h, cudaMemcpyDeviceToHost));
    uint64_t s = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) s = (s ^ h[i]) * 1099511628211ull;
    free(h);
    return s;
}

// ------------------------------------------------------------------------------- peer copies

typedef struct { uint64_t calls, bytes, timed_calls, timed_bytes, time_ns, staged_calls, staged_bytes; } counter;
typedef struct {
    counter total[4];
    counter host[4][2];
    uint64_t refused_copies, refused_memsets;
    counter peer;
} copy_stats; // gpumem.h's gpumem_copy_stats, without including it (this program links no gpumem)

static void shim_counts(int dev)
{
    typedef int (*fn_t)(int, copy_stats *);
    fn_t fn = (fn_t)dlsym(RTLD_DEFAULT, "gpumem_get_copy_stats");
    if (!fn) return; // not under the shim: nothing to show
    copy_stats st;
    if (fn(dev, &st) != 0) return;
    printf("shim_d2d_calls_%d=%llu\nshim_peer_calls_%d=%llu\nshim_peer_bytes_%d=%llu\n", dev,
           (unsigned long long)st.total[2].calls, dev, (unsigned long long)st.peer.calls, dev,
           (unsigned long long)st.peer.bytes);
}

static int peer_copies(void)
{
    const size_t n = 1 << 20; // 4 MiB of unsigned
    unsigned *small0, *a0, *a1, *b1;
    int can = 0;
    CK(cudaDeviceCanAccessPeer(&can, 1, 0));
    printf("can_access_peer_1_0=%d\n", can);
    CK(cudaSetDevice(0));
    CK(cudaMalloc(&small0, 4096)); // a0 lies inside a pool segment under the shim
    CK(cudaMalloc(&a0, n * sizeof(unsigned)));
    fill<<<256, 256>>>(a0, n, 7);
    CK(cudaDeviceSynchronize());
    CK(cudaSetDevice(1));
    CK(cudaMalloc(&a1, n * sizeof(unsigned)));
    CK(cudaMalloc(&b1, n * sizeof(unsigned)));
    CK(cudaMemset(a1, 0, n * sizeof(unsigned)));
    const size_t q = n / 4;
    CK(cudaMemcpyPeer(a1, 1, a0, 0, q * sizeof(unsigned)));
    CK(cudaMemcpyPeerAsync(a1 + q, 1, a0 + q, 0, q * sizeof(unsigned), 0));
    CK(cudaMemcpy(a1 + 2 * q, a0 + 2 * q, q * sizeof(unsigned), cudaMemcpyDefault));
    cudaMemcpy3DPeerParms p;
    memset(&p, 0, sizeof p);
    p.srcDevice = 0;
    p.dstDevice = 1;
    p.srcPtr = make_cudaPitchedPtr(a0 + 3 * q, 1024 * sizeof(unsigned), 1024, q / 1024);
    p.dstPtr = make_cudaPitchedPtr(a1 + 3 * q, 1024 * sizeof(unsigned), 1024, q / 1024);
    p.extent = make_cudaExtent(1024 * sizeof(unsigned), q / 1024, 1);
    CK(cudaMemcpy3DPeer(&p));
    CK(cudaDeviceSynchronize());
    uint64_t s0 = checksum(a0, n), s1 = checksum(a1, n);
    printf("checksum_a0=%016llx\nchecksum_a1=%016llx\n", (unsigned long long)s0, (unsigned long long)s1);
    check("peer copies moved every byte", s0 == s1);
    if (can) {
        CK(cudaDeviceEnablePeerAccess(0, 0));
        add_one<<<256, 256>>>(b1, a0, n); // device 1's kernel reads device 0's pooled block
        CK(cudaDeviceSynchronize());
        printf("checksum_b1=%016llx\n", (unsigned long long)checksum(b1, n));
        add_one<<<256, 256>>>(a1, b1, n);
        CK(cudaDeviceSynchronize());
        unsigned h0[4], h1[4];
        CK(cudaMemcpy(h0, a0 + 12345, sizeof h0, cudaMemcpyDefault));
        CK(cudaMemcpy(h1, a1 + 12345, sizeof h1, cudaMemcpyDefault));
        check("kernel of device 1 read device 0's block", h1[0] == h0[0] + 2 && h1[3] == h0[3] + 2);
    }
    shim_counts(0);
    shim_counts(1);
    CK(cudaFree(b1));
    CK(cudaFree(a1));
    CK(cudaSetDevice(0));
    CK(cudaFree(a0));
    CK(cudaFree(small0));
    return 0;
}

// ------------------------------------------------------------------------------- limits

// Runs this program again (fork + exec: never CUDA after fork without exec) with env_set's
// NAME, VALUE pairs (VALUE NULL: unset); its stdout (and stderr when `with_stderr`) into out.
static int run_child(char *const argv[], const char *const *env_set, bool with_stderr, char *out, size_t cap)
{
    int pipefd[2];
    if (pipe(pipefd) != 0) return -1;
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(pipefd[1], 1);
        if (with_stderr) dup2(pipefd[1], 2);
        close(pipefd[0]);
        no_multicast();
        for (const char *const *e = env_set; e && *e; e += 2) {
            if (e[1]) setenv(e[0], e[1], 1);
            else unsetenv(e[0]);
        }
        execv(self, argv);
        _exit(127);
    }
    close(pipefd[1]);
    size_t used = 0;
    ssize_t r;
    while (used + 1 < cap && (r = read(pipefd[0], out + used, cap - 1 - used)) > 0) used += (size_t)r;
    out[used] = 0;
    close(pipefd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

// The child: each ordinal's total as the program sees it, and whether 1.5 GiB fits there.
static int limits_child(void)
{
    int n = 0;
    CK(cudaGetDeviceCount(&n));
    for (int d = 0; d < n && d < 2; d++) {
        size_t free_b, total_b;
        void *p = NULL;
        CK(cudaSetDevice(d));
        CK(cudaMemGetInfo(&free_b, &total_b));
        cudaError_t e = cudaMalloc(&p, (size_t)3 << 29);
        printf("total_%d=%zu\nfits_1536mib_%d=%d\n", d, total_b, d, e == cudaSuccess);
        if (e == cudaSuccess) CK(cudaFree(p));
        cudaGetLastError();
    }
    return 0;
}

static int uuids_child(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n < 2) {
        printf("multigpu_check: SKIP: needs 2 GPUs, this machine has %d\n", n);
        return 77;
    }
    for (int d = 0; d < 2; d++) {
        cudaDeviceProp prop;
        CK(cudaGetDeviceProperties(&prop, d));
        const unsigned char *u = (const unsigned char *)prop.uuid.bytes;
        printf("uuid_%d=GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x\n", d, u[0], u[1],
               u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
    }
    return 0;
}

static bool has(const char *out, const char *line)
{
    bool ok = strstr(out, line) != NULL;
    if (!ok) printf("expected '%s' in:\n%s\n", line, out);
    return ok;
}

static int limits(void)
{
    if (!getenv("LD_PRELOAD") || !strstr(getenv("LD_PRELOAD"), "gpumem")) {
        printf("multigpu_check --limits: needs the shim preloaded\n");
        return 1;
    }
    static char out[16384], u0[64], u1[64];
    char *uu[] = {(char *)self, (char *)"--uuids-child", NULL};
    const char *plain[] = {"GPUMEM_LIMIT", NULL, "CUDA_VISIBLE_DEVICES", NULL, NULL};
    int urc = run_child(uu, plain, true, out, sizeof out);
    if (urc == 77) {
        printf("%s", out);
        return 77;
    }
    if (urc != 0 || sscanf(strstr(out, "uuid_0=") ? strstr(out, "uuid_0=") : "", "uuid_0=%63s", u0) != 1 ||
        sscanf(strstr(out, "uuid_1=") ? strstr(out, "uuid_1=") : "", "uuid_1=%63s", u1) != 1) {
        printf("cannot learn the UUIDs:\n%s\n", out);
        return 1;
    }
    printf("uuid_0=%s\nuuid_1=%s\n", u0, u1);
    char *lc[] = {(char *)self, (char *)"--limits-child", NULL};
    // By UUID: physical 0 gets 1 GiB, physical 1 gets 2 GiB, whatever their ordinals.
    char by_uuid[200];
    snprintf(by_uuid, sizeof by_uuid, "%s:1GiB,%s:2GiB", u0, u1);
    const char *e1[] = {"GPUMEM_LIMIT", by_uuid, "CUDA_VISIBLE_DEVICES", "1,0", NULL};
    int rc = run_child(lc, e1, true, out, sizeof out);
    check("uuid limits follow the device under CUDA_VISIBLE_DEVICES=1,0",
          rc == 0 && has(out, "total_0=2147483648\n") && has(out, "fits_1536mib_0=1\n") &&
              has(out, "total_1=1073741824\n") && has(out, "fits_1536mib_1=0\n"));
    // By ordinal: the process's own numbering.
    const char *e2[] = {"GPUMEM_LIMIT", "0:1GiB,1:2GiB", "CUDA_VISIBLE_DEVICES", "1,0", NULL};
    rc = run_child(lc, e2, true, out, sizeof out);
    check("ordinal limits are the process's ordinals", rc == 0 && has(out, "total_0=1073741824\n") &&
                                                           has(out, "total_1=2147483648\n"));
    // GPUMEM_LIMIT_<i> beats a UUID entry for its ordinal.
    const char *e3[] = {"GPUMEM_LIMIT", by_uuid, "GPUMEM_LIMIT_0", "1GiB", "CUDA_VISIBLE_DEVICES", "1,0", NULL};
    rc = run_child(lc, e3, true, out, sizeof out);
    check("GPUMEM_LIMIT_0 beats the UUID entry", rc == 0 && has(out, "total_0=1073741824\n"));
    // An ordinal this process does not see: exit status 2, one line.
    const char *e4[] = {"GPUMEM_LIMIT", "0:1GiB,1:1GiB", "CUDA_VISIBLE_DEVICES", "1", NULL};
    rc = run_child(lc, e4, true, out, sizeof out);
    check("an ordinal the process does not see stops it", rc == 2 && has(out, "there is no device 1: this process sees 1 device (0)"));
    return 0;
}

// ------------------------------------------------------------------------------- IPC across devices

static int ipc_child(const char *hex, size_t n)
{
    cudaIpcMemHandle_t h;
    unsigned char *b = (unsigned char *)&h;
    for (size_t i = 0; i < sizeof h; i++) sscanf(hex + 2 * i, "%2hhx", &b[i]);
    unsigned *p, *mine;
    CK(cudaSetDevice(1));
    CK(cudaIpcOpenMemHandle((void **)&p, h, cudaIpcMemLazyEnablePeerAccess));
    CK(cudaMalloc(&mine, n * sizeof(unsigned)));
    add_one<<<256, 256>>>(mine, p, n); // device 1 reads device 0's block
    add_one<<<256, 256>>>(p, mine, n); // and writes it: p[i] += 2
    CK(cudaDeviceSynchronize());
    CK(cudaFree(mine));
    CK(cudaIpcCloseMemHandle(p));
    printf("child: OK\n");
    return 0;
}

static int ipc(void)
{
    const size_t n = 1 << 18;
    unsigned *small, *a;
    CK(cudaSetDevice(0));
    CK(cudaMalloc(&small, 4096)); // `a` is an interior block under the shim: gpumem's handle
    CK(cudaMalloc(&a, n * sizeof(unsigned)));
    fill<<<256, 256>>>(a, n, 3);
    CK(cudaDeviceSynchronize());
    unsigned before[2], after[2];
    CK(cudaMemcpy(before, a + 1000, sizeof before, cudaMemcpyDeviceToHost));
    cudaIpcMemHandle_t h;
    CK(cudaIpcGetMemHandle(&h, a));
    char hex[2 * sizeof h + 1], count[32];
    for (size_t i = 0; i < sizeof h; i++) sprintf(hex + 2 * i, "%02x", ((unsigned char *)&h)[i]);
    snprintf(count, sizeof count, "%zu", n);
    char *argv[] = {(char *)self, (char *)"--ipc-child", hex, count, NULL};
    static char out[8192];
    int rc = run_child(argv, NULL, false, out, sizeof out);
    printf("%s", out);
    CK(cudaMemcpy(after, a + 1000, sizeof after, cudaMemcpyDeviceToHost));
    check("device 1's process read and wrote device 0's block",
          rc == 0 && after[0] == before[0] + 2 && after[1] == before[1] + 2);
    printf("checksum_ipc=%016llx\n", (unsigned long long)checksum(a, n));
    CK(cudaFree(a));
    CK(cudaFree(small));
    return 0;
}

int main(int argc, char **argv)
{
    self = argv[0];
    no_multicast();
    if (argc == 2 && !strcmp(argv[1], "--limits-child")) return limits_child();
    if (argc == 2 && !strcmp(argv[1], "--uuids-child")) return uuids_child();
    if (argc == 4 && !strcmp(argv[1], "--ipc-child")) return ipc_child(argv[2], strtoull(argv[3], NULL, 10));
    // Before any CUDA call of this process: children are forked from a process without a context.
    int n = 0;
    if (strcmp(argc > 1 ? argv[1] : "", "--limits") == 0) {
        // the parent makes no CUDA call at all (the children count the devices)
        int rc = limits();
        if (rc) return rc;
    } else {
        if (cudaGetDeviceCount(&n) != cudaSuccess || n < 2) {
            printf("multigpu_check: SKIP: needs 2 GPUs, this machine has %d\n", n);
            return 77;
        }
        int rc = argc > 1 && !strcmp(argv[1], "--ipc") ? ipc() : peer_copies();
        if (rc) return rc;
    }
    if (failures) {
        printf("multigpu_check: %d checks FAILED\n", failures);
        return 1;
    }
    printf("multigpu_check: OK\n");
    return 0;
}
