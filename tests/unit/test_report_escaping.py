"""No text from a run directory becomes markup in its report (issue 28, point 6). A run directory
may be written by others, and a job's own output (its exception's message) is anyone's text, so
every field a run or sweep directory can hold is given markup here: links, images, scripts, a
`</script>` that would end the JSON a figure's script embeds, `"` and `'` that would end an
attribute. `orch report` then writes the page, and the page is parsed: no element or attribute
that the page does not make itself, and in the figures' data (which plotly renders as a subset of
HTML: links included) none of that markup raw. Each shown field is checked to be there,
escaped: the markup did reach the report."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import cli

from .test_report import scalar_file

T0 = 1_800_000_000.0


def markup(field: str) -> str:
    """Text that is markup, whatever reads it: a script's end, a link with both quotes, an image
    that runs code."""
    return (
        f"</script><a href=\"https://evil.example/{field}\" title='{field}'>{field}</a>"
        f'<img src=x onerror=alert("{field}")>'
    )


# A directory's name cannot hold "/": its own markup.
DIR_NAME = "<img src=x onerror=alert('dir')>\"'"

# The fields a report shows as text: each must be found on the page or in a figure, escaped.
SHOWN = [
    "outcome", "state", "error_type", "message", "rank", "node_rank", "exitcode",
    "warning", "giving_up", "requeued", "from_state", "hang_rank", "hang_silent", "hang_step",
    "diverged_first", "diverged_last", "rolled_back_step", "skipped", "backoff", "tag",
]  # fmt: skip
# Fields orch writes as numbers: markup there is dropped, never shown.
NUMBERS = [
    "restored_step", "checkpoint_attempt", "write_s", "total_steps", "nnodes", "ranks_per_node",
    "metrics_step", "metrics_value", "config_nodes",
]  # fmt: skip


def crafted_events(cause: dict[str, Any]) -> list[dict[str, Any]]:
    def ev(dt: float, event: str, **fields: Any) -> dict[str, Any]:
        return {"time": T0 + dt, "event": event, **fields}

    return [
        ev(0, "run_started", backend="local", nnodes=markup("nnodes"),
           ranks_per_node=markup("ranks_per_node"), pid=1, pid_started=1.0, host="elsewhere"),
        ev(0.5, "total_steps", total_steps=markup("total_steps")),
        ev(1, "attempt_started", attempt=0),
        ev(1.5, "training_started", attempt=0, step=0),
        ev(2, "checkpoint_committed", attempt=markup("checkpoint_attempt"), step=10,
           write_s=markup("write_s"), block_s=0.05),
        ev(2.5, "warning", message=markup("warning")),
        ev(2.6, "hang_detected", attempt=0, rank=markup("hang_rank"), silent_s=markup("hang_silent"),
           step=markup("hang_step")),
        ev(2.7, "diverged", attempt=0, first_step=markup("diverged_first"),
           last_step=markup("diverged_last")),
        ev(3, "attempt_ended", attempt=0, status=markup("outcome"), root_cause=cause),
        ev(3.1, "restart_scheduled", attempt=1, backoff_s=markup("backoff")),
        ev(3.2, "rolled_back", attempt=1, step=markup("rolled_back_step"), skipped=markup("skipped")),
        ev(4, "attempt_started", attempt=1),
        ev(4.2, "restored", attempt=1, step=markup("restored_step"), restore_s=0.1),
        ev(5, "attempt_ended", attempt=1, status="preempted"),
        ev(5.1, "requeued", attempt=2, reason=markup("requeued")),
        ev(5.2, "resumed", from_state=markup("from_state"), attempt=2),
        ev(6, "attempt_started", attempt=2),
        ev(7, "attempt_ended", attempt=2, status="failed", root_cause=cause),
        ev(7.1, "giving_up", reason=markup("giving_up")),
        ev(7.2, "run_finished", status=markup("state"), root_cause=cause),
    ]  # fmt: skip


def crafted_run(path: Path) -> Path:
    """A run directory whose every field holds markup."""
    path.mkdir(parents=True)
    config = {"resources": {"nodes": markup("config_nodes"), "ranks_per_node": 2}}
    (path / "run.yaml").write_text(
        yaml.safe_dump({"run_id": path.name, "backend": "local", "config": config})
    )
    cause = {key: markup(key) for key in ("rank", "node_rank", "exitcode", "error_type", "message")}
    (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in crafted_events(cause)))
    # rank 0's scalars under a tag that is markup (it holds "loss": the curves plot it)
    scalar_file(
        path / "tb",
        [(markup("tag") + " loss", step, 1.0 / step, T0 + 1.5 + step / 100) for step in (1, 2, 3)],
    )
    metrics = {"step": markup("metrics_step"), "scalars": {markup("metrics_name"): markup("metrics_value")}}
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def crafted_sweep(path: Path) -> Path:
    path.mkdir(parents=True)
    record = {
        "sweep_id": path.name,
        "backend": markup("sweep_backend"),
        "names": [markup("sweep_name")],
        "points": [{"index": 0, "values": {markup("sweep_name"): markup("sweep_value")}}],
    }
    (path / "sweep.yaml").write_text(yaml.safe_dump(record))
    crafted_run(path / "0")
    return path


# ---------------------------------------------------------------------------- the page, parsed

# What the page makes itself (page.py), and plotly's fragments: each element's attributes.
ELEMENTS = {
    "html": {"lang"}, "head": set(), "meta": {"charset", "name", "content"}, "title": set(),
    "style": set(), "body": set(), "header": set(), "h1": set(), "h2": set(), "div": {"class", "id", "style"},
    "span": {"class", "style"}, "b": set(), "section": set(), "p": {"class"}, "table": set(),
    "thead": set(), "tbody": set(), "tr": set(), "th": set(), "td": {"class"}, "ul": set(), "li": set(),
    "footer": set(), "script": {"type", "charset"},
}  # fmt: skip
CLASSES = {"sub", "state", "cards", "card", "cause", "cause-cell", "note", "plotly-graph-div"}
STYLES = re.compile(r"background:#[0-9a-f]{6}|height:(\d+px|100%); width:100%;")
FIGURE_IDS = {"orch-curves", "orch-timeline", "orch-goodput"}


class Page(HTMLParser):
    """Every element and attribute of a page; the text of its scripts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.strangers: list[str] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        allowed = ELEMENTS.get(tag)
        if allowed is None:
            self.strangers.append(f"<{tag}>")
            return
        for name, value in attrs:
            ok = name in allowed and (
                (name == "class" and value in CLASSES)
                or (name == "style" and value is not None and STYLES.fullmatch(value) is not None)
                or (name == "id" and value in FIGURE_IDS)
                or name not in ("class", "style", "id")
            )
            if not ok:
                self.strangers.append(f"<{tag} {name}={value!r}>")
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)


def figure_data(scripts: list[str]) -> str:
    """The figures' JSON as plotly.js reads it: plotly writes <, > and / as \\uXXXX escapes."""
    figures = [s for s in scripts if "Plotly.newPlot(" in s]
    assert figures, "the report has figures"
    decoded = "\n".join(figures)
    for code, char in (("\\u003c", "<"), ("\\u003e", ">"), ("\\u002f", "/"), ('\\"', '"')):
        decoded = decoded.replace(code, char)
    return decoded


def report_of(target: Path, out: Path) -> tuple[Page, str, str]:
    """`orch report TARGET --out OUT`: the page parsed, its raw text, and its figures' data."""
    assert cli.main(["report", str(target), "--out", str(out)]) == 0
    raw = out.read_text(encoding="utf-8")
    page = Page()
    page.feed(raw)
    page.close()
    return page, raw, figure_data(page.scripts)


def assert_no_markup_from_the_run(
    page: Page, raw: str, figures: str, fields: list[str], figures_made: int
) -> None:
    assert page.strangers == [], page.strangers[:5]
    # plotly.js's config and the library, then one per figure: no script came from the run.
    assert len(page.scripts) == 2 + figures_made, len(page.scripts)
    for field in fields:
        text = markup(field)
        assert text not in raw and text not in figures, field
        for piece in (f'<a href="https://evil.example/{field}"', f'alert("{field}")>', "</script><a"):
            assert piece not in figures, (field, piece)
    assert "<img" not in figures and "<a href" not in figures


def shown_escaped(field: str, page: Page, figures: str) -> bool:
    """Whether `field`'s markup reached the report, as text: on the page (the parser has turned
    its escapes back into text), or in a figure (escaped for plotly's HTML)."""
    text = markup(field)
    # plotly.js decodes &lt; &gt; &amp; but shows &quot; as it is: quotes go in as quotes.
    return text in "".join(page.text) or html.escape(text, quote=False) in figures


def test_no_field_of_a_run_directory_becomes_markup_in_its_report(tmp_path):
    run = crafted_run(tmp_path / "runs" / DIR_NAME)
    page, raw, figures = report_of(run, tmp_path / "report.html")
    assert_no_markup_from_the_run(page, raw, figures, SHOWN + NUMBERS + ["metrics_name"], figures_made=3)
    missing = [field for field in SHOWN if not shown_escaped(field, page, figures)]
    assert missing == [], f"not shown, so not tested: {missing}"
    assert DIR_NAME in "".join(page.text), "the run's id, shown as text"
    for field in NUMBERS:
        assert not shown_escaped(field, page, figures), f"{field}: not a number, not shown"


def test_no_field_of_a_sweep_directory_becomes_markup_in_its_report(tmp_path):
    sweep = crafted_sweep(tmp_path / "runs" / "s")
    page, raw, figures = report_of(sweep, tmp_path / "report.html")
    fields = SHOWN + NUMBERS + ["sweep_backend", "sweep_name", "sweep_value"]
    assert_no_markup_from_the_run(page, raw, figures, fields, figures_made=3)
    for field in ("sweep_backend", "sweep_name", "sweep_value", "outcome", "message"):
        assert shown_escaped(field, page, figures), field


@pytest.mark.parametrize("field", ["outcome", "restored_step"])
def test_the_timelines_hover_text_and_legend_hold_no_markup(tmp_path, field):
    # The two fields the issue found unescaped: an attempt's outcome, its restored step.
    run = crafted_run(tmp_path / "runs" / "r")
    _, _, figures = report_of(run, tmp_path / "report.html")
    assert markup(field) not in figures


def test_a_backend_orch_does_not_know_is_one_line_and_no_report(tmp_path, capsys):
    run = crafted_run(tmp_path / "runs" / "r")
    events = (
        (run / "events.jsonl")
        .read_text()
        .replace('"backend": "local"', json.dumps({"backend": markup("backend")})[1:-1], 1)
    )
    (run / "events.jsonl").write_text(events)
    assert markup("backend") in json.loads(events.splitlines()[0])["backend"], (
        "the crafted backend is recorded"
    )
    assert cli.main(["report", str(run), "--out", str(tmp_path / "report.html")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("orch report: run r: events.jsonl: unknown backend"), line
    assert not (tmp_path / "report.html").exists()
