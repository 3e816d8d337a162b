/* The leak report: live allocations grouped by call stack and device, largest total first, in
 * the words LeakSanitizer and compute-sanitizer users already grep for (text) or as JSON
 * (docs/report-format.md), then the statistics. Written at exit (an on_exit handler, so it sees
 * the exit status for GPUMEM_LEAK_EXITCODE) and at every leak check point (context destroyed,
 * device reset). It makes no CUDA call: it only reads gpumem's own tables. */
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <fnmatch.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "gm_internal.h"

#define MAX_FRAMES 64

typedef struct leak_group {
    int device;
    uint8_t memory; /* gm_leak_memory: device memory or pinned host memory */
    uint16_t tag;   /* tags.c id, 0 = none */
    uintptr_t caller;
    uint32_t stack_id;
    uint64_t bytes; /* sum of requested sizes */
    uint64_t count;
} leak_group;

typedef struct frame {
    uintptr_t pc;
    char function[160];
    char module[256]; /* path */
    uintptr_t offset;
    char file[256];
    int line;
} frame;

/* ------------------------------------------------------------------ grouping */

static int group_order(const void *a, const void *b)
{
    const leak_group *x = a, *y = b;
    if (x->bytes != y->bytes) return x->bytes < y->bytes ? 1 : -1;
    if (x->count != y->count) return x->count < y->count ? 1 : -1;
    return (x->caller > y->caller) - (x->caller < y->caller);
}

/* Adds `g` to the group of the same device and call stack (linear: reports are rare, groups few). */
static bool merge_group(leak_group **groups, size_t *n, size_t *cap, const leak_group *g)
{
    for (size_t i = 0; i < *n; i++) {
        leak_group *h = &(*groups)[i];
        if (h->device == g->device && h->memory == g->memory && h->tag == g->tag &&
            h->caller == g->caller && h->stack_id == g->stack_id) {
            h->bytes += g->bytes;
            h->count += g->count;
            return true;
        }
    }
    if (*n == *cap) {
        size_t ncap = *cap ? *cap * 2 : 64;
        leak_group *grown = realloc(*groups, ncap * sizeof *grown);
        if (!grown) return false;
        *groups = grown;
        *cap = ncap;
    }
    (*groups)[(*n)++] = *g;
    return true;
}

static bool add_to_groups(leak_group **groups, size_t *n, size_t *cap, int device,
                          const gm_record *rec)
{
    leak_group g = {device, GM_LEAK_DEVICE, rec->tag, rec->caller, rec->stack_id, rec->requested, 1};
    return merge_group(groups, n, cap, &g);
}

typedef struct pinned_cx {
    leak_group **groups;
    size_t *n, *cap;
    int only_device;
} pinned_cx;

static void add_pinned(void *arg, int device, const gm_record *rec)
{
    pinned_cx *cx = arg;
    if (cx->only_device >= 0 && device != cx->only_device) return;
    leak_group g = {device, GM_LEAK_PINNED_HOST, rec->tag, rec->caller, rec->stack_id, rec->requested, 1};
    merge_group(cx->groups, cx->n, cx->cap, &g);
}

/* The report and the stacks of refused copies share the dladdr and addr2line caches. */
static pthread_mutex_t symbols_lock = PTHREAD_MUTEX_INITIALIZER;

/* Leaks of destroyed contexts, kept for the exit report. */
static pthread_mutex_t orphans_lock = PTHREAD_MUTEX_INITIALIZER;
static leak_group *orphans;
static size_t norphans, orphans_cap;

void gm_report_keep_orphans_locked(gm_heap *heap)
{
    pthread_mutex_lock(&orphans_lock);
    GM_FOR_EACH_LIVE(heap, rec) add_to_groups(&orphans, &norphans, &orphans_cap, heap->device, rec);
    pthread_mutex_unlock(&orphans_lock);
}

void gm_report_forget_orphans(void)
{
    pthread_mutex_init(&orphans_lock, NULL); /* a fork child: the locks may have been held */
    pthread_mutex_init(&symbols_lock, NULL);
    free(orphans);
    orphans = NULL;
    norphans = orphans_cap = 0;
}

/* At exit another thread may be inside a heap: wait a little, never forever. */
static bool lock_for_report(pthread_mutex_t *m)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 2;
    return pthread_mutex_timedlock(m, &until) == 0;
}

static size_t collect_groups(int only_device, uintptr_t only_ctx, leak_group **out)
{
    leak_group *groups = NULL;
    size_t n = 0, cap = 0;
    if (!only_ctx && lock_for_report(&orphans_lock)) {
        for (size_t i = 0; i < norphans; i++)
            if (only_device < 0 || orphans[i].device == only_device) merge_group(&groups, &n, &cap, &orphans[i]);
        pthread_mutex_unlock(&orphans_lock);
    }
    size_t nheaps = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < nheaps; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        if ((only_device >= 0 && h->device != only_device) || (only_ctx && h->ctx != only_ctx)) continue;
        if (!lock_for_report(&h->lock)) {
            gm_log(GM_WARN, "report: heap of device %d busy in another thread; its leaks are not listed", h->device);
            continue;
        }
        GM_FOR_EACH_LIVE(h, rec) add_to_groups(&groups, &n, &cap, h->device, rec);
        pthread_mutex_unlock(&h->lock);
    }
    if (!only_ctx) { /* pinned host memory belongs to the process, not to one context */
        pinned_cx cx = {&groups, &n, &cap, only_device};
        gm_pinned_for_each_live(add_pinned, &cx);
    }
    if (n) qsort(groups, n, sizeof *groups, group_order);
    *out = groups;
    return n;
}

/* ------------------------------------------------------------------ symbolization */

static const char *base_name(const char *path)
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

/* Modules over this size are framework libraries (libtorch_cuda.so is ~1 GB): addr2line would
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
                snprintf(out[i].file, sizeof out[i].file, "%.255s", base_name(loc));
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
static void resolve_module(const char *module, const frame *pending, size_t n)
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
static bool wants_addr2line(const frame *f)
{
    return f->module[0] && (!f->function[0] || strcmp(f->module, gm_program_path()) == 0);
}

/* What dladdr said of each pc seen so far. dladdr scans a module's symbol table, which for a
 * library like libtorch_cuda costs a large part of a millisecond, and the report asks for the
 * same frames several times (suppressions, addr2line batching, printing; groups share most of
 * their frames), so each pc is described once. Under symbols_lock. */
static frame *described;
static size_t ndescribed, described_cap;
static __thread bool holds_symbols_lock; /* a report that could not get the lock goes uncached */

static void describe(frame *f)
{
    Dl_info info;
    memset(&info, 0, sizeof info);
    f->function[0] = f->module[0] = f->file[0] = 0;
    f->line = 0;
    f->offset = 0;
    /* pc - 1: the call instruction, not the one after it (matters at the end of a function). */
    if (!f->pc || !dladdr((void *)(f->pc - 1), &info) || !info.dli_fname) return;
    bool main_exe = !info.dli_fname[0] || strcmp(base_name(info.dli_fname), base_name(gm_program_path())) == 0;
    snprintf(f->module, sizeof f->module, "%s", main_exe ? gm_program_path() : info.dli_fname);
    f->offset = file_address(&info, f->pc - 1);
    if (info.dli_sname) snprintf(f->function, sizeof f->function, "%s", info.dli_sname);
}

static void describe_cached(frame *f)
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
        frame *grown = realloc(described, cap * sizeof *grown);
        if (!grown) return;
        described = grown;
        described_cap = cap;
    }
    described[ndescribed++] = *f;
}

/* dladdr, plus what a batched addr2line run already found for this pc. */
static void symbolize(frame *f)
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
static bool is_plumbing(const frame *f)
{
    const char *m = base_name(f->module);
    static const char *const modules[] = {"libcuda.so", "libcudart.so", "libgpumem"};
    for (size_t i = 0; i < sizeof modules / sizeof *modules; i++)
        if (strncmp(m, modules[i], strlen(modules[i])) == 0) return true;
    static const char *const functions[] = {"cuda", "__cuda", "cudart::", "libcudart", "cuMem", "gpumem_"};
    for (size_t i = 0; i < sizeof functions / sizeof *functions; i++)
        if (strncmp(f->function, functions[i], strlen(functions[i])) == 0) return true;
    return false;
}

/* The group's frames, symbolized, with leading plumbing dropped (at least one frame stays). */
/* The frames of a stack from the program's own call on: gpumem's and the CUDA libraries' frames
 * at the top say nothing about the program (the last frame is kept whatever it is). */
static size_t program_frames(const uintptr_t *pc, size_t n, frame *out)
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

static size_t group_frames(const leak_group *g, frame *out)
{
    uintptr_t pc[MAX_FRAMES];
    size_t n = gm_stack_get(g->stack_id, pc, MAX_FRAMES);
    if (n == 0) {
        pc[0] = g->caller;
        n = 1;
    }
    return program_frames(pc, n, out);
}

/* ------------------------------------------------------------------ suppressions */

static char **patterns;
static size_t npatterns;
static bool patterns_loaded;

static void load_suppressions(void)
{
    if (patterns_loaded) return;
    patterns_loaded = true;
    const char *path = gm_mgr.cfg ? gm_mgr.cfg->suppressions : "none";
    if (!path[0] || strcmp(path, "none") == 0) return;
    FILE *f = fopen(path, "r");
    if (!f) {
        gm_log(GM_ERROR, "GPUMEM_SUPPRESSIONS: cannot read %s; nothing is suppressed", path);
        return;
    }
    char line[1024];
    for (int lineno = 1; fgets(line, sizeof line, f); lineno++) {
        char *s = line + strspn(line, " \t");
        s[strcspn(s, "\r\n")] = 0;
        char *end = s + strlen(s);
        while (end > s && (end[-1] == ' ' || end[-1] == '\t')) *--end = 0;
        if (!*s || *s == '#') continue;
        if (strncmp(s, "leak:", 5) != 0 || !s[5]) {
            gm_log(GM_ERROR, "%s:%d: '%s' is not a suppression: expected leak:<pattern>", path, lineno, s);
            continue;
        }
        char **grown = realloc(patterns, (npatterns + 1) * sizeof *grown);
        if (!grown || !(grown[npatterns] = strdup(s + 5))) break;
        patterns = grown;
        npatterns++;
    }
    fclose(f);
}

/* LeakSanitizer's rule: a pattern without wildcards matches as a substring. */
static bool pattern_matches(const char *pattern, const char *text)
{
    if (!text[0]) return false;
    if (!strchr(pattern, '*')) return strstr(text, pattern) != NULL;
    char wrapped[300];
    snprintf(wrapped, sizeof wrapped, "%s%s%s", pattern[0] == '*' ? "" : "*", pattern,
             pattern[strlen(pattern) - 1] == '*' ? "" : "*");
    return fnmatch(wrapped, text, 0) == 0;
}

static const char *suppression_for(const frame *frames, size_t n)
{
    for (size_t p = 0; p < npatterns; p++)
        for (size_t i = 0; i < n; i++)
            if (pattern_matches(patterns[p], frames[i].function) ||
                pattern_matches(patterns[p], base_name(frames[i].module)))
                return patterns[p];
    return NULL;
}

/* ------------------------------------------------------------------ text and JSON */

static void json_string(FILE *out, const char *s)
{
    if (!s || !s[0]) {
        fputs("null", out);
        return;
    }
    fputc('"', out);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(out, "\\%c", c);
        else if (c < 0x20) fprintf(out, "\\u%04x", c);
        else fputc(c, out);
    }
    fputc('"', out);
}

/* "    #i 0x<pc> in <function> <module>+0x<offset> (file:line)": LeakSanitizer's frame line. */
static int frame_line(char *out, size_t cap, size_t i, const frame *f)
{
    int w = snprintf(out, cap, "    #%zu 0x%lx in %s %s+0x%lx", i, (unsigned long)f->pc,
                     f->function[0] ? f->function : "<unknown>",
                     f->module[0] ? base_name(f->module) : "<unknown>", (unsigned long)f->offset);
    if (w >= 0 && (size_t)w < cap && f->line)
        w += snprintf(out + w, cap - (size_t)w, " (%s:%d)", f->file, f->line);
    return w;
}

static void text_frames(FILE *out, const frame *f, size_t n)
{
    char line[1024];
    for (size_t i = 0; i < n; i++) {
        frame_line(line, sizeof line, i, &f[i]);
        fprintf(out, "%s\n", line);
    }
}

static void json_frames(FILE *out, const frame *f, size_t n)
{
    fputs("\"frames\":[", out);
    for (size_t i = 0; i < n; i++) {
        fprintf(out, "%s{\"pc\":\"0x%lx\",\"function\":", i ? "," : "", (unsigned long)f[i].pc);
        json_string(out, f[i].function);
        fputs(",\"module\":", out);
        json_string(out, f[i].module[0] ? base_name(f[i].module) : NULL);
        fprintf(out, ",\"offset\":\"0x%lx\",\"file\":", (unsigned long)f[i].offset);
        json_string(out, f[i].line ? f[i].file : NULL);
        if (f[i].line) fprintf(out, ",\"line\":%d}", f[i].line);
        else fputs(",\"line\":null}", out);
    }
    fputc(']', out);
}

typedef struct totals {
    uint64_t bytes, count, suppressed_bytes, suppressed_count;
} totals;

static void text_stats(FILE *out)
{
    for (int dev = 0; dev < GM_MAX_DEVICES; dev++) {
        gpumem_stats st;
        gm_stats_collect(dev, &st);
        if (!st.allocations && !st.bytes_reserved_peak) continue;
        uint64_t lookups = st.pool_hits + st.pool_misses;
        char limit[48];
        if (st.limit_bytes) snprintf(limit, sizeof limit, "%llu B", (unsigned long long)st.limit_bytes);
        else snprintf(limit, sizeof limit, "none");
        fprintf(out,
                "device %d: peak allocated %llu B, peak reserved %llu B, limit %s\n"
                "  allocations %llu, frees %llu, pool hit rate %.1f%% (%llu hits, %llu misses)\n"
                "  segments %llu (released %llu), fragmentation %.3f, release-and-retry %llu, "
                "limit rejections %llu, device OOMs %llu\n",
                dev, (unsigned long long)st.bytes_allocated_peak, (unsigned long long)st.bytes_reserved_peak,
                limit, (unsigned long long)st.allocations, (unsigned long long)st.frees,
                lookups ? 100.0 * (double)st.pool_hits / (double)lookups : 0.0,
                (unsigned long long)st.pool_hits, (unsigned long long)st.pool_misses,
                (unsigned long long)st.segments, (unsigned long long)st.segments_released, st.fragmentation,
                (unsigned long long)st.release_retries, (unsigned long long)st.limit_rejections,
                (unsigned long long)st.backend_ooms);
    }
    gm_copy_report_text(out);
    gm_pinned_report_text(out);
    gm_tags_report_text(out);
}

static void json_stats(FILE *out)
{
    fputs("\"devices\":[", out);
    bool first = true;
    for (int dev = 0; dev < GM_MAX_DEVICES; dev++) {
        gpumem_stats s;
        gm_stats_collect(dev, &s);
        if (!s.allocations && !s.bytes_reserved_peak) continue;
        fprintf(out,
                "%s{\"device\":%d,\"allocations\":%llu,\"frees\":%llu,\"pool_hits\":%llu,\"pool_misses\":%llu,"
                "\"segments\":%llu,\"segments_released\":%llu,\"bytes_requested\":%llu,\"bytes_allocated\":%llu,"
                "\"bytes_allocated_peak\":%llu,\"bytes_reserved\":%llu,\"bytes_reserved_peak\":%llu,"
                "\"bytes_cached_free\":%llu,\"largest_free_block\":%llu,\"fragmentation\":%.6f,"
                "\"release_retries\":%llu,\"limit_rejections\":%llu,\"backend_ooms\":%llu,\"limit_bytes\":%llu}",
                first ? "" : ",", dev, (unsigned long long)s.allocations, (unsigned long long)s.frees,
                (unsigned long long)s.pool_hits, (unsigned long long)s.pool_misses, (unsigned long long)s.segments,
                (unsigned long long)s.segments_released, (unsigned long long)s.bytes_requested,
                (unsigned long long)s.bytes_allocated, (unsigned long long)s.bytes_allocated_peak,
                (unsigned long long)s.bytes_reserved, (unsigned long long)s.bytes_reserved_peak,
                (unsigned long long)s.bytes_cached_free, (unsigned long long)s.largest_free_block,
                s.fragmentation, (unsigned long long)s.release_retries, (unsigned long long)s.limit_rejections,
                (unsigned long long)s.backend_ooms, (unsigned long long)s.limit_bytes);
        first = false;
    }
    fputs("],", out);
    gm_copy_report_json(out);
    fputc(',', out);
    gm_pinned_report_json(out);
    fputc(',', out);
    gm_tags_report_json(out, json_string);
    fprintf(out, ",\"invalid_frees\":%llu", (unsigned long long)atomic_load(&gm_invalid_frees));
}

/* Before printing: one addr2line run per module for the frames of every group that will be
 * printed (suppressed groups are decided on dladdr's names alone and never cost a process). */
/* addr2line once per module, for all of its pending frames together. */
static void resolve_pending(frame *pending, size_t npending)
{
    frame *same = npending ? malloc(npending * sizeof *same) : NULL;
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

static void resolve_printed_frames(const leak_group *groups, size_t n, bool json)
{
    static frame frames[MAX_FRAMES];
    frame *pending = NULL;
    size_t npending = 0, cap = 0;
    for (size_t i = 0; i < n; i++) {
        size_t nf = group_frames(&groups[i], frames);
        if (!json && suppression_for(frames, nf)) continue;
        for (size_t k = 0; k < nf; k++) {
            if (!wants_addr2line(&frames[k]) || line_of(frames[k].pc)) continue;
            if (npending == cap) {
                size_t ncap = cap ? cap * 2 : 256;
                frame *grown = realloc(pending, ncap * sizeof *grown);
                if (!grown) break;
                pending = grown;
                cap = ncap;
            }
            pending[npending++] = frames[k];
        }
    }
    resolve_pending(pending, npending);
    free(pending);
}


size_t gm_report_format_stack(char *out, size_t cap, const uintptr_t *pc, size_t n)
{
    frame f[MAX_FRAMES], pending[MAX_FRAMES];
    size_t npending = 0, used = 0;
    if (cap) out[0] = 0;
    pthread_mutex_lock(&symbols_lock);
    holds_symbols_lock = true;
    n = program_frames(pc, n, f);
    for (size_t i = 0; i < n; i++)
        if (wants_addr2line(&f[i]) && !line_of(f[i].pc)) pending[npending++] = f[i];
    if (npending) {
        resolve_pending(pending, npending);
        for (size_t i = 0; i < n; i++) symbolize(&f[i]);
    }
    holds_symbols_lock = false;
    pthread_mutex_unlock(&symbols_lock);
    for (size_t i = 0; i < n && used + 2 < cap; i++) {
        int w = frame_line(out + used, cap - used - 1, i, &f[i]);
        if (w < 0) break;
        used += (size_t)w < cap - used - 1 ? (size_t)w : cap - used - 2;
        out[used++] = '\n';
        out[used] = 0;
    }
    return used;
}
/* "Leak of N byte(s) in M allocation(s) on device D [tagged "x"] allocated from:" */
static void text_leak_heading(FILE *out, const leak_group *g)
{
    fprintf(out, "Leak of %llu byte(s) in %llu allocation(s) ", (unsigned long long)g->bytes,
            (unsigned long long)g->count);
    if (g->memory == GM_LEAK_PINNED_HOST) fputs("of pinned host memory", out);
    else fprintf(out, "on device %d", g->device);
    const char *tag = gm_tag_name(g->tag);
    if (tag) fprintf(out, " tagged \"%s\"", tag);
    fputs(" allocated from:\n", out);
}

static totals write_groups(FILE *out, bool json, const leak_group *groups, size_t n)
{
    static frame frames[MAX_FRAMES];
    totals t = {0};
    load_suppressions();
    resolve_printed_frames(groups, n, json);
    if (json) fputs("\"leaks\":[", out);
    for (size_t i = 0; i < n; i++) {
        size_t nf = group_frames(&groups[i], frames);
        const char *sup = suppression_for(frames, nf);
        if (sup) {
            t.suppressed_bytes += groups[i].bytes;
            t.suppressed_count += groups[i].count;
        } else {
            t.bytes += groups[i].bytes;
            t.count += groups[i].count;
        }
        if (json) {
            fprintf(out, "%s{\"device\":%d,\"memory\":\"%s\",\"bytes\":%llu,\"allocations\":%llu,\"suppressed\":%s,\"suppression\":",
                    i ? "," : "", groups[i].device, gm_leak_memory_name(groups[i].memory),
                    (unsigned long long)groups[i].bytes,
                    (unsigned long long)groups[i].count, sup ? "true" : "false");
            json_string(out, sup);
            fputs(",\"tag\":", out);
            json_string(out, gm_tag_name(groups[i].tag));
            fputc(',', out);
            json_frames(out, frames, nf);
            fputc('}', out);
        } else if (!sup) {
            text_leak_heading(out, &groups[i]);
            text_frames(out, frames, nf);
        }
    }
    if (json) fputs("],", out);
    return t;
}

/* Opens where GPUMEM_REPORT says; NULL for "off". `*close_it` tells the caller to fclose. */
static FILE *open_destination(bool *close_it)
{
    const char *dest = gm_mgr.cfg ? gm_mgr.cfg->report : "stderr";
    *close_it = false;
    if (strcmp(dest, "off") == 0) return NULL;
    if (strcmp(dest, "stderr") == 0 || !*dest) return stderr;
    char path[4096];
    gm_expand_pid(dest, path, sizeof path);
    FILE *f = fopen(path, "a");
    if (!f) {
        gm_log(GM_ERROR, "cannot write the report to %s; writing it to stderr", path);
        return stderr;
    }
    *close_it = true;
    return f;
}

static uint64_t write_report_locked(FILE *out, int only_device, uintptr_t only_ctx, const char *why);

/* One report at a time, and never while a refused copy's stack is being symbolized. */
static uint64_t write_report(FILE *out, int only_device, uintptr_t only_ctx, const char *why)
{
    bool locked = lock_for_report(&symbols_lock);
    holds_symbols_lock = locked;
    uint64_t n = write_report_locked(out, only_device, only_ctx, why);
    holds_symbols_lock = false;
    if (locked) pthread_mutex_unlock(&symbols_lock);
    return n;
}

static uint64_t write_report_locked(FILE *out, int only_device, uintptr_t only_ctx, const char *why)
{
    bool json = gm_mgr.cfg && gm_mgr.cfg->report_format == 1;
    leak_group *groups = NULL;
    size_t n = collect_groups(only_device, only_ctx, &groups);
    totals t;
    if (json) {
        fprintf(out, "{\"format\":\"gpumem-report\",\"version\":1,\"pid\":%ld,\"program\":", (long)getpid());
        json_string(out, gm_program_path());
        fputs(",\"reason\":", out);
        json_string(out, why);
        fputc(',', out);
        t = write_groups(out, true, groups, n);
        fprintf(out,
                "\"summary\":{\"leaked_bytes\":%llu,\"leaked_allocations\":%llu,\"suppressed_bytes\":%llu,"
                "\"suppressed_allocations\":%llu},",
                (unsigned long long)t.bytes, (unsigned long long)t.count,
                (unsigned long long)t.suppressed_bytes, (unsigned long long)t.suppressed_count);
        json_stats(out);
        fputs("}\n", out);
    } else {
        fprintf(out, "==gpumem== pid %ld: leak report (%s)\n", (long)getpid(), why);
        t = write_groups(out, false, groups, n);
        if (t.suppressed_count)
            fprintf(out, "Suppressed: %llu bytes in %llu allocations (GPUMEM_SUPPRESSIONS)\n",
                    (unsigned long long)t.suppressed_bytes, (unsigned long long)t.suppressed_count);
        fprintf(out, "LEAK SUMMARY: %llu bytes leaked in %llu allocations\n", (unsigned long long)t.bytes,
                (unsigned long long)t.count);
        text_stats(out);
    }
    fflush(out);
    free(groups);
    if (gm_trace_on) gm_trace_instant("leak check point", only_device < 0 ? 0 : only_device, t.bytes, why);
    return t.count;
}

size_t gm_report_write(FILE *out, int only_device, uintptr_t only_ctx, const char *why)
{
    bool close_it = false;
    if (!out) out = open_destination(&close_it);
    if (!out) { /* GPUMEM_REPORT=off: still count, for GPUMEM_LEAK_EXITCODE */
        out = fopen("/dev/null", "w");
        close_it = out != NULL;
        if (!out) return 0;
    }
    uint64_t leaked = write_report(out, only_device, only_ctx, why);
    if (close_it) fclose(out);
    return (size_t)leaked;
}

/* ------------------------------------------------------------------ at exit */

static void report_on_exit(int status, void *unused)
{
    (void)unused;
    if (!gm_mgr.backend || atomic_exchange(&gm_mgr.exiting, true)) return;
    uint64_t t0 = gm_now_ns();
    size_t leaked = gm_report_write(NULL, -1, 0, "at exit");
    gm_log(GM_INFO, "exit report written in %.3f ms", (double)(gm_now_ns() - t0) / 1e6);
    gm_trace_close();
    int code = gm_mgr.cfg ? gm_mgr.cfg->leak_exitcode : 0;
    if (status == 0 && leaked && code) {
        fflush(NULL); /* _exit skips stdio's own flush */
        _exit(code);
    }
}

void gm_report_install_exit_hook(void)
{
    on_exit(report_on_exit, NULL);
}
