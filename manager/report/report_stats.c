/* The statistics part of every report: per device (the fields of include/gpumem_stats.def),
 * copies (account/copies.c), the pinned host pool (engine/pinned.c) and tags (track/tags.c), as
 * the text summary and as JSON members (docs/report-format.md). Read-only: it takes each
 * owner's figures through the owner's own accessor. */
#include <string.h>

#include "gm_pinned.h"
#include "gm_report.h"

static unsigned long long ull(uint64_t v) { return (unsigned long long)v; }

void gm_report_json_string(FILE *out, const char *s)
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

/* ------------------------------------------------------------------ copies */

static bool anything(const gpumem_copy_stats *st)
{
    for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++)
        if (st->total[d].calls) return true;
    return st->refused_copies || st->refused_memsets;
}

static void text_duration(FILE *out, uint64_t ns)
{
    if (ns < 10000) fprintf(out, "%llu ns", ull(ns));
    else if (ns < 10000000) fprintf(out, "%.1f us", (double)ns / 1e3);
    else if (ns < 10000000000ull) fprintf(out, "%.1f ms", (double)ns / 1e6);
    else fprintf(out, "%.1f s", (double)ns / 1e9);
}

/* "  H2D: pageable 2000 B in 2 calls (1 staged), pinned 64 B in 1 calls; blocking 2000 B in
 * 2 calls took 13.1 us (0.15 GB/s)" */
static void text_direction(FILE *out, const gpumem_copy_stats *st, int d)
{
    const gpumem_copy_counter *t = &st->total[d];
    if (!t->calls || (d == GPUMEM_COPY_D2D && !t->timed_calls)) return;
    fprintf(out, "  %s:", gm_copy_direction_name((gpumem_copy_direction)d));
    const char *sep = " ";
    for (int k = 0; d != GPUMEM_COPY_D2D && k < GPUMEM_HOST_KINDS; k++) {
        const gpumem_copy_counter *c = &st->host[d][k];
        if (!c->calls) continue;
        fprintf(out, "%s%s %llu B in %llu calls", sep, gm_host_memory_name((gpumem_host_memory)k), ull(c->bytes), ull(c->calls));
        if (c->staged_calls) fprintf(out, " (%llu staged)", ull(c->staged_calls));
        sep = ", ";
    }
    if (t->timed_calls) {
        fprintf(out, "%sblocking %llu B in %llu calls took ", d == GPUMEM_COPY_D2D ? " " : "; ",
                ull(t->timed_bytes), ull(t->timed_calls));
        text_duration(out, t->time_ns);
        if (t->time_ns) fprintf(out, " (%.2f GB/s)", (double)t->timed_bytes / (double)t->time_ns);
    }
    fputc('\n', out);
}

static void copies_text(FILE *out)
{
    for (int dev = 0; dev < GM_MAX_DEVICES; dev++) {
        gpumem_copy_stats st;
        gm_copy_stats_collect(dev, &st);
        if (!anything(&st)) continue;
        fprintf(out, "copies on device %d:", dev);
        const char *sep = " ";
        for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++) {
            if (!st.total[d].calls) continue;
            fprintf(out, "%s%s %llu B in %llu calls", sep, gm_copy_direction_name((gpumem_copy_direction)d), ull(st.total[d].bytes),
                    ull(st.total[d].calls));
            sep = ", ";
        }
        if (*sep == ' ') fputs(" none", out);
        fputc('\n', out);
        for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++) text_direction(out, &st, d);
        if (st.peer.calls)
            fprintf(out, "  D2D from other devices (peer): %llu B in %llu calls\n", ull(st.peer.bytes),
                    ull(st.peer.calls));
        if (st.refused_copies || st.refused_memsets)
            fprintf(out,
                    "  refused %llu copies and %llu memsets touching freed pool memory or running past "
                    "the end of an allocation (each logged when it happened)\n",
                    ull(st.refused_copies), ull(st.refused_memsets));
    }
}

static void json_counter(FILE *out, const gpumem_copy_counter *c)
{
    fprintf(out,
            "\"calls\":%llu,\"bytes\":%llu,\"timed_calls\":%llu,\"timed_bytes\":%llu,\"time_ns\":%llu,"
            "\"staged_calls\":%llu,\"staged_bytes\":%llu",
            ull(c->calls), ull(c->bytes), ull(c->timed_calls), ull(c->timed_bytes), ull(c->time_ns),
            ull(c->staged_calls), ull(c->staged_bytes));
}

static void json_device(FILE *out, int dev, const gpumem_copy_stats *st)
{
    fprintf(out, "{\"device\":%d,\"refused_copies\":%llu,\"refused_memsets\":%llu", dev,
            ull(st->refused_copies), ull(st->refused_memsets));
    for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++) {
        fprintf(out, ",\"%s\":{", gm_copy_direction_name((gpumem_copy_direction)d));
        json_counter(out, &st->total[d]);
        for (int k = 0; d != GPUMEM_COPY_D2D && k < GPUMEM_HOST_KINDS; k++) {
            fprintf(out, ",\"%s\":{", gm_host_memory_name((gpumem_host_memory)k));
            json_counter(out, &st->host[d][k]);
            fputc('}', out);
        }
        if (d == GPUMEM_COPY_D2D) {
            fputs(",\"peer\":{", out);
            json_counter(out, &st->peer);
            fputc('}', out);
        }
        fputc('}', out);
    }
    fputc('}', out);
}

static void copies_json(FILE *out)
{
    gpumem_copy_stats sum, st;
    memset(&sum, 0, sizeof sum);
    fputs("\"copies\":{\"devices\":[", out);
    bool first = true;
    for (int dev = 0; dev < GM_MAX_DEVICES; dev++) {
        gm_copy_stats_collect(dev, &st);
        if (!anything(&st)) continue;
        if (!first) fputc(',', out);
        json_device(out, dev, &st);
        first = false;
        for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++) {
            sum.total[d].calls += st.total[d].calls;
            sum.total[d].bytes += st.total[d].bytes;
        }
        sum.refused_copies += st.refused_copies;
        sum.refused_memsets += st.refused_memsets;
    }
    fputs("]", out);
    for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++)
        fprintf(out, ",\"%s\":{\"calls\":%llu,\"bytes\":%llu}", gm_copy_direction_name((gpumem_copy_direction)d), ull(sum.total[d].calls),
                ull(sum.total[d].bytes));
    fprintf(out, ",\"refused_copies\":%llu,\"refused_memsets\":%llu}", ull(sum.refused_copies),
            ull(sum.refused_memsets));
}

/* ------------------------------------------------------------------ the pinned host pool */

static void pinned_text(FILE *out)
{
    gm_pinned_stats s;
    if (!gm_pinned_stats_for_report(&s) || (!s.allocations && !s.registered_ranges && !s.invalid_frees)) return;
    uint64_t lookups = s.pool_hits + s.pool_misses;
    char limit[32];
    uint64_t max = gm_mgr.cfg ? gm_mgr.cfg->pinned_max_cached : GM_UNLIMITED;
    if (max == GM_UNLIMITED) snprintf(limit, sizeof limit, "unlimited");
    else snprintf(limit, sizeof limit, "%llu B", (unsigned long long)max);
    fprintf(out,
            "pinned host (%s): live %llu B in %llu (peak %llu B), held %llu B (peak %llu B), cached %llu B in %llu "
            "(limit %s); allocations %llu, frees %llu, pool hit rate %.1f%% (%llu hits, %llu misses); "
            "driver allocs %llu, frees %llu, released %llu; registered %llu B in %llu; invalid frees %llu\n",
            gm_mgr.cfg && !gm_mgr.cfg->pinned_pool ? "pass-through" : "pooled", (unsigned long long)s.bytes_live,
            (unsigned long long)s.blocks_live, (unsigned long long)s.bytes_live_peak,
            (unsigned long long)s.bytes_held, (unsigned long long)s.bytes_held_peak,
            (unsigned long long)s.bytes_cached, (unsigned long long)s.blocks_cached, limit,
            (unsigned long long)s.allocations, (unsigned long long)s.frees,
            lookups ? 100.0 * (double)s.pool_hits / (double)lookups : 0.0, (unsigned long long)s.pool_hits,
            (unsigned long long)s.pool_misses, (unsigned long long)s.driver_allocs,
            (unsigned long long)s.driver_frees, (unsigned long long)s.released,
            (unsigned long long)s.registered_bytes, (unsigned long long)s.registered_ranges,
            (unsigned long long)s.invalid_frees);
}

static void pinned_json(FILE *out)
{
    gm_pinned_stats s;
    if (!gm_pinned_stats_for_report(&s)) memset(&s, 0, sizeof s);
    uint64_t max = gm_mgr.cfg ? gm_mgr.cfg->pinned_max_cached : GM_UNLIMITED;
    fprintf(out,
            "\"pinned\":{\"pool\":%s,\"allocations\":%llu,\"frees\":%llu,\"pool_hits\":%llu,\"pool_misses\":%llu,"
            "\"bytes_live\":%llu,\"blocks_live\":%llu,\"bytes_live_peak\":%llu,\"bytes_held\":%llu,"
            "\"bytes_held_peak\":%llu,\"bytes_cached\":%llu,\"blocks_cached\":%llu,",
            gm_mgr.cfg && !gm_mgr.cfg->pinned_pool ? "false" : "true", (unsigned long long)s.allocations,
            (unsigned long long)s.frees, (unsigned long long)s.pool_hits, (unsigned long long)s.pool_misses,
            (unsigned long long)s.bytes_live, (unsigned long long)s.blocks_live,
            (unsigned long long)s.bytes_live_peak, (unsigned long long)s.bytes_held,
            (unsigned long long)s.bytes_held_peak, (unsigned long long)s.bytes_cached,
            (unsigned long long)s.blocks_cached);
    if (max == GM_UNLIMITED) fputs("\"max_cached\":null,", out);
    else fprintf(out, "\"max_cached\":%llu,", (unsigned long long)max);
    fprintf(out,
            "\"released\":%llu,\"oom_retries\":%llu,\"driver_allocs\":%llu,\"driver_frees\":%llu,"
            "\"invalid_frees\":%llu,\"orphaned\":%llu,\"registered_ranges\":%llu,\"registered_bytes\":%llu}",
            (unsigned long long)s.released, (unsigned long long)s.oom_retries,
            (unsigned long long)s.driver_allocs, (unsigned long long)s.driver_frees,
            (unsigned long long)s.invalid_frees, (unsigned long long)s.orphaned,
            (unsigned long long)s.registered_ranges, (unsigned long long)s.registered_bytes);
}

/* ------------------------------------------------------------------ tags */

static void tags_text(FILE *out)
{
    uint32_t n = gm_tag_count();
    for (uint32_t i = 1; i < n; i++) {
        gpumem_tag_usage u;
        gm_tag_usage_get((uint16_t)i, &u);
        fprintf(out, "%s%s: %llu B live in %llu allocation(s), peak %llu B, %llu allocation(s) in all",
                i == 1 ? "tags: " : "; ", gm_tag_name((uint16_t)i), (unsigned long long)u.live_bytes,
                (unsigned long long)u.live_allocations, (unsigned long long)u.peak_bytes,
                (unsigned long long)u.allocations);
    }
    if (n > 1) fputc('\n', out);
}

static void tags_json(FILE *out)
{
    uint32_t n = gm_tag_count();
    fputs("\"tags\":[", out);
    for (uint32_t i = 1; i < n; i++) {
        gpumem_tag_usage u;
        gm_tag_usage_get((uint16_t)i, &u);
        fprintf(out, "%s{\"tag\":", i > 1 ? "," : "");
        gm_report_json_string(out, gm_tag_name((uint16_t)i));
        fprintf(out, ",\"live_bytes\":%llu,\"live_allocations\":%llu,\"peak_bytes\":%llu,\"allocations\":%llu}",
                (unsigned long long)u.live_bytes, (unsigned long long)u.live_allocations,
                (unsigned long long)u.peak_bytes, (unsigned long long)u.allocations);
    }
    fputc(']', out);
}


/* ------------------------------------------------------------------ devices, and all of it */

/* A device that never allocated nor reserved is left out. */
static bool device_used(const gpumem_stats *st) { return st->allocations || st->bytes_reserved_peak; }

/* In a group (GPUMEM_SHARED): the group's own figures for the device, under its lines. */
static void group_text(FILE *out, int dev)
{
    gm_ledger_figures g;
    if (!gm_limit_group_figures(dev, &g)) return;
    fprintf(out, "  group %s: limit %llu B, in use %llu B, peak %llu B, %u members holding memory\n",
            gm_ledger_path(), ull(g.limit), ull(g.used), ull(g.peak), g.members);
}

static void group_json(FILE *out, int dev)
{
    gm_ledger_figures g;
    if (!gm_limit_group_figures(dev, &g)) return;
    fputs(",\"group\":{\"path\":", out);
    gm_report_json_string(out, gm_ledger_path());
    fprintf(out, ",\"limit_bytes\":%llu,\"used_bytes\":%llu,\"peak_bytes\":%llu,\"members\":%u}", ull(g.limit),
            ull(g.used), ull(g.peak), g.members);
}

void gm_report_stats_text(FILE *out)
{
    for (int dev = 0; dev < GM_MAX_DEVICES; dev++) {
        gpumem_stats st;
        gm_heap_stats(dev, &st);
        if (!device_used(&st)) continue;
        uint64_t lookups = st.pool_hits + st.pool_misses;
        char limit[48], uuid[41], named[48] = "";
        if (st.limit_bytes) snprintf(limit, sizeof limit, "%llu B", (unsigned long long)st.limit_bytes);
        else snprintf(limit, sizeof limit, "none");
        if (gm_device_uuid_text(dev, uuid)) snprintf(named, sizeof named, ", %s", uuid);
        fprintf(out,
                "device %d: peak allocated %llu B, peak reserved %llu B, limit %s%s\n"
                "  allocations %llu, frees %llu, pool hit rate %.1f%% (%llu hits, %llu misses)\n"
                "  segments %llu (released %llu), fragmentation %.3f, release-and-retry %llu, "
                "limit rejections %llu, device OOMs %llu\n",
                dev, (unsigned long long)st.bytes_allocated_peak, (unsigned long long)st.bytes_reserved_peak,
                limit, named, (unsigned long long)st.allocations, (unsigned long long)st.frees,
                lookups ? 100.0 * (double)st.pool_hits / (double)lookups : 0.0,
                (unsigned long long)st.pool_hits, (unsigned long long)st.pool_misses,
                (unsigned long long)st.segments, (unsigned long long)st.segments_released, st.fragmentation,
                (unsigned long long)st.release_retries, (unsigned long long)st.limit_rejections,
                (unsigned long long)st.backend_ooms);
        if (st.fences || st.fence_waits) /* fast mode only */
            fprintf(out, "  fences %llu, allocations that waited for one %llu\n", (unsigned long long)st.fences,
                    (unsigned long long)st.fence_waits);
        group_text(out, dev);
    }
    copies_text(out);
    pinned_text(out);
    tags_text(out);
}

/* A derived figure: an integer, or a ratio with six decimals (the JSON number printf gives). */
#define json_number(out, name, v) \
    _Generic((v), double: fprintf(out, ",\"%s\":%.6f", name, (double)(v)), \
             default: fprintf(out, ",\"%s\":%llu", name, ull((uint64_t)(v))))

/* One "devices" member per used device: every field of gpumem_stats.def, in its order. */
static void json_device_stats(FILE *out, int dev, const gpumem_stats *s)
{
    char uuid[41];
    fprintf(out, "{\"device\":%d,\"uuid\":", dev);
    gm_report_json_string(out, gm_device_uuid_text(dev, uuid) ? uuid : NULL);
#define GM_STAT_HEAP(name, doc) fprintf(out, ",\"" #name "\":%llu", ull(s->name));
#define GM_STAT_POOL(name, doc) GM_STAT_HEAP(name, doc)
#define GM_STAT_DEVICE(name, doc) GM_STAT_HEAP(name, doc)
#define GM_STAT_DERIVED(type, name, doc) json_number(out, #name, s->name);
#include "gpumem_stats.def"
    group_json(out, dev);
    fputc('}', out);
}

void gm_report_stats_json(FILE *out)
{
    fputs("\"devices\":[", out);
    bool first = true;
    for (int dev = 0; dev < GM_MAX_DEVICES; dev++) {
        gpumem_stats s;
        gm_heap_stats(dev, &s);
        if (!device_used(&s)) continue;
        if (!first) fputc(',', out);
        json_device_stats(out, dev, &s);
        first = false;
    }
    fputs("],", out);
    copies_json(out);
    fputc(',', out);
    pinned_json(out);
    fputc(',', out);
    tags_json(out);
    fprintf(out, ",\"invalid_frees\":%llu", ull(gm_stats_invalid_frees()));
}
