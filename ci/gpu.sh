#!/usr/bin/env bash
# The GPU check for a lent accelerator (see docs/BENCHMARKS.md for results).
#
# The device machine has the NVIDIA driver and CUDA (NVRTC) but no Rust
# toolchain, so the release binary is built on the development machine and
# carried:
#   cargo build --release -p clipa-cli --features cuda
#   cargo bench -p clipa-cli --bench clipa --features cuda --no-run   # prints the bench binary
#   mkdir -p .gpu && cp "$CARGO_TARGET_DIR/release/clipa" .gpu/clipa && cp BENCH .gpu/clipa-bench
#   strip .gpu/* && gzip -9 .gpu/*          # the carried tree is limited to 64 MiB
# then run `bash ci/gpu.sh` there with `.gpu` carried.
set -uo pipefail
for f in .gpu/*.gz; do [ -e "$f" ] && gunzip -kf "$f"; done
chmod +x .gpu/clipa .gpu/clipa-bench 2>/dev/null
BIN="${CLIPA_BIN:-.gpu/clipa}"
BENCH="${CLIPA_BENCH:-.gpu/clipa-bench}"
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
# Mixed precision and per-block checkpointing in a real run: 40 steps of the
# tiny preset in bf16 with checkpointing; the loss must fall (the final
# report prints it) and the run must finish.
run "$BIN" --backend cuda train --preset tiny --steps 40 --precision bf16 --grad-checkpointing \
    --output "$(mktemp -d)/bf16-run"
# Step times (clipa bench) on CUDA and on WGPU (Vulkan): the peer cases, then
# ViT-B/16 at 224/112/64 px with text 32/16/8 in bf16.
run "$BIN" --backend cuda bench --sweep --steps 20
run "$BIN" --backend wgpu bench --sweep --steps 20
for spec in "224 32" "112 16" "64 8"; do
    set -- $spec
    run "$BIN" --backend cuda bench --model clipa-b16 --batch-size 256 --image-size "$1" \
        --text-length "$2" --precision bf16 --steps 20
done
# Errors stay one line with exit code 2.
printf '\n$ %s\n' "$BIN --backend cuda --device 7 check"
"$BIN" --backend cuda --device 7 check; echo "exit code $?"
# The transformer fwd+bwd bench on CUDA and, for the ratio, both CPU backends
# on this machine's 16 cores.
if [ -x "$BENCH" ]; then
    run "$BENCH" --bench transformer_fwd_bwd
fi
exit $status
