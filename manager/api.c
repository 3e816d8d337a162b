/* The public API of libgpumem (include/gpumem.h). In a process that also runs under the shim,
 * these symbols resolve to the shim's copy (it is loaded first), so both share one manager. */
#include <string.h>

#include "gm_internal.h"
#include "gm_pinned.h"

#define GM_STR2(x) #x
#define GM_STR(x) GM_STR2(x)

const char *gpumem_version(void)
{
    return GM_STR(GPUMEM_VERSION_MAJOR) "." GM_STR(GPUMEM_VERSION_MINOR) "." GM_STR(GPUMEM_VERSION_PATCH);
}

const char *gpumem_strerror(gpumem_status status)
{
    switch (status) {
    case GPUMEM_OK: return "no error";
    case GPUMEM_ERROR_INVALID_VALUE: return "invalid value (NULL, zero size, or a pointer gpumem does not own)";
    case GPUMEM_ERROR_OUT_OF_MEMORY: return "out of memory (device full or GPUMEM_LIMIT reached)";
    case GPUMEM_ERROR_NOT_INITIALIZED: return "not initialized (no CUDA driver could be loaded)";
    case GPUMEM_ERROR_INVALID_CONTEXT: return "no current CUDA context on this thread";
    case GPUMEM_ERROR_NOT_FOUND: return "not found";
    case GPUMEM_ERROR_NOT_READY: return "not ready (nothing completed yet; try again later)";
    case GPUMEM_ERROR_NOT_SUPPORTED: return "not supported";
    default: return "CUDA driver error (see cuGetErrorString)";
    }
}

/* Library mode defaults to the real driver; tests and demos install the host backend first. */
int gm_api_ready(void)
{
    if (gm_mgr.backend) return GPUMEM_OK;
    const gm_backend *be = gm_cuda_backend();
    if (!be) return GPUMEM_ERROR_NOT_INITIALIZED;
    gm_manager_init(be);
    return GPUMEM_OK;
}

int gm_api_current_heap(gm_heap **out)
{
    int rc = gm_api_ready();
    if (rc != GPUMEM_OK) return rc;
    uintptr_t ctx;
    int device;
    rc = gm_mgr.backend->current(&ctx, &device);
    if (rc != GPUMEM_OK) return rc;
    *out = gm_heap_get(ctx, device);
    return *out ? GPUMEM_OK : GPUMEM_ERROR_OUT_OF_MEMORY;
}

gpumem_status gpumem_malloc(void **ptr, size_t size)
{
    if (!ptr) return GPUMEM_ERROR_INVALID_VALUE;
    gm_heap *heap;
    int rc = gm_api_current_heap(&heap);
    if (rc != GPUMEM_OK) return rc;
    uintptr_t p = 0;
    rc = gm_alloc(heap, size, 0, GM_CALLSITE(), &p);
    if (rc == GPUMEM_OK) *ptr = (void *)p;
    return rc;
}

gpumem_status gpumem_free(void *ptr)
{
    if (!ptr) return GPUMEM_OK; /* like free(NULL) and cudaFree(NULL) */
    gm_heap *heap;
    int rc = gm_api_current_heap(&heap);
    if (rc != GPUMEM_OK) return rc;
    rc = gm_free_current(heap, (uintptr_t)ptr, NULL);
    if (rc == GM_NOT_OURS || rc == GM_PASSTHROUGH) {
        gm_log(GM_ERROR, "gpumem_free(%p): not allocated by gpumem_malloc, or already freed", ptr);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    if (rc == GPUMEM_ERROR_INVALID_VALUE)
        gm_log(GM_ERROR, "gpumem_free(%p): already freed, or not the start of an allocation", ptr);
    return rc;
}

gpumem_status gpumem_get_stats(int device, gpumem_stats *out)
{
    if (!out || device < 0 || device >= GM_MAX_DEVICES) return GPUMEM_ERROR_INVALID_VALUE;
    gm_stats_collect(device, out);
    return GPUMEM_OK;
}

size_t gpumem_release_cached(void)
{
    size_t released = 0, n = atomic_load(&gm_mgr.nheaps);
    for (size_t i = 0; i < n; i++) released += gm_heap_release_cached(gm_mgr.heaps[i], 0);
    return released + gm_pinned_release_cached();
}

size_t gpumem_report(FILE *out)
{
    return gm_report_write(out ? out : stderr, -1, 0, "on request");
}
