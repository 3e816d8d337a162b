#!/usr/bin/env bash
# gpu-check.sh: the GPU proof of gpumem. Run from anywhere on a machine with an NVIDIA GPU, nvcc,
# meson, ninja and python3 (PyTorch and CuPy for their checks; Criterion is not needed):
#
#     scripts/gpu-check.sh
#
# It configures build-gpu/ (release, -Dtests=disabled: the fake-driver suites need Criterion;
# -Dgpu_tests=enabled), builds the library, the shim and the GPU programs, then runs
#   meson test --suite gpu                      the checks: tests/gpu/meson.build lists each one,
#                                               the program it runs and the numbers it must show
#   meson test --benchmark --suite gpu-bench    every gpumem-bench mode, one at a time, and the
#                                               frameworks benchmark (about 3 minutes)
# and prints the table of results last. Every check runs even after another failed.
#
# Output: progress on stdout, then the table. Files under $OUT (default /tmp/gpumem-out):
#   gpu-check.log     the machine, the build output, and meson's logs of both runs (every command,
#                     its exit status, stdout and stderr, long ones cut; the whole files of each
#                     run stay in build-gpu/tests/gpu/work/runs/)
#   summary.txt       the table
#   entry-points.txt  the hooked driver entry points seen per runtime call (GPUMEM_VERBOSE=3)
#   bench.txt         gpumem-bench output, every mode
#   torch-report.txt, torch-trace.json, torch-memory.png: PyTorch's exit report, trace and plot
#   frameworks.json   every figure of the frameworks benchmark (tests/gpu/bench_frameworks.py:
#                     PyTorch and JAX training loops with and without the shim, in bench.txt too)
# Nothing else is written outside the repository (TMPDIR and the caches point into build-gpu*/).
# Knobs: NVCC, GPU_ARCH (sm_90), PYTHON (python3), RUN_TIMEOUT (s, one program run; 120),
# GPU_CHECK_BUDGET_S (s, 510: program runs not started by then fail as "not run"), GPU_CHECK_JOBS
# (checks run at once; 4), GPU_CHECK_PARTS (all, checks or bench: run only the checks or only the
# benchmarks, for a machine whose calls are limited to 10 minutes; the table lists what ran),
# GPU_CHECK_TESTS (names of checks and benchmarks, space-separated: only those run). Exit status: 0 when every check passed (SKIPs allowed), 1 otherwise.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 1
cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/gpumem-out}
B=build-gpu
W=$ROOT/build-gpucheck # TMPDIR and caches of the build itself (the checks have theirs in $B)
LOG=$OUT/gpu-check.log
mkdir -p "$OUT" "$W/tmp" "$W/cache" || exit 1
rm -f "$LOG" "$OUT"/{summary.txt,entry-points.txt,bench.txt,torch-report.txt,torch-trace.json,torch-memory.png}
rm -f "$OUT/frameworks.json"
say() { printf '%s\n' "$*" | tee -a "$LOG"; }

# A reproducible environment: no gpumem setting or preload from the caller, caches in the repo.
# (tests/gpu/run_check.py does the same again for every program it starts.)
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep -E '^GPUMEM_')
unset LD_PRELOAD PYTORCH_NO_CUDA_MEMORY_CACHING PYTORCH_CUDA_ALLOC_CONF PYTORCH_ALLOC_CONF CUPY_GPU_MEMORY_LIMIT
export TMPDIR=$W/tmp CUPY_CACHE_DIR=$W/cache/cupy CUDA_CACHE_PATH=$W/cache/cuda XDG_CACHE_HOME=$W/cache/xdg
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# NVLink multicast stays off on the multi-GPU machines (a program using it can take the host's
# shared GPUs out of service); run_check.py sets the same for every program it starts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -n "${NVCC:-}" ]; then
    PATH=$(dirname "$NVCC"):$PATH
elif ! command -v nvcc >/dev/null 2>&1; then
    PATH=/usr/local/cuda/bin:$PATH
fi
export PATH
PY=$(command -v "${PYTHON:-python3}") || { say "gpu-check: no ${PYTHON:-python3}"; exit 1; }
printf '[binaries]\npython3 = %s\n' "'$PY'" >"$W/native.ini"

say "gpu-check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n) in $ROOT"
{
    echo "OUT=$OUT"
    echo "nvcc: $(command -v nvcc) ($(nvcc --version 2>/dev/null | grep -m1 release))"
    command -v nvidia-smi >/dev/null 2>&1 &&
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1
    echo "python: $PY ($("$PY" --version 2>&1)); meson $(meson --version 2>&1); ninja $(ninja --version 2>&1)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo none) $(git status --short 2>/dev/null | wc -l) changed files"
} >>"$LOG" 2>&1

# ------------------------------------------------------------------------------------- build
# uthash comes from .carry/uthash where the machine has no uthash-dev. -k 0: a program that does
# not build fails its own build check (and the checks that run it); the others still run.
setup=()
[ -f "$B/build.ninja" ] && setup=(--reconfigure)
say "building gpumem and the GPU programs (meson + ninja) ..."
{
    timeout 300 meson setup ${setup[@]+"${setup[@]}"} "$B" --buildtype=release -Dtests=disabled \
        -Dgpu_tests=enabled -Dgpu_arch="${GPU_ARCH:-sm_90}" -Duthash_include="$ROOT/.carry/uthash" \
        --native-file "$W/native.ini" && timeout 600 ninja -C "$B" -k 0 all gpu-programs
} >"$W/build.txt" 2>&1
build_rc=$?
{ echo; echo "======== build (rc=$build_rc)"; cat "$W/build.txt"; } >>"$LOG"
if [ ! -f "$B/build.ninja" ]; then
    tail -n 30 "$W/build.txt"
    printf 'FAIL    build gpumem (meson setup)  rc=%s: %s\n' "$build_rc" \
        "$(grep -m1 -E 'ERROR|error' "$W/build.txt" | cut -c1-120)" | tee "$OUT/summary.txt" | tee -a "$LOG"
    exit 1
fi
[ "$build_rc" = 0 ] || { say "the build failed (rc=$build_rc), its errors:"; grep -E 'error|FAILED' "$W/build.txt" | head -n 20; }

# ------------------------------------------------------------------------------------- checks
# The runner fails a program run that would start after the deadline ("not run") and one that runs
# past RUN_TIMEOUT; meson's own timeout per test (tests/gpu/meson.build) is the last resort.
export GPU_CHECK_REQUIRE_GPU=1 GPU_CHECK_OUT=$OUT GPU_CHECK_RUN_TIMEOUT=${RUN_TIMEOUT:-120}
export GPU_CHECK_DEADLINE=$(($(date +%s) - SECONDS + ${GPU_CHECK_BUDGET_S:-510}))
PARTS=${GPU_CHECK_PARTS:-all}
case $PARTS in all | checks | bench) ;; *)
    say "gpu-check: GPU_CHECK_PARTS=$PARTS: accepted are all, checks, bench"
    exit 2 ;;
esac
checks=() benches=()
for t in ${GPU_CHECK_TESTS:-}; do
    case $t in bench_*) benches+=("$t") ;; *) checks+=("$t") ;; esac
done
logs=()
if [ "$PARTS" != bench ] && { [ -z "${GPU_CHECK_TESTS:-}" ] || [ ${#checks[@]} -gt 0 ]; }; then
    say "running the gpu suite ..."
    meson test -C "$B" --no-rebuild --suite gpu --num-processes "${GPU_CHECK_JOBS:-4}" ${checks[@]+"${checks[@]}"}
    logs+=(testlog)
fi
if [ "$PARTS" != checks ] && { [ -z "${GPU_CHECK_TESTS:-}" ] || [ ${#benches[@]} -gt 0 ]; }; then
    say "running the gpu-bench benchmarks ..."
    meson test -C "$B" --no-rebuild --benchmark --suite gpu-bench --logbase benchlog ${benches[@]+"${benches[@]}"}
    logs+=(benchlog)
fi
for f in "${logs[@]}"; do
    { echo; echo "======== $B/meson-logs/$f.txt"; cat "$B/meson-logs/$f.txt"; } >>"$LOG" 2>&1
done
runs=$B/tests/gpu/work/runs
if [ -f "$runs/torch_baseline/run.out" ] && [ -f "$runs/torch_nocache_baseline/run.out" ] &&
    ! cmp -s "$runs/torch_baseline/run.out" "$runs/torch_nocache_baseline/run.out"; then
    say "note: torch output differs between caching on and off even without the shim (each is compared to its own baseline)"
fi

# ------------------------------------------------------------------------------------- the table
jsons=()
for f in "${logs[@]}"; do jsons+=("$B/meson-logs/$f.json"); done
"$PY" tests/gpu/run_check.py summary --detail "in ${SECONDS}s" -- "${jsons[@]}" >"$OUT/summary.txt"
rc=$?
if [ "$build_rc" != 0 ]; then
    echo "gpu-check: the build failed (rc=$build_rc): see gpu-check.log" >>"$OUT/summary.txt"
    rc=1
fi
{ echo; echo "======== summary"; cat "$OUT/summary.txt"; } >>"$LOG"
echo
cat "$OUT/summary.txt"
exit "$rc"
