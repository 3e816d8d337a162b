/* Symbolization: return addresses to function, module+offset and file:line, the way
 * LeakSanitizer prints them. dladdr names every frame (cached per pc); addr2line adds file:line
 * and names of static functions, batched: one process per module for all the frames a report
 * prints. The leak report and the log line of a refused copy share these caches, under one lock. */
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "gm_track.h"

#define MAX_FRAMES GM_MAX_FRAMES

static pthread_mutex_t symbols_lock = PTHREAD_MUTEX_INITIALIZER;

/* A fork child may inherit the lock held by a thread it does not have. */
static void reset_in_child(void) { pthread_mutex_init(&symbols_lock, NULL); }

static void register_fork(void)
{
    static const gm_fork_handlers handlers = {NULL, NULL, reset_in_child};
    gm_fork_register(GM_FORK_SYMBOLS, &handlers);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void lock_symbols(void)
{
    pthread_once(&fork_once, register_fork);
    pthread_mutex_lock(&symbols_lock);
}

const char *gm_symbols_base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* Address addr2line wants: relative to the load base for PIE objects, absolute for ET_EXEC. */
static uintptr_t file_address(const Dl_info *info, uintptr_t pc)
{
    const ElfW(Ehdr) *eh = info->dli_fbase;
    return eh && eh->e_type == ET_EXEC ? pc : pc - (uintptr_t)info->dli_fbase;
}

/* ---- addr2line, batched: one process per module for every frame a report prints. */

typedef struct line_info {
    uintptr_t pc;
    char function[160];
    char file[256];
    int line;
} line_info;

static line_info *lines; /* what addr2line said, by pc */
static size_t nlines, lines_cap;

static const line_info *line_of(uintptr_t pc)
{
    for (size_t i = 0; i < nlines; i++)
        if (lines[i].pc == pc) return &lines[i];
    return NULL;
}

/* Modules over this size are gm_framework libraries (libtorch_cuda.so is ~1 GB): addr2line would
 * spend seconds parsing them, and their exported names come from dladdr anyway. */
#define ADDR2LINE_MAX_MODULE ((off_t)256 << 20)

static bool worth_addr2line(const char *module)
{
    struct stat st;
    return module[0] && stat(module, &st) == 0 && st.st_size <= ADDR2LINE_MAX_MODULE;
}

/* Reads addr2line's "function\nfile:line\n" pairs for `n` addresses into `out`. */
static void parse_addr2line(FILE *in, line_info *out, size_t n)
{
    char fn[512], loc[1024];
    for (size_t i = 0; i < n && fgets(fn, sizeof fn, in) && fgets(loc, sizeof loc, in); i++) {
        fn[strcspn(fn, "\n")] = 0;
        loc[strcspn(loc, "\n")] = 0;
        if (strcmp(fn, "??") != 0) snprintf(out[i].function, sizeof out[i].function, "%.159s", fn);
        char *colon = strrchr(loc, ':');
        if (colon && strncmp(loc, "??", 2) != 0) {
            *colon = 0;
            int line = atoi(colon + 1);
            if (line > 0) {
                snprintf(out[i].file, sizeof out[i].file, "%.255s", gm_symbols_base_name(loc));
                out[i].line = line;
            }
        }
    }
}

/* One `addr2line -f -C -e module addr...` for up to 256 addresses; no shell involved. */
static void run_addr2line(const char *module, const uintptr_t *offsets, line_info *out, size_t n)
{
    static char addrs[256][24];
    const char *argv[256 + 8];
    size_t a = 0;
    argv[a++] = "addr2line";
    argv[a++] = "-f";
    argv[a++] = "-C";
    argv[a++] = "-e";
    argv[a++] = module;
    for (size_t i = 0; i < n; i++) {
        snprintf(addrs[i], sizeof addrs[i], "0x%lx", (unsigned long)offsets[i]);
        argv[a++] = addrs[i];
    }
    argv[a] = NULL;
    int fds[2];
    if (pipe(fds)) return;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], STDOUT_FILENO);
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) dup2(devnull, STDERR_FILENO);
        close(fds[0]);
        execvp("addr2line", (char *const *)argv);
        _exit(127);
    }
    close(fds[1]);
    FILE *in = fdopen(fds[0], "r");
    if (in) {
        if (pid > 0) parse_addr2line(in, out, n);
        fclose(in);
    } else {
        close(fds[0]);
    }
    if (pid > 0) waitpid(pid, NULL, 0);
}

/* Asks addr2line about every given frame of `module`, in batches of 256. */
static void resolve_module(const char *module, const gm_frame *pending, size_t n)
{
    if (!worth_addr2line(module)) return;
    for (size_t done = 0; done < n;) {
        size_t batch = n - done < 256 ? n - done : 256;
        uintptr_t offsets[256];
        if (nlines + batch > lines_cap) {
            size_t ncap = (nlines + batch) * 2;
            line_info *grown = realloc(lines, ncap * sizeof *grown);
            if (!grown) return;
            lines = grown;
            lines_cap = ncap;
        }
        line_info *out = &lines[nlines];
        memset(out, 0, batch * sizeof *out);
        for (size_t i = 0; i < batch; i++) {
            offsets[i] = pending[done + i].offset;
            out[i].pc = pending[done + i].pc;
        }
        run_addr2line(module, offsets, out, batch);
        nlines += batch;
        done += batch;
    }
}

/* Whether addr2line can add to what dladdr said: a missing name, or the program itself (where
 * debug information for file:line usually is). */
static bool wants_addr2line(const gm_frame *f)
{
    return f->module[0] && (!f->function[0] || strcmp(f->module, gm_program_path()) == 0);
}

/* What dladdr said of each pc seen so far. dladdr scans a module's symbol table, which for a
 * library like libtorch_cuda costs a large part of a millisecond, and the report asks for the
 * same gm_frames several times (suppressions, addr2line batching, printing; groups share most of
 * their frames), so each pc is described once. Under symbols_lock. */
static gm_frame *described;
static size_t ndescribed, described_cap;
static __thread bool holds_symbols_lock; /* a report that could not get the lock goes uncached */

static void describe(gm_frame *f)
{
    Dl_info info;
    memset(&info, 0, sizeof info);
    f->function[0] = f->module[0] = f->file[0] = 0;
    f->line = 0;
    f->offset = 0;
    /* pc - 1: the call instruction, not the one after it (matters at the end of a function). */
    if (!f->pc || !dladdr((void *)(f->pc - 1), &info) || !info.dli_fname) return;
    bool main_exe = !info.dli_fname[0] || strcmp(gm_symbols_base_name(info.dli_fname), gm_symbols_base_name(gm_program_path())) == 0;
    snprintf(f->module, sizeof f->module, "%s", main_exe ? gm_program_path() : info.dli_fname);
    f->offset = file_address(&info, f->pc - 1);
    if (info.dli_sname) snprintf(f->function, sizeof f->function, "%s", info.dli_sname);
}

static void describe_cached(gm_frame *f)
{
    if (!holds_symbols_lock) {
        describe(f);
        return;
    }
    for (size_t i = 0; i < ndescribed; i++)
        if (described[i].pc == f->pc) {
            *f = described[i];
            return;
        }
    describe(f);
    if (ndescribed == described_cap) {
        size_t cap = described_cap ? described_cap * 2 : 256;
        gm_frame *grown = realloc(described, cap * sizeof *grown);
        if (!grown) return;
        described = grown;
        described_cap = cap;
    }
    described[ndescribed++] = *f;
}

/* dladdr, plus what a batched addr2line run already found for this pc. */
static void symbolize(gm_frame *f)
{
    describe_cached(f);
    const line_info *li = line_of(f->pc);
    if (li) {
        if (li->function[0]) snprintf(f->function, sizeof f->function, "%s", li->function);
        if (li->line) {
            snprintf(f->file, sizeof f->file, "%s", li->file);
            f->line = li->line;
        }
    }
}

/* Frames of gpumem itself and of the CUDA libraries say nothing about the program. */
static bool is_plumbing(const gm_frame *f)
{
    const char *m = gm_symbols_base_name(f->module);
    static const char *const modules[] = {"libcuda.so", "libcudart.so", "libgpumem"};
    for (size_t i = 0; i < sizeof modules / sizeof *modules; i++)
        if (strncmp(m, modules[i], strlen(modules[i])) == 0) return true;
    static const char *const functions[] = {"cuda", "__cuda", "cudart::", "libcudart", "cuMem", "gpumem_"};
    for (size_t i = 0; i < sizeof functions / sizeof *functions; i++)
        if (strncmp(f->function, functions[i], strlen(functions[i])) == 0) return true;
    return false;
}

/* The frames of a stack from the program's own call on: gpumem's and the CUDA libraries' frames
 * at the top say nothing about the program (the last frame is kept whatever it is). */
size_t gm_symbols_program_frames(const uintptr_t *pc, size_t n, gm_frame *out)
{
    size_t kept = 0;
    for (size_t i = 0; i < n && kept < MAX_FRAMES; i++) {
        out[kept].pc = pc[i];
        symbolize(&out[kept]);
        if (kept == 0 && is_plumbing(&out[0]) && i + 1 < n) continue;
        kept++;
    }
    return kept;
}


/* addr2line once per module, for all of its pending frames together. */
static void resolve_pending(gm_frame *pending, size_t npending)
{
    gm_frame *same = npending ? malloc(npending * sizeof *same) : NULL;
    for (size_t i = 0; same && i < npending; i++) {
        if (!pending[i].module[0]) continue;
        char module[256];
        snprintf(module, sizeof module, "%s", pending[i].module);
        size_t ns = 0;
        for (size_t k = i; k < npending; k++)
            if (strcmp(pending[k].module, module) == 0) {
                same[ns++] = pending[k];
                pending[k].module[0] = 0;
            }
        resolve_module(module, same, ns);
    }
    free(same);
}

void gm_symbols_resolve(const gm_frame *frames, size_t n)
{
    gm_frame *pending = n ? malloc(n * sizeof *pending) : NULL;
    size_t npending = 0;
    for (size_t i = 0; pending && i < n; i++)
        if (wants_addr2line(&frames[i]) && !line_of(frames[i].pc)) pending[npending++] = frames[i];
    resolve_pending(pending, npending);
    free(pending);
}

/* At exit another thread may hold the lock (a refused copy being logged): wait a little, never
 * forever; without the lock the frames are described again instead of read from the caches. */
bool gm_symbols_begin(void)
{
    pthread_once(&fork_once, register_fork);
    bool locked = gm_lock_for_report(&symbols_lock);
    holds_symbols_lock = locked;
    return locked;
}

void gm_symbols_end(bool locked)
{
    holds_symbols_lock = false;
    if (locked) pthread_mutex_unlock(&symbols_lock);
}

/* "    #i 0x<pc> in <function> <module>+0x<offset> (file:line)": LeakSanitizer's frame line. */
int gm_symbols_frame_line(char *out, size_t cap, size_t i, const gm_frame *f)
{
    int w = snprintf(out, cap, "    #%zu 0x%lx in %s %s+0x%lx", i, (unsigned long)f->pc,
                     f->function[0] ? f->function : "<unknown>",
                     f->module[0] ? gm_symbols_base_name(f->module) : "<unknown>", (unsigned long)f->offset);
    if (w >= 0 && (size_t)w < cap && f->line)
        w += snprintf(out + w, cap - (size_t)w, " (%s:%d)", f->file, f->line);
    return w;
}

size_t gm_symbols_format_stack(char *out, size_t cap, const uintptr_t *pc, size_t n)
{
    gm_frame f[MAX_FRAMES], pending[MAX_FRAMES];
    size_t npending = 0, used = 0;
    if (cap) out[0] = 0;
    lock_symbols();
    holds_symbols_lock = true;
    n = gm_symbols_program_frames(pc, n, f);
    for (size_t i = 0; i < n; i++)
        if (wants_addr2line(&f[i]) && !line_of(f[i].pc)) pending[npending++] = f[i];
    if (npending) {
        resolve_pending(pending, npending);
        for (size_t i = 0; i < n; i++) symbolize(&f[i]);
    }
    holds_symbols_lock = false;
    pthread_mutex_unlock(&symbols_lock);
    for (size_t i = 0; i < n && used + 2 < cap; i++) {
        int w = gm_symbols_frame_line(out + used, cap - used - 1, i, &f[i]);
        if (w < 0) break;
        used += (size_t)w < cap - used - 1 ? (size_t)w : cap - used - 2;
        out[used++] = '\n';
        out[used] = 0;
    }
    return used;
}
