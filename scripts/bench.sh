#!/usr/bin/env bash
# Every benchmark, one after the other (nothing else should run on the machine meanwhile):
# each prints a table of ratios against its baseline measured in the same run.
#   scripts/bench.sh            all of them (~15 min on 2 cores)
#   scripts/bench.sh launch     only bench/launch_bench.py (also: ckpt, controller, overhead)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(controller overhead launch ckpt)
for part in "${parts[@]}"; do
    echo "=== $part ==="
    case "$part" in
        controller) .venv/bin/python bench/controller_bench.py ;;
        overhead)   .venv/bin/python bench/step_overhead.py ;;
        launch)     .venv/bin/python bench/launch_bench.py ;;
        ckpt)       .venv/bin/python bench/ckpt_bench.py ;;
        *) echo "unknown benchmark: $part (controller, overhead, launch, ckpt)" >&2; exit 2 ;;
    esac
done
