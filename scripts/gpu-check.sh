#!/usr/bin/env bash
# The GPU check: run on any machine with at least one NVIDIA GPU; under 8 minutes.
#
#   scripts/gpu-check.sh                      # the host's python3, if its torch has CUDA
#   PYTHON=/opt/venv/bin/python scripts/gpu-check.sh
#   scripts/gpu-check.sh --report DIR         # also writes the table and two rank logs to DIR
#
# GPU hosts often have no package index at hand, so nothing is installed: the project is put on
# the interpreter's path (PYTHONPATH) as it is, and what is missing is said in one line. It runs
# scripts/gpu_check.py: the example job with NCCL (1 rank on one GPU, 2 on two or more), fp16 AMP
# with a GradScaler, a SIGUSR2 preemption and resume that must end on the uninterrupted run's
# digest, a rank SIGKILLed and restarted, a hang dumped by the flight recorder, step time and
# samples/s; then one table of what held. Exit 0 when everything held, 1 when a check failed,
# 2 when the machine cannot run it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu-check: no Python at '$PYTHON'; set PYTHON=/path/to/python (one whose torch has CUDA)" >&2
    exit 2
fi
missing=$("$PYTHON" - <<'PY'
import importlib.util
need = ["torch", "yaml", "fsspec", "psutil", "numpy"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [[ -n $missing ]]; then
    echo "gpu-check: $PYTHON lacks: $missing (pip install them, or point PYTHON at a Python that has them)" >&2
    exit 2
fi
why=$("$PYTHON" -c '
import torch
if torch.version.cuda is None:
    print(f"its torch {torch.__version__} is built without CUDA")
elif not torch.cuda.is_available():
    print(f"its torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (driver, CUDA_VISIBLE_DEVICES?)")
elif not torch.distributed.is_nccl_available():
    print(f"its torch {torch.__version__} has no NCCL")
' 2>&1 | tail -1)
if [[ -n $why && ${1:-} != --cpu ]]; then
    echo "gpu-check: $PYTHON cannot run on a GPU: $why" >&2
    exit 2
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" "$here/scripts/gpu_check.py" "$@"
