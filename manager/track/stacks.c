/* Call sites: the return addresses of an allocation's call stack, captured on the hot path and
 * stored once per distinct stack in a depot (records keep a 32-bit id). Symbolization (dladdr,
 * addr2line) happens only when a report is written.
 *
 * Unwinding: "fp" walks frame pointers from the hooked entry point's own frame (it is compiled
 * with them), checked against the thread's stack bounds, like LeakSanitizer's fast unwinder;
 * "dwarf" uses glibc's backtrace() (the unwind tables: complete, slower).
 *
 * Code built without frame pointers (much of a Python process) leaves rbp holding anything: a
 * walk through it reads a "frame" out of ordinary stack data, and its return address is garbage
 * (a PyTorch report ended in 0x3434343433323130, ASCII digits). So the walk also stops at a
 * return address that lies in no executable segment of a loaded object. */
#include <execinfo.h>
#include <link.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gm_track.h"

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

/* ------------------------------------------------------------------ executable ranges */

/* The executable PT_LOAD segments of every loaded object, sorted, as of one state of the loaded
 * set (glibc's dlpi_adds/dlpi_subs counters). Published whole and never freed: a walker on
 * another thread may still be reading the previous one; there is one per change of the set
 * that a walk noticed, which is a handful in a process's life. */
typedef struct exec_range {
    uintptr_t lo, hi; /* [lo, hi) */
} exec_range;

typedef struct exec_map {
    unsigned long long adds, subs;
    size_t n;
    exec_range r[];
} exec_map;

static exec_map *exec_ranges;      /* atomic: published with release, read with acquire */
static int64_t exec_checked_ns;    /* atomic: last time a miss asked whether the set changed */
static pthread_mutex_t exec_lock = PTHREAD_MUTEX_INITIALIZER; /* one rebuild at a time */

typedef struct exec_collect {
    exec_range *r;
    size_t n, cap;
    unsigned long long adds, subs;
    bool failed;
} exec_collect;

static bool has_counters(size_t size)
{
    return size >= offsetof(struct dl_phdr_info, dlpi_subs) + sizeof(unsigned long long);
}

static int collect_object(struct dl_phdr_info *info, size_t size, void *arg)
{
    exec_collect *c = arg;
    if (has_counters(size)) {
        c->adds = info->dlpi_adds;
        c->subs = info->dlpi_subs;
    }
    for (size_t i = 0; i < info->dlpi_phnum && !c->failed; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_X)) continue;
        if (c->n == c->cap) {
            size_t ncap = c->cap ? c->cap * 2 : 64;
            exec_range *grown = realloc(c->r, ncap * sizeof *grown);
            if (!grown) {
                c->failed = true;
                break;
            }
            c->r = grown;
            c->cap = ncap;
        }
        uintptr_t lo = (uintptr_t)info->dlpi_addr + (uintptr_t)ph->p_vaddr;
        c->r[c->n++] = (exec_range){lo, lo + (uintptr_t)ph->p_memsz};
    }
    return 0;
}

static int range_order(const void *a, const void *b)
{
    uintptr_t x = ((const exec_range *)a)->lo, y = ((const exec_range *)b)->lo;
    return x < y ? -1 : x > y;
}

/* Reads the loaded set again and publishes it; false when memory ran out (the old map stays). */
static bool exec_map_rebuild(void)
{
    exec_collect c = {0};
    dl_iterate_phdr(collect_object, &c);
    exec_map *m = c.failed ? NULL : malloc(sizeof *m + c.n * sizeof *c.r);
    if (m) {
        qsort(c.r, c.n, sizeof *c.r, range_order);
        m->adds = c.adds;
        m->subs = c.subs;
        m->n = c.n;
        if (c.n) memcpy(m->r, c.r, c.n * sizeof *c.r);
        __atomic_store_n(&exec_ranges, m, __ATOMIC_RELEASE);
    }
    free(c.r);
    return m != NULL;
}

/* The last two ranges this thread's frames hit, with the map they came from: a stack's frames
 * lie in a few objects (the program, its framework, libc), so most lookups end here instead of in
 * a binary search per frame (stack capture runs on every allocation). */
static __thread struct { const exec_map *map; exec_range r[2]; } tl_hits;

static bool exec_map_has(const exec_map *m, uintptr_t a)
{
    if (tl_hits.map == m) {
        if (a >= tl_hits.r[0].lo && a < tl_hits.r[0].hi) return true;
        if (a >= tl_hits.r[1].lo && a < tl_hits.r[1].hi) {
            exec_range t = tl_hits.r[0];
            tl_hits.r[0] = tl_hits.r[1];
            tl_hits.r[1] = t;
            return true;
        }
    }
    size_t lo = 0, hi = m->n;
    while (lo < hi) { /* the last range starting at or below a */
        size_t mid = lo + (hi - lo) / 2;
        if (m->r[mid].lo <= a) lo = mid + 1;
        else hi = mid;
    }
    if (lo == 0 || a >= m->r[lo - 1].hi) return false;
    if (tl_hits.map != m) {
        tl_hits.map = m;
        tl_hits.r[1] = (exec_range){0, 0};
    } else {
        tl_hits.r[1] = tl_hits.r[0];
    }
    tl_hits.r[0] = m->r[lo - 1];
    return true;
}

static int read_counters(struct dl_phdr_info *info, size_t size, void *arg)
{
    unsigned long long *out = arg;
    if (has_counters(size)) {
        out[0] = info->dlpi_adds;
        out[1] = info->dlpi_subs;
    }
    return 1; /* the counters are the same in every entry: the first one is enough */
}

static int64_t coarse_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* After a miss: has an object been loaded or unloaded since `m` was built? Walks through code
 * without frame pointers miss on every capture, and asking takes the loader's lock, so the
 * question is asked at most once per millisecond by all threads together. */
static bool loaded_set_changed(const exec_map *m)
{
    int64_t now = coarse_now_ns(), last = __atomic_load_n(&exec_checked_ns, __ATOMIC_RELAXED);
    if (now - last < 1000000 ||
        !__atomic_compare_exchange_n(&exec_checked_ns, &last, now, false, __ATOMIC_RELAXED,
                                     __ATOMIC_RELAXED))
        return false;
    unsigned long long now_counts[2] = {m->adds, m->subs};
    dl_iterate_phdr(read_counters, now_counts);
    return now_counts[0] != m->adds || now_counts[1] != m->subs;
}

/* Rebuilds unless `seen` was replaced meanwhile. A trylock: a capture never waits for another
 * thread's rebuild (it uses the map it has), and a fork child whose parent forked mid-rebuild
 * keeps the parent's map rather than blocking. */
static exec_map *exec_map_refresh(const exec_map *seen)
{
    if (pthread_mutex_trylock(&exec_lock) == 0) {
        if (__atomic_load_n(&exec_ranges, __ATOMIC_ACQUIRE) == seen) exec_map_rebuild();
        pthread_mutex_unlock(&exec_lock);
    }
    return __atomic_load_n(&exec_ranges, __ATOMIC_ACQUIRE);
}

/* Is `a` in the text of a loaded object? Without a map (out of memory) every address is. */
static bool is_code(uintptr_t a)
{
    exec_map *m = __atomic_load_n(&exec_ranges, __ATOMIC_ACQUIRE);
    if (!m && !(m = exec_map_refresh(NULL))) return true;
    if (exec_map_has(m, a)) return true;
    if (!loaded_set_changed(m)) return false;
    return exec_map_has(exec_map_refresh(m), a);
}

/* ------------------------------------------------------------------ capture */

/* This thread's stack, learnt at its first capture (pthread_getattr_np reads /proc/self/maps
 * for the main thread: once per thread, never on the hot path). */
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
    /* Each frame must lie above the previous one and on this thread's stack (so it can be read),
     * and its return address must be code (else the frame was not one). */
    /* the range of the last code address, in registers: most frames are in the same object */
    uintptr_t code_lo = tl_hits.r[0].lo, code_hi = tl_hits.r[0].hi;
    if (tl_hits.map != __atomic_load_n(&exec_ranges, __ATOMIC_ACQUIRE)) code_lo = code_hi = 0;
    while (n < depth && fp > prev && fp >= tl_stack_lo && fp + 16 <= tl_stack_hi && !(fp & 7)) {
        uintptr_t ret = ((const uintptr_t *)fp)[1];
        if (ret < code_lo || ret >= code_hi) {
            if (ret < 4096 || !is_code(ret)) break;
            code_lo = tl_hits.r[0].lo;
            code_hi = tl_hits.r[0].hi;
        }
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

/* GPUMEM_STACK_DEPTH and GPUMEM_STACK_UNWINDER, copied at gm_stack_init: the hot path reads
 * two words, not the configuration. Depth 0 until then: nothing is captured. */
static int capture_depth;
static bool use_unwind_tables;

uint32_t gm_stack_capture(const gm_callsite *site)
{
    int depth = __atomic_load_n(&capture_depth, __ATOMIC_RELAXED);
    if (!site || !site->pc || depth <= 0) return 0;
    uintptr_t pc[MAX_DEPTH];
    size_t n = use_unwind_tables ? walk_unwind_tables(site, pc, (size_t)depth)
                                 : walk_frame_pointers(site, pc, (size_t)depth);
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
void gm_stack_init(const gm_config *cfg)
{
    void *raw[4];
    use_unwind_tables = cfg->stack_unwinder == 1;
    if (use_unwind_tables) backtrace(raw, 4);
    learn_stack_bounds();
    pthread_mutex_lock(&exec_lock);
    exec_map_rebuild();
    pthread_mutex_unlock(&exec_lock);
    int depth = cfg->stack_depth < MAX_DEPTH ? cfg->stack_depth : MAX_DEPTH;
    __atomic_store_n(&capture_depth, depth, __ATOMIC_RELAXED);
}
