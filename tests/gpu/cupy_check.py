#!/usr/bin/env python3
"""cupy_check: CuPy array math checked against NumPy, to be run with and without the gpumem shim
(LD_PRELOAD) and the outputs compared. stdout is deterministic.

    cupy_check.py [--no-pool] [--leak N]

--no-pool  cupy.cuda.set_allocator(None) first: every array is its own cudaMalloc/cudaFree.
--leak N   also disables the pool, then keeps N arrays of 1000 + i*4096 bytes (i = 0..N-1) alive
           until the process ends (a global list plus an extra reference each, so that even the
           interpreter's shutdown does not free them); prints
           "expected_leak_bytes=<sum> expected_leak_allocs=<N>".
Without --leak, everything is freed and the pools emptied before exit, so the shim's exit report
should show no leak. No cuBLAS, cuRAND or cuFFT is used: their handles keep device memory of their
own until exit. Final line: "cupy_check: OK".
"""
import argparse
import ctypes
import gc
import sys

import numpy as np
import cupy as cp

LEAKED = []


def check(name, ok):
    print(f"{name}: {'ok' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        raise SystemExit(f"cupy_check: FAIL: {name}")


def run_checks():
    rng = np.random.default_rng(1234)
    a_np = rng.standard_normal((512, 384))
    b_np = rng.standard_normal((512, 384))
    a, b = cp.asarray(a_np), cp.asarray(b_np)

    # elementwise
    c = cp.sin(a) * 2.0 + cp.exp(-a * b) - cp.sqrt(cp.abs(b))
    c_np = np.sin(a_np) * 2.0 + np.exp(-a_np * b_np) - np.sqrt(np.abs(b_np))
    check("elementwise", np.allclose(cp.asnumpy(c), c_np, rtol=1e-12, atol=1e-12))

    # reductions
    check("sum_axis0", np.allclose(cp.asnumpy(a.sum(axis=0)), a_np.sum(axis=0), rtol=1e-10, atol=1e-10))
    check("mean_axis1", np.allclose(cp.asnumpy(b.mean(axis=1)), b_np.mean(axis=1), rtol=1e-10, atol=1e-12))
    check("max_min", float(a.max()) == a_np.max() and float(b.min()) == b_np.min())

    # a matrix product without cuBLAS: broadcast multiply, then reduce
    m_np = rng.standard_normal((64, 96))
    n_np = rng.standard_normal((96, 48))
    m, n = cp.asarray(m_np), cp.asarray(n_np)
    prod = (m[:, :, None] * n[None, :, :]).sum(axis=1)
    check("matmul_by_reduction", np.allclose(cp.asnumpy(prod), m_np @ n_np, rtol=1e-10, atol=1e-10))

    # integers: exact results, printed
    i_np = rng.integers(-1000, 1000, size=200_000, dtype=np.int64)
    i = cp.asarray(i_np)
    cs = cp.cumsum(i)
    check("cumsum", np.array_equal(cp.asnumpy(cs), np.cumsum(i_np)))
    srt = cp.sort(i)
    check("sort", np.array_equal(cp.asnumpy(srt), np.sort(i_np)))
    print(f"int_sum={int(i.sum())} int_last_cumsum={int(cs[-1])} sorted_median={int(srt[100_000])}", flush=True)

    # a custom kernel, slicing, dtype conversion, device-to-device copy
    saxpy = cp.ElementwiseKernel("float32 x, float32 y, float32 alpha", "float32 z", "z = alpha * x + y",
                                 "cupy_check_saxpy")
    xf_np = rng.standard_normal(1 << 20).astype(np.float32)
    yf_np = rng.standard_normal(1 << 20).astype(np.float32)
    z = saxpy(cp.asarray(xf_np), cp.asarray(yf_np), np.float32(3.0))
    check("elementwise_kernel", np.allclose(cp.asnumpy(z), np.float32(3.0) * xf_np + yf_np, rtol=1e-6, atol=1e-6))
    sl = a[::3, 5:300:7].copy()
    check("slice_copy", np.array_equal(cp.asnumpy(sl), a_np[::3, 5:300:7]))
    check("astype", np.array_equal(cp.asnumpy(i.astype(cp.int32)), i_np.astype(np.int32)))

    # many arrays of many sizes, some kept alive while others come and go
    keep = []
    total = 0
    for k in range(300):
        size = [1, 7, 512, 4096, 100_000, 1 << 20, 3 << 20][k % 7]
        t = cp.full(size, k % 89, dtype=cp.int32)
        s = int(t.sum(dtype=cp.int64))
        if s != size * (k % 89):
            raise SystemExit(f"cupy_check: FAIL: array {k} sums to {s}")
        total += s
        if k % 4 == 0:
            keep.append((t, k % 89))
        if len(keep) > 16:
            keep.pop(0)
    for t, v in keep:
        if int(t.min()) != v or int(t.max()) != v:
            raise SystemExit("cupy_check: FAIL: a kept array was overwritten")
    print(f"churn_sum={total}", flush=True)
    cp.cuda.Device().synchronize()


def plant_leaks(count):
    total = 0
    for k in range(count):
        nbytes = 1000 + k * 4096
        arr = cp.empty(nbytes, dtype=cp.uint8)
        arr.fill(k & 0xFF)
        LEAKED.append(arr)
        # One reference that is never dropped: the array outlives interpreter shutdown.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(arr))
        total += nbytes
    cp.cuda.Device().synchronize()
    print(f"expected_leak_bytes={total} expected_leak_allocs={count}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-pool", action="store_true")
    ap.add_argument("--leak", type=int, default=0)
    args = ap.parse_args()
    if args.no_pool or args.leak:
        cp.cuda.set_allocator(None)
    pool_state = "off" if (args.no_pool or args.leak) else "on"
    print(f"pool={pool_state}", flush=True)

    run_checks()
    gc.collect()
    cp.cuda.Device().synchronize()
    cp.get_default_memory_pool().free_all_blocks()
    cp.get_default_pinned_memory_pool().free_all_blocks()

    if args.leak:
        plant_leaks(args.leak)
    pool = cp.get_default_memory_pool()
    print(f"cupy_check: pool used={pool.used_bytes()} total={pool.total_bytes()} at exit", file=sys.stderr)
    print("cupy_check: OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
