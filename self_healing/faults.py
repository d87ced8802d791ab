"""Fault injection: rehearse a run's failures before spending GPU hours on it.

The same injectors drive this project's tests, benchmarks and demo::

    from self_healing.faults import Fault, inject_faults
    inject_faults(trainer, Fault("nan_loss", step=25))
    SelfHealingTrainer(trainer).train()

Steps are 1-based optimizer steps, as in the Trainer's logs: `step=25` fires during the step after
which `state.global_step == 25`. Kinds:

=================  ================================================================  ===========
kind               what it does                                                      factor
=================  ================================================================  ===========
nan_loss           the loss (and so every gradient) becomes NaN                     -
inf_loss           the loss becomes +Inf                                            -
nan_grad           one parameter's gradient is set to NaN after backward             -
grad_scale         every gradient is multiplied after backward (before clipping)    1e8
nan_weight         one weight tensor is set to NaN before the forward                -
weight_scale       every weight is multiplied before the forward                    300
zero_exp_avg_sq    Adam's second moment (`exp_avg_sq`) is zeroed before the step     -
lr_scale           the LR of every param group is multiplied for `duration` steps  3000
exception          `exception()` is raised inside the training step                  -
=================  ================================================================  ===========

`param` picks the tensor for `nan_grad`/`nan_weight` (a substring of its name; default: the first
matrix of the first layer) and restricts `weight_scale` to matching tensors when given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from .snapshot import unwrap_optimizer

FAULT_KINDS = ("nan_loss", "inf_loss", "nan_grad", "grad_scale", "nan_weight", "weight_scale", "zero_exp_avg_sq",
               "lr_scale", "exception")
_DEFAULT_FACTOR = {"grad_scale": 1e8, "weight_scale": 300.0, "lr_scale": 3000.0}


@dataclass
class Fault:
    kind: str
    step: int
    duration: int = 1
    factor: float | None = None
    param: str | None = None
    exception: Callable[[], BaseException] | None = None
    when: Callable[[Any, Any], bool] | None = None
    """Optional extra condition `when(trainer, inputs)`, e.g. only for large batches."""

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Fault.kind={self.kind!r} is not accepted: expected one of {', '.join(FAULT_KINDS)}")
        if not isinstance(self.step, int) or self.step < 1:
            raise ValueError(f"Fault.step={self.step!r} is not accepted: expected an integer >= 1")
        if not isinstance(self.duration, int) or self.duration < 1:
            raise ValueError(f"Fault.duration={self.duration!r} is not accepted: expected an integer >= 1")
        if self.kind == "exception" and self.exception is None:
            raise ValueError("Fault.exception is required for kind 'exception' (a callable returning the exception)")
        if self.factor is None:
            self.factor = _DEFAULT_FACTOR.get(self.kind)
        if self.factor is not None and not math.isfinite(self.factor):
            raise ValueError(f"Fault.factor={self.factor!r} is not accepted: expected a finite number")

    def active(self, step: int) -> bool:
        return self.step <= step < self.step + self.duration


def _pick_param(model: torch.nn.Module, pattern: str | None) -> tuple[str, torch.nn.Parameter]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if pattern is not None:
        for n, p in named:
            if pattern in n:
                return n, p
        raise ValueError(f"Fault.param={pattern!r} matches no trainable parameter")
    for n, p in named:
        if p.dim() >= 2 and "embed" not in n:
            return n, p
    return named[0]


class FaultInjector(TrainerCallback):
    """Installs the faults on one trainer; `fired` lists what was injected and when."""

    def __init__(self, *faults: Fault) -> None:
        self.faults = list(faults)
        self.fired: list[dict[str, Any]] = []
        self.trainer: Any = None

    def install(self, trainer: Any) -> "FaultInjector":
        self.trainer = trainer
        orig_loss = trainer.compute_loss
        orig_step = trainer.training_step
        injector = self

        def compute_loss(model, inputs, *args, **kwargs):
            out = orig_loss(model, inputs, *args, **kwargs)
            for f in injector._active("nan_loss", "inf_loss"):
                bad = float("nan") if f.kind == "nan_loss" else float("inf")
                if isinstance(out, tuple):
                    out = (out[0] * bad,) + tuple(out[1:])
                else:
                    out = out * bad
                injector._fire(f)
            return out

        def training_step(model, inputs, *args, **kwargs):
            for f in injector._active("exception"):
                if f.when is None or f.when(trainer, inputs):
                    injector._fire(f)
                    raise f.exception()
            loss = orig_step(model, inputs, *args, **kwargs)
            for f in injector._active("nan_grad", "grad_scale"):
                with torch.no_grad():
                    if f.kind == "nan_grad":
                        name, p = _pick_param(trainer.model, f.param)
                        if p.grad is not None:
                            p.grad.fill_(float("nan"))
                    else:
                        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
                        torch._foreach_mul_(grads, f.factor)
                injector._fire(f)
            return loss

        trainer.compute_loss = compute_loss
        trainer.training_step = training_step
        trainer.add_callback(self)
        return self

    def _current_step(self) -> int:
        return self.trainer.state.global_step + 1

    def _active(self, *kinds: str) -> list[Fault]:
        step = self._current_step()
        return [f for f in self.faults if f.kind in kinds and f.active(step)]

    def _fire(self, f: Fault, **info: Any) -> None:
        step = self._current_step()
        if not self.fired or self.fired[-1]["step"] != step or self.fired[-1]["kind"] != f.kind:
            self.fired.append({"kind": f.kind, "step": step, **info})

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1
        for f in self.faults:
            if not f.active(step):
                continue
            with torch.no_grad():
                if f.kind == "nan_weight":
                    name, p = _pick_param(self.trainer.model, f.param)
                    p.fill_(float("nan"))
                    self._fire(f, param=name)
                elif f.kind == "weight_scale":
                    ps = [p for n, p in self.trainer.model.named_parameters()
                          if p.requires_grad and (f.param is None or f.param in n)]
                    torch._foreach_mul_(ps, f.factor)
                    self._fire(f)
                elif f.kind == "zero_exp_avg_sq":
                    opt = unwrap_optimizer(self.trainer.optimizer)
                    for st in opt.state.values():
                        if "exp_avg_sq" in st:
                            st["exp_avg_sq"].zero_()
                    self._fire(f)
                elif f.kind == "lr_scale":
                    for g in unwrap_optimizer(self.trainer.optimizer).param_groups:
                        g["lr"] = g["lr"] * f.factor
                    self._fire(f)
        return control


def inject_faults(trainer: Any, *faults: Fault) -> FaultInjector:
    """Install `faults` on `trainer` (before or after wrapping it in `SelfHealingTrainer`)."""
    return FaultInjector(*faults).install(trainer)


__all__ = ["Fault", "FaultInjector", "inject_faults", "FAULT_KINDS"]
