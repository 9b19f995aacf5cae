#!/usr/bin/env bash
# Every benchmark, one after the other (nothing else should run on the machine meanwhile):
# each prints a table of ratios against its baseline measured in the same run.
#   scripts/bench.sh            all of them (~25 min on 2 cores)
#   scripts/bench.sh launch     only bench/launch_bench.py (also: ckpt, save, controller, overhead, slurm)
# The slurm part starts a local Slurm cluster (root: installs its packages first).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(controller overhead launch slurm ckpt save)
for part in "${parts[@]}"; do
    echo "=== $part ==="
    case "$part" in
        controller) .venv/bin/python bench/controller_bench.py ;;
        overhead)   .venv/bin/python bench/step_overhead.py ;;
        launch)     .venv/bin/python bench/launch_bench.py ;;
        ckpt)       .venv/bin/python bench/ckpt_bench.py ;;
        save)       .venv/bin/python bench/ckpt_save_bench.py ;;
        slurm)      if [ "$(id -u)" = 0 ]; then scripts/slurm/install.sh >/dev/null; fi
                    .venv/bin/python bench/slurm_bench.py ;;
        *) echo "unknown benchmark: $part (controller, overhead, launch, slurm, ckpt, save)" >&2; exit 2 ;;
    esac
done
