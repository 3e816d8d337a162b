/* The report layer's life: gm_report_start starts the manager and everything that reports
 * (the exit hook, the live reporter of report_live.c, the OOM hook of report_oom.c, the group's
 * publisher of publish.c), and the exit hook orders the end: a live report under way first, then
 * the exit report (report.c). It sits above the other files of the layer, which never call it. */
#include <stdlib.h>
#include <unistd.h>

#include "gm_pinned.h"
#include "gm_report.h"

/* A process that never held device or pinned memory through gpumem (nvidia-smi under a global
 * LD_PRELOAD, a script that imports a framework and never touches the GPU) has nothing to report,
 * and stays silent, as LeakSanitizer does. */
static bool used_memory(void)
{
    gm_pinned_stats pinned = {0};
    gm_pinned_stats_for_report(&pinned);
    return atomic_load(&gm_mgr.nheaps) > 0 || pinned.allocations > 0 || gm_stats_invalid_frees() > 0;
}

static void report_on_exit(int status, void *unused)
{
    (void)unused;
    if (!used_memory()) return;
    if (!gm_manager_begin_exit()) return;
    /* A live report under way ends first; none starts after this. One that does not end within
     * the wait still owns the growth table: the exit report then shows no growth. */
    bool turn = gm_reporter_stop();
    uint64_t t0 = gm_now_ns();
    size_t leaked = gm_report_write_exit(turn);
    gm_log(GM_INFO, "exit report written in %.3f ms", (double)(gm_now_ns() - t0) / 1e6);
    gm_trace_close();
    int code = gm_mgr.cfg ? gm_mgr.cfg->leak_exitcode : 0;
    if (status == 0 && leaked && code) {
        fflush(NULL); /* _exit skips stdio's own flush */
        _exit(code);
    }
}

static void install_exit_hook(void) { on_exit(report_on_exit, NULL); }

bool gm_report_start(const gm_backend *backend)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    if (!gm_manager_init(backend)) return false;
    pthread_once(&once, install_exit_hook);
    static pthread_once_t publisher_once = PTHREAD_ONCE_INIT;
    pthread_once(&publisher_once, gm_report_publisher_start);
    if (gm_mgr.cfg->oom_report) gm_set_oom_hook(gm_report_oom);
    gm_reporter_start();
    return true;
}

