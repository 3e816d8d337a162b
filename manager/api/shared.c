/* gpumem_shared_snapshot_json: a group's region as JSON for tools (gpumem-exporter,
 * gpumem-report top). The region's layout stays in account/ledger.c; this file only formats
 * the reader's copy (gm_ledger_view). */
#include <stdio.h>
#include <stdlib.h>

#include "gm_api.h"

static unsigned long long ull(uint64_t v) { return (unsigned long long)v; }

static void member_device_json(FILE *out, const gm_ledger_view *v, const gm_ledger_view_member *m, int e,
                               bool *first)
{
    const gm_ledger_published *f = &m->figures[e];
    if (!m->reserved[e] && !f->device) return;
    char uuid[41];
    gm_ledger_uuid_text(v->devices[e].uuid, uuid);
    fprintf(out, "%s{\"uuid\":\"%s\",\"device\":", *first ? "" : ",", uuid);
    if (f->device) fprintf(out, "%llu", ull(f->device - 1));
    else fputs("null", out);
    fprintf(out,
            ",\"reserved_bytes\":%llu,\"allocated_bytes\":%llu,\"allocated_peak_bytes\":%llu,"
            "\"reserved_peak_bytes\":%llu,\"allocations\":%llu,\"frees\":%llu,\"pool_hits\":%llu,"
            "\"pool_misses\":%llu,\"limit_rejections\":%llu,\"device_ooms\":%llu}",
            ull(m->reserved[e]), ull(f->allocated), ull(f->allocated_peak), ull(f->reserved_peak),
            ull(f->allocations), ull(f->frees), ull(f->pool_hits), ull(f->pool_misses),
            ull(f->limit_rejections), ull(f->backend_ooms));
    *first = false;
}

static void member_json(FILE *out, const gm_ledger_view *v, const gm_ledger_view_member *m)
{
    fprintf(out, "{\"pid\":%u,\"alive\":%s,\"start_ticks\":%llu,\"command\":", m->pid,
            m->alive ? "true" : "false", ull(m->start));
    gm_report_json_string(out, m->comm);
    fprintf(out, ",\"published_ns\":%llu,\"devices\":[", ull(m->published_ns));
    bool first = true;
    for (int e = 0; e < v->ndevices; e++) member_device_json(out, v, m, e, &first);
    fputs("],\"top\":[", out);
    for (int t = 0; t < m->ntop; t++) {
        fprintf(out, "%s{\"bytes\":%llu,\"allocations\":%u,\"device\":%d,\"where\":", t ? "," : "",
                ull(m->top[t].bytes), m->top[t].count, m->top[t].device);
        gm_report_json_string(out, m->top[t].where);
        fputc('}', out);
    }
    fputs("]}", out);
}

static void view_json(FILE *out, const char *path, const gm_ledger_view *v)
{
    fputs("{\"path\":", out);
    gm_report_json_string(out, path);
    fprintf(out, ",\"generation\":%llu,\"devices\":[", ull(v->generation));
    for (int e = 0; e < v->ndevices; e++) {
        char uuid[41];
        gm_ledger_uuid_text(v->devices[e].uuid, uuid);
        fprintf(out, "%s{\"uuid\":\"%s\",\"limit_bytes\":%llu,\"used_bytes\":%llu,\"peak_bytes\":%llu}",
                e ? "," : "", uuid, ull(v->devices[e].limit), ull(v->devices[e].used), ull(v->devices[e].peak));
    }
    fputs("],\"members\":[", out);
    for (int i = 0; i < v->nmembers; i++) {
        if (i) fputc(',', out);
        member_json(out, v, &v->members[i]);
    }
    fputs("]}", out);
}

char *gpumem_shared_snapshot_json(const char *path)
{
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    if (!out) return NULL;
    gm_ledger_view v;
    char err[512];
    if (!path || !*path) {
        fputs("{\"path\":null,\"error\":\"no path given\"}", out);
    } else if (gm_ledger_view_read(path, &v, err, sizeof err) != 0) {
        fputs("{\"path\":", out);
        gm_report_json_string(out, path);
        fputs(",\"error\":", out);
        gm_report_json_string(out, err);
        fputc('}', out);
    } else {
        view_json(out, path, &v);
        gm_ledger_view_free(&v);
    }
    fclose(out);
    return text;
}

void gpumem_string_free(char *s) { free(s); }
