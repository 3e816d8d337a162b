#!/usr/bin/env python3
"""cupy_ipc_check: CUDA IPC through CuPy (cupy.cuda.runtime.ipcGetMemHandle / ipcOpenMemHandle) with
a child started by subprocess, to be run with and without the gpumem shim (LD_PRELOAD) and the
outputs compared; both must pass.

CuPy's pool is turned off, so every array is its own cudaMalloc: under the shim the small ones
share a gpumem segment and the exported array is not its first block. The child fills the exported
arrays; the parent checks that exactly those bytes changed. Final line: "cupy_ipc_check: OK".

    cupy_ipc_check.py                 the parent
    cupy_ipc_check.py child HEX N ... (internal) opens each handle and fills N bytes with 0x5a + i
"""
import subprocess
import sys

import cupy as cp
import numpy as np


def child(args):
    rt = cp.cuda.runtime
    rt.setDevice(0)
    for i in range(0, len(args), 2):
        ptr = rt.ipcOpenMemHandle(bytes.fromhex(args[i]))
        rt.memset(ptr, 0x5A + i // 2, int(args[i + 1]))
        rt.deviceSynchronize()
        rt.ipcCloseMemHandle(ptr)
    return 0


def check(name, ok):
    print(f"{name}: {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        return child(sys.argv[2:])
    cp.cuda.set_allocator(None)
    rt = cp.cuda.runtime
    sizes = [4096, 5000, 8192, 3000]
    arrays = [cp.full(n, 0x10 + i, dtype=cp.uint8) for i, n in enumerate(sizes)]
    cp.cuda.Device(0).synchronize()
    exported = [1, 2]
    args = []
    for i in exported:
        h = rt.ipcGetMemHandle(arrays[i].data.ptr)
        args += [bytes(h).hex(), str(sizes[i])]
    ok = check("export twice gives the same bytes",
               bytes(rt.ipcGetMemHandle(arrays[1].data.ptr)) == bytes.fromhex(args[0]))
    r = subprocess.run([sys.executable, __file__, "child"] + args, timeout=120)
    ok &= check("child opened and wrote the exported arrays", r.returncode == 0)
    for k, i in enumerate(exported):
        ok &= check(f"array {i} has the child's bytes", bool((arrays[i] == 0x5A + k).all()))
    for i in range(len(sizes)):
        if i not in exported:
            ok &= check(f"array {i} unchanged", bool((arrays[i] == 0x10 + i).all()))
    host = [cp.asnumpy(a) for a in arrays]
    ok &= check("host copies agree", all(np.all(h == host[i]) for i, h in enumerate(host)))
    del arrays
    if not ok:
        sys.exit("cupy_ipc_check: FAIL")
    print("cupy_ipc_check: OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
