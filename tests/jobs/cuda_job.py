"""A job whose top-level imports touch CUDA (tests/jobs/lib/cuda_at_import.py, put on PYTHONPATH by the
test as a library); it records that it
ran and exits."""

import os

import cuda_at_import  # noqa: F401 - imported for its side effect, at top level on purpose

with open(os.path.join(os.environ["ORCH_RUN_DIR"], f"ran-{os.environ['RANK']}"), "w") as fh:
    fh.write("ok")
