#!/usr/bin/env bash
# The main job: sets up everything (packages, venv, test guest), boots the test guest under
# `vmckpt run` with a 1 s interval for 20 checkpoints, restores a middle checkpoint into a new
# QEMU and shows that its counter continues, then prints the checkpoint table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py
