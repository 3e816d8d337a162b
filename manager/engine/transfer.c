/* Transfers: checked and classified copies (the counters are account/copies.c).
 *
 * Checks: a copy or memset whose device side starts in one of our pool segments is checked
 * against the live block there. A pool hides what plain cudaMalloc would not: a copy into a
 * freed block lands in memory the pool may already have handed to someone else, and a copy past
 * a block's end runs into its neighbour; the driver sees one big segment and accepts both. Such a
 * call is refused with CUDA_ERROR_INVALID_VALUE and one logged line with the caller's stack.
 *
 * Classification: a unified copy (cuMemcpy, cuMemcpyAsync) names no direction; each side is pool
 * memory, pinned host memory gpumem knows, or whatever the driver says it is. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gm_pinned.h"
#include "gm_transfer.h"

/* ------------------------------------------------------------------ the check */

/* Refused calls logged in full; later ones are only counted (a loop must not flood the log). */
#define LOGGED_MAX 100

/* The refused call's stack, as the leak report prints one (from the program's own call on). */
static size_t format_stack(char *out, size_t cap, const gm_callsite *site)
{
    uintptr_t pc[64];
    size_t n = site ? gm_stack_get(gm_stack_capture(site), pc, 64) : 0;
    if (n == 0 && site) pc[n++] = site->pc;
    return gm_symbols_format_stack(out, cap, pc, n);
}

static unsigned long long ull(uint64_t v) { return (unsigned long long)v; }

/* The first line: what was wrong with which range of which call. */
static size_t format_problem(char *out, size_t cap, const gm_xfer *x, const gm_span *s, int which)
{
    const char *role = which == GM_XFER_DST ? "destination" : "source";
    int n;
    if (s->status == GM_SPAN_FREED) {
        n = snprintf(out, cap,
                     "gpumem: %s: %s %#llx + %llu bytes lies in freed pool memory (free region %#llx, "
                     "%llu bytes, of a gpumem pool segment on device %d: its allocation was freed), "
                     "refused with CUDA_ERROR_INVALID_VALUE\n",
                     x->api, role, ull(s->ptr), ull(s->n), ull(s->base), ull(s->size), s->device);
    } else {
        uint64_t end = s->base + s->size;
        char where[64];
        if (s->ptr == end) snprintf(where, sizeof where, "starts at the end");
        else if (s->ptr > end) snprintf(where, sizeof where, "starts %llu bytes past the end", ull(s->ptr - end));
        else snprintf(where, sizeof where, "runs %llu bytes past the end", ull(s->n - (end - s->ptr)));
        n = snprintf(out, cap,
                     "gpumem: %s: %s %#llx + %llu bytes %s of its allocation %#llx (%llu bytes) on device "
                     "%d, refused with CUDA_ERROR_INVALID_VALUE\n",
                     x->api, role, ull(s->ptr), ull(s->n), where, ull(s->base), ull(s->size), s->device);
    }
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}

/* One write(2) for the line and its frames, so threads' reports do not interleave. */
static void log_refused(const gm_xfer *x, const gm_span *s, int which, uint64_t nth)
{
    char buf[8192];
    size_t used = format_problem(buf, sizeof buf, x, s, which);
    used += format_stack(buf + used, sizeof buf - used, x->site);
    if (nth == LOGGED_MAX)
        used += (size_t)snprintf(buf + used, sizeof buf - used,
                                 "gpumem: further refused copies and memsets are counted, not logged\n");
    ssize_t ignored = write(STDERR_FILENO, buf, used < sizeof buf ? used : sizeof buf - 1);
    (void)ignored;
}

static int refuse(const gm_xfer *x, const gm_span *s, int which)
{
    static _Atomic uint64_t logged;
    int device = (unsigned)s->device < GM_MAX_DEVICES ? s->device : 0;
    gm_copy_note_refused(device, x->memset);
    uint64_t nth = atomic_fetch_add(&logged, 1) + 1;
    if (nth <= LOGGED_MAX) log_refused(x, s, which, nth);
    return GPUMEM_ERROR_INVALID_VALUE;
}

/* The device of gpumem's only heap, or -1 when it has none or several. heaps[] entries are
 * published before nheaps; a heap's device changes only when the slot of a destroyed context is
 * reused, and a copy racing with that may count on the old device. */
static int sole_device(void)
{
    if (atomic_load_explicit(&gm_mgr.nheaps, memory_order_acquire) != 1) return -1;
    return __atomic_load_n(&gm_mgr.heaps[0]->device, __ATOMIC_RELAXED);
}

int gm_xfer_check(gm_xfer *x)
{
    bool check = gm_mgr.copy.check;
    x->device = sole_device();
    x->peer_device = -1;
    x->side[GM_XFER_DST].status = x->side[GM_XFER_SRC].status = GM_SPAN_NOT_OURS;
    if (!check && x->device >= 0) return GPUMEM_OK; /* the lookup would only name the device */
    gm_lookup_spans(x->side, 2);
    for (int i = 0; i < 2; i++) {
        const gm_span *s = &x->side[i];
        if (s->status == GM_SPAN_NOT_OURS) continue;
        if (check && (s->status == GM_SPAN_FREED || s->status == GM_SPAN_PAST_END)) return refuse(x, s, i);
    }
    for (int i = 1; i >= 0; i--)
        if (x->side[i].status != GM_SPAN_NOT_OURS) x->device = x->side[i].device;
    const gm_span *dst = &x->side[GM_XFER_DST], *src = &x->side[GM_XFER_SRC];
    if (dst->status != GM_SPAN_NOT_OURS && src->status != GM_SPAN_NOT_OURS && dst->device != src->device)
        x->peer_device = src->device;
    return GPUMEM_OK;
}

/* ------------------------------------------------------------------ classification */

/* Is a side of a unified copy device memory? Pool memory is; then gpumem's own knowledge of
 * pinned host memory; then the driver (one query, only for unified calls). */
static bool unified_side_is_device(const gm_span *s, uintptr_t p, size_t n, bool *pinned)
{
    *pinned = false;
    if (s->status != GM_SPAN_NOT_OURS) return true;
    if (gm_host_is_pinned((const void *)p, n)) {
        *pinned = true;
        return false;
    }
    gm_memory_kind kind = gm_mgr.backend->memory_kind(p);
    *pinned = kind == GM_MEMKIND_PINNED_HOST;
    return kind == GM_MEMKIND_DEVICE;
}

static bool side_is_device(const gm_span *checked, const gm_xfer_side *side, bool *pinned)
{
    *pinned = false;
    switch (side->kind) {
    case GM_SIDE_HOST: *pinned = gm_host_is_pinned((const void *)side->ptr, side->n); return false;
    case GM_SIDE_UNIFIED: return unified_side_is_device(checked, side->ptr, side->n, pinned);
    default: return true;
    }
}

/* Direction and host kind of a copy whose sides are known to be device memory or not (and, if
 * not, pinned or not). */
static void classify_sides(gm_copy_class *c, bool dst_dev, bool dst_pinned, bool src_dev, bool src_pinned)
{
    c->dir = GPUMEM_COPY_D2D;
    c->host = GPUMEM_HOST_PAGEABLE;
    if (dst_dev && src_dev) return;
    c->dir = dst_dev ? GPUMEM_COPY_H2D : src_dev ? GPUMEM_COPY_D2H : GPUMEM_COPY_H2H;
    bool pinned = c->dir == GPUMEM_COPY_H2D ? src_pinned
                : c->dir == GPUMEM_COPY_D2H ? dst_pinned
                                            : dst_pinned && src_pinned;
    c->host = pinned ? GPUMEM_HOST_PINNED : GPUMEM_HOST_PAGEABLE;
}

gm_copy_class gm_xfer_classify(const gm_xfer *x, const gm_xfer_side side[2])
{
    bool dev[2], pinned[2];
    for (int i = 0; i < 2; i++) dev[i] = side_is_device(&x->side[i], &side[i], &pinned[i]);
    gm_copy_class c;
    classify_sides(&c, dev[GM_XFER_DST], pinned[GM_XFER_DST], dev[GM_XFER_SRC], pinned[GM_XFER_SRC]);
    c.device = x->device;
    c.peer = c.dir == GPUMEM_COPY_D2D && x->peer_device >= 0;
    return c;
}
