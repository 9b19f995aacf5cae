"""A rank that says hello and leaves, after --live-s seconds (0: at once). Used by the load
tests with hundreds of ranks: no torch, no process group."""

import os
import sys
import time

live_s = float(sys.argv[sys.argv.index("--live-s") + 1]) if "--live-s" in sys.argv else 0.0
print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}", flush=True)
time.sleep(live_s)
