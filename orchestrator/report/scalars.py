"""The scalars a run's rank 0 logged to TensorBoard (RUN_DIR/tb), read from any storage.

Event files are TFRecord files of `Event` protos. They are read whole through the run
directory's storage (local or any fsspec URL) and split here: TensorBoard's own readers go
through its gfile layer (local paths and a few schemes only) and check every record's CRC in
Python, which makes them many times slower on a long run. A record cut short (a live writer)
ends the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from orchestrator.storage.rundir import RunDir, safe_fs_ls, safe_listdir, url_to_fs

TB_FOLDER = "tb"  # runtime.Metrics writes rank 0's event files here
_HEADER = struct.Struct("<QI")  # record length, masked CRC of the length
_FOOTER_BYTES = 4  # masked CRC of the data
# The tensor dtypes a scalar summary may carry in tensor_content (TensorFlow's DataType codes).
_CONTENT_FORMATS = {1: "<f", 2: "<d", 3: "<i", 9: "<q"}


@dataclass(frozen=True)
class Scalar:
    tag: str
    step: int
    value: float
    time: float  # the writer's wall clock


def split_records(data: bytes) -> list[bytes]:
    """The records of one TFRecord file, in order, up to the first one cut short."""
    records, at = [], 0
    while at + _HEADER.size <= len(data):
        length, _ = _HEADER.unpack_from(data, at)
        start = at + _HEADER.size
        end = start + length
        if end + _FOOTER_BYTES > len(data):
            break  # the writer is still at it (or died mid-record)
        records.append(data[start:end])
        at = end + _FOOTER_BYTES
    return records


def parse_event_file(data: bytes) -> list[Scalar]:
    """Every scalar in one event file; other summaries (hparams, histograms, text) are skipped."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event

    out = []
    for record in split_records(data):
        try:
            event = Event.FromString(record)
        except DecodeError:
            break  # a damaged record: what came before it still counts
        for value in event.summary.value:
            number = _scalar_value(value)
            if number is not None:
                out.append(Scalar(value.tag, int(event.step), number, float(event.wall_time)))
    return out


def _scalar_value(value: Any) -> float | None:
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind != "tensor" or value.metadata.plugin_data.plugin_name not in ("", "scalars"):
        return None
    tensor = value.tensor
    if tensor.tensor_shape.dim:  # not a scalar
        return None
    for field in (tensor.float_val, tensor.double_val, tensor.int_val, tensor.int64_val):
        if len(field) == 1:
            return float(field[0])
    fmt = _CONTENT_FORMATS.get(tensor.dtype)
    if fmt is not None and len(tensor.tensor_content) == struct.calcsize(fmt):
        return float(struct.unpack(fmt, tensor.tensor_content)[0])
    return None


def read_event_files(run: RunDir) -> dict[str, list[Scalar]]:
    """{file name: its scalars} of every event file in the run's tb/ folder, by name."""
    out = {}
    if run.is_local:
        folder = os.path.join(run.local_path, TB_FOLDER)
        for name in safe_listdir(folder):
            if _is_event_file(name):
                try:
                    with open(os.path.join(folder, name), "rb") as fh:
                        out[name] = parse_event_file(fh.read())
                except OSError:
                    continue  # removed while we listed: the rest still make a report
        return out
    fs, path = url_to_fs(run.child(TB_FOLDER))
    for name in safe_fs_ls(fs, path):
        if _is_event_file(name):
            try:
                out[name] = parse_event_file(fs.cat_file(f"{path}/{name}"))
            except OSError:
                continue
    return out


def _is_event_file(name: str) -> bool:
    return "tfevents" in name
