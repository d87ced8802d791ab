"""Failure detectors: pure code on numbers, one optimizer step at a time.

Nothing here knows about a Trainer. The callback hands each step's numbers (loss, pre-clip grad
norm, learning rates) to `StepMonitor.check`; a step found healthy is then fed back through
`StepMonitor.accept`, so a bad step never pollutes the statistics that judge the next one (the
mistake that makes a NaN poison ZClip's reference EMA for good).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from .config import HealingConfig


@dataclass
class StepSignals:
    """What the Trainer already computed for one optimizer step; no extra pass is needed."""

    step: int
    loss: float
    grad_norm: float | None = None
    lrs: list[float] = field(default_factory=list)
    scheduled_lrs: list[float] | None = None
    """What the scheduler last set; a param-group LR far above it was changed behind its back."""
    exception: BaseException | None = None
    """An exception raised inside this step's forward/backward (healed in-loop when it can be)."""


@dataclass
class Detection:
    """One signal that fired, with the numbers behind it."""

    signal: str
    step: int
    evidence: dict[str, Any] = field(default_factory=dict)


class RunningWindow:
    """Bounded window of recent healthy values with O(1) mean and std."""

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self._sum = 0.0
        self._sumsq = 0.0

    def __len__(self) -> int:
        return len(self.values)

    def push(self, x: float) -> None:
        if len(self.values) == self.values.maxlen:
            old = self.values[0]
            self._sum -= old
            self._sumsq -= old * old
        self.values.append(x)
        self._sum += x
        self._sumsq += x * x

    @property
    def mean(self) -> float:
        return self._sum / len(self.values) if self.values else float("nan")

    @property
    def std(self) -> float:
        n = len(self.values)
        if n < 2:
            return 0.0
        var = (self._sumsq - self._sum * self._sum / n) / (n - 1)
        return math.sqrt(max(var, 0.0))

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self._sum = self._sumsq = 0.0
        for v in state.get("values", []):
            self.push(float(v))


def is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


class LossSpikeDetector:
    """Loss above `factor` × the running mean of healthy losses.

    The ratio test alone fires on losses that hover near zero (RL objectives), so a spike must also
    be `min_z` standard deviations above the mean, like llm-foundry's and OLMo's outlier tests.
    """

    def __init__(self, factor: float, window: int, min_history: int = 10, min_z: float = 4.0) -> None:
        self.factor = factor
        self.window = RunningWindow(window)
        self.min_history = min(min_history, window)
        self.min_z = min_z

    def ratio(self, loss: float) -> float | None:
        m = self.window.mean
        if len(self.window) < self.min_history or not (m > 0):
            return None
        return loss / m

    def check(self, loss: float) -> Detection | None:
        r = self.ratio(loss)
        if r is None or r <= self.factor:
            return None
        std = self.window.std
        z = (loss - self.window.mean) / std if std > 0 else math.inf
        if z < self.min_z:
            return None
        return Detection("loss_spike", -1, {"loss": loss, "running_mean": self.window.mean, "ratio": r,
                                             "factor": self.factor, "z_score": z})

    def accept(self, loss: float) -> None:
        self.window.push(loss)


class DivergenceDetector:
    """Smoothed loss rising for `patience` steps and `tolerance` above its best: slow divergence
    that no single step's spike test sees. The rise must also clear 3x the loss's own noise (an
    EMA of absolute deviations), or a loss near zero would "diverge" on every wiggle."""

    def __init__(self, patience: int, tolerance: float, alpha: float = 0.9, warmup: int = 10) -> None:
        self.patience = patience
        self.tolerance = tolerance
        self.alpha = alpha
        self.warmup = warmup
        self.reset()

    def reset(self) -> None:
        self.ema: float | None = None
        self.best = math.inf
        self.rising = 0
        self.seen = 0
        self.noise = 0.0

    def update(self, loss: float) -> Detection | None:
        prev = self.ema
        self.ema = loss if prev is None else self.alpha * prev + (1 - self.alpha) * loss
        if prev is not None and self.rising == 0:  # a trend in progress must not pass for noise
            self.noise = self.alpha * self.noise + (1 - self.alpha) * abs(loss - prev)
        self.seen += 1
        if self.seen <= self.warmup:
            self.best = min(self.best, self.ema)
            return None
        if prev is not None and self.ema > prev:
            self.rising += 1
        else:
            self.rising = 0
        self.best = min(self.best, self.ema)
        above = self.ema - self.best
        if self.rising >= self.patience and self.best > 0 and above > max(self.tolerance * self.best, 3 * self.noise):
            return Detection("divergence", -1, {"smoothed_loss": self.ema, "best_smoothed_loss": self.best,
                                                "rising_steps": self.rising, "patience": self.patience})
        return None

    def state_dict(self) -> dict:
        return {"ema": self.ema, "best": self.best, "rising": self.rising, "seen": self.seen, "noise": self.noise}

    def load_state_dict(self, s: dict) -> None:
        self.ema, self.best, self.rising, self.seen = s["ema"], s["best"], s["rising"], s["seen"]
        self.noise = s.get("noise", 0.0)


class GradNormDetector:
    """Pre-clip gradient norm above an absolute bound, or an outlier by z-score *and* ratio.

    Both tests on the z-score are needed: early in training the norm's spread is large and a ratio
    test alone fires; late the spread is tiny and a z-score alone fires on harmless wiggles.
    """

    def __init__(self, threshold: float | None, z_threshold: float, factor: float, window: int = 50,
                 min_history: int = 10) -> None:
        self.threshold = threshold
        self.z_threshold = z_threshold
        self.factor = factor
        self.window = RunningWindow(window)
        self.min_history = min_history

    def check(self, norm: float) -> Detection | None:
        if self.threshold is not None and norm > self.threshold:
            return Detection("gradient_explosion", -1, {"grad_norm": norm, "threshold": self.threshold})
        if len(self.window) < self.min_history:
            return None
        mean, std = self.window.mean, self.window.std
        if not mean > 0:
            return None
        z = (norm - mean) / std if std > 0 else math.inf
        if z > self.z_threshold and norm > self.factor * mean:
            return Detection("gradient_explosion", -1, {"grad_norm": norm, "running_mean": mean,
                                                        "z_score": z, "ratio": norm / mean})
        return None

    def accept(self, norm: float) -> None:
        self.window.push(norm)


def check_lr(lrs: Iterable[float], scheduled: Iterable[float] | None, factor: float) -> Detection | None:
    """An LR far above what the scheduler set: an edited param group, a bad resume, a bug."""
    lrs = list(lrs)
    if scheduled is None:
        return None
    for i, (lr, ref) in enumerate(zip(lrs, scheduled)):
        if not math.isfinite(lr) or (ref > 0 and lr > factor * ref):
            return Detection("lr_spike", -1, {"lr": lr, "scheduled_lr": ref, "param_group": i, "factor": factor})
    return None


@dataclass
class StateReport:
    """Integrity numbers of weights and optimizer state, from one fused norm pass."""

    weight_norm: float
    optimizer_norms: dict[str, float] = field(default_factory=dict)
    """Global norm of each optimizer state key (e.g. `exp_avg`, `exp_avg_sq`)."""
    beta2: float | None = None
    step: int = 0
    seconds: float = field(default=0.0, compare=False, repr=False)
    """Host time the pass took (what an extra check costs, for the snapshot interval)."""

    @property
    def weights_finite(self) -> bool:
        return math.isfinite(self.weight_norm)

    @property
    def optimizer_finite(self) -> bool:
        return all(math.isfinite(v) for v in self.optimizer_norms.values())


def compare_state(report: StateReport, reference: StateReport | None, growth_factor: float) -> Detection | None:
    """Judge a state against the last good one.

    Adam's second moment is an EMA with decay beta2, so elementwise v_t >= beta2**k * v_{t-k}: a
    norm that fell faster than that cannot come from training, it was reset or overwritten.
    """
    if not report.weights_finite:
        return Detection("weight_corruption", report.step, {"weight_norm": report.weight_norm, "finite": False})
    if not report.optimizer_finite:
        bad = {k: v for k, v in report.optimizer_norms.items() if not math.isfinite(v)}
        return Detection("optimizer_state_corruption", report.step, {"nonfinite_state": bad})
    if reference is None:
        return None
    v, v_ref = report.optimizer_norms.get("exp_avg_sq"), reference.optimizer_norms.get("exp_avg_sq")
    if v is not None and v_ref and v_ref > 0 and report.beta2 is not None:
        k = max(report.step - reference.step, 0)
        floor = 0.5 * report.beta2 ** k * v_ref
        if v < floor:
            return Detection("optimizer_state_corruption", report.step, {
                "exp_avg_sq_norm": v, "reference_exp_avg_sq_norm": v_ref, "steps_apart": k,
                "lowest_possible": report.beta2 ** k * v_ref})
    ref_w = reference.weight_norm
    if ref_w > 0 and report.weight_norm > growth_factor * ref_w:
        return Detection("weight_corruption", report.step, {"weight_norm": report.weight_norm,
                                                            "reference_weight_norm": ref_w,
                                                            "ratio": report.weight_norm / ref_w,
                                                            "factor": growth_factor})
    return None


class StepMonitor:
    """All per-step detectors behind one `check` / `accept` pair.

    `loss_signals=False` (for RL policy losses, which are not a quality measure and hover near zero)
    turns off the loss spike and divergence tests; the non-finite, gradient and LR tests remain.
    """

    def __init__(self, config: HealingConfig, loss_signals: bool = True, amp_scaler: bool = False) -> None:
        self.config = config
        self.loss_signals = loss_signals
        self.amp_scaler = amp_scaler
        self.spike = LossSpikeDetector(config.loss_spike_factor, config.loss_spike_window)
        self.divergence = DivergenceDetector(config.divergence_patience, config.divergence_tolerance)
        self.grad = GradNormDetector(config.grad_norm_threshold, config.grad_z_threshold, config.grad_spike_factor)
        self.last_spike_ratio: float | None = None

    def check(self, s: StepSignals) -> list[Detection]:
        """Signals that fired on this step, most severe first. Updates nothing."""
        out: list[Detection] = []
        if s.exception is not None:
            out.append(Detection("exception", s.step, {"exception_type": type(s.exception).__name__,
                                                       "message": str(s.exception)[:500]}))
            return out
        lr = check_lr(s.lrs, s.scheduled_lrs, self.config.lr_spike_factor)
        if not is_finite(s.loss):
            out.append(Detection("nonfinite_loss", s.step, {"loss": s.loss, "grad_norm": s.grad_norm}))
        elif s.grad_norm is not None and not is_finite(s.grad_norm):
            if not self.amp_scaler:  # under fp16 AMP an overflow is the scaler's job, not a failure
                out.append(Detection("nonfinite_gradient", s.step, {"loss": s.loss, "grad_norm": s.grad_norm}))
        if lr is not None:
            lr.step = s.step
            out.append(lr)
        if out:
            return out
        self.last_spike_ratio = self.spike.ratio(s.loss) if self.loss_signals else None
        if self.loss_signals:
            d = self.spike.check(s.loss)
            if d:
                d.step = s.step
                out.append(d)
        if s.grad_norm is not None:
            d = self.grad.check(s.grad_norm)
            if d:
                d.step = s.step
                out.append(d)
        return out

    def accept(self, s: StepSignals) -> Detection | None:
        """Feed a healthy step into the statistics; returns a divergence detection if the trend says so."""
        if s.grad_norm is not None and is_finite(s.grad_norm):
            self.grad.accept(s.grad_norm)
        if not self.loss_signals or not is_finite(s.loss):
            return None
        self.spike.accept(s.loss)
        d = self.divergence.update(s.loss)
        if d:
            d.step = s.step
        return d

    def reset_trend(self) -> None:
        """After a rollback or LR change the old trend no longer describes the run."""
        self.divergence.reset()

    def state_dict(self) -> dict:
        return {"spike": self.spike.window.state_dict(), "grad": self.grad.window.state_dict(),
                "divergence": self.divergence.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.spike.window.load_state_dict(s["spike"])
        self.grad.window.load_state_dict(s["grad"])
        self.divergence.load_state_dict(s["divergence"])
