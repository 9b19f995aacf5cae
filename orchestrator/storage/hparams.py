"""A sweep point's values as TensorBoard hparams: one session-start record in the point's tb/
folder, so `tensorboard --logdir SWEEP_DIR` shows every point side by side in its HParams tab
(the plugin reads the values from this record and the metrics from the scalars the job logs
beside it). Built from TensorBoard's own protos, without TensorFlow or torch."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

PLUGIN_NAME = "hparams"
SESSION_START_TAG = "_hparams_/session_start_info"
PLUGIN_DATA_VERSION = 0


def write_hparams(logdir: str, values: Mapping[str, Any], group: str | None = None) -> str:
    """Write the record into `logdir` (created); the event file's path."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    info = plugin_data_pb2.SessionStartInfo(group_name=group or "", start_time_secs=time.time())
    for name, value in values.items():
        if isinstance(value, bool):
            info.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[name].number_value = float(value)
        else:
            info.hparams[name].string_value = str(value)
    content = plugin_data_pb2.HParamsPluginData(version=PLUGIN_DATA_VERSION, session_start_info=info)
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content.SerializeToString())
    )
    summary = Summary(value=[Summary.Value(tag=SESSION_START_TAG, metadata=metadata)])
    os.makedirs(logdir, mode=0o700, exist_ok=True)
    writer = EventFileWriter(logdir, filename_suffix=".hparams")
    writer.add_event(Event(summary=summary, wall_time=time.time()))
    writer.close()
    return writer.get_logdir()
