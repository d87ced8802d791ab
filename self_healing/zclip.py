"""ZClip (arXiv:2504.02507): adaptive gradient clipping from an EMA of the gradient norm.

Same statistics and defaults as the reference implementation (alpha 0.97, z 2.5, warm-up 25
steps with plain clipping meanwhile, `zscore` mode with reciprocal "adaptive scaling", or
`percentile` mode), with what the reference lacks:

- a NaN/Inf norm never enters the EMA (in the reference one NaN turns the mean NaN for good, and an
  Inf norm scales every gradient by 0 -> NaN); such a step is the step detector's to skip;
- `state_dict()`/`load_state_dict()`, so warm-up is not redone after every resume and a rollback
  restores the statistics of the state it rolls back to;
- it takes the norm the Trainer already computed instead of a second pass over the gradients.

`observe()` is pure arithmetic on floats; `scale_gradients()` applies a coefficient in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch


@dataclass
class ZClipDecision:
    raw_norm: float
    clipped_norm: float
    z_score: float | None
    clipped: bool

    @property
    def coefficient(self) -> float:
        if not self.clipped or self.raw_norm <= 0:
            return 1.0
        return self.clipped_norm / (self.raw_norm + 1e-6)


class ZClip:
    """One `observe()` per optimizer step (gradient accumulation included: it sees the norm of the
    accumulated gradient, once), or the EMA would double count."""

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25,
                 mode: str = "zscore", clip_option: str = "adaptive_scaling", warmup_max_norm: float | None = 1.0,
                 max_grad_norm: float | None = None, eps: float = 1e-6) -> None:
        if mode not in ("zscore", "percentile"):
            raise ValueError(f"ZClip mode={mode!r} is not accepted: expected 'zscore' or 'percentile'")
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"ZClip clip_option={clip_option!r} is not accepted: expected 'adaptive_scaling' or 'mean'")
        if not 0 < alpha < 1:
            raise ValueError(f"ZClip alpha={alpha!r} is not accepted: expected a number in (0, 1)")
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.warmup_steps = warmup_steps
        self.mode = mode
        self.clip_option = clip_option
        self.warmup_max_norm = warmup_max_norm
        self.max_grad_norm = max_grad_norm
        self.eps = eps
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None
        self.total_clips = 0
        self.nonfinite_ignored = 0
        self.last: ZClipDecision | None = None

    @classmethod
    def from_config(cls, config: Any) -> "ZClip":
        return cls(alpha=config.zclip_alpha, z_thresh=config.zclip_z_threshold,
                   warmup_steps=config.zclip_warmup_steps, mode=config.zclip_mode)

    @property
    def initialized(self) -> bool:
        return self.mean is not None

    # ------------------------------------------------------------------------------------------
    def threshold_for(self, norm: float) -> tuple[float | None, float | None]:
        """(clip value or None, z-score) for a norm, from the current statistics."""
        if self.mean is None or self.var is None:
            return None, None
        std = math.sqrt(max(self.var, 0.0))
        z = (norm - self.mean) / (std + self.eps)
        if self.mode == "percentile":
            thr = self.mean + self.z_thresh * std
            return (thr if norm > thr else None), z
        if z > self.z_thresh:
            if self.clip_option == "mean":
                return self.mean, z
            eta = z / self.z_thresh  # reciprocal scaling: the larger the outlier, the harder the clip
            return self.mean + (self.z_thresh * std) / eta, z
        return None, z

    def observe(self, norm: float) -> ZClipDecision:
        """Decide the clip for this step and update the statistics with the effective norm."""
        if not math.isfinite(norm):
            self.nonfinite_ignored += 1
            self.last = ZClipDecision(norm, norm, None, False)
            return self.last
        if not self.initialized:
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.buffer = []
            cap = self.warmup_max_norm
            clipped = cap is not None and norm > cap
            self.last = ZClipDecision(norm, cap if clipped else norm, None, clipped)
            if clipped:
                self.total_clips += 1
            return self.last
        clip_val, z = self.threshold_for(norm)
        effective = clip_val if clip_val is not None else norm
        if self.max_grad_norm is not None:
            effective = min(effective, self.max_grad_norm)
        clipped = effective < norm
        # EMA update with the effective (clipped) value, as in the reference: a spike must not drag
        # the mean up and make the next spike look normal.
        ema_in = clip_val if clip_val is not None else norm
        self.mean = self.alpha * self.mean + (1 - self.alpha) * ema_in
        self.var = self.alpha * self.var + (1 - self.alpha) * (ema_in - self.mean) ** 2
        if clipped:
            self.total_clips += 1
        self.last = ZClipDecision(norm, effective, z, clipped)
        return self.last

    def tighten(self, factor: float) -> dict[str, Any]:
        before = self.z_thresh
        self.z_thresh = max(self.z_thresh * factor, 0.5)
        return {"zclip_z_threshold_before": before, "zclip_z_threshold_after": self.z_thresh}

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": list(self.buffer), "mean": self.mean, "var": self.var, "z_thresh": self.z_thresh,
                "total_clips": self.total_clips, "nonfinite_ignored": self.nonfinite_ignored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = [float(x) for x in state.get("buffer", [])]
        self.mean = state.get("mean")
        self.var = state.get("var")
        self.z_thresh = state.get("z_thresh", self.z_thresh)
        self.total_clips = state.get("total_clips", self.total_clips)
        self.nonfinite_ignored = state.get("nonfinite_ignored", self.nonfinite_ignored)

    def summary(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": math.sqrt(self.var) if self.var is not None else None,
                "z_threshold": self.z_thresh, "total_clips": self.total_clips,
                "nonfinite_ignored": self.nonfinite_ignored, "initialized": self.initialized}


def scale_gradients(parameters: Iterable[torch.nn.Parameter], coefficient: float) -> None:
    if coefficient >= 1.0:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coefficient)
