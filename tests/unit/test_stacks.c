/* The frame-pointer unwinder on frame chains built by hand: code without frame pointers leaves
 * rbp pointing at ordinary stack data, so a walk must stop at a "frame" whose return address is
 * no code (a PyTorch report ended in 0x3434343433323130) or whose next frame leaves the thread's
 * stack, and keep every real frame before it. Each test runs in its own process (Criterion). */
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gm_api.h"

#define GARBAGE ((uintptr_t)0x3434343433323130ull) /* "01234444" read as an address */

static void start(void)
{
    setenv("GPUMEM_REPORT", "off", 1);
    setenv("GPUMEM_STACK_DEPTH", "16", 1);
    setenv("GPUMEM_STACK_UNWINDER", "fp", 1);
    gm_config_reset_for_tests();
    cr_assert(gm_manager_init(gm_host_backend()));
}

/* Addresses inside this program's text, standing for return addresses. */
__attribute__((noinline)) static void code_marker(void) { __asm__ volatile(""); }
#define CODE(k) ((uintptr_t)&code_marker + (k))

/* A frame as the walker reads it: the saved frame pointer, then the return address. */
typedef struct frame {
    uintptr_t next, ret;
} frame;

/* Captures from a hooked entry point whose own frame is `hook` and whose return address (the
 * first recorded pc) is CODE(1); returns the frames recorded. */
static size_t capture(const frame *hook, uintptr_t *pc, size_t max)
{
    gm_callsite site = {CODE(1), hook};
    uint32_t id = gm_stack_capture(&site);
    cr_assert_neq(id, 0, "no stack recorded");
    size_t n = gm_stack_get(id, pc, max);
    cr_assert_geq(n, 1);
    cr_assert_eq(pc[0], CODE(1), "the entry point's caller comes first");
    return n;
}

static void expect_no_garbage(const uintptr_t *pc, size_t n)
{
    for (size_t i = 0; i < n; i++)
        cr_assert_neq(pc[i], GARBAGE, "frame #%zu is the garbage return address", i);
}

/* The frames of one test live in one array, so that their order on the stack is the index
 * order (separate locals may be laid out either way); f[0] is the entry point's own frame.
 *
 * f[1] is a real frame, f[2] stack data with a garbage return address, f[3] real again. */
Test(stacks, stops_at_a_return_address_that_is_not_code, .init = start)
{
    frame f[4];
    f[0] = (frame){(uintptr_t)&f[1], CODE(1)};
    f[1] = (frame){(uintptr_t)&f[2], CODE(2)};
    f[2] = (frame){(uintptr_t)&f[3], GARBAGE};
    f[3] = (frame){0, CODE(3)};
    uintptr_t pc[16];
    size_t n = capture(&f[0], pc, 16);
    expect_no_garbage(pc, n);
    cr_assert_eq(n, 2, "the walk must end at the garbage frame, after the real one (got %zu)", n);
    cr_assert_eq(pc[1], CODE(2));
}

/* A return address into data (this test's own globals) is not code either. */
static uintptr_t some_data[4];

Test(stacks, stops_at_a_return_address_into_data, .init = start)
{
    frame f[3];
    f[0] = (frame){(uintptr_t)&f[1], CODE(1)};
    f[1] = (frame){(uintptr_t)&f[2], (uintptr_t)&some_data[1]};
    f[2] = (frame){0, CODE(3)};
    uintptr_t pc[16];
    size_t n = capture(&f[0], pc, 16);
    cr_assert_eq(n, 1, "a data address was recorded as a frame (%zu frames)", n);
}

/* The next frame pointer leaves the stack (heap memory holding a plausible frame). */
Test(stacks, stops_where_the_chain_leaves_the_stack, .init = start)
{
    frame *heap = malloc(sizeof *heap);
    cr_assert_not_null(heap);
    *heap = (frame){0, GARBAGE};
    frame f[2];
    f[0] = (frame){(uintptr_t)&f[1], CODE(1)};
    f[1] = (frame){(uintptr_t)heap, CODE(2)};
    uintptr_t pc[16];
    size_t n = capture(&f[0], pc, 16);
    expect_no_garbage(pc, n);
    cr_assert_eq(n, 2, "%zu frames: %#lx %#lx", n, (unsigned long)pc[0], (unsigned long)pc[1]);
    cr_assert_eq(pc[1], CODE(2));
    free(heap);
}

/* A chain that goes down the stack (a stale or made-up frame) ends the walk too. */
Test(stacks, stops_where_the_chain_goes_down, .init = start)
{
    frame f[4];
    f[1] = (frame){(uintptr_t)&f[2], CODE(1)};
    f[2] = (frame){(uintptr_t)&f[0], CODE(2)};
    f[0] = (frame){(uintptr_t)&f[3], GARBAGE};
    f[3] = (frame){0, CODE(3)};
    uintptr_t pc[16];
    size_t n = capture(&f[1], pc, 16);
    expect_no_garbage(pc, n);
    cr_assert_eq(n, 2);
}

/* A real call chain still comes out whole: the walk starts at this function's own frame. */
__attribute__((noinline)) static uint32_t capture_here(void)
{
    gm_callsite site = {(uintptr_t)__builtin_return_address(0), __builtin_frame_address(0)};
    return gm_stack_capture(&site);
}

__attribute__((noinline)) static uint32_t one_level_up(void)
{
    uint32_t id = capture_here();
    __asm__ volatile(""); /* not a tail call: this frame stays on the stack */
    return id;
}

Test(stacks, real_frames_are_kept, .init = start)
{
    uintptr_t pc[16];
    size_t n = gm_stack_get(one_level_up(), pc, 16);
    cr_assert_geq(n, 2, "the caller of the caller is missing (%zu frames)", n);
    Dl_info info;
    for (size_t i = 0; i < n; i++)
        cr_assert(dladdr((void *)pc[i], &info) && info.dli_fname, "frame #%zu (%#lx) is in no object", i,
                  (unsigned long)pc[i]);
}

/* From another thread: its own stack bounds apply (the garbage frame lies on that stack). */
static void *thread_walk(void *arg)
{
    size_t *n = arg;
    frame f[3];
    f[0] = (frame){(uintptr_t)&f[1], CODE(1)};
    f[1] = (frame){(uintptr_t)&f[2], CODE(2)};
    f[2] = (frame){0, GARBAGE};
    gm_callsite site = {CODE(1), &f[0]};
    uintptr_t pc[16];
    *n = gm_stack_get(gm_stack_capture(&site), pc, 16);
    for (size_t i = 0; i < *n; i++)
        if (pc[i] == GARBAGE) *n = 99;
    return NULL;
}

Test(stacks, another_threads_stack, .init = start)
{
    pthread_t t;
    size_t n = 0;
    cr_assert_eq(pthread_create(&t, NULL, thread_walk, &n), 0);
    pthread_join(t, NULL);
    cr_assert_eq(n, 2, "frames recorded on the other thread: %zu (99: the garbage one)", n);
}

/* Text of a library loaded after the manager started is code as well (the map is refreshed). */
typedef struct {
    const char *name;
    uintptr_t text;
} find_text;

static int text_of(struct dl_phdr_info *info, size_t size, void *arg)
{
    (void)size;
    find_text *f = arg;
    if (!info->dlpi_name || !strstr(info->dlpi_name, f->name)) return 0;
    for (size_t i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_LOAD && (info->dlpi_phdr[i].p_flags & PF_X))
            f->text = info->dlpi_addr + info->dlpi_phdr[i].p_vaddr + 16;
    return f->text != 0;
}

Test(stacks, a_library_loaded_later_is_code, .init = start)
{
    static const char *const libs[] = {"libthread_db.so.1", "libmvec.so.1", "libBrokenLocale.so.1"};
    void *h = NULL;
    find_text f = {NULL, 0};
    for (size_t i = 0; i < sizeof libs / sizeof *libs && !h; i++) {
        if (dlopen(libs[i], RTLD_NOW | RTLD_NOLOAD)) continue; /* loaded already: proves nothing */
        if ((h = dlopen(libs[i], RTLD_NOW))) f.name = libs[i];
    }
    if (!h) cr_skip_test("no library of glibc's left to load");
    dl_iterate_phdr(text_of, &f);
    cr_assert_neq(f.text, 0, "no text found in %s", f.name);
    struct timespec ms2 = {0, 2000000}; /* the loaded set is checked at most once a millisecond */
    nanosleep(&ms2, NULL);
    frame f0[3];
    f0[0] = (frame){(uintptr_t)&f0[1], CODE(1)};
    f0[1] = (frame){(uintptr_t)&f0[2], f.text};
    f0[2] = (frame){0, GARBAGE};
    uintptr_t pc[16];
    size_t n = capture(&f0[0], pc, 16);
    cr_assert_eq(n, 2, "the frame in %s was dropped (%zu frames)", f.name, n);
    cr_assert_eq(pc[1], f.text);
    dlclose(h);
}
