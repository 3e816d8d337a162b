/* fake_proc.c: entry-point lookup, cuGetProcAddress and cuGetProcAddress_v2.
 *
 * The symbol table is the union of the per-file tables below: each file lists the entry points
 * it defines at its end (the copy family in fake_copy.def), because the hidden alias each
 * address is taken through must be in the file that defines the function (fake_internal.h,
 * FK_PROC_TABLE). A name may have several rows, one per ABI version and per-thread-stream
 * variant; a lookup answers the newest one introduced at or before the caller's CUDA version. */
#include "fake_internal.h"

#include <string.h>

/* cuda.h maps cuGetProcAddress to cuGetProcAddress_v2; the old 4-argument one is exported too.
 * It is declared for the driver's own build only: declared here so the definition is checked. */
#undef cuGetProcAddress
CUresult CUDAAPI cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion,
                                 cuuint64_t flags);

static const fk_proc *const proc_tables[] = {
    dev_procs, ctx_procs,  stream_procs, event_procs, mem_procs,  host_procs,
    ptr_procs, copy_procs, ipc_procs,    error_procs, proc_procs, array_procs, graph_procs,
};

/* The newest variant of `sym` introduced at or before `version`; *seen says the name exists. */
static const fk_proc *proc_best(const char *sym, int version, bool ptds, bool *seen)
{
    const fk_proc *best = NULL;
    for (size_t t = 0; t < sizeof proc_tables / sizeof *proc_tables; t++) {
        for (const fk_proc *e = proc_tables[t]; e->name; e++) {
            if (strcmp(e->name, sym) != 0)
                continue;
            *seen = true;
            if (e->ptds == ptds && e->version <= version && (!best || e->version > best->version))
                best = e;
        }
    }
    return best;
}

/* Per-thread-stream lookups fall back to the plain variant where there is no _ptsz/_ptds one. */
static CUresult proc_lookup(const char *sym, void **pfn, int version, cuuint64_t flags,
                            CUdriverProcAddressQueryResult *status)
{
    CUdriverProcAddressQueryResult st = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    if (!sym || !pfn || (flags & ~(cuuint64_t)(CU_GET_PROC_ADDRESS_LEGACY_STREAM |
                                               CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM)))
        return CUDA_ERROR_INVALID_VALUE;
    bool seen = false;
    const fk_proc *e = NULL;
    if (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM)
        e = proc_best(sym, version, true, &seen);
    if (!e)
        e = proc_best(sym, version, false, &seen);
    *pfn = NULL;
    if (e) {
        _Static_assert(sizeof(void *) == sizeof e->fn, "function and data pointers differ");
        memcpy(pfn, &e->fn, sizeof *pfn);
        st = CU_GET_PROC_ADDRESS_SUCCESS;
    } else if (seen) {
        st = CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT;
    }
    if (status)
        *status = st;
    return e ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}

FK_API CUresult CUDAAPI cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion,
                                            cuuint64_t flags,
                                            CUdriverProcAddressQueryResult *status)
{
    return proc_lookup(symbol, pfn, cudaVersion, flags, status);
}

FK_API CUresult CUDAAPI cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion,
                                         cuuint64_t flags)
{
    return proc_lookup(symbol, pfn, cudaVersion, flags, NULL);
}

/* ================================================================ cuGetProcAddress rows */

#define PROC_PROCS(X)                                                               \
    X("cuGetProcAddress", 11030, 0, cuGetProcAddress)                               \
    X("cuGetProcAddress", 12000, 0, cuGetProcAddress_v2)
FK_PROC_TABLE(proc_procs, PROC_PROCS);
