"""What `SelfHealingTrainer` does around `train()` besides healing exceptions: apply a batch cut
the engine decided, finish a preempted run (checkpoint, postmortem), write the postmortem of a
run that was killed without one, and find the checkpoint an auto-resume starts from. Module
functions over a Trainer and its `SelfHealingCallback` (their public members only).
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

from . import compat
from .checkpoints import latest_verified_checkpoint, preemption_checkpoint
from .config import HealingConfig
from .decider import BatchChange, EvalBatchChange
from .postmortem import load_postmortem
from .watchdog import fast_state_info

logger = logging.getLogger("self_healing")

RESUMABLE_EXITS = ("interrupted", "exception", "killed", "hung")
"""The exit reasons of a previous run that `auto_resume` resumes from."""


def apply_batch_change(trainer: Any, change: BatchChange) -> None:
    """Set the batch the engine decided on the Trainer's args (and its batch size)."""
    args = trainer.args
    if change.enable is not None:  # at batch 1: gradient checkpointing on
        setattr(args, change.enable, True)
        return
    args.per_device_train_batch_size = change.per_device_train_batch_size
    args.gradient_accumulation_steps = change.gradient_accumulation_steps
    if change.steps_per_generation is not None:  # GRPO/RLOO: the generation batch stays the same size
        args.steps_per_generation = change.steps_per_generation
    compat.set_train_batch_size(trainer, change.per_device_train_batch_size
                                * max(1, int(getattr(args, "n_gpu", 1) or 1)))


def apply_eval_batch_change(trainer: Any, change: EvalBatchChange) -> None:
    trainer.args.per_device_eval_batch_size = change.per_device_eval_batch_size


def finish_preempted(cb: Any, trainer: Any, config: HealingConfig) -> dict[str, Any]:
    """The run stopped at a preemption signal: the checkpoint a relaunch resumes from (the
    Trainer's, or a resume one of the plugin's), then the postmortem; returns it."""
    wd = cb.watchdog.watchdog if cb.watchdog is not None else None
    if wd is not None:
        wd.beat("preemption")
    # the Trainer's checkpoint, or (save_only_model=True, a save cut short or skipped) a resume one of
    # the plugin's: full when the run's own save time fits in the grace left, else the fastest state
    deadline, full = wd.save_plan() if wd is not None else (None, None)
    ckpt, why = preemption_checkpoint(trainer, cb.preempted_at, deadline=deadline, full_seconds=full)
    name = signal.Signals(cb.preempt_signal).name
    extra = {"signal": name, "checkpoint": str(ckpt) if ckpt else None, "checkpoint_problem": why}
    if wd is not None and wd.preempt_time is not None:  # signal -> verified checkpoint on disk
        took = time.monotonic() - wd.preempt_time
        extra["preemption"] = {"seconds_to_checkpoint": round(took, 3),
                               "grace_seconds": config.preemption_grace_seconds,
                               "within_grace": took <= config.preemption_grace_seconds,
                               "evaluation_aborted": bool(cb.recorder.extra.pop("evaluation_aborted", False)),
                               "estimate_at_signal": wd.grace_estimate,
                               "fast_state": fast_state_info(ckpt)}
    pm = cb.finish("interrupted", extra=extra)
    if ckpt is None:
        logger.error("self-healing: %s: NO resumable checkpoint of step %s (%s): a relaunch cannot resume this "
                     "run's step; postmortem written; exiting", name, cb.preempted_at, why)
    else:
        logger.warning("self-healing: %s: checkpoint %s written, postmortem written; exiting", name, ckpt)
    return pm


def recover_killed_run(trainer: Any, config: HealingConfig) -> None:
    """SIGKILL, the OOM killer or a segfault leave no postmortem but an unclosed crash journal:
    write that run's postmortem (`exit_reason: "killed"`) from it, so auto-resume sees it."""
    from .journal import recover_killed_run as recover

    args = trainer.args
    if getattr(args, "should_save", True):
        try:
            recover(args.output_dir, config.resolved_postmortem_path(args.output_dir))
        except Exception as exc:  # noqa: BLE001 - a damaged journal must not stop a new run
            logger.warning("self-healing: could not read the crash journal in %s (%s: %s)", args.output_dir,
                           type(exc).__name__, exc)
    from .distributed import barrier

    barrier()  # every rank reads the postmortem written here before it decides where to resume


def auto_resume_target(trainer: Any, config: HealingConfig, recorder: Any) -> str | None:
    """The newest verified checkpoint when the last run in `output_dir` ended resumably (what
    was found goes to `recorder.extra["resumed"]`); None: start as asked."""
    out = trainer.args.output_dir
    try:
        prev = load_postmortem(config.resolved_postmortem_path(out))
    except ValueError:
        return None
    if prev.get("exit_reason") not in RESUMABLE_EXITS:
        return None
    ckpt, skipped = latest_verified_checkpoint(out)
    recorder.extra["resumed"] = {"previous_exit_reason": prev.get("exit_reason"),
                                 "from": str(ckpt) if ckpt else None, "skipped": skipped,
                                 "previous_last_step": prev.get("last_step")}
    fast = fast_state_info(ckpt)
    if fast is not None:  # written at a preemption whose grace could not hold a full checkpoint
        recorder.extra["resumed"]["not_restored"] = fast["omitted"]
        if fast.get("not_saved"):
            logger.warning("self-healing: resuming from a fast resumable state: %s", fast["not_saved"])
    if ckpt is None:
        logger.warning("self-healing: the last run in %s ended with %r but left no verified checkpoint; "
                       "starting from scratch", out, prev.get("exit_reason"))
        return None
    logger.warning("self-healing: the last run in %s ended with %r; resuming from %s", out,
                   prev.get("exit_reason"), ckpt)
    return str(ckpt)


__all__ = ["RESUMABLE_EXITS", "apply_batch_change", "apply_eval_batch_change", "finish_preempted",
           "recover_killed_run", "auto_resume_target"]
