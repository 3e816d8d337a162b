/* api_graphs: graph memory nodes (issue 12). An allocation node (cuGraphAddMemAllocNode,
 * cuGraphAddNode and cuGraphAddNode_v2 of type MEM_ALLOC: what cudaGraphAddMemAllocNode reaches,
 * and cuMemAllocAsync on a capturing stream, which makes the driver add one) counts in the
 * statistics and the leak table from its creation until it is freed: by a free node for its
 * address, or by cuMemFreeAsync/cuMemFree outside the graph. Its bytes stay reserved in the limit
 * while its graph exists (a launch recreates the allocation at the same address), and an
 * allocation node over the limit is refused with CUDA_ERROR_OUT_OF_MEMORY before the driver is
 * asked. The address is the driver's: every pointer query answers the driver's answer. */
#include <dlfcn.h>

#include "api_test.h"
#include "fakecuda.h"

#define MiB ((size_t)1 << 20)

static CUDA_MEM_ALLOC_NODE_PARAMS alloc_params(size_t bytes)
{
    CUDA_MEM_ALLOC_NODE_PARAMS p;
    memset(&p, 0, sizeof p);
    p.poolProps.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
    p.poolProps.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    p.poolProps.location.id = 0;
    p.bytesize = bytes;
    return p;
}

static CUdeviceptr add_alloc(CUgraph g, size_t bytes, CUgraphNode *node_out)
{
    CUDA_MEM_ALLOC_NODE_PARAMS p = alloc_params(bytes);
    CUgraphNode n;
    OK(cuGraphAddMemAllocNode(&n, g, NULL, 0, &p));
    cr_assert_neq(p.dptr, 0, "the driver assigns the address when the node is created");
    if (node_out) *node_out = n;
    return p.dptr;
}

static fakecuda_counters_t counters(void)
{
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    return c;
}

static CUgraphExec launch(CUgraph g, CUstream s)
{
    CUgraphExec e;
    OK(cuGraphInstantiateWithFlags(&e, g, 0));
    OK(cuGraphLaunch(e, s));
    OK(cuStreamSynchronize(s));
    return e;
}

Test(graphs, an_allocation_node_counts_from_its_creation_and_its_data_path_works)
{
    api_start();
    CUstream s;
    OK(cuStreamCreate(&s, 0));
    CUgraph g;
    OK(cuGraphCreate(&g, 0));
    CUgraphNode n;
    CUdeviceptr p = add_alloc(g, MiB, &n);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 1);
    cr_assert_eq(st.bytes_requested, MiB, "counted from the node's creation");
    cr_assert_eq(st.bytes_reserved, MiB, "and held against the limit");
    CUDA_MEM_ALLOC_NODE_PARAMS back;
    OK(cuGraphMemAllocNodeGetParams(n, &back));
    cr_assert_eq(back.dptr, p);
    CUgraphExec e = launch(g, s);
    OK(cuMemsetD8(p, 0x5A, MiB));
    unsigned char buf[256];
    OK(cuMemcpyDtoH(buf, p + MiB - sizeof buf, sizeof buf));
    cr_assert(api_all_bytes(buf, 0x5A, sizeof buf), "the graph allocation holds its data");
    OK(cuMemFreeAsync(p, s));
    OK(cuStreamSynchronize(s));
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0, "freed outside the graph: no longer live");
    cr_assert_eq(st.frees, 1);
    cr_assert_eq(st.bytes_reserved, MiB, "its graph can launch it again: the bytes stay reserved");
    OK(cuGraphExecDestroy(e));
    OK(cuGraphDestroy(g));
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_reserved, 0, "graph gone and allocation freed: nothing held");
    cr_assert_eq(counters().bytes_in_use, 0);
}

Test(graphs, pointer_queries_get_the_drivers_answers)
{
    api_start();
    CUgraph g;
    OK(cuGraphCreate(&g, 0));
    CUdeviceptr p = add_alloc(g, 3 * MiB, NULL);
    CUdeviceptr base = 0;
    size_t size = 0;
    OK(cuMemGetAddressRange(&base, &size, p + 4096));
    cr_assert_eq(base, p);
    cr_assert_eq(size, 3 * MiB);
    unsigned long long id = 0;
    OK(cuPointerGetAttribute(&id, CU_POINTER_ATTRIBUTE_BUFFER_ID, p));
    cr_assert_eq(id & (1ull << 63), 0, "the driver's buffer id, not one of gpumem's pool blocks");
    CUmemorytype type = 0;
    size_t range = 0;
    CUpointer_attribute attrs[] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_RANGE_SIZE};
    void *data[] = {&type, &range};
    OK(cuPointerGetAttributes(2, attrs, data, p + 100));
    cr_assert_eq(type, CU_MEMORYTYPE_DEVICE);
    cr_assert_eq(range, 3 * MiB);
    CUmemGenericAllocationHandle h;
    ERR(cuMemRetainAllocationHandle(&h, (void *)(uintptr_t)p), CUDA_ERROR_INVALID_VALUE); /* the fake's own answer */
    OK(cuGraphDestroy(g));
}

Test(graphs, a_free_node_in_the_same_graph_ends_the_record_and_the_graph_holds_the_bytes)
{
    api_start();
    CUstream s;
    OK(cuStreamCreate(&s, 0));
    CUgraph g;
    OK(cuGraphCreate(&g, 0));
    CUgraphNode a, f;
    CUdeviceptr p = add_alloc(g, 2 * MiB, &a);
    OK(cuGraphAddMemFreeNode(&f, g, &a, 1, p));
    CUdeviceptr back = 0;
    OK(cuGraphMemFreeNodeGetParams(f, &back));
    cr_assert_eq(back, p);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0, "freed in its own graph: never outlives a launch, never a leak");
    cr_assert_eq(st.frees, 1);
    cr_assert_eq(st.bytes_reserved, 2 * MiB, "every launch needs it: reserved while the graph exists");
    CUgraphExec e = launch(g, s);
    ERR(cuMemFree(p), CUDA_ERROR_INVALID_VALUE); /* the driver: freed in its graph, not outside */
    OK(cuGraphLaunch(e, s)); /* relaunch: nothing left unfreed */
    OK(cuStreamSynchronize(s));
    st = api_stats_or_fail();
    cr_assert_eq(st.frees, 1, "a refused free counts nothing");
    cr_assert_eq(st.bytes_reserved, 2 * MiB);
    OK(cuGraphExecDestroy(e));
    OK(cuGraphDestroy(g));
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_reserved, 0);
    cr_assert_eq(counters().bytes_in_use, 0);
}

Test(graphs, an_allocation_outliving_its_graph_counts_until_cuMemFree)
{
    api_start();
    CUstream s;
    OK(cuStreamCreate(&s, 0));
    CUgraph g;
    OK(cuGraphCreate(&g, 0));
    CUdeviceptr p = add_alloc(g, MiB, NULL);
    CUgraphExec e = launch(g, s);
    ERR(cuGraphLaunch(e, s), CUDA_ERROR_INVALID_VALUE); /* the driver: the last launch's allocation is unfreed */
    OK(cuGraphExecDestroy(e));
    OK(cuGraphDestroy(g));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, MiB, "graph destruction does not free a graph allocation");
    cr_assert_eq(st.bytes_reserved, MiB);
    cr_assert_eq(counters().bytes_in_use, MiB);
    OK(cuMemFree(p));
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.bytes_reserved, 0);
    cr_assert_eq(counters().bytes_in_use, 0);
    ERR(cuMemFree(p), CUDA_ERROR_INVALID_VALUE); /* gone: the driver's answer */
}

Test(graphs, a_free_node_in_another_graph_frees_it)
{
    api_start();
    CUstream s;
    OK(cuStreamCreate(&s, 0));
    CUgraph g1, g2;
    OK(cuGraphCreate(&g1, 0));
    OK(cuGraphCreate(&g2, 0));
    CUdeviceptr p = add_alloc(g1, MiB, NULL);
    CUgraphExec e1 = launch(g1, s);
    CUgraphNode f;
    OK(cuGraphAddMemFreeNode(&f, g2, NULL, 0, p));
    ERR(cuGraphAddMemFreeNode(&f, g1, NULL, 0, p), CUDA_ERROR_INVALID_VALUE); /* one free node in all */
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, MiB, "live until g2 runs its free node");
    CUgraphExec e2 = launch(g2, s);
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0, "g2's launch freed it");
    cr_assert_eq(st.frees, 1);
    /* g1 makes it again, g2 frees it again, each time. */
    OK(cuGraphLaunch(e1, s));
    cr_assert_eq(api_stats_or_fail().bytes_requested, MiB);
    OK(cuGraphLaunch(e2, s));
    OK(cuStreamSynchronize(s));
    cr_assert_eq(api_stats_or_fail().bytes_requested, 0);
    OK(cuGraphExecDestroy(e2));
    OK(cuGraphExecDestroy(e1));
    OK(cuGraphDestroy(g2));
    cr_assert_eq(api_stats_or_fail().bytes_reserved, MiB, "g1 still exists and may relaunch it");
    OK(cuGraphDestroy(g1));
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_reserved, 0);
    cr_assert_eq(st.frees, 2);
    cr_assert_eq(counters().bytes_in_use, 0);
}

/* A launch after the program freed the last launch's allocation makes it again, at the same
 * address: live again, a leak again if nothing frees it. */
Test(graphs, a_relaunch_makes_a_freed_allocation_live_again)
{
    api_start();
    CUstream s;
    OK(cuStreamCreate(&s, 0));
    CUgraph g;
    OK(cuGraphCreate(&g, 0));
    CUdeviceptr p = add_alloc(g, MiB, NULL);
    CUDA_GRAPH_INSTANTIATE_PARAMS ip;
    memset(&ip, 0, sizeof ip);
    CUgraphExec e;
    OK(cuGraphInstantiateWithParams(&e, g, &ip));
    for (int i = 0; i < 3; i++) {
        OK(cuGraphLaunch(e, s));
        gpumem_stats st = api_stats_or_fail();
        cr_assert_eq(st.bytes_requested, MiB, "launch %d: live", i);
        cr_assert_eq(st.bytes_reserved, MiB, "launch %d: the graph's bytes, taken once", i);
        OK(cuMemsetD8(p, (unsigned char)i, MiB));
        OK(cuMemFreeAsync(p, s));
        OK(cuStreamSynchronize(s));
        cr_assert_eq(api_stats_or_fail().bytes_requested, 0, "launch %d: freed", i);
    }
    OK(cuGraphLaunch_ptsz(e, 0));
    OK(cuGraphExecDestroy(e));
    OK(cuGraphDestroy(g));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, MiB, "made by the last launch, never freed: a leak");
    cr_assert_eq(st.allocations, 4);
    cr_assert_eq(st.frees, 3);
    api_report_fn report = (api_report_fn)(uintptr_t)api_shim_sym("gpumem_report");
    cr_assert_not_null(report);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert_not_null(f);
    report(f);
    fclose(f);
    cr_assert(strstr(buf, "Leak of 1048576 byte(s) in 1 allocation(s) on device 0"), "%s", buf);
    free(buf);
    OK(cuMemFree(p));
    cr_assert_eq(api_stats_or_fail().bytes_reserved, 0);
}

Test(graphs, an_allocation_node_over_the_limit_is_refused_before_the_driver)
{
    setenv("GPUMEM_LIMIT", "4MiB", 1);
    api_start();
    CUgraph g;
    OK(cuGraphCreate(&g, 0));
    CUdeviceptr fits = add_alloc(g, 3 * MiB, NULL);
    cr_assert_neq(fits, 0);
    fakecuda_reset_counters();
    CUDA_MEM_ALLOC_NODE_PARAMS p = alloc_params(2 * MiB);
    CUgraphNode n = NULL;
    ERR(cuGraphAddMemAllocNode(&n, g, NULL, 0, &p), CUDA_ERROR_OUT_OF_MEMORY);
    cr_assert_eq(p.dptr, 0, "nothing was allocated");
    cr_assert_eq(counters().alloc_calls, 0, "refused by the limit, the driver never asked");
    CUgraphNodeParams np;
    memset(&np, 0, sizeof np);
    np.type = CU_GRAPH_NODE_TYPE_MEM_ALLOC;
    np.alloc.poolProps = p.poolProps;
    np.alloc.bytesize = 2 * MiB;
    ERR(cuGraphAddNode(&n, g, NULL, NULL, 0, &np), CUDA_ERROR_OUT_OF_MEMORY);
    cr_assert_eq(counters().alloc_calls, 0);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.limit_rejections, 2);
    cr_assert_eq(st.allocations, 1, "a refusal is no allocation");
    cr_assert_eq(st.bytes_requested, 3 * MiB);
    cr_assert_eq(st.bytes_reserved, 3 * MiB, "a refusal keeps nothing reserved");
    np.alloc.bytesize = MiB; /* what is left fits */
    OK(cuGraphAddNode(&n, g, NULL, NULL, 0, &np));
    cr_assert_neq(np.alloc.dptr, 0);
    OK(cuGraphDestroy(g)); /* never launched: both go with their nodes */
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0, "never live, never a leak");
    cr_assert_eq(st.bytes_reserved, 0);
    cr_assert_eq(counters().bytes_in_use, 0);
}

Test(graphs, the_generic_entry_points_count_alloc_and_free_nodes_and_pass_the_rest)
{
    api_start();
    CUgraph g;
    OK(cuGraphCreate(&g, 0));
    CUgraphNodeParams np;
    memset(&np, 0, sizeof np);
    np.type = CU_GRAPH_NODE_TYPE_MEM_ALLOC;
    np.alloc.poolProps.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
    np.alloc.poolProps.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    np.alloc.bytesize = 5000;
    CUgraphNode a, f, other;
    OK(cuGraphAddNode(&a, g, NULL, NULL, 0, &np)); /* cuGraphAddNode_v2, as cuda.h 13 names it */
    CUdeviceptr p = np.alloc.dptr;
    cr_assert_eq(api_stats_or_fail().bytes_requested, 5000);
    /* The CUDA 12.2 ABI, as cudart fetches it by version. */
    typedef CUresult (*add_node_v1)(CUgraphNode *, CUgraph, const CUgraphNode *, size_t, CUgraphNodeParams *);
    void *fn = NULL;
    CUdriverProcAddressQueryResult q;
    OK(cuGetProcAddress("cuGraphAddNode", &fn, 12020, CU_GET_PROC_ADDRESS_DEFAULT, &q));
    cr_assert_eq(fn, dlsym(RTLD_DEFAULT, "cuGraphAddNode"), "the shim's hook of the 12.2 ABI");
    add_node_v1 v1 = (add_node_v1)fn;
    CUgraphNodeParams fp;
    memset(&fp, 0, sizeof fp);
    fp.type = CU_GRAPH_NODE_TYPE_MEM_FREE;
    fp.free.dptr = p;
    OK(v1(&f, g, &a, 1, &fp));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.frees, 1);
    CUgraphNodeParams empty;
    memset(&empty, 0, sizeof empty);
    empty.type = CU_GRAPH_NODE_TYPE_EMPTY;
    ERR(cuGraphAddNode(&other, g, NULL, NULL, 0, &empty), CUDA_ERROR_NOT_SUPPORTED); /* the fake's answer, untouched */
    ERR(v1(&f, g, NULL, 0, &fp), CUDA_ERROR_INVALID_VALUE); /* freed twice: the driver says no */
    cr_assert_eq(api_stats_or_fail().frees, 1);
    OK(cuGraphDestroy(g));
    cr_assert_eq(api_stats_or_fail().bytes_reserved, 0);
}

Test(graphs, cudart_reaches_the_hooks_through_cuGetProcAddress)
{
    api_start();
    const char *names[] = {"cuGraphAddMemAllocNode", "cuGraphAddMemFreeNode", "cuGraphDestroy"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        void *fn = NULL;
        CUdriverProcAddressQueryResult q;
        OK(cuGetProcAddress(names[i], &fn, 13000, CU_GET_PROC_ADDRESS_DEFAULT, &q));
        cr_assert_eq(fn, dlsym(RTLD_DEFAULT, names[i]), "%s: the shim's hook", names[i]);
    }
    void *fn = NULL;
    CUdriverProcAddressQueryResult q;
    OK(cuGetProcAddress("cuGraphAddNode", &fn, 13000, CU_GET_PROC_ADDRESS_DEFAULT, &q));
    cr_assert_eq(fn, dlsym(RTLD_DEFAULT, "cuGraphAddNode_v2"));
}

/* Captured, cuMemAllocAsync makes the driver add an allocation node to the graph being built: the
 * same graph allocation, with the same rules, as one made by cuGraphAddMemAllocNode. */
Test(graphs, a_captured_stream_ordered_allocation_is_a_graph_allocation)
{
    api_start();
    CUstream s;
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED));
    CUdeviceptr inner, outer;
    OK(cuMemAllocAsync(&inner, MiB, s));
    OK(cuMemAllocAsync(&outer, 2 * MiB, s));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 3 * MiB);
    OK(cuMemFreeAsync(inner, s)); /* a free node in the captured graph */
    CUgraph g;
    OK(cuStreamEndCapture(s, &g));
    cr_assert_not_null(g);
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 2 * MiB, "freed in its graph: no longer live");
    cr_assert_eq(st.bytes_reserved, 3 * MiB, "held while the captured graph exists");
    OK(cuGraphDestroy(g));
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_reserved, 2 * MiB, "the outliving allocation keeps its bytes");
    OK(cuMemFreeAsync(outer, s));
    OK(cuStreamSynchronize(s));
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.bytes_reserved, 0);

    /* Not capturing: a stream-ordered allocation as before, its bytes back at its free. */
    CUdeviceptr plain;
    OK(cuMemAllocAsync(&plain, MiB, s));
    OK(cuMemFreeAsync(plain, s));
    OK(cuStreamSynchronize(s));
    cr_assert_eq(api_stats_or_fail().bytes_reserved, 0);
}

Test(graphs, a_captured_allocation_over_the_limit_is_refused)
{
    setenv("GPUMEM_LIMIT", "2MiB", 1);
    api_start();
    CUstream s;
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED));
    CUdeviceptr p = 0;
    ERR(cuMemAllocAsync(&p, 4 * MiB, s), CUDA_ERROR_OUT_OF_MEMORY);
    CUgraph g;
    OK(cuStreamEndCapture(s, &g));
    OK(cuGraphDestroy(g));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.limit_rejections, 1);
    cr_assert_eq(st.bytes_reserved, 0);
}

/* At exit: the graph allocation never freed is a leak with the stack of its node's creation; the
 * ones freed (by a free node, by cuMemFreeAsync) and the one refused by the limit are not. */
Test(graphs, an_unfreed_graph_allocation_is_in_the_exit_report_with_its_call_site)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", "GPUMEM_LIMIT=64MiB", NULL};
    api_child c = api_scenario_ok("graph_leak", env);
    ASSERT_LEAKS(c.err, 3000, 1);
    cr_assert(strstr(c.err, "Leak of 3000 byte(s) in 1 allocation(s) on device 0 allocated from:\n    #0 0x"),
              "%s", c.err);
    cr_assert(strstr(c.err, " in graph_leak api_child+0x"), "frame #0 names the node's creator:\n%s", c.err);
    cr_assert(strstr(c.err, "limit rejections 1"), "%s", c.err);
    api_child_free(&c);
}

Test(graphs, the_per_thread_entry_points_instantiate_and_launch_alike)
{
    api_start();
    CUgraph g;
    OK(cuGraphCreate(&g, 0));
    CUdeviceptr p = add_alloc(g, MiB, NULL);
    CUDA_GRAPH_INSTANTIATE_PARAMS ip;
    memset(&ip, 0, sizeof ip);
    CUgraphExec e;
    OK(cuGraphInstantiateWithParams_ptsz(&e, g, &ip));
    cr_assert_eq(ip.result_out, CUDA_GRAPH_INSTANTIATE_SUCCESS);
    OK(cuGraphLaunch_ptsz(e, 0));
    OK(cuMemFreeAsync_ptsz(p, 0));
    OK(cuStreamSynchronize_ptsz(0));
    cr_assert_eq(api_stats_or_fail().bytes_requested, 0);
    OK(cuGraphLaunch_ptsz(e, 0));
    cr_assert_eq(api_stats_or_fail().bytes_requested, MiB, "the per-thread launch made it again");
    OK(cuMemFreeAsync_ptsz(p, 0));
    OK(cuStreamSynchronize_ptsz(0));
    OK(cuGraphExecDestroy(e));
    OK(cuGraphDestroy(g));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.bytes_reserved, 0);
}

Test(graphs, a_fork_child_starts_without_its_parents_graph_allocations)
{
    api_start();
    CUgraph g;
    OK(cuGraphCreate(&g, 0));
    add_alloc(g, MiB, NULL);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        CUcontext c = NULL;
        CUdevice d;
        CUgraph cg;
        CUgraphNode n;
        CUDA_MEM_ALLOC_NODE_PARAMS p = alloc_params(4096);
        gpumem_stats st;
        bool ok = cuInit(0) == CUDA_SUCCESS && cuDeviceGet(&d, 0) == CUDA_SUCCESS &&
                  cuDevicePrimaryCtxRetain(&c, d) == CUDA_SUCCESS && cuCtxSetCurrent(c) == CUDA_SUCCESS &&
                  cuGraphCreate(&cg, 0) == CUDA_SUCCESS &&
                  cuGraphAddMemAllocNode(&n, cg, NULL, 0, &p) == CUDA_SUCCESS &&
                  api_stats(&st) && st.bytes_reserved == 4096 && cuGraphDestroy(cg) == CUDA_SUCCESS &&
                  api_stats(&st) && st.bytes_reserved == 0;
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the child's graph memory was not its own");
    cr_assert_eq(api_stats_or_fail().bytes_reserved, MiB);
    OK(cuGraphDestroy(g));
}
