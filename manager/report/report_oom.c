/* The out-of-memory report: when an allocation fails for lack of memory (refused by
 * GPUMEM_LIMIT, or by the device after gpumem handed its cached segments back and retried), one
 * short report of who holds the memory of that device, as PyTorch's OOM message says what is
 * reserved and Megatron dumps its allocations: the request, the device's limit, reserved,
 * allocated and cached free bytes and its largest free block, then the call stacks and tags
 * holding the most live bytes.
 *
 * The engine calls it through its OOM hook (gm_set_oom_hook; it never calls the report layer
 * itself) on the allocating thread, with no heap lock held. It reads the tables as a report does
 * and never allocates device memory. Rate-limited without a lock (a fork child inherits no
 * state that could be held): the first failure is reported, then at most one per
 * GPUMEM_OOM_REPORT_INTERVAL seconds; the failures in between are counted and the next report
 * says how many, so a program that probes its capacity (decreasing sizes, or a caching allocator
 * that frees and retries) writes one report, not hundreds. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gm_report.h"

#define TOP_STACKS 5
#define TOP_TAGS 5

static _Atomic uint64_t last_report_ns; /* 0: none yet */
static _Atomic uint64_t not_reported;

/* True when this failure is to be reported; `*skipped`: the ones before it that were not. */
static bool take_turn(uint64_t *skipped)
{
    uint64_t interval = (uint64_t)gm_mgr.cfg->oom_report_interval * 1000000000ull;
    uint64_t now = gm_now_ns() | 1; /* never 0, which means "none yet" */
    uint64_t last = atomic_load(&last_report_ns);
    do {
        if (last && now - last < interval) {
            atomic_fetch_add(&not_reported, 1);
            return false;
        }
    } while (!atomic_compare_exchange_weak(&last_report_ns, &last, now));
    *skipped = atomic_exchange(&not_reported, 0);
    return true;
}

typedef struct tag_total {
    uint16_t tag;
    uint64_t bytes, count;
} tag_total;

static int by_tag(const void *a, const void *b)
{
    const tag_total *x = a, *y = b;
    return (x->tag > y->tag) - (x->tag < y->tag);
}

static int by_bytes(const void *a, const void *b)
{
    const tag_total *x = a, *y = b;
    if (x->bytes != y->bytes) return x->bytes < y->bytes ? 1 : -1;
    return (x->tag > y->tag) - (x->tag < y->tag);
}

/* Live bytes per tag over the groups (0: untagged), largest first; the caller frees. */
static size_t tag_totals(const gm_leak_group *groups, size_t n, tag_total **out)
{
    tag_total *t = n ? malloc(n * sizeof *t) : NULL;
    size_t m = 0;
    if (!t) {
        *out = NULL;
        return 0;
    }
    for (size_t i = 0; i < n; i++) t[i] = (tag_total){groups[i].tag, groups[i].bytes, groups[i].count};
    qsort(t, n, sizeof *t, by_tag);
    for (size_t i = 0; i < n; i++) {
        if (m && t[m - 1].tag == t[i].tag) {
            t[m - 1].bytes += t[i].bytes;
            t[m - 1].count += t[i].count;
        } else {
            t[m++] = t[i];
        }
    }
    qsort(t, m, sizeof *t, by_bytes);
    *out = t;
    return m;
}

static const char *tag_label(uint16_t tag)
{
    const char *name = gm_tag_name(tag);
    return name ? name : "(untagged)";
}

static void write_text(FILE *out, int device, size_t bytes, gm_oom_cause cause, const gpumem_stats *st,
                       const gm_leak_group *groups, size_t n, const tag_total *tags, size_t ntags,
                       uint64_t skipped)
{
    static gm_frame frames[GM_MAX_FRAMES];
    uint64_t live = 0, count = 0;
    for (size_t i = 0; i < n; i++) {
        live += groups[i].bytes;
        count += groups[i].count;
    }
    fprintf(out, "==gpumem== pid %ld: out of memory on device %d: %zu bytes requested, refused %s\n",
            (long)getpid(), device, bytes,
            cause == GM_OOM_LIMIT ? "by GPUMEM_LIMIT"
                                  : "by the device (after gpumem handed its cached segments back and retried)");
    char limit[48];
    if (st->limit_bytes) snprintf(limit, sizeof limit, "%llu B", (unsigned long long)st->limit_bytes);
    else snprintf(limit, sizeof limit, "none");
    fprintf(out,
            "  limit %s, reserved %llu B, allocated %llu B, cached free %llu B (largest free block %llu B); "
            "live %llu B in %llu allocations\n",
            limit, (unsigned long long)st->bytes_reserved, (unsigned long long)st->bytes_allocated,
            (unsigned long long)st->bytes_cached_free, (unsigned long long)st->largest_free_block,
            (unsigned long long)live, (unsigned long long)count);
    size_t top = n < TOP_STACKS ? n : TOP_STACKS;
    if (top) fprintf(out, "  the %zu call stack(s) holding the most (of %zu):\n", top, n);
    for (size_t i = 0; i < top; i++) {
        fprintf(out, "  %llu bytes in %llu allocation(s)", (unsigned long long)groups[i].bytes,
                (unsigned long long)groups[i].count);
        const char *tag = gm_tag_name(groups[i].tag);
        if (tag) fprintf(out, " tagged \"%s\"", tag);
        fputs(" allocated from:\n", out);
        gm_report_text_frames(out, frames, gm_report_group_frames(&groups[i], frames));
    }
    if (ntags > 1 || (ntags == 1 && tags[0].tag)) {
        fputs("  tags by live bytes:", out);
        for (size_t i = 0; i < ntags && i < TOP_TAGS; i++)
            fprintf(out, "%s %s %llu B in %llu", i ? ";" : "", tag_label(tags[i].tag),
                    (unsigned long long)tags[i].bytes, (unsigned long long)tags[i].count);
        fputc('\n', out);
    }
    if (skipped)
        fprintf(out, "  %llu out-of-memory failure(s) since the previous such report were not reported (GPUMEM_OOM_REPORT_INTERVAL=%d s)\n",
                (unsigned long long)skipped, gm_mgr.cfg->oom_report_interval);
}

static void write_json(FILE *out, int device, size_t bytes, gm_oom_cause cause, const gpumem_stats *st,
                       const gm_leak_group *groups, size_t n, const tag_total *tags, size_t ntags,
                       uint64_t skipped)
{
    static gm_frame frames[GM_MAX_FRAMES];
    uint64_t live = 0, count = 0;
    for (size_t i = 0; i < n; i++) {
        live += groups[i].bytes;
        count += groups[i].count;
    }
    fprintf(out, "{\"format\":\"gpumem-oom\",\"version\":1,\"pid\":%ld,\"program\":", (long)getpid());
    gm_report_json_string(out, gm_program_path());
    fprintf(out,
            ",\"reason\":\"out of memory\",\"device\":%d,\"cause\":\"%s\",\"request_bytes\":%zu,"
            "\"limit_bytes\":%llu,\"bytes_reserved\":%llu,\"bytes_allocated\":%llu,\"bytes_cached_free\":%llu,"
            "\"largest_free_block\":%llu,\"live_bytes\":%llu,\"live_allocations\":%llu,\"not_reported\":%llu,"
            "\"stacks\":%zu,\"holders\":[",
            device, cause == GM_OOM_LIMIT ? "limit" : "device", bytes, (unsigned long long)st->limit_bytes,
            (unsigned long long)st->bytes_reserved, (unsigned long long)st->bytes_allocated,
            (unsigned long long)st->bytes_cached_free, (unsigned long long)st->largest_free_block,
            (unsigned long long)live, (unsigned long long)count, (unsigned long long)skipped, n);
    for (size_t i = 0; i < n && i < TOP_STACKS; i++) {
        fprintf(out, "%s{\"bytes\":%llu,\"allocations\":%llu,\"tag\":", i ? "," : "",
                (unsigned long long)groups[i].bytes, (unsigned long long)groups[i].count);
        gm_report_json_string(out, gm_tag_name(groups[i].tag));
        fputc(',', out);
        gm_report_json_frames(out, frames, gm_report_group_frames(&groups[i], frames));
        fputc('}', out);
    }
    fputs("],\"tags\":[", out);
    for (size_t i = 0; i < ntags && i < TOP_TAGS; i++) {
        fprintf(out, "%s{\"tag\":", i ? "," : "");
        gm_report_json_string(out, gm_tag_name(tags[i].tag));
        fprintf(out, ",\"live_bytes\":%llu,\"live_allocations\":%llu}", (unsigned long long)tags[i].bytes,
                (unsigned long long)tags[i].count);
    }
    fputs("]}\n", out);
}

void gm_report_oom(gm_heap *heap, size_t bytes, gm_oom_cause cause)
{
    uint64_t skipped = 0;
    if (!take_turn(&skipped)) return;
    bool close_it = false;
    FILE *out = gm_report_open_destination(&close_it);
    if (!out) return; /* GPUMEM_REPORT=off */
    int device = heap->device;
    bool json = gm_mgr.cfg->report_format == 1;
    gpumem_stats st;
    gm_heap_stats(device, &st);
    bool locked = gm_symbols_begin(); /* one report at a time */
    gm_leak_group *groups = NULL;
    size_t n = gm_report_device_groups(device, &groups);
    tag_total *tags = NULL;
    size_t ntags = tag_totals(groups, n, &tags);
    gm_report_resolve_frames(groups, n < TOP_STACKS ? n : TOP_STACKS, true);
    if (json) write_json(out, device, bytes, cause, &st, groups, n, tags, ntags, skipped);
    else write_text(out, device, bytes, cause, &st, groups, n, tags, ntags, skipped);
    fflush(out);
    gm_symbols_end(locked);
    free(tags);
    free(groups);
    if (close_it) fclose(out);
}
