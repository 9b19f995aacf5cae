"""Launch plans -> text a person reads before anything starts. Pure and stable across runs."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import yaml

from orchestrator.spec.plan import REDACTED, LaunchPlan, RankEnv, RankSpec, is_redacted, redact

# libyaml's emitter when PyYAML has it: ~10x faster than the pure-Python one.
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_ONE_LINE = 1 << 30  # a line width no scalar reaches: never fold

HEADER = (
    "# orch render: local launch spec; nothing was started\n"
    "# Each rank runs `argv` with `env` (shared by all ranks) plus the `env` on its own line, and the\n"
    "# `pass_env` variables, copied from the environment at launch.\n"
)


def render_local(plan: LaunchPlan) -> str:
    """The local launch spec as YAML: the argv and env that all ranks share, once, then one line
    per rank, grouped by node, with that rank's own variables. Secrets are redacted.

    Printing each rank's full env made 8000 ranks cost seconds and hid the few variables that
    differ among hundreds of lines that do not. The head is small and goes through yaml; the
    per-rank lines are written by hand, one flow mapping each, which keeps rendering linear and
    cheap.
    """
    shared = plan.shared_env
    argv = plan.ranks[0].argv if plan.ranks else ()
    head = {
        "backend": "local",
        "run_id": plan.run_id,
        "run_dir": plan.run_dir,
        "attempt": plan.attempt,
        "world_size": plan.world_size,
        "master": f"{plan.master_addr}:{plan.master_port}",
        "pass_env": list(plan.pass_env),
        "argv": list(argv),
        "env": dict(sorted(redact(shared, plan.pass_env).items())),
    }
    text = yaml.dump(head, Dumper=_DUMPER, sort_keys=False, default_flow_style=False, width=1000)

    # Per set of own variable names (the same few on every rank): the %-template of a whole
    # rank line, or None when redact() hides one of them (is_redacted decides by name alone).
    templates: dict[tuple[str, ...], str | None] = {}
    by_node: dict[int, list[str]] = {node: [] for node in range(plan.nnodes)}
    for spec in plan.ranks:
        own = _own_env(spec.env, shared)
        names, values = tuple(own), tuple(own.values())
        if names not in templates:
            templates[names] = _line_template(names, plan.pass_env)
        template = templates[names]
        digits = "".join(values)
        # The usual rank (the shared argv, no hidden name, decimal values such as rank numbers)
        # is one %-format: 8000 ranks render in ~20-30 ms that way, ~90 ms through _rank_line,
        # which runs redact()'s regex on every name of every rank.
        if template is not None and spec.argv == argv and digits.isdecimal() and digits.isascii():
            line = template % (spec.rank, spec.local_rank, *values)
        else:
            line = _rank_line(spec, own, argv=argv, pass_env=plan.pass_env)
        by_node[spec.node_rank].append(line)

    parts = [HEADER, text, "nodes:" if by_node else "nodes: []", "\n"]
    for node, lines in by_node.items():
        parts.append(f"- node_rank: {node}\n  ranks:{'' if lines else ' []'}\n")
        parts.extend(lines)
    return "".join(parts)


def _rank_line(
    spec: RankSpec, own: Mapping[str, str], *, argv: tuple[str, ...], pass_env: tuple[str, ...]
) -> str:
    """A rank as one line, a YAML flow mapping: its rank and local rank, its argv where it
    differs from the shared one, and its own variables, secrets redacted."""
    argv_field = "" if spec.argv == argv else f"argv: [{', '.join(map(_scalar, spec.argv))}], "
    pairs = ", ".join(
        f"{_scalar(name)}: {_scalar(REDACTED if is_redacted(name, pass_env) else value)}"
        for name, value in own.items()
    )
    return f"  - {{rank: {spec.rank}, local_rank: {spec.local_rank}, {argv_field}env: {{{pairs}}}}}\n"


def _line_template(names: tuple[str, ...], pass_env: tuple[str, ...]) -> str | None:
    """_rank_line as a %-template for a rank with the shared argv and only decimal values."""
    if any(is_redacted(name, pass_env) for name in names):
        return None
    # A `%` in a name is text, not a conversion: doubled.
    pairs = ", ".join(_scalar(name).replace("%", "%%") + ": '%s'" for name in names)
    return f"  - {{rank: %s, local_rank: %s, env: {{{pairs}}}}}\n"


def _own_env(env: Mapping[str, str], shared: Mapping[str, str]) -> Mapping[str, str]:
    """What a rank gets on top of the plan's shared env."""
    if isinstance(env, RankEnv) and env.shared is shared:
        return env.own  # every rank of build_local_plan: the split is at hand
    # Any other Mapping: what differs. Shown as shared + own, a rank lacking a shared variable
    # would be rendered wrongly, so refuse it.
    missing = sorted(shared.keys() - env.keys())
    if missing:
        raise ValueError(f"rank env lacks {missing[0]}, which the plan's shared env has")
    return {name: value for name, value in env.items() if shared.get(name) != value}


def _scalar(value: str) -> str:
    """A string as a one-line YAML flow scalar that reads back as the same string."""
    if value.isdecimal() and value.isascii():
        return f"'{value}'"  # the common case (rank numbers), as yaml itself quotes them
    return _other_scalar(value)


@functools.lru_cache(maxsize=1024)
def _other_scalar(value: str) -> str:
    # yaml picks plain or quoted exactly as for the head. Single-quoted strings may span lines,
    # which would break the one-line-per-rank layout: those go double-quoted, with escapes.
    text = yaml.dump([value], Dumper=_DUMPER, default_flow_style=True, width=_ONE_LINE)[1:-2]
    if "\n" in text:
        text = yaml.dump(
            [value], Dumper=_DUMPER, default_flow_style=True, default_style='"', width=_ONE_LINE
        )[1:-2]
    return text
