/* Unit tests of the pinned host memory pool (manager/engine/pinned.c) on the host backend: size classes,
 * gm_host_is_pinned for pool blocks, pass-through and registered memory (and threads reading it
 * while the table changes), fast-mode fences, strict-mode barriers, context teardown and fork.
 * Criterion runs each test in its own process, so every test starts with a fresh manager. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "gm_pinned.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)

static void start(const char *const *env)
{
    setenv("GPUMEM_REPORT", "off", 1);
    for (; env && env[0]; env += 2) setenv(env[0], env[1], 1);
    gm_config_reset_for_tests();
    cr_assert(gm_manager_init(gm_host_backend()));
}

static void *alloc_ok(size_t size, unsigned flags)
{
    void *p = NULL;
    int rc = gm_pinned_alloc(1, 0, size, flags, NULL, true, &p);
    cr_assert_eq(rc, GPUMEM_OK, "alloc(%zu) failed with %d", size, rc);
    cr_assert_not_null(p);
    return p;
}

static void free_ok(void *p)
{
    cr_assert(gm_answer_ok(gm_pinned_free(p, true, 0)));
}

static gm_pinned_stats stats(void)
{
    gm_pinned_stats s;
    gm_pinned_stats_get(&s);
    return s;
}

Test(pinned_pool, size_classes_waste_less_than_a_quarter)
{
    cr_expect_eq(gm_pinned_class_size(1), 4096);
    cr_expect_eq(gm_pinned_class_size(4096), 4096);
    cr_expect_eq(gm_pinned_class_size(4097), 8192);
    cr_expect_eq(gm_pinned_class_size(10000), 12288);
    cr_expect_eq(gm_pinned_class_size(MiB), MiB);
    cr_expect_eq(gm_pinned_class_size(MiB + 1), MiB + MiB / 4);
    cr_expect_eq(gm_pinned_class_size(64 * MiB - 1), 64 * MiB);
    cr_expect_eq(gm_pinned_class_size(SIZE_MAX), 0, "too large: refused, not wrapped");
    for (size_t size = 4097; size < 256 * MiB; size = size * 5 / 3 + 7) {
        size_t cls = gm_pinned_class_size(size);
        cr_assert(cls >= size && cls % 4096 == 0, "class %zu for %zu", cls, size);
        cr_assert(cls - size < cls / 4 + 4096, "class %zu wastes too much for %zu", cls, size);
    }
}

Test(pinned_pool, pool_blocks_are_pinned_malloc_memory_is_not)
{
    start(NULL);
    unsigned char *p = alloc_ok(10000, 0);
    cr_expect(gm_host_is_pinned(p, 10000));
    cr_expect(gm_host_is_pinned(p + 9999, 1));
    cr_expect(gm_host_is_pinned(p, 12288), "the whole class-size block is pinned memory");
    cr_expect_not(gm_host_is_pinned(p, 12289), "one byte past the block");
    cr_expect(gm_host_is_pinned(p + 100, 0), "an empty range: is the pointer pinned");
    void *heap = malloc(4096);
    cr_expect_not(gm_host_is_pinned(heap, 1));
    cr_expect_not(gm_host_is_pinned(heap, 4096));
    cr_expect_not(gm_host_is_pinned(NULL, 16));
    cr_expect_not(gm_host_is_pinned((void *)UINTPTR_MAX, 2), "a wrapping range");
    free(heap);
    free_ok(p);
    cr_expect(gm_host_is_pinned(p, 10000), "a cached block is still pinned memory");
    gm_pinned_release_cached();
    cr_expect_not(gm_host_is_pinned(p, 1), "released to the driver: no longer pinned");
}

Test(pinned_pool, pass_through_memory_is_pinned_and_tracked)
{
    const char *env[] = {"GPUMEM_PINNED_POOL", "0", NULL};
    start(env);
    unsigned char *p = alloc_ok(10000, GM_HOSTALLOC_DEVICEMAP);
    cr_expect(gm_host_is_pinned(p, 10000));
    cr_expect_not(gm_host_is_pinned(p, 10001), "the driver allocation is the request, not a class");
    gm_pinned_stats s = stats();
    cr_expect_eq(s.blocks_live, 1);
    cr_expect_eq(s.bytes_live, 10000);
    cr_expect_eq(s.driver_allocs, 1);
    cr_expect(gm_answer_is(gm_pinned_free(p + 8, true, 0), gm_not_ours()), "an interior pointer: the driver's answer");
    free_ok(p);
    cr_expect_not(gm_host_is_pinned(p, 1));
    cr_expect(gm_answer_is(gm_pinned_free(p, true, 0), gm_not_ours()), "a double free: the driver's answer");
    s = stats();
    cr_expect_eq(s.driver_frees, 1);
    cr_expect_eq(s.bytes_held, 0);
}

Test(pinned_pool, registered_ranges_are_pinned_until_unregistered)
{
    start(NULL);
    unsigned char *mem = malloc(3 * 64 * KiB);
    gm_pinned_registered(1, 0, mem, 64 * KiB);
    gm_pinned_registered(1, 0, mem + 64 * KiB, 64 * KiB);
    cr_expect(gm_host_is_pinned(mem, 64 * KiB));
    cr_expect(gm_host_is_pinned(mem + 60 * KiB, 8 * KiB), "across two adjacent registered ranges");
    cr_expect(gm_host_is_pinned(mem, 128 * KiB));
    cr_expect_not(gm_host_is_pinned(mem, 128 * KiB + 1));
    cr_expect_not(gm_host_is_pinned(mem + 128 * KiB, 1));
    cr_expect_eq(stats().registered_ranges, 2);
    cr_expect(gm_answer_is(gm_pinned_free(mem + 64, true, 0), gm_not_ours()), "freeing registered memory: the driver's answer");
    gm_pinned_unregistered(mem);
    cr_expect_not(gm_host_is_pinned(mem, 1));
    cr_expect(gm_host_is_pinned(mem + 64 * KiB, 64 * KiB));
    cr_expect_not(gm_host_is_pinned(mem + 60 * KiB, 8 * KiB), "a gap now");
    gm_pinned_unregistered(mem + 64 * KiB);
    cr_expect_not(gm_host_is_pinned(mem + 64 * KiB, 1));
    gm_pinned_stats s = stats();
    cr_expect_eq(s.registered_ranges, 0);
    cr_expect_eq(s.registered_bytes, 0);
    free(mem);
}

Test(pinned_pool, double_and_interior_frees_are_refused_and_counted)
{
    start(NULL);
    uint64_t before = gm_stats_invalid_frees();
    unsigned char *p = alloc_ok(8192, 0);
    cr_expect(gm_answer_is(gm_pinned_free(p + 4096, true, 0), gm_ours(GPUMEM_ERROR_INVALID_VALUE)));
    free_ok(p);
    cr_expect(gm_answer_is(gm_pinned_free(p, true, 0), gm_ours(GPUMEM_ERROR_INVALID_VALUE)));
    cr_expect(gm_answer_is(gm_pinned_free(p + 1, true, 0), gm_ours(GPUMEM_ERROR_INVALID_VALUE)), "inside a cached block");
    cr_expect_eq(stats().invalid_frees, 3);
    cr_expect_eq(gm_stats_invalid_frees() - before, 3);
    void *heap = malloc(64);
    cr_expect(gm_answer_is(gm_pinned_free(heap, true, 0), gm_not_ours()));
    free(heap);
}

Test(pinned_pool, strict_mode_synchronizes_before_caching)
{
    start(NULL);
    void *p = alloc_ok(4096, 0);
    uint64_t syncs = gm_host_backend_sync_calls();
    free_ok(p);
    cr_expect_geq(gm_host_backend_sync_calls(), syncs + 1, "cudaFreeHost's barrier is kept");
}

Test(pinned_pool, fast_mode_prefers_completed_fences_and_waits_rather_than_allocating)
{
    const char *env[] = {"GPUMEM_FREE_SYNC", "0", NULL};
    start(env);
    void *p = alloc_ok(4096, 0), *q = alloc_ok(4096, 0);
    uint64_t syncs = gm_host_backend_sync_calls();
    gm_host_backend_set_fence_delay(0);
    free_ok(q); /* its fence completes at once */
    gm_host_backend_set_fence_delay(1000000);
    free_ok(p); /* its fence stays pending */
    cr_expect_eq(gm_host_backend_sync_calls(), syncs, "fast mode: no synchronization on free");
    void *a = alloc_ok(4096, 0);
    cr_expect_eq(a, q, "the block whose fence completed, although p was freed later");
    void *b = alloc_ok(4096, 0);
    cr_expect_eq(b, p, "a pending fence is waited for, not replaced by a driver allocation");
    gm_pinned_stats s = stats();
    cr_expect_eq(s.pool_hits, 2);
    cr_expect_eq(s.driver_allocs, 2);
    free_ok(a);
    free_ok(b);
}

Test(pinned_pool, a_block_freed_during_capture_is_synchronized_before_reuse)
{
    start(NULL);
    void *p = alloc_ok(4096, 0);
    uint64_t syncs = gm_host_backend_sync_calls();
    cr_assert(gm_answer_ok(gm_pinned_free(p, false, 0)));
    cr_expect_eq(gm_host_backend_sync_calls(), syncs, "no synchronization while a stream captures");
    void *q = NULL;
    cr_assert_eq(gm_pinned_alloc(1, 0, 4096, 0, NULL, false, &q), GPUMEM_OK);
    cr_expect_neq(q, p, "still capturing: the unsynchronized block is skipped");
    void *r = alloc_ok(4096, 0);
    cr_expect_eq(r, p);
    cr_expect_geq(gm_host_backend_sync_calls(), syncs + 1, "synchronized when handed out");
    free_ok(q);
    free_ok(r);
}

typedef struct {
    int device;
    uint64_t bytes, count;
} leak_sum;

static void sum_leaks(void *cx, int device, const gm_record *rec)
{
    leak_sum *s = cx;
    s->device = device;
    s->bytes += rec->requested;
    s->count++;
}

/* Leaks of destroyed contexts are kept by track/orphans.c, for pinned and device memory alike. */
static void sum_pinned_orphans(void *cx, const gm_leak_group *g)
{
    leak_sum *s = cx;
    if (g->memory != GM_MEMORY_PINNED_HOST) return;
    s->device = g->device;
    s->bytes += g->bytes;
    s->count += g->count;
}

Test(pinned_pool, destroyed_context_forgets_blocks_and_keeps_leaks)
{
    start(NULL);
    void *cached = NULL, *leaked = NULL, *other = NULL;
    cr_assert_eq(gm_pinned_alloc(7, 3, 4096, 0, NULL, true, &cached), GPUMEM_OK);
    cr_assert_eq(gm_pinned_alloc(7, 3, 5000, 0, NULL, true, &leaked), GPUMEM_OK);
    cr_assert_eq(gm_pinned_alloc(1, 0, 700, 0, NULL, true, &other), GPUMEM_OK);
    free_ok(cached);
    unsigned char *mem = malloc(8192);
    gm_pinned_registered(7, 3, mem, 8192);
    gm_pinned_drop_ctx(7);
    cr_expect_not(gm_host_is_pinned(cached, 1));
    cr_expect_not(gm_host_is_pinned(leaked, 1));
    cr_expect_not(gm_host_is_pinned(mem, 1));
    cr_expect(gm_host_is_pinned(other, 700), "other contexts keep theirs");
    gm_pinned_stats s = stats();
    cr_expect_eq(s.blocks_cached, 0);
    cr_expect_eq(s.orphaned, 1);
    cr_expect_eq(s.registered_ranges, 0);
    cr_expect_eq(s.bytes_held, 4096, "only the other context's block");
    leak_sum sum = {0};
    gm_pinned_for_each_live(sum_leaks, &sum);
    gm_orphans_for_each(sum_pinned_orphans, &sum);
    cr_expect_eq(sum.count, 2, "the program still holds both: leaks at exit");
    cr_expect_eq(sum.bytes, 5700);
    cr_expect(gm_answer_is(gm_pinned_free(leaked, true, 0), gm_not_ours()), "the driver freed it with its context");
    void *again = NULL;
    cr_assert_eq(gm_pinned_alloc(7, 3, 4096, 0, NULL, true, &again), GPUMEM_OK);
    cr_expect_eq(stats().pool_hits, 0, "nothing of the dead context is reused");
    free(mem);
}

Test(pinned_pool, max_cached_is_exact)
{
    const char *env[] = {"GPUMEM_PINNED_MAX_CACHED", "100KiB", NULL};
    start(env);
    void *p[4];
    for (int i = 0; i < 4; i++) p[i] = alloc_ok(32 * KiB, 0);
    for (int i = 0; i < 4; i++) free_ok(p[i]);
    gm_pinned_stats s = stats();
    cr_expect_eq(s.bytes_cached, 96 * KiB, "three 32 KiB blocks fit under 100 KiB");
    cr_expect_eq(s.released, 1);
    cr_expect_not(gm_host_is_pinned(p[0], 1), "the oldest went back");
    cr_expect(gm_host_is_pinned(p[3], 1));
    cr_expect_eq(gm_pinned_release_cached(), 96 * KiB);
    cr_expect_eq(stats().bytes_held, 0);
}

/* Readers never see a pinned block as unpinned (nor malloc memory as pinned) while another
 * thread inserts and removes ranges as fast as it can. */
static _Atomic bool stop_writer;
static _Atomic long writer_rounds;

static void *writer(void *arg)
{
    (void)arg;
    while (!stop_writer) {
        void *p[8];
        for (int i = 0; i < 8; i++) gm_pinned_alloc(1, 0, 4096 * (size_t)(i + 1), 0, NULL, true, &p[i]);
        for (int i = 0; i < 8; i++) gm_pinned_free(p[i], true, 0);
        writer_rounds++;
    }
    return NULL;
}

typedef struct {
    unsigned char *pinned, *plain;
    long wrong;
} reader_job;

static void *reader(void *arg)
{
    reader_job *job = arg;
    for (int i = 0; i < 200000 || writer_rounds < 200; i++) { /* overlap the writer for a while */
        job->wrong += !gm_host_is_pinned(job->pinned + (i % 4096), 64);
        job->wrong += gm_host_is_pinned(job->plain + (i % 4096), 64);
    }
    return NULL;
}

Test(pinned_pool, readers_stay_right_while_the_table_changes)
{
    const char *env[] = {"GPUMEM_PINNED_MAX_CACHED", "0", NULL}; /* every free changes the table */
    start(env);
    reader_job jobs[2];
    unsigned char *stable = alloc_ok(8192, 0);
    unsigned char *plain = malloc(8192);
    pthread_t w, r[2];
    pthread_create(&w, NULL, writer, NULL);
    for (int i = 0; i < 2; i++) {
        jobs[i] = (reader_job){stable, plain, 0};
        pthread_create(&r[i], NULL, reader, &jobs[i]);
    }
    for (int i = 0; i < 2; i++) pthread_join(r[i], NULL);
    stop_writer = true;
    pthread_join(w, NULL);
    cr_expect_eq(jobs[0].wrong + jobs[1].wrong, 0);
    cr_expect_geq(stats().driver_allocs, 200 * 8, "the writer did change the table");
    free(plain);
    free_ok(stable);
}

Test(pinned_pool, fork_child_forgets_the_pool)
{
    start(NULL);
    void *live = alloc_ok(3000, 0), *cached = alloc_ok(4096, 0);
    free_ok(cached);
    pid_t pid = fork();
    if (pid == 0) {
        gm_pinned_stats s = stats();
        leak_sum sum = {0};
        gm_pinned_for_each_live(sum_leaks, &sum);
        bool ok = s.blocks_live == 0 && s.blocks_cached == 0 && sum.count == 0 &&
                  !gm_host_is_pinned(live, 1) && gm_answer_is(gm_pinned_free(live, true, 0), gm_not_ours());
        void *mine = NULL;
        ok = ok && gm_pinned_alloc(1, 0, 4096, 0, NULL, true, &mine) == GPUMEM_OK && mine != cached;
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %#x", status);
    cr_expect(gm_host_is_pinned(live, 3000), "the parent keeps its pool");
    free_ok(live);
}
