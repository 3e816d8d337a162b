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

/* A report of the allocations live now, while the program runs (reason "signal" or
 * "interval"), where GPUMEM_REPORT says (nothing for off); every one after the first shows each
 * group's growth since the previous one, and so does the exit report after one. Called by the
 * reporter thread only (report_live.c), which keeps them one at a time. */
size_t gm_report_write_live(const char *why);
/* The exit report (report_start.c's exit hook); `with_growth`: it got the live report's turn. */
size_t gm_report_write_exit(bool with_growth);

/* report_live.c: the reporter thread of GPUMEM_REPORT_SIGNAL and GPUMEM_REPORT_INTERVAL.
 * Started by gm_report_start when either is on (signal handler, wake-up pipe, thread); a fork
 * child has none. gm_reporter_stop: the exit report's turn; a live report under way ends first
 * (waiting at most GM_REPORT_WAIT_S), none starts afterwards. */
void gm_reporter_start(void);
bool gm_reporter_stop(void); /* false: a live report is still under way (the exit report then shows no growth) */
uint64_t gm_reporter_reports_written(void); /* live reports written so far (the benchmark) */

/* report_oom.c: the out-of-memory report ("who holds the memory"), the engine's OOM hook
 * (gm_set_oom_hook), installed by gm_report_start under GPUMEM_OOM_REPORT. */
void gm_report_oom(gm_heap *heap, size_t bytes, gm_oom_cause cause);

/* Pieces of report.c that report_oom.c shares. */
/* The live device-memory groups of `device`'s heaps, largest first (the caller frees). */
size_t gm_report_device_groups(int device, gm_leak_group **out);
size_t gm_report_group_frames(const gm_leak_group *g, gm_frame *out);
/* One addr2line run per module for the frames of the groups (suppressed ones skipped unless json). */
void gm_report_resolve_frames(const gm_leak_group *groups, size_t n, bool json);
void gm_report_text_frames(FILE *out, const gm_frame *f, size_t n);
void gm_report_json_frames(FILE *out, const gm_frame *f, size_t n);
/* Where GPUMEM_REPORT says; NULL for off; `*close_it`: fclose it afterwards. */
FILE *gm_report_open_destination(bool *close_it);

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
