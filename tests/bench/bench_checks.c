/* gpumem-bench checks: what the copy range check and the copy counters cost on the hook path,
 * host backend (the CPU side of a hooked copy; the driver call itself is not in it).
 *
 * Each case times gm_xfer_check (the pool lookup of a copy's device sides) or gm_copy_count in
 * 300 batches of 1000 calls and prints the median and p99 per call. The pool is set up the way
 * that makes each lookup path show: block bases (one hash probe), pointers a few KiB into a block
 * (probes), a pointer deep inside a block behind a thousand others in its segment (walked once,
 * then found in the thread's recent-block cache), blocks taken in turn (probes, and one walk in
 * eight), freed memory, pointers gpumem does not own, and eight heaps (eight devices). gm_lookup,
 * the linear lookup cuMemGetAddressRange uses, is timed for comparison. The last lines are the figures the goals are read from:
 *   check_base_ns_median=<N>   one device side, a block base (the common case)
 *   hook_path_ns_median=<N>    check + count of an H2D copy, what a hooked async copy adds */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "gm_transfer.h"

#define BATCH 1000
#define BATCHES 300
#define HEAPS 8

typedef struct { double median, p99; } figure;

typedef enum { DO_CHECK, DO_COUNT, DO_CHECK_AND_COUNT, DO_LOOKUP } op_kind;

typedef struct bench_case {
    const char *label;
    op_kind op;
    uintptr_t dst, src; /* device sides (0: a host side) */
    size_t n;
    int want; /* GM_SPAN_* the destination must resolve to: the setup is checked, not assumed */
    const uintptr_t *cycle; /* if set: the destinations, taken in turn (defeats the recent cache) */
    int ncycle;
} bench_case;

static volatile int sink;

static void run_once(const bench_case *c)
{
    static int turn;
    gm_xfer x = {.api = "bench", .site = NULL};
    uintptr_t dst = c->cycle ? c->cycle[turn++ % c->ncycle] : c->dst;
    switch (c->op) {
    case DO_CHECK:
    case DO_CHECK_AND_COUNT:
        x.side[GM_XFER_DST] = (gm_span){.ptr = dst, .n = c->n};
        x.side[GM_XFER_SRC] = (gm_span){.ptr = c->src, .n = c->n};
        sink += gm_xfer_check(&x);
        if (c->op == DO_CHECK_AND_COUNT)
            gm_copy_count(x.side[GM_XFER_DST].device, GPUMEM_COPY_H2D, GPUMEM_HOST_PINNED, false, c->n, false, 0, false);
        break;
    case DO_COUNT: gm_copy_count(0, GPUMEM_COPY_H2D, GPUMEM_HOST_PINNED, false, c->n, false, 0, false); break;
    case DO_LOOKUP: {
        uintptr_t base;
        size_t size;
        sink += (uint64_t)gm_lookup(c->dst, &base, &size).status;
        break;
    }
    }
}

static figure time_case(const bench_case *c)
{
    static double per[BATCHES];
    for (int i = 0; i < BATCH; i++) run_once(c); /* warm: caches, the thread's heap hint */
    for (int b = 0; b < BATCHES; b++) {
        uint64_t t0 = now_ns();
        for (int i = 0; i < BATCH; i++) run_once(c);
        per[b] = (double)(now_ns() - t0) / BATCH;
    }
    qsort(per, BATCHES, sizeof *per, cmp_double);
    return (figure){per[BATCHES / 2], per[(size_t)((BATCHES - 1) * 0.99)]};
}

/* Where the destination resolves, so a case measures the path its label names. */
static int resolve(uintptr_t p, size_t n)
{
    gm_span s = {.ptr = p, .n = n};
    gm_lookup_spans(&s, 1);
    return s.status;
}

static uintptr_t alloc_or_die(gm_heap *heap, size_t size)
{
    uintptr_t p = 0;
    if (gm_alloc(heap, size, 0, NULL, &p) != GPUMEM_OK) {
        fprintf(stderr, "gpumem-bench checks: allocation of %zu bytes failed\n", size);
        exit(3);
    }
    return p;
}

int bench_checks(int argc, char **argv)
{
    (void)argv;
    if (argc != 0) {
        fprintf(stderr, "usage: gpumem-bench checks\n");
        return 2;
    }
    setenv("GPUMEM_REPORT", "off", 1);
    setenv("GPUMEM_CHECK_COPIES", "1", 1);
    gm_host_backend_configure(0, -1);
    gm_manager_init(gm_host_backend());
    gm_heap *heaps[HEAPS];
    for (int d = 0; d < HEAPS; d++) heaps[d] = gm_heap_get((uintptr_t)d + 1, d);
    gm_heap *heap = heaps[0];

    /* Device 0: a small segment of a thousand 1-KiB blocks followed by a 512-KiB block; a large
     * block of 64 MiB; a freed block between two live ones. */
    uintptr_t small_first = alloc_or_die(heap, 1024);
    for (int i = 1; i < 1000; i++) alloc_or_die(heap, 1024);
    uintptr_t behind = alloc_or_die(heap, 512 << 10);
    uintptr_t big = alloc_or_die(heap, (size_t)64 << 20);
    uintptr_t freed = alloc_or_die(heap, 1 << 20);
    alloc_or_die(heap, 1 << 20);
    gm_free(heap, freed, GM_FREE_BARRIER, NULL);
    /* Eight 8-KiB blocks behind the thousand small ones, each used 6 KiB in, in turn: more than
     * the thread's recent-block cache holds, so each is found by probing up to the next block's
     * base (the last one has no live block after it: it walks the segment from its start). */
    uintptr_t walked[8];
    for (int i = 0; i < 8; i++) walked[i] = alloc_or_die(heap, 8192) + 6144;
    /* Device 7: one block, so a lookup that starts at device 0 must go through every heap. */
    uintptr_t far = alloc_or_die(heaps[HEAPS - 1], 4096);
    static unsigned char host[4096];
    uintptr_t not_ours = (uintptr_t)host;

    const bench_case cases[] = {
        {"base pointer (hash hit)", DO_CHECK, big, 0, 4096, GM_SPAN_LIVE, NULL, 0},
        {"interior, 3.5 KiB in (probes)", DO_CHECK, big + 3584, 0, 4096, GM_SPAN_LIVE, NULL, 0},
        {"interior, 256 KiB in, 1000 blocks ahead (recent)", DO_CHECK, behind + (256 << 10), 0, 4096, GM_SPAN_LIVE, NULL, 0},
        {"interior, 6 KiB in, 8 blocks in turn (probes)", DO_CHECK, walked[0], 0, 1024, GM_SPAN_LIVE, walked, 8},
        {"small block base, 1000 blocks in segment", DO_CHECK, small_first + 500 * 1024, 0, 1024, GM_SPAN_LIVE, NULL, 0},
        {"freed block", DO_CHECK, freed + 4096, 0, 4096, GM_SPAN_FREED, NULL, 0},
        {"past the end (refused: counted only)", DO_CHECK, big + ((size_t)64 << 20) - 8, 0, 16, GM_SPAN_PAST_END, NULL, 0},
        {"not ours (host memory)", DO_CHECK, not_ours, 0, 4096, GM_SPAN_NOT_OURS, NULL, 0},
        {"D2D, two base pointers", DO_CHECK, big, small_first, 1024, GM_SPAN_LIVE, NULL, 0},
        {"base pointer on device 7 (heap hint)", DO_CHECK, far, 0, 4096, GM_SPAN_LIVE, NULL, 0},
        {"count only (per-thread counters)", DO_COUNT, 0, 0, 4096, GM_SPAN_NOT_OURS, NULL, 0},
        {"check + count, H2D base pointer", DO_CHECK_AND_COUNT, big, 0, 4096, GM_SPAN_LIVE, NULL, 0},
        {"gm_lookup, base pointer (before: linear)", DO_LOOKUP, big, 0, 4096, GM_SPAN_LIVE, NULL, 0},
        {"gm_lookup, 256 KiB in, 1000 blocks ahead", DO_LOOKUP, behind + (256 << 10), 0, 4096, GM_SPAN_LIVE, NULL, 0},
    };
    const size_t ncases = sizeof cases / sizeof *cases;
    for (size_t i = 0; i < ncases; i++) {
        if (cases[i].op != DO_COUNT && resolve(cases[i].dst, cases[i].n) != cases[i].want) {
            fprintf(stderr, "gpumem-bench checks: case '%s' does not resolve as intended (%d, want %d)\n",
                    cases[i].label, resolve(cases[i].dst, cases[i].n), cases[i].want);
            return 3;
        }
    }
    /* The refused case logs 100 lines and then only counts: keep them out of the output. */
    fflush(stderr);
    int devnull = open("/dev/null", O_WRONLY);
    if (devnull >= 0) dup2(devnull, STDERR_FILENO);

    printf("copy range check and counters, host backend, ns per call over %d batches of %d "
           "(median / p99)\n", BATCHES, BATCH);
    double base = 0, path = 0;
    for (size_t i = 0; i < ncases; i++) {
        figure f = time_case(&cases[i]);
        printf("%-50s %8.1f / %-8.1f\n", cases[i].label, f.median, f.p99);
        if (i == 0) base = f.median;
        if (cases[i].op == DO_CHECK_AND_COUNT) path = f.median;
    }
    uint64_t t0 = now_ns();
    for (int i = 0; i < BATCH * 100; i++) sink += (int)gm_copy_clock();
    printf("%-50s %8.1f\n", "gm_copy_clock (blocking copies: two per copy)",
           (double)(now_ns() - t0) / (BATCH * 100));
    printf("check_base_ns_median=%.1f\nhook_path_ns_median=%.1f\n", base, path);
    return 0;
}
