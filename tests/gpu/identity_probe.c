/* identity_probe: what the real driver answers about allocation identity (address ranges,
 * pointer attributes, buffer ids, IPC handles), printed as "key: value" lines so a run without
 * the shim and one under it can be compared line by line, and the driver's answers written into
 * docs/compatibility.md. Driver API only; link with -lcuda.
 *
 *   identity_probe            the parent: allocations, queries, IPC export, spawns the child
 *   identity_probe child ...  (internal) opens the handles it is given in argv */
#include "probe_common.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void range(const char *tag, CUdeviceptr base, CUdeviceptr p)
{
    CUdeviceptr b = 0;
    size_t s = 0;
    CUresult r = cuMemGetAddressRange(&b, &s, p);
    if (r == CUDA_SUCCESS)
        printf("range %s: ok base=%+lld size=%zu\n", tag, (long long)(b - base), s);
    else
        printf("range %s: %s\n", tag, err(r));
}

static void attrs(const char *tag, CUdeviceptr base, CUdeviceptr p)
{
    static const struct { CUpointer_attribute a; const char *name; int kind; } list[] = {
        {CU_POINTER_ATTRIBUTE_CONTEXT, "CONTEXT", 9},
        {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, "MEMORY_TYPE", 4},
        {CU_POINTER_ATTRIBUTE_DEVICE_POINTER, "DEVICE_POINTER", 1},
        {CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, "SYNC_MEMOPS", 4},
        {CU_POINTER_ATTRIBUTE_BUFFER_ID, "BUFFER_ID", 8},
        {CU_POINTER_ATTRIBUTE_IS_MANAGED, "IS_MANAGED", 4},
        {CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, "DEVICE_ORDINAL", 4},
        {CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, "IS_LEGACY_CUDA_IPC_CAPABLE", 4},
        {CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, "RANGE_START_ADDR", 1},
        {CU_POINTER_ATTRIBUTE_RANGE_SIZE, "RANGE_SIZE", 8},
        {CU_POINTER_ATTRIBUTE_MAPPED, "MAPPED", 4},
        {CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES, "ALLOWED_HANDLE_TYPES", 8},
        {CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE, "IS_GPU_DIRECT_RDMA_CAPABLE", 4},
        {CU_POINTER_ATTRIBUTE_ACCESS_FLAGS, "ACCESS_FLAGS", 4},
        {CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE, "MEMPOOL_HANDLE", 9},
        {CU_POINTER_ATTRIBUTE_MAPPING_SIZE, "MAPPING_SIZE", 8},
        {CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR, "MAPPING_BASE_ADDR", 1},
        {CU_POINTER_ATTRIBUTE_MEMORY_BLOCK_ID, "MEMORY_BLOCK_ID", 8},
    };
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++) {
        unsigned long long v = 0;
        CUresult r = cuPointerGetAttribute(&v, list[i].a, p);
        if (r != CUDA_SUCCESS) {
            printf("attr %s %s: %s\n", tag, list[i].name, err(r));
            continue;
        }
        if (list[i].kind == 1) printf("attr %s %s: base%+lld\n", tag, list[i].name, (long long)(v - base));
        else if (list[i].kind == 9) printf("attr %s %s: %s\n", tag, list[i].name, v ? "set" : "null");
        else if (list[i].kind == 4) printf("attr %s %s: %u\n", tag, list[i].name, (unsigned)v);
        else printf("attr %s %s: %llu\n", tag, list[i].name, v);
    }
}

static unsigned long long buffer_id(CUdeviceptr p)
{
    unsigned long long id = 0;
    cuPointerGetAttribute(&id, CU_POINTER_ATTRIBUTE_BUFFER_ID, p);
    return id;
}

static int child(int argc, char **argv)
{
    ctx_init();
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *name = argv[i];
        CUipcMemHandle h;
        unhex(argv[i + 1], &h, sizeof h);
        CUdeviceptr p = 0, p2 = 0;
        CUresult r = cuIpcOpenMemHandle(&p, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
        printf("child open %s: %s\n", name, err(r));
        if (r != CUDA_SUCCESS) continue;
        range(name, p, p);
        CUresult r2 = cuIpcOpenMemHandle(&p2, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
        printf("child reopen %s: %s same=%d\n", name, err(r2), r2 == CUDA_SUCCESS && p2 == p);
        /* the block's first bytes tell the parent where this pointer landed */
        CK(cuMemsetD8(p, (unsigned char)(0x40 + i), 4096));
        CK(cuCtxSynchronize());
        printf("child free %s: %s\n", name, err(cuMemFree(p)));
        printf("child close1 %s: %s\n", name, err(cuIpcCloseMemHandle(p)));
        if (r2 == CUDA_SUCCESS)
            printf("child close2 %s: %s\n", name, err(cuIpcCloseMemHandle(p2)));
        printf("child close3 %s: %s\n", name, err(cuIpcCloseMemHandle(p)));
    }
    return 0;
}

static void flip_probe(const CUipcMemHandle *h, int argc_max, char **args, int *nargs, char store[][200])
{
    /* flipped copies of one handle: which bytes the driver checks */
    static const int pos[] = {0, 1, 4, 8, 12, 16, 24, 32, 40, 48, 56, 60, 63};
    for (size_t k = 0; k < sizeof pos / sizeof pos[0] && *nargs + 2 <= argc_max; k++) {
        CUipcMemHandle f = *h;
        f.reserved[pos[k]] ^= 0x5a;
        char *name = store[2 * k], *val = store[2 * k + 1];
        sprintf(name, "flip%d", pos[k]);
        hex(&f, sizeof f, val);
        args[(*nargs)++] = name;
        args[(*nargs)++] = val;
    }
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "child")) return child(argc, argv);
    ctx_init();
    setvbuf(stdout, NULL, _IOLBF, 0);

    CUdeviceptr a, b, c, d;
    CK(cuMemAlloc(&a, 5000));
    CK(cuMemAlloc(&b, 1 << 20));
    CK(cuMemAlloc(&c, 64 << 20));
    static const size_t offs[] = {0, 4999, 5000, 5119, 5120, 8191, 8192, 65535, 65536, (2 << 20) - 1};
    for (size_t i = 0; i < sizeof offs / sizeof offs[0]; i++) {
        char tag[64];
        sprintf(tag, "a+%zu", offs[i]);
        range(tag, a, a + offs[i]);
    }
    range("b+1048575", b, b + 1048575);
    range("b+1048576", b, b + 1048576);
    attrs("a", a, a);
    attrs("a+100", a, a + 100);
    attrs("a+5000", a, a + 5000);

    unsigned long long ida = buffer_id(a), idb = buffer_id(b);
    CK(cuMemFree(a));
    CUdeviceptr a2;
    CK(cuMemAlloc(&a2, 5000));
    printf("realloc same address: %d\n", a2 == a);
    printf("buffer id: a!=b %d, a2 new %d\n", ida != idb, buffer_id(a2) != ida);
    range("freed-a", a, a); /* a2 may sit at a; then this is a2 */

    int one = 1;
    printf("set SYNC_MEMOPS interior: %s\n", err(cuPointerSetAttribute(&one, CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, b + 100)));
    CUmemGenericAllocationHandle gh;
    printf("retain handle of cuMemAlloc memory: %s\n", err(cuMemRetainAllocationHandle(&gh, (void *)(uintptr_t)b)));

    CUipcMemHandle hb, hbi, hc, hd;
    CK(cuIpcGetMemHandle(&hb, b));
    CUresult ri = cuIpcGetMemHandle(&hbi, b + 4096);
    printf("export interior: %s same-as-base=%d\n", err(ri), ri == CUDA_SUCCESS && !memcmp(&hb, &hbi, sizeof hb));
    CK(cuIpcGetMemHandle(&hc, c));
    CUipcMemHandle hb2;
    CK(cuIpcGetMemHandle(&hb2, b));
    printf("export twice identical: %d\n", !memcmp(&hb, &hb2, sizeof hb));
    CK(cuMemAlloc(&d, 1 << 20));
    CK(cuMemFree(d));
    printf("export freed: %s\n", err(cuIpcGetMemHandle(&hd, d)));
    char sb[129], sbi[129], sc[129], sg[129];
    hex(&hb, 64, sb);
    hex(&hbi, 64, sbi);
    hex(&hc, 64, sc);
    printf("handle b: %s\nhandle c: %s\n", sb, sc);
    CUipcMemHandle g;
    memset(&g, 0, sizeof g);
    memcpy(g.reserved, "gpumem-ipc\1", 11);
    hex(&g, 64, sg);
    CUdeviceptr own;
    printf("open own handle: %s\n", err(cuIpcOpenMemHandle(&own, hb, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)));
    printf("open garbage in parent: %s\n", err(cuIpcOpenMemHandle(&own, g, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)));

    CK(cuMemsetD8(b, 0, 1 << 20));
    CK(cuMemsetD8(c, 0, 64 << 20));
    CK(cuCtxSynchronize());
    char *args[64];
    char store[32][200];
    int n = 0;
    args[n++] = argv[0];
    args[n++] = "child";
    args[n++] = "b";
    args[n++] = sb;
    args[n++] = "b_interior";
    args[n++] = sbi;
    args[n++] = "c";
    args[n++] = sc;
    args[n++] = "garbage";
    args[n++] = sg;
    flip_probe(&hb, 60, args, &n, store);
    args[n] = NULL;
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        execv("/proc/self/exe", args);
        _exit(127);
    }
    int st;
    waitpid(pid, &st, 0);
    unsigned char first[2];
    CK(cuMemcpyDtoH(first, b, 1));
    CK(cuMemcpyDtoH(first + 1, b + 4096, 1));
    printf("parent sees b[0]=%#x b[4096]=%#x\n", first[0], first[1]);
    CK(cuMemcpyDtoH(first, c, 1));
    printf("parent sees c[0]=%#x\n", first[0]);
    printf("identity_probe: OK\n");
    return 0;
}
