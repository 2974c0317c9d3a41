#!/usr/bin/env bash
# SIGKILL a training stage at a random step N times; each time resume it with --resume and check
# the final weights are byte-identical to an uninterrupted run's (the docs/reliability.md row).
#
#   scripts/kill_resume.sh [N=20]
set -euo pipefail
N=${1:-20}
cd "$(dirname "$0")/.."
cargo build --release --quiet
M=$PWD/target/release/mmkd
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
$M data synth --out "$W/data" --train 32 --val 2 --test 2 --image-size 32 --seed 9 >/dev/null
$M data tokenizer --data "$W/data/train" --vocab-size 300 --out "$W/data/tokenizer.json" >/dev/null
STEPS=60
ARGS=(pretrain --config shapes-tiny --data "$W/data/train/pretrain.json" --images "$W/data"
  --tokenizer "$W/data/tokenizer.json" --max-steps $STEPS --save-every 4 --quiet)
run() {  # run OUT [extra...]
  local out=$1; shift
  "$M" "${ARGS[@]}" --out "$out" "$@"
}
run "$W/whole" >/dev/null
same=0
for i in $(seq 1 "$N"); do
  out="$W/killed-$i"
  target=$(( (RANDOM % (STEPS - 2)) + 1 ))
  # mmkd itself in the background (not a subshell), so the SIGKILL reaches it.
  "$M" "${ARGS[@]}" --out "$out" >/dev/null 2>&1 &
  pid=$!
  # Kill once the run has logged `target` steps (or when it ends first).
  while kill -0 $pid 2>/dev/null; do
    done_steps=$( (wc -l < "$out/metrics.jsonl") 2>/dev/null || echo 0)
    if [ "$done_steps" -ge "$target" ]; then kill -9 $pid 2>/dev/null || true; break; fi
    sleep 0.005
  done
  wait $pid 2>/dev/null || true
  killed_at=$( (wc -l < "$out/metrics.jsonl") 2>/dev/null || echo 0)
  if ls "$out/checkpoints"/step-* >/dev/null 2>&1; then
    how="resumed from $(ls "$out/checkpoints" | tail -n 1)"
    run "$out" --resume >/dev/null
  else
    run "$out" --force >/dev/null
    how="no checkpoint yet: started over"
  fi
  if cmp -s "$W/whole/model.safetensors" "$out/model.safetensors"; then
    same=$((same + 1)); verdict=identical
  else
    verdict=DIFFERENT
  fi
  echo "kill $i: SIGKILL after $killed_at logged steps, $how: $verdict"
done
echo "$same of $N resumed runs byte-identical to the uninterrupted run"
[ "$same" -eq "$N" ]
