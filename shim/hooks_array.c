/* CUDA arrays (cudaMallocArray, cudaMalloc3DArray, cudaMallocMipmappedArray, textures and
 * surfaces): device memory the pool never serves, counted like every other allocation in the
 * limit, the statistics and the leak report. An array is a handle, tracked under its value
 * (like cuMemCreate's), at the texel bytes of its descriptor, every mip level included: they are
 * taken from the limit before the driver is asked, so an array that cannot fit is refused with
 * CUDA_ERROR_OUT_OF_MEMORY as the driver would refuse it at the device's end.
 *
 * The driver says nothing more exact for a plain array: cuArrayGetMemoryRequirements answers
 * CUDA_ERROR_INVALID_VALUE unless the array was made with CUDA_ARRAY3D_DEFERRED_MAPPING (measured
 * on the H200, as documented), and its free memory fell by 1.0-1.45x the texel bytes for 16 MiB
 * float arrays, varying from run to run (driver-internal reservations): texel bytes are the
 * honest lower bound, and docs/configuration.md says to leave headroom. A deferred-mapping array
 * has no memory of its own (the program maps cuMemCreate handles into it, counted there): it is
 * passed through. So is a descriptor of a format whose size gpumem does not know, or one the
 * driver refuses anyway (its own error). */
#include "shim.h"

/* Bytes of one texel of `format`; 0 for formats whose size gpumem does not know (the driver's
 * own accounting then decides alone). */
static size_t texel_bytes(CUarray_format format)
{
    switch (format) {
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

/* Texel bytes of `levels` levels (1 for a plain array) of a descriptor; 0 when unknown or when it
 * does not fit in a size_t. */
static size_t descriptor_bytes(const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned levels)
{
    size_t texel = texel_bytes(d->Format) * d->NumChannels;
    size_t w = d->Width, h = d->Height ? d->Height : 1, z = d->Depth ? d->Depth : 1, total = 0;
    if (!texel || !w) return 0;
    for (unsigned l = 0; l < levels; l++) {
        size_t n;
        if (__builtin_mul_overflow(w, h, &n) || __builtin_mul_overflow(n, z, &n) ||
            __builtin_mul_overflow(n, texel, &n) || __builtin_add_overflow(total, n, &total))
            return 0;
        w = w > 1 ? w / 2 : 1;
        h = h > 1 ? h / 2 : 1;
        if (!(d->Flags & CUDA_ARRAY3D_LAYERED)) z = z > 1 ? z / 2 : 1; /* layers keep their count */
    }
    return total;
}

typedef struct array_call {
    const CUDA_ARRAY3D_DESCRIPTOR *desc;
    unsigned levels;       /* 0: a plain array */
    CUresult (*create)(const struct array_call *c, uintptr_t *handle);
    const void *arg;       /* what `create` forwards */
} array_call;

/* Creates the array through the driver with its texel bytes taken from the limit. */
static CUresult create_tracked(gm_heap *heap, const array_call *c, size_t bytes, const gm_callsite *site,
                               uintptr_t *handle)
{
    if (gm_track_reserve(heap, bytes) != GPUMEM_OK) return CUDA_ERROR_OUT_OF_MEMORY;
    CUresult res = c->create(c, handle);
    if (res != CUDA_SUCCESS) {
        gm_track_abort(heap, bytes);
        return res;
    }
    gm_track_commit(heap, *handle, bytes, GM_KIND_ARRAY, 0, site);
    return CUDA_SUCCESS;
}

static CUresult array_create(const array_call *c, const gm_callsite *site, uintptr_t *handle)
{
    bool deferred = c->desc->Flags & CUDA_ARRAY3D_DEFERRED_MAPPING;
    size_t bytes = deferred ? 0 : descriptor_bytes(c->desc, c->levels ? c->levels : 1);
    gm_heap *heap = bytes && shim_active() ? shim_current_heap() : NULL;
    if (!heap) return c->create(c, handle);
    SHIM_TRACE("array create %zux%zux%zu levels=%u bytes=%zu", c->desc->Width, c->desc->Height,
               c->desc->Depth, c->levels, bytes);
    return create_tracked(heap, c, bytes, site, handle);
}

static CUresult array_destroyed(CUresult res, uintptr_t handle)
{
    if (res == CUDA_SUCCESS && shim_active()) {
        SHIM_TRACE("array destroy %#lx", (unsigned long)handle);
        gm_untrack(shim_current_heap(), handle, GM_KIND_ARRAY);
    }
    return res;
}

/* ------------------------------------------------------------------ the entry points */

static CUresult create_2d(const array_call *c, uintptr_t *handle)
{
    return shim_real_cuArrayCreate_v2((CUarray *)handle, c->arg);
}

static CUresult create_3d(const array_call *c, uintptr_t *handle)
{
    return shim_real_cuArray3DCreate_v2((CUarray *)handle, c->arg);
}

static CUresult create_mipmapped(const array_call *c, uintptr_t *handle)
{
    return shim_real_cuMipmappedArrayCreate((CUmipmappedArray *)handle, c->arg, c->levels);
}

CUresult cuArrayCreate_v2(CUarray *handle, const CUDA_ARRAY_DESCRIPTOR *desc)
{
    SHIM_REQUIRE_REAL(cuArrayCreate_v2);
    if (!handle || !desc) return shim_real_cuArrayCreate_v2(handle, desc);
    CUDA_ARRAY3D_DESCRIPTOR d3 = {.Width = desc->Width, .Height = desc->Height, .Format = desc->Format,
                                  .NumChannels = desc->NumChannels};
    array_call c = {&d3, 0, create_2d, desc};
    uintptr_t h = 0;
    CUresult res = array_create(&c, GM_CALLSITE(), &h);
    if (res == CUDA_SUCCESS) *handle = (CUarray)h;
    return res;
}

CUresult cuArray3DCreate_v2(CUarray *handle, const CUDA_ARRAY3D_DESCRIPTOR *desc)
{
    SHIM_REQUIRE_REAL(cuArray3DCreate_v2);
    if (!handle || !desc) return shim_real_cuArray3DCreate_v2(handle, desc);
    array_call c = {desc, 0, create_3d, desc};
    uintptr_t h = 0;
    CUresult res = array_create(&c, GM_CALLSITE(), &h);
    if (res == CUDA_SUCCESS) *handle = (CUarray)h;
    return res;
}

CUresult cuMipmappedArrayCreate(CUmipmappedArray *handle, const CUDA_ARRAY3D_DESCRIPTOR *desc,
                                unsigned int levels)
{
    SHIM_REQUIRE_REAL(cuMipmappedArrayCreate);
    if (!handle || !desc || !levels) return shim_real_cuMipmappedArrayCreate(handle, desc, levels);
    array_call c = {desc, levels, create_mipmapped, desc};
    uintptr_t h = 0;
    CUresult res = array_create(&c, GM_CALLSITE(), &h);
    if (res == CUDA_SUCCESS) *handle = (CUmipmappedArray)h;
    return res;
}

CUresult cuArrayDestroy(CUarray handle)
{
    SHIM_REQUIRE_REAL(cuArrayDestroy);
    return array_destroyed(shim_real_cuArrayDestroy(handle), (uintptr_t)handle);
}

CUresult cuMipmappedArrayDestroy(CUmipmappedArray handle)
{
    SHIM_REQUIRE_REAL(cuMipmappedArrayDestroy);
    return array_destroyed(shim_real_cuMipmappedArrayDestroy(handle), (uintptr_t)handle);
}
