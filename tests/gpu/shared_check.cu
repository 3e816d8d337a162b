// shared_check: the shared budget (GPUMEM_SHARED) on the GPU. The parent touches no CUDA; it
// names a fresh region for its members (GPUMEM_SHARED=/dev/shm/gpumem-shared-check.<pid>, unless
// the caller set one) and drives member processes (this program, "member") line by line:
//
//   a: cudaMalloc 3 GiB and hold it     b: cudaMalloc 3 GiB while a holds its 3 GiB
//   b: cudaMemGetInfo                   a frees and exits; b frees, then cudaMalloc 3 GiB again
//   c: cudaMalloc 3 GiB, then SIGKILL   d: cudaMalloc 3 GiB (c's share must come back)
//
// Printed: a_rc, b_rc (and its name), b_total_mib, b_free_mib, together_gib (what a and b held at
// once), b_retry_rc, d_after_kill_rc; then "shared_check: OK" when every call that must succeed
// did. Under a 4 GiB group b_rc must be cudaErrorMemoryAllocation; without the shim it is 0.
#include <cuda_runtime.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const size_t GiB = 1ull << 30;

static int member(void)
{
    char line[64];
    void *held[4];
    int n = 0;
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "alloc", 5) == 0) {
            void *p = NULL;
            cudaError_t rc = cudaMalloc(&p, 3 * GiB);
            if (rc == cudaSuccess && n < 4) held[n++] = p;
            else cudaGetLastError(); // a refused allocation is not sticky
            printf("%d %s\n", (int)rc, cudaGetErrorName(rc));
        } else if (strncmp(line, "info", 4) == 0) {
            size_t f = 0, t = 0;
            cudaMemGetInfo(&f, &t);
            printf("%zu %zu\n", f >> 20, t >> 20);
        } else if (strncmp(line, "free", 4) == 0) {
            while (n) cudaFree(held[--n]);
            printf("freed\n");
        } else {
            break;
        }
        fflush(stdout);
    }
    return 0;
}

typedef struct {
    pid_t pid;
    FILE *to, *from;
} proc;

static proc spawn(const char *self)
{
    int in[2], out[2];
    // close-on-exec: a later member must not inherit this one's stdin (it would never see EOF)
    if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC)) exit(2);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        close(in[1]);
        close(out[0]);
        execl(self, self, "member", (char *)NULL);
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    proc p = {pid, fdopen(in[1], "w"), fdopen(out[0], "r")};
    return p;
}

// Sends one command and returns the first number of the answer (-1 when the member is gone).
static long ask(proc *p, const char *cmd, char *answer, size_t cap)
{
    fprintf(p->to, "%s\n", cmd);
    fflush(p->to);
    if (!fgets(answer, (int)cap, p->from)) return -1;
    answer[strcspn(answer, "\n")] = 0;
    return strtol(answer, NULL, 10);
}

static void quit(proc *p)
{
    fclose(p->to);
    fclose(p->from);
    waitpid(p->pid, NULL, 0);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "member") == 0) return member();
    char region[128];
    if (!getenv("GPUMEM_SHARED")) {
        snprintf(region, sizeof region, "/dev/shm/gpumem-shared-check.%d", (int)getpid());
        unlink(region);
        setenv("GPUMEM_SHARED", region, 1);
    }
    char self[4096];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len <= 0) return 2;
    self[len] = 0;
    bool ok = true;
    char ans[128], name[96] = "";

    proc a = spawn(self), b = spawn(self);
    long a_rc = ask(&a, "alloc", ans, sizeof ans);
    long b_rc = ask(&b, "alloc", ans, sizeof ans);
    sscanf(ans, "%*d %95s", name);
    ask(&b, "info", ans, sizeof ans);
    long free_mib = 0, total_mib = 0;
    sscanf(ans, "%ld %ld", &free_mib, &total_mib);
    int together = (a_rc == 0 ? 3 : 0) + (b_rc == 0 ? 3 : 0);
    if (ask(&a, "free", ans, sizeof ans) < 0) ok = false;
    quit(&a);
    ask(&b, "free", ans, sizeof ans); // what b holds (under a per-process limit: its 3 GiB)
    long b_retry = ask(&b, "alloc", ans, sizeof ans);
    ask(&b, "free", ans, sizeof ans);
    quit(&b);

    proc c = spawn(self);
    long c_rc = ask(&c, "alloc", ans, sizeof ans);
    kill(c.pid, SIGKILL);
    quit(&c);
    proc d = spawn(self);
    long d_rc = ask(&d, "alloc", ans, sizeof ans);
    ask(&d, "free", ans, sizeof ans);
    quit(&d);
    if (getenv("GPUMEM_SHARED") && strncmp(getenv("GPUMEM_SHARED"), "/dev/shm/gpumem-shared-check.", 29) == 0)
        unlink(getenv("GPUMEM_SHARED"));

    printf("a_rc=%ld\nb_rc=%ld\nb_error=%s\nb_total_mib=%ld\nb_free_mib=%ld\ntogether_gib=%d\n", a_rc, b_rc, name,
           total_mib, free_mib, together);
    printf("b_retry_rc=%ld\nc_rc=%ld\nd_after_kill_rc=%ld\n", b_retry, c_rc, d_rc);
    ok &= a_rc == 0 && b_retry == 0 && c_rc == 0 && d_rc == 0 && (b_rc == 0 || b_rc == 2);
    printf("shared_check: %s\n", ok ? "OK" : "FAILED");
    return ok ? 0 : 1;
}
