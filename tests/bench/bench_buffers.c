/* gpumem-bench buffers: named buffers' growth and the tracking's memory cost, in this process
 * (library mode: libgpumem's engine linked in, no shim), on the GPU when libcuda.so.1 loads and
 * has a device, else on the host backend (`--host` forces it).
 *
 *   tracking overhead   65536 live 4 KiB allocations: gpumem's host metadata for them (block
 *                       headers with their embedded leak records, the live table's buckets, the
 *                       segment table, the call-stack depot per unique stack) over the bytes
 *                       tracked. Seed target: < 5 %.
 *   resize, copy        a 256 MiB buffer, full, grown by one byte: a new 512 MiB block, a 256 MiB
 *                       device-to-device copy on the buffer's stream, the old block freed (strict
 *                       mode: a context barrier). Timed until the copy has completed. Target < 1 ms.
 *   resize, in place    the same growth with free memory after the buffer: no copy, same pointer.
 *
 * Medians (and the slowest run) over repeated runs; the pool is warm (segments cached). */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench.h"
#include "gm_api.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)

typedef int (*drv_init_fn)(unsigned);
typedef int (*drv_device_get_fn)(int *, int);
typedef int (*drv_retain_fn)(void **, int);
typedef int (*drv_set_current_fn)(void *);
typedef int (*drv_stream_create_fn)(void **, unsigned);
typedef int (*drv_stream_sync_fn)(void *);
typedef int (*drv_memset_fn)(uintptr_t, unsigned char, size_t);
typedef int (*drv_dtoh_fn)(void *, uintptr_t, size_t);
typedef int (*drv_name_fn)(char *, int, int);

static struct {
    bool gpu;
    void *stream;
    drv_stream_sync_fn stream_sync;
    drv_memset_fn memset_d8;
    drv_dtoh_fn dtoh;
    char device[128];
} env;

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static double median_of(double *v, size_t n, double *max_out)
{
    qsort(v, n, sizeof *v, cmp_double);
    *max_out = v[n - 1];
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* ------------------------------------------------------------------ setup */

#define SYM(type, name) ((type)gm_driver_sym(name))

/* The real driver with device 0's primary context current, or false. */
static bool start_gpu(void)
{
    const gm_backend *be = gm_cuda_backend();
    drv_init_fn init = SYM(drv_init_fn, "cuInit");
    drv_device_get_fn device_get = SYM(drv_device_get_fn, "cuDeviceGet");
    drv_retain_fn retain = SYM(drv_retain_fn, "cuDevicePrimaryCtxRetain");
    drv_set_current_fn set_current = SYM(drv_set_current_fn, "cuCtxSetCurrent");
    drv_stream_create_fn stream_create = SYM(drv_stream_create_fn, "cuStreamCreate");
    drv_name_fn name = SYM(drv_name_fn, "cuDeviceGetName");
    env.stream_sync = SYM(drv_stream_sync_fn, "cuStreamSynchronize");
    env.memset_d8 = SYM(drv_memset_fn, "cuMemsetD8_v2");
    env.dtoh = SYM(drv_dtoh_fn, "cuMemcpyDtoH_v2");
    int dev = 0;
    void *ctx = NULL;
    if (!be || !init || !device_get || !retain || !set_current || !stream_create ||
        !env.stream_sync || !env.memset_d8 || !env.dtoh)
        return false;
    if (init(0) || device_get(&dev, 0) || retain(&ctx, dev) || set_current(ctx) ||
        stream_create(&env.stream, 1 /* CU_STREAM_NON_BLOCKING */))
        return false;
    if (!name || name(env.device, sizeof env.device, dev)) snprintf(env.device, sizeof env.device, "device 0");
    return gm_manager_init(be);
}

static void start_host(void)
{
    gm_manager_init(gm_host_backend());
    gm_host_backend_configure(0, -1);
    snprintf(env.device, sizeof env.device, "host memory");
}

static void device_fill(void *p, unsigned char v, size_t n)
{
    if (env.gpu) env.memset_d8((uintptr_t)p, v, n);
    else memset(p, v, n);
}

static unsigned char device_byte(const void *p)
{
    unsigned char v = 0;
    if (env.gpu) env.dtoh(&v, (uintptr_t)p, 1);
    else v = *(const unsigned char *)p;
    return v;
}

static void stream_sync(void)
{
    if (env.gpu) env.stream_sync(env.stream);
}

static gm_heap *current_heap(void)
{
    uintptr_t ctx;
    int device;
    if (gm_mgr.backend->current(&ctx, &device) != GPUMEM_OK) return NULL;
    return gm_heap_get(ctx, device);
}

/* Fast mode (GPUMEM_FREE_SYNC=0) leaves freed blocks waiting on a fence until an allocation
 * misses; the runs want them back in the pool at once, so each run starts from the same layout. */
static void settle(void)
{
    gm_heap *heap = current_heap();
    pthread_mutex_lock(&heap->lock);
    gm_retire_pending_locked(heap, true);
    pthread_mutex_unlock(&heap->lock);
}

/* ------------------------------------------------------------------ tracking overhead */

typedef struct {
    size_t blocks, block_bytes, block_chunk_bytes, segment_bytes, hash_bytes, depot_bytes;
    size_t stacks;
} metadata;

/* One unique stack in the depot: its record (hash, count, frames), its slot in the open-address
 * table (kept at most half full) and its entry in the id array. */
static size_t depot_bytes_of(uint32_t id)
{
    uintptr_t pc[64];
    size_t n = gm_stack_get(id, pc, 64);
    return 2 * sizeof(uint32_t) + n * sizeof(uintptr_t) + 2 * sizeof(uint32_t) + sizeof(void *);
}

static metadata measure(gm_heap *heap)
{
    metadata m = {0};
    uint32_t seen[64];
    pthread_mutex_lock(&heap->lock);
    for (size_t i = 0; i < heap->pool.segments; i++)
        for (gm_block *b = heap->pool.by_base[i]->first; b; b = b->next) {
            m.blocks++;
            m.block_chunk_bytes += malloc_usable_size(b) + sizeof(size_t); /* glibc's chunk header */
            bool known = b->state != GM_BLOCK_LIVE || !b->rec.stack_id;
            for (size_t k = 0; k < m.stacks && !known; k++) known = seen[k] == b->rec.stack_id;
            if (!known && m.stacks < 64) {
                seen[m.stacks++] = b->rec.stack_id;
                m.depot_bytes += depot_bytes_of(b->rec.stack_id);
            }
        }
    for (gm_block *b = heap->pool.spare_blocks; b; b = b->fnext) m.blocks++;
    m.block_bytes = m.blocks * sizeof(gm_block);
    m.segment_bytes = heap->pool.segments * sizeof(gm_segment) + heap->pool.by_base_cap * sizeof(gm_segment *);
    const UT_hash_table *tbl = heap->live.head->hh.tbl;
    m.hash_bytes = sizeof *tbl + tbl->num_buckets * sizeof(UT_hash_bucket);
    pthread_mutex_unlock(&heap->lock);
    return m;
}

static int tracking_overhead(void)
{
    enum { N = 65536 };
    const size_t size = 4 * KiB;
    gm_heap *heap = current_heap();
    uintptr_t *p = malloc(N * sizeof *p);
    if (!heap || !p) return 3;
    for (size_t i = 0; i < N; i++)
        if (gm_alloc(heap, size, 0, GM_CALLSITE(), &p[i]) != GPUMEM_OK) {
            fprintf(stderr, "gpumem-bench buffers: allocation %zu of %d failed\n", i, N);
            return 3;
        }
    metadata m = measure(heap);
    size_t tracked = (size_t)N * size;
    size_t total = m.block_bytes + m.segment_bytes + m.hash_bytes + m.depot_bytes;
    size_t total_chunks = m.block_chunk_bytes + m.segment_bytes + m.hash_bytes + m.depot_bytes;
    printf("tracking: %d live allocations of %zu B = %zu MiB tracked\n", N, size, tracked / MiB);
    printf("  block headers   %8zu x %3zu B (leak record and live-table link inside) = %zu B\n",
           m.blocks, sizeof(gm_block), m.block_bytes);
    printf("  live table      %zu B of buckets\n", m.hash_bytes);
    printf("  segments        %zu B\n", m.segment_bytes);
    printf("  stack depot     %zu B for %zu unique stack(s)\n", m.depot_bytes, m.stacks);
    printf("tracking_overhead_4KiB_percent=%.2f (%.1f B per allocation; with malloc's chunk "
           "headers %.2f)\n", 100.0 * (double)total / (double)tracked, (double)total / N,
           100.0 * (double)total_chunks / (double)tracked);
    for (size_t i = 0; i < N; i++) gm_free(heap, p[i], GM_FREE_BARRIER, NULL);
    free(p);
    settle();
    gpumem_release_cached();
    return 0;
}

/* ------------------------------------------------------------------ growth */

static int check(gpumem_status rc, const char *what)
{
    if (rc != GPUMEM_OK)
        fprintf(stderr, "gpumem-bench buffers: %s: %s (%s)\n", what, gpumem_strerror(rc),
                gpumem_buffer_last_error());
    return rc;
}

/* One run: a buffer of `size` bytes, full of 0x5A, grown by one byte; returns the microseconds
 * the resize took until its copy (if any) completed, or < 0. `in_place` says which path ran. */
static double grow_once(size_t size, bool *in_place)
{
    gpumem_buffer_config cfg;
    gpumem_buffer_config_init(&cfg);
    cfg.initial_capacity = size;
    cfg.shrink = GPUMEM_SHRINK_NEVER;
    gpumem_buffer *b = NULL;
    void *before = NULL, *after = NULL;
    if (check(gpumem_buffer_create(&b, "bench", &cfg, env.stream), "create") ||
        check(gpumem_buffer_resize(b, size), "resize to full") ||
        check(gpumem_buffer_ptr(b, &before), "ptr"))
        return -1;
    /* Filled whole only where the copy moves it all: on the host backend a 256 MiB memset would
     * leave the in-place run timing cache misses of its own. */
    bool room = false;
    pthread_mutex_lock(&current_heap()->lock);
    gm_record *rec = gm_heap_live_find_locked(current_heap(), (uintptr_t)before);
    room = rec && rec->block && rec->block->next && rec->block->next->state == GM_BLOCK_FREE;
    pthread_mutex_unlock(&current_heap()->lock);
    if (room && size > 8 * KiB) {
        device_fill(before, 0x5A, 4 * KiB);
        device_fill((char *)before + size - 4 * KiB, 0x5A, 4 * KiB);
    } else {
        device_fill(before, 0x5A, size);
    }
    stream_sync();
    if (env.gpu) gm_mgr.backend->synchronize(current_heap()->ctx);
    double t0 = now_us();
    gpumem_status rc = gpumem_buffer_resize(b, size + 1);
    stream_sync();
    double t = now_us() - t0;
    gpumem_buffer_info in;
    if (check(rc, "grow") || check(gpumem_buffer_get_info(b, &in), "info") ||
        check(gpumem_buffer_ptr(b, &after), "ptr"))
        return -1;
    *in_place = in.grows_in_place == 1;
    if (device_byte((char *)after + size - 1) != 0x5A || device_byte(after) != 0x5A ||
        (*in_place && after != before) || in.copies != (*in_place ? 0u : 1u)) {
        fprintf(stderr, "gpumem-bench buffers: the grown buffer does not hold its data\n");
        return -1;
    }
    gpumem_buffer_destroy(b);
    settle();
    return t;
}

static int time_growth(const char *label, size_t size, bool want_in_place, int runs)
{
    double *t = malloc(sizeof(double) * (size_t)runs), slowest;
    for (int i = -2; i < runs; i++) { /* two warm-up runs fill the pool's cache */
        bool in_place = false;
        double us = grow_once(size, &in_place);
        if (us < 0) return 3;
        if (in_place != want_in_place) {
            fprintf(stderr, "gpumem-bench buffers: %s took the %s path\n", label,
                    in_place ? "in-place" : "copy");
            return 3;
        }
        if (i >= 0) t[i] = us;
    }
    double med = median_of(t, (size_t)runs, &slowest);
    printf("%-34s %10.1f %10.1f %6d\n", label, med, slowest, runs);
    printf("%s_us_median=%.1f\n", label, med);
    free(t);
    return 0;
}

/* Free memory right after the buffer: one large cached segment to carve it from. */
static int prepare_room(size_t segment)
{
    void *p = NULL;
    settle();
    gpumem_release_cached();
    if (check(gpumem_malloc(&p, segment), "room")) return 3;
    return check(gpumem_free(p), "room");
}

int bench_buffers(int argc, char **argv)
{
    bool force_host = argc >= 1 && strcmp(argv[0], "--host") == 0;
    if (argc > (force_host ? 1 : 0)) {
        fprintf(stderr, "usage: gpumem-bench buffers [--host]\n");
        return 2;
    }
    setenv("GPUMEM_REPORT", "off", 1);
    env.gpu = !force_host && start_gpu();
    if (!env.gpu) {
        if (gm_mgr.backend) {
            fprintf(stderr, "gpumem-bench buffers: the driver loaded but could not be started\n");
            return 3;
        }
        start_host();
    }
    printf("gpumem-bench buffers on %s (%s backend, GPUMEM_FREE_SYNC=%d)\n", env.device,
           gm_mgr.backend->name, gm_mgr.cfg->free_sync);
    int rc = tracking_overhead();
    if (rc) return rc;
    printf("%-34s %10s %10s %6s\n", "growth", "median_us", "max_us", "runs");
    const size_t size = 256 * MiB;
    if ((rc = time_growth("resize_copy_256MiB", size, false, 20))) return rc;
    /* 256 MiB at the start of a free 1 GiB segment: grows to 512 MiB where it lies. */
    if ((rc = prepare_room(1024 * MiB))) return rc;
    if ((rc = time_growth("resize_in_place_256MiB", size, true, 200))) return rc;
    settle();
    gpumem_release_cached(); /* a fresh small segment: the rest of it lies after the buffer */
    return time_growth("resize_in_place_4KiB", 4 * KiB, true, 1000);
}
