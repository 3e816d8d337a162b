// The seed's physics simulation on the GPU, as a client of libgpumem (tests/physics/physics_sim.h
// holds the runner: buffers that grow during the run, positions read back every frame through a
// double-buffered channel). Built by tests/gpu/meson.build (the gpu suite) with:
//   nvcc -O2 -arch=sm_90 -I manager/include -I tests/physics tests/gpu/physics_sim.cu \
//        -L build-gpu/manager -lgpumem -Xlinker -rpath -Xlinker build-gpu/manager
//   physics_sim --check    small graph, compared with the CPU reference (float tolerance)
//   physics_sim --stress   >= 1,000,000 nodes, grown step by step; prints what the buffers did
// The last line is "physics_sim: OK" when every check passed. Run it under the shim and without:
// either way the exit report must say 0 bytes leaked.
#include <cuda_runtime.h>

#include "physics_sim.h"

#define CUDA_OK(call)                                                                               \
    do {                                                                                            \
        cudaError_t e_ = (call);                                                                    \
        if (e_ != cudaSuccess) {                                                                    \
            fprintf(stderr, "physics_sim: %s failed: %s\n", #call, cudaGetErrorString(e_));         \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)

static unsigned blocks_for(uint32_t n) { return (n + 255) / 256; }

__global__ void init_nodes_kernel(pm_vec4 *pos, pm_vec4 *vel, uint32_t from, uint32_t to)
{
    uint32_t i = from + blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= to) return;
    pos[i] = pm_initial_position(i);
    pm_vec4 zero = {0, 0, 0, 0};
    vel[i] = zero;
}

__global__ void init_edges_kernel(pm_edge *edges, uint32_t from, uint32_t to)
{
    uint32_t e = from + blockIdx.x * blockDim.x + threadIdx.x;
    if (e < to) edges[e] = pm_edge_of(e);
}

__global__ void springs_kernel(pm_params prm, const pm_vec4 *pos, pm_vec4 *force, const pm_edge *edges, uint32_t m)
{
    uint32_t e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= m) return;
    pm_edge ed = edges[e];
    pm_vec4 f = pm_spring_force(prm, pos[ed.a], pos[ed.b]);
    atomicAdd(&force[ed.a].x, f.x), atomicAdd(&force[ed.a].y, f.y), atomicAdd(&force[ed.a].z, f.z);
    atomicAdd(&force[ed.b].x, -f.x), atomicAdd(&force[ed.b].y, -f.y), atomicAdd(&force[ed.b].z, -f.z);
}

__global__ void repulsion_kernel(pm_params prm, const pm_vec4 *pos, pm_vec4 *force, uint32_t n, uint32_t step)
{
    uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    pm_vec4 r = pm_repulsion(prm, pos, i, n, step);
    force[i].x += r.x, force[i].y += r.y, force[i].z += r.z;
}

__global__ void integrate_kernel(pm_params prm, pm_vec4 *pos, pm_vec4 *vel, const pm_vec4 *force, uint32_t n)
{
    uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    pm_vec4 zero = {0, 0, 0, 0}, p = pos[i], v = vel[i];
    pm_integrate(prm, &p, &v, force[i], zero);
    pos[i] = p;
    vel[i] = v;
}

static int gpu_init_nodes(void *, pm_vec4 *pos, pm_vec4 *vel, uint32_t from, uint32_t to, void *stream)
{
    init_nodes_kernel<<<blocks_for(to - from), 256, 0, (cudaStream_t)stream>>>(pos, vel, from, to);
    return cudaGetLastError() != cudaSuccess;
}

static int gpu_init_edges(void *, pm_edge *edges, uint32_t from, uint32_t to, void *stream)
{
    if (to > from) init_edges_kernel<<<blocks_for(to - from), 256, 0, (cudaStream_t)stream>>>(edges, from, to);
    return cudaGetLastError() != cudaSuccess;
}

static int gpu_step(void *, pm_params prm, pm_vec4 *pos, pm_vec4 *vel, pm_vec4 *force, const pm_edge *edges,
                    uint32_t n, uint32_t m, uint32_t step, void *stream)
{
    cudaStream_t s = (cudaStream_t)stream;
    if (cudaMemsetAsync(force, 0, (size_t)n * sizeof *force, s) != cudaSuccess) return 1;
    if (m) springs_kernel<<<blocks_for(m), 256, 0, s>>>(prm, pos, force, edges, m);
    repulsion_kernel<<<blocks_for(n), 256, 0, s>>>(prm, pos, force, n, step);
    integrate_kernel<<<blocks_for(n), 256, 0, s>>>(prm, pos, vel, force, n);
    return cudaGetLastError() != cudaSuccess;
}

static const pm_kernels gpu_kernels = {NULL, gpu_init_nodes, gpu_init_edges, gpu_step};

static bool check_small(cudaStream_t stream)
{
    pm_schedule sch = {500, 250, 5, 3000, 80};
    pm_params prm = pm_default_params();
    pm_result r;
    char err[512] = "";
    if (pm_run(&gpu_kernels, prm, sch, stream, &r, err, sizeof err) != GPUMEM_OK) {
        fprintf(stderr, "physics_sim: %s\n", err);
        return false;
    }
    pm_vec4 *ref = (pm_vec4 *)calloc(sch.max_nodes, sizeof *ref);
    double *sums = (double *)calloc(sch.steps, sizeof *sums);
    uint32_t n = pm_reference(prm, sch, ref, sums);
    double diff = pm_max_rel_diff(r.final_pos, ref, n), worst_frame = 0;
    for (uint32_t s = 0; s < sch.steps; s++) {
        double d = fabs(r.frame_checksum[s] - sums[s]) / (1.0 + fabs(sums[s]));
        if (d > worst_frame) worst_frame = d;
    }
    bool ok = r.nodes == n && r.frame_errors == 0 && r.frames_acquired == sch.steps - 1 && diff < 1e-3 &&
              worst_frame < 1e-4 && r.grows > 0;
    printf("check: %u nodes, %u edges, %u steps; frames read one behind %u, out of order %u; "
           "max relative difference to the CPU reference: positions %.2e, frame checksums %.2e; "
           "buffer grows %llu (%llu in place, %llu copies)\n",
           r.nodes, r.edges, sch.steps, r.frames_acquired, r.frame_errors, diff, worst_frame,
           (unsigned long long)r.grows, (unsigned long long)r.grows_in_place, (unsigned long long)r.copies);
    pm_result_free(&r);
    free(ref);
    free(sums);
    return ok;
}

static bool stress(cudaStream_t stream)
{
    pm_schedule sch = {200000, 100000, 4, 1200000, 60};
    pm_params prm = pm_default_params();
    pm_result r;
    char err[512] = "";
    if (pm_run(&gpu_kernels, prm, sch, stream, &r, err, sizeof err) != GPUMEM_OK) {
        fprintf(stderr, "physics_sim: %s\n", err);
        return false;
    }
    bool finite = true;
    for (uint32_t i = 0; i < r.nodes; i++)
        if (!isfinite(r.final_pos[i].x) || !isfinite(r.final_pos[i].y) || !isfinite(r.final_pos[i].z)) finite = false;
    printf("stress: %u nodes, %u edges after %u steps (%.1f ms, %.2f ms/step incl. readback); "
           "buffer grows %llu (%llu in place, %llu copies, %.1f MiB copied); frames read one behind %u, "
           "out of order %u; positions finite: %s\n",
           r.nodes, r.edges, sch.steps, r.ms, r.ms / sch.steps, (unsigned long long)r.grows,
           (unsigned long long)r.grows_in_place, (unsigned long long)r.copies,
           (double)r.bytes_copied / (1 << 20), r.frames_acquired, r.frame_errors, finite ? "yes" : "no");
    bool ok = r.nodes >= 1000000 && r.frame_errors == 0 && r.frames_acquired == sch.steps - 1 && finite &&
              r.grows >= 4 * 4; // every buffer grew repeatedly (10 growth events, capacity x1.5)
    pm_result_free(&r);
    return ok;
}

int main(int argc, char **argv)
{
    bool do_check = argc < 2 || strcmp(argv[1], "--check") == 0;
    bool do_stress = argc < 2 || strcmp(argv[1], "--stress") == 0;
    if (!do_check && !do_stress) {
        fprintf(stderr, "usage: physics_sim [--check|--stress]\n");
        return 2;
    }
    CUDA_OK(cudaSetDevice(0));
    CUDA_OK(cudaFree(0)); // the primary context is current: gpumem works on it
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    bool ok = true;
    if (do_check) ok = check_small(stream) && ok;
    if (do_stress) ok = stress(stream) && ok;
    CUDA_OK(cudaStreamDestroy(stream));
    gpumem_stats st;
    gpumem_get_stats(0, &st);
    printf("gpumem: %llu bytes still allocated, peak reserved %llu B\n", (unsigned long long)st.bytes_requested,
           (unsigned long long)st.bytes_reserved_peak);
    ok = ok && st.bytes_requested == 0;
    printf("physics_sim: %s\n", ok ? "OK" : "FAILED");
    return ok ? 0 : 1;
}
