#!/usr/bin/env bash
# Compile mmkd's CUDA build on a machine with no GPU and no system CUDA toolkit.
#
#   scripts/cuda-build.sh [FEATURE]        # FEATURE: nccl (default; = cuda + mpi + NCCL) | cuda | mpi
#
# The CUDA toolkit comes from PyPI wheels (nothing else is downloaded), unpacked once into a
# directory laid out like a CUDA install (bin/nvcc, nvvm/bin/cicc, include/, lib/ = lib64/ with
# unversioned .so links, lib/stubs/libcuda.so). Then it runs, for the root package only:
#
#   cargo build  -p mmkd --features FEATURE
#   cargo clippy -p mmkd --features FEATURE --all-targets -- -D warnings
#
# Why CUDA 13.0 and not 12.x: the cu12 nvcc wheels (nvidia-cuda-nvcc-cu12, every 12.x) hold only
# ptxas + libnvvm, no nvcc/cicc/cudafe++/fatbinary, so candle-kernels cannot be compiled with them.
# The CUDA 13 wheels hold the whole compiler. 13.0 is the oldest 13.x, so its PTX (ISA 9.0) JITs
# on any driver that runs CUDA 13 (r580 or newer); cudarc 0.19.10 supports 13.0..13.4.
# NCCL 2.30 matches cudarc's `nccl` feature (bindings for nccl-02030).
#
# The NVIDIA driver (libcuda) is not on PyPI. cudarc with `dynamic-linking` links `-lcuda`, so a
# stub lib/stubs/libcuda.so (SONAME libcuda.so.1) exporting the driver API symbols of cuda.h is
# built with cc; every stub function returns CUDA_ERROR_STUB_LIBRARY (34). The binary needs the
# real driver (libcuda.so.1) and the toolkit's libraries (libcudart.so.13, libcublas.so.13, ...)
# at run time: `source "$TOOLKIT/env.sh"` sets LD_LIBRARY_PATH to them; to start the binary on a
# machine with no driver (CPU paths, --help), add "$TOOLKIT/lib/stubs" to LD_LIBRARY_PATH too.
#
# Environment:
#   MMKD_CUDA_CACHE   wheels + unpacked toolkit        (default: $HOME/.cache/mmkd-cuda)
#   CUDA_COMPUTE_CAP  GPU architecture to compile for  (default: 80). candle's PTX kernels built
#                     for 80 JIT on any newer GPU, but its static MoE/GGUF kernels (libmoe) are
#                     sm_80 machine code only: use 90 for H100/H200 if those are needed.
#   CARGO_TARGET_DIR  cargo's target dir               (default: <repo>/target/cuda)
#   CUDAFORGE_THREADS parallel nvcc jobs in candle-kernels' build script (default: nproc)
#   MMKD_CUDA_SETUP_ONLY=1  stop after setting up the toolkit; print its environment as `export`
#                     lines on stdout (CARGO_TARGET_DIR is not among them)
set -euo pipefail

FEATURE="${1:-nccl}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MMKD_CUDA_CACHE:-$HOME/.cache/mmkd-cuda}"

# Exact pins: the cache key. Component versions are those of the `cuda-toolkit==13.0.2` meta-package.
CUDA_RELEASE=13.0
PINS=(
  nvidia-cuda-nvcc==13.0.88     # nvcc, cudafe++, fatbinary, nvlink, ptxas
  nvidia-nvvm==13.0.88          # nvvm/bin/cicc, libnvvm, libdevice
  nvidia-cuda-crt==13.0.88      # include/crt (nvcc's device-runtime headers)
  nvidia-cuda-runtime==13.0.96  # cuda.h, cuda_runtime.h, libcudart
  nvidia-cuda-cccl==13.0.85     # CUB/Thrust/libcu++ headers
  nvidia-cublas==13.1.0.3       # libcublas, libcublasLt
  nvidia-curand==10.4.0.35      # libcurand
  nvidia-cuda-nvrtc==13.0.88    # libnvrtc
  nvidia-nccl-cu13==2.30.7      # libnccl, nccl.h
)
KEY="cuda-13.0.2-nccl-2.30.7"
WHEELS="$CACHE/wheels/$KEY"
TOOLKIT="$CACHE/toolkit-$KEY"

log() { printf '[cuda-build] %s\n' "$*" >&2; }
now() { date +%s.%N; }
TIMINGS=()
PHASE="" PHASE_T0=""
phase_begin() { PHASE="$1"; PHASE_T0="$(now)"; log "== $PHASE"; }
phase_end() {
  local secs
  secs="$(awk -v a="$PHASE_T0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')"
  TIMINGS+=("$(printf '%-8s %8ss  %s' "$PHASE" "$secs" "${1:-}")")
  log "== $PHASE: ${secs}s ${1:-}"
  PHASE=""
}
summary() {
  local rc=$?
  if [[ -n "$PHASE" ]]; then
    TIMINGS+=("$(printf '%-8s %8ss  FAILED' "$PHASE" \
      "$(awk -v a="$PHASE_T0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')")")
  fi
  if ((${#TIMINGS[@]})); then
    log "phase times (feature '$FEATURE', $(nproc) cores):"
    printf '[cuda-build]   %s\n' "${TIMINGS[@]}" >&2
  fi
  exit "$rc"
}
trap summary EXIT

case "$FEATURE" in
  cuda | nccl | mpi) ;;
  *) log "unknown feature '$FEATURE' (expected nccl, cuda or mpi)"; exit 2 ;;
esac

# ---- download the wheels (cached) ---------------------------------------------------------------
phase_begin download
if [[ -f "$WHEELS/.complete" ]]; then
  phase_end "(cached: $WHEELS)"
else
  mkdir -p "$WHEELS"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --dest "$WHEELS" "${PINS[@]}"
  touch "$WHEELS/.complete"
  phase_end "($(du -sh "$WHEELS" | cut -f1) in $WHEELS)"
fi

# ---- unpack into a CUDA-install-like tree (once) --------------------------------------------------
phase_begin unpack
if [[ -f "$TOOLKIT/.complete" && -x "$TOOLKIT/bin/nvcc" ]]; then
  phase_end "(cached: $TOOLKIT)"
else
  STAGE="$TOOLKIT.tmp.$$"
  rm -rf "$STAGE" "$TOOLKIT"
  mkdir -p "$STAGE/x"
  for whl in "$WHEELS"/*.whl; do
    python3 -m zipfile -e "$whl" "$STAGE/x"
  done
  # nvidia/cu13/{bin,nvvm,include,lib} is already a toolkit tree; nvcc.profile finds its pieces
  # relative to bin/. NCCL ships separately under nvidia/nccl.
  mv "$STAGE/x/nvidia/cu13" "$STAGE/root"
  R="$STAGE/root"
  cp -a "$STAGE/x/nvidia/nccl/include/." "$R/include/"
  mv "$STAGE/x/nvidia/nccl/lib/libnccl.so.2" "$R/lib/"
  rm -rf "$STAGE/x"
  # zipfile does not keep the executable bits.
  chmod +x "$R"/bin/* "$R"/nvvm/bin/*
  # Unversioned names for the linker: libcublas.so -> libcublas.so.13, ...
  (
    cd "$R/lib"
    for f in lib*.so.*; do
      base="${f%%.so.*}.so"
      [[ -e "$base" ]] || ln -s "$f" "$base"
    done
  )
  ln -s lib "$R/lib64"
  # Driver stub: every driver API name in cuda.h (also after the header's _v2/_v3 renames),
  # each returning CUDA_ERROR_STUB_LIBRARY.
  mkdir -p "$R/lib/stubs"
  {
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*\b' "$R/include/cuda.h"
    printf '#include <cuda.h>\n' | cc -E -P -I"$R/include" -x c - |
      grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t'
  } | sort -u | awk 'BEGIN { print "/* libcuda stub for linking only: generated by scripts/cuda-build.sh */" }
                     { printf "int %s(void) { return 34; /* CUDA_ERROR_STUB_LIBRARY */ }\n", $1 }' \
    >"$R/lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$R/lib/stubs/libcuda.so" "$R/lib/stubs/libcuda_stub.c"
  ln -s libcuda.so "$R/lib/stubs/libcuda.so.1"
  cat >"$R/env.sh" <<EOF
# Source this to use the toolkit (and to run a CUDA build of mmkd against its libraries).
export CUDA_HOME="$TOOLKIT" CUDA_PATH="$TOOLKIT" CUDA_ROOT="$TOOLKIT"
export PATH="$TOOLKIT/bin:\$PATH"
export LIBRARY_PATH="$TOOLKIT/lib:$TOOLKIT/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$TOOLKIT/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
  touch "$R/.complete"
  mv "$R" "$TOOLKIT"
  rm -rf "$STAGE"
  phase_end "($(du -sh "$TOOLKIT" | cut -f1) in $TOOLKIT)"
fi

# ---- environment for candle-kernels (cudaforge), cudarc and the linker ----------------------------
export CUDA_HOME="$TOOLKIT" CUDA_PATH="$TOOLKIT" CUDA_ROOT="$TOOLKIT"
export NVCC="$TOOLKIT/bin/nvcc"
export PATH="$TOOLKIT/bin:$PATH"
export LIBRARY_PATH="$TOOLKIT/lib:$TOOLKIT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target/cuda}"

NVCC_VERSION="$(nvcc --version | sed -n 4p)"
case "$NVCC_VERSION" in
  *"release $CUDA_RELEASE,"*) ;;
  *) log "unexpected nvcc: $NVCC_VERSION"; exit 1 ;;
esac
log "nvcc: $NVCC_VERSION; CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; CARGO_TARGET_DIR=$CARGO_TARGET_DIR"

if [[ "${MMKD_CUDA_SETUP_ONLY:-0}" == 1 ]]; then
  # The environment for a build (and for running it: LD_LIBRARY_PATH), as `export` lines on stdout:
  #   eval "$(MMKD_CUDA_SETUP_ONLY=1 scripts/cuda-build.sh 2>/dev/null | grep '^export ')"
  export LD_LIBRARY_PATH="$TOOLKIT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  for v in CUDA_HOME CUDA_PATH CUDA_ROOT NVCC PATH LIBRARY_PATH LD_LIBRARY_PATH CUDA_COMPUTE_CAP \
    CUDAFORGE_THREADS; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
  log "toolkit ready in $TOOLKIT (the export lines above; or: source $TOOLKIT/env.sh)"
  exit 0
fi

# ---- system packages: rsmpi needs Open MPI (found through mpicc/pkg-config) and libclang ------------
if [[ "$FEATURE" != cuda ]] && ! command -v mpicc >/dev/null 2>&1; then
  phase_begin apt
  SUDO=""
  if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    libopenmpi-dev openmpi-bin clang libclang-dev >/dev/null
  phase_end "(libopenmpi-dev openmpi-bin clang libclang-dev)"
fi

cd "$REPO"
phase_begin build
cargo build -p mmkd --features "$FEATURE"
phase_end "(cargo build -p mmkd --features $FEATURE)"

phase_begin clippy
cargo clippy -p mmkd --features "$FEATURE" --all-targets -- -D warnings
phase_end "(cargo clippy -p mmkd --features $FEATURE --all-targets -- -D warnings)"

log "ok. To run the binary: source $TOOLKIT/env.sh (needs the NVIDIA driver's libcuda.so.1;"
log "on a machine with none, add $TOOLKIT/lib/stubs to LD_LIBRARY_PATH to start it)"
