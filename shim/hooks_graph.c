/* Graph memory nodes: device memory a graph allocates (cuGraphAddMemAllocNode, cuGraphAddNode(_v2)
 * of type MEM_ALLOC, what cudaGraphAddMemAllocNode reaches, and cuMemAllocAsync on a stream that
 * is capturing: the driver then adds the allocation node itself), counted like every other
 * allocation in the limit, the statistics and the leak report (GM_KIND_GRAPH). The pool never
 * serves them: the address is the driver's and every query about it is answered by the driver.
 * The model (docs/compatibility.md, "Graph memory nodes"), after the driver's documentation
 * (cuda.h, cuGraphAddMemAllocNode, cuGraphLaunch; the programming guide's "Graph Memory Nodes"):
 *
 *  - The driver assigns the address when the node is created; the allocation is made by each
 *    launch that reaches the node and lives until it is freed. The bytes are taken from the limit
 *    at the node's creation (refused there with CUDA_ERROR_OUT_OF_MEMORY, before the driver is
 *    asked), and a record with the creating call stack enters the live table: a leak at exit
 *    unless it is freed.
 *  - A free node in its own graph (cuGraphAddMemFreeNode, cuGraphAddNode MEM_FREE, cuMemFreeAsync
 *    captured into that graph) makes it internal: it never outlives a launch, so its record goes
 *    at once and it is never a leak. cuMemFreeAsync/cuMemFree outside a graph (routed here by the
 *    free hooks of hooks_mem.c) end the record when they are called; a free node in another graph
 *    ends it when that graph is launched.
 *  - Its bytes stay reserved in the limit while the graph of its allocation node exists, freed or
 *    not: every launch recreates the allocation at the same address, and the driver keeps the
 *    node's address (and the physical memory it mapped, in its graph memory pool) as long. A
 *    launch of that graph records an allocation freed outside it again (with the launch's stack:
 *    a leak if nothing frees it after that launch).
 *  - When the graph is destroyed its held bytes go back; an allocation still recorded is asked
 *    after: if the driver no longer knows the address (no launch made it live), it went with its
 *    node and is forgotten; otherwise it lives on, as the driver documents, until it is freed.
 *
 * The tables below remember, per graph allocation, its graph, the other graph that frees it and
 * whether its record is gone while its graph holds the bytes; and, per executable graph, its
 * graph (cuGraphInstantiateWithFlags/WithParams; an exec made through an entry point not hooked
 * here, such as the CUDA 10 cuGraphInstantiate, is unknown and its launches change nothing).
 * Lock order: graph_lock, then a heap's lock (the engine calls below take it). */
#include "shim.h"

typedef struct graph_alloc {
    uintptr_t ptr;      /* the key: the driver's address */
    CUgraph graph;      /* the graph of its allocation node; NULL once that graph is destroyed */
    CUgraph free_graph; /* another graph with a free node for it, NULL: none */
    bool internal;      /* a free node of its own graph frees it in every launch */
    bool held;          /* not live for gpumem: no record, its bytes held here for its graph */
    gm_heap *heap;      /* where its record is kept */
    int device;         /* held: where the bytes are reserved */
    size_t size;
    UT_hash_handle hh;
} graph_alloc;

typedef struct graph_exec {
    CUgraphExec exec;   /* the key */
    CUgraph graph;
    UT_hash_handle hh;
} graph_exec;

static pthread_mutex_t graph_lock = PTHREAD_MUTEX_INITIALIZER;
static graph_alloc *graph_allocs;
static graph_exec *graph_execs;
static pthread_once_t graph_once = PTHREAD_ONCE_INIT;
static _Atomic bool graph_allocs_made;

static void lock_graphs(void) { pthread_mutex_lock(&graph_lock); }
static void unlock_graphs(void) { pthread_mutex_unlock(&graph_lock); }

/* A fork child has no CUDA context and no graph: it forgets the parent's, with a fresh lock. */
static void child_after_fork(void)
{
    pthread_mutex_init(&graph_lock, NULL);
    graph_alloc *e, *next;
    HASH_ITER(hh, graph_allocs, e, next) {
        HASH_DEL(graph_allocs, e);
        free(e);
    }
    graph_exec *x, *xnext;
    HASH_ITER(hh, graph_execs, x, xnext) {
        HASH_DEL(graph_execs, x);
        free(x);
    }
}

static void graph_init(void)
{
    static const gm_fork_handlers handlers = {lock_graphs, unlock_graphs, child_after_fork};
    gm_fork_register(GM_FORK_GRAPHS, &handlers);
}

static void drop_locked(graph_alloc *e)
{
    if (e->held) gm_limit_unreserve(e->device, e->size);
    HASH_DEL(graph_allocs, e);
    free(e);
}

static graph_alloc *find_locked(uintptr_t p)
{
    graph_alloc *e = NULL;
    HASH_FIND(hh, graph_allocs, &p, sizeof p, e);
    return e;
}

CUresult shim_graph_alloc(gm_heap *heap, CUgraph graph, CUdeviceptr *dptr, size_t size, uintptr_t stream,
                          const gm_callsite *site, CUresult (*call)(void *), void *arg)
{
    pthread_once(&graph_once, graph_init);
    graph_alloc *e = calloc(1, sizeof *e);
    if (!e) return call(arg); /* cannot remember it: the driver's allocation, uncounted */
    if (gm_track_reserve(heap, size) != GPUMEM_OK) {
        free(e);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    CUresult res = call(arg);
    if (res != CUDA_SUCCESS) {
        gm_track_abort(heap, size);
        free(e);
        return res;
    }
    uintptr_t p = (uintptr_t)*dptr;
    *e = (graph_alloc){.ptr = p, .graph = graph, .heap = heap, .device = heap->device, .size = size};
    pthread_mutex_lock(&graph_lock);
    graph_alloc *old = find_locked(p);
    if (old) drop_locked(old); /* the driver reused an address of a graph that went (its record, if
                                * any, is replaced by the commit below) */
    gm_track_commit(heap, p, size, GM_KIND_GRAPH, stream, site);
    HASH_ADD(hh, graph_allocs, ptr, sizeof e->ptr, e);
    atomic_store_explicit(&graph_allocs_made, true, memory_order_relaxed);
    pthread_mutex_unlock(&graph_lock);
    return CUDA_SUCCESS;
}

/* The allocation stops being live for gpumem: its record goes; its bytes stay reserved while its
 * graph may recreate it, else the entry goes too. */
static void end_record_locked(gm_heap *hint, graph_alloc *e)
{
    if (e->held) return;
    if (e->graph) {
        if (gm_untrack_keep_reserved(hint, e->ptr, GM_KIND_GRAPH, &e->device, &e->size) == GM_OURS)
            e->held = true;
    } else {
        gm_untrack(hint, e->ptr, GM_KIND_GRAPH);
        drop_locked(e);
    }
}

void shim_graph_freed(gm_heap *hint, CUdeviceptr dptr, CUgraph in_graph)
{
    uintptr_t p = (uintptr_t)dptr;
    pthread_mutex_lock(&graph_lock);
    graph_alloc *e = find_locked(p);
    if (!e) {
        gm_untrack(hint, p, GM_KIND_GRAPH);
    } else if (in_graph && in_graph == e->graph) {
        e->internal = true; /* freed in its own graph: lives only within a launch */
        end_record_locked(hint, e);
    } else if (in_graph) {
        e->free_graph = in_graph; /* freed when that graph is launched */
    } else {
        end_record_locked(hint, e);
    }
    pthread_mutex_unlock(&graph_lock);
}

/* Whether the driver still knows `p` as an allocation (a graph allocation that outlives its graph
 * does; one that no launch made live went with its node). */
static bool driver_knows(uintptr_t p)
{
    CUdeviceptr base = 0;
    size_t size = 0;
    return !shim_real_cuMemGetAddressRange_v2 ||
           shim_real_cuMemGetAddressRange_v2(&base, &size, (CUdeviceptr)p) == CUDA_SUCCESS;
}

static void graph_destroyed(gm_heap *hint, CUgraph graph)
{
    pthread_mutex_lock(&graph_lock);
    graph_alloc *e, *next;
    HASH_ITER(hh, graph_allocs, e, next) {
        if (e->free_graph == graph) e->free_graph = NULL;
        if (e->graph != graph) continue;
        e->graph = NULL;
        if (e->held) {
            drop_locked(e);
        } else if (!driver_knows(e->ptr)) { /* never live (not launched, or freed by the driver) */
            gm_untrack(hint, e->ptr, GM_KIND_GRAPH);
            drop_locked(e);
        } /* else live: it keeps its record (and bytes) until it is freed */
    }
    pthread_mutex_unlock(&graph_lock);
}

/* A launch of `graph` was accepted: the allocations it makes again are live again, those its free
 * nodes free of other graphs are not. */
static void graph_launched(gm_heap *hint, CUgraph graph, uintptr_t stream, const gm_callsite *site)
{
    pthread_mutex_lock(&graph_lock);
    graph_alloc *e, *next;
    HASH_ITER(hh, graph_allocs, e, next) {
        if (e->graph == graph && e->held && !e->internal) {
            gm_track_commit(e->heap, e->ptr, e->size, GM_KIND_GRAPH, stream, site); /* the held bytes */
            e->held = false;
        } else if (e->free_graph == graph) {
            end_record_locked(hint, e); /* its free node stays: every launch of that graph frees it */
        }
    }
    pthread_mutex_unlock(&graph_lock);
}

static void exec_made(CUgraphExec exec, CUgraph graph)
{
    graph_exec *x = calloc(1, sizeof *x);
    if (!x) return;
    x->exec = exec;
    x->graph = graph;
    pthread_mutex_lock(&graph_lock);
    graph_exec *old = NULL;
    HASH_FIND(hh, graph_execs, &exec, sizeof exec, old);
    if (old) {
        HASH_DEL(graph_execs, old);
        free(old);
    }
    HASH_ADD(hh, graph_execs, exec, sizeof x->exec, x);
    pthread_mutex_unlock(&graph_lock);
}

static CUgraph exec_graph(CUgraphExec exec, bool forget)
{
    CUgraph g = NULL;
    pthread_mutex_lock(&graph_lock);
    graph_exec *x = NULL;
    HASH_FIND(hh, graph_execs, &exec, sizeof exec, x);
    if (x) {
        g = x->graph;
        if (forget) {
            HASH_DEL(graph_execs, x);
            free(x);
        }
    }
    pthread_mutex_unlock(&graph_lock);
    return g;
}

/* Whether any graph allocation was ever made: a launch costs one load otherwise (a program may
 * replay graphs without memory nodes thousands of times a second). */
static bool any_graph_allocs(void)
{
    return atomic_load_explicit(&graph_allocs_made, memory_order_relaxed);
}

/* ------------------------------------------------------------------ stream capture */

typedef CUresult (*capture_info_v3_fn)(CUstream, CUstreamCaptureStatus *, cuuint64_t *, CUgraph *,
                                       const CUgraphNode **, const CUgraphEdgeData **, size_t *);
typedef CUresult (*capture_info_v2_fn)(CUstream, CUstreamCaptureStatus *, cuuint64_t *, CUgraph *,
                                       const CUgraphNode **, size_t *);

bool shim_graph_capturing(CUstream stream, bool per_thread, CUgraph *graph)
{
    static _Atomic(void *) v3[2], v2[2];
    static _Atomic bool looked[2];
    int i = per_thread;
    if (!atomic_load(&looked[i])) {
        atomic_store(&v3[i], gm_driver_sym(per_thread ? "cuStreamGetCaptureInfo_v3_ptsz" : "cuStreamGetCaptureInfo_v3"));
        atomic_store(&v2[i], gm_driver_sym(per_thread ? "cuStreamGetCaptureInfo_v2_ptsz" : "cuStreamGetCaptureInfo_v2"));
        atomic_store(&looked[i], true);
    }
    CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
    CUgraph g = NULL;
    CUresult rc = CUDA_ERROR_NOT_FOUND;
    void *f3 = atomic_load(&v3[i]), *f2 = atomic_load(&v2[i]);
    if (f3) rc = ((capture_info_v3_fn)f3)(stream, &status, NULL, &g, NULL, NULL, NULL);
    else if (f2) rc = ((capture_info_v2_fn)f2)(stream, &status, NULL, &g, NULL, NULL);
    if (rc != CUDA_SUCCESS || status != CU_STREAM_CAPTURE_STATUS_ACTIVE || !g) return false;
    *graph = g;
    return true;
}

/* ------------------------------------------------------------------ the entry points */

/* The heap an allocation node on `loc` counts in: the current context's, when the node allocates
 * device memory of that context's device (else NULL: passed through, uncounted). */
static gm_heap *node_heap(const CUmemLocation *loc, size_t bytesize)
{
    if (!shim_active() || !bytesize || loc->type != CU_MEM_LOCATION_TYPE_DEVICE) return NULL;
    gm_heap *heap = shim_current_heap();
    return heap && heap->device == loc->id ? heap : NULL;
}

typedef struct {
    CUgraphNode *node;
    CUgraph graph;
    const CUgraphNode *deps;
    const CUgraphEdgeData *edges;
    size_t ndeps;
    CUDA_MEM_ALLOC_NODE_PARAMS *alloc;   /* cuGraphAddMemAllocNode */
    CUgraphNodeParams *params;           /* cuGraphAddNode(_v2) */
    int abi;                             /* 0: AddMemAllocNode, 1: AddNode, 2: AddNode_v2 */
} node_args;

static CUresult call_real_node(void *arg)
{
    node_args *a = arg;
    switch (a->abi) {
    case 0: return shim_real_cuGraphAddMemAllocNode(a->node, a->graph, a->deps, a->ndeps, a->alloc);
    case 1: return shim_real_cuGraphAddNode(a->node, a->graph, a->deps, a->ndeps, a->params);
    default: return shim_real_cuGraphAddNode_v2(a->node, a->graph, a->deps, a->edges, a->ndeps, a->params);
    }
}

CUresult cuGraphAddMemAllocNode(CUgraphNode *node, CUgraph graph, const CUgraphNode *deps, size_t ndeps,
                                CUDA_MEM_ALLOC_NODE_PARAMS *params)
{
    SHIM_REQUIRE_REAL(cuGraphAddMemAllocNode);
    gm_heap *heap = params && node && graph ? node_heap(&params->poolProps.location, params->bytesize) : NULL;
    if (!heap) return shim_real_cuGraphAddMemAllocNode(node, graph, deps, ndeps, params);
    SHIM_TRACE("cuGraphAddMemAllocNode graph=%p size=%zu", (void *)graph, params->bytesize);
    node_args a = {node, graph, deps, NULL, ndeps, params, NULL, 0};
    return shim_graph_alloc(heap, graph, &params->dptr, params->bytesize, 0, GM_CALLSITE(), call_real_node, &a);
}

CUresult cuGraphAddMemFreeNode(CUgraphNode *node, CUgraph graph, const CUgraphNode *deps, size_t ndeps,
                               CUdeviceptr dptr)
{
    SHIM_REQUIRE_REAL(cuGraphAddMemFreeNode);
    CUresult res = shim_real_cuGraphAddMemFreeNode(node, graph, deps, ndeps, dptr);
    if (res == CUDA_SUCCESS && shim_active()) {
        SHIM_TRACE("cuGraphAddMemFreeNode graph=%p ptr=%#llx", (void *)graph, (unsigned long long)dptr);
        shim_graph_freed(shim_current_heap(), dptr, graph);
    }
    return res;
}

/* cuGraphAddNode(_v2): only allocation and free nodes concern gpumem; every other type passes. */
static CUresult add_node(node_args *a, const gm_callsite *site)
{
    CUgraphNodeParams *p = a->params;
    if (!p || !a->node || !a->graph || !shim_active() ||
        (p->type != CU_GRAPH_NODE_TYPE_MEM_ALLOC && p->type != CU_GRAPH_NODE_TYPE_MEM_FREE))
        return call_real_node(a);
    if (p->type == CU_GRAPH_NODE_TYPE_MEM_FREE) {
        CUresult res = call_real_node(a);
        if (res == CUDA_SUCCESS) {
            SHIM_TRACE("%s MEM_FREE graph=%p ptr=%#llx", a->abi == 2 ? "cuGraphAddNode_v2" : "cuGraphAddNode",
                       (void *)a->graph, (unsigned long long)p->free.dptr);
            shim_graph_freed(shim_current_heap(), p->free.dptr, a->graph);
        }
        return res;
    }
    gm_heap *heap = node_heap(&p->alloc.poolProps.location, p->alloc.bytesize);
    if (!heap) return call_real_node(a);
    SHIM_TRACE("%s MEM_ALLOC graph=%p size=%zu", a->abi == 2 ? "cuGraphAddNode_v2" : "cuGraphAddNode",
               (void *)a->graph, p->alloc.bytesize);
    return shim_graph_alloc(heap, a->graph, &p->alloc.dptr, p->alloc.bytesize, 0, site, call_real_node, a);
}

CUresult cuGraphAddNode(CUgraphNode *node, CUgraph graph, const CUgraphNode *deps, size_t ndeps,
                        CUgraphNodeParams *params)
{
    SHIM_REQUIRE_REAL(cuGraphAddNode);
    node_args a = {node, graph, deps, NULL, ndeps, NULL, params, 1};
    return add_node(&a, GM_CALLSITE());
}

CUresult cuGraphAddNode_v2(CUgraphNode *node, CUgraph graph, const CUgraphNode *deps,
                           const CUgraphEdgeData *edges, size_t ndeps, CUgraphNodeParams *params)
{
    SHIM_REQUIRE_REAL(cuGraphAddNode_v2);
    node_args a = {node, graph, deps, edges, ndeps, NULL, params, 2};
    return add_node(&a, GM_CALLSITE());
}

CUresult cuGraphDestroy(CUgraph graph)
{
    SHIM_REQUIRE_REAL(cuGraphDestroy);
    CUresult res = shim_real_cuGraphDestroy(graph);
    if (res == CUDA_SUCCESS && graph && atomic_load(&shim_ready)) {
        SHIM_TRACE("cuGraphDestroy graph=%p", (void *)graph);
        graph_destroyed(shim_current_heap(), graph);
    }
    return res;
}

/* ------------------------------------------------------------------ executable graphs */

CUresult cuGraphInstantiateWithFlags(CUgraphExec *exec, CUgraph graph, unsigned long long flags)
{
    SHIM_REQUIRE_REAL(cuGraphInstantiateWithFlags);
    SHIM_TRACE("cuGraphInstantiateWithFlags graph=%p", (void *)graph);
    CUresult res = shim_real_cuGraphInstantiateWithFlags(exec, graph, flags);
    if (res == CUDA_SUCCESS && exec && atomic_load(&shim_ready)) exec_made(*exec, graph);
    return res;
}

CUresult cuGraphInstantiateWithParams(CUgraphExec *exec, CUgraph graph, CUDA_GRAPH_INSTANTIATE_PARAMS *params)
{
    SHIM_REQUIRE_REAL(cuGraphInstantiateWithParams);
    SHIM_TRACE("cuGraphInstantiateWithParams graph=%p", (void *)graph);
    CUresult res = shim_real_cuGraphInstantiateWithParams(exec, graph, params);
    if (res == CUDA_SUCCESS && exec && atomic_load(&shim_ready)) exec_made(*exec, graph);
    return res;
}

CUresult cuGraphInstantiateWithParams_ptsz(CUgraphExec *exec, CUgraph graph, CUDA_GRAPH_INSTANTIATE_PARAMS *params)
{
    SHIM_REQUIRE_REAL(cuGraphInstantiateWithParams_ptsz);
    SHIM_TRACE("cuGraphInstantiateWithParams_ptsz graph=%p", (void *)graph);
    CUresult res = shim_real_cuGraphInstantiateWithParams_ptsz(exec, graph, params);
    if (res == CUDA_SUCCESS && exec && atomic_load(&shim_ready)) exec_made(*exec, graph);
    return res;
}

CUresult cuGraphExecDestroy(CUgraphExec exec)
{
    SHIM_REQUIRE_REAL(cuGraphExecDestroy);
    CUresult res = shim_real_cuGraphExecDestroy(exec);
    if (res == CUDA_SUCCESS && atomic_load(&shim_ready)) exec_graph(exec, true);
    return res;
}

static CUresult launch(CUgraphExec exec, CUstream stream, bool per_thread, const gm_callsite *site)
{
    SHIM_TRACE("cuGraphLaunch%s exec=%p", per_thread ? "_ptsz" : "", (void *)exec);
    CUresult res = per_thread ? shim_real_cuGraphLaunch_ptsz(exec, stream) : shim_real_cuGraphLaunch(exec, stream);
    if (res != CUDA_SUCCESS || !atomic_load(&shim_ready) || !any_graph_allocs()) return res;
    CUgraph graph = exec_graph(exec, false);
    if (graph) graph_launched(shim_current_heap(), graph, shim_stream(stream, per_thread), site);
    return res;
}

CUresult cuGraphLaunch(CUgraphExec exec, CUstream stream)
{
    SHIM_REQUIRE_REAL(cuGraphLaunch);
    return launch(exec, stream, false, GM_CALLSITE());
}

CUresult cuGraphLaunch_ptsz(CUgraphExec exec, CUstream stream)
{
    SHIM_REQUIRE_REAL(cuGraphLaunch_ptsz);
    return launch(exec, stream, true, GM_CALLSITE());
}
