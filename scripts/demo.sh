#!/usr/bin/env bash
# The main job: build gpumem and run the bundled demo program under the shim, on the GPU when
# there is one and on the fake driver of the test suite otherwise.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/setup-deps.sh
[ -d build ] || meson setup build >/dev/null
ninja -C build >/dev/null

export LD_PRELOAD="$ROOT/build/shim/libgpumem_shim.so"
export GPUMEM_LIMIT=${GPUMEM_LIMIT:-256MiB}
if ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1 ' && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "== running on the GPU ($(nvidia-smi -L | head -1)), GPUMEM_LIMIT=$GPUMEM_LIMIT"
else
    echo "== no GPU here: running on the fake driver (build/tests/fakecuda), GPUMEM_LIMIT=$GPUMEM_LIMIT"
    export LD_LIBRARY_PATH="$ROOT/build/tests/fakecuda${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
exec "$ROOT/build/tests/demo/gpumem-demo"
