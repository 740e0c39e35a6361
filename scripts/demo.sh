#!/usr/bin/env bash
# The main job: sets up everything, runs the synthetic guest under `vmckpt run` with a 1 s
# interval for 10 checkpoints, restores the middle one into a sparse image, lists the store.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
store=$(mktemp -d /tmp/vmckpt-demo.XXXXXX)
trap 'rm -rf "$store"' EXIT
.venv/bin/vmckpt run --store "$store/store" --interval 1s --max-checkpoints 10 -- \
  .venv/bin/python -m vmckpt.engine.synthguest --size 256M --rate 20000 --dup 0.2 --zero 0.1
.venv/bin/vmckpt restore --store "$store/store" --image "$store/ram5.img" 5
.venv/bin/vmckpt ls --store "$store/store"
