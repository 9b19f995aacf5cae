#!/usr/bin/env bash
# Set up .venv if needed, then run the example DDP job on the default cluster.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/orch run cluster.yaml "$@"
