/* semantics_probe: driver answers that decide how gpumem must behave, printed as "key: value"
 * lines (run without the shim to learn the driver's answer, under it to compare):
 *  - cuPointerGetAttributes on memory the driver does not know (rounding slack, freed);
 *  - an exported allocation freed by its exporter while another process still has it open:
 *    does the importer keep the old memory, and can the exporter's next allocation see its writes;
 *  - the error codes of 2D copies and 2D memsets that run past the end of an allocation.
 * Driver API only; link with -lcuda.  semantics_probe child RD WR HANDLE is internal. */
#include "probe_common.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void multi_attrs(const char *tag, CUdeviceptr p)
{
    CUpointer_attribute at[] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_BUFFER_ID,
                                CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                                CU_POINTER_ATTRIBUTE_CONTEXT, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL};
    unsigned type = 77;
    unsigned long long id = 77, start = 77;
    size_t size = 77;
    void *cx = (void *)77;
    int ord = 77;
    void *data[] = {&type, &id, &start, &size, &cx, &ord};
    CUresult r = cuPointerGetAttributes(6, at, data, p);
    printf("attrs %s: %s type=%u id=%s start=%s size=%zu ctx=%s ordinal=%d\n", tag, err(r), type,
           id == 0 ? "0" : id == 77 ? "untouched" : "set", start == 0 ? "0" : start == 77 ? "untouched" : "set",
           size, cx == NULL ? "null" : cx == (void *)77 ? "untouched" : "set", ord);
}

static int child(char **argv)
{
    int rd = atoi(argv[2]), wr = atoi(argv[3]);
    CUipcMemHandle h;
    unhex(argv[4], &h, sizeof h);
    ctx_init();
    CUdeviceptr p;
    CK(cuIpcOpenMemHandle(&p, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS));
    char c = 'r';
    if (write(wr, &c, 1) != 1 || read(rd, &c, 1) != 1) return 1; /* parent freed and reused */
    unsigned char v = 0;
    CUresult r = cuMemcpyDtoH(&v, p, 1);
    printf("importer reads after exporter free+realloc: %s %#x (0xaa old, 0xbb new)\n", err(r), v);
    r = cuMemsetD8(p, 0xcc, 1 << 20);
    CUresult s = cuCtxSynchronize();
    printf("importer writes after exporter free: %s %s\n", err(r), err(s));
    fflush(stdout);
    if (write(wr, &c, 1) != 1) return 1;
    printf("importer close: %s\n", err(cuIpcCloseMemHandle(p)));
    return 0;
}

static void exporter_free_probe(const char *self)
{
    CUdeviceptr x, y;
    CK(cuMemAlloc(&x, 1 << 20));
    CK(cuMemsetD8(x, 0xaa, 1 << 20));
    CK(cuCtxSynchronize());
    CUipcMemHandle h;
    CK(cuIpcGetMemHandle(&h, x));
    char hs[129];
    hex(&h, 64, hs);
    int to_child[2], to_parent[2];
    if (pipe(to_child) || pipe(to_parent)) exit(1);
    char rd[16], wr[16];
    sprintf(rd, "%d", to_child[0]);
    sprintf(wr, "%d", to_parent[1]);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        execl(self, self, "child", rd, wr, hs, (char *)NULL);
        _exit(127);
    }
    char c;
    if (read(to_parent[0], &c, 1) != 1) exit(1);
    CUresult fr = cuMemFree(x);
    CK(cuMemAlloc(&y, 1 << 20));
    printf("exporter free while imported: %s; next alloc at same address: %d\n", err(fr), x == y);
    CK(cuMemsetD8(y, 0xbb, 1 << 20));
    CK(cuCtxSynchronize());
    if (write(to_child[1], &c, 1) != 1 || read(to_parent[0], &c, 1) != 1) exit(1);
    unsigned char v = 0;
    CK(cuMemcpyDtoH(&v, y, 1));
    printf("exporter's new allocation after importer wrote: %#x (0xbb isolated, 0xcc shared)\n", v);
    int st;
    waitpid(pid, &st, 0);
    CK(cuMemFree(y));
}

static void copy2d_probe(void)
{
    CUdeviceptr d;
    CK(cuMemAlloc(&d, 4096));
    static unsigned char host[1 << 16];
    CUDA_MEMCPY2D m;
    memset(&m, 0, sizeof m);
    m.srcMemoryType = CU_MEMORYTYPE_HOST;
    m.srcHost = host;
    m.srcPitch = 256;
    m.dstMemoryType = CU_MEMORYTYPE_DEVICE;
    m.dstDevice = d;
    m.dstPitch = 256;
    m.WidthInBytes = 200;
    m.Height = 16; /* 15*256+200 = 4040: inside */
    printf("2D copy inside: %s\n", err(cuMemcpy2D(&m)));
    m.Height = 17; /* 16*256+200 = 4296: past 4096 */
    printf("2D copy past the end: %s\n", err(cuMemcpy2D(&m)));
    m.Height = 16;
    m.WidthInBytes = 300; /* wider than the pitch */
    printf("2D copy width > pitch: %s\n", err(cuMemcpy2D(&m)));
    printf("memset2D inside: %s\n", err(cuMemsetD2D8(d, 256, 1, 200, 16)));
    printf("memset2D past the end: %s\n", err(cuMemsetD2D8(d, 256, 1, 200, 17)));
    printf("memset past the end: %s\n", err(cuMemsetD8(d + 4000, 1, 200)));
    printf("1D H2D past the end: %s\n", err(cuMemcpyHtoD(d + 4000, host, 200)));
    CUcontext cx;
    CK(cuCtxGetCurrent(&cx));
    printf("peer copy past the end: %s\n", err(cuMemcpyPeer(d + 4000, cx, d, cx, 200)));
    CK(cuMemFree(d));
}

int main(int argc, char **argv)
{
    if (argc > 4 && !strcmp(argv[1], "child")) return child(argv);
    setvbuf(stdout, NULL, _IOLBF, 0);
    ctx_init();
    CUdeviceptr a, f;
    CK(cuMemAlloc(&a, 5000));
    CK(cuMemAlloc(&f, 5000));
    CK(cuMemFree(f));
    multi_attrs("live", a);
    multi_attrs("slack", a + 5000);
    multi_attrs("freed", f);
    copy2d_probe();
    exporter_free_probe("/proc/self/exe");
    printf("semantics_probe: OK\n");
    return 0;
}
