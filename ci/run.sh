#!/usr/bin/env bash
# What CI runs (`.ci/run`, GitHub Actions): format, lints, the tests on the
# CPU and on WGPU (Mesa's software Vulkan driver when there is no GPU), a
# compile check of the CUDA backend, and a compile of the benches.
#
# Build economy on a 2-core runner: one profile (release) builds the tests
# and the benches, and clippy's dependency artifacts are reused by
# `cargo check`, so the Burn graph is compiled once in each mode. The target
# folder lives outside the checkout (CLIPA_TARGET_DIR) so that it can be kept
# between runs, as a CI cache is; the run also passes from an empty one.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CLIPA_TARGET_DIR:-$HOME/.cache/clipa-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export CARGO_INCREMENTAL=0
mkdir -p "$CARGO_TARGET_DIR"

step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

step "software Vulkan driver"
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
ls /usr/share/vulkan/icd.d/

step "Fashion-MNIST (the real-data converter test reads Debian's IDX files)"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
        || echo "dataset-fashion-mnist is not available here: its test prints SKIPPED"
fi

step "NASM (libjpeg-turbo's SIMD in the loader's JPEG decoder; the build falls back to C without it)"
if ! command -v nasm >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nasm >/dev/null \
        || echo "nasm is not available here: JPEG decoding builds without SIMD"
fi

step "rustfmt"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --all --check

step "clippy (cuda feature included, so its code is linted too)"
cargo clippy --workspace --all-targets --features cuda -- -D warnings

step "cargo check --features cuda"
cargo check --workspace --features cuda

step "cargo check cuda-nccl"
# The NCCL build is CUDA only (backends/Cargo.toml, `cuda-nccl`): with Burn's
# `distributed` feature on, every Burn crate has another feature set, so
# this checks a second Burn graph: about a minute and a half on 2 cores
# after the steps above, under a second once cached. Check mode, the binary
# only (the tests and benches use the CPU backend).
cargo check -p clipa-cli --no-default-features --features cuda-nccl

step "Python's tensorboard package (tests/tensorboard.rs reads the event files back with it)"
# A venv outside the checkout, kept between runs like the target folder.
venv="${CLIPA_PY_VENV:-$HOME/.cache/clipa-py}"
if ! "$venv/bin/python" -c "import tensorboard" >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q tensorboard
fi
export CLIPA_TEST_PYTHON="$venv/bin/python"
"$CLIPA_TEST_PYTHON" -c "import tensorboard; print('tensorboard', tensorboard.__version__)"

step "tests (the README's test command)"
bash ci/test.sh

step "the reference fixtures are the repository's own: parity, tokenizer and hub tests with ../shared hidden"
# The project's shared/ folder sits beside the checkout on our CI hosts; an
# empty read-only tmpfs over it, in a private mount namespace, proves that
# no test still reads its fixtures from there (GitHub's runner has none).
# The same command as the test step, filtered, so nothing is rebuilt.
shared="$(cd .. && pwd)/shared"
if [ -d "$shared" ] && unshare -m true 2>/dev/null; then
    unshare -m sh -c "mount -t tmpfs -o ro none '$shared' && ls -A '$shared' | wc -l | grep -qx 0 \
        && bash ci/test.sh -- tokenizer torchfile parity hub"
else
    echo "no ../shared here (or no mount namespace): the test run above already had none"
fi

step "the WGPU adapter the tests ran on, and the self-test through the binary"
"$CARGO_TARGET_DIR/release/clipa" backends
"$CARGO_TARGET_DIR/release/clipa" --backend wgpu check

step "benches compile"
cargo bench --workspace --no-run

step "done"
