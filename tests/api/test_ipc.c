/* api_ipc: CUDA IPC of pooled blocks (issue 10, part 1), through the real preload path on the fake
 * driver, with a second process (ipc_child) as the receiver, under the shim or not.
 *
 * A pooled block is not a driver allocation: the driver's handle of its segment would make the
 * receiver write into the segment's first block. A block at its segment's start is exported with
 * the driver's own handle; any other block with a gpumem handle that a receiver under gpumem opens
 * at the block, and a receiver without gpumem gets CUDA_ERROR_INVALID_VALUE for (never another
 * block). Opens are refcounted per handle, as on the driver; a freed block cannot be exported or
 * opened; one another process still has open is kept from reuse. Blocks of expandable segments
 * (GPUMEM_EXPANDABLE=1) at the end. */
#include <stdarg.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "api_test.h"

/* ---------------------------------------------------------------- the receiving process */

typedef struct peer {
    pid_t pid;
    FILE *to, *from;
} peer;

static void peer_start(peer *p, bool shim)
{
    int in[2], out[2];
    cr_assert(pipe(in) == 0 && pipe(out) == 0);
    const char *no_shim[] = {"LD_PRELOAD", NULL};
    char **env = api_build_env(shim ? NULL : no_shim);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_addclose(&fa, in[1]);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    char *argv[] = {(char *)IPC_CHILD_PATH, NULL};
    int rc = posix_spawn(&p->pid, IPC_CHILD_PATH, &fa, NULL, argv, env);
    posix_spawn_file_actions_destroy(&fa);
    free(env);
    cr_assert_eq(rc, 0, "cannot start %s", IPC_CHILD_PATH);
    close(in[0]);
    close(out[1]);
    p->to = fdopen(in[1], "w");
    p->from = fdopen(out[0], "r");
    setvbuf(p->to, NULL, _IOLBF, 0);
}

/* Sends one command line and returns the answer line (static storage). */
static const char *peer_cmd(peer *p, const char *fmt, ...)
{
    static char line[512];
    va_list ap;
    va_start(ap, fmt);
    vfprintf(p->to, fmt, ap);
    va_end(ap);
    fputc('\n', p->to);
    fflush(p->to);
    cr_assert_not_null(fgets(line, sizeof line, p->from), "the receiver died");
    line[strcspn(line, "\n")] = 0;
    return line;
}

/* The result code of an answer "<cmd> <k> <rc> ...". */
static int peer_rc(peer *p, const char *fmt, ...)
{
    char cmd[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    const char *ans = peer_cmd(p, "%s", cmd);
    int k = 0, rc = -1;
    char word[32];
    cr_assert_eq(sscanf(ans, "%31s %d %d", word, &k, &rc), 3, "'%s' -> '%s'", cmd, ans);
    return rc;
}

static void peer_stop(peer *p, const char *how)
{
    fprintf(p->to, "%s\n", how);
    fflush(p->to);
    fclose(p->to);
    fclose(p->from);
    int status = 0;
    cr_assert(api_wait_timeout(p->pid, &status, 10.0), "the receiver did not exit");
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "receiver status %#x", status);
}

static void peer_begin(peer *p, bool shim)
{
    peer_start(p, shim);
    cr_assert_str_eq(peer_cmd(p, "start"), "ok");
}

/* ---------------------------------------------------------------- the exporting side */

typedef struct export {
    CUipcMemHandle h;
    char hex[2 * sizeof(CUipcMemHandle) + 1];
} export;

static export export_of(CUdeviceptr p)
{
    export e;
    OK(cuIpcGetMemHandle(&e.h, p));
    const unsigned char *b = (const unsigned char *)&e.h;
    for (size_t i = 0; i < sizeof e.h; i++) sprintf(e.hex + 2 * i, "%02x", b[i]);
    return e;
}

static bool is_gpumem_handle(const export *e)
{
    return !memcmp(e->h.reserved, "gpumem-ipc-v1", 13);
}

static CUdeviceptr alloc_filled(size_t n, uint32_t seed)
{
    CUdeviceptr p;
    OK(cuMemAlloc(&p, n));
    unsigned char *buf = malloc(n);
    api_fill_pattern(buf, n, seed);
    OK(cuMemcpyHtoD(p, buf, n));
    free(buf);
    return p;
}

static void expect_pattern(CUdeviceptr p, size_t n, uint32_t seed, const char *what)
{
    unsigned char *buf = malloc(n);
    OK(cuMemcpyDtoH(buf, p, n));
    size_t bad = api_check_pattern(buf, n, seed);
    free(buf);
    cr_assert_eq(bad, n, "%s: byte %zu is not the expected pattern %u", what, bad, seed);
}

/* Four small blocks of one 2 MiB segment: s[0] at its start, the others inside. */
static void four_blocks(CUdeviceptr s[4], const size_t sizes[4])
{
    for (int i = 0; i < 4; i++) s[i] = alloc_filled(sizes[i], 100 + (uint32_t)i);
    for (int i = 1; i < 4; i++) cr_assert_gt(s[i], s[0], "consecutive small blocks share a segment");
}

static const size_t sizes[4] = {4096, 5000, 8192, 3000};

static gpumem_stats stats_now(void)
{
    return api_stats_or_fail();
}

/* ---------------------------------------------------------------- tests */

Test(ipc, offset0_and_interior_blocks_reach_the_right_memory)
{
    api_start();
    CUdeviceptr s[4];
    four_blocks(s, sizes);
    export e0 = export_of(s[0]), e2 = export_of(s[2]);
    cr_assert(!is_gpumem_handle(&e0), "a block at its segment's start gets the driver's handle");
    cr_assert(is_gpumem_handle(&e2), "a block inside a segment gets a gpumem handle");
    peer p;
    peer_begin(&p, true);
    cr_assert_eq(peer_rc(&p, "open 0 %s", e0.hex), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "open 2 %s", e2.hex), CUDA_SUCCESS);
    cr_assert_str_eq(peer_cmd(&p, "range 2"), "range 2 0 0 8192", "the receiver sees the block");
    cr_assert_str_eq(peer_cmd(&p, "range 2 8191"), "range 2 0 0 8192", "an interior pointer");
    cr_assert_eq(peer_rc(&p, "write 0 7 4096"), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "write 2 9 8192"), CUDA_SUCCESS);
    peer_stop(&p, "quit");
    expect_pattern(s[0], sizes[0], 7, "block 0 (offset 0)");
    expect_pattern(s[2], sizes[2], 9, "block 2 (inside its segment)");
    expect_pattern(s[1], sizes[1], 101, "neighbour 1");
    expect_pattern(s[3], sizes[3], 103, "neighbour 3");
}

Test(ipc, open_twice_close_twice_then_once_too_many)
{
    api_start();
    CUdeviceptr s[4];
    four_blocks(s, sizes);
    export e = export_of(s[1]);
    peer p;
    peer_begin(&p, true);
    cr_assert_eq(peer_rc(&p, "open 0 %s", e.hex), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "open 1 %s v1", e.hex), CUDA_SUCCESS, "the 4.1 ABI too");
    cr_assert_str_eq(peer_cmd(&p, "diff 1 0"), "diff 1 0 0", "the same handle gives the same pointer");
    cr_assert_str_eq(peer_cmd(&p, "range 0"), "range 0 0 0 5000");
    cr_assert_eq(peer_rc(&p, "close 0"), CUDA_SUCCESS);
    cr_assert_str_eq(peer_cmd(&p, "range 1"), "range 1 0 0 5000", "still open once");
    cr_assert_eq(peer_rc(&p, "write 1 5 5000"), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "close 1"), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "close 1"), CUDA_ERROR_INVALID_VALUE, "one close too many");
    peer_stop(&p, "quit");
    expect_pattern(s[1], sizes[1], 5, "the opened block");
    expect_pattern(s[0], sizes[0], 100, "the segment's first block");
}

Test(ipc, several_blocks_of_one_segment_in_one_receiver)
{
    api_start();
    CUdeviceptr s[4];
    four_blocks(s, sizes);
    export e[4];
    for (int i = 1; i < 4; i++) e[i] = export_of(s[i]);
    peer p;
    peer_begin(&p, true);
    for (int i = 1; i < 4; i++) cr_assert_eq(peer_rc(&p, "open %d %s", i, e[i].hex), CUDA_SUCCESS);
    char want[64];
    snprintf(want, sizeof want, "diff 3 1 %lld", (long long)(s[3] - s[1]));
    cr_assert_str_eq(peer_cmd(&p, "diff 3 1"), want, "one mapping of the segment, blocks at their offsets");
    for (int i = 1; i < 4; i++) {
        const char *a = peer_cmd(&p, "attr %d", i);
        char w[96];
        snprintf(w, sizeof w, "attr %d 0 0 0 %zu 0 ", i, sizes[i]);
        cr_assert(!strncmp(a, w, strlen(w)), "'%s', want '%s...'", a, w);
        cr_assert_eq(peer_rc(&p, "write %d %d %zu", i, 20 + i, sizes[i]), CUDA_SUCCESS);
    }
    /* the segment's first block was not opened here: no allocation of the receiver's */
    snprintf(want, sizeof want, "range 1 %lld", (long long)(s[0] - s[1]));
    cr_assert_eq(peer_rc(&p, "%s", want), CUDA_ERROR_NOT_FOUND);
    for (int i = 1; i < 4; i++) cr_assert_eq(peer_rc(&p, "close %d", i), CUDA_SUCCESS);
    peer_stop(&p, "quit");
    for (int i = 1; i < 4; i++) expect_pattern(s[i], sizes[i], 20 + (uint32_t)i, "opened block");
    expect_pattern(s[0], sizes[0], 100, "the segment's first block");
}

Test(ipc, buffer_ids_of_imported_blocks_differ)
{
    api_start();
    CUdeviceptr s[4];
    four_blocks(s, sizes);
    export e1 = export_of(s[1]), e2 = export_of(s[2]);
    peer p;
    peer_begin(&p, true);
    cr_assert_eq(peer_rc(&p, "open 1 %s", e1.hex), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "open 2 %s", e2.hex), CUDA_SUCCESS);
    char a1[128], a2[128];
    snprintf(a1, sizeof a1, "%s", peer_cmd(&p, "attr 1"));
    snprintf(a2, sizeof a2, "%s", peer_cmd(&p, "attr 2"));
    const char *id1 = strrchr(a1, ' '), *id2 = strrchr(a2, ' ');
    cr_assert(strcmp(id1, id2) != 0, "%s / %s", a1, a2);
    peer_stop(&p, "quit");
}

Test(ipc, export_of_freed_or_slack_memory_is_refused)
{
    api_start();
    CUdeviceptr s[4];
    four_blocks(s, sizes);
    CUipcMemHandle h;
    ERR(cuIpcGetMemHandle(&h, s[1] + 5000), CUDA_ERROR_INVALID_VALUE); /* 5000 rounds to 5120 */
    OK(cuMemFree(s[2]));
    ERR(cuIpcGetMemHandle(&h, s[2]), CUDA_ERROR_INVALID_VALUE);
    ERR(cuIpcGetMemHandle(&h, s[2] + 100), CUDA_ERROR_INVALID_VALUE);
}

/* Exports name the block, as the driver's name the allocation; opening a handle of this very
 * process, or garbage, gets the driver's answers. */
Test(ipc, exports_name_the_block_and_own_or_garbage_handles_are_refused)
{
    api_start();
    CUdeviceptr s[4];
    four_blocks(s, sizes);
    export a = export_of(s[1]), b = export_of(s[1] + 4999), c = export_of(s[1]), d = export_of(s[2]);
    cr_assert(!memcmp(&a.h, &b.h, sizeof a.h), "an interior pointer names the whole block");
    cr_assert(!memcmp(&a.h, &c.h, sizeof a.h), "exporting again gives the same bytes");
    cr_assert(memcmp(&a.h, &d.h, sizeof a.h) != 0, "another block of the segment, another handle");
    export z = export_of(s[0]), z2 = export_of(s[0] + 100), e = a;
    cr_assert(!memcmp(&z.h, &z2.h, sizeof z.h));
    CUdeviceptr p;
    ERR(cuIpcOpenMemHandle(&p, e.h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS), CUDA_ERROR_INVALID_CONTEXT);
    ERR(cuIpcOpenMemHandle(&p, z.h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS), CUDA_ERROR_INVALID_CONTEXT);
    CUipcMemHandle g;
    memset(&g, 0, sizeof g);
    memcpy(g.reserved, "gpumem-ipc\1", 11);
    ERR(cuIpcOpenMemHandle(&p, g, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS), CUDA_ERROR_INVALID_VALUE);
    ERR(cuIpcCloseMemHandle(s[1]), CUDA_ERROR_INVALID_VALUE); /* never opened */
}

Test(ipc, receiver_without_gpumem_gets_offset0_blocks_and_refuses_the_others)
{
    api_start();
    CUdeviceptr s[4];
    four_blocks(s, sizes);
    export e0 = export_of(s[0]), e1 = export_of(s[1]);
    peer p;
    peer_begin(&p, false);
    cr_assert_eq(peer_rc(&p, "open 0 %s", e0.hex), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "open 1 %s", e1.hex), CUDA_ERROR_INVALID_VALUE,
                 "the driver refuses a gpumem handle: never another block");
    cr_assert_eq(peer_rc(&p, "write 0 33 4096"), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "close 0"), CUDA_SUCCESS);
    peer_stop(&p, "quit");
    expect_pattern(s[0], sizes[0], 33, "the offset-0 block");
    expect_pattern(s[1], sizes[1], 101, "the refused block");
}

Test(ipc, receiver_free_of_an_imported_pointer_frees_nothing)
{
    api_start();
    CUdeviceptr s[4];
    four_blocks(s, sizes);
    export e0 = export_of(s[0]), e1 = export_of(s[1]);
    peer p;
    peer_begin(&p, true);
    cr_assert_eq(peer_rc(&p, "open 0 %s", e0.hex), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "open 1 %s", e1.hex), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "free 0"), CUDA_ERROR_INVALID_VALUE);
    cr_assert_eq(peer_rc(&p, "free 1"), CUDA_ERROR_INVALID_VALUE);
    cr_assert_str_eq(peer_cmd(&p, "range 1"), "range 1 0 0 5000", "still open");
    cr_assert_eq(peer_rc(&p, "write 1 44 5000"), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "close 1"), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "close 0"), CUDA_SUCCESS);
    peer_stop(&p, "quit");
    expect_pattern(s[1], sizes[1], 44, "the imported block");
    expect_pattern(s[0], sizes[0], 100, "the segment's first block");
}

/* A handle with another process start's nonce (the pid reused), another use of the slot, or of a
 * block freed since: the registry does not know it, and neither would the driver. */
Test(ipc, stale_handles_are_refused)
{
    api_start();
    CUdeviceptr s[4];
    four_blocks(s, sizes);
    export e = export_of(s[1]), f = export_of(s[2]);
    export proc = e, use = e;
    proc.hex[2 * 24] = proc.hex[2 * 24] == '0' ? '1' : '0'; /* the process nonce */
    use.hex[2 * 40] = use.hex[2 * 40] == '0' ? '1' : '0';   /* the slot nonce */
    OK(cuMemFree(s[2]));
    peer p;
    peer_begin(&p, true);
    cr_assert_eq(peer_rc(&p, "open 0 %s", proc.hex), CUDA_ERROR_INVALID_VALUE);
    cr_assert_eq(peer_rc(&p, "open 1 %s", use.hex), CUDA_ERROR_INVALID_VALUE);
    cr_assert_eq(peer_rc(&p, "open 2 %s", f.hex), CUDA_ERROR_INVALID_VALUE, "a freed block");
    cr_assert_eq(peer_rc(&p, "open 3 %s", e.hex), CUDA_SUCCESS, "the live one still opens");
    peer_stop(&p, "quit");
}

/* Freed while the receiver has it open: not handed to the next allocation until it is closed. */
Test(ipc, a_block_open_elsewhere_is_not_reused_until_closed)
{
    api_start();
    CUdeviceptr s[4];
    four_blocks(s, sizes);
    export e = export_of(s[1]);
    peer p;
    peer_begin(&p, true);
    cr_assert_eq(peer_rc(&p, "open 0 %s", e.hex), CUDA_SUCCESS);
    uint64_t cached = stats_now().bytes_cached_free;
    OK(cuMemFree(s[1]));
    cr_assert_eq(stats_now().bytes_cached_free, cached, "the block is not back in the pool");
    CUdeviceptr again = alloc_filled(sizes[1], 66);
    cr_assert_neq(again, s[1], "a block another process writes into was handed out again");
    cr_assert_eq(peer_rc(&p, "write 0 55 5000"), CUDA_SUCCESS);
    expect_pattern(again, sizes[1], 66, "the next allocation");
    cr_assert_eq(peer_rc(&p, "close 0"), CUDA_SUCCESS);
    OK(cuMemFree(again)); /* a later free reclaims what no importer holds any more */
    CUdeviceptr third;
    OK(cuMemAlloc(&third, sizes[1]));
    cr_assert(third == s[1] || third == again, "the block is reusable again");
    peer_stop(&p, "quit");
}

/* A receiver killed with the block open leaves it counted: the block stays out of reuse. */
Test(ipc, a_receiver_killed_with_the_block_open_keeps_it_from_reuse)
{
    api_start();
    CUdeviceptr s[4];
    four_blocks(s, sizes);
    export e = export_of(s[3]);
    peer p;
    peer_begin(&p, true);
    cr_assert_eq(peer_rc(&p, "open 0 %s", e.hex), CUDA_SUCCESS);
    peer_stop(&p, "exit");
    OK(cuMemFree(s[3]));
    for (int i = 0; i < 8; i++) {
        CUdeviceptr q;
        OK(cuMemAlloc(&q, sizes[3]));
        cr_assert_neq(q, s[3]);
    }
}

/* One that exits normally counts itself out: the freed block goes back to the pool. */
Test(ipc, a_receiver_that_exits_lets_the_block_go)
{
    api_start();
    CUdeviceptr s[4];
    four_blocks(s, sizes);
    export e = export_of(s[3]);
    peer p;
    peer_begin(&p, true);
    cr_assert_eq(peer_rc(&p, "open 0 %s", e.hex), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "write 0 77 3000"), CUDA_SUCCESS);
    peer_stop(&p, "quit");
    expect_pattern(s[3], sizes[3], 77, "the block the receiver wrote");
    uint64_t cached = stats_now().bytes_cached_free;
    OK(cuMemFree(s[3]));
    cr_assert_gt(stats_now().bytes_cached_free, cached);
}

/* ---------------------------------------------------------------- expandable segments (issue 14)
 *
 * VMM memory has no legacy handle: every block of an expandable segment gets a gpumem handle, and
 * a receiver under gpumem maps the chunks it lies in, received as file descriptors from the
 * exporter's chunk server (fake: memfds, so both processes see the same pages). */

#define MiB ((size_t)1 << 20)

static void expandable_on(void)
{
    setenv("GPUMEM_EXPANDABLE", "1", 1);
}

/* The answer "check K RC FIRST-BAD" is intact: RC 0 and FIRST-BAD n. */
static void peer_expect_pattern(peer *p, int k, unsigned seed, size_t n, const char *what)
{
    char want[96];
    snprintf(want, sizeof want, "check %d 0 %zu", k, n);
    cr_assert_str_eq(peer_cmd(p, "check %d %u %zu", k, seed, n), want, "%s", what);
}

Test(ipc, expandable_blocks_open_under_gpumem_and_share_their_bytes_both_ways)
{
    expandable_on();
    api_start();
    CUdeviceptr a = alloc_filled(3 * MiB, 11), c = alloc_filled(5 * MiB, 13), s = alloc_filled(5000, 14);
    cr_assert_eq(c, a + 3 * MiB, "one range: c starts inside a chunk and spans four");
    export ea = export_of(a), ec = export_of(c), es = export_of(s);
    cr_assert(is_gpumem_handle(&ea) && is_gpumem_handle(&ec) && is_gpumem_handle(&es),
              "VMM memory has no driver handle, even at the range's start");
    export again = export_of(c);
    cr_assert_str_eq(again.hex, ec.hex, "the same handle for as long as the block lives");
    peer p;
    peer_begin(&p, true);
    cr_assert_eq(peer_rc(&p, "open 0 %s", ea.hex), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "open 1 %s", ec.hex), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "open 2 %s", es.hex), CUDA_SUCCESS, "the small class's range too");
    peer_expect_pattern(&p, 0, 11, 3 * MiB, "the exporter's bytes, block a");
    peer_expect_pattern(&p, 1, 13, 5 * MiB, "block c, across chunk boundaries");
    peer_expect_pattern(&p, 2, 14, 5000, "the small block");
    cr_assert_str_eq(peer_cmd(&p, "range 1 4000000"), "range 1 0 0 5242880", "the receiver sees the block");
    cr_assert_eq(peer_rc(&p, "open 3 %s", ec.hex), CUDA_SUCCESS);
    cr_assert_str_eq(peer_cmd(&p, "diff 3 1"), "diff 3 1 0", "reopened: the same pointer");
    cr_assert_eq(peer_rc(&p, "write 1 21 5242880"), CUDA_SUCCESS);
    expect_pattern(c, 5 * MiB, 21, "the receiver's bytes in the exporter");
    expect_pattern(a, 3 * MiB, 11, "the neighbour in the shared chunk");
    cr_assert_eq(peer_rc(&p, "close 3"), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "close 1"), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "close 1"), CUDA_ERROR_INVALID_VALUE, "one close too many");
    cr_assert_eq(peer_rc(&p, "close 0"), CUDA_SUCCESS);
    cr_assert_eq(peer_rc(&p, "close 2"), CUDA_SUCCESS);
    peer_stop(&p, "quit");
}

/* Freed and its chunks handed back (gpumem_release_cached) while the receiver has it open: the
 * block stays out of reuse and mapped, and the receiver's bytes reach no other allocation. */
Test(ipc, an_expandable_block_open_elsewhere_is_kept_until_closed)
{
    expandable_on();
    api_start();
    CUdeviceptr a = alloc_filled(4 * MiB, 31);
    export e = export_of(a);
    peer p;
    peer_begin(&p, true);
    cr_assert_eq(peer_rc(&p, "open 0 %s", e.hex), CUDA_SUCCESS);
    OK(cuMemFree(a));
    api_release_cached_fn release = (api_release_cached_fn)(uintptr_t)api_shim_sym("gpumem_release_cached");
    cr_assert_not_null(release);
    release();
    CUdeviceptr b = alloc_filled(4 * MiB, 32);
    cr_assert_neq(b, a, "a block another process has open was handed out again");
    cr_assert_eq(peer_rc(&p, "write 0 33 4194304"), CUDA_SUCCESS);
    expect_pattern(b, 4 * MiB, 32, "the next allocation");
    cr_assert_eq(peer_rc(&p, "close 0"), CUDA_SUCCESS);
    OK(cuMemFree(b)); /* reclaims the closed one */
    CUdeviceptr c;
    OK(cuMemAlloc(&c, 4 * MiB));
    cr_assert(c == a || c == b, "reusable again once closed");
    peer_stop(&p, "quit");
}

/* The exporter is another process here: once it died its handles are refused with the driver's
 * answer for them, and a receiver that had opened it keeps the memory (the driver frees imported
 * memory when its last mapping goes). */
Test(ipc, an_expandable_block_outlives_its_exporter_in_a_receiver_and_new_opens_fail)
{
    expandable_on();
    api_start();
    peer ex, in, late;
    peer_begin(&ex, true);
    cr_assert_eq(peer_rc(&ex, "alloc 0 3145728 41"), CUDA_SUCCESS);
    const char *ans = peer_cmd(&ex, "export 0");
    char hex[2 * sizeof(CUipcMemHandle) + 1];
    int k = -1, rc = -1;
    cr_assert_eq(sscanf(ans, "export %d %d %128s", &k, &rc, hex), 3, "%s", ans);
    cr_assert_eq(rc, CUDA_SUCCESS);
    peer_begin(&in, true);
    cr_assert_eq(peer_rc(&in, "open 0 %s", hex), CUDA_SUCCESS);
    peer_expect_pattern(&in, 0, 41, 3 * MiB, "the exporting process's bytes");
    peer_stop(&ex, "exit"); /* killed: no exit handler */
    peer_expect_pattern(&in, 0, 41, 3 * MiB, "still mapped after the exporter died");
    cr_assert_eq(peer_rc(&in, "write 0 42 3145728"), CUDA_SUCCESS);
    peer_expect_pattern(&in, 0, 42, 3 * MiB, "and writable");
    peer_begin(&late, true);
    cr_assert_eq(peer_rc(&late, "open 0 %s", hex), CUDA_ERROR_INVALID_VALUE, "the exporter is gone");
    cr_assert_eq(peer_rc(&in, "close 0"), CUDA_SUCCESS);
    peer_stop(&late, "quit");
    peer_stop(&in, "quit");
}

Test(ipc, a_receiver_without_gpumem_gets_the_drivers_error_for_expandable_blocks)
{
    expandable_on();
    api_start();
    CUdeviceptr a = alloc_filled(3 * MiB, 51);
    export e = export_of(a);
    peer p;
    peer_begin(&p, false);
    cr_assert_eq(peer_rc(&p, "open 0 %s", e.hex), CUDA_ERROR_INVALID_VALUE);
    peer_stop(&p, "quit");
}

/* The chunk server's own check, apart from the registry file's mode: a request naming a live,
 * opened slot gets descriptors for a peer of the exporter's user (root here) and none for
 * another user. Returns the reply's status and descriptor count (the child's exit code:
 * status * 8 + min(count, 7), or 255 when it could not ask). */
static int probe_chunk_server(const export *e, bool as_nobody)
{
    uint64_t proc_nonce, slot_nonce;
    uint32_t pid, slot;
    const unsigned char *h = (const unsigned char *)&e->h;
    memcpy(&proc_nonce, h + 24, 8);
    memcpy(&slot_nonce, h + 40, 8);
    memcpy(&pid, h + 56, 4);
    memcpy(&slot, h + 60, 4);
    pid_t child = fork();
    cr_assert(child >= 0);
    if (child == 0) {
        if (as_nobody && (setgid(65534) != 0 || setuid(65534) != 0)) _exit(255);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        int n = snprintf(a.sun_path + 1, sizeof a.sun_path - 1, "gpumem-ipc.%u.%016llx", (unsigned)pid,
                         (unsigned long long)proc_nonce);
        int c = socket(AF_UNIX, SOCK_SEQPACKET, 0);
        struct { uint32_t slot, zero; uint64_t nonce; } q = {slot, 0, slot_nonce};
        if (c < 0 || connect(c, (struct sockaddr *)&a, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n)) != 0)
            _exit(254);
        if (send(c, &q, sizeof q, MSG_NOSIGNAL) != (ssize_t)sizeof q)
            _exit(253);
        struct { int32_t status; uint32_t count; } r = {-1, 0};
        char cbuf[CMSG_SPACE(sizeof(int) * 32)];
        struct iovec iov = {&r, sizeof r};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
        if (recvmsg(c, &m, 0) != (ssize_t)sizeof r) _exit(252);
        int fds = 0;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm))
            if (cm->cmsg_type == SCM_RIGHTS) fds += (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        _exit(r.status * 8 + (fds > 7 ? 7 : fds));
    }
    int status = 0;
    cr_assert(api_wait_timeout(child, &status, 10.0));
    cr_assert(WIFEXITED(status), "probe status %#x", status);
    return WEXITSTATUS(status);
}

Test(ipc, an_importer_of_another_user_is_refused_an_expandable_block)
{
    if (geteuid() != 0) cr_skip_test("needs root, to run the importer as nobody");
    expandable_on();
    api_start();
    CUdeviceptr a = alloc_filled(3 * MiB, 61);
    export e = export_of(a);
    peer p, other;
    peer_begin(&p, true);
    cr_assert_eq(peer_rc(&p, "open 0 %s", e.hex), CUDA_SUCCESS); /* counted in: the slot is open */
    peer_start(&other, true);
    cr_assert_eq(peer_rc(&other, "drop"), 0);
    cr_assert_str_eq(peer_cmd(&other, "start"), "ok");
    cr_assert_eq(peer_rc(&other, "open 0 %s", e.hex), CUDA_ERROR_INVALID_VALUE);
    peer_stop(&other, "quit");
    cr_assert_eq(probe_chunk_server(&e, false), 2, "the exporter's user gets the block's 2 chunks");
    int refused = probe_chunk_server(&e, true);
    cr_assert_eq(refused, CUDA_ERROR_INVALID_VALUE * 8, "another user gets none (%d)", refused);
    peer_expect_pattern(&p, 0, 61, 3 * MiB, "the permitted receiver is untouched");
    peer_stop(&p, "quit");
}

/* A driver that will not make chunks exportable (the handle type refused): the pool falls back
 * to chunks without it, and their export gets the driver's answer for VMM memory. */
Test(ipc, unexportable_chunks_get_the_drivers_error)
{
    expandable_on();
    setenv("FAKECUDA_NO_SHAREABLE", "1", 1);
    api_start();
    CUdeviceptr a = alloc_filled(3 * MiB, 71);
    CUipcMemHandle h;
    ERR(cuIpcGetMemHandle(&h, a), CUDA_ERROR_INVALID_VALUE);
    expect_pattern(a, 3 * MiB, 71, "the block works as ever");
    OK(cuMemFree(a));
}
