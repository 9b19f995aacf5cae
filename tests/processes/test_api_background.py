"""The API from a script's (or a notebook's) own process: runs and sweeps in the background,
cancelled the moment they start, waited on after a stop, a background supervisor that fails,
and the caller's signal handlers given back after a foreground run. Ranks are brief.py (no
torch) in fresh interpreters, so each run takes about a second."""

from __future__ import annotations

import signal

import pytest
import yaml

from orchestrator import api
from orchestrator.errors import ConfigError, OrchError

from ..conftest import TEST_JOBS, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def cfg(tmp_path):
    return write_config(
        tmp_path,
        TEST_JOBS / "brief.py",
        args=["--live-s", "3"],
        resources={"nodes": 1, "ranks_per_node": 1, "cpus_per_rank": 1},
        launch={"mode": "subprocess"},
    )


def test_a_sweep_cancelled_as_it_starts_stops_and_wait_returns(cfg):
    data = yaml.safe_load(cfg.read_text())
    data["job"]["args"] = ["--live-s", "{s}"]
    data["sweep"] = {"grid": {"s": [3, 4, 5]}, "max_parallel": 1}
    cfg.write_text(yaml.safe_dump(data))
    s = api.sweep(api.load_sweep(str(cfg)), sweep_id="bg", wait=False)
    said = s.cancel()  # at once: before its runner has recorded its start
    assert said.startswith("asked sweep bg"), said
    st = s.wait(timeout=60)  # unstarted points stay `created`: settled all the same
    assert s.process.returncode == 130
    states = [r["state"] for r in st.rows]
    assert "running" not in states and states[1:] == ["created", "created"], states
    assert states[0] in ("cancelled", "created")
    # ...and the rest of it later, to the end.
    assert [r["state"] for r in s.resume(wait=False).wait(timeout=120).rows] == ["succeeded"] * 3


def test_a_run_cancelled_as_it_starts_is_cancelled(cfg):
    r = api.run(api.load_config(str(cfg), ["job.args=[--live-s,30]"]), wait=False)
    assert r.cancel().startswith("asked the supervisor of run")
    assert r.wait(timeout=60).state == "cancelled"
    with pytest.raises(ConfigError, match="resources.nodes"):
        r.resume(["resources.nodes=abc"], wait=False)  # refused here, not in a log file
    assert r.process.poll() is not None


def test_a_background_supervisor_that_fails_is_an_error_not_a_hang(cfg):
    r = api.create_run(api.load_config(str(cfg)))
    r.start_in_background(["--set", "storage.keep=5"])  # a change resume refuses
    with pytest.raises(OrchError, match=r"its supervisor ended \(2\) with the run created: .*storage.keep"):
        r.wait(timeout=60)


def test_a_foreground_run_gives_the_callers_signal_handlers_back(cfg):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    r = api.run(api.load_config(str(cfg), ["job.args=[--live-s,0]"]), show_ranks=())
    assert r.result.status == "succeeded"
    assert {sig: signal.getsignal(sig) for sig in before} == before
