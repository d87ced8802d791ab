"""`SelfHealingTrainer.dry_run`: a few real steps on a throwaway copy of the state, to find what
would stop the real run (an OOM at this batch size and the largest batch that fits, a collator
or tokenizer error, a reward function that raises, an unwritable `output_dir`) before it starts.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import compat
from .callback import free_memory
from .decider import BatchFacts, plan_batch_cut
from .diagnosis import FailureKind, diagnose_exception, exception_origin
from .orchestration import apply_batch_change
from .snapshot import rng_state, set_rng_state

logger = logging.getLogger("self_healing")


@dataclass
class DryRunReport:
    """What `dry_run()` found. `ok` is False when anything would stop the real run."""

    ok: bool
    steps_run: int
    seconds: float
    problems: list[dict[str, Any]] = field(default_factory=list)
    max_batch_size: int | None = None
    """Largest per-device batch that ran, when asked with `find_max_batch_size=True`."""

    def __str__(self) -> str:
        head = "dry run ok" if self.ok else f"dry run found {len(self.problems)} problem(s)"
        lines = [f"{head} ({self.steps_run} steps, {self.seconds:.1f}s)"]
        lines += [f"  - {p['failure']}: {p['summary']}" for p in self.problems]
        if self.max_batch_size is not None:
            lines.append(f"  largest per-device batch that fits: {self.max_batch_size}")
        return "\n".join(lines)


def run_dry(cb: Any, t: Any, num_steps: int = 2, find_max_batch_size: bool = False) -> DryRunReport:
    """Run `num_steps` real steps on a throwaway copy of the state and report what would stop
    the real run: an OOM at this batch size (and, when asked, the largest batch that fits), a
    collator or tokenizer error, a reward function that raises, an unwritable `output_dir`.
    Weights, optimizer state, RNG, data position and `global_step` are left bit-identical."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"dry_run num_steps={num_steps!r} is not accepted: expected an integer >= 1")
    start = time.time()
    problems: list[dict[str, Any]] = []
    problem = _output_dir_problem(t.args.output_dir)
    if problem:
        problems.append({"failure": "api_error", "phase": "setup", "summary": problem})
    saved = _TrainerSnapshot(t)
    max_bs = None
    steps_run = 0
    try:
        with tempfile.TemporaryDirectory(prefix="self-healing-dry-run-") as tmp:
            _dry_args(t.args, num_steps, tmp)
            t.callback_handler.callbacks = [c for c in saved.callbacks if type(c).__name__ == "DefaultFlowCallback"]
            cb.set_passthrough(True)
            while True:
                try:
                    cb.inner_train()
                    steps_run = t.state.global_step
                    if find_max_batch_size:
                        max_bs = t.args.per_device_train_batch_size
                    break
                except Exception as exc:  # noqa: BLE001 - every failure is a finding
                    d = diagnose_exception(exc, origin=exception_origin(exc) or "trainer")
                    cb.phase = "train"
                    entry = {"failure": d.failure.value, "phase": d.evidence.get("phase"), "summary": d.summary,
                             "exception_type": type(exc).__name__,
                             "batch_size": t.args.per_device_train_batch_size}
                    problems.append(entry)
                    if d.failure == FailureKind.OOM:
                        free_memory(t.model)
                        traceback.clear_frames(exc.__traceback__)
                        if find_max_batch_size and t.args.per_device_train_batch_size > 1:
                            change = plan_batch_cut(BatchFacts.from_args(t.args))  # the split the real run would take
                            if change is not None:  # always, above batch 1
                                apply_batch_change(t, change)
                            saved.reset_for_retry(t)
                            compat.reset_generation_buffers(t)
                            continue
                    break
    finally:
        cb.set_passthrough(False)
        saved.restore(t)
    if find_max_batch_size and max_bs is None and any(p["failure"] == "oom" for p in problems):
        max_bs = 0
    report = DryRunReport(ok=not problems, steps_run=steps_run, seconds=time.time() - start, problems=problems,
                          max_batch_size=max_bs)
    logger.warning("self-healing: %s", report)
    return report


def _output_dir_problem(output_dir: str) -> str | None:
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".self-healing-probe-"):
            pass
    except OSError as e:
        return f"output_dir {output_dir!r} is not writable ({e.strerror or e}): checkpoints and the postmortem would be lost"
    return None


_DRY_ARG_FIELDS = ("max_steps", "output_dir", "save_strategy", "eval_strategy", "logging_steps", "report_to",
                   "load_best_model_at_end", "push_to_hub", "per_device_train_batch_size", "eval_on_start",
                   "logging_strategy", "gradient_accumulation_steps", "steps_per_generation")


def _dry_args(args: Any, num_steps: int, tmp: str) -> None:
    values = {"max_steps": num_steps, "output_dir": tmp, "save_strategy": "no", "eval_strategy": "no",
              "load_best_model_at_end": False, "push_to_hub": False, "eval_on_start": False}
    for k, v in values.items():
        if hasattr(args, k):
            setattr(args, k, v)


class _TrainerSnapshot:
    """Everything `dry_run` may touch, kept aside and put back exactly."""

    def __init__(self, t: Any) -> None:
        import torch

        self.weights = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
        self.optimizer = t.optimizer
        self.opt_state = copy.deepcopy(t.optimizer.state_dict()) if t.optimizer is not None else None
        self.scheduler = t.lr_scheduler
        self.sched_state = copy.deepcopy(t.lr_scheduler.state_dict()) if t.lr_scheduler is not None else None
        self.created_scheduler = compat.created_lr_scheduler(t)
        self.state = copy.deepcopy(t.state)
        self.control = copy.deepcopy(t.control)
        self.callbacks = list(t.callback_handler.callbacks)
        self.args = {k: getattr(t.args, k) for k in _DRY_ARG_FIELDS if hasattr(t.args, k)}
        self.train_batch_size = compat.train_batch_size(t)
        self.rng = rng_state()
        self.extra = {k: copy.deepcopy(getattr(t, k)) for k in compat.TRAINER_EXTRA_STATE if hasattr(t, k)}
        self.model_wrapped = getattr(t, "model_wrapped", None)
        self._torch = torch

    def reset_for_retry(self, t: Any) -> None:
        with self._torch.no_grad():
            for k, v in t.model.state_dict().items():
                v.copy_(self.weights[k])
        t.optimizer, t.lr_scheduler = self.optimizer, self.scheduler
        if self.opt_state is not None:
            t.optimizer.load_state_dict(copy.deepcopy(self.opt_state))

    def restore(self, t: Any) -> None:
        self.reset_for_retry(t)
        if self.opt_state is None:
            t.optimizer = None
        if self.sched_state is not None:
            t.lr_scheduler.load_state_dict(copy.deepcopy(self.sched_state))
        else:
            t.lr_scheduler = None
        if self.created_scheduler is not None:
            compat.set_created_lr_scheduler(t, self.created_scheduler)
        t.state = self.state
        t.control = self.control
        t.callback_handler.callbacks = self.callbacks
        for k, v in self.args.items():
            setattr(t.args, k, v)
        if self.train_batch_size is not None:
            compat.set_train_batch_size(t, self.train_batch_size)
        for k, v in self.extra.items():
            setattr(t, k, v)
        if self.model_wrapped is not None:
            t.model_wrapped = self.model_wrapped
        t.is_in_train = False
        set_rng_state(self.rng)
        for p in t.model.parameters():
            p.grad = None


__all__ = ["DryRunReport", "run_dry"]
