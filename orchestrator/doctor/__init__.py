"""`orch doctor`: before a submit, whether the environment, the config, the storage and the
backend will work, one check per line (ok / warn / fail, with the fix). `orch submit` runs the
fast checks (not the environment's, which are the nodes' business, nor the probe) first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.doctor.check import Check, Status, format_check
from orchestrator.spec.config import ClusterConfig


@dataclass(frozen=True)
class DoctorReport:
    checks: tuple[Check, ...]

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status is Status.FAIL)

    def lines(self) -> list[str]:
        out = [line for c in self.checks for line in format_check(c)]
        counts = {s: sum(1 for c in self.checks if c.status is s) for s in Status}
        out.append(f"{counts[Status.OK]} ok, {counts[Status.WARN]} warn, {counts[Status.FAIL]} fail")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"ok": not self.failed, "checks": [c.to_json() for c in self.checks]}


def run_checks(
    config: ClusterConfig,
    *,
    environment: bool = True,
    probe: bool = False,
    python: str | None = None,
    probe_timeout_s: float = 300.0,
) -> DoctorReport:
    from orchestrator.doctor.launch import config_checks
    from orchestrator.doctor.storage import storage_checks

    checks: list[Check] = []
    if environment:
        from orchestrator.doctor.environment import environment_checks

        checks += environment_checks(config)
    stored = storage_checks(config)
    # A root the storage checks found unusable is said there once, not again as a refusal.
    checks += config_checks(config, storage_usable=not any(c.status is Status.FAIL for c in stored))
    checks += stored
    if config.backend == "slurm":
        from orchestrator.doctor.slurm import slurm_checks

        checks += slurm_checks(config)
        if probe:
            failed = [c for c in checks if c.status is Status.FAIL]
            if failed:  # the request itself would be refused, or the storage is unusable
                checks.append(
                    Check(
                        "probe",
                        "probe job",
                        Status.FAIL,
                        f"not run: {len(failed)} check(s) above fail, and the probe asks for the same",
                        "fix those first",
                    )
                )
            else:
                import sys

                from orchestrator.doctor.probe import probe_checks

                checks += probe_checks(config, python or config.job.python or sys.executable, probe_timeout_s)
    else:
        from orchestrator.doctor.local import local_checks

        checks += local_checks(config)
    return DoctorReport(tuple(checks))


__all__ = ["Check", "DoctorReport", "Status", "run_checks"]
