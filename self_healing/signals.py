"""Early-warning estimators: pure code on numbers and tensors, no Trainer.

Each estimator answers one question about a run that has not failed yet:

==========================  =====================================================================
`GrowthRate`                how fast does a positive quantity (grad norm, update norm, loss) grow
                            per step? EMA of log ratios of successive values; `forecast_steps`
                            says when it would cross a limit at that rate
`dominant_period`           is the recent loss / grad-norm window oscillating? FFT power spectrum
                            of the detrended, Hann-windowed window: the strongest period and its
                            share of the non-DC power
`Calibrator`                what score is abnormal for *this* run? A sliding window of scores from
                            steps confirmed healthy; the threshold for a target false-alarm rate
                            alpha is the split-conformal quantile (the ceil((n+1)(1-alpha))-th
                            smallest score) when the window holds enough scores, else a
                            peaks-over-threshold exponential tail fitted to its top scores
`hutchinson_trace`          trace of the Hessian from Hessian-vector products (Rademacher probes)
`power_iteration`           the Hessian's largest-magnitude eigenvalue, from the same products
`sam_sharpness`             SAM's sharpness: L(w + rho g/|g|) - L(w)
`FisherEMA`                 an EMA of squared gradients (diagonal empirical Fisher), and what it is
                            used for: `fisher_interpolate` (importance-weighted rollback) and
                            `add_ewc_gradient` (an EWC pull towards a recovery point)
==========================  =====================================================================

`self_healing.early_warning` wires them into a run; docs/early-warning.md says
which are on by default, what each costs and what the benchmark measured.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from . import compat

# ------------------------------------------------------------------------------------------------
# growth
# ------------------------------------------------------------------------------------------------


class GrowthRate:
    """Online per-step exponential growth rate of a positive series.

    `rate` is the EMA (decay `beta`) of ln(x_t / x_{t-1}): for x_t = x_0 e^{r t} it is exactly r
    from the second value on; a series that doubles every d steps reads ln 2 / d. Non-finite or
    non-positive values are ignored (and break the chain: the next ratio starts afresh), so a NaN
    step never poisons the estimate."""

    def __init__(self, beta: float = 0.8) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta={beta!r}: expected 0 <= beta < 1")
        self.beta = beta
        self.reset()

    def reset(self) -> None:
        self.last: float | None = None
        self.rate: float | None = None
        self.count = 0
        """How many log ratios the rate has seen since the last reset."""

    def update(self, x: float | None) -> float | None:
        if x is None or not math.isfinite(x) or x <= 0:
            self.last = None
            return self.rate
        if self.last is not None:
            r = math.log(x / self.last)
            self.rate = r if self.rate is None else self.beta * self.rate + (1 - self.beta) * r
            self.count += 1
        self.last = x
        return self.rate

    @property
    def doubling_steps(self) -> float:
        """Steps for the series to double at the current rate (inf when not growing)."""
        return math.log(2) / self.rate if self.rate and self.rate > 0 else math.inf

    def forecast_steps(self, limit: float) -> float:
        """Steps until the series reaches `limit` at the current rate: 0 if already there, inf if
        it is not growing."""
        if self.last is None or self.rate is None:
            return math.inf
        if self.last >= limit:
            return 0.0
        if self.rate <= 0:
            return math.inf
        return math.log(limit / self.last) / self.rate

    def state_dict(self) -> dict:
        return {"last": self.last, "rate": self.rate, "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        self.last, self.rate, self.count = s["last"], s["rate"], s["count"]


# ------------------------------------------------------------------------------------------------
# oscillation
# ------------------------------------------------------------------------------------------------


@dataclass
class Spectrum:
    period: float
    """Steps per cycle of the strongest non-DC frequency (n / k)."""
    power_fraction: float
    """Its share of the non-DC power, in [0, 1]: ~1 for a pure sine, ~2/n on average for white noise."""
    frequency_index: int


def dominant_period(values: Sequence[float], detrend: bool = True, min_cycles: int = 1) -> Spectrum | None:
    """The strongest periodic component of a window of values.

    The window's linear trend is removed first (a loss falling steadily is not an oscillation),
    then a Hann taper limits leakage between frequencies. Only periods that fit at least
    `min_cycles` times in the window compete (a slow wiggle is a trend, not an oscillation).
    None when the window is too short (< 8), not finite, or flat."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n < 8 or not np.isfinite(x).all():
        return None
    t = np.arange(n, dtype=np.float64)
    scale = max(float(np.abs(x).max()), 1e-300)
    if detrend:
        slope, intercept = np.polyfit(t, x, 1)
        x = x - (slope * t + intercept)
    else:
        x = x - x.mean()
    if float(np.abs(x).max()) <= 1e-9 * scale:  # flat (up to rounding): no spectrum to speak of
        return None
    x = x * np.hanning(n)
    power = np.abs(np.fft.rfft(x)) ** 2
    power[0] = 0.0
    total = float(power[1:].sum())
    if not total > 0:
        return None
    first = max(int(min_cycles), 1)
    if first >= power.size:
        return None
    k = int(np.argmax(power[first:])) + first
    # a Hann window spreads a pure tone over its bin and the two neighbours: count them together
    lo, hi = max(k - 1, 1), min(k + 1, power.size - 1)
    return Spectrum(period=n / k, power_fraction=float(power[lo:hi + 1].sum()) / total, frequency_index=k)


# ------------------------------------------------------------------------------------------------
# calibrated thresholds
# ------------------------------------------------------------------------------------------------


class Calibrator:
    """Thresholds for a target false-alarm rate, learnt from a run's own healthy scores.

    `add(score)` puts a score from a step known to be healthy into a sliding window of `window`
    scores. `threshold(alpha)` is the score that a new healthy score exceeds with probability at
    most `alpha`:

    - split conformal (exchangeable scores): the k-th smallest of the n scores with
      k = ceil((n + 1)(1 - alpha)), when k <= n, i.e. n >= 1/alpha - 1;
    - otherwise (a 1-in-10,000 rate from a few hundred scores) the peaks-over-threshold
      extrapolation of extreme-value theory (SPOT, Siffer et al., KDD 2017) with an exponential
      tail: u = the (1 - `tail_fraction`) quantile, sigma = the mean excess over u, threshold =
      u + sigma ln(p_u / alpha), p_u the share of scores above u;
    - None below `min_samples` scores (still calibrating: nothing fires).

    Training is not stationary (the loss falls fast, then slowly; its noise shrinks), so with
    `standardize=K` each score is first expressed as z = (score - median) / (1.4826 MAD) of the K
    healthy scores admitted before it, and the quantile above is taken over these z's; the
    threshold returned is back in score units, median + MAD-scale x z-quantile, with the current
    median and scale. A drift of the healthy level or spread then moves the threshold with it.

    `test(score, alpha)` also counts, per alpha, how often a score already judged was above the
    threshold in force, so `coverage()` reports the empirical false-alarm rate next to the target.
    Scores of consecutive steps are correlated (they are smoothed), so the guarantee is on the
    long-run fraction of steps, not on each one independently: the empirical rate is the check."""

    def __init__(self, window: int = 1000, min_samples: int = 30, tail_fraction: float = 0.1,
                 standardize: int = 0) -> None:
        self.window = window
        self.min_samples = min_samples
        self.tail_fraction = tail_fraction
        self.standardize = standardize
        self._recent: deque[float] = deque(maxlen=standardize or 1)
        self._fifo: deque[float] = deque()
        self._sorted: list[float] = []
        self.tested: dict[float, int] = {}
        self.exceeded: dict[float, int] = {}

    def __len__(self) -> int:
        return len(self._fifo)

    def _location_scale(self) -> tuple[float, float] | None:
        """(median, 1.4826 MAD) of the last `standardize` admitted scores; None while < 10."""
        if not self.standardize:
            return 0.0, 1.0
        if len(self._recent) < min(10, self.standardize):
            return None
        xs = sorted(self._recent)
        med = xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])
        dev = sorted(abs(x - med) for x in xs)
        mad = dev[len(dev) // 2] if len(dev) % 2 else 0.5 * (dev[len(dev) // 2 - 1] + dev[len(dev) // 2])
        return med, max(1.4826 * mad, 1e-12 + 1e-9 * abs(med))

    def add(self, score: float) -> None:
        if score is None or not math.isfinite(score):
            return
        ls = self._location_scale()
        if self.standardize:
            self._recent.append(score)
        if ls is None:
            return
        z = (score - ls[0]) / ls[1]
        if len(self._fifo) >= self.window:
            old = self._fifo.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._fifo.append(z)
        bisect.insort(self._sorted, z)

    def _z_threshold(self, alpha: float) -> tuple[float | None, str]:
        n = len(self._sorted)
        if n < self.min_samples:
            return None, "calibrating"
        k = math.ceil((n + 1) * (1 - alpha))
        if k <= n:
            return self._sorted[k - 1], "conformal"
        m = max(int(round(n * self.tail_fraction)), 3)  # scores in the tail
        u = self._sorted[n - m - 1]
        excess = [x - u for x in self._sorted[n - m:]]
        sigma = sum(excess) / len(excess)
        p_u = m / n
        if not sigma > 0:  # a flat tail: anything above the largest healthy score is new
            return self._sorted[-1], "evt"
        return u + sigma * math.log(p_u / alpha), "evt"

    def threshold(self, alpha: float) -> tuple[float | None, str]:
        """(threshold in score units, method) with method "conformal", "evt" or "calibrating"."""
        z, method = self._z_threshold(alpha)
        if z is None:
            return None, method
        ls = self._location_scale()
        if ls is None:
            return None, "calibrating"
        return ls[0] + ls[1] * z, method

    def p_value(self, score: float) -> float:
        """Conformal p-value: the share of calibration scores at least as large (with the +1s)."""
        ls = self._location_scale() or (0.0, 1.0)
        z = (score - ls[0]) / ls[1]
        n = len(self._sorted)
        ge = n - bisect.bisect_left(self._sorted, z)
        return (ge + 1) / (n + 1)

    def test(self, score: float, alpha: float) -> tuple[bool, float | None, str]:
        """Is `score` above the threshold for `alpha`? Counts the answer for `coverage()`."""
        thr, method = self.threshold(alpha)
        if thr is None or score is None or not math.isfinite(score):
            return False, thr, method
        above = score > thr
        self.tested[alpha] = self.tested.get(alpha, 0) + 1
        self.exceeded[alpha] = self.exceeded.get(alpha, 0) + int(above)
        return above, thr, method

    def coverage(self) -> dict[str, dict[str, float]]:
        """Per target alpha: steps judged, steps above threshold, empirical rate."""
        out = {}
        for a, n in self.tested.items():
            e = self.exceeded.get(a, 0)
            out[f"{a:g}"] = {"target_rate": a, "steps_judged": n, "above_threshold": e,
                             "empirical_rate": e / n if n else float("nan")}
        return out

    def state_dict(self) -> dict:
        return {"recent": list(self._recent), "z": list(self._fifo)}

    def load_state_dict(self, s: dict) -> None:
        self._recent.clear()
        self._recent.extend(float(v) for v in s.get("recent", []))
        self._fifo = deque(float(v) for v in s.get("z", []))
        self._sorted = sorted(self._fifo)


# ------------------------------------------------------------------------------------------------
# curvature
# ------------------------------------------------------------------------------------------------

Tensors = list  # list[torch.Tensor]
HVP = Callable[[Tensors], Tensors]


def _rademacher(like: Iterable[torch.Tensor], generator: torch.Generator | None) -> Tensors:
    out = []
    for t in like:
        r = torch.randint(0, 2, t.shape, generator=generator, dtype=torch.int8, device="cpu")
        out.append((r.to(torch.float32) * 2 - 1).to(device=t.device, dtype=t.dtype))
    return out


def _dot(a: Tensors, b: Tensors) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def hutchinson_trace(hvp: HVP, like: Sequence[torch.Tensor], samples: int = 8,
                     generator: torch.Generator | None = None) -> tuple[float, float]:
    """Hutchinson's estimator of tr(H): the mean of v^T H v over Rademacher vectors v.
    Returns (estimate, standard error). Costs `samples` Hessian-vector products."""
    ests = []
    for _ in range(samples):
        v = _rademacher(like, generator)
        ests.append(_dot(v, hvp(v)))
    mean = sum(ests) / len(ests)
    se = (sum((e - mean) ** 2 for e in ests) / (len(ests) - 1) / len(ests)) ** 0.5 if len(ests) > 1 else float("nan")
    return mean, se


def power_iteration(hvp: HVP, like: Sequence[torch.Tensor], iters: int = 20, tol: float = 1e-3,
                    generator: torch.Generator | None = None) -> float:
    """The Hessian's eigenvalue of largest magnitude (signed), by power iteration on H v.
    Costs up to `iters` Hessian-vector products; stops when the Rayleigh quotient moves < tol."""
    v = [t.float() for t in _rademacher(like, generator)]
    norm = math.sqrt(_dot(v, v))
    v = [t / norm for t in v]
    eig = 0.0
    for i in range(iters):
        hv = [h.float() for h in hvp([t.to(dtype=x.dtype) for t, x in zip(v, like)])]
        new = _dot(v, hv)
        norm = math.sqrt(_dot(hv, hv))
        if not norm > 0 or not math.isfinite(norm):
            return new
        v = [h / norm for h in hv]
        if i > 0 and abs(new - eig) <= tol * max(abs(new), 1e-12):
            return new
        eig = new
    return eig


def autograd_hvp(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> HVP:
    """Exact Hessian-vector products by double backward through `loss_fn()` (one forward per
    call, two backwards per product). Never touches `.grad`."""
    params = list(params)

    def hvp(v: Tensors) -> Tensors:
        with torch.enable_grad():
            loss = loss_fn()
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * x).sum() for g, x in zip(grads, v))
            return [h.detach() for h in torch.autograd.grad(dot, params)]

    return hvp


def finite_difference_hvp(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                          eps: float = 1e-3) -> HVP:
    """H v ≈ (g(w + e v) - g(w - e v)) / 2e with e = eps·|w|/|v|: first-order backwards only, so it
    works with attention kernels that have no double backward. Weights are restored exactly."""
    params = list(params)

    def grad_at() -> Tensors:
        with torch.enable_grad():
            return [g.detach() for g in torch.autograd.grad(loss_fn(), params)]

    def hvp(v: Tensors) -> Tensors:
        wn = math.sqrt(_dot(params, params))
        vn = math.sqrt(_dot(v, v))
        e = eps * max(wn, 1.0) / max(vn, 1e-12)
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                compat.foreach_add_(params, v, alpha=e)
            gp = grad_at()
            with torch.no_grad():
                compat.foreach_add_(params, v, alpha=-2 * e)
            gm = grad_at()
        finally:
            with torch.no_grad():
                compat.foreach_copy_(params, saved)
        return [(a - b) / (2 * e) for a, b in zip(gp, gm)]

    return hvp


def sam_sharpness(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], rho: float = 0.05,
                  grads: Sequence[torch.Tensor] | None = None) -> tuple[float, float]:
    """SAM's sharpness (Foret et al., arXiv:2010.01412): L(w + rho g/|g|) - L(w), the loss rise one
    ascent step of radius rho away. Returns (sharpness, L(w)). Weights are restored exactly."""
    params = list(params)
    with torch.no_grad():
        base = float(loss_fn())
    if grads is None:
        with torch.enable_grad():
            grads = [g.detach() for g in torch.autograd.grad(loss_fn(), params)]
    gn = math.sqrt(_dot(grads, grads))
    if not gn > 0 or not math.isfinite(gn):
        return 0.0, base
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            compat.foreach_add_(params, list(grads), alpha=rho / gn)
            up = float(loss_fn())
    finally:
        with torch.no_grad():
            compat.foreach_copy_(params, saved)
    return up - base, base


# ------------------------------------------------------------------------------------------------
# importance
# ------------------------------------------------------------------------------------------------


class FisherEMA:
    """Diagonal empirical Fisher: an EMA (decay `beta`) of squared gradients, one tensor per
    parameter, kept in the parameters' dtype on their device (one extra copy of the weights)."""

    def __init__(self, beta: float = 0.95) -> None:
        self.beta = beta
        self.fisher: Tensors | None = None
        self.updates = 0

    def update(self, grads: Sequence[torch.Tensor | None]) -> None:
        gs = [g if g is not None else None for g in grads]
        if self.fisher is None:
            self.fisher = [torch.zeros_like(g) if g is not None else None for g in gs]
        live = [(f, g) for f, g in zip(self.fisher, gs) if f is not None and g is not None]
        if not live:
            return
        fs, gl = [f for f, _ in live], [g.detach() for _, g in live]
        with torch.no_grad():
            compat.foreach_mul_(fs, self.beta)
            compat.foreach_addcmul_(fs, gl, gl, value=1 - self.beta)
        self.updates += 1

    def importance(self, normalize: str = "max") -> Tensors | None:
        """Fisher values scaled to [0, 1]: by their global maximum (`"max"`), or by their global
        mean and clipped at 1 (`"mean"`: every weight at least as important as the average counts
        fully, the others in proportion)."""
        if self.fisher is None:
            return None
        live = [f for f in self.fisher if f is not None and f.numel()]
        if normalize == "mean":
            total = sum(float(f.double().sum()) for f in live)
            count = sum(f.numel() for f in live)
            ref = total / count if count else 0.0
        else:
            ref = max((float(f.max()) for f in live), default=0.0)
        if not ref > 0 or not math.isfinite(ref):
            return None
        return [(f / ref).clamp_(max=1.0) if f is not None else None for f in self.fisher]


def fisher_interpolate(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor],
                       importance: Sequence[torch.Tensor | None]) -> None:
    """In place: w <- anchor + (1 - imp) (w - anchor). Where the Fisher says a weight matters
    (imp ~ 1) it goes back to the checkpoint; where it does not (imp ~ 0) the recent progress is
    kept. imp = 1 everywhere is a plain rollback, 0 everywhere no rollback."""
    with torch.no_grad():
        for p, a, imp in zip(params, anchor, importance):
            if imp is None:
                p.copy_(a.to(p.device, p.dtype))
                continue
            a = a.to(p.device, p.dtype)
            p.sub_(a).mul_(1 - imp).add_(a)


def add_ewc_gradient(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor],
                     fisher: Sequence[torch.Tensor | None], lam: float) -> float:
    """Add the gradient of EWC's penalty (lam/2) sum F (w - anchor)^2 (Kirkpatrick et al.,
    arXiv:1612.00796) to each `.grad`; returns the penalty's value."""
    penalty = 0.0
    with torch.no_grad():
        for p, a, f in zip(params, anchor, fisher):
            if f is None or p.grad is None:
                continue
            d = p.detach() - a.to(p.device, p.dtype)
            p.grad.add_(f * d, alpha=lam)
            penalty += 0.5 * lam * float((f * d * d).sum())
    return penalty


__all__ = ["GrowthRate", "Spectrum", "dominant_period", "Calibrator", "hutchinson_trace", "power_iteration",
           "autograd_hvp", "finite_difference_hvp", "sam_sharpness", "FisherEMA", "fisher_interpolate",
           "add_ewc_gradient"]
