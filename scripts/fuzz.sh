#!/usr/bin/env bash
# Fuzzes every reader of mmkd (fuzz/fuzz_targets/) with libFuzzer for SECONDS each (default 60),
# seeded with the committed fixtures and a small synthetic data set; prints one line per target
# (executions, corpus size, crashes) and keeps crashing inputs in fuzz/artifacts/TARGET/.
# Needs a nightly toolchain and cargo-fuzz (installed when missing). Not part of CI.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
SECONDS_EACH=${1:-60}
shift || true
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
# No sanitizer: the readers are safe Rust; what is hunted is panics, aborts and huge allocations
# (libFuzzer's -rss_limit_mb), and the build is several times faster without ASan.
cargo "+$TOOLCHAIN" fuzz build -s none >/dev/null

# Seeds: a small synthetic data set (LLaVA data, scenes, evaluation files, images) ...
cargo build --release --quiet
SYNTH=$(mktemp -d)
trap 'rm -rf "$SYNTH"' EXIT
target/release/mmkd data synth --out "$SYNTH" --train 4 --val 2 --test 2 --image-size 32 >/dev/null
seed() {
  local target=$1; shift
  mkdir -p "fuzz/corpus/$target"
  for f in "$@"; do cp "$f" "fuzz/corpus/$target/$(echo "$f" | tr '/' '_')" 2>/dev/null || true; done
}
# ... and the committed fixtures.
seed llava_data "$SYNTH/train/pretrain.json" "$SYNTH/train/instruct.json" datasets/tests/fixtures/phi_reference.json
seed scenes "$SYNTH/train/scenes.jsonl"
seed tokenizer datasets/tests/fixtures/tokenizer.json tests/fixtures/llava_siglip_qwen2/tokenizer.json
seed llava_config tests/fixtures/llava_siglip_qwen2/config.json tests/fixtures/llava_clip_llama/config.json vision/tests/fixtures/clip_tower/config.json
seed processor_config vision/tests/fixtures/pre_*/preprocessor_config.json tests/fixtures/llava_siglip_qwen2/processor_config.json
seed safetensors tests/fixtures/distill/optim.safetensors tests/fixtures/distill/distill.safetensors
seed image tests/fixtures/images/*.png tests/fixtures/photo_97x61.png
seed preset configs/*.toml
seed template datasets/templates/*.toml
# Recipes: each built-in recipe and its seed file, NUL-separated, then a reply.
mkdir -p fuzz/corpus/recipe
for r in configs/recipes/*.toml; do
  { cat "$r"; printf '\0'; cat "${r%.toml}.seed.jsonl"; printf '\0red'; } > "fuzz/corpus/recipe/$(basename "$r")"
done
mkdir -p fuzz/corpus/api_reply
printf '%s' '{"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "red"}, "logprobs": {"content": [{"token": "red", "logprob": -0.25, "bytes": [114, 101, 100], "top_logprobs": [{"token": "red", "logprob": -0.25}, {"token": "blue", "logprob": -1.5}]}]}}], "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}}' > fuzz/corpus/api_reply/reply.json
mkdir -p fuzz/corpus/eval_files
for i in 0 1 2 3 4; do
  for f in tests/fixtures/evalset/*.jsonl tests/fixtures/eval/*.jsonl; do
    { printf "\\x0$i"; cat "$f"; } > "fuzz/corpus/eval_files/$i-$(basename "$f")"
  done
done
mkdir -p fuzz/corpus/cache_manifest
# A real top-8 teacher cache: a teacher trained for two steps, run over the synthetic data.
target/release/mmkd data tokenizer --data "$SYNTH/train" --vocab-size 300 --out "$SYNTH/tokenizer.json" >/dev/null
target/release/mmkd pretrain --config shapes-tiny --data "$SYNTH/train/pretrain.json" --images "$SYNTH" \
  --tokenizer "$SYNTH/tokenizer.json" --out "$SYNTH/teacher" --max-steps 2 --quiet >/dev/null
target/release/mmkd teacher-cache --teacher "$SYNTH/teacher" --config shapes-tiny --stage dpt \
  --data "$SYNTH/train/pretrain.json" --images "$SYNTH" --top-k 8 --shard-size 2 --quiet --out "$SYNTH/cache" >/dev/null
seed cache_shard "$SYNTH"/cache/shard-*.safetensors
seed cache_manifest "$SYNTH/cache/manifest.json"
# The PEFT fixture's config, its base named by absolute path (the target loads it there).
mkdir -p fuzz/corpus/lora_adapter
sed "s#\"../llava_siglip_qwen2\"#\"$ROOT/tests/fixtures/llava_siglip_qwen2\"#" \
  tests/fixtures/lora_peft/adapter_config.json > fuzz/corpus/lora_adapter/peft_fixture.json

TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  mapfile -t TARGETS < <(cargo "+$TOOLCHAIN" fuzz list)
fi
printf "%-18s %12s %8s %8s\n" target executions corpus crashes
for t in "${TARGETS[@]}"; do
  log=$(mktemp)
  set +e
  cargo "+$TOOLCHAIN" fuzz run -s none "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -max_len=1048576 -print_final_stats=1 \
    >"$log" 2>&1
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  corpus=$(ls "fuzz/corpus/$t" | wc -l)
  crashes=$(ls "fuzz/artifacts/$t" 2>/dev/null | wc -l)
  printf "%-18s %12s %8s %8s\n" "$t" "$execs" "$corpus" "$crashes"
  if [ "$crashes" != "0" ]; then tail -n 30 "$log" | sed 's/^/    /'; fi
  rm -f "$log"
done
