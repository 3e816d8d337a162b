/* The seed's physics case: a force-directed layout of a growing graph. N nodes with springs along
 * edges and a sampled repulsion, positions integrated every step. This header holds the model
 * alone (no gpumem, no CUDA runtime): the per-edge and per-node updates, the deterministic graph
 * growth, and the initial state, written once for three users:
 *   - the CUDA kernels of tests/gpu/physics_sim.cu (compiled by nvcc as CUDA C++),
 *   - the host "kernels" that stand in for them on the fake driver (its device memory is host
 *     memory), and
 *   - the CPU reference, which runs the same model on plain arrays, without gpumem.
 * Everything is float, like a real layout kernel; integer hashing makes every run identical. */
#ifndef PHYSICS_MODEL_H
#define PHYSICS_MODEL_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define PM_FN __host__ __device__ static inline
#else
#define PM_FN static inline
#endif

typedef struct pm_vec4 { float x, y, z, w; } pm_vec4; /* w: 1 for a live node */
typedef struct pm_edge { int32_t a, b; } pm_edge;

typedef struct pm_params {
    float spring_k, rest_length, repulsion, damping, dt;
    int repulsion_samples; /* other nodes each node is pushed away from, per step */
} pm_params;

PM_FN pm_params pm_default_params(void)
{
    pm_params p;
    p.spring_k = 0.5f;
    p.rest_length = 1.0f;
    p.repulsion = 0.05f;
    p.damping = 0.9f;
    p.dt = 0.05f;
    p.repulsion_samples = 4;
    return p;
}

PM_FN uint32_t pm_hash(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

PM_FN float pm_unit(uint32_t h) { return (float)(h & 0xFFFFFF) / (float)0x800000 - 1.0f; } /* [-1, 1) */

/* Where node i starts: a deterministic point in a cube that grows with the id, so late nodes
 * do not all start on top of each other. */
PM_FN pm_vec4 pm_initial_position(uint32_t i)
{
    float spread = 1.0f + 0.01f * sqrtf((float)i);
    pm_vec4 p;
    p.x = spread * pm_unit(pm_hash(3 * i + 1));
    p.y = spread * pm_unit(pm_hash(3 * i + 2));
    p.z = spread * pm_unit(pm_hash(3 * i + 3));
    p.w = 1.0f;
    return p;
}

/* Node i > 0 joins the graph with two edges: to a parent chosen among the older nodes, and to its
 * predecessor (a chain keeps the graph connected). Edges 2i-2 and 2i-1 are node i's. */
#define PM_EDGES_PER_NODE 2
PM_FN pm_edge pm_edge_of(uint32_t e)
{
    uint32_t node = e / PM_EDGES_PER_NODE + 1;
    pm_edge out;
    out.a = (int32_t)node;
    out.b = (e % PM_EDGES_PER_NODE) == 0 ? (int32_t)(pm_hash(node * 7919u) % node) : (int32_t)(node - 1);
    return out;
}
PM_FN uint32_t pm_edge_count(uint32_t nodes) { return nodes ? (nodes - 1) * PM_EDGES_PER_NODE : 0; }

/* The spring force of one edge on its node a (node b gets the opposite). */
PM_FN pm_vec4 pm_spring_force(pm_params prm, pm_vec4 pa, pm_vec4 pb)
{
    float dx = pb.x - pa.x, dy = pb.y - pa.y, dz = pb.z - pa.z;
    float len = sqrtf(dx * dx + dy * dy + dz * dz) + 1e-6f;
    float s = prm.spring_k * (len - prm.rest_length) / len;
    pm_vec4 f;
    f.x = s * dx;
    f.y = s * dy;
    f.z = s * dz;
    f.w = 0.0f;
    return f;
}

/* Repulsion on node i from a few pseudo-random other nodes (sampled, so a step is O(N)). */
PM_FN pm_vec4 pm_repulsion(pm_params prm, const pm_vec4 *pos, uint32_t i, uint32_t n, uint32_t step)
{
    pm_vec4 f;
    f.x = f.y = f.z = f.w = 0.0f;
    for (int s = 0; s < prm.repulsion_samples && n > 1; s++) {
        uint32_t j = pm_hash(i * 2654435761u + step * 40503u + (uint32_t)s) % n;
        if (j == i) continue;
        float dx = pos[i].x - pos[j].x, dy = pos[i].y - pos[j].y, dz = pos[i].z - pos[j].z;
        float d2 = dx * dx + dy * dy + dz * dz + 1e-2f;
        float s3 = prm.repulsion / (d2 * sqrtf(d2));
        f.x += s3 * dx;
        f.y += s3 * dy;
        f.z += s3 * dz;
    }
    return f;
}

/* Velocity and position of node i after one step, given the spring force summed on it. */
PM_FN void pm_integrate(pm_params prm, pm_vec4 *pos, pm_vec4 *vel, pm_vec4 spring, pm_vec4 rep)
{
    vel->x = (vel->x + prm.dt * (spring.x + rep.x)) * prm.damping;
    vel->y = (vel->y + prm.dt * (spring.y + rep.y)) * prm.damping;
    vel->z = (vel->z + prm.dt * (spring.z + rep.z)) * prm.damping;
    pos->x += prm.dt * vel->x;
    pos->y += prm.dt * vel->y;
    pos->z += prm.dt * vel->z;
}

/* How the graph grows: `initial` nodes, then `grow_by` more every `grow_every` steps while below
 * `max_nodes`. */
typedef struct pm_schedule {
    uint32_t initial, grow_by, grow_every, max_nodes, steps;
} pm_schedule;

PM_FN uint32_t pm_nodes_at(pm_schedule s, uint32_t step)
{
    uint64_t n = (uint64_t)s.initial + (uint64_t)s.grow_by * (s.grow_every ? step / s.grow_every : 0);
    return n > s.max_nodes ? s.max_nodes : (uint32_t)n;
}

#endif
