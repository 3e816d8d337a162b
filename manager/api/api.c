/* The public API of libgpumem (include/gpumem.h). In a process that also runs under the shim,
 * these symbols resolve to the shim's copy (it is loaded first), so both share one manager. */
#include <string.h>

#include "gm_api.h"
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
    gm_report_start(be);
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
    gm_answer a = gm_free_current(heap, (uintptr_t)ptr, NULL);
    if (a.owner != GM_OURS) {
        gm_log(GM_ERROR, "gpumem_free(%p): not allocated by gpumem_malloc, or already freed", ptr);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    if (a.status == GPUMEM_ERROR_INVALID_VALUE)
        gm_stats_invalid_free("gpumem_free", (uintptr_t)ptr, "",
                              "already freed, or not the start of an allocation", (uintptr_t)GM_CALLSITE()->pc);
    return a.status;
}

gpumem_status gpumem_get_stats(int device, gpumem_stats *out)
{
    if (!out || device < 0 || device >= GM_MAX_DEVICES) return GPUMEM_ERROR_INVALID_VALUE;
    gm_heap_stats(device, out);
    return GPUMEM_OK;
}

size_t gpumem_release_cached(void)
{
    return gm_release_all_cached() + gm_pinned_release_cached();
}

size_t gpumem_report(FILE *out)
{
    return gm_report_write(out ? out : stderr, -1, 0, "on request");
}

gpumem_status gpumem_get_copy_stats(int device, gpumem_copy_stats *out)
{
    if (!out || device < 0 || device >= GM_MAX_DEVICES) return GPUMEM_ERROR_INVALID_VALUE;
    gm_copy_stats_collect(device, out);
    return GPUMEM_OK;
}

/* ------------------------------------------------------------------ tags */

gpumem_status gpumem_tag_push(const char *name) { return gm_tag_push(name); }
gpumem_status gpumem_tag_pop(void) { return gm_tag_pop(); }

const char *gpumem_tag_current(void) { return gm_tag_name(gm_tag_current()); }

gpumem_status gpumem_tag_get_usage(const char *name, gpumem_tag_usage *out)
{
    if (!name || !out) return GPUMEM_ERROR_INVALID_VALUE;
    uint16_t id = gm_tag_find(name);
    if (!id) return GPUMEM_ERROR_NOT_FOUND;
    gm_tag_usage_get(id, out);
    return GPUMEM_OK;
}
