"""Oscillation judge of the early warning (`self_healing.early_warning`): is the LR past the stability edge?

The FFT of the last `oscillation_window` losses and grad norms (~50 us); the dominant period's share
of the power above its calibrated bound is the sign. It only measures and judges:
`OscillationJudge.judge` returns an `OscillationVerdict` or None, and `EarlyWarning` acts (an LR cut).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .diagnosis import REFERENCES, Action, Diagnosis, FailureKind
from .signals import Calibrator, dominant_period

OSCILLATION_SIGNALS = ("loss_oscillation", "grad_norm_oscillation")


@dataclass
class OscillationVerdict:
    """A signal whose dominant period holds more of its power than its calibrated bound allows."""

    name: str
    score: float
    threshold: float | None
    method: str
    period: float | None


class OscillationJudge:
    """The two windows and the rule on them (at most one verdict per window)."""

    def __init__(self, window: int, calibrators: dict[str, Calibrator], alpha_fail: float) -> None:
        self.window = window
        self.calibrators = calibrators
        self.alpha_fail = alpha_fail
        self.loss_window: deque[float] = deque(maxlen=window)
        self.grad_window: deque[float] = deque(maxlen=window)
        self.periods: dict[str, float] = {}
        """Last dominant period (steps) of each signal."""
        self.thresholds: dict[str, tuple[float | None, str]] = {}
        """Last (threshold, method) each signal was judged with, for the summary."""
        self.cooldown_until = 0

    def clear(self) -> None:
        """After an intervention the windows describe another trajectory."""
        self.loss_window.clear()
        self.grad_window.clear()

    def scores(self, loss: float | None, grad_norm: float | None) -> dict[str, float]:
        """Feed one step's numbers; the power fraction of each full window's dominant period."""
        if loss is not None and math.isfinite(loss):
            self.loss_window.append(loss)
        if grad_norm is not None and math.isfinite(grad_norm):
            self.grad_window.append(grad_norm)
        out: dict[str, float] = {}
        for name, win in (("loss_oscillation", self.loss_window), ("grad_norm_oscillation", self.grad_window)):
            if len(win) == self.window:
                sp = dominant_period(list(win), min_cycles=4)
                if sp is not None:
                    out[name] = sp.power_fraction
                    self.periods[name] = sp.period
        return out

    def judge(self, step: int, scores: dict[str, float]) -> OscillationVerdict | None:
        """The first signal above its bound (half the false-alarm budget each), outside the cooldown."""
        if step < self.cooldown_until:
            return None
        for n in OSCILLATION_SIGNALS:
            if n not in scores:
                continue
            above, thr, method = self.calibrators[n].test(scores[n], self.alpha_fail / 2)
            self.thresholds[n] = (thr, method)
            if not above:
                continue
            self.cooldown_until = step + self.window
            return OscillationVerdict(n, scores[n], thr, method, self.periods.get(n))
        return None


def oscillation_diagnosis(step: int, v: OscillationVerdict, alpha: float, window: int, actions: list[Action],
                          lr_factor: float, observe_only: bool) -> Diagnosis:
    """The oscillation event: the LR cut taken, or the recommendation when none was."""
    ev = {"signal_name": v.name.replace("_", " "), "power_fraction": v.score, "threshold": v.threshold,
          "calibration": v.method, "period_steps": v.period, "target_rate": alpha, "window": window}
    what = (f"LR reduced by {lr_factor}" if actions else
            "recommendation: reduce the LR" + (" (observed only)" if observe_only else " (already at min_lr_scale)"))
    return Diagnosis(FailureKind.OSCILLATION,
                     f"{ev['signal_name']} oscillates with a period of {v.period:.3g} steps at step {step} "
                     f"({v.score:.0%} of its power, calibrated bound {v.threshold:.0%}): the LR is past the stability "
                     f"edge; {what}", ev, actions, list(REFERENCES.get(FailureKind.OSCILLATION, [])), step)


__all__ = ["OscillationJudge", "OscillationVerdict", "oscillation_diagnosis", "OSCILLATION_SIGNALS"]
