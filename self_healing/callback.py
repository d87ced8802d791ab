"""Trainer plumbing: translate the Trainer's events into calls to the engine (`Healer`), and
carry its decisions back to the Trainer.

transformers gives callbacks neither the loss nor the grad norm, and no event can skip an
optimizer step; its `on_pre_optimizer_step` fires after the Trainer already clipped. So `attach()`
also wraps Trainer methods *on the instance* (`hf_patches.TrainerPatches`: the step's loss, its
pre-clip norm, healable exceptions inside forward/backward, skipped batches).

The decision for a step is taken in `on_pre_optimizer_step`, after one host sync of (loss, norm),
before `optimizer.step()`: a skipped step sets every `.grad` to None so the optimizer leaves the
weights and its state untouched.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from . import compat
from .config import HealingConfig
from .detectors import StepMonitor, StepSignals
from .engine import Decision, Healer
from .facade import forwarded
from .hf_patches import GuardedCollator, SkippedBatch, TrainerPatches, free_memory, step_origin
from .plugin_parts import PluginParts
from .preemption import PreemptionAgreement
from .run_carryover import RunCarryOver
from .zclip import save_to_trainer_state

logger = logging.getLogger("self_healing")

_POLICY_LOSS_TRAINERS = ("GRPOTrainer", "RLOOTrainer")

__all__ = ["SelfHealingCallback", "trainer_kind", "free_memory", "step_origin", "GuardedCollator", "SkippedBatch"]


def trainer_kind(trainer: Any) -> str:
    """The nearest known TRL/transformers trainer class name in the trainer's MRO."""
    known = ("GRPOTrainer", "RLOOTrainer", "DPOTrainer", "KTOTrainer", "ORPOTrainer", "CPOTrainer", "RewardTrainer",
             "SFTTrainer", "DistillationTrainer", "Trainer")
    for cls in type(trainer).__mro__:
        if cls.__name__ in known:
            return cls.__name__
    return type(trainer).__name__


def _calling_trainer(callback: Any) -> Any:
    """The Trainer whose callback list holds `callback`, found on the call stack (during its
    `__init__` or `train`). None when there is none."""
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        handler = getattr(obj, "callback_handler", None)
        if handler is not None and hasattr(obj, "args") and any(c is callback for c in getattr(handler, "callbacks", [])):
            return obj
        frame = frame.f_back
    return None


class SelfHealingCallback(TrainerCallback):
    """Per-step detection and in-loop healing. Use through `SelfHealingTrainer`, or alone with
    `SelfHealingCallback(config).attach(trainer)` (then it writes the postmortem at train end).

    Only the translation lives here. The decider is `engine`; the wrapped Trainer methods and the
    step's facts they capture `patches`; monitors, tracker, journal, watchdog and early warning
    `parts`; the preemption flags `preemption`; what a resume must get back `carry`."""

    def __init__(self, config: HealingConfig | None = None) -> None:
        self.config = config or HealingConfig()
        self.trainer: Any = None
        self.engine = Healer(config=self.config, objects=self.live_objects,
                             device=lambda: self.trainer.args.device)
        self.patches = TrainerPatches(self)
        self.parts = PluginParts()
        self.preemption = PreemptionAgreement(self.engine)
        self.carry = RunCarryOver(self.config)
        self.orchestrated = False
        self.orchestrator: Any = None  # the SelfHealingTrainer that `trainer.train` runs through
        self.orchestrator_active = False  # its train() is running (it writes the postmortem then)
        self.postmortem: dict[str, Any] | None = None
        self._kind: str | None = None

    # the parts' state, under the names the rest of the plugin (and its users' code) reads
    recorder = forwarded("engine", "recorder")
    policy = forwarded("engine", "policy")
    ring = forwarded("engine", "ring")
    monitor = forwarded("engine", "monitor")
    zclip = forwarded("engine", "zclip")
    observers = forwarded("engine", "observers")
    gave_up = forwarded("engine", "gave_up")
    give_up_reason = forwarded("engine", "give_up_reason")
    snapshot_interval = forwarded("engine", "snapshot_interval")
    passthrough = forwarded("patches", "passthrough")  # during `dry_run` the wrappers only call through
    phase = forwarded("patches", "phase")  # "train", "eval" or "save": an OOM in eval keeps the batch size
    streamed_data = forwarded("patches", "streamed_data")  # a stream's bad batches cannot be skipped
    monitors = forwarded("parts", "monitors")
    tracker = forwarded("parts", "tracker")
    journal = forwarded("parts", "journal")
    watchdog = forwarded("parts", "watchdog")
    early_warning = forwarded("parts", "early_warning")
    preempt_signal = forwarded("preemption", "signal")
    preempted_at = forwarded("preemption", "at")

    def live_objects(self) -> tuple[Any, Any, Any]:
        """The trainer's (model, optimizer, scheduler) now: it creates and replaces them itself."""
        t = self.trainer
        return t.model, t.optimizer, t.lr_scheduler

    model = property(lambda self: self.trainer.model)
    optimizer = property(lambda self: self.trainer.optimizer)
    scheduler = property(lambda self: self.trainer.lr_scheduler)

    # ------------------------------------------------------------------------------------------
    # wiring
    # ------------------------------------------------------------------------------------------
    def attach(self, trainer: Any, orchestrated: bool = False) -> "SelfHealingCallback":
        """Install the plugin on `trainer`. Without `orchestrated` (the `SelfHealingTrainer`
        wrapper passes it), `trainer.train` itself is wrapped, so `.attach()` and
        `callbacks=[SelfHealingCallback(cfg)]` heal exceptions exactly like the wrapper does.
        A plugin attached earlier to the same trainer (a re-run notebook cell) is replaced."""
        if self.trainer is not None:
            if self.trainer is trainer:
                return self
            raise RuntimeError("this SelfHealingCallback is already attached to another trainer; "
                               "create one SelfHealingCallback per trainer")
        compat.check_trainer(trainer)  # an internal with no fallback: a clear error now, not a silent gap later
        for other in [c for c in trainer.callback_handler.callbacks
                      if isinstance(c, SelfHealingCallback) and c is not self]:
            if other.trainer is trainer:
                logger.warning("self-healing: this trainer already had a self-healing plugin; the new one replaces it "
                               "(attach once per trainer)")
                other.detach()
            elif other.trainer is None:  # an unattached callbacks=[...] instance would be a second plugin
                trainer.remove_callback(other)
        self.trainer = trainer
        self.orchestrated = orchestrated
        if getattr(trainer.args, "process_index", 0) != 0:
            logger.setLevel(logging.ERROR)  # one voice: the main process logs, the others only errors
        self._kind = kind = trainer_kind(trainer)
        self.engine.loss_signals = kind not in _POLICY_LOSS_TRAINERS
        self.engine.clip_args = trainer.args
        self.engine.output_dir = trainer.args.output_dir
        self.engine.extra_state = lambda: self.carry.trainer_counters(self.trainer)
        self.monitor = StepMonitor(self.config, loss_signals=self.engine.loss_signals)
        self.patches.install()
        if self.config.zclip_enabled:
            self.zclip = self.carry.new_zclip(trainer.args)
        self.patches.install_grad_norm()  # the Trainer's grad-norm hooks, or the accelerator's clip_grad_norm_
        self.orchestrator = None
        if not orchestrated:
            from .trainer import SelfHealingTrainer

            self.orchestrator = SelfHealingTrainer(trainer, self.config, callback=self)
        self.patches.install_train()  # whichever way it is called, train() runs through the orchestrator
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.parts.attach(self, trainer, kind)  # monitors, trackio, journal, watchdog, early warning
        return self

    def start_run(self) -> None:
        """A fresh `train()` call (a resume included: what belongs to a checkpoint comes back
        from it) starts from a clean slate: snapshots, escalation, detector windows, ZClip
        statistics, monitors and the postmortem of an earlier `train()` describe another run."""
        self.engine.reset()
        if self.zclip is not None:
            self.zclip = self.carry.new_zclip(self.trainer.args)
        self.postmortem = None
        self.preemption.reset()
        self.carry.reset()
        self.patches.reset_log_window()
        self.parts.start_run(self, self.trainer, self._kind)

    def on_init_end(self, args, state, control, **kwargs):
        """`Trainer(..., callbacks=[SelfHealingCallback(cfg)])`: the Trainer gives callbacks no
        reference to itself, so find the one whose `__init__` is calling us and attach to it."""
        trainer = _calling_trainer(self)
        if trainer is None:
            return control
        if self.trainer is None:
            self.attach(trainer)
        elif self.trainer is not trainer:
            # One instance handed to several Trainers (a sweep): each gets a plugin of its own with
            # this config, in this one's place in its callback list (the first keeps this one).
            handler = trainer.callback_handler.callbacks
            own = SelfHealingCallback(self.config)
            handler[next(i for i, c in enumerate(handler) if c is self)] = own
            own.attach(trainer)
        return control

    def guard_collator(self) -> None:
        """Kept for compatibility: the collator is guarded only while the training dataloader is built."""

    def set_passthrough(self, on: bool) -> None:
        self.passthrough = on

    def detach(self) -> None:
        """Undo `attach`: the trainer's methods and callback list are as they were."""
        self.patches.unwrap_all()
        for cb in [self] + self.parts.trainer_callbacks():
            if cb is not None and cb in self.trainer.callback_handler.callbacks:
                self.trainer.remove_callback(cb)
        self.observers.clear()
        self.trainer = None

    def wrap(self, name: str, factory) -> None:
        """Wrap the trainer's method `name` with `factory(orig)` so that `detach` undoes it; a method
        the plugin wrapped already gets the new layer on top (detach drops both)."""
        self.patches.wrap(name, factory)

    def is_wrapped(self, name: str) -> bool:
        return self.patches.is_wrapped(name)

    @property
    def inner_train(self) -> Any:
        """The Trainer's own `train` (the orchestrator calls it; `trainer.train` itself runs
        through the orchestrator)."""
        return self.patches.orig_train or self.trainer.train

    def preempt_now(self, step: int, control, signum: int) -> None:
        """Act on the agreed preemption signal `signum` at `step` (the watchdog's early exits: an
        aborted evaluation, a signal during a save)."""
        self.preemption.act(step, control, int(signum))

    # ------------------------------------------------------------------------------------------
    # events
    # ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:  # callbacks=[...] on a trainer not found at its __init__
            trainer = _calling_trainer(self)
            if trainer is None:
                logger.error("self-healing: SelfHealingCallback could not find its Trainer; this run is NOT "
                             "protected. Use SelfHealingTrainer(trainer) or SelfHealingCallback(cfg).attach(trainer)")
                return control
            self.attach(trainer)
            self.start_run()
        elif not self.orchestrator_active and not self.passthrough:  # trainer.train() called around the wrapper
            self.start_run()
        self.gave_up = False
        self.give_up_reason = None
        self._reset_step()
        self.patches.reset_log_window()  # the Trainer starts a new logging window too
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        self.monitor.amp_scaler = scaler is not None
        self.carry.reapply_lr_cut(self.optimizer, self.scheduler, self.policy.lr_scale)
        self.carry.begin_train(self.zclip, args, state)
        self.engine.start(state.global_step)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.trainer is None:  # not attached (see on_train_begin)
            return control
        self._reset_step()
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer is None:  # not attached (see on_train_begin)
            return control
        step = state.global_step + 1
        compat.ensure_grad_norm(self.patches)  # older transformers with max_grad_norm=0 compute no norm
        signals = self._signals(step)
        # a failed step's loss and norm are stand-ins, not measurements
        self.patches.count_logged_step(signals.loss, failed=signals.exception is not None)
        self.apply_decision(self.engine.judge_step(signals), control)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is None:  # not attached (see on_train_begin)
            return control
        if self.zclip is not None:  # saved into trainer_state.json by the next checkpoint
            save_to_trainer_state(self.zclip, state)
        self.engine.observe_step_time()
        if self.gave_up:
            return control
        if self.preemption.due:
            self.preemption.act(state.global_step, control)
        self.apply_decision(self.engine.end_step(state.global_step), control)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.trainer is None:  # not attached (see on_train_begin)
            return control
        if logs:
            self.recorder.last_metrics.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
            for m in self.monitors:
                if hasattr(m, "on_log"):
                    for diag in m.on_log(state.global_step, logs) or []:
                        self.engine.apply_advisory(diag, state.global_step)
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.trainer is None:  # not attached (see on_train_begin)
            return control
        for m in self.monitors:
            if metrics and hasattr(m, "on_evaluate"):
                for diag in m.on_evaluate(state.global_step, metrics) or []:
                    self.engine.apply_advisory(diag, state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer is not None and not self.orchestrator_active:
            self.finish("gave_up" if self.gave_up else "completed")
        return control

    # ------------------------------------------------------------------------------------------
    # the decision
    # ------------------------------------------------------------------------------------------
    def _reset_step(self) -> None:
        self.patches.reset_step()
        self.engine.begin_step()

    def _signals(self, step: int) -> StepSignals:
        """The step's facts, through the engine's one host sync (the ranks' preemption flags ride along)."""
        p = self.patches
        return self.preemption.step_signals(step, p.step_loss, p.grad_norm, p.step_exception, self.watchdog)

    def apply_decision(self, decision: Decision | None, control) -> None:
        """What only the Trainer can do about an engine decision (the engine applied the rest):
        stop its loop, and drop the NaN a skipped step left in its running loss. Whoever hands
        the engine a detection during a Trainer event (the early-warning signals) calls this
        with the decision it got back."""
        if decision is None:
            return
        if decision.stop:
            control.should_training_stop = True
        if decision.skipped:  # with logging_nan_inf_filter=False a NaN would stay in the running loss sum
            compat.repair_running_loss(self.trainer)

    # ------------------------------------------------------------------------------------------
    # end of run
    # ------------------------------------------------------------------------------------------
    def finish(self, exit_reason: str, exception: BaseException | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Build and write the postmortem (the parts' fields and `extra` included)."""
        t = self.trainer
        state = getattr(t, "state", None)
        more = self.parts.postmortem_fields()
        if extra:
            more.update(extra)
        pm = self.engine.build_postmortem(exit_reason, last_step=getattr(state, "global_step", 0),
                                          max_steps=getattr(state, "max_steps", None), exception=exception,
                                          trainer_class=type(t).__name__, extra=more)
        self.postmortem = pm
        self.engine.write_postmortem(pm, write=t.args.should_save or not hasattr(t.args, "should_save"))
        return pm
