#!/usr/bin/env bash
# The whole test suite, as CI runs it: the normal build with warnings as errors, then the same
# tests under AddressSanitizer+UndefinedBehaviorSanitizer, then under ThreadSanitizer the threaded
# stress tests, the fake driver's and the unwinder's tests and every preload-path test (the api and
# misuse suites: the shim preloaded in front of the fake driver, on criterion-lite since Criterion
# cannot start under TSan). Runs on a machine without a GPU (the fake driver stands in).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/setup-deps.sh
export MESON_TESTTHREADS=${MESON_TESTTHREADS:-2}

run_setup() { # dir, meson options... (TARGETS: what to build, default everything)
    local dir=$1; shift
    [ -d "$dir" ] || meson setup "$dir" -Dwerror=true "$@" >"$dir.setup.log" 2>&1 ||
        { cat "$dir.setup.log"; return 1; }
    ninja -C "$dir" ${TARGETS:-} >"$dir.build.log" 2>&1 || { tail -40 "$dir.build.log"; return 1; }
}

echo "== build (warnings are errors) and test"
run_setup build-ci
meson test -C build-ci --print-errorlogs

echo "== AddressSanitizer + UndefinedBehaviorSanitizer"
run_setup build-asan -Db_sanitize=address,undefined -Db_lundef=false
ASAN_OPTIONS=verify_asan_link_order=0:detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    meson test -C build-asan --print-errorlogs

echo "== ThreadSanitizer (stress, fake driver, unwinder, the preload path)"
# Everything is built; only the tests named below run (Criterion itself cannot start under TSan).
run_setup build-tsan -Db_sanitize=thread -Db_lundef=false
TSAN_OPTIONS=halt_on_error=1 meson test -C build-tsan --no-rebuild --print-errorlogs \
    stress_threads_plain_free_sync_1 stress_threads_plain_free_sync_0 stress_copies_plain \
    stress_ctx_switch_copies unit_fakecuda unit_stacks unit_expandable unit_tcache
TSAN_OPTIONS=halt_on_error=1 meson test -C build-tsan --no-rebuild --print-errorlogs \
    --suite api --suite misuse

echo "== line coverage (shim/ must stay at or above 90 %)"
scripts/coverage.sh build-cov
