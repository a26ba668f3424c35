#!/usr/bin/env bash
# The GPU check for a lent accelerator (see docs/BENCHMARKS.md for results).
#
# The device machine has the NVIDIA driver and CUDA (NVRTC) but no Rust
# toolchain, so the release binary is built on the development machine and
# carried:
#   cargo build --release -p clipa-cli --features cuda
#   mkdir -p .gpu && cp "$CARGO_TARGET_DIR/release/clipa" .gpu/ && strip .gpu/clipa
# then run `bash ci/gpu.sh` there with `.gpu` carried.
set -uo pipefail
BIN="${CLIPA_BIN:-.gpu/clipa}"
status=0
run() {
    printf '\n$ %s\n' "$*"
    "$@" || status=1
}
run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
run "$BIN" --version
run "$BIN" backends
# Correctness: attention + block forward/backward on CUDA against the CPU.
run "$BIN" --backend cuda check
# A ViT-B/16 block at 224 px (197 tokens, width 768, 12 heads), batch 32:
# timing on the GPU and, for the ratio, on this machine's CPU.
run "$BIN" --backend cuda check --batch 32 --tokens 197 --width 768 --heads 12
run "$BIN" --backend cpu check --batch 32 --tokens 197 --width 768 --heads 12
# Errors stay one line with exit code 2.
printf '\n$ %s\n' "$BIN --backend cuda --device 7 check"
"$BIN" --backend cuda --device 7 check; echo "exit code $?"
exit $status
