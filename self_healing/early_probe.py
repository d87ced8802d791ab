"""Probe, curvature and Fisher parts of the early warning (`self_healing.early_warning`).

- `ProbeCheck`: the loss of a fixed probe batch before and after an update; a relative rise above
  its calibrated bound is judged here. The `UpdateUndo` host copy to undo the update with is taken
  here too; the engine's applier restores it (nothing here writes the model or optimizer).
- `measure_curvature`: Hutchinson trace, top eigenvalue and SAM sharpness on the probe batch
  (recorded only).
- `FisherEWC`: a diagonal Fisher EMA of the squared gradients (the importance a Fisher-weighted
  rollback uses) and, for a while after a rollback, an EWC pull towards the restored weights.

None of them touches the engine: `EarlyWarning` turns their results into events and actions.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import compat
from .diagnosis import REFERENCES, Action, Diagnosis, FailureKind
from .signals import (Calibrator, FisherEMA, autograd_hvp, finite_difference_hvp, hutchinson_trace,
                      power_iteration, sam_sharpness)
from .snapshot import copy_into, host_buffer, model_tensors, unwrap_optimizer

logger = logging.getLogger("self_healing")

PROBE_LR_RULE = (2, 5)
"""(rejections, within the last N probes) that cut the LR: a repeated regression is the dynamics."""
PROBE_BOOST_STEPS = 10
"""After a rejected update, every update is probe-checked for this many steps."""
CURVATURE_HISTORY = 100


class UpdateUndo:
    """A host copy of the weights and the optimizer state, taken just before an update, into
    reused buffers: copying it back undoes exactly that update (Adam's step counts included)."""

    def __init__(self) -> None:
        self.src: list[torch.Tensor] = []
        self.buf: list[torch.Tensor] = []
        self.signature: list[tuple[int, str]] = []
        self.seconds = 0.0

    @staticmethod
    def _tensors(model: Any, optimizer: Any) -> tuple[list[torch.Tensor], list[tuple[int, str]]]:
        tensors = list(model_tensors(model))
        sig: list[tuple[int, str]] = []
        opt = unwrap_optimizer(optimizer)
        for group in opt.param_groups:
            for p in group["params"]:
                for k, v in opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        tensors.append(v)
                        sig.append((id(p), k))
        return tensors, sig

    def capture(self, model: Any, optimizer: Any) -> bool:
        t0 = time.perf_counter()
        tensors, sig = self._tensors(model, optimizer)
        if not sig:  # no optimizer state yet (first step): nothing exact to go back to
            return False
        if len(self.buf) != len(tensors) or any(b.shape != t.shape or b.dtype != t.dtype
                                                for b, t in zip(self.buf, tensors)):
            self.buf = [host_buffer(t) for t in tensors]
        copy_into(self.buf, tensors)
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize()
        self.src, self.signature = tensors, sig
        self.seconds += time.perf_counter() - t0
        return True

    def restore(self, model: Any, optimizer: Any) -> bool:
        tensors, sig = self._tensors(model, optimizer)
        if sig != self.signature or len(tensors) != len(self.buf):
            return False
        with torch.no_grad():
            copy_into(tensors, self.buf)
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize()
        return True


def make_probe_batch(trainer: Any, model: Any, rows: int) -> dict[str, Any] | None:
    """The first evaluation batch (else the first training batch), cut to `rows` rows, on the
    model's device. Every RNG state is put back afterwards, so taking it changes nothing in the run
    (the data order included)."""
    t = trainer
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    batch = None
    try:
        loader = t.get_eval_dataloader() if getattr(t, "eval_dataset", None) is not None else t.get_train_dataloader()
        for b in loader:
            if isinstance(b, dict) or hasattr(b, "keys"):
                batch = b
                break
    except Exception as exc:  # noqa: BLE001 - no probe batch: the probe signals turn off
        logger.warning("self-healing: no probe batch (%s: %s); probe/curvature signals off", type(exc).__name__, exc)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
    if batch is None:
        return None
    try:
        accepted = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        accepted = set()
    out = {}
    for key, v in batch.items():
        if accepted and key not in accepted and "kwargs" not in accepted:
            continue
        if isinstance(v, torch.Tensor):
            out[key] = v[:rows].to(t.args.device)
    if "labels" not in out or "input_ids" not in out:
        logger.warning("self-healing: the probe needs a language-modelling batch (input_ids, labels); "
                       "probe/curvature signals off for %s", type(t).__name__)
        return None
    return out


def probe_loss(model: Any, batch: dict[str, Any]) -> float:
    """The model's loss on `batch`, in eval mode and without gradients (the training mode is kept)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**batch)
        loss = out.loss if hasattr(out, "loss") else out[0]
        return float(loss)
    finally:
        model.train(was)


@dataclass
class ProbeResult:
    """One probe-checked update: the probe loss before and after it and the verdict."""

    step: int
    before: float
    after: float
    score: float
    threshold: float | None
    method: str
    above: bool


class ProbeCheck:
    """Probe-checked updates: `before_update`, then `after_update` judges the rise; `reject` decides
    to undo the update (from `undo`, by the engine) and whether to cut the LR too (`PROBE_LR_RULE`)."""

    def __init__(self, every: int, calibrator: Calibrator | None, alpha_fail: float) -> None:
        self.every = every
        self.calibrator = calibrator
        self.alpha_fail = alpha_fail
        self.batch: dict[str, Any] | None = None
        self.undo = UpdateUndo()
        self.history: deque[bool] = deque(maxlen=PROBE_LR_RULE[1])
        self.boost_until = 0
        self.thresholds: dict[str, tuple[float | None, str]] = {}
        """Last (threshold, method) the probe was judged with, for the summary."""
        self.pending_step: int | None = None
        """The step whose update is being checked (set by `before_update`), else None."""
        self._before: float | None = None

    def due(self, step: int) -> bool:
        """Every `every` steps, and every step for `PROBE_BOOST_STEPS` after a rejection."""
        return bool(self.every) and (step % self.every == 0 or step <= self.boost_until)

    def before_update(self, step: int, model: Any, optimizer: Any, observe_only: bool) -> None:
        """The probe loss now and (unless observing only) a host copy to undo the update with."""
        before = probe_loss(model, self.batch)
        if math.isfinite(before) and (observe_only or self.undo.capture(model, optimizer)):
            self._before, self.pending_step = before, step

    def after_update(self, model: Any) -> ProbeResult:
        """Judge the pending update: the relative rise of the probe loss against its bound."""
        step, before = self.pending_step, self._before
        self.pending_step = None
        after = probe_loss(model, self.batch)
        score = (after - before) / max(abs(before), 1e-8) if math.isfinite(after) else math.inf
        above, thr, method = (self.calibrator.test(score, self.alpha_fail) if math.isfinite(score)
                              else (True, None, "nonfinite"))
        self.thresholds["probe"] = (thr, method)
        self.history.append(bool(above))
        return ProbeResult(step, before, after, score, thr, method, above)

    def reject(self, step: int, observe_only: bool, can_cut: bool) -> tuple[list[Action], int]:
        """A regressed update: the actions wanted (unless observing only: undo it from `undo`, and
        cut the LR on a repeated regression) and how many of the recent probes regressed. Nothing
        is written here: the engine restores the copy. In doubt, every update is checked for a while."""
        self.boost_until = step + PROBE_BOOST_STEPS
        recent = sum(self.history)
        actions: list[Action] = []
        if not observe_only:
            actions.append(Action.SKIP_STEP)
            if recent >= PROBE_LR_RULE[0] and can_cut:
                actions.append(Action.REDUCE_LR)
                self.history.clear()
        return actions, recent


def probe_diagnosis(r: ProbeResult, alpha: float, actions: list[Action], recent: int,
                    undo_failed: bool = False) -> Diagnosis:
    """The probe-regression event for a rejected update, as `actions` were carried out
    (`undo_failed`: an undo was asked for, and the pre-update copy could not be restored)."""
    ev = {"probe_loss_before": r.before, "probe_loss_after": r.after, "relative_rise": r.score,
          "threshold": r.threshold, "calibration": r.method, "target_rate": alpha}
    bound = f"{r.threshold:.3g}" if r.threshold is not None else "n/a"
    if Action.SKIP_STEP in actions:
        what = "update undone" if Action.REDUCE_LR in actions else "update undone (pre-update state restored)"
    elif undo_failed:
        what = "the pre-update copy no longer matched the weights or optimizer state, so the update was kept"
    else:
        what = "observed only"
    if Action.REDUCE_LR in actions:
        what += f"; {recent} of the last {PROBE_LR_RULE[1]} probes regressed, so the LR was reduced"
    return Diagnosis(FailureKind.PROBE_REGRESSION,
                     f"the update at step {r.step} raised the probe loss {r.before:.4g} -> {r.after:.4g} "
                     f"({r.score:+.2%}, calibrated bound {bound}): {what}", ev, actions,
                     list(REFERENCES.get(FailureKind.PROBE_REGRESSION, [])), r.step)


def measure_curvature(model: Any, batch: dict[str, Any], step: int) -> dict[str, Any]:
    """One curvature row on the probe batch (a measurement never raises: an error is recorded)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn() -> torch.Tensor:
        return model(**batch).loss

    was = model.training
    model.eval()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(step)
    row: dict[str, Any] = {"step": step}
    try:
        hvp = autograd_hvp(loss_fn, params)
        try:
            hvp([torch.zeros_like(p) for p in params])
            row["hvp"] = "autograd"
        except RuntimeError:  # an attention kernel without double backward
            hvp = finite_difference_hvp(loss_fn, params)
            row["hvp"] = "finite_difference"
        row["hessian_trace"], row["hessian_trace_se"] = hutchinson_trace(hvp, params, samples=4, generator=gen)
        row["top_eigenvalue"] = power_iteration(hvp, params, iters=10, generator=gen)
        row["sam_sharpness"], row["probe_loss"] = sam_sharpness(loss_fn, params, rho=0.05)
    except Exception as exc:  # noqa: BLE001 - a measurement must never kill the run
        row["error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        model.train(was)
    row["seconds"] = round(time.perf_counter() - t0, 4)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}


class FisherEWC:
    """Diagonal Fisher EMA (every `every` steps) and the EWC pull after a rollback: the gradient of
    (lam/2) sum F (w - anchor)^2, scaled to `strength` x |g|, until `anchor_until`."""

    def __init__(self, every: int, strength: float) -> None:
        self.every, self.strength = every, strength
        self.fisher = FisherEMA(0.95)
        self.anchor: list[torch.Tensor] | None = None
        self.anchor_until = -1

    def importance(self) -> list[torch.Tensor | None] | None:
        """Fisher / its mean, None before the first update."""
        return self.fisher.importance("mean") if self.fisher.updates else None

    def set_anchor(self, params: list[torch.Tensor], until: int) -> None:
        """The weights were just restored: they are the anchor the pull holds the run near."""
        self.anchor = [p.detach().clone() for p in params]
        self.anchor_until = until

    def step(self, step: int, params: list[torch.Tensor]) -> bool:
        """Update the Fisher when due; add the EWC pull to the gradients. True when it pulled."""
        if step % self.every == 0:
            self.fisher.update([p.grad for p in params])
        if self.anchor is not None and step > self.anchor_until:
            self.anchor = None  # the pull is over: free the copy
        if self.anchor is None:
            return False
        imp = self.fisher.importance("mean")
        live = [(p, a, f) for p, a, f in zip(params, self.anchor, imp or []) if p.grad is not None and f is not None]
        if not live:
            return False
        with torch.no_grad():
            pulls = [f * (p.detach() - a) for p, a, f in live]
            pull_norm = float(torch.linalg.vector_norm(torch.stack(compat.foreach_norm(pulls))))
            grad_norm = float(torch.linalg.vector_norm(torch.stack(compat.foreach_norm([p.grad for p, _, _ in live]))))
            if not (pull_norm > 0 and math.isfinite(pull_norm) and math.isfinite(grad_norm)):
                return False
            compat.foreach_add_([p.grad for p, _, _ in live], pulls, alpha=self.strength * grad_norm / pull_norm)
        return True


__all__ = ["UpdateUndo", "ProbeCheck", "ProbeResult", "FisherEWC", "make_probe_batch", "probe_loss",
           "probe_diagnosis", "measure_curvature", "PROBE_LR_RULE", "PROBE_BOOST_STEPS", "CURVATURE_HISTORY"]
