#!/usr/bin/env bash
# The README's main job: set up, generate a small OpenSRH-style dataset with
# `hsat synth`, check it, train HSAT on it with 2 local workers (examples/quickstart.toml) and the HiDisc
# baseline beside it (examples/quickstart_hidisc.toml), then evaluate both as the
# paper does (`hsat eval`: kNN accuracy clean and under PGD/BIM/MI-FGSM/FGSM at
# eps 4 and 8/255, APGD and the worst case, transfer between the two) and print the
# table. Its 12 val patients make the table a demonstration, not evidence (see the
# README for its error bars); `hsat repro` is the experiment.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
cargo build --release -p hsat
hsat=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/hsat

"$hsat" synth --out runs/quickstart-data --format opensrh --classes 3 --patients-per-class 8 --val-patients-per-class 4 --slides 2 --patches 4 --size 64 --seed 0 --stain-spread 0.1
"$hsat" data check --config examples/quickstart.toml
# Both runs are distributed jobs: a coordinator and 2 worker processes on this
# machine, each training half of every step and averaging gradients (Gloo).
"$hsat" run --config examples/quickstart.toml --workers 2 "$@"
"$hsat" run --config examples/quickstart_hidisc.toml --workers 2
# The finale: both models in the paper's Table 1 layout; results.json, table.md,
# table.csv and the PNG plots land in runs/quickstart-eval.
"$hsat" eval --config examples/quickstart.toml --checkpoint HiDisc=runs/quickstart-hidisc --checkpoint HSAT=runs/quickstart --out runs/quickstart-eval
