"""Docs stay true to the code; the CLI stays light."""

import os
import subprocess
import sys
from pathlib import Path

from orchestrator.cli import COMMANDS, build_parser
from orchestrator.spec.configdoc import render_config_doc

REPO = Path(__file__).resolve().parents[2]


def test_config_reference_is_generated_from_the_code():
    assert (REPO / "docs" / "config.md").read_text() == render_config_doc(), (
        "run: python -m orchestrator.spec.configdoc > docs/config.md"
    )


def test_every_command_is_documented_and_has_help():
    text = (REPO / "docs" / "cli.md").read_text()
    parser = build_parser()
    for name in COMMANDS:
        assert f"## `orch {name}" in text, name
        sub = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", name, "--help"], capture_output=True, text=True
        )
        assert sub.returncode == 0 and "usage: orch" in sub.stdout
    assert set(COMMANDS) == set(parser._subparsers._group_actions[0].choices)


def test_help_does_not_import_torch_or_fsspec():
    code = (
        "import sys, orchestrator.cli as c\n"
        "try:\n"
        "    c.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules and 'fsspec' not in sys.modules,"
        " sorted(m for m in sys.modules if m.startswith(('torch','fsspec')))[:3]"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_readme_commands_exist_and_are_executable():
    readme = (REPO / "README.md").read_text()
    for script in ("scripts/run-example.sh", "scripts/test.sh"):
        assert script in readme
        assert os.access(REPO / script, os.X_OK)
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_status_of_unknown_run_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "status", "nope", "--config", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
