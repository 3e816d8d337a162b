// ipc_check: CUDA IPC of small cudaMalloc blocks, to be run with and without the gpumem shim
// (LD_PRELOAD) and the outputs compared; both runs must pass. Under the shim consecutive small
// cudaMallocs share a pool segment, so block 0 starts its segment (the driver's own handle) and
// block 2 lies deep inside it (a gpumem handle); without the shim each is a driver allocation.
//
//   ipc_check                      the parent: allocates, exports, runs the child, verifies
//   ipc_check --expandable         the same under GPUMEM_EXPANDABLE=1: every block is VMM memory,
//                                  so a receiver without gpumem must be refused both handles
//   ipc_check child HEX SIZE ...   (internal) opens each handle, fills it with 0xA0 + its index
//
// The child is started with fork + exec of this program (never fork after CUDA init without
// exec). stdout: one PASS or FAIL line per check, then "ipc_check: OK" when all passed (exit 0).
#include <cuda_runtime.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures;

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

static void to_hex(const cudaIpcMemHandle_t *h, char *out)
{
    const unsigned char *b = (const unsigned char *)h;
    for (size_t i = 0; i < sizeof *h; i++) sprintf(out + 2 * i, "%02x", b[i]);
}

static void from_hex(const char *s, cudaIpcMemHandle_t *h)
{
    unsigned char *b = (unsigned char *)h;
    memset(h, 0, sizeof *h);
    for (size_t i = 0; i < sizeof *h && s[2 * i] && s[2 * i + 1]; i++) sscanf(s + 2 * i, "%2hhx", &b[i]);
}

/* "child": every open must succeed. "plain-child" (run without the shim): a handle the driver
 * refuses with cudaErrorInvalidValue is reported in the exit status (bit 2 + index) instead. */
static int child(int argc, char **argv)
{
    CK(cudaSetDevice(0));
    bool refused_ok = !strcmp(argv[1], "plain-child");
    int ok = 1, refused = 0;
    for (int i = 2, k = 0; i + 1 < argc; i += 2, k++) {
        cudaIpcMemHandle_t h;
        from_hex(argv[i], &h);
        size_t n = strtoull(argv[i + 1], NULL, 10);
        void *p = NULL;
        cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
        fprintf(stderr, "child%s: open %d: %s\n", getenv("LD_PRELOAD") ? "" : " (no shim)", k,
                cudaGetErrorName(e));
        if (e == cudaErrorInvalidValue && refused_ok) {
            cudaGetLastError();
            refused |= 1 << k;
            continue;
        }
        if (e != cudaSuccess) {
            ok = 0;
            continue;
        }
        CK(cudaMemset(p, 0xA0 + k, n));
        CK(cudaDeviceSynchronize());
        if (cudaIpcCloseMemHandle(p) != cudaSuccess) ok = 0;
    }
    return ok ? refused << 2 : 2;
}

static bool all_bytes(const void *dev, size_t n, unsigned char v)
{
    unsigned char *h = (unsigned char *)malloc(n);
    CK(cudaMemcpy(h, dev, n, cudaMemcpyDeviceToHost));
    bool ok = true;
    for (size_t i = 0; i < n && ok; i++) ok = h[i] == v;
    free(h);
    return ok;
}

static int run_child(char **args, bool without_shim)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        if (without_shim) unsetenv("LD_PRELOAD");
        execv("/proc/self/exe", args);
        _exit(127);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

int main(int argc, char **argv)
{
    if (argc > 1 && (!strcmp(argv[1], "child") || !strcmp(argv[1], "plain-child"))) return child(argc, argv);
    bool expandable = argc > 1 && !strcmp(argv[1], "--expandable");
    CK(cudaSetDevice(0));
    const size_t size[4] = {4096, 5000, 8192, 3000};
    void *blk[4];
    for (int i = 0; i < 4; i++) {
        CK(cudaMalloc(&blk[i], size[i]));
        CK(cudaMemset(blk[i], 0x10 + i, size[i]));
    }
    CK(cudaDeviceSynchronize());

    cudaIpcMemHandle_t h0, h2, h2i, again;
    CK(cudaIpcGetMemHandle(&h0, blk[0]));
    CK(cudaIpcGetMemHandle(&h2, blk[2]));
    CK(cudaIpcGetMemHandle(&h2i, (char *)blk[2] + 4096));
    CK(cudaIpcGetMemHandle(&again, blk[2]));
    check("export: interior pointer gives the block's handle", !memcmp(&h2, &h2i, sizeof h2));
    check("export: twice gives the same bytes", !memcmp(&h2, &again, sizeof h2));
    check("export: two blocks, two handles", memcmp(&h0, &h2, sizeof h0) != 0);
    void *own = NULL;
    check("open own handle: refused", cudaIpcOpenMemHandle(&own, h2, cudaIpcMemLazyEnablePeerAccess) != cudaSuccess);
    cudaGetLastError();

    void *freed;
    CK(cudaMalloc(&freed, 6000));
    CK(cudaFree(freed));
    cudaIpcMemHandle_t hf;
    check("export freed: cudaErrorInvalidValue", cudaIpcGetMemHandle(&hf, freed) == cudaErrorInvalidValue);
    cudaGetLastError();

    char x0[129], x2[129], n0[32], n2[32];
    to_hex(&h0, x0);
    to_hex(&h2, x2);
    snprintf(n0, sizeof n0, "%zu", size[0]);
    snprintf(n2, sizeof n2, "%zu", size[2]);
    char *args[] = {argv[0], (char *)"child", x0, n0, x2, n2, NULL};
    check("child opened and wrote both blocks", run_child(args, false) == 0);

    check("block 0 (segment start) has the child's bytes", all_bytes(blk[0], size[0], 0xA0));
    check("block 2 (inside the segment) has the child's bytes", all_bytes(blk[2], size[2], 0xA1));
    check("block 1 unchanged", all_bytes(blk[1], size[1], 0x11));
    check("block 3 unchanged", all_bytes(blk[3], size[3], 0x13));

    /* A receiver that does not run under gpumem: each handle either opens the right block or is
     * refused with cudaErrorInvalidValue (a gpumem handle the driver does not know); no other
     * block may change. Without the shim both open. */
    for (int i = 0; i < 4; i++) CK(cudaMemset(blk[i], 0x10 + i, size[i]));
    CK(cudaDeviceSynchronize());
    args[1] = (char *)"plain-child";
    int st = run_child(args, true);
    bool ran = st != 2 && st < 128 && st != 127;
    int refused = ran ? st >> 2 : 0;
    check("receiver without gpumem: ran", ran);
    if (expandable) /* the driver has no legacy IPC of VMM memory: it refuses gpumem's handle */
        check("receiver without gpumem: block 0 (VMM) refused", (refused & 1) && all_bytes(blk[0], size[0], 0x10));
    else
        check("receiver without gpumem: block 0 opened and written", !(refused & 1) && all_bytes(blk[0], size[0], 0xA0));
    check("receiver without gpumem: block 2 written or refused",
          all_bytes(blk[2], size[2], (refused & 2) ? 0x12 : 0xA1));
    check("receiver without gpumem: blocks 1 and 3 unchanged",
          all_bytes(blk[1], size[1], 0x11) && all_bytes(blk[3], size[3], 0x13));
    if (expandable) check("receiver without gpumem: block 2 (VMM) refused", refused & 2);
    fprintf(stderr, "receiver without gpumem: block 2 %s\n", (refused & 2) ? "refused" : "opened");
    for (int i = 0; i < 4; i++) CK(cudaFree(blk[i]));
    if (failures) return 1;
    printf("ipc_check: OK\n");
    return 0;
}
