#!/usr/bin/env python3
"""growing_batch: a growing-batch PyTorch training loop (issue 14), to measure how much memory the
allocator reserves beyond what the program allocates. Random sequence lengths, a batch that grows
every few steps: the same allocation sizes are rarely asked for twice, the pattern under which
classic segments keep cached memory that a larger block cannot use.

    growing_batch.py [--steps N] [--d D] [--seed S]

Run it four ways (tests/gpu/meson.build has one check each):
    PYTORCH_NO_CUDA_MEMORY_CACHING=1, LD_PRELOAD=libgpumem_shim.so, GPUMEM_EXPANDABLE=0
    PYTORCH_NO_CUDA_MEMORY_CACHING=1, LD_PRELOAD=libgpumem_shim.so, GPUMEM_EXPANDABLE=1
    PyTorch's caching allocator, no shim
    PyTorch's caching allocator, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, no shim
Under the shim the peaks are gpumem's (gpumem_get_stats of device 0, read through ctypes; the
struct is built from manager/include/gpumem_stats.def); without it, PyTorch's
(torch.cuda.max_memory_reserved / max_memory_allocated).

Prints key=value lines: allocator=gpumem|torch, expandable=0|1, steps, final_batch, max_seq,
peak_reserved, peak_allocated, ratio (peak reserved / peak allocated), time_s, loss; then
"growing_batch: OK".
"""
import argparse
import ctypes
import os
import re
import sys
import time
from pathlib import Path

import torch  # noqa: E402

DEF = Path(__file__).resolve().parent.parent.parent / "manager" / "include" / "gpumem_stats.def"


def gpumem_stats_reader():
    """A function returning device 0's gpumem statistics as a dict, or None without the shim."""
    try:
        fn = ctypes.CDLL(None).gpumem_get_stats
    except (AttributeError, OSError):
        return None
    fields = []
    for m in re.finditer(r"^GM_STAT_(?:(?:HEAP|POOL|DEVICE)\((\w+),|DERIVED\((\w+),\s*(\w+),)",
                         DEF.read_text(), re.M):
        if m.group(1):
            fields.append((m.group(1), ctypes.c_uint64))
        else:
            fields.append((m.group(3), ctypes.c_double if m.group(2) == "double" else ctypes.c_uint64))

    class Stats(ctypes.Structure):
        _fields_ = fields

    fn.argtypes = [ctypes.c_int, ctypes.POINTER(Stats)]
    fn.restype = ctypes.c_int

    def read():
        st = Stats()
        if fn(0, ctypes.byref(st)) != 0:
            raise RuntimeError("gpumem_get_stats failed")
        return {name: getattr(st, name) for name, _ in fields}

    return read


class Block(torch.nn.Module):
    """Attention-like mixing (a seq x seq score matrix) and an MLP: memory grows with batch * seq
    and batch * seq^2."""

    def __init__(self, d):
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)
        self.n1 = torch.nn.LayerNorm(d)
        self.n2 = torch.nn.LayerNorm(d)

    def forward(self, x):
        q, k, v = self.qkv(self.n1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.out(att @ v)
        return x + self.down(torch.nn.functional.gelu(self.up(self.n2(x))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=14)
    args = ap.parse_args()

    gpumem = gpumem_stats_reader()
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(*[Block(args.d) for _ in range(args.layers)]).to(dev)
    head = torch.nn.Linear(args.d, 1).to(dev)
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=1e-4)

    t0 = time.time()
    batch, max_seq, loss = 4, 0, None
    for step in range(args.steps):
        if step % 8 == 7:
            batch += 2  # the batch grows
        seq = int(torch.randint(64, 1025, (1,), generator=g))  # a random sequence length
        max_seq = max(max_seq, seq)
        x = torch.randn(batch, seq, args.d, generator=g).to(dev)
        y = torch.randn(batch, 1, generator=g).to(dev)
        opt.zero_grad(set_to_none=True)
        pred = head(model(x).mean(dim=1))
        loss = torch.nn.functional.mse_loss(pred, y)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    elapsed = time.time() - t0

    if gpumem:
        st = gpumem()
        reserved, allocated = st["bytes_reserved_peak"], st["bytes_allocated_peak"]
        print("allocator=gpumem")
    else:
        reserved, allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
        print("allocator=torch")
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    expandable = os.environ.get("GPUMEM_EXPANDABLE", "0") if gpumem else ("1" if "expandable_segments:True" in conf else "0")
    print(f"expandable={expandable}")
    print(f"steps={args.steps}")
    print(f"final_batch={batch}")
    print(f"max_seq={max_seq}")
    print(f"peak_reserved={reserved}")
    print(f"peak_allocated={allocated}")
    print(f"ratio={reserved / allocated:.3f}" if allocated else "ratio=nan")
    print(f"time_s={elapsed:.2f}")
    print(f"loss={loss.item():.6f}")
    print("growing_batch: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
