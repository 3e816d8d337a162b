/* Tags (gpumem_tag_push/pop) in library mode under the shim: allocations made through the shim
 * (cuMemAlloc, as a library called by the program would) and through the API carry the thread's
 * innermost tag; usage per tag, the report's grouping, misuse, and one shared manager. */
#include <pthread.h>

#include "api_test.h"

static gpumem_tag_usage usage_of(const char *tag)
{
    gpumem_tag_usage u;
    cr_assert_eq(gpumem_tag_get_usage(tag, &u), GPUMEM_OK, "usage of %s", tag);
    return u;
}

Test(tags, shim_allocations_carry_the_innermost_tag)
{
    api_start();
    CUdeviceptr a, b, c;
    cr_assert_eq(gpumem_tag_push("outer"), GPUMEM_OK);
    OK(cuMemAlloc(&a, 1000));
    cr_assert_eq(gpumem_tag_push("inner"), GPUMEM_OK);
    cr_assert_str_eq(gpumem_tag_current(), "inner");
    OK(cuMemAlloc(&b, 3000));
    void *d = NULL;
    cr_assert_eq(gpumem_malloc(&d, 500), GPUMEM_OK);
    cr_assert_eq(gpumem_tag_pop(), GPUMEM_OK);
    OK(cuMemAlloc(&c, 7000));
    cr_assert_eq(gpumem_tag_pop(), GPUMEM_OK);
    cr_assert_null(gpumem_tag_current());

    gpumem_tag_usage outer = usage_of("outer"), inner = usage_of("inner");
    cr_assert_eq(outer.live_bytes, 8000);
    cr_assert_eq(outer.live_allocations, 2);
    cr_assert_eq(inner.live_bytes, 3500);
    cr_assert_eq(inner.live_allocations, 2);

    OK(cuMemFree(b));
    cr_assert_eq(gpumem_free(d), GPUMEM_OK);
    inner = usage_of("inner");
    cr_assert_eq(inner.live_bytes, 0);
    cr_assert_eq(inner.live_allocations, 0);
    cr_assert_eq(inner.allocations, 2);
    cr_assert_eq(inner.peak_bytes, 3500);
    OK(cuMemFree(a));
    OK(cuMemFree(c));
    cr_assert_eq(usage_of("outer").live_bytes, 0);
}

static void *untagged_thread(void *arg)
{
    CUcontext ctx = arg;
    CUdeviceptr p;
    if (cuCtxSetCurrent(ctx) != CUDA_SUCCESS || cuMemAlloc(&p, 4096) != CUDA_SUCCESS) return NULL;
    return (void *)(uintptr_t)p;
}

Test(tags, a_tag_belongs_to_its_thread)
{
    CUcontext ctx = api_start();
    cr_assert_eq(gpumem_tag_push("main-only"), GPUMEM_OK);
    pthread_t t;
    void *p = NULL;
    cr_assert_eq(pthread_create(&t, NULL, untagged_thread, ctx), 0);
    cr_assert_eq(pthread_join(t, &p), 0);
    cr_assert_not_null(p);
    cr_assert_eq(usage_of("main-only").allocations, 0, "the other thread's allocation is not tagged");
    OK(cuMemFree((CUdeviceptr)(uintptr_t)p));
    cr_assert_eq(gpumem_tag_pop(), GPUMEM_OK);
}

Test(tags, the_report_groups_leaks_by_tag)
{
    api_start();
    CUdeviceptr ab[2], c;
    gpumem_tag_push("physics/nodes");
    /* One call site: one group. The count is volatile so that the compiler cannot peel the loop
     * into two call sites with two return addresses (it does with small assert macros). */
    volatile int two = 2;
    for (int i = 0; i < two; i++) OK(cuMemAlloc(&ab[i], 4096));
    gpumem_tag_pop();
    OK(cuMemAlloc(&c, 100));
    char *text = api_report_text();
    cr_assert(strstr(text, "Leak of 8192 byte(s) in 2 allocation(s) on device 0 tagged \"physics/nodes\" allocated from:"),
              "%s", text);
    cr_assert(strstr(text, "Leak of 100 byte(s) in 1 allocation(s) on device 0 allocated from:"), "%s", text);
    cr_assert(strstr(text, "tags: physics/nodes: 8192 B live in 2 allocation(s), peak 8192 B, 2 allocation(s) in all"),
              "%s", text);
    free(text);
    OK(cuMemFree(ab[0]));
    OK(cuMemFree(ab[1]));
    OK(cuMemFree(c));
}

Test(tags, json_report_names_the_tag)
{
    setenv("GPUMEM_REPORT_FORMAT", "json", 1);
    api_start();
    CUdeviceptr a;
    gpumem_tag_push("weights \"v2\"");
    OK(cuMemAlloc(&a, 512));
    gpumem_tag_pop();
    char *text = api_report_text();
    cr_assert(strstr(text, "\"tag\":\"weights \\\"v2\\\"\""), "%s", text);
    cr_assert(strstr(text, "\"tags\":[{\"tag\":\"weights \\\"v2\\\"\",\"live_bytes\":512,\"live_allocations\":1,"
                           "\"peak_bytes\":512,\"allocations\":1}]"),
              "%s", text);
    free(text);
    OK(cuMemFree(a));
}

Test(tags, misuse_is_refused_with_a_reason)
{
    api_start();
    char longname[200];
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    cr_assert_eq(gpumem_tag_pop(), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_tag_push(NULL), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_tag_push(""), GPUMEM_ERROR_INVALID_VALUE);
    cr_assert_eq(gpumem_tag_push(longname), GPUMEM_ERROR_INVALID_VALUE);
    longname[127] = '\0';
    cr_assert_eq(gpumem_tag_push(longname), GPUMEM_OK, "127 bytes is the longest name accepted");
    cr_assert_eq(gpumem_tag_pop(), GPUMEM_OK);
    for (int i = 0; i < 64; i++) cr_assert_eq(gpumem_tag_push("deep"), GPUMEM_OK);
    cr_assert_eq(gpumem_tag_push("deep"), GPUMEM_ERROR_INVALID_VALUE, "65 nested tags");
    for (int i = 0; i < 64; i++) cr_assert_eq(gpumem_tag_pop(), GPUMEM_OK);
    gpumem_tag_usage u;
    cr_assert_eq(gpumem_tag_get_usage("never pushed", &u), GPUMEM_ERROR_NOT_FOUND);
    cr_assert_eq(gpumem_tag_get_usage(NULL, &u), GPUMEM_ERROR_INVALID_VALUE);
}

Test(tags, library_and_shim_share_one_manager)
{
    api_start();
    Dl_info lib, shim;
    cr_assert(dladdr((void *)(uintptr_t)gpumem_tag_push, &lib));
    cr_assert(dladdr(api_shim_sym("cuMemAlloc_v2"), &shim));
    cr_assert_str_eq(lib.dli_fname, shim.dli_fname, "gpumem_tag_push comes from the preloaded shim");
    void *p = NULL;
    CUdeviceptr q;
    cr_assert_eq(gpumem_malloc(&p, 1024), GPUMEM_OK);
    OK(cuMemAlloc(&q, 2048));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 3072, "one manager sees both allocations");
    cr_assert_eq(gpumem_free(p), GPUMEM_OK);
    OK(cuMemFree(q));
}
