"""launch/readiness.wait_ready: poll(2), so a descriptor numbered past FD_SETSIZE (1024) can be
waited on; a supervisor holding one connection per node of a large step has such descriptors."""

from __future__ import annotations

import os
import resource
import select

import pytest

from orchestrator.launch.readiness import wait_ready

HIGH = 1500


@pytest.fixture
def high_pipe():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= HIGH:
        pytest.skip(f"ulimit -Hn is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH + 1), hard))
    r, w = os.pipe()
    os.dup2(r, HIGH)
    os.close(r)
    try:
        yield HIGH, w
    finally:
        os.close(HIGH)
        os.close(w)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_descriptor_past_fd_setsize_is_waited_on(high_pipe) -> None:
    r, w = high_pipe
    with pytest.raises(ValueError):  # what select(2) does with it: the launchers used it
        select.select([r], [], [], 0)
    assert wait_ready([r], timeout=0.01) == ([], [])
    os.write(w, b"x")
    assert wait_ready([r], [w], timeout=1) == ([r], [w])


def test_an_end_of_file_is_readable() -> None:
    r, w = os.pipe()
    try:
        os.close(w)
        assert wait_ready([r], timeout=1) == ([r], [])
    finally:
        os.close(r)
