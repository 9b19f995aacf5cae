"""jobs/train_ddp.py (same arguments), except that the sample POISON_INDEX of its data set is
NaN: the step that draws it trains on a NaN loss, and every weight turns NaN after it."""

import importlib.util
import os
import sys
from pathlib import Path

POISON_INDEX = int(os.environ["POISON_INDEX"])
TRAIN = Path(__file__).resolve().parents[2] / "jobs" / "train_ddp.py"

spec = importlib.util.spec_from_file_location("train_ddp", TRAIN)
assert spec is not None and spec.loader is not None
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
clean_item = train.SyntheticImages.__getitem__


def poisoned_item(self, index):
    images, label = clean_item(self, index)
    if index == POISON_INDEX:
        print(f"poisoned sample {index} drawn", flush=True)
        return images * float("nan"), label
    return images, label


train.SyntheticImages.__getitem__ = poisoned_item
sys.argv = [str(TRAIN), *sys.argv[1:]]
train.main()
