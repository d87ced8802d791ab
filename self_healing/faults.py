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
exception          `exception()` is raised inside the training step: in the model's     -
                   forward (`where="forward"`, a failure on that batch), or before
                   it (`where="step"`); the default, "auto", raises an OOM or a
                   transient network/storage error before the forward and anything
                   else inside it, where such errors really come from
lr_ramp            the *scheduled* LR is multiplied by factor**k at the k-th step    1.1
                   of the ramp (k <= `duration`), then held at factor**duration: a
                   peak LR set too high, which the `lr_spike` test cannot see
weight_drift       every weight is multiplied by `factor` before each forward, for   1.01
                   `duration` steps (weights drifting by a small factor per step)
noisy_data         from `step`, a fraction of the input tokens (and their labels) is  0.5
                   replaced by random tokens, rising linearly to `factor` over
                   `duration` steps and held there (a data stream that turns noisy)
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

from . import compat
from .distributed import local_tensor
from .snapshot import unwrap_optimizer

FAULT_KINDS = ("nan_loss", "inf_loss", "nan_grad", "grad_scale", "nan_weight", "weight_scale", "zero_exp_avg_sq",
               "lr_scale", "exception", "lr_ramp", "weight_drift", "noisy_data")
_DEFAULT_FACTOR = {"grad_scale": 1e8, "weight_scale": 300.0, "lr_scale": 3000.0,
                   "lr_ramp": 1.1, "weight_drift": 1.01, "noisy_data": 0.5}
_BUILD_UP = ("lr_ramp", "noisy_data")
"""Faults that, once started, stay on after `duration` (the ramp ends, its level remains)."""


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
    rank: int | None = None
    """Fire only on this process (`args.process_index`): a failure one rank sees and the others don't."""
    times: int | None = None
    """Fire at most this many times in all (e.g. an exception raised once, then the retry works)."""
    where: str = "auto"
    """For `exception`: "forward", "step" or "auto" (see the table above)."""
    fired_count: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Fault.kind={self.kind!r} is not accepted: expected one of {', '.join(FAULT_KINDS)}")
        if not isinstance(self.step, int) or self.step < 1:
            raise ValueError(f"Fault.step={self.step!r} is not accepted: expected an integer >= 1")
        if not isinstance(self.duration, int) or self.duration < 1:
            raise ValueError(f"Fault.duration={self.duration!r} is not accepted: expected an integer >= 1")
        if self.kind == "exception" and self.exception is None:
            raise ValueError("Fault.exception is required for kind 'exception' (a callable returning the exception)")
        if self.where not in ("auto", "forward", "step"):
            raise ValueError(f"Fault.where={self.where!r} is not accepted: expected 'auto', 'forward' or 'step'")
        if self.factor is None:
            self.factor = _DEFAULT_FACTOR.get(self.kind)
        if self.factor is not None and not math.isfinite(self.factor):
            raise ValueError(f"Fault.factor={self.factor!r} is not accepted: expected a finite number")

    def active(self, step: int) -> bool:
        if self.times is not None and self.fired_count >= self.times:
            return False
        if self.kind in _BUILD_UP:
            return step >= self.step
        return self.step <= step < self.step + self.duration

    def level(self, step: int) -> int:
        """Steps into a build-up fault's ramp, capped at `duration` (0 before it starts)."""
        return max(0, min(step - self.step + 1, self.duration))


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


def _raise_where(f: Fault, exc: BaseException) -> str:
    if f.where != "auto":
        return f.where
    from .diagnosis import FailureKind, diagnose_exception

    transient = diagnose_exception(exc, origin="step").failure in (FailureKind.OOM, FailureKind.API_ERROR)
    return "step" if transient else "forward"


class _Injection:
    """What every injector shares: which faults are due at a step, the record of what fired, and
    the faults themselves on a model, optimizer and scheduler (whoever owns them)."""

    def __init__(self, *faults: Fault) -> None:
        self.faults = list(faults)
        self.fired: list[dict[str, Any]] = []

    def _current_step(self) -> int:
        raise NotImplementedError

    def _process_index(self) -> int:
        raise NotImplementedError

    def _objects(self) -> tuple[Any, Any, Any]:
        """(model, optimizer, scheduler) the faults act on."""
        raise NotImplementedError

    def _on_this_rank(self, f: Fault) -> bool:
        return f.rank is None or self._process_index() == f.rank

    def _active(self, *kinds: str) -> list[Fault]:
        step = self._current_step()
        return [f for f in self.faults if f.kind in kinds and f.active(step) and self._on_this_rank(f)]

    def _fire(self, f: Fault, **info: Any) -> None:
        f.fired_count += 1
        step = self._current_step()
        if not self.fired or self.fired[-1]["step"] != step or self.fired[-1]["kind"] != f.kind:
            self.fired.append({"kind": f.kind, "step": step, **info})

    def _gradient_faults(self) -> None:
        """After backward: `nan_grad`, `grad_scale`."""
        model = self._objects()[0]
        for f in self._active("nan_grad", "grad_scale"):
            with torch.no_grad():
                if f.kind == "nan_grad":
                    name, p = _pick_param(model, f.param)
                    if p.grad is not None:
                        local_tensor(p.grad).fill_(float("nan"))
                else:
                    grads = [local_tensor(p.grad) for p in model.parameters() if p.grad is not None]
                    compat.foreach_mul_(grads, f.factor)
            self._fire(f)

    def _state_faults(self, step: int) -> None:
        """Before the forward of `step`: faults on weights, optimizer state and LR."""
        model, optimizer, _ = self._objects()
        for f in self.faults:
            if not f.active(step) or not self._on_this_rank(f):
                continue
            with torch.no_grad():
                if f.kind == "nan_weight":
                    name, p = _pick_param(model, f.param)
                    local_tensor(p).fill_(float("nan"))  # under FSDP2: this rank's shard
                    self._fire(f, param=name)
                elif f.kind == "weight_scale":
                    ps = [local_tensor(p) for n, p in model.named_parameters()
                          if p.requires_grad and (f.param is None or f.param in n)]
                    compat.foreach_mul_(ps, f.factor)
                    self._fire(f)
                elif f.kind == "zero_exp_avg_sq":
                    opt = unwrap_optimizer(optimizer)
                    for st in opt.state.values():
                        if "exp_avg_sq" in st:
                            local_tensor(st["exp_avg_sq"]).zero_()
                    self._fire(f)
                elif f.kind == "lr_scale":
                    for g in unwrap_optimizer(optimizer).param_groups:
                        g["lr"] = g["lr"] * f.factor
                    self._fire(f)
                elif f.kind == "weight_drift":
                    compat.foreach_mul_([local_tensor(p) for n, p in model.named_parameters()
                                         if p.requires_grad and (f.param is None or f.param in n)], f.factor)
                    self._fire(f)
                elif f.kind == "lr_ramp":
                    self._ramp_lr(f, step)

    def _ramp_lr(self, f: Fault, step: int) -> None:
        """Make the scheduler itself ramp: its LambdaLR lambdas are wrapped once, so the ramped LR
        is what the scheduler reports (and an LR cut through `base_lrs` still applies). A scheduler
        without lambdas gets the ramp on the param groups only (then `lr_spike` can see it)."""
        _, optimizer, sched = self._objects()
        opt = unwrap_optimizer(optimizer)
        lambdas = getattr(sched, "lr_lambdas", None)
        if isinstance(lambdas, list) and lambdas:
            if getattr(f, "_wrapped", False):
                if step < f.step + f.duration:  # recorded while it ramps, not for the rest of the run
                    self._fire(f, lr=opt.param_groups[0]["lr"])
                return
            start, factor, duration = f.step, f.factor, f.duration

            def ramped(fn):
                # the LR of optimizer step s is lambda(s - 1)
                return lambda epoch: fn(epoch) * factor ** max(0, min(epoch - start + 2, duration))

            sched.lr_lambdas = [ramped(fn) for fn in lambdas]
            f._wrapped = True
            mult = factor ** f.level(step)
            for g in opt.param_groups:  # this step's LR was set before the wrap
                g["lr"] = g["lr"] * mult
            compat.scale_last_lr(sched, lrs=[g["lr"] for g in opt.param_groups])
        else:
            base = getattr(f, "_base_lrs", None)
            if base is None:
                base = f._base_lrs = [g["lr"] for g in opt.param_groups]
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * f.factor ** f.level(step)
        if step < f.step + f.duration:
            self._fire(f, lr=opt.param_groups[0]["lr"])


class FaultInjector(_Injection, TrainerCallback):
    """Installs the faults on one trainer; `fired` lists what was injected and when."""

    def __init__(self, *faults: Fault) -> None:
        super().__init__(*faults)
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
            in_forward = []
            for f in injector._active("exception"):
                if f.when is None or f.when(trainer, inputs):
                    injector._fire(f)
                    exc = f.exception()
                    if _raise_where(f, exc) == "step":
                        raise exc
                    in_forward.append(exc)
            for f in injector._active("noisy_data"):
                inputs = injector._noisy(f, inputs)
            hook = None
            if in_forward:
                def raise_in_forward(module, args):
                    raise in_forward[0]

                hook = trainer.model.register_forward_pre_hook(raise_in_forward)
            try:
                loss = orig_step(model, inputs, *args, **kwargs)
            finally:
                if hook is not None:
                    hook.remove()
            injector._gradient_faults()
            return loss

        trainer.compute_loss = compute_loss
        trainer.training_step = training_step
        trainer.add_callback(self)
        return self

    def _current_step(self) -> int:
        return self.trainer.state.global_step + 1

    def _process_index(self) -> int:
        return getattr(self.trainer.args, "process_index", 0)

    def _objects(self) -> tuple[Any, Any, Any]:
        t = self.trainer
        return t.model, t.optimizer, t.lr_scheduler

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._state_faults(state.global_step + 1)
        return control

    def _noisy(self, f: Fault, inputs: Any) -> Any:
        """A copy of the batch with a fraction of its tokens replaced by random ones (the same
        positions in `labels`, where they are not masked)."""
        if not hasattr(inputs, "keys") or not isinstance(inputs.get("input_ids"), torch.Tensor):
            return inputs
        frac = f.factor * f.level(self._current_step()) / f.duration
        if frac <= 0:
            return inputs
        gen = getattr(f, "_generator", None)
        if gen is None:
            gen = f._generator = torch.Generator().manual_seed(1234 + f.step)
        ids = inputs["input_ids"]
        emb = self.trainer.model.get_input_embeddings() if hasattr(self.trainer.model, "get_input_embeddings") else None
        vocab = getattr(emb, "num_embeddings", None) or int(ids.max()) + 1
        hit = torch.rand(ids.shape, generator=gen) < frac
        rand = torch.randint(0, vocab, ids.shape, generator=gen)
        out = type(inputs)(inputs) if not hasattr(inputs, "data") else dict(inputs)
        out["input_ids"] = torch.where(hit.to(ids.device), rand.to(ids.device), ids)
        labels = inputs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.shape == ids.shape:
            out["labels"] = torch.where(hit.to(labels.device) & (labels != -100), rand.to(labels.device), labels)
        self._fire(f, fraction=round(frac, 4))
        return out


_LOOP_KINDS = ("nan_loss", "inf_loss", "nan_grad", "grad_scale", "nan_weight", "weight_scale", "zero_exp_avg_sq",
               "lr_scale", "lr_ramp", "weight_drift")


class LoopFaultInjector(_Injection):
    """The same faults on a hand-written loop protected by `self_healing.Healer`, which calls
    `before_step` (after backward: loss and gradient faults) and `before_forward` (after the
    previous step: weight, optimizer-state and LR faults)."""

    def __init__(self, *faults: Fault) -> None:
        for f in faults:
            if f.kind not in _LOOP_KINDS:
                raise ValueError(f"Fault.kind={f.kind!r} cannot be rehearsed on a plain loop (the healer sees no "
                                 f"forward or batch): expected one of {', '.join(_LOOP_KINDS)}")
        super().__init__(*faults)
        self.healer: Any = None
        self._step = 0

    def install(self, healer: Any) -> "LoopFaultInjector":
        self.healer = healer
        healer.faults = self
        if healer.step == 0:
            self.before_forward(1)
        return self

    def _current_step(self) -> int:
        return self._step

    def _process_index(self) -> int:
        from .distributed import rank

        return rank()

    def _objects(self) -> tuple[Any, Any, Any]:
        h = self.healer
        return h.model, h.optimizer, h.scheduler

    def before_forward(self, step: int) -> None:
        self._step = step
        self._state_faults(step)

    def before_step(self, step: int, loss: Any) -> Any:
        """A NaN/Inf loss does to the gradients what its backward would have done; then the
        gradient faults. Returns the loss the healer judges."""
        self._step = step
        for f in self._active("nan_loss", "inf_loss"):
            bad = float("nan") if f.kind == "nan_loss" else float("inf")
            loss = loss * bad
            with torch.no_grad():
                compat.foreach_mul_([local_tensor(p.grad) for p in self.healer.model.parameters()
                                     if p.grad is not None], bad)
            self._fire(f)
        self._gradient_faults()
        return loss


def inject_faults(target: Any, *faults: Fault) -> Any:
    """Install `faults` on a trainer (before or after wrapping it in `SelfHealingTrainer`), or on
    a plain loop's `self_healing.Healer`: `inject_faults(healer, Fault("nan_loss", step=5))`."""
    from .engine import Healer

    if isinstance(target, Healer):
        return LoopFaultInjector(*faults).install(target)
    return FaultInjector(*faults).install(target)


__all__ = ["Fault", "FaultInjector", "LoopFaultInjector", "inject_faults", "FAULT_KINDS"]
