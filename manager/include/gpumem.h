/* gpumem: a unified GPU memory manager (pooling, limits, leak accounting, statistics).
 *
 * This is the whole public interface of libgpumem. Programs that cannot be changed get the
 * same engine through the LD_PRELOAD shim (libgpumem_shim.so); programs that link libgpumem
 * call these functions. Status codes are numerically the CUDA driver's CUresult values, so a
 * caller can compare against CUDA_SUCCESS / CUDA_ERROR_OUT_OF_MEMORY without translation.
 */
#ifndef GPUMEM_H
#define GPUMEM_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define GPUMEM_VERSION_MAJOR 0
#define GPUMEM_VERSION_MINOR 1
#define GPUMEM_VERSION_PATCH 0

#if defined(_WIN32)
#define GPUMEM_API
#else
#define GPUMEM_API __attribute__((visibility("default")))
#endif

/* Status codes: the same numbers as the driver's CUresult. Any other driver code a backend
 * returns is passed through unchanged. */
typedef int gpumem_status;
#define GPUMEM_OK 0
#define GPUMEM_ERROR_INVALID_VALUE 1
#define GPUMEM_ERROR_OUT_OF_MEMORY 2
#define GPUMEM_ERROR_NOT_INITIALIZED 3
#define GPUMEM_ERROR_INVALID_CONTEXT 201
#define GPUMEM_ERROR_NOT_FOUND 500
#define GPUMEM_ERROR_NOT_READY 600
#define GPUMEM_ERROR_NOT_SUPPORTED 801

/* Per-device statistics. "allocated" counts bytes handed to the program (rounded block sizes),
 * "requested" the sizes the program asked for, "reserved" bytes obtained from the device
 * (pool segments plus pass-through allocations). */
typedef struct gpumem_stats {
    uint64_t allocations;        /* successful allocations, every kind */
    uint64_t frees;              /* successful frees, every kind */
    uint64_t pool_hits;          /* served from memory already reserved */
    uint64_t pool_misses;        /* needed a new segment */
    uint64_t segments;           /* segments currently reserved */
    uint64_t segments_released;  /* segments handed back to the device */
    uint64_t bytes_requested;    /* live, as asked for */
    uint64_t bytes_allocated;    /* live, rounded */
    uint64_t bytes_allocated_peak;
    uint64_t bytes_reserved;     /* from the device, current */
    uint64_t bytes_reserved_peak;
    uint64_t bytes_cached_free;  /* free bytes inside reserved segments */
    uint64_t largest_free_block;
    double fragmentation;        /* 1 - largest_free / total_free; 0 when nothing is free */
    uint64_t release_retries;    /* cached segments released, then the request retried */
    uint64_t limit_rejections;   /* requests refused because of GPUMEM_LIMIT */
    uint64_t backend_ooms;       /* out-of-memory answers from the device itself */
    uint64_t limit_bytes;        /* the limit in force for this device, 0 = none */
} gpumem_stats;

/* Library version as "major.minor.patch". */
GPUMEM_API const char *gpumem_version(void);

/* A short, human-readable description of a status code. Never NULL. */
GPUMEM_API const char *gpumem_strerror(gpumem_status status);

/* Allocate `size` bytes of device memory on the calling thread's current device/context. */
GPUMEM_API gpumem_status gpumem_malloc(void **ptr, size_t size);

/* Free memory from gpumem_malloc (or cudaMalloc under the shim). Keeps cudaFree's barrier unless
 * GPUMEM_FREE_SYNC=0. */
GPUMEM_API gpumem_status gpumem_free(void *ptr);

/* Statistics of one device. GPUMEM_ERROR_INVALID_VALUE for a NULL `out` or a device out of range. */
GPUMEM_API gpumem_status gpumem_get_stats(int device, gpumem_stats *out);

/* Hand every fully free cached segment back to the device. Returns the bytes released. */
GPUMEM_API size_t gpumem_release_cached(void);

/* Write the leak report and statistics now to `out` (the exit report's format). Returns the
 * number of live (leaked-so-far) allocations. */
GPUMEM_API size_t gpumem_report(FILE *out);

/* ================================================================ copies (transfers) */
/* @copy-stats: declarations of the copy statistics go here */

/* ================================================================ double-buffered channels
 * The seed's readback pattern as a library object: two pinned host buffers, a transfer stream of
 * the channel's own, one event per buffer and a ping-pong index. Frame k's copy runs while the
 * program works on frame k+1; reading frame k never waits for the copy of frame k+1.
 * Streams are passed as `void *` holding a CUstream (NULL = the legacy default stream), so this
 * header needs no CUDA header. A channel belongs to the context current when it was created. */
typedef struct gpumem_channel gpumem_channel;
typedef enum gpumem_channel_kind {
    GPUMEM_CHANNEL_READBACK = 0, /* device -> host, read one frame behind */
    GPUMEM_CHANNEL_UPLOAD = 1    /* host -> device, fill one buffer while the other is copied */
} gpumem_channel_kind;
/* @channel: declarations of the channel functions go here */

/* ================================================================ named, resizable buffers */
/* @buffers: declarations of the buffer functions go here */

/* ================================================================ tags */
/* A tag names what the calling thread is doing ("optimizer", "physics/nodes"): every allocation
 * it makes while the tag is pushed, through this API or through the shim (cudaMalloc in a library
 * it calls), carries the innermost tag. The leak report groups leaks by tag and prints live bytes
 * per tag. Tags nest (up to 64 per thread); names are at most 127 bytes; at most 4095 distinct
 * names per process. Push and pop are per thread and never lock once a name is known. */
typedef struct gpumem_tag_usage {
    uint64_t live_bytes;       /* requested bytes of live allocations carrying the tag */
    uint64_t live_allocations;
    uint64_t allocations;      /* every allocation ever made under the tag */
    uint64_t peak_bytes;       /* highest live_bytes seen */
} gpumem_tag_usage;

/* GPUMEM_ERROR_INVALID_VALUE for NULL, "" or a name over 127 bytes, or more than 64 nested. */
GPUMEM_API gpumem_status gpumem_tag_push(const char *name);
/* GPUMEM_ERROR_INVALID_VALUE when this thread has no tag pushed. */
GPUMEM_API gpumem_status gpumem_tag_pop(void);
/* The calling thread's innermost tag, NULL when none. */
GPUMEM_API const char *gpumem_tag_current(void);
/* Usage of one tag; GPUMEM_ERROR_NOT_FOUND for a name never pushed. */
GPUMEM_API gpumem_status gpumem_tag_get_usage(const char *name, gpumem_tag_usage *out);

#ifdef __cplusplus
}
#endif
#endif /* GPUMEM_H */
