/* The base layer: what every other layer may use and nothing here uses another layer. Logging,
 * clocks, the process's own identity (pid patterns, program path), one fork registry, and the
 * hash that uthash tables of pointer keys use. */
#ifndef GM_BASE_H
#define GM_BASE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define GM_HIDDEN __attribute__((visibility("hidden")))
/* Code that runs inside dlsym before a sanitizer runtime has initialized. */
#define GM_NO_SANITIZE __attribute__((no_sanitize("address", "undefined", "thread")))

/* ---------------------------------------------------------------- hashing (uthash) */
/* uthash's default (Jenkins) hash is slow for the 8-byte pointer keys of the hot path. Every file
 * that uses a uthash table includes this header first, so all tables hash alike. */
static inline unsigned gm_hash_bytes(const void *key, size_t len)
{
    uint64_t h = 0x9E3779B97F4A7C15ull ^ len;
    const unsigned char *p = (const unsigned char *)key;
    if (len == sizeof(uint64_t)) {
        uint64_t v;
        __builtin_memcpy(&v, p, sizeof v);
        h = (v >> 9) * 0x9E3779B97F4A7C15ull; /* blocks are 512-B aligned: drop the zero bits */
        return (unsigned)(h >> 32);
    }
    for (size_t i = 0; i < len; i++) h = (h ^ p[i]) * 0x100000001B3ull;
    return (unsigned)(h ^ (h >> 32));
}
#define HASH_FUNCTION(keyptr, keylen, hashv) ((hashv) = gm_hash_bytes((keyptr), (size_t)(keylen)))
#include <uthash.h>

/* ---------------------------------------------------------------- logging (log.c) */
#define GM_ERROR 0
#define GM_WARN 0
#define GM_INFO 1
#define GM_DEBUG 2
#define GM_TRACE 3
/* One line on stderr, "gpumem: " first, when `level` <= the verbosity (GPUMEM_VERBOSE; errors
 * and warnings always). */
void gm_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void gm_log_set_verbosity(int level);
int gm_log_verbosity(void);

/* ---------------------------------------------------------------- clocks (clock.c) */
uint64_t gm_now_ns(void);        /* CLOCK_MONOTONIC */
uint64_t gm_coarse_now_ns(void); /* CLOCK_MONOTONIC_COARSE: a few ms resolution, 3x cheaper */
/* Structures that one thread writes on its hot path start and end on their own cache lines, so
 * threads working at once never share one (gm_cache_line_alloc: zeroed, released with free). */
#define GM_CACHE_LINE 64
void *gm_cache_line_alloc(size_t size);
/* Locks `m` unless another thread holds it longer than GM_REPORT_WAIT_S: what a report does
 * with the tables it reads (at exit another thread may be inside one, or died holding it). */
#define GM_REPORT_WAIT_S 2
bool gm_lock_for_report(pthread_mutex_t *m);

/* ---------------------------------------------------------------- the process (process.c) */
/* `pattern` with %p replaced by the process id. */
void gm_expand_pid(const char *pattern, char *out, size_t cap);
const char *gm_program_path(void); /* /proc/self/exe, resolved once */

/* ---------------------------------------------------------------- fork (fork.c) */
/* Every concern that holds a lock or process-bound state registers here instead of calling
 * pthread_atfork itself, so the order is written down once: before fork, `prepare` handlers run
 * in ascending order (the lock order: outermost first); after it, `parent` and `child` run in
 * descending order. A child inherits no CUDA context: `child` forgets device state without a
 * driver call and re-initializes its locks. */
typedef enum {
    GM_FORK_BUFFERS = 0, /* api/buffers.c: a buffer's lock is held across allocations */
    GM_FORK_STAGING,     /* engine/staging.c: the stagers' registry */
    GM_FORK_PINNED,      /* engine/pinned.c: the pinned pool */
    GM_FORK_GRAPHS,      /* shim/hooks_graph.c: the graph allocations (taken before a heap's lock) */
    GM_FORK_HEAPS,       /* engine/heap.c: the heap table, then every heap */
    GM_FORK_IPC,         /* engine/ipc.c: the registry file belongs to the parent */
    GM_FORK_COPIES,      /* account/copies.c: per-thread copy counters */
    GM_FORK_ORPHANS,     /* track/orphans.c: leaks of destroyed contexts */
    GM_FORK_REPORTER,    /* report/report_live.c: child only (the reporter thread is the parent's) */
    GM_FORK_SYMBOLS,     /* track/symbols.c: child only (a report may be symbolizing) */
    GM_FORK_LEDGER,      /* account/ledger.c: child only, first: the parent's membership is not the child's */
    GM_FORK_ORDERS
} gm_fork_order;
typedef struct gm_fork_handlers {
    void (*prepare)(void), (*parent)(void), (*child)(void); /* each may be NULL */
} gm_fork_handlers;
/* `handlers` must outlive the process (a static const). A later call for `order` replaces it. */
void gm_fork_register(gm_fork_order order, const gm_fork_handlers *handlers);

#endif
