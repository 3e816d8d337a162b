#!/usr/bin/env bash
# bench-ab.sh: two gpumem-bench builds side by side in one run, alternated round by round (the
# machines differ by 15-30 % between processes, so one pair of runs proves nothing).
#
#     scripts/bench-ab.sh A_BENCH B_BENCH MODE [ROUNDS] [MODE ARGS...]
#
# Runs `A_BENCH MODE`, then `B_BENCH MODE`, ROUNDS times (default 5), keeps every `key=value` line
# the mode prints (its headline figures), and prints per key the median of each side with its
# range, and B/A of the medians. The full output of every run goes to $OUT/bench-ab-MODE.log
# (OUT defaults to /tmp). Exit status 1 when a run fails.
set -u
[ $# -ge 3 ] || { sed -n 2,10p "$0" | sed 's/^# \{0,1\}//'; exit 2; }
A=$1 B=$2 MODE=$3 ROUNDS=${4:-5}
shift $(($# >= 4 ? 4 : 3))
OUT=${OUT:-/tmp}
LOG=$OUT/bench-ab-$MODE.log
: >"$LOG"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for r in $(seq 1 "$ROUNDS"); do
    for side in A B; do
        bin=$A; [ "$side" = B ] && bin=$B
        echo "==== round $r side $side: $bin $MODE $*" >>"$LOG"
        if ! "$bin" "$MODE" "$@" >"$tmp/run" 2>&1; then
            cat "$tmp/run" >>"$LOG"
            echo "bench-ab: $side round $r failed ($bin $MODE); see $LOG" >&2
            exit 1
        fi
        cat "$tmp/run" >>"$LOG"
        grep -E '^[A-Za-z0-9_]+=[-0-9.]+$' "$tmp/run" | sed "s/^/$side /" >>"$tmp/figures"
    done
done
python3 - "$tmp/figures" "$MODE" "$ROUNDS" <<'PY'
import statistics, sys
figs = {}
for line in open(sys.argv[1]):
    side, kv = line.split()
    k, v = kv.split('=')
    figs.setdefault(k, {'A': [], 'B': []})[side].append(float(v))
print(f"gpumem-bench {sys.argv[2]}: A and B alternated over {sys.argv[3]} rounds; median [min..max]")
for k, s in figs.items():
    if not s['A'] or not s['B']:
        continue
    ma, mb = statistics.median(s['A']), statistics.median(s['B'])
    ratio = f"{mb / ma:.3f}" if ma else "-"
    print(f"  {k:40s} A {ma:10.2f} [{min(s['A']):.2f}..{max(s['A']):.2f}]  "
          f"B {mb:10.2f} [{min(s['B']):.2f}..{max(s['B']):.2f}]  B/A {ratio}")
PY
