"""The hang watchdog's decision, pure: which ranks have been silent too long.

Ranks that use orchestrator.runtime write heartbeats (runtime/heartbeat.py; the record's format
and reader are in orchestrator/contract.py): step, wall time,
phase and their typical step time. A rank is hung when its silence exceeds the limit of its
phase: start-up (until the first step), a checkpoint save, or training, where the limit is
fixed or derived from the rank's own step time after a warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from orchestrator.contract import Phase
from orchestrator.spec.config import WatchdogSpec

WARMUP_STEPS = 5


@dataclass(frozen=True)
class Silence:
    rank: int
    step: int
    phase: str
    silent_s: float
    limit_s: float

    @property
    def message(self) -> str:
        return f"no heartbeat for {self.silent_s:.1f}s at step {self.step} (limit {self.limit_s:.1f}s)"

    def event(self, silent: list["Silence"]) -> dict[str, object]:
        """The `hang_detected` event's fields, with every silent rank listed."""
        return {
            "rank": self.rank,
            "step": self.step,
            "phase": self.phase,
            "silent_s": round(self.silent_s, 3),
            "limit_s": round(self.limit_s, 3),
            "silent_ranks": [x.rank for x in silent],
        }


Heartbeats = Mapping[int, tuple[int, float, str, float] | None]


def training_limit(spec: WatchdogSpec, ema_s: float) -> float:
    """How long a training rank may be silent: fixed, or from its own step time."""
    if isinstance(spec.hang_timeout_s, (int, float)):
        return float(spec.hang_timeout_s)
    return max(spec.min_hang_s, spec.hang_factor * ema_s)


def limit_for(spec: WatchdogSpec, step: int, phase: str, ema_s: float) -> float | None:
    if phase == Phase.EXIT:
        return None  # finished training; the supervisor waits for the exit code
    if phase == Phase.INIT:
        return spec.startup_timeout_s
    if phase == Phase.SAVE:
        return spec.save_timeout_s
    if not isinstance(spec.hang_timeout_s, (int, float)) and (step < WARMUP_STEPS or ema_s <= 0):
        return spec.startup_timeout_s  # still warming up: no step time to judge by yet
    return training_limit(spec, ema_s)


def _past_limit(
    heartbeats: Heartbeats, now: float, limit: Callable[[int, str, float], float | None]
) -> list[Silence]:
    """Every rank silent longer than `limit(step, phase, ema)` allows (None: no limit)."""
    out = []
    for rank, record in heartbeats.items():
        if record is None:
            continue
        step, when, phase, ema = record
        allowed = limit(step, phase, ema)
        if allowed is not None and now - when > allowed:
            out.append(Silence(rank=rank, step=step, phase=phase, silent_s=now - when, limit_s=allowed))
    return out


def silent_ranks(spec: WatchdogSpec, heartbeats: Heartbeats, now: float) -> list[Silence]:
    """Ranks past their limit, the likely culprit first: ranks waiting in a collective (phase
    sync) are its victims, so a rank that is not waiting comes first; among equals, the
    longest silent (the others are usually blocked waiting for it)."""
    out = _past_limit(heartbeats, now, lambda step, phase, ema: limit_for(spec, step, phase, ema))
    return sorted(out, key=lambda s: (s.phase == Phase.SYNC, -s.silent_s, s.step, s.rank))


def stopped_ranks(spec: WatchdogSpec, heartbeats: Heartbeats, now: float) -> list[Silence]:
    """Ranks silent past the limit they would have while training, whatever phase they are in:
    the candidates to look at when a rank may be stopped (SIGSTOP) in a phase whose own limit
    is long (saving) or absent (starting). The caller checks which are really stopped."""
    out = _past_limit(
        heartbeats, now, lambda _step, phase, ema: None if phase == Phase.EXIT else training_limit(spec, ema)
    )
    return sorted(out, key=lambda s: (-s.silent_s, s.rank))
