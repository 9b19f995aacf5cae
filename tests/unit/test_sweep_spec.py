"""orchestrator/spec/sweep.py: a sweep section's points and each point's overrides (issue 16;
pure, not yet wired to a command)."""

from __future__ import annotations

import pytest

from orchestrator.errors import ConfigError
from orchestrator.spec.sweep import expand, fill, names, point_overrides


def test_grid_then_points_then_draws_in_order() -> None:
    points = expand(
        {
            "grid": {"lr": [0.001, 0.003], "seed": [0, 1, 2]},
            "points": [{"lr": 0.01, "seed": 7}],
            "random": {"draws": 2, "seed": 5, "space": {"wd": {"uniform": [0.0, 0.1]}}},
        }
    )
    assert [p.index for p in points] == list(range(9))
    assert [dict(p.values) for p in points[:7]] == [
        {"lr": 0.001, "seed": 0},
        {"lr": 0.001, "seed": 1},
        {"lr": 0.001, "seed": 2},
        {"lr": 0.003, "seed": 0},
        {"lr": 0.003, "seed": 1},
        {"lr": 0.003, "seed": 2},
        {"lr": 0.01, "seed": 7},
    ]
    draws = [p.values["wd"] for p in points[7:]]
    assert all(0.0 <= w <= 0.1 for w in draws) and draws[0] != draws[1]
    assert names(points) == ["lr", "seed", "wd"]


def test_random_draws_are_the_same_on_every_expansion() -> None:
    section = {
        "random": {
            "draws": 5,
            "seed": 3,
            "space": {
                "lr": {"log_uniform": [1e-4, 1e-2]},
                "bs": {"choice": [32, 64]},
                "layers": {"int_uniform": [2, 6]},
            },
        }
    }
    first, again = expand(section), expand(section)
    assert [p.values for p in first] == [p.values for p in again]
    for p in first:
        assert 1e-4 <= p.values["lr"] <= 1e-2 and p.values["bs"] in (32, 64) and 2 <= p.values["layers"] <= 6
    other = expand({"random": {**section["random"], "seed": 4}})
    assert [p.values for p in other] != [p.values for p in first]


def test_placeholders_fill_args_env_and_set_paths() -> None:
    raw = {
        "job": {"args": ["--lr", "{lr}", "--name=run-{seed}", "{{literal}}"], "env": {"SEED": "{seed}"}},
        "sweep": {
            "grid": {"lr": [0.003], "seed": [2]},
            "set": {"resources.nodes": "{seed}", "job.python": "py"},
        },
    }
    (point,) = expand(raw["sweep"])
    assert point_overrides(raw, point) == {
        "job.args": ["--lr", 0.003, "--name=run-2", "{literal}"],
        "job.env": {"SEED": 2},
        "resources.nodes": 2,  # one whole placeholder keeps the value's type
        "job.python": "py",
    }


@pytest.mark.parametrize(
    ("section", "where", "what"),
    [
        ({"grid": {"lr": []}}, "sweep.grid.lr", "empty"),
        ({"grid": {"lr": [1, 2]}, "points": [{"lr": 2}]}, "sweep.point 2", "the same values as point 1"),
        ({}, "sweep", "no points"),
        ({"grid": {"lr": [1]}, "sweeps": 1}, "sweep.sweeps", "unknown field"),
        ({"grid": {"2lr": [1]}}, "sweep.grid.2lr", "is not a name"),
        ({"random": {"draws": 0, "space": {"a": {"uniform": [0, 1]}}}}, "sweep.random.draws", "from 1"),
        (
            {"random": {"draws": 1, "space": {"a": {"uniform": [1, 0]}}}},
            "sweep.random.space.a.uniform",
            "low < high",
        ),
        (
            {"random": {"draws": 1, "space": {"a": {"normal": [0, 1]}}}},
            "sweep.random.space.a",
            "expected one of",
        ),
        (
            {"random": {"draws": 1, "space": {"a": {"log_uniform": [0, 1]}}}},
            "sweep.random.space.a.log_uniform",
            "> 0",
        ),
        ({"points": [{"lr": [1, 2]}]}, "sweep.points[0].lr", "expected a number"),
        ({"grid": {"lr": [1]}, "max_parallel": 0}, "sweep.max_parallel", "integer >= 1"),
    ],
)
def test_a_bad_sweep_is_one_line_naming_its_field(section, where, what) -> None:
    with pytest.raises(ConfigError) as err:
        expand(section, source="cluster.yaml")
    text = str(err.value)
    assert text.startswith(f"cluster.yaml: {where}: ") and what in text and "\n" not in text, text
    assert err.value.exit_code == 2


def test_an_unknown_or_broken_placeholder_names_its_field() -> None:
    raw = {"job": {"args": ["--lr", "{lr2}"]}, "sweep": {"grid": {"lr": [1]}}}
    (point,) = expand(raw["sweep"])
    with pytest.raises(
        ConfigError, match=r"^cluster.yaml: job.args\[1\]: \{lr2\} is not one of the sweep's values \(lr\)$"
    ):
        point_overrides(raw, point)
    with pytest.raises(ConfigError, match=r"unbalanced brace"):
        fill("--lr={lr", {"lr": 1}, "job.args[0]")
    raw = {"sweep": {"grid": {"lr": [1]}, "set": {"sweep.grid": 1}}}
    with pytest.raises(ConfigError, match=r"sweep.set.sweep.grid: a sweep cannot set its own section"):
        point_overrides(raw, expand(raw["sweep"])[0])
