/* Double-buffered channels (include/gpumem.h, "double-buffered channels"): the seed's readback
 * pattern as a library object, and its mirror image for uploads.
 *
 * A channel owns two pinned host buffers, one device staging buffer, a non-blocking transfer
 * stream and three events. The staging buffer is what makes the pattern both fast and safe: the
 * program's stream only pays a device-to-device copy (hundreds of GB/s), so the slow PCIe copy
 * runs on the transfer stream, overlapped with the program's next kernels, while the program's
 * own buffer may be overwritten at once, exactly as after a cudaMemcpyAsync on its stream.
 *
 * Readback, frame k (b = k % 2):
 *   program stream:  [wait copied[b^1]] D2D staging <- src, record on_stream
 *   transfer stream: wait on_stream, D2H host[b] <- staging, record copied[b]
 * Upload, frame k:
 *   transfer stream: [wait on_stream] H2D staging <- host[b], record copied[b]
 *   program stream:  wait copied[b], D2D dst <- staging, record on_stream
 * The bracketed waits keep the single staging buffer from being overwritten while the previous
 * frame still uses it; in a steady loop they are satisfied long before they are reached.
 *
 * A channel is used by one thread at a time (the caller serialises, like a cudaStream user);
 * two threads inside one channel at once is detected and refused rather than left to corrupt it. */
#include <stdlib.h>

#include "gm_api.h"

#define CHANNEL_MAGIC 0x6c6e6e6168636d67ull /* "gmchannl" */

struct gpumem_channel {
    uint64_t magic;          /* CHANNEL_MAGIC while alive: catches stray pointers */
    gpumem_channel_kind kind;
    size_t capacity;         /* bytes per frame, at most */
    uintptr_t ctx;           /* the context current at creation: every handle below lives there */
    gm_heap *heap;           /* where the staging buffer came from */
    uintptr_t xfer;          /* the transfer stream */
    uintptr_t staging;       /* device buffer of `capacity` bytes */
    void *host[2];           /* pinned, `capacity` bytes each */
    uintptr_t copied[2];     /* recorded on xfer after the PCIe copy of host[i] */
    uintptr_t on_stream;     /* recorded on the program's stream after the staging copy */
    size_t bytes[2];         /* size of the frame in host[i] */
    uint64_t frames;         /* frames submitted or uploaded so far: the next frame's number */
    bool handed_out;         /* upload: gpumem_channel_upload_buffer returned host[frames % 2] */
    _Atomic bool busy;       /* a call is inside the channel */
};

static const char *const kind_names[] = {"GPUMEM_CHANNEL_READBACK", "GPUMEM_CHANNEL_UPLOAD"};

/* ------------------------------------------------------------------ the manager and context */

/* The stream a call names belongs to the calling thread's current context; the channel's events
 * can only be recorded on streams of its own context, so the two must be the same. */
static int check_context(const gpumem_channel *ch, const char *fn)
{
    uintptr_t ctx = 0;
    int device = 0;
    int rc = gm_mgr.backend->current(&ctx, &device);
    if (rc != GPUMEM_OK) {
        gm_log(GM_ERROR, "%s: no current CUDA context on this thread (error %d); make the "
               "channel's context (%p) current first", fn, rc, (void *)ch->ctx);
        return rc;
    }
    if (ctx != ch->ctx) {
        gm_log(GM_ERROR, "%s: the current context (%p) is not the channel's (%p): a channel "
               "and the streams passed to it belong to the context it was created in",
               fn, (void *)ctx, (void *)ch->ctx);
        return GPUMEM_ERROR_INVALID_CONTEXT;
    }
    return GPUMEM_OK;
}

/* ------------------------------------------------------------------ entering a call */

static int check_channel(const gpumem_channel *ch, const char *fn)
{
    if (!ch) {
        gm_log(GM_ERROR, "%s: the channel is NULL", fn);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    if (ch->magic != CHANNEL_MAGIC) {
        gm_log(GM_ERROR, "%s: %p is not a live channel (destroyed, or not from "
               "gpumem_channel_create)", fn, (const void *)ch);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    return GPUMEM_OK;
}

/* Marks the channel busy; GPUMEM_OK means the caller must leave(). */
static int take(gpumem_channel *ch, const char *fn)
{
    if (atomic_exchange_explicit(&ch->busy, true, memory_order_acquire)) {
        gm_log(GM_ERROR, "%s: channel %p is in use by another thread right now; a channel is "
               "used by one thread at a time", fn, (void *)ch);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    return GPUMEM_OK;
}

/* Validates `ch` and its kind and marks it busy; GPUMEM_OK means the caller must leave(). */
static int enter(gpumem_channel *ch, const char *fn, gpumem_channel_kind want)
{
    int rc = check_channel(ch, fn);
    if (rc != GPUMEM_OK) return rc;
    if (ch->kind != want) {
        gm_log(GM_ERROR, "%s: the channel is a %s channel; this call needs a %s channel", fn,
               kind_names[ch->kind], kind_names[want]);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    return take(ch, fn);
}

static void leave(gpumem_channel *ch)
{
    atomic_store_explicit(&ch->busy, false, memory_order_release);
}

/* A frame's device pointer and size. */
static int check_frame(const gpumem_channel *ch, const char *fn, const void *dev, const char *name,
                       size_t bytes)
{
    if (!dev) {
        gm_log(GM_ERROR, "%s: %s is NULL", fn, name);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    if (bytes == 0 || bytes > ch->capacity) {
        gm_log(GM_ERROR, "%s: %zu bytes; a frame of this channel holds 1 to %zu bytes (its "
               "capacity)", fn, bytes, ch->capacity);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    return GPUMEM_OK;
}

static void report_driver_error(const char *fn, const char *what, int rc)
{
    gm_log(GM_ERROR, "%s: %s failed with CUDA error %d", fn, what, rc);
}

/* ------------------------------------------------------------------ create / destroy */

static void keep_first(int *first, int rc)
{
    if (*first == GPUMEM_OK && rc != GPUMEM_OK) *first = rc;
}

/* Waits for every copy that touches the channel's memory, then releases whatever exists (a
 * half-built channel too). Returns the first error; everything is released regardless. */
static int channel_close(gpumem_channel *ch)
{
    const gm_backend *be = gm_mgr.backend;
    int first = GPUMEM_OK;
    if (atomic_load(&gm_mgr.exiting)) return GPUMEM_OK; /* the driver may be gone: leave it be */
    for (int i = 0; i < 2; i++)
        if (ch->copied[i]) keep_first(&first, be->event_synchronize(ch->copied[i]));
    if (ch->on_stream) keep_first(&first, be->event_synchronize(ch->on_stream));
    if (ch->staging) {
        /* Everything that used it is done (above); the stream-ordered free then skips the
         * context-wide barrier a plain free would take. */
        gm_answer a = gm_free(ch->heap, ch->staging, ch->xfer ? ch->xfer : GM_FREE_BARRIER, NULL);
        if (a.owner == GM_OURS) keep_first(&first, a.status); /* not ours: its context is gone */
    }
    for (int i = 0; i < 2; i++) {
        if (ch->host[i]) keep_first(&first, be->host_free(ch->ctx, ch->host[i]));
        if (ch->copied[i]) keep_first(&first, be->event_destroy(ch->ctx, ch->copied[i]));
    }
    if (ch->on_stream) keep_first(&first, be->event_destroy(ch->ctx, ch->on_stream));
    if (ch->xfer) keep_first(&first, be->stream_destroy(ch->ctx, ch->xfer));
    return first;
}

/* Device memory first: GPUMEM_LIMIT and a full device are the likeliest refusals. */
static int channel_open(gpumem_channel *ch, const gm_callsite *site)
{
    const gm_backend *be = gm_mgr.backend;
    int rc = gm_alloc(ch->heap, ch->capacity, 0, site, &ch->staging);
    if (rc != GPUMEM_OK) {
        ch->staging = 0;
        return rc;
    }
    for (int i = 0; i < 2 && rc == GPUMEM_OK; i++) {
        rc = be->host_alloc(ch->ctx, ch->capacity, 0, &ch->host[i]);
        if (rc != GPUMEM_OK) ch->host[i] = NULL;
        if (rc == GPUMEM_OK) rc = be->event_create(ch->ctx, &ch->copied[i]);
        if (rc != GPUMEM_OK) ch->copied[i] = 0;
    }
    if (rc == GPUMEM_OK) rc = be->event_create(ch->ctx, &ch->on_stream);
    if (rc != GPUMEM_OK) ch->on_stream = 0;
    if (rc == GPUMEM_OK) rc = be->stream_create(ch->ctx, &ch->xfer);
    if (rc != GPUMEM_OK) ch->xfer = 0;
    return rc;
}

static int check_create_args(gpumem_channel **out, gpumem_channel_kind kind, size_t capacity)
{
    static const char fn[] = "gpumem_channel_create";
    if (!out) {
        gm_log(GM_ERROR, "%s: out is NULL", fn);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    *out = NULL;
    if (kind != GPUMEM_CHANNEL_READBACK && kind != GPUMEM_CHANNEL_UPLOAD) {
        gm_log(GM_ERROR, "%s: kind %d is neither GPUMEM_CHANNEL_READBACK (0) nor "
               "GPUMEM_CHANNEL_UPLOAD (1)", fn, (int)kind);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    if (capacity == 0) {
        gm_log(GM_ERROR, "%s: capacity is 0; give the largest frame size in bytes", fn);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    return GPUMEM_OK;
}

gpumem_status gpumem_channel_create(gpumem_channel **out, gpumem_channel_kind kind, size_t capacity)
{
    int rc = check_create_args(out, kind, capacity);
    if (rc == GPUMEM_OK) rc = gm_api_ready();
    if (rc != GPUMEM_OK) return rc;
    uintptr_t ctx = 0;
    int device = 0;
    rc = gm_mgr.backend->current(&ctx, &device);
    if (rc != GPUMEM_OK) {
        gm_log(GM_ERROR, "gpumem_channel_create: no current CUDA context on this thread (error %d)",
               rc);
        return rc;
    }
    gpumem_channel *ch = calloc(1, sizeof *ch);
    gm_heap *heap = gm_heap_get(ctx, device);
    if (!ch || !heap) {
        free(ch);
        return GPUMEM_ERROR_OUT_OF_MEMORY;
    }
    *ch = (gpumem_channel){.kind = kind, .capacity = capacity, .ctx = ctx, .heap = heap};
    rc = channel_open(ch, GM_CALLSITE());
    if (rc != GPUMEM_OK) {
        gm_log(GM_INFO, "gpumem_channel_create: a %s channel of %zu bytes could not be set up "
               "(error %d)", kind_names[kind], capacity, rc);
        channel_close(ch);
        free(ch);
        return rc;
    }
    ch->magic = CHANNEL_MAGIC;
    *out = ch;
    return GPUMEM_OK;
}

gpumem_status gpumem_channel_destroy(gpumem_channel *ch)
{
    if (!ch) return GPUMEM_OK; /* like free(NULL) */
    static const char fn[] = "gpumem_channel_destroy";
    int rc = check_channel(ch, fn);
    if (rc == GPUMEM_OK) rc = take(ch, fn);
    if (rc != GPUMEM_OK) return rc;
    ch->magic = 0;
    rc = channel_close(ch);
    if (rc != GPUMEM_OK) report_driver_error(fn, "waiting for copies or freeing memory", rc);
    free(ch);
    return rc;
}

/* ------------------------------------------------------------------ readback */

static int readback_enqueue(gpumem_channel *ch, uintptr_t src, size_t bytes, uintptr_t stream)
{
    const gm_backend *be = gm_mgr.backend;
    unsigned b = (unsigned)(ch->frames & 1);
    int rc = GPUMEM_OK;
    if (ch->frames) /* the previous frame's PCIe copy may still read the staging buffer */
        rc = be->stream_wait_event(ch->ctx, stream, ch->copied[b ^ 1]);
    if (rc == GPUMEM_OK) rc = be->copy_async(ch->ctx, GM_COPY_D2D, ch->staging, src, bytes, stream);
    if (rc == GPUMEM_OK) rc = be->event_record(ch->ctx, ch->on_stream, stream);
    if (rc == GPUMEM_OK) rc = be->stream_wait_event(ch->ctx, ch->xfer, ch->on_stream);
    if (rc == GPUMEM_OK)
        rc = be->copy_async(ch->ctx, GM_COPY_D2H, (uintptr_t)ch->host[b], ch->staging, bytes,
                            ch->xfer);
    if (rc == GPUMEM_OK) rc = be->event_record(ch->ctx, ch->copied[b], ch->xfer);
    if (rc != GPUMEM_OK) return rc;
    ch->bytes[b] = bytes;
    return GPUMEM_OK;
}

gpumem_status gpumem_channel_submit(gpumem_channel *ch, const void *device_src, size_t bytes,
                                    void *stream, uint64_t *frame)
{
    static const char fn[] = "gpumem_channel_submit";
    int rc = enter(ch, fn, GPUMEM_CHANNEL_READBACK);
    if (rc != GPUMEM_OK) return rc;
    rc = check_frame(ch, fn, device_src, "device_src", bytes);
    if (rc == GPUMEM_OK) rc = check_context(ch, fn);
    if (rc == GPUMEM_OK) {
        rc = readback_enqueue(ch, (uintptr_t)device_src, bytes, (uintptr_t)stream);
        if (rc != GPUMEM_OK) report_driver_error(fn, "enqueueing the copy", rc);
    }
    if (rc == GPUMEM_OK) {
        if (frame) *frame = ch->frames;
        ch->frames++;
    }
    leave(ch);
    return rc;
}

/* Frame k's data once its copy has landed (a wait only while it is still running). */
static int acquire_frame(gpumem_channel *ch, uint64_t k, const void **data, size_t *bytes,
                         uint64_t *frame)
{
    unsigned b = (unsigned)(k & 1);
    int rc = gm_mgr.backend->event_synchronize(ch->copied[b]);
    if (rc != GPUMEM_OK) return rc;
    *data = ch->host[b];
    if (bytes) *bytes = ch->bytes[b];
    if (frame) *frame = k;
    return GPUMEM_OK;
}

/* `behind`: how many frames behind the newest one the caller wants (1 = acquire, 0 = latest). */
static gpumem_status acquire_impl(gpumem_channel *ch, const char *fn, uint64_t behind,
                                  const void **data, size_t *bytes, uint64_t *frame)
{
    if (data) *data = NULL;
    if (bytes) *bytes = 0;
    if (frame) *frame = 0;
    int rc = enter(ch, fn, GPUMEM_CHANNEL_READBACK);
    if (rc != GPUMEM_OK) return rc;
    if (!data) {
        gm_log(GM_ERROR, "%s: data is NULL", fn);
        rc = GPUMEM_ERROR_INVALID_VALUE;
    } else if (ch->frames <= behind) {
        rc = GPUMEM_ERROR_NOT_READY; /* not a misuse: the first frames of every run */
    } else {
        rc = acquire_frame(ch, ch->frames - 1 - behind, data, bytes, frame);
        if (rc != GPUMEM_OK) report_driver_error(fn, "waiting for the frame's copy", rc);
    }
    leave(ch);
    return rc;
}

gpumem_status gpumem_channel_acquire(gpumem_channel *ch, const void **data, size_t *bytes,
                                     uint64_t *frame)
{
    return acquire_impl(ch, "gpumem_channel_acquire", 1, data, bytes, frame);
}

gpumem_status gpumem_channel_acquire_latest(gpumem_channel *ch, const void **data, size_t *bytes,
                                            uint64_t *frame)
{
    return acquire_impl(ch, "gpumem_channel_acquire_latest", 0, data, bytes, frame);
}

/* ------------------------------------------------------------------ upload */

gpumem_status gpumem_channel_upload_buffer(gpumem_channel *ch, void **host)
{
    static const char fn[] = "gpumem_channel_upload_buffer";
    if (host) *host = NULL;
    int rc = enter(ch, fn, GPUMEM_CHANNEL_UPLOAD);
    if (rc != GPUMEM_OK) return rc;
    unsigned b = (unsigned)(ch->frames & 1);
    if (!host) {
        gm_log(GM_ERROR, "%s: host is NULL", fn);
        rc = GPUMEM_ERROR_INVALID_VALUE;
    } else {
        /* Only the copy two frames back read this buffer; it has normally long finished. */
        rc = gm_mgr.backend->event_synchronize(ch->copied[b]);
        if (rc != GPUMEM_OK) report_driver_error(fn, "waiting for the buffer's previous copy", rc);
    }
    if (rc == GPUMEM_OK) {
        *host = ch->host[b];
        ch->handed_out = true;
    }
    leave(ch);
    return rc;
}

static int upload_enqueue(gpumem_channel *ch, uintptr_t dst, size_t bytes, uintptr_t stream)
{
    const gm_backend *be = gm_mgr.backend;
    unsigned b = (unsigned)(ch->frames & 1);
    int rc = GPUMEM_OK;
    if (ch->frames) /* the previous frame's copy out of staging runs on the program's stream */
        rc = be->stream_wait_event(ch->ctx, ch->xfer, ch->on_stream);
    if (rc == GPUMEM_OK)
        rc = be->copy_async(ch->ctx, GM_COPY_H2D, ch->staging, (uintptr_t)ch->host[b], bytes,
                            ch->xfer);
    if (rc == GPUMEM_OK) rc = be->event_record(ch->ctx, ch->copied[b], ch->xfer);
    if (rc == GPUMEM_OK) rc = be->stream_wait_event(ch->ctx, stream, ch->copied[b]);
    if (rc == GPUMEM_OK) rc = be->copy_async(ch->ctx, GM_COPY_D2D, dst, ch->staging, bytes, stream);
    if (rc == GPUMEM_OK) rc = be->event_record(ch->ctx, ch->on_stream, stream);
    if (rc != GPUMEM_OK) return rc;
    ch->bytes[b] = bytes;
    return GPUMEM_OK;
}

gpumem_status gpumem_channel_upload(gpumem_channel *ch, void *device_dst, size_t bytes,
                                    void *stream, uint64_t *frame)
{
    static const char fn[] = "gpumem_channel_upload";
    int rc = enter(ch, fn, GPUMEM_CHANNEL_UPLOAD);
    if (rc != GPUMEM_OK) return rc;
    if (!ch->handed_out) {
        gm_log(GM_ERROR, "%s: no buffer to upload; fill the one gpumem_channel_upload_buffer "
               "returns first", fn);
        rc = GPUMEM_ERROR_INVALID_VALUE;
    }
    if (rc == GPUMEM_OK) rc = check_frame(ch, fn, device_dst, "device_dst", bytes);
    if (rc == GPUMEM_OK) rc = check_context(ch, fn);
    if (rc == GPUMEM_OK) {
        rc = upload_enqueue(ch, (uintptr_t)device_dst, bytes, (uintptr_t)stream);
        if (rc != GPUMEM_OK) report_driver_error(fn, "enqueueing the copy", rc);
    }
    if (rc == GPUMEM_OK) {
        if (frame) *frame = ch->frames;
        ch->frames++;
        ch->handed_out = false;
    }
    leave(ch);
    return rc;
}
