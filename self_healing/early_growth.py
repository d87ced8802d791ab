"""Growth judge of the early warning (`self_healing.early_warning`): is the run blowing up slowly?

The EMA of the per-step log ratio of the pre-clip grad norm, of the norm of the last update on a
fixed sample of <= 8192 weights, and of the loss, each against its own calibrated bound. It only
measures and judges: `GrowthJudge.judge` returns a `GrowthVerdict` (failure, warning or nothing),
and `EarlyWarning` acts on it (rollback, LR cut, early snapshot), so the rule reads and tests alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .diagnosis import REFERENCES, Action, Diagnosis, FailureKind
from .signals import Calibrator, GrowthRate

FORECAST_HORIZON = 20
"""A growth failure also needs the quantity to double within this many steps at its current rate."""
GROWTH_PERSIST = 2
"""Consecutive steps above the failure bound before a growth failure is declared (a one-step spike
of the grad norm is the basic detectors' job)."""
WARNING_CALM_STEPS = 10
"""A warning episode ends after this many calm steps; failures are at most one per this many steps."""
SAMPLE_TENSORS, SAMPLE_PER_TENSOR = 32, 256
GROWTH_SIGNALS = ("grad_norm_growth", "update_norm_growth", "loss_growth")


@dataclass
class GrowthVerdict:
    """What the growth judge saw on one step: `level` is "failure" or "warning"."""

    level: str
    name: str
    threshold: float | None
    method: str


class GrowthJudge:
    """Growth rates of one run and the rule on them. Stateful only in what a rate needs (the last
    value, the failure streak); it never touches the engine or the Trainer."""

    def __init__(self, ema: float, calibrators: dict[str, Calibrator], alpha_fail: float, alpha_warn: float) -> None:
        self.rates = {n: GrowthRate(ema) for n in GROWTH_SIGNALS}
        self.lr_rate = GrowthRate(ema)
        self.calibrators = calibrators
        self.alpha_fail, self.alpha_warn = alpha_fail, alpha_warn
        self.thresholds: dict[str, tuple[float | None, str]] = {}
        """Last (threshold, method) each signal was judged with, for the summary."""
        self._sample_idx: list[tuple[torch.Tensor, int]] | None = None
        self._sample_prev: torch.Tensor | None = None
        self._fail_streak = 0
        self._fail_quiet_until = 0

    def reset(self) -> None:
        """After a rollback or an LR change the rates describe another trajectory: start afresh."""
        for g in self.rates.values():
            g.reset()
        self.lr_rate.reset()
        self._sample_prev = None

    def forget_last(self) -> None:
        """This step's update did not land (skipped or undone): the next ratio starts afresh."""
        self._sample_prev = None
        for g in self.rates.values():
            g.last = None

    def scores(self, lr: float | None, grad_norm: float | None, loss: float | None,
               params: list[torch.Tensor]) -> dict[str, float]:
        """Feed one step's numbers; the rates that have seen at least three ratios."""
        out: dict[str, float] = {}
        upd = self.update_norm(params)
        self.lr_rate.update(lr)
        for name, x in (("grad_norm_growth", grad_norm), ("update_norm_growth", upd), ("loss_growth", loss)):
            g = self.rates[name]
            r = g.update(x)
            if r is not None and g.count >= 3:
                out[name] = r
        return out

    def update_norm(self, params: list[torch.Tensor]) -> float | None:
        """Norm of the last update on a fixed sample of weights (<= 32 tensors x 256 values): the
        difference between the sample now and one step ago. One small gather and one host sync."""
        if self._sample_idx is None:
            stride = max(len(params) // SAMPLE_TENSORS, 1)
            chosen = params[::stride][:SAMPLE_TENSORS]
            self._sample_idx = [(p, max(p.numel() // SAMPLE_PER_TENSOR, 1)) for p in chosen]
        with torch.no_grad():
            cur = torch.cat([p.detach().reshape(-1)[::st][:SAMPLE_PER_TENSOR].float().to(self._sample_idx[0][0].device)
                             for p, st in self._sample_idx])
        prev, self._sample_prev = self._sample_prev, cur
        if prev is None or prev.shape != cur.shape:
            return None
        n = float(torch.linalg.vector_norm(cur - prev))
        return n if n > 0 else None

    def judge(self, step: int, scores: dict[str, float]) -> GrowthVerdict | None:
        """A failure when a rate is above its failure bound on `GROWTH_PERSIST` steps in a row and
        doubles its quantity within `FORECAST_HORIZON` steps (at most one per `WARNING_CALM_STEPS`);
        else a warning when above the warning bound; else None."""
        names = [n for n in GROWTH_SIGNALS if n in scores]
        if not names:
            return None
        # three rates watched at once: each gets a third of the false-alarm budget (Bonferroni)
        fail, warn = self.alpha_fail / 3, self.alpha_warn / 3
        worst_fail, worst_warn = None, None
        floor = math.log(2) / FORECAST_HORIZON
        for n in names:
            above, thr, method = self.calibrators[n].test(scores[n], fail)
            self.thresholds[n] = (thr, method)
            above = above and scores[n] >= floor  # unusual for this run *and* doubling within the horizon
            if above and (worst_fail is None or scores[n] / max(thr, 1e-12) > worst_fail[1]):
                worst_fail = (n, scores[n] / max(thr, 1e-12), thr, method)
        self._fail_streak = self._fail_streak + 1 if worst_fail is not None else 0
        if self._fail_streak < GROWTH_PERSIST:
            worst_fail = None
            w_above, w_thr, _ = self.calibrators[n].test(scores[n], warn)
            if w_above and worst_warn is None:
                worst_warn = (n, w_thr)
        if worst_fail is not None and step >= self._fail_quiet_until:
            self._fail_quiet_until = step + WARNING_CALM_STEPS  # one event per episode, not one per step
            n, _, thr, method = worst_fail
            return GrowthVerdict("failure", n, thr, method)
        if worst_warn is not None:
            return GrowthVerdict("warning", worst_warn[0], worst_warn[1], "")
        return None

    def above_warning(self, scores: dict[str, float]) -> bool:
        """Is any growth score above its warning bound (a warning episode is not calm yet)?"""
        for n, v in scores.items():
            if n.endswith("growth"):
                thr, _ = self.calibrators[n].threshold(self.alpha_warn / 3)
                if thr is not None and v > thr:
                    return True
        return False

    def evidence(self, verdict: GrowthVerdict, scores: dict[str, float], loss: float | None,
                 grad_norm: float | None, grad_mean: float | None, grad_spike_factor: float) -> dict[str, Any]:
        """The event's evidence, with the diagnosis: did the LR itself grow enough to explain it?
        (`grad_mean`: the basic gradient test's window mean, None when it has none.)"""
        name = verdict.name
        ev: dict[str, Any] = {"signal_name": name.replace("_", " "), "score": scores[name],
                              "threshold": verdict.threshold, "calibration": verdict.method,
                              "target_rate": self.alpha_fail}
        ev.update({f"{k}_per_step": round(v, 6) for k, v in scores.items() if k.endswith("growth")})
        g = self.rates["grad_norm_growth"]
        if grad_mean and grad_mean > 0:  # when the basic gradient test would fire at this rate
            ev["steps_to_grad_spike_forecast"] = round(g.forecast_steps(grad_spike_factor * grad_mean), 1)
        ev["loss"], ev["grad_norm"] = loss, grad_norm
        # then the cure is an LR cut; otherwise a rollback alone (the policy adds the cut if it comes back)
        lr_rate = self.lr_rate.rate or 0.0
        ev["lr_growth_per_step"] = round(lr_rate, 6)
        ev["lr_cause"] = lr_rate > 0.01 and lr_rate >= 0.5 * max(scores.get("update_norm_growth", 0.0), 0.0)
        return ev


def warning_diagnosis(step: int, ev: dict[str, Any], actions: list[Action]) -> Diagnosis:
    """The warning event: an early snapshot and tighter clipping, or observed only."""
    return Diagnosis(FailureKind.INSTABILITY_FORECAST,
                     f"{ev['signal_name']} is growing {ev['score']:.3g}/step at step {step}, above its warning bound "
                     f"{ev['threshold']:.3g}: " + (("early snapshot and tighter clipping" if Action.CHECKPOINT in actions
                                                    else "tighter clipping") if actions else "observed only"),
                     ev, actions, list(REFERENCES.get(FailureKind.INSTABILITY_FORECAST, [])), step)


__all__ = ["GrowthJudge", "GrowthVerdict", "warning_diagnosis", "FORECAST_HORIZON", "GROWTH_PERSIST",
           "WARNING_CALM_STEPS", "SAMPLE_TENSORS", "SAMPLE_PER_TENSOR", "GROWTH_SIGNALS"]
