#!/bin/sh
# api_identity_probe: tests/gpu/identity_probe (the program the lead runs on the GPU) on the fake
# driver, without and with the shim preloaded; the outputs must be the same but for what differs
# from run to run anyway (buffer ids, handle bytes) and for the probes of addresses next to a small
# allocation: the driver (like the pool) packs small allocations into 2 MiB chunks, the fake maps
# each one on its own, so what lies at a+5120.. or just past b depends on the fake's layout, not on
# gpumem (tests/api/test_identity.c checks those answers of the pool).
#
#   identity_probe_compare.sh <identity_probe> <libgpumem_shim.so>
set -u
probe=$1
shim=$2
dir=$(mktemp -d /tmp/gpumem-probe-XXXXXX) || exit 1
trap 'rm -rf "$dir"' EXIT

normalise() {
    sed -e 's/BUFFER_ID: [0-9]*/BUFFER_ID: <id>/' \
        -e 's/^handle \([a-z]*\): [0-9a-f]*/handle \1: <bytes>/' \
        -e '/^range a+\(5120\|8191\|8192\|65535\|65536\|2097151\):/d' \
        -e '/^range b+1048576:/d' "$1"
}

env -u LD_PRELOAD GPUMEM_REPORT=off "$probe" > "$dir/driver.txt" 2> "$dir/driver.err"
rc_driver=$?
LD_PRELOAD="$shim" GPUMEM_REPORT=off "$probe" > "$dir/shim.txt" 2> "$dir/shim.err"
rc_shim=$?
if [ $rc_driver -ne 0 ] || [ $rc_shim -ne 0 ]; then
    echo "identity_probe failed: without the shim $rc_driver, with it $rc_shim"
    cat "$dir/driver.txt" "$dir/driver.err" "$dir/shim.txt" "$dir/shim.err"
    exit 1
fi
normalise "$dir/driver.txt" > "$dir/driver.norm"
normalise "$dir/shim.txt" > "$dir/shim.norm"
if ! grep -q '^identity_probe: OK$' "$dir/shim.norm"; then
    echo "identity_probe did not finish under the shim"; cat "$dir/shim.txt"; exit 1
fi
if ! diff -u "$dir/driver.norm" "$dir/shim.norm"; then
    echo "FAIL: under the shim identity_probe's answers differ from the driver's (- driver, + shim)"
    exit 1
fi
echo "identity_probe: $(wc -l < "$dir/shim.norm") answers equal with and without the shim"
