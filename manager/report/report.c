/* The leak report: live allocations grouped by call stack and device, largest total first, in
 * the words LeakSanitizer and compute-sanitizer users already grep for (text) or as JSON
 * (docs/report-format.md), then the statistics (report_stats.c). Written at exit (an on_exit
 * handler, so it sees the exit status for GPUMEM_LEAK_EXITCODE) and at every leak check point
 * (context destroyed, device reset). It makes no CUDA call: it only reads gpumem's own tables,
 * each under its owner's lock, waiting for a busy one at most 2 s. To change the report's format,
 * this file (leaks) and report_stats.c (figures) are all there is. */
#include <fnmatch.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gm_base.h" /* uthash, hashed alike everywhere */
#include "gm_pinned.h"
#include "gm_report.h"

/* ------------------------------------------------------------------ grouping */

static int group_order(const void *a, const void *b)
{
    const gm_leak_group *x = a, *y = b;
    if (x->bytes != y->bytes) return x->bytes < y->bytes ? 1 : -1;
    if (x->count != y->count) return x->count < y->count ? 1 : -1;
    return (x->caller > y->caller) - (x->caller < y->caller);
}

/* What makes two allocations one group (device, memory kind, tag, call stack), as bytes: the key
 * of the grouping's index and of the previous live report's table. */
typedef struct growth_key {
    uintptr_t caller;
    uint32_t stack_id;
    int32_t device;
    uint16_t tag;
    uint8_t memory;
    uint8_t pad;
} growth_key;
static growth_key key_of(const gm_leak_group *g)
{
    growth_key k;
    memset(&k, 0, sizeof k); /* hashed and compared as bytes */
    k.caller = g->caller;
    k.stack_id = g->stack_id;
    k.device = g->device;
    k.tag = g->tag;
    k.memory = g->memory;
    return k;
}

typedef struct group_index {
    growth_key key;
    size_t at; /* in the set's array */
    UT_hash_handle hh;
} group_index;

typedef struct group_set {
    gm_leak_groups all;
    int only_device;
    group_index *index; /* by key: a million live allocations group in linear time */
} group_set;

static void set_add(group_set *set, const gm_leak_group *g)
{
    growth_key k = key_of(g);
    group_index *e = NULL;
    HASH_FIND(hh, set->index, &k, sizeof k, e);
    if (e) {
        set->all.at[e->at].bytes += g->bytes;
        set->all.at[e->at].count += g->count;
        return;
    }
    if (set->all.n == set->all.cap) {
        size_t cap = set->all.cap ? set->all.cap * 2 : 16;
        gm_leak_group *grown = realloc(set->all.at, cap * sizeof *grown);
        if (!grown) return; /* out of host memory: the group goes unlisted, nothing else is lost */
        set->all.at = grown;
        set->all.cap = cap;
    }
    if (!(e = malloc(sizeof *e))) return;
    e->key = k;
    e->at = set->all.n;
    set->all.at[set->all.n++] = *g;
    HASH_ADD(hh, set->index, key, sizeof e->key, e);
}

static void set_done(group_set *set)
{
    group_index *e, *tmp;
    HASH_ITER(hh, set->index, e, tmp) {
        HASH_DEL(set->index, e);
        free(e);
    }
}

static void add_record(group_set *set, int device, gm_memory memory, const gm_record *rec)
{
    if (set->only_device >= 0 && device != set->only_device) return;
    gm_leak_group g = gm_leak_group_of(device, memory, rec);
    set_add(set, &g);
}

static void add_pinned(void *cx, int device, const gm_record *rec)
{
    add_record(cx, device, GM_MEMORY_PINNED_HOST, rec);
}

static void add_orphan(void *cx, const gm_leak_group *g)
{
    group_set *set = cx;
    if (set->only_device < 0 || g->device == set->only_device) set_add(set, g);
}

typedef struct heap_copy {
    gm_heap *heap;
    group_set *set;
    gm_leak_group *at;
    size_t n, cap;
} heap_copy;

static void copy_record(void *cx, const gm_record *rec)
{
    heap_copy *c = cx;
    gm_leak_group g = gm_leak_group_of(c->heap->device, GM_MEMORY_DEVICE, rec);
    if (c->n < c->cap) c->at[c->n++] = g;
    else set_add(c->set, &g); /* no room (out of host memory): grouped under the lock */
}

/* Each heap's lock is held only while its records are copied out (a report of a running
 * program must not stall its allocating threads); grouping happens after. */
static void add_heaps(group_set *set, uintptr_t only_ctx)
{
    size_t nheaps = atomic_load(&gm_mgr.nheaps);
    gm_leak_group *copied = NULL;
    size_t cap = 0;
    for (size_t i = 0; i < nheaps; i++) {
        gm_heap *h = gm_mgr.heaps[i];
        if ((set->only_device >= 0 && h->device != set->only_device) || (only_ctx && h->ctx != only_ctx)) continue;
        if (!gm_lock_for_report(&h->lock)) {
            gm_log(GM_WARN, "report: heap of device %d busy in another thread; its leaks are not listed", h->device);
            continue;
        }
        size_t want = gm_heap_live_count_locked(h);
        if (want > cap) {
            gm_leak_group *grown = realloc(copied, want * sizeof *grown);
            if (grown) {
                copied = grown;
                cap = want;
            }
        }
        heap_copy c = {h, set, copied, 0, cap};
        gm_heap_each_live_locked(h, copy_record, &c);
        pthread_mutex_unlock(&h->lock);
        for (size_t k = 0; k < c.n; k++) set_add(set, &copied[k]);
    }
    free(copied);
}

/* Every live allocation, grouped. One context's report lists its device memory only; pinned host
 * memory and the leaks of contexts already gone belong to the process. */
static size_t collect_groups(int only_device, uintptr_t only_ctx, gm_leak_group **out)
{
    group_set set = {{NULL, 0, 0}, only_device, NULL};
    if (!only_ctx && !gm_orphans_for_each(add_orphan, &set))
        gm_log(GM_WARN, "report: the list of destroyed contexts' leaks is busy; those are not listed");
    add_heaps(&set, only_ctx);
    if (!only_ctx) gm_pinned_for_each_live(add_pinned, &set);
    set_done(&set);
    if (set.all.n) qsort(set.all.at, set.all.n, sizeof *set.all.at, group_order);
    *out = set.all.at;
    return set.all.n;
}

size_t gm_report_device_groups(int device, gm_leak_group **out)
{
    group_set set = {{NULL, 0, 0}, device, NULL};
    add_heaps(&set, 0);
    set_done(&set);
    if (set.all.n) qsort(set.all.at, set.all.n, sizeof *set.all.at, group_order);
    *out = set.all.at;
    return set.all.n;
}

/* ------------------------------------------------------------------ frames */

size_t gm_report_group_frames(const gm_leak_group *g, gm_frame *out)
{
    uintptr_t pc[GM_MAX_FRAMES];
    size_t n = gm_stack_get(g->stack_id, pc, GM_MAX_FRAMES);
    if (n == 0) {
        pc[0] = g->caller;
        n = 1;
    }
    return gm_symbols_program_frames(pc, n, out);
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

static const char *suppression_for(const gm_frame *frames, size_t n)
{
    for (size_t p = 0; p < npatterns; p++)
        for (size_t i = 0; i < n; i++)
            if (pattern_matches(patterns[p], frames[i].function) ||
                pattern_matches(patterns[p], gm_symbols_base_name(frames[i].module)))
                return patterns[p];
    return NULL;
}

/* Before printing: one addr2line run per module for the frames of every group that will be
 * printed (suppressed groups are decided on dladdr's names alone and never cost a process). */
void gm_report_resolve_frames(const gm_leak_group *groups, size_t n, bool json)
{
    static gm_frame frames[GM_MAX_FRAMES];
    gm_frame *all = NULL;
    size_t nall = 0, cap = 0;
    for (size_t i = 0; i < n; i++) {
        size_t nf = gm_report_group_frames(&groups[i], frames);
        if (!json && suppression_for(frames, nf)) continue;
        if (nall + nf > cap) {
            size_t ncap = (nall + nf) * 2;
            gm_frame *grown = realloc(all, ncap * sizeof *grown);
            if (!grown) break;
            all = grown;
            cap = ncap;
        }
        memcpy(&all[nall], frames, nf * sizeof *frames);
        nall += nf;
    }
    gm_symbols_resolve(all, nall);
    free(all);
}

/* ------------------------------------------------------------------ text and JSON */

void gm_report_text_frames(FILE *out, const gm_frame *f, size_t n)
{
    char line[1024];
    for (size_t i = 0; i < n; i++) {
        gm_symbols_frame_line(line, sizeof line, i, &f[i]);
        fprintf(out, "%s\n", line);
    }
}

void gm_report_json_frames(FILE *out, const gm_frame *f, size_t n)
{
    fputs("\"frames\":[", out);
    for (size_t i = 0; i < n; i++) {
        fprintf(out, "%s{\"pc\":\"0x%lx\",\"function\":", i ? "," : "", (unsigned long)f[i].pc);
        gm_report_json_string(out, f[i].function);
        fputs(",\"module\":", out);
        gm_report_json_string(out, f[i].module[0] ? gm_symbols_base_name(f[i].module) : NULL);
        fprintf(out, ",\"offset\":\"0x%lx\",\"file\":", (unsigned long)f[i].offset);
        gm_report_json_string(out, f[i].line ? f[i].file : NULL);
        if (f[i].line) fprintf(out, ",\"line\":%d}", f[i].line);
        else fputs(",\"line\":null}", out);
    }
    fputc(']', out);
}

typedef struct totals {
    uint64_t bytes, count, suppressed_bytes, suppressed_count;
} totals;

/* ------------------------------------------------------------------ growth between reports */

/* The previous live report's groups (signal or interval): device, memory kind, tag and call
 * stack, with their bytes and allocations then. Only the report that holds the live report's
 * turn (report_live.c, one at a time) and the exit report read or replace it. */
typedef struct growth_entry {
    growth_key key;
    uint64_t bytes, count;
    bool seen; /* a group of this report matched it: not gone */
    UT_hash_handle hh;
} growth_entry;

static growth_entry *previous;       /* the last live report's groups */
static bool have_previous;           /* a live report was written */
static totals previous_totals;

/* A group's change since the previous live report: all of it when the group is new. */
static void growth_of(const gm_leak_group *g, int64_t *bytes, int64_t *count)
{
    growth_key k = key_of(g);
    growth_entry *e = NULL;
    HASH_FIND(hh, previous, &k, sizeof k, e);
    if (e) e->seen = true;
    *bytes = (int64_t)g->bytes - (int64_t)(e ? e->bytes : 0);
    *count = (int64_t)g->count - (int64_t)(e ? e->count : 0);
}

/* The previous report's groups that no group of this one matched: freed since. */
static totals gone_groups(uint64_t *ngroups)
{
    totals g = {0};
    *ngroups = 0;
    for (growth_entry *e = previous; e; e = e->hh.next)
        if (!e->seen) {
            g.bytes += e->bytes;
            g.count += e->count;
            ++*ngroups;
        }
    return g;
}

static void forget_previous(void)
{
    growth_entry *e, *tmp;
    HASH_ITER(hh, previous, e, tmp) {
        HASH_DEL(previous, e);
        free(e);
    }
}

/* This report's groups become the previous ones. Out of host memory: the growth of a group
 * missing here is shown as all new next time, nothing worse. */
static void remember_groups(const gm_leak_group *groups, size_t n, totals t)
{
    forget_previous();
    for (size_t i = 0; i < n; i++) {
        growth_entry *e = calloc(1, sizeof *e);
        if (!e) break;
        e->key = key_of(&groups[i]);
        e->bytes = groups[i].bytes;
        e->count = groups[i].count;
        HASH_ADD(hh, previous, key, sizeof e->key, e);
    }
    previous_totals = t;
    have_previous = true;
}

static void text_growth(FILE *out, const char *indent, int64_t bytes, int64_t count)
{
    fprintf(out, "%s%c%llu bytes in %lld allocations since the last report\n", indent, bytes < 0 ? '-' : '+',
            (unsigned long long)(bytes < 0 ? -bytes : bytes), (long long)count);
}

/* ------------------------------------------------------------------ text and JSON */

/* "Leak of N byte(s) in M allocation(s) on device D [tagged "x"] allocated from:" */
static void text_leak_heading(FILE *out, const gm_leak_group *g)
{
    fprintf(out, "Leak of %llu byte(s) in %llu allocation(s) ", (unsigned long long)g->bytes,
            (unsigned long long)g->count);
    if (g->memory == GM_MEMORY_PINNED_HOST) fputs("of pinned host memory", out);
    else fprintf(out, "on device %d", g->device);
    const char *tag = gm_tag_name(g->tag);
    if (tag) fprintf(out, " tagged \"%s\"", tag);
    fputs(" allocated from:\n", out);
}

/* `printed` false: the report is only counted (GPUMEM_REPORT=off), so file:line lookups, the
 * costly part, are skipped. `growth`: each group's change since the previous live report. */
static totals write_groups(FILE *out, bool json, bool printed, bool growth, const gm_leak_group *groups, size_t n)
{
    static gm_frame frames[GM_MAX_FRAMES];
    totals t = {0};
    load_suppressions();
    if (printed) gm_report_resolve_frames(groups, n, json);
    if (json) fputs("\"leaks\":[", out);
    for (size_t i = 0; i < n; i++) {
        size_t nf = gm_report_group_frames(&groups[i], frames);
        const char *sup = suppression_for(frames, nf);
        int64_t grown = 0, grown_count = 0;
        if (growth) growth_of(&groups[i], &grown, &grown_count);
        if (sup) {
            t.suppressed_bytes += groups[i].bytes;
            t.suppressed_count += groups[i].count;
        } else {
            t.bytes += groups[i].bytes;
            t.count += groups[i].count;
        }
        if (json) {
            fprintf(out, "%s{\"device\":%d,\"memory\":\"%s\",\"bytes\":%llu,\"allocations\":%llu,\"suppressed\":%s,\"suppression\":",
                    i ? "," : "", groups[i].device, gm_memory_name((gm_memory)groups[i].memory),
                    (unsigned long long)groups[i].bytes,
                    (unsigned long long)groups[i].count, sup ? "true" : "false");
            gm_report_json_string(out, sup);
            fputs(",\"tag\":", out);
            gm_report_json_string(out, gm_tag_name(groups[i].tag));
            if (growth) fprintf(out, ",\"growth\":{\"bytes\":%lld,\"allocations\":%lld}", (long long)grown, (long long)grown_count);
            fputc(',', out);
            gm_report_json_frames(out, frames, nf);
            fputc('}', out);
        } else if (!sup) {
            text_leak_heading(out, &groups[i]);
            gm_report_text_frames(out, frames, nf);
            if (growth && (grown || grown_count)) text_growth(out, "  ", grown, grown_count);
        }
    }
    if (json) fputs("],", out);
    return t;
}

/* Opens where GPUMEM_REPORT says; NULL for "off". `*close_it` tells the caller to fclose. */
FILE *gm_report_open_destination(bool *close_it)
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

/* What kind of report: a leak check point or a request (plain), a live report of a running
 * program (shows growth, then becomes the previous one), the exit report (shows growth when a
 * live report came before). */
typedef enum { REPORT_PLAIN, REPORT_LIVE, REPORT_EXIT } report_kind;

static uint64_t write_report_locked(FILE *out, bool printed, int only_device, uintptr_t only_ctx,
                                    const char *why, report_kind kind);

/* One report at a time, and never while a refused copy's stack is being symbolized. */
static uint64_t write_report(FILE *out, bool printed, int only_device, uintptr_t only_ctx, const char *why,
                             report_kind kind)
{
    bool locked = gm_symbols_begin();
    uint64_t n = write_report_locked(out, printed, only_device, only_ctx, why, kind);
    gm_symbols_end(locked);
    return n;
}

static uint64_t write_report_locked(FILE *out, bool printed, int only_device, uintptr_t only_ctx,
                                    const char *why, report_kind kind)
{
    bool json = gm_mgr.cfg && gm_mgr.cfg->report_format == 1;
    bool growth = kind != REPORT_PLAIN && have_previous;
    gm_leak_group *groups = NULL;
    size_t n = collect_groups(only_device, only_ctx, &groups);
    totals t;
    int64_t grown = 0, grown_count = 0;
    if (json) {
        fprintf(out, "{\"format\":\"gpumem-report\",\"version\":1,\"pid\":%ld,\"program\":", (long)getpid());
        gm_report_json_string(out, gm_program_path());
        fputs(",\"reason\":", out);
        gm_report_json_string(out, why);
        fputc(',', out);
        t = write_groups(out, true, printed, growth, groups, n);
        if (growth) {
            grown = (int64_t)t.bytes - (int64_t)previous_totals.bytes;
            grown_count = (int64_t)t.count - (int64_t)previous_totals.count;
        }
        fprintf(out,
                "\"summary\":{\"leaked_bytes\":%llu,\"leaked_allocations\":%llu,\"suppressed_bytes\":%llu,"
                "\"suppressed_allocations\":%llu",
                (unsigned long long)t.bytes, (unsigned long long)t.count,
                (unsigned long long)t.suppressed_bytes, (unsigned long long)t.suppressed_count);
        if (growth) {
            uint64_t ngone;
            totals gone = gone_groups(&ngone);
            fprintf(out, ",\"growth\":{\"bytes\":%lld,\"allocations\":%lld,\"gone_groups\":%llu,\"gone_bytes\":%llu,\"gone_allocations\":%llu}",
                    (long long)grown, (long long)grown_count, (unsigned long long)ngone,
                    (unsigned long long)gone.bytes, (unsigned long long)gone.count);
        }
        fputs("},", out);
        gm_report_stats_json(out);
        fputs("}\n", out);
    } else {
        if (kind == REPORT_LIVE)
            fprintf(out, "==gpumem== pid %ld: leak report (%s): the allocations live now; the program carries on\n",
                    (long)getpid(), why);
        else fprintf(out, "==gpumem== pid %ld: leak report (%s)\n", (long)getpid(), why);
        t = write_groups(out, false, printed, growth, groups, n);
        if (growth) {
            grown = (int64_t)t.bytes - (int64_t)previous_totals.bytes;
            grown_count = (int64_t)t.count - (int64_t)previous_totals.count;
        }
        if (t.suppressed_count)
            fprintf(out, "Suppressed: %llu bytes in %llu allocations (GPUMEM_SUPPRESSIONS)\n",
                    (unsigned long long)t.suppressed_bytes, (unsigned long long)t.suppressed_count);
        if (growth) {
            uint64_t ngone;
            totals gone = gone_groups(&ngone);
            if (ngone)
                fprintf(out, "Gone since the last report: %llu bytes in %llu allocations of %llu call stack(s) no longer live\n",
                        (unsigned long long)gone.bytes, (unsigned long long)gone.count, (unsigned long long)ngone);
            text_growth(out, "In all: ", grown, grown_count);
        }
        fprintf(out, "LEAK SUMMARY: %llu bytes leaked in %llu allocations\n", (unsigned long long)t.bytes,
                (unsigned long long)t.count);
        gm_report_stats_text(out);
    }
    fflush(out);
    if (kind == REPORT_LIVE) remember_groups(groups, n, t);
    free(groups);
    if (gm_trace_on) gm_trace_instant("leak check point", only_device < 0 ? 0 : only_device, t.bytes, why);
    return t.count;
}

static size_t report_to_destination(FILE *out, int only_device, uintptr_t only_ctx, const char *why,
                                    report_kind kind)
{
    bool close_it = false, printed = true;
    if (!out) out = gm_report_open_destination(&close_it);
    if (!out) { /* GPUMEM_REPORT=off: still count, for GPUMEM_LEAK_EXITCODE */
        if (kind == REPORT_LIVE) return 0;
        out = fopen("/dev/null", "w");
        close_it = out != NULL;
        printed = false;
        if (!out) return 0;
    }
    uint64_t leaked = write_report(out, printed, only_device, only_ctx, why, kind);
    if (close_it) fclose(out);
    return (size_t)leaked;
}

size_t gm_report_write(FILE *out, int only_device, uintptr_t only_ctx, const char *why)
{
    return report_to_destination(out, only_device, only_ctx, why, REPORT_PLAIN);
}

size_t gm_report_write_live(const char *why)
{
    return report_to_destination(NULL, -1, 0, why, REPORT_LIVE);
}

/* ------------------------------------------------------------------ check points */

size_t gm_report_context(uintptr_t ctx, const char *why)
{
    gm_heap *heap = gm_heap_of_ctx(ctx);
    if (!heap) return 0;
    pthread_mutex_lock(&heap->lock);
    size_t live = gm_heap_live_count_locked(heap);
    pthread_mutex_unlock(&heap->lock);
    if (!live) return 0;
    return gm_report_write(NULL, heap->device, ctx, why);
}

size_t gm_report_write_exit(bool with_growth)
{
    return report_to_destination(NULL, -1, 0, "at exit", with_growth ? REPORT_EXIT : REPORT_PLAIN);
}

/* ------------------------------------------------------------------ the top holders */

/* "function module+0xoff" of the group's first program frame (dladdr only: no addr2line on the
 * publisher's round), after its tag. */
static void describe_group(const gm_leak_group *g, char *out, size_t cap)
{
    static gm_frame frames[GM_MAX_FRAMES];
    size_t nf = gm_report_group_frames(g, frames);
    const char *tag = gm_tag_name(g->tag);
    const gm_frame *f = nf ? &frames[0] : NULL;
    int n1 = snprintf(out, cap, "%.60s%s", tag ? tag : "", tag ? ": " : "");
    if (n1 < 0 || (size_t)n1 >= cap) return;
    snprintf(out + n1, cap - (size_t)n1, "%.60s %.40s+0x%lx", f && f->function[0] ? f->function : "<unknown>",
             f ? gm_symbols_base_name(f->module) : "?", f ? (unsigned long)f->offset : 0ul);
}

size_t gm_report_top_holders(gm_ledger_top *out, size_t max)
{
    gm_leak_group *groups = NULL;
    size_t n = collect_groups(-1, 0, &groups), k = 0;
    bool locked = gm_symbols_begin();
    for (size_t i = 0; i < n && k < max; i++) {
        if (groups[i].memory != GM_MEMORY_DEVICE) continue;
        out[k] = (gm_ledger_top){groups[i].bytes, (uint32_t)groups[i].count, groups[i].device, ""};
        describe_group(&groups[i], out[k].where, sizeof out[k].where);
        k++;
    }
    gm_symbols_end(locked);
    free(groups);
    return k;
}
