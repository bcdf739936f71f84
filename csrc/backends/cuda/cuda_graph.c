/*
 * cuda_graph.c — kernel launches replayed as CUDA graphs.
 *
 * A decode step is a few hundred small kernels; launched one by one, the host spends
 * ~3 us on each and the GPU waits between them. Here the launches of an exec are held
 * back in a segment of up to MF_GRAPH_SEG and submitted when it is full or when the
 * stream is used for anything else (mf_cuda_stream: a copy, a memset, an event, a host
 * wait). Each segment is identified by its place since the last host wait for the
 * whole stream (download, sync) and its kernels: met the first time it is launched
 * one by one, met again it becomes an executable graph (a chain of kernel nodes), and
 * from then on it is replayed with one graph launch, after setting the parameters of
 * the nodes whose grid or arguments differ from the last replay (the positions of a
 * decode step; weights and buffers stay). Every node is compared, so a replay runs
 * exactly the kernels and arguments recorded: a mismatch costs time, never results.
 *
 * Segments that never repeat (prefill, streamed layers whose experts change) are
 * launched one by one after being recorded. The remembered segments are kept least
 * recently used first out. A graph the driver refuses to make turns graphs off for
 * the exec (launches go one by one); a refused launch is the exec's error as any.
 */
#include "backends/cuda/cuda_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MF_GRAPH_SEG 32     // launches per segment
#define MF_GRAPH_MIN 4      // shorter segments are launched one by one
#define MF_GRAPH_CACHE 256  // segments remembered
#define MF_GRAPH_BUFS 15    // the most buffers a kernel takes (mf_cuda_launch)

// Room for any kernel's parameter struct (the manifest's).
union mf_any_params {
#define K(name, params, n_buf, grid) struct params name;
#include "../../../shaders/kernels.def"
#undef K
};

// One launch: zero-filled before it is written, so two compare with memcmp.
struct launch {
    int kid, n_buf;
    unsigned g[3], b[3];
    size_t pbytes;
    CUdeviceptr bufs[MF_GRAPH_BUFS];
    union mf_any_params p;
};

struct seg {
    unsigned ordinal;          // segments since the last host wait
    int n;
    uint64_t hash;             // of the kernels
    int seen;                  // times met (counted until it has a graph)
    unsigned long long used;   // tick of the last use
    CUgraph graph;
    CUgraphExec exec;
    CUgraphNode node[MF_GRAPH_SEG];
    struct launch last[MF_GRAPH_SEG];   // the launches of the last use
};

struct mf_cuda_graphs {
    struct launch pend[MF_GRAPH_SEG];
    int n_pend;
    unsigned ordinal;
    unsigned long long tick;
    int n_seg;
    struct seg *seg[MF_GRAPH_CACHE];
    int off;                   // a graph was refused: launch one by one
    int prog;                  // programmatic edges between nodes (the exec's pdl)
    int verbose;               // MOEFLUX_GPU_GRAPHS=verbose: counts at exec free
    long long n_graph, n_direct, n_built, n_updated;
};

int mf_cuda_graphs_init(struct mf_exec *ex) {
    const char *e = getenv("MOEFLUX_GPU_GRAPHS");
    if (ex->prof || (e && strcmp(e, "0") == 0))
        return MF_OK;
    ex->gr = calloc(1, sizeof *ex->gr);
    if (!ex->gr) {
        mf_cuda_fail(ex, MF_ERR_NOMEM, "cuda backend: graphs: out of memory");
        return ex->status;
    }
    ex->gr->verbose = e && strcmp(e, "verbose") == 0;
    ex->gr->prog = ex->pdl && ex->cb->cu.GraphAddDependencies;
    return MF_OK;
}

static void drop_graph(struct mf_exec *ex, struct seg *s) {
    // an executable graph still running is freed by the driver when it completes
    if (s->exec)
        ex->cb->cu.GraphExecDestroy(s->exec);
    if (s->graph)
        ex->cb->cu.GraphDestroy(s->graph);
    s->exec = NULL;
    s->graph = NULL;
}

void mf_cuda_graphs_free(struct mf_exec *ex) {
    struct mf_cuda_graphs *gr = ex->gr;
    if (!gr)
        return;
    if (gr->verbose)
        fprintf(stderr, "moeflux GPU graphs: %lld graph launches, %lld kernels launched "
                "one by one, %lld graphs made, %lld nodes updated; programmatic "
                "launch %s, edges %s\n", gr->n_graph, gr->n_direct, gr->n_built,
                gr->n_updated, ex->pdl ? "on" : "off", gr->prog ? "on" : "off");
    for (int i = 0; i < gr->n_seg; i++) {
        drop_graph(ex, gr->seg[i]);
        free(gr->seg[i]);
    }
    free(gr);
    ex->gr = NULL;
}

int mf_cuda_graph_record(struct mf_exec *ex, int kid, const unsigned g[3],
                         const unsigned b[3], const void *params, size_t params_bytes,
                         const CUdeviceptr *bufs, int n_buf) {
    struct mf_cuda_graphs *gr = ex->gr;
    if (!gr || gr->off || params_bytes > sizeof(union mf_any_params) ||
        n_buf > MF_GRAPH_BUFS)
        return 0;
    if (gr->n_pend == MF_GRAPH_SEG)
        mf_cuda_graph_flush(ex);
    struct launch *l = &gr->pend[gr->n_pend++];
    memset(l, 0, sizeof *l);
    l->kid = kid;
    l->n_buf = n_buf;
    memcpy(l->g, g, sizeof l->g);
    memcpy(l->b, b, sizeof l->b);
    l->pbytes = params_bytes;
    memcpy(l->bufs, bufs, (size_t)n_buf * sizeof *bufs);
    memcpy(&l->p, params, params_bytes);
    return 1;
}

void mf_cuda_graph_step(struct mf_exec *ex) {
    if (ex->gr)
        ex->gr->ordinal = 0;
}

/* ==== Segments ==== */

static uint64_t kernels_hash(const struct launch *l, int n) {
    uint64_t h = 1469598103934665603ull;   // FNV-1a
    for (int i = 0; i < n; i++) {
        h = (h ^ (uint64_t)l[i].kid) * 1099511628211ull;
        h = (h ^ (uint64_t)l[i].n_buf) * 1099511628211ull;
    }
    return h;
}

// The remembered segment at this place with these kernels, else a slot for it (a new
// one, or the least recently used one emptied); NULL when out of memory.
static struct seg *seg_for(struct mf_exec *ex, unsigned ordinal, uint64_t hash, int n) {
    struct mf_cuda_graphs *gr = ex->gr;
    int lru = -1;
    for (int i = 0; i < gr->n_seg; i++) {
        struct seg *s = gr->seg[i];
        if (s->ordinal == ordinal && s->hash == hash && s->n == n)
            return s;
        if (lru < 0 || s->used < gr->seg[lru]->used)
            lru = i;
    }
    struct seg *s;
    if (gr->n_seg < MF_GRAPH_CACHE) {
        s = calloc(1, sizeof *s);
        if (!s)
            return NULL;
        gr->seg[gr->n_seg++] = s;
    } else {
        s = gr->seg[lru];
        drop_graph(ex, s);
        s->seen = 0;
    }
    s->ordinal = ordinal;
    s->hash = hash;
    s->n = n;
    return s;
}

// The kernel node of launch l; args (16 entries) must outlive the driver call only.
static struct mf_cu_kernel_node node_of(struct mf_exec *ex, struct launch *l,
                                        void **args) {
    for (int i = 0; i < l->n_buf; i++)
        args[i] = &l->bufs[i];
    args[l->n_buf] = &l->p;
    return (struct mf_cu_kernel_node){
        .func = ex->cb->fn[l->kid],
        .grid = {l->g[0], l->g[1], l->g[2]},
        .block = {l->b[0], l->b[1], l->b[2]},
        .params = args,
    };
}

// Node i after node i - 1 by a programmatic edge: node i may start when every
// threadgroup of i - 1 has let it (mf_dep_wait), as a launch with ex->pdl does.
static int link_programmatic(const struct mf_cu_api *cu, struct seg *s, int i) {
    const struct mf_cu_edge e = {.from_port = MF_CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC,
                                 .type = MF_CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC};
    return cu->GraphAddDependencies(s->graph, &s->node[i - 1], &s->node[i], &e, 1) ==
           MF_CUDA_SUCCESS;
}

// A chain of the n launches as s's executable graph, with programmatic edges (prog) or
// plain ones; 0 if the driver refuses.
static int build(struct mf_exec *ex, struct seg *s, struct launch *l, int n, int prog) {
    const struct mf_cu_api *cu = &ex->cb->cu;
    if (cu->GraphCreate(&s->graph, 0) != MF_CUDA_SUCCESS) {
        s->graph = NULL;
        return 0;
    }
    for (int i = 0; i < n; i++) {
        void *args[MF_GRAPH_BUFS + 1];
        struct mf_cu_kernel_node kn = node_of(ex, &l[i], args);
        const int plain = i && !prog;
        if (cu->GraphAddKernelNode(&s->node[i], s->graph, plain ? &s->node[i - 1] : NULL,
                                   plain ? 1 : 0, &kn) != MF_CUDA_SUCCESS ||
            (i && prog && !link_programmatic(cu, s, i))) {
            drop_graph(ex, s);
            return 0;
        }
    }
    if (cu->GraphInstantiate(&s->exec, s->graph, 0) != MF_CUDA_SUCCESS) {
        s->exec = NULL;
        drop_graph(ex, s);
        return 0;
    }
    return 1;
}

// build with the exec's kind of edges; where the driver refuses programmatic edges,
// plain ones from then on.
static int build_any(struct mf_exec *ex, struct seg *s, struct launch *l, int n) {
    if (ex->gr->prog && build(ex, s, l, n, 1))
        return 1;
    ex->gr->prog = 0;
    return build(ex, s, l, n, 0);
}

// The nodes whose launch differs from the last use take the new one; 0 if refused.
static int update(struct mf_exec *ex, struct seg *s, struct launch *l, int n,
                  long long *n_updated) {
    for (int i = 0; i < n; i++) {
        if (memcmp(&s->last[i], &l[i], sizeof l[i]) == 0)
            continue;
        void *args[MF_GRAPH_BUFS + 1];
        struct mf_cu_kernel_node kn = node_of(ex, &l[i], args);
        if (ex->cb->cu.GraphExecKernelNodeSetParams(s->exec, s->node[i], &kn) !=
            MF_CUDA_SUCCESS)
            return 0;
        (*n_updated)++;
    }
    return 1;
}

static void launch_each(struct mf_exec *ex, struct launch *l, int n) {
    for (int i = 0; i < n && ex->status == MF_OK; i++)
        mf_cuda_launch_now(ex, l[i].kid, l[i].g, l[i].b, &l[i].p, l[i].bufs, l[i].n_buf,
                           mf_cuda_kernel_names[l[i].kid]);
    ex->gr->n_direct += n;
}

void mf_cuda_graph_flush(struct mf_exec *ex) {
    struct mf_cuda_graphs *gr = ex->gr;
    if (!gr || gr->n_pend == 0)
        return;
    const int n = gr->n_pend;
    gr->n_pend = 0;
    struct launch *l = gr->pend;
    struct seg *s = seg_for(ex, gr->ordinal++, kernels_hash(l, n), n);
    if (s && s->exec && !update(ex, s, l, n, &gr->n_updated))
        drop_graph(ex, s);   // made again when next met
    else if (s && !s->exec && ++s->seen >= 2 && n >= MF_GRAPH_MIN && !gr->off) {
        if (build_any(ex, s, l, n))
            gr->n_built++;
        else
            gr->off = 1;
    }
    if (s && s->exec) {
        if (mf_cuda_ck(ex, ex->cb->cu.GraphLaunch(s->exec, ex->st), "graph",
                       "cuGraphLaunch"))
            gr->n_graph++;
    } else {
        launch_each(ex, l, n);
    }
    if (s) {
        memcpy(s->last, l, (size_t)n * sizeof *l);
        s->used = ++gr->tick;
    }
}
