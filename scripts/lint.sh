#!/usr/bin/env bash
# Lint the whole tree with the pinned ruff (pyproject.toml [tool.ruff]): line length, import
# order, unused names, bugbear; and the formatting. `scripts/test.sh` runs this before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
python3 scripts/import_graph.py --check
