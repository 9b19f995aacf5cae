"""Ranks that join the group and then sleep, each spawning a child (like a DataLoader worker)."""

import subprocess
import sys
import time

import torch.distributed as dist

dist.init_process_group("gloo")
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(f"ready pid-child={child.pid}", flush=True)
time.sleep(600)
