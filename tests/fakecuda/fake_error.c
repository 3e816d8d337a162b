/* fake_error.c: cuGetErrorName and cuGetErrorString, over one table of error codes with the
 * real driver's names and texts. Like the real driver's, they work before cuInit and refuse
 * (CUDA_ERROR_INVALID_VALUE, NULL string) a code they do not know. */
#include "fake_internal.h"

#define ERROR_CODES(X)                                                                        \
    X(CUDA_SUCCESS, "no error")                                                               \
    X(CUDA_ERROR_INVALID_VALUE, "invalid argument")                                           \
    X(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")                                              \
    X(CUDA_ERROR_NOT_INITIALIZED, "initialization error")                                     \
    X(CUDA_ERROR_DEINITIALIZED, "driver shutting down")                                       \
    X(CUDA_ERROR_NO_DEVICE, "no CUDA-capable device is detected")                             \
    X(CUDA_ERROR_INVALID_DEVICE, "invalid device ordinal")                                    \
    X(CUDA_ERROR_INVALID_CONTEXT, "invalid device context")                                   \
    X(CUDA_ERROR_CONTEXT_ALREADY_CURRENT, "context already current")                          \
    X(CUDA_ERROR_INVALID_HANDLE, "invalid resource handle")                                   \
    X(CUDA_ERROR_ILLEGAL_STATE, "the operation cannot be performed in the present state")     \
    X(CUDA_ERROR_NOT_FOUND, "named symbol not found")                                         \
    X(CUDA_ERROR_ALREADY_MAPPED, "resource already mapped")                                   \
    X(CUDA_ERROR_MAP_FAILED, "mapping of buffer object failed")                               \
    X(CUDA_ERROR_NOT_READY, "device not ready")                                               \
    X(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal memory access was encountered")                 \
    X(CUDA_ERROR_LAUNCH_FAILED, "unspecified launch failure")                                 \
    X(CUDA_ERROR_CONTEXT_IS_DESTROYED, "context is destroyed")                                \
    X(CUDA_ERROR_NOT_PERMITTED, "operation not permitted")                                    \
    X(CUDA_ERROR_NOT_SUPPORTED, "operation not supported")                                    \
    X(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "operation not permitted when stream is capturing") \
    X(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,                                                  \
      "operation failed due to a previous error during capture")                              \
    X(CUDA_ERROR_UNKNOWN, "unknown error")

typedef struct { CUresult code; const char *name, *text; } error_entry;
#define ERROR_ENTRY(code, text) {code, #code, text},
static const error_entry error_table[] = {ERROR_CODES(ERROR_ENTRY)};

static const error_entry *error_find(CUresult code)
{
    for (size_t i = 0; i < sizeof error_table / sizeof *error_table; i++)
        if (error_table[i].code == code)
            return &error_table[i];
    return NULL;
}

FK_API CUresult CUDAAPI cuGetErrorName(CUresult error, const char **pstr)
{
    if (!pstr)
        return CUDA_ERROR_INVALID_VALUE;
    const error_entry *e = error_find(error);
    *pstr = e ? e->name : NULL;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

FK_API CUresult CUDAAPI cuGetErrorString(CUresult error, const char **pstr)
{
    if (!pstr)
        return CUDA_ERROR_INVALID_VALUE;
    const error_entry *e = error_find(error);
    *pstr = e ? e->text : NULL;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* ================================================================ cuGetProcAddress rows */

#define ERROR_PROCS(X)                                                              \
    X("cuGetErrorName", 6000, 0, cuGetErrorName)                                    \
    X("cuGetErrorString", 6000, 0, cuGetErrorString)
FK_PROC_TABLE(error_procs, ERROR_PROCS);
