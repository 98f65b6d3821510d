#!/usr/bin/env bash
# The README's main job: set up, generate a small OpenSRH-style dataset with
# `hsat synth`, check it, and train HSAT on it (examples/quickstart.toml).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
cargo build --release -p hsat
hsat=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/hsat

"$hsat" synth --out runs/quickstart-data --format opensrh --classes 3 --patients-per-class 4 --slides 2 --patches 4 --size 64 --seed 0
"$hsat" data check --config examples/quickstart.toml
"$hsat" run --config examples/quickstart.toml "$@"
