"""A rank that ignores SIGTERM and SIGINT and sleeps: only SIGKILL (after the stop grace, or on a
second stop signal to `orch run`) ends it. No torch, no process group."""

import signal
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(600)
