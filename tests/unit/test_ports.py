import socket

import pytest

from orchestrator.launch.ports import PORT_RANGE, lease_port


@pytest.fixture(autouse=True)
def private_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_PORT_LOCK_DIR", str(tmp_path / "locks"))


def test_concurrent_leases_never_share_a_port():
    leases = [lease_port() for _ in range(50)]
    try:
        ports = [lease.port for lease in leases]
        assert len(set(ports)) == len(ports)
        assert all(PORT_RANGE[0] <= p < PORT_RANGE[1] for p in ports)
    finally:
        for lease in leases:
            lease.release()


def test_a_held_port_is_not_leased_again_until_released():
    first = lease_port()
    with pytest.raises(OSError):
        lease_port(first.port)
    first.release()
    again = lease_port(first.port)
    assert again.port == first.port
    again.release()


def test_a_port_bound_by_another_program_is_skipped():
    with socket.socket() as sock:
        sock.bind(("", 0))
        sock.listen()
        with pytest.raises(OSError):
            lease_port(sock.getsockname()[1])
