// graph_check: graph memory nodes under the shim (issue 12). Builds one graph with
// cudaGraphAddMemAllocNode: A (64 MiB, filled by a memset node, outlives the graph's launch),
// B (64 MiB, freed by a free node of the same graph) and C (--big BYTES, 512 MiB by default: more
// than a 256 MiB GPUMEM_LIMIT leaves after A and B, so the shim must refuse it; without a limit it
// is made and freed in the graph too). Launches the graph, checks A's data, frees A with
// cudaFreeAsync, launches again (the launch recreates A at the same address) and checks again. A
// second graph with one allocation node is destroyed without a launch (no leak: its allocation never
// existed), and a captured cudaMallocAsync/cudaMemsetAsync/cudaFreeAsync graph is launched once.
// With --leak, A is left allocated at the end (the exit report must list exactly it: 64 MiB in one
// allocation); otherwise it is freed with cudaFree. Prints
//   refused=NAME            what the node C got: none (made), or the error's name
//   data=OK|BAD             A after the first launch holds the memset's bytes
//   relaunch=OK|BAD         the same after cudaFreeAsync and a second launch, at the same address
//   attr_device=0|1         cudaPointerGetAttributes(A) says device memory of device 0
//   captured=OK|BAD         the captured graph launched and its memory held the memset's bytes
//   driver_oversize=NAME    what an allocation node of 1 TiB gets (information: without a limit
//                           this is the driver's own answer; under one, the shim's)
//   graph_reserved=B, graph_used=B  the driver's CU_GRAPH_MEM_ATTR_RESERVED/USED_MEM_CURRENT after
//                           the first launch (information: the physical memory the driver mapped
//                           for graph allocations, which gpumem does not see)
// and "graph_check: OK" when every call that should succeed did. With --probe it only runs the
// trace probe (markers "graph_check: probe begin|end <runtime call>" on stderr).
// Build: nvcc -O2 -o graph_check graph_check.cu
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static int failed;

static void check(cudaError_t e, const char *what)
{
    if (e != cudaSuccess) {
        printf("%s: %s\n", what, cudaGetErrorName(e));
        failed = 1;
    }
}

static cudaMemAllocNodeParams alloc_params(size_t bytes)
{
    cudaMemAllocNodeParams p;
    memset(&p, 0, sizeof p);
    p.poolProps.allocType = cudaMemAllocationTypePinned;
    p.poolProps.location.type = cudaMemLocationTypeDevice;
    p.poolProps.location.id = 0;
    p.bytesize = bytes;
    return p;
}

static bool holds(const void *dptr, size_t bytes, unsigned char v)
{
    std::vector<unsigned char> host(bytes);
    check(cudaMemcpy(host.data(), dptr, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    for (size_t i = 0; i < bytes; i++)
        if (host[i] != v) return false;
    return true;
}

// ------------------------------------------------------------------ --probe
static void marker(const char *what, const char *name)
{
    fflush(stdout);
    fprintf(stderr, "graph_check: probe %s %s\n", what, name);
    fflush(stderr);
}

// One call of each graph-memory kind between markers (after a warm-up of each), for the trace
// check: which hooked driver entry points each runtime call reaches.
static void probe()
{
    cudaStream_t s;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    for (int round = 0; round < 2; round++) {
        bool mark = round == 1;
        cudaGraph_t g, cg;
        cudaGraphNode_t a, n, f;
        cudaGraphExec_t e, ce;
        cudaMemAllocNodeParams p = alloc_params((size_t)1 << 20);
        check(cudaGraphCreate(&g, 0), "cudaGraphCreate");
        if (mark) marker("begin", "cudaGraphAddMemAllocNode");
        check(cudaGraphAddMemAllocNode(&a, g, NULL, 0, &p), "cudaGraphAddMemAllocNode");
        if (mark) marker("end", "cudaGraphAddMemAllocNode");
        cudaGraphNodeParams np = {}; /* zeroed, as the unused bytes must be */
        np.type = cudaGraphNodeTypeMemAlloc;
        np.alloc.poolProps.allocType = cudaMemAllocationTypePinned;
        np.alloc.poolProps.location.type = cudaMemLocationTypeDevice;
        np.alloc.poolProps.location.id = 0;
        np.alloc.bytesize = (size_t)1 << 20;
        if (mark) marker("begin", "cudaGraphAddNode(MemAlloc)");
        check(cudaGraphAddNode(&n, g, NULL, NULL, 0, &np), "cudaGraphAddNode");
        if (mark) marker("end", "cudaGraphAddNode(MemAlloc)");
        if (mark) marker("begin", "cudaGraphAddMemFreeNode");
        check(cudaGraphAddMemFreeNode(&f, g, &n, 1, np.alloc.dptr), "cudaGraphAddMemFreeNode");
        if (mark) marker("end", "cudaGraphAddMemFreeNode");
        if (mark) marker("begin", "cudaGraphInstantiate");
        check(cudaGraphInstantiate(&e, g, 0), "cudaGraphInstantiate");
        if (mark) marker("end", "cudaGraphInstantiate");
        if (mark) marker("begin", "cudaGraphLaunch");
        check(cudaGraphLaunch(e, s), "cudaGraphLaunch");
        if (mark) marker("end", "cudaGraphLaunch");
        check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
        check(cudaFree(p.dptr), "cudaFree (graph allocation)");
        check(cudaGraphExecDestroy(e), "cudaGraphExecDestroy");
        if (mark) marker("begin", "cudaGraphDestroy");
        check(cudaGraphDestroy(g), "cudaGraphDestroy");
        if (mark) marker("end", "cudaGraphDestroy");
        void *c = NULL;
        check(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
        if (mark) marker("begin", "cudaMallocAsync(captured)");
        check(cudaMallocAsync(&c, (size_t)1 << 20, s), "cudaMallocAsync (captured)");
        if (mark) marker("end", "cudaMallocAsync(captured)");
        if (mark) marker("begin", "cudaFreeAsync(captured)");
        check(cudaFreeAsync(c, s), "cudaFreeAsync (captured)");
        if (mark) marker("end", "cudaFreeAsync(captured)");
        check(cudaStreamEndCapture(s, &cg), "cudaStreamEndCapture");
        check(cudaGraphInstantiate(&ce, cg, 0), "cudaGraphInstantiate (captured)");
        check(cudaGraphLaunch(ce, s), "cudaGraphLaunch (captured)");
        check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
        check(cudaGraphExecDestroy(ce), "cudaGraphExecDestroy (captured)");
        check(cudaGraphDestroy(cg), "cudaGraphDestroy (captured)");
    }
    check(cudaStreamDestroy(s), "cudaStreamDestroy");
    printf("probe: done\n");
}

int main(int argc, char **argv)
{
    size_t big = (size_t)512 << 20;
    bool leak = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--leak") == 0) leak = true;
        else if (strcmp(argv[i], "--big") == 0 && i + 1 < argc) big = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--probe") == 0) {
            check(cudaFree(0), "cudaFree(0)");
            probe();
            printf("graph_check: %s\n", failed ? "FAIL" : "OK");
            return failed;
        }
    }
    const size_t mib64 = (size_t)64 << 20;
    check(cudaFree(0), "cudaFree(0)");
    cudaStream_t s;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");

    cudaGraph_t g;
    check(cudaGraphCreate(&g, 0), "cudaGraphCreate");
    cudaGraphNode_t na, nb, nc, nset, nfree_b, nfree_c;
    cudaMemAllocNodeParams pa = alloc_params(mib64), pb = alloc_params(mib64), pc = alloc_params(big);
    check(cudaGraphAddMemAllocNode(&na, g, NULL, 0, &pa), "cudaGraphAddMemAllocNode A");
    check(cudaGraphAddMemAllocNode(&nb, g, NULL, 0, &pb), "cudaGraphAddMemAllocNode B");
    cudaMemsetParams ms;
    memset(&ms, 0, sizeof ms);
    ms.dst = pa.dptr;
    ms.value = 0x5A;
    ms.elementSize = 1;
    ms.width = mib64;
    ms.height = 1;
    ms.pitch = mib64;
    check(cudaGraphAddMemsetNode(&nset, g, &na, 1, &ms), "cudaGraphAddMemsetNode");
    check(cudaGraphAddMemFreeNode(&nfree_b, g, &nb, 1, pb.dptr), "cudaGraphAddMemFreeNode B");
    cudaError_t refused = cudaGraphAddMemAllocNode(&nc, g, NULL, 0, &pc);
    (void)cudaGetLastError(); /* a refusal is not sticky */
    if (refused == cudaSuccess)
        check(cudaGraphAddMemFreeNode(&nfree_c, g, &nc, 1, pc.dptr), "cudaGraphAddMemFreeNode C");
    printf("refused=%s\n", refused == cudaSuccess ? "none" : cudaGetErrorName(refused));

    cudaGraphExec_t e;
    check(cudaGraphInstantiate(&e, g, 0), "cudaGraphInstantiate");
    check(cudaGraphLaunch(e, s), "cudaGraphLaunch");
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    printf("data=%s\n", holds(pa.dptr, mib64, 0x5A) ? "OK" : "BAD");
    unsigned long long graph_reserved = 0, graph_used = 0; /* the attributes are 64-bit */
    check(cudaDeviceGetGraphMemAttribute(0, cudaGraphMemAttrReservedMemCurrent, &graph_reserved),
          "cudaDeviceGetGraphMemAttribute (reserved)");
    check(cudaDeviceGetGraphMemAttribute(0, cudaGraphMemAttrUsedMemCurrent, &graph_used),
          "cudaDeviceGetGraphMemAttribute (used)");
    printf("graph_reserved=%llu\ngraph_used=%llu\n", (unsigned long long)graph_reserved,
           (unsigned long long)graph_used);
    cudaPointerAttributes attr;
    check(cudaPointerGetAttributes(&attr, pa.dptr), "cudaPointerGetAttributes");
    printf("attr_device=%d\n", attr.type == cudaMemoryTypeDevice && attr.device == 0 && attr.devicePointer == pa.dptr);
    check(cudaFreeAsync(pa.dptr, s), "cudaFreeAsync A");
    check(cudaGraphLaunch(e, s), "cudaGraphLaunch again");
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    printf("relaunch=%s\n", holds(pa.dptr, mib64, 0x5A) ? "OK" : "BAD");
    check(cudaGraphExecDestroy(e), "cudaGraphExecDestroy");
    check(cudaGraphDestroy(g), "cudaGraphDestroy"); /* A outlives its graph */

    /* Never launched: its allocation never existed, so its destruction leaves nothing behind. */
    cudaGraph_t unlaunched;
    cudaGraphNode_t nu;
    cudaMemAllocNodeParams pu = alloc_params((size_t)1 << 20);
    check(cudaGraphCreate(&unlaunched, 0), "cudaGraphCreate (unlaunched)");
    check(cudaGraphAddMemAllocNode(&nu, unlaunched, NULL, 0, &pu), "cudaGraphAddMemAllocNode (unlaunched)");
    check(cudaGraphDestroy(unlaunched), "cudaGraphDestroy (unlaunched)");

    /* What an allocation node far beyond the device gets. */
    cudaGraph_t over;
    cudaGraphNode_t no;
    cudaMemAllocNodeParams po = alloc_params((size_t)1 << 40);
    check(cudaGraphCreate(&over, 0), "cudaGraphCreate (oversize)");
    cudaError_t oversize = cudaGraphAddMemAllocNode(&no, over, NULL, 0, &po);
    (void)cudaGetLastError();
    printf("driver_oversize=%s\n", cudaGetErrorName(oversize));
    check(cudaGraphDestroy(over), "cudaGraphDestroy (oversize)");

    /* Stream capture: the driver adds the allocation and free nodes itself. */
    void *cap = NULL;
    cudaGraph_t cg;
    check(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
    check(cudaMallocAsync(&cap, (size_t)1 << 20, s), "cudaMallocAsync (captured)");
    check(cudaMemsetAsync(cap, 0x33, (size_t)1 << 20, s), "cudaMemsetAsync (captured)");
    void *copy = NULL;
    check(cudaMallocAsync(&copy, (size_t)1 << 20, s), "cudaMallocAsync (captured, outlives)");
    check(cudaMemcpyAsync(copy, cap, (size_t)1 << 20, cudaMemcpyDeviceToDevice, s), "cudaMemcpyAsync (captured)");
    check(cudaFreeAsync(cap, s), "cudaFreeAsync (captured)");
    check(cudaStreamEndCapture(s, &cg), "cudaStreamEndCapture");
    cudaGraphExec_t ce;
    check(cudaGraphInstantiate(&ce, cg, 0), "cudaGraphInstantiate (captured)");
    check(cudaGraphLaunch(ce, s), "cudaGraphLaunch (captured)");
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    printf("captured=%s\n", holds(copy, (size_t)1 << 20, 0x33) ? "OK" : "BAD");
    check(cudaFree(copy), "cudaFree (captured, outlives)");
    check(cudaGraphExecDestroy(ce), "cudaGraphExecDestroy (captured)");
    check(cudaGraphDestroy(cg), "cudaGraphDestroy (captured)");

    if (!leak) check(cudaFree(pa.dptr), "cudaFree A");
    check(cudaStreamDestroy(s), "cudaStreamDestroy");
    printf("graph_check: %s\n", failed ? "FAIL" : "OK");
    return failed;
}
