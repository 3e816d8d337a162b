#!/usr/bin/env bash
# Line coverage of shim/ and manager/ by the whole test suite (the fake driver stands in for the
# GPU), with gcovr. Fails when shim/ falls under GPUMEM_MIN_SHIM_COVERAGE percent (default 90):
# every hook is an entry point a real program reaches, so an untested hook is an untested
# promise. Run by scripts/test.sh; alone: scripts/coverage.sh [build dir, default build-cov].
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/setup-deps.sh   # installs gcovr too
DIR=${1:-build-cov}
MIN=${GPUMEM_MIN_SHIM_COVERAGE:-90}
export MESON_TESTTHREADS=${MESON_TESTTHREADS:-2}

[ -d "$DIR" ] || meson setup "$DIR" -Db_coverage=true >"$DIR.setup.log" 2>&1 || { cat "$DIR.setup.log"; exit 1; }
find "$DIR" -name '*.gcda' -delete
ninja -C "$DIR" >"$DIR.build.log" 2>&1 || { tail -40 "$DIR.build.log"; exit 1; }
meson test -C "$DIR" --print-errorlogs >"$DIR.test.log" 2>&1 || { tail -60 "$DIR.test.log"; exit 1; }

# One summary per tree (the percentage of gcovr's summary line for the files under it).
summary() { # tree
    # The report goes to a file of the build tree: gcovr replaces its output file, and as root an
    # output of /dev/null would replace the device itself.
    gcovr -r "$ROOT" --object-directory "$DIR" --filter "$1/" --gcov-ignore-parse-errors \
        --print-summary -o "$DIR/coverage-$1.txt" 2>/dev/null | sed -n 's/^lines: \([0-9.]*\)%.*/\1/p'
}
per_file() { # tree
    gcovr -r "$ROOT" --object-directory "$DIR" --filter "$1/" --gcov-ignore-parse-errors 2>/dev/null |
        awk -v t="$1/" 'index($1, t) == 1 { printf "  %-28s %s\n", $1, $4 }'
}
shim=$(summary shim)
manager=$(summary manager)
echo "line coverage: shim/ ${shim}%  manager/ ${manager}%  (minimum for shim/: ${MIN}%)"
per_file shim
if awk -v c="$shim" -v m="$MIN" 'BEGIN { exit !(c + 0 < m + 0) }'; then
    echo "coverage: shim/ is under ${MIN}%" >&2
    exit 1
fi
