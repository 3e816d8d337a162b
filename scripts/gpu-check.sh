#!/usr/bin/env bash
# shellcheck disable=SC2317  # the checks are called indirectly, through step
# gpu-check.sh: the GPU proof harness for gpumem. Run from anywhere on a machine with an NVIDIA GPU,
# nvcc, meson, ninja and python3 (PyTorch and CuPy for their checks):
#
#     scripts/gpu-check.sh
#
# It builds the shim (build-gpu/) and the test programs of tests/gpu (build-gpucheck/), runs each
# program without and with LD_PRELOAD=build-gpu/shim/libgpumem_shim.so, and checks that the shim
# changes nothing the program can see (identical stdout), that its exit report counts leaks exactly,
# that GPUMEM_LIMIT turns into the out-of-memory errors programs expect, and that cudaFree keeps its
# barrier in strict mode. Every check runs even after a failure; the table of results comes last.
#
# Output: progress on stdout, then the table. Files under $OUT (default /tmp/gpumem-out):
#   gpu-check.log     every command, its exit status, stdout and (long ones cut) stderr
#   summary.txt       the table
#   entry-points.txt  the hooked driver entry points seen per runtime call (GPUMEM_VERBOSE=3)
#   bench.txt         gpumem-bench gpu / pool output, when build-gpu/tests/gpumem-bench exists
# Nothing else is written outside the repository (TMPDIR and the JIT caches point into
# build-gpucheck/). Environment knobs: NVCC, GPU_ARCH (sm_90), PYTHON (python3), RUN_TIMEOUT (s, one
# program run), GPU_CHECK_BUDGET_S (s; runs not started by then are failed as "not run").
# Exit status: 0 when every check passed (SKIPs allowed), 1 otherwise.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 1
cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/gpumem-out}
mkdir -p "$OUT" || exit 1

W=$ROOT/build-gpucheck
BIN=$W/bin
LOGS=$W/logs
LOG=$OUT/gpu-check.log
SUMMARY=$OUT/summary.txt
EPFILE=$OUT/entry-points.txt
BENCHFILE=$OUT/bench.txt
SHIM=$ROOT/build-gpu/shim/libgpumem_shim.so
BENCH_BIN=$ROOT/build-gpu/tests/gpumem-bench
ARCH=${GPU_ARCH:-sm_90}
PY=${PYTHON:-python3}
RUN_TIMEOUT=${RUN_TIMEOUT:-120}
BUDGET=${GPU_CHECK_BUDGET_S:-510}
AC_S=$BIN/alloc_check_static
AC_D=$BIN/alloc_check_shared
DC=$BIN/driver_check
TORCH_PY=$ROOT/tests/gpu/torch_check.py
CUPY_PY=$ROOT/tests/gpu/cupy_check.py
PS=$BIN/physics_sim
RB=$BIN/readback_bench
SC=$BIN/staging_check
IC=$BIN/ipc_check
IP=$BIN/identity_probe
SP=$BIN/semantics_probe
TORCH_IPC_PY=$ROOT/tests/gpu/torch_ipc_check.py
CUPY_IPC_PY=$ROOT/tests/gpu/cupy_ipc_check.py
LIBDIR=$ROOT/build-gpu/manager

rm -rf "$BIN" "$LOGS" "$W/tmp"
mkdir -p "$BIN" "$LOGS" "$W/tmp" "$W/cache" || exit 1
rm -f "$LOG" "$SUMMARY" "$EPFILE" "$BENCHFILE"
: >"$LOG"

# A reproducible environment: no gpumem setting or preload from the caller, caches in the repo.
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep -E '^GPUMEM_')
unset LD_PRELOAD PYTORCH_NO_CUDA_MEMORY_CACHING PYTORCH_CUDA_ALLOC_CONF PYTORCH_ALLOC_CONF CUPY_GPU_MEMORY_LIMIT
export TMPDIR=$W/tmp
export CUPY_CACHE_DIR=$W/cache/cupy CUDA_CACHE_PATH=$W/cache/cuda XDG_CACHE_HOME=$W/cache/xdg
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
    if command -v nvcc >/dev/null 2>&1; then NVCC=$(command -v nvcc); else NVCC=/usr/local/cuda/bin/nvcc; fi
fi
CUDA_HOME_DIR=$(dirname "$(dirname "$(readlink -f "$NVCC" 2>/dev/null || echo "$NVCC")")")

# ------------------------------------------------------------------------------------- results
NAMES=()
STATUS=()
DETAILS=()
BUILD_FAILED=0

say() { printf '%s\n' "$*"; printf '%s\n' "$*" >>"$LOG"; }

record() { # record NAME PASS|FAIL|SKIP DETAIL
    NAMES+=("$1")
    STATUS+=("$2")
    DETAILS+=("$3")
    say "[$2] $1: $3"
}

# step NAME FUNCTION: run one check (a function that calls `record NAME ...` exactly once); after a
# failed gpumem build every check is recorded FAIL without running.
step() {
    if [ "$BUILD_FAILED" = 1 ]; then
        record "$1" FAIL "not run: the gpumem build failed"
        return
    fi
    "$2" "$1"
}

# Append a file to the log, long ones cut to their first and last lines.
log_file() { # log_file TITLE FILE [HEAD] [TAIL]
    local title=$1 f=$2 head=${3:-150} tail=${4:-80} n
    [ -f "$f" ] || { printf -- '-------- %s: (no file)\n' "$title" >>"$LOG"; return; }
    n=$(wc -l <"$f")
    if [ "$n" -le $((head + tail)) ]; then
        printf -- '-------- %s (%s lines)\n' "$title" "$n"
        cat "$f"
    else
        printf -- '-------- %s (%s lines; first %s and last %s shown)\n' "$title" "$n" "$head" "$tail"
        head -n "$head" "$f"
        printf -- '[... %s lines left out ...]\n' $((n - head - tail))
        tail -n "$tail" "$f"
    fi >>"$LOG"
}

# R TAG COMMAND [ARGS...]: run once per TAG (later calls reuse the result), stdout and stderr to
# $LOGS/TAG.out / .err, exit status in TAG.rc; returns the exit status.
R() {
    local tag=$1
    shift
    if [ -f "$LOGS/$tag.rc" ]; then return "$(cat "$LOGS/$tag.rc")"; fi
    if [ "$SECONDS" -ge "$BUDGET" ]; then
        echo "not run: time budget of ${BUDGET}s spent" >"$LOGS/$tag.out"
        : >"$LOGS/$tag.err"
        echo 125 >"$LOGS/$tag.rc"
        printf '======== %s: NOT RUN (budget spent): %s\n' "$tag" "$*" >>"$LOG"
        return 125
    fi
    local t0=$SECONDS rc
    printf '%s ' "  running $tag ..."
    timeout -k 10 "$RUN_TIMEOUT" "$@" >"$LOGS/$tag.out" 2>"$LOGS/$tag.err" </dev/null
    rc=$?
    echo "$rc" >"$LOGS/$tag.rc"
    echo "rc=$rc, $((SECONDS - t0)) s"
    {
        printf '\n======== %s (rc=%s, %s s)\n$ %s\n' "$tag" "$rc" $((SECONDS - t0)) "$*"
        [ "$rc" = 124 ] && echo "(killed by timeout after ${RUN_TIMEOUT}s)"
    } >>"$LOG"
    log_file "stdout" "$LOGS/$tag.out" 200 60
    log_file "stderr" "$LOGS/$tag.err" 120 80
    return "$rc"
}

rc_of() { cat "$LOGS/$1.rc" 2>/dev/null || echo 255; }
out_of() { printf '%s' "$LOGS/$1.out"; }
err_of() { printf '%s' "$LOGS/$1.err"; }

# ran_ok TAG PROGNAME: exit 0 and the last stdout line is "PROGNAME: OK". Sets WHY when not.
ran_ok() {
    local tag=$1 prog=$2 rc last
    rc=$(rc_of "$tag")
    last=$(tail -n 1 "$(out_of "$tag")" 2>/dev/null)
    if [ "$rc" = 0 ] && [ "$last" = "$prog: OK" ]; then return 0; fi
    WHY="rc=$rc, last line: '${last:0:100}'"
    [ "$rc" = 124 ] && WHY="timed out after ${RUN_TIMEOUT}s"
    [ "$rc" = 125 ] && WHY="not run: time budget spent"
    local e
    e=$(grep -E "FAIL|[Ee]rror" "$(err_of "$tag")" 2>/dev/null | grep -v 'gpumem: trace' | tail -n 1 | cut -c1-120)
    [ -n "$e" ] && WHY="$WHY; stderr: $e"
    return 1
}

# same_out A B [FILTER-REGEX]: identical stdout (lines matching the regex dropped from both first).
same_out() {
    local a b rc
    a=$(out_of "$1")
    b=$(out_of "$2")
    if [ -n "${3:-}" ]; then
        diff <(grep -vE "$3" "$a") <(grep -vE "$3" "$b") >"$LOGS/diff.$1.$2" 2>&1
        rc=$?
    else
        diff "$a" "$b" >"$LOGS/diff.$1.$2" 2>&1
        rc=$?
    fi
    [ "$rc" = 0 ] && return 0
    printf '\n======== stdout of %s differs from %s\n' "$2" "$1" >>"$LOG"
    head -n 60 "$LOGS/diff.$1.$2" >>"$LOG"
    WHY="stdout differs from $1: '$(grep -m1 -E '^<' "$LOGS/diff.$1.$2" | cut -c3-70)' became '$(grep -m1 -E '^>' "$LOGS/diff.$1.$2" | cut -c3-70)'"
    return 1
}

# leak TAG: sets LK_BYTES, LK_ALLOCS (of the last LEAK SUMMARY line of its stderr) and LK_LINES.
leak() {
    local f re='LEAK SUMMARY: [0-9]+ bytes leaked in [0-9]+ allocations?'
    f=$(err_of "$1")
    LK_LINES=$(grep -cE "$re" "$f" 2>/dev/null)
    LK_BYTES=""
    LK_ALLOCS=""
    [ "${LK_LINES:-0}" -gt 0 ] || { LK_LINES=0; return 1; }
    local line
    line=$(grep -oE "$re" "$f" | tail -n 1)
    LK_BYTES=$(sed -E 's/LEAK SUMMARY: ([0-9]+) bytes.*/\1/' <<<"$line")
    LK_ALLOCS=$(sed -E 's/.* leaked in ([0-9]+) allocation.*/\1/' <<<"$line")
    return 0
}

leak_text() { # a short description of the leak line(s) of TAG
    if leak "$1"; then
        local t="$LK_BYTES B in $LK_ALLOCS allocs"
        [ "$LK_LINES" -gt 1 ] && t="$t (last of $LK_LINES LEAK SUMMARY lines)"
        printf '%s' "$t"
    else
        printf 'no LEAK SUMMARY line on stderr'
    fi
}

kv() { # kv TAG KEY: the value of KEY=value on stdout (last occurrence)
    grep -oE "(^|[[:space:]])$2=[^[:space:]]+" "$(out_of "$1")" 2>/dev/null | tail -n 1 | sed -E "s/^[[:space:]]*$2=//"
}

# ------------------------------------------------------------------------------------- header
say "gpu-check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n) in $ROOT"
{
    echo "OUT=$OUT"
    echo "nvcc: $NVCC ($("$NVCC" --version 2>/dev/null | grep -m1 release))"
    command -v nvidia-smi >/dev/null 2>&1 &&
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1
    echo "python: $("$PY" --version 2>&1)"
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none) $(git -C "$ROOT" status --short 2>/dev/null | wc -l) changed files"
} >>"$LOG" 2>&1

# ------------------------------------------------------------------------------------- builds
build_gpumem() {
    local name=$1 setup=() t0=$SECONDS
    say "building gpumem (meson + ninja) ..."
    [ -f build-gpu/build.ninja ] && setup=(--reconfigure)
    {
        echo
        echo "======== build gpumem"
        echo "\$ meson setup ${setup[*]+${setup[*]}} build-gpu -Dtests=disabled -Duthash_include=$ROOT/.carry/uthash --buildtype=release && ninja -C build-gpu"
    } >>"$LOG"
    (
        timeout 300 meson setup ${setup[@]+"${setup[@]}"} build-gpu -Dtests=disabled \
            -Duthash_include="$ROOT/.carry/uthash" --buildtype=release &&
            timeout 300 ninja -C build-gpu
    ) >"$LOGS/build-gpumem.txt" 2>&1
    local rc=$?
    log_file "meson/ninja output" "$LOGS/build-gpumem.txt" 60 140
    if [ "$rc" = 0 ] && [ -f "$SHIM" ]; then
        record "$name" PASS "$(basename "$SHIM") built in $((SECONDS - t0)) s"
        return 0
    fi
    BUILD_FAILED=1
    say "gpumem build failed (rc=$rc); its last lines:"
    tail -n 40 "$LOGS/build-gpumem.txt"
    local e
    e=$(grep -m1 -E 'error|ERROR' "$LOGS/build-gpumem.txt" | cut -c1-120)
    [ "$rc" = 0 ] && e="ninja succeeded but $SHIM is missing"
    record "$name" FAIL "rc=$rc: ${e:-see gpu-check.log}"
    return 1
}

nvcc_build() { # nvcc_build NAME OUTPUT ARGS...
    local name=$1 out=$2
    shift 2
    printf '\n======== %s\n$ %s\n' "$name" "$NVCC $*" >>"$LOG"
    timeout 300 "$NVCC" "$@" >"$LOGS/$(basename "$out").build.txt" 2>&1
    local rc=$?
    cat "$LOGS/$(basename "$out").build.txt" >>"$LOG"
    if [ "$rc" = 0 ] && [ -x "$out" ]; then
        record "$name" PASS "$(basename "$out")"
    else
        record "$name" FAIL "nvcc rc=$rc: $(grep -m1 -E 'error' "$LOGS/$(basename "$out").build.txt" | cut -c1-120)"
    fi
}

c_build_static() {
    nvcc_build "$1" "$AC_S" -O2 -arch="$ARCH" -o "$AC_S" tests/gpu/alloc_check.cu
}
c_build_shared() {
    nvcc_build "$1" "$AC_D" -O2 -arch="$ARCH" -cudart shared \
        -Xlinker -rpath -Xlinker "$CUDA_HOME_DIR/lib64" -o "$AC_D" tests/gpu/alloc_check.cu
}
RC=$BIN/reset_check
c_build_reset() {
    nvcc_build "$1" "$RC" -O2 -arch="$ARCH" -o "$RC" tests/gpu/reset_check.cu
}
# cudaDeviceReset (cudart 13 reaches the v1 cuDevicePrimaryCtxReset): a leak check point between
# the markers, the leak kept for the exit summary, and memory after the reset works.
c_reset() {
    local name=$1
    [ -x "$RC" ] || { record "$name" FAIL "reset_check was not built"; return; }
    R rc_shim env "LD_PRELOAD=$SHIM" "$RC"
    local err=$LOGS/rc_shim.err rc; rc=$(cat "$LOGS/rc_shim.rc")
    local at_reset; at_reset=$(sed -n '/MARK before-reset/,/MARK after-reset/p' "$err" | grep -c 'leak report (device reset)')
    if [ "$rc" = 0 ] && [ "$at_reset" = 1 ] && grep -q 'LEAK SUMMARY: 3000 bytes leaked in 1 allocations' "$err" &&
        grep -q 'value=7 OK' "$LOGS/rc_shim.out"; then
        record "$name" PASS "report at the reset, 3000 B kept for the exit summary, memory after the reset works"
    else
        record "$name" FAIL "rc=$rc, reports at the reset: $at_reset; $(grep 'LEAK SUMMARY' "$err" | tr '\n' ';')"
    fi
}
c_build_driver() {
    nvcc_build "$1" "$DC" -x c -O2 -o "$DC" tests/gpu/driver_check.c -lcuda
}

c_link_static() {
    local name=$1
    [ -x "$AC_S" ] || { record "$name" FAIL "alloc_check (static) was not built"; return; }
    local imports needed
    imports=$(nm -D --undefined-only "$AC_S" 2>&1 | awk '{print $NF}' | grep -E '^cuda' | tr '\n' ' ')
    needed=$(readelf -d "$AC_S" 2>/dev/null | grep NEEDED | sed -E 's/.*\[(.*)\].*/\1/' | tr '\n' ' ')
    { echo; echo "======== link of $AC_S"; echo "NEEDED: $needed"; ldd "$AC_S" 2>&1; } >>"$LOG"
    if [ -z "$needed" ]; then
        record "$name" FAIL "readelf found no NEEDED entry: not a dynamic ELF executable?"
    elif [ -z "$imports" ] && ! grep -q cudart <<<"$needed"; then
        record "$name" PASS "no cuda* import, NEEDED: $needed"
    else
        record "$name" FAIL "imports: ${imports:-none}; NEEDED: $needed"
    fi
}

c_link_shared() {
    local name=$1
    [ -x "$AC_D" ] || { record "$name" FAIL "alloc_check (shared) was not built"; return; }
    local needed resolved nimports
    needed=$(readelf -d "$AC_D" 2>/dev/null | grep NEEDED | sed -E 's/.*\[(.*)\].*/\1/' | grep cudart)
    resolved=$(ldd "$AC_D" 2>&1 | grep cudart | sed -E 's/^[[:space:]]+//')
    nimports=$(nm -D --undefined-only "$AC_D" 2>&1 | awk '{print $NF}' | grep -cE '^cuda')
    { echo; echo "======== link of $AC_D"; ldd "$AC_D" 2>&1; } >>"$LOG"
    if [ -n "$needed" ] && [ -n "$resolved" ] && ! grep -q "not found" <<<"$resolved" && [ "$nimports" -gt 0 ]; then
        record "$name" PASS "$resolved; $nimports cuda* imports"
    else
        record "$name" FAIL "NEEDED: ${needed:-no libcudart}; ldd: ${resolved:-nothing}; $nimports cuda* imports"
    fi
}

# ------------------------------------------------------------------------------------- C programs
# Run specs: one command per tag, shared by the checks that read it.
run_prog() { # run_prog TAG: run the program a tag stands for
    local S="LD_PRELOAD=$SHIM"
    case $1 in
    as_base) R "$1" "$AC_S" ;;
    as_shim) R "$1" env "$S" "$AC_S" ;;
    as_leak) R "$1" env "$S" "$AC_S" --leak 5 ;;
    ad_base) R "$1" "$AC_D" ;;
    ad_shim) R "$1" env "$S" "$AC_D" ;;
    ad_leak) R "$1" env "$S" "$AC_D" --leak 5 ;;
    dc_base) R "$1" "$DC" ;;
    dc_shim) R "$1" env "$S" "$DC" ;;
    dc_leak) R "$1" env "$S" "$DC" --leak 5 ;;
    as_oom) R "$1" env "$S" GPUMEM_LIMIT=1GiB "$AC_S" --oom 2147483648 ;;
    as_bar_base) R "$1" "$AC_S" --barrier ;;
    as_bar_strict) R "$1" env "$S" "$AC_S" --barrier ;;
    as_bar_fast) R "$1" env "$S" GPUMEM_FREE_SYNC=0 "$AC_S" --barrier ;;
    as_fast) R "$1" env "$S" GPUMEM_FREE_SYNC=0 "$AC_S" ;;
    as_nopool) R "$1" env "$S" GPUMEM_POOL=0 "$AC_S" ;;
    as_trace) R "$1" env "$S" GPUMEM_VERBOSE=3 "$AC_S" --probe ;;
    as_bad_base) R "$1" "$AC_S" --bad-copies ;;
    as_bad_shim) R "$1" env "$S" "$AC_S" --bad-copies ;;
    t_base) R "$1" "$PY" "$TORCH_PY" ;;
    t_shim) R "$1" env "$S" "$PY" "$TORCH_PY" ;;
    t_nc_base) R "$1" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$PY" "$TORCH_PY" ;;
    t_nc_shim) R "$1" env "$S" PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$PY" "$TORCH_PY" ;;
    t_oom) R "$1" env "$S" GPUMEM_LIMIT=1GiB "$PY" "$TORCH_PY" --oom ;;
    t_report) R "$1" env "$S" GPUMEM_VERBOSE=1 GPUMEM_SUPPRESSIONS="$ROOT/docs/suppressions/frameworks.supp" \
        GPUMEM_TRACE="$OUT/torch-trace.json" "$PY" "$TORCH_PY" ;;
    c_base) R "$1" "$PY" "$CUPY_PY" ;;
    c_shim) R "$1" env "$S" "$PY" "$CUPY_PY" ;;
    c_np_base) R "$1" "$PY" "$CUPY_PY" --no-pool ;;
    c_np_shim) R "$1" env "$S" "$PY" "$CUPY_PY" --no-pool ;;
    c_leak) R "$1" env "$S" "$PY" "$CUPY_PY" --leak 5 ;;
    ph_shim) R "$1" env "$S" "$PS" ;;
    ph_lib) R "$1" "$PS" ;;
    sc_base) R "$1" "$SC" ;;
    sc_shim) R "$1" env "$S" "$SC" ;;
    sc_off) R "$1" env "$S" GPUMEM_STAGING=0 "$SC" ;;
    rb_lib) R "$1" env GPUMEM_REPORT=off "$RB" ;;
    ic_base) R "$1" "$IC" ;;
    ic_shim) R "$1" env "$S" "$IC" ;;
    ti_base) R "$1" "$PY" "$TORCH_IPC_PY" ;;
    ti_shim) R "$1" env "$S" "$PY" "$TORCH_IPC_PY" ;;
    ci_base) R "$1" "$PY" "$CUPY_IPC_PY" ;;
    ip_base) R "$1" "$IP" ;;
    ip_shim) R "$1" env "$S" "$IP" ;;
    sp_base) R "$1" "$SP" ;;
    sp_shim) R "$1" env "$S" "$SP" ;;
    ci_shim) R "$1" env "$S" "$PY" "$CUPY_IPC_PY" ;;
    *) echo "gpu-check: unknown run tag $1" >&2; return 99 ;;
    esac
}

# The binary a tag needs, to fail fast when it was not built.
have_bin() { # have_bin TAG
    case $1 in
    as_* ) [ -x "$AC_S" ] || { WHY="alloc_check (static) was not built"; return 1; } ;;
    ad_* ) [ -x "$AC_D" ] || { WHY="alloc_check (shared) was not built"; return 1; } ;;
    dc_* ) [ -x "$DC" ] || { WHY="driver_check was not built"; return 1; } ;;
    ph_* ) [ -x "$PS" ] || { WHY="physics_sim was not built"; return 1; } ;;
    sc_* ) [ -x "$SC" ] || { WHY="staging_check was not built"; return 1; } ;;
    rb_* ) [ -x "$RB" ] || { WHY="readback_bench was not built"; return 1; } ;;
    ic_* ) [ -x "$IC" ] || { WHY="ipc_check was not built"; return 1; } ;;
    ip_* ) [ -x "$IP" ] || { WHY="identity_probe was not built"; return 1; } ;;
    sp_* ) [ -x "$SP" ] || { WHY="semantics_probe was not built"; return 1; } ;;
    esac
    return 0
}

prog_of() {
    case $1 in
    as_* | ad_*) echo alloc_check ;;
    dc_*) echo driver_check ;;
    t_*) echo torch_check ;;
    c_*) echo cupy_check ;;
    ph_*) echo physics_sim ;;
    sc_*) echo staging_check ;;
    rb_*) echo readback_bench ;;
    ic_*) echo ipc_check ;;
    ti_*) echo torch_ipc_check ;;
    ci_*) echo cupy_ipc_check ;;
    ip_*) echo identity_probe ;;
    sp_*) echo semantics_probe ;;
    esac
}

# check_baseline NAME TAG: the program runs cleanly without the shim.
check_baseline() {
    local name=$1 tag=$2
    have_bin "$tag" || { record "$name" FAIL "$WHY"; return; }
    run_prog "$tag"
    if ran_ok "$tag" "$(prog_of "$tag")"; then
        record "$name" PASS "$(wc -l <"$(out_of "$tag")") stdout lines"
    else
        record "$name" FAIL "$WHY"
    fi
}

# check_same NAME BASE SHIMTAG [FILTER]: under the shim the program ends OK, prints exactly what it
# printed without it, and the shim was really there (its exit report is on stderr).
check_same() {
    local name=$1 base=$2 tag=$3 filter=${4:-}
    have_bin "$tag" || { record "$name" FAIL "$WHY"; return; }
    run_prog "$base"
    run_prog "$tag"
    if ! ran_ok "$tag" "$(prog_of "$tag")"; then record "$name" FAIL "$WHY"; return; fi
    if ! ran_ok "$base" "$(prog_of "$base")"; then record "$name" FAIL "baseline $base failed: $WHY"; return; fi
    if ! leak "$tag"; then record "$name" FAIL "no LEAK SUMMARY on stderr: was the shim loaded?"; return; fi
    if same_out "$base" "$tag" "$filter"; then
        record "$name" PASS "identical stdout ($(wc -l <"$(out_of "$tag")") lines); report: $(leak_text "$tag")"
    else
        record "$name" FAIL "$WHY"
    fi
}

# check_noleak NAME TAG: the shim's exit report says 0 bytes in 0 allocations.
check_noleak() {
    local name=$1 tag=$2
    have_bin "$tag" || { record "$name" FAIL "$WHY"; return; }
    run_prog "$tag"
    if ! leak "$tag"; then record "$name" FAIL "no LEAK SUMMARY line (rc=$(rc_of "$tag"))"; return; fi
    if [ "$LK_BYTES" = 0 ] && [ "$LK_ALLOCS" = 0 ]; then
        record "$name" PASS "$(leak_text "$tag")"
    else
        record "$name" FAIL "expected 0 B in 0 allocs, report says $(leak_text "$tag")"
    fi
}

# check_leak NAME TAG: the report counts exactly the leaks the program says it planted.
check_leak() {
    local name=$1 tag=$2
    have_bin "$tag" || { record "$name" FAIL "$WHY"; return; }
    run_prog "$tag"
    if ! ran_ok "$tag" "$(prog_of "$tag")"; then record "$name" FAIL "$WHY"; return; fi
    local eb ea
    eb=$(kv "$tag" expected_leak_bytes)
    ea=$(kv "$tag" expected_leak_allocs)
    if [ -z "$eb" ] || [ -z "$ea" ]; then record "$name" FAIL "the program printed no expected_leak_* line"; return; fi
    if ! leak "$tag"; then record "$name" FAIL "no LEAK SUMMARY line; expected $eb B in $ea allocs"; return; fi
    if [ "$LK_BYTES" = "$eb" ] && [ "$LK_ALLOCS" = "$ea" ]; then
        record "$name" PASS "$(leak_text "$tag") = expected"
    else
        record "$name" FAIL "expected $eb B in $ea allocs, report says $(leak_text "$tag")"
    fi
}

# Copies into a freed pool block and past a block's end, through cudart: refused under the shim
# with the error the driver gives for such a copy without a pool (cudaErrorInvalidValue), each
# with a logged line; the good copy still goes through.
c_badcopy() {
    local name=$1
    have_bin as_bad_shim || { record "$name" FAIL "$WHY"; return; }
    run_prog as_bad_base
    run_prog as_bad_shim
    local f p r g n base
    f=$(kv as_bad_shim freed_copy)
    p=$(kv as_bad_shim past_end_copy)
    r=$(kv as_bad_shim past_end_readback)
    g=$(kv as_bad_shim good_copy)
    n=$(grep -c 'refused with CUDA_ERROR_INVALID_VALUE' "$(err_of as_bad_shim)")
    base="without the shim: freed $(kv as_bad_base freed_copy), past end $(kv as_bad_base past_end_copy), readback $(kv as_bad_base past_end_readback)"
    if ran_ok as_bad_shim alloc_check && [ "$f" = cudaErrorInvalidValue ] && [ "$p" = cudaErrorInvalidValue ] &&
        [ "$r" = cudaErrorInvalidValue ] && [ "$g" = cudaSuccess ] && [ "$n" = 3 ]; then
        record "$name" PASS "3 refused with cudaErrorInvalidValue and a logged line, good copy ok; $base"
    else
        record "$name" FAIL "freed=$f past_end=$p readback=$r good=$g, $n refusal lines; $base"
    fi
}

c_oom() {
    local name=$1 tag=as_oom
    have_bin "$tag" || { record "$name" FAIL "$WHY"; return; }
    run_prog as_base
    run_prog "$tag"
    local res
    res=$(kv "$tag" oom_result)
    if ! ran_ok "$tag" alloc_check; then record "$name" FAIL "oom_result=${res:-none}; $WHY"; return; fi
    if [ "$res" != cudaErrorMemoryAllocation ]; then
        record "$name" FAIL "oom_result=${res:-none}, expected cudaErrorMemoryAllocation"
        return
    fi
    if ! same_out as_base "$tag" '^oom_result='; then record "$name" FAIL "after the OOM: $WHY"; return; fi
    leak "$tag"
    if [ "$LK_BYTES" != 0 ] || [ "$LK_ALLOCS" != 0 ]; then
        record "$name" FAIL "oom ok, but the report says $(leak_text "$tag")"
        return
    fi
    record "$name" PASS "oom_result=$res, then the whole program ran as without the shim under the 1 GiB limit; $(leak_text "$tag")"
}

# barrier TAG MIN_MS: PASS when the program ran, barrier_kept=1 and free_waited_ms >= MIN_MS.
barrier_check() {
    local name=$1 tag=$2 min=$3
    have_bin "$tag" || { record "$name" FAIL "$WHY"; return; }
    run_prog "$tag"
    local waited kept idle
    waited=$(kv "$tag" free_waited_ms)
    kept=$(kv "$tag" barrier_kept)
    idle=$(kv "$tag" barrier_stream_idle)
    local d="free_waited_ms=${waited:-?} barrier_kept=${kept:-?} stream_idle=${idle:-?}"
    if ! ran_ok "$tag" alloc_check; then record "$name" FAIL "$d; $WHY"; return; fi
    if [ -z "$min" ]; then
        record "$name" PASS "$d (fast mode may return before the kernel ends; information only)"
        return
    fi
    if [ "$kept" = 1 ] && awk -v w="${waited:-0}" -v m="$min" 'BEGIN { exit !(w + 0 >= m + 0) }'; then
        record "$name" PASS "$d"
    else
        record "$name" FAIL "$d; expected barrier_kept=1 and free_waited_ms >= $min"
    fi
}

c_bar_base() { barrier_check "$1" as_bar_base 10; }
c_bar_strict() { barrier_check "$1" as_bar_strict 10; }
c_bar_fast() { barrier_check "$1" as_bar_fast ""; }

c_mode() { # c_mode NAME TAG: same stdout as the baseline and no leak, under a GPUMEM_* mode
    local name=$1 tag=$2
    have_bin "$tag" || { record "$name" FAIL "$WHY"; return; }
    run_prog as_base
    run_prog "$tag"
    if ! ran_ok "$tag" alloc_check; then record "$name" FAIL "$WHY"; return; fi
    if ! same_out as_base "$tag"; then record "$name" FAIL "$WHY"; return; fi
    if ! leak "$tag" || [ "$LK_BYTES" != 0 ] || [ "$LK_ALLOCS" != 0 ]; then
        record "$name" FAIL "stdout identical, but the report says $(leak_text "$tag")"
        return
    fi
    record "$name" PASS "identical stdout; $(leak_text "$tag")"
}
c_fast() { c_mode "$1" as_fast; }
c_nopool() { c_mode "$1" as_nopool; }

c_trace() {
    local name=$1 tag=as_trace
    have_bin "$tag" || { record "$name" FAIL "$WHY"; return; }
    run_prog "$tag"
    local err
    err=$(err_of "$tag")
    {
        echo "# Hooked driver entry points traced by GPUMEM_VERBOSE=3 between the markers of"
        echo "# 'alloc_check --probe' (static cudart), one runtime call (after a warm-up) per section."
        awk '
            /alloc_check: probe begin / { sec = $0; sub(/^.*alloc_check: probe begin /, "", sec); order[++n] = sec; seen[sec] = ""; next }
            /alloc_check: probe end / { sec = ""; next }
            sec != "" && /gpumem: trace / {
                s = $0; sub(/^.*gpumem: trace /, "", s); split(s, a, /[ (:,]/); ep = a[1]
                if (!((sec, ep) in have)) { have[sec, ep] = 1; seen[sec] = seen[sec] " " ep }
            }
            END { for (i = 1; i <= n; i++) printf "%-22s%s\n", order[i] ":", (seen[order[i]] == "" ? " (none hooked)" : seen[order[i]]) }
        ' "$err"
        echo
        echo "# Every distinct entry point traced in the whole probe run (count):"
        grep -oE 'gpumem: trace [A-Za-z0-9_]+' "$err" | awk '{print $3}' | sort | uniq -c | sort -rn
        echo
        echo "# cuGetProcAddress lookups answered with a hook:"
        grep -oE 'gpumem: getproc [^ ]+ v[0-9]+ flags=[0-9]+ -> hooked' "$err" | awk '{print "  " $3 " " $4}' | sort -u
        echo "# lookups passed through: $(grep -cE 'gpumem: getproc .* -> passthrough' "$err")"
    } >"$EPFILE"
    cat "$EPFILE" >>"$LOG"
    echo "entry points (also in $EPFILE):"
    awk 'NR > 2 && /^$/ { exit } NR > 2' "$EPFILE"
    if ! ran_ok "$tag" alloc_check; then record "$name" FAIL "$WHY"; return; fi
    local mall free ntrace
    ntrace=$(grep -c 'gpumem: trace ' "$err")
    mall=$(grep -E '^cudaMalloc:' "$EPFILE")
    free=$(grep -E '^cudaFree:' "$EPFILE")
    if [ "$ntrace" = 0 ]; then
        record "$name" FAIL "no 'gpumem: trace' line on stderr"
    elif ! grep -qE ' cuMemAlloc' <<<"$mall" || ! grep -qE ' cuMemFree' <<<"$free"; then
        record "$name" FAIL "expected cuMemAlloc* under cudaMalloc and cuMemFree* under cudaFree; cudaMalloc ->$(cut -d: -f2- <<<"$mall"); cudaFree ->$(cut -d: -f2- <<<"$free")"
    else
        record "$name" PASS "cudaMalloc -> $(cut -d: -f2- <<<"$mall" | sed -E 's/^ +//'); cudaFree -> $(cut -d: -f2- <<<"$free" | sed -E 's/^ +//')"
    fi
}

# ------------------------------------------------------------------------------------- Python
HAVE_TORCH=""
HAVE_CUPY=""
py_has() { # py_has MODULE: importable? (cached)
    timeout 120 "$PY" -c "import $1; print($1.__version__)" >"$LOGS/import-$1.txt" 2>&1
}

torch_ready() {
    if [ -z "$HAVE_TORCH" ]; then
        if py_has torch; then HAVE_TORCH=yes; else HAVE_TORCH=no; fi
        say "torch: $(tail -n 1 "$LOGS/import-torch.txt")"
    fi
    [ "$HAVE_TORCH" = yes ]
}
cupy_ready() {
    if [ -z "$HAVE_CUPY" ]; then
        if py_has cupy; then HAVE_CUPY=yes; else HAVE_CUPY=no; fi
        say "cupy: $(tail -n 1 "$LOGS/import-cupy.txt")"
    fi
    [ "$HAVE_CUPY" = yes ]
}

t_wrap() { # t_wrap NAME FUNCTION ARGS...: SKIP when torch cannot be imported
    local name=$1
    shift
    torch_ready || { record "$name" SKIP "python3 cannot import torch"; return; }
    "$@"
}
c_wrap() {
    local name=$1
    shift
    cupy_ready || { record "$name" SKIP "python3 cannot import cupy"; return; }
    "$@"
}

t_base() { t_wrap "$1" check_baseline "$1" t_base; }
t_same() { t_wrap "$1" check_same "$1" t_base t_shim; }
t_nc_base() {
    t_wrap "$1" check_baseline "$1" t_nc_base
}
t_nc_same() { t_wrap "$1" check_same "$1" t_nc_base t_nc_shim; }
t_oom_impl() {
    local name=$1 tag=t_oom
    run_prog t_base
    run_prog "$tag"
    local res tot
    res=$(kv "$tag" oom)
    tot=$(kv "$tag" mem_total_gib)
    if ! ran_ok "$tag" torch_check; then record "$name" FAIL "oom=${res:-none}; $WHY"; return; fi
    if [ "$res" != torch.OutOfMemoryError ]; then
        record "$name" FAIL "oom=${res:-none}, expected torch.OutOfMemoryError"
        return
    fi
    if ! same_out t_base "$tag" '^(oom|mem_total_gib)='; then record "$name" FAIL "training under the limit: $WHY"; return; fi
    record "$name" PASS "oom=$res, mem_get_info total=${tot:-?} GiB, training output as without the shim; report: $(leak_text "$tag")"
}
t_oom() { t_wrap "$1" t_oom_impl "$1"; }
t_leakinfo() { # information only: what PyTorch leaves at exit under the shim
    local name=$1
    torch_ready || { record "$name" SKIP "python3 cannot import torch"; return; }
    run_prog t_shim
    run_prog t_nc_shim
    if leak t_shim && leak t_nc_shim; then
        record "$name" PASS "caching: $(leak_text t_shim); no caching: $(leak_text t_nc_shim) (information only: cuBLAS handles keep memory until exit)"
    else
        record "$name" FAIL "caching: $(leak_text t_shim); no caching: $(leak_text t_nc_shim)"
    fi
}

# The exit report's cost against the whole run (goal: <= 0.1 %), the shipped framework
# suppressions (PyTorch's cached segments are no leak to its user), and the timeline + its plot.
t_report_impl() {
    local name=$1 t0 t1 ms wall_ms ratio
    t0=$(date +%s%N)
    run_prog t_report
    t1=$(date +%s%N)
    wall_ms=$(( (t1 - t0) / 1000000 ))
    [ -f "$LOGS/t_shim.err" ] && cp "$LOGS/t_shim.err" "$OUT/torch-report.txt"
    ms=$(grep -o 'exit report written in [0-9.]* ms' "$LOGS/t_report.err" | grep -o '[0-9.]*' | head -1)
    if [ -x "$ROOT/scripts/gpumem-report" ] && [ -f "$OUT/torch-trace.json" ]; then
        "$PY" "$ROOT/scripts/gpumem-report" plot "$OUT/torch-trace.json" "$OUT/torch-memory.png" >>"$LOG" 2>&1
    fi
    if [ -z "$ms" ]; then
        record "$name" FAIL "no 'exit report written' line; $(leak_text t_report)"
        return
    fi
    ratio=$(awk -v a="$ms" -v b="$wall_ms" 'BEGIN { printf "%.4f", 100 * a / b }')
    local sup; sup=$(grep -o 'Suppressed: [0-9]* bytes in [0-9]* allocations' "$LOGS/t_report.err" | head -1)
    if awk -v r="$ratio" 'BEGIN { exit !(r <= 0.1) }' && grep -q 'LEAK SUMMARY: 0 bytes leaked in 0 allocations' "$LOGS/t_report.err"; then
        record "$name" PASS "report ${ms} ms of ${wall_ms} ms wall = ${ratio} %; ${sup:-nothing suppressed}; leaks after suppressions: 0"
    else
        record "$name" FAIL "report ${ms} ms of ${wall_ms} ms = ${ratio} %; ${sup:-nothing suppressed}; $(leak_text t_report)"
    fi
}
t_report() { t_wrap "$1" t_report_impl "$1"; }

k_base() { c_wrap "$1" check_baseline "$1" c_base; }
k_same() { c_wrap "$1" check_same "$1" c_base c_shim; }
k_noleak() { c_wrap "$1" check_noleak "$1" c_shim; }
k_np_base() { c_wrap "$1" check_baseline "$1" c_np_base; }
k_np_same() { c_wrap "$1" check_same "$1" c_np_base c_np_shim; }
k_np_noleak() { c_wrap "$1" check_noleak "$1" c_np_shim; }
k_leak() { c_wrap "$1" check_leak "$1" c_leak; }

# ------------------------------------------------------------------------------------- libgpumem clients
# Programs that link libgpumem (the API of issues 5 and 6); rpath to build-gpu/manager.
lib_args=(-I "$ROOT/manager/include" -L "$LIBDIR" -lgpumem -Xlinker -rpath -Xlinker "$LIBDIR")
p_build_physics() {
    nvcc_build "$1" "$PS" -O2 -arch="$ARCH" -I "$ROOT/tests/physics" -o "$PS" tests/gpu/physics_sim.cu "${lib_args[@]}"
}
p_build_readback() {
    nvcc_build "$1" "$RB" -O2 -arch="$ARCH" -o "$RB" tests/gpu/readback_bench.cu "${lib_args[@]}"
}
p_build_staging() {
    nvcc_build "$1" "$SC" -x c -O2 -o "$SC" tests/gpu/staging_check.c -lcuda
}
# physics_sim under the shim and alone: OK (small graph = CPU reference, >= 1M nodes grown step
# by step) and an exit report of 0 bytes leaked (the shim's, or libgpumem's own).
p_physics() { # p_physics NAME TAG
    local name=$1 tag=$2
    have_bin "$tag" || { record "$name" FAIL "$WHY"; return; }
    run_prog "$tag"
    if ! ran_ok "$tag" physics_sim; then record "$name" FAIL "$WHY"; return; fi
    if ! leak "$tag" || [ "$LK_BYTES" != 0 ]; then record "$name" FAIL "report: $(leak_text "$tag")"; return; fi
    local stress
    stress=$(grep -oE 'stress: [0-9]+ nodes' "$(out_of "$tag")" | head -n 1)
    record "$name" PASS "${stress:-?}, CPU reference matched; report: $(leak_text "$tag")"
}
p_phys_shim() { p_physics "$1" ph_shim; }
# The seed's readback case: 1M float4 per step, synchronous cudaMemcpy (pageable, pinned) against
# the channel, side by side; exit 0 means every frame's checksum matched.
p_readback() {
    local name=$1
    have_bin rb_lib || { record "$name" FAIL "$WHY"; return; }
    run_prog rb_lib
    local sp
    sp=$(grep -m1 'speedup (median per step)' "$(out_of rb_lib)" | sed -E 's/.*: //')
    if [ "$(rc_of rb_lib)" = 0 ] && [ -n "$sp" ]; then
        record "$name" PASS "$sp, checksums equal"
    else
        record "$name" FAIL "rc=$(rc_of rb_lib): $(tail -n 1 "$(err_of rb_lib)" | cut -c1-100)"
    fi
}
p_phys_lib() { p_physics "$1" ph_lib; }

# ------------------------------------------------------------------------------------- IPC (issue 10)
# A block at its segment's start and one deep inside it exported to a child process, which writes
# into them; exactly those bytes must change. (PyTorch cannot share CUDA tensors with its caching
# allocator off, gpumem or not: "RuntimeError: invalid device pointer"; so only caching on.) Each program passes without the shim, and under it
# prints the same lines (PASS needs both runs).
p_build_ipc() {
    nvcc_build "$1" "$IC" -O2 -arch="$ARCH" -o "$IC" tests/gpu/ipc_check.cu
}
i_base() { check_baseline "$1" ic_base; }
i_same() { check_same "$1" ic_base ic_shim; }
ti_base() { t_wrap "$1" check_baseline "$1" ti_base; }
ti_same() { t_wrap "$1" check_same "$1" ti_base ti_shim; }
ci_base() { c_wrap "$1" check_baseline "$1" ci_base; }
# The driver's answers about allocation identity (address ranges, pointer attributes, buffer ids,
# IPC) for separate allocations, and gpumem's for pooled blocks: equal line by line. Left out: ids
# and handle bytes (new every run), the driver's mapping-level block ids, the layout probes next to
# a small allocation, and the flipped-byte opens of a gpumem handle (gpumem checks every byte of
# its own handles; the driver ignores some bytes of its own).
p_build_probes() {
    nvcc_build "$1" "$IP" -x c -O2 -o "$IP" tests/gpu/identity_probe.c -lcuda &&
        nvcc_build "$1" "$SP" -x c -O2 -o "$SP" tests/gpu/semantics_probe.c -lcuda
}
ip_base() { check_baseline "$1" ip_base; }
ip_same() {
    check_same "$1" ip_base ip_shim 'BUFFER_ID|MEMORY_BLOCK_ID|^handle |flip|parent sees b|^range a\+(5120|8191|8192|65535|65536|2097151):'
}
sp_base() { check_baseline "$1" sp_base; }
# Left out: what an importer sees after the exporter freed an exported block and allocated again.
# The driver hands the memory to the next allocation (the importer then reads and writes it);
# gpumem keeps a block aside while a receiver under gpumem still has it open (quarantine), so the
# next allocation is another block: see docs/compatibility.md, IPC.
sp_same() {
    check_same "$1" sp_base sp_shim 'exporter free while imported|importer reads after|exporter.s new allocation'
}
ci_same() { c_wrap "$1" check_same "$1" ci_base ci_shim; }
p_stage_base() { check_baseline "$1" sc_base; }
# Staged pageable copies give the bytes the driver's own copies give (identical stdout), and the
# shim's report shows copies were really staged.
p_stage_same() {
    local name=$1
    check_same "$name.tmp" sc_base sc_shim
    local last=$((${#STATUS[@]} - 1)) staged
    staged=$(grep -oE '[0-9]+ staged' "$(err_of sc_shim)" | head -n 1)
    if [ "${STATUS[$last]}" = PASS ] && [ -n "$staged" ]; then
        NAMES[last]=$name
        DETAILS[last]="${DETAILS[$last]}; H2D $staged"
    else
        NAMES[last]=$name
        STATUS[last]=FAIL
        [ -z "$staged" ] && DETAILS[last]="no 'N staged' in the shim's report; ${DETAILS[$last]}"
    fi
}

# ------------------------------------------------------------------------------------- bench
bench() { # bench NAME MODE
    local name=$1 mode=$2
    if [ ! -x "$BENCH_BIN" ]; then
        record "$name" SKIP "build-gpu/tests/gpumem-bench not built"
        return
    fi
    if [ "$SECONDS" -ge "$BUDGET" ]; then
        record "$name" FAIL "not run: time budget of ${BUDGET}s spent"
        return
    fi
    local t0=$SECONDS rc
    printf '%s ' "  running gpumem-bench $mode ..."
    {
        echo "======== gpumem-bench $mode ($(date -u '+%H:%M:%S'))"
        timeout -k 10 "${BENCH_TIMEOUT:-120}" "$BENCH_BIN" "$mode" 2>&1
        rc=$?
        echo "(rc=$rc, $((SECONDS - t0)) s)"
        echo
    } >>"$BENCHFILE"
    echo "rc=$rc"
    { echo; echo "======== gpumem-bench $mode: rc=$rc, output in bench.txt"; } >>"$LOG"
    if [ "$rc" = 0 ]; then
        record "$name" PASS "$((SECONDS - t0)) s, output in bench.txt"
    else
        record "$name" FAIL "rc=$rc, $(tail -n 3 "$BENCHFILE" | head -n 1 | cut -c1-100)"
    fi
}
b_gpu() { bench "$1" gpu; }
b_pool() { bench "$1" pool; }
b_stacks() { bench "$1" stacks; }
b_driver() { bench "$1" driver; }
b_transfer() { bench "$1" transfer; }
b_pinned() { bench "$1" pinned; }
b_buffers() { bench "$1" buffers; }
b_checks() { bench "$1" checks; }

# ------------------------------------------------------------------------------------- the plan
build_gpumem "build gpumem (meson+ninja)"

step "build alloc_check (static cudart)" c_build_static
step "build alloc_check (-cudart shared)" c_build_shared
step "build driver_check (-lcuda)" c_build_driver
step "build reset_check (static cudart)" c_build_reset
step "link static: no cuda* imports" c_link_static
step "link shared: libcudart.so" c_link_shared

cs_b() { check_baseline "$1" as_base; }
cs_s() { check_same "$1" as_base as_shim; }
cs_n() { check_noleak "$1" as_shim; }
cs_l() { check_leak "$1" as_leak; }
cd_b() { check_baseline "$1" ad_base; }
cd_s() { check_same "$1" ad_base ad_shim; }
cd_n() { check_noleak "$1" ad_shim; }
cd_l() { check_leak "$1" ad_leak; }
dr_b() { check_baseline "$1" dc_base; }
dr_s() { check_same "$1" dc_base dc_shim; }
dr_n() { check_noleak "$1" dc_shim; }
dr_l() { check_leak "$1" dc_leak; }

step "alloc/static: no-shim baseline" cs_b
step "alloc/static: shim stdout == baseline" cs_s
step "alloc/static: shim reports 0 leaks" cs_n
step "alloc/static: --leak 5 counted" cs_l
step "alloc/shared: no-shim baseline" cd_b
step "alloc/shared: shim stdout == baseline" cd_s
step "alloc/shared: shim reports 0 leaks" cd_n
step "alloc/shared: --leak 5 counted" cd_l
step "driver: no-shim baseline" dr_b
step "driver: shim stdout == baseline" dr_s
step "driver: shim reports 0 leaks" dr_n
step "driver: --leak 5 counted" dr_l
step "alloc: OOM under GPUMEM_LIMIT=1GiB" c_oom
step "alloc: barrier without shim (reference)" c_bar_base
step "alloc: barrier, shim strict mode" c_bar_strict
step "alloc: barrier, FREE_SYNC=0 (info)" c_bar_fast
step "alloc: GPUMEM_FREE_SYNC=0 == baseline" c_fast
step "alloc: GPUMEM_POOL=0 == baseline" c_nopool
step "trace: hooked entry points" c_trace
step "alloc: bad copies refused (checked copies)" c_badcopy
step "alloc: cudaDeviceReset is a leak check point" c_reset
step "torch: no-shim baseline" t_base
step "torch: shim stdout == baseline" t_same
step "torch: no-caching no-shim baseline" t_nc_base
step "torch: no-caching shim == baseline" t_nc_same
step "torch: leaks at exit (info)" t_leakinfo
step "torch: OOM under GPUMEM_LIMIT=1GiB" t_oom
step "torch: report cost, suppressions, trace" t_report
step "cupy: no-shim baseline (pool)" k_base
step "cupy: shim stdout == baseline (pool)" k_same
step "cupy: shim reports 0 leaks (pool)" k_noleak
step "cupy: no-shim baseline (--no-pool)" k_np_base
step "cupy: shim == baseline (--no-pool)" k_np_same
step "cupy: shim reports 0 leaks (--no-pool)" k_np_noleak
step "cupy: --leak 5 counted" k_leak
step "build physics_sim (libgpumem)" p_build_physics
step "physics: shim, CPU ref + 1M nodes, 0 leaks" p_phys_shim
step "physics: library alone, 0 leaks" p_phys_lib
step "build staging_check (-lcuda)" p_build_staging
step "staging: no-shim baseline" p_stage_base
step "staging: shim stdout == baseline, staged" p_stage_same
step "build readback_bench (libgpumem)" p_build_readback
step "channel: readback vs sync cudaMemcpy" p_readback
step "build ipc_check (static cudart)" p_build_ipc
step "ipc: no-shim baseline" i_base
step "ipc: shim stdout == baseline" i_same
step "torch ipc: no-shim baseline" ti_base
step "torch ipc: shim stdout == baseline" ti_same
step "cupy ipc: no-shim baseline" ci_base
step "cupy ipc: shim stdout == baseline" ci_same
step "build identity/semantics probes (-lcuda)" p_build_probes
step "identity: no-shim baseline" ip_base
step "identity: shim answers == driver's" ip_same
step "semantics: no-shim baseline" sp_base
step "semantics: shim answers == driver's" sp_same
step "bench: gpumem-bench gpu" b_gpu
step "bench: gpumem-bench pool" b_pool
step "bench: gpumem-bench stacks" b_stacks
step "bench: gpumem-bench driver" b_driver
step "bench: gpumem-bench transfer" b_transfer
step "bench: gpumem-bench pinned" b_pinned
step "bench: gpumem-bench buffers" b_buffers
step "bench: gpumem-bench checks" b_checks

# ------------------------------------------------------------------------------------- the table
# torch: does caching on/off change the training output without the shim? (information)
if [ -f "$LOGS/t_base.out" ] && [ -f "$LOGS/t_nc_base.out" ] && ! cmp -s "$LOGS/t_base.out" "$LOGS/t_nc_base.out"; then
    say "note: torch output differs between caching on and off even without the shim (each is compared to its own baseline)"
fi

npass=0
nfail=0
nskip=0
{
    printf '%-4s  %-40s  %s\n' RES CHECK DETAIL
    printf '%-4s  %-40s  %s\n' ---- ---------------------------------------- ------
    for i in "${!NAMES[@]}"; do
        printf '%-4s  %-40s  %s\n' "${STATUS[$i]}" "${NAMES[$i]}" "${DETAILS[$i]}"
    done
} >"$W/table.txt"
for s in "${STATUS[@]}"; do
    case $s in
    PASS) npass=$((npass + 1)) ;;
    FAIL) nfail=$((nfail + 1)) ;;
    *) nskip=$((nskip + 1)) ;;
    esac
done
verdict="gpu-check: $npass passed, $nfail failed, $nskip skipped in ${SECONDS}s"
echo "$verdict" >>"$W/table.txt"
cp "$W/table.txt" "$SUMMARY"
{ echo; echo "======== summary"; cat "$W/table.txt"; } >>"$LOG"
echo
cat "$W/table.txt"
[ "$nfail" -eq 0 ]
exit $?
