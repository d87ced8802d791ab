"""The healing engine: one decider for every training loop.

`Healer` owns the detectors, the escalation policy, the snapshot ring, the postmortem recorder
and the observers. Adapters (the Trainer callback, the plain-loop `self_healing.loop.Healer`)
only translate their loop's events into plain facts: a step's loss and gradient norm, the live
model/optimizer/scheduler, an exception with where it was raised. What comes back is a
`Decision`; the engine has already applied it to the model, optimizer and scheduler (the one
place that does) and emitted its event (recorder -> observers -> log, the one place that does).
What an adapter still does itself is what only its loop can: stop the Trainer, fix its logged
loss, shrink its batch, re-enter training after an exception (`decide_exception` says how).

`Healer` is a facade over its parts, each holding the facade and reading its public state:
`StepReader` (the step's facts, `self_healing.step_reader`), `Decider` (diagnosis and
escalation, `self_healing.decider`), `Applier` (the actions, `self_healing.applier`),
`SnapshotKeeper` (`self_healing.snapshot_keeper`) and `Reporter` (events and the postmortem,
`self_healing.reporting`). The parts call each other through the facade, so an adapter that
overrides a facade method (the plain loop's `Healer` subclasses it) is honoured everywhere.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .applier import Applier
from .config import HealingConfig
from .decider import (BatchChange, BatchFacts, Decider, Decision, EvalBatchChange, ExceptionDecision,
                      ExceptionFacts, Finding, Resume)
from .detectors import Detection, StateReport, StepMonitor, StepSignals
from .diagnosis import Action, Diagnosis, FailureKind
from .distributed import EXCEPTION_CODES, RankFailure, agree_max
from .healing import HealingPolicy, skip_update
from .postmortem import PostmortemRecorder
from .reporting import Reporter
from .snapshot import SnapshotRing, state_report
from .snapshot_keeper import SnapshotKeeper
from .step_reader import StepReader
from .zclip import scale_gradients

logger = logging.getLogger("self_healing")


class Healer:
    """Trainer-agnostic detection, decision and healing.

    `model`, `optimizer`, `scheduler`: the live objects (or give `objects`, a callable returning
    the three, for a host such as a Trainer that creates or replaces them later). `clip_args`: an
    object whose `max_grad_norm` a `tighten_clipping` action lowers (a Trainer's args; by default
    the engine itself). `device` (or a callable returning it): where the per-step gather runs under
    torch.distributed; by default the model's."""

    def __init__(self, model: Any = None, optimizer: Any = None, scheduler: Any = None,
                 config: HealingConfig | None = None, output_dir: str | Path | None = None, *,
                 objects: Callable[[], tuple[Any, Any, Any]] | None = None, loss_signals: bool = True,
                 clip_args: Any = None, device: Any = None) -> None:
        self.config = config or HealingConfig()
        self._objects = objects
        self._model, self._optimizer, self._scheduler = model, optimizer, scheduler
        self.output_dir = output_dir
        self.loss_signals = loss_signals
        self.clip_args = clip_args if clip_args is not None else self
        self.max_grad_norm: float = 0.0
        """The clipping threshold a `tighten_clipping` action sets when no `clip_args` was given
        (0: none yet). A plain loop that clips with it honours the tightening."""
        self._device = device
        self.observers: list[Any] = []
        """Objects told about every step and decision (trackio, the crash journal...): optional
        methods `on_step(step, signals, info)`, `on_event(event)`, `on_snapshot(step, snap)`,
        `on_finish(postmortem)`."""
        self.ring = SnapshotRing(self.config.snapshot_keep, self.config.snapshot_verify_steps)
        self.zclip: Any = None
        """A `ZClip` the adapter installs (it clips in `judge_step` from the step's measured norm)."""
        self.extra_state: Callable[[], dict[str, Any]] | None = None
        """The adapter's own state a snapshot must carry (a Trainer's epoch and token counts)."""
        self.step_times: deque[float] = deque(maxlen=50)
        self.lr_reference: list[float] | None = None
        """Without a scheduler: the LRs an `lr_spike` is judged against and restored to (a plain
        loop keeps them at its last healthy step's)."""
        self.reader, self.decider, self.applier = StepReader(self), Decider(self), Applier(self)
        self.snapshots, self.reporter = SnapshotKeeper(self), Reporter(self)
        self.reset()

    # ------------------------------------------------------------------------------------------
    # the live objects
    # ------------------------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        return self.live_objects()[0]

    @property
    def optimizer(self) -> Any:
        return self.live_objects()[1]

    @property
    def scheduler(self) -> Any:
        return self.live_objects()[2]

    def live_objects(self) -> tuple[Any, Any, Any]:
        """(model, optimizer, scheduler) in one read (a host's accessor builds all three anyway)."""
        return self._objects() if self._objects is not None else (self._model, self._optimizer, self._scheduler)

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return torch.device(self._device() if callable(self._device) else self._device)
        p = next(iter(self.model.parameters()), None) if self.model is not None else None
        return p.device if p is not None else torch.device("cpu")

    def reset(self) -> None:
        """A clean slate for a new run: snapshots, escalation, detector windows, the record."""
        self.recorder = PostmortemRecorder(self.config)
        self.policy = HealingPolicy(self.config)
        self.ring.clear()
        self.monitor = StepMonitor(self.config, loss_signals=self.loss_signals)
        self.gave_up = False
        self.give_up_reason: str | None = None
        self.decider.suspect = None
        self.ref_report: StateReport | None = None
        """The last state report found sound: what the next integrity check is compared with."""
        self.step_flagged = False
        """This step was judged bad: it verifies no snapshot and takes none."""
        self.rank_rows: list[list[float]] | None = None
        """This step's gathered rows, one per rank: [loss, grad norm, exception code, ...]."""
        self.step_exception_kind = 0
        self.snapshot_interval: int = self.config.snapshot_every_steps if isinstance(
            self.config.snapshot_every_steps, int) else 10
        self.step_times.clear()
        self._last_step_end: float | None = None

    # ------------------------------------------------------------------------------------------
    # facts in
    # ------------------------------------------------------------------------------------------
    def start(self, step: int) -> bool:
        """Training (re)starts from `step`: take the state as the integrity reference and as the
        baseline snapshot when it is sound. False (and logged) when it is not finite."""
        report = state_report(self.model, self.optimizer, step)
        # every rank must agree (under FSDP each sees only its shard): a capture may hold a collective
        if agree_max(0.0 if report.weights_finite and report.optimizer_finite else 1.0) == 0.0:
            self.ref_report = report
            if self.ring.latest_verified() is None:
                snap = self.capture(step, report)
                snap.healthy_steps_after = self.ring.verify_steps  # the state training starts from is the baseline
            return True
        logger.error("self-healing: the state training starts from is not finite (%s)", report)
        return False

    def begin_step(self) -> None:
        self.step_flagged, self.step_exception_kind = False, 0

    def step_signals(self, step: int, loss: Any, grad_norm: Any, exception: BaseException | None = None,
                     extra: Iterable[float] | None = None, distributed: bool | None = None) -> StepSignals:
        """The step's facts as numbers, in its one host sync (`StepReader.step_signals`)."""
        return self.reader.step_signals(step, loss, grad_norm, exception, extra, distributed)

    def note_exception(self, exc: BaseException, failure: FailureKind) -> None:
        """An exception inside this step's forward/backward that the step loop heals by skipping."""
        self.step_exception_kind = max(self.step_exception_kind, EXCEPTION_CODES.get(failure, 0))

    def judge_step(self, signals: StepSignals) -> Decision | None:
        """Before the update: judge the step's signals; a failure is decided and healed (the
        update dropped), a healthy step feeds the statistics (and ZClip clips it). None: healthy."""
        step = signals.step
        failed = signals.exception is not None  # the step's loss and norm are stand-ins, not measurements
        self.recorder.observe(step, None if failed else signals.loss, None if failed else signals.grad_norm,
                              signals.lrs[0] if signals.lrs else None)
        info: dict[str, Any] = {"skipped": False}
        detections = self.monitor.check(signals)
        if not detections:
            trend = self.monitor.accept(signals)
            if trend is None:
                if self.zclip is not None and signals.grad_norm is not None:
                    z = self.zclip.observe(signals.grad_norm)
                    if z.coefficient < 1.0:  # (the model's parameters are read only when it clips)
                        scale_gradients(self.model.parameters(), z.coefficient)
                    info["zclip"] = z
                self.notify("on_step", step, signals, info)
                return None
            detections = [trend]
        self.step_flagged = True
        if isinstance(signals.exception, RankFailure) and signals.exception.failure == FailureKind.OOM:
            skip_update(self.model)  # every rank leaves the loop together; the adapter shrinks the batch
            raise signals.exception
        decision = self.handle(detections, step, before_update=True, exception=signals.exception)
        info["skipped"] = True
        self.notify("on_step", step, signals, info)
        return decision

    def note_update_undone(self) -> None:
        """The step's update was taken back (the applier restored an observer's pre-update copy): the step counts
        as skipped and, its update not kept, verifies no snapshot and takes none."""
        self.recorder.counters["skipped_steps"] += 1
        self.step_flagged = True

    def observe_step_time(self) -> None:
        """Called once per finished step: the step times that size the auto snapshot interval."""
        now = time.perf_counter()
        if self._last_step_end is not None:
            self.step_times.append(now - self._last_step_end)
        self._last_step_end = now

    def end_step(self, step: int) -> Decision | None:
        """After the update of `step` landed: count a healthy step, check the weights and optimizer
        state when due (a failure rolls back), snapshot when due."""
        if self.gave_up:
            return None
        if not self.step_flagged:
            self.ring.mark_healthy_step()
            self.policy.healthy_step()
        check_due, snap_due = self.snapshots.due(step)
        if check_due or snap_due:
            report, bad = self.check_state(step)
            bad = self.decider.confirm_state(bad, step)
            if bad is not None:
                return self.handle([bad], step, before_update=False)
            if self.decider.suspect is not None:
                return None  # a blow-up to confirm at the next check: this state is no reference or snapshot
            self.ref_report = report
            if snap_due and not self.step_flagged:
                self.capture(step, report)
        return None

    def check_state(self, step: int, agreed: bool = True) -> tuple[StateReport, Detection | None]:
        """This rank's state report and the first rank's bad verdict (`StepReader.check_state`)."""
        return self.reader.check_state(step, agreed)

    def inspect(self, step: int) -> Detection | None:
        return self.check_state(step)[1]

    # ------------------------------------------------------------------------------------------
    # the decider
    # ------------------------------------------------------------------------------------------
    def decide(self, detections: list[Detection], step: int, exception: BaseException | None = None) -> tuple[Diagnosis, Any]:
        """Diagnose a step's detections and plan the escalation (`Decider.decide`)."""
        return self.decider.decide(detections, step, exception)

    def decide_exception(self, facts: ExceptionFacts) -> ExceptionDecision:
        """An exception that escaped the training loop: how it is healed, or that it is not
        (`Decider.decide_exception`). The adapter applies its part, then `apply_exception`."""
        return self.decider.decide_exception(facts)

    def disk_freed(self, decision: ExceptionDecision, freed: list[str]) -> ExceptionDecision:
        return self.decider.disk_freed(decision, freed)

    def handle(self, detections: list[Detection], step: int, before_update: bool,
               exception: BaseException | None = None) -> Decision:
        """Decide on a failure, apply the decision, emit its event. `before_update`: the step's
        update has not landed yet, so it is dropped whatever the plan."""
        diag, plan = self.decide(detections, step, exception)
        details: dict[str, Any] = {}
        if before_update:
            skip_update(self.model)  # whatever the plan, this step's gradients are not trusted
            self.step_flagged = True  # a step whose update was dropped verifies no snapshot, takes none
        details.update(self.apply(plan.actions, step, diag, plan.reason, plan.lr_factor))
        if not before_update and Action.SKIP_STEP in plan.actions:
            details["note"] = "the update had already landed; skipping could not undo it"
        stop = Action.GIVE_UP in plan.actions
        event = self.emit(step, diag, [a.value for a in plan.actions], details, plan.reason,
                          level=logging.ERROR if stop else logging.WARNING)
        lr_factor = details["lr"].get("factor") if isinstance(details.get("lr"), dict) else None
        return Decision(step, diag, tuple(plan.actions), plan.reason, skipped=before_update,
                        rolled_back_to=details.get("rolled_back_to_step"), lr_factor=lr_factor, stop=stop,
                        details=details, event=event)

    def act_on(self, finding: Finding) -> Decision | None:
        """An observer's finding (`decider.Finding`): decided, applied and emitted here, like every
        other failure (`Applier.act_on`); the Decision (None for a warning or a record with no undo)
        tells the adapter what only its loop can do (stop it, repair its logged loss)."""
        return self.applier.act_on(finding)

    def skip_batch(self, exc: BaseException, step: int, where: str = "collate",
                   indices: list[int] | None = None) -> Decision:
        """A batch that could not be built (the collator or tokenizer raised on it) is dropped and
        the next one taken; `stop` once data errors hit more batches than `max_skipped_batches`
        allows (then the adapter raises `exc` unchanged)."""
        d, plan = self.decider.decide_batch(exc, step, where)
        self.note_skipped_batch(exc, where, indices, step)
        stop = Action.GIVE_UP in plan.actions
        event = self.emit(step, d, [a.value for a in plan.actions], {}, plan.reason, message="" if stop else None)
        return Decision(step, d, tuple(plan.actions), plan.reason, stop=stop, event=event)

    # ------------------------------------------------------------------------------------------
    # actions (`Applier`), snapshots (`SnapshotKeeper`), events and the postmortem (`Reporter`)
    # ------------------------------------------------------------------------------------------
    def apply(self, actions: Iterable[Action], step: int, diag: Diagnosis, reason: str = "",
              lr_factor: float | None = None) -> dict[str, Any]:
        """The one place where decisions change the model, optimizer, scheduler and clipping."""
        return self.applier.apply(actions, step, diag, reason, lr_factor)

    def apply_advisory(self, diag: Diagnosis, step: int) -> Decision:
        return self.applier.apply_advisory(diag, step)

    def apply_exception(self, decision: ExceptionDecision) -> ExceptionDecision:
        return self.applier.apply_exception(decision)

    def record_resume(self, decision: ExceptionDecision, where: str) -> ExceptionDecision:
        return self.applier.record_resume(decision, where)

    def rollback(self, step: int) -> dict[str, Any]:
        return self.applier.rollback(step)

    def tighten_clipping(self) -> dict[str, Any]:
        return self.applier.tighten_clipping()

    def give_up(self, diag: Diagnosis, reason: str) -> dict[str, Any]:
        return self.applier.give_up(diag, reason)

    def note_skipped_batch(self, exc: BaseException, where: str, indices: list[int] | None, step: int) -> None:
        self.applier.note_skipped_batch(exc, where, indices, step)

    def backoff(self, attempt: int, d: Diagnosis, step: int, record: bool = False, phase: str = "train") -> float:
        return self.applier.backoff(attempt, d, step, record, phase)

    def snapshot_extra(self) -> dict[str, Any]:
        return self.snapshots.snapshot_extra()

    def capture(self, step: int, report: StateReport) -> Any:
        return self.snapshots.capture(step, report)

    def tune_snapshot_interval(self, copy_seconds: float) -> None:
        self.snapshots.tune_snapshot_interval(copy_seconds)

    def restore_plugin_state(self, snap: Any) -> None:
        self.snapshots.restore_plugin_state(snap)

    def emit(self, step: int, diag: Diagnosis, actions: list[str], details: dict[str, Any] | None = None,
             reason: str = "", *, level: int = logging.WARNING, message: str | None = None) -> dict[str, Any]:
        """The one place events leave the engine: the postmortem record, then every observer, then
        the log (`message` replaces the standard line; "" logs nothing)."""
        return self.reporter.emit(step, diag, actions, details, reason, level=level, message=message)

    def notify(self, method: str, *args: Any) -> None:
        self.reporter.notify(method, *args)

    def build_postmortem(self, exit_reason: str, *, last_step: int, max_steps: int | None = None,
                         exception: BaseException | None = None, trainer_class: str | None = None,
                         extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.reporter.build_postmortem(exit_reason, last_step=last_step, max_steps=max_steps,
                                              exception=exception, trainer_class=trainer_class, extra=extra)

    def write_postmortem(self, pm: dict[str, Any], write: bool = True) -> None:
        self.reporter.write_postmortem(pm, write)


__all__ = ["Healer", "Decision", "ExceptionDecision", "ExceptionFacts", "BatchFacts", "BatchChange",
           "EvalBatchChange", "Resume"]
