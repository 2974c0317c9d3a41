#!/usr/bin/env bash
# Runs the tiny preset's stages with one mmkd binary into OUT: data, tokenizer, teacher PT and
# SFT, student PT, SFT, DFT online (grad_accum 2, micro-batches side by side), the teacher cache
# and DFT from it. Two binaries' OUT directories are then compared with
# scripts/compare_runs.py (every metrics.jsonl field but the timing, and the weights' bytes).
#
#   scripts/stage_runs.sh target/release/mmkd /tmp/runs-before
set -euo pipefail
BIN=$(realpath "$1")
OUT=$2
mkdir -p "$OUT"
cd "$OUT"
q=(--config shapes-tiny --quiet)
pt=(--data data/train/pretrain.json --images data)
it=(--data data/train/instruct.json --images data)
"$BIN" data synth --out data --train 48 --val 8 --test 8 --image-size 32 --seed 3 >/dev/null
"$BIN" data tokenizer --data data/train --vocab-size 400 --out data/tokenizer.json >/dev/null
"$BIN" pretrain "${q[@]}" "${pt[@]}" --role teacher --tokenizer data/tokenizer.json --out teacher-pt >/dev/null
"$BIN" sft "${q[@]}" "${it[@]}" --role teacher --init teacher-pt --out teacher-sft --set epochs=3 >/dev/null
"$BIN" pretrain "${q[@]}" "${pt[@]}" --tokenizer data/tokenizer.json --out student-pt >/dev/null
"$BIN" sft "${q[@]}" "${it[@]}" --init student-pt --out student-sft --set epochs=2 >/dev/null
"$BIN" dpt "${q[@]}" "${pt[@]}" --teacher teacher-sft --tokenizer data/tokenizer.json --out student-dpt >/dev/null
"$BIN" dft "${q[@]}" "${it[@]}" --init student-pt --teacher teacher-sft --out student-dft \
    --set epochs=2 --set train.grad_accum=2 --set train.parallel_micro_batches=2 >/dev/null
"$BIN" teacher-cache "${q[@]}" "${it[@]}" --stage dft --teacher teacher-sft --out cache >/dev/null
"$BIN" dft "${q[@]}" "${it[@]}" --init student-pt --teacher-cache cache --out student-dft-cached \
    --set epochs=2 >/dev/null
echo "runs written to $OUT"
