"""Sweeps from cluster.yaml and the command line to configs, ids, directories and the table:
load_sweep, point ids, the catalog, sweep_status, the local default of max_parallel, and the
Slurm rule that a job array's tasks share one allocation."""

from __future__ import annotations

import json
import types

import pytest
import yaml

from orchestrator import api
from orchestrator.backends.local.sweep import default_max_parallel
from orchestrator.backends.slurm import BACKEND as SLURM
from orchestrator.cli import main
from orchestrator.errors import ConfigError, RunNotFound, UsageError
from orchestrator.spec.sweep import grid_axis, load_sweep
from orchestrator.storage.catalog import list_entries, resolve, resolve_run
from orchestrator.storage.rundir import RunDir
from orchestrator.storage.runid import is_valid_run_id, run_id_of_path, split_point_id
from orchestrator.storage.sweepdir import SweepDir
from orchestrator.supervision.sweep_status import format_sweep_status, sort_rows, sweep_status


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "train.py").write_text("print('hi')\n")
    data = {
        "job": {"script": "train.py", "args": ["--steps", "10"]},
        "resources": {"nodes": 1, "ranks_per_node": 2},
        "storage": {"root": "runs"},
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def with_sweep(path, sweep, **job):
    data = yaml.safe_load(path.read_text())
    data["sweep"] = sweep
    data["job"].update(job)
    path.write_text(yaml.safe_dump(data))
    return path


def test_grid_on_the_command_line_fills_job_args_in_order(cfg):
    spec = load_sweep(str(cfg), ["job.args=[--lr,{lr},--seed,{seed}]"], grid=["lr=1.0e-3,3e-3", "seed=0,1,2"])
    assert [dict(p.values) for p in spec.points][:2] == [{"lr": 0.001, "seed": 0}, {"lr": 0.001, "seed": 1}]
    assert len(spec.points) == 6
    # YAML reads each value as cluster.yaml would: 1.0e-3 is a float, 3e-3 stays the text written.
    assert spec.configs[0].job.args == ("--lr", "0.001", "--seed", "0")
    assert spec.configs[5].job.args == ("--lr", "3e-3", "--seed", "2")


def test_unquoted_placeholders_in_yaml_read_as_written(cfg):
    # `[--lr, {lr}]` is YAML for a list holding the mapping {lr: null}.
    path = with_sweep(cfg, {"grid": {"lr": [1, 2]}}, args=["--lr", {"lr": None}], env={"LR": {"lr": None}})
    spec = load_sweep(str(path))
    assert [c.job.args for c in spec.configs] == [("--lr", "1"), ("--lr", "2")]
    assert dict(spec.configs[1].job.env) == {"LR": "2"}


def test_grid_on_the_command_line_replaces_the_files_axis(cfg):
    path = with_sweep(cfg, {"grid": {"lr": [1, 2], "seed": [0]}, "max_parallel": 3}, args=["{lr}", "{seed}"])
    spec = load_sweep(str(path), grid=["lr=5"], max_parallel=1)
    assert [dict(p.values) for p in spec.points] == [{"lr": 5, "seed": 0}]
    assert spec.max_parallel == 1


def test_sweep_set_reaches_any_path_with_the_values_type(cfg):
    path = with_sweep(cfg, {"grid": {"n": [1, 2]}, "set": {"resources.nodes": "{n}"}})
    spec = load_sweep(str(path))
    assert [c.resources.nodes for c in spec.configs] == [1, 2]


@pytest.mark.parametrize(
    ("sweep", "args", "grid", "message"),
    [
        ({"grid": {"lr": [1, 2]}}, ["--steps", "10"], [], "sweep.lr: no placeholder {lr} uses it"),
        ({"grid": {"lr": [1]}}, ["{x}"], [], "job.args[0]: {x} is not one of the sweep's values (lr)"),
        ({"grid": {"lr": []}}, ["{lr}"], [], "sweep.grid.lr: empty"),
        ({"points": [{"lr": 1}, {"lr": 1}]}, ["{lr}"], [], "the same values as point 0"),
        (None, ["{lr}"], ["lr="], "--grid lr: empty"),
        (None, ["{lr}"], ["1x=2"], "--grid: expected NAME=V1,V2"),
    ],
)
def test_bad_sweeps_are_one_line(cfg, sweep, args, grid, message):
    path = with_sweep(cfg, sweep, args=args) if sweep is not None else cfg
    if sweep is None:
        data = yaml.safe_load(path.read_text())
        data["job"]["args"] = args
        path.write_text(yaml.safe_dump(data))
    with pytest.raises((ConfigError, UsageError)) as err:
        load_sweep(str(path), grid=grid)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_bad_value_in_one_point_names_the_point(cfg):
    path = with_sweep(cfg, {"grid": {"n": [1, 0]}, "set": {"resources.nodes": "{n}"}})
    with pytest.raises(ConfigError) as err:
        load_sweep(str(path))
    assert "(sweep point 1: n=0)" in str(err.value) and "resources.nodes" in str(err.value)


def test_a_config_without_a_sweep_is_refused_by_orch_sweep(cfg):
    with pytest.raises(ConfigError, match="no sweep: add a `sweep:` section or pass --grid"):
        load_sweep(str(cfg))


def test_run_and_submit_refuse_a_sweep_config_in_one_line(cfg, capsys):
    with_sweep(cfg, {"grid": {"lr": [1, 2]}}, args=["{lr}"])
    for command in ("run", "submit"):
        assert main([command, str(cfg)]) == 2
        err = capsys.readouterr().err
        assert "this config is a sweep: start it with `orch sweep" in err and err.count("\n") == 1
    # ...and reading its storage.root (orch ls, status) ignores the section.
    assert api.storage_root_of(str(cfg)) == str(cfg.parent / "runs")


def test_render_shows_every_points_values_args_and_launch(cfg, capsys):
    with_sweep(cfg, {"grid": {"lr": [1, 2]}}, args=["--lr", "{lr}"])
    assert main(["render", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "sweep of 2 point(s)" in out
    assert "# ======== point 0: lr=1 (run id <sweep-id>/0)" in out
    assert '# job.args: ["--lr", "2"]' in out
    assert (
        out.count("world_size: 2") == 2 and "run_dir: " + str(cfg.parent / "runs" / "<sweep-id>" / "1") in out
    )


def test_run_ids_of_points():
    assert split_point_id("mnist-1/3") == ("mnist-1", 3)
    assert split_point_id("mnist-1/x") is None and split_point_id("3/3") is None
    assert not is_valid_run_id("17")  # digits alone name a point's index
    assert is_valid_run_id("sweep-17")
    assert run_id_of_path("/r/runs/sw-1/12") == "sw-1/12"
    assert run_id_of_path("s3://b/runs/sw-1/0/") == "sw-1/0"
    assert run_id_of_path("/r/runs/mnist-1") == "mnist-1"


def test_created_sweep_directories_and_how_they_are_found(cfg):
    with_sweep(cfg, {"grid": {"lr": [1, 2, 3]}}, args=["{lr}"])
    spec = api.load_sweep(str(cfg))
    sweep = api.create_sweep(spec, sweep_id="sw", config_file=str(cfg))
    root = cfg.parent / "runs"
    assert (root / "sw").stat().st_mode & 0o777 == 0o700
    record = yaml.safe_load((root / "sw" / "sweep.yaml").read_text())
    assert record["names"] == ["lr"] and [p["values"] for p in record["points"]] == [
        {"lr": 1},
        {"lr": 2},
        {"lr": 3},
    ]
    point = yaml.safe_load((root / "sw" / "2" / "run.yaml").read_text())
    assert point["run_id"] == "sw/2" and point["sweep"] == {"id": "sw", "index": 2, "values": {"lr": 3}}
    assert point["config"]["job"]["args"] == ["3"]
    assert [r.run_id for r in sweep.points()] == ["sw/0", "sw/1", "sw/2"]
    assert [r.status().state for r in sweep.points()] == ["created"] * 3
    # The TensorBoard hparams record of each point.
    assert list((root / "sw" / "1" / "tb").glob("events.out.tfevents.*.hparams"))
    # Found by id, by point id, by path; a sweep is refused where one run is meant.
    assert isinstance(resolve("sw", str(root)), SweepDir)
    assert resolve("sw/1", str(root)) == RunDir(str(root / "sw" / "1"))
    assert resolve(str(root / "sw" / "1"), str(root)).run_id == "sw/1"
    with pytest.raises(RunNotFound, match="is a sweep; name one of its points, e.g. sw/0"):
        resolve_run("sw", str(root))
    with pytest.raises(RunNotFound):
        resolve("sw/9", str(root))
    assert [type(e).__name__ for e in list_entries(str(root))] == ["SweepDir"]
    rows = api.list_runs(str(root))
    assert [(r["run_id"], r["sweep"], r["values"], r["state"]) for r in rows] == [
        ("sw/0", "sw", {"lr": 1}, "created"),
        ("sw/1", "sw", {"lr": 2}, "created"),
        ("sw/2", "sw", {"lr": 3}, "created"),
    ]
    with pytest.raises(UsageError, match="--sweep-id: sweep sw already exists"):
        api.create_sweep(spec, sweep_id="sw")


def _status(state, attempts=1, ckpt=None, goodput=None, run_id="s/0"):
    return types.SimpleNamespace(
        run_id=run_id,
        state=state,
        attempts=attempts,
        newest_checkpoint=ckpt,
        goodput={"goodput": goodput},
        job_id=None,
        run_dir="/r/" + run_id,
    )


def test_the_sweep_table_sorts_by_a_scalar_a_value_or_a_column():
    record = {
        "backend": "local",
        "names": ["lr"],
        "points": [{"index": i, "values": {"lr": lr}} for i, lr in enumerate([0.1, 0.01, 0.001])],
    }
    statuses = [
        _status("succeeded", goodput=0.9, run_id="s/0"),
        _status("running", attempts=2, ckpt=40, run_id="s/1"),
        _status("created", attempts=0, run_id="s/2"),
    ]
    metrics = [{"step": 100, "scalars": {"loss": 0.5, "lr": 0.0}}, {"scalars": {"loss": 0.2}}, {}]
    st = sweep_status("s", "/r/s", record, statuses, metrics)
    assert [r["step"] for r in st.rows] == [100, 40, None]  # the checkpoint when no scalar has a step
    assert [r["point"] for r in sort_rows(st, "loss").rows] == [1, 0, 2]  # no loss: last
    assert [r["point"] for r in sort_rows(st, "loss", descending=True).rows] == [0, 1, 2]
    assert [r["point"] for r in sort_rows(st, "lr").rows] == [2, 1, 0]  # the swept value, not the scalar
    assert [r["point"] for r in sort_rows(st, "state").rows] == [2, 1, 0]
    with pytest.raises(UsageError, match="--sort: 'acc' is not a column"):
        sort_rows(st, "acc")
    table = format_sweep_status(st)
    assert table.splitlines()[0] == "sweep s (local): 3 points, 1 created, 1 running, 1 succeeded"
    header = table.splitlines()[1].split()
    assert header == ["POINT", "LR", "STATE", "ATTEMPTS", "STEP", "LOSS", "LOGGED_LR", "GOODPUT"]
    assert table.splitlines()[2].split() == ["0", "0.1", "succeeded", "1", "100", "0.5", "0", "90.0%"]
    assert json.loads(json.dumps(st.to_json()))["counts"] == {"succeeded": 1, "running": 1, "created": 1}


def _res(world, cpus=1, nodes=1, gpus=0):
    return types.SimpleNamespace(
        resources=types.SimpleNamespace(world_size=world, cpus_per_rank=cpus, nodes=nodes, gpus_per_node=gpus)
    )


def test_default_max_parallel_fits_the_cores_and_gpus():
    assert default_max_parallel([_res(2)], cores=2, gpus=0) == 1
    assert default_max_parallel([_res(1)], cores=16, gpus=0) == 16
    assert default_max_parallel([_res(2, cpus=2), _res(1)], cores=16, gpus=0) == 4  # the largest point
    assert default_max_parallel([_res(4)], cores=2, gpus=0) == 1  # never less than one
    assert default_max_parallel([_res(1, gpus=2)], cores=16, gpus=4) == 2


def test_a_slurm_sweep_refuses_points_with_different_allocations(cfg):
    path = with_sweep(cfg, {"grid": {"n": [1, 2]}, "set": {"resources.nodes": "{n}"}})
    spec = load_sweep(str(path), backend="slurm")
    with pytest.raises(UsageError, match=r"point 1 asks Slurm for another allocation \(nodes\)"):
        SLURM.check_sweep(spec)
    path = with_sweep(cfg, {"grid": {"lr": [1, 2]}}, args=["{lr}"])
    SLURM.check_sweep(load_sweep(str(path), backend="slurm"))  # only job.args differ: one array


def test_grid_axis_reads_values_as_yaml():
    assert grid_axis("lr=1.0e-3,adam,3,true") == ("lr", [0.001, "adam", 3, True])


def test_an_array_tasks_names_include_the_form_the_ledger_records():
    from orchestrator.backends.slurm.supervisor import job_names

    env = {"SLURM_JOB_ID": "37", "SLURM_ARRAY_JOB_ID": "36", "SLURM_ARRAY_TASK_ID": "1"}
    assert job_names(env) == {"37", "36_1"}
    assert job_names({"SLURM_JOB_ID": "12"}) == {"12"}


def test_sweep_set_cannot_move_a_point_elsewhere(cfg):
    for path in ("backend", "storage.root", "storage", "name"):
        p = with_sweep(cfg, {"grid": {"x": ["a", "b"]}, "set": {path: "{x}"}})
        with pytest.raises(ConfigError, match=f"sweep.set.{path}: is the same for every point"):
            load_sweep(str(p))


def test_an_empty_grid_value_is_refused(cfg):
    with pytest.raises(UsageError, match="--grid lr: an empty value"):
        grid_axis("lr=1,,2")


def test_a_sweep_whose_points_cannot_all_be_created_leaves_nothing(cfg, monkeypatch):
    with_sweep(cfg, {"grid": {"lr": [1, 2, 3]}}, args=["{lr}"])
    spec = api.load_sweep(str(cfg))
    made = []

    def create_then_fail(self, record):
        made.append(self.url)
        if len(made) == 3:  # the third point fails (a full disk)
            raise OSError(28, "No space left on device")
        return original(self, record)

    original = RunDir.create
    monkeypatch.setattr(RunDir, "create", create_then_fail)
    with pytest.raises(UsageError, match="No space left on device"):
        api.create_sweep(spec, sweep_id="half")
    assert not (cfg.parent / "runs" / "half").exists()


def test_cli_refusals_of_sweep_misuse_are_one_line(cfg, tmp_path, capsys, monkeypatch):
    with_sweep(cfg, {"grid": {"lr": [1, 2]}}, args=["{lr}"])
    api.create_sweep(api.load_sweep(str(cfg)), sweep_id="sw")
    cases = [
        (["resume", "sw", "--config", str(cfg), "--", "--foo"], "a sweep resumes as it was"),
        (["render", str(tmp_path / "train.py"), "--grid", "lr=1,2"], "--grid: a sweep needs a cluster.yaml"),
        (["logs", "sw", "--config", str(cfg)], "sw is a sweep; name one of its points, e.g. sw/0"),
        (["status", "sw/0", "--config", str(cfg), "--sort", "loss"], "--sort: orders a sweep's points"),
        (
            ["run", str(cfg), "--set", "sweep=null", "--backend", "slurm", "--ranks", "9"],
            "for Slurm use `orch submit`",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    # A sweep's config finds its points for `orch run --resume` too (it got as far as the
    # point's own config, which refuses the change: nothing is run here).
    monkeypatch.chdir(cfg.parent)
    assert main(["run", str(cfg), "--resume", "--run-id", "sw/0", "--set", "job.python=/nonexistent"]) == 2
    assert "job.python: cannot change on resume" in capsys.readouterr().err


def test_an_array_tasks_state_from_sacct_records_of_its_array():
    from orchestrator.backends.slurm import _cancelled_before_it_ran
    from orchestrator.backends.slurm.scheduler import array_record_state

    lines = "3_0|RUNNING\n3_[1,3-4%1]|PENDING\n5|CANCELLED by 0\n"
    assert array_record_state(lines, "3", 0) == "RUNNING"
    assert array_record_state(lines, "3", 4) == "PENDING"
    assert array_record_state(lines, "3", 2) is None  # cancelled alone while pending: no record
    assert array_record_state("1_0|COMPLETED\n1|CANCELLED by 0\n", "1", 2) == "CANCELLED"
    submitted = {"event": "submitted", "job_id": "3_2"}
    cancel = {"event": "cancel_requested", "job_id": "3_2"}
    assert _cancelled_before_it_ran([submitted, cancel], "3_2")
    assert not _cancelled_before_it_ran([submitted, {"event": "job_started", "job_id": "9"}, cancel], "3_2")
    assert not _cancelled_before_it_ran([submitted], "3_2")
    earlier = [{"event": "submitted", "job_id": "1_2"}, {"event": "job_started", "job_id": "7"}]
    assert _cancelled_before_it_ran([*earlier, submitted, cancel], "3_2")  # resumed, then cancelled


def test_an_unreachable_controller_costs_one_timeout_not_one_per_point(monkeypatch):
    from orchestrator.backends.slurm import scheduler

    calls = []

    def silent(argv, timeout=30):
        calls.append(argv[0])
        raise scheduler.OrchError(f"{argv[0]} did not answer within {timeout:g}s: is slurmctld reachable?")

    monkeypatch.setattr(scheduler, "_run", silent)
    monkeypatch.setattr(scheduler, "_unreachable", [])
    assert [scheduler.scheduler_state(j) for j in ("4_0", "4_1", "4_2")] == [None, None, None]
    assert calls == ["sacct"]
