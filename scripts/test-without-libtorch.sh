#!/usr/bin/env bash
# Builds and tests the libtorch-free crates (hsat-core, hsat-data, hsat-proto,
# hsat-coordinator) the way a contributor without the PyTorch wheel would: LIBTORCH unset,
# the venv made by setup.sh moved out of sight, and cargo started outside the clone so that
# the generated .cargo/config.toml (which names libtorch) is not read. If any of these
# crates came to depend on tch, torch-sys would fail to build here.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${HSAT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hsat}"
venv="$cache/venv-torch-2.13.0"
hidden="$cache/venv-torch-2.13.0.hidden-by-test-without-libtorch"

restore() {
  if [[ -d "$hidden" ]]; then mv "$hidden" "$venv"; fi
}
trap restore EXIT
if [[ -d "$venv" ]]; then mv "$venv" "$hidden"; fi

cd /
env -u LIBTORCH -u HSAT_PYTHON CARGO_TARGET_DIR="$cache/target-without-libtorch" \
  cargo test --manifest-path "$root/Cargo.toml" \
  -p hsat-core -p hsat-data -p hsat-proto -p hsat-metrics -p hsat-coordinator "$@"
