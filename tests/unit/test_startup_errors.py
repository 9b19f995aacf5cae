"""Issue 27, point 9: the error record of a rank that cannot start. The launchers record an
uncaught exception from the job's first line on (launch/entry.py), with its class as a field
and where the job's own code raised it, so the policy can tell a job that cannot start."""

from __future__ import annotations

import json
import sys

from orchestrator.contract import ENV_ERROR_FILE, error_location, read_error_record
from orchestrator.launch import entry
from orchestrator.runtime import errorfile


def raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the test wants it
        return exc
    raise AssertionError("did not raise")


def parses_bad_json() -> None:
    json.loads("{")  # raised deep inside the json package


def imports_a_missing_module() -> None:
    import orch_no_such_module_for_the_test  # noqa: F401


def line_of(fn) -> str:
    """FILE:LINE of the one statement in `fn`'s body."""
    return f"{fn.__code__.co_filename}:{fn.__code__.co_firstlineno + 1}"


def test_where_is_the_jobs_line_not_the_librarys() -> None:
    assert error_location(raised(parses_bad_json)) == line_of(parses_bad_json)
    bad = raised(lambda: compile("x = 1\ndef f(:\n", "/job/train.py", "exec"))
    assert error_location(bad) == "/job/train.py:2"


def test_the_launcher_records_what_the_runtime_did_not(tmp_path, monkeypatch) -> None:
    path = tmp_path / "rank-0.error.json"
    monkeypatch.setenv(ENV_ERROR_FILE, str(path))
    monkeypatch.setenv("RANK", "0")
    errorfile.reserve(str(path))  # blank space: no record yet
    entry.record(raised(imports_a_missing_module))
    record = read_error_record(str(path))
    assert record is not None and record["type"] == "ModuleNotFoundError" and record["rank"] == 0
    assert record["where"] == line_of(imports_a_missing_module) and "Traceback" in record["traceback"]
    # A record that is there already (the runtime's hook runs first) stands.
    entry.record(ValueError("later"))
    assert read_error_record(str(path))["type"] == "ModuleNotFoundError"


def test_the_recorder_prints_as_python_does(tmp_path, monkeypatch, capsys) -> None:
    path = tmp_path / "rank-1.error.json"
    monkeypatch.setenv(ENV_ERROR_FILE, str(path))
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    entry.install_recorder()
    exc = raised(lambda: entry.run([str(tmp_path / "missing.py")]))
    sys.excepthook(type(exc), exc, exc.__traceback__)
    assert "FileNotFoundError" in capsys.readouterr().err
    assert read_error_record(str(path))["type"] == "FileNotFoundError"
