#!/usr/bin/env bash
# Runs the PyTorch peer and `mmkd bench` back to back, ROUNDS times, on the same spec, and
# prints per round: samples/s of both, their ratio, and both peak RSS (MiB).
# Usage: docs/bench_vs_peer.sh [ROUNDS] [SPEC]   (env: PYTHON, PEER, MMKD, PEER_ARGS, MMKD_ARGS,
#        MMKD_KEY: the JSON field(s) of mmkd's rate, dotted and comma-separated; default
#        samples_per_s, and e.g. online.samples_per_s,cached.samples_per_s with
#        MMKD_ARGS="--teacher-cache ...", which times both steps in one run)
set -euo pipefail
rounds=${1:-3}
spec=${2:-/work/shared/bench/spec.json}
python=${PYTHON:-/work/pyenv/bin/python}
peer=${PEER:-/work/shared/bench/torch_dft_step.py}
mmkd=${MMKD:-${CARGO_TARGET_DIR:-target}/release/mmkd}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
field() { "$python" -c "
import json, sys
value = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
for key in sys.argv[2].split('.'):
    value = value[key]
print(value)" "$1" "$2"; }
maxrss() { awk '/Maximum resident set size/ {printf "%.0f", $NF/1024}' "$1"; }
IFS=, read -r -a keys <<<"${MMKD_KEY:-samples_per_s}"
printf "round\tpeer_samples_per_s"
for key in "${keys[@]}"; do printf "\tmmkd_%s\tratio" "$key"; done
printf "\tpeer_rss_mib\tmmkd_rss_mib\n"
for r in $(seq 1 "$rounds"); do
  /usr/bin/time -v "$python" "$peer" --spec "$spec" ${PEER_ARGS:-} >"$tmp/peer.out" 2>"$tmp/peer.time"
  /usr/bin/time -v "$mmkd" bench --spec "$spec" --json --no-matmul-peak ${MMKD_ARGS:-} >"$tmp/mmkd.out" 2>"$tmp/mmkd.time"
  p=$(field "$tmp/peer.out" samples_per_s)
  printf "%s\t%.3f" "$r" "$p"
  for key in "${keys[@]}"; do
    m=$(field "$tmp/mmkd.out" "$key")
    printf "\t%.3f\t%s" "$m" "$("$python" -c "print(f'{$m/$p:.2f}')")"
  done
  printf "\t%s\t%s\n" "$(maxrss "$tmp/peer.time")" "$(maxrss "$tmp/mmkd.time")"
done
