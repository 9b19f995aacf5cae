"""A sweep's points, from cluster.yaml's `sweep:` section: pure (no I/O, no clock).

    sweep:
      grid:                  # every combination, in the order written
        lr: [1.0e-3, 3.0e-3]
        seed: [0, 1, 2]
      points:                # and these, as written
        - {lr: 1.0e-2, seed: 7}
      random:                # and `draws` points drawn with `seed` (the same every time)
        draws: 4
        seed: 0
        space:
          wd: {uniform: [0.0, 0.1]}
          lr: {log_uniform: [1.0e-4, 1.0e-2]}
          batch: {choice: [32, 64]}
      set:                   # any config path, with the point's values in it
        job.args: [--lr, "{lr}", --seed, "{seed}"]

A point's values fill `{name}` placeholders in `job.args`, `job.env` and `set`'s values; a
string that is exactly one placeholder takes the value itself (a number stays a number), and
`{{`/`}}` stand for literal braces. Every error is one line naming the field (ConfigError).
Unquoted in YAML, `[--lr, {lr}]` reads as a list holding the mapping {lr: null}; inside a list
or a mapping such a one-name mapping is taken as the placeholder it was written as.

`load_sweep` reads a config with a sweep into one validated ClusterConfig per point.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import ConfigError, UsageError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")
MAX_POINTS = 10_000
# What every point shares: the sweep's backend, its directory (storage.root) and its name.
SHARED_PATHS = ("backend", "storage.root", "name")


# The `sweep:` section's fields and what they mean (docs/config.md is generated from this).
FIELDS = (
    ("grid", "{}", "Names to lists of values: one point per combination, in the order written."),
    ("points", "[]", "A list of points written out, each a mapping of names to values (after the grid's)."),
    (
        "random",
        "null",
        "`{draws: N, seed: S, space: {name: DIST}}`: N points drawn with the seed (the same points on"
        " every expansion), DIST one of `{uniform: [lo, hi]}`, `{log_uniform: [lo, hi]}`,"
        " `{int_uniform: [lo, hi]}`, `{choice: [...]}`.",
    ),
    (
        "set",
        "{}",
        'Any config path to a value with `{name}` placeholders (`resources.nodes: "{n}"`); a string'
        " that is one placeholder takes the value's type.",
    ),
    (
        "max_parallel",
        "null",
        "Points running at once (locally; default: as many as the cores and GPUs hold) or array"
        " tasks at once on Slurm (default: all).",
    ),
)


@dataclass(frozen=True)
class SweepPoint:
    index: int
    values: Mapping[str, Any]  # name -> value, in the sweep's order of names


class _Bad(Exception):
    """A bad sweep value at `path` (turned into a ConfigError naming the file by the public
    functions)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(problem)
        self.path, self.problem = path, problem


def _fail(path: str, problem: str) -> _Bad:
    """A bad field of the sweep section (`path` below `sweep.`)."""
    return _Bad(f"sweep.{path}" if not path.startswith(("job.", "sweep.")) else path, problem)


def _scalar(value: Any, path: str) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(path, f"{value} is not a finite number")
        return value
    raise _fail(path, f"expected a number, string or boolean, got {type(value).__name__}")


def _check_name(name: Any, path: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(path, f"{name!r} is not a name (letters, digits and _, not first a digit)")
    return name


def _grid(section: Any) -> list[dict[str, Any]]:
    if section is None:
        return []
    if not isinstance(section, Mapping) or not section:
        raise _fail("grid", "expected a mapping of names to lists of values")
    axes = []
    for name, values in section.items():
        _check_name(name, f"grid.{name}")
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise _fail(f"grid.{name}", "empty: a grid axis needs at least one value")
        axes.append([(name, _scalar(v, f"grid.{name}[{i}]")) for i, v in enumerate(values)])
    return [dict(combination) for combination in itertools.product(*axes)]


def _points(section: Any) -> list[dict[str, Any]]:
    if section is None:
        return []
    if not isinstance(section, list):
        raise _fail("points", "expected a list of mappings")
    points = []
    for i, point in enumerate(section):
        if not isinstance(point, Mapping) or not point:
            raise _fail(f"points[{i}]", "expected a mapping of names to values")
        points.append(
            {_check_name(k, f"points[{i}].{k}"): _scalar(v, f"points[{i}].{k}") for k, v in point.items()}
        )
    return points


def _draw(rng: random.Random, spec: Any, path: str) -> Any:
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise _fail(path, f"expected one of {', '.join(f'{{{d}: ...}}' for d in DISTRIBUTIONS)}")
    ((kind, args),) = spec.items()
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise _fail(f"{path}.choice", "expected a non-empty list")
        return _scalar(rng.choice(args), f"{path}.choice")
    if (
        not isinstance(args, list)
        or len(args) != 2
        or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        or not args[0] < args[1]
    ):
        raise _fail(f"{path}.{kind}", "expected [low, high] with low < high")
    low, high = args
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "int_uniform":
        if not all(isinstance(a, int) for a in args):
            raise _fail(f"{path}.{kind}", "expected two integers")
        return rng.randint(low, high)
    if low <= 0:
        raise _fail(f"{path}.{kind}", "the low end of a log-uniform range must be > 0")
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _random(section: Any) -> list[dict[str, Any]]:
    if section is None:
        return []
    if not isinstance(section, Mapping):
        raise _fail("random", "expected a mapping with draws, seed and space")
    unknown = set(section) - {"draws", "seed", "space"}
    if unknown:
        raise _fail(f"random.{sorted(unknown)[0]}", "unknown field (draws, seed, space)")
    draws, seed, space = section.get("draws"), section.get("seed", 0), section.get("space")
    if not isinstance(draws, int) or isinstance(draws, bool) or not 1 <= draws <= MAX_POINTS:
        raise _fail("random.draws", f"expected an integer from 1 to {MAX_POINTS}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail("random.seed", "expected an integer")
    if not isinstance(space, Mapping) or not space:
        raise _fail("random.space", "expected a mapping of names to distributions")
    for name in space:
        _check_name(name, f"random.space.{name}")
    rng = random.Random(seed)  # the same points on every expansion: a resubmitted sweep is the same sweep
    return [
        {name: _draw(rng, spec, f"random.space.{name}") for name, spec in space.items()} for _ in range(draws)
    ]


def expand(section: Any, source: str = "cluster.yaml") -> list[SweepPoint]:
    """The sweep's points, in order: the grid's combinations, the listed points, the draws."""
    try:
        return _expand(section)
    except _Bad as bad:
        raise ConfigError(source, bad.path, bad.problem) from None


def _expand(section: Any) -> list[SweepPoint]:
    if not isinstance(section, Mapping):
        raise _Bad("sweep", "expected a mapping (grid, points, random, set, max_parallel)")
    unknown = set(section) - {"grid", "points", "random", "set", "max_parallel"}
    if unknown:
        raise _fail(sorted(unknown)[0], "unknown field (grid, points, random, set, max_parallel)")
    parallel = section.get("max_parallel")
    if parallel is not None and (not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1):
        raise _fail("max_parallel", "expected an integer >= 1 (or leave it out: as many as the cores allow)")
    values = [*_grid(section.get("grid")), *_points(section.get("points")), *_random(section.get("random"))]
    if not values:
        raise _Bad("sweep", "no points: give grid, points or random")
    if len(values) > MAX_POINTS:
        raise _Bad("sweep", f"{len(values)} points, more than {MAX_POINTS}")
    seen: dict[tuple[tuple[str, Any], ...], int] = {}
    for index, point in enumerate(values):
        key = tuple(sorted((k, (type(v).__name__, v)) for k, v in point.items()))
        if key in seen:
            raise _fail(f"point {index}", f"the same values as point {seen[key]}: {_show(point)}")
        seen[key] = index
    return [SweepPoint(index=i, values=v) for i, v in enumerate(values)]


def _show(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def fill(value: Any, values: Mapping[str, Any], path: str, source: str = "cluster.yaml") -> Any:
    """`value` with every `{name}` placeholder replaced by the point's values (see _fill)."""
    try:
        return _fill(value, values, path)
    except _Bad as bad:
        raise ConfigError(source, bad.path, bad.problem) from None


def _fill(value: Any, values: Mapping[str, Any], path: str) -> Any:
    """`value` with every `{name}` placeholder replaced by the point's value (recursively in
    lists and mappings); a string that is one placeholder becomes the value itself."""
    if isinstance(value, list):
        return [_fill(_unquoted(v), values, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {k: _fill(_unquoted(v), values, f"{path}.{k}") for k, v in value.items()}
    if not isinstance(value, str) or "{" not in value and "}" not in value:
        return value
    stray = _PLACEHOLDER.sub("", value)
    if "{" in stray or "}" in stray:
        raise _fail(path, f"unbalanced brace in {value!r} (write {{{{ or }}}} for a literal one)")
    whole = _PLACEHOLDER.fullmatch(value)
    if whole and whole.group(1) is not None:
        return _lookup(whole.group(1), values, path)

    def one(match: re.Match[str]) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        return str(_lookup(match.group(1), values, path))

    return _PLACEHOLDER.sub(one, value)


def _unquoted(value: Any) -> Any:
    """`{lr}` unquoted in a YAML list or mapping (the mapping {lr: None}) -> the text "{lr}"."""
    if isinstance(value, Mapping) and len(value) == 1:
        ((key, inner),) = value.items()
        if inner is None and isinstance(key, str) and _NAME.match(key):
            return f"{{{key}}}"
    return value


def _lookup(name: str, values: Mapping[str, Any], path: str) -> Any:
    if name not in values:
        known = ", ".join(values) or "none"
        raise _fail(path, f"{{{name}}} is not one of the sweep's values ({known})")
    return values[name]


def point_overrides(
    raw: Mapping[str, Any], point: SweepPoint, source: str = "cluster.yaml"
) -> dict[str, Any]:
    """For one point: the raw config's `job.args` and `job.env` filled, and each of
    `sweep.set`'s paths, as dotted path -> value (apply with spec.config's overrides)."""
    try:
        return _point_overrides(raw, point)
    except _Bad as bad:
        raise ConfigError(source, bad.path, bad.problem) from None


def _point_overrides(raw: Mapping[str, Any], point: SweepPoint) -> dict[str, Any]:
    job = raw.get("job") if isinstance(raw.get("job"), Mapping) else {}
    out: dict[str, Any] = {}
    for key in ("args", "env"):
        if key in job:
            filled = _fill(job[key], point.values, f"job.{key}")
            if filled != job[key]:
                out[f"job.{key}"] = filled
    sweep = raw.get("sweep") or {}
    settings = sweep.get("set") or {}
    if not isinstance(settings, Mapping):
        raise _fail("set", "expected a mapping of config paths to values")
    for dotted, value in settings.items():
        if not isinstance(dotted, str) or not all(_NAME.match(p) for p in dotted.split(".")):
            raise _fail(f"set.{dotted}", "expected a dotted config path, e.g. job.args")
        if dotted.split(".")[0] == "sweep":
            raise _fail(f"set.{dotted}", "a sweep cannot set its own section")
        if any(dotted == p or p.startswith(dotted + ".") for p in SHARED_PATHS):
            raise _fail(f"set.{dotted}", "is the same for every point of a sweep (where and how it runs)")
        out[dotted] = _fill(value, point.values, f"sweep.set.{dotted}")
    return out


def names(points: Sequence[SweepPoint]) -> list[str]:
    """Every value name of the sweep, in first-seen order (the columns of `orch status SWEEP`)."""
    seen: dict[str, None] = {}
    for point in points:
        seen.update(dict.fromkeys(point.values))
    return list(seen)


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class SweepSpec:
    """A sweep read from cluster.yaml and the command line: each point's validated config."""

    points: tuple[SweepPoint, ...]
    configs: tuple[Any, ...]  # ClusterConfig per point, in the points' order
    max_parallel: int | None  # None: as many as the cores allow (the backend decides)
    base: Any  # point 0's config: what every point shares (job name, storage.root, backend)
    source: str

    @property
    def names(self) -> list[str]:
        return names(self.points)


def grid_axis(text: str) -> tuple[str, list[Any]]:
    """`--grid name=v1,v2,...` -> (name, values); each value is read as YAML, as in cluster.yaml
    (`3` is a number, `1.0e-3` a float, `1e-3` and `adam` stay text)."""
    from orchestrator.spec.config import parse_override

    name, sep, raw = text.partition("=")
    if not sep or not _NAME.match(name):
        raise UsageError(
            f"--grid: expected NAME=V1,V2,... with a name of letters, digits and _, got {text!r}"
        )
    if not raw.strip():
        raise UsageError(f"--grid {name}: empty: a grid axis needs at least one value")
    items = raw.split(",")
    if any(not item.strip() for item in items):
        raise UsageError(f"--grid {name}: an empty value in {raw!r} (quote '' for an empty string)")
    return name, [parse_override(f"v={item}", "--grid")[1] for item in items]


def load_sweep(
    path: str,
    overrides: Sequence[str] = (),
    *,
    grid: Sequence[str] = (),
    max_parallel: int | None = None,
    backend: str | None = None,
    check_files: bool = True,
) -> SweepSpec:
    """cluster.yaml (its `sweep:` section, `--set` overrides, `--grid` axes that add to or replace
    the section's grid) -> one validated config per point. Every error is one line."""
    import os

    from orchestrator.spec.config import apply_overrides, read_document

    data = apply_overrides(read_document(path), overrides)
    if backend is not None:
        data["backend"] = backend
    section = data.get("sweep")
    section = dict(section) if isinstance(section, Mapping) else ({} if section is None else section)
    if grid and isinstance(section, dict):
        axes = dict(section.get("grid") or {}) if isinstance(section.get("grid"), Mapping) else {}
        for text in grid:
            name, values = grid_axis(text)
            axes[name] = values
        section["grid"] = axes
    if max_parallel is not None and isinstance(section, dict):
        section["max_parallel"] = max_parallel
    if not section and not grid:
        raise ConfigError(path, "sweep", "no sweep: add a `sweep:` section or pass --grid NAME=V1,V2")
    data["sweep"] = section
    return sweep_from_document(
        data, source=path, base_dir=os.path.dirname(os.path.abspath(path)), check_files=check_files
    )


def sweep_from_document(
    data: Mapping[str, Any], *, source: str, base_dir: str, check_files: bool = True
) -> SweepSpec:
    """A raw document with a `sweep:` section -> SweepSpec (pure but for the entrypoint check)."""
    from orchestrator.spec.config import apply_values, parse_config

    section = data.get("sweep")
    points = expand(section, source)
    base_data = {k: v for k, v in data.items() if k != "sweep"}
    configs = []
    for point in points:
        filled = point_overrides(data, point, source)
        point_data = apply_values(base_data, [(tuple(k.split(".")), v) for k, v in filled.items()], source)
        where = f"{source} (sweep point {point.index}: {_show(point.values)})"
        configs.append(parse_config(point_data, source=where, base_dir=base_dir, check_files=check_files))
    _check_used(data, points, source)
    return SweepSpec(
        points=tuple(points),
        configs=tuple(configs),
        max_parallel=section.get("max_parallel"),
        base=configs[0],
        source=source,
    )


def _check_used(data: Mapping[str, Any], points: Sequence[SweepPoint], source: str) -> None:
    """A value no placeholder uses would run the same config under several names: refused."""
    used: set[str] = set()
    job = data.get("job") if isinstance(data.get("job"), Mapping) else {}
    texts = [job.get("args"), job.get("env"), (data.get("sweep") or {}).get("set")]
    for text in texts:
        used.update(_placeholders(text))
    for name in names(points):
        if name not in used:
            raise ConfigError(
                source,
                f"sweep.{name}",
                f"no placeholder {{{name}}} uses it (in job.args, job.env or sweep.set):"
                " every point would run the same config",
            )


def _placeholders(value: Any) -> set[str]:
    if isinstance(value, list):
        return set().union(*(_placeholders(_unquoted(v)) for v in value)) if value else set()
    if isinstance(value, Mapping):
        return set().union(*(_placeholders(_unquoted(v)) for v in value.values())) if value else set()
    if isinstance(value, str):
        return {m.group(1) for m in _PLACEHOLDER.finditer(value) if m.group(1) is not None}
    return set()
