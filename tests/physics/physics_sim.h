/* The physics simulation as a client of libgpumem: the graph's node and edge arrays live in
 * gpumem buffers that grow as nodes and edges are added during the run (each buffer's name is
 * the tag of its memory), and the positions are read back every frame through a double-buffered
 * readback channel while the next step runs. The kernels come from the caller (CUDA kernels on a
 * GPU, host functions on the fake driver), so this runner is shared by both; it is C that also
 * compiles as CUDA C++.
 *
 * pm_reference() runs the same model on plain host arrays, without gpumem, for the comparison. */
#ifndef PHYSICS_SIM_H
#define PHYSICS_SIM_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpumem.h"
#include "physics_model.h"

/* What a "device" offers the runner. Every call enqueues on `stream` or, on the host, runs after
 * the work already enqueued on it. Return 0 on success. */
typedef struct pm_kernels {
    void *cx;
    int (*init_nodes)(void *cx, pm_vec4 *pos, pm_vec4 *vel, uint32_t from, uint32_t to, void *stream);
    int (*init_edges)(void *cx, pm_edge *edges, uint32_t from, uint32_t to, void *stream);
    int (*step)(void *cx, pm_params prm, pm_vec4 *pos, pm_vec4 *vel, pm_vec4 *force,
                const pm_edge *edges, uint32_t n, uint32_t m, uint32_t step, void *stream);
} pm_kernels;

typedef struct pm_result {
    uint32_t nodes, edges;
    uint32_t frames_acquired;     /* frames read one behind through gpumem_channel_acquire */
    uint32_t frame_errors;        /* acquired frames with the wrong number or size */
    double *frame_checksum;       /* [steps]: checksum of each frame as read back */
    pm_vec4 *final_pos;           /* [nodes]: the last frame, read with acquire_latest */
    uint64_t grows, grows_in_place, copies, bytes_copied; /* over the four buffers */
    double ms;                    /* wall time of the loop */
} pm_result;

/* What the host does with a frame it reads back, as a renderer or an analysis would. */
static inline double pm_checksum(const pm_vec4 *p, uint32_t n)
{
    double s = 0;
    for (uint32_t i = 0; i < n; i++) s += (double)p[i].x + 2.0 * (double)p[i].y + 3.0 * (double)p[i].z;
    return s;
}

static inline double pm_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

enum { PM_POS, PM_VEL, PM_FORCE, PM_EDGES, PM_NBUF };
static const char *const pm_buffer_names[PM_NBUF] = {"physics/positions", "physics/velocities",
                                                     "physics/forces", "physics/edges"};

typedef struct pm_state {
    gpumem_buffer *buf[PM_NBUF];
    void *ptr[PM_NBUF];
    gpumem_channel *channel;
    uint32_t n, m;
} pm_state;

#define PM_TRY(call, what)                                                                      \
    do {                                                                                       \
        gpumem_status st_ = (call);                                                            \
        if (st_ != GPUMEM_OK) {                                                                \
            snprintf(err, errlen, "%s: %s (%d) %s", what, gpumem_strerror(st_), st_,           \
                     gpumem_buffer_last_error());                                              \
            return st_;                                                                        \
        }                                                                                      \
    } while (0)

static inline int pm_open(pm_state *s, pm_schedule sch, void *stream, char *err, size_t errlen)
{
    memset(s, 0, sizeof *s);
    for (int i = 0; i < PM_NBUF; i++) {
        gpumem_buffer_config cfg;
        gpumem_buffer_config_init(&cfg);
        size_t elem = i == PM_EDGES ? sizeof(pm_edge) : sizeof(pm_vec4);
        size_t max_elems = i == PM_EDGES ? pm_edge_count(sch.max_nodes) : sch.max_nodes;
        cfg.initial_capacity = (i == PM_EDGES ? pm_edge_count(sch.initial) : sch.initial) * elem;
        cfg.growth_factor = 1.5;
        cfg.max_size = max_elems * elem;
        PM_TRY(gpumem_buffer_create(&s->buf[i], pm_buffer_names[i], &cfg, stream), pm_buffer_names[i]);
    }
    PM_TRY(gpumem_channel_create(&s->channel, GPUMEM_CHANNEL_READBACK, (size_t)sch.max_nodes * sizeof(pm_vec4)),
           "readback channel");
    return GPUMEM_OK;
}

static inline void pm_close(pm_state *s)
{
    gpumem_channel_destroy(s->channel);
    for (int i = 0; i < PM_NBUF; i++) gpumem_buffer_destroy(s->buf[i]);
}

/* Grows the graph to `n_new` nodes: the buffers grow (keeping every existing node and edge),
 * then the new nodes and edges are initialised on the device. */
static inline int pm_grow(pm_state *s, const pm_kernels *k, uint32_t n_new, void *stream, char *err,
                          size_t errlen)
{
    uint32_t m_new = pm_edge_count(n_new);
    for (int i = 0; i < PM_NBUF; i++) {
        size_t bytes = i == PM_EDGES ? (size_t)m_new * sizeof(pm_edge) : (size_t)n_new * sizeof(pm_vec4);
        PM_TRY(gpumem_buffer_resize(s->buf[i], bytes), pm_buffer_names[i]);
        PM_TRY(gpumem_buffer_ptr(s->buf[i], &s->ptr[i]), pm_buffer_names[i]);
    }
    if (k->init_nodes(k->cx, (pm_vec4 *)s->ptr[PM_POS], (pm_vec4 *)s->ptr[PM_VEL], s->n, n_new, stream) ||
        k->init_edges(k->cx, (pm_edge *)s->ptr[PM_EDGES], s->m, m_new, stream)) {
        snprintf(err, errlen, "initialising nodes %u..%u failed", s->n, n_new);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    s->n = n_new;
    s->m = m_new;
    return GPUMEM_OK;
}

/* Reads frame k-1 while frame k is in flight and checks it is the frame it should be. */
static inline void pm_read_behind(pm_state *s, pm_schedule sch, uint32_t step, pm_result *out)
{
    const void *data;
    size_t bytes;
    uint64_t frame;
    if (gpumem_channel_acquire(s->channel, &data, &bytes, &frame) != GPUMEM_OK) {
        if (step > 0) out->frame_errors++; /* from the second frame on, one must be ready */
        return;
    }
    uint32_t n = pm_nodes_at(sch, (uint32_t)frame);
    if (frame + 1 != step || bytes != (size_t)n * sizeof(pm_vec4)) out->frame_errors++;
    else out->frame_checksum[frame] = pm_checksum((const pm_vec4 *)data, n);
    out->frames_acquired++;
}

static inline void pm_collect_buffer_counters(pm_state *s, pm_result *out)
{
    for (int i = 0; i < PM_NBUF; i++) {
        gpumem_buffer_info info;
        if (gpumem_buffer_get_info(s->buf[i], &info) != GPUMEM_OK) continue;
        out->grows += info.grows;
        out->grows_in_place += info.grows_in_place;
        out->copies += info.copies;
        out->bytes_copied += info.bytes_copied;
    }
}

static inline int pm_loop(pm_state *s, const pm_kernels *k, pm_params prm, pm_schedule sch, void *stream,
                          pm_result *out, char *err, size_t errlen)
{
    for (uint32_t step = 0; step < sch.steps; step++) {
        uint32_t n_new = pm_nodes_at(sch, step);
        if (n_new > s->n) {
            int rc = pm_grow(s, k, n_new, stream, err, errlen);
            if (rc) return rc;
        }
        if (k->step(k->cx, prm, (pm_vec4 *)s->ptr[PM_POS], (pm_vec4 *)s->ptr[PM_VEL],
                    (pm_vec4 *)s->ptr[PM_FORCE], (const pm_edge *)s->ptr[PM_EDGES], s->n, s->m, step, stream)) {
            snprintf(err, errlen, "step %u failed", step);
            return GPUMEM_ERROR_INVALID_VALUE;
        }
        PM_TRY(gpumem_channel_submit(s->channel, s->ptr[PM_POS], (size_t)s->n * sizeof(pm_vec4), stream, NULL),
               "submit");
        pm_read_behind(s, sch, step, out);
    }
    const void *data;
    size_t bytes;
    uint64_t frame;
    PM_TRY(gpumem_channel_acquire_latest(s->channel, &data, &bytes, &frame), "acquire_latest");
    out->frame_checksum[frame] = pm_checksum((const pm_vec4 *)data, s->n);
    out->final_pos = (pm_vec4 *)malloc(bytes);
    if (!out->final_pos) return GPUMEM_ERROR_OUT_OF_MEMORY;
    memcpy(out->final_pos, data, bytes);
    return GPUMEM_OK;
}

/* Runs the simulation through gpumem. `err` gets a line when the result is not GPUMEM_OK. */
static inline int pm_run(const pm_kernels *k, pm_params prm, pm_schedule sch, void *stream, pm_result *out,
                         char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    out->frame_checksum = (double *)calloc(sch.steps ? sch.steps : 1, sizeof(double));
    if (!out->frame_checksum) return GPUMEM_ERROR_OUT_OF_MEMORY;
    pm_state s;
    double t0 = pm_now_ms();
    int rc = pm_open(&s, sch, stream, err, errlen);
    if (rc == GPUMEM_OK) rc = pm_loop(&s, k, prm, sch, stream, out, err, errlen);
    out->ms = pm_now_ms() - t0;
    out->nodes = s.n;
    out->edges = s.m;
    pm_collect_buffer_counters(&s, out);
    pm_close(&s);
    return rc;
}

static inline void pm_result_free(pm_result *r)
{
    free(r->frame_checksum);
    free(r->final_pos);
}

/* ------------------------------------------------------------------ the CPU reference */

/* One step on host arrays, in the order the kernels run: springs edge by edge, then repulsion
 * from the positions before the step, then integration. */
static inline void pm_host_step(pm_params prm, pm_vec4 *pos, pm_vec4 *vel, pm_vec4 *force, const pm_edge *edges,
                                uint32_t n, uint32_t m, uint32_t step)
{
    memset(force, 0, (size_t)n * sizeof *force);
    for (uint32_t e = 0; e < m; e++) {
        pm_vec4 f = pm_spring_force(prm, pos[edges[e].a], pos[edges[e].b]);
        force[edges[e].a].x += f.x, force[edges[e].a].y += f.y, force[edges[e].a].z += f.z;
        force[edges[e].b].x -= f.x, force[edges[e].b].y -= f.y, force[edges[e].b].z -= f.z;
    }
    for (uint32_t i = 0; i < n; i++) {
        pm_vec4 r = pm_repulsion(prm, pos, i, n, step);
        force[i].x += r.x, force[i].y += r.y, force[i].z += r.z;
    }
    pm_vec4 zero = {0, 0, 0, 0};
    for (uint32_t i = 0; i < n; i++) pm_integrate(prm, &pos[i], &vel[i], force[i], zero);
}

static inline void pm_host_init(pm_vec4 *pos, pm_vec4 *vel, pm_edge *edges, uint32_t n0, uint32_t n1)
{
    for (uint32_t i = n0; i < n1; i++) {
        pos[i] = pm_initial_position(i);
        memset(&vel[i], 0, sizeof vel[i]);
    }
    for (uint32_t e = pm_edge_count(n0); e < pm_edge_count(n1); e++) edges[e] = pm_edge_of(e);
}

/* The reference: positions after the last step (`pos_out`, max_nodes entries) and the checksum
 * of every frame (`checksums`, steps entries). Returns the final node count, 0 on no memory. */
static inline uint32_t pm_reference(pm_params prm, pm_schedule sch, pm_vec4 *pos_out, double *checksums)
{
    pm_vec4 *vel = (pm_vec4 *)calloc(sch.max_nodes, sizeof *vel);
    pm_vec4 *force = (pm_vec4 *)calloc(sch.max_nodes, sizeof *force);
    pm_edge *edges = (pm_edge *)calloc(pm_edge_count(sch.max_nodes) + 1, sizeof *edges);
    uint32_t n = 0;
    if (vel && force && edges) {
        for (uint32_t step = 0; step < sch.steps; step++) {
            uint32_t n_new = pm_nodes_at(sch, step);
            pm_host_init(pos_out, vel, edges, n, n_new);
            n = n_new;
            pm_host_step(prm, pos_out, vel, force, edges, n, pm_edge_count(n), step);
            checksums[step] = pm_checksum(pos_out, n);
        }
    }
    free(vel);
    free(force);
    free(edges);
    return n;
}

/* Largest |a - b| / (1 + |b|) over the positions; the float tolerance of the comparison. */
static inline double pm_max_rel_diff(const pm_vec4 *a, const pm_vec4 *b, uint32_t n)
{
    double worst = 0;
    for (uint32_t i = 0; i < n; i++) {
        const float *x = &a[i].x, *y = &b[i].x;
        for (int c = 0; c < 3; c++) {
            double d = fabs((double)x[c] - (double)y[c]) / (1.0 + fabs((double)y[c]));
            if (d > worst) worst = d;
        }
    }
    return worst;
}

#endif
