#!/usr/bin/env python3
"""bench_frameworks: real frameworks as a benchmark (issue 15). A PyTorch GPT training loop and a
JAX training loop, each mode a separate process, the modes alternated over several rounds in one
run (the order rotates every round); medians over the rounds, their spread, and the ratios the
issue sets goals for. A benchmark: it reports figures against their goals and fails only when a
mode's program fails or when the shim changed what a framework computed.

    bench_frameworks.py [--shim LIBGPUMEM_SHIM.SO] [--rounds 5] [--json FILE] [--work DIR]
                        [--torch-steps N] [--torch-warmup N] [--jax-steps N] [--jax-warmup N]
                        [--frameworks torch,jax] [--modes M1,M2] [--variant NAME=MODE:VAR=VALUE,...]
                        [--fake]

Modes (every child gets the same environment apart from what its mode sets):
    torch-caching              PyTorch's caching allocator, no shim
    torch-nocache              PYTORCH_NO_CUDA_MEMORY_CACHING=1, no shim
    torch-nocache-shim-strict  caching off, LD_PRELOAD=libgpumem_shim.so, GPUMEM_FREE_SYNC=1
    torch-nocache-shim-fast    caching off, the shim, GPUMEM_FREE_SYNC=0
    torch-caching-shim         PyTorch's caching allocator with the shim preloaded
    jax                        JAX's default allocator (XLA_PYTHON_CLIENT_* left unset), no shim
    jax-shim                   the same with the shim preloaded
--modes runs only those named; --variant adds a mode: MODE with more settings, in MODE's group (it
must compute the same), e.g. fast-batch64g=torch-nocache-shim-fast:GPUMEM_FENCE_BATCH=64GiB, to
take a mode's cost apart in the same run.
PyTorch: a GPT of about 27M parameters (12 layers, d 384, 6 heads, vocabulary 8192), bf16
autocast, batch 32 x 256 tokens, AdamW, seed 15, deterministic algorithms (CUBLAS_WORKSPACE_CONFIG
=:4096:8). JAX: a 4-layer MLP (1024-2048-2048-2048-1024, batch 4096) under jax.jit with
hand-written Adam, seed 15, GEMM autotuning off (XLA_FLAGS=--xla_gpu_autotune_level=0: autotuning
times the candidates, so two processes could pick different algorithms; --jax-autotune keeps it).
Each child runs WARMUP steps, then times STEPS steps one by one (synchronized before and after
each) and prints the median ms/step, its final loss (exact) and a checksum of every parameter's
bits; under the shim also the frees per timed step (gpumem_get_stats: every one of them a barrier
in strict mode).

Identical computation: every run of the modes of one group must end with the same loss and
parameter checksum, bit for bit: {torch-caching, torch-caching-shim}, {torch-nocache,
torch-nocache-shim-strict, torch-nocache-shim-fast}, {jax, jax-shim}. A difference fails the run
(rc 1), naming whether the framework itself varies from run to run without the shim or the shim
changed the result. Caching on against off is compared as information only.

Ratios (speed, >= goal is met; each the median of the per-round ratios, i.e. paired within a
round, with their range):
    fast_vs_caching          torch-caching / torch-nocache-shim-fast       goal >= 1.0
    strict_vs_nocache        torch-nocache / torch-nocache-shim-strict     goal >= 2.5
    caching_shim_vs_caching  torch-caching / torch-caching-shim            goal >= 0.98
    jax_shim_vs_jax          jax / jax-shim                                goal >= 0.98
Normalized ratios (information, not judged): the PyTorch step is bound by the CPU launching
kernels, and a process on these hosts lands fast or slow for its whole life, so each PyTorch
child also times its own kernel launches (1000 in-place adds on one element, before and after the
timed steps; no allocation, nothing the shim hooks) and prints launch_us; the same ratios of
ms/step divided by that process's launch_us are printed as "normalized_NAME=" lines.
Strict keeps cudaFree's barrier, so it cannot be faster than the step with those barriers and no
allocator cost; fast is the same shim without them. The "strict barrier" line gives strict - fast
per step, the barriers (frees) per step and the cost per barrier.

Output: the per-round figures, one table per framework, the ratios, then one machine-readable
line per ratio ("ratio_NAME=VALUE goal=G met=yes|no range=LO-HI"), "bench_frameworks: OK" last
when it passed. --json (default $OUT/frameworks.json when OUT is set) writes every figure.
Exit status: 0 passed (goals missed are reported, not failed), 1 a mode failed or a result
differed, 77 skipped: no CUDA device, or neither framework can run (a missing one alone is a SKIP
line). --fake runs trivial children with made-up figures (no framework, no GPU): the tests of
the driver itself (tests/tools/test_bench_frameworks.py).
"""
import argparse
import ctypes
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SKIP_RC = 77
NAME = "bench_frameworks"
ROOT = Path(__file__).resolve().parent.parent.parent
STATS_DEF = ROOT / "manager" / "include" / "gpumem_stats.def"
SEED = 15

# mode -> (framework, group of modes that must compute the same, environment, shim preloaded)
MODES = {
    "torch-caching": ("torch", "torch-caching", {}, False),
    "torch-nocache": ("torch", "torch-nocache", {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, False),
    "torch-nocache-shim-strict": ("torch", "torch-nocache",
                                  {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "GPUMEM_FREE_SYNC": "1"}, True),
    "torch-nocache-shim-fast": ("torch", "torch-nocache",
                                {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "GPUMEM_FREE_SYNC": "0"}, True),
    "torch-caching-shim": ("torch", "torch-caching", {}, True),
    "jax": ("jax", "jax", {}, False),
    "jax-shim": ("jax", "jax", {}, True),
}
# --variant NAME=MODE:VAR=VALUE,...: mode NAME -> the mode it varies (its figures, fake or not)
VARIANT_BASE = {}


def add_variant(spec):
    """Adds the mode a --variant names: MODE's framework, group and shim, its environment plus the
    settings given. Returns an error text, or None."""
    name, _, rest = spec.partition("=")
    base, _, settings = rest.partition(":")
    if not re.fullmatch(r"[a-z0-9-]+", name) or name in MODES:
        return f"--variant {spec}: NAME must be new and of a-z, 0-9 and '-'"
    if base not in MODES or base in VARIANT_BASE:
        return f"--variant {spec}: {base!r} is not one of the modes ({', '.join(m for m in MODES if m not in VARIANT_BASE)})"
    extra = dict(MODES[base][2])
    for kv in filter(None, settings.split(",")):
        var, eq, val = kv.partition("=")
        if not eq or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", var):
            return f"--variant {spec}: {kv!r} is not VAR=VALUE"
        extra[var] = val
    fw, group, _, shim = MODES[base]
    MODES[name] = (fw, group, extra, shim)
    VARIANT_BASE[name] = base
    return None


# name -> (numerator mode, denominator mode, goal): value = numerator ms / denominator ms
RATIOS = {
    "fast_vs_caching": ("torch-caching", "torch-nocache-shim-fast", 1.0),
    "strict_vs_nocache": ("torch-nocache", "torch-nocache-shim-strict", 2.5),
    "caching_shim_vs_caching": ("torch-caching", "torch-caching-shim", 0.98),
    "jax_shim_vs_jax": ("jax", "jax-shim", 0.98),
}
# Removed from every child's environment: the caller's settings must not leak into a mode.
DROP_VARS = ("LD_PRELOAD", "PYTORCH_NO_CUDA_MEMORY_CACHING", "PYTORCH_CUDA_ALLOC_CONF",
             "PYTORCH_ALLOC_CONF", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
             "XLA_PYTHON_CLIENT_ALLOCATOR", "TF_GPU_ALLOCATOR", "MALLOC_PERTURB_")
# --fake: ms/step of each mode (round r adds r %), so the tests know every median and ratio.
FAKE_MS = {"torch-caching": 27.0, "torch-nocache": 102.0, "torch-nocache-shim-strict": 40.0,
           "torch-nocache-shim-fast": 30.0, "torch-caching-shim": 27.2, "jax": 5.0, "jax-shim": 5.05}


# ------------------------------------------------------------------------------------- children
def gpumem_stats_reader():
    """A function returning gpumem's statistics of device 0 as a dict, or None without the shim
    (the gpumem_stats struct built from manager/include/gpumem_stats.def, as growing_batch.py does)."""
    try:
        fn = ctypes.CDLL(None).gpumem_get_stats
    except (AttributeError, OSError):
        return None
    fields = []
    for m in re.finditer(r"^GM_STAT_(?:(?:HEAP|POOL|DEVICE)\((\w+),|DERIVED\((\w+),\s*(\w+),)",
                         STATS_DEF.read_text(), re.M):
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
        return {name: getattr(st, name) for name, _ in fields} if fn(0, ctypes.byref(st)) == 0 else None

    return read


# Counted per timed step under the shim (the pool's own view of a mode's cost).
PER_STEP = ("frees", "pool_misses", "fences", "fence_waits")


def shim_per_step(before, after, steps):
    """The 'shim_per_step=' value: PER_STEP counts per step, then the peak reserved MiB."""
    if not before or not after:
        return None
    parts = [f"{k}:{(after[k] - before[k]) / steps:.2f}" for k in PER_STEP if k in after]
    return ",".join(parts + [f"reserved_peak_mib:{after['bytes_reserved_peak'] / 2**20:.0f}"])


def report(mode, times_ms, loss, checksum, frees_per_step, per_step=None, launch_us=None):
    """The child's key=value lines; the driver reads them."""
    print(f"mode={mode}")
    print(f"steps={len(times_ms)}")
    print(f"ms_per_step={statistics.median(times_ms):.4f}")
    print(f"ms_min={min(times_ms):.4f} ms_max={max(times_ms):.4f}")
    print(f"loss={loss!r} loss_hex={float(loss).hex()}")
    print(f"checksum={checksum}")
    if frees_per_step is not None:
        print(f"frees_per_step={frees_per_step:.2f}")
    if per_step:
        print(f"shim_per_step={per_step}")
    if launch_us:
        print(f"launch_us={launch_us:.4f}")
    print(f"{NAME}: OK")


def child_skip(why):
    print(f"SKIP: {why}")
    return SKIP_RC


def child_fake(a):
    fw = MODES[a.child][0]
    if fw in (a.fake_skip or "").split(","):
        return child_skip(f"{fw} not installed (fake)")
    if a.child == a.fake_fail:
        print("fake failure", file=sys.stderr)
        return 3
    slow = 1.5 if a.child == a.fake_slow_host else 1.0  # the whole process lands on a slow host
    base = FAKE_MS[VARIANT_BASE.get(a.child, a.child)] * (1 + 0.01 * a.round) * slow
    times = [base * 0.99, base, base * 1.01]
    loss = 2.5 + (1e-7 if a.child == a.fake_mismatch else 0.0) + (1e-7 * a.round if a.child == a.fake_vary else 0.0)
    launch = 4.0 * slow if fw == "torch" else None
    report(a.child, times, loss, f"{fw}:1234", 160.0 if MODES[a.child][3] else None, launch_us=launch)
    return 0


def child_torch(a):
    # cuBLAS needs this before its first use for deterministic results (the driver sets it too).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        import torch
    except ImportError as e:
        return child_skip(f"cannot import torch ({e})")
    if not torch.cuda.is_available():
        return child_skip("torch sees no CUDA device")
    import torch.nn.functional as F

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    dev = torch.device("cuda")
    vocab, d, heads, layers, batch, seq = 8192, 384, 6, 12, 32, 256

    class Block(torch.nn.Module):
        """Pre-norm attention (written out: the matmul path is deterministic) and a 4d MLP."""

        def __init__(self):
            super().__init__()
            self.n1, self.n2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
            self.register_buffer("causal", torch.ones(seq, seq, dtype=torch.bool).triu(1), persistent=False)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2)
                       for z in self.qkv(self.n1(x)).chunk(3, dim=-1))
            att = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5
            att = torch.softmax(att.masked_fill(self.causal[:t, :t], float("-inf")), dim=-1)
            y = (att @ v).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(y)
            return x + self.down(F.gelu(self.up(self.n2(x))))

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(seq, d)
            self.blocks = torch.nn.Sequential(*[Block() for _ in range(layers)])
            self.norm, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab, bias=False)

        def forward(self, idx):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
            return self.head(self.norm(self.blocks(x)))

    model = GPT().to(dev)  # initialized on the CPU from the seed: the same weights every run
    nparams = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(SEED)
    data = torch.randint(0, vocab, (4, batch, seq + 1), generator=g).to(dev)
    stats = gpumem_stats_reader()

    def launch_us():
        """This process's own cost of launching a kernel: 1000 in-place adds on one element,
        enqueue time only, median of 5. No allocation and no hooked call, so it is the same with
        and without the shim; it follows the host's speed, which the step (bound by launches) does."""
        z = torch.zeros(1, device=dev)
        per = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(1000):
                z.add_(1.0)
            per.append((time.perf_counter() - t0) * 1e3)  # ms per 1000 = us per launch
        torch.cuda.synchronize()
        return statistics.median(per)

    def step(i):
        xy = data[i % data.shape[0]]
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(xy[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, vocab).float(), xy[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return loss

    for i in range(a.warmup):
        step(i)
    torch.cuda.synchronize()
    launch_before = launch_us()
    s0 = stats() if stats else None
    times = []
    for i in range(a.warmup, a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = step(i)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    s1 = stats() if stats else None
    launch = (launch_before + launch_us()) / 2
    # The bits of every parameter, weighted by position, summed as int64 (wraps the same way on
    # every run): equal exactly when the parameters are.
    checksum = 0
    with torch.no_grad():
        for p in model.parameters():
            bits = p.detach().contiguous().view(-1).view(torch.int32).to(torch.int64)
            w = torch.arange(bits.numel(), device=dev, dtype=torch.int64) % 65521 + 1
            checksum = (checksum * 1000003 + int((bits * w).sum())) % (1 << 61)
    print(f"torch={torch.__version__} params={nparams}")
    fps = (s1["frees"] - s0["frees"]) / a.steps if s0 and s1 else None
    report(a.child, times, loss.item(), checksum, fps, shim_per_step(s0, s1, a.steps), launch_us=launch)
    return 0


def child_jax(a):
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np
    except ImportError as e:
        return child_skip(f"cannot import jax ({e})")
    try:
        devs = jax.devices()
    except RuntimeError as e:
        return child_skip(f"jax has no device ({e})")
    if devs[0].platform != "gpu":
        return child_skip(f"jax runs on {devs[0].platform}, not a GPU")
    import hashlib

    sizes, batch, lr = [1024, 2048, 2048, 2048, 1024], 4096, 1e-3
    key = jax.random.PRNGKey(SEED)
    keys = jax.random.split(key, len(sizes) + 1)
    params = [(jax.random.normal(k, (m, n), jnp.float32) * m ** -0.5, jnp.zeros((n,), jnp.float32))
              for k, m, n in zip(keys[:-2], sizes[:-1], sizes[1:])]
    kx, ky = jax.random.split(keys[-1])
    x = jax.random.normal(kx, (batch, sizes[0]), jnp.float32)
    y = jax.random.normal(ky, (batch, sizes[-1]), jnp.float32)

    def loss_fn(ps, x, y):
        h = x
        for i, (w, b) in enumerate(ps):
            h = h @ w + b
            if i < len(ps) - 1:
                h = jax.nn.gelu(h)
        return jnp.mean((h - y) ** 2)

    @jax.jit
    def train_step(ps, m, v, t, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(ps, x, y)
        m = jax.tree_util.tree_map(lambda m_, g_: 0.9 * m_ + 0.1 * g_, m, grads)
        v = jax.tree_util.tree_map(lambda v_, g_: 0.999 * v_ + 0.001 * g_ * g_, v, grads)
        c1, c2 = 1 - 0.9 ** t, 1 - 0.999 ** t
        ps = jax.tree_util.tree_map(lambda p, m_, v_: p - lr * (m_ / c1) / (jnp.sqrt(v_ / c2) + 1e-8), ps, m, v)
        return ps, m, v, loss

    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    ready = lambda tree: jax.tree_util.tree_map(lambda z: z.block_until_ready(), tree)  # noqa: E731
    stats = gpumem_stats_reader()
    t = 0
    for _ in range(a.warmup):
        t += 1
        params, m, v, loss = train_step(params, m, v, float(t), x, y)
    ready((params, m, v))
    s0 = stats() if stats else None
    times = []
    for _ in range(a.steps):
        t += 1
        t0 = time.perf_counter()
        params, m, v, loss = train_step(params, m, v, float(t), x, y)
        ready((params, m, v, loss))
        times.append((time.perf_counter() - t0) * 1e3)
    s1 = stats() if stats else None
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        h.update(np.asarray(leaf).tobytes())
    print(f"jax={jax.__version__} device={devs[0].device_kind.replace(' ', '_')}")
    fps = (s1["frees"] - s0["frees"]) / a.steps if s0 and s1 else None
    report(a.child, times, float(loss), h.hexdigest()[:32], fps, shim_per_step(s0, s1, a.steps))
    return 0


def child_main(a):
    if a.fake:
        return child_fake(a)
    return child_torch(a) if MODES[a.child][0] == "torch" else child_jax(a)


# ------------------------------------------------------------------------------------- driver
def cuda_device_count():
    """CUDA devices the driver reports (0 when libcuda.so.1 is missing or cuInit fails)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        n = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(n)) != 0:
            return 0
        return n.value
    except (OSError, AttributeError):
        return 0


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUMEM_") and k not in DROP_VARS}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    return env


def mode_env(a, base, mode):
    fw, _, extra, shim = MODES[mode]
    env = dict(base, **extra)
    if shim:
        env["LD_PRELOAD"] = a.shim
    if fw == "jax" and not a.jax_autotune:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
    return env


class Child:
    """One finished child process: its exit status, key=value figures and wall time."""

    def __init__(self, mode, rnd, rc, out, err, wall):
        self.mode, self.round, self.rc, self.out, self.err, self.wall = mode, rnd, rc, out, err, wall
        self.kv = dict(re.findall(r"(?:^|\s)([a-z_]+)=(\S+)", out, re.M))
        self.ok = rc == 0 and out.rstrip().endswith(f"{NAME}: OK") and "ms_per_step" in self.kv

    @property
    def ms(self):
        return float(self.kv["ms_per_step"])

    @property
    def launch(self):
        """us per kernel launch measured in this process, or None."""
        v = self.kv.get("launch_us")
        return float(v) if v else None

    @property
    def result(self):
        return (self.kv.get("loss_hex"), self.kv.get("checksum"))

    def why(self):
        if self.rc == 124:
            return "timed out"
        tail = [l for l in (self.err + self.out).strip().splitlines() if l.strip()][-3:]
        return f"rc={self.rc}: " + " | ".join(l.strip()[:160] for l in tail)


def run_child(a, env, work, mode, rnd):
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--round", str(rnd)]
    fw = MODES[mode][0]
    argv += ["--steps", str(getattr(a, f"{fw}_steps")), "--warmup", str(getattr(a, f"{fw}_warmup"))]
    argv += [f"--variant={v}" for v in a.variant]
    if a.fake:
        argv += ["--fake"] + [f"--{k.replace('_', '-')}={getattr(a, k)}"
                              for k in ("fake_skip", "fake_mismatch", "fake_vary", "fake_fail", "fake_slow_host")
                              if getattr(a, k)]
    stem = work / f"r{rnd}-{mode}"
    t0 = time.monotonic()
    with open(f"{stem}.out", "wb") as fo, open(f"{stem}.err", "wb") as fe:
        try:
            rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=env,
                                timeout=a.child_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.monotonic() - t0
    return Child(mode, rnd, rc, Path(f"{stem}.out").read_text(errors="replace"),
                 Path(f"{stem}.err").read_text(errors="replace"), wall)


def rotated(modes, rnd):
    k = rnd % len(modes) if modes else 0
    return modes[k:] + modes[:k]


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run_rounds(a, env, work, frameworks):
    """Runs the rounds; returns (children per mode, skipped framework -> why, failures)."""
    runs = {m: [] for m in a.mode_list if MODES[m][0] in frameworks}
    skipped, failed = {}, {}
    for rnd in range(a.rounds):
        line = []
        for fw in frameworks:
            modes = [m for m in runs if MODES[m][0] == fw and fw not in skipped and m not in failed]
            for mode in rotated(modes, rnd):
                c = run_child(a, env[mode], work, mode, rnd)
                if c.rc == SKIP_RC:
                    last = c.out.strip().splitlines()[-1] if c.out.strip() else "skipped"
                    skipped[fw] = last[len("SKIP: "):] if last.startswith("SKIP: ") else last
                    print(f"SKIP {fw}: {skipped[fw]}")
                    break
                if not c.ok:
                    failed[mode] = c.why()  # not run again: the other modes go on
                    print(f"FAIL {mode} (round {rnd + 1}): {failed[mode]}\n  (files: {work}/r{rnd}-{mode}.*)")
                    continue
                runs[mode].append(c)
                line.append(f"{mode} {c.ms:.2f}")
        if line:
            print(f"round {rnd + 1}: " + ", ".join(line) + " (ms/step)", flush=True)
    return {m: cs for m, cs in runs.items() if cs}, skipped, failed


def identical(runs):
    """Checks every group: (lines, problems). The results of one mode must not vary across its
    rounds, and every mode of a group must match the group's first mode."""
    lines, problems = [], []
    groups = {}
    for mode, cs in runs.items():
        groups.setdefault(MODES[mode][1], []).append(mode)
    for group, modes in groups.items():
        per_mode = {m: sorted({c.result for c in runs[m]}) for m in modes}
        varies = [m for m in modes if len(per_mode[m]) > 1]
        for m in varies:
            kind = "the framework itself is not deterministic here" if not MODES[m][3] else \
                "the shim's runs differ among themselves"
            problems.append(f"{m}: {len(per_mode[m])} different results over its rounds ({kind}): "
                            + "; ".join(f"loss {l} checksum {s}" for l, s in per_mode[m]))
        ref = modes[0]
        for m in modes[1:]:
            if per_mode[m] != per_mode[ref] and m not in varies and ref not in varies:
                (l1, s1), (l0, s0) = per_mode[m][0], per_mode[ref][0]
                problems.append(f"{m} computed differently from {ref}: loss {float.fromhex(l1)!r} checksum {s1} "
                                f"against loss {float.fromhex(l0)!r} checksum {s0} (the shim changed the result)")
        if len(modes) < 2:
            lines.append(f"not compared: {ref} alone ran of its group {group}")
        elif not varies and all(per_mode[m] == per_mode[ref] for m in modes):
            c = runs[ref][0]
            lines.append(f"identical: {' = '.join(modes)} (loss {c.kv.get('loss')}, checksum {c.kv.get('checksum')}, "
                         f"{sum(len(runs[m]) for m in modes)} runs)")
    if "torch-caching" in runs and "torch-nocache" in runs:  # information: caching on against off
        same = runs["torch-caching"][0].result == runs["torch-nocache"][0].result
        lines.append("information: caching on and off " + ("compute the same" if same else
                     "end with different results (other kernels or workspaces; compared within each only)"))
    return lines, problems


def paired_ratios(runs, value):
    """name -> (goal, per-round ratios of value(child)) for the rounds where both modes ran and
    value() is known."""
    out = {}
    for name, (num, den, goal) in RATIOS.items():
        a = {c.round: value(c) for c in runs.get(num, []) if value(c) is not None}
        b = {c.round: value(c) for c in runs.get(den, []) if value(c) is not None}
        vals = [a[r] / b[r] for r in sorted(a) if r in b and b[r] > 0]
        if vals:
            out[name] = (goal, vals)
    return out


def ratios(runs):
    """name -> figures of the paired per-round ratios of ms/step."""
    out = {}
    for name, (goal, vals) in paired_ratios(runs, lambda c: c.ms).items():
        num, den, _ = RATIOS[name]
        s = spread(vals)
        out[name] = dict(s, goal=goal, met=s["median"] >= goal, num=num, den=den, per_round=vals)
    return out


def normalized_ratios(runs):
    """The same ratios with each process's step divided by its own launch time (information):
    a process that lands on a slow host launches slower and steps slower alike."""
    norm = paired_ratios(runs, lambda c: c.ms / c.launch if c.launch else None)
    return {name: dict(spread(vals), goal=goal, per_round=vals) for name, (goal, vals) in norm.items()}


def barrier_line(runs):
    strict, fast = runs.get("torch-nocache-shim-strict"), runs.get("torch-nocache-shim-fast")
    if not strict or not fast:
        return None, None
    s, f = statistics.median(c.ms for c in strict), statistics.median(c.ms for c in fast)
    fps = [float(c.kv["frees_per_step"]) for c in strict if "frees_per_step" in c.kv]
    fig = {"strict_ms": s, "fast_ms": f, "barrier_ms_per_step": s - f, "fast_over_strict": f / s}
    text = (f"strict barrier: strict - fast = {s - f:.2f} ms/step; strict runs at {100 * f / s:.0f} % of "
            "fast's speed (fast is the same shim without cudaFree's barrier)")
    if fps:
        n = statistics.median(fps)
        fig["barriers_per_step"] = n
        text += f"; {n:.0f} frees (barriers) per step"
        if n > 0:
            fig["us_per_barrier"] = 1e3 * (s - f) / n
            text += f", {1e3 * (s - f) / n:.1f} us each"
    return text, fig


def table(runs, fw):
    rows = [m for m in runs if MODES[m][0] == fw]
    if not rows:
        return []
    w = max(len(m) for m in rows)
    text = [f"{fw}: ms/step, median over rounds of each process's median [min-max], process wall s",
            f"  {'mode':<{w}}  {'median':>9}  {'min-max':<17}  {'wall s':>6}  runs"]
    for m in rows:
        s = spread([c.ms for c in runs[m]])
        wall = statistics.median(c.wall for c in runs[m])
        launches = [c.launch for c in runs[m] if c.launch]
        text.append(f"  {m:<{w}}  {s['median']:9.2f}  {s['min']:.2f}-{s['max']:.2f}".ljust(w + 32)
                    + f"{wall:6.1f}  {s['n']}"
                    + (f"  launch {statistics.median(launches):.2f} us [{min(launches):.2f}-{max(launches):.2f}]"
                       if launches else ""))
    counted = [(m, runs[m][-1].kv["shim_per_step"]) for m in rows if "shim_per_step" in runs[m][-1].kv]
    if counted:
        text.append(f"  the shim's counts per timed step (last round): {', '.join(PER_STEP)}; peak reserved")
        text += [f"  {m:<{w}}  {v.replace(',', ', ')}" for m, v in counted]
    return text


def driver(a):
    t_start = time.monotonic()
    frameworks = [f for f in a.frameworks.split(",") if f]
    bad = [f for f in frameworks if f not in ("torch", "jax")]
    if bad:
        raise SystemExit(f"{NAME}: unknown framework {bad[0]} (torch, jax)")
    if not a.fake:
        if cuda_device_count() < 1:
            if os.environ.get("GPU_CHECK_REQUIRE_GPU") == "1":
                print(f"{NAME}: FAIL: no CUDA device (GPU_CHECK_REQUIRE_GPU=1)")
                return 1
            print(f"SKIP: {NAME}: no CUDA device here")
            return SKIP_RC
        if not a.shim or not os.path.isfile(a.shim):
            print(f"{NAME}: FAIL: the shim {a.shim or '(none given: --shim)'} does not exist")
            return 1
        missing = [f for f in frameworks if importlib.util.find_spec(f) is None]
        for f in missing:
            print(f"SKIP {f}: {Path(sys.executable).name} cannot import {f}")
        frameworks = [f for f in frameworks if f not in missing]
        if not frameworks:
            print(f"SKIP: {NAME}: neither framework can be imported")
            return SKIP_RC
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_frameworks."))
    work.mkdir(parents=True, exist_ok=True)
    for f in work.glob("r*-*.*"):  # the files of an earlier run
        f.unlink()
    base = clean_env()
    env = {m: mode_env(a, base, m) for m in MODES}
    print(f"{NAME}: {a.rounds} rounds, frameworks {','.join(frameworks)}; torch {a.torch_warmup} warm-up + "
          f"{a.torch_steps} timed steps, jax {a.jax_warmup} + {a.jax_steps}; shim {a.shim or '-'}; "
          f"children's files in {work}" + (" (fake children)" if a.fake else ""), flush=True)

    runs, skipped, failed = run_rounds(a, env, work, frameworks)
    versions = sorted({f"{k}={c.kv[k]}" for cs in runs.values() for c in cs[:1] for k in ("torch", "jax", "params")
                       if k in c.kv})
    out = [""] + ([f"versions: {' '.join(versions)}"] if versions else [])
    for fw in frameworks:
        out += table(runs, fw)
    same_lines, problems = identical(runs)
    rat = ratios(runs)
    if rat:
        out += ["", f"{'ratio':<24} {'median':>7}  {'min-max':<13}  goal    met  (numerator / denominator ms)"]
    for name, r in rat.items():
        out.append(f"{name:<24} {r['median']:7.3f}  {r['min']:.3f}-{r['max']:.3f}".ljust(48)
                   + f">={r['goal']:<5} {'yes' if r['met'] else 'NO':<4} ({r['num']} / {r['den']})")
    norm = normalized_ratios(runs)
    if norm:
        out.append("normalized (information; each process's ms/step over its own us per kernel launch, "
                   "which the shim does not touch):")
        out += [f"  {name:<24} {r['median']:7.3f}  {r['min']:.3f}-{r['max']:.3f}" for name, r in norm.items()]
    btext, bfig = barrier_line(runs)
    out += ([btext] if btext else []) + same_lines
    out += [f"FAIL {m}: {why}" for m, why in failed.items()]
    out += [f"FAIL computation differs: {p}" for p in problems]
    out += [f"SKIP {fw}: {why}" for fw, why in skipped.items()]
    out += [f"ratio_{n}={r['median']:.4f} goal={r['goal']} met={'yes' if r['met'] else 'no'} "
            f"range={r['min']:.4f}-{r['max']:.4f}" for n, r in rat.items()]
    out += [f"normalized_{n}={r['median']:.4f} range={r['min']:.4f}-{r['max']:.4f}" for n, r in norm.items()]
    wall = time.monotonic() - t_start
    out.append(f"wall_s={wall:.1f}")
    print("\n".join(out))

    json_path = a.json or (str(Path(os.environ["OUT"]) / "frameworks.json") if os.environ.get("OUT") else None)
    if json_path:
        doc = {"rounds": a.rounds, "fake": a.fake, "wall_s": wall, "shim": a.shim,
               "steps": {"torch": [a.torch_warmup, a.torch_steps], "jax": [a.jax_warmup, a.jax_steps]},
               "modes": {m: dict(spread([c.ms for c in cs]), per_round=[c.ms for c in cs],
                                 rounds=[c.round for c in cs], wall_s=[c.wall for c in cs],
                                 loss=cs[0].kv.get("loss"), checksum=cs[0].kv.get("checksum"),
                                 frees_per_step=cs[0].kv.get("frees_per_step"),
                                 shim_per_step=[c.kv.get("shim_per_step") for c in cs],
                                 launch_us=[c.launch for c in cs],
                                 env=MODES[m][2], variant_of=VARIANT_BASE.get(m))
                         for m, cs in runs.items()},
               "ratios": rat, "normalized_ratios": norm, "barrier": bfig, "identical": same_lines, "differs": problems,
               "failed": failed, "skipped": skipped}
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"json: {json_path}")
    if failed or problems:
        print(f"{NAME}: FAIL ({len(failed)} modes failed, {len(problems)} results differ)")
        return 1
    if not runs:
        print(f"SKIP: {NAME}: no framework could run here")
        return SKIP_RC
    print(f"{NAME}: OK")
    return 0


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_shim = ROOT / "build" / "shim" / "libgpumem_shim.so"
    ap.add_argument("--shim", default=str(default_shim) if default_shim.is_file() else "",
                    help="libgpumem_shim.so to preload (default: build/shim/ of this tree)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--frameworks", default="torch,jax", help="comma-separated: torch, jax")
    ap.add_argument("--torch-steps", type=int, default=20)
    ap.add_argument("--torch-warmup", type=int, default=5)
    ap.add_argument("--jax-steps", type=int, default=20)
    ap.add_argument("--jax-warmup", type=int, default=3)
    ap.add_argument("--jax-autotune", action="store_true", help="leave XLA's GEMM autotuning on")
    ap.add_argument("--child-timeout", type=float, default=120, help="s per child process")
    ap.add_argument("--json", help="write every figure here (default $OUT/frameworks.json when OUT is set)")
    ap.add_argument("--work", help="folder for the children's stdout and stderr (default: a new temporary one)")
    ap.add_argument("--fake", action="store_true", help="trivial children with made-up figures (tests)")
    ap.add_argument("--fake-skip", help=argparse.SUPPRESS)      # frameworks whose children SKIP
    ap.add_argument("--fake-mismatch", help=argparse.SUPPRESS)  # a mode whose loss differs
    ap.add_argument("--fake-fail", help=argparse.SUPPRESS)      # a mode whose child fails
    ap.add_argument("--fake-vary", help=argparse.SUPPRESS)      # a mode whose loss changes by round
    ap.add_argument("--fake-slow-host", help=argparse.SUPPRESS)  # a mode whose processes land 1.5x slow
    ap.add_argument("--modes", help="comma-separated modes to run (default: all, the variants included)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=MODE:VAR=VALUE,...",
                    help="also run mode NAME: MODE with these settings added (e.g. "
                         "fast-nochecks=torch-nocache-shim-fast:GPUMEM_CHECK_COPIES=0); repeatable")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=5, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for v in a.variant:
        err = add_variant(v)
        if err:
            ap.error(err)
    if a.child and a.child not in MODES:
        ap.error(f"--child {a.child}: not a mode")
    a.mode_list = [m for m in (a.modes.split(",") if a.modes else MODES) if m]
    unknown = [m for m in a.mode_list if m not in MODES]
    if unknown:
        ap.error(f"--modes: {unknown[0]!r} is not a mode ({', '.join(MODES)})")
    if a.rounds < 1 or min(a.torch_steps, a.jax_steps, a.steps) < 1:
        ap.error("--rounds and the step counts must be at least 1")
    return a


def main(argv):
    a = parse(argv)
    return child_main(a) if a.child else driver(a)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
