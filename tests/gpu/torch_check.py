#!/usr/bin/env python3
"""torch_check: a small deterministic PyTorch training run on CUDA, to be run with and without the
gpumem shim (LD_PRELOAD) and the outputs compared. stdout is deterministic.

    torch_check.py [--steps N] [--oom]

--signal-at N   send SIGUSR2 to itself at step N of training (meant for GPUMEM_REPORT_SIGNAL=SIGUSR2:
        the shim reports the live allocations and training goes on with the same losses).
--oom   after training, try torch.empty of 2 GiB (meant for GPUMEM_LIMIT=1GiB) and print
        "oom=torch.OutOfMemoryError" if that exception is raised ("oom=none" if it succeeds,
        "oom=<type>" for any other exception), then "mem_total_gib=<torch.cuda.mem_get_info()
        total in GiB, rounded>".
Final line: "torch_check: OK".
"""
import argparse
import os
import sys

# cuBLAS needs this before its first use for deterministic results.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402


def train(steps, signal_at=-1):
    torch.manual_seed(1234)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")

    # Data and initial weights come from the CPU generator: the same on every run.
    g = torch.Generator().manual_seed(1234)
    n, d_in = 4096, 64
    x = torch.randn(n, d_in, generator=g)
    w_true = torch.randn(d_in, 1, generator=g)
    y = torch.sin(x @ w_true) + 0.05 * torch.randn(n, 1, generator=g)
    x, y = x.to(dev), y.to(dev)

    model = torch.nn.Sequential(
        torch.nn.Linear(d_in, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 1),
    ).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.MSELoss()

    batch = 256
    for step in range(steps):
        if step == signal_at:
            import signal
            import time
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.2)  # the reporter thread writes meanwhile; training goes on alongside
            print(f"torch_check: signal sent at step {step}", file=sys.stderr, flush=True)
        lo = (step * batch) % n
        xb, yb = x[lo:lo + batch], y[lo:lo + batch]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
    print(f"final_loss={final:.4f}", flush=True)


def churn():
    """Tensors of many sizes, created and dropped, each checked: exercises the allocator."""
    dev = torch.device("cuda")
    total = 0
    keep = []
    for i in range(200):
        numel = [1, 100, 1000, 65536, 262145, 1 << 20, 3 << 20][i % 7]
        t = torch.full((numel,), i % 97, dtype=torch.int64, device=dev)
        s = int(t.sum().item())
        if s != numel * (i % 97):
            raise SystemExit(f"torch_check: FAIL: tensor {i} of {numel} elements sums to {s}")
        total += s
        if i % 5 == 0:
            keep.append(t)  # some stay alive while later ones come and go
        if len(keep) > 12:
            keep.pop(0)
    for i, t in enumerate(keep):
        if int(t.min().item()) != int(t.max().item()):
            raise SystemExit(f"torch_check: FAIL: a kept tensor was overwritten ({i})")
    print(f"churn_sum={total}", flush=True)


def try_oom():
    dev = torch.device("cuda")
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    try:
        big = torch.empty(int(2 * 1024 ** 3), dtype=torch.uint8, device=dev)
        big.fill_(1)
        torch.cuda.synchronize()
        print("oom=none", flush=True)
        del big
    except oom_type as e:
        print("oom=torch.OutOfMemoryError", flush=True)
        print(f"torch_check: the OOM message was: {str(e).splitlines()[0]}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - report whatever else came
        print(f"oom={type(e).__module__}.{type(e).__name__}", flush=True)
        print(f"torch_check: unexpected exception: {e}", file=sys.stderr)
    free, total = torch.cuda.mem_get_info()
    print(f"mem_total_gib={round(total / 1024 ** 3)}", flush=True)
    # cudaGetDeviceProperties().totalGlobalMem (cuDeviceTotalMem under the hood): what PyTorch and
    # vLLM size themselves by; under a limit it must be the limit.
    props_total = torch.cuda.get_device_properties(0).total_memory
    print(f"props_total_gib={round(props_total / 1024 ** 3)}", flush=True)
    print(f"torch_check: mem_get_info free={free} total={total}", file=sys.stderr)


def release():
    """Give back what PyTorch keeps cached, so that the exit report shows what is really left."""
    torch.cuda.synchronize()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.empty_cache()
    print(f"torch_check: at exit memory_allocated={torch.cuda.memory_allocated()} "
          f"memory_reserved={torch.cuda.memory_reserved()}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--oom", action="store_true")
    ap.add_argument("--signal-at", type=int, default=-1)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("torch_check: FAIL: torch.cuda.is_available() is False")
        return 1
    train(args.steps, args.signal_at)
    churn()
    if args.oom:
        try_oom()
    release()
    print("torch_check: OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
