/* ipc_child: the receiving process of the IPC tests (tests/api/test_ipc.c). It reads one command
 * per line on stdin and answers one line on stdout, so the test can act in between (free a block,
 * allocate again) while the child holds what it opened:
 *
 *   start                  cuInit, device 0's primary context current      -> ok
 *   open K HEX [v1]        cuIpcOpenMemHandle(_v2, or the 4.1 ABI) into K  -> open K RC
 *   range K [OFF]          cuMemGetAddressRange(ptr K + OFF)               -> range K RC BASE-PTR SIZE
 *   attr K                 RANGE_START_ADDR, RANGE_SIZE, BUFFER_ID         -> attr K RC START-PTR RC SIZE RC ID
 *   write K SEED N         N pattern bytes into K (cuMemcpyHtoD)           -> write K RC
 *   diff K L               ptr K - ptr L                                   -> diff K L D
 *   close K / free K       cuIpcCloseMemHandle / cuMemFree                 -> close K RC / free K RC
 *   check K SEED N         N bytes of K against the pattern (cuMemcpyDtoH) -> check K RC FIRST-BAD (N: intact)
 *   alloc K N SEED         cuMemAlloc N bytes into K, filled with SEED      -> alloc K RC
 *   export K               cuIpcGetMemHandle of K (this one exports)       -> export K RC HEX
 *   drop                   become nobody (uid/gid 65534; before start)     -> drop 0 RC
 *   exit                   exits at once, closing nothing, as if killed     (no answer)
 *   quit                   exit(0): exit handlers run                      (no answer)
 *
 * It runs with or without the shim preloaded: the tests check both receivers. */
#include "api_common.h"

#define SLOTS 16

static CUdeviceptr ptrs[SLOTS];

static void hex_decode(const char *s, void *out, size_t n)
{
    unsigned char *b = out;
    memset(out, 0, n);
    for (size_t i = 0; i < n && s[2 * i] && s[2 * i + 1]; i++) sscanf(s + 2 * i, "%2hhx", &b[i]);
}

static CUresult open_v1(CUdeviceptr *p, CUipcMemHandle h)
{
    /* The 4.1 ABI, as a program built against an old cuda.h finds it. */
    void *fn = NULL;
    CUdriverProcAddressQueryResult st;
    CUresult r = cuGetProcAddress("cuIpcOpenMemHandle", &fn, 4010, 0, &st);
    if (r != CUDA_SUCCESS) return r;
    CUresult (*open)(CUdeviceptr *, CUipcMemHandle, unsigned) = (CUresult(*)(CUdeviceptr *, CUipcMemHandle, unsigned))fn;
    return open(p, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
}

static void cmd_open(int k, const char *hex, const char *abi)
{
    CUipcMemHandle h;
    hex_decode(hex, &h, sizeof h);
    CUresult r = abi && !strcmp(abi, "v1") ? open_v1(&ptrs[k], h)
                                           : cuIpcOpenMemHandle(&ptrs[k], h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
    printf("open %d %d\n", k, (int)r);
}

static void cmd_range(int k, long long off)
{
    CUdeviceptr base = 0;
    size_t size = 0;
    CUresult r = cuMemGetAddressRange(&base, &size, ptrs[k] + (CUdeviceptr)off);
    printf("range %d %d %lld %zu\n", k, (int)r, (long long)(base - ptrs[k]), size);
}

static void cmd_attr(int k)
{
    CUdeviceptr start = 0;
    size_t size = 0;
    unsigned long long id = 0;
    CUresult r1 = cuPointerGetAttribute(&start, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, ptrs[k]);
    CUresult r2 = cuPointerGetAttribute(&size, CU_POINTER_ATTRIBUTE_RANGE_SIZE, ptrs[k]);
    CUresult r3 = cuPointerGetAttribute(&id, CU_POINTER_ATTRIBUTE_BUFFER_ID, ptrs[k]);
    printf("attr %d %d %lld %d %zu %d %llu\n", k, (int)r1, (long long)(start - ptrs[k]), (int)r2, size,
           (int)r3, id);
}

static void cmd_write(int k, unsigned seed, size_t n)
{
    unsigned char *buf = malloc(n);
    api_fill_pattern(buf, n, seed);
    CUresult r = cuMemcpyHtoD(ptrs[k], buf, n);
    free(buf);
    printf("write %d %d\n", k, (int)r);
}

static void cmd_check(int k, unsigned seed, size_t n)
{
    unsigned char *buf = malloc(n);
    CUresult r = cuMemcpyDtoH(buf, ptrs[k], n);
    printf("check %d %d %zu\n", k, (int)r, r ? 0 : api_check_pattern(buf, n, seed));
    free(buf);
}

static void cmd_alloc(int k, size_t n, unsigned seed)
{
    unsigned char *buf = malloc(n);
    api_fill_pattern(buf, n, seed);
    CUresult r = cuMemAlloc(&ptrs[k], n);
    if (!r) r = cuMemcpyHtoD(ptrs[k], buf, n);
    free(buf);
    printf("alloc %d %d\n", k, (int)r);
}

static void cmd_export(int k)
{
    CUipcMemHandle h;
    memset(&h, 0, sizeof h);
    CUresult r = cuIpcGetMemHandle(&h, ptrs[k]);
    printf("export %d %d ", k, (int)r);
    for (size_t i = 0; i < sizeof h; i++) printf("%02x", (unsigned char)h.reserved[i]);
    printf("\n");
}

static int slot(const char *s)
{
    int k = s ? atoi(s) : -1;
    if (k < 0 || k >= SLOTS) {
        fprintf(stderr, "ipc_child: bad slot %s\n", s ? s : "(none)");
        exit(64);
    }
    return k;
}

static void run_line(char *line)
{
    char *save = NULL;
    char *cmd = strtok_r(line, " \n", &save);
    char *a = strtok_r(NULL, " \n", &save), *b = strtok_r(NULL, " \n", &save);
    char *c = strtok_r(NULL, " \n", &save);
    if (!cmd) return;
    if (!strcmp(cmd, "start")) {
        CUdevice dev;
        CUcontext ctx;
        CUresult r = cuInit(0);
        if (!r) r = cuDeviceGet(&dev, 0);
        if (!r) r = cuDevicePrimaryCtxRetain(&ctx, dev);
        if (!r) r = cuCtxSetCurrent(ctx);
        printf(r ? "start failed %d\n" : "ok\n", (int)r);
    } else if (!strcmp(cmd, "open")) cmd_open(slot(a), b ? b : "", c);
    else if (!strcmp(cmd, "range")) cmd_range(slot(a), b ? atoll(b) : 0);
    else if (!strcmp(cmd, "attr")) cmd_attr(slot(a));
    else if (!strcmp(cmd, "write")) cmd_write(slot(a), (unsigned)atoi(b ? b : "0"), (size_t)atoll(c ? c : "0"));
    else if (!strcmp(cmd, "check")) cmd_check(slot(a), (unsigned)atoi(b ? b : "0"), (size_t)atoll(c ? c : "0"));
    else if (!strcmp(cmd, "alloc")) cmd_alloc(slot(a), (size_t)atoll(b ? b : "0"), (unsigned)atoi(c ? c : "0"));
    else if (!strcmp(cmd, "export")) cmd_export(slot(a));
    else if (!strcmp(cmd, "drop")) printf("drop 0 %d\n", setgid(65534) != 0 || setuid(65534) != 0 ? -1 : 0);
    else if (!strcmp(cmd, "diff")) printf("diff %s %s %lld\n", a, b, (long long)(ptrs[slot(a)] - ptrs[slot(b)]));
    else if (!strcmp(cmd, "close")) printf("close %s %d\n", a, (int)cuIpcCloseMemHandle(ptrs[slot(a)]));
    else if (!strcmp(cmd, "free")) printf("free %s %d\n", a, (int)cuMemFree(ptrs[slot(a)]));
    else if (!strcmp(cmd, "exit")) _exit(0); /* as if killed: no exit handler runs */
    else if (!strcmp(cmd, "quit")) exit(0);
    else printf("unknown %s\n", cmd);
}

int main(void)
{
    char line[512];
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) run_line(line);
    return 0;
}
