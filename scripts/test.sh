#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (unit + real gloo integration tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
