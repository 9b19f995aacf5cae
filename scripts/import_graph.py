#!/usr/bin/env python3
"""The import graph of orchestrator/, read from the source (no imports run), and the rules it
must keep (docs/design.md, "The map"):

    python3 scripts/import_graph.py            edges between the package's parts, then the check
    python3 scripts/import_graph.py --modules  every module-to-module edge
    python3 scripts/import_graph.py --check    only the check: exit 1 on a cycle or a rule broken

Every import counts, including those inside functions (lazy imports still couple modules).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "orchestrator"

# What each part may import (besides itself). A part is a folder of orchestrator/, or one of
# its top-level modules. `contract` and `errors` are leaves: stdlib only.
ALLOWED: dict[str, set[str]] = {
    "contract": set(),
    "errors": set(),
    "storage": {"contract", "errors"},
    "spec": {"contract", "errors"},
    "runtime": {"contract", "storage"},
    # storage for private.py: port leases and a background supervisor's console live in this
    # user's checked private folder of the temp directory (storage never imports launch).
    "launch": {"contract", "spec", "storage"},
    "supervision": {"contract", "errors", "spec", "storage"},
    "backends": {"contract", "errors", "spec", "storage", "launch", "supervision"},
    # Before a submit: the environment, config, storage and backend, checked (`orch doctor`);
    # its probe imports the runtime on the nodes, to check that it imports there.
    "doctor": {"contract", "errors", "spec", "storage", "launch", "backends", "runtime"},
    # The Python API holds the verbs; the CLI only parses and prints around it.
    "api": {"contract", "errors", "spec", "storage", "launch", "supervision", "backends", "doctor"},
    # After training: a run's checkpoint to a model file; a run's record to an HTML report.
    "export": {"contract", "errors", "spec", "storage", "api"},
    "report": {"contract", "errors", "spec", "storage", "supervision", "api"},
    "cli": {
        "contract",
        "errors",
        "spec",
        "storage",
        "launch",
        "supervision",
        "backends",
        "doctor",
        "api",
        "export",
        "report",
        "__init__",
    },
    "__init__": {"api"},  # lazily, on first use of orchestrator.run & co.
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The orchestrator modules that `module` imports (as precisely as names allow)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` imports the submodule when there is one.
            targets = [
                f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target.startswith("orchestrator") and target != module:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {m: imports_of(p, m, known) for m, p in sorted(files.items())}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def broken_rules(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in edges.items():
        part = part_of(module)
        # A package's __init__ may re-export its own part; the rule is about crossing parts.
        for target in sorted(targets):
            other = part_of(target)
            if other != part and other not in ALLOWED.get(part, set()):
                out.append(f"{module} -> {target} ({part} may not import {other})")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modules", action="store_true", help="print every module-to-module edge")
    parser.add_argument("--check", action="store_true", help="only check: no cycles, no broken rules")
    args = parser.parse_args()
    edges = graph()
    if not args.check:
        if args.modules:
            for module, targets in edges.items():
                print(f"{module} -> {', '.join(sorted(targets)) or '-'}")
        else:
            parts: dict[str, set[str]] = {}
            for module, targets in edges.items():
                parts.setdefault(part_of(module), set()).update(
                    part_of(t) for t in targets if part_of(t) != part_of(module)
                )
            for part in sorted(parts):
                print(f"{part:12} -> {', '.join(sorted(parts[part])) or '-'}")
    problems = [f"cycle: {' <-> '.join(group)}" for group in cycles(edges)] + broken_rules(edges)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not args.check or problems:
        print(f"{len(edges)} modules; {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
