"""Fails under torch elastic's `@record`, with a job.pass_env value in its exception's message
(tests/integration/test_secrets.py):

    record_secret.py NAME

`@record` writes its own error record (TORCHELASTIC_ERROR_FILE, the rank's error file) with the
message and the traceback as they are, before the exception reaches any hook of orch's: no
orchestrator.runtime here, as in a torchrun script brought to orch unchanged.
"""

import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record


@record
def main(name: str) -> None:
    raise RuntimeError(f"could not log in with token={os.environ[name]}")


if __name__ == "__main__":
    main(sys.argv[1])
