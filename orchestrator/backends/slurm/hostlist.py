"""Slurm hostlist expressions -> host names (`n[1-3,7],gpu[01-02]` -> n1 n2 n3 n7 gpu01 gpu02).

Pure Python so the step launcher does not need `scontrol show hostnames` on every node.
"""

from __future__ import annotations

import re

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced brackets in hostlist {text!r}")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_one(expr: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", expr)
    if not m:
        return [expr]
    prefix, body, rest = expr[: m.start()], m.group(1), expr[m.end() :]
    out = []
    for item in body.split(","):
        r = _RANGE.match(item.strip())
        if not r:
            raise ValueError(f"bad range {item!r} in hostlist {expr!r}")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        width = len(lo)
        for n in range(int(lo), int(hi) + 1):
            out.extend(_expand_one(f"{prefix}{n:0{width}d}{rest}"))
    return out


def expand_hostlist(text: str) -> list[str]:
    hosts: list[str] = []
    for part in _split_top(text.strip()):
        hosts.extend(_expand_one(part))
    return hosts
