"""Healing: which actions to take (the escalation policy) and the actions themselves.

The policy is pure bookkeeping so it can be tested on a list of diagnoses. The escalation ladder
follows what worked for the peers: skip a bad step while the weights are clean (OLMo, Megatron);
after `patience` bad steps in a row, suspect the weights and roll back (ARC, PaLM); if the same
failure comes back soon after a rollback, the LR is the problem, cut it (OPT-175B); when attempts
run out, give up cleanly rather than loop forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from . import compat
from .config import HealingConfig
from .diagnosis import Action, Diagnosis, FailureKind
from .snapshot import unwrap_optimizer

_SKIPPABLE_NONFINITE = {FailureKind.NAN_LOSS, FailureKind.NONFINITE_GRADIENT}
_SKIPPABLE_OUTLIER = {FailureKind.LOSS_SPIKE, FailureKind.GRADIENT_EXPLOSION}
_LR_SPIKE_PATIENCE = 5


@dataclass
class Plan:
    actions: list[Action]
    reason: str = ""
    lr_factor: float | None = None


@dataclass
class HealingPolicy:
    """Escalation state across steps. `plan()` is called once per diagnosed failure, and
    `healthy_step()` once per step that passed every detector."""

    config: HealingConfig
    attempts: int = 0
    total_attempts: int = 0
    skip_streak: int = 0
    lr_spike_streak: int = 0
    healthy_streak: int = 0
    skipped_steps: int = 0
    skipped_batches: int = 0
    lr_scale: float = 1.0
    last_rollback_step: int | None = None
    rollback_failures: list[str] = field(default_factory=list)

    def healthy_step(self) -> None:
        self.skip_streak = 0
        self.lr_spike_streak = 0
        self.healthy_streak += 1
        if self.healthy_streak >= self.config.recovery_reset_steps:
            self.attempts = 0

    def plan(self, d: Diagnosis, step: int, can_rollback: bool = True) -> Plan:
        cfg = self.config
        self.healthy_streak = 0
        actions = list(d.actions)
        reason = ""
        if not d.healable:
            return Plan([Action.GIVE_UP], "not a healable failure")
        if Action.SKIP_BATCH in actions:
            self.skipped_batches += 1
            if self.skipped_batches > cfg.max_skipped_batches:
                return Plan([Action.GIVE_UP], f"data errors hit {self.skipped_batches} distinct batches "
                                              f"(max_skipped_batches={cfg.max_skipped_batches}): a pipeline bug, not noise")
            return Plan(actions)
        if Action.REDUCE_BATCH in actions or Action.BACKOFF_RETRY in actions:
            if self.attempts >= cfg.max_recovery_attempts:
                return Plan([Action.GIVE_UP],
                            f"{self.attempts} recovery attempts spent (max_recovery_attempts={cfg.max_recovery_attempts})")
            self.attempts += 1
            self.total_attempts += 1
            return Plan(actions)
        if d.failure == FailureKind.LR_SPIKE:
            self.lr_spike_streak += 1
            if self.lr_spike_streak > _LR_SPIKE_PATIENCE:
                return Plan([Action.GIVE_UP], f"the LR was set outside the scheduler {self.lr_spike_streak} steps in a row")
        if Action.SKIP_STEP in actions and (d.failure in _SKIPPABLE_NONFINITE or d.failure in _SKIPPABLE_OUTLIER):
            self.skip_streak += 1
            patience = cfg.nan_patience if d.failure in _SKIPPABLE_NONFINITE else cfg.loss_spike_patience
            if self.skip_streak > patience:
                actions = [Action.ROLLBACK]
                reason = (f"{self.skip_streak} bad steps in a row (patience {patience}): the state itself is "
                          "suspect, rolling back")
        if Action.ROLLBACK in actions:
            recurring = (self.last_rollback_step is not None
                         and step - self.last_rollback_step <= 2 * max(cfg.divergence_patience, 10))
            if self.attempts >= cfg.max_recovery_attempts:
                return Plan([Action.GIVE_UP],
                            f"{self.attempts} recovery attempts spent (max_recovery_attempts={cfg.max_recovery_attempts})")
            if not can_rollback:
                if d.failure in (FailureKind.WEIGHT_CORRUPTION, FailureKind.OPTIMIZER_STATE_CORRUPTION):
                    return Plan([Action.GIVE_UP], "the state is corrupted and no verified snapshot exists to roll back to")
                actions = [a if a != Action.ROLLBACK else Action.SKIP_STEP for a in actions]
                reason = (reason + "; " if reason else "") + "no verified snapshot yet: skipped instead"
            self.attempts += 1
            self.total_attempts += 1
            self.skip_streak = 0
            # A one-off fault (a flipped tensor, a zeroed moment) has nothing to do with the LR and
            # keeps it; the same trouble right after a rollback means the dynamics cause it.
            if recurring and Action.REDUCE_LR not in actions:
                actions.append(Action.REDUCE_LR)
                reason = (reason + "; " if reason else "") + (
                    f"failure came back {step - self.last_rollback_step} steps after the last rollback: LR cut")
                if d.failure in (FailureKind.GRADIENT_EXPLOSION, FailureKind.LOSS_SPIKE):
                    actions.append(Action.TIGHTEN_CLIPPING)
            if Action.ROLLBACK in actions:
                self.last_rollback_step = step
                self.rollback_failures.append(d.failure.value)
        lr_factor = None
        if Action.REDUCE_LR in actions:
            new_scale = self.lr_scale * cfg.lr_reduction_factor
            if new_scale < cfg.min_lr_scale:
                return Plan([Action.GIVE_UP], f"the LR is already cut to {self.lr_scale:.3g}x of the original "
                                              f"(min_lr_scale={cfg.min_lr_scale}) and the run still fails")
            self.lr_scale = new_scale
            lr_factor = cfg.lr_reduction_factor
        if Action.SKIP_STEP in actions:
            self.skipped_steps += 1
        return Plan(actions, reason, lr_factor)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("attempts", "total_attempts", "skip_streak", "lr_spike_streak",
                                              "healthy_streak", "skipped_steps", "skipped_batches", "lr_scale",
                                              "last_rollback_step", "rollback_failures")}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        for k, v in s.items():
            setattr(self, k, v)


# ---------------------------------------------------------------------------------------------
# Actions on the live objects. Each returns a dict of what it changed, for the postmortem.
# ---------------------------------------------------------------------------------------------

def skip_update(model: Any) -> None:
    """Make the coming `optimizer.step()` a no-op for every parameter.

    Zeroing gradients is not enough: AdamW still moves weights by momentum and weight decay. A
    parameter whose `.grad` is None is skipped by torch optimizers (state untouched)."""
    for p in model.parameters():
        p.grad = None


def fisher_weighted_rollback(params: list[Any], before: list[Any], importance: list[Any]) -> None:
    """The just-restored `params` become snapshot + (1 - importance) (before - snapshot):
    `before` is what they held before the rollback, importance the Fisher over its mean, clipped
    at 1 (None for a parameter: a plain rollback of it)."""
    import torch

    from .signals import fisher_interpolate

    restored = [p.detach().clone() for p in params]
    with torch.no_grad():
        compat.foreach_copy_(params, before)
    fisher_interpolate(params, restored, importance)


def scale_lr(optimizer: Any, scheduler: Any, factor: float) -> dict[str, Any]:
    """Multiply the LR so the change *persists*: param groups, their `initial_lr`, and the
    scheduler's `base_lrs` (HF schedulers recompute the LR from those every step)."""
    opt = unwrap_optimizer(optimizer)
    before = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = g["lr"] * factor
        if "initial_lr" in g:
            g["initial_lr"] = g["initial_lr"] * factor
    if scheduler is not None:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]
        compat.scale_last_lr(scheduler, factor)
    return {"lr_before": before, "lr_after": [g["lr"] for g in opt.param_groups], "factor": factor}


def scheduled_lrs(optimizer: Any, scheduler: Any, unwrapped: Any = None) -> list[float] | None:
    """What the scheduler last set, one LR per param group (None: no scheduler, or it does not
    match the optimizer). `unwrapped`: the torch optimizer inside `optimizer`, when known."""
    get_last_lr = getattr(scheduler, "get_last_lr", None)
    if get_last_lr is None:
        return None
    try:
        lrs = [float(x) for x in get_last_lr()]
    except (AttributeError, RuntimeError, TypeError):
        return None
    return lrs if len(lrs) == len((unwrapped or unwrap_optimizer(optimizer)).param_groups) else None


def restore_scheduled_lr(optimizer: Any, scheduler: Any, reference: list[float] | None = None) -> dict[str, Any]:
    """Put the LR back to what the scheduler set, or without one to `reference` (the LRs a
    plain loop last ran healthily with)."""
    opt = unwrap_optimizer(optimizer)
    before = [g["lr"] for g in opt.param_groups]
    lrs = scheduled_lrs(optimizer, scheduler)
    if lrs is None and reference is not None and len(reference) == len(opt.param_groups):
        lrs = list(reference)
    if lrs is not None:
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
    return {"lr_before": before, "lr_after": [g["lr"] for g in opt.param_groups]}


def tighten_clipping(args: Any, factor: float, grad_norm_hint: float | None = None) -> dict[str, Any]:
    """Lower `max_grad_norm`; if clipping was off, turn it on at the recent healthy norm."""
    before = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
    if before > 0:
        after = before * factor
    else:
        after = grad_norm_hint if grad_norm_hint and math.isfinite(grad_norm_hint) and grad_norm_hint > 0 else 1.0
    args.max_grad_norm = after
    return {"max_grad_norm_before": before, "max_grad_norm_after": after}
