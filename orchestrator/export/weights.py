"""The weights to export: which committed checkpoint, its model state read against its checksums,
and loaded into the factory's model (strictly)."""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from torch import nn

from orchestrator.contract import CKPT_MODEL_KEY, CKPT_STATE_FILE
from orchestrator.errors import OrchError, UsageError
from orchestrator.storage.causes import storage_cause
from orchestrator.storage.ckpt_store import CheckpointStore, CorruptCheckpoint, step_dir_name

_SHOWN_KEYS = 4


def choose_step(store: CheckpointStore, run_id: str, step: int | None) -> int:
    """`step` if it is committed, else the newest committed one."""
    committed = store.committed_steps()  # newest first
    if not committed:
        raise OrchError(f"run {run_id} has no committed checkpoint to export (in {store.url})")
    if step is None:
        return committed[0]
    if step not in committed:
        listed = ", ".join(str(s) for s in sorted(committed))
        raise UsageError(f"--step {step}: not a committed checkpoint of run {run_id} (committed: {listed})")
    return step


def read_model_state(store: CheckpointStore, step: int) -> dict[str, torch.Tensor]:
    """The model's state_dict saved at `step`, every byte checked against the manifest first."""
    try:
        directory = store.data_dir(step)
        files = store.read_manifest(step, directory)["files"]
        if CKPT_STATE_FILE in files:
            content = _load_verified(store, step, directory, CKPT_STATE_FILE, files[CKPT_STATE_FILE])
            if isinstance(content, dict) and isinstance(content.get(CKPT_MODEL_KEY), dict):
                return content[CKPT_MODEL_KEY]
    except CorruptCheckpoint as exc:
        raise OrchError(
            f"checkpoint step {step} is corrupt: {exc} (`orch checkpoints RUN --verify` checks them all)"
        ) from None
    raise OrchError(
        f"checkpoint step {step}: its {CKPT_STATE_FILE} holds no model weights ({CKPT_MODEL_KEY!r})"
    )


def _load_verified(
    store: CheckpointStore, step: int, directory: str, name: str, entry: dict[str, Any]
) -> Any:
    where = f"{step_dir_name(step)}/{name}"
    try:
        if store.renames:
            # Mapped through the descriptor that was verified: the very bytes that were checked,
            # and only the model's tensors are paged in, not the optimizer's.
            fd = store.open_verified(directory, name, entry, where)
            try:
                return torch.load(f"/proc/self/fd/{fd}", map_location="cpu", weights_only=True, mmap=True)
            finally:
                os.close(fd)
        data = store.read_file(step, name, entry, directory=directory)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except CorruptCheckpoint:
        raise
    except OSError as exc:
        raise OrchError(f"checkpoint step {step}: cannot read {where}: {storage_cause(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - unpickling refusals, not a torch file: one line
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise OrchError(
            f"checkpoint step {step}: {where} does not load with weights_only=True: {text}"
        ) from None


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], step: int, factory: str) -> None:
    """Copy the checkpoint's weights into the factory's model; every key must match both ways."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [
        f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    problems = [
        f"{what}: {_some(keys)}"
        for what, keys in (
            ("missing from the checkpoint", missing),
            ("not in the model", unexpected),
            ("shape (checkpoint vs model)", resized),
        )
        if keys
    ]
    if problems:
        raise OrchError(
            f"job.model_factory: {factory} builds a model that does not match step {step}'s weights: "
            + "; ".join(problems)
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise OrchError(
            f"job.model_factory: step {step}'s weights do not load into the model: {first}"
        ) from None


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f" (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else "")
