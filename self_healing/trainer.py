"""`SelfHealingTrainer`: the retry orchestrator around any transformers/TRL trainer.

Most failures are healed inside the running `train()` call by the callback (skip the step, roll
back in place, cut the LR, skip a bad batch, retry a flaky read). What escapes it as an exception
comes here: it is diagnosed; a healable one (OOM, a transient I/O or network error, a full disk,
a data error outside the loop) is healed and training re-entered from the last good state; a bug
is not retried, leaves an `exception` postmortem and propagates. `KeyboardInterrupt` is never
healed. SIGTERM/SIGUSR1 (preemption) finish the step, checkpoint, and exit; the same command run
again resumes from the newest *verified* checkpoint.

The decision about an exception is the engine's (`Healer.decide_exception`, given the plain
facts); this orchestrator applies it (frees memory, sets the batch, frees disk, writes the resume
checkpoint) and re-enters `train()`. Preemption finish, killed-run recovery and the auto-resume
target live in `self_healing.orchestration`, the dry run in `self_healing.dry_run`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import traceback
from typing import Any, Iterator

from . import compat
from .callback import SelfHealingCallback, free_memory
from .checkpoints import free_disk_space, write_resume_checkpoint
from .config import HealingConfig
from .decider import BatchFacts, ExceptionFacts
from .diagnosis import exception_origin
from .distributed import RankFailure, recover_fsdp_iteration
from .dry_run import DryRunReport, run_dry  # noqa: F401 - DryRunReport importable from here as before
from .orchestration import (apply_batch_change, apply_eval_batch_change, auto_resume_target, finish_preempted,
                            recover_killed_run)
from .watchdog import PreemptedInEvaluation

logger = logging.getLogger("self_healing")


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
    # exceptions that escaped the training loop: the engine decides, this applies
    # ------------------------------------------------------------------------------------------
    def _heal_exception(self, exc: Exception) -> Any:
        cb, t = self.callback, self.trainer
        cb.phase = "train"
        step = getattr(t.state, "global_step", 0)
        recover_fsdp_iteration(t.model)
        state_det = None
        if t.optimizer is not None:  # a RankFailure has every rank here together: judge every rank's shard
            state_det = cb.engine.check_state(step, agreed=isinstance(exc, RankFailure))[1]
        facts = ExceptionFacts(exc, step + 1, origin=exception_origin(exc) or "trainer",  # untagged: the loop
                               state=state_det, can_rollback=cb.ring.latest_verified() is not None,
                               streamed_data=cb.streamed_data, batch=BatchFacts.from_args(t.args))
        decision = cb.engine.decide_exception(facts)
        if decision.raise_unchanged:  # a bug (or a stream that cannot skip its bad batch): surfaces as it was
            self.postmortem = cb.finish("exception", exception=exc, extra={"diagnosis": decision.diagnosis.to_dict()})
            logger.error("self-healing: %s; postmortem written", decision.diagnosis.summary)
            raise exc
        if decision.free_memory:
            free_memory(t.model)
            traceback.clear_frames(exc.__traceback__)  # the failed step's activations live in its frames
        if decision.batch is not None:
            apply_batch_change(t, decision.batch)
        if decision.eval_batch is not None:
            apply_eval_batch_change(t, decision.eval_batch)
        if decision.free_disk:
            decision = cb.engine.disk_freed(decision, free_disk_space(t.args.output_dir))
        decision = cb.engine.apply_exception(decision)  # backs off, or records the give-up
        if decision.stop:
            self.postmortem = cb.finish("gave_up", exception=exc)
            logger.error("self-healing: gave up: %s", cb.give_up_reason)
            return _GAVE_UP
        resume, where = self._resume_point(prefer_current=decision.resume.prefer_current,
                                           skip_steps=decision.resume.skip_steps, agreed=decision.resume.agreed)
        cb.engine.record_resume(decision, where)
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
        """Runs in the training thread between two of its bytecodes, wherever it was: it only sets
        flags, and nothing it does may raise there (a log line written while that thread was itself
        writing to stderr is a "reentrant call" RuntimeError, which would land in a postmortem write)."""
        first = self.callback.preempt_signal is None
        self.callback.preempt_signal = signum
        if self.callback.watchdog is not None:  # the grace (preemption_grace_seconds) starts now
            self.callback.watchdog.watchdog.on_preempt_signal()
        if first:
            try:
                logger.warning("self-healing: %s received; stopping after the current step",
                               signal.Signals(signum).name)
            except Exception:  # noqa: BLE001 - the flags above are what matters
                pass

    def _finish_preempted(self, result: Any) -> Any:
        self.postmortem = finish_preempted(self.callback, self.trainer, self.config)
        if self.config.exit_on_preemption:
            raise SystemExit(128 + int(self.callback.preempt_signal))
        return result

    def _recover_killed_run(self) -> None:
        """A run that died without a postmortem (SIGKILL, the OOM killer) left its crash journal:
        its postmortem is written from it (`orchestration.recover_killed_run`)."""
        recover_killed_run(self.trainer, self.config)

    def _auto_resume_target(self) -> str | None:
        return auto_resume_target(self.trainer, self.config, self.callback.recorder)

    def dry_run(self, num_steps: int = 2, find_max_batch_size: bool = False) -> DryRunReport:
        """Run `num_steps` real steps on a throwaway copy of the state and report what would stop
        the real run: an OOM at this batch size (and, when asked, the largest batch that fits), a
        collator or tokenizer error, a reward function that raises, an unwritable `output_dir`.
        Weights, optimizer state, RNG, data position and `global_step` are left bit-identical."""
        return run_dry(self.callback, self.trainer, num_steps, find_max_batch_size)


_GAVE_UP = object()
