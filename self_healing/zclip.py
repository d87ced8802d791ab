"""ZClip (arXiv:2504.02507): adaptive gradient clipping from an EMA of the gradient norm.

Same statistics and defaults as the reference implementation (bluorion-com/ZClip: alpha 0.97,
z 2.5, warm-up 25 steps with plain clipping meanwhile, `zscore` mode with reciprocal "adaptive
scaling" or clip-to-`mean`, `percentile` mode at mean + z·std, EMA fed the *clipped* value), with
what the reference lacks:

- a NaN/Inf norm never enters the statistics (in the reference one NaN turns the EMA NaN for good,
  and an Inf norm scales every gradient by 0 -> NaN); such a step is the step detector's to skip;
- `state_dict()`/`load_state_dict()`: the statistics are saved with the Trainer's checkpoints
  (`save_to_trainer_state`) and in every in-memory snapshot, so a resume does not redo warm-up
  and a rollback restores the statistics of the state it rolls back to;
- it takes the norm the Trainer already computed (one `observe(norm)` per optimizer step, on the
  accumulated and, under fp16 AMP, already unscaled gradient) instead of a second pass.

What it cannot do: bound the *first* update of an LR spike. That update's gradient is normal, so
no gradient clipper sees anything, and under Adam the update size is ~LR per weight whatever the
gradient's scale. LR spikes are the `lr_spike` detector's job (docs/healing.md, "ZClip").

`observe()` is pure arithmetic on floats; `scale_gradients()` applies a coefficient in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from . import compat
from .distributed import local_tensor

TRAINER_STATE_KEY = "SelfHealingZClip"
"""Key under `TrainerState.stateful_callbacks`: the Trainer writes that dict into every
checkpoint's `trainer_state.json` and reads it back on `resume_from_checkpoint`."""


@dataclass
class ZClipDecision:
    """One step's outcome. `z_score` is None during warm-up and for a non-finite norm."""

    raw_norm: float
    clipped_norm: float
    z_score: float | None
    clipped: bool
    threshold: float | None = None
    """The adaptive clip value this step computed (None when the norm was not an outlier)."""

    @property
    def coefficient(self) -> float:
        """What the gradients are multiplied by (1.0 when not clipped). Same formula as the
        reference's `apply_in_place_clipping`."""
        if not self.clipped or not math.isfinite(self.raw_norm) or self.raw_norm <= 0:
            return 1.0
        if not self.adaptive:  # the warm-up's fixed cap: torch's clip_grad_norm_ bit for bit (float32 math)
            norm = torch.tensor(self.raw_norm, dtype=torch.float32)
            return float(torch.clamp(torch.reciprocal(norm + 1e-6) * self.clipped_norm, max=1.0))
        return self.clipped_norm / (self.raw_norm + 1e-6)

    @property
    def adaptive(self) -> bool:
        """Clipped by ZClip's own threshold (after warm-up), not the warm-up's fixed cap."""
        return self.clipped and self.z_score is not None


class ZClip:
    """One `observe()` per optimizer step (gradient accumulation included: it sees the norm of the
    accumulated gradient, once), or the EMA would double count.

    `warmup_max_norm` is the fixed clip during warm-up (the reference's `max_grad_norm`; the plugin
    passes the Trainer's `max_grad_norm`); `max_grad_norm` is an optional hard cap after warm-up.
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25,
                 mode: str = "zscore", clip_option: str = "adaptive_scaling", warmup_max_norm: float | None = 1.0,
                 max_grad_norm: float | None = None, eps: float = 1e-6, clip_factor: float = 1.0) -> None:
        if mode not in ("zscore", "percentile"):
            raise ValueError(f"ZClip mode={mode!r} is not accepted: expected 'zscore' or 'percentile'")
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"ZClip clip_option={clip_option!r} is not accepted: expected 'adaptive_scaling' or 'mean'")
        if not 0 < alpha < 1:
            raise ValueError(f"ZClip alpha={alpha!r} is not accepted: expected a number in (0, 1)")
        if not (z_thresh > 0 and math.isfinite(z_thresh)):
            raise ValueError(f"ZClip z_thresh={z_thresh!r} is not accepted: expected a finite number > 0")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"ZClip warmup_steps={warmup_steps!r} is not accepted: expected an integer >= 0")
        if not 0 < clip_factor <= 1e6:
            raise ValueError(f"ZClip clip_factor={clip_factor!r} is not accepted: expected a number > 0")
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.warmup_steps = warmup_steps
        self.mode = mode
        self.clip_option = clip_option
        self.warmup_max_norm = warmup_max_norm
        self.max_grad_norm = max_grad_norm
        self.eps = eps
        self.clip_factor = clip_factor
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None
        self.steps = 0
        self.total_clips = 0
        self.nonfinite_ignored = 0
        self.last: ZClipDecision | None = None

    @classmethod
    def from_config(cls, config: Any) -> "ZClip":
        return cls(alpha=config.zclip_alpha, z_thresh=config.zclip_z_threshold,
                   warmup_steps=config.zclip_warmup_steps, mode=config.zclip_mode,
                   clip_option=getattr(config, "zclip_clip_option", "adaptive_scaling"))

    @property
    def initialized(self) -> bool:
        return self.mean is not None

    @property
    def std(self) -> float | None:
        return math.sqrt(max(self.var, 0.0)) if self.var is not None else None

    # ------------------------------------------------------------------------------------------
    def threshold_for(self, norm: float) -> tuple[float | None, float | None]:
        """(clip value or None, z-score) for a norm, from the current statistics (no update)."""
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
            return (self.mean + (self.z_thresh * std) / eta) * self.clip_factor, z
        return None, z

    def observe(self, norm: float) -> ZClipDecision:
        """Decide the clip for this step and update the statistics with the effective norm."""
        norm = float(norm)
        if not math.isfinite(norm):
            self.nonfinite_ignored += 1
            self.last = ZClipDecision(norm, norm, None, False)
            return self.last
        self.steps += 1
        if not self.initialized:
            self.buffer.append(norm)
            if len(self.buffer) >= max(self.warmup_steps, 1):
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
        # EMA update with the adaptive clip value when there was one, as in the reference: a spike
        # must not drag the mean up and make the next spike look normal.
        ema_in = clip_val if clip_val is not None else norm
        self.mean = self.alpha * self.mean + (1 - self.alpha) * ema_in
        self.var = self.alpha * self.var + (1 - self.alpha) * (ema_in - self.mean) ** 2
        if clipped:
            self.total_clips += 1
        self.last = ZClipDecision(norm, effective, z, clipped, clip_val)
        return self.last

    def step(self, model: torch.nn.Module) -> ZClipDecision:
        """Standalone use, like the reference's `zclip.step(model)` between `backward()` and
        `optimizer.step()`: one norm pass, then the clip. (The plugin uses the Trainer's norm.)"""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
        decision = self.observe(norm)
        scale_gradients(params, decision.coefficient)
        return decision

    def tighten(self, factor: float) -> dict[str, Any]:
        before = self.z_thresh
        self.z_thresh = max(self.z_thresh * factor, 0.5)
        return {"zclip_z_threshold_before": before, "zclip_z_threshold_after": self.z_thresh}

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (it goes into `trainer_state.json`)."""
        return {"buffer": list(self.buffer), "mean": self.mean, "var": self.var, "z_thresh": self.z_thresh,
                "steps": self.steps, "total_clips": self.total_clips, "nonfinite_ignored": self.nonfinite_ignored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = [float(x) for x in state.get("buffer", [])]
        mean, var = state.get("mean"), state.get("var")
        self.mean = float(mean) if mean is not None else None
        self.var = float(var) if var is not None else None
        self.z_thresh = float(state.get("z_thresh", self.z_thresh))
        self.steps = int(state.get("steps", self.steps))
        self.total_clips = int(state.get("total_clips", self.total_clips))
        self.nonfinite_ignored = int(state.get("nonfinite_ignored", self.nonfinite_ignored))

    def summary(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "z_threshold": self.z_thresh, "steps": self.steps,
                "total_clips": self.total_clips, "nonfinite_ignored": self.nonfinite_ignored,
                "initialized": self.initialized}


def scale_gradients(parameters: Iterable[torch.nn.Parameter], coefficient: float) -> None:
    """Multiply every gradient in place (one fused kernel per device/dtype group)."""
    if coefficient >= 1.0 or not math.isfinite(coefficient):
        return
    grads = [local_tensor(p.grad) for p in parameters if p.grad is not None]
    if grads:
        compat.foreach_mul_(grads, coefficient)


def save_to_trainer_state(zclip: ZClip, trainer_state: Any) -> None:
    """Put ZClip's statistics where the Trainer checkpoints them (`stateful_callbacks` in
    `trainer_state.json`). Call before a save; cheap enough to call every step."""
    store = getattr(trainer_state, "stateful_callbacks", None)
    if isinstance(store, dict):
        store[TRAINER_STATE_KEY] = {"args": {}, "attributes": zclip.state_dict()}


def load_from_trainer_state(zclip: ZClip, trainer_state: Any) -> bool:
    """Restore ZClip's statistics from a resumed `TrainerState`; False when it holds none."""
    store = getattr(trainer_state, "stateful_callbacks", None)
    saved = store.get(TRAINER_STATE_KEY) if isinstance(store, dict) else None
    if not isinstance(saved, dict) or not isinstance(saved.get("attributes"), dict):
        return False
    zclip.load_state_dict(saved["attributes"])
    return True


__all__ = ["ZClip", "ZClipDecision", "scale_gradients", "save_to_trainer_state", "load_from_trainer_state",
           "TRAINER_STATE_KEY"]
