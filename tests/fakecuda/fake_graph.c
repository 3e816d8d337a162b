/* fake_graph.c: graphs, as far as graph memory nodes need them. cuGraphCreate/Destroy, allocation
 * and free nodes (cuGraphAddMemAllocNode, cuGraphAddMemFreeNode, cuGraphAddNode and _v2 for those
 * two types; any other node type is CUDA_ERROR_NOT_SUPPORTED here), their parameters,
 * cuGraphInstantiateWithFlags and WithParams(_ptsz), cuGraphLaunch(_ptsz), cuGraphExecDestroy, and the graphs that
 * stream capture builds (fake_stream.c asks for one per capture). A captured stream's work still
 * runs at once (fake_internal.h): such a graph has no nodes and launches as nothing.
 *
 * A graph allocation follows the driver's documented life cycle (cuda.h, cuGraphAddMemAllocNode):
 *  - its address is assigned when the allocation node is created and stays fixed for the node's
 *    life; the fake backs it with host memory then (an A_GRAPH record of the registry), so it counts
 *    against the device's capacity from the node's creation (the real driver maps physical memory
 *    at launch; an allocation that does not fit is refused here with CUDA_ERROR_OUT_OF_MEMORY);
 *  - a launch that reaches the node makes the allocation live, unless a free node of the same graph
 *    frees it again in that launch; a launch while the previous launch's allocation is still live
 *    fails with CUDA_ERROR_INVALID_VALUE unless instantiated with AUTO_FREE_ON_LAUNCH;
 *  - a live allocation is freed by cuMemFree/cuMemFreeAsync or by the launch of another graph
 *    with a free node for it; one freed by a free node of its own graph cannot be freed outside;
 *    an address has at most one free node in all graphs;
 *  - destroying the graph does not free a live allocation (it is released when freed); the memory
 *    of one that is not live goes with its node.
 * Graph, node and exec handles are pointers to records that are never freed (only marked dead),
 * so a stale handle is detected, not followed. */
#include "fake_internal.h"

#include <stdlib.h>
#include <string.h>

/* cuda.h names the CUDA 12.3 ABI cuGraphAddNode (a macro for cuGraphAddNode_v2); the 12.2 one,
 * without edge data, is exported too, under its own name. */
#undef cuGraphAddNode
CUresult CUDAAPI cuGraphAddNode(CUgraphNode *ph, CUgraph h, const CUgraphNode *deps, size_t ndeps,
                                CUgraphNodeParams *p);

typedef struct fk_graph fk_graph;

typedef struct fk_gnode {
    struct fk_gnode *next;      /* in its graph, newest first */
    fk_graph *graph;
    CUgraphNodeType type;       /* MEM_ALLOC or MEM_FREE */
    CUDA_MEM_ALLOC_NODE_PARAMS alloc; /* MEM_ALLOC: as given, dptr filled in */
    CUdeviceptr dptr;           /* the allocation's address (alloc) or the one freed (free) */
    uint64_t alloc_id;          /* MEM_ALLOC: the registry record behind it */
} fk_gnode;

struct fk_graph {
    fk_graph *next;             /* every graph ever made */
    bool alive;
    bool capture;               /* made by a stream capture */
    fk_gnode *nodes;
    int execs;                  /* live instantiations */
};

typedef struct fk_gexec {
    struct fk_gexec *next;
    fk_graph *graph;
    bool alive;
    unsigned flags;
} fk_gexec;

static fk_graph *graphs;
static fk_gexec *execs;

/* ================================================================ lookups (g_mu held) */

static fk_graph *graph_of(CUgraph h)
{
    for (fk_graph *g = graphs; g; g = g->next)
        if ((void *)g == (void *)h)
            return g->alive ? g : NULL;
    return NULL;
}

static fk_gnode *node_of(CUgraphNode h)
{
    for (fk_graph *g = graphs; g; g = g->next)
        for (fk_gnode *n = g->nodes; n; n = n->next)
            if ((void *)n == (void *)h)
                return g->alive ? n : NULL;
    return NULL;
}

static fk_gexec *exec_of(CUgraphExec h)
{
    for (fk_gexec *e = execs; e; e = e->next)
        if ((void *)e == (void *)h)
            return e->alive ? e : NULL;
    return NULL;
}

/* The registry record of an allocation node, if it still exists (its context may have gone). */
static fk_alloc *node_alloc(const fk_gnode *n)
{
    fk_alloc *a = mem_find_base(n->dptr);
    return a && a->id == n->alloc_id ? a : NULL;
}

static bool graph_has_mem_nodes(const fk_graph *g)
{
    return g->nodes != NULL; /* the only nodes the fake has */
}

/* ================================================================ graphs */

static fk_graph *graph_new(bool capture)
{
    fk_graph *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->alive = true;
    g->capture = capture;
    g->next = graphs;
    graphs = g;
    return g;
}

CUgraph graph_new_for_capture(void)
{
    return (CUgraph)graph_new(true);
}

bool graph_valid(CUgraph h)
{
    return graph_of(h) != NULL;
}

FK_API CUresult CUDAAPI cuGraphCreate(CUgraph *ph, unsigned int flags)
{
    CUresult r = state_enter();
    if (r)
        return r;
    if (!ph || flags)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_graph *g = graph_new(false);
    if (!g)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    *ph = (CUgraph)g;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuGraphDestroy(CUgraph h)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_graph *g = graph_of(h);
    if (!g)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    g->alive = false;
    for (fk_gnode *n = g->nodes; n; n = n->next) {
        fk_alloc *a = n->type == CU_GRAPH_NODE_TYPE_MEM_ALLOC ? node_alloc(n) : NULL;
        if (!a)
            continue;
        a->graph_owner = NULL;
        if (!a->graph_live)
            mem_release(a); /* not live: its address goes with its node */
    }
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ memory nodes */

static CUresult graph_node_deps(fk_graph *g, const CUgraphNode *deps, size_t ndeps)
{
    if (ndeps && !deps)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < ndeps; i++) {
        fk_gnode *d = node_of(deps[i]);
        if (!d || d->graph != g)
            return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

static fk_gnode *graph_add(fk_graph *g, CUgraphNodeType type)
{
    fk_gnode *n = calloc(1, sizeof *n);
    if (!n)
        return NULL;
    n->graph = g;
    n->type = type;
    n->next = g->nodes;
    g->nodes = n;
    return n;
}

/* Both allocation-node entry points; `p` is read and its dptr written. */
static CUresult graph_alloc_node(CUgraphNode *ph, CUgraph h, const CUgraphNode *deps, size_t ndeps,
                                 CUDA_MEM_ALLOC_NODE_PARAMS *p)
{
    CUresult r = state_enter();
    if (r)
        return r;
    g_cnt.alloc_calls++;
    fk_graph *g = graph_of(h);
    if (!ph || !g || !p || !p->bytesize || p->poolProps.allocType != CU_MEM_ALLOCATION_TYPE_PINNED ||
        p->poolProps.handleTypes != CU_MEM_HANDLE_TYPE_NONE ||
        p->poolProps.location.type != CU_MEM_LOCATION_TYPE_DEVICE || (p->accessDescCount && !p->accessDescs))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (!dev_ok(p->poolProps.location.id))
        return state_leave(CUDA_ERROR_INVALID_DEVICE);
    if ((r = graph_node_deps(g, deps, ndeps)))
        return state_leave(r);
    fk_ctx *c;
    if ((r = ctx_current(&c)))
        return state_leave(r);
    fk_alloc *a;
    if ((r = mem_alloc_graph(p->poolProps.location.id, c, p->bytesize, &a)))
        return state_leave(r);
    fk_gnode *n = graph_add(g, CU_GRAPH_NODE_TYPE_MEM_ALLOC);
    if (!n) {
        mem_release(a);
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    a->graph_owner = g;
    p->dptr = a->base;
    n->alloc = *p;
    n->dptr = a->base;
    n->alloc_id = a->id;
    *ph = (CUgraphNode)n;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuGraphAddMemAllocNode(CUgraphNode *ph, CUgraph h, const CUgraphNode *deps,
                                               size_t ndeps, CUDA_MEM_ALLOC_NODE_PARAMS *p)
{
    return graph_alloc_node(ph, h, deps, ndeps, p);
}

/* cuda.h documents CUDA_ERROR_INVALID_VALUE for a second free of an allocation in the same graph,
 * for an address no allocation node returned and for an invalid address; and an allocation freed
 * in one graph cannot get a free node in another. */
static CUresult graph_free_node(CUgraphNode *ph, CUgraph h, const CUgraphNode *deps, size_t ndeps,
                                CUdeviceptr dptr)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_graph *g = graph_of(h);
    if (!ph || !g)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if ((r = graph_node_deps(g, deps, ndeps)))
        return state_leave(r);
    fk_alloc *a = mem_find_base(dptr);
    if (!a || a->kind != A_GRAPH || a->graph_free_node)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_gnode *n = graph_add(g, CU_GRAPH_NODE_TYPE_MEM_FREE);
    if (!n)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    n->dptr = dptr;
    n->alloc_id = a->id;
    a->graph_free_node = n;
    a->graph_freed_in_owner = a->graph_owner == g;
    *ph = (CUgraphNode)n;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuGraphAddMemFreeNode(CUgraphNode *ph, CUgraph h, const CUgraphNode *deps,
                                              size_t ndeps, CUdeviceptr dptr)
{
    return graph_free_node(ph, h, deps, ndeps, dptr);
}

/* The generic entry points: the memory node types; others are beyond this fake. */
static CUresult graph_add_node(CUgraphNode *ph, CUgraph h, const CUgraphNode *deps, size_t ndeps,
                               CUgraphNodeParams *p)
{
    if (!p)
        return CUDA_ERROR_INVALID_VALUE;
    if (p->type == CU_GRAPH_NODE_TYPE_MEM_ALLOC) {
        /* The v2 parameters begin as the v1 ones do; the fake reads the v1 fields. */
        CUDA_MEM_ALLOC_NODE_PARAMS v1 = {.poolProps = p->alloc.poolProps, .accessDescs = p->alloc.accessDescs,
                                         .accessDescCount = p->alloc.accessDescCount,
                                         .bytesize = p->alloc.bytesize};
        CUresult r = graph_alloc_node(ph, h, deps, ndeps, &v1);
        if (r == CUDA_SUCCESS)
            p->alloc.dptr = v1.dptr;
        return r;
    }
    if (p->type == CU_GRAPH_NODE_TYPE_MEM_FREE)
        return graph_free_node(ph, h, deps, ndeps, p->free.dptr);
    return CUDA_ERROR_NOT_SUPPORTED;
}

FK_API CUresult CUDAAPI cuGraphAddNode(CUgraphNode *ph, CUgraph h, const CUgraphNode *deps, size_t ndeps,
                                       CUgraphNodeParams *p)
{
    return graph_add_node(ph, h, deps, ndeps, p);
}

FK_API CUresult CUDAAPI cuGraphAddNode_v2(CUgraphNode *ph, CUgraph h, const CUgraphNode *deps,
                                          const CUgraphEdgeData *edges, size_t ndeps, CUgraphNodeParams *p)
{
    (void)edges;
    return graph_add_node(ph, h, deps, ndeps, p);
}

FK_API CUresult CUDAAPI cuGraphMemAllocNodeGetParams(CUgraphNode h, CUDA_MEM_ALLOC_NODE_PARAMS *out)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_gnode *n = node_of(h);
    if (!n || !out || n->type != CU_GRAPH_NODE_TYPE_MEM_ALLOC)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    *out = n->alloc;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuGraphMemFreeNodeGetParams(CUgraphNode h, CUdeviceptr *out)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_gnode *n = node_of(h);
    if (!n || !out || n->type != CU_GRAPH_NODE_TYPE_MEM_FREE)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    *out = n->dptr;
    return state_leave(CUDA_SUCCESS);
}

/* ================================================================ outside frees (fake_mem.c) */

/* cuMemFree/cuMemFreeAsync of a graph allocation, with g_mu held: refused when it is not live or
 * its own graph frees it; else it is no longer live, and its memory goes if its graph went. */
CUresult graph_mem_free(fk_alloc *a)
{
    if (!a->graph_live || a->graph_freed_in_owner)
        return CUDA_ERROR_INVALID_VALUE;
    a->graph_live = false;
    if (!a->graph_owner)
        mem_release(a);
    return CUDA_SUCCESS;
}

/* ================================================================ executable graphs */

static CUresult graph_instantiate(CUgraphExec *ph, CUgraph h, unsigned long long flags)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_graph *g = graph_of(h);
    if (!ph || !g || (flags & ~(unsigned long long)0xF))
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    if (graph_has_mem_nodes(g) && g->execs) /* one instantiation at a time (cuda.h) */
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_gexec *e = calloc(1, sizeof *e);
    if (!e)
        return state_leave(CUDA_ERROR_OUT_OF_MEMORY);
    *e = (fk_gexec){execs, g, true, (unsigned)flags};
    execs = e;
    g->execs++;
    *ph = (CUgraphExec)e;
    return state_leave(CUDA_SUCCESS);
}

FK_API CUresult CUDAAPI cuGraphInstantiateWithFlags(CUgraphExec *ph, CUgraph h, unsigned long long flags)
{
    return graph_instantiate(ph, h, flags);
}

/* The upload stream is not used: there is nothing to upload. */
static CUresult graph_instantiate_params(CUgraphExec *ph, CUgraph h, CUDA_GRAPH_INSTANTIATE_PARAMS *p)
{
    if (!p)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = graph_instantiate(ph, h, p->flags);
    p->hErrNode_out = NULL;
    p->result_out = r == CUDA_SUCCESS ? CUDA_GRAPH_INSTANTIATE_SUCCESS : CUDA_GRAPH_INSTANTIATE_ERROR;
    return r;
}

FK_API CUresult CUDAAPI cuGraphInstantiateWithParams(CUgraphExec *ph, CUgraph h, CUDA_GRAPH_INSTANTIATE_PARAMS *p)
{
    return graph_instantiate_params(ph, h, p);
}

FK_API CUresult CUDAAPI cuGraphInstantiateWithParams_ptsz(CUgraphExec *ph, CUgraph h,
                                                          CUDA_GRAPH_INSTANTIATE_PARAMS *p)
{
    return graph_instantiate_params(ph, h, p);
}

FK_API CUresult CUDAAPI cuGraphExecDestroy(CUgraphExec h)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_gexec *e = exec_of(h);
    if (!e)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    e->alive = false;
    e->graph->execs--;
    return state_leave(CUDA_SUCCESS);
}

/* The launch takes effect at once (there is no work to queue): allocations become live, free
 * nodes of other graphs' allocations free them. */
static CUresult graph_launch(CUgraphExec h, CUstream sh, bool ptds)
{
    CUresult r = state_enter();
    if (r)
        return r;
    fk_gexec *e = exec_of(h);
    if (!e)
        return state_leave(CUDA_ERROR_INVALID_VALUE);
    fk_stream *s;
    if ((r = stream_resolve(sh, ptds, &s)))
        return state_leave(r);
    bool auto_free = e->flags & CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
    for (fk_gnode *n = e->graph->nodes; n; n = n->next) {
        fk_alloc *a = n->type == CU_GRAPH_NODE_TYPE_MEM_ALLOC ? node_alloc(n) : NULL;
        if (a && a->graph_live && !auto_free) /* the previous launch's allocation is unfreed */
            return state_leave(CUDA_ERROR_INVALID_VALUE);
    }
    for (fk_gnode *n = e->graph->nodes; n; n = n->next) {
        fk_alloc *a = node_alloc(n);
        if (!a)
            continue;
        if (n->type == CU_GRAPH_NODE_TYPE_MEM_ALLOC)
            a->graph_live = !a->graph_freed_in_owner;
        else if (a->graph_owner != e->graph && a->graph_live)
            graph_mem_free_by_node(a);
    }
    return state_leave(CUDA_SUCCESS);
}

/* A free node of another graph reached a live allocation. */
void graph_mem_free_by_node(fk_alloc *a)
{
    a->graph_live = false;
    if (!a->graph_owner)
        mem_release(a);
}

FK_API CUresult CUDAAPI cuGraphLaunch(CUgraphExec h, CUstream s)
{
    return graph_launch(h, s, false);
}

FK_API CUresult CUDAAPI cuGraphLaunch_ptsz(CUgraphExec h, CUstream s)
{
    return graph_launch(h, s, true);
}

/* ================================================================ fork */

void graph_forget_in_child(void)
{
    graphs = NULL; /* the parent's records stay allocated in the child: never freed anyway */
    execs = NULL;
}

/* ================================================================ cuGetProcAddress rows */

#define GRAPH_PROCS(X)                                                              \
    X("cuGraphCreate", 10000, 0, cuGraphCreate)                                     \
    X("cuGraphDestroy", 10000, 0, cuGraphDestroy)                                   \
    X("cuGraphAddMemAllocNode", 11040, 0, cuGraphAddMemAllocNode)                   \
    X("cuGraphAddMemFreeNode", 11040, 0, cuGraphAddMemFreeNode)                     \
    X("cuGraphMemAllocNodeGetParams", 11040, 0, cuGraphMemAllocNodeGetParams)       \
    X("cuGraphMemFreeNodeGetParams", 11040, 0, cuGraphMemFreeNodeGetParams)         \
    X("cuGraphAddNode", 12020, 0, cuGraphAddNode)                                   \
    X("cuGraphAddNode", 12030, 0, cuGraphAddNode_v2)                                \
    X("cuGraphInstantiateWithFlags", 11040, 0, cuGraphInstantiateWithFlags)         \
    X("cuGraphInstantiateWithParams", 12000, 0, cuGraphInstantiateWithParams)       \
    X("cuGraphInstantiateWithParams", 12000, 1, cuGraphInstantiateWithParams_ptsz)  \
    X("cuGraphExecDestroy", 10000, 0, cuGraphExecDestroy)                           \
    X("cuGraphLaunch", 10000, 0, cuGraphLaunch)                                     \
    X("cuGraphLaunch", 10000, 1, cuGraphLaunch_ptsz)
FK_PROC_TABLE(graph_procs, GRAPH_PROCS);
