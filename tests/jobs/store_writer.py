"""Drives the checkpoint commit protocol alone (no torch) for crash tests.

store_writer.py once URL STEP INCARNATION SIZE   one save (ORCH_FAULT may crash it)
store_writer.py loop URL STEP INCARNATION SIZE   saves STEP, STEP+1, ... until killed
"""

import os
import sys

from orchestrator.storage.ckpt_store import CheckpointStore, make_token


def save(store: CheckpointStore, step: int, incarnation: int, size: int) -> None:
    token = make_token(incarnation)
    tmp = store.tmp_dir(step, token)
    payload = (step.to_bytes(8, "little") * (size // 8 + 1))[:size]
    entries = [
        store.write_file(tmp, "state.pt", payload),
        store.write_file(tmp, "rank-00000.pt", os.urandom(64)),
    ]
    store.commit(tmp, step, token, entries, {"model_digest": f"digest-{step}"})
    store.prune(2, incarnation, protect=[step])


def main() -> None:
    mode, url, step, incarnation, size = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
    )
    store = CheckpointStore(url)
    if mode == "once":
        save(store, step, incarnation, size)
        return
    store.committed_steps()  # connect first, so the kill window covers saves, not start-up
    print("looping", flush=True)
    while True:
        save(store, step, incarnation, size)
        step += 1


if __name__ == "__main__":
    main()
