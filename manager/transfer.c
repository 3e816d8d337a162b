/* Transfers: counted per direction. Relaxed atomics: a copy costs two uncontended adds. */
#include "gm_internal.h"

static _Atomic uint64_t copy_calls[GM_COPY_DIRS], copy_bytes[GM_COPY_DIRS];
static const char *const dir_names[GM_COPY_DIRS] = {"H2D", "D2H", "D2D", "default"};

void gm_copy_note(gm_copy_dir dir, size_t bytes)
{
    atomic_fetch_add_explicit(&copy_calls[dir], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&copy_bytes[dir], bytes, memory_order_relaxed);
}

void gm_copy_totals(gm_copy_dir dir, uint64_t *calls, uint64_t *bytes)
{
    *calls = atomic_load_explicit(&copy_calls[dir], memory_order_relaxed);
    *bytes = atomic_load_explicit(&copy_bytes[dir], memory_order_relaxed);
}

const char *gm_copy_dir_name(gm_copy_dir dir) { return dir < GM_COPY_DIRS ? dir_names[dir] : "?"; }
