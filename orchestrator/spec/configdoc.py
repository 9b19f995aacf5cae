"""docs/config.md, generated from the dataclass field docs (a test keeps the file in sync):

python -m orchestrator.spec.configdoc > docs/config.md
"""

from __future__ import annotations

import dataclasses
import json

from orchestrator.spec.config import ClusterConfig, field_docs
from orchestrator.spec.sweep import FIELDS as SWEEP_FIELDS


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
    # A section is a field whose value is a dataclass of its own (job, resources, ..., profile).
    sections = {
        f.name
        for f in dataclasses.fields(ClusterConfig)
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory)
    }
    for path, doc, default in field_docs():
        doc = doc.replace("|", "\\|")
        if path in sections:
            lines.append(f"| **`{path}`** | | {doc} |")
        else:
            shown = json.dumps(list(default) if isinstance(default, tuple) else default)
            lines.append(f"| `{path}` | `{shown}` | {doc} |")
    lines += [
        "",
        "## Sweeps",
        "",
        (
            "A `sweep:` section makes the config a sweep, started with `orch sweep` (docs/cli.md): every"
            " point is a whole run whose `{name}` placeholders in `job.args`, `job.env` and"
            " `sweep.set` take the point's values (`{{`/`}}` for literal braces). The points are the"
            " grid's combinations, then `points`, then the random draws; duplicates, empty axes,"
            " unknown placeholders and values no placeholder uses are refused."
        ),
        "",
        "| field | default | meaning |",
        "| --- | --- | --- |",
    ]
    for name, default, doc in SWEEP_FIELDS:
        escaped = doc.replace("|", "\\|")
        lines.append(f"| `sweep.{name}` | `{default}` | {escaped} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_config_doc(), end="")
