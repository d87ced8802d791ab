"""The healing engine: one decider for every training loop.

`Healer` owns the detectors, the escalation policy, the snapshot ring, the postmortem recorder
and the observers. Adapters (the Trainer callback, the plain-loop `self_healing.loop.Healer`)
only translate their loop's events into plain facts: a step's loss and gradient norm, the live
model/optimizer/scheduler, an exception with where it was raised. What comes back is a
`Decision`; the engine has already applied it to the model, optimizer and scheduler (the one
place that does) and emitted its event (recorder -> observers -> log, the one place that does).
What an adapter still does itself is what only its loop can: stop the Trainer, fix its logged
loss, shrink its batch.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .config import HealingConfig
from .detectors import Detection, StateReport, StepMonitor, StepSignals, compare_state
from .diagnosis import Action, Diagnosis, FailureKind, diagnose, diagnose_exception, diagnose_state
from .distributed import (CODE_KINDS, EXCEPTION_CODES, RankFailure, agree_max, combine_losses, gather_rows,
                          is_distributed, per_rank_view)
from .healing import HealingPolicy, restore_scheduled_lr, scale_lr, scheduled_lrs, skip_update, tighten_clipping
from .postmortem import PostmortemRecorder
from .snapshot import SnapshotError, SnapshotRing, interval_on_ladder, state_report, unwrap_optimizer
from .zclip import scale_gradients

logger = logging.getLogger("self_healing")

_STATE_SIGNALS = ("weight_corruption", "optimizer_state_corruption")
_INSPECTED_SIGNALS = ("nonfinite_loss", "nonfinite_gradient", "loss_spike", "exception")


def _lr_ratio(lrs: list[float], reference: list[float] | None) -> float:
    """How far this rank's LR is above its schedule (inf: not finite); 1.0 when there is no
    schedule to compare with. Shared in the step's gather, so an LR corrupted on one rank only
    is judged on every rank and the ranks' weights cannot part."""
    if not reference:
        return 1.0
    ratios = [math.inf if not math.isfinite(lr) else lr / ref for lr, ref in zip(lrs, reference) if ref > 0]
    return max(ratios, default=1.0)


@dataclass(frozen=True)
class Decision:
    """What the engine decided about one failure, already applied when it is returned.

    `skipped`: this step's update never reaches the weights (its gradients were dropped).
    `rolled_back_to`: the snapshot step the weights and optimizer state came back from (None: no
    rollback, or none was possible). `lr_factor`: the LR was multiplied by it. `stop`: the run
    cannot be healed; the last verified weights are in memory and the loop must end."""

    step: int
    diagnosis: Diagnosis
    actions: tuple[Action, ...]
    reason: str = ""
    skipped: bool = False
    rolled_back_to: int | None = None
    lr_factor: float | None = None
    stop: bool = False
    details: dict[str, Any] = field(default_factory=dict, compare=False)
    event: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def failure(self) -> FailureKind:
        return self.diagnosis.failure


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
        self.reset()

    # ------------------------------------------------------------------------------------------
    # the live objects
    # ------------------------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        return self._objects()[0] if self._objects is not None else self._model

    @property
    def optimizer(self) -> Any:
        return self._objects()[1] if self._objects is not None else self._optimizer

    @property
    def scheduler(self) -> Any:
        return self._objects()[2] if self._objects is not None else self._scheduler

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
        self.step_flagged = False
        self.step_exception_kind = 0

    def step_signals(self, step: int, loss: Any, grad_norm: Any, exception: BaseException | None = None,
                     extra: Iterable[float] | None = None) -> StepSignals:
        """The step's facts as numbers, in its one host sync. `loss`/`grad_norm` may be device
        tensors. Under torch.distributed every rank's (loss, norm, exception code, *extra) travel
        in one all_gather and every rank returns the same signals (`rank_rows` keeps the rows)."""
        opt = unwrap_optimizer(self.optimizer)
        lrs = [g["lr"] for g in opt.param_groups]
        reference = scheduled_lrs(self.optimizer, self.scheduler) or self.lr_reference
        if is_distributed():
            own = _lr_ratio(lrs, reference)  # travels last in the row: the extras keep their places
            loss_f, norm_f, exception = self._gathered(loss, grad_norm, exception, [*(extra or ()), own])
            worst = max(r[-1] for r in self.rank_rows or [[own]])
            if worst > max(own, self.config.lr_spike_factor) and reference:  # a peer's LR spiked: every rank judges it
                lrs = [ref * worst for ref in reference]
        else:
            self.rank_rows = None
            parts: list[torch.Tensor] = []
            if isinstance(loss, torch.Tensor):
                parts.append(loss.detach().float().reshape(()))
            if isinstance(grad_norm, torch.Tensor):
                parts.append(grad_norm.detach().float().reshape(()).to(parts[0].device if parts else grad_norm.device))
            if all(t.device.type == "cpu" for t in parts):  # nothing to sync: skip the stack's allocation
                values = [t.item() for t in parts]
            else:
                values = torch.stack(parts).tolist()  # the one host sync of the step
            if isinstance(loss, torch.Tensor):
                loss_f = values.pop(0)
            elif isinstance(loss, (int, float)):
                loss_f = float(loss)
            else:
                loss_f = float("nan") if exception is None else 0.0
            if isinstance(grad_norm, torch.Tensor):
                norm_f = values.pop(0)
            elif isinstance(grad_norm, (int, float)):
                norm_f = float(grad_norm)
            else:
                norm_f = None
        return StepSignals(step=step, loss=loss_f, grad_norm=norm_f, lrs=lrs, scheduled_lrs=reference,
                           exception=exception)

    def _gathered(self, loss_t: Any, gn: Any, exception: BaseException | None,
                  extra: list[float]) -> tuple[float, float | None, BaseException | None]:
        dev = loss_t.device if isinstance(loss_t, torch.Tensor) else self.device
        nan = torch.tensor(float("nan"), device=dev)
        if isinstance(loss_t, torch.Tensor):
            loss_v = loss_t.detach().float().reshape(())
        elif isinstance(loss_t, (int, float)):
            loss_v = torch.tensor(float(loss_t), device=dev)
        else:
            loss_v = torch.zeros((), device=dev) if exception is not None else nan
        if isinstance(gn, torch.Tensor):
            gn_v = gn.detach().float().reshape(()).to(dev)
        else:
            gn_v = torch.tensor(float(gn) if isinstance(gn, (int, float)) else float("nan"), device=dev)
        meta = torch.tensor([float(self.step_exception_kind), *extra], device=dev)
        rows = gather_rows(torch.cat([loss_v.reshape(1), gn_v.reshape(1), meta])).tolist()
        self.rank_rows = rows
        norms = [r[1] for r in rows if not math.isnan(r[1])]
        grad_norm = max(norms) if norms else (None if gn is None else float("nan"))
        codes = [int(r[2]) for r in rows]
        agreed = None
        if any(codes):
            worst = max(codes)
            ranks = [i for i, c in enumerate(codes) if c == worst]
            local = exception if self.step_exception_kind == worst else None
            agreed = RankFailure(CODE_KINDS[worst], ranks, str(local)[:200] if local else "")
            if local is not None:
                agreed.__cause__ = local
        return combine_losses(rows), grad_norm, agreed

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
        check_due = step % self.config.integrity_check_every_steps == 0
        snap_due = step % self.snapshot_interval == 0
        if check_due or snap_due:
            report, bad = self.check_state(step)
            if bad is not None:
                return self.handle([bad], step, before_update=False)
            self.ref_report = report
            if snap_due and not self.step_flagged:
                self.capture(step, report)
        return None

    def check_state(self, step: int, agreed: bool = True) -> tuple[StateReport, Detection | None]:
        """This rank's state report, and the first rank's verdict that is bad (one gather when
        distributed, so a corruption on any rank is seen by all). Each rank's numbers travel with
        its own reference: under FSDP a rank's norms are of its shard, comparable only with the
        reference of that same shard; every rank then judges the same rows the same way.
        `agreed=False` (the other ranks are not known to be here too): this rank's verdict alone."""
        report = state_report(self.model, self.optimizer, step)
        ref = self.ref_report
        if not agreed or not is_distributed():
            return report, compare_state(report, ref, self.config.weight_growth_factor)
        keys = sorted(report.optimizer_norms)
        n, nan = 1 + len(keys), float("nan")
        ref_vals = [ref.weight_norm] + [ref.optimizer_norms.get(k, nan) for k in keys] if ref else [nan] * n
        vec = torch.tensor([report.weight_norm] + [report.optimizer_norms[k] for k in keys] + ref_vals
                           + [float(ref.step) if ref else -1.0], dtype=torch.float32, device=self.device)
        for r, row in enumerate(gather_rows(vec).tolist()):
            rep = StateReport(row[0], dict(zip(keys, row[1:n])), report.beta2, step)
            ref_r = None if row[-1] < 0 else StateReport(
                row[n], {k: v for k, v in zip(keys, row[n + 1:2 * n]) if not math.isnan(v)}, report.beta2, int(row[-1]))
            bad = compare_state(rep, ref_r, self.config.weight_growth_factor)
            if bad is not None:
                bad.evidence["rank"] = r
                return report, bad
        return report, None

    def inspect(self, step: int) -> Detection | None:
        return self.check_state(step)[1]

    # ------------------------------------------------------------------------------------------
    # the decider
    # ------------------------------------------------------------------------------------------
    def decide(self, detections: list[Detection], step: int, exception: BaseException | None = None) -> tuple[Diagnosis, Any]:
        """Diagnose the first detection (with the state's integrity verdict when the step's
        numbers alone cannot tell a bad batch from bad weights) and plan the escalation."""
        det = detections[0]
        if det.signal in _STATE_SIGNALS:
            diag = diagnose_state(det)
        else:
            state = self.inspect(step) if det.signal in _INSPECTED_SIGNALS else None
            if det.signal == "exception" and exception is not None:
                diag = diagnose_exception(exception, step=step, state=state)
            else:
                diag = diagnose(det, state)
        if len(detections) > 1:
            diag.evidence["also_fired"] = [d.signal for d in detections[1:]]
        if self.rank_rows is not None and is_distributed():
            diag.evidence["per_rank"] = per_rank_view(self.rank_rows)
            if isinstance(exception, RankFailure) and exception.failure == FailureKind.DATA_ERROR \
                    and self.step_exception_kind == 0:  # the bad batch was another rank's: record it here too
                self.note_skipped_batch(exception, f"forward on rank(s) {exception.ranks}", None, step)
        if diag.failure in (FailureKind.NAN_LOSS, FailureKind.NONFINITE_GRADIENT):
            self.recorder.counters["nan_count"] += 1
        plan = self.policy.plan(diag, step, can_rollback=self.ring.latest_verified() is not None)
        if plan.reason and plan.actions != diag.actions:  # escalated: the summary must say what was done
            head = diag.summary.rsplit(": ", 1)[0]
            diag.summary = f"{head}: {plan.reason} -> {', '.join(a.value for a in plan.actions)}"
        return diag, plan

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

    def skip_batch(self, exc: BaseException, step: int, where: str = "collate",
                   indices: list[int] | None = None) -> Decision:
        """A batch that could not be built (the collator or tokenizer raised on it) is dropped and
        the next one taken; `stop` once data errors hit more batches than `max_skipped_batches`
        allows (then the adapter raises `exc` unchanged)."""
        d = diagnose_exception(exc, step=step, origin=where)
        plan = self.policy.plan(d, step)
        self.note_skipped_batch(exc, where, indices, step)
        stop = Action.GIVE_UP in plan.actions
        event = self.emit(step, d, [a.value for a in plan.actions], {}, plan.reason, message="" if stop else None)
        return Decision(step, d, tuple(plan.actions), plan.reason, stop=stop, event=event)

    def apply(self, actions: Iterable[Action], step: int, diag: Diagnosis, reason: str = "",
              lr_factor: float | None = None) -> dict[str, Any]:
        """The one place where decisions change the model, optimizer, scheduler and clipping."""
        details: dict[str, Any] = {}
        for action in actions:
            if action == Action.SKIP_STEP:
                self.recorder.counters["skipped_steps"] += 1
            elif action == Action.ROLLBACK:
                details.update(self.rollback(step))
            elif action == Action.REDUCE_LR:
                details["lr"] = scale_lr(self.optimizer, self.scheduler, lr_factor or self.config.lr_reduction_factor)
                self.recorder.counters["lr_reductions"] += 1
                self.monitor.reset_trend()
            elif action == Action.RESTORE_LR:
                details["lr"] = restore_scheduled_lr(self.optimizer, self.scheduler, self.lr_reference)
            elif action == Action.TIGHTEN_CLIPPING:
                details["clipping"] = self.tighten_clipping()
            elif action == Action.GIVE_UP:
                details.update(self.give_up(diag, reason))
        return details

    def apply_advisory(self, diag: Diagnosis, step: int) -> Decision:
        """A monitor's finding (DPO plateau, reward collapse, overfitting, oscillation): recorded
        and alerted; the only state it may change is a bounded LR raise or cut it asks for."""
        details: dict[str, Any] = {}
        factor = None
        if Action.RAISE_LR in diag.actions:
            factor = float(diag.evidence.get("lr_factor", 2.0))
            details["lr"] = scale_lr(self.optimizer, self.scheduler, factor)
            self.policy.lr_scale *= factor
        if Action.REDUCE_LR in diag.actions:
            factor = self.config.lr_reduction_factor
            details["lr"] = scale_lr(self.optimizer, self.scheduler, factor)
            self.policy.lr_scale *= factor
        event = self.emit(step, diag, [a.value for a in diag.actions], details)
        return Decision(step, diag, tuple(diag.actions), lr_factor=factor, details=details, event=event)

    def emit(self, step: int, diag: Diagnosis, actions: list[str], details: dict[str, Any] | None = None,
             reason: str = "", *, level: int = logging.WARNING, message: str | None = None) -> dict[str, Any]:
        """The one place events leave the engine: the postmortem record, then every observer, then
        the log (`message` replaces the standard line; "" logs nothing)."""
        event = self.recorder.record(step, diag, actions, details or {}, reason)
        self.notify("on_event", event)
        if message is None:
            message = (f"self-healing: step {step}: {diag.summary} -> {', '.join(actions) or 'observed'}"
                       + (f" ({reason})" if reason else ""))
        if message:
            logger.log(level, "%s", message)
        return event

    def notify(self, method: str, *args: Any) -> None:
        for o in self.observers:
            fn = getattr(o, method, None)
            if fn is not None:
                try:
                    fn(*args)
                except Exception as exc:  # noqa: BLE001 - an observer must never kill the run
                    logger.warning("self-healing: observer %s.%s failed: %s", type(o).__name__, method, exc)

    # ------------------------------------------------------------------------------------------
    # actions
    # ------------------------------------------------------------------------------------------
    def rollback(self, step: int) -> dict[str, Any]:
        unreadable: list[str] = []
        while True:
            snap = self.ring.latest_verified()
            if snap is None:
                out: dict[str, Any] = {"rollback": "no verified snapshot"}
                if unreadable:
                    out["unreadable_snapshots"] = unreadable
                return out
            self.ring.discard_after(snap.step)
            try:
                self.ring.restore(snap, self.model, self.optimizer, self.scheduler, restore_scheduler=False)
                break
            except SnapshotError as exc:  # a damaged spill file: the live state is untouched, try an older one
                logger.error("self-healing: %s", exc)
                unreadable.append(str(exc))
                self.ring.discard(snap)
        self.restore_plugin_state(snap)
        lost = max(step - 1 - snap.step, 0)
        self.recorder.counters["rollbacks"] += 1
        self.recorder.counters["steps_lost"] += lost
        out = {"rolled_back_to_step": snap.step, "steps_lost": lost}
        if unreadable:
            out["unreadable_snapshots"] = unreadable
        return out

    def restore_plugin_state(self, snap: Any) -> None:
        """The detectors' and ZClip's statistics go back with the weights they describe."""
        if "monitor" in snap.extra:
            self.monitor.load_state_dict(snap.extra["monitor"])
        self.monitor.reset_trend()
        if self.zclip is not None and "zclip" in snap.extra:
            self.zclip.load_state_dict(snap.extra["zclip"])
        self.ref_report = snap.report

    def tighten_clipping(self) -> dict[str, Any]:
        if self.zclip is not None:
            return self.zclip.tighten(self.config.clip_tighten_factor)
        hint = self.monitor.grad.window.mean if len(self.monitor.grad.window) else None
        return tighten_clipping(self.clip_args, self.config.clip_tighten_factor, hint)

    def give_up(self, diag: Diagnosis, reason: str) -> dict[str, Any]:
        self.gave_up = True
        self.give_up_reason = f"{diag.failure.value}: {reason or diag.summary}"
        out: dict[str, Any] = {"gave_up": reason or diag.summary}
        snap = self.ring.latest_verified()
        if snap is not None:  # leave the last good weights in memory for whatever the user saves next
            self.ring.restore(snap, self.model, self.optimizer, self.scheduler, restore_scheduler=False)
            out["restored_step"] = snap.step
        return out

    def note_skipped_batch(self, exc: BaseException, where: str, indices: list[int] | None, step: int) -> None:
        entry: dict[str, Any] = {"step": step, "where": where, "exception_type": type(exc).__name__,
                                 "error": str(exc)[:300]}
        if indices is not None:
            entry["indices"] = indices
        self.recorder.skipped_batches.append(entry)
        if len(self.recorder.skipped_batches) > 1000:  # bounded: keep the first and the latest
            del self.recorder.skipped_batches[500]

    def backoff(self, attempt: int, d: Diagnosis, step: int, record: bool = False, phase: str = "train") -> float:
        """Exponential backoff from `api_backoff_seconds`, doubling, capped, with full jitter.
        `record`: this retry is an event of its own in the postmortem (a retry inside the step;
        the orchestrator records its resumes itself), so flaky storage shows when it struck."""
        base = self.config.api_backoff_seconds * (2 ** (attempt - 1))
        delay = min(base, self.config.api_backoff_max_seconds) * (0.5 + random.random() / 2)
        logger.warning("self-healing: %s; retry %s/%s in %.2fs", d.summary, attempt, self.config.max_api_retries, delay)
        self.recorder.counters["api_retries"] = self.recorder.counters.get("api_retries", 0) + 1
        if record:
            self.emit(d.step if d.step is not None else step, d, [Action.BACKOFF_RETRY.value],
                      {"retry": attempt, "of": self.config.max_api_retries, "backoff_seconds": round(delay, 3),
                       "phase": phase}, message="")
        time.sleep(delay)
        return delay

    # ------------------------------------------------------------------------------------------
    # snapshots
    # ------------------------------------------------------------------------------------------
    def snapshot_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"monitor": self.monitor.state_dict(), "policy": self.policy.state_dict()}
        if self.extra_state is not None:
            extra.update(self.extra_state())
        if self.zclip is not None:
            extra["zclip"] = self.zclip.state_dict()
        return extra

    def capture(self, step: int, report: StateReport) -> Any:
        if self.config.snapshot_spill_dir and self.ring.spill_dir is None and self.output_dir is not None:
            self.ring.spill_dir = Path(self.output_dir) / self.config.snapshot_spill_dir
        t0 = time.perf_counter()
        snap = self.ring.capture(self.model, self.optimizer, self.scheduler, step, self.snapshot_extra(), report)
        self.recorder.counters["snapshots"] += 1
        self.notify("on_snapshot", step, snap)
        if self.config.snapshot_every_steps == "auto":
            # everything this snapshot cost: the copy (on CUDA the device copy, once one has been
            # timed), the plugin state, the observers (the journal), and the integrity pass that
            # vouches for it when that pass was not due anyway
            cost = time.perf_counter() - t0 - snap.alloc_seconds  # a new buffer is a one-off
            if snap.events is not None:  # CUDA: the host only queued the copy
                cost += self.ring.last_copy_seconds
            if step % self.config.integrity_check_every_steps != 0:
                cost += getattr(report, "seconds", 0.0) or 0.0
            self.tune_snapshot_interval(cost)
        return snap

    def tune_snapshot_interval(self, copy_seconds: float) -> None:
        """Pick the interval that keeps snapshot cost under `snapshot_budget` of step time, on a
        ladder of the integrity-check interval times 2**k (`snapshot.interval_on_ladder`): a noisy
        cost estimate cannot make snapshots bunch up, and they share the integrity pass."""
        if len(self.step_times) < 3:
            return
        step_time = statistics.median(self.step_times)
        if step_time <= 0:
            return
        need = math.ceil(copy_seconds / (self.config.snapshot_budget * step_time))
        interval = interval_on_ladder(need, self.config.integrity_check_every_steps)
        # every rank must snapshot (and gather its integrity check) at the same steps
        self.snapshot_interval = int(agree_max(interval))

    # ------------------------------------------------------------------------------------------
    # end of run
    # ------------------------------------------------------------------------------------------
    def build_postmortem(self, exit_reason: str, *, last_step: int, max_steps: int | None = None,
                         exception: BaseException | None = None, trainer_class: str | None = None,
                         extra: dict[str, Any] | None = None) -> dict[str, Any]:
        more: dict[str, Any] = {"lr_scale": self.policy.lr_scale, "recovery_attempts": self.policy.total_attempts,
                                "snapshot_interval": self.snapshot_interval}
        if self.give_up_reason:
            more["give_up_reason"] = self.give_up_reason
        if self.zclip is not None:
            more["zclip"] = self.zclip.summary()
        if extra:
            more.update(extra)
        return self.recorder.build(exit_reason, last_step=last_step, max_steps=max_steps, exception=exception,
                                   trainer_class=trainer_class, extra=more)

    def write_postmortem(self, pm: dict[str, Any], write: bool = True) -> None:
        """Write `pm` under `output_dir` (unless `write` is False: a rank that does not save) and
        tell the observers the run is over."""
        if write and self.output_dir is not None:
            self.recorder.write(self.config.resolved_postmortem_path(self.output_dir), pm)
        self.notify("on_finish", pm)


__all__ = ["Healer", "Decision"]
