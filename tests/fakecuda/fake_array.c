/* CUDA arrays: cuArrayCreate, cuArray3DCreate, cuMipmappedArrayCreate, their destroys and
 * cuArrayGetMemoryRequirements (and the mipmapped one). An array is opaque device memory of its
 * context: it counts against the device's capacity like every device allocation, fault injection
 * included, and goes with its context. Its bytes are never laid out (nothing the tests do copies
 * into an array), so a record holds the descriptor, the footprint and the owner. The footprint is
 * the texel bytes of every level rounded up to ARRAY_GRANULE: the real driver takes more than the
 * texels too (on the H200 its free memory fell by 1.0-1.45x them). As the real driver (measured on
 * the H200, and documented), the memory requirements are answered only for an array made with
 * CUDA_ARRAY3D_DEFERRED_MAPPING, which has no memory of its own until the program maps some into
 * it: such an array takes no capacity. */
#include "fake_internal.h"

#include <stdlib.h>

#define ARRAY_GRANULE ((size_t)64 << 10)

typedef struct fk_array {
    struct fk_array *next;
    uint64_t id;                   /* the handle's value */
    CUDA_ARRAY3D_DESCRIPTOR desc;
    unsigned levels;               /* 0: a plain array; else a mipmapped one of this many levels */
    size_t size;                   /* the footprint */
    int dev;
    fk_ctx *ctx;
} fk_array;

static fk_array *arrays;

static size_t array_format_bytes(CUarray_format f)
{
    switch (f) {
    case CU_AD_FORMAT_UNSIGNED_INT8:
    case CU_AD_FORMAT_SIGNED_INT8: return 1;
    case CU_AD_FORMAT_UNSIGNED_INT16:
    case CU_AD_FORMAT_SIGNED_INT16:
    case CU_AD_FORMAT_HALF: return 2;
    case CU_AD_FORMAT_UNSIGNED_INT32:
    case CU_AD_FORMAT_SIGNED_INT32:
    case CU_AD_FORMAT_FLOAT: return 4;
    default: return 0;
    }
}

static size_t at_least_one(size_t v) { return v ? v : 1; }

/* Texel bytes of all levels (a plain array is its level 0); 0 when the descriptor is invalid
 * or the size does not fit. */
static size_t array_bytes(const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned levels)
{
    size_t texel = array_format_bytes(d->Format);
    if (!texel || !d->Width || (d->NumChannels != 1 && d->NumChannels != 2 && d->NumChannels != 4))
        return 0;
    size_t w = d->Width, h = at_least_one(d->Height), z = at_least_one(d->Depth), total = 0;
    for (unsigned l = 0; l < (levels ? levels : 1); l++) {
        size_t n;
        if (__builtin_mul_overflow(w, h, &n) || __builtin_mul_overflow(n, z, &n) ||
            __builtin_mul_overflow(n, texel * d->NumChannels, &n) || __builtin_add_overflow(total, n, &total))
            return 0;
        w = w > 1 ? w / 2 : 1;
        h = h > 1 ? h / 2 : 1;
        if (!(d->Flags & CUDA_ARRAY3D_LAYERED)) z = z > 1 ? z / 2 : 1; /* layers do not shrink */
    }
    return total > SIZE_MAX - ARRAY_GRANULE ? 0 : fk_round_up(total, ARRAY_GRANULE);
}

static bool array_deferred(const CUDA_ARRAY3D_DESCRIPTOR *d) { return d->Flags & CUDA_ARRAY3D_DEFERRED_MAPPING; }

/* What an array takes from its device's capacity: nothing while its memory is deferred. */
static size_t array_charge(const fk_array *a) { return array_deferred(&a->desc) ? 0 : a->size; }

static CUresult array_create(const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned levels, uint64_t *id)
{
    CUresult r = state_enter();
    if (r)
        return r;
    g_cnt.alloc_calls++;
    size_t size = d ? array_bytes(d, levels) : 0;
    if (!id || !size)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    size_t charge = array_deferred(d) ? 0 : size;
    if (state_alloc_fault() || charge > g_capacity || g_dev[c->dev].in_use > g_capacity - charge)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    fk_array *a = calloc(1, sizeof *a);
    if (!a)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    *a = (fk_array){arrays, g_next_id++, *d, levels, size, c->dev, c};
    arrays = a;
    g_dev[c->dev].in_use += array_charge(a);
    *id = a->id;
    return state_leave(CUDA_SUCCESS);
}

/* The live array of handle `id` made as a plain (levels 0) or mipmapped array; NULL if none. */
static fk_array **array_find(uint64_t id, bool mipmapped)
{
    for (fk_array **pp = &arrays; *pp; pp = &(*pp)->next)
        if ((*pp)->id == id && ((*pp)->levels != 0) == mipmapped)
            return pp;
    return NULL;
}

static void array_release(fk_array **pp)
{
    fk_array *a = *pp;
    *pp = a->next;
    g_dev[a->dev].in_use -= array_charge(a);
    free(a);
}

static CUresult array_destroy(uint64_t id, bool mipmapped)
{
    CUresult r = state_enter();
    if (r)
        return r;
    g_cnt.free_calls++;
    fk_array **pp = array_find(id, mipmapped);
    if (!pp)
        return state_leave(CUDA_ERROR_INVALID_HANDLE);
    array_release(pp);
    return state_leave(CUDA_SUCCESS);
}

static CUresult array_requirements(CUDA_ARRAY_MEMORY_REQUIREMENTS *req, uint64_t id, bool mipmapped,
                                   CUdevice dev)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!req)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_array **pp = array_find(id, mipmapped);
    if (!pp)
        return state_leave(CUDA_ERROR_INVALID_HANDLE);
    if (!dev_ok(dev) || (*pp)->dev != dev)
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    if (!array_deferred(&(*pp)->desc))
        return state_leave(CUDA_ERROR_INVALID_VALUE); /* the driver answers deferred arrays only */
    *req = (CUDA_ARRAY_MEMORY_REQUIREMENTS){.size = (*pp)->size, .alignment = ARRAY_GRANULE};
    return state_leave(CUDA_SUCCESS);
}

/* Context teardown (fake_ctx.c, g_mu held): the context's arrays go with it. */
void array_free_ctx(fk_ctx *c)
{
    for (fk_array **pp = &arrays; *pp;) {
        if ((*pp)->ctx == c) array_release(pp);
        else pp = &(*pp)->next;
    }
}

/* A fork child's fresh driver (fake_state.c): the parent's arrays are not its own. Dropped like
 * the other registries there (the device's in_use is reset with them). */
void array_forget_in_child(void)
{
    arrays = NULL;
}

/* ================================================================ entry points */

FK_API CUresult CUDAAPI cuArrayCreate(CUarray *handle, const CUDA_ARRAY_DESCRIPTOR *d)
{
    CUDA_ARRAY3D_DESCRIPTOR d3 = {0};
    if (d)
        d3 = (CUDA_ARRAY3D_DESCRIPTOR){.Width = d->Width, .Height = d->Height, .Format = d->Format,
                                       .NumChannels = d->NumChannels};
    uint64_t id = 0;
    CUresult r = array_create(d ? &d3 : NULL, 0, handle ? &id : NULL);
    if (r == CUDA_SUCCESS)
        *handle = (CUarray)(uintptr_t)id;
    return r;
}

FK_API CUresult CUDAAPI cuArray3DCreate(CUarray *handle, const CUDA_ARRAY3D_DESCRIPTOR *d)
{
    uint64_t id = 0;
    CUresult r = array_create(d, 0, handle ? &id : NULL);
    if (r == CUDA_SUCCESS)
        *handle = (CUarray)(uintptr_t)id;
    return r;
}

FK_API CUresult CUDAAPI cuArrayDestroy(CUarray handle)
{
    return array_destroy((uint64_t)(uintptr_t)handle, false);
}

FK_API CUresult CUDAAPI cuMipmappedArrayCreate(CUmipmappedArray *handle, const CUDA_ARRAY3D_DESCRIPTOR *d,
                                               unsigned int levels)
{
    uint64_t id = 0;
    CUresult r = levels ? array_create(d, levels, handle ? &id : NULL) : CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS)
        *handle = (CUmipmappedArray)(uintptr_t)id;
    return r;
}

FK_API CUresult CUDAAPI cuMipmappedArrayDestroy(CUmipmappedArray handle)
{
    return array_destroy((uint64_t)(uintptr_t)handle, true);
}

FK_API CUresult CUDAAPI cuArrayGetMemoryRequirements(CUDA_ARRAY_MEMORY_REQUIREMENTS *req, CUarray array,
                                                     CUdevice dev)
{
    return array_requirements(req, (uint64_t)(uintptr_t)array, false, dev);
}

FK_API CUresult CUDAAPI cuMipmappedArrayGetMemoryRequirements(CUDA_ARRAY_MEMORY_REQUIREMENTS *req,
                                                              CUmipmappedArray mipmap, CUdevice dev)
{
    return array_requirements(req, (uint64_t)(uintptr_t)mipmap, true, dev);
}

/* ================================================================ cuGetProcAddress rows */

#define ARRAY_PROCS(X)                                                                        \
    X("cuArrayCreate", 3020, 0, cuArrayCreate_v2)                                             \
    X("cuArray3DCreate", 3020, 0, cuArray3DCreate_v2)                                         \
    X("cuArrayDestroy", 2000, 0, cuArrayDestroy)                                              \
    X("cuMipmappedArrayCreate", 5000, 0, cuMipmappedArrayCreate)                              \
    X("cuMipmappedArrayDestroy", 5000, 0, cuMipmappedArrayDestroy)                            \
    X("cuArrayGetMemoryRequirements", 11060, 0, cuArrayGetMemoryRequirements)                 \
    X("cuMipmappedArrayGetMemoryRequirements", 11060, 0, cuMipmappedArrayGetMemoryRequirements)
FK_PROC_TABLE(array_procs, ARRAY_PROCS);
