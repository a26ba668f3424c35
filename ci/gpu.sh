#!/usr/bin/env bash
# The GPU check for a lent accelerator (see docs/BENCHMARKS.md for results).
#
# The device machine has the NVIDIA driver and CUDA (NVRTC) but no Rust
# toolchain, so the release binary is built on the development machine and
# carried:
#   cargo build --release -p clipa-cli --features cuda
#   cargo test --release -p clipa-cli --features cuda --test integration --no-run  # prints TESTS
#   cargo bench -p clipa-cli --bench clipa --features cuda --no-run   # prints BENCH
#   mkdir -p .gpu && cp "$CARGO_TARGET_DIR/release/clipa" .gpu/clipa && cp TESTS .gpu/clipa-tests
#   cp BENCH .gpu/clipa-bench               # Burn's side of the GEMM comparison; leave it out if the tree is too large
#   strip .gpu/clipa* && gzip -9 .gpu/clipa*   # the carried tree is limited to 64 MiB
# then run `bash ci/gpu.sh` there with `.gpu` (and `.gl`, Vulkan's loader) carried.
# It prints one table of ms/step, images/s, TFLOP/s and MFU, clipa beside
# OpenCLIP (ci/peer_gpu.py; open_clip's wheels may travel in .gpu/whl), the
# per-kernel time of one ViT-B/16 step (ci/kernel_table.py) and B/16's six
# bf16 GEMMs in Burn beside torch.matmul (benches/gemm.rs, ci/gemm_peer.py).
# Sized for one device call of at most 8 minutes; CLIPA_GPU_EXTRA=1 adds the
# wgpu sweep and a bf16 training run.
set -uo pipefail
# Everything the table needs lands in $OUT (the device tool brings it back)
# or in a temporary folder.
OUT="${OUT:-$(mktemp -d)}"
for f in .gpu/*.gz; do [ -e "$f" ] && gunzip -kf "$f"; done
chmod +x .gpu/clipa .gpu/clipa-tests .gpu/clipa-bench 2>/dev/null
# Vulkan loader for the wgpu rows, when the machine has none (.gl carries
# Debian's libvulkan1 and the GL vendor-neutral dispatch).
if ! ldconfig -p | grep -q libvulkan && ls .gl/*.deb >/dev/null 2>&1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -e "$icd" ]; then export VK_DRIVER_FILES="$icd"; fi
BIN="${CLIPA_BIN:-.gpu/clipa}"
BENCH="${CLIPA_BENCH:-.gpu/clipa-bench}"
TESTS="${CLIPA_TESTS:-.gpu/clipa-tests}"
status=0
# Each step has its own time limit, so that one hang cannot eat the lease.
run() {
    local limit=$1
    shift
    printf '\n$ %s   (%s)\n' "$*" "$(date -u +%H:%M:%S)"
    timeout "$limit" "$@" || { echo "exit code $?"; status=1; }
}
run 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
run 20 "$BIN" --version
run 60 "$BIN" backends
# Correctness: attention + block forward/backward on CUDA against the CPU,
# and the block in bf16 against float32.
run 90 "$BIN" --backend cuda check
# Parity with OpenCLIP on CUDA: both reference models' outputs, every
# activation, the loss and every parameter gradient (tests/parity.rs, at the
# TF32 tolerance of 1e-2). The test binary finds the references (the
# repository's tests/fixtures, carried with the tree) through CLIPA_FIXTURES;
# it runs from cli/, as cargo runs it.
if [ -x "$TESTS" ]; then
    run 120 sh -c "cd cli && CLIPA_FIXTURES=\"$PWD/tests/fixtures\" \"$(realpath "$TESTS")\" \
        parity:: --test-threads 1 --nocapture"
else
    echo "no .gpu/clipa-tests: the OpenCLIP parity tests on cuda were not run"
    status=1
fi
# A ViT-B/16 block at 224 px (197 tokens, width 768, 12 heads), batch 32:
# timing on the GPU and, for the ratio, on this machine's CPU.
run 60 "$BIN" --backend cuda check --batch 32 --tokens 197 --width 768 --heads 12
run 60 "$BIN" --backend cpu check --batch 32 --tokens 197 --width 768 --heads 12
# Step times (clipa bench --json) on CUDA and on WGPU (Vulkan): the peer
# cases of bench-tiny, then ViT-B/16 at 224/112/64 px with text 32/16/8 in
# bf16 at batch 256 (H200: 139 GiB; every case fits with room to spare).
run 150 sh -c "\"$BIN\" --backend cuda bench --sweep --steps 10 --json | tee $OUT/cuda.json"
for spec in "224 32" "112 16" "64 8"; do
    set -- $spec
    run 120 sh -c "\"$BIN\" --backend cuda bench --model vit-b16 --batch-size 256 --image-size $1 \
        --text-length $2 --precision bf16 --steps 10 --json | tee -a $OUT/cuda.json"
done
# The largest batch that fits, for the goal case (ViT-B/16, 112 px, text 16,
# bf16). Memory grows about linearly with the batch, and the batch-256
# run's peak memory includes the fixed part (weights, AdamW moments), so
# scaling it to 90 % of the card errs low; the search then steps down by a
# quarter while a run fails (out of memory).
total_mb=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
peak_mb=$(python3 - "$OUT/cuda.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        for c in json.loads(line)["cases"]:
            if c["name"] == "vit-b16_b256_img112_txt16":
                print(int(c["peak_mem_mb"] or 0))
PY
)
big=0
if [ "${total_mb:-0}" -gt 0 ] && [ "${peak_mb:-0}" -gt 0 ]; then
    big=$(( total_mb * 9 / 10 * 256 / peak_mb / 128 * 128 ))
fi
tries=0
fits=0
while [ "$big" -gt 256 ] && [ $tries -lt 3 ]; do
    printf '\n$ clipa bench ViT-B/16 112 px at batch %s (largest-batch search)   (%s)\n' "$big" "$(date -u +%H:%M:%S)"
    if timeout 150 "$BIN" --backend cuda bench --model vit-b16 --batch-size "$big" --image-size 112 \
        --text-length 16 --precision bf16 --steps 10 --json >"$OUT/big.json"; then
        tee -a "$OUT/cuda.json" <"$OUT/big.json"
        fits=1
        break
    fi
    big=$(( big * 3 / 4 / 128 * 128 ))
    tries=$((tries + 1))
done
[ "$fits" = 1 ] || { echo "no batch above 256 ran: the table has batch 256 only"; big=0; }
# Where the time of one ViT-B/16 step (112 px, text 16, batch 256, bf16)
# goes, kernel by kernel: CubeCL's profiling log times each launch (it
# waits for each, so the step is slower than the bench's), and
# ci/kernel_table.py sums the last step's rows by kernel name.
run 150 env CUBECL_DEBUG_LOG="$OUT/b16-kernels.log" CUBECL_DEBUG_OPTION=profile "$BIN" --backend cuda \
    bench --model vit-b16 --batch-size 256 --image-size 112 --text-length 16 --precision bf16 \
    --steps 1 --warmup 2 --json
run 30 sh -c "python3 ci/kernel_table.py \"$OUT/b16-kernels.log\" --top 40 | tee $OUT/b16-kernels.txt"
gzip -f "$OUT/b16-kernels.log"
# The six GEMM shapes of that step alone, bf16, Burn's matmul (criterion's
# cuda/gemm_b16 group, benches/gemm.rs) beside torch.matmul: whether the
# products themselves hold the step back.
if [ -x "$BENCH" ]; then
    run 120 "$BENCH" --bench '^cuda/gemm_b16' --warm-up-time 1 --measurement-time 2
else
    echo "no .gpu/clipa-bench: Burn's side of the GEMM comparison was not run"
fi
if python3 -c 'import torch' 2>/dev/null; then
    run 60 python3 ci/gemm_peer.py --json "$OUT/gemm-torch.json"
fi
# Extra checks when time allows (CLIPA_GPU_EXTRA=1): the wgpu sweep on
# Vulkan, and mixed precision with per-block checkpointing in a real run
# (40 steps of the tiny preset in bf16; the loss must fall).
if [ "${CLIPA_GPU_EXTRA:-0}" = 1 ]; then
    run 150 sh -c "\"$BIN\" --backend wgpu bench --sweep --steps 10 --json | tee $OUT/wgpu.json"
    run 120 "$BIN" --backend cuda train --preset tiny --steps 40 --precision bf16 --grad-checkpointing \
        --output "$(mktemp -d)/bf16-run"
fi
# OpenCLIP on the same cases with bf16 autocast, where PyTorch is installed
# (open_clip itself may travel as wheels in .gpu/whl).
if python3 -c 'import torch' 2>/dev/null; then
    if ls .gpu/whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site
    fi
    run 180 env PYTHONUNBUFFERED=1 python3 ci/peer_gpu.py --json "$OUT/openclip.json"
    if [ "$big" -gt 256 ]; then
        run 120 env PYTHONUNBUFFERED=1 python3 ci/peer_gpu.py --json "$OUT/openclip-big.json" \
            --b16-batch "$big" --only "vit-b16_b${big}_img112_txt16"
        if [ -s "$OUT/openclip.json" ] && [ -s "$OUT/openclip-big.json" ]; then
            python3 - "$OUT/openclip.json" "$OUT/openclip-big.json" <<'PY'
import json, sys
main, extra = (json.load(open(p)) for p in sys.argv[1:])
main["cases"] += extra["cases"]
json.dump(main, open(sys.argv[1], "w"))
PY
        fi
    fi
else
    echo "PyTorch is not installed here: no OpenCLIP rows"
fi
printf '\n=== clipa and OpenCLIP (bf16 autocast), ms per training step\n'
wgpu_rows=()
[ -s "$OUT/wgpu.json" ] && wgpu_rows=(wgpu="$OUT/wgpu.json")
python3 ci/gpu_table.py --peer "$OUT/openclip.json" cuda="$OUT/cuda.json" "${wgpu_rows[@]}" \
    | tee "$OUT/table.txt"
# Data parallelism, when the machine has more than one GPU: the same short
# ViT-B/16 run (112 px, 16 tokens, bf16, 256 images per GPU on the built-in
# data) on one GPU and on all of them, and the scaling efficiency
# images/s(N) / (N × images/s(1)), from the last logged window of each run.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "${gpus:-0}" -gt 1 ]; then
    dp=$(mktemp -d)
    for n in 1 "$gpus"; do
        run 300 "$BIN" --backend cuda train --preset tiny --model vit-b16 --image-size 112 \
            --image-reduction none --text-length 16 --precision bf16 --batch-size $((256 * n)) \
            --steps 30 --log-every 10 \
            --eval-every 0 --workers 16 --devices "$(seq -s, 0 $((n - 1)))" --output "$dp/gpus$n"
    done
    python3 - "$dp" "$gpus" <<'PY' | tee "$OUT/scaling.txt"
import json, sys
root, n = sys.argv[1], int(sys.argv[2])
def ips(k):
    lines = open(f"{root}/gpus{k}/metrics.jsonl").read().splitlines()
    return json.loads(lines[-1])["images_per_sec"]
one, many = ips(1), ips(n)
print(f"data parallel: 1 GPU {one:.0f} img/s, {n} GPUs {many:.0f} img/s, "
      f"scaling efficiency {many / (n * one):.2f}")
PY
else
    echo "one GPU here: no data-parallel scaling case"
fi
# Errors stay one line with exit code 2.
printf '\n$ %s\n' "$BIN --backend cuda --device 7 check"
"$BIN" --backend cuda --device 7 check; echo "exit code $?"
# The criterion benches' CUDA groups: transformer stack, attention, losses
# and the bench-tiny train steps (the CPU groups take minutes on 16 cores
# and are measured on the development machine instead). Opt-in with
# CLIPA_GPU_CRITERION=1: with the parity tests and the largest-batch search
# the rest of the script already takes about 8 minutes.
if [ -x "$BENCH" ] && [ "${CLIPA_GPU_CRITERION:-0}" = 1 ]; then
    run 150 "$BENCH" --bench '^cuda/'
fi
exit $status
