"""`orch report` on real runs, opened in a real headless browser: the example job fails twice
(a failpoint crashes rank 0 before its third commit, in each attempt), is resumed, preempted
(SIGUSR2) and resumed again, then the report must show every attempt, and its plots must render
with no console error; a two-point sweep's report too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ..conftest import JOBS, REPO, orch_cmd, read_events, run_orch, wait_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--steps", "100", "--log-every", "5", "--step-sleep", "0.04", "--dataset-size", "512"]
PLOTS = ("orch-curves", "orch-timeline", "orch-goodput")


@pytest.fixture(scope="module")
def browser():
    """Headless chromium through playwright: Debian's binary, installed once if missing."""
    if os.environ.get("ORCH_SKIP_BROWSER") == "1":
        pytest.skip("ORCH_SKIP_BROWSER=1: the report is not opened in a browser")
    if not CHROMIUM.exists():
        subprocess.run(["sh", str(REPO / "scripts" / "install-browser.sh")], check=False, timeout=600)
    if not CHROMIUM.exists():
        pytest.fail(
            f"no headless browser at {CHROMIUM}: run scripts/install-browser.sh as root"
            " (or set ORCH_SKIP_BROWSER=1 to leave the browser checks out)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def open_report(browser, path: Path, plots: tuple[str, ...] = PLOTS) -> tuple[object, list[str]]:
    """The page once every plot has drawn, and the console errors, page errors and requests
    beyond the file (it must open offline) it made."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on(
        "request",
        lambda req: (
            None
            if req.url.startswith(("file:", "data:", "blob:"))
            else problems.append(f"request: {req.url}")
        ),
    )
    page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.goto(path.resolve().as_uri())
    page.wait_for_function(
        "ids => ids.every(id => document.querySelector(`#${id} .main-svg`))", arg=list(plots), timeout=20_000
    )
    return page, problems


def drawn(page, plot_id: str) -> dict:
    """What plotly drew in one plot: its traces' names, the SVG traces and y tick labels, and
    the x pixel of every marker of each line in the first panel."""
    return page.evaluate(
        """id => {
            const gd = document.getElementById(id);
            const x = p => parseFloat(p.getAttribute('transform').match(/translate\\(([-\\d.]+)/)[1]);
            return {
                names: gd.data.map(t => t.name),
                svg: gd.querySelectorAll('.main-svg').length,
                traces: gd.querySelectorAll('.trace').length,
                lines: gd.querySelectorAll('.scatterlayer .trace path.js-line').length,
                bars: gd.querySelectorAll('.barlayer .trace .point').length,
                yticks: [...gd.querySelectorAll('.ytick text')].map(t => t.textContent),
                xs: [...gd.querySelectorAll('.subplot.xy .scatterlayer .trace')].map(
                    t => [...t.querySelectorAll('.points path')].map(x)),
            };
        }""",
        plot_id,
    )


def open_rendered(browser: Any, path: Path) -> Any:
    """The report open in the browser, with no console or page error and every plot drawn."""
    page, problems = open_report(browser, path)
    assert problems == []
    for plot in PLOTS:
        d = drawn(page, plot)
        assert d["svg"] > 0 and d["traces"] > 0, (plot, d)
    return page


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str, Path]:
    """(the config, the run id, the run directory) of a run with two failures and restarts, an
    `orch resume`, a preemption and a last attempt that succeeds."""
    tmp = tmp_path_factory.mktemp("report")
    config = write_config(
        tmp,
        JOBS / "train_ddp.py",
        args=ARGS,
        storage={"checkpoint_interval": 10},
        restart={"max_restarts": 1},
    )
    run_id, run_dir = "rep", tmp / "runs" / "rep"
    # Attempt 0 commits steps 10 and 20 and dies saving 30; attempt 1 replays 21-30, commits 30
    # and 40 and dies saving 50: no restarts left, the run failed.
    failed = run_orch(
        "run", str(config), "--run-id", run_id, "--quiet", env={"ORCH_FAULT": "ckpt.before_commit@3"}
    )
    assert failed.returncode == 1, failed.stderr
    resume = subprocess.Popen(
        orch_cmd("resume", run_id, "--config", str(config), "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = run_dir / "logs" / "attempt-2" / "rank-0.log"
    wait_for(lambda: log.exists() and "step 55/" in log.read_text(), 90, "attempt 2 at step 55")
    resume.send_signal(signal.SIGUSR2)  # a preemption: checkpoint, stop, go on as attempt 3
    _, err = resume.communicate(timeout=120)
    assert resume.returncode == 0, err
    ended = [e["status"] for e in read_events(run_dir) if e["event"] == "attempt_ended"]
    assert ended == ["failed", "failed", "preempted", "succeeded"], ended
    return config, run_id, run_dir


def test_run_report_shows_every_attempt_and_renders(run, browser, tmp_path):
    config, run_id, run_dir = run
    tmp = tmp_path
    default = run_orch("report", run_id, "--config", str(config))
    assert default.returncode == 0, default.stderr
    line = default.stdout.strip()
    assert line.startswith(f"wrote {run_dir / 'report.html'} (") and " MB): run rep succeeded" in line, line
    assert "4 attempt(s) (2 failed, 1 preempted), loss and samples_per_s over 100 steps" in line, line
    assert (run_dir / "report.html").is_file()

    proc = run_orch("report", run_id, "--config", str(config), "--out", str(tmp / "report.html"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {tmp / 'report.html'} ("), proc.stdout
    written = tmp / "report.html"
    size = written.stat().st_size
    assert 1_000_000 < size < 8_000_000, size  # plotly.js once (~4.8 MB), the data small
    text = written.read_text()
    assert text.count("Plotly.newPlot(") == len(PLOTS)
    assert "<script src=" not in text, "the file must open offline"

    page = open_rendered(browser, written)
    try:
        curves = drawn(page, "orch-curves")
        attempts = [
            f"attempt {n} ({o})" for n, o in enumerate(["failed", "failed", "preempted", "succeeded"])
        ]
        # Loss and throughput: one line per attempt in each panel.
        assert curves["names"] == attempts * 2 and curves["lines"] == 8, curves["names"]
        # The replayed steps show: attempt 1's line starts left of where attempt 0's ends (it
        # logs again steps 21-30, which attempt 0 had logged before its save failed).
        first, second = curves["xs"][0], curves["xs"][1]
        assert first and second and min(second) < max(first), (first, second)
        timeline = drawn(page, "orch-timeline")
        assert sorted(timeline["yticks"]) == [f"attempt {n}" for n in range(4)], timeline["yticks"]
        assert timeline["bars"] == 4
        for mark in ("checkpoint", "failure", "restart", "resume", "preemption", "requeue"):
            assert mark in timeline["names"], (mark, timeline["names"])
        goodput = drawn(page, "orch-goodput")
        assert "productive" in goodput["names"] and "lost work" in goodput["names"], goodput["names"]
        rows = page.locator("section:has(h2:text('Attempts')) tbody tr")
        assert rows.count() == 4
        assert "exit 86" in rows.nth(0).inner_text()
        assert "rep" in page.locator("h1").inner_text() and "succeeded" in page.locator("h1").inner_text()
    finally:
        page.close()


def test_sweep_report_overlays_every_point(tmp_path, browser):
    config = write_config(
        tmp_path,
        JOBS / "train_ddp.py",
        resources={"nodes": 1, "ranks_per_node": 1, "cpus_per_rank": 1},
        storage={"checkpoint_interval": 10},
    )
    args = ["--steps", "30", "--log-every", "5", "--dataset-size", "512", "--lr", "{lr}"]
    swept = run_orch(
        "sweep", str(config), "--grid", "lr=1.0e-3,1.0e-2", "--set", "job.args=" + json.dumps(args),
        "--sweep-id", "sw", "--json",
    )  # fmt: skip
    assert swept.returncode == 0, swept.stderr
    proc = run_orch("report", "sw", "--config", str(config), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["kind"] == "sweep" and result["points"] == 2 and result["state"] == "2 succeeded", result
    assert result["url"] == str(tmp_path / "runs" / "sw" / "report.html")

    page = open_rendered(browser, Path(result["url"]))
    try:
        curves = drawn(page, "orch-curves")
        assert curves["names"] == ["0: lr=0.001", "1: lr=0.01"] * 2, curves["names"]
        timeline = drawn(page, "orch-timeline")
        assert sorted(timeline["yticks"]) == ["0: lr=0.001", "1: lr=0.01"] and timeline["bars"] == 2, timeline
        assert page.locator("section:has(h2:text('Points')) tbody tr").count() == 2
    finally:
        page.close()


def test_hostile_names_and_root_causes_show_as_text(tmp_path, browser):
    """A run directory's name and a job's last words are shown, never run."""
    name = "<img src=x onerror=alert(1)>"
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "run.yaml").write_text(f"run_id: {json.dumps(name)}\nbackend: local\n")
    cause = {"rank": 0, "exitcode": 1, "message": "<script>alert(2)</script> %{x}"}
    events = [
        {"time": 1.8e9, "event": "run_started", "backend": "local", "pid": 1, "host": "elsewhere"},
        {"time": 1.8e9 + 1, "event": "attempt_started", "attempt": 0},
        {"time": 1.8e9 + 2, "event": "attempt_ended", "attempt": 0, "status": "failed", "root_cause": cause},
        {"time": 1.8e9 + 3, "event": "run_finished", "status": "failed", "root_cause": cause},
    ]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    proc = run_orch("report", str(run_dir), "--out", str(tmp_path / "report.html"))
    assert proc.returncode == 0, proc.stderr
    page, problems = open_report(browser, tmp_path / "report.html", ("orch-timeline", "orch-goodput"))
    try:
        assert problems == []
        assert name in page.locator("h1").inner_text()
        assert "<script>alert(2)</script> %{x}" in page.locator(".cause").inner_text()
        # plotly's config and library, then one per plot: nothing from the run became markup
        assert page.locator("img").count() == 0 and page.locator("script").count() == 2 + 2
    finally:
        page.close()
