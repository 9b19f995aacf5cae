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
        # A description beyond the usage line, and an example to copy.
        assert sub.stdout.split("\n\n")[1].strip() and f"\n  orch {name}" in sub.stdout, name
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


def _documented_options() -> dict[str, set[str]]:
    """Each `orch` command the docs show, with the options they mention for it: in its section of
    docs/cli.md, in the shared-options paragraph, and in every `orch CMD ...` example in
    README.md and docs/. Only options the command really takes count (sections also name
    sbatch's or torchrun's flags)."""
    import re

    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices
    real = {name: {o for a in sub._actions for o in a.option_strings} for name, sub in choices.items()}
    documented: dict[str, set[str]] = {}
    option = re.compile(r"(?<![\w-])(--[a-z][a-z-]*|-[a-z])\b")
    texts = [(REPO / "README.md").read_text()] + [p.read_text() for p in sorted((REPO / "docs").glob("*.md"))]
    for text in texts:
        for m in re.finditer(r"\borch (" + "|".join(choices) + r")\b([^`\n]*)", text):
            documented.setdefault(m.group(1), set()).update(option.findall(m.group(2)))
    cli = (REPO / "docs" / "cli.md").read_text()
    shared, _, rest = cli.partition("\n## `orch ")
    for section in ("## `orch " + rest).split("\n## `orch ")[1:]:
        name = section.split()[0].strip("`")
        documented.setdefault(name, set()).update(option.findall(section))
    for name in ("render", "run", "submit"):
        documented[name] |= set(option.findall(shared))
    return {name: opts & real[name] for name, opts in documented.items()}


def _tested_options() -> dict[str, set[str]]:
    """Each `orch` command that a test runs, with the options it passes, read from the tests'
    source: every call whose own text names orch and whose first string argument is a command."""
    import ast

    commands = set(COMMANDS)
    tested: dict[str, set[str]] = {}
    for path in (REPO / "tests").rglob("*.py"):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call) or "orch" not in (ast.get_source_segment(source, node) or ""):
                continue
            strings = [
                n.value
                for arg in node.args
                for n in ast.walk(arg)
                if isinstance(n, ast.Constant) and isinstance(n.value, str)
            ]
            if strings and strings[0] in commands:
                tested.setdefault(strings[0], set()).update(s for s in strings[1:] if s.startswith("-"))
    return tested


def test_every_documented_command_and_option_is_run_by_a_test():
    # A command or option added to README.md or docs/ without a test that runs it fails here.
    tested = _tested_options()
    missing = sorted(
        f"orch {name} {opt}".rstrip()
        for name, opts in _documented_options().items()
        for opt in ({""} | opts)
        if name not in tested or (opt and opt not in tested[name] and opt not in ("-h", "--help"))
    )
    assert not missing, "documented but run by no test: " + ", ".join(missing)
