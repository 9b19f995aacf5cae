"""Reads a job.pass_env value, removes the variable, then fails with the value in its
exception's message (tests/integration/test_secrets.py), as a job does that keeps a token from
its children:

    popped_secret.py NAME [--runtime-hook]

With --runtime-hook, orchestrator.runtime's hook is installed first (as runtime.init does) and
writes the rank's error record; without, the launcher's entry records it.
"""

import os
import sys

name = sys.argv[1]
if "--runtime-hook" in sys.argv:
    from orchestrator.runtime import install_excepthook

    install_excepthook()

value = os.environ.pop(name)
raise RuntimeError(f"could not log in with token={value}")
