/* shared_child <step>...: one member of a shared-budget group (GPUMEM_SHARED), for
 * tests/api/test_shared.c. It runs its steps in order and prints one line per step on stdout,
 * flushed, so the test can drive several members at once through pipes:
 *
 *   dev:N           make CUDA ordinal N's primary context current      -> "dev 0"
 *   alloc:SIZE      cuMemAlloc (K/M suffixes)                          -> "alloc <CUresult>"
 *   free            frees the newest live allocation                   -> "free <CUresult>"
 *   info            cuMemGetInfo                                       -> "info <free> <total>"
 *   total           cuDeviceTotalMem of the current device             -> "total <bytes>"
 *   wait            blocks until the test writes a line (or closes)    -> "waiting"
 *   kill            SIGKILL to itself (a member that dies holding memory)
 *   fork-sleep      forks a child that sleeps 30 s and touches no CUDA -> "forked <pid>"
 *   export          cuIpcGetMemHandle of the newest allocation         -> "handle <hex>"
 *   import:HEX      cuIpcOpenMemHandle                                 -> "import <CUresult>"
 *   stress:N:SEED:FILE:LIMIT  N random allocations and frees of 2-16 MiB; FILE is a shared
 *                   counter of the bytes every member holds, checked against LIMIT after every
 *                   allocation                                         -> "stress <ok> <oom>"
 *
 * Exit status 0; 90 when a step's own check fails (message on stderr). */
#include <stdarg.h>
#include <stdatomic.h>
#include <sys/mman.h>

#include "api_common.h"

#define MAX_LIVE 64

static CUdeviceptr live[MAX_LIVE];
static size_t live_size[MAX_LIVE];
static int nlive;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static void fail(const char *what)
{
    fprintf(stderr, "shared_child: CHECK FAILED: %s\n", what);
    exit(90);
}

static size_t parse_size(const char *s)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end == 'K') v <<= 10;
    if (*end == 'M') v <<= 20;
    if (*end == 'G') v <<= 30;
    return (size_t)v;
}

static void use_device(int ordinal)
{
    CUdevice dev;
    CUcontext ctx;
    if (cuDeviceGet(&dev, ordinal) || cuDevicePrimaryCtxRetain(&ctx, dev) || cuCtxSetCurrent(ctx))
        fail("no context");
}

static CUresult alloc_one(size_t size)
{
    if (nlive == MAX_LIVE) fail("too many live allocations");
    CUresult rc = cuMemAlloc(&live[nlive], size);
    if (rc == CUDA_SUCCESS) live_size[nlive++] = size;
    return rc;
}

static CUresult free_newest(void)
{
    if (!nlive) fail("nothing to free");
    nlive--;
    return cuMemFree(live[nlive]);
}

/* The stress step: `held` is shared by every member; what all of them hold can never pass the
 * group's limit, however their reservations interleave. */
static void stress(const char *arg)
{
    unsigned n = 0, seed = 0;
    char file[512];
    unsigned long long limit = 0;
    if (sscanf(arg, "%u:%u:%511[^:]:%llu", &n, &seed, file, &limit) != 4) fail("stress arguments");
    int fd = open(file, O_RDWR);
    _Atomic uint64_t *held = fd >= 0 ? mmap(NULL, 8, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
    if (held == MAP_FAILED) fail("stress counter file");
    unsigned ok = 0, oom = 0;
    for (unsigned i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        bool grow = nlive == 0 || (nlive < 8 && (seed >> 16) % 3 != 0);
        if (!grow) {
            atomic_fetch_sub(held, live_size[nlive - 1]);
            if (free_newest() != CUDA_SUCCESS) fail("free in stress");
            continue;
        }
        size_t size = (size_t)(1 + (seed >> 8) % 8) * (2u << 20);
        CUresult rc = alloc_one(size);
        if (rc == CUDA_ERROR_OUT_OF_MEMORY) {
            oom++;
            continue;
        }
        if (rc != CUDA_SUCCESS) fail("alloc in stress: not the driver's OOM");
        ok++;
        if (atomic_fetch_add(held, size) + size > limit) fail("the group held more than its limit");
    }
    while (nlive) {
        atomic_fetch_sub(held, live_size[nlive - 1]);
        free_newest();
    }
    say("stress %u %u", ok, oom);
}

static void step(const char *s)
{
    if (strncmp(s, "dev:", 4) == 0) {
        use_device(atoi(s + 4));
        say("dev 0");
    } else if (strncmp(s, "alloc:", 6) == 0) {
        say("alloc %d", (int)alloc_one(parse_size(s + 6)));
    } else if (strcmp(s, "free") == 0) {
        say("free %d", (int)free_newest());
    } else if (strcmp(s, "info") == 0) {
        size_t f = 0, t = 0;
        CUresult rc = cuMemGetInfo(&f, &t);
        if (rc) fail("cuMemGetInfo");
        say("info %zu %zu", f, t);
    } else if (strcmp(s, "total") == 0) {
        CUdevice dev;
        size_t t = 0;
        if (cuCtxGetDevice(&dev) || cuDeviceTotalMem(&t, dev)) fail("cuDeviceTotalMem");
        say("total %zu", t);
    } else if (strcmp(s, "wait") == 0) {
        say("waiting");
        char line[64];
        if (!fgets(line, sizeof line, stdin)) return;
    } else if (strcmp(s, "kill") == 0) {
        raise(SIGKILL);
    } else if (strcmp(s, "fork-sleep") == 0) {
        pid_t pid = fork();
        if (pid == 0) { /* holds none of the test's pipes open */
            close(0);
            close(1);
            close(2);
            api_sleep_ms(30000);
            _exit(0);
        }
        say("forked %d", (int)pid);
    } else if (strcmp(s, "export") == 0) {
        CUipcMemHandle h;
        if (!nlive || cuIpcGetMemHandle(&h, live[nlive - 1])) fail("cuIpcGetMemHandle");
        char hex[2 * CU_IPC_HANDLE_SIZE + 1];
        for (int i = 0; i < CU_IPC_HANDLE_SIZE; i++) sprintf(hex + 2 * i, "%02x", (unsigned char)h.reserved[i]);
        say("handle %s", hex);
    } else if (strncmp(s, "import:", 7) == 0) {
        CUipcMemHandle h;
        for (int i = 0; i < CU_IPC_HANDLE_SIZE; i++) {
            unsigned v = 0;
            sscanf(s + 7 + 2 * i, "%2x", &v);
            h.reserved[i] = (char)v;
        }
        CUdeviceptr p = 0;
        say("import %d", (int)cuIpcOpenMemHandle(&p, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS));
    } else if (strncmp(s, "stress:", 7) == 0) {
        stress(s + 7);
    } else {
        fail(s);
    }
}

int main(int argc, char **argv)
{
    if (cuInit(0)) fail("cuInit");
    use_device(0);
    for (int i = 1; i < argc; i++) step(argv[i]);
    return 0;
}
