/* api_copies_pitched: the 2D/3D, peer and 2D-memset copies checked and counted like the 1D ones
 * (issue 10), through the real preload path on the fake driver.
 *
 * Every entry point (cuMemcpy2D/2DUnaligned/2DAsync, cuMemcpy3D/3DAsync, cuMemcpy3DPeer/Async,
 * cuMemcpyPeer/Async, cuMemsetD2D8/16/32 and their Async forms, with every _ptds/_ptsz variant):
 * a good copy moves exactly its rows (checked byte by byte against a model, the padding between
 * rows untouched); a span that starts in freed pool memory or whose last row runs past the
 * block's requested size is refused with CUDA_ERROR_INVALID_VALUE, one logged line and nothing
 * reaching the driver; a descriptor the driver refuses anyway gets the driver's own answer;
 * accepted copies are counted per direction and host kind (bytes = width * height * depth);
 * peer copies between two devices' contexts work and are checked; cuGetProcAddress hands out
 * the hooks. */
#include "fakecuda.h"
#include "misuse_capture.h"

/* ---------------------------------------------------------------- helpers */

typedef gpumem_status (*copy_stats_fn)(int device, gpumem_copy_stats *out);

static gpumem_copy_stats copy_stats(int device)
{
    copy_stats_fn fn = (copy_stats_fn)(uintptr_t)api_shim_sym("gpumem_get_copy_stats");
    cr_assert_not_null(fn, "gpumem_get_copy_stats is not reachable: is the shim preloaded?");
    gpumem_copy_stats st;
    cr_assert_eq(fn(device, &st), GPUMEM_OK);
    return st;
}

static void expect(gpumem_copy_stats *e, gpumem_copy_direction d, gpumem_host_memory k, size_t bytes, bool timed)
{
    /* The counter test's copies touch the same bytes from unordered streams: wait for each
     * before the next (only the counters are under test; overlapping DMAs are a race). */
    cr_assert_eq(cuCtxSynchronize(), CUDA_SUCCESS);
    gpumem_copy_counter *cs[2] = {&e->total[d], d == GPUMEM_COPY_D2D ? NULL : &e->host[d][k]};
    for (int i = 0; i < 2 && cs[i]; i++) {
        cs[i]->calls++;
        cs[i]->bytes += bytes;
        cs[i]->timed_calls += timed;
        cs[i]->timed_bytes += timed ? bytes : 0;
    }
}

static void assert_counter(const gpumem_copy_counter *got, const gpumem_copy_counter *want, int d, int k)
{
    cr_assert_eq(got->calls, want->calls, "dir %d kind %d calls: %llu, want %llu", d, k,
                 (unsigned long long)got->calls, (unsigned long long)want->calls);
    cr_assert_eq(got->bytes, want->bytes, "dir %d kind %d bytes: %llu, want %llu", d, k,
                 (unsigned long long)got->bytes, (unsigned long long)want->bytes);
    cr_assert_eq(got->timed_calls, want->timed_calls, "dir %d kind %d timed calls", d, k);
    cr_assert_eq(got->timed_bytes, want->timed_bytes, "dir %d kind %d timed bytes", d, k);
    cr_assert_eq(got->time_ns > 0, want->timed_calls > 0, "dir %d kind %d time", d, k);
    cr_assert_eq(got->staged_calls, 0, "pitched and peer copies are never staged");
}

static void assert_stats(const gpumem_copy_stats *got, const gpumem_copy_stats *want)
{
    for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++) {
        assert_counter(&got->total[d], &want->total[d], d, -1);
        for (int k = 0; k < GPUMEM_HOST_KINDS; k++) assert_counter(&got->host[d][k], &want->host[d][k], d, k);
    }
    cr_assert_eq(got->refused_copies, want->refused_copies);
    cr_assert_eq(got->refused_memsets, want->refused_memsets);
}

static unsigned char *dev(CUdeviceptr p) { return (unsigned char *)(uintptr_t)p; }

/* ---------------------------------------------------------------- descriptors and the model */

/* One side of a pitched copy. rows: rows per slice (3D). */
typedef struct side {
    CUmemorytype type;
    uintptr_t p;
    size_t x, y, z, pitch, rows;
    CUcontext ctx; /* 3D peer copies */
} side;

typedef struct shape {
    size_t w, h, d;
} shape;

#define FILL_SIDE(c, pre, sd) \
    do { \
        (c).pre##MemoryType = (sd).type; \
        (c).pre##XInBytes = (sd).x; \
        (c).pre##Y = (sd).y; \
        (c).pre##Pitch = (sd).pitch; \
        if ((sd).type == CU_MEMORYTYPE_HOST) (c).pre##Host = (void *)(sd).p; \
        else if ((sd).type == CU_MEMORYTYPE_ARRAY) (c).pre##Array = (CUarray)(sd).p; \
        else (c).pre##Device = (CUdeviceptr)(sd).p; \
    } while (0)
#define FILL_SIDE3(c, pre, sd) \
    do { \
        FILL_SIDE(c, pre, sd); \
        (c).pre##Z = (sd).z; \
        (c).pre##Height = (sd).rows; \
    } while (0)

static CUDA_MEMCPY2D d2(side dst, side src, shape s)
{
    CUDA_MEMCPY2D c;
    memset(&c, 0, sizeof c);
    FILL_SIDE(c, dst, dst);
    FILL_SIDE(c, src, src);
    c.WidthInBytes = s.w;
    c.Height = s.h;
    return c;
}

static CUDA_MEMCPY3D d3(side dst, side src, shape s)
{
    CUDA_MEMCPY3D c;
    memset(&c, 0, sizeof c);
    FILL_SIDE3(c, dst, dst);
    FILL_SIDE3(c, src, src);
    c.WidthInBytes = s.w;
    c.Height = s.h;
    c.Depth = s.d;
    return c;
}

static CUDA_MEMCPY3D_PEER d3p(side dst, side src, shape s)
{
    CUDA_MEMCPY3D_PEER c;
    memset(&c, 0, sizeof c);
    FILL_SIDE3(c, dst, dst);
    FILL_SIDE3(c, src, src);
    c.dstContext = dst.ctx;
    c.srcContext = src.ctx;
    c.WidthInBytes = s.w;
    c.Height = s.h;
    c.Depth = s.d;
    return c;
}

static CUcontext current(void)
{
    CUcontext c = NULL;
    OK(cuCtxGetCurrent(&c));
    return c;
}

static side S(CUmemorytype t, uintptr_t p, size_t x, size_t y, size_t pitch)
{
    return (side){t, p, x, y, 0, pitch, 0, current()};
}

static side S3(CUmemorytype t, uintptr_t p, size_t x, size_t y, size_t z, size_t pitch, size_t rows)
{
    return (side){t, p, x, y, z, pitch, rows, current()};
}

/* Offset of row (zz, yy) of a side from its base. */
static size_t row_at(const side *s, size_t zz, size_t yy)
{
    return s->x + ((s->z + zz) * s->rows + s->y + yy) * s->pitch;
}

/* What the copy does, on `dst_model` (a copy of the destination's memory). */
static void model(unsigned char *dst_model, const side *d, const unsigned char *src, const side *s, shape sh)
{
    for (size_t z = 0; z < sh.d; z++)
        for (size_t y = 0; y < sh.h; y++) memcpy(dst_model + row_at(d, z, y), src + row_at(s, z, y), sh.w);
}

static void assert_same(const unsigned char *got, const unsigned char *want, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(got[i], want[i], "%s: byte %zu is %#x, want %#x", what, i, got[i], want[i]);
}

/* ---------------------------------------------------------------- the entry points */

typedef CUresult (*copy2d_fn)(const CUDA_MEMCPY2D *c, CUstream s);
typedef CUresult (*copy3d_fn)(const CUDA_MEMCPY3D *c, CUstream s);
typedef CUresult (*copy3dp_fn)(const CUDA_MEMCPY3D_PEER *c, CUstream s);

#define SYNC_WRAP(fn, t, call) static CUresult fn(const t *c, CUstream s) { (void)s; return call(c); }
#define ASYNC_WRAP(fn, t, call) static CUresult fn(const t *c, CUstream s) { return call(c, s); }
SYNC_WRAP(m2d, CUDA_MEMCPY2D, cuMemcpy2D_v2)
SYNC_WRAP(m2d_ptds, CUDA_MEMCPY2D, cuMemcpy2D_v2_ptds)
SYNC_WRAP(m2du, CUDA_MEMCPY2D, cuMemcpy2DUnaligned_v2)
SYNC_WRAP(m2du_ptds, CUDA_MEMCPY2D, cuMemcpy2DUnaligned_v2_ptds)
ASYNC_WRAP(m2da, CUDA_MEMCPY2D, cuMemcpy2DAsync_v2)
ASYNC_WRAP(m2da_ptsz, CUDA_MEMCPY2D, cuMemcpy2DAsync_v2_ptsz)
SYNC_WRAP(m3d, CUDA_MEMCPY3D, cuMemcpy3D_v2)
SYNC_WRAP(m3d_ptds, CUDA_MEMCPY3D, cuMemcpy3D_v2_ptds)
ASYNC_WRAP(m3da, CUDA_MEMCPY3D, cuMemcpy3DAsync_v2)
ASYNC_WRAP(m3da_ptsz, CUDA_MEMCPY3D, cuMemcpy3DAsync_v2_ptsz)
SYNC_WRAP(m3p, CUDA_MEMCPY3D_PEER, cuMemcpy3DPeer)
SYNC_WRAP(m3p_ptds, CUDA_MEMCPY3D_PEER, cuMemcpy3DPeer_ptds)
ASYNC_WRAP(m3pa, CUDA_MEMCPY3D_PEER, cuMemcpy3DPeerAsync)
ASYNC_WRAP(m3pa_ptsz, CUDA_MEMCPY3D_PEER, cuMemcpy3DPeerAsync_ptsz)

static const struct { const char *api; copy2d_fn fn; } copies2d[] = {
    {"cuMemcpy2D_v2", m2d}, {"cuMemcpy2D_v2_ptds", m2d_ptds},
    {"cuMemcpy2DUnaligned_v2", m2du}, {"cuMemcpy2DUnaligned_v2_ptds", m2du_ptds},
    {"cuMemcpy2DAsync_v2", m2da}, {"cuMemcpy2DAsync_v2_ptsz", m2da_ptsz},
};
static const struct { const char *api; copy3d_fn fn; } copies3d[] = {
    {"cuMemcpy3D_v2", m3d}, {"cuMemcpy3D_v2_ptds", m3d_ptds},
    {"cuMemcpy3DAsync_v2", m3da}, {"cuMemcpy3DAsync_v2_ptsz", m3da_ptsz},
};
static const struct { const char *api; copy3dp_fn fn; } copies3dp[] = {
    {"cuMemcpy3DPeer", m3p}, {"cuMemcpy3DPeer_ptds", m3p_ptds},
    {"cuMemcpy3DPeerAsync", m3pa}, {"cuMemcpy3DPeerAsync_ptsz", m3pa_ptsz},
};
#define N(a) (sizeof(a) / sizeof *(a))

/* ---------------------------------------------------------------- good copies move exactly their rows */

#define REGION 8192

/* One round trip through the pool in a 2D or 3D geometry: H2D into a, D2D a -> b, D2H b -> out,
 * then unified b -> out2; each destination compared whole with its model. */
typedef struct round_trip {
    CUdeviceptr a, b;
    unsigned char *host, *out, *out2;
    unsigned char ma[REGION], mb[REGION], mout[REGION], mout2[REGION];
} round_trip;

static void round_trip_init(round_trip *t)
{
    OK(cuMemAlloc(&t->a, REGION));
    OK(cuMemAlloc(&t->b, REGION));
    t->host = malloc(REGION);
    t->out = malloc(REGION);
    t->out2 = malloc(REGION);
    cr_assert(t->host && t->out && t->out2);
    OK(cuMemsetD8(t->a, 0xEE, REGION));
    OK(cuMemsetD8(t->b, 0xDD, REGION));
    memset(t->out, 0xCC, REGION);
    memset(t->out2, 0xBB, REGION);
    memset(t->ma, 0xEE, REGION);
    memset(t->mb, 0xDD, REGION);
    memset(t->mout, 0xCC, REGION);
    memset(t->mout2, 0xBB, REGION);
}

static void round_trip_check(round_trip *t, const char *api, CUstream s)
{
    OK(cuStreamSynchronize(s));
    OK(cuCtxSynchronize());
    char what[96];
    snprintf(what, sizeof what, "%s: device a", api);
    assert_same(dev(t->a), t->ma, REGION, what);
    snprintf(what, sizeof what, "%s: device b", api);
    assert_same(dev(t->b), t->mb, REGION, what);
    snprintf(what, sizeof what, "%s: host out", api);
    assert_same(t->out, t->mout, REGION, what);
    snprintf(what, sizeof what, "%s: host out (unified)", api);
    assert_same(t->out2, t->mout2, REGION, what);
}

static void round_trip_free(round_trip *t)
{
    OK(cuMemFree(t->a));
    OK(cuMemFree(t->b));
    free(t->host);
    free(t->out);
    free(t->out2);
}

Test(pitched, copies_2d_move_exactly_their_rows)
{
    CUstream s;
    api_start();
    OK(cuStreamCreate(&s, 0));
    round_trip t;
    round_trip_init(&t);
    const shape sh = {200, 5, 1};
    for (size_t i = 0; i < N(copies2d); i++) {
        api_fill_pattern(t.host, REGION, (uint32_t)i + 1);
        side h = S(CU_MEMORYTYPE_HOST, (uintptr_t)t.host, 3, 2, 300);
        side a = S(CU_MEMORYTYPE_DEVICE, t.a, 8, 1, 512);
        side a2 = S(CU_MEMORYTYPE_DEVICE, t.a, 16, 0, 512);
        side b = S(CU_MEMORYTYPE_DEVICE, t.b, 40 + i, 2, 1024);
        side out = S(CU_MEMORYTYPE_HOST, (uintptr_t)t.out, 1, 3, 256);
        side ub = S(CU_MEMORYTYPE_UNIFIED, t.b, 40 + i, 2, 1024);
        side uout = S(CU_MEMORYTYPE_UNIFIED, (uintptr_t)t.out2, 5, 1, 208);
        CUDA_MEMCPY2D c = d2(a, h, sh);
        OK(copies2d[i].fn(&c, s));
        model(t.ma, &a, t.host, &h, sh);
        OK(cuStreamSynchronize(s));
        c = d2(b, a2, sh);
        OK(copies2d[i].fn(&c, s));
        model(t.mb, &b, t.ma, &a2, sh);
        OK(cuStreamSynchronize(s));
        c = d2(out, b, sh);
        OK(copies2d[i].fn(&c, s));
        model(t.mout, &out, t.mb, &b, sh);
        c = d2(uout, ub, sh);
        OK(copies2d[i].fn(&c, s));
        model(t.mout2, &uout, t.mb, &ub, sh);
        round_trip_check(&t, copies2d[i].api, s);
    }
    round_trip_free(&t);
}

/* 3D and 3D peer copies: two slices of 4 rows out of slices of 5 and 6 rows, from slice 1. */
typedef CUresult (*run3_fn)(side d, side src, shape sh, CUstream s);

static void copy3d_round(round_trip *t, uint32_t seed, CUstream s, run3_fn run, const char *api)
{
    const shape sh = {100, 4, 2};
    api_fill_pattern(t->host, REGION, seed);
    side h = S3(CU_MEMORYTYPE_HOST, (uintptr_t)t->host, 3, 1, 1, 128, 5);
    side a = S3(CU_MEMORYTYPE_DEVICE, t->a, 8, 0, 1, 256, 6);
    side b = S3(CU_MEMORYTYPE_DEVICE, t->b, 20, 1, 0, 200, 5);
    side out = S3(CU_MEMORYTYPE_HOST, (uintptr_t)t->out, 0, 0, 1, 128, 4);
    side ub = S3(CU_MEMORYTYPE_UNIFIED, t->b, 20, 1, 0, 200, 5);
    side uout = S3(CU_MEMORYTYPE_UNIFIED, (uintptr_t)t->out2, 7, 2, 0, 150, 7);
    OK(run(a, h, sh, s));
    model(t->ma, &a, t->host, &h, sh);
    OK(cuStreamSynchronize(s));
    OK(run(b, a, sh, s));
    model(t->mb, &b, t->ma, &a, sh);
    OK(cuStreamSynchronize(s));
    OK(run(out, b, sh, s));
    model(t->mout, &out, t->mb, &b, sh);
    OK(run(uout, ub, sh, s));
    model(t->mout2, &uout, t->mb, &ub, sh);
    round_trip_check(t, api, s);
}

static size_t g_which;

static CUresult run3d(side d, side src, shape sh, CUstream s)
{
    CUDA_MEMCPY3D c = d3(d, src, sh);
    return copies3d[g_which].fn(&c, s);
}

static CUresult run3dp(side d, side src, shape sh, CUstream s)
{
    CUDA_MEMCPY3D_PEER c = d3p(d, src, sh);
    return copies3dp[g_which].fn(&c, s);
}

Test(pitched, copies_3d_move_exactly_their_slices)
{
    CUstream s;
    api_start();
    OK(cuStreamCreate(&s, 0));
    round_trip t;
    round_trip_init(&t);
    for (g_which = 0; g_which < N(copies3d); g_which++)
        copy3d_round(&t, 100 + (uint32_t)g_which, s, run3d, copies3d[g_which].api);
    for (g_which = 0; g_which < N(copies3dp); g_which++)
        copy3d_round(&t, 200 + (uint32_t)g_which, s, run3dp, copies3dp[g_which].api);
    round_trip_free(&t);
}

typedef CUresult (*set2d_fn)(CUdeviceptr d, size_t pitch, uint32_t v, size_t w, size_t h, CUstream s);

#define SET2D_WRAP(fn, t, call) \
    static CUresult fn(CUdeviceptr d, size_t p, uint32_t v, size_t w, size_t h, CUstream s) \
    { \
        (void)s; \
        return call(d, p, (t)v, w, h); \
    }
#define SET2D_ASYNC_WRAP(fn, t, call) \
    static CUresult fn(CUdeviceptr d, size_t p, uint32_t v, size_t w, size_t h, CUstream s) \
    { \
        return call(d, p, (t)v, w, h, s); \
    }
SET2D_WRAP(s8, unsigned char, cuMemsetD2D8_v2)
SET2D_WRAP(s8_ptds, unsigned char, cuMemsetD2D8_v2_ptds)
SET2D_WRAP(s16, unsigned short, cuMemsetD2D16_v2)
SET2D_WRAP(s16_ptds, unsigned short, cuMemsetD2D16_v2_ptds)
SET2D_WRAP(s32, unsigned int, cuMemsetD2D32_v2)
SET2D_WRAP(s32_ptds, unsigned int, cuMemsetD2D32_v2_ptds)
SET2D_ASYNC_WRAP(s8a, unsigned char, cuMemsetD2D8Async)
SET2D_ASYNC_WRAP(s8a_ptsz, unsigned char, cuMemsetD2D8Async_ptsz)
SET2D_ASYNC_WRAP(s16a, unsigned short, cuMemsetD2D16Async)
SET2D_ASYNC_WRAP(s16a_ptsz, unsigned short, cuMemsetD2D16Async_ptsz)
SET2D_ASYNC_WRAP(s32a, unsigned int, cuMemsetD2D32Async)
SET2D_ASYNC_WRAP(s32a_ptsz, unsigned int, cuMemsetD2D32Async_ptsz)

static const struct { const char *api; size_t elem; set2d_fn fn; } sets2d[] = {
    {"cuMemsetD2D8_v2", 1, s8}, {"cuMemsetD2D8_v2_ptds", 1, s8_ptds},
    {"cuMemsetD2D16_v2", 2, s16}, {"cuMemsetD2D16_v2_ptds", 2, s16_ptds},
    {"cuMemsetD2D32_v2", 4, s32}, {"cuMemsetD2D32_v2_ptds", 4, s32_ptds},
    {"cuMemsetD2D8Async", 1, s8a}, {"cuMemsetD2D8Async_ptsz", 1, s8a_ptsz},
    {"cuMemsetD2D16Async", 2, s16a}, {"cuMemsetD2D16Async_ptsz", 2, s16a_ptsz},
    {"cuMemsetD2D32Async", 4, s32a}, {"cuMemsetD2D32Async_ptsz", 4, s32a_ptsz},
};

Test(pitched, memsets_2d_set_exactly_their_rows)
{
    CUdeviceptr a;
    CUstream s;
    static unsigned char want[REGION];
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&a, REGION));
    for (size_t i = 0; i < N(sets2d); i++) {
        const size_t e = sets2d[i].elem, pitch = 512, w = 200 / e, h = 6, at = 64 + 4 * i;
        const uint32_t v = 0x01020304u * (uint32_t)(i + 1);
        OK(cuMemsetD8(a, 0xEE, REGION));
        memset(want, 0xEE, REGION);
        OK(sets2d[i].fn(a + at, pitch, v, w, h, s));
        for (size_t y = 0; y < h; y++)
            for (size_t k = 0; k < w; k++) memcpy(want + at + y * pitch + k * e, &v, e); /* little endian */
        OK(cuStreamSynchronize(s));
        OK(cuCtxSynchronize());
        assert_same(dev(a), want, REGION, sets2d[i].api);
    }
    cr_assert_eq(copy_stats(0).refused_memsets, 0);
    OK(cuMemFree(a));
}

/* ---------------------------------------------------------------- refused */

/* Every checked call with its bad span on `bad` (the other side fine: `good` or `host`). Each
 * touches SPAN bytes from bad: 2D 4 rows of 256 B 512 apart; 3D 2 slices of 2 such rows. */
#define SPAN ((size_t)3 * 512 + 256)
typedef CUresult (*call_fn)(CUdeviceptr bad, CUdeviceptr good, void *host, CUstream s);

typedef struct checked_call {
    const char *api;
    const char *role;
    bool memset;
    call_fn call;
} checked_call;

#define DEVS(p) S(CU_MEMORYTYPE_DEVICE, (p), 0, 0, 512)
#define UNIS(p) S(CU_MEMORYTYPE_UNIFIED, (uintptr_t)(p), 0, 0, 512)
#define HOSTS(p) S(CU_MEMORYTYPE_HOST, (uintptr_t)(p), 0, 0, 512)
#define DEV3(p) S3(CU_MEMORYTYPE_DEVICE, (p), 0, 0, 0, 512, 2)
#define HOST3(p) S3(CU_MEMORYTYPE_HOST, (uintptr_t)(p), 0, 0, 0, 512, 2)
static const shape SH2 = {256, 4, 1}, SH3 = {256, 2, 2};
/* 3-row slices, for copies of 3 rows or more. */
#define DEV3R(p) S3(CU_MEMORYTYPE_DEVICE, (p), 0, 0, 0, 512, 3)
#define HOST3R(p) S3(CU_MEMORYTYPE_HOST, (uintptr_t)(p), 0, 0, 0, 512, 3)

#define CALL(fn, body) \
    static CUresult fn(CUdeviceptr b, CUdeviceptr g, void *h, CUstream s) \
    { \
        (void)b, (void)g, (void)h, (void)s; \
        body; \
    }
CALL(c2d_dst, CUDA_MEMCPY2D c = d2(DEVS(b), HOSTS(h), SH2); return cuMemcpy2D_v2(&c))
CALL(c2d_src, CUDA_MEMCPY2D c = d2(DEVS(g), DEVS(b), SH2); return cuMemcpy2D_v2(&c))
CALL(c2d_ptds, CUDA_MEMCPY2D c = d2(HOSTS(h), DEVS(b), SH2); return cuMemcpy2D_v2_ptds(&c))
CALL(c2du, CUDA_MEMCPY2D c = d2(DEVS(b), DEVS(g), SH2); return cuMemcpy2DUnaligned_v2(&c))
CALL(c2du_ptds, CUDA_MEMCPY2D c = d2(UNIS(b), HOSTS(h), SH2); return cuMemcpy2DUnaligned_v2_ptds(&c))
CALL(c2da, CUDA_MEMCPY2D c = d2(HOSTS(h), UNIS(b), SH2); return cuMemcpy2DAsync_v2(&c, s))
CALL(c2da_ptsz, CUDA_MEMCPY2D c = d2(DEVS(b), HOSTS(h), SH2); return cuMemcpy2DAsync_v2_ptsz(&c, 0))
CALL(c3d, CUDA_MEMCPY3D c = d3(DEV3(b), HOST3(h), SH3); return cuMemcpy3D_v2(&c))
CALL(c3d_ptds, CUDA_MEMCPY3D c = d3(HOST3(h), DEV3(b), SH3); return cuMemcpy3D_v2_ptds(&c))
CALL(c3da, CUDA_MEMCPY3D c = d3(DEV3(g), DEV3(b), SH3); return cuMemcpy3DAsync_v2(&c, s))
CALL(c3da_ptsz, CUDA_MEMCPY3D c = d3(DEV3(b), DEV3(g), SH3); return cuMemcpy3DAsync_v2_ptsz(&c, 0))
CALL(c3p, CUDA_MEMCPY3D_PEER c = d3p(DEV3(b), DEV3(g), SH3); return cuMemcpy3DPeer(&c))
CALL(c3p_ptds, CUDA_MEMCPY3D_PEER c = d3p(HOST3(h), DEV3(b), SH3); return cuMemcpy3DPeer_ptds(&c))
CALL(c3pa, CUDA_MEMCPY3D_PEER c = d3p(DEV3(b), HOST3(h), SH3); return cuMemcpy3DPeerAsync(&c, s))
CALL(c3pa_ptsz, CUDA_MEMCPY3D_PEER c = d3p(DEV3(g), DEV3(b), SH3); return cuMemcpy3DPeerAsync_ptsz(&c, 0))
CALL(peer_dst, return cuMemcpyPeer(b, current(), g, current(), SPAN))
CALL(peer_src, return cuMemcpyPeer(g, current(), b, current(), SPAN))
CALL(peer_ptds, return cuMemcpyPeer_ptds(b, current(), g, current(), SPAN))
CALL(peera, return cuMemcpyPeerAsync(g, current(), b, current(), SPAN, s))
CALL(peera_ptsz, return cuMemcpyPeerAsync_ptsz(b, current(), g, current(), SPAN, 0))
CALL(set8, return cuMemsetD2D8_v2(b, 512, 0x77, 256, 4))
CALL(set8_ptds, return cuMemsetD2D8_v2_ptds(b, 512, 0x77, 256, 4))
CALL(set16, return cuMemsetD2D16_v2(b, 512, 0x7777, 128, 4))
CALL(set16_ptds, return cuMemsetD2D16_v2_ptds(b, 512, 0x7777, 128, 4))
CALL(set32, return cuMemsetD2D32_v2(b, 512, 0x77777777u, 64, 4))
CALL(set32_ptds, return cuMemsetD2D32_v2_ptds(b, 512, 0x77777777u, 64, 4))
CALL(set8a, return cuMemsetD2D8Async(b, 512, 0x77, 256, 4, s))
CALL(set8a_ptsz, return cuMemsetD2D8Async_ptsz(b, 512, 0x77, 256, 4, 0))
CALL(set16a, return cuMemsetD2D16Async(b, 512, 0x7777, 128, 4, s))
CALL(set16a_ptsz, return cuMemsetD2D16Async_ptsz(b, 512, 0x7777, 128, 4, 0))
CALL(set32a, return cuMemsetD2D32Async(b, 512, 0x77777777u, 64, 4, s))
CALL(set32a_ptsz, return cuMemsetD2D32Async_ptsz(b, 512, 0x77777777u, 64, 4, 0))

static const checked_call calls[] = {
    {"cuMemcpy2D_v2", "destination", false, c2d_dst},
    {"cuMemcpy2D_v2", "source", false, c2d_src},
    {"cuMemcpy2D_v2_ptds", "source", false, c2d_ptds},
    {"cuMemcpy2DUnaligned_v2", "destination", false, c2du},
    {"cuMemcpy2DUnaligned_v2_ptds", "destination", false, c2du_ptds},
    {"cuMemcpy2DAsync_v2", "source", false, c2da},
    {"cuMemcpy2DAsync_v2_ptsz", "destination", false, c2da_ptsz},
    {"cuMemcpy3D_v2", "destination", false, c3d},
    {"cuMemcpy3D_v2_ptds", "source", false, c3d_ptds},
    {"cuMemcpy3DAsync_v2", "source", false, c3da},
    {"cuMemcpy3DAsync_v2_ptsz", "destination", false, c3da_ptsz},
    {"cuMemcpy3DPeer", "destination", false, c3p},
    {"cuMemcpy3DPeer_ptds", "source", false, c3p_ptds},
    {"cuMemcpy3DPeerAsync", "destination", false, c3pa},
    {"cuMemcpy3DPeerAsync_ptsz", "source", false, c3pa_ptsz},
    {"cuMemcpyPeer", "destination", false, peer_dst},
    {"cuMemcpyPeer", "source", false, peer_src},
    {"cuMemcpyPeer_ptds", "destination", false, peer_ptds},
    {"cuMemcpyPeerAsync", "source", false, peera},
    {"cuMemcpyPeerAsync_ptsz", "destination", false, peera_ptsz},
    {"cuMemsetD2D8_v2", "destination", true, set8},
    {"cuMemsetD2D8_v2_ptds", "destination", true, set8_ptds},
    {"cuMemsetD2D16_v2", "destination", true, set16},
    {"cuMemsetD2D16_v2_ptds", "destination", true, set16_ptds},
    {"cuMemsetD2D32_v2", "destination", true, set32},
    {"cuMemsetD2D32_v2_ptds", "destination", true, set32_ptds},
    {"cuMemsetD2D8Async", "destination", true, set8a},
    {"cuMemsetD2D8Async_ptsz", "destination", true, set8a_ptsz},
    {"cuMemsetD2D16Async", "destination", true, set16a},
    {"cuMemsetD2D16Async_ptsz", "destination", true, set16a_ptsz},
    {"cuMemsetD2D32Async", "destination", true, set32a},
    {"cuMemsetD2D32Async_ptsz", "destination", true, set32a_ptsz},
};

static char *line_with(const char *log, const char *needle)
{
    const char *hit = strstr(log, needle);
    if (!hit) return NULL;
    const char *start = hit;
    while (start > log && start[-1] != '\n') start--;
    return strndup(start, strcspn(start, "\n"));
}

/* Whether the pc at the start of `text` ("0x...") lies in this test program: the logged stack
 * starts at the program's own call. */
static bool in_this_program(const char *text)
{
    Dl_info pc_info, self;
    void *pc = (void *)(uintptr_t)strtoull(text, NULL, 16);
    if (!dladdr((char *)pc - 1, &pc_info) || !dladdr((void *)(uintptr_t)&in_this_program, &self)) return false;
    return pc_info.dli_fbase == self.dli_fbase;
}

/* Runs `c` and checks the refusal: the code, one line naming the call, the role, the span's
 * start and `words`, a stack under it from this program's call, and no copy reaching the
 * driver. */
static void assert_refused(const checked_call *c, CUdeviceptr bad, CUdeviceptr good, void *host, CUstream s,
                           const char *words)
{
    char want[160];
    fakecuda_reset_counters();
    stderr_capture cap;
    capture_begin(&cap);
    CUresult r = c->call(bad, good, host, s);
    char *err = capture_end(&cap);
    cr_assert_eq(r, CUDA_ERROR_INVALID_VALUE, "%s (%s): %d, want CUDA_ERROR_INVALID_VALUE; stderr:\n%s", c->api,
                 c->role, r, err);
    cr_assert_eq(counters().copy_calls, 0, "%s reached the driver", c->api);
    cr_assert_eq(api_count_lines(err, "refused with CUDA_ERROR_INVALID_VALUE"), 1, "one refusal line expected:\n%s",
                 err);
    snprintf(want, sizeof want, "gpumem: %s: %s %#llx + %zu bytes ", c->api, c->role, (unsigned long long)bad, SPAN);
    char *line = line_with(err, want);
    cr_assert_not_null(line, "no line starting '%s' in:\n%s", want, err);
    cr_assert(strstr(line, words), "the line does not say '%s': %s", words, line);
    const char *frame0 = strstr(err, "\n    #0 0x");
    cr_assert_not_null(frame0, "no stack under the line:\n%s", err);
    cr_assert(in_this_program(frame0 + strlen("\n    #0 ")), "frame #0 is not in this program:\n%s", err);
    free(line);
    free(err);
}

static void refused_counts(size_t *copies, size_t *memsets)
{
    *copies = *memsets = 0;
    for (size_t i = 0; i < N(calls); i++) ++*(calls[i].memset ? memsets : copies);
}

Test(pitched, every_entry_point_refuses_freed_pool_memory)
{
    CUdeviceptr keep, p;
    CUstream s;
    static unsigned char host[8192];
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&keep, 4096)); /* keeps the segment: the freed block stays pool memory */
    OK(cuMemAlloc(&p, 4096));
    OK(cuMemsetD8(p, 0x11, 4096));
    OK(cuMemFree(p));
    for (size_t i = 0; i < N(calls); i++) assert_refused(&calls[i], p, keep, host, s, "lies in freed pool memory");
    OK(cuStreamSynchronize(s));
    OK(cuCtxSynchronize());
    cr_assert(api_all_bytes(dev(p), 0x11, 4096), "a refused call wrote the freed block");
    size_t copies, memsets;
    refused_counts(&copies, &memsets);
    gpumem_copy_stats st = copy_stats(0);
    cr_assert_eq(st.refused_copies, copies);
    cr_assert_eq(st.refused_memsets, memsets);
    for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++) cr_assert_eq(st.total[d].calls, 0, "a refused copy was counted");
    OK(cuMemFree(keep));
}

Test(pitched, every_entry_point_refuses_a_span_past_the_requested_end)
{
    CUdeviceptr good, p;
    CUstream s;
    static unsigned char host[8192];
    char words[160];
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&good, 8192));
    OK(cuMemAlloc(&p, SPAN - 4)); /* the last row ends 4 bytes past, inside the block's slack */
    snprintf(words, sizeof words, "runs 4 bytes past the end of its allocation %#llx (%zu bytes)",
             (unsigned long long)p, SPAN - 4);
    for (size_t i = 0; i < N(calls); i++) assert_refused(&calls[i], p, good, host, s, words);
    gpumem_copy_stats st = copy_stats(0);
    cr_assert_eq(st.refused_copies + st.refused_memsets, N(calls));
    OK(cuStreamSynchronize(s));
    OK(cuMemFree(p));
    OK(cuMemFree(good));
}

/* The span is what counts, not the first row: each row of these starts inside block a, or the
 * last one lies wholly in its neighbour b, which must stay untouched. */
Test(pitched, a_last_row_past_the_end_is_refused_and_the_neighbour_untouched)
{
    CUdeviceptr a, b;
    static unsigned char host[8192];
    api_start();
    OK(cuMemAlloc(&a, 4096));
    OK(cuMemAlloc(&b, 4096));
    cr_assert_eq(b, a + 4096, "blocks are expected to be adjacent in the segment");
    OK(cuMemsetD8(b, 0x55, 4096));
    stderr_capture cap;
    capture_begin(&cap);
    /* 5 rows of 600 B, 1024 apart: the last row is [a+4096, a+4696), all of it in b. */
    CUDA_MEMCPY2D c = d2(S(CU_MEMORYTYPE_DEVICE, a, 0, 0, 1024), S(CU_MEMORYTYPE_HOST, (uintptr_t)host, 0, 0, 1024),
                         (shape){600, 5, 1});
    ERR(cuMemcpy2D_v2(&c), CUDA_ERROR_INVALID_VALUE);
    c = d2(S(CU_MEMORYTYPE_DEVICE, a, 100, 1, 1000), S(CU_MEMORYTYPE_DEVICE, b + 2048, 0, 0, 100),
           (shape){100, 3, 1}); /* rows at a+1100, a+2100, a+3100 fine; source fine */
    OK(cuMemcpy2D_v2(&c));
    c.Height = 4; /* the fourth row, a+4100, is in b */
    ERR(cuMemcpy2D_v2(&c), CUDA_ERROR_INVALID_VALUE);
    /* 3 slices of 2 rows, 1024 apart: the third slice is in b. */
    CUDA_MEMCPY3D c3 = d3(S3(CU_MEMORYTYPE_DEVICE, a, 0, 0, 0, 1024, 2),
                          S3(CU_MEMORYTYPE_HOST, (uintptr_t)host, 0, 0, 0, 1024, 2), (shape){600, 1, 3});
    ERR(cuMemcpy3D_v2(&c3), CUDA_ERROR_INVALID_VALUE);
    c3.Depth = 2;
    OK(cuMemcpy3D_v2(&c3));
    ERR(cuMemsetD2D8_v2(a, 1024, 0x99, 600, 5), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemsetD2D32_v2(a + 3072, 1024, 0x99999999u, 1, 2), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemcpyPeer(a + 4000, current(), b, current(), 97), CUDA_ERROR_INVALID_VALUE);
    OK(cuCtxSynchronize());
    char *err = capture_end(&cap);
    cr_assert(strstr(err, "gpumem: cuMemcpy2D_v2: destination "), "%s", err);
    cr_assert(strstr(err, "+ 4696 bytes runs 600 bytes past the end of its allocation"), "%s", err);
    cr_assert_eq(api_count_lines(err, "refused with CUDA_ERROR_INVALID_VALUE"), 6, "%s", err);
    cr_assert(api_all_bytes(dev(b), 0x55, 4096), "a refused copy wrote the neighbour");
    gpumem_copy_stats st = copy_stats(0);
    cr_assert_eq(st.refused_copies, 4);
    cr_assert_eq(st.refused_memsets, 2);
    free(err);
    OK(cuMemFree(a));
    OK(cuMemFree(b));
}

/* ---------------------------------------------------------------- the driver's own answers */

/* What the driver refuses anyway reaches it, unlogged, so the program gets the driver's code. */
static void assert_forwarded(CUresult got, CUresult want, uint64_t copy_calls, const char *what)
{
    cr_assert_eq(got, want, "%s: %d, want %d", what, got, want);
    cr_assert_eq(counters().copy_calls, copy_calls, "%s: did not reach the driver", what);
}

Test(pitched, descriptors_the_driver_refuses_get_its_own_answer)
{
    CUdeviceptr keep, p;
    static unsigned char host[8192];
    api_start();
    OK(cuMemAlloc(&keep, 4096));
    OK(cuMemAlloc(&p, 4096));
    OK(cuMemFree(p));
    stderr_capture cap;
    capture_begin(&cap);
    fakecuda_reset_counters();
    assert_forwarded(cuMemcpy2D_v2(NULL), CUDA_ERROR_INVALID_VALUE, 1, "NULL descriptor");
    assert_forwarded(cuMemcpy3DPeerAsync(NULL, 0), CUDA_ERROR_INVALID_VALUE, 2, "NULL 3D peer descriptor");
    /* Rows longer than their pitch, into freed pool memory: the driver's error, not ours. */
    CUDA_MEMCPY2D c = d2(S(CU_MEMORYTYPE_DEVICE, p, 0, 0, 512), HOSTS(host), (shape){600, 3, 1});
    assert_forwarded(cuMemcpy2D_v2(&c), CUDA_ERROR_INVALID_VALUE, 3, "width > pitch");
    c = d2(S(CU_MEMORYTYPE_DEVICE, p, 0, 0, 512), HOSTS(host), (shape){256, 4, 1});
    c.dstMemoryType = (CUmemorytype)7;
    assert_forwarded(cuMemcpy2DAsync_v2(&c, 0), CUDA_ERROR_INVALID_VALUE, 4, "unknown memory type");
    /* Slices shorter than Height. */
    CUDA_MEMCPY3D c3 = d3(S3(CU_MEMORYTYPE_DEVICE, p, 0, 0, 0, 512, 1), HOST3(host), (shape){256, 2, 2});
    assert_forwarded(cuMemcpy3D_v2(&c3), CUDA_ERROR_INVALID_VALUE, 5, "srcHeight < Height");
    /* An array side is not pool memory: the fake has no arrays, so its answer is its own. */
    c = d2(S(CU_MEMORYTYPE_ARRAY, p, 0, 0, 0), DEVS(keep), SH2);
    assert_forwarded(cuMemcpy2D_v2(&c), CUDA_ERROR_INVALID_HANDLE, 6, "array destination");
    /* A 2D memset whose rows are longer than the pitch. */
    ERR(cuMemsetD2D8_v2(p, 100, 1, 200, 3), CUDA_ERROR_INVALID_VALUE);
    /* Nothing touched: fine anywhere. */
    OK(cuMemsetD2D8_v2(p, 512, 1, 0, 3));
    c = d2(DEVS(p), HOSTS(host), (shape){256, 0, 1});
    OK(cuMemcpy2D_v2(&c));
    char *err = capture_end(&cap);
    cr_assert_eq(err[0], '\0', "nothing is logged for what the driver refuses:\n%s", err);
    free(err);
    /* But the other side of a copy with an array side is still checked. */
    capture_begin(&cap);
    fakecuda_reset_counters();
    c = d2(S(CU_MEMORYTYPE_ARRAY, keep, 0, 0, 0), DEVS(p), SH2);
    ERR(cuMemcpy2D_v2(&c), CUDA_ERROR_INVALID_VALUE);
    cr_assert_eq(counters().copy_calls, 0);
    err = capture_end(&cap);
    cr_assert(strstr(err, "gpumem: cuMemcpy2D_v2: source "), "%s", err);
    gpumem_copy_stats st = copy_stats(0);
    cr_assert_eq(st.refused_copies, 1);
    cr_assert_eq(st.refused_memsets, 0);
    for (int d = 0; d < GPUMEM_COPY_DIRECTIONS; d++)
        cr_assert_eq(st.total[d].calls, d == GPUMEM_COPY_H2D ? 1 : 0, "only the empty copy was accepted");
    free(err);
    OK(cuMemFree(keep));
}

Test(pitched, check_off_lets_everything_through)
{
    setenv("GPUMEM_CHECK_COPIES", "0", 1);
    CUdeviceptr keep, p;
    static unsigned char host[8192];
    api_start();
    OK(cuMemAlloc(&keep, 4096));
    OK(cuMemAlloc(&p, 4096));
    OK(cuMemFree(p));
    stderr_capture cap;
    capture_begin(&cap);
    fakecuda_reset_counters();
    CUDA_MEMCPY2D c = d2(DEVS(p), HOSTS(host), SH2);
    OK(cuMemcpy2D_v2(&c));
    OK(cuMemcpyPeer(p, current(), keep, current(), 100));
    OK(cuMemsetD2D8_v2(p, 512, 1, 256, 4));
    char *err = capture_end(&cap);
    cr_assert_eq(err[0], '\0', "%s", err);
    cr_assert_eq(counters().copy_calls, 2);
    gpumem_copy_stats st = copy_stats(0);
    cr_assert_eq(st.refused_copies + st.refused_memsets, 0);
    cr_assert_eq(st.total[GPUMEM_COPY_H2D].bytes, 256 * 4);
    cr_assert_eq(st.total[GPUMEM_COPY_D2D].bytes, 100);
    free(err);
    OK(cuMemFree(keep));
}

/* ---------------------------------------------------------------- counters */

Test(pitched, counted_per_direction_kind_and_timing)
{
    CUdeviceptr a, b;
    CUstream s;
    static unsigned char page[16384], page2[16384];
    void *pin = NULL;
    gpumem_copy_stats want;
    memset(&want, 0, sizeof want);
    const gpumem_host_memory PG = GPUMEM_HOST_PAGEABLE, PN = GPUMEM_HOST_PINNED;
    const gpumem_copy_direction H2D = GPUMEM_COPY_H2D, D2H = GPUMEM_COPY_D2H, D2D = GPUMEM_COPY_D2D,
                                H2H = GPUMEM_COPY_H2H;
    api_start();
    OK(cuStreamCreate(&s, 0));
    OK(cuMemAlloc(&a, 16384));
    OK(cuMemAlloc(&b, 16384));
    OK(cuMemHostAlloc(&pin, 16384, 0));
    const shape sh = {100, 7, 1}, sh3 = {50, 3, 4};
    CUDA_MEMCPY2D c = d2(DEVS(a), HOSTS(page), sh);
    OK(cuMemcpy2D_v2(&c));                      expect(&want, H2D, PG, 700, true);
    c = d2(DEVS(a), HOSTS(pin), sh);
    OK(cuMemcpy2DAsync_v2(&c, s));              expect(&want, H2D, PN, 700, false);
    c = d2(HOSTS(page), DEVS(b), sh);
    OK(cuMemcpy2DUnaligned_v2_ptds(&c));        expect(&want, D2H, PG, 700, true);
    c = d2(HOSTS(pin), DEVS(b), sh);
    OK(cuMemcpy2D_v2_ptds(&c));                 expect(&want, D2H, PN, 700, true);
    c = d2(DEVS(b), DEVS(a), sh);
    OK(cuMemcpy2DAsync_v2_ptsz(&c, s));         expect(&want, D2D, PG, 700, false);
    /* Unified sides are classified: pool memory is device memory, the driver knows pinned. */
    c = d2(UNIS(page2), UNIS(page), sh);
    OK(cuMemcpy2D_v2(&c));                      expect(&want, H2H, PG, 700, true);
    c = d2(UNIS(a), UNIS(pin), sh);
    OK(cuMemcpy2D_v2(&c));                      expect(&want, H2D, PN, 700, true);
    c = d2(UNIS(page), UNIS(b), sh);
    OK(cuMemcpy2DAsync_v2(&c, s));              expect(&want, D2H, PG, 700, false);
    CUDA_MEMCPY3D c3 = d3(DEV3R(a), HOST3R(page), sh3);
    OK(cuMemcpy3D_v2(&c3));                     expect(&want, H2D, PG, 600, true);
    c3 = d3(HOST3R(pin), DEV3R(b), sh3);
    OK(cuMemcpy3DAsync_v2_ptsz(&c3, s));        expect(&want, D2H, PN, 600, false);
    CUDA_MEMCPY3D_PEER c3p = d3p(DEV3R(b), DEV3R(a), sh3);
    OK(cuMemcpy3DPeer(&c3p));                   expect(&want, D2D, PG, 600, true);
    c3p = d3p(HOST3R(page), DEV3R(a), sh3);
    OK(cuMemcpy3DPeerAsync(&c3p, s));           expect(&want, D2H, PG, 600, false);
    OK(cuMemcpyPeer(b, current(), a, current(), 300));           expect(&want, D2D, PG, 300, true);
    OK(cuMemcpyPeerAsync_ptsz(b, current(), a, current(), 30, s)); expect(&want, D2D, PG, 30, false);
    /* Memsets are checked, not counted; what the driver refuses does not count. */
    OK(cuMemsetD2D8_v2(a, 512, 1, 100, 3));
    c = d2(DEVS(a), HOSTS(page), (shape){600, 3, 1});
    ERR(cuMemcpy2D_v2(&c), CUDA_ERROR_INVALID_VALUE);
    stderr_capture cap;
    capture_begin(&cap);
    c = d2(S(CU_MEMORYTYPE_DEVICE, a, 0, 0, 4096), HOSTS(page), (shape){100, 5, 1}); /* past the end */
    ERR(cuMemcpy2D_v2(&c), CUDA_ERROR_INVALID_VALUE);
    free(capture_end(&cap));
    want.refused_copies = 1;
    OK(cuStreamSynchronize(s));
    OK(cuCtxSynchronize());
    gpumem_copy_stats got = copy_stats(0);
    assert_stats(&got, &want);
    OK(cuMemFreeHost(pin));
    OK(cuMemFree(a));
    OK(cuMemFree(b));
}

/* ---------------------------------------------------------------- peer copies across devices */

Test(pitched, peer_copies_between_two_contexts_work_and_are_checked)
{
    setenv("FAKECUDA_DEVICES", "2", 1);
    CUdevice d0, d1;
    CUcontext c0, c1;
    CUdeviceptr a0, f0, a1;
    static unsigned char page[8192], back[8192];
    OK(cuInit(0));
    OK(cuDeviceGet(&d0, 0));
    OK(cuDeviceGet(&d1, 1));
    OK(cuDevicePrimaryCtxRetain(&c0, d0));
    OK(cuDevicePrimaryCtxRetain(&c1, d1));
    OK(cuCtxSetCurrent(c0));
    OK(cuMemAlloc(&a0, 4096));
    OK(cuMemAlloc(&f0, 4096));
    OK(cuMemFree(f0));
    api_fill_pattern(page, 4096, 42);
    OK(cuMemcpyHtoD(a0, page, 4096));
    OK(cuCtxSetCurrent(c1));
    OK(cuMemAlloc(&a1, 3000));
    OK(cuMemsetD8(a1, 0, 3000));
    /* Device 0 -> device 1 while device 1 is current, then back into a fresh part of a0. */
    OK(cuMemcpyPeer(a1, c1, a0, c0, 3000));
    OK(cuMemcpyPeerAsync(a0 + 3000, c0, a1 + 2000, c1, 1000, 0));
    OK(cuCtxSynchronize());
    OK(cuCtxSetCurrent(c0));
    OK(cuCtxSynchronize());
    OK(cuCtxSetCurrent(c1));
    cr_assert_eq(api_check_pattern(dev(a1), 3000, 42), 3000, "the peer copy moved the wrong bytes");
    memcpy(back, dev(a0) + 3000, 1000);
    cr_assert_eq(memcmp(back, page + 2000, 1000), 0, "the peer copy back moved the wrong bytes");
    /* A 3D peer copy across the two contexts: 2 slices of 3 rows of 64 B. */
    OK(cuMemsetD8(a1, 0xAB, 3000));
    side dst = {CU_MEMORYTYPE_DEVICE, a1, 4, 0, 0, 100, 3, c1}, src = {CU_MEMORYTYPE_DEVICE, a0, 0, 1, 0, 128, 4, c0};
    CUDA_MEMCPY3D_PEER p = d3p(dst, src, (shape){64, 3, 2});
    static unsigned char want[3000];
    memset(want, 0xAB, sizeof want);
    model(want, &dst, dev(a0), &src, (shape){64, 3, 2});
    OK(cuMemcpy3DPeer(&p));
    assert_same(dev(a1), want, 3000, "3D peer copy");
    /* Checked on both sides, whichever context each belongs to. */
    stderr_capture cap;
    capture_begin(&cap);
    ERR(cuMemcpyPeer(a1, c1, f0, c0, 64), CUDA_ERROR_INVALID_VALUE);         /* freed source on device 0 */
    ERR(cuMemcpyPeer(a1 + 2990, c1, a0, c0, 64), CUDA_ERROR_INVALID_VALUE);  /* past a1's end */
    p.Depth = 11; /* the destination's span runs to a1 + 3268 */
    ERR(cuMemcpy3DPeer(&p), CUDA_ERROR_INVALID_VALUE);
    char *err = capture_end(&cap);
    cr_assert(strstr(err, "gpumem: cuMemcpyPeer: source "), "%s", err);
    cr_assert(strstr(err, "lies in freed pool memory"), "%s", err);
    cr_assert(strstr(err, "gpumem: cuMemcpyPeer: destination "), "%s", err);
    cr_assert(strstr(err, "gpumem: cuMemcpy3DPeer: destination "), "%s", err);
    free(err);
    /* Counted on the destination's device. */
    gpumem_copy_stats s0 = copy_stats(0), s1 = copy_stats(1);
    cr_assert_eq(s1.total[GPUMEM_COPY_D2D].calls, 2);
    cr_assert_eq(s1.total[GPUMEM_COPY_D2D].bytes, 3000 + 64 * 3 * 2);
    cr_assert_eq(s0.total[GPUMEM_COPY_D2D].calls, 1);
    cr_assert_eq(s0.total[GPUMEM_COPY_D2D].bytes, 1000);
    cr_assert_eq(s0.refused_copies, 1, "the freed source is device 0's");
    cr_assert_eq(s1.refused_copies, 2);
    OK(cuMemFree(a1));
    OK(cuCtxSetCurrent(c0));
    OK(cuMemFree(a0));
}

/* ---------------------------------------------------------------- cuGetProcAddress */

static bool from_shim(void *fn)
{
    Dl_info info;
    return fn && dladdr(fn, &info) && info.dli_fname && strstr(info.dli_fname, "libgpumem_shim");
}

Test(pitched, cuGetProcAddress_hands_out_every_hook)
{
    static const struct { const char *base, *exported; cuuint64_t flags; } rows[] = {
        {"cuMemcpy2D", "cuMemcpy2D_v2", 0},
        {"cuMemcpy2D", "cuMemcpy2D_v2_ptds", 2},
        {"cuMemcpy2DUnaligned", "cuMemcpy2DUnaligned_v2", 0},
        {"cuMemcpy2DUnaligned", "cuMemcpy2DUnaligned_v2_ptds", 2},
        {"cuMemcpy2DAsync", "cuMemcpy2DAsync_v2", 0},
        {"cuMemcpy2DAsync", "cuMemcpy2DAsync_v2_ptsz", 2},
        {"cuMemcpy3D", "cuMemcpy3D_v2", 0},
        {"cuMemcpy3D", "cuMemcpy3D_v2_ptds", 2},
        {"cuMemcpy3DAsync", "cuMemcpy3DAsync_v2", 0},
        {"cuMemcpy3DAsync", "cuMemcpy3DAsync_v2_ptsz", 2},
        {"cuMemcpy3DPeer", "cuMemcpy3DPeer", 0},
        {"cuMemcpy3DPeer", "cuMemcpy3DPeer_ptds", 2},
        {"cuMemcpy3DPeerAsync", "cuMemcpy3DPeerAsync", 0},
        {"cuMemcpy3DPeerAsync", "cuMemcpy3DPeerAsync_ptsz", 2},
        {"cuMemcpyPeer", "cuMemcpyPeer", 0},
        {"cuMemcpyPeer", "cuMemcpyPeer_ptds", 2},
        {"cuMemcpyPeerAsync", "cuMemcpyPeerAsync", 0},
        {"cuMemcpyPeerAsync", "cuMemcpyPeerAsync_ptsz", 2},
        {"cuMemsetD2D8", "cuMemsetD2D8_v2", 0},
        {"cuMemsetD2D8", "cuMemsetD2D8_v2_ptds", 2},
        {"cuMemsetD2D16", "cuMemsetD2D16_v2", 0},
        {"cuMemsetD2D16", "cuMemsetD2D16_v2_ptds", 2},
        {"cuMemsetD2D32", "cuMemsetD2D32_v2", 0},
        {"cuMemsetD2D32", "cuMemsetD2D32_v2_ptds", 2},
        {"cuMemsetD2D8Async", "cuMemsetD2D8Async", 0},
        {"cuMemsetD2D8Async", "cuMemsetD2D8Async_ptsz", 2},
        {"cuMemsetD2D16Async", "cuMemsetD2D16Async", 0},
        {"cuMemsetD2D16Async", "cuMemsetD2D16Async_ptsz", 2},
        {"cuMemsetD2D32Async", "cuMemsetD2D32Async", 0},
        {"cuMemsetD2D32Async", "cuMemsetD2D32Async_ptsz", 2},
    };
    api_start();
    for (size_t i = 0; i < N(rows); i++) {
        void *fn = NULL;
        CUdriverProcAddressQueryResult q = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
        OK(cuGetProcAddress_v2(rows[i].base, &fn, 13000, rows[i].flags, &q));
        cr_assert_eq(q, CU_GET_PROC_ADDRESS_SUCCESS, "%s", rows[i].base);
        cr_assert(from_shim(fn), "cuGetProcAddress(%s, flags %llu) is not the shim's", rows[i].base,
                  (unsigned long long)rows[i].flags);
        cr_assert_eq(fn, api_shim_sym(rows[i].exported), "cuGetProcAddress(%s, flags %llu) is not %s",
                     rows[i].base, (unsigned long long)rows[i].flags, rows[i].exported);
    }
}
