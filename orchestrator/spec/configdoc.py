"""docs/config.md, generated from the dataclass field docs (a test keeps the file in sync):

python -m orchestrator.spec.configdoc > docs/config.md
"""

from __future__ import annotations

import json

from orchestrator.spec.config import field_docs


def render_config_doc() -> str:
    lines = [
        "# cluster.yaml reference",
        "",
        (
            "Generated from `orchestrator/spec/config.py` by `python -m orchestrator.spec.configdoc`;"
            " do not edit by hand."
        ),
        "",
        (
            "Every bad value stops `orch` with exit status 2 and one line"
            " `cluster.yaml: <dotted.path>: <what is wrong>`."
        ),
        (
            "Any field can be overridden on the command line: `--set resources.nodes=2`"
            " (the value is read as YAML)."
        ),
        (
            "Strings may not contain control characters (newlines, tabs, escapes):"
            " they would reach shells and `#SBATCH` lines."
        ),
        "",
        "| field | default | meaning |",
        "| --- | --- | --- |",
    ]
    sections = {"job", "resources", "distributed", "storage", "restart", "watchdog", "launch", "slurm"}
    for path, doc, default in field_docs():
        doc = doc.replace("|", "\\|")
        if path in sections:
            lines.append(f"| **`{path}`** | | {doc} |")
        else:
            shown = json.dumps(list(default) if isinstance(default, tuple) else default)
            lines.append(f"| `{path}` | `{shown}` | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_config_doc(), end="")
