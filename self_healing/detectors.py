"""Failure detectors: pure code on numbers, one optimizer step at a time.

Nothing here knows about a Trainer. The callback hands each step's numbers (loss, pre-clip grad
norm, learning rates) to `StepMonitor.check`; a step found healthy is then fed back through
`StepMonitor.accept`, so a bad step never pollutes the statistics that judge the next one (the
mistake that makes a NaN poison ZClip's reference EMA for good).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from .config import HealingConfig


@dataclass(slots=True)
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
    It must also be `factor` x the largest recent healthy loss: with batch size 1 a squared-error loss
    is chi-square distributed and passes "5x the mean, 4 sigma" by chance every ~100 samples, while a
    healthy loss 5x the largest of the last 50 is vanishingly rare (for a smooth LLM loss the window's
    maximum is about its mean, so nothing changes there).
    And it must reach `floor_fraction` of the loss the run started from (the mean of its first
    `min_history` healthy losses): a loss that went from 1e-4 to 1e-2 after DPO drove it to ~0 is
    100x its mean and far outside its tiny spread, yet still a loss the model is done learning;
    skipping that batch would only change a healthy run.
    """

    def __init__(self, factor: float, window: int, min_history: int = 10, min_z: float = 4.0,
                 floor_fraction: float = 0.1) -> None:
        self.factor = factor
        self.window = RunningWindow(window)
        self.min_history = min(min_history, window)
        self.min_z = min_z
        self.floor_fraction = floor_fraction
        self._first: list[float] = []
        self.initial: float | None = None
        """Mean of the first `min_history` healthy losses (where the run started from)."""

    def ratio(self, loss: float) -> float | None:
        m = self.window.mean
        if len(self.window) < self.min_history or not (m > 0):
            return None
        return loss / m

    def check(self, loss: float, ratio: float | None = None) -> Detection | None:
        """`ratio`: `self.ratio(loss)`, when the caller has it already."""
        r = self.ratio(loss) if ratio is None else ratio
        if r is None or r <= self.factor:
            return None
        std = self.window.std
        z = (loss - self.window.mean) / std if std > 0 else math.inf
        if z < self.min_z:
            return None
        floor = self.floor_fraction * self.initial if self.initial is not None and self.initial > 0 else 0.0
        if loss <= floor:
            return None
        if loss <= self.factor * max(self.window.values):
            return None  # heavy-tailed losses (batch size 1: a squared error is chi-square) reach 5x the mean by chance
        return Detection("loss_spike", -1, {"loss": loss, "running_mean": self.window.mean, "ratio": r,
                                             "factor": self.factor, "z_score": z})

    def accept(self, loss: float) -> None:
        self.window.push(loss)
        if self.initial is None:
            self._first.append(loss)
            if len(self._first) >= self.min_history:
                self.initial = sum(self._first) / len(self._first)
                self._first = []

    def state_dict(self) -> dict:
        return {**self.window.state_dict(), "initial": self.initial, "first": list(self._first)}

    def load_state_dict(self, state: dict) -> None:
        self.window.load_state_dict(state)
        if "initial" in state or "first" in state:  # older snapshots held only the window
            self.initial = state.get("initial")
            self._first = [float(v) for v in state.get("first", [])]


class DivergenceDetector:
    """Smoothed loss rising for `patience` steps and `tolerance` above its best: slow divergence
    that no single step's spike test sees. The rise must also clear 3x the loss's own noise (an
    EMA of absolute deviations), or a loss near zero would "diverge" on every wiggle.

    A scheduled LR that jumps up (a warm restart: cosine-with-restarts goes from ~0 back to its
    peak in one step) makes the loss rise by design, for a while; such a jump (x`lr_jump` or more
    in one step) starts a new trend, as an LR cut does, with `patience` more warm-up steps than at
    the start: the trend is judged from where the loss went after the restart, not from the bump."""

    def __init__(self, patience: int, tolerance: float, alpha: float = 0.9, warmup: int = 10,
                 lr_jump: float = 2.0) -> None:
        self.patience = patience
        self.tolerance = tolerance
        self.alpha = alpha
        self.warmup = warmup
        self.lr_jump = lr_jump
        self.last_lr: float | None = None
        self.reset()

    def reset(self, extra_warmup: int = 0) -> None:
        self.ema: float | None = None
        self.best = math.inf
        self.rising = 0
        self.seen = 0
        self.noise = 0.0
        self.hold = self.warmup + extra_warmup
        """Steps after a (re)start that only set the baseline."""

    def observe_lr(self, lr: float | None) -> None:
        """The step's scheduled LR (largest param group); a jump up starts a new trend."""
        if lr is None or not math.isfinite(lr):
            return
        if self.last_lr is not None and self.last_lr >= 0 and lr > self.lr_jump * self.last_lr and lr > 0:
            self.reset(extra_warmup=self.patience)
        self.last_lr = lr

    def update(self, loss: float) -> Detection | None:
        prev = self.ema
        self.ema = loss if prev is None else self.alpha * prev + (1 - self.alpha) * loss
        if prev is not None and self.rising == 0:  # a trend in progress must not pass for noise
            self.noise = self.alpha * self.noise + (1 - self.alpha) * abs(loss - prev)
        self.seen += 1
        if self.seen <= self.hold:
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
        return {"ema": self.ema, "best": self.best, "rising": self.rising, "seen": self.seen, "noise": self.noise,
                "last_lr": self.last_lr, "hold": self.hold}

    def load_state_dict(self, s: dict) -> None:
        self.ema, self.best, self.rising, self.seen = s["ema"], s["best"], s["rising"], s["seen"]
        self.noise = s.get("noise", 0.0)
        self.last_lr = s.get("last_lr", self.last_lr)
        self.hold = s.get("hold", self.warmup)


YOUNG_WINDOW_MAX = 5.0
"""A gradient-norm window not yet full asks for a larger ratio: `factor` x (window size / norms seen),
at most this many times. The largest of a few heavy-tailed norms says little about their tail: at
batch size 1 a healthy norm 27x the largest of the first 11 was seen (a stacked x3 chain at lr 0.1,
which the Trainer's clipping bounds and the bare run shrugs off), while a real explosion is orders
of magnitude (the fault rehearsal's `grad_scale` is 1e8)."""


class GradNormDetector:
    """Pre-clip gradient norm above an absolute bound, or an outlier by z-score *and* ratio.

    Both tests on the z-score are needed: early in training the norm's spread is large and a ratio
    test alone fires; late the spread is tiny and a z-score alone fires on harmless wiggles.

    The ratio is taken against the largest healthy norm seen recently (the window's maximum, or a
    slowly decaying peak of all healthy norms, whichever is larger), not the mean: per-example
    gradient norms (batch size 1, mixed lengths) are heavy-tailed, and a healthy norm 10x the
    mean is not rare there, while one 10x the largest of the last 50 is. A zero norm (a GRPO/RLOO
    step whose groups all had the same reward: every advantage is 0) says nothing about the
    scale of a gradient and is not counted; otherwise the first step with a learning signal after
    a run of them would look like an explosion.
    """

    def __init__(self, threshold: float | None, z_threshold: float, factor: float, window: int = 50,
                 min_history: int = 10, peak_half_life: int = 500) -> None:
        self.threshold = threshold
        self.z_threshold = z_threshold
        self.factor = factor
        self.window = RunningWindow(window)
        self.min_history = min_history
        self.peak = 0.0
        self.peak_decay = 0.5 ** (1.0 / max(peak_half_life, 1))

    def reference(self) -> float:
        return max(max(self.window.values, default=0.0), self.peak)

    def check(self, norm: float) -> Detection | None:
        if self.threshold is not None and norm > self.threshold:
            return Detection("gradient_explosion", -1, {"grad_norm": norm, "threshold": self.threshold})
        if len(self.window) < self.min_history:
            return None
        mean, std = self.window.mean, self.window.std
        if not mean > 0:
            return None
        z = (norm - mean) / std if std > 0 else math.inf
        factor = self.factor * min(max(1.0, self.window.values.maxlen / len(self.window)), YOUNG_WINDOW_MAX)
        if z > self.z_threshold and norm > factor * mean:
            ref = self.reference()  # a pass over the window: only for a norm the cheap tests already flag
            if norm > factor * ref:
                return Detection("gradient_explosion", -1, {"grad_norm": norm, "running_mean": mean,
                                                            "recent_max": ref, "z_score": z, "ratio": norm / mean})
        return None

    def accept(self, norm: float) -> None:
        if not norm > 0:  # no learning signal this step (all advantages 0): no information on the scale
            return
        self.window.push(norm)
        self.peak = max(norm, self.peak * self.peak_decay)

    def state_dict(self) -> dict:
        return {**self.window.state_dict(), "peak": self.peak}

    def load_state_dict(self, state: dict) -> None:
        self.window.load_state_dict(state)
        self.peak = float(state.get("peak", max(self.window.values, default=0.0)))


def check_lr(lrs: Iterable[float], scheduled: Iterable[float] | None, factor: float) -> Detection | None:
    """An LR far above what the scheduler set: an edited param group, a bad resume, a bug."""
    lrs = list(lrs)
    if scheduled is None:
        return None
    for i, (lr, ref) in enumerate(zip(lrs, scheduled)):
        if not math.isfinite(lr) or (ref > 0 and lr > factor * ref):
            return Detection("lr_spike", -1, {"lr": lr, "scheduled_lr": ref, "param_group": i, "factor": factor})
    return None


REACH_KEY = "self_healing:update_reach"
GROWTH_KEY = "self_healing:update_log_growth"
EPOCH_KEY = "self_healing:update_epoch"
FIRST_LOSSES = 3
"""Where a run started is the median of its first this many healthy losses. One loss alone can be an
outlier at batch size 1 (a squared error of 0.096 where the typical one was ~8 made a healthy run's
climb back to its typical loss look like a blow-up); a mean of several lets an LR that blows up
within them raise the reference, the median of three does not."""
LOSS_KEY = "self_healing:smoothed_loss"
FIRST_LOSS_KEY = "self_healing:first_loss"
LOSS_SCATTER_KEY = "self_healing:loss_scatter"
"""Entries of `StateReport.optimizer_norms` that are not optimizer state: the process's update
odometers (`snapshot.UpdateReach`) and the run's smoothed and first healthy loss (from this
thread's `StepMonitor`) when the report was taken. They travel with the optimizer norms wherever
those go (the distributed gather in the callback sends every key with its reference)."""
PSEUDO_KEYS = (REACH_KEY, GROWTH_KEY, EPOCH_KEY, LOSS_KEY, FIRST_LOSS_KEY, LOSS_SCATTER_KEY)
LOSS_SCATTER_Z = 2.0
"""A loss-confirmed blow-up needs its loss rise, in log, above this many times the loss's own
step-to-step scatter (mean |change of log loss|): a batch-size-1 squared error scatters by ~2 in log
from one step to the next (chi-square), so its smoothed value tripling is noise, while a token-mean
loss scatters by a few hundredths until an LR blows it up (0.33 over the steps of the blow-up
itself, whose rise is 0.78 by the first check)."""

_MONITORS: "weakref.WeakValueDictionary[int, StepMonitor]" = weakref.WeakValueDictionary()
"""The newest `StepMonitor` of each thread (a run's callback, its steps and its state checks all
run in the training thread): `state_report` takes the loss side of the evidence from it."""


def current_losses() -> tuple[float | None, float | None, float | None]:
    """(smoothed loss, first healthy loss, log scatter) of this thread's newest StepMonitor, if any."""
    m = _MONITORS.get(threading.get_ident())
    if m is None or not m.loss_signals:
        return None, None, None
    return m.loss_ema, m.first_loss, m.loss_scatter


@dataclass
class StateReport:
    """Integrity numbers of weights and optimizer state, from one fused norm pass."""

    weight_norm: float
    optimizer_norms: dict[str, float] = field(default_factory=dict)
    """Global norm of each optimizer state key (e.g. `exp_avg`, `exp_avg_sq`), plus the update
    odometers under `REACH_KEY`/`GROWTH_KEY` when the optimizer's update rule is bounded."""
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

    @property
    def update_reach(self) -> float | None:
        """Odometer: the sum over the optimizer steps so far of how far each could move the weights."""
        return self.optimizer_norms.get(REACH_KEY)

    @property
    def update_log_growth(self) -> float:
        """Odometer: the sum of log(factor) by which updates could scale the weight norm (decay > 2/lr...)."""
        return self.optimizer_norms.get(GROWTH_KEY, 0.0)

    def state_norms(self) -> dict[str, float]:
        """The optimizer state norms alone (without the odometers and losses)."""
        return {k: v for k, v in self.optimizer_norms.items() if k not in PSEUDO_KEYS}


SECOND_MOMENT_KEYS = ("exp_avg_sq", "state2", "absmax2")
"""Adam second-moment state keys, in preference order: torch/optimi/GrokAdamW `exp_avg_sq`;
bitsandbytes `state2` (32-bit state) or, for 8-bit state (uint8 codes), `absmax2`, the per-block
maximum, which obeys the same decay bound (the maximum of an elementwise-decaying tensor decays
no faster)."""

_DECAY_MIN_FLOOR = 1e-12
"""Below this the norms of the second moment (squares of values ~1e-19 underflow float32) are not
trustworthy; the decay test is skipped."""


def adam_update_bound(beta1: float, beta2: float, t: int) -> float:
    """Largest |m_hat / sqrt(v_hat)| any element can have after `t` Adam steps (eps ignored, which
    only shrinks it): |m_t| <= (1-b1) sum_k b1^k |g_{t-k}| and v_t >= (1-b2) b2^k g_{t-k}^2 give
    (1-b1)/sqrt(1-b2) * sum_{k<t} (b1/sqrt(b2))^k, times the bias corrections sqrt(1-b2^t)/(1-b1^t).
    1 at t=1, ~32 for t->inf with (0.9, 0.999); infinite when the betas make it unbounded."""
    t = max(int(t), 1)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        return math.inf
    if beta2 == 0.0:
        return math.inf if beta1 > 0 else 1.0
    g = beta1 / math.sqrt(beta2)
    try:
        series = float(t) if abs(g - 1.0) < 1e-12 else (1.0 - g ** t) / (1.0 - g)
        out = (1.0 - beta1) / math.sqrt(1.0 - beta2) * series * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    except OverflowError:
        return math.inf
    return out if math.isfinite(out) else math.inf


def adamax_update_bound(beta1: float, beta2: float, t: int) -> float:
    """Adamax: |m_hat| / u with u = max(b2 u, |g|): (1-b1) sum_{k<t} (b1/b2)^k / (1-b1^t)."""
    t = max(int(t), 1)
    if not (0.0 <= beta1 < 1.0 and 0.0 < beta2 <= 1.0):
        return math.inf
    g = beta1 / beta2
    try:
        series = float(t) if abs(g - 1.0) < 1e-12 else (1.0 - g ** t) / (1.0 - g)
        out = (1.0 - beta1) * series / (1.0 - beta1 ** t)
    except OverflowError:
        return math.inf
    return out if math.isfinite(out) else math.inf


def compare_state(report: StateReport, reference: StateReport | None, growth_factor: float) -> Detection | None:
    """Judge a state against the last good one. Only evidence that training cannot produce counts.

    - Non-finite weights or optimizer state: always corruption.
    - Adam's second moment is an EMA with decay beta2, so elementwise v_t >= beta2**k * v_{t-k}: a
      norm that fell faster than that (with a 2x margin) was reset or overwritten.
    - Weights: by the triangle inequality | ||w|| - ||w_ref|| | <= ||w - w_ref||, and the optimizer
      steps since the reference can move the weights by at most the update odometer's difference
      (the LRs actually used x the update rule's bound: Adam's |m/sqrt(v)| is bounded, SGD's step
      is lr x the momentum buffer or the clipped gradient, plus weight decay). A weight norm that
      grew past that, by `growth_factor` x the reach as slack, was changed outside the optimizer.
      Weights that grow while a model learns (small or zero initial weights) stay within the reach;
      a ratio to the reference norm (the old test) rolled such healthy runs back. No odometer (an
      optimizer whose update is not bounded here) means no finite verdict: the loss must confirm it.
    """
    if not report.weights_finite:
        return Detection("weight_corruption", report.step, {"weight_norm": report.weight_norm, "finite": False})
    if not report.optimizer_finite:
        bad = {k: v for k, v in report.optimizer_norms.items() if not math.isfinite(v)}
        return Detection("optimizer_state_corruption", report.step, {"nonfinite_state": bad})
    if reference is None:
        return None
    k = max(report.step - reference.step, 0)
    for key in SECOND_MOMENT_KEYS:
        v, v_ref = report.optimizer_norms.get(key), reference.optimizer_norms.get(key)
        if v is None or v_ref is None:
            continue
        if v_ref > 0 and report.beta2 is not None:
            lowest = report.beta2 ** k * v_ref
            floor = 0.5 * lowest
            if floor > _DECAY_MIN_FLOOR and v < floor:
                return Detection("optimizer_state_corruption", report.step, {
                    "exp_avg_sq_norm": v, "reference_exp_avg_sq_norm": v_ref, "steps_apart": k,
                    "lowest_possible": lowest, "state_key": key})
        break
    outside = _beyond_update_reach(report, reference, growth_factor, k)
    return outside if outside is not None else _loss_confirmed_blowup(report, reference, growth_factor)


def _beyond_update_reach(report: StateReport, reference: StateReport, growth_factor: float,
                         k: int) -> Detection | None:
    reach, ref_reach = report.update_reach, reference.update_reach
    if reach is None or ref_reach is None:
        return None
    if report.optimizer_norms.get(EPOCH_KEY) != reference.optimizer_norms.get(EPOCH_KEY):
        return None  # odometers of two different optimizers: nothing to conclude
    moved = reach - ref_reach
    log_growth = report.update_log_growth - reference.update_log_growth
    if not (math.isfinite(moved) and moved >= 0 and math.isfinite(log_growth) and log_growth >= 0):
        return None  # odometers of another process or optimizer, or reset: nothing to conclude
    ref_w, w = reference.weight_norm, report.weight_norm
    try:
        limit = math.exp(log_growth) * (ref_w + moved)  # the largest norm the updates could reach
    except OverflowError:
        return None
    allowed = ref_w + growth_factor * (limit - ref_w) + 1e-3 * ref_w + 1e-12
    if w > allowed:
        return Detection("weight_corruption", report.step, {
            "weight_norm": w, "reference_weight_norm": ref_w, "steps_apart": k,
            "ratio": w / ref_w if ref_w > 0 else math.inf, "update_reach": limit - ref_w,
            "growth": w - ref_w, "factor": growth_factor})
    return None


def _loss_confirmed_blowup(report: StateReport, reference: StateReport, growth_factor: float,
                           loss_margin: float = 0.25) -> Detection | None:
    """The optimizer itself wrecking the model (an LR far too high): the weight norm grew more than
    `growth_factor` x since the last good check *and* the loss confirms the damage, its smoothed
    value now `loss_margin` above what it was then (or, before any loss was smoothed, above the
    first one). Weights that grow while the model learns (small initial weights) come with a
    falling loss and never qualify; no loss known (RL policy losses) means no verdict."""
    ref_w, w = reference.weight_norm, report.weight_norm
    loss = report.optimizer_norms.get(LOSS_KEY)
    start = report.optimizer_norms.get(FIRST_LOSS_KEY)
    then = reference.optimizer_norms.get(LOSS_KEY)
    before = then if then is not None else start
    if loss is None or before is None or not (ref_w > 0 and before > 0):
        return None
    scatter = report.optimizer_norms.get(LOSS_SCATTER_KEY)
    if scatter is not None and loss > 0 and math.log(loss / before) <= LOSS_SCATTER_Z * scatter:
        return None  # a rise the loss's own scatter explains
    if w > growth_factor * ref_w and loss > (1 + loss_margin) * before:
        return Detection("weight_corruption", report.step, {
            "weight_norm": w, "reference_weight_norm": ref_w, "ratio": w / ref_w, "factor": growth_factor,
            "steps_apart": max(report.step - reference.step, 0), "smoothed_loss": loss, "reference_loss": before,
            "loss_scatter": scatter, "loss_confirmed": True})
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
        self.loss_ema: float | None = None
        """EMA (0.7) of the healthy losses: the loss side of `compare_state`'s evidence."""
        self._first_losses: list[float] = []
        """The run's first `FIRST_LOSSES` healthy losses: `first_loss` is their (lower) median."""
        self._scatter = (0.0, 0, None)
        """(EMA 0.9 of |change of log loss|, changes seen, last log loss): see `loss_scatter`."""
        _MONITORS[threading.get_ident()] = self

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
            d = self.spike.check(s.loss, self.last_spike_ratio)
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
        self.loss_ema = s.loss if self.loss_ema is None else 0.7 * self.loss_ema + 0.3 * s.loss
        if s.loss > 0:
            m, n, last = self._scatter
            cur = math.log(s.loss)
            self._scatter = (m, n, cur) if last is None else (0.9 * m + 0.1 * abs(cur - last), n + 1, cur)
        if len(self._first_losses) < FIRST_LOSSES:  # where the run started: the median of its first losses
            self._first_losses.append(s.loss)
        lrs = s.scheduled_lrs if s.scheduled_lrs else s.lrs
        finite = [float(x) for x in lrs if is_finite(float(x))] if lrs else []
        self.divergence.observe_lr(max(finite) if finite else None)
        d = self.divergence.update(s.loss)
        if d:
            d.step = s.step
        return d

    @property
    def first_loss(self) -> float | None:
        """Where the run started: the lower median of its first healthy losses (a mean was tried: a
        run blown up by its LR climbs within them, and its second blow-up after the rollback went
        unseen); None before the first."""
        xs = sorted(self._first_losses)
        return xs[(len(xs) - 1) // 2] if xs else None

    @property
    def loss_scatter(self) -> float | None:
        """The healthy loss's step-to-step scatter in log (bias-corrected EMA); None before two losses."""
        m, n, _ = self._scatter
        return m / (1.0 - 0.9 ** n) if n else None

    def reset_trend(self) -> None:
        """After a rollback or LR change the old trend no longer describes the run."""
        self.divergence.reset()

    def state_dict(self) -> dict:
        return {"spike": self.spike.state_dict(), "grad": self.grad.state_dict(),
                "divergence": self.divergence.state_dict(), "loss_ema": self.loss_ema,
                "first_losses": list(self._first_losses), "loss_scatter": list(self._scatter)}

    def load_state_dict(self, s: dict) -> None:
        self.spike.load_state_dict(s["spike"])
        self.grad.load_state_dict(s["grad"])
        self.divergence.load_state_dict(s["divergence"])
        self.loss_ema = s.get("loss_ema", self.loss_ema)
        saved = list(s.get("first_losses", ()))
        if len(saved) >= len(self._first_losses):  # a rollback to the start keeps the run's known start
            self._first_losses = saved
        if "loss_scatter" in s:
            self._scatter = tuple(s["loss_scatter"])
