"""Which early-warning scores may teach the thresholds (`self_healing.early_warning`).

A score enters its signal's calibration window only once its step is confirmed healthy,
`CONFIRM_STEPS` steps later with no skip, rollback or LR cut in between (from any detector): the
build-up to a failure never teaches the thresholds that it is normal. Scores are not collected
during the LR warm-up nor for `CONFIRM_STEPS` steps after it (Adam's moments settling).
"""

from __future__ import annotations

from collections import deque

from .signals import Calibrator

CONFIRM_STEPS = 20
"""Steps after which a step with no intervention counts as healthy for calibration."""


class CalibrationGate:
    """Holds each step's scores until the step is confirmed healthy, then feeds the calibrators."""

    def __init__(self, calibrators: dict[str, Calibrator]) -> None:
        self.calibrators = calibrators
        self.pending: deque[tuple[int, dict[str, float]]] = deque()
        self.lr_rising = True
        """While True (warm-up and `CONFIRM_STEPS` after it) scores are judged but not calibrated on."""
        self._prev_lr: float | None = None
        self._burn_in_until: int | None = None

    def note_lr(self, step: int, ref: float | None) -> None:
        """Warm-up, and the steps right after it while Adam's moments settle, is not the regime the
        thresholds are for (`ref`: the scheduled LR, else the applied one)."""
        rising = False
        if ref is not None:
            rising = self._prev_lr is not None and ref > self._prev_lr * (1 + 1e-9)
            self._prev_lr = ref
        if self._burn_in_until is None or (rising and step < self._burn_in_until):
            self._burn_in_until = step + CONFIRM_STEPS
        self.lr_rising = rising or step < self._burn_in_until

    def hold(self, step: int, scores: dict[str, float]) -> None:
        """Keep a step's scores (none while the LR is rising) until the step is confirmed."""
        self.pending.append((step, {k: v for k, v in scores.items() if not self.lr_rising}))

    def hold_one(self, step: int, name: str, score: float) -> None:
        """Add a score measured after the update (the probe) to its step's held scores."""
        if self.pending and self.pending[-1][0] == step:
            self.pending[-1][1][name] = score
        else:
            self.pending.append((step, {name: score}))

    def forget(self) -> None:
        """An intervention: the build-up before it is not healthy history."""
        self.pending.clear()

    def confirm(self, step: int) -> None:
        """Steps `CONFIRM_STEPS` old with no intervention since: their scores teach the thresholds."""
        while self.pending and self.pending[0][0] <= step - CONFIRM_STEPS:
            _, scores = self.pending.popleft()
            for name, v in scores.items():
                if name in self.calibrators:
                    self.calibrators[name].add(v)


__all__ = ["CalibrationGate", "CONFIRM_STEPS"]
