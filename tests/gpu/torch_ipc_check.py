#!/usr/bin/env python3
"""torch_ipc_check: a CUDA tensor shared with a torch.multiprocessing child (spawn start method), to
be run with and without the gpumem shim (LD_PRELOAD) and the outputs compared; both must pass.

The parent allocates 1 MiB, 1 MiB and 64 KiB first. With PyTorch's caching allocator the two
1 MiB tensors fill its first 2 MiB small-pool segment, so the shared tensor lies in its second one,
which under the shim is a pool block 2 MiB into a gpumem segment (a gpumem handle; PyTorch adds its
own offset). With PYTORCH_NO_CUDA_MEMORY_CACHING=1 every tensor is its own cudaMalloc and the
shared one lies 64 KiB into a gpumem small segment. The child, spawned under the same environment,
fills it with a pattern; the parent checks that exactly the shared tensor changed. The final line
is "torch_ipc_check: OK".
"""
import sys

import torch
import torch.multiprocessing as mp

MIB = 1 << 18  # floats in 1 MiB
N = MIB // 4  # the shared tensor: 256 KiB


def child(q_in, q_out):
    t = q_in.get()
    t.fill_(7.0)
    t[::4096] = torch.arange(t[::4096].numel(), device=t.device, dtype=t.dtype)
    torch.cuda.synchronize()
    q_out.put("written")
    q_in.get()  # keep the tensor until the parent has checked it


def check(name, ok):
    print(f"{name}: {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def main():
    mp.set_start_method("spawn")
    dev = torch.device("cuda", 0)
    before = [torch.full((n,), float(i + 1), device=dev) for i, n in enumerate((MIB, MIB, MIB // 16))]
    shared = torch.zeros(N, device=dev)
    after = torch.full((N,), 9.0, device=dev)
    torch.cuda.synchronize()
    q_in, q_out = mp.Queue(), mp.Queue()
    p = mp.Process(target=child, args=(q_in, q_out))
    p.start()
    q_in.put(shared)
    got = q_out.get(timeout=120)
    torch.cuda.synchronize()
    want = torch.full((N,), 7.0, device=dev)
    want[::4096] = torch.arange(want[::4096].numel(), device=dev, dtype=want.dtype)
    ok = check("child wrote the shared tensor", got == "written" and torch.equal(shared, want))
    ok &= check("tensors allocated before it unchanged",
                all(torch.all(t == float(i + 1)).item() for i, t in enumerate(before)))
    ok &= check("tensor allocated after it unchanged", torch.all(after == 9.0).item())
    q_in.put("done")
    p.join(timeout=120)
    ok &= check("child exited cleanly", p.exitcode == 0)
    del before, shared, after, want
    torch.cuda.empty_cache()
    if not ok:
        sys.exit("torch_ipc_check: FAIL")
    print("torch_ipc_check: OK", flush=True)


if __name__ == "__main__":
    main()
