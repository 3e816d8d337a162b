/* Call sites: the return addresses of an allocation's call stack, captured on the hot path and
 * stored once per distinct stack in a depot (records keep a 32-bit id). Symbolization (dladdr,
 * addr2line) happens only when a report is written.
 *
 * Unwinding: "fp" walks frame pointers from the hooked entry point's own frame (it is compiled
 * with them), checked against the thread's stack bounds, like LeakSanitizer's fast unwinder;
 * "dwarf" uses glibc's backtrace() (the unwind tables: complete, slower). */
#include <execinfo.h>
#include <stdlib.h>
#include <string.h>

#include "gm_internal.h"

#define MAX_DEPTH 64

typedef struct stack_rec {
    uint32_t hash;
    uint32_t n;
    uintptr_t pc[];
} stack_rec;

static pthread_mutex_t depot_lock = PTHREAD_MUTEX_INITIALIZER;
static stack_rec **by_id;      /* by_id[id - 1] */
static uint32_t count, cap_ids;
static uint32_t *table;        /* open addressing: ids, 0 = empty */
static uint32_t table_mask;    /* table size - 1 */

/* ------------------------------------------------------------------ capture */

static __thread uintptr_t tl_stack_lo, tl_stack_hi;

static void learn_stack_bounds(void)
{
    pthread_attr_t attr;
    void *addr = NULL;
    size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        pthread_attr_getstack(&attr, &addr, &size);
        pthread_attr_destroy(&attr);
    }
    if (!size) { /* unknown: trust a window around here */
        uintptr_t here = (uintptr_t)__builtin_frame_address(0);
        addr = (void *)(here - ((uintptr_t)1 << 20));
        size = (size_t)16 << 20;
    }
    tl_stack_lo = (uintptr_t)addr;
    tl_stack_hi = (uintptr_t)addr + size;
}

static size_t walk_frame_pointers(const gm_callsite *site, uintptr_t *pc, size_t depth)
{
    size_t n = 0;
    pc[n++] = site->pc;
    if (!tl_stack_hi) learn_stack_bounds();
    uintptr_t fp = site->frame ? *(const uintptr_t *)site->frame : 0;
    uintptr_t prev = (uintptr_t)site->frame;
    while (n < depth && fp > prev && fp >= tl_stack_lo && fp + 16 <= tl_stack_hi && !(fp & 7)) {
        uintptr_t ret = ((const uintptr_t *)fp)[1];
        if (ret < 4096) break;
        pc[n++] = ret;
        prev = fp;
        fp = ((const uintptr_t *)fp)[0];
    }
    return n;
}

static size_t walk_unwind_tables(const gm_callsite *site, uintptr_t *pc, size_t depth)
{
    void *raw[MAX_DEPTH + 16];
    int got = backtrace(raw, (int)(depth + 16));
    int start = 0;
    while (start < got && (uintptr_t)raw[start] != site->pc) start++; /* drop our own frames */
    if (start == got) start = 0;
    size_t n = 0;
    for (int i = start; i < got && n < depth; i++) pc[n++] = (uintptr_t)raw[i];
    if (n == 0) pc[n++] = site->pc;
    return n;
}

static uint32_t hash_frames(const uintptr_t *pc, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull ^ n;
    for (size_t i = 0; i < n; i++) h = (h ^ pc[i]) * 0x100000001b3ull;
    h ^= h >> 29;
    uint32_t r = (uint32_t)h ^ (uint32_t)(h >> 32);
    return r ? r : 1;
}

static bool same(const stack_rec *r, uint32_t hash, const uintptr_t *pc, size_t n)
{
    return r->hash == hash && r->n == n && memcmp(r->pc, pc, n * sizeof *pc) == 0;
}

static bool grow_table_locked(void)
{
    uint32_t size = table_mask ? (table_mask + 1) * 2 : 1024;
    uint32_t *t = calloc(size, sizeof *t);
    if (!t) return false;
    for (uint32_t id = 1; id <= count; id++) {
        uint32_t i = by_id[id - 1]->hash & (size - 1);
        while (t[i]) i = (i + 1) & (size - 1);
        t[i] = id;
    }
    free(table);
    table = t;
    table_mask = size - 1;
    return true;
}

static uint32_t insert_locked(uint32_t hash, const uintptr_t *pc, size_t n)
{
    if (count >= UINT32_MAX / 2) return 0;
    if ((uint64_t)(count + 1) * 2 > (uint64_t)table_mask + 1 && !grow_table_locked()) return 0;
    if (count == cap_ids) {
        uint32_t ncap = cap_ids ? cap_ids * 2 : 1024;
        stack_rec **grown = realloc(by_id, ncap * sizeof *grown);
        if (!grown) return 0;
        by_id = grown;
        cap_ids = ncap;
    }
    stack_rec *r = malloc(sizeof *r + n * sizeof *pc);
    if (!r) return 0;
    r->hash = hash;
    r->n = (uint32_t)n;
    memcpy(r->pc, pc, n * sizeof *pc);
    by_id[count++] = r;
    uint32_t i = hash & table_mask;
    while (table[i]) i = (i + 1) & table_mask;
    table[i] = count;
    return count;
}

/* A thread's last few stacks: a loop allocating from one place finds its id without the lock. */
#define TL_CACHE 4
static __thread struct { uint32_t hash, id; const stack_rec *rec; } tl_cache[TL_CACHE];
static __thread unsigned tl_next;

static uint32_t depot_put(const uintptr_t *pc, size_t n)
{
    uint32_t hash = hash_frames(pc, n);
    for (int i = 0; i < TL_CACHE; i++) /* records never move nor die: no lock needed */
        if (tl_cache[i].rec && same(tl_cache[i].rec, hash, pc, n)) return tl_cache[i].id;
    pthread_mutex_lock(&depot_lock);
    uint32_t id = 0;
    for (uint32_t i = hash & table_mask; table && table[i]; i = (i + 1) & table_mask)
        if (same(by_id[table[i] - 1], hash, pc, n)) {
            id = table[i];
            break;
        }
    if (!id) id = insert_locked(hash, pc, n);
    pthread_mutex_unlock(&depot_lock);
    if (id) {
        unsigned slot = tl_next++ % TL_CACHE;
        tl_cache[slot].hash = hash;
        tl_cache[slot].id = id;
        pthread_mutex_lock(&depot_lock);
        tl_cache[slot].rec = by_id[id - 1];
        pthread_mutex_unlock(&depot_lock);
    }
    return id;
}

uint32_t gm_stack_capture(const gm_callsite *site)
{
    const gm_config *cfg = gm_mgr.cfg;
    if (!site || !site->pc || !cfg || cfg->stack_depth <= 0) return 0;
    size_t depth = (size_t)cfg->stack_depth;
    uintptr_t pc[MAX_DEPTH];
    size_t n = cfg && cfg->stack_unwinder == 1 ? walk_unwind_tables(site, pc, depth)
                                               : walk_frame_pointers(site, pc, depth);
    return depot_put(pc, n);
}

size_t gm_stack_get(uint32_t id, uintptr_t *pc, size_t max)
{
    pthread_mutex_lock(&depot_lock);
    const stack_rec *r = id && id <= count ? by_id[id - 1] : NULL;
    pthread_mutex_unlock(&depot_lock);
    if (!r) return 0;
    size_t n = r->n < max ? r->n : max;
    memcpy(pc, r->pc, n * sizeof *pc);
    return n;
}

/* Whatever the unwinder loads lazily (libgcc_s, which calls malloc) is loaded now, at init,
 * not inside the first hooked allocation. */
void gm_stack_warm_up(void)
{
    void *raw[4];
    if (gm_mgr.cfg && gm_mgr.cfg->stack_unwinder == 1) backtrace(raw, 4);
    learn_stack_bounds();
}
