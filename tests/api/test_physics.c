/* The seed's physics simulation, run on the fake driver as libgpumem's first client: the runner
 * of tests/physics/physics_sim.h with host functions standing in for the CUDA kernels (the fake
 * driver's device memory is host memory). Its buffers grow while it runs and every frame is read
 * back one behind through the channel; the result must match the CPU reference, which runs the
 * same model on plain arrays without gpumem, and nothing may be left allocated. */
#include "api_test.h"
#include "physics_sim.h"

/* Host "kernels": they run in stream order, after everything already enqueued on the stream. */
static int host_init_nodes(void *cx, pm_vec4 *pos, pm_vec4 *vel, uint32_t from, uint32_t to, void *stream)
{
    (void)cx;
    if (cuStreamSynchronize((CUstream)stream) != CUDA_SUCCESS) return -1;
    for (uint32_t i = from; i < to; i++) {
        pos[i] = pm_initial_position(i);
        memset(&vel[i], 0, sizeof vel[i]);
    }
    return 0;
}

static int host_init_edges(void *cx, pm_edge *edges, uint32_t from, uint32_t to, void *stream)
{
    (void)cx;
    if (cuStreamSynchronize((CUstream)stream) != CUDA_SUCCESS) return -1;
    for (uint32_t e = from; e < to; e++) edges[e] = pm_edge_of(e);
    return 0;
}

static int host_step(void *cx, pm_params prm, pm_vec4 *pos, pm_vec4 *vel, pm_vec4 *force, const pm_edge *edges,
                     uint32_t n, uint32_t m, uint32_t step, void *stream)
{
    (void)cx;
    if (cuStreamSynchronize((CUstream)stream) != CUDA_SUCCESS) return -1;
    pm_host_step(prm, pos, vel, force, edges, n, m, step);
    return 0;
}

static const pm_kernels host_kernels = {NULL, host_init_nodes, host_init_edges, host_step};

static void run_and_compare(pm_schedule sch, CUstream stream)
{
    pm_params prm = pm_default_params();
    pm_result r;
    char err[512] = "";
    cr_assert_eq(pm_run(&host_kernels, prm, sch, stream, &r, err, sizeof err), GPUMEM_OK, "%s", err);

    pm_vec4 *ref = calloc(sch.max_nodes, sizeof *ref);
    double *ref_sums = calloc(sch.steps, sizeof *ref_sums);
    cr_assert(ref && ref_sums);
    uint32_t n = pm_reference(prm, sch, ref, ref_sums);
    cr_assert_eq(r.nodes, n);
    cr_assert_eq(r.edges, pm_edge_count(n));
    cr_assert_eq(r.frame_errors, 0, "frames read back out of order or with the wrong size");
    cr_assert_eq(r.frames_acquired, sch.steps - 1, "every frame but the last is read one behind");
    for (uint32_t s = 0; s < sch.steps; s++)
        cr_assert_float_eq(r.frame_checksum[s], ref_sums[s], 1e-6 * (1 + fabs(ref_sums[s])),
                           "frame %u: %.9g read back, %.9g in the reference", s, r.frame_checksum[s], ref_sums[s]);
    double diff = pm_max_rel_diff(r.final_pos, ref, n);
    cr_assert_lt(diff, 1e-5, "final positions differ from the CPU reference by %g", diff);
    cr_assert_gt(r.grows, 0, "the buffers grew during the run");
    pm_result_free(&r);
    free(ref);
    free(ref_sums);
}

static void assert_nothing_left(void)
{
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0, "%llu bytes still allocated after the run",
                 (unsigned long long)st.bytes_requested);
    for (int i = 0; i < PM_NBUF; i++) {
        gpumem_tag_usage u;
        cr_assert_eq(gpumem_tag_get_usage(pm_buffer_names[i], &u), GPUMEM_OK, "%s", pm_buffer_names[i]);
        cr_assert_gt(u.allocations, 0, "%s made its allocations under its own tag", pm_buffer_names[i]);
        cr_assert_eq(u.live_bytes, 0, "%s left %llu bytes", pm_buffer_names[i], (unsigned long long)u.live_bytes);
    }
}

Test(physics, small_graph_matches_the_cpu_reference)
{
    api_start();
    pm_schedule sch = {50, 30, 7, 400, 60};
    run_and_compare(sch, NULL);
    assert_nothing_left();
}

Test(physics, on_a_stream_of_its_own)
{
    api_start();
    CUstream s;
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    pm_schedule sch = {100, 64, 3, 1000, 40};
    run_and_compare(sch, s);
    OK(cuStreamDestroy(s));
    assert_nothing_left();
}

Test(physics, growth_moves_data_both_ways)
{
    api_start();
    /* A blocker allocated right after the first buffers forces some growth to copy; the pool's
     * free space after a block lets other growth happen in place. Either way the data must
     * survive, which run_and_compare checks against the reference. */
    pm_schedule sch = {2000, 1500, 2, 20000, 30};
    pm_params prm = pm_default_params();
    pm_result r;
    char err[512] = "";
    cr_assert_eq(pm_run(&host_kernels, prm, sch, NULL, &r, err, sizeof err), GPUMEM_OK, "%s", err);
    cr_assert_eq(r.nodes, 20000);
    cr_assert_gt(r.grows, 4 * 3, "every buffer grew several times (%llu grows)", (unsigned long long)r.grows);
    cr_assert_gt(r.copies + r.grows_in_place, 0);
    pm_result_free(&r);
    run_and_compare(sch, NULL);
    assert_nothing_left();
}
