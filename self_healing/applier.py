"""The engine's hands: the one place decisions change the model, optimizer, scheduler and
clipping (`Applier.apply`; an observer's undo of an update, `Applier.undo`), and the engine-side
part of an exception decision (back off, give up, note a skipped batch, record the resume). Used
through `self_healing.engine.Healer`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace
from typing import Any, Iterable

from .decider import Decision, ExceptionDecision, Finding, UndoRequest
from .detectors import compare_state
from .diagnosis import Action, Diagnosis
from .healing import fisher_weighted_rollback, restore_scheduled_lr, scale_lr, tighten_clipping
from .snapshot import SnapshotError

logger = logging.getLogger("self_healing")


class Applier:
    """Applies a `Healer`'s decisions to its live objects (`healer`: the model, optimizer,
    scheduler, snapshot ring, recorder and policy it holds)."""

    def __init__(self, healer: Any) -> None:
        self.healer = healer

    def apply(self, actions: Iterable[Action], step: int, diag: Diagnosis, reason: str = "",
              lr_factor: float | None = None) -> dict[str, Any]:
        """The one place where decisions change the model, optimizer, scheduler and clipping."""
        h = self.healer
        details: dict[str, Any] = {}
        for action in actions:
            if action == Action.SKIP_STEP:
                h.recorder.counters["skipped_steps"] += 1
            elif action == Action.ROLLBACK:
                details.update(h.rollback(step))
            elif action == Action.REDUCE_LR:
                details["lr"] = scale_lr(h.optimizer, h.scheduler, lr_factor or h.config.lr_reduction_factor)
                h.recorder.counters["lr_reductions"] += 1
                h.monitor.reset_trend()
            elif action == Action.RESTORE_LR:
                details["lr"] = restore_scheduled_lr(h.optimizer, h.scheduler, h.lr_reference)
            elif action == Action.TIGHTEN_CLIPPING:
                details["clipping"] = h.tighten_clipping()
            elif action == Action.GIVE_UP:
                details.update(h.give_up(diag, reason))
        return details

    def act_on(self, finding: Finding) -> Decision | None:
        """An observer's finding: a failure goes through the decider (`Healer.handle`), an advisory
        is a bounded LR change, a warning takes the early snapshot (if the state is sound) and
        tightens clipping; each is emitted once. An `undo` is carried out first; the Decision then
        returned says whether the update was taken back (`skipped`)."""
        h = self.healer
        undone = finding.undo is not None and self.undo(finding.undo)
        if undone:
            h.note_update_undone()
        elif finding.undo is not None:  # the event says what happened: the same verdict, without the undo
            finding = replace(finding, diagnosis=finding.undo.if_not_undone)
        step = finding.step
        if finding.kind == "failure":
            if finding.fisher_weights is None:
                return h.handle([finding.detection], step, before_update=True)
            params, importance = finding.fisher_weights
            before = [p.detach().clone() for p in params]
            decision = h.handle([finding.detection], step, before_update=True)
            if decision is not None and decision.rolled_back_to is not None:
                fisher_weighted_rollback(params, before, importance)
            return decision
        diag = finding.diagnosis
        if finding.kind == "advisory":
            decision = self.apply_advisory(diag, step)
            return replace(decision, skipped=True) if undone else decision
        details: dict[str, Any] = {}
        if finding.kind == "warning":  # an early snapshot (if the state is sound), tighter clipping
            actions = []
            snap = finding.snapshot
            if snap is not None and Action.CHECKPOINT in diag.actions:
                if compare_state(snap, h.ref_report, h.config.weight_growth_factor) is None:
                    h.capture(snap.step, snap)
                    details["snapshot_step"] = snap.step
                    actions.append(Action.CHECKPOINT)
                else:
                    details["snapshot"] = "refused: the state failed its integrity check"
                    diag.summary += "; the early snapshot was not taken: the state failed its integrity check"
            if Action.TIGHTEN_CLIPPING in diag.actions:
                details["clipping"] = self.tighten_clipping()
                actions.append(Action.TIGHTEN_CLIPPING)
            diag.actions = actions
        event = h.emit(step, diag, [a.value for a in diag.actions], details)
        if finding.undo is None:
            return None
        return Decision(step, diag, tuple(diag.actions), skipped=undone, details=details, event=event)

    def undo(self, request: UndoRequest) -> bool:
        """Take back the update that just landed: the pre-update weights and optimizer state an
        observer copied go back into the live objects. False: the copy no longer matches them
        (nothing is written)."""
        h = self.healer
        return request.state.restore(h.model, h.optimizer)

    def apply_advisory(self, diag: Diagnosis, step: int) -> Decision:
        """A monitor's finding (DPO plateau, reward collapse, overfitting, oscillation): recorded
        and alerted; the only state it may change is a bounded LR raise or cut it asks for."""
        h = self.healer
        details: dict[str, Any] = {}
        factor = None
        if Action.RAISE_LR in diag.actions:
            factor = float(diag.evidence.get("lr_factor", 2.0))
            details["lr"] = scale_lr(h.optimizer, h.scheduler, factor)
            h.policy.lr_scale *= factor
        if Action.REDUCE_LR in diag.actions:
            factor = h.config.lr_reduction_factor
            details["lr"] = scale_lr(h.optimizer, h.scheduler, factor)
            h.policy.lr_scale *= factor
        event = h.emit(step, diag, [a.value for a in diag.actions], details)
        return Decision(step, diag, tuple(diag.actions), lr_factor=factor, details=details, event=event)

    def rollback(self, step: int) -> dict[str, Any]:
        h = self.healer
        unreadable: list[str] = []
        while True:
            snap = h.ring.latest_verified()
            if snap is None:
                out: dict[str, Any] = {"rollback": "no verified snapshot"}
                if unreadable:
                    out["unreadable_snapshots"] = unreadable
                return out
            h.ring.discard_after(snap.step)
            try:
                h.ring.restore(snap, h.model, h.optimizer, h.scheduler, restore_scheduler=False)
                break
            except SnapshotError as exc:  # a damaged spill file: the live state is untouched, try an older one
                logger.error("self-healing: %s", exc)
                unreadable.append(str(exc))
                h.ring.discard(snap)
        h.restore_plugin_state(snap)
        lost = max(step - 1 - snap.step, 0)
        h.recorder.counters["rollbacks"] += 1
        h.recorder.counters["steps_lost"] += lost
        out = {"rolled_back_to_step": snap.step, "steps_lost": lost}
        if unreadable:
            out["unreadable_snapshots"] = unreadable
        return out

    def tighten_clipping(self) -> dict[str, Any]:
        h = self.healer
        if h.zclip is not None:
            return h.zclip.tighten(h.config.clip_tighten_factor)
        hint = h.monitor.grad.window.mean if len(h.monitor.grad.window) else None
        return tighten_clipping(h.clip_args, h.config.clip_tighten_factor, hint)

    def give_up(self, diag: Diagnosis, reason: str) -> dict[str, Any]:
        h = self.healer
        h.gave_up = True
        h.give_up_reason = f"{diag.failure.value}: {reason or diag.summary}"
        out: dict[str, Any] = {"gave_up": reason or diag.summary}
        snap = h.ring.latest_verified()
        if snap is not None:  # leave the last good weights in memory for whatever the user saves next
            h.ring.restore(snap, h.model, h.optimizer, h.scheduler, restore_scheduler=False)
            out["restored_step"] = snap.step
        return out

    def note_skipped_batch(self, exc: BaseException, where: str, indices: list[int] | None, step: int) -> None:
        recorder = self.healer.recorder
        entry: dict[str, Any] = {"step": step, "where": where, "exception_type": type(exc).__name__,
                                 "error": str(exc)[:300]}
        if indices is not None:
            entry["indices"] = indices
        recorder.skipped_batches.append(entry)
        if len(recorder.skipped_batches) > 1000:  # bounded: keep the first and the latest
            del recorder.skipped_batches[500]

    def backoff(self, attempt: int, d: Diagnosis, step: int, record: bool = False, phase: str = "train") -> float:
        """Exponential backoff from `api_backoff_seconds`, doubling, capped, with full jitter.
        `record`: this retry is an event of its own in the postmortem (a retry inside the step;
        the orchestrator records its resumes itself), so flaky storage shows when it struck."""
        h = self.healer
        cfg = h.config
        base = cfg.api_backoff_seconds * (2 ** (attempt - 1))
        delay = min(base, cfg.api_backoff_max_seconds) * (0.5 + random.random() / 2)
        logger.warning("self-healing: %s; retry %s/%s in %.2fs", d.summary, attempt, cfg.max_api_retries, delay)
        h.recorder.counters["api_retries"] = h.recorder.counters.get("api_retries", 0) + 1
        if record:
            h.emit(d.step if d.step is not None else step, d, [Action.BACKOFF_RETRY.value],
                   {"retry": attempt, "of": cfg.max_api_retries, "backoff_seconds": round(delay, 3),
                    "phase": phase}, message="")
        time.sleep(delay)
        return delay

    # ------------------------------------------------------------------------------------------
    # exceptions that escaped the training loop (the orchestrator applies the Trainer's part)
    # ------------------------------------------------------------------------------------------
    def apply_exception(self, decision: ExceptionDecision) -> ExceptionDecision:
        """The engine's part of an exception decision, after the orchestrator freed memory, cut
        the batch and freed disk: back off (a transient error); give up (the event and the
        reason; the weights stay as they are); or note the batch a resume skips."""
        h, d = self.healer, decision.diagnosis
        details = dict(decision.details)
        if decision.backoff_attempt is not None:
            details["backoff_seconds"] = round(h.backoff(decision.backoff_attempt, d, decision.step), 3)
        if decision.stop:
            event = h.emit(decision.step, d, [Action.GIVE_UP.value], details, decision.reason, message="")
            h.gave_up = True
            h.give_up_reason = f"{d.failure.value}: {decision.reason or d.summary}"
            return replace(decision, details=details, event=event)
        if decision.resume is not None and decision.resume.skip_steps and decision.exception is not None:
            h.note_skipped_batch(decision.exception, decision.phase, None, decision.step)
        return replace(decision, details=details)

    def record_resume(self, decision: ExceptionDecision, where: str) -> ExceptionDecision:
        """Training re-enters from `where`: the event, the count, the log line."""
        h, d = self.healer, decision.diagnosis
        details = {**decision.details, "resume_from": where}
        actions = [a.value for a in decision.actions]
        event = h.emit(decision.step, d, actions + [Action.RESUME.value], details, decision.reason,
                       message="")  # logged below, with where it resumes from
        h.recorder.counters["exceptions_healed"] += 1
        logger.warning("self-healing: step %s: %s -> %s, resuming from %s", decision.step, d.summary,
                       ", ".join(actions), where)
        return replace(decision, actions=(*decision.actions, Action.RESUME), details=details, event=event)


__all__ = ["Applier"]
