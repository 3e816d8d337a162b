/* The pinned host memory pool behind cuMemHostAlloc/cuMemAllocHost/cuMemFreeHost. (Not written
 * yet: nothing is pooled or tracked, so there is nothing to report.) */
#include "gm_internal.h"

const char *gm_leak_memory_name(int memory) { return memory == GM_LEAK_PINNED_HOST ? "pinned_host" : "device"; }

void gm_pinned_for_each_live(void (*fn)(void *cx, int device, const gm_record *rec), void *cx)
{
    (void)fn, (void)cx;
}

void gm_pinned_report_text(FILE *out) { (void)out; }

void gm_pinned_report_json(FILE *out) { fputs("\"pinned\":{}", out); }

bool gm_host_is_pinned(const void *p, size_t n)
{
    (void)p, (void)n;
    return false;
}
