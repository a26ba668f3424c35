#!/usr/bin/env bash
# The README's test command: every test, in release (the profile the benches
# use too), on the CPU and on WGPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --release --workspace "$@"
