#!/usr/bin/env python3
"""multigpu_torch_check.py: torch.distributed with NCCL under the gpumem shim (issue 16), one
process per GPU started with torch.multiprocessing (no torchrun): an all-reduce, then a short
DistributedDataParallel training loop with a fixed seed. Run without and with the shim
(run_check.py `same`): rank 0 prints every result as the hex of its float32 bits, so the two runs
must agree bit for bit.

    multigpu_torch_check.py [--world N] [--steps S] [--limit BYTES]

Needs 2 GPUs (fewer: "SKIP" and exit 77; run_check's --needs-gpus 2 says so first). NVLink
multicast stays off in every rank (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1, set before torch starts the ranks), as the multi-GPU machines require.

Under the shim (LD_PRELOAD names gpumem) each rank also:
  - leaves exactly PLANT allocations of cudaMalloc (through PyTorch's own libcudart) unfreed, of
    known sizes, after giving back everything PyTorch and NCCL hold (destroy_process_group,
    empty_cache), and writes its exit report to a file of its pid (GPUMEM_REPORT, set in the
    rank before its first CUDA call; this process's own report stays on stderr); the parent reads
    every rank's report after they ended and prints shim_leaks_exact=1 when each report's LEAK
    SUMMARY is exactly that rank's planted bytes and count;
  - with --limit (the check sets GPUMEM_SHARED and GPUMEM_LIMIT): sees the limit as its device's
    total (torch.cuda.mem_get_info) and cannot allocate past it: shim_limit_seen_rank<r>=1.
The shim_* lines are left out of the comparison (--ignore) and held to their values (--expect).
"""
import argparse
import hashlib
import ctypes
import glob
import os
import queue
import re
import socket
import struct
import sys
import tempfile

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)  # before torch is imported: the spawned ranks inherit it
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, run to run

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

PLANT = 2
LEAK_RE = re.compile(r"LEAK SUMMARY: ([0-9]+) bytes leaked in ([0-9]+) allocations?")


def under_shim():
    return "gpumem" in os.environ.get("LD_PRELOAD", "")


def planted_sizes(rank):
    return [1000 + 4096 * rank + 512 * i for i in range(PLANT)]


def bits(t):
    """The float32 bits of a tensor: the first 8 values in hex and the SHA-256 of all of them,
    what `same` compares between the two runs."""
    flat = t.detach().float().cpu().contiguous().view(-1)
    raw = flat.numpy().tobytes()
    head = "".join(struct.pack("<f", v).hex() for v in flat[:8].tolist())
    return f"{head}.. sha256 {hashlib.sha256(raw).hexdigest()} ({flat.numel()} floats)"


def cudart():
    """PyTorch's own libcudart (the process has it loaded), for allocations PyTorch does not cache."""
    libs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "lib", "libcudart.so*"))
    libs += glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libcudart*.so*"))
    for name in libs + ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("no libcudart")


def plant_leaks(rank):
    rt = cudart()
    for n in planted_sizes(rank):
        p = ctypes.c_void_p()
        rc = rt.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(n))
        if rc != 0:
            raise RuntimeError(f"cudaMalloc({n}) -> {rc}")


def check_limit(rank, limit):
    free, total = torch.cuda.mem_get_info(rank)
    seen = total == limit
    try:
        x = torch.empty(limit + (1 << 30), dtype=torch.uint8, device=f"cuda:{rank}")
        del x
        refused = False
    except torch.cuda.OutOfMemoryError:
        refused = True
    torch.cuda.empty_cache()
    return 1 if seen and refused else 0


def all_reduce(rank, world):
    g = torch.Generator().manual_seed(1234 + rank)
    t = torch.randn(4096, generator=g).cuda(rank)
    dist.all_reduce(t)
    return t


def train(rank, steps):
    torch.manual_seed(42)  # the same initial weights in every rank (DDP also broadcasts rank 0's)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 16)).cuda(rank)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(7 + rank)  # each rank its own shard of the data
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 256, generator=g).cuda(rank)
        y = torch.randn(64, 16, generator=g).cuda(rank)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    weights = torch.cat([p.detach().view(-1) for p in model.parameters()])
    out = (torch.stack(losses).cpu(), weights.cpu())
    del ddp, opt, model, losses, weights
    return out


def rank_main(rank, world, port, steps, limit, report_dir, results):
    os.environ.update(NO_MULTICAST)
    if report_dir:  # before the first CUDA call: the shim reads its settings once, at its start
        os.environ["GPUMEM_REPORT"] = os.path.join(report_dir, "rank-%p.txt")
    torch.use_deterministic_algorithms(True)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    reduced = all_reduce(rank, world)
    losses, weights = train(rank, steps)
    # Every rank must hold the same weights after DDP: compare against rank 0's.
    w0 = weights.clone().cuda(rank)
    dist.broadcast(w0, src=0)
    same = bool(torch.equal(w0.cpu(), weights))
    dist.barrier()
    dist.destroy_process_group()
    del w0
    line = {"rank": rank, "reduced": bits(reduced.cpu()), "losses": bits(losses), "weights": bits(weights),
            "same_weights": same, "pid": os.getpid()}
    del reduced
    if under_shim():
        if limit:
            line["limit_seen"] = check_limit(rank, limit)
        torch.cuda.synchronize()
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        torch.cuda.empty_cache()
        plant_leaks(rank)
    results.put(line)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_report(path):
    try:
        with open(path) as f:
            found = LEAK_RE.findall(f.read())
    except OSError:
        return None
    return tuple(int(v) for v in found[-1]) if found else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=0, help="ranks (default: every GPU, at most 8)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--limit", type=int, default=0, help="GPUMEM_LIMIT in bytes the ranks run under")
    args = ap.parse_args()
    n = torch.cuda.device_count()
    if n < 2:
        print(f"multigpu_torch_check: SKIP: needs 2 GPUs, this machine has {n}")
        return 77
    world = args.world or min(n, 8)
    # The ranks' reports go to files (read below); this process's own stays on stderr.
    report_dir = tempfile.mkdtemp(prefix="gpumem-ranks-") if under_shim() else None
    results = mp.get_context("spawn").Queue()
    procs = mp.start_processes(rank_main, args=(world, free_port(), args.steps, args.limit, report_dir, results),
                               nprocs=world, join=False, start_method="spawn")
    lines = []
    while len(lines) < world:
        try:
            lines.append(results.get(timeout=1))
        except queue.Empty:
            procs.join(timeout=0)  # raises ProcessRaisedException/ProcessExitedException when a rank failed
    while not procs.join():
        pass
    lines.sort(key=lambda r: r["rank"])
    print(f"world={world}")
    print(f"reduced={lines[0]['reduced']}")
    print(f"reduced_equal_on_all_ranks={int(all(r['reduced'] == lines[0]['reduced'] for r in lines))}")
    print(f"losses_rank0={lines[0]['losses']}")
    print(f"weights={lines[0]['weights']}")
    print(f"weights_equal_on_all_ranks={int(all(r['same_weights'] for r in lines))}")
    ok = all(r["reduced"] == lines[0]["reduced"] and r["same_weights"] for r in lines)
    if report_dir:
        exact = True
        for r in lines:
            want = (sum(planted_sizes(r["rank"])), PLANT)
            got = read_report(os.path.join(report_dir, f"rank-{r['pid']}.txt"))
            print(f"shim_leaks_rank{r['rank']}={got[0] if got else '?'}/{got[1] if got else '?'} "
                  f"(planted {want[0]}/{want[1]})")
            exact = exact and got == want
        print(f"shim_leaks_exact={int(exact)}")
        if args.limit:
            for r in lines:
                print(f"shim_limit_seen_rank{r['rank']}={r.get('limit_seen', 0)}")
    if not ok:
        print("multigpu_torch_check: FAIL: the ranks disagree")
        return 1
    print("multigpu_torch_check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
