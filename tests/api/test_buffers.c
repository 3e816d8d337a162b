/* Named, resizable buffers (gpumem_buffer_*) in library mode under the shim: the program links
 * libgpumem, the shim is preloaded, so both share one manager and one pool (a buffer and a
 * cuMemAlloc block sit side by side in one segment, which is how the tests force each growth
 * path). The fake driver's device memory is host memory; the tests read it through cuMemcpyDtoH.
 *
 * Covered: data kept across in-place growth, copy growth (legacy stream and a stream of the
 * program's, strict and fast free modes) and GPUMEM_POOL=0; resize down keeps the prefix; the
 * growth-factor sequence; shrink_to_fit and shrink on resize; max_size; GPUMEM_LIMIT and an
 * injected device failure leave the buffer intact; cleanup of idle and under-used buffers; tags
 * and the leak report name the buffer; destroy frees everything; misuse. */
#include <math.h>
#include <pthread.h>

#include "api_test.h"
#include "fakecuda.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)

/* ---------------------------------------------------------------- helpers */

static gpumem_buffer_config config(size_t initial, double factor, size_t max, gpumem_shrink_policy shrink)
{
    gpumem_buffer_config cfg;
    gpumem_buffer_config_init(&cfg);
    cfg.initial_capacity = initial;
    cfg.growth_factor = factor;
    cfg.max_size = max;
    cfg.shrink = shrink;
    return cfg;
}

static gpumem_buffer *make_on(const char *name, gpumem_buffer_config cfg, CUstream stream)
{
    gpumem_buffer *b = NULL;
    gpumem_status rc = gpumem_buffer_create(&b, name, &cfg, stream);
    cr_assert_eq(rc, GPUMEM_OK, "create %s: %s", name, gpumem_buffer_last_error());
    cr_assert_not_null(b);
    return b;
}

static gpumem_buffer *make(const char *name, size_t initial, double factor, size_t max,
                           gpumem_shrink_policy shrink)
{
    return make_on(name, config(initial, factor, max, shrink), NULL);
}

static gpumem_buffer_info info_of(gpumem_buffer *b)
{
    gpumem_buffer_info in;
    cr_assert_eq(gpumem_buffer_get_info(b, &in), GPUMEM_OK);
    return in;
}

static CUdeviceptr dptr_of(gpumem_buffer *b)
{
    void *p = NULL;
    cr_assert_eq(gpumem_buffer_ptr(b, &p), GPUMEM_OK);
    return (CUdeviceptr)(uintptr_t)p;
}

/* resize to `n` and write the pattern of `seed` into all of it. */
static void fill(gpumem_buffer *b, size_t n, uint32_t seed)
{
    cr_assert_eq(gpumem_buffer_resize(b, n), GPUMEM_OK, "%s", gpumem_buffer_last_error());
    unsigned char *host = malloc(n);
    api_fill_pattern(host, n, seed);
    OK(cuMemcpyHtoD(dptr_of(b), host, n));
    free(host);
}

/* The first n bytes hold the pattern of `seed`. */
static void expect_data(gpumem_buffer *b, size_t n, uint32_t seed)
{
    unsigned char *host = malloc(n);
    OK(cuCtxSynchronize());
    OK(cuMemcpyDtoH(host, dptr_of(b), n));
    size_t bad = api_check_pattern(host, n, seed);
    cr_assert_eq(bad, n, "buffer \"%s\": byte %zu of %zu differs after the resize", info_of(b).name, bad, n);
    free(host);
}

/* Every reserved byte is either handed out or cached free: the pool's counters stayed coherent. */
static gpumem_stats expect_coherent(void)
{
    gpumem_stats st;
    cr_assert_eq(gpumem_get_stats(0, &st), GPUMEM_OK);
    cr_assert_eq(st.bytes_reserved, st.bytes_allocated + st.bytes_cached_free,
                 "reserved %llu != allocated %llu + cached free %llu",
                 (unsigned long long)st.bytes_reserved, (unsigned long long)st.bytes_allocated,
                 (unsigned long long)st.bytes_cached_free);
    return st;
}

static uint64_t tag_live(const char *name)
{
    gpumem_tag_usage u;
    cr_assert_eq(gpumem_tag_get_usage(name, &u), GPUMEM_OK, "usage of tag %s", name);
    return u.live_bytes;
}

/* ---------------------------------------------------------------- growth keeps the data */

Test(buffers, in_place_growth_keeps_data_and_pointer)
{
    api_start();
    gpumem_buffer *b = make("grid", 64 * KiB, 2.0, 0, GPUMEM_SHRINK_NEVER);
    fill(b, 64 * KiB, 1);
    CUdeviceptr before = dptr_of(b);
    gpumem_stats st0 = expect_coherent();

    cr_assert_eq(gpumem_buffer_resize(b, 100 * KiB), GPUMEM_OK);
    gpumem_buffer_info in = info_of(b);
    cr_assert_eq(in.capacity, 128 * KiB, "64 KiB times 2");
    cr_assert_eq(in.used, 100 * KiB);
    cr_assert_eq(in.grows, 1);
    cr_assert_eq(in.grows_in_place, 1, "the rest of the segment is free: growth is in place");
    cr_assert_eq(in.copies, 0);
    cr_assert_eq(in.bytes_copied, 0);
    cr_assert_eq(dptr_of(b), before, "in-place growth keeps the pointer");
    expect_data(b, 64 * KiB, 1);

    gpumem_stats st = expect_coherent();
    cr_assert_eq(st.allocations, st0.allocations, "growing in place is not an allocation");
    cr_assert_eq(st.bytes_allocated, 128 * KiB);
    cr_assert_eq(st.bytes_requested, 128 * KiB);
    cr_assert_eq(tag_live("grid"), 128 * KiB);
    /* The grown block is live to the copy checks: writing all of it is accepted. */
    fill(b, 128 * KiB, 2);
    expect_data(b, 128 * KiB, 2);
    cr_assert_eq(gpumem_buffer_destroy(b), GPUMEM_OK);
    st = expect_coherent();
    cr_assert_eq(st.bytes_allocated, 0);
}

/* A block of the program's right after the buffer leaves no room: the buffer moves. */
Test(buffers, copy_growth_keeps_data)
{
    api_start();
    gpumem_buffer *b = make("particles", 64 * KiB, 2.0, 0, GPUMEM_SHRINK_NEVER);
    CUdeviceptr blocker;
    OK(cuMemAlloc(&blocker, 4096));
    CUdeviceptr before = dptr_of(b);
    cr_assert_eq(blocker, before + 64 * KiB, "one pool: the blocker follows the buffer");
    fill(b, 60 * KiB, 3);

    cr_assert_eq(gpumem_buffer_resize(b, 100 * KiB), GPUMEM_OK, "%s", gpumem_buffer_last_error());
    gpumem_buffer_info in = info_of(b);
    cr_assert_eq(in.capacity, 128 * KiB);
    cr_assert_eq(in.grows, 1);
    cr_assert_eq(in.grows_in_place, 0);
    cr_assert_eq(in.copies, 1);
    cr_assert_eq(in.bytes_copied, 60 * KiB, "only the used bytes are copied");
    cr_assert_neq(dptr_of(b), before);
    expect_data(b, 60 * KiB, 3);

    gpumem_stats st = expect_coherent();
    cr_assert_eq(st.bytes_allocated, 128 * KiB + 4096, "the old block went back to the pool");
    cr_assert_eq(tag_live("particles"), 128 * KiB);
    OK(cuMemFree(blocker));
    cr_assert_eq(gpumem_buffer_destroy(b), GPUMEM_OK);
}

/* Fast free mode, a non-blocking stream of the program's, and a "kernel" still writing the buffer
 * when the resize is called: the copy runs after it on the buffer's stream. */
static void copy_growth_on_stream(const char *free_sync)
{
    setenv("GPUMEM_FREE_SYNC", free_sync, 1);
    api_start();
    CUstream s;
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    gpumem_buffer *b = make_on("stream-buffer", config(256 * KiB, 2.0, 0, GPUMEM_SHRINK_NEVER), s);
    CUdeviceptr blocker;
    OK(cuMemAlloc(&blocker, 4096));
    cr_assert_eq(gpumem_buffer_resize(b, 200 * KiB), GPUMEM_OK);
    OK(fakecuda_launch_fill(s, dptr_of(b), 0xAB, 200 * KiB, 20000));
    cr_assert_eq(gpumem_buffer_resize(b, 300 * KiB), GPUMEM_OK, "%s", gpumem_buffer_last_error());
    cr_assert_eq(info_of(b).copies, 1);
    OK(cuStreamSynchronize(s));
    unsigned char *host = malloc(200 * KiB);
    OK(cuMemcpyDtoH(host, dptr_of(b), 200 * KiB));
    cr_assert(api_all_bytes(host, 0xAB, 200 * KiB), "the copy ran before the fill had finished");
    free(host);
    cr_assert_eq(gpumem_buffer_destroy(b), GPUMEM_OK);
    OK(cuMemFree(blocker));
    OK(cuStreamDestroy(s));
}

Test(buffers, copy_growth_is_ordered_on_the_buffers_stream_strict) { copy_growth_on_stream("1"); }
Test(buffers, copy_growth_is_ordered_on_the_buffers_stream_fast) { copy_growth_on_stream("0"); }

/* GPUMEM_POOL=0: every block is a driver allocation of its own; growth and shrink move the data. */
Test(buffers, without_the_pool_growth_and_shrink_copy)
{
    setenv("GPUMEM_POOL", "0", 1);
    api_start();
    gpumem_buffer *b = make("direct", 64 * KiB, 2.0, 0, GPUMEM_SHRINK_NEVER);
    fill(b, 50 * KiB, 4);
    cr_assert_eq(gpumem_buffer_resize(b, 70 * KiB), GPUMEM_OK);
    gpumem_buffer_info in = info_of(b);
    cr_assert_eq(in.capacity, 128 * KiB);
    cr_assert_eq(in.copies, 1);
    expect_data(b, 50 * KiB, 4);
    cr_assert_eq(gpumem_buffer_resize(b, 10 * KiB), GPUMEM_OK);
    cr_assert_eq(gpumem_buffer_shrink_to_fit(b), GPUMEM_OK, "%s", gpumem_buffer_last_error());
    in = info_of(b);
    cr_assert_eq(in.capacity, 10 * KiB);
    cr_assert_eq(in.copies, 2);
    cr_assert_eq(in.shrinks, 1);
    expect_data(b, 10 * KiB, 4);
    fakecuda_counters_t k;
    fakecuda_counters(&k);
    cr_assert_eq(k.bytes_in_use, 10 * KiB, "the driver holds exactly the buffer");
    cr_assert_eq(gpumem_buffer_destroy(b), GPUMEM_OK);
    fakecuda_counters(&k);
    cr_assert_eq(k.bytes_in_use, 0);
}

/* Random resizes, with and without a neighbour, with shrinking on resize: after each the kept
 * prefix is intact, checked against a host copy. Exercises in place, copy and in-place shrink. */
Test(buffers, random_resizes_keep_the_prefix)
{
    api_start();
    gpumem_buffer_config cfg = config(0, 1.5, 0, GPUMEM_SHRINK_ON_RESIZE);
    cfg.shrink_below = 0.3;
    gpumem_buffer *b = make_on("random", cfg, NULL);
    enum { STEPS = 300, MAXN = 3 * 1024 * 1024 };
    unsigned char *ref = calloc(1, MAXN), *got = malloc(MAXN);
    CUdeviceptr blockers[STEPS];
    int nblockers = 0;
    size_t used = 0;
    uint32_t rnd = 12345;
    for (int i = 0; i < STEPS; i++) {
        rnd = rnd * 1103515245u + 12345u;
        size_t n = (rnd >> 8) % MAXN;
        if (i % 7 == 3) n = 0;
        cr_assert_eq(gpumem_buffer_resize(b, n), GPUMEM_OK, "step %d: %s", i, gpumem_buffer_last_error());
        if (n > used) { /* new bytes: give them content of their own */
            api_fill_pattern(ref + used, n - used, (uint32_t)i);
            OK(cuMemcpyHtoD(dptr_of(b) + used, ref + used, n - used));
        }
        used = n;
        if (used) {
            OK(cuMemcpyDtoH(got, dptr_of(b), used));
            cr_assert_eq(memcmp(got, ref, used), 0, "step %d: the first %zu bytes changed", i, used);
        }
        if (i % 5 == 0 && nblockers < STEPS) OK(cuMemAlloc(&blockers[nblockers++], 512 + (rnd % 8192)));
        if (i % 11 == 0 && nblockers) OK(cuMemFree(blockers[--nblockers]));
        expect_coherent();
    }
    gpumem_buffer_info in = info_of(b);
    cr_assert_gt(in.grows_in_place, 0, "no in-place growth in %d steps", STEPS);
    cr_assert_gt(in.copies, 0, "no copy growth in %d steps", STEPS);
    cr_assert_gt(in.shrinks, 0, "no shrink in %d steps", STEPS);
    while (nblockers) OK(cuMemFree(blockers[--nblockers]));
    cr_assert_eq(gpumem_buffer_destroy(b), GPUMEM_OK);
    cr_assert_eq(expect_coherent().bytes_allocated, 0);
    free(ref);
    free(got);
}

/* ---------------------------------------------------------------- sizes */

Test(buffers, resize_down_keeps_the_prefix)
{
    api_start();
    gpumem_buffer *b = make("prefix", 0, 2.0, 0, GPUMEM_SHRINK_NEVER);
    fill(b, 100 * KiB, 5);
    size_t cap = info_of(b).capacity;
    CUdeviceptr p = dptr_of(b);
    cr_assert_eq(gpumem_buffer_resize(b, 10000), GPUMEM_OK);
    cr_assert_eq(info_of(b).used, 10000);
    cr_assert_eq(info_of(b).capacity, cap, "GPUMEM_SHRINK_NEVER keeps the capacity");
    expect_data(b, 10000, 5);
    cr_assert_eq(gpumem_buffer_resize(b, 100 * KiB), GPUMEM_OK);
    cr_assert_eq(dptr_of(b), p, "growing within the capacity moves nothing");
    expect_data(b, 10000, 5);
    cr_assert_eq(info_of(b).grows, 1);
    gpumem_buffer_destroy(b);
}

Test(buffers, growth_factor_sequence_is_exact)
{
    api_start();
    gpumem_buffer *b = make("sequence", 4096, 1.5, 0, GPUMEM_SHRINK_NEVER);
    /* 4096 * 1.5^k, each rounded up to the pool's 512 B */
    static const size_t want[] = {4096, 6144, 9216, 13824, 20992, 31744, 47616, 71680, 107520};
    for (size_t i = 1; i < sizeof want / sizeof *want; i++) {
        cr_assert_eq(gpumem_buffer_resize(b, want[i - 1] + 1), GPUMEM_OK);
        cr_assert_eq(info_of(b).capacity, want[i], "grow %zu: capacity %zu, expected %zu", i,
                     info_of(b).capacity, want[i]);
    }
    cr_assert_eq(info_of(b).grows, sizeof want / sizeof *want - 1);
    /* A request over the factor's step gets exactly what it asks for (rounded). */
    cr_assert_eq(gpumem_buffer_reserve(b, 1000000), GPUMEM_OK);
    cr_assert_eq(info_of(b).capacity, 1000448);
    cr_assert_eq(info_of(b).used, want[7] + 1, "reserve keeps the used size");
    gpumem_buffer_destroy(b);

    /* max_size caps the sequence: 1, 2, 4, then 5 MiB, and no further. */
    b = make("capped", MiB, 2.0, 5 * MiB, GPUMEM_SHRINK_NEVER);
    static const size_t capped[] = {MiB, 2 * MiB, 4 * MiB, 5 * MiB};
    for (size_t i = 1; i < 4; i++) {
        cr_assert_eq(gpumem_buffer_resize(b, capped[i - 1] + 1), GPUMEM_OK);
        cr_assert_eq(info_of(b).capacity, capped[i]);
    }
    cr_assert_eq(gpumem_buffer_resize(b, 5 * MiB), GPUMEM_OK);
    cr_assert_eq(gpumem_buffer_resize(b, 5 * MiB + 1), GPUMEM_ERROR_INVALID_VALUE);
    gpumem_buffer_destroy(b);
}

Test(buffers, shrink_to_fit_hands_the_tail_back)
{
    api_start();
    gpumem_buffer *b = make("shrinking", MiB, 2.0, 0, GPUMEM_SHRINK_NEVER);
    fill(b, 10000, 6);
    CUdeviceptr p = dptr_of(b);
    gpumem_stats st0 = expect_coherent();
    cr_assert_eq(gpumem_buffer_shrink_to_fit(b), GPUMEM_OK);
    gpumem_buffer_info in = info_of(b);
    cr_assert_eq(in.capacity, 10240, "10000 rounded up to 512");
    cr_assert_eq(in.shrinks, 1);
    cr_assert_eq(in.copies, 0, "a pool block shrinks in place");
    cr_assert_eq(dptr_of(b), p);
    expect_data(b, 10000, 6);
    gpumem_stats st = expect_coherent();
    cr_assert_eq(st.bytes_allocated, 10240);
    cr_assert_eq(st.bytes_cached_free, st0.bytes_cached_free + MiB - 10240);
    cr_assert_eq(tag_live("shrinking"), 10240);
    /* The tail is reusable: a block of exactly its size lands right after the buffer. */
    CUdeviceptr tail;
    OK(cuMemAlloc(&tail, MiB - 10240));
    cr_assert_eq(tail, p + 10240);
    OK(cuMemFree(tail));

    cr_assert_eq(gpumem_buffer_resize(b, 0), GPUMEM_OK);
    cr_assert_eq(gpumem_buffer_shrink_to_fit(b), GPUMEM_OK);
    in = info_of(b);
    cr_assert_eq(in.capacity, 0);
    cr_assert_null(in.ptr, "an empty buffer holds no memory");
    cr_assert_eq(expect_coherent().bytes_allocated, 0);
    cr_assert_eq(tag_live("shrinking"), 0);
    /* and grows again from nothing */
    fill(b, 3000, 7);
    expect_data(b, 3000, 7);
    gpumem_buffer_destroy(b);
}

/* Fast free mode: the tail waits for a fence. A "kernel" enqueued before the shrink still writes
 * into the tail; a block allocated meanwhile must not be that tail. The segment after the buffer
 * is taken, so the tail is the only free memory of the right class. */
Test(buffers, shrink_in_fast_mode_fences_the_tail)
{
    setenv("GPUMEM_FREE_SYNC", "0", 1);
    api_start();
    gpumem_buffer *b = make("fenced", MiB, 2.0, 0, GPUMEM_SHRINK_NEVER);
    CUdeviceptr blocker;
    OK(cuMemAlloc(&blocker, MiB));
    fill(b, 100 * KiB, 8);
    OK(fakecuda_launch_fill(NULL, dptr_of(b) + 512 * KiB, 0x5A, 4096, 50000));
    cr_assert_eq(gpumem_buffer_shrink_to_fit(b), GPUMEM_OK);
    expect_coherent();
    CUdeviceptr other;
    OK(cuMemAlloc(&other, 900 * KiB));
    memset((void *)(uintptr_t)other, 0, 900 * KiB); /* fake device memory is host memory */
    OK(cuCtxSynchronize());
    cr_assert(api_all_bytes((void *)(uintptr_t)other, 0, 900 * KiB),
              "the pending tail was handed out while a fill still wrote it");
    expect_data(b, 100 * KiB, 8);
    OK(cuMemFree(other));
    OK(cuMemFree(blocker));
    gpumem_buffer_destroy(b);
    expect_coherent();
}

Test(buffers, shrink_on_resize_policy)
{
    api_start();
    gpumem_buffer_config cfg = config(64 * KiB, 2.0, 0, GPUMEM_SHRINK_ON_RESIZE);
    cfg.shrink_below = 0.5;
    gpumem_buffer *b = make_on("on-resize", cfg, NULL);
    fill(b, MiB, 9);
    cr_assert_eq(gpumem_buffer_resize(b, 600 * KiB), GPUMEM_OK);
    cr_assert_eq(info_of(b).capacity, MiB, "600 KiB of 1 MiB is not under half");
    cr_assert_eq(gpumem_buffer_resize(b, 100 * KiB), GPUMEM_OK);
    cr_assert_eq(info_of(b).capacity, 100 * KiB, "under half: shrunk to the used size");
    expect_data(b, 100 * KiB, 9);
    cr_assert_eq(gpumem_buffer_resize(b, 10 * KiB), GPUMEM_OK);
    cr_assert_eq(info_of(b).capacity, 64 * KiB, "not below the initial capacity");
    expect_data(b, 10 * KiB, 9);
    cr_assert_eq(info_of(b).shrinks, 2);
    gpumem_buffer_destroy(b);
}

/* ---------------------------------------------------------------- limits and failures */

static void expect_unchanged(gpumem_buffer *b, const gpumem_buffer_info *was, uint32_t seed)
{
    gpumem_buffer_info now = info_of(b);
    cr_assert_eq(now.ptr, was->ptr, "a failed grow moved the buffer");
    cr_assert_eq(now.capacity, was->capacity);
    cr_assert_eq(now.used, was->used);
    cr_assert_eq(now.grows, was->grows);
    expect_data(b, was->used, seed);
}

Test(buffers, max_size_is_a_clear_error)
{
    api_start();
    gpumem_buffer *b = make("bounded", 4096, 2.0, MiB, GPUMEM_SHRINK_NEVER);
    fill(b, 4096, 10);
    gpumem_buffer_info was = info_of(b);
    cr_assert_eq(gpumem_buffer_reserve(b, MiB + 1), GPUMEM_ERROR_INVALID_VALUE);
    const char *why = gpumem_buffer_last_error();
    cr_assert(strstr(why, "bounded") && strstr(why, "1048577") && strstr(why, "1048576"),
              "the error names the buffer, the size and the maximum: %s", why);
    cr_assert_eq(gpumem_buffer_resize(b, 2 * MiB), GPUMEM_ERROR_INVALID_VALUE);
    expect_unchanged(b, &was, 10);
    cr_assert_eq(gpumem_buffer_reserve(b, MiB), GPUMEM_OK, "exactly max_size is fine");
    cr_assert_eq(info_of(b).capacity, MiB);
    gpumem_buffer_destroy(b);
}

Test(buffers, the_limit_refuses_a_grow_and_the_buffer_stays_intact)
{
    setenv("GPUMEM_LIMIT", "16MiB", 1);
    api_start();
    gpumem_buffer *b = make("limited", 6 * MiB, 2.0, 0, GPUMEM_SHRINK_NEVER);
    fill(b, 6 * MiB, 11);
    gpumem_buffer_info was = info_of(b);
    cr_assert_eq(gpumem_buffer_resize(b, 12 * MiB), GPUMEM_ERROR_OUT_OF_MEMORY);
    cr_assert(strstr(gpumem_buffer_last_error(), "unchanged"), "%s", gpumem_buffer_last_error());
    expect_unchanged(b, &was, 11);
    gpumem_stats st = expect_coherent();
    cr_assert_geq(st.limit_rejections, 1);
    cr_assert_leq(st.bytes_reserved, 16 * MiB);
    /* What fits still works: 7 MiB grows in place as far as the segment's free space reaches. */
    cr_assert_eq(gpumem_buffer_resize(b, 7 * MiB), GPUMEM_OK, "%s", gpumem_buffer_last_error());
    gpumem_buffer_info in = info_of(b);
    cr_assert_eq(in.ptr, was.ptr);
    cr_assert_eq(in.grows_in_place, 1);
    cr_assert_eq(in.capacity, 8 * MiB, "the 8 MiB segment's whole free tail");
    expect_data(b, 6 * MiB, 11);
    gpumem_buffer_destroy(b);
}

Test(buffers, an_injected_device_failure_leaves_the_buffer_intact)
{
    api_start();
    gpumem_buffer *b = make("faulty", 64 * KiB, 2.0, 0, GPUMEM_SHRINK_NEVER);
    fill(b, 64 * KiB, 12);
    CUdeviceptr blocker[2]; /* <= 1 MiB each: they fill the buffer's 2 MiB small segment */
    OK(cuMemAlloc(&blocker[0], MiB));
    OK(cuMemAlloc(&blocker[1], MiB - 64 * KiB));
    gpumem_buffer_info was = info_of(b);
    setenv("FAKECUDA_FAIL_ALLOC_AFTER", "0", 1);
    fakecuda_reload_env();
    cr_assert_eq(gpumem_buffer_resize(b, 100 * KiB), GPUMEM_ERROR_OUT_OF_MEMORY);
    expect_unchanged(b, &was, 12);
    gpumem_stats st = expect_coherent();
    cr_assert_geq(st.backend_ooms, 1);
    cr_assert_eq(st.bytes_allocated, 2 * MiB);
    cr_assert_eq(tag_live("faulty"), 64 * KiB);
    unsetenv("FAKECUDA_FAIL_ALLOC_AFTER");
    fakecuda_reload_env();
    cr_assert_eq(gpumem_buffer_resize(b, 100 * KiB), GPUMEM_OK);
    expect_data(b, 64 * KiB, 12);
    OK(cuMemFree(blocker[0]));
    OK(cuMemFree(blocker[1]));
    gpumem_buffer_destroy(b);
}

/* ---------------------------------------------------------------- cleanup */

Test(buffers, cleanup_shrinks_idle_and_under_used_buffers)
{
    api_start();
    gpumem_buffer_config idle_cfg = config(MiB, 2.0, 0, GPUMEM_SHRINK_ON_CLEANUP);
    idle_cfg.idle_seconds = 0.05;
    idle_cfg.shrink_below = 0;
    gpumem_buffer *idle_empty = make_on("idle-empty", idle_cfg, NULL);
    gpumem_buffer *idle_data = make_on("idle-data", idle_cfg, NULL);
    gpumem_buffer *busy = make_on("busy", idle_cfg, NULL);
    gpumem_buffer *sparse = make("sparse", 0, 2.0, 0, GPUMEM_SHRINK_ON_CLEANUP);
    gpumem_buffer *kept = make("kept", 0, 2.0, 0, GPUMEM_SHRINK_NEVER);
    fill(idle_data, 300 * KiB, 13);
    fill(busy, 100 * KiB, 14);
    fill(sparse, MiB, 15);
    fill(kept, MiB, 16);
    cr_assert_eq(gpumem_buffer_resize(sparse, 200 * KiB), GPUMEM_OK); /* under a quarter */
    cr_assert_eq(gpumem_buffer_resize(kept, 10 * KiB), GPUMEM_OK);
    api_sleep_ms(150);
    dptr_of(busy); /* an access: not idle */

    size_t released = 0;
    cr_assert_eq(gpumem_buffers_cleanup(&released), GPUMEM_OK);
    cr_assert_eq(info_of(idle_empty).capacity, 0, "idle and empty: released");
    cr_assert_null(info_of(idle_empty).ptr);
    cr_assert_eq(info_of(idle_data).capacity, 300 * KiB, "idle: only the used bytes stay");
    cr_assert_eq(info_of(busy).capacity, MiB, "accessed just now");
    cr_assert_eq(info_of(sparse).capacity, 200 * KiB, "under-used: shrunk to its used bytes");
    cr_assert_eq(info_of(kept).capacity, MiB, "GPUMEM_SHRINK_NEVER");
    cr_assert_eq(released, MiB + (MiB - 300 * KiB) + (MiB - 200 * KiB));
    expect_data(idle_data, 300 * KiB, 13);
    expect_data(sparse, 200 * KiB, 15);
    expect_data(busy, 100 * KiB, 14);
    expect_data(kept, 10 * KiB, 16);
    cr_assert_eq(info_of(idle_empty).used, 0);
    cr_assert_eq(info_of(idle_data).used, 300 * KiB, "cleanup never changes the used size");
    expect_coherent();
    /* Nothing left to do: a second pass gives nothing back. */
    cr_assert_eq(gpumem_buffers_cleanup(&released), GPUMEM_OK);
    cr_assert_eq(released, 0);
    cr_assert_eq(gpumem_buffers_cleanup(NULL), GPUMEM_OK);
    gpumem_buffer *all[] = {idle_empty, idle_data, busy, sparse, kept};
    for (int i = 0; i < 5; i++) cr_assert_eq(gpumem_buffer_destroy(all[i]), GPUMEM_OK);
    cr_assert_eq(expect_coherent().bytes_allocated, 0);
}

/* ---------------------------------------------------------------- names, tags, the report */

Test(buffers, the_report_names_the_buffer_and_destroy_frees_everything)
{
    api_start();
    gpumem_buffer *b = make("weights", MiB, 2.0, 0, GPUMEM_SHRINK_NEVER);
    cr_assert_eq(gpumem_tag_push("model"), GPUMEM_OK); /* the buffer's name is the innermost tag */
    cr_assert_eq(gpumem_buffer_reserve(b, 3 * MiB), GPUMEM_OK);
    cr_assert_eq(gpumem_tag_pop(), GPUMEM_OK);
    cr_assert_eq(info_of(b).capacity, 3 * MiB);
    cr_assert_eq(tag_live("weights"), 3 * MiB);
    gpumem_tag_usage u;
    cr_assert_eq(gpumem_tag_get_usage("model", &u), GPUMEM_OK);
    cr_assert_eq(u.live_bytes, 0);

    char *text = api_report_text();
    cr_assert(strstr(text, "Leak of 3145728 byte(s) in 1 allocation(s)") &&
                  strstr(text, "tagged \"weights\""),
              "the live buffer is in the report under its name:\n%s", text);
    free(text);

    gpumem_buffer *found = NULL;
    cr_assert_eq(gpumem_buffer_find("weights", &found), GPUMEM_OK);
    cr_assert_eq(found, b);
    cr_assert_eq(gpumem_buffer_destroy(b), GPUMEM_OK);
    cr_assert_eq(tag_live("weights"), 0);
    cr_assert_eq(gpumem_buffer_find("weights", &found), GPUMEM_ERROR_NOT_FOUND);
    text = api_report_text();
    cr_assert_null(strstr(text, "Leak of"), "nothing live after destroy:\n%s", text);
    free(text);
    gpumem_stats st = expect_coherent();
    cr_assert_eq(st.bytes_allocated, 0);
    cr_assert_eq(st.bytes_requested, 0);
    /* The name is free again. */
    b = make("weights", 0, 2.0, 0, GPUMEM_SHRINK_NEVER);
    gpumem_buffer_destroy(b);
}

/* ---------------------------------------------------------------- misuse */

Test(buffers, misuse_is_a_clear_error)
{
    api_start();
    gpumem_buffer *b = NULL, *other = NULL;
    void *p;
    gpumem_buffer_info in;
    cr_assert_eq(gpumem_buffer_create(NULL, "x", NULL, NULL), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_buffer_create(&b, NULL, NULL, NULL), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_buffer_create(&b, "", NULL, NULL), GPUMEM_ERROR_INVALID_VALUE);
    char long_name[200];
    memset(long_name, 'n', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = 0;
    cr_assert_eq(gpumem_buffer_create(&b, long_name, NULL, NULL), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_null(b);

    gpumem_buffer_config bad = config(0, 0.5, 0, GPUMEM_SHRINK_NEVER);
    cr_assert_eq(gpumem_buffer_create(&b, "bad", &bad, NULL), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert(strstr(gpumem_buffer_last_error(), "growth_factor"), "%s", gpumem_buffer_last_error());
    bad = config(0, NAN, 0, GPUMEM_SHRINK_NEVER);
    cr_assert_eq(gpumem_buffer_create(&b, "bad", &bad, NULL), GPUMEM_ERROR_INVALID_VALUE);
    bad = config(2 * MiB, 2.0, MiB, GPUMEM_SHRINK_NEVER);
    cr_assert_eq(gpumem_buffer_create(&b, "bad", &bad, NULL), GPUMEM_ERROR_INVALID_VALUE);
    bad = config(0, 2.0, 0, (gpumem_shrink_policy)7);
    cr_assert_eq(gpumem_buffer_create(&b, "bad", &bad, NULL), GPUMEM_ERROR_INVALID_VALUE);
    bad = config(0, 2.0, 0, GPUMEM_SHRINK_NEVER);
    bad.shrink_below = 1.5;
    cr_assert_eq(gpumem_buffer_create(&b, "bad", &bad, NULL), GPUMEM_ERROR_INVALID_VALUE);
    bad.shrink_below = 0.25;
    bad.idle_seconds = -1;
    cr_assert_eq(gpumem_buffer_create(&b, "bad", &bad, NULL), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_null(b);

    b = make("unique", 4096, 2.0, 0, GPUMEM_SHRINK_NEVER);
    cr_assert_eq(gpumem_buffer_create(&other, "unique", NULL, NULL), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert(strstr(gpumem_buffer_last_error(), "exists"), "%s", gpumem_buffer_last_error());
    cr_assert_null(other);
    cr_assert_eq(expect_coherent().bytes_allocated, 4096, "the refused duplicate holds nothing");

    cr_assert_eq(gpumem_buffer_find("nobody", &other), GPUMEM_ERROR_NOT_FOUND);
    cr_assert_eq(gpumem_buffer_find(NULL, &other), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_buffer_find("unique", NULL), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_buffer_ptr(NULL, &p), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_buffer_ptr(b, NULL), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_buffer_get_info(NULL, &in), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_buffer_get_info(b, NULL), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_buffer_reserve(NULL, 1), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_buffer_resize(NULL, 1), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_buffer_shrink_to_fit(NULL), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_buffer_destroy(NULL), GPUMEM_OK, "like free(NULL)");

    /* A handle that was destroyed is refused without being read (ASan would see a read). */
    cr_assert_eq(gpumem_buffer_destroy(b), GPUMEM_OK);
    cr_assert_eq(gpumem_buffer_ptr(b, &p), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert(strstr(gpumem_buffer_last_error(), "not a live buffer"), "%s", gpumem_buffer_last_error());
    cr_assert_eq(gpumem_buffer_resize(b, 10), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_buffer_get_info(b, &in), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_buffer_destroy(b), GPUMEM_ERROR_INVALID_VALUE, "destroyed twice");
    int not_a_buffer = 0;
    cr_assert_eq(gpumem_buffer_reserve((gpumem_buffer *)&not_a_buffer, 10), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(expect_coherent().bytes_allocated, 0);
}

Test(buffers, no_current_context)
{
    OK(cuInit(0));
    gpumem_buffer *b = NULL;
    cr_assert_eq(gpumem_buffer_create(&b, "homeless", NULL, NULL), GPUMEM_ERROR_INVALID_CONTEXT);
    cr_assert_null(b);
}

/* The program frees the buffer's pointer itself: the buffer notices instead of freeing someone
 * else's block later. */
Test(buffers, memory_freed_behind_the_buffers_back)
{
    api_start();
    gpumem_buffer *b = make("orphan", 64 * KiB, 2.0, 0, GPUMEM_SHRINK_NEVER);
    OK(cuMemFree(dptr_of(b)));
    CUdeviceptr squatter;
    OK(cuMemAlloc(&squatter, 64 * KiB)); /* the same address, now someone else's */
    cr_assert_eq(gpumem_buffer_resize(b, 128 * KiB), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert(strstr(gpumem_buffer_last_error(), "freed behind its back"), "%s", gpumem_buffer_last_error());
    cr_assert_eq(info_of(b).capacity, 0);
    cr_assert_eq(gpumem_buffer_destroy(b), GPUMEM_OK);
    unsigned char byte = 0;
    OK(cuMemcpyDtoH(&byte, squatter, 1)); /* still live: destroy did not free it */
    OK(cuMemFree(squatter));
}

Test(buffers, a_destroyed_context_takes_the_memory_along)
{
    CUcontext primary = api_start();
    CUcontext ctx;
    CUdevice dev;
    OK(cuDeviceGet(&dev, 0));
    OK(cuCtxCreate(&ctx, NULL, 0, dev));
    gpumem_buffer *b = make("ephemeral", 64 * KiB, 2.0, 0, GPUMEM_SHRINK_NEVER);
    OK(cuCtxDestroy(ctx));
    OK(cuCtxSetCurrent(primary));
    cr_assert_eq(gpumem_buffer_resize(b, 128 * KiB), GPUMEM_ERROR_INVALID_CONTEXT);
    cr_assert_eq(info_of(b).capacity, 0);
    cr_assert_eq(gpumem_buffer_destroy(b), GPUMEM_OK);
}

/* ---------------------------------------------------------------- threads */

typedef struct {
    gpumem_buffer *shared;
    CUcontext ctx;
    int id;
    bool ok;
    char why[320];
} worker_arg;

static void *worker(void *p)
{
    worker_arg *a = p;
    a->ok = cuCtxSetCurrent(a->ctx) == CUDA_SUCCESS;
    char name[32];
    snprintf(name, sizeof name, "worker-%d", a->id);
    gpumem_buffer *own = NULL;
    a->ok = a->ok && gpumem_buffer_create(&own, name, NULL, NULL) == GPUMEM_OK;
    unsigned char chunk[4096];
    for (int i = 0; a->ok && i < 200; i++) {
        size_t n = 4096 * (size_t)(1 + (i * 7 + a->id) % 64);
        void *d = NULL;
        a->ok = gpumem_buffer_resize(own, n) == GPUMEM_OK && gpumem_buffer_ptr(own, &d) == GPUMEM_OK;
        memset(chunk, a->id, sizeof chunk);
        a->ok = a->ok && cuMemcpyHtoD((CUdeviceptr)(uintptr_t)d + n - 4096, chunk, 4096) == CUDA_SUCCESS;
        a->ok = a->ok && gpumem_buffer_resize(a->shared, (size_t)(i % 50) * 8192 + 1) == GPUMEM_OK;
        gpumem_buffer_info in;
        a->ok = a->ok && gpumem_buffer_get_info(a->shared, &in) == GPUMEM_OK && in.capacity >= in.used;
        if (i % 20 == 0) a->ok = a->ok && gpumem_buffers_cleanup(NULL) == GPUMEM_OK;
    }
    a->ok = a->ok && gpumem_buffer_destroy(own) == GPUMEM_OK;
    if (!a->ok) snprintf(a->why, sizeof a->why, "%s", gpumem_buffer_last_error());
    return NULL;
}

Test(buffers, threads_share_and_own_buffers)
{
    CUcontext ctx = api_start();
    gpumem_buffer_config cfg = config(0, 2.0, 0, GPUMEM_SHRINK_ON_RESIZE);
    gpumem_buffer *shared = make_on("shared", cfg, NULL);
    enum { N = 4 };
    pthread_t t[N];
    worker_arg args[N];
    for (int i = 0; i < N; i++) {
        args[i] = (worker_arg){shared, ctx, i + 1, false, ""};
        cr_assert_eq(pthread_create(&t[i], NULL, worker, &args[i]), 0);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        cr_assert(args[i].ok, "worker %d failed: %s", i + 1, args[i].why);
    }
    cr_assert_eq(gpumem_buffer_destroy(shared), GPUMEM_OK);
    cr_assert_eq(expect_coherent().bytes_allocated, 0);
}
