#!/usr/bin/env bash
# Set up .venv if needed, install the Slurm packages for the test cluster and the headless browser
# of the report test (as root), lint the tree
# (scripts/lint.sh: ruff and the import graph), then run the whole test suite: tests/unit,
# tests/processes, tests/integration (real gloo ranks, an S3 API server on 127.0.0.1) and
# tests/slurm (a real Slurm cluster of 3 slurmd nodes that the tests start and stop).
#
# scripts/test.sh --fast [PYTEST ARGS]: the inner loop (under 5 minutes on 2 cores): lint, then
# every test not marked `slow`: no Slurm cluster, no long jobs, nothing installed but .venv.
# CI runs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
if [ "${1:-}" = "--fast" ]; then
  fast=1
  shift
  export ORCH_SKIP_SLURM=1 ORCH_SKIP_BROWSER=1
fi
scripts/bootstrap.sh
if [ "$(id -u)" = 0 ] && [ "${ORCH_SKIP_BROWSER:-0}" != 1 ]; then
  scripts/install-browser.sh >/dev/null  # the report test opens its HTML in headless chromium
fi
if [ "${ORCH_SKIP_SLURM:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ]; then
    scripts/slurm/install.sh >/dev/null
  else
    echo "test.sh: not root: the Slurm tests will fail (set ORCH_SKIP_SLURM=1 to skip them)" >&2
  fi
fi
scripts/lint.sh
# Two pytest-xdist workers by default: the Slurm group (which mostly waits on Slurm's requeue
# delay and its once-a-minute time-limit checks) on one, everything else on the other
# (tests/conftest.py makes the units). A clean clone of 2026-12-08 took 22.1 min of tests that way
# (1,196 tests), where one process takes ~40. ORCH_TEST_WORKERS=0 runs one process.
workers=${ORCH_TEST_WORKERS:-2}
if [ "$fast" = 1 ]; then
  exec .venv/bin/python -m pytest -q -m "not slow" "$@"
fi
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadscope --no-loadscope-reorder "$@"
