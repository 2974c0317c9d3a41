#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (about 10 minutes; docs/performance.md):
#
#   scripts/gpu-check.sh            # prints progress on stderr, one JSON line at the end
#
# 1. builds mmkd with `--features cuda` (`nccl` when there are ≥ 2 GPUs and mpirun);
# 2. every distillation loss and its gradients, the decoders' and the LLaVA models' logits on
#    the GPU against the PyTorch / transformers fixtures (the tests the CPU passes, with
#    MMKD_TEST_DEVICE=cuda: the GPU agrees with the CPU within twice their tolerance, 1e-5 for
#    the losses and 1e-4 for logits);
# 3. a 20-step DFT on the tiny preset, on the CPU and on the GPU: losses within 1e-3;
# 4. `mmkd bench --device cuda` on ../shared/bench/spec.json and configs/bench/real-scale.json:
#    samples/s, tokens/s, achieved TFLOP/s against the GPU's f32 peak, peak GPU memory; the
#    real-scale step again with the loss formed whole (`--loss-chunk-rows 0`) beside the
#    default chunked loss (1024 rows);
# 5. with ≥ 2 GPUs: the bench under `mpirun -np 2` (gradients over NCCL).
#
# The CUDA toolkit is the system's (nvcc on PATH) or, without one, the PyPI toolkit of
# scripts/cuda-build.sh. CUDA_COMPUTE_CAP defaults to the GPU's.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
T0=$(date +%s)
log() { printf '[gpu-check %4ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
RESULTS="$(mktemp -d)"
trap 'rm -rf "$RESULTS"' EXIT
status() { echo "$2" >"$RESULTS/$1"; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo '{"gpu_check":"no NVIDIA GPU found (nvidia-smi)"}'
    exit 1
fi
GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
GPUS="$(nvidia-smi -L | wc -l)"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}"
log "$GPUS × $GPU, compute capability $CUDA_COMPUTE_CAP"

FEATURE=cuda
if [ "$GPUS" -ge 2 ] && command -v mpirun >/dev/null 2>&1; then FEATURE=nccl; fi
if ! command -v nvcc >/dev/null 2>&1; then
    log "no nvcc on PATH: the PyPI toolkit of scripts/cuda-build.sh"
    eval "$(MMKD_CUDA_SETUP_ONLY=1 scripts/cuda-build.sh "$FEATURE" 2>/dev/null | grep '^export ')"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target/gpu-check}"
# The benchmark spec beside the project (../shared) or copied into it (shared/).
SPEC=../shared/bench/spec.json
[ -f "$SPEC" ] || SPEC=shared/bench/spec.json

log "build (--features $FEATURE)"
if cargo build --release --features "$FEATURE" >&2 &&
    cargo test --release --features "$FEATURE" --no-run --test distill_losses \
        --test lm_equivalence --test llava_equivalence >&2; then
    status build ok
else
    status build failed
    echo "{\"gpu_check\":\"build failed\",\"gpu\":\"$GPU\"}"
    exit 1
fi
MMKD="$CARGO_TARGET_DIR/release/mmkd"

log "losses, gradients and logits on cuda against the fixtures"
fixtures() {
    MMKD_TEST_DEVICE=cuda cargo test --release --features "$FEATURE" -q "$@" >&2
}
if fixtures --test distill_losses && fixtures --test lm_equivalence &&
    fixtures --test llava_equivalence logits_match; then
    status fixtures ok
else
    status fixtures failed
fi

log "20-step DFT on the tiny preset, cpu vs cuda"
W="$(mktemp -d)"
tiny() { "$MMKD" "$@" --config shapes-tiny --quiet; }
if "$MMKD" data synth --out "$W/data" --train 64 --val 4 --test 4 --image-size 32 --seed 5 >/dev/null &&
    "$MMKD" data tokenizer --data "$W/data/train" --vocab-size 400 --out "$W/tok.json" >/dev/null &&
    tiny pretrain --role teacher --tokenizer "$W/tok.json" --data "$W/data/train/pretrain.json" \
        --images "$W/data" --out "$W/teacher" >/dev/null &&
    tiny pretrain --tokenizer "$W/tok.json" --data "$W/data/train/pretrain.json" \
        --images "$W/data" --out "$W/student" >/dev/null; then
    for dev in cpu cuda; do
        tiny dft --data "$W/data/train/instruct.json" --images "$W/data" --init "$W/student" \
            --teacher "$W/teacher" --max-steps 20 --device "$dev" --out "$W/dft-$dev" >/dev/null ||
            log "dft on $dev failed"
    done
    python3 - "$W" >"$RESULTS/dft" <<'EOF' || status dft failed
import json, sys
w = sys.argv[1]
loss = lambda d: [json.loads(l)["loss"] for l in open(f"{w}/dft-{d}/metrics.jsonl")]
cpu, gpu = loss("cpu"), loss("cuda")
diff = max(abs(a - b) for a, b in zip(cpu, gpu))
ok = len(cpu) == len(gpu) == 20 and diff <= 1e-3
print(json.dumps({"ok": ok, "steps": len(gpu), "max_loss_diff": diff,
                  "loss_cpu": [cpu[0], cpu[-1]], "loss_cuda": [gpu[0], gpu[-1]]}))
EOF
else
    status dft '"setup failed"'
fi
rm -rf "$W"

# Peak GPU memory of a command: nvidia-smi sampled every 100 ms (the device's, all processes).
bench() {
    local name="$1"
    shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$RESULTS/$name.mem" &
    local sampler=$!
    "$@" --no-matmul-peak --json 2>/dev/null | tail -1 >"$RESULTS/$name.json" || log "$name failed"
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
}
log "bench on $SPEC"
bench spec timeout 240 "$MMKD" bench --device cuda --spec "$SPEC" --steps 6
log "bench on configs/bench/real-scale.json"
bench real timeout 300 "$MMKD" bench --device cuda --spec configs/bench/real-scale.json --steps 3
log "bench on configs/bench/real-scale.json, the loss formed whole"
bench real_whole timeout 300 "$MMKD" bench --device cuda --spec configs/bench/real-scale.json \
    --steps 3 --loss-chunk-rows 0
if [ "$FEATURE" = nccl ]; then
    log "bench under mpirun -np 2 (NCCL)"
    bench spec2 timeout 240 mpirun --allow-run-as-root -np 2 "$MMKD" bench --device cuda \
        --spec "$SPEC" --steps 6
fi

python3 - "$RESULTS" "$GPU" "$GPUS" "$(($(date +%s) - T0))" "$SPEC" <<'EOF'
import json, os, sys
res, gpu, gpus, secs, spec = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
read = lambda n: open(os.path.join(res, n)).read().strip() if os.path.exists(os.path.join(res, n)) else None
# f32 (non-tensor-core) peaks, TFLOP/s: the models train in f32.
PEAKS = {"H100 80GB HBM3": 66.9, "H100 SXM": 66.9, "H100 PCIe": 51.2, "H100 NVL": 60.0,
         "H200": 66.9, "A100": 19.5, "L40S": 91.6, "L4": 30.3, "RTX 4090": 82.6, "A10": 31.2}
peak = next((v for k, v in PEAKS.items() if k in gpu), None)
def seq_len(path):
    s = json.load(open(path))
    return s["prefix_tokens"] + (s["vision"]["image_size"] // s["vision"]["patch"]) ** 2 \
        + s["prompt_tokens"] + s["response_tokens"]
def bench(name, spec):
    text = read(name + ".json")
    try:
        r = json.loads(text)
    except Exception:
        return {"ok": False}
    mem = [int(x) for x in (read(name + ".mem") or "").split() if x.isdigit()]
    seq = seq_len(spec)
    out = {"ok": True, "samples_per_s": r["samples_per_s"], "step_s": r["step_s_median"],
           "tflops": r["gflops"] / 1000, "peak_gpu_mib": max(mem) if mem else None,
           "ranks": r.get("ranks"), "loss_chunk_rows": r.get("loss_chunk_rows"),
           "loss": [r["loss_first"], r["loss_last"]]}
    out["tokens_per_s"] = r["samples_per_s"] * seq
    if peak:
        out["f32_peak_tflops"] = peak
        out["of_peak"] = out["tflops"] / peak
    return out
def status(name):
    text = read(name)
    try:
        return json.loads(text)
    except Exception:
        return text
summary = {"gpu_check": "done", "gpu": gpu, "gpus": gpus, "seconds": secs,
           "build": status("build"), "fixtures_on_cuda": status("fixtures"),
           "dft_cpu_vs_cuda": status("dft"), "bench_spec": bench("spec", spec),
           "bench_real_scale": bench("real", "configs/bench/real-scale.json"),
           "bench_real_scale_loss_whole": bench("real_whole", "configs/bench/real-scale.json")}
if os.path.exists(os.path.join(res, "spec2.json")):
    summary["bench_spec_2_ranks_nccl"] = bench("spec2", spec)
print(json.dumps(summary))
EOF
