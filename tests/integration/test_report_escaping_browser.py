"""The report of a run directory whose every field holds markup (tests/unit/test_report_escaping.py),
opened in a real headless browser (issue 28, point 6): plotly draws the run's text in legends,
labels and hover text, and none of it becomes a link, an image or a script there either."""

from __future__ import annotations

import pytest

from ..conftest import run_orch
from ..unit.test_report_escaping import crafted_run, markup
from .test_report import browser, open_report  # noqa: F401 - `browser` is a fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_markup_from_a_run_directory_is_drawn_as_text(tmp_path, browser):  # noqa: F811
    run = crafted_run(tmp_path / "runs" / "r")
    proc = run_orch("report", str(run), "--out", str(tmp_path / "report.html"))
    assert proc.returncode == 0, proc.stderr
    page, problems = open_report(browser, tmp_path / "report.html")
    try:
        assert problems == []  # no dialog (an alert), no page error, nothing fetched
        drawn = page.evaluate(
            """() => ({
                links: [...document.querySelectorAll('a')].map(a => a.outerHTML),
                images: document.querySelectorAll('img').length,
                legend: [...document.querySelectorAll('.legendtext')].map(t => t.textContent),
            })"""
        )
        assert drawn["links"] == [] and drawn["images"] == 0, drawn
        # The attack reached plotly: an attempt's outcome, drawn in a legend, as the text it is.
        assert any(markup("outcome") in text for text in drawn["legend"]), drawn["legend"]
    finally:
        page.close()
