/* The leak report: live allocations grouped by where they were made, largest total first, in
 * the words LeakSanitizer and compute-sanitizer users already grep for, then a statistics block.
 * Written at exit and at every leak check point (context destroy, device reset). */
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gm_internal.h"

typedef struct leak_group {
    int device;
    uintptr_t caller;
    uint32_t stack_id;
    uint64_t bytes;   /* sum of requested sizes */
    uint64_t count;
} leak_group;

static int group_order(const void *a, const void *b)
{
    const leak_group *x = a, *y = b;
    if (x->bytes != y->bytes) return x->bytes < y->bytes ? 1 : -1;
    if (x->count != y->count) return x->count < y->count ? 1 : -1;
    return (x->caller > y->caller) - (x->caller < y->caller);
}

/* Adds `g` to the group of the same device and call site (linear: reports are rare, groups few). */
static bool merge_group(leak_group **groups, size_t *n, size_t *cap, const leak_group *g)
{
    for (size_t i = 0; i < *n; i++) {
        leak_group *h = &(*groups)[i];
        if (h->device == g->device && h->caller == g->caller && h->stack_id == g->stack_id) {
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
    leak_group g = {device, rec->caller, rec->stack_id, rec->requested, 1};
    return merge_group(groups, n, cap, &g);
}

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
    pthread_mutex_init(&orphans_lock, NULL); /* a fork child: the lock may have been held */
    free(orphans);
    orphans = NULL;
    norphans = orphans_cap = 0;
}

static void add_orphans(leak_group **groups, size_t *n, size_t *cap, int only_device)
{
    pthread_mutex_lock(&orphans_lock);
    for (size_t i = 0; i < norphans; i++) {
        if (only_device < 0 || orphans[i].device == only_device) merge_group(groups, n, cap, &orphans[i]);
    }
    pthread_mutex_unlock(&orphans_lock);
}

static size_t collect_groups(int only_device, uintptr_t only_ctx, leak_group **out)
{
    leak_group *groups = NULL;
    size_t n = 0, cap = 0;
    if (!only_ctx) add_orphans(&groups, &n, &cap, only_device);
    size_t nheaps = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < nheaps; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        if ((only_device >= 0 && h->device != only_device) || (only_ctx && h->ctx != only_ctx))
            continue;
        pthread_mutex_lock(&h->lock);
        GM_FOR_EACH_LIVE(h, rec) add_to_groups(&groups, &n, &cap, h->device, rec);
        pthread_mutex_unlock(&h->lock);
    }
    if (n) qsort(groups, n, sizeof *groups, group_order);
    *out = groups;
    return n;
}

static void print_frame(FILE *out, int index, uintptr_t pc)
{
    Dl_info info;
    memset(&info, 0, sizeof info);
    if (pc && dladdr((void *)pc, &info) && info.dli_fname) {
        const char *module = strrchr(info.dli_fname, '/');
        module = module ? module + 1 : info.dli_fname;
        fprintf(out, "    #%d 0x%lx in %s %s+0x%lx\n", index, (unsigned long)pc,
                info.dli_sname ? info.dli_sname : "<unknown>", module,
                (unsigned long)(pc - (uintptr_t)info.dli_fbase));
    } else {
        fprintf(out, "    #%d 0x%lx in <unknown>\n", index, (unsigned long)pc);
    }
}

static void print_copies(FILE *out)
{
    bool any = false;
    for (int d = 0; d < GM_COPY_DIRS; d++) {
        uint64_t calls, bytes;
        gm_copy_totals((gm_copy_dir)d, &calls, &bytes);
        if (!calls) continue;
        fprintf(out, "%s%s %llu B in %llu calls", any ? ", " : "copies: ", gm_copy_dir_name((gm_copy_dir)d),
                (unsigned long long)bytes, (unsigned long long)calls);
        any = true;
    }
    if (any) fputc('\n', out);
}

static void print_stats(FILE *out)
{
    for (int dev = 0; dev < GM_MAX_DEVICES; dev++) {
        gpumem_stats st;
        gm_stats_collect(dev, &st);
        if (!st.allocations && !st.bytes_reserved_peak) continue;
        uint64_t lookups = st.pool_hits + st.pool_misses;
        fprintf(out,
                "device %d: peak allocated %llu B, peak reserved %llu B, limit %s%llu B\n"
                "  allocations %llu, frees %llu, pool hit rate %.1f%% (%llu hits, %llu misses)\n"
                "  segments %llu (released %llu), fragmentation %.3f, release-and-retry %llu, "
                "limit rejections %llu, device OOMs %llu\n",
                dev, (unsigned long long)st.bytes_allocated_peak,
                (unsigned long long)st.bytes_reserved_peak, st.limit_bytes ? "" : "none ",
                (unsigned long long)st.limit_bytes, (unsigned long long)st.allocations,
                (unsigned long long)st.frees, lookups ? 100.0 * (double)st.pool_hits / (double)lookups : 0.0,
                (unsigned long long)st.pool_hits, (unsigned long long)st.pool_misses,
                (unsigned long long)st.segments, (unsigned long long)st.segments_released,
                st.fragmentation, (unsigned long long)st.release_retries,
                (unsigned long long)st.limit_rejections, (unsigned long long)st.backend_ooms);
    }
}

/* Opens where GPUMEM_REPORT says; NULL for "off". `*close_it` tells the caller to fclose. */
static FILE *open_destination(bool *close_it)
{
    const char *dest = gm_mgr.cfg ? gm_mgr.cfg->report : "stderr";
    *close_it = false;
    if (strcmp(dest, "off") == 0) return NULL;
    if (strcmp(dest, "stderr") == 0 || !*dest) return stderr;
    char path[4096];
    size_t o = 0;
    for (const char *p = dest; *p && o + 24 < sizeof path; p++) {
        if (p[0] == '%' && p[1] == 'p') {
            o += (size_t)snprintf(path + o, sizeof path - o, "%ld", (long)getpid());
            p++;
        } else {
            path[o++] = *p;
        }
    }
    path[o] = 0;
    FILE *f = fopen(path, "a");
    if (!f) {
        gm_log(GM_ERROR, "cannot write the report to %s; writing it to stderr", path);
        return stderr;
    }
    *close_it = true;
    return f;
}

size_t gm_report_write(FILE *out, int only_device, uintptr_t only_ctx, const char *why)
{
    bool close_it = false;
    if (!out) out = open_destination(&close_it);
    leak_group *groups = NULL;
    size_t n = collect_groups(only_device, only_ctx, &groups);
    uint64_t bytes = 0, count = 0;
    for (size_t i = 0; i < n; i++) {
        bytes += groups[i].bytes;
        count += groups[i].count;
    }
    if (out) {
        fprintf(out, "==gpumem== pid %ld: leak report (%s)\n", (long)getpid(), why);
        for (size_t i = 0; i < n; i++) {
            fprintf(out, "Leak of %llu byte(s) in %llu allocation(s) on device %d allocated from:\n",
                    (unsigned long long)groups[i].bytes, (unsigned long long)groups[i].count,
                    groups[i].device);
            print_frame(out, 0, groups[i].caller);
        }
        fprintf(out, "LEAK SUMMARY: %llu bytes leaked in %llu allocations\n",
                (unsigned long long)bytes, (unsigned long long)count);
        print_stats(out);
        print_copies(out);
        fflush(out);
        if (close_it) fclose(out);
    }
    free(groups);
    return (size_t)count;
}

void gm_report_at_exit(void)
{
    if (!gm_mgr.backend || atomic_exchange(&gm_mgr.exiting, true)) return;
    gm_report_write(NULL, -1, 0, "at exit");
}
