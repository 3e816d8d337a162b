/* Copy counters: per device, direction and host-memory kind, and the copies the checks refused.
 * Each thread counts into its own block per device (a plain load and store, no locked
 * instruction: only that thread writes it); readers sum the blocks, which live until exit so a
 * finished thread's copies still count. */
#include <stdlib.h>
#include <string.h>

#include "gm_account.h"

/* ------------------------------------------------------------------ per-thread counters */

typedef struct copy_cell {
    _Atomic uint64_t calls, bytes, timed_calls, timed_bytes, ticks, staged_calls, staged_bytes;
} copy_cell;

/* One thread's counters of one device; D2D counts in [D2D][0]. */
typedef struct copy_block {
    copy_cell cell[GPUMEM_COPY_DIRECTIONS][GPUMEM_HOST_KINDS];
    copy_cell peer; /* the D2D copies from another device's memory, counted in [D2D][0] too */
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
        for (copy_block *b = blocks[d]; b; b = b->next) {
            memset(b->cell, 0, sizeof b->cell);
            memset(&b->peer, 0, sizeof b->peer);
        }
        memset(overflow[d].cell, 0, sizeof overflow[d].cell);
        memset(&overflow[d].peer, 0, sizeof overflow[d].peer);
        atomic_store(&refused_copies[d], 0);
        atomic_store(&refused_memsets[d], 0);
    }
}

static void init_once(void)
{
    origin_ns = gm_now_ns();
    origin_ticks = gm_copy_clock();
    static const gm_fork_handlers handlers = {fork_prepare, fork_parent, fork_child};
    gm_fork_register(GM_FORK_COPIES, &handlers);
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

static void bump_cell(copy_cell *c, size_t bytes, bool timed, uint64_t ticks, bool staged, bool shared)
{
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

void gm_copy_count(int device, gpumem_copy_direction dir, gpumem_host_memory kind, bool peer, size_t bytes,
                   bool timed, uint64_t ticks, bool staged)
{
    if ((unsigned)device >= GM_MAX_DEVICES || (unsigned)dir >= GPUMEM_COPY_DIRECTIONS) return;
    if (dir == GPUMEM_COPY_D2D || (unsigned)kind >= GPUMEM_HOST_KINDS) kind = GPUMEM_HOST_PAGEABLE;
    copy_block *b = mine[device];
    if (__builtin_expect(!b, 0)) b = mine[device] = register_thread(device);
    bool shared = b == &overflow[device];
    bump_cell(&b->cell[dir][kind], bytes, timed, ticks, staged, shared);
    if (peer && dir == GPUMEM_COPY_D2D) bump_cell(&b->peer, bytes, timed, ticks, false, shared);
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
    add_cell(&out->peer, &b->peer);
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
    out->peer.time_ns = gm_copy_ticks_to_ns(out->peer.time_ns);
    out->refused_copies = atomic_load(&refused_copies[device]);
    out->refused_memsets = atomic_load(&refused_memsets[device]);
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

void gm_copy_note_refused(int device, bool memset_call)
{
    if ((unsigned)device >= GM_MAX_DEVICES) return;
    atomic_fetch_add(memset_call ? &refused_memsets[device] : &refused_copies[device], 1);
}
