/* The report layer: the leak report and the statistics, in text or JSON (docs/report-format.md),
 * written at exit, at every leak check point and on request. It reads the engine's tables and
 * the account layer's figures and changes nothing: the only state it keeps is its own
 * (suppressions, the destination). Leaks: report.c; figures: report_stats.c. Below: every
 * lower layer. Above: api, shim. */
#ifndef GM_REPORT_H
#define GM_REPORT_H

#include "gm_engine.h"

/* Starts the manager on `backend` (gm_manager_init) and registers the exit report (on_exit: it
 * sees the exit status, for GPUMEM_LEAK_EXITCODE). What the shim and library mode call. */
bool gm_report_start(const gm_backend *backend);
/* Writes a report of device `only_device` (-1: all) and context `only_ctx` (0: all) to `out`
 * (NULL: GPUMEM_REPORT's destination); returns the leaked allocations it counted. */
size_t gm_report_write(FILE *out, int only_device, uintptr_t only_ctx, const char *why);
/* A leak check point: the report of context `ctx` when it holds live allocations, before the
 * context goes away (gm_context_teardown). Returns the leaked allocations. */
size_t gm_report_context(uintptr_t ctx, const char *why);

/* report_stats.c: the figures that end every report. */
void gm_report_stats_text(FILE *out);
void gm_report_stats_json(FILE *out); /* the members after "summary", without braces */
void gm_report_json_string(FILE *out, const char *s); /* a JSON string, or null for NULL/"" */

/* The largest live device-memory groups (call stack, tag), described cheaply for the group's
 * region (report.c); returns how many were written. */
size_t gm_report_top_holders(gm_ledger_top *out, size_t max);
/* publish.c: in a group, the thread that publishes this process's figures into its member slot. */
void gm_report_publisher_start(void);

#endif
