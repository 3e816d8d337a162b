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
 * (pool segments plus pass-through allocations). The fields, in order, and what each means are
 * listed in gpumem_stats.def, installed beside this header. */
typedef struct gpumem_stats {
#define GM_STAT_HEAP(name, doc) uint64_t name;
#define GM_STAT_POOL(name, doc) uint64_t name;
#define GM_STAT_DEVICE(name, doc) uint64_t name;
#define GM_STAT_DERIVED(type, name, doc) type name;
#include "gpumem_stats.def"
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

/* Hand every fully free cached segment back to the device, and cached pinned host blocks back
 * to the driver. Returns the bytes released. */
GPUMEM_API size_t gpumem_release_cached(void);

/* Write the leak report and statistics now to `out` (the exit report's format). Returns the
 * number of live (leaked-so-far) allocations. */
GPUMEM_API size_t gpumem_report(FILE *out);

/* ================================================================ copies (transfers) */
/* Copies the driver accepted, per device: the device whose memory the copy touches when gpumem
 * pools it (the destination's, for a copy between two devices); otherwise the device gpumem works
 * on when it knows only one, else the calling thread's current device. Unified copies (cuMemcpy, cudaMemcpyDefault) are classified by where each side
 * lies. Host memory is "pinned" when gpumem or the driver knows it as page-locked (the pinned
 * pool, cudaHostAlloc, cudaHostRegister), otherwise "pageable". Blocking copies are timed (wall
 * time of the call); asynchronous copies are counted but not timed. */
typedef enum gpumem_copy_direction {
    GPUMEM_COPY_H2D = 0,
    GPUMEM_COPY_D2H = 1,
    GPUMEM_COPY_D2D = 2,
    GPUMEM_COPY_H2H = 3,
    GPUMEM_COPY_DIRECTIONS = 4
} gpumem_copy_direction;

typedef enum gpumem_host_memory {
    GPUMEM_HOST_PAGEABLE = 0, /* H2H: unless both sides are pinned */
    GPUMEM_HOST_PINNED = 1,
    GPUMEM_HOST_KINDS = 2
} gpumem_host_memory;

typedef struct gpumem_copy_counter {
    uint64_t calls;
    uint64_t bytes;
    uint64_t timed_calls;  /* blocking copies: their wall time is in time_ns */
    uint64_t timed_bytes;
    uint64_t time_ns;
    uint64_t staged_calls; /* pageable copies pipelined through pinned staging buffers */
    uint64_t staged_bytes;
} gpumem_copy_counter;

typedef struct gpumem_copy_stats {
    gpumem_copy_counter total[GPUMEM_COPY_DIRECTIONS];
    /* The same split by host memory kind (H2D, D2H, H2H; all zero for D2D). */
    gpumem_copy_counter host[GPUMEM_COPY_DIRECTIONS][GPUMEM_HOST_KINDS];
    /* Refused by the range check (GPUMEM_CHECK_COPIES): into freed pool memory or past the end of
     * an allocation; each was logged with its call stack. Counted on the memory's device. */
    uint64_t refused_copies;
    uint64_t refused_memsets;
    /* Peer copies: the D2D copies (a part of total[GPUMEM_COPY_D2D]) between pool memory of two
     * devices (cuMemcpyPeer*, cuMemcpy3DPeer*, DtoD or cudaMemcpyDefault across devices), counted
     * on the destination's device. */
    gpumem_copy_counter peer;
} gpumem_copy_stats;

/* Copy statistics of one device. GPUMEM_ERROR_INVALID_VALUE for a NULL `out` or a device out of
 * range. */
GPUMEM_API gpumem_status gpumem_get_copy_stats(int device, gpumem_copy_stats *out);

/* ================================================================ double-buffered channels
 * The seed's readback pattern as a library object: two pinned host buffers, a transfer stream of
 * the channel's own, one event per buffer and a ping-pong index. Frame k's copy runs while the
 * program works on frame k+1; reading frame k never waits for the copy of frame k+1. A device
 * staging buffer of `capacity` bytes (from the pool: it counts against GPUMEM_LIMIT) takes a fast
 * device-to-device snapshot on the program's stream, so the program may overwrite its source at
 * once while the PCIe copy runs from the snapshot.
 * Streams are passed as `void *` holding a CUstream (NULL = the legacy default stream), so this
 * header needs no CUDA header. A channel belongs to the context current when it was created. */
typedef struct gpumem_channel gpumem_channel;
typedef enum gpumem_channel_kind {
    GPUMEM_CHANNEL_READBACK = 0, /* device -> host, read one frame behind */
    GPUMEM_CHANNEL_UPLOAD = 1    /* host -> device, fill one buffer while the other is copied */
} gpumem_channel_kind;
/* Frames are numbered 0, 1, 2, ... per channel, in submit (or upload) order. A copy is ordered on
 * the program's `stream` as a cudaMemcpyAsync on that stream would be (after the work already
 * enqueued there, before the work enqueued later), yet the host never waits for it: the channel
 * copies device-to-device into a staging buffer of its own on `stream` and runs the PCIe copy on
 * its transfer stream, overlapped with the program's later kernels. A channel is used by one
 * thread at a time; a call made while another thread is inside the same channel is refused.
 * Misuse returns GPUMEM_ERROR_INVALID_VALUE with a log line that names what was wrong; driver
 * errors come back unchanged. */

/* A channel of `kind` for frames of at most `capacity` bytes, in the calling thread's current
 * context: two pinned host buffers of `capacity` bytes, a device staging buffer of `capacity`
 * bytes (pooled; it counts against GPUMEM_LIMIT and shows as a leak if the channel is never
 * destroyed), a non-blocking transfer stream and three events. INVALID_CONTEXT without a current
 * context; OUT_OF_MEMORY when memory runs out (nothing is left allocated then). */
GPUMEM_API gpumem_status gpumem_channel_create(gpumem_channel **out, gpumem_channel_kind kind,
                                               size_t capacity);

/* Waits for the channel's copies still in flight, then frees everything it owns. Data acquired
 * from it and its upload buffers become invalid. NULL is accepted and does nothing. May be called
 * from any thread; destroy channels before the context they were created in. */
GPUMEM_API gpumem_status gpumem_channel_destroy(gpumem_channel *ch);

/* READBACK. Enqueues frame k: `bytes` (1..capacity) of device memory at `device_src`, as they are
 * once the work already enqueued on `stream` (a CUstream; NULL = the legacy default stream) has
 * run. Returns at once; `*frame` (may be NULL) gets k. The program may overwrite `device_src` in
 * later work on `stream` right away. The calling thread's current context must be the channel's
 * (else GPUMEM_ERROR_INVALID_CONTEXT). The call invalidates data acquired before it. */
GPUMEM_API gpumem_status gpumem_channel_submit(gpumem_channel *ch, const void *device_src,
                                               size_t bytes, void *stream, uint64_t *frame);

/* READBACK. The frame before the last submitted one (frame k-1 while frame k is in flight):
 * `*data` points at its bytes in pinned host memory, `*bytes` and `*frame` (both may be NULL) get
 * its size and number. Waits only for that frame's copy, which has normally finished long ago.
 * GPUMEM_ERROR_NOT_READY (outputs NULL/0) until two frames were submitted. The data stays valid
 * and unchanged until the next gpumem_channel_submit on this channel. */
GPUMEM_API gpumem_status gpumem_channel_acquire(gpumem_channel *ch, const void **data,
                                                size_t *bytes, uint64_t *frame);

/* READBACK. The last submitted frame, waiting for its copy (and so for the work on the stream it
 * was submitted on): for the last frame of a run. NOT_READY until one frame was submitted. Same
 * validity as gpumem_channel_acquire. */
GPUMEM_API gpumem_status gpumem_channel_acquire_latest(gpumem_channel *ch, const void **data,
                                                       size_t *bytes, uint64_t *frame);

/* UPLOAD. The pinned host buffer (`capacity` bytes) to fill with the next frame. Waits only for
 * the copy that last read this buffer, two frames back. Calling it again before
 * gpumem_channel_upload returns the same buffer. */
GPUMEM_API gpumem_status gpumem_channel_upload_buffer(gpumem_channel *ch, void **host);

/* UPLOAD. Enqueues frame k: the first `bytes` (1..capacity) of the buffer from
 * gpumem_channel_upload_buffer go to `device_dst`, after the work already enqueued on `stream`
 * and before the work enqueued on it later. Returns at once; `*frame` (may be NULL) gets k. The
 * buffer belongs to the channel again until it is handed out two frames later. The current
 * context must be the channel's. INVALID_VALUE when no buffer was handed out first. */
GPUMEM_API gpumem_status gpumem_channel_upload(gpumem_channel *ch, void *device_dst, size_t bytes,
                                               void *stream, uint64_t *frame);

/* ================================================================ named, resizable buffers */
/* A buffer is one device allocation with a name, a capacity it grows by a factor, and a used size,
 * like a std::vector of bytes that lives on the device. Its name is unique in the process and is
 * the tag of every allocation it makes, so the leak report and gpumem_tag_get_usage name it.
 * It belongs to the context current when it was created; its copies run on the stream given then
 * (a CUstream as `void *`, NULL = the legacy default stream).
 *
 * Growing keeps the first `used` bytes: in place when the pool memory right after the buffer is
 * free (no copy, the pointer stays), otherwise by a device-to-device copy on the buffer's stream
 * into a new block (the pointer changes; fetch it again). The old block is freed with cudaFree's
 * ordering, so work already enqueued on it finishes first. Bytes past `used` are not kept and new
 * bytes are not zeroed. A call that fails leaves the buffer exactly as it was (pointer, sizes,
 * contents). Sizes over max_size are GPUMEM_ERROR_INVALID_VALUE; the device or GPUMEM_LIMIT
 * refusing is GPUMEM_ERROR_OUT_OF_MEMORY. Capacities are multiples of 512 bytes unless max_size
 * caps them.
 *
 * Thread safety: every function may be called from any thread; calls on one buffer are
 * serialized by the buffer's own lock. Work the program enqueues on other streams that uses the
 * buffer must be ordered after the buffer's stream by the program (as for any copy). */
typedef struct gpumem_buffer gpumem_buffer;

typedef enum gpumem_shrink_policy {
    GPUMEM_SHRINK_NEVER = 0,      /* capacity goes down only on gpumem_buffer_shrink_to_fit */
    GPUMEM_SHRINK_ON_CLEANUP = 1, /* gpumem_buffers_cleanup shrinks it when idle or under-used */
    GPUMEM_SHRINK_ON_RESIZE = 2   /* as ON_CLEANUP, and a resize that leaves it under-used too */
} gpumem_shrink_policy;

typedef struct gpumem_buffer_config {
    size_t initial_capacity;     /* allocated by create (0: nothing until the first grow); also the
                                  * floor of under-use shrinking */
    double growth_factor;        /* a grow aims for capacity * factor (>= 1; 0 = 2.0) */
    size_t max_size;             /* used and capacity never exceed it (0 = no maximum) */
    gpumem_shrink_policy shrink; /* when automatic shrinking may happen */
    double shrink_below;         /* under-used: used < shrink_below * capacity (0..1; 0 = never) */
    double idle_seconds;         /* idle: no ptr/reserve/resize/shrink call for this long; cleanup
                                  * then keeps only the used bytes (0 = never) */
} gpumem_buffer_config;

typedef struct gpumem_buffer_info {
    const char *name;            /* valid until the buffer is destroyed */
    void *ptr;                   /* device pointer, NULL while the capacity is 0 */
    size_t used, capacity, max_size;
    double utilization;          /* used / capacity, 0 when the capacity is 0 */
    uint64_t last_access_ns;     /* CLOCK_MONOTONIC(_COARSE) time of the last ptr/reserve/resize/
                                  * shrink call (or the create) */
    uint64_t grows;              /* capacity increases, every kind */
    uint64_t grows_in_place;     /* of which without a copy or a pointer change */
    uint64_t copies;             /* device-to-device copies made to move the data */
    uint64_t bytes_copied;
    uint64_t shrinks;            /* capacity decreases (shrink_to_fit, resize, cleanup) */
} gpumem_buffer_info;

/* Defaults: initial_capacity 0, growth_factor 2.0, no max_size, GPUMEM_SHRINK_ON_CLEANUP,
 * shrink_below 0.25, idle_seconds 0. */
GPUMEM_API void gpumem_buffer_config_init(gpumem_buffer_config *cfg);

/* Create a buffer named `name` (1..127 bytes, unique in the process: a second live buffer of the
 * same name is GPUMEM_ERROR_INVALID_VALUE) with `cfg` (NULL = defaults) on the current context.
 * *out is NULL on failure. */
GPUMEM_API gpumem_status gpumem_buffer_create(gpumem_buffer **out, const char *name,
                                              const gpumem_buffer_config *cfg, void *stream);
/* Free the buffer's memory (with cudaFree's ordering) and the buffer. NULL is a no-op. A live
 * buffer is always destroyed; INVALID_CONTEXT / INVALID_VALUE say its memory had been lost before
 * (its context destroyed, or its pointer freed by the program). */
GPUMEM_API gpumem_status gpumem_buffer_destroy(gpumem_buffer *b);
/* The live buffer named `name`; GPUMEM_ERROR_NOT_FOUND when there is none. */
GPUMEM_API gpumem_status gpumem_buffer_find(const char *name, gpumem_buffer **out);

/* The device pointer (NULL while the capacity is 0). Valid until the next call that can move the
 * buffer (reserve, resize, shrink_to_fit, cleanup, destroy). Counts as an access. */
GPUMEM_API gpumem_status gpumem_buffer_ptr(gpumem_buffer *b, void **dptr);
/* Sizes, utilization and counters. Does not count as an access. */
GPUMEM_API gpumem_status gpumem_buffer_get_info(gpumem_buffer *b, gpumem_buffer_info *out);

/* Make the capacity at least `capacity` bytes, growing by the growth factor (capped at
 * max_size; when that much memory is not there, exactly `capacity` is tried). `used` is kept. */
GPUMEM_API gpumem_status gpumem_buffer_reserve(gpumem_buffer *b, size_t capacity);
/* Set the used size, growing as reserve does when it is over the capacity; the first
 * min(old, new) bytes are kept. */
GPUMEM_API gpumem_status gpumem_buffer_resize(gpumem_buffer *b, size_t used);
/* Give back the capacity beyond `used` (rounded up to 512 B); with used 0 the whole block. */
GPUMEM_API gpumem_status gpumem_buffer_shrink_to_fit(gpumem_buffer *b);

/* Shrink every buffer whose policy allows it and which is idle (keeps its used bytes only, so an
 * empty one is released) or under-used (keeps its used bytes, but at least initial_capacity).
 * Never changes `used` or the bytes kept. The memory goes back to the pool (gpumem_release_cached
 * hands fully free segments to the device). *released_bytes (may be NULL) gets the capacity given
 * back. Returns the first error met; the other buffers are still processed. */
GPUMEM_API gpumem_status gpumem_buffers_cleanup(size_t *released_bytes);

/* Why the last failing buffer call of this thread failed, naming the buffer and the sizes ("" if
 * none failed yet). Like errno, only meaningful right after a call that failed. */
GPUMEM_API const char *gpumem_buffer_last_error(void);

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

/* ================================================================ a group's region */
/* A snapshot of the shared budget at `path` (GPUMEM_SHARED; docs/deployment.md) as one JSON
 * object, read without joining the group and without writing to it: the GPUs (UUID, the group's
 * limit, usage and peak), and each member (pid, command, alive, what it reserved and what it last
 * published per GPU, its top call stacks). What gpumem-exporter and `gpumem-report top` read.
 * On failure the object is {"path": ..., "error": "<why>"}. Free the string with
 * gpumem_string_free. NULL only when memory runs out. */
GPUMEM_API char *gpumem_shared_snapshot_json(const char *path);
GPUMEM_API void gpumem_string_free(char *s);

#ifdef __cplusplus
}
#endif
#endif /* GPUMEM_H */
