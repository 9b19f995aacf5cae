#!/usr/bin/env bash
# Every benchmark, one after the other (nothing else should run on the machine meanwhile):
# each prints a table of ratios against its baseline measured in the same run.
#   scripts/bench.sh            all of them (~50 min on 2 cores, chaos ~25 of it)
#   scripts/bench.sh launch     only bench/launch_bench.py (also: ckpt, save, resume, controller, overhead, training, sweep, slurm, chaos)
# The slurm and chaos parts start a local Slurm cluster (root: installs its packages first).
# chaos: CHAOS_SEED and CHAOS_MINUTES (per backend; default 1 and 10) choose its run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(controller overhead training launch sweep slurm ckpt save resume chaos)
for part in "${parts[@]}"; do
    echo "=== $part ==="
    case "$part" in
        controller) .venv/bin/python bench/controller_bench.py ;;
        sweep)      .venv/bin/python bench/sweep_bench.py ;;
        overhead)   .venv/bin/python bench/step_overhead.py && .venv/bin/python bench/step_overhead.py --world 4 ;;
        training)   .venv/bin/python bench/step_overhead.py --training --rounds 100 ;;
        launch)     .venv/bin/python bench/launch_bench.py ;;
        ckpt)       .venv/bin/python bench/ckpt_bench.py ;;
        save)       .venv/bin/python bench/ckpt_save_bench.py ;;
        resume)     .venv/bin/python bench/resume_bench.py ;;
        slurm)      if [ "$(id -u)" = 0 ]; then scripts/slurm/install.sh >/dev/null; fi
                    .venv/bin/python bench/slurm_bench.py ;;
        chaos)      if [ "$(id -u)" = 0 ]; then scripts/slurm/install.sh >/dev/null; fi
                    .venv/bin/python bench/chaos.py --backend both --with-agent-kills \
                        --seed "${CHAOS_SEED:-1}" --minutes "${CHAOS_MINUTES:-10}" ;;
        *) echo "unknown benchmark: $part (controller, overhead, training, launch, sweep, slurm, ckpt, save, resume, chaos)" >&2; exit 2 ;;
    esac
done
