/* Thread caches (engine/tcache.c) on the host backend: a thread's freed block serves its own next
 * allocation of that size; everything else that asks about a block (lookups, another thread's
 * free, the leak report, statistics, a context going away) sees it exactly as without the cache;
 * a thread's own cache goes back to the pool before the pool grows for it, other threads' caches
 * when the limit would refuse the growth, and all of them when the thread ends, at the limit and
 * under GPUMEM_MAX_CACHED. Each test is its own process. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "freed_log.h"
#include "gm_api.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)

static gm_heap *heap;

static void start(const char *const *env)
{
    for (; env && env[0]; env += 2) setenv(env[0], env[1], 1);
    gm_config_reset_for_tests();
    cr_assert(gm_manager_init(gm_host_backend()));
    heap = gm_heap_get(1, 0);
    cr_assert_not_null(heap);
}

static uintptr_t alloc_ok(size_t size)
{
    uintptr_t p = 0;
    int rc = gm_alloc(heap, size, 0, 0, &p);
    cr_assert_eq(rc, GPUMEM_OK, "alloc(%zu) failed with %d", size, rc);
    return p;
}

static void free_ok(uintptr_t p) { cr_assert(gm_answer_ok(gm_free(heap, p, GM_FREE_BARRIER, NULL))); }

static gpumem_stats stats(void)
{
    gpumem_stats st;
    cr_assert_eq(gpumem_get_stats(0, &st), GPUMEM_OK);
    return st;
}

static size_t live_count(void)
{
    pthread_mutex_lock(&heap->lock);
    size_t n = gm_heap_live_count_locked(heap);
    pthread_mutex_unlock(&heap->lock);
    return n;
}

/* Runs `fn(arg)` on a thread of its own and waits for it (its cache is detached at its end). */
static void on_other_thread(void *(*fn)(void *), void *arg)
{
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, fn, arg), 0);
    cr_assert_eq(pthread_join(t, NULL), 0);
}

Test(tcache, a_freed_block_serves_the_threads_next_allocation_of_its_size)
{
    start(NULL);
    uintptr_t a = alloc_ok(4 * KiB);
    free_ok(a);
    cr_expect_eq(stats().bytes_cached_free, 2 * MiB, "the cached block still counts as cached");
    cr_expect_eq(alloc_ok(4 * KiB), a, "taken back from the thread's cache");
    gpumem_stats st = stats();
    cr_expect_eq(st.allocations, 2);
    cr_expect_eq(st.frees, 1);
    cr_expect_eq(st.pool_hits, 1);
    cr_expect_eq(st.bytes_allocated, 4 * KiB);
    cr_expect_eq(st.bytes_requested, 4 * KiB);
    cr_expect_eq(heap->ntcs, 1);
}

Test(tcache, off_means_no_cache_at_all)
{
    start((const char *const[]){"GPUMEM_THREAD_CACHE", "0", NULL});
    uintptr_t a = alloc_ok(4 * KiB);
    free_ok(a);
    cr_expect_eq(heap->ntcs, 0);
    cr_expect_eq(stats().largest_free_block, 2 * MiB, "back in the pool, merged with its segment");
}

Test(tcache, a_cached_block_is_freed_memory_to_every_query)
{
    start(NULL);
    uintptr_t a = alloc_ok(4 * KiB), keep = alloc_ok(4 * KiB);
    free_ok(a);
    uintptr_t base = 0;
    size_t size = 0;
    cr_expect(gm_answer_is(gm_lookup(a, &base, &size), gm_ours(GPUMEM_ERROR_INVALID_VALUE)));
    cr_expect(gm_answer_is(gm_free(heap, a, GM_FREE_BARRIER, NULL), gm_ours(GPUMEM_ERROR_INVALID_VALUE)),
              "a double free is refused, not cached twice");
    gm_span s = {.ptr = a + 8, .n = 16};
    gm_lookup_spans(&s, 1);
    cr_expect_eq(s.status, GM_SPAN_FREED);
    cr_expect_eq(alloc_ok(4 * KiB), a);
    cr_expect_neq(alloc_ok(4 * KiB), a, "handed out once only");
    free_ok(keep);
}

Test(tcache, a_lookup_sees_the_threads_live_block_and_its_free_still_counts_once)
{
    start(NULL);
    uintptr_t a = alloc_ok(1000);
    uintptr_t base = 0;
    size_t size = 0;
    cr_expect(gm_answer_ok(gm_lookup(a + 100, &base, &size)), "an interior pointer");
    cr_expect_eq(base, a);
    cr_expect_eq(size, 1000);
    cr_expect(gm_answer_is(gm_lookup(a + 1000, &base, &size), gm_ours(GPUMEM_ERROR_INVALID_VALUE)),
              "the rounding slack is no part of the allocation");
    gm_span s = {.ptr = a, .n = 1001};
    gm_lookup_spans(&s, 1);
    cr_expect_eq(s.status, GM_SPAN_PAST_END);
    free_ok(a);
    gpumem_stats st = stats();
    cr_expect_eq(st.frees, 1);
    cr_expect_eq(st.bytes_allocated, 0);
    cr_expect_eq(live_count(), 0);
}

typedef struct {
    uintptr_t p[64];
    size_t n, size;
} batch;

static void *alloc_batch(void *arg)
{
    batch *b = arg;
    for (size_t i = 0; i < b->n; i++)
        if (gm_alloc(heap, b->size, 0, 0, &b->p[i]) != GPUMEM_OK) b->p[i] = 0;
    return NULL;
}

static void *free_batch(void *arg)
{
    batch *b = arg;
    for (size_t i = 0; i < b->n; i++)
        if (!gm_answer_ok(gm_free(heap, b->p[i], GM_FREE_BARRIER, NULL))) abort();
    return NULL;
}

Test(tcache, another_threads_free_and_a_finished_threads_blocks)
{
    start(NULL);
    batch b = {.n = 16, .size = 64 * KiB};
    on_other_thread(alloc_batch, &b);
    for (size_t i = 0; i < b.n; i++) cr_assert_neq(b.p[i], 0);
    cr_expect_eq(live_count(), 16, "the ended thread's allocations are still live");
    gpumem_stats st = stats();
    cr_expect_eq(st.bytes_allocated, 16 * 64 * KiB);
    cr_expect_eq(st.allocations, 16);
    for (size_t i = 0; i < b.n; i++) free_ok(b.p[i]); /* freed here, not on the thread that made them */
    st = stats();
    cr_expect_eq(st.frees, 16);
    cr_expect_eq(st.bytes_allocated, 0);
    cr_expect_eq(st.bytes_requested, 0);
    cr_expect_eq(live_count(), 0);
    cr_expect_eq(st.largest_free_block, 2 * MiB, "nothing kept apart from the pool");
}

Test(tcache, a_block_another_thread_frees_goes_to_the_pool_at_once)
{
    start(NULL);
    batch b = {.n = 4, .size = 256 * KiB};
    on_other_thread(alloc_batch, &b);
    for (size_t i = 0; i < b.n; i++) free_ok(b.p[i]); /* not the allocating thread */
    cr_expect_eq(stats().largest_free_block, 2 * MiB);
    cr_expect_eq(heap->tcs[0]->cached_bytes, 0);
    cr_expect_eq(stats().segments, 1);
}

static void *alloc_free_and_end(void *arg)
{
    batch *b = arg;
    alloc_batch(b);
    free_batch(b); /* kept in this thread's cache ... */
    return NULL;   /* ... until it ends */
}

Test(tcache, the_cache_of_an_ended_thread_goes_back_to_the_pool)
{
    start(NULL);
    batch b = {.n = 4, .size = 256 * KiB};
    on_other_thread(alloc_free_and_end, &b);
    gpumem_stats st = stats();
    cr_expect_eq(st.largest_free_block, 2 * MiB, "merged back into one block");
    cr_expect_eq(st.bytes_cached_free, 2 * MiB);
    cr_expect_eq(heap->tcs[0]->cached_bytes, 0);
    on_other_thread(alloc_free_and_end, &b);
    cr_expect_eq(heap->ntcs, 1, "the next thread took the ended thread's cache");
}

Test(tcache, the_pool_never_grows_while_a_cache_holds_what_would_fit)
{
    start(NULL);
    /* Eight 256 KiB blocks fill the small segment; freed, they sit in this thread's cache. */
    uintptr_t p[8];
    for (int i = 0; i < 8; i++) p[i] = alloc_ok(256 * KiB);
    cr_expect_eq(stats().segments, 1);
    for (int i = 0; i < 8; i++) free_ok(p[i]);
    uintptr_t big = alloc_ok(1 * MiB); /* fits only once they merge again */
    gpumem_stats st = stats();
    cr_expect_eq(st.segments, 1, "the cache was handed back instead of growing");
    cr_expect_eq(big, p[0]);
    free_ok(big);
}

static void *alloc_one_mib(void *arg)
{
    uintptr_t *p = arg;
    if (gm_alloc(heap, 1 * MiB, 0, 0, p) != GPUMEM_OK) *p = 0;
    return NULL;
}

Test(tcache, at_the_limit_another_threads_cache_is_taken_back)
{
    start((const char *const[]){"GPUMEM_LIMIT", "2MiB", NULL});
    uintptr_t p[8];
    for (int i = 0; i < 8; i++) p[i] = alloc_ok(256 * KiB);
    for (int i = 0; i < 8; i++) free_ok(p[i]); /* this thread's cache holds the whole limit */
    uintptr_t got = 0;
    on_other_thread(alloc_one_mib, &got);
    cr_expect_neq(got, 0, "another thread still gets the memory");
    cr_expect_eq(stats().bytes_reserved, 2 * MiB);
    free_ok(got);
}

/* A miss takes another thread's cached blocks rather than grow, but not again within the interval
 * (gm_tcache_set_take_interval_ns): two threads that each need the one block the pool has would
 * otherwise take it from each other's cache on every allocation. */
Test(tcache, a_miss_takes_other_caches_once_per_interval)
{
    start(NULL);
    gm_tcache_set_take_interval_ns(UINT64_MAX / 2); /* after the first take, none in this test */
    uintptr_t q[8];
    for (int i = 0; i < 8; i++) q[i] = alloc_ok(256 * KiB);
    for (int i = 0; i < 8; i++) free_ok(q[i]);
    uintptr_t first = 0;
    on_other_thread(alloc_one_mib, &first);
    cr_assert_neq(first, 0);
    cr_expect_eq(stats().segments, 1, "the first miss took this thread's cached blocks");
    free_ok(first); /* from this thread: to the pool, merged again */
    uintptr_t p[8];
    for (int i = 0; i < 8; i++) p[i] = alloc_ok(256 * KiB);
    for (int i = 0; i < 8; i++) free_ok(p[i]); /* the small segment's blocks, all in this cache */
    uintptr_t got = 0;
    on_other_thread(alloc_one_mib, &got);
    cr_assert_neq(got, 0);
    gpumem_stats st = stats();
    cr_expect_eq(st.segments, 2, "the next miss, within the interval, grew the pool");
    cr_expect_eq(heap->tcs[0]->cached_bytes, 2 * MiB, "this thread's cache kept its blocks");
    cr_expect_eq(alloc_ok(256 * KiB), p[7], "and still serves this thread");
    free_ok(got);
}

Test(tcache, max_cached_bounds_what_a_thread_keeps)
{
    start((const char *const[]){"GPUMEM_MAX_CACHED", "0", NULL});
    uintptr_t a = alloc_ok(4 * KiB);
    free_ok(a);
    gpumem_stats st = stats();
    cr_expect_eq(st.bytes_reserved, 0, "nothing cached: the segment went back");
    cr_expect_eq(st.segments, 0);
}

Test(tcache, the_thread_cache_bound_is_kept)
{
    start((const char *const[]){"GPUMEM_THREAD_CACHE", "1MiB", NULL});
    uintptr_t p[8];
    for (int i = 0; i < 8; i++) p[i] = alloc_ok(256 * KiB);
    for (int i = 0; i < 8; i++) free_ok(p[i]);
    cr_expect_leq(heap->tcs[0]->cached_bytes, 1 * MiB);
    cr_expect_eq(heap->tcs[0]->cached_bytes, 1 * MiB, "four of them kept");
}

Test(tcache, one_threads_peak_is_exact)
{
    start(NULL);
    uintptr_t a = alloc_ok(1 * MiB), b = alloc_ok(512 * KiB);
    free_ok(a);
    uintptr_t c = alloc_ok(256 * KiB);
    free_ok(b);
    free_ok(c);
    cr_expect_eq(stats().bytes_allocated_peak, 1 * MiB + 512 * KiB);
}

static void *alloc_free_100mib(void *arg)
{
    uintptr_t p = 0;
    *(int *)arg = gm_alloc(heap, 100 * MiB, 0, 0, &p);
    if (p) gm_free(heap, p, GM_FREE_BARRIER, NULL);
    return NULL;
}

/* Two threads' allocations at once: the peak is their sum (exact for blocks above the slack of
 * GM_TC_PEAK_SLACK a cache counts before it adds to the heap's sum), not the larger one. */
Test(tcache, the_peak_of_two_threads_at_once_is_their_sum)
{
    start(NULL);
    uintptr_t a = alloc_ok(100 * MiB);
    int rc = -1;
    on_other_thread(alloc_free_100mib, &rc); /* while this thread holds its 100 MiB */
    cr_assert_eq(rc, GPUMEM_OK);
    free_ok(a);
    gpumem_stats st = stats();
    cr_expect_eq(st.bytes_allocated_peak, 200 * MiB);
    cr_expect_eq(st.bytes_allocated, 0);
    cr_expect_eq(atomic_load(&heap->allocated_sync.bytes), 0, "the heap's sum is back to nothing");
}

Test(tcache, buffer_ids_differ_between_threads_and_allocations)
{
    start(NULL);
    batch b = {.n = 1, .size = 4 * KiB};
    on_other_thread(alloc_batch, &b);
    uintptr_t mine = alloc_ok(4 * KiB);
    gm_block_identity x, y;
    cr_assert(gm_answer_ok(gm_block_identity_get(b.p[0], &x)));
    cr_assert(gm_answer_ok(gm_block_identity_get(mine, &y)));
    cr_expect_neq(x.buffer_id, y.buffer_id);
    free_ok(mine);
    uintptr_t again = alloc_ok(4 * KiB);
    cr_expect_eq(again, mine);
    cr_assert(gm_answer_ok(gm_block_identity_get(again, &x)));
    cr_expect_neq(x.buffer_id, y.buffer_id, "a new allocation to the driver's eyes");
    free_ok(again);
    free_ok(b.p[0]);
}

Test(tcache, a_context_going_away_keeps_the_threads_leaks)
{
    start(NULL);
    alloc_ok(4 * KiB);
    uintptr_t cached = alloc_ok(8 * KiB);
    free_ok(cached);
    cr_expect_eq(live_count(), 1);
    gm_context_teardown(1, true);
    cr_expect_eq(live_count(), 0);
    gpumem_stats st = stats();
    cr_expect_eq(st.bytes_allocated, 0);
    cr_expect_eq(st.bytes_reserved, 0, "the cached block went back with its segment");
    cr_expect_eq(heap->tcs[0]->cached_bytes, 0);
}

Test(tcache, a_fork_child_starts_clean)
{
    start(NULL);
    uintptr_t a = alloc_ok(4 * KiB);
    free_ok(alloc_ok(8 * KiB));
    pid_t pid = fork();
    if (pid == 0) {
        heap = gm_heap_get(2, 0);
        uintptr_t p = 0;
        int ok = heap && gm_alloc(heap, 4 * KiB, 0, 0, &p) == GPUMEM_OK &&
                 gm_answer_ok(gm_free(heap, p, GM_FREE_BARRIER, NULL));
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    free_ok(a);
}

/* Many threads, each allocating mixed sizes and freeing half of its own and half of a
 * neighbour's: every figure adds up at the end. */
#define MANY 8
#define ROUNDS 2000
static uintptr_t handoff[MANY][ROUNDS];
static pthread_barrier_t gate;

static void *churn(void *arg)
{
    int me = (int)(intptr_t)arg;
    static const size_t sizes[] = {512, 4096, 65536, 300000, 1 << 20};
    unsigned seed = (unsigned)me * 7919u + 1;
    static __thread uintptr_t own[ROUNDS];
    size_t nown = 0;
    for (int i = 0; i < ROUNDS; i++) {
        uintptr_t p = 0;
        if (gm_alloc(heap, sizes[rand_r(&seed) % (i % 16 ? 4 : 5)], 0, 0, &p) != GPUMEM_OK) abort();
        if (i % 2) handoff[me][i] = p;                                            /* a neighbour frees it */
        else if (i % 4 == 0 && !gm_answer_ok(gm_free(heap, p, GM_FREE_BARRIER, NULL))) abort(); /* at once */
        else if (i % 4) own[nown++] = p;                                          /* later, by this thread */
    }
    for (size_t i = 0; i < nown; i++)
        if (!gm_answer_ok(gm_free(heap, own[i], GM_FREE_BARRIER, NULL))) abort();
    pthread_barrier_wait(&gate);
    int other = (me + 1) % MANY;
    for (int i = 1; i < ROUNDS; i += 2)
        if (!gm_answer_ok(gm_free(heap, handoff[other][i], GM_FREE_BARRIER, NULL))) abort();
    return NULL;
}

Test(tcache, many_threads_with_cross_thread_frees_add_up)
{
    start((const char *const[]){"GPUMEM_LIMIT", "4GiB", NULL});
    pthread_barrier_init(&gate, NULL, MANY);
    pthread_t t[MANY];
    for (int i = 0; i < MANY; i++) cr_assert_eq(pthread_create(&t[i], NULL, churn, (void *)(intptr_t)i), 0);
    for (int i = 0; i < MANY; i++) pthread_join(t[i], NULL);
    gpumem_stats st = stats();
    cr_expect_eq(st.allocations, (uint64_t)MANY * ROUNDS);
    cr_expect_eq(st.frees, (uint64_t)MANY * ROUNDS);
    cr_expect_eq(st.bytes_allocated, 0);
    cr_expect_eq(st.bytes_requested, 0);
    cr_expect_eq(live_count(), 0);
    cr_expect_leq(st.bytes_reserved, 4ull << 30);
    gm_release_cached(heap, 0);
    cr_expect_eq(stats().bytes_reserved, 0, "every block came back: nothing lost in a cache");
}

Test(tcache, max_cached_bounds_the_caches_and_the_pool_together)
{
    start((const char *const[]){"GPUMEM_MAX_CACHED", "2MiB", NULL});
    uintptr_t p[16];
    for (int i = 0; i < 16; i++) p[i] = alloc_ok(256 * KiB); /* two small segments */
    cr_expect_eq(stats().bytes_reserved, 4 * MiB);
    /* GPUMEM_MAX_CACHED bounds the bytes of fully free segments (a segment still partly used keeps
     * its free blocks); what the thread's cache holds counts as such bytes. */
    for (int i = 0; i < 16; i++) {
        free_ok(p[i]);
        gpumem_stats st = stats();
        cr_expect_leq(heap->tcs[0]->cached_bytes, 2 * MiB);
        cr_expect_leq(st.bytes_cached_free, 2 * MiB + 7 * 256 * KiB, "after free %d", i);
    }
    gpumem_stats st = stats();
    cr_expect_eq(st.bytes_reserved, 2 * MiB, "one segment kept, the other handed back");
    cr_expect_eq(st.segments, 1);
}

/* Allocates and frees blocks of several sizes in a thread that then ends: their headers named its
 * cache while it held them and go back to the pool's spare headers as the blocks merge. */
static void *churn_cached_and_end(void *unused)
{
    (void)unused;
    uintptr_t p[16];
    for (int i = 0; i < 16; i++)
        if (gm_alloc(heap, 4 * KiB * (size_t)(i + 1), 0, 0, &p[i]) != GPUMEM_OK) p[i] = 0;
    for (int i = 0; i < 16; i++)
        if (p[i]) gm_free(heap, p[i], GM_FREE_BARRIER, NULL);
    return NULL;
}

/* A block handed out without a thread cache names none, whatever its header named before: a
 * PyTorch training step in fast mode (which then used no thread cache) crashed on such a header
 * in a checked cudaMemsetAsync on the H200 (a header's `tc` was left as its memory held it). */
Test(tcache, a_block_handed_out_without_a_cache_names_none)
{
    start(NULL);
    on_other_thread(churn_cached_and_end, NULL); /* headers that named a cache, now spare */
    size_t spare = 0;
    for (gm_block *b = heap->pool.spare_blocks; b; b = b->fnext, spare++) /* whatever they held */
        b->tc = (gm_tcache *)(uintptr_t)0xA5A5A5A5A5A5A5A5ull;
    cr_assert_gt(spare, 0, "the merges left spare headers");
    ((gm_config *)gm_mgr.cfg)->thread_cache = 0; /* this thread attaches no cache from here */
    uintptr_t p[16];
    for (int i = 0; i < 16; i++) p[i] = alloc_ok(4 * KiB * (size_t)(i + 1));
    for (int i = 0; i < 16; i++) {
        gm_span s = {.ptr = p[i] + 100, .n = 8}; /* inside: found by walking the segment */
        gm_lookup_spans(&s, 1);
        cr_expect_eq(s.status, GM_SPAN_LIVE, "block %d", i);
        cr_expect_eq(s.base, p[i]);
        pthread_mutex_lock(&heap->lock);
        bool live;
        gm_block *b = gm_lookup_block_at_locked(heap, p[i] + 100, &live);
        cr_expect_null(b->tc, "block %d names a cache", i);
        cr_expect(gm_heap_block_live_locked(heap, b), "block %d: live in the heap's table", i);
        pthread_mutex_unlock(&heap->lock);
    }
}

/* ---- fast mode (GPUMEM_FREE_SYNC=0): each cache's own fences (engine/fence.c) */

static void start_fast(const char *const *env, int fence_delay)
{
    setenv("GPUMEM_FREE_SYNC", "0", 1);
    start(env);
    gm_host_backend_set_fence_delay(fence_delay);
}

static uint64_t waits_now(void) { return gm_host_backend_sync_calls() + gm_host_backend_fence_waits(); }

static uint64_t pending_blocks(void)
{
    pthread_mutex_lock(&heap->lock);
    uint64_t n = heap->pool.pending_blocks;
    pthread_mutex_unlock(&heap->lock);
    return n;
}

Test(tcache, fast_a_freed_block_comes_back_only_after_the_caches_fence)
{
    start_fast(NULL, 1000000); /* fences complete only when waited for: a busy device */
    uintptr_t a = alloc_ok(4 * KiB);
    uint64_t waits = waits_now(), records = gm_host_backend_fence_records();
    free_ok(a);
    cr_expect_eq(waits_now(), waits, "a fast free neither synchronizes nor waits");
    cr_expect_gt(gm_tcache_peek(heap)->cached_bytes, 0, "the block waits in the thread's cache");
    cr_expect_eq(pending_blocks(), 0);
    uintptr_t b = alloc_ok(4 * KiB);
    cr_expect_neq(b, a, "not reused before a fence recorded after its free has completed");
    cr_expect_eq(gm_host_backend_fence_records(), records + 1, "the miss recorded the cache's fence");
    cr_expect_eq(waits_now(), waits, "and did not wait for it");
    gm_host_backend_set_fence_delay(0); /* the device passes it */
    cr_expect_eq(alloc_ok(4 * KiB), a, "once it has completed, the block serves the thread again");
    cr_expect_eq(gm_host_backend_fence_records(), records + 1, "that fence asked, none recorded");
    free_ok(a);
    free_ok(b);
    gpumem_stats st = stats();
    cr_expect_eq(st.allocations, 3);
    cr_expect_eq(st.frees, 3);
    cr_expect_eq(st.pool_hits, 2, "b from the segment's free rest, a from the cache");
    cr_expect_eq(st.bytes_allocated, 0);
    cr_expect_eq(st.fences, gm_host_backend_fence_records() - records, "the statistics count the cache's fences");
}

/* An idle device: a tight loop's pairs are served by the thread's cache, one fence for a batch
 * of frees (recorded once half a bin waits), and the memory stays a bin's worth. */
Test(tcache, fast_a_tight_loop_fences_once_per_batch_and_hits_the_cache)
{
    start_fast(NULL, 0);
    gm_fence_set_recent_ns(UINT64_MAX / 2); /* every miss counts as part of the tight loop */
    enum { PAIRS = 640 };
    uint64_t records = gm_host_backend_fence_records();
    for (int i = 0; i < PAIRS; i++) free_ok(alloc_ok(1 * MiB));
    records = gm_host_backend_fence_records() - records;
    gpumem_stats st = stats();
    cr_expect_leq(records, PAIRS / (GM_TC_BIN_MAX / 2) + 3, "%llu fences for %d frees",
                  (unsigned long long)records, PAIRS);
    cr_expect_geq(st.pool_hits, PAIRS - GM_TC_BIN_MAX - 2, "%llu hits", (unsigned long long)st.pool_hits);
    cr_expect_leq(st.bytes_reserved, (GM_TC_BIN_MAX + 2) * MiB, "%llu bytes reserved",
                  (unsigned long long)st.bytes_reserved);
    cr_expect_eq(waits_now(), 0, "an idle device is never waited for");
    cr_expect_eq(st.allocations, PAIRS);
    cr_expect_eq(st.frees, PAIRS);
    cr_expect_eq(st.bytes_allocated, 0);
}

/* A busy device: blocks keep being freed and allocated; none comes back before a fence (here:
 * a wait) since its free, and the memory stays within the batch and the cache's bound. */
Test(tcache, fast_never_reuses_before_the_fence_and_bounds_memory)
{
    start_fast((const char *const[]){"GPUMEM_FENCE_BATCH", "32MiB", "GPUMEM_THREAD_CACHE", "16MiB", NULL}, 1000000);
    gm_fence_set_recent_ns(UINT64_MAX / 2);
    enum { PAIRS = 600 };
    static freed_block freed[PAIRS];
    for (int i = 0; i < PAIRS; i++) {
        size_t size = (i % 3 + 1) * 256 * KiB;
        uintptr_t p = alloc_ok(size);
        expect_not_freed_since_the_last_wait(freed, i, p, size, waits_now());
        free_ok(p);
        freed[i] = (freed_block){p, size, waits_now()};
        cr_assert_leq(gm_tcache_peek(heap)->cached_bytes, 16 * MiB, "pair %d", i);
    }
    gpumem_stats st = stats();
    cr_expect_gt(waits_now(), 0, "past the batch the pool waited");
    cr_expect_leq(st.bytes_reserved, 32 * MiB + 16 * MiB + 4 * MiB, "%llu bytes reserved",
                  (unsigned long long)st.bytes_reserved);
    cr_expect_leq(gm_host_backend_fences_live(), 2, "one fence in flight for the heap, one for the cache");
    cr_expect_eq(st.allocations, PAIRS);
    cr_expect_eq(st.bytes_allocated, 0);
}

/* A flush for a miss hands back only reusable blocks; a full flush (a failed grow, the thread's
 * end) puts a waiting block on the heap's pending list, where it still waits for a fence. */
Test(tcache, fast_a_flush_keeps_a_waiting_block_from_reuse)
{
    start_fast(NULL, 1000000);
    uintptr_t a = alloc_ok(4 * KiB);
    free_ok(a);
    uint64_t held = gm_tcache_peek(heap)->cached_bytes;
    pthread_mutex_lock(&heap->lock);
    cr_expect(!gm_tcache_flush_all_locked(heap, true), "nothing reusable to hand back");
    cr_expect_eq(gm_tcache_peek(heap)->cached_bytes, held, "the waiting block stayed");
    cr_expect(gm_tcache_flush_all_locked(heap, false));
    cr_expect_eq(heap->pool.pending_blocks, 1, "it joined the heap's pending list");
    pthread_mutex_unlock(&heap->lock);
    cr_expect_eq(gm_tcache_peek(heap)->cached_bytes, 0);
    uintptr_t b = alloc_ok(4 * KiB);
    cr_expect_neq(b, a, "still not reused before a fence");
    pthread_mutex_lock(&heap->lock);
    gm_retire_pending_locked(heap, true); /* the wait a failing allocation would make */
    pthread_mutex_unlock(&heap->lock);
    cr_expect_eq(alloc_ok(4 * KiB), a, "after it the block is reused");
}

static void *alloc_4k_and_end(void *arg)
{
    if (gm_alloc(heap, 4 * KiB, 0, 0, arg) != GPUMEM_OK) *(uintptr_t *)arg = 0;
    return NULL;
}

Test(tcache, fast_another_threads_free_waits_in_the_heap)
{
    start_fast(NULL, 1000000);
    uintptr_t p = 0;
    on_other_thread(alloc_4k_and_end, &p);
    cr_assert_neq(p, 0);
    free_ok(p); /* not the allocating thread's */
    cr_expect_eq(pending_blocks(), 1, "a fence of the heap's covers it");
    gm_tcache *mine = gm_tcache_peek(heap);
    cr_expect(!mine || mine->cached_bytes == 0);
    cr_expect_neq(alloc_ok(4 * KiB), p, "not reused before a fence");
    cr_expect_eq(stats().frees, 1);
}

/* The blocks of a thread that ends wait in the heap; its cache's fence goes with it. */
static void *fast_pairs_and_end(void *unused)
{
    (void)unused;
    for (int i = 0; i < 40; i++) {
        uintptr_t p = 0;
        if (gm_alloc(heap, 64 * KiB, 0, 0, &p) != GPUMEM_OK || !gm_answer_ok(gm_free(heap, p, GM_FREE_BARRIER, NULL)))
            abort();
    }
    return NULL;
}

Test(tcache, fast_an_ended_threads_waiting_blocks_go_to_the_heap)
{
    start_fast(NULL, 1000000);
    on_other_thread(fast_pairs_and_end, NULL);
    cr_expect_eq(heap->tcs[0]->cached_bytes, 0);
    cr_expect_null(heap->tcs[0]->fence, "its fence destroyed");
    cr_expect_gt(pending_blocks(), 0, "its waiting blocks wait in the heap");
    gpumem_stats st = stats();
    cr_expect_eq(st.allocations, 40);
    cr_expect_eq(st.frees, 40);
    pthread_mutex_lock(&heap->lock);
    gm_retire_pending_locked(heap, true);
    cr_expect_eq(heap->pool.pending_blocks, 0);
    pthread_mutex_unlock(&heap->lock);
    cr_expect_leq(gm_host_backend_fences_live(), 1, "only the heap's may be in flight");
}

/* An event recorded on a capturing stream would join the program's graph: while a capture is in
 * progress the cache records no fence, and a block waiting for one is not reused. */
Test(tcache, fast_no_fence_during_a_capture)
{
    start_fast(NULL, 0);
    uintptr_t a = alloc_ok(4 * KiB);
    free_ok(a);
    gm_capture_note(true);
    uint64_t records = gm_host_backend_fence_records(), waits = waits_now();
    uintptr_t b = alloc_ok(4 * KiB);
    cr_expect_neq(b, a, "the waiting block is not reused");
    for (int i = 0; i < GM_TC_BIN_MAX; i++) free_ok(alloc_ok(8 * KiB)); /* past the early fence */
    cr_expect_eq(gm_host_backend_fence_records(), records, "no fence while capturing");
    cr_expect_eq(waits_now(), waits, "no wait while capturing");
    gm_capture_note(false);
    cr_expect_eq(alloc_ok(4 * KiB), a, "after the capture the miss fences and takes it");
    cr_expect_gt(gm_host_backend_fence_records(), records);
    free_ok(a);
    free_ok(b);
}

/* The cache keeps the blocks several of which fit in its bytes, and those the heap would fence
 * at every free anyway; a block between waits in the heap, whose batch covers 16 such frees with
 * one fence (a cache that fences every few frees costs a fence per pair). */
Test(tcache, fast_a_block_too_large_to_batch_in_the_cache_goes_to_the_heap)
{
    start_fast((const char *const[]){"GPUMEM_FENCE_BATCH", "128MiB", "GPUMEM_THREAD_CACHE", "16MiB", NULL}, 1000000);
    free_ok(alloc_ok(4 * KiB)); /* the heap learns its batch */
    gm_tcache *tc = gm_tcache_peek(heap);
    cr_expect_eq(tc->fast_keep_max, 4 * MiB, "a quarter of the cache's bytes");
    cr_assert_geq(tc->fast_keep_above, tc->fast_keep_max, "the heap's share of its batch");
    size_t between = tc->fast_keep_above > tc->fast_keep_max ? tc->fast_keep_max + 1 * MiB : 0;
    if (between && between <= tc->fast_keep_above) {
        uintptr_t p = alloc_ok(between);
        uint64_t held = tc->cached_bytes;
        free_ok(p);
        cr_expect_eq(tc->cached_bytes, held, "not kept by the thread");
        cr_expect_eq(pending_blocks(), 1, "it waits in the heap");
    }
    uintptr_t small = alloc_ok(4 * MiB);
    uint64_t held = tc->cached_bytes;
    free_ok(small);
    cr_expect_eq(tc->cached_bytes, held + 4 * MiB, "a block of the cache's share is kept");
}

/* A context going away takes the blocks waiting in a cache and destroys the cache's fence. */
Test(tcache, fast_a_context_going_away_takes_the_waiting_blocks)
{
    start_fast(NULL, 1000000);
    uintptr_t a = alloc_ok(4 * KiB);
    free_ok(a);
    uintptr_t b = alloc_ok(4 * KiB); /* records the cache's fence, which does not complete */
    free_ok(b);
    cr_expect_not_null(gm_tcache_peek(heap)->fence);
    gm_context_teardown(1, true);
    cr_expect_null(heap->tcs[0]->fence);
    cr_expect_eq(heap->tcs[0]->cached_bytes, 0);
    cr_expect_eq(gm_host_backend_fences_live(), 0, "no event left behind");
    cr_expect_eq(stats().bytes_reserved, 0);
}

/* At the limit the blocks waiting in the cache are handed to the heap, which waits for a fence
 * rather than fail: one wait then covers all of them (fewer waits than the heap alone). */
Test(tcache, fast_at_the_limit_the_waiting_blocks_are_waited_for_not_refused)
{
    start_fast((const char *const[]){"GPUMEM_LIMIT", "16MiB", NULL}, 1000000);
    gm_fence_set_recent_ns(UINT64_MAX / 2);
    uintptr_t big = alloc_ok(12 * MiB);
    uint64_t waits = waits_now();
    for (int i = 0; i < 100; i++) free_ok(alloc_ok(1 * MiB));
    gpumem_stats st = stats();
    cr_expect_leq(st.bytes_reserved, 16 * MiB);
    cr_expect_eq(st.limit_rejections, 0, "no allocation failed");
    cr_expect_geq(waits_now() - waits, 4, "the flushed blocks were waited for");
    cr_expect_eq(st.allocations, 101);
    cr_expect_eq(st.frees, 100);
    free_ok(big);
}
