/* multigpu_child: the importing process of api_multigpu's IPC tests (tests/api/test_multigpu.c),
 * on another device than the exporter's:
 *
 *   multigpu_child import DEV HEX SEED N LAZY
 *
 * makes device DEV's primary context current, opens the handle HEX (cuIpcOpenMemHandle, with
 * CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS when LAZY is 1), checks that the N bytes there are pattern
 * SEED (cuMemcpyDtoH), runs a fill "kernel" of its own context over them as the driver would
 * (fakecuda_launch_kernel_fill: refused without peer access), then writes pattern SEED + 1 and
 * closes the handle. It prints "open RC", "bytes ok|bad", "kernel RC", "close RC", one a line,
 * and exits 0 unless a step that must work failed. */
#define API_CHILD_NAME "multigpu_child"
#include "api_common.h"
#include "fakecuda.h"

static void hex_decode(const char *s, void *out, size_t n)
{
    unsigned char *b = out;
    memset(out, 0, n);
    for (size_t i = 0; i < n && s[2 * i] && s[2 * i + 1]; i++) sscanf(s + 2 * i, "%2hhx", &b[i]);
}

static int import(int dev, const char *hex, uint32_t seed, size_t n, bool lazy)
{
    CUdevice d;
    CUcontext ctx;
    CUipcMemHandle h;
    CUdeviceptr p = 0;
    CK(cuInit(0));
    CK(cuDeviceGet(&d, dev));
    CK(cuDevicePrimaryCtxRetain(&ctx, d));
    CK(cuCtxSetCurrent(ctx));
    hex_decode(hex, &h, sizeof h);
    CUresult r = cuIpcOpenMemHandle(&p, h, lazy ? CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS : 0);
    printf("open %d\n", (int)r);
    if (r != CUDA_SUCCESS) return 1;
    unsigned char *buf = malloc(n);
    CHECK(buf, "malloc");
    CK(cuMemcpyDtoH(buf, p, n));
    printf("bytes %s\n", api_check_pattern(buf, n, seed) == n ? "ok" : "bad");
    printf("kernel %d\n", (int)fakecuda_launch_kernel_fill(0, p, 0x5A, n));
    CK(cuCtxSynchronize());
    api_fill_pattern(buf, n, seed + 1);
    CK(cuMemcpyHtoD(p, buf, n));
    free(buf);
    printf("close %d\n", (int)cuIpcCloseMemHandle(p));
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 7 && !strcmp(argv[1], "import"))
        return import(atoi(argv[2]), argv[3], (uint32_t)strtoul(argv[4], NULL, 10), strtoull(argv[5], NULL, 10),
                      argv[6][0] == '1');
    fprintf(stderr, "usage: multigpu_child import DEV HEX SEED N LAZY\n");
    return 2;
}
