#!/usr/bin/env bash
# Sets up everything, then runs the test suite (real userfaultfd, real RocksDB, real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/pytest -q "$@"
