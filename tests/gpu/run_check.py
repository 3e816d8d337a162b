#!/usr/bin/env python3
"""run_check.py: runs one check of the `gpu` meson suite (tests/gpu/meson.build holds the list and,
beside each program, the numbers it is held to). Python 3 standard library only.

    run_check.py CHECK [OPTIONS] -- PROGRAM [ARGS...]

CHECK is one of
    built        PROGRAM (or each of several files) exists and is executable: the build check
    link-static  PROGRAM imports no cuda* symbol and needs no libcudart (static cudart)
    link-shared  PROGRAM needs libcudart.so, the loader finds it, and it imports cuda* symbols
    run          run PROGRAM once (with the shim when --preload) and hold it to the expectations
    same         run PROGRAM without the shim and with it: both end "NAME: OK", the shim's exit
                 report is on stderr, stdout is identical (--ignore drops lines from both first),
                 and the run under the shim meets the expectations
    trace        run PROGRAM --probe under the shim with GPUMEM_VERBOSE=3 and write the hooked
                 driver entry points per runtime call (entry-points.txt)
    leakinfo     run PROGRAM under the shim once per --case; PASS when each run has an exit report
    bench        run a benchmark (gpumem-bench MODE, bench_frameworks.py: the gpu-bench suite) and
                 append its output to bench.txt; exit status 77 is a SKIP
    summary      print the results table of a meson testlog.json (used by scripts/gpu-check.sh)

The expectations (run, same): --ok (exit 0 and last stdout line "NAME: OK"), --rc N, --report
any|off|BYTES|BYTES/ALLOCS (the last "LEAK SUMMARY" line of stderr), --planted N (the program
planted N leaks and printed expected_leak_bytes/allocs; the report must count exactly those),
--expect KEY=VALUE and --min KEY=NUMBER (KEY=value on stdout, last occurrence; --csv K1,K2 names
the fields of a first line "V1, V2" such as nvidia-smi --format=csv,noheader prints), --expect-base
KEY (with --also-base: KEY the same as without the shim), --stdout-has and
--stderr-has REGEX, --stderr-count REGEX N, --between START END REGEX N (stderr lines matching
REGEX between the markers), --max-report-percent P (the exit report's time against the run's wall
time). --show KEY, --grab REGEX, --grab-stderr REGEX and --detail TEXT only shape the detail line.

Every check prints what it ran (command, exit status, stdout and stderr, long ones cut; the whole
files stay under WORK/runs/TEST/) and ends with one line "RESULT PASS|FAIL|SKIP: detail". Exit
status: 0 passed, 1 failed, 77 skipped (meson's SKIP): no GPU here (unless GPU_CHECK_REQUIRE_GPU=1:
then that is a failure), fewer GPUs than --needs-gpus N asks for (a SKIP line naming both counts,
whatever GPU_CHECK_REQUIRE_GPU says), or the Python module a check needs cannot be imported.

Environment hygiene (the programs must see the same environment with and without the shim, and
nothing from the caller): every GPUMEM_* variable, LD_PRELOAD, the PyTorch/CuPy allocator knobs and
meson's MALLOC_PERTURB_ are removed; NVLink multicast is kept off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1, as the multi-GPU machines need); TMPDIR and the CUDA/CuPy/XDG caches point into WORK (the build
directory); PYTHONDONTWRITEBYTECODE=1. Knobs: GPU_CHECK_RUN_TIMEOUT (s per program run, 120),
GPU_CHECK_DEADLINE (epoch seconds; a run that would start later is failed as "not run"),
GPU_CHECK_OUT (where entry-points.txt, bench.txt and the torch report files go; default WORK),
GPU_CHECK_REQUIRE_GPU, BENCH_TIMEOUT (s per benchmark program; default 120 or --bench-timeout).
"""
import argparse
import ctypes
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

SKIP_RC = 77
LEAK_RE = re.compile(r"LEAK SUMMARY: ([0-9]+) bytes leaked in ([0-9]+) allocations?")
# Removed from the environment of every program run (the caller's settings must not leak in).
DROP_VARS = ("LD_PRELOAD", "PYTORCH_NO_CUDA_MEMORY_CACHING", "PYTORCH_CUDA_ALLOC_CONF",
             "PYTORCH_ALLOC_CONF", "CUPY_GPU_MEMORY_LIMIT", "MALLOC_PERTURB_")
# Set for every program run: NVLink multicast stays off in NCCL, PyTorch and NVSHMEM, as the
# multi-GPU H200 machines require (a program using it can take the host's shared GPUs out of
# service); the programs pass them on to every process they start.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class Done(Exception):
    """Ends the check with a status (PASS, FAIL, SKIP) and a one-line detail."""

    def __init__(self, status, detail):
        super().__init__(detail)
        self.status, self.detail = status, detail


def fail(detail):
    raise Done("FAIL", detail)


# ------------------------------------------------------------------------------------- context
class Ctx:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        self.out = Path(os.environ.get("GPU_CHECK_OUT") or self.work)
        test = re.sub(r"[^A-Za-z0-9_.-]", "_", args.test or "check")
        self.rundir = self.work / "runs" / test
        self.rundir.mkdir(parents=True, exist_ok=True)
        for f in self.rundir.iterdir():  # each check starts from nothing
            f.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        self.timeout = float(os.environ.get("GPU_CHECK_RUN_TIMEOUT", "120"))
        self.deadline = float(os.environ.get("GPU_CHECK_DEADLINE", "0") or 0)
        self.env = self.clean_env()

    def clean_env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUMEM_") and k not in DROP_VARS}
        env.update(NO_MULTICAST)
        # meson puts the folders of the shared libraries a test depends on (the shim's, the
        # library's) in front of LD_LIBRARY_PATH; the programs find libgpumem through their
        # rpath, as they would outside meson, so those entries go (the caller's stay).
        if self.args.meson_lib_dir and "LD_LIBRARY_PATH" in env:
            dirs = env["LD_LIBRARY_PATH"].split(":")
            for d in self.args.meson_lib_dir:
                if d in dirs:
                    dirs.remove(d)
            if any(dirs):
                env["LD_LIBRARY_PATH"] = ":".join(dirs)
            else:
                del env["LD_LIBRARY_PATH"]
        tmp, cache = self.work / "tmp", self.work / "cache"
        for d in (tmp, cache / "cupy", cache / "cuda", cache / "xdg"):
            d.mkdir(parents=True, exist_ok=True)
        env.update(TMPDIR=str(tmp), CUPY_CACHE_DIR=str(cache / "cupy"), CUDA_CACHE_PATH=str(cache / "cuda"),
                   XDG_CACHE_HOME=str(cache / "xdg"), PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        return env

    def subst(self, s):
        """@OUT@ in an environment value or argument: the output folder (GPU_CHECK_OUT)."""
        return s.replace("@OUT@", str(self.out))


# ------------------------------------------------------------------------------------- runs
class Run:
    """One program run: exit status (124 timed out, 125 not run), stdout and stderr text."""

    def __init__(self, tag, argv, env_shown, rc, out, err, secs):
        self.tag, self.argv, self.env_shown = tag, argv, env_shown
        self.rc, self.out, self.err, self.secs = rc, out, err, secs
        self.fields = {}  # --csv: KEY -> value of the first stdout line's comma-separated fields

    @property
    def lines(self):
        """stdout's lines, split at newlines only (as diff and tail see them)."""
        lines = self.out.split("\n")
        return lines[:-1] if lines and lines[-1] == "" else lines


def show_text(title, text, head, tail):
    lines = text.splitlines()
    if len(lines) <= head + tail:
        print(f"-------- {title} ({len(lines)} lines)")
        body = lines
    else:
        print(f"-------- {title} ({len(lines)} lines; first {head} and last {tail} shown)")
        body = lines[:head] + [f"[... {len(lines) - head - tail} lines left out ...]"] + lines[-tail:]
    for line in body:
        print(line)


def run_prog(ctx, tag, argv, extra_env=None, shim=False):
    """Runs argv (stdin /dev/null) with the clean environment plus extra_env, the shim preloaded
    when shim is true; stdout and stderr to RUNDIR/TAG.out and .err."""
    extra = {k: ctx.subst(v) for k, v in (extra_env or {}).items()}
    if shim:
        extra = {"LD_PRELOAD": ctx.args.shim, **extra}
    argv = [ctx.subst(str(a)) for a in argv]
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items())
    cmd = (shown + " " if shown else "") + " ".join(shlex.quote(a) for a in argv)
    outf, errf = ctx.rundir / f"{tag}.out", ctx.rundir / f"{tag}.err"
    if ctx.deadline and time.time() >= ctx.deadline:
        print(f"\n======== {tag}: NOT RUN (time budget spent)\n$ {cmd}")
        return Run(tag, argv, shown, 125, "", "not run: time budget spent\n", 0.0)
    t0 = time.monotonic()
    with open(outf, "wb") as fo, open(errf, "wb") as fe:
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                 env={**ctx.env, **extra}, start_new_session=True)
        except OSError as e:
            fe.write(f"cannot start: {e}\n".encode())
            rc = 127
        else:
            try:
                rc = p.wait(timeout=ctx.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                rc = 124
            if rc < 0:
                rc = 128 - rc
    secs = time.monotonic() - t0
    r = Run(tag, argv, shown, rc, outf.read_text(errors="replace"), errf.read_text(errors="replace"), secs)
    if ctx.args.csv and r.lines:  # e.g. nvidia-smi --format=csv,noheader: "4096, 0"
        r.fields = dict(zip(ctx.args.csv.split(","), (f.strip() for f in r.lines[0].split(","))))
    print(f"\n======== {tag} (rc={rc}, {secs:.1f} s)\n$ {cmd}")
    if rc == 124:
        print(f"(killed by timeout after {ctx.timeout:g}s)")
    show_text("stdout", r.out, 200, 60)
    show_text("stderr", r.err, 120, 80)
    return r


def prog_name(ctx, argv):
    """The NAME of the last line "NAME: OK": --name, else the program's (or script's) file name."""
    if ctx.args.name:
        return ctx.args.name
    for a in argv:
        if str(a).endswith(".py"):
            return Path(a).stem
    return Path(argv[0]).name


def ran_ok(ctx, r, name):
    """(True, '') when r exited 0 with the last stdout line "NAME: OK", else (False, why)."""
    last = r.lines[-1] if r.lines else ""
    if r.rc == 0 and last == f"{name}: OK":
        return True, ""
    why = f"rc={r.rc}, last line: '{last[:100]}'"
    if r.rc == 124:
        why = f"timed out after {ctx.timeout:g}s"
    if r.rc == 125:
        why = "not run: time budget spent"
    errs = [l for l in r.err.splitlines() if re.search(r"FAIL|[Ee]rror", l) and "gpumem: trace" not in l]
    if errs:
        why += f"; stderr: {errs[-1][:120]}"
    return False, why


def leak(r):
    """(bytes, allocs, number of LEAK SUMMARY lines) of the last exit report on stderr, or None."""
    found = LEAK_RE.findall(r.err)
    if not found:
        return None
    return int(found[-1][0]), int(found[-1][1]), len(found)


def leak_text(r):
    lk = leak(r)
    if not lk:
        return "no LEAK SUMMARY line on stderr"
    t = f"{lk[0]} B in {lk[1]} allocs"
    return t + (f" (last of {lk[2]} LEAK SUMMARY lines)" if lk[2] > 1 else "")


def kv(r, key):
    """The value of KEY=value on stdout (last occurrence), or of the --csv field KEY, or None."""
    if key in r.fields:
        return r.fields[key]
    found = re.findall(r"(?:^|\s)" + re.escape(key) + r"=(\S+)", r.out)
    return found[-1] if found else None


def pairs(items):
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep:
            raise SystemExit(f"run_check: expected KEY=VALUE, got {it!r}")
        out[k] = v
    return out


# ------------------------------------------------------------------------------------- readiness
def need_gpu(ctx):
    """SKIP when this machine has no usable CUDA device, unless GPU_CHECK_REQUIRE_GPU=1 (gpu-check
    sets it: on the GPU machine a missing device is a failure the checks themselves will show)."""
    if os.environ.get("GPU_CHECK_REQUIRE_GPU") == "1":
        return
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        n = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(n)) != 0 or n.value < 1:
            raise OSError("cuInit/cuDeviceGetCount: no device")
    except (OSError, AttributeError) as e:
        raise Done("SKIP", f"no CUDA device here ({e})")


def gpu_count():
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        n = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(n)) != 0:
            return 0
        return n.value
    except (OSError, AttributeError):
        return 0


def need_gpus(ctx, want):
    """SKIP when fewer than `want` GPUs are visible, also under GPU_CHECK_REQUIRE_GPU=1: a machine
    of one GPU is a valid place for gpu-check, and these checks say what they need."""
    if not want or want <= 1:
        return
    have = gpu_count()
    if have < want:
        raise Done("SKIP", f"needs {want} GPUs, this machine has {have} (run on nvidia-h200-x2 or larger)")


def need_module(ctx, module, python):
    if not module:
        return
    try:
        p = subprocess.run([python, "-c", f"import {module}; print({module}.__version__)"],
                           capture_output=True, text=True, timeout=120, env=ctx.env)
        ok = p.returncode == 0
        msg = (p.stdout + p.stderr).strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, msg = False, [str(e)]
    print(f"{module}: {msg[-1] if msg else '?'}")
    if not ok:
        raise Done("SKIP", f"{Path(python).name} cannot import {module}")


# ------------------------------------------------------------------------------------- expectations
def expectations(ctx, r, parts):
    """Holds run r to the expectation options; appends what the detail line shows to parts."""
    a = ctx.args
    for k in a.show or []:
        parts.append(f"{k}={kv(r, k) or '?'}")
    if a.ok:
        ok, why = ran_ok(ctx, r, prog_name(ctx, r.argv))
        if not ok:
            fail("; ".join(parts + [why]))
    if a.rc is not None and r.rc != a.rc:
        tail = r.err.strip().splitlines()[-1:] or [""]
        fail(f"rc={r.rc}, expected {a.rc}: {tail[0][:100]}")
    for rx in a.grab or []:
        m = re.search(rx, r.out, re.M)
        if not m:
            fail(f"no stdout line matches '{rx}' (rc={r.rc})")
        parts.append(m.group(1) if m.groups() else m.group(0))
    for rx in a.grab_stderr or []:
        m = re.search(rx, r.err, re.M)
        if not m:
            fail(f"no stderr line matches '{rx}' (rc={r.rc})")
        parts.append(m.group(1) if m.groups() else m.group(0))
    for k, want in pairs(a.expect).items():
        got = kv(r, k)
        if got != want:
            fail("; ".join(parts + [f"{k}={got or 'none'}, expected {want}"]))
    for k, least in pairs(a.min).items():
        got = kv(r, k)
        try:
            good = got is not None and float(got) >= float(least)
        except ValueError:
            good = False
        if not good:
            fail("; ".join(parts + [f"expected {k} >= {least}, got {got or 'none'}"]))
    for rx in a.stdout_has or []:
        if not re.search(rx, r.out, re.M):
            fail(f"no stdout line matches '{rx}'")
    for rx in a.stderr_has or []:
        if not re.search(rx, r.err, re.M):
            fail(f"no stderr line matches '{rx}'; {leak_text(r)}")
    for rx, n in a.stderr_count or []:
        got = sum(1 for line in r.err.splitlines() if re.search(rx, line))
        if got != int(n):
            fail(f"{got} stderr lines match '{rx}', expected {n}")
    for start, end, rx, n in a.between or []:
        inside, got = False, 0
        for line in r.err.splitlines():
            if not inside and start in line:
                inside = True
            elif inside and end in line:
                break
            elif inside and re.search(rx, line):
                got += 1
        if got != int(n):
            fail(f"{got} stderr lines match '{rx}' between '{start}' and '{end}', expected {n}; "
                 f"rc={r.rc}; " + "; ".join(f"{m[0]} B in {m[1]} allocs" for m in LEAK_RE.findall(r.err)))
    if a.planted is not None:
        eb, ea = kv(r, "expected_leak_bytes"), kv(r, "expected_leak_allocs")
        if eb is None or ea is None:
            fail("the program printed no expected_leak_* line")
        if int(ea) != a.planted:
            fail(f"the program says it planted {ea} leaks, the check asks for {a.planted}")
        lk = leak(r)
        if not lk:
            fail(f"no LEAK SUMMARY line; expected {eb} B in {ea} allocs")
        if (lk[0], lk[1]) != (int(eb), int(ea)):
            fail(f"expected {eb} B in {ea} allocs, report says {leak_text(r)}")
        parts.append(f"{leak_text(r)} = expected")
    if a.report not in (None, "off"):
        lk = leak(r)
        if not lk:
            fail(f"no LEAK SUMMARY on stderr: was the shim loaded? (rc={r.rc})")
        if a.report != "any":
            b, _, n = a.report.partition("/")
            if lk[0] != int(b) or (n and lk[1] != int(n)):
                want = f"{b} B" + (f" in {n} allocs" if n else "")
                fail(f"expected {want}, report says {leak_text(r)}")
    if a.max_report_percent is not None:
        m = re.search(r"exit report written in ([0-9.]+) ms", r.err)
        sup = re.search(r"Suppressed: [0-9]+ bytes in [0-9]+ allocations", r.err)
        sup = sup.group(0) if sup else "nothing suppressed"
        if not m:
            fail(f"no 'exit report written' line; {leak_text(r)}")
        ms, wall = float(m.group(1)), r.secs * 1000
        ratio = 100 * ms / wall
        parts.append(f"report {m.group(1)} ms of {wall:.0f} ms wall = {ratio:.4f} %; {sup}")
        if ratio > a.max_report_percent:
            fail("; ".join(parts + [f"over {a.max_report_percent} %"]))


def report_detail(r):
    return f"report: {leak_text(r)}"


def plot(ctx):
    """--plot TRACE PNG: the timeline plot of a GPUMEM_TRACE file (information; never fails)."""
    if not ctx.args.plot:
        return
    trace, png = (Path(ctx.subst(p)) for p in ctx.args.plot)
    tool = Path(ctx.args.report_tool or "")
    if tool.is_file() and trace.is_file():
        p = subprocess.run([sys.executable, str(tool), "plot", str(trace), str(png)],
                           capture_output=True, text=True, env=ctx.env)
        print(f"\n$ gpumem-report plot {trace} {png}: rc={p.returncode}\n{p.stdout}{p.stderr}")


def save_stderr(ctx, r):
    if ctx.args.save_stderr:
        (ctx.out / ctx.args.save_stderr).write_text(r.err)


# ------------------------------------------------------------------------------------- checks
def check_built(ctx, prog):
    names = []
    for p in prog:
        if not (os.path.isfile(p) and os.access(p, os.X_OK)):
            fail(f"{Path(p).name} was not built (see the build log)")
        names.append(Path(p).name)
    raise Done("PASS", ", ".join(names))


def tool(argv):
    p = subprocess.run(argv, capture_output=True, text=True)
    return p.stdout + p.stderr


def needed(path):
    return re.findall(r"\(NEEDED\).*\[(.*)\]", tool(["readelf", "-d", path]))


def cuda_imports(path):
    syms = [l.split()[-1] for l in tool(["nm", "-D", "--undefined-only", path]).splitlines() if l.split()]
    return [s for s in syms if s.startswith("cuda")]


def check_link_static(ctx, prog):
    path = prog[0]
    if not os.path.isfile(path):
        fail(f"{Path(path).name} was not built")
    need, imports = needed(path), cuda_imports(path)
    print(f"NEEDED: {' '.join(need)}\n{tool(['ldd', path])}")
    if not need:
        fail("readelf found no NEEDED entry: not a dynamic ELF executable?")
    if imports or any("cudart" in n for n in need):
        fail(f"imports: {' '.join(imports) or 'none'}; NEEDED: {' '.join(need)}")
    raise Done("PASS", f"no cuda* import, NEEDED: {' '.join(need)}")


def check_link_shared(ctx, prog):
    path = prog[0]
    if not os.path.isfile(path):
        fail(f"{Path(path).name} was not built")
    need = [n for n in needed(path) if "cudart" in n]
    ldd = tool(["ldd", path])
    print(ldd)
    resolved = [l.strip() for l in ldd.splitlines() if "cudart" in l]
    n = len(cuda_imports(path))
    if need and resolved and not any("not found" in l for l in resolved) and n > 0:
        raise Done("PASS", f"{resolved[0]}; {n} cuda* imports")
    fail(f"NEEDED: {' '.join(need) or 'no libcudart'}; ldd: {' '.join(resolved) or 'nothing'}; {n} cuda* imports")


def check_run(ctx, prog):
    a = ctx.args
    parts = []
    base = None
    if a.also_base:  # information only: what the driver alone answers to the same calls
        base = run_prog(ctx, "base", prog, pairs(a.env))
    r = run_prog(ctx, "shim" if a.preload else "run", prog, {**pairs(a.env), **pairs(a.shim_env)}, shim=a.preload)
    save_stderr(ctx, r)
    plot(ctx)
    expectations(ctx, r, parts)
    if a.report not in (None, "off"):
        parts.append(("report: " if parts else "") + leak_text(r))
    if not parts and not a.detail:
        parts.append(f"{len(r.lines)} stdout lines")
    for k in a.expect_base or []:  # KEY equal with and without the shim
        if base is None:
            raise SystemExit("run_check: --expect-base needs --also-base")
        if kv(r, k) is None or kv(r, k) != kv(base, k):
            fail(f"{k}={kv(r, k) or 'none'} under the shim, {kv(base, k) or 'none'} without it")
        parts.append(f"{k}={kv(r, k)} as without the shim")
    if base is not None and a.expect:
        keys = list(pairs(a.expect))
        parts.append("without the shim: " + ", ".join(f"{k}={kv(base, k) or 'none'}" for k in keys))
    if a.detail:
        parts.append(a.detail)
    raise Done("PASS", "; ".join(parts))


def check_same(ctx, prog):
    a = ctx.args
    name = prog_name(ctx, prog)
    base = run_prog(ctx, "base", prog, pairs(a.env))
    shim_argv = list(prog) + list(a.shim_arg or [])
    r = run_prog(ctx, "shim", shim_argv, {**pairs(a.env), **pairs(a.shim_env)}, shim=True)
    save_stderr(ctx, r)
    ok, why = ran_ok(ctx, r, name)
    if not ok:
        fail(why)
    ok, why = ran_ok(ctx, base, name)
    if not ok:
        fail(f"baseline (no shim) failed: {why}")
    parts = []
    if a.report is None:  # the shim was there: its exit report is on stderr (--report off: not asked)
        a.report = "any"
    expectations(ctx, r, parts)
    ignore = [re.compile(rx) for rx in a.ignore or []]
    keep = lambda lines: [l for l in lines if not any(rx.search(l) for rx in ignore)]  # noqa: E731
    bl, sl = keep(base.lines), keep(r.lines)
    if bl != sl:
        import difflib
        diff = list(difflib.unified_diff(bl, sl, "without the shim", "with the shim", lineterm="", n=1))
        print("\n======== stdout with the shim differs from the baseline (lines dropped by --ignore left out)")
        print("\n".join(diff[:80]))
        was = next((l[1:] for l in diff[2:] if l.startswith("-")), "")
        now = next((l[1:] for l in diff[2:] if l.startswith("+")), "")
        fail(f"stdout differs from the baseline: '{was[:68]}' became '{now[:68]}'")
    raise Done("PASS", "; ".join([f"identical stdout ({len(r.lines)} lines)"] + parts + [report_detail(r)]
                                 + ([a.detail] if a.detail else [])))


def check_trace(ctx, prog):
    """The hooked driver entry points per runtime call, between the program's probe markers."""
    r = run_prog(ctx, "trace", list(prog) + ["--probe"], {"GPUMEM_VERBOSE": "3"}, shim=True)
    name = prog_name(ctx, prog)
    order, seen, sec = [], {}, None
    for line in r.err.splitlines():
        m = re.search(rf"{name}: probe begin (.*)$", line)
        if m:
            sec = m.group(1)
            order.append(sec)
            seen.setdefault(sec, [])
            continue
        if re.search(rf"{name}: probe end ", line):
            sec = None
            continue
        m = re.search(r"gpumem: trace ([^ (:,]+)", line)
        if sec is not None and m and m.group(1) not in seen[sec]:
            seen[sec].append(m.group(1))
    counts = {}
    for ep in re.findall(r"gpumem: trace ([A-Za-z0-9_]+)", r.err):
        counts[ep] = counts.get(ep, 0) + 1
    hooked = sorted(set(re.findall(r"gpumem: getproc ([^ ]+ v[0-9]+) flags=[0-9]+ -> hooked", r.err)))
    passed = len(re.findall(r"gpumem: getproc .* -> passthrough", r.err))
    text = [f"# Hooked driver entry points traced by GPUMEM_VERBOSE=3 between the markers of",
            f"# '{name} --probe' (static cudart), one runtime call (after a warm-up) per section."]
    text += [f"{s + ':':<22}" + (" " + " ".join(seen[s]) if seen[s] else " (none hooked)") for s in order]
    text += ["", "# Every distinct entry point traced in the whole probe run (count):"]
    text += [f"{n:7d} {ep}" for ep, n in sorted(counts.items(), key=lambda kv_: -kv_[1])]
    text += ["", "# cuGetProcAddress lookups answered with a hook:"] + [f"  {h}" for h in hooked]
    text += [f"# lookups passed through: {passed}"]
    (ctx.out / "entry-points.txt").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    ok, why = ran_ok(ctx, r, name)
    if not ok:
        fail(why)
    if not counts:
        fail("no 'gpumem: trace' line on stderr")
    got = {}
    for call, ep in ctx.args.section_has or []:
        eps = seen.get(call, [])
        got[call] = " ".join(eps)
        if not any(e.startswith(ep) for e in eps):
            fail("expected " + ", ".join(f"{e}* under {c}" for c, e in ctx.args.section_has)
                 + "; " + "; ".join(f"{c} -> {' '.join(seen.get(c, [])) or 'nothing'}" for c, _ in ctx.args.section_has))
    raise Done("PASS", "; ".join(f"{c} -> {v}" for c, v in got.items()))


def check_leakinfo(ctx, prog):
    """Information: the exit report of each --case (LABEL [KEY=VALUE...]); PASS when all have one."""
    runs = []
    for i, case in enumerate(ctx.args.case or [["shim"]]):
        runs.append((case[0], run_prog(ctx, f"case{i}", prog, pairs(case[1:]), shim=True)))
    text = "; ".join(f"{label}: {leak_text(r)}" for label, r in runs)
    if all(leak(r) for _, r in runs):
        raise Done("PASS", text + (f" ({ctx.args.detail})" if ctx.args.detail else ""))
    fail(text)


def check_bench(ctx, prog):
    """A benchmark program (gpumem-bench MODE, or a script); its output is appended to OUT/bench.txt
    (benchmarks run one at a time). --show KEY puts KEY=value of its stdout in the detail line."""
    if not os.path.isfile(prog[0]):
        raise Done("SKIP", f"{prog[0]} not built")
    ctx.timeout = float(os.environ.get("BENCH_TIMEOUT") or ctx.args.bench_timeout or 120)
    r = run_prog(ctx, "bench", prog)
    script = [Path(p).name for p in prog if str(p).endswith(".py")]
    title = script[0] if script else f"gpumem-bench {' '.join(prog[1:])}"
    with open(ctx.out / "bench.txt", "a") as f:
        f.write(f"======== {title} ({time.strftime('%H:%M:%S', time.gmtime())} UTC)\n")
        f.write(r.out + r.err)
        f.write(f"(rc={r.rc}, {r.secs:.0f} s)\n\n")
    shown = [f"{k}={kv(r, k) or '?'}" for k in ctx.args.show or []]
    if r.rc == 0:
        raise Done("PASS", "; ".join(shown + [f"{r.secs:.0f} s, output in bench.txt"]))
    tail = (r.out + r.err).strip().splitlines()[-1:] or [""]
    if r.rc == SKIP_RC:  # a benchmark of a framework that is not installed here
        raise Done("SKIP", re.sub(r"^SKIP:\s*", "", tail[0])[:120])
    fail(f"rc={r.rc}, {tail[0][:100]}")


# ------------------------------------------------------------------------------------- summary
def summary(paths, out, note=None):
    """The table of one or more meson testlog.json files: RES TEST DETAIL (the RESULT line), then
    the counts; exit status 0 when there are results and none failed (SKIPs allowed)."""
    rows = []
    for path in paths:
        if not os.path.isfile(path):
            continue
        for line in open(path):
            t = json.loads(line)
            res = {"EXPECTEDFAIL": "FAIL", "UNEXPECTEDPASS": "FAIL"}.get(t["result"], t["result"])
            found = re.findall(r"^RESULT (?:PASS|FAIL|SKIP): (.*)$", t.get("stdout") or "", re.M)
            detail = found[-1] if found else f"rc={t.get('returncode')} (no RESULT line)"
            # meson 1.0: "gpumem:gpu / alloc_static_same"; newer: "gpu - gpumem:alloc_static_same"
            name = t["name"]
            name = name.split(" / ", 1)[1] if " / " in name else name.rsplit(":", 1)[-1]
            rows.append((t.get("starttime", 0), res, name, detail))
    rows.sort()
    width = max([len(r[2]) for r in rows] + [4])
    text = [f"{'RES':<7} {'TEST':<{width}}  DETAIL", f"{'-' * 7} {'-' * width}  ------"]
    text += [f"{res:<7} {name:<{width}}  {detail}" for _, res, name, detail in rows]
    n = {k: sum(1 for r in rows if r[1] == k) for k in ("OK", "SKIP")}
    bad = len(rows) - n["OK"] - n["SKIP"]
    text.append(f"gpu-check: {n['OK']} passed, {bad} failed, {n['SKIP']} skipped" + (f" {note}" if note else ""))
    out.write("\n".join(text) + "\n")
    return 0 if rows and bad == 0 else 1


# ------------------------------------------------------------------------------------- main
CHECKS = {"built": check_built, "link-static": check_link_static, "link-shared": check_link_shared,
          "run": check_run, "same": check_same, "trace": check_trace, "leakinfo": check_leakinfo,
          "bench": check_bench}
NO_GPU = ("built", "link-static", "link-shared")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("check", choices=sorted(CHECKS) + ["summary"])
    ap.add_argument("--test", help="the meson test's name (names the folder of its run files)")
    ap.add_argument("--work", default=".", help="working folder: TMPDIR, caches, runs/ (in the build dir)")
    ap.add_argument("--shim", default="", help="libgpumem_shim.so to preload")
    ap.add_argument("--meson-lib-dir", action="append", metavar="DIR",
                    help="a folder meson put in front of LD_LIBRARY_PATH, taken out again")
    ap.add_argument("--name", help="NAME of the final 'NAME: OK' line (default: the program's file name)")
    ap.add_argument("--needs-module", help="SKIP unless the program's Python can import this module")
    ap.add_argument("--needs-gpus", type=int, default=0, help="SKIP unless this many GPUs are visible")
    ap.add_argument("--preload", action="store_true", help="run: with the shim preloaded")
    ap.add_argument("--env", action="append", metavar="K=V", help="for every run of the check")
    ap.add_argument("--shim-env", action="append", metavar="K=V", help="for the run under the shim only")
    ap.add_argument("--shim-arg", action="append", metavar="ARG", help="same: appended to the shim run's arguments")
    ap.add_argument("--ignore", action="append", metavar="REGEX", help="same: stdout lines left out of the comparison")
    ap.add_argument("--also-base", action="store_true", help="run: also run without the shim (shown, not judged)")
    ap.add_argument("--ok", action="store_true")
    ap.add_argument("--rc", type=int)
    ap.add_argument("--report")
    ap.add_argument("--planted", type=int)
    ap.add_argument("--expect", action="append", metavar="KEY=VALUE")
    ap.add_argument("--min", action="append", metavar="KEY=NUMBER")
    ap.add_argument("--csv", metavar="KEY,KEY...", help="name the first stdout line's comma-separated fields (as KEY=value)")
    ap.add_argument("--expect-base", action="append", metavar="KEY", help="run --also-base: KEY equal without the shim")
    ap.add_argument("--show", action="append", metavar="KEY")
    ap.add_argument("--grab", action="append", metavar="REGEX")
    ap.add_argument("--grab-stderr", action="append", metavar="REGEX")
    ap.add_argument("--stdout-has", action="append", metavar="REGEX")
    ap.add_argument("--stderr-has", action="append", metavar="REGEX")
    ap.add_argument("--stderr-count", action="append", nargs=2, metavar=("REGEX", "N"))
    ap.add_argument("--between", action="append", nargs=4, metavar=("START", "END", "REGEX", "N"))
    ap.add_argument("--max-report-percent", type=float)
    ap.add_argument("--section-has", action="append", nargs=2, metavar=("CALL", "ENTRY"))
    ap.add_argument("--case", action="append", nargs="+", metavar="LABEL [K=V]")
    ap.add_argument("--save-stderr", metavar="FILE", help="copy the checked run's stderr to OUT/FILE")
    ap.add_argument("--plot", nargs=2, metavar=("TRACE", "PNG"))
    ap.add_argument("--report-tool", help="scripts/gpumem-report, for --plot")
    ap.add_argument("--detail", help="text added to the detail line")
    ap.add_argument("--bench-timeout", type=float, help="bench: s for the program (default 120; BENCH_TIMEOUT wins)")
    # Everything after the first "--" is the program and its arguments (summary: testlog files),
    # split off here: argparse mixes a list positional up with options given before it.
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    args.prog = argv[cut + 1:]
    return args


def main(argv):
    args = parse(argv)
    if args.check == "summary":
        return summary(args.prog, sys.stdout, args.detail)
    if not args.prog:
        raise SystemExit("run_check: no program given (after --)")
    # Paths of built programs are relative to the build folder (meson's working directory).
    args.prog = [os.path.abspath(p) if "/" in p and os.path.exists(p) else p for p in args.prog]
    ctx = Ctx(args)
    status, detail = "FAIL", "?"
    try:
        if args.check not in NO_GPU:
            need_gpu(ctx)
            need_gpus(ctx, args.needs_gpus)
        python = next((p for p in args.prog if not str(p).endswith(".py")), sys.executable)
        need_module(ctx, args.needs_module, python if args.needs_module else None)
        CHECKS[args.check](ctx, args.prog)
    except Done as d:
        status, detail = d.status, d.detail
    print(f"\nRESULT {status}: {detail}")
    return {"PASS": 0, "FAIL": 1, "SKIP": SKIP_RC}[status]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
