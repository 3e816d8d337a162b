/* The timeline (GPUMEM_TRACE): a Chrome Trace Event file in the JSON Array Format, streamed as the
 * program runs so memory stays bounded. Counter events per device are rate-limited
 * (GPUMEM_TRACE_INTERVAL_US); the newest values held back are written when the next event is
 * due and at close, so the last change always reaches the file. */
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gm_account.h"

bool gm_trace_on;
static pthread_mutex_t trace_lock = PTHREAD_MUTEX_INITIALIZER;
static FILE *trace_file;
static uint64_t start_ns;
static uint64_t interval_us; /* GPUMEM_TRACE_INTERVAL_US */
static struct {
    uint64_t last_us, allocated, reserved;
    bool held; /* values newer than the last written event */
} dev[GM_MAX_DEVICES];

static uint64_t now_us(void) { return (gm_now_ns() - start_ns) / 1000; }

void gm_trace_open(const gm_config *cfg)
{
    const char *pattern = cfg->trace;
    interval_us = (uint64_t)cfg->trace_interval_us;
    if (!pattern[0] || strcmp(pattern, "off") == 0) return;
    char path[4096];
    gm_expand_pid(pattern, path, sizeof path);
    trace_file = fopen(path, "w");
    if (!trace_file) {
        gm_log(GM_ERROR, "GPUMEM_TRACE: cannot write %s; no timeline will be written", path);
        return;
    }
    start_ns = gm_now_ns();
    fputs("[\n", trace_file);
    fprintf(trace_file,
            "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":%ld,\"tid\":0,\"args\":{\"name\":\"gpumem\"}}",
            (long)getpid());
    gm_trace_on = true;
}

static void write_counter_locked(int d, uint64_t ts)
{
    fprintf(trace_file,
            ",\n{\"name\":\"device %d memory\",\"ph\":\"C\",\"ts\":%llu,\"pid\":%ld,\"tid\":0,"
            "\"args\":{\"allocated\":%llu,\"reserved\":%llu}}",
            d, (unsigned long long)ts, (long)getpid(), (unsigned long long)dev[d].allocated,
            (unsigned long long)dev[d].reserved);
    dev[d].last_us = ts;
    dev[d].held = false;
}

void gm_trace_counter(int device, uint64_t allocated, uint64_t reserved)
{
    if (device < 0 || device >= GM_MAX_DEVICES) return;
    pthread_mutex_lock(&trace_lock);
    if (trace_file) {
        uint64_t ts = now_us();
        dev[device].allocated = allocated;
        dev[device].reserved = reserved;
        dev[device].held = true;
        if (!dev[device].last_us || ts - dev[device].last_us >= interval_us)
            write_counter_locked(device, ts);
    }
    pthread_mutex_unlock(&trace_lock);
}

void gm_trace_instant(const char *name, int device, uint64_t bytes, const char *reason)
{
    pthread_mutex_lock(&trace_lock);
    if (trace_file) {
        fprintf(trace_file,
                ",\n{\"name\":\"%s\",\"ph\":\"i\",\"s\":\"%s\",\"ts\":%llu,\"pid\":%ld,\"tid\":0,"
                "\"args\":{\"device\":%d,\"bytes\":%llu%s%s%s}}",
                name, reason ? "g" : "p", (unsigned long long)now_us(), (long)getpid(), device,
                (unsigned long long)bytes, reason ? ",\"reason\":\"" : "", reason ? reason : "",
                reason ? "\"" : "");
        fflush(trace_file);
    }
    pthread_mutex_unlock(&trace_lock);
}

void gm_trace_close(void)
{
    pthread_mutex_lock(&trace_lock);
    if (trace_file) {
        uint64_t ts = now_us();
        for (int d = 0; d < GM_MAX_DEVICES; d++)
            if (dev[d].held) write_counter_locked(d, ts);
        fputs("\n]\n", trace_file);
        fclose(trace_file);
        trace_file = NULL;
        gm_trace_on = false;
    }
    pthread_mutex_unlock(&trace_lock);
}
