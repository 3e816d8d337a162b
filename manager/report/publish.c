/* The publisher: in a group (GPUMEM_SHARED) a thread copies this process's figures per device
 * and its top call stacks into its member slot every GPUMEM_PUBLISH_INTERVAL_MS, for
 * gpumem-exporter and `gpumem-report top` (they read the region, never ask the process). The
 * allocation path is untouched: the thread reads the same figures gpumem_get_stats does. */
#include <pthread.h>
#include <string.h>
#include <time.h>

#include "gm_report.h"

#define TOP_EVERY_MS 5000 /* the top stacks walk every live allocation: at most this often */

static void publish_once(bool with_top)
{
    gm_ledger_published figures[GM_LEDGER_DEVICES];
    memset(figures, 0, sizeof figures);
    for (int dev = 0; dev < GM_MAX_DEVICES; dev++) {
        gm_device *d = gm_device_get(dev);
        int entry = d ? atomic_load_explicit(&d->ledger, memory_order_relaxed) : 0;
        if (entry <= 0 || entry > GM_LEDGER_DEVICES) continue;
        gpumem_stats st;
        gm_heap_stats(dev, &st);
        figures[entry - 1] = (gm_ledger_published){(uint64_t)dev + 1,
            st.bytes_allocated, st.bytes_allocated_peak, st.bytes_reserved_peak, st.allocations, st.frees,
            st.pool_hits, st.pool_misses, st.limit_rejections, st.backend_ooms};
    }
    static gm_ledger_top top[GM_LEDGER_TOP];
    static size_t ntop;
    if (with_top) ntop = gm_report_top_holders(top, GM_LEDGER_TOP);
    gm_ledger_publish(figures, top, (int)ntop);
}

static void *publisher(void *arg)
{
    (void)arg;
    int interval_ms = gm_mgr.cfg->publish_interval_ms;
    int top_every = interval_ms >= TOP_EVERY_MS ? 1 : TOP_EVERY_MS / interval_ms;
    for (unsigned round = 0; !atomic_load(&gm_mgr.exiting); round++) {
        struct timespec ts = {interval_ms / 1000, (long)(interval_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0) {
        }
        if (atomic_load(&gm_mgr.exiting)) break;
        publish_once(round % (unsigned)top_every == 0);
    }
    return NULL;
}

void gm_report_publisher_start(void)
{
    if (!gm_ledger_on()) return;
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &a, publisher, NULL) != 0)
        gm_log(GM_WARN, "shared budget %s: no publisher thread; exporters see reservations only", gm_ledger_path());
    pthread_attr_destroy(&a);
}
