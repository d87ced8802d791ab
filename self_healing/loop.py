"""Self-healing for your own training loop (plain PyTorch, DDP, `accelerate`)::

    from self_healing import Healer, HealingConfig

    healer = Healer(model, optimizer, scheduler, config=HealingConfig(), output_dir="runs/x")
    with healer:                              # an exception is recorded in the postmortem, then raised
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()                   # or accelerator.backward(loss)
            if healer.before_step(loss):      # False: this step's update is dropped (maybe rolled back)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad()
            healer.after_step()               # weight/optimizer-state checks, snapshots, rollback
            if healer.stopped:                # gave up: the last verified weights are in memory
                break
    # postmortem.json is in runs/x (healer.finish() writes it without the `with`)

Every decision is the engine's (`self_healing.engine.Healer`), the same one the Trainer plugin
uses: a NaN/Inf loss or gradient, a loss spike or exploding gradient skips the update; NaN or
blown-up weights and a corrupted optimizer state roll back to the newest verified in-memory
snapshot; an LR set far above the schedule is put back; a failure that comes back cuts the LR.
Under torch.distributed (DDP) every rank's loss and norm travel in one small all_gather per
step, so every rank takes the same decision at the same step.

A healthy run trains bit-identically to the same loop without the healer: it only reads the
gradients, weights and optimizer state (the norms, the snapshots' copies).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .config import HealingConfig
from .distributed import rank
from .engine import Decision
from .engine import Healer as _Engine
from .snapshot import unwrap_optimizer

logger = logging.getLogger("self_healing")


def _scalar_loss(loss: Any) -> Any:
    """The step's loss as the engine reads it (a one-element tensor or a Python float). Anything
    else is the caller's mistake, said at once: judged as a number it would read as NaN and the
    healer would skip every update of a healthy run."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"Healer.before_step(loss): expected the step's scalar loss, got a tensor of shape "
                             f"{tuple(loss.shape)} (reduce it first, e.g. loss.mean())")
        return loss
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    if hasattr(loss, "item") and getattr(loss, "size", None) == 1 and not isinstance(loss, (str, bytes)):
        try:  # a numpy scalar or one-element array
            value = loss.item()
        except (TypeError, ValueError):
            value = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    raise TypeError(f"Healer.before_step(loss): expected the step's loss as a scalar tensor or a float, "
                    f"got {type(loss).__name__}")


class Healer(_Engine):
    """The engine plus the step protocol of a hand-written loop: `before_step(loss)` between
    backward and `optimizer.step()`, `after_step()` after `zero_grad()`, `finish()` at the end
    (or `with healer:`). `accelerator`: the `accelerate.Accelerator` that prepared the model and
    optimizer, if any (its fp16 loss scale is divided out of the measured gradient norm)."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, scheduler: Any = None,
                 config: HealingConfig | None = None, output_dir: str | Path | None = None, *,
                 accelerator: Any = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Healer(model=...) expects a torch.nn.Module, got {type(model).__name__}")
        if not hasattr(unwrap_optimizer(optimizer), "param_groups"):
            raise TypeError(f"Healer(optimizer=...) expects a torch optimizer, got {type(optimizer).__name__}")
        if config is not None and not isinstance(config, HealingConfig):
            raise TypeError(f"Healer(config=...) expects a HealingConfig, got {type(config).__name__}")
        super().__init__(model, optimizer, scheduler, config, output_dir)
        self.accelerator = accelerator
        self.step = 0
        """Steps taken: `before_step` calls (a skipped step counts, its batch was used)."""
        self.postmortem: dict[str, Any] | None = None
        self.faults: Any = None
        """The `self_healing.faults.LoopFaultInjector` rehearsing failures on this loop, if any."""
        self._update_pending = False
        self._decision: Decision | None = None
        self._remember_lrs()
        self.start(0)

    @property
    def stopped(self) -> bool:
        """The run could not be healed (see `give_up_reason`): end the loop."""
        return self.gave_up

    @property
    def last_decision(self) -> Decision | None:
        """What this step's `before_step`/`after_step` decided (None: nothing was wrong)."""
        return self._decision

    # ------------------------------------------------------------------------------------------
    # the step protocol
    # ------------------------------------------------------------------------------------------
    def before_step(self, loss: Any) -> bool:
        """Judge this step from its loss (a tensor or a float) and the gradients now in
        `.grad`. True: go on with `optimizer.step()`. False: the update is dropped (the
        gradients are set to None, so even a stray `optimizer.step()` leaves weights and state
        alone); the weights may have been rolled back. Under DDP call it on every rank."""
        if self.postmortem is not None:
            raise RuntimeError("Healer.before_step() after finish(): the postmortem is written; make a new Healer "
                               "for another run")
        loss = _scalar_loss(loss)
        self.step += 1
        self._decision = None
        self.begin_step()
        if self.faults is not None:
            loss = self.faults.before_step(self.step, loss)
        if self.gave_up:
            for p in self.model.parameters():
                p.grad = None
            self._update_pending = False
            return False
        signals = self.step_signals(self.step, loss, self._grad_norm())
        self._decision = self.judge_step(signals)
        self._update_pending = self._decision is None
        return self._update_pending

    def after_step(self) -> Decision | None:
        """After the update (or the skip): count a healthy step, check the weights and optimizer
        state when due (a corruption rolls back in place), take a snapshot when due."""
        if self.step == 0:
            raise RuntimeError("Healer.after_step() was called before any before_step(loss)")
        self.observe_step_time()
        decision = self.end_step(self.step)
        if decision is not None:
            self._decision = decision
        elif self._update_pending and self.scheduler is None:
            self._remember_lrs()
        self._update_pending = False
        if self.faults is not None:
            self.faults.before_forward(self.step + 1)
        return decision

    def finish(self, exit_reason: str | None = None, exception: BaseException | None = None) -> dict[str, Any]:
        """Build the postmortem and write it to `output_dir/postmortem.json` (rank 0 only);
        returns it. Called again, it returns the first one."""
        if self.postmortem is not None:
            return self.postmortem
        if exit_reason is None:
            exit_reason = "exception" if exception is not None else "gave_up" if self.gave_up else "completed"
        extra = {"faults_fired": list(self.faults.fired)} if self.faults is not None and self.faults.fired else None
        pm = self.build_postmortem(exit_reason, last_step=self.step, exception=exception,
                                   trainer_class="loop", extra=extra)
        self.postmortem = pm
        self.write_postmortem(pm, write=rank() == 0)
        return pm

    def __enter__(self) -> "Healer":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, KeyboardInterrupt):
            self.finish("interrupted", exception=exc)
        elif isinstance(exc, SystemExit) and exc.code in (0, None):  # the script ended itself, successfully
            self.finish()
        else:
            self.finish(exception=exc)
        return False  # the exception, if any, surfaces unchanged

    # ------------------------------------------------------------------------------------------
    # facts
    # ------------------------------------------------------------------------------------------
    def _grad_norm(self) -> torch.Tensor | None:
        """The pre-clip gradient norm, on device, without touching the gradients (DDP's are
        already all-reduced, so every rank measures the same norm). Under accelerate's fp16
        loss scaling the gradients are still scaled: the scale is divided out, not unscaled in
        place, so the user's own `clip_grad_norm_` still unscales exactly once."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return None
        if hasattr(torch.nn.utils, "get_total_norm"):
            norm = torch.nn.utils.get_total_norm(grads, 2.0)
        else:  # torch < 2.6
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads]))
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            norm = norm / scaler.get_scale()
        return norm

    def _remember_lrs(self) -> None:
        """Without a scheduler, the LRs of the last healthy step are what an LR spike is judged
        against (a schedule the loop sets by hand moves them gradually; a x1000 jump is a bug)."""
        if self.scheduler is None:
            self.lr_reference = [float(g["lr"]) for g in unwrap_optimizer(self.optimizer).param_groups]


__all__ = ["Healer", "Decision"]
