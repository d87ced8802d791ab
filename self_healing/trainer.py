"""`SelfHealingTrainer`: the retry orchestrator around any transformers/TRL trainer.

Most failures are healed inside the running `train()` call by the callback (skip the step, roll
back in place, cut the LR, skip a bad batch, retry a flaky read). What escapes it as an exception
comes here: it is diagnosed; a healable one (OOM, a transient I/O or network error, a full disk,
a data error outside the loop) is healed and training re-entered from the last good state; a bug
is not retried, leaves an `exception` postmortem and propagates. `KeyboardInterrupt` is never
healed. SIGTERM/SIGUSR1 (preemption) finish the step, checkpoint, and exit; the same command run
again resumes from the newest *verified* checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import compat
from .callback import SelfHealingCallback, free_memory
from .checkpoints import (free_disk_space, latest_verified_checkpoint, preemption_checkpoint, verify_checkpoint,
                          write_resume_checkpoint)
from .config import HealingConfig
from .diagnosis import Action, Diagnosis, FailureKind, diagnose_exception, exception_origin
from .distributed import RankFailure, recover_fsdp_iteration
from .postmortem import load_postmortem
from .snapshot import _rng_state, _set_rng_state
from .watchdog import PreemptedInEvaluation, fast_state_info

logger = logging.getLogger("self_healing")

_RESUMABLE_EXITS = ("interrupted", "exception", "killed", "hung")


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


class SelfHealingTrainer:
    """Wrap a trainer in one line::

        result = SelfHealingTrainer(trainer, HealingConfig.aggressive()).train()

    `train()` returns what `trainer.train()` returns. Attributes the wrapper does not define are
    read from the wrapped trainer, so `sh.model`, `sh.state`, `sh.save_model()` work as before.
    """

    def __init__(self, trainer: Any, config: HealingConfig | str | None = None,
                 callback: SelfHealingCallback | None = None) -> None:
        if isinstance(config, str):
            config = HealingConfig.from_preset(config)
        if config is not None and not isinstance(config, HealingConfig):
            raise ValueError(f"config must be a HealingConfig, a preset name or a YAML path, got {type(config).__name__}")
        self.trainer = trainer
        self.config = config or HealingConfig()
        self.postmortem: dict[str, Any] | None = None
        # `callback`: attached without a wrapper, this orchestrator runs inside its `trainer.train`
        self.callback = callback or SelfHealingCallback(self.config).attach(trainer, orchestrated=True)
        self.callback.orchestrator = self

    def __getattr__(self, name: str) -> Any:
        if name == "trainer":  # during unpickling / before __init__
            raise AttributeError(name)
        return getattr(self.trainer, name)

    @property
    def exit_reason(self) -> str | None:
        return self.postmortem["exit_reason"] if self.postmortem else None

    # ------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Run `trainer.train()` until it completes, is preempted, or healing gives up."""
        cb = self.callback
        if cb.trainer is self.trainer and cb not in self.trainer.callback_handler.callbacks:
            # taken out with `trainer.remove_callback(...)`: the plugin is off, wholly
            logger.warning("self-healing: the plugin was removed from the trainer's callbacks; it is detached and "
                           "this run is NOT protected")
            cb.detach()
            return self.trainer.train(resume_from_checkpoint, *args, **kwargs)
        if cb.trainer is not self.trainer:
            raise RuntimeError("this self-healing plugin was replaced by one attached later to the same trainer "
                               "(or detached); call train() through the newest one")
        if cb.orchestrator_active:  # train() called from inside training (a callback): no second layer
            return self._train_once(resume_from_checkpoint, *args, **kwargs)
        cb.start_run()  # a fresh train(): nothing of an earlier call's run carries over
        resume = resume_from_checkpoint
        self._recover_killed_run()  # a run that died without a postmortem left its crash journal
        if resume is None and self.config.auto_resume:
            resume = self._auto_resume_target()
        cb.orchestrator_active = True
        try:
            with self._preemption_handlers():
                while True:
                    try:
                        result = self._train_once(resume, *args, **kwargs)
                        break
                    except PreemptedInEvaluation:  # a preemption signal aborted an evaluation (self_healing.watchdog)
                        result = self._gave_up_output()
                        break
                    except KeyboardInterrupt as exc:
                        self.postmortem = cb.finish("interrupted", exception=exc)
                        logger.warning("self-healing: interrupted at step %s; postmortem written",
                                       self.postmortem["last_step"])
                        raise
                    except Exception as exc:
                        resume = self._heal_exception(exc)
                        if resume is _GAVE_UP:
                            return self._gave_up_output()
            if cb.preempted_at is not None:
                return self._finish_preempted(result)
            self.postmortem = cb.finish("gave_up" if cb.gave_up else "completed")
            if cb.gave_up:
                logger.error("self-healing: gave up: %s. The last verified-good weights are loaded; see %s",
                             cb.give_up_reason, self.config.resolved_postmortem_path(self.trainer.args.output_dir))
            return result
        finally:
            cb.orchestrator_active = False

    def _train_once(self, resume: Any, *args: Any, **kwargs: Any) -> Any:
        inner = self.callback.inner_train
        return inner(resume, *args, **kwargs) if args else inner(resume_from_checkpoint=resume, **kwargs)

    # ------------------------------------------------------------------------------------------
    # exceptions that escaped the training loop
    # ------------------------------------------------------------------------------------------
    def _heal_exception(self, exc: Exception) -> Any:
        cb, t = self.callback, self.trainer
        cb.phase = "train"
        origin = exception_origin(exc) or "trainer"  # untagged: the loop itself, a callback, validation
        phase = origin if origin in ("eval", "save") else "train"
        step = getattr(t.state, "global_step", 0)
        recover_fsdp_iteration(t.model)
        state_det = None
        if t.optimizer is not None:  # a RankFailure has every rank here together: judge every rank's shard
            state_det = cb.engine.check_state(step, agreed=isinstance(exc, RankFailure))[1]
        d = diagnose_exception(exc, step=step + 1, state=state_det, phase=phase, origin=origin)
        if d.failure == FailureKind.DATA_ERROR and cb.streamed_data and origin in ("data", "collate"):
            d.healable = False  # resuming would re-read the stream up to the same batch
            d.summary += (" — the training data is a stream (an iterable dataset): its batches cannot be skipped "
                          "in place, so the error is raised unchanged")
        if not d.healable:
            self.postmortem = cb.finish("exception", exception=exc, extra={"diagnosis": d.to_dict()})
            logger.error("self-healing: %s; postmortem written", d.summary)
            raise exc
        plan = cb.policy.plan(d, step + 1, can_rollback=cb.ring.latest_verified() is not None)
        details: dict[str, Any] = {"phase": phase}
        actions = [a for a in plan.actions]
        if Action.GIVE_UP not in actions:
            if d.failure == FailureKind.OOM:
                free_memory(t.model)
                traceback.clear_frames(exc.__traceback__)  # the failed step's activations live in its frames
                if phase == "train":
                    change = self._reduce_batch()
                    if change is None:
                        actions = [Action.GIVE_UP]
                        plan.reason = ("out of memory at per-device batch 1 with gradient checkpointing on: "
                                       "a smaller model, shorter sequences or more memory is needed")
                    else:
                        details["batch"] = change
                        actions = [Action(change.pop("action"))]
                else:
                    details["eval_batch"] = self._reduce_eval_batch()
                    if details["eval_batch"] is None:
                        actions = [Action.GIVE_UP]
                        plan.reason = "out of memory in evaluation at per-device eval batch 1"
            elif d.failure == FailureKind.API_ERROR and d.evidence.get("enospc"):
                freed = free_disk_space(t.args.output_dir)
                details["freed"] = freed
                if not freed:
                    actions = [Action.GIVE_UP]
                    plan.reason = ("disk full, and nothing of the plugin's own (half-written or superseded "
                                   "checkpoints) is left to free; no verified checkpoint was deleted")
            elif d.failure == FailureKind.API_ERROR:
                details["backoff_seconds"] = round(cb.engine.backoff(cb.policy.attempts, d, step + 1), 3)
        if Action.GIVE_UP in actions:
            cb.engine.emit(step + 1, d, [Action.GIVE_UP.value], details, plan.reason, message="")
            cb.gave_up = True
            cb.give_up_reason = f"{d.failure.value}: {plan.reason or d.summary}"
            self.postmortem = cb.finish("gave_up", exception=exc)
            logger.error("self-healing: gave up: %s", cb.give_up_reason)
            return _GAVE_UP
        corrupted = d.failure in (FailureKind.WEIGHT_CORRUPTION, FailureKind.OPTIMIZER_STATE_CORRUPTION,
                                  FailureKind.NAN_LOSS)
        # A data error that escaped the loop (the dataset itself raised) would come back at the
        # same position: resume one step further on, past that batch.
        skip = 1 if d.failure == FailureKind.DATA_ERROR else 0
        if skip:
            cb.engine.note_skipped_batch(exc, phase, None, step + 1)
        resume, where = self._resume_point(prefer_current=not corrupted, skip_steps=skip,
                                           agreed=isinstance(exc, RankFailure))
        details["resume_from"] = where
        cb.engine.emit(step + 1, d, [a.value for a in actions] + [Action.RESUME.value], details, plan.reason,
                       message="")  # logged below, with where it resumes from
        cb.recorder.counters["exceptions_healed"] += 1
        logger.warning("self-healing: step %s: %s -> %s, resuming from %s", step + 1, d.summary,
                       ", ".join(a.value for a in actions), where)
        return resume

    def _resume_point(self, prefer_current: bool, skip_steps: int = 0, agreed: bool = False) -> tuple[str | None, str]:
        """Write a checkpoint of the last good state and return its path. The current state is
        used when it checks out (no work lost); else the newest verified snapshot."""
        cb, t = self.callback, self.trainer
        if t.optimizer is None:
            return None, "the start (no training state existed yet)"
        step = t.state.global_step
        if prefer_current:
            if cb.engine.check_state(step, agreed=agreed)[1] is None:
                self._reset_generation_buffers()
                for _ in range(skip_steps):  # the schedule stays aligned with the data skipped
                    t.lr_scheduler.step()
                where = f"the current state at step {step}" + (f", skipping step {step + 1}'s data" if skip_steps else "")
                return str(write_resume_checkpoint(t, step + skip_steps)), where
        snap = cb.ring.latest_verified()
        if snap is None:
            return None, "the start (no verified snapshot)"
        cb.ring.restore(snap, t.model, t.optimizer, t.lr_scheduler, restore_scheduler=True, restore_rng=True)
        cb.engine.restore_plugin_state(snap)
        self._reset_generation_buffers()
        path = write_resume_checkpoint(t, snap.step, extra_state=snap.extra.get("trainer_state"))
        cb.recorder.counters["steps_lost"] += max(step - snap.step, 0)
        return str(path), f"the verified snapshot at step {snap.step}"

    def _reset_generation_buffers(self) -> None:
        """GRPO/RLOO buffer a generation batch across micro-steps; after a resume (and maybe a new
        batch split) it must be regenerated, as on a fresh resume from disk."""
        compat.reset_generation_buffers(self.trainer)

    def _reduce_batch(self) -> dict[str, Any] | None:
        """Halve the per-device batch and multiply gradient accumulation so the effective batch
        is unchanged; at batch 1, turn on gradient checkpointing; past that, None."""
        args = self.trainer.args
        bs, ga = int(args.per_device_train_batch_size), int(args.gradient_accumulation_steps)
        if bs > 1:
            new_bs = max(d for d in range(1, bs // 2 + 1) if bs % d == 0)
            k = bs // new_bs
            args.per_device_train_batch_size = new_bs
            args.gradient_accumulation_steps = ga * k
            spg = getattr(args, "steps_per_generation", None)
            if isinstance(spg, int) and spg > 0:  # GRPO/RLOO: the generation batch stays the same size
                args.steps_per_generation = spg * k
            compat.set_train_batch_size(self.trainer, new_bs * max(1, int(getattr(args, "n_gpu", 1) or 1)))
            change = {"action": Action.REDUCE_BATCH.value, "per_device_train_batch_size": [bs, new_bs],
                      "gradient_accumulation_steps": [ga, ga * k], "effective_batch": [bs * ga, new_bs * ga * k]}
            if new_bs != bs // 2:
                change["note"] = (f"{bs} does not halve evenly: {new_bs} x {ga * k} is the nearest split that "
                                  "keeps the effective batch")
            if isinstance(spg, int) and spg > 0:
                change["steps_per_generation"] = [spg, spg * k]
                gbs = getattr(args, "generation_batch_size", None)
                ng = getattr(args, "num_generations", None)
                if gbs and ng:
                    change["generation_batch_size"] = gbs
                    change["note"] = (change.get("note", "") + f" generation batch {gbs} unchanged, still divisible "
                                      f"by num_generations={ng}").strip()
            return change
        for name in ("activation_checkpointing", "gradient_checkpointing"):
            if hasattr(args, name):
                if getattr(args, name):
                    return None
                setattr(args, name, True)
                return {"action": Action.ENABLE_GRADIENT_CHECKPOINTING.value, "per_device_train_batch_size": [1, 1],
                        name: True}
        return None

    def _reduce_eval_batch(self) -> dict[str, Any] | None:
        args = self.trainer.args
        bs = int(args.per_device_eval_batch_size)
        if bs <= 1:
            return None
        args.per_device_eval_batch_size = bs // 2
        return {"per_device_eval_batch_size": [bs, bs // 2], "training_batch": "unchanged"}

    def _gave_up_output(self) -> Any:
        from transformers.trainer_utils import TrainOutput

        return TrainOutput(self.trainer.state.global_step, math.nan, {})

    # ------------------------------------------------------------------------------------------
    # preemption and auto-resume
    # ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _preemption_handlers(self) -> Iterator[None]:
        installed: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.config.preemption_signals:
                sig = getattr(signal, name)
                try:
                    installed[sig] = signal.signal(sig, self._on_signal)
                except (ValueError, OSError) as e:
                    logger.warning("self-healing: cannot handle %s here (%s)", name, e)
        else:
            logger.info("self-healing: not in the main thread; preemption signals are left to the default handlers")
        try:
            yield
        finally:
            for sig, old in installed.items():
                signal.signal(sig, old)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.callback.preempt_signal is None:
            logger.warning("self-healing: %s received; stopping after the current step", signal.Signals(signum).name)
        self.callback.preempt_signal = signum
        if self.callback.watchdog is not None:  # the grace (preemption_grace_seconds) starts now
            self.callback.watchdog.watchdog.on_preempt_signal()

    def _finish_preempted(self, result: Any) -> Any:
        cb, t = self.callback, self.trainer
        wd = cb.watchdog.watchdog if cb.watchdog is not None else None
        if wd is not None:
            wd.beat("preemption")
        # the Trainer's checkpoint, or (save_only_model=True, a save cut short or skipped) a resume one of
        # the plugin's: full when the run's own save time fits in the grace left, else the fastest state
        deadline, full = wd.save_plan() if wd is not None else (None, None)
        ckpt, why = preemption_checkpoint(t, cb.preempted_at, deadline=deadline, full_seconds=full)
        name = signal.Signals(cb.preempt_signal).name
        extra = {"signal": name, "checkpoint": str(ckpt) if ckpt else None, "checkpoint_problem": why}
        if wd is not None and wd.preempt_time is not None:  # signal -> verified checkpoint on disk
            took = time.monotonic() - wd.preempt_time
            extra["preemption"] = {"seconds_to_checkpoint": round(took, 3),
                                   "grace_seconds": self.config.preemption_grace_seconds,
                                   "within_grace": took <= self.config.preemption_grace_seconds,
                                   "evaluation_aborted": bool(cb.recorder.extra.pop("evaluation_aborted", False)),
                                   "estimate_at_signal": wd.grace_estimate,
                                   "fast_state": fast_state_info(ckpt)}
        self.postmortem = cb.finish("interrupted", extra=extra)
        if ckpt is None:
            logger.error("self-healing: %s: NO resumable checkpoint of step %s (%s): a relaunch cannot resume this "
                         "run's step; postmortem written; exiting", name, cb.preempted_at, why)
        else:
            logger.warning("self-healing: %s: checkpoint %s written, postmortem written; exiting", name, ckpt)
        if self.config.exit_on_preemption:
            raise SystemExit(128 + int(cb.preempt_signal))
        return result

    def _recover_killed_run(self) -> None:
        """SIGKILL, the OOM killer or a segfault leave no postmortem but an unclosed crash journal:
        write that run's postmortem (`exit_reason: "killed"`) from it, so auto-resume sees it."""
        from .journal import recover_killed_run

        args = self.trainer.args
        if getattr(args, "should_save", True):
            try:
                recover_killed_run(args.output_dir, self.config.resolved_postmortem_path(args.output_dir))
            except Exception as exc:  # noqa: BLE001 - a damaged journal must not stop a new run
                logger.warning("self-healing: could not read the crash journal in %s (%s: %s)", args.output_dir,
                               type(exc).__name__, exc)
        from .distributed import barrier

        barrier()  # every rank reads the postmortem written here before it decides where to resume

    def _auto_resume_target(self) -> str | None:
        out = self.trainer.args.output_dir
        try:
            prev = load_postmortem(self.config.resolved_postmortem_path(out))
        except ValueError:
            return None
        if prev.get("exit_reason") not in _RESUMABLE_EXITS:
            return None
        ckpt, skipped = latest_verified_checkpoint(out)
        self.callback.recorder.extra["resumed"] = {"previous_exit_reason": prev.get("exit_reason"),
                                                   "from": str(ckpt) if ckpt else None, "skipped": skipped,
                                                   "previous_last_step": prev.get("last_step")}
        fast = fast_state_info(ckpt)
        if fast is not None:  # written at a preemption whose grace could not hold a full checkpoint
            self.callback.recorder.extra["resumed"]["not_restored"] = fast["omitted"]
            if fast.get("not_saved"):
                logger.warning("self-healing: resuming from a fast resumable state: %s", fast["not_saved"])
        if ckpt is None:
            logger.warning("self-healing: the last run in %s ended with %r but left no verified checkpoint; "
                           "starting from scratch", out, prev.get("exit_reason"))
            return None
        logger.warning("self-healing: the last run in %s ended with %r; resuming from %s", out,
                       prev.get("exit_reason"), ckpt)
        return str(ckpt)

    # ------------------------------------------------------------------------------------------
    # dry run
    # ------------------------------------------------------------------------------------------
    def dry_run(self, num_steps: int = 2, find_max_batch_size: bool = False) -> DryRunReport:
        """Run `num_steps` real steps on a throwaway copy of the state and report what would stop
        the real run: an OOM at this batch size (and, when asked, the largest batch that fits), a
        collator or tokenizer error, a reward function that raises, an unwritable `output_dir`.
        Weights, optimizer state, RNG, data position and `global_step` are left bit-identical."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"dry_run num_steps={num_steps!r} is not accepted: expected an integer >= 1")
        t, cb = self.trainer, self.callback
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
                                self._reduce_batch()  # the same split the real run would take
                                saved.reset_for_retry(t)
                                self._reset_generation_buffers()
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


_GAVE_UP = object()


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
        self.rng = _rng_state()
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
        _set_rng_state(self.rng)
        for p in t.model.parameters():
            p.grad = None
