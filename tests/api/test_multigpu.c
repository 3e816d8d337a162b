/* api_multigpu: several devices under the shim (issue 16), on the fake driver with
 * FAKECUDA_DEVICES=2..4.
 *
 * - Per-device limits: GPUMEM_LIMIT's ordinals are the process's CUDA ordinals (after
 *   CUDA_VISIBLE_DEVICES, here FAKECUDA_VISIBLE), its UUID entries follow the physical device
 *   whatever ordinal it gets, GPUMEM_LIMIT_<i> beats both; an ordinal or UUID no visible device
 *   has stops the process with exit status 2 and one line; the report names each device with its
 *   limit and UUID (text and JSON).
 * - Peer copies (cuMemcpyPeer/Async, cuMemcpy3DPeer, DtoD and cuMemcpy across devices) in a ring
 *   over 2, 3 and 4 devices: bytes, checks on each side against its own device's pool, counts
 *   (D2D and the peer counter, on the destination's device).
 * - Peer access: a block of device 0's pool used by a "kernel" of device 1's context only after
 *   cuCtxEnablePeerAccess (fakecuda_launch_kernel_fill faults as the real kernel would); pointer
 *   queries from device 1 name device 0's context; with GPUMEM_EXPANDABLE=1 the chunks get
 *   cuMemSetAccess for the peer, before and after the enable.
 * - IPC across devices: a pooled block of device 0 opened by a process whose current device is 1
 *   (multigpu_child): bytes both ways, kernel access through the lazily enabled peer access. */
#include <sys/wait.h>

#include "api_test.h"
#include "fakecuda.h"
#include "fakenvml.h"
#include "misuse_capture.h"

#define MiB ((size_t)1 << 20)

typedef gpumem_status (*copy_stats_fn)(int device, gpumem_copy_stats *out);
typedef gpumem_status (*dev_stats_fn)(int device, gpumem_stats *out);

static gpumem_copy_stats copy_stats(int device)
{
    copy_stats_fn fn = (copy_stats_fn)(uintptr_t)api_shim_sym("gpumem_get_copy_stats");
    cr_assert_not_null(fn, "gpumem_get_copy_stats is not reachable: is the shim preloaded?");
    gpumem_copy_stats st;
    cr_assert_eq(fn(device, &st), GPUMEM_OK);
    return st;
}

static gpumem_stats dev_stats(int device)
{
    dev_stats_fn fn = (dev_stats_fn)(uintptr_t)api_shim_sym("gpumem_get_stats");
    cr_assert_not_null(fn);
    gpumem_stats st;
    cr_assert_eq(fn(device, &st), GPUMEM_OK);
    return st;
}

static CUcontext ctx_of(int ordinal)
{
    CUdevice d;
    CUcontext c;
    OK(cuDeviceGet(&d, ordinal));
    OK(cuDevicePrimaryCtxRetain(&c, d));
    return c;
}

static size_t total_of(int ordinal)
{
    CUdevice d;
    size_t total = 0;
    OK(cuDeviceGet(&d, ordinal));
    OK(cuDeviceTotalMem(&total, d));
    return total;
}

static unsigned char *host(CUdeviceptr p) { return (unsigned char *)(uintptr_t)p; }

/* ---------------------------------------------------------------- per-device limits */

Test(multigpu, uuid_entries_follow_the_device_under_reordering)
{
    char u0[48], u2[48], limit[160];
    fakenvml_uuid_text(0, "GPU", u0);
    fakenvml_uuid_text(2, "GPU", u2);
    snprintf(limit, sizeof limit, "%s:64MiB,%s:32MiB", u0, u2);
    setenv("FAKECUDA_DEVICES", "3", 1);
    setenv("FAKECUDA_VISIBLE", "2,0,1", 1); /* ordinal 0 is physical 2, 1 is 0, 2 is 1 */
    setenv("CUDA_VISIBLE_DEVICES", "2,0,1", 1);
    setenv("GPUMEM_LIMIT", limit, 1);
    setenv("GPUMEM_LIMIT_2", "16MiB", 1);
    OK(cuInit(0));
    cr_assert_eq(total_of(0), 32 * MiB, "ordinal 0 is the device of %s", u2);
    cr_assert_eq(total_of(1), 64 * MiB, "ordinal 1 is the device of %s", u0);
    cr_assert_eq(total_of(2), 16 * MiB, "GPUMEM_LIMIT_2 names the process's ordinal 2");
    CUdeviceptr p;
    OK(cuCtxSetCurrent(ctx_of(0)));
    ERR(cuMemAlloc(&p, 40 * MiB), CUDA_ERROR_OUT_OF_MEMORY);
    OK(cuCtxSetCurrent(ctx_of(1)));
    OK(cuMemAlloc(&p, 40 * MiB));
    cr_assert_eq(dev_stats(1).limit_bytes, 64 * MiB);
    OK(cuMemFree(p));
}

Test(multigpu, ordinals_are_the_process_numbering)
{
    setenv("FAKECUDA_DEVICES", "2", 1);
    setenv("FAKECUDA_VISIBLE", "1,0", 1);
    setenv("GPUMEM_LIMIT", "0:32MiB,1:64MiB", 1);
    OK(cuInit(0));
    cr_assert_eq(total_of(0), 32 * MiB, "ordinal 0, whichever physical device it is");
    cr_assert_eq(total_of(1), 64 * MiB);
}

static void expect_refused(const char *const *env, const char *line)
{
    api_child c = api_scenario("alloc_one", env, 20.0);
    cr_assert(WIFEXITED(c.status) && WEXITSTATUS(c.status) == 2, "expected exit status 2, got %#x; stderr:\n%s",
              c.status, c.err);
    cr_assert(strstr(c.err, line), "expected '%s' in:\n%s", line, c.err);
    cr_assert_eq(api_count_lines(c.err, "gpumem:"), 1, "one line:\n%s", c.err);
    api_child_free(&c);
}

Test(multigpu, limits_for_devices_the_process_does_not_see_stop_it)
{
    char u5[48], hidden[160];
    fakenvml_uuid_text(5, "GPU", u5);
    expect_refused((const char *const[]){"FAKECUDA_DEVICES=2", "GPUMEM_LIMIT=0:1GiB,2:1GiB", "CUDA_VISIBLE_DEVICES", NULL},
                   "gpumem: GPUMEM_LIMIT='0:1GiB,2:1GiB' is not valid: there is no device 2: this process sees 2 "
                   "devices (0 to 1), numbered after CUDA_VISIBLE_DEVICES");
    expect_refused((const char *const[]){"FAKECUDA_DEVICES=2", "GPUMEM_LIMIT_3=1GiB", "CUDA_VISIBLE_DEVICES", NULL},
                   "gpumem: GPUMEM_LIMIT_3='1GiB' is not valid: there is no device 3");
    snprintf(hidden, sizeof hidden, "GPUMEM_LIMIT=%s:1GiB", u5);
    expect_refused((const char *const[]){"FAKECUDA_DEVICES=2", hidden, "CUDA_VISIBLE_DEVICES", NULL},
                   "no device has the UUID GPU-");
    /* Under CUDA_VISIBLE_DEVICES the UUID may be a hidden device's: the entry is skipped. */
    api_child c = api_scenario_ok("alloc_one",
                                  (const char *const[]){"FAKECUDA_DEVICES=2", hidden, "CUDA_VISIBLE_DEVICES=0,1", NULL});
    api_child_free(&c);
}

static char *report_now(void)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert_not_null(f);
    api_report_fn fn = (api_report_fn)(uintptr_t)api_shim_sym("gpumem_report");
    cr_assert_not_null(fn);
    fn(f);
    fclose(f);
    return buf;
}

/* Two devices used, each with a block, and one peer copy between them. */
static void use_two_devices(void)
{
    CUdeviceptr a0, a1;
    OK(cuInit(0));
    CUcontext c0 = ctx_of(0), c1 = ctx_of(1);
    OK(cuCtxSetCurrent(c0));
    OK(cuMemAlloc(&a0, 4096));
    OK(cuCtxSetCurrent(c1));
    OK(cuMemAlloc(&a1, 8192));
    OK(cuMemcpyPeer(a1, c1, a0, c0, 4096));
}

Test(multigpu, report_names_each_device_with_its_limit_and_uuid)
{
    char u0[48], u1[48], line[256];
    fakenvml_uuid_text(0, "GPU", u0);
    fakenvml_uuid_text(1, "GPU", u1);
    setenv("FAKECUDA_DEVICES", "2", 1);
    setenv("FAKECUDA_VISIBLE", "1,0", 1);
    setenv("GPUMEM_LIMIT", "0:32MiB,1:64MiB", 1);
    use_two_devices();
    char *text = report_now();
    snprintf(line, sizeof line, "limit 33554432 B, %s\n", u1);
    cr_assert(strstr(text, line), "device 0 (physical 1): '%s' in:\n%s", line, text);
    snprintf(line, sizeof line, "limit 67108864 B, %s\n", u0);
    cr_assert(strstr(text, line), "'%s' in:\n%s", line, text);
    cr_assert(strstr(text, "copies on device 1: D2D 4096 B in 1 calls\n"), "%s", text);
    cr_assert(strstr(text, "  D2D from other devices (peer): 4096 B in 1 calls\n"), "%s", text);
    free(text);
}

Test(multigpu, json_report_names_each_device_with_its_limit_and_uuid)
{
    char u0[48], u1[48], want[256];
    fakenvml_uuid_text(0, "GPU", u0);
    fakenvml_uuid_text(1, "GPU", u1);
    setenv("FAKECUDA_DEVICES", "2", 1);
    setenv("GPUMEM_REPORT_FORMAT", "json", 1);
    setenv("GPUMEM_LIMIT", "1:64MiB", 1);
    use_two_devices();
    char *json = report_now();
    snprintf(want, sizeof want, "{\"device\":0,\"uuid\":\"%s\",", u0);
    cr_assert(strstr(json, want), "'%s' in:\n%s", want, json);
    snprintf(want, sizeof want, "{\"device\":1,\"uuid\":\"%s\",", u1);
    cr_assert(strstr(json, want), "'%s' in:\n%s", want, json);
    cr_assert(strstr(json, "\"limit_bytes\":67108864"), "%s", json);
    cr_assert(strstr(json, "\"peer\":{\"calls\":1,\"bytes\":4096,"), "%s", json);
    free(json);
}

/* ---------------------------------------------------------------- peer copies in a ring */

#define RING_BYTES 6000

/* Device i's block, pattern i, copied to device i+1 five ways; then the checks on both sides. */
static void peer_ring(int n)
{
    char count[8];
    snprintf(count, sizeof count, "%d", n);
    setenv("FAKECUDA_DEVICES", count, 1);
    OK(cuInit(0));
    CUcontext ctx[4];
    CUdeviceptr blk[4], freed[4];
    static unsigned char page[RING_BYTES];
    for (int i = 0; i < n; i++) {
        ctx[i] = ctx_of(i);
        OK(cuCtxSetCurrent(ctx[i]));
        OK(cuMemAlloc(&blk[i], 5 * RING_BYTES));
        OK(cuMemAlloc(&freed[i], 4096));
        OK(cuMemFree(freed[i]));
        api_fill_pattern(page, RING_BYTES, (uint32_t)i);
        OK(cuMemcpyHtoD(blk[i], page, RING_BYTES));
    }
    for (int i = 0; i < n; i++) {
        int j = (i + 1) % n;
        CUdeviceptr src = blk[i], dst = blk[j] + RING_BYTES;
        OK(cuCtxSetCurrent(ctx[i])); /* the source's context current: every copy below names both */
        OK(cuMemcpyPeer(dst, ctx[j], src, ctx[i], 1000));
        OK(cuMemcpyPeerAsync(dst + 1000, ctx[j], src + 1000, ctx[i], 1000, 0));
        OK(cuMemcpyDtoD(dst + 2000, src + 2000, 1000));          /* unified addressing */
        OK(cuMemcpy(dst + 3000, src + 3000, 1000));              /* cudaMemcpyDefault */
        OK(cuMemcpyDtoDAsync(dst + 4000, src + 4000, 1000, 0));
        CUDA_MEMCPY3D_PEER p = {0};
        p.srcMemoryType = p.dstMemoryType = CU_MEMORYTYPE_DEVICE;
        p.srcDevice = src + 5000;
        p.dstDevice = dst + 5000;
        p.srcContext = ctx[i];
        p.dstContext = ctx[j];
        p.srcPitch = p.dstPitch = 500;
        p.srcHeight = p.dstHeight = 2;
        p.WidthInBytes = 500;
        p.Height = 2;
        p.Depth = 1;
        OK(cuMemcpy3DPeer(&p));
        OK(cuCtxSynchronize());
    }
    for (int j = 0; j < n; j++) {
        int i = (j + n - 1) % n;
        cr_assert_eq(api_check_pattern(host(blk[j]) + RING_BYTES, RING_BYTES, (uint32_t)i), RING_BYTES,
                     "device %d -> %d moved the wrong bytes", i, j);
        gpumem_copy_stats st = copy_stats(j);
        cr_assert_eq(st.total[GPUMEM_COPY_D2D].calls, 6, "device %d", j);
        cr_assert_eq(st.total[GPUMEM_COPY_D2D].bytes, RING_BYTES, "device %d", j);
        cr_assert_eq(st.peer.calls, 6, "device %d: every one is a peer copy", j);
        cr_assert_eq(st.peer.bytes, RING_BYTES);
        cr_assert_eq(st.total[GPUMEM_COPY_H2D].calls, 1);
    }
    /* A copy within one device is no peer copy. */
    OK(cuMemcpyDtoD(blk[0] + 4 * RING_BYTES, blk[0], 100));
    cr_assert_eq(copy_stats(0).peer.calls, 6);
    /* Checked on each side against its own device's pool, refused on that device. */
    stderr_capture cap;
    capture_begin(&cap);
    for (int i = 0; i < n; i++) {
        int j = (i + 1) % n;
        ERR(cuMemcpyPeer(blk[j], ctx[j], freed[i], ctx[i], 64), CUDA_ERROR_INVALID_VALUE);
        ERR(cuMemcpy(blk[j] + 5 * RING_BYTES - 10, blk[i], 64), CUDA_ERROR_INVALID_VALUE);
    }
    char *err = capture_end(&cap);
    cr_assert_eq(api_count_lines(err, "lies in freed pool memory"), n, "%s", err);
    cr_assert_eq(api_count_lines(err, "runs 54 bytes past the end of its allocation"), n, "%s", err);
    free(err);
    for (int i = 0; i < n; i++) {
        gpumem_copy_stats st = copy_stats(i);
        cr_assert_eq(st.refused_copies, 2, "device %d: its freed source and its overrun destination", i);
        cr_assert_eq(st.peer.calls, 6, "refused copies are not counted");
    }
    for (int i = 0; i < n; i++) {
        OK(cuCtxSetCurrent(ctx[i]));
        OK(cuMemFree(blk[i]));
    }
}

Test(multigpu, peer_copies_between_2_devices) { peer_ring(2); }
Test(multigpu, peer_copies_between_3_devices) { peer_ring(3); }
Test(multigpu, peer_copies_between_4_devices) { peer_ring(4); }

/* ---------------------------------------------------------------- peer access */

static void peer_access(bool expandable)
{
    setenv("FAKECUDA_DEVICES", "2", 1);
    if (expandable) setenv("GPUMEM_EXPANDABLE", "1", 1);
    OK(cuInit(0));
    CUcontext c0 = ctx_of(0), c1 = ctx_of(1);
    CUdeviceptr a, b, filler;
    OK(cuCtxSetCurrent(c0));
    OK(cuMemAlloc(&filler, 512)); /* so `a` lies inside a pool segment, not at its start */
    OK(cuMemAlloc(&a, 3000));
    OK(cuCtxSetCurrent(c1));
    ERR(fakecuda_launch_kernel_fill(0, a, 0x11, 3000), CUDA_ERROR_ILLEGAL_ADDRESS);
    OK(cuCtxEnablePeerAccess(c0, 0));
    OK(fakecuda_launch_kernel_fill(0, a, 0x11, 3000));
    OK(cuCtxSynchronize());
    cr_assert(api_all_bytes(host(a), 0x11, 3000), "the kernel of device 1 wrote device 0's block");
    /* What device 1's context is told about device 0's block. */
    CUcontext owner = NULL;
    int ordinal = -1;
    CUdeviceptr base = 0;
    size_t size = 0;
    OK(cuPointerGetAttribute(&owner, CU_POINTER_ATTRIBUTE_CONTEXT, a));
    OK(cuPointerGetAttribute(&ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, a + 10));
    OK(cuMemGetAddressRange(&base, &size, a + 100));
    /* VMM memory belongs to no context: the driver's answer for a chunk is NULL, as without gpumem. */
    cr_assert_eq(owner, expandable ? NULL : c0, "context %p, c0 %p, c1 %p", (void *)owner, (void *)c0, (void *)c1);
    cr_assert_eq(ordinal, 0);
    cr_assert_eq(base, a);
    cr_assert_eq(size, 3000);
    /* A block device 0 maps after the enable is reachable too (a new chunk, or a new segment). */
    OK(cuCtxSetCurrent(c0));
    OK(cuMemAlloc(&b, 40 * MiB));
    OK(cuCtxSetCurrent(c1));
    OK(fakecuda_launch_kernel_fill(0, b + 39 * MiB, 0x22, 4096));
    OK(cuCtxSynchronize());
    cr_assert(api_all_bytes(host(b) + 39 * MiB, 0x22, 4096));
    if (expandable) cr_assert_eq(fakecuda_vmm_access(b + 39 * MiB) & 2u, 2u, "cuMemSetAccess for device 1");
    OK(cuCtxSetCurrent(c0));
    OK(cuMemFree(a));
    OK(cuMemFree(b));
    OK(cuMemFree(filler));
}

Test(multigpu, peer_access_reaches_pooled_blocks) { peer_access(false); }
Test(multigpu, peer_access_reaches_expandable_chunks) { peer_access(true); }

/* ---------------------------------------------------------------- IPC across devices */

static void handle_hex(const CUipcMemHandle *h, char out[2 * CU_IPC_HANDLE_SIZE + 1])
{
    for (size_t i = 0; i < CU_IPC_HANDLE_SIZE; i++) sprintf(out + 2 * i, "%02x", (unsigned char)h->reserved[i]);
}

static void ipc_to_device_1(bool lazy)
{
    setenv("FAKECUDA_DEVICES", "2", 1);
    api_start();
    CUdeviceptr filler, a;
    static unsigned char page[5000];
    OK(cuMemAlloc(&filler, 1024)); /* an interior block: gpumem's registry, not the driver, names it */
    OK(cuMemAlloc(&a, 5000));
    api_fill_pattern(page, sizeof page, 7);
    OK(cuMemcpyHtoD(a, page, sizeof page));
    CUipcMemHandle h;
    char hex[2 * CU_IPC_HANDLE_SIZE + 1];
    OK(cuIpcGetMemHandle(&h, a));
    handle_hex(&h, hex);
    const char *args[] = {"import", "1", hex, "7", "5000", lazy ? "1" : "0", NULL};
    api_child c;
    cr_assert(api_run(MULTIGPU_CHILD_PATH, args, NULL, 20.0, &c));
    cr_assert(api_exited_ok(&c), "status %#x, stdout:\n%s\nstderr:\n%s", c.status, c.out, c.err);
    char want[256];
    snprintf(want, sizeof want, "open 0\nbytes ok\nkernel %d\nclose 0\n", lazy ? 0 : (int)CUDA_ERROR_ILLEGAL_ADDRESS);
    cr_assert_str_eq(c.out, want, "stderr:\n%s", c.err);
    api_child_free(&c);
    OK(cuMemcpyDtoH(page, a, sizeof page));
    cr_assert_eq(api_check_pattern(page, sizeof page, 8), sizeof page, "what device 1's process wrote");
    OK(cuMemFree(a));
    OK(cuMemFree(filler));
}

Test(multigpu, ipc_block_opened_on_another_device_with_lazy_peer_access) { ipc_to_device_1(true); }
Test(multigpu, ipc_block_opened_on_another_device_without_peer_access) { ipc_to_device_1(false); }
