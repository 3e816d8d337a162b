/* Transfers: checked and counted copies.
 *
 * Checks: a copy or memset whose device side starts in one of our pool segments is checked
 * against the live block there. A pool hides what plain cudaMalloc would not: a copy into a
 * freed block lands in memory the pool may already have handed to someone else, and a copy past
 * a block's end runs into its neighbour; the driver sees one big segment and accepts both. Such a
 * call is refused with CUDA_ERROR_INVALID_VALUE and one logged line with the caller's stack.
 *
 * Counters: per device, direction and host-memory kind. Each thread counts into its own block per
 * device (a plain load and store, no locked instruction: only that thread writes it); readers sum
 * the blocks, which live until exit so a finished thread's copies still count. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gm_transfer.h"

/* ------------------------------------------------------------------ per-thread counters */

typedef struct copy_cell {
    _Atomic uint64_t calls, bytes, timed_calls, timed_bytes, ticks, staged_calls, staged_bytes;
} copy_cell;

/* One thread's counters of one device; D2D counts in [D2D][0]. */
typedef struct copy_block {
    copy_cell cell[GPUMEM_COPY_DIRECTIONS][GPUMEM_HOST_KINDS];
    struct copy_block *next;
} copy_block;

static pthread_mutex_t blocks_lock = PTHREAD_MUTEX_INITIALIZER;
static copy_block *blocks[GM_MAX_DEVICES];
static __thread copy_block *mine[GM_MAX_DEVICES];
static copy_block overflow[GM_MAX_DEVICES]; /* a thread whose block cannot be allocated: shared */
static _Atomic uint64_t refused_copies[GM_MAX_DEVICES], refused_memsets[GM_MAX_DEVICES];

static const char *const direction_names[GPUMEM_COPY_DIRECTIONS] = {"H2D", "D2H", "D2D", "H2H"};
static const char *const host_names[GPUMEM_HOST_KINDS] = {"pageable", "pinned"};

const char *gm_copy_direction_name(gpumem_copy_direction dir)
{
    return (unsigned)dir < GPUMEM_COPY_DIRECTIONS ? direction_names[dir] : "?";
}

const char *gm_host_memory_name(gpumem_host_memory kind)
{
    return (unsigned)kind < GPUMEM_HOST_KINDS ? host_names[kind] : "?";
}

const char *gm_copy_dir_name(gm_copy_dir dir)
{
    return dir == GM_COPY_DEFAULT ? "default" : gm_copy_direction_name((gpumem_copy_direction)dir);
}

/* ---- the tick clock: sums of tick differences are converted with the ratio of ticks to
 * nanoseconds since the first copy was counted, measured when they are read. */

static uint64_t origin_ticks, origin_ns;

uint64_t gm_copy_ticks_to_ns(uint64_t ticks)
{
#if defined(__x86_64__)
    uint64_t dt = gm_copy_clock() - origin_ticks, dns = gm_now_ns() - origin_ns;
    if (!ticks || !dt) return 0;
    return (uint64_t)((long double)ticks * (long double)dns / (long double)dt);
#else
    return ticks;
#endif
}

/* ---- fork: the child starts with its own (empty) counters and a lock nobody holds. */

static void fork_prepare(void) { pthread_mutex_lock(&blocks_lock); }
static void fork_parent(void) { pthread_mutex_unlock(&blocks_lock); }

static void fork_child(void)
{
    pthread_mutex_init(&blocks_lock, NULL);
    for (int d = 0; d < GM_MAX_DEVICES; d++) {
        for (copy_block *b = blocks[d]; b; b = b->next) memset(b->cell, 0, sizeof b->cell);
        memset(overflow[d].cell, 0, sizeof overflow[d].cell);
        atomic_store(&refused_copies[d], 0);
        atomic_store(&refused_memsets[d], 0);
    }
}

static void init_once(void)
{
    origin_ns = gm_now_ns();
    origin_ticks = gm_copy_clock();
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}

static copy_block *register_thread(int device)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, init_once);
    copy_block *b = calloc(1, sizeof *b);
    if (!b) return &overflow[device];
    pthread_mutex_lock(&blocks_lock);
    b->next = blocks[device];
    blocks[device] = b;
    pthread_mutex_unlock(&blocks_lock);
    return b;
}

static void bump(_Atomic uint64_t *v, uint64_t by, bool shared)
{
    if (shared) atomic_fetch_add_explicit(v, by, memory_order_relaxed);
    else atomic_store_explicit(v, atomic_load_explicit(v, memory_order_relaxed) + by, memory_order_relaxed);
}

void gm_copy_count(int device, gpumem_copy_direction dir, gpumem_host_memory kind, size_t bytes,
                   bool timed, uint64_t ticks, bool staged)
{
    if ((unsigned)device >= GM_MAX_DEVICES || (unsigned)dir >= GPUMEM_COPY_DIRECTIONS) return;
    if (dir == GPUMEM_COPY_D2D || (unsigned)kind >= GPUMEM_HOST_KINDS) kind = GPUMEM_HOST_PAGEABLE;
    copy_block *b = mine[device];
    if (__builtin_expect(!b, 0)) b = mine[device] = register_thread(device);
    bool shared = b == &overflow[device];
    copy_cell *c = &b->cell[dir][kind];
    bump(&c->calls, 1, shared);
    bump(&c->bytes, bytes, shared);
    if (timed) {
        bump(&c->timed_calls, 1, shared);
        bump(&c->timed_bytes, bytes, shared);
        bump(&c->ticks, ticks, shared);
    }
    if (staged) {
        bump(&c->staged_calls, 1, shared);
        bump(&c->staged_bytes, bytes, shared);
    }
}

static void add_cell(gpumem_copy_counter *to, const copy_cell *c)
{
    to->calls += atomic_load_explicit(&c->calls, memory_order_relaxed);
    to->bytes += atomic_load_explicit(&c->bytes, memory_order_relaxed);
    to->timed_calls += atomic_load_explicit(&c->timed_calls, memory_order_relaxed);
    to->timed_bytes += atomic_load_explicit(&c->timed_bytes, memory_order_relaxed);
    to->time_ns += atomic_load_explicit(&c->ticks, memory_order_relaxed); /* ticks until the end */
    to->staged_calls += atomic_load_explicit(&c->staged_calls, memory_order_relaxed);
    to->staged_bytes += atomic_load_explicit(&c->staged_bytes, memory_order_relaxed);
}

static void add_block(gpumem_copy_stats *out, const copy_block *b)
{
    for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++)
        for (int k = 0; k < GPUMEM_HOST_KINDS; k++) add_cell(&out->host[d][k], &b->cell[d][k]);
}

static void counter_add(gpumem_copy_counter *to, const gpumem_copy_counter *from)
{
    to->calls += from->calls;
    to->bytes += from->bytes;
    to->timed_calls += from->timed_calls;
    to->timed_bytes += from->timed_bytes;
    to->time_ns += from->time_ns;
    to->staged_calls += from->staged_calls;
    to->staged_bytes += from->staged_bytes;
}

void gm_copy_stats_collect(int device, gpumem_copy_stats *out)
{
    memset(out, 0, sizeof *out);
    if ((unsigned)device >= GM_MAX_DEVICES) return;
    add_block(out, &overflow[device]);
    pthread_mutex_lock(&blocks_lock);
    for (const copy_block *b = blocks[device]; b; b = b->next) add_block(out, b);
    pthread_mutex_unlock(&blocks_lock);
    for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++) {
        for (int k = 0; k < GPUMEM_HOST_KINDS; k++) {
            gpumem_copy_counter *c = &out->host[d][k];
            c->time_ns = gm_copy_ticks_to_ns(c->time_ns);
            counter_add(&out->total[d], c);
        }
    }
    memset(out->host[GPUMEM_COPY_D2D], 0, sizeof out->host[GPUMEM_COPY_D2D]); /* no host side */
    out->refused_copies = atomic_load(&refused_copies[device]);
    out->refused_memsets = atomic_load(&refused_memsets[device]);
}

gpumem_status gpumem_get_copy_stats(int device, gpumem_copy_stats *out)
{
    if (!out || device < 0 || device >= GM_MAX_DEVICES) return GPUMEM_ERROR_INVALID_VALUE;
    gm_copy_stats_collect(device, out);
    return GPUMEM_OK;
}

void gm_copy_totals(gm_copy_dir dir, uint64_t *calls, uint64_t *bytes)
{
    *calls = *bytes = 0;
    if (dir >= GM_COPY_DEFAULT) return; /* "default" copies are classified before they count */
    for (int d = 0; d < GM_MAX_DEVICES; d++) {
        gpumem_copy_stats st;
        gm_copy_stats_collect(d, &st);
        *calls += st.total[dir].calls;
        *bytes += st.total[dir].bytes;
    }
}

/* ------------------------------------------------------------------ the check */

/* Refused calls logged in full; later ones are only counted (a loop must not flood the log). */
#define LOGGED_MAX 100

/* The refused call's stack, as the leak report prints one (from the program's own call on). */
static size_t format_stack(char *out, size_t cap, const gm_callsite *site)
{
    uintptr_t pc[64];
    size_t n = site ? gm_stack_get(gm_stack_capture(site), pc, 64) : 0;
    if (n == 0 && site) pc[n++] = site->pc;
    return gm_report_format_stack(out, cap, pc, n);
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
    atomic_fetch_add(x->memset ? &refused_memsets[device] : &refused_copies[device], 1);
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
    x->side[GM_XFER_DST].status = x->side[GM_XFER_SRC].status = GM_SPAN_NOT_OURS;
    if (!check && x->device >= 0) return GPUMEM_OK; /* the lookup would only name the device */
    gm_pool_find_spans(x->side, 2);
    for (int i = 0; i < 2; i++) {
        const gm_span *s = &x->side[i];
        if (s->status == GM_SPAN_NOT_OURS) continue;
        if (check && (s->status == GM_SPAN_FREED || s->status == GM_SPAN_PAST_END)) return refuse(x, s, i);
    }
    for (int i = 1; i >= 0; i--)
        if (x->side[i].status != GM_SPAN_NOT_OURS) x->device = x->side[i].device;
    return GPUMEM_OK;
}

/* ------------------------------------------------------------------ the report */

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
    fprintf(out, "  %s:", direction_names[d]);
    const char *sep = " ";
    for (int k = 0; d != GPUMEM_COPY_D2D && k < GPUMEM_HOST_KINDS; k++) {
        const gpumem_copy_counter *c = &st->host[d][k];
        if (!c->calls) continue;
        fprintf(out, "%s%s %llu B in %llu calls", sep, host_names[k], ull(c->bytes), ull(c->calls));
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

void gm_copy_report_text(FILE *out)
{
    for (int dev = 0; dev < GM_MAX_DEVICES; dev++) {
        gpumem_copy_stats st;
        gm_copy_stats_collect(dev, &st);
        if (!anything(&st)) continue;
        fprintf(out, "copies on device %d:", dev);
        const char *sep = " ";
        for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++) {
            if (!st.total[d].calls) continue;
            fprintf(out, "%s%s %llu B in %llu calls", sep, direction_names[d], ull(st.total[d].bytes),
                    ull(st.total[d].calls));
            sep = ", ";
        }
        if (*sep == ' ') fputs(" none", out);
        fputc('\n', out);
        for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++) text_direction(out, &st, d);
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
        fprintf(out, ",\"%s\":{", direction_names[d]);
        json_counter(out, &st->total[d]);
        for (int k = 0; d != GPUMEM_COPY_D2D && k < GPUMEM_HOST_KINDS; k++) {
            fprintf(out, ",\"%s\":{", host_names[k]);
            json_counter(out, &st->host[d][k]);
            fputc('}', out);
        }
        fputc('}', out);
    }
    fputc('}', out);
}

void gm_copy_report_json(FILE *out)
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
        for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++) counter_add(&sum.total[d], &st.total[d]);
        sum.refused_copies += st.refused_copies;
        sum.refused_memsets += st.refused_memsets;
    }
    fputs("]", out);
    for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++)
        fprintf(out, ",\"%s\":{\"calls\":%llu,\"bytes\":%llu}", direction_names[d], ull(sum.total[d].calls),
                ull(sum.total[d].bytes));
    fprintf(out, ",\"refused_copies\":%llu,\"refused_memsets\":%llu}", ull(sum.refused_copies),
            ull(sum.refused_memsets));
}
