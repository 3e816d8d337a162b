/* api_expandable: GPUMEM_EXPANDABLE=1 through the real preload path, on the fake driver's VMM
 * (cuMemAddressReserve = mmap PROT_NONE, cuMemCreate = a memfd, cuMemMap = MAP_FIXED of it,
 * cuMemSetAccess = mprotect; memory touched before its access was set faults). Growth at a
 * range's end, data across growth and chunk boundaries, the limit in mapped bytes, pointer
 * identity, the fallbacks (no VMM, a map or a create failing half way), a primary context reset
 * and fork. IPC of expandable blocks: tests/api/test_ipc.c. */
#include <sys/wait.h>
#include <unistd.h>

#include "api_test.h"
#include "fakecuda.h"

#define MiB ((size_t)1 << 20)

static void expandable_env(void)
{
    setenv("GPUMEM_EXPANDABLE", "1", 1);
}

static uint64_t fake_in_use(void)
{
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    return c.bytes_in_use;
}

static void put_pattern(CUdeviceptr p, size_t n, uint32_t seed)
{
    unsigned char *h = malloc(n);
    cr_assert_not_null(h);
    api_fill_pattern(h, n, seed);
    OK(cuMemcpyHtoD(p, h, n));
    free(h);
}

static size_t pattern_errors(CUdeviceptr p, size_t n, uint32_t seed)
{
    unsigned char *h = malloc(n);
    cr_assert_not_null(h);
    OK(cuMemcpyDtoH(h, p, n));
    size_t first_bad = api_check_pattern(h, n, seed);
    free(h);
    return n - first_bad; /* 0 when intact */
}

Test(expandable, blocks_grow_contiguously_and_keep_their_data)
{
    expandable_env();
    api_start();
    CUdeviceptr a, b, c;
    OK(cuMemAlloc(&a, 3 * MiB));
    put_pattern(a, 3 * MiB, 1);
    OK(cuMemAlloc(&b, 30 * MiB)); /* maps 14 more chunks behind a */
    cr_expect_eq(b, a + 3 * MiB, "one virtual range");
    put_pattern(b, 30 * MiB, 2); /* one copy across 15 chunk mappings */
    cr_expect_eq(pattern_errors(a, 3 * MiB, 1), 0);
    cr_expect_eq(pattern_errors(b, 30 * MiB, 2), 0);
    gpumem_stats st = api_stats_or_fail();
    cr_expect_eq(st.bytes_reserved, 34 * MiB);
    cr_expect_eq(fake_in_use(), st.bytes_reserved, "the driver holds exactly what is counted");
    OK(cuMemFree(a));
    OK(cuMemFree(b));
    OK(cuMemAlloc(&c, 33 * MiB)); /* the freed space is one block now */
    cr_expect_eq(c, a);
    cr_expect_eq(api_stats_or_fail().bytes_reserved, 34 * MiB, "nothing new mapped");
    OK(cuMemFree(c));
}

Test(expandable, a_block_answers_as_its_own_allocation)
{
    expandable_env();
    api_start();
    CUdeviceptr a, b, base = 0;
    size_t size = 0;
    OK(cuMemAlloc(&a, 3 * MiB));
    OK(cuMemAlloc(&b, 5000));
    OK(cuMemAlloc(&b, 3 * MiB));
    OK(cuMemGetAddressRange(&base, &size, b + 100));
    cr_expect_eq(base, b);
    cr_expect_eq(size, 3 * MiB);
    unsigned char buf[8192];
    ERR(cuMemcpyHtoD(b + 3 * MiB - 4096, buf, sizeof buf), CUDA_ERROR_INVALID_VALUE); /* past the end */
    OK(cuMemFree(a));
    ERR(cuMemcpyHtoD(a, buf, 16), CUDA_ERROR_INVALID_VALUE); /* freed pool memory */
}

Test(expandable, the_limit_counts_mapped_bytes)
{
    expandable_env();
    setenv("GPUMEM_LIMIT", "24MiB", 1);
    api_start();
    CUdeviceptr a, b;
    OK(cuMemAlloc(&a, 20 * MiB));
    ERR(cuMemAlloc(&b, 8 * MiB), CUDA_ERROR_OUT_OF_MEMORY);
    cr_expect_eq(api_stats_or_fail().bytes_reserved, 20 * MiB);
    cr_expect_eq(fake_in_use(), 20 * MiB);
    OK(cuMemFree(a));
    OK(cuMemAlloc(&b, 8 * MiB));
    cr_expect_eq(b, a);
    cr_expect_leq(fake_in_use(), 24 * MiB);
    OK(cuMemFree(b));
}

Test(expandable, without_vmm_the_pool_uses_classic_segments)
{
    expandable_env();
    setenv("FAKECUDA_NO_VMM", "1", 1);
    api_start();
    CUdeviceptr a;
    OK(cuMemAlloc(&a, 3 * MiB));
    put_pattern(a, 3 * MiB, 3);
    cr_expect_eq(pattern_errors(a, 3 * MiB, 3), 0);
    CUipcMemHandle h;
    OK(cuIpcGetMemHandle(&h, a)); /* a classic segment: legacy IPC works */
    OK(cuMemFree(a));
}

static void map_fails_half_way(const char *knob)
{
    expandable_env();
    setenv(knob, "3", 1); /* 3 chunks, then every later map (or create) fails */
    api_start();
    CUdeviceptr a, b;
    OK(cuMemAlloc(&a, 3 * MiB)); /* asks for 4 chunks, gets 3: enough */
    put_pattern(a, 3 * MiB, 4);
    ERR(cuMemAlloc(&b, 20 * MiB), CUDA_ERROR_OUT_OF_MEMORY);
    gpumem_stats st = api_stats_or_fail();
    cr_expect_eq(st.bytes_reserved, fake_in_use(), "the limit holds what is mapped, nothing more");
    cr_expect_eq(pattern_errors(a, 3 * MiB, 4), 0, "the block lived through it");
    unsetenv(knob);
    fakecuda_reload_env();
    OK(cuMemAlloc(&b, 20 * MiB));
    cr_expect_eq(b, a + 3 * MiB);
    put_pattern(b, 20 * MiB, 5);
    cr_expect_eq(pattern_errors(b, 20 * MiB, 5), 0);
    cr_expect_eq(api_stats_or_fail().bytes_reserved, fake_in_use());
    OK(cuMemFree(a));
    OK(cuMemFree(b));
}

Test(expandable, a_failed_map_half_way_loses_nothing) { map_fails_half_way("FAKECUDA_FAIL_MAP_AFTER"); }
Test(expandable, a_failed_create_half_way_loses_nothing) { map_fails_half_way("FAKECUDA_FAIL_ALLOC_AFTER"); }

/* At the limit the free chunks below a live block are unmapped (a hole) so that a grow fits; a
 * request the hole's space can serve maps it again, handing other free chunks back for it. */
Test(expandable, at_the_limit_interior_free_chunks_go_and_come_back)
{
    expandable_env();
    setenv("GPUMEM_LIMIT", "16MiB", 1);
    setenv("GPUMEM_SEGMENT_MIN", "2MiB", 1); /* grows map what they miss, no more */
    api_start();
    CUdeviceptr a, b, c, d, e;
    OK(cuMemAlloc(&a, 3 * MiB));
    OK(cuMemAlloc(&b, 6 * MiB));
    OK(cuMemAlloc(&c, 3 * MiB));
    put_pattern(a, 3 * MiB, 81);
    cr_assert_eq(api_stats_or_fail().bytes_reserved, 12 * MiB);
    OK(cuMemFree(b)); /* [3, 9) free: whole chunks [4, 8) */
    OK(cuMemAlloc(&d, 7 * MiB)); /* 20 MiB mapped would pass the limit: [4, 8) goes first */
    cr_expect_eq(d, a + 12 * MiB, "mapped at the end");
    cr_expect_eq(api_stats_or_fail().bytes_reserved, 16 * MiB);
    cr_expect_eq(fake_in_use(), 16 * MiB, "the driver holds exactly what is counted");
    put_pattern(d, 7 * MiB, 84);
    unsigned char buf[16] = {0};
    ERR(cuMemcpyHtoD(a + 5 * MiB, buf, sizeof buf), CUDA_ERROR_INVALID_VALUE); /* freed, unmapped */
    ERR(cuMemAlloc(&e, 5 * MiB), CUDA_ERROR_OUT_OF_MEMORY); /* the hole would pass the limit */
    OK(cuMemFree(c)); /* [8, 12) free: its chunks can go for the hole's */
    OK(cuMemAlloc(&e, 5 * MiB));
    cr_expect_eq(e, a + 3 * MiB, "the hole, mapped again, with the sliver before it");
    put_pattern(e, 5 * MiB, 85);
    cr_expect_eq(pattern_errors(a, 3 * MiB, 81), 0);
    cr_expect_eq(pattern_errors(d, 7 * MiB, 84), 0);
    cr_expect_eq(pattern_errors(e, 5 * MiB, 85), 0);
    cr_expect_eq(api_stats_or_fail().bytes_reserved, fake_in_use());
    cr_expect_leq(fake_in_use(), 16 * MiB);
    OK(cuMemFree(a));
    OK(cuMemFree(d));
    OK(cuMemFree(e));
}

Test(expandable, a_primary_context_reset_unmaps_everything)
{
    expandable_env();
    api_start();
    CUdeviceptr a, s;
    OK(cuMemAlloc(&a, 9 * MiB)); /* leaked */
    OK(cuMemAlloc(&s, 4096));    /* leaked */
    cr_expect_gt(fake_in_use(), 0);
    CUdevice dev;
    OK(cuDeviceGet(&dev, 0));
    OK(cuDevicePrimaryCtxReset(dev));
    cr_expect_eq(fake_in_use(), 0, "VMM memory is not the context's: gpumem gave it back");
    api_start();
    OK(cuMemAlloc(&a, 3 * MiB)); /* a new range */
    put_pattern(a, 3 * MiB, 6);
    cr_expect_eq(pattern_errors(a, 3 * MiB, 6), 0);
    OK(cuMemFree(a));
}

Test(expandable, a_fork_child_starts_clean_and_the_parent_keeps_its_blocks)
{
    expandable_env();
    api_start();
    CUdeviceptr a;
    OK(cuMemAlloc(&a, 3 * MiB));
    put_pattern(a, 3 * MiB, 7);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        alarm(10);
        gpumem_stats st;
        int ok = api_stats(&st) && st.bytes_allocated == 0 && st.bytes_reserved == 0; /* forgotten */
#ifndef __SANITIZE_THREAD__ /* TSan refuses new threads after a multi-threaded fork (the fake's) */
        CUcontext ctx;
        CUdevice dev;
        CUdeviceptr p;
        ok = ok && cuInit(0) == CUDA_SUCCESS && cuDeviceGet(&dev, 0) == CUDA_SUCCESS &&
             cuDevicePrimaryCtxRetain(&ctx, dev) == CUDA_SUCCESS &&
             cuCtxSetCurrent(ctx) == CUDA_SUCCESS && cuMemAlloc(&p, 5 * MiB) == CUDA_SUCCESS &&
             cuMemsetD8(p, 9, 5 * MiB) == CUDA_SUCCESS && cuMemFree(p) == CUDA_SUCCESS;
        ok = ok && api_stats(&st) && st.bytes_allocated == 0 && st.bytes_reserved == fake_in_use();
#endif
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %#x", status);
    cr_expect_eq(pattern_errors(a, 3 * MiB, 7), 0);
    OK(cuMemFree(a));
}

Test(expandable, peer_access_reaches_the_chunks_mapped_before_and_after)
{
    expandable_env();
    setenv("FAKECUDA_DEVICES", "2", 1);
    CUcontext ctx0 = api_start(), ctx1;
    CUdevice dev1;
    CUdeviceptr a, b;
    OK(cuMemAlloc(&a, 3 * MiB));
    cr_expect_eq(fakecuda_vmm_access(a), 1u, "device 0 only");
    OK(cuDeviceGet(&dev1, 1));
    OK(cuDevicePrimaryCtxRetain(&ctx1, dev1));
    OK(cuCtxSetCurrent(ctx1));
    OK(cuCtxEnablePeerAccess(ctx0, 0)); /* device 1 may access context 0's memory */
    cr_expect_eq(fakecuda_vmm_access(a), 3u, "a chunk mapped before");
    cr_expect_eq(fakecuda_vmm_access(a + 6 * MiB), 3u, "the whole mapped step");
    OK(cuCtxSetCurrent(ctx0));
    OK(cuMemAlloc(&b, 30 * MiB));
    cr_expect_eq(fakecuda_vmm_access(b + 29 * MiB), 3u, "a chunk mapped after");
    OK(cuCtxSetCurrent(ctx1));
    ERR(cuCtxEnablePeerAccess(ctx0, 0), CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED);
    OK(cuCtxSetCurrent(ctx0));
    OK(cuMemFree(a));
    OK(cuMemFree(b));
}

/* Disabled again: the chunks mapped before lose the peer's access, later ones never get it, and
 * the owner keeps its own (the data stays). */
Test(expandable, disabling_peer_access_revokes_it_from_the_chunks)
{
    expandable_env();
    setenv("FAKECUDA_DEVICES", "2", 1);
    CUcontext ctx0 = api_start(), ctx1;
    CUdevice dev1;
    CUdeviceptr a, b;
    OK(cuMemAlloc(&a, 3 * MiB));
    put_pattern(a, 3 * MiB, 91);
    OK(cuDeviceGet(&dev1, 1));
    OK(cuDevicePrimaryCtxRetain(&ctx1, dev1));
    OK(cuCtxSetCurrent(ctx1));
    OK(cuCtxEnablePeerAccess(ctx0, 0));
    cr_expect_eq(fakecuda_vmm_access(a), 3u);
    OK(cuCtxDisablePeerAccess(ctx0));
    cr_expect_eq(fakecuda_vmm_access(a), 1u, "a chunk mapped before: device 0 only again");
    cr_expect_eq(fakecuda_vmm_access(a + 6 * MiB), 1u, "the whole mapped step");
    ERR(cuCtxDisablePeerAccess(ctx0), CUDA_ERROR_PEER_ACCESS_NOT_ENABLED); /* the driver's answer */
    OK(cuCtxSetCurrent(ctx0));
    OK(cuMemAlloc(&b, 30 * MiB));
    cr_expect_eq(fakecuda_vmm_access(b + 29 * MiB), 1u, "a chunk mapped after: no peer");
    cr_expect_eq(pattern_errors(a, 3 * MiB, 91), 0, "the owner's access and the data stay");
    OK(cuCtxSetCurrent(ctx1));
    OK(cuCtxEnablePeerAccess(ctx0, 0)); /* and once more */
    cr_expect_eq(fakecuda_vmm_access(b + 29 * MiB), 3u);
    OK(cuCtxSetCurrent(ctx0));
    OK(cuMemFree(a));
    OK(cuMemFree(b));
}

Test(expandable, a_groups_shared_budget_counts_mapped_bytes)
{
    char dir[64], region[128], shared[160];
    cr_assert(api_tmpdir(dir, sizeof dir, "vmm-shared"));
    snprintf(region, sizeof region, "%s/budget", dir);
    snprintf(shared, sizeof shared, "GPUMEM_SHARED=%s", region);
    setenv("GPUMEM_SHARED", region, 1);
    setenv("GPUMEM_LIMIT", "32MiB", 1);
    expandable_env();
    api_start();
    CUdeviceptr a;
    OK(cuMemAlloc(&a, 20 * MiB)); /* 20 MiB mapped, in the group's ledger */
    /* another member: its first 8 MiB step fits (28 MiB), the second would pass 32 MiB */
    const char *args[] = {"dev:0", "alloc:8M", "alloc:8M", NULL};
    const char *env[] = {shared, "GPUMEM_LIMIT=32MiB", "GPUMEM_EXPANDABLE=1", NULL};
    api_child c;
    cr_assert(api_run(SHARED_CHILD_PATH, args, env, 20.0, &c));
    cr_expect(api_exited_ok(&c), "status %#x, stderr:\n%s", c.status, c.err);
    cr_expect(strstr(c.out, "alloc 0\nalloc 2\n") != NULL, "expected one fit and one OOM: %s", c.out);
    api_child_free(&c);
    OK(cuMemFree(a));
    unlink(region);
    rmdir(dir);
}

/* A chunk that is no power of two (GPUMEM_EXPANDABLE_CHUNK=20MiB, as PyTorch maps large blocks):
 * the range is still reserved (aligned to the chunk's power-of-two factor; the driver refuses any
 * other alignment) and blocks grow contiguously in it, mapped 20 MiB at a time. */
Test(expandable, a_chunk_of_20_mib_still_gets_a_range)
{
    expandable_env();
    setenv("GPUMEM_EXPANDABLE_CHUNK", "20MiB", 1);
    api_start();
    CUdeviceptr a, b;
    OK(cuMemAlloc(&a, 3 * MiB));
    OK(cuMemAlloc(&b, 30 * MiB));
    cr_expect_eq(b, a + 3 * MiB, "one virtual range");
    put_pattern(b, 30 * MiB, 3);
    cr_expect_eq(pattern_errors(b, 30 * MiB, 3), 0);
    cr_expect_eq(api_stats_or_fail().bytes_reserved % (20 * MiB), 0, "whole 20 MiB chunks mapped");
    OK(cuMemFree(a));
    OK(cuMemFree(b));
}
