/* api_channel: the double-buffered readback and upload channels (gpumem_channel_*), linked from
 * libgpumem and run under the shim on the fake driver, whose streams run on worker threads.
 *
 * "Frame k is still in flight" is shown with a delayed fill on the program's stream (a "kernel"
 * that sleeps, then writes the frame's value) and cuStreamQuery answering NOT_READY after the
 * channel call returned: no timing threshold decides a result, the delays only have to outlast
 * a 1 MiB memcpy. */
#include <pthread.h>

#include "fakecuda.h"
#include "misuse_capture.h"

#define FRAME ((size_t)1 << 20)
#define SLOW_US 400000u /* a step that is certainly still running when the host looks */

static CUstream new_stream(void)
{
    CUstream s = NULL;
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    return s;
}

static CUdeviceptr dev_alloc(size_t n)
{
    CUdeviceptr d = 0;
    OK(cuMemAlloc(&d, n));
    return d;
}

static gpumem_channel *new_channel(gpumem_channel_kind kind, size_t capacity)
{
    gpumem_channel *ch = NULL;
    OK(gpumem_channel_create(&ch, kind, capacity));
    cr_assert_not_null(ch);
    return ch;
}

/* The device work of step k: after `delay_us`, the frame holds the byte value_of(k). */
static unsigned char value_of(uint64_t k) { return (unsigned char)(0x40 + k); }

static void step(CUstream s, CUdeviceptr d, uint64_t k, unsigned delay_us)
{
    OK(fakecuda_launch_fill(s, d, value_of(k), FRAME, delay_us));
}

static void assert_frame(const void *data, size_t bytes, uint64_t frame, uint64_t want_frame,
                         size_t want_bytes)
{
    cr_assert_not_null(data);
    cr_assert_eq(frame, want_frame, "got frame %llu, expected %llu", (unsigned long long)frame,
                 (unsigned long long)want_frame);
    cr_assert_eq(bytes, want_bytes);
    cr_assert(api_all_bytes(data, value_of(want_frame), bytes),
              "frame %llu does not hold its own data (first byte %#x, expected %#x)",
              (unsigned long long)want_frame, ((const unsigned char *)data)[0],
              value_of(want_frame));
}

/* Runs `call`, expects `code` and a logged line containing `needle`. */
#define MISUSE(call, code, needle) \
    do { \
        stderr_capture cap_; \
        capture_begin(&cap_); \
        gpumem_status st_ = (call); \
        char *err_ = capture_end(&cap_); \
        cr_assert_eq(st_, (code), "%s returned %d", #call, st_); \
        cr_assert(strstr(err_, (needle)) != NULL, "%s: expected '%s' in the log:\n%s", #call, \
                  (needle), err_); \
        free(err_); \
    } while (0)

/* ---------------------------------------------------------------- readback */

Test(channel, acquire_returns_frame_k_minus_1_while_frame_k_runs)
{
    api_start();
    CUstream s = new_stream();
    CUdeviceptr d = dev_alloc(FRAME);
    gpumem_channel *ch = new_channel(GPUMEM_CHANNEL_READBACK, FRAME);
    const void *data;
    size_t bytes;
    uint64_t frame, submitted;
    for (uint64_t k = 0; k < 5; k++) {
        step(s, d, k, SLOW_US);
        OK(gpumem_channel_submit(ch, (const void *)d, FRAME, s, &submitted));
        cr_assert_eq(submitted, k);
        gpumem_status st = gpumem_channel_acquire(ch, &data, &bytes, &frame);
        if (k == 0) {
            ERR(st, GPUMEM_ERROR_NOT_READY);
            continue;
        }
        OK(st);
        assert_frame(data, bytes, frame, k - 1, FRAME);
        /* Frame k's step (SLOW_US) has not finished: acquire did not wait for it. */
        ERR(cuStreamQuery(s), CUDA_ERROR_NOT_READY);
    }
    OK(gpumem_channel_acquire_latest(ch, &data, &bytes, &frame));
    assert_frame(data, bytes, frame, 4, FRAME);
    OK(cuStreamQuery(s)); /* the latest frame waited for its step */
    OK(gpumem_channel_destroy(ch));
    OK(cuMemFree(d));
    OK(cuStreamDestroy(s));
}

Test(channel, not_ready_until_enough_frames_were_submitted)
{
    api_start();
    CUdeviceptr d = dev_alloc(FRAME);
    gpumem_channel *ch = new_channel(GPUMEM_CHANNEL_READBACK, FRAME);
    const void *data = &data;
    size_t bytes = 1;
    uint64_t frame = 1;
    ERR(gpumem_channel_acquire(ch, &data, &bytes, &frame), GPUMEM_ERROR_NOT_READY);
    cr_assert(data == NULL && bytes == 0 && frame == 0, "outputs are cleared on NOT_READY");
    ERR(gpumem_channel_acquire_latest(ch, &data, NULL, NULL), GPUMEM_ERROR_NOT_READY);
    step(0, d, 0, 0);
    OK(gpumem_channel_submit(ch, (const void *)d, FRAME, NULL, NULL));
    ERR(gpumem_channel_acquire(ch, &data, &bytes, &frame), GPUMEM_ERROR_NOT_READY);
    OK(gpumem_channel_acquire_latest(ch, &data, &bytes, &frame));
    assert_frame(data, bytes, frame, 0, FRAME);
    step(0, d, 1, 0);
    OK(gpumem_channel_submit(ch, (const void *)d, FRAME, NULL, NULL));
    OK(gpumem_channel_acquire(ch, &data, &bytes, &frame));
    assert_frame(data, bytes, frame, 0, FRAME);
    OK(gpumem_channel_destroy(ch));
}

Test(channel, source_may_be_overwritten_right_after_submit)
{
    api_start();
    CUstream s = new_stream();
    CUdeviceptr d = dev_alloc(FRAME);
    gpumem_channel *ch = new_channel(GPUMEM_CHANNEL_READBACK, FRAME);
    step(s, d, 0, SLOW_US / 4);
    OK(gpumem_channel_submit(ch, (const void *)d, FRAME, s, NULL));
    OK(cuMemsetD8Async(d, 0xEE, FRAME, s)); /* the next step rewrites the source at once */
    const void *data;
    size_t bytes;
    uint64_t frame;
    OK(gpumem_channel_acquire_latest(ch, &data, &bytes, &frame));
    assert_frame(data, bytes, frame, 0, FRAME);
    OK(cuStreamSynchronize(s));
    unsigned char now = 0;
    OK(cuMemcpyDtoH(&now, d, 1));
    cr_assert_eq(now, 0xEE, "the program's later work did run");
    OK(gpumem_channel_destroy(ch));
}

Test(channel, frames_keep_their_sizes_and_alternate_between_two_buffers)
{
    api_start();
    CUdeviceptr d = dev_alloc(FRAME);
    gpumem_channel *ch = new_channel(GPUMEM_CHANNEL_READBACK, FRAME);
    const void *seen[6] = {0};
    for (uint64_t k = 0; k < 6; k++) {
        size_t n = FRAME >> k; /* 1 MiB, 512 KiB, ... */
        step(0, d, k, 0);
        OK(gpumem_channel_submit(ch, (const void *)d, n, NULL, NULL));
        if (k == 0) continue;
        const void *data, *again;
        size_t bytes, bytes_again;
        uint64_t frame, frame_again;
        OK(gpumem_channel_acquire(ch, &data, &bytes, &frame));
        assert_frame(data, bytes, frame, k - 1, FRAME >> (k - 1));
        /* Acquiring again before the next submit gives the same frame. */
        OK(gpumem_channel_acquire(ch, &again, &bytes_again, &frame_again));
        cr_assert(again == data && bytes_again == bytes && frame_again == frame);
        seen[k - 1] = data;
    }
    cr_assert(seen[0] != seen[1], "consecutive frames use different host buffers");
    for (int k = 2; k < 5; k++)
        cr_assert(seen[k] == seen[k - 2], "frame %d reuses frame %d's buffer", k, k - 2);
    OK(gpumem_channel_destroy(ch));
}

Test(channel, legacy_default_stream)
{
    api_start();
    CUdeviceptr d = dev_alloc(FRAME);
    gpumem_channel *ch = new_channel(GPUMEM_CHANNEL_READBACK, FRAME);
    for (uint64_t k = 0; k < 3; k++) {
        step(NULL, d, k, SLOW_US / 4);
        OK(gpumem_channel_submit(ch, (const void *)d, FRAME, NULL, NULL));
    }
    const void *data;
    size_t bytes;
    uint64_t frame;
    OK(gpumem_channel_acquire(ch, &data, &bytes, &frame));
    assert_frame(data, bytes, frame, 1, FRAME);
    OK(gpumem_channel_acquire_latest(ch, &data, &bytes, &frame));
    assert_frame(data, bytes, frame, 2, FRAME);
    OK(gpumem_channel_destroy(ch));
}

Test(channel, destroy_waits_for_copies_in_flight_and_frees_everything)
{
    api_start();
    CUstream s = new_stream();
    CUdeviceptr d = dev_alloc(FRAME);
    gpumem_stats before, during, after;
    OK(gpumem_get_stats(0, &before));
    fakecuda_reset_counters();
    gpumem_channel *ch = new_channel(GPUMEM_CHANNEL_READBACK, 3 * FRAME);
    OK(gpumem_get_stats(0, &during));
    cr_assert_eq(during.bytes_requested - before.bytes_requested, 3 * FRAME,
                 "the staging buffer is pooled device memory");
    cr_assert_eq(counters().host_alloc_calls, 2, "two pinned host buffers");
    step(s, d, 0, SLOW_US);
    OK(gpumem_channel_submit(ch, (const void *)d, FRAME, s, NULL));
    ERR(cuStreamQuery(s), CUDA_ERROR_NOT_READY);
    OK(gpumem_channel_destroy(ch));
    OK(cuStreamQuery(s)); /* destroy returned only after the copy that needed the step */
    OK(gpumem_get_stats(0, &after));
    cr_assert_eq(after.bytes_requested, before.bytes_requested);
    cr_assert_eq(after.allocations - after.frees, before.allocations - before.frees);
    OK(gpumem_channel_destroy(NULL));
}

Test(channel, creation_respects_the_limit)
{
    setenv("GPUMEM_LIMIT", "4MiB", 1);
    api_start();
    gpumem_channel *ch = (gpumem_channel *)&ch;
    ERR(gpumem_channel_create(&ch, GPUMEM_CHANNEL_READBACK, 16 * FRAME),
        GPUMEM_ERROR_OUT_OF_MEMORY);
    cr_assert_null(ch);
    gpumem_stats st;
    OK(gpumem_get_stats(0, &st));
    cr_assert_eq(st.bytes_requested, 0, "nothing is left allocated by a failed create");
    ch = new_channel(GPUMEM_CHANNEL_UPLOAD, FRAME);
    OK(gpumem_channel_destroy(ch));
}

/* ---------------------------------------------------------------- upload */

Test(channel, upload_is_ordered_after_earlier_and_before_later_work)
{
    api_start();
    CUstream s = new_stream();
    CUdeviceptr d = dev_alloc(FRAME);
    void *check = NULL;
    OK(cuMemAllocHost(&check, FRAME));
    gpumem_channel *ch = new_channel(GPUMEM_CHANNEL_UPLOAD, FRAME);
    step(s, d, 0, SLOW_US); /* earlier work that still writes the destination */
    void *buf = NULL;
    uint64_t frame = 9;
    OK(gpumem_channel_upload_buffer(ch, &buf));
    cr_assert_not_null(buf);
    api_fill_pattern(buf, FRAME, 7);
    OK(gpumem_channel_upload(ch, (void *)d, FRAME, s, &frame));
    cr_assert_eq(frame, 0);
    OK(cuMemcpyDtoHAsync(check, d, FRAME, s)); /* later work reads the destination */
    OK(cuStreamSynchronize(s));
    size_t bad = api_check_pattern(check, FRAME, 7);
    cr_assert_eq(bad, FRAME, "byte %zu of the uploaded frame is wrong (%#x)", bad,
                 ((unsigned char *)check)[bad < FRAME ? bad : 0]);
    OK(gpumem_channel_destroy(ch));
    OK(cuMemFreeHost(check));
}

Test(channel, upload_fills_the_next_buffer_while_the_stream_is_busy)
{
    api_start();
    CUstream s = new_stream();
    CUdeviceptr d = dev_alloc(FRAME);
    void *check = NULL;
    OK(cuMemAllocHost(&check, 4 * FRAME));
    gpumem_channel *ch = new_channel(GPUMEM_CHANNEL_UPLOAD, FRAME);
    step(s, d, 0, SLOW_US); /* the stream is busy for a while */
    void *bufs[4];
    for (uint32_t k = 0; k < 4; k++) {
        uint64_t frame;
        OK(gpumem_channel_upload_buffer(ch, &bufs[k]));
        /* Frames 0..2 are filled without waiting for the stream: buffer k was last read by
         * frame k-2's copy, which does not depend on the busy stream for k <= 2. */
        if (k == 2) ERR(cuStreamQuery(s), CUDA_ERROR_NOT_READY);
        api_fill_pattern(bufs[k], FRAME, 100 + k);
        OK(gpumem_channel_upload(ch, (void *)d, FRAME, s, &frame));
        cr_assert_eq(frame, k);
        OK(cuMemcpyDtoHAsync((char *)check + k * FRAME, d, FRAME, s));
    }
    cr_assert(bufs[0] != bufs[1] && bufs[0] == bufs[2] && bufs[1] == bufs[3]);
    OK(cuStreamSynchronize(s));
    for (uint32_t k = 0; k < 4; k++) {
        size_t bad = api_check_pattern((char *)check + k * FRAME, FRAME, 100 + k);
        cr_assert_eq(bad, FRAME, "frame %u differs at byte %zu", k, bad);
    }
    OK(gpumem_channel_destroy(ch));
    OK(cuMemFreeHost(check));
}

Test(channel, upload_buffer_is_stable_until_uploaded_and_required)
{
    api_start();
    CUdeviceptr d = dev_alloc(FRAME);
    gpumem_channel *ch = new_channel(GPUMEM_CHANNEL_UPLOAD, FRAME);
    MISUSE(gpumem_channel_upload(ch, (void *)d, FRAME, NULL, NULL), GPUMEM_ERROR_INVALID_VALUE,
           "gpumem_channel_upload: no buffer to upload");
    void *a, *b;
    OK(gpumem_channel_upload_buffer(ch, &a));
    OK(gpumem_channel_upload_buffer(ch, &b));
    cr_assert(a == b, "asking twice before uploading gives the same buffer");
    memset(a, 0x5A, 64);
    uint64_t frame = 9;
    OK(gpumem_channel_upload(ch, (void *)d, 64, NULL, &frame));
    cr_assert_eq(frame, 0);
    MISUSE(gpumem_channel_upload(ch, (void *)d, 64, NULL, NULL), GPUMEM_ERROR_INVALID_VALUE,
           "no buffer to upload"); /* the buffer went with frame 0 */
    unsigned char got[64];
    OK(cuMemcpyDtoH(got, d, sizeof got));
    cr_assert(api_all_bytes(got, 0x5A, sizeof got));
    OK(gpumem_channel_destroy(ch));
}

/* ---------------------------------------------------------------- misuse and errors */

Test(channel, misuse_gets_invalid_value_and_a_line_that_names_it)
{
    api_start();
    CUdeviceptr d = dev_alloc(FRAME);
    gpumem_channel *rb = new_channel(GPUMEM_CHANNEL_READBACK, FRAME);
    gpumem_channel *up = new_channel(GPUMEM_CHANNEL_UPLOAD, FRAME);
    gpumem_channel *ch = NULL;
    const void *data;
    void *host;
    const int INVALID = GPUMEM_ERROR_INVALID_VALUE;
    MISUSE(gpumem_channel_create(NULL, GPUMEM_CHANNEL_READBACK, FRAME), INVALID,
           "gpumem_channel_create: out is NULL");
    MISUSE(gpumem_channel_create(&ch, (gpumem_channel_kind)7, FRAME), INVALID,
           "kind 7 is neither GPUMEM_CHANNEL_READBACK (0) nor GPUMEM_CHANNEL_UPLOAD (1)");
    MISUSE(gpumem_channel_create(&ch, GPUMEM_CHANNEL_READBACK, 0), INVALID, "capacity is 0");
    cr_assert_null(ch);
    MISUSE(gpumem_channel_submit(NULL, (const void *)d, FRAME, NULL, NULL), INVALID,
           "gpumem_channel_submit: the channel is NULL");
    MISUSE(gpumem_channel_acquire(NULL, &data, NULL, NULL), INVALID,
           "gpumem_channel_acquire: the channel is NULL");
    MISUSE(gpumem_channel_submit(rb, NULL, FRAME, NULL, NULL), INVALID, "device_src is NULL");
    MISUSE(gpumem_channel_submit(rb, (const void *)d, 0, NULL, NULL), INVALID,
           "0 bytes; a frame of this channel holds 1 to 1048576 bytes");
    MISUSE(gpumem_channel_submit(rb, (const void *)d, FRAME + 1, NULL, NULL), INVALID,
           "1048577 bytes; a frame of this channel holds 1 to 1048576 bytes");
    MISUSE(gpumem_channel_acquire(rb, NULL, NULL, NULL), INVALID,
           "gpumem_channel_acquire: data is NULL");
    MISUSE(gpumem_channel_submit(up, (const void *)d, FRAME, NULL, NULL), INVALID,
           "the channel is a GPUMEM_CHANNEL_UPLOAD channel; this call needs a "
           "GPUMEM_CHANNEL_READBACK channel");
    MISUSE(gpumem_channel_acquire_latest(up, &data, NULL, NULL), INVALID,
           "needs a GPUMEM_CHANNEL_READBACK channel");
    MISUSE(gpumem_channel_upload_buffer(rb, &host), INVALID,
           "gpumem_channel_upload_buffer: the channel is a GPUMEM_CHANNEL_READBACK channel");
    MISUSE(gpumem_channel_upload(rb, (void *)d, FRAME, NULL, NULL), INVALID,
           "needs a GPUMEM_CHANNEL_UPLOAD channel");
    MISUSE(gpumem_channel_upload_buffer(up, NULL), INVALID,
           "gpumem_channel_upload_buffer: host is NULL");
    OK(gpumem_channel_upload_buffer(up, &host));
    MISUSE(gpumem_channel_upload(up, NULL, 16, NULL, NULL), INVALID, "device_dst is NULL");
    MISUSE(gpumem_channel_upload(up, (void *)d, FRAME + 1, NULL, NULL), INVALID,
           "1048577 bytes");
    /* None of that consumed a frame. */
    uint64_t frame = 9;
    OK(gpumem_channel_submit(rb, (const void *)d, FRAME, NULL, &frame));
    cr_assert_eq(frame, 0);
    OK(gpumem_channel_upload(up, (void *)d, 16, NULL, &frame));
    cr_assert_eq(frame, 0);
    OK(gpumem_channel_destroy(rb));
    OK(gpumem_channel_destroy(up));
}

Test(channel, the_channels_context_must_be_current)
{
    CUcontext primary = api_start();
    CUdeviceptr d = dev_alloc(FRAME);
    gpumem_channel *ch = new_channel(GPUMEM_CHANNEL_READBACK, FRAME);
    CUcontext other = NULL;
    OK(cuCtxCreate(&other, NULL, 0, 0)); /* current now */
    MISUSE(gpumem_channel_submit(ch, (const void *)d, FRAME, NULL, NULL),
           GPUMEM_ERROR_INVALID_CONTEXT, "is not the channel's");
    CUcontext popped = NULL;
    OK(cuCtxPopCurrent(&popped));
    cr_assert(popped == other);
    OK(cuCtxSetCurrent(NULL)); /* no context at all now */
    MISUSE(gpumem_channel_submit(ch, (const void *)d, FRAME, NULL, NULL),
           GPUMEM_ERROR_INVALID_CONTEXT, "gpumem_channel_submit: no current CUDA context");
    gpumem_channel *none = NULL;
    MISUSE(gpumem_channel_create(&none, GPUMEM_CHANNEL_UPLOAD, FRAME),
           GPUMEM_ERROR_INVALID_CONTEXT, "gpumem_channel_create: no current CUDA context");
    OK(cuCtxSetCurrent(primary));
    OK(gpumem_channel_submit(ch, (const void *)d, FRAME, NULL, NULL));
    /* Destroy works from any context: it names the channel's own. */
    OK(cuCtxPushCurrent(other));
    OK(gpumem_channel_destroy(ch));
    OK(cuCtxPopCurrent(&popped));
    OK(cuCtxDestroy(other));
}

Test(channel, driver_errors_come_back_unchanged_and_cost_no_frame)
{
    api_start();
    CUdeviceptr d = dev_alloc(FRAME);
    gpumem_channel *ch = new_channel(GPUMEM_CHANNEL_READBACK, FRAME);
    /* A stream handle the driver does not know. */
    ERR(gpumem_channel_submit(ch, (const void *)d, FRAME, (void *)(uintptr_t)0x1234, NULL),
        CUDA_ERROR_INVALID_HANDLE);
    /* Host memory the driver never saw is no device source. */
    static unsigned char not_device[4096];
    ERR(gpumem_channel_submit(ch, not_device, sizeof not_device, NULL, NULL),
        CUDA_ERROR_INVALID_VALUE);
    const void *data;
    ERR(gpumem_channel_acquire_latest(ch, &data, NULL, NULL), GPUMEM_ERROR_NOT_READY);
    step(0, d, 3, 0);
    uint64_t frame = 9;
    OK(gpumem_channel_submit(ch, (const void *)d, FRAME, NULL, &frame));
    cr_assert_eq(frame, 0);
    size_t bytes;
    OK(gpumem_channel_acquire_latest(ch, &data, &bytes, &frame));
    cr_assert(api_all_bytes(data, value_of(3), bytes));
    OK(gpumem_channel_destroy(ch));
}

typedef struct {
    gpumem_channel *ch;
    gpumem_status st;
    uint64_t frame;
} latest_arg;

static void *wait_latest(void *p)
{
    latest_arg *a = p;
    const void *data;
    a->st = gpumem_channel_acquire_latest(a->ch, &data, NULL, &a->frame);
    return NULL;
}

Test(channel, two_threads_inside_one_channel_are_refused)
{
    api_start();
    CUstream s = new_stream();
    CUdeviceptr d = dev_alloc(FRAME);
    gpumem_channel *ch = new_channel(GPUMEM_CHANNEL_READBACK, FRAME);
    step(s, d, 0, 4 * SLOW_US);
    OK(gpumem_channel_submit(ch, (const void *)d, FRAME, s, NULL));
    latest_arg a = {ch, -1, 9};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, wait_latest, &a), 0);
    api_sleep_ms(SLOW_US / 1000); /* the thread now waits inside acquire_latest */
    ERR(cuStreamQuery(s), CUDA_ERROR_NOT_READY);
    MISUSE(gpumem_channel_submit(ch, (const void *)d, FRAME, s, NULL), GPUMEM_ERROR_INVALID_VALUE,
           "is in use by another thread right now");
    pthread_join(t, NULL);
    OK(a.st);
    cr_assert_eq(a.frame, 0);
    /* One thread after the other is fine. */
    uint64_t frame = 9;
    OK(gpumem_channel_submit(ch, (const void *)d, FRAME, s, &frame));
    cr_assert_eq(frame, 1);
    OK(gpumem_channel_destroy(ch));
}
