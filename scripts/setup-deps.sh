#!/usr/bin/env bash
# Installs what building and testing gpumem needs on Debian, if it is missing. Sourced by
# scripts/demo.sh and scripts/test.sh; CUDA headers must already be there (the CUDA Toolkit).
need=()
command -v meson >/dev/null 2>&1 || need+=(meson)
command -v ninja >/dev/null 2>&1 || need+=(ninja-build)
[ -f /usr/include/uthash.h ] || need+=(uthash-dev)
[ -f /usr/include/criterion/criterion.h ] || need+=(libcriterion-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v addr2line >/dev/null 2>&1 || need+=(binutils)   # file:line in leak reports
command -v gcovr >/dev/null 2>&1 || need+=(gcovr)         # scripts/coverage.sh, run by test.sh
# gpumem-report plot (optional for users, tested in CI) and the report tests use Debian's python3.
/usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1 || need+=(python3-matplotlib)
# gpumem-exporter serves metrics with prometheus_client; its tests parse them with its parser.
/usr/bin/python3 -c 'import prometheus_client' >/dev/null 2>&1 || need+=(python3-prometheus-client)
command -v tmux >/dev/null 2>&1 || need+=(tmux)                 # gpumem-report top's terminal test
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null ||
        { echo "setup: apt-get install ${need[*]} failed" >&2; exit 1; }
fi
