"""After training: a run's or a sweep's record -> one self-contained HTML report (`orch report`).

scalars.py  rank 0's TensorBoard scalars, read from the run directory's storage
collect.py  the record -> attempts, checkpoints, moments, series per attempt (pure)
figures.py  plotly figures from that (plotly: the `report` extra)
page.py     the page: summary, figures, tables; every run-provided text escaped
write.py    write_report: read, collect, draw, write; ReportResult says what it holds
"""

from __future__ import annotations

from .write import ReportResult, write_report

__all__ = ["ReportResult", "write_report"]
