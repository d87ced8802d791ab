"""The one decider: every failure, from a step's signals or from an exception that escaped the
training loop, is diagnosed and planned here, and comes back as a typed `Decision`.

`Decider.decide` judges a step's detections (`Healer.handle` applies the plan). For an exception
the orchestrator gathers the plain facts (`ExceptionFacts`: the exception, its origin as already
diagnosed, the step, whether a verified snapshot exists, the batch settings) and gets back an
`ExceptionDecision`: raise it unchanged (a bug is not healed), cut the batch to N, free disk,
back off, resume from the current state or the verified snapshot, or give up with a reason. The
escalation (`HealingPolicy`) and the OOM/ENOSPC special cases live here and nowhere else; the
orchestrator only applies what was decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .detectors import Detection, StateReport
from .diagnosis import Action, Diagnosis, FailureKind, diagnose, diagnose_exception, diagnose_state
from .distributed import RankFailure, is_distributed, per_rank_view

_STATE_SIGNALS = ("weight_corruption", "optimizer_state_corruption")
_INSPECTED_SIGNALS = ("nonfinite_loss", "nonfinite_gradient", "loss_spike", "exception")
_CORRUPTED = (FailureKind.WEIGHT_CORRUPTION, FailureKind.OPTIMIZER_STATE_CORRUPTION, FailureKind.NAN_LOSS)

OOM_AT_FLOOR = ("out of memory at per-device batch 1 with gradient checkpointing on: "
                "a smaller model, shorter sequences or more memory is needed")
OOM_IN_EVAL_AT_FLOOR = "out of memory in evaluation at per-device eval batch 1"
DISK_FULL = ("disk full, and nothing of the plugin's own (half-written or superseded "
             "checkpoints) is left to free; no verified checkpoint was deleted")
STREAMED_DATA = (" — the training data is a stream (an iterable dataset): its batches cannot be skipped "
                 "in place, so the error is raised unchanged")


@dataclass(frozen=True)
class Decision:
    """What the engine decided about one failure, already applied when it is returned.

    `skipped`: this step's update never reaches the weights (its gradients were dropped), or, for
    a finding's `undo`, it was taken back.
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


class RestorableState(Protocol):
    """A copy of the weights and optimizer state taken just before an update (`early_probe.UpdateUndo`)."""

    def restore(self, model: Any, optimizer: Any) -> bool:
        """Copy the state back into `model` and `optimizer`; False, writing nothing, when it no
        longer matches them."""
        ...


@dataclass(frozen=True)
class UndoRequest:
    """An observer's request to take back the update it just measured (the probe check). The
    observer only reads the state (it copied it before the update); the applier, the one place
    that writes the model and optimizer, restores `state`, so the undo is applied, counted and
    reported where every other action is. The event records the finding's diagnosis when the
    restore worked, `if_not_undone` (the same verdict without the undo) when it did not."""

    state: RestorableState
    if_not_undone: Diagnosis


@dataclass
class Finding:
    """What an observer (the early-warning signals) saw on one step, handed to the engine to act
    on (`Healer.act_on`) instead of calling into it:

    - `failure`: `detection` is decided and applied like any other failure, before the update lands;
    - `advisory`: `diagnosis` asks for a bounded LR change, outside the escalation;
    - `warning`: an early snapshot of `snapshot` (a state report of the state the coming update
      starts from; taken only if it passes the integrity check) and tighter clipping, then recorded;
    - `record`: `diagnosis` is recorded only (observe mode, or what the observer did itself), after
      its `undo` if it asks for one.

    `undo` (an advisory's or a record's): take back the update that just landed (`UndoRequest`);
    once restored, the step counts as skipped and verifies no snapshot. An observer never writes
    the model or optimizer itself: the applier does.
    `fisher_weights` (a failure's): (parameters, importance per parameter, None for "all"): if the
    decision rolls back, the rollback is Fisher-weighted, w = snapshot + (1 - importance)
    (w_before - snapshot), so the weights that matter most return to the snapshot and the rest
    keep their recent progress."""

    kind: str
    step: int
    detection: Detection | None = None
    diagnosis: Diagnosis | None = None
    snapshot: StateReport | None = None
    undo: UndoRequest | None = None
    fisher_weights: tuple[list[Any], list[Any]] | None = None

    KINDS = ("failure", "advisory", "warning", "record")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"Finding.kind={self.kind!r}: expected one of {', '.join(self.KINDS)}")
        if self.kind == "failure" and self.detection is None:
            raise ValueError("Finding.kind='failure' needs a detection")
        if self.kind != "failure" and (self.diagnosis is None or self.detection is not None):
            raise ValueError(f"Finding.kind={self.kind!r} needs a diagnosis and no detection")
        if self.fisher_weights is not None and self.kind != "failure":
            raise ValueError(f"Finding.kind={self.kind!r}: only a failure's rollback can be Fisher-weighted")
        if self.undo is not None and self.kind not in ("advisory", "record"):
            raise ValueError(f"Finding.kind={self.kind!r}: only an advisory or a record can ask for an undo")


# ---------------------------------------------------------------------------------------------
# exceptions: facts in, a typed decision out
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchFacts:
    """The batch settings an OOM is decided on (a Trainer's `args`, read, never written here)."""

    per_device_train_batch_size: Any = None
    gradient_accumulation_steps: Any = None
    steps_per_generation: Any = None
    generation_batch_size: Any = None
    num_generations: Any = None
    per_device_eval_batch_size: Any = None
    checkpointing: tuple[tuple[str, bool], ...] = ()
    """(name, on) for each of `activation_checkpointing`/`gradient_checkpointing` the args have."""

    @classmethod
    def from_args(cls, args: Any) -> "BatchFacts":
        names = ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                 "generation_batch_size", "num_generations", "per_device_eval_batch_size")
        flags = tuple((n, bool(getattr(args, n))) for n in ("activation_checkpointing", "gradient_checkpointing")
                      if hasattr(args, n))
        return cls(**{n: getattr(args, n, None) for n in names}, checkpointing=flags)


@dataclass(frozen=True)
class BatchChange:
    """A training-batch cut: the new per-device batch and gradient accumulation (the effective
    batch unchanged), or `enable` (a gradient checkpointing flag to turn on) at batch 1."""

    action: Action
    per_device_train_batch_size: int
    gradient_accumulation_steps: int | None = None
    steps_per_generation: int | None = None
    enable: str | None = None
    record: dict[str, Any] = field(default_factory=dict, compare=False)
    """What the postmortem's event says about the change."""


@dataclass(frozen=True)
class EvalBatchChange:
    per_device_eval_batch_size: int
    record: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Resume:
    """Where training re-enters: the current state when it checks out (`prefer_current`), else the
    newest verified snapshot; `skip_steps` of data are skipped (a batch the dataset raised on)."""

    prefer_current: bool
    skip_steps: int = 0
    agreed: bool = False
    """Every rank is here together (a `RankFailure`): the state is judged on every rank."""


@dataclass(frozen=True)
class ExceptionFacts:
    exception: BaseException
    step: int
    """The step that failed (the Trainer's `global_step` + 1)."""
    origin: str = "trainer"
    """Where it was raised, as already diagnosed (`diagnosis.exception_origin`)."""
    state: Detection | None = None
    """The state's integrity verdict (None: sound, or not checked)."""
    can_rollback: bool = False
    """A verified snapshot exists."""
    streamed_data: bool = False
    batch: BatchFacts = field(default_factory=BatchFacts)


@dataclass(frozen=True)
class ExceptionDecision(Decision):
    """The decision about an exception that escaped the training loop, for the orchestrator to
    apply. `raise_unchanged`: not healable (a bug): the exception surfaces as it was. `stop`:
    give up with `reason`. Else: free memory, cut the batch (`batch`/`eval_batch`), free disk
    (`free_disk`, then `Healer.disk_freed`), back off (`backoff_attempt`), and `resume`."""

    phase: str = "train"
    raise_unchanged: bool = False
    free_memory: bool = False
    batch: BatchChange | None = None
    eval_batch: EvalBatchChange | None = None
    free_disk: bool = False
    backoff_attempt: int | None = None
    resume: Resume | None = None
    exception: BaseException | None = field(default=None, compare=False, repr=False)


def plan_batch_cut(b: BatchFacts) -> BatchChange | None:
    """Halve the per-device batch and multiply gradient accumulation so the effective batch is
    unchanged; at batch 1, turn on gradient checkpointing; past that, None."""
    bs, ga = int(b.per_device_train_batch_size), int(b.gradient_accumulation_steps)
    if bs > 1:
        new_bs = max(d for d in range(1, bs // 2 + 1) if bs % d == 0)
        k = bs // new_bs
        spg = b.steps_per_generation
        generation = isinstance(spg, int) and spg > 0  # GRPO/RLOO: the generation batch stays the same size
        record: dict[str, Any] = {"per_device_train_batch_size": [bs, new_bs],
                                  "gradient_accumulation_steps": [ga, ga * k],
                                  "effective_batch": [bs * ga, new_bs * ga * k]}
        if new_bs != bs // 2:
            record["note"] = (f"{bs} does not halve evenly: {new_bs} x {ga * k} is the nearest split that "
                              "keeps the effective batch")
        if generation:
            record["steps_per_generation"] = [spg, spg * k]
            gbs, ng = b.generation_batch_size, b.num_generations
            if gbs and ng:
                record["generation_batch_size"] = gbs
                record["note"] = (record.get("note", "") + f" generation batch {gbs} unchanged, still divisible "
                                  f"by num_generations={ng}").strip()
        return BatchChange(Action.REDUCE_BATCH, new_bs, ga * k, spg * k if generation else None, record=record)
    for name, on in b.checkpointing:
        if on:
            return None
        return BatchChange(Action.ENABLE_GRADIENT_CHECKPOINTING, 1, enable=name,
                           record={"per_device_train_batch_size": [1, 1], name: True})
    return None


def plan_eval_batch_cut(b: BatchFacts) -> EvalBatchChange | None:
    bs = int(b.per_device_eval_batch_size)
    if bs <= 1:
        return None
    return EvalBatchChange(bs // 2, {"per_device_eval_batch_size": [bs, bs // 2], "training_batch": "unchanged"})


class Decider:
    """Diagnosis and escalation, for a `Healer` (`healer`: its policy, snapshot ring, recorder and
    state verdicts). Returns decisions; applies nothing to the model, optimizer or data."""

    def __init__(self, healer: Any) -> None:
        self.healer = healer
        self.suspect: tuple[int, float] | None = None
        """A loss-confirmed blow-up seen at this check (step, smoothed loss), not acted on yet."""

    def confirm_state(self, bad: Detection | None, step: int) -> Detection | None:
        """A state verdict to act on now, or None. A loss-confirmed blow-up (weights grown past
        `weight_growth_factor` x while the smoothed loss rose) waits for the next check: an LR
        that wrecks the model keeps the loss climbing, while small initial weights that grow fast
        as a batch-size-1 model starts to fit bump the loss up and bring it down again (seen on
        transformers' own `test_gradient_checkpointing` model, rolled back and LR-cut when healthy).
        Meanwhile the state is `suspect`: no snapshot, no new reference."""
        if bad is None or not bad.evidence.get("loss_confirmed"):
            self.suspect = None
            return bad
        seen, self.suspect = self.suspect, None
        if seen is None:
            self.suspect = (step, float(bad.evidence["smoothed_loss"]))
            return None
        if bad.evidence["smoothed_loss"] > seen[1]:  # still climbing since the first sighting
            bad.evidence.update(first_seen_step=seen[0], first_seen_loss=seen[1])
            return bad
        return None  # the loss came back down: a bump on the way, not a blow-up

    def decide(self, detections: list[Detection], step: int, exception: BaseException | None = None) -> tuple[Diagnosis, Any]:
        """Diagnose the first detection (with the state's integrity verdict when the step's
        numbers alone cannot tell a bad batch from bad weights) and plan the escalation."""
        h = self.healer
        det = detections[0]
        if det.signal in _STATE_SIGNALS:
            diag = diagnose_state(det)
        else:
            state = h.inspect(step) if det.signal in _INSPECTED_SIGNALS else None
            if det.signal == "exception" and exception is not None:
                diag = diagnose_exception(exception, step=step, state=state)
            else:
                diag = diagnose(det, state)
        if len(detections) > 1:
            diag.evidence["also_fired"] = [d.signal for d in detections[1:]]
        if h.rank_rows is not None and is_distributed():
            diag.evidence["per_rank"] = per_rank_view(h.rank_rows)
            if isinstance(exception, RankFailure) and exception.failure == FailureKind.DATA_ERROR \
                    and h.step_exception_kind == 0:  # the bad batch was another rank's: record it here too
                h.note_skipped_batch(exception, f"forward on rank(s) {exception.ranks}", None, step)
        if diag.failure in (FailureKind.NAN_LOSS, FailureKind.NONFINITE_GRADIENT):
            h.recorder.counters["nan_count"] += 1
        plan = h.policy.plan(diag, step, can_rollback=h.ring.latest_verified() is not None)
        if plan.reason and plan.actions != diag.actions:  # escalated: the summary must say what was done
            head = diag.summary.rsplit(": ", 1)[0]
            diag.summary = f"{head}: {plan.reason} -> {', '.join(a.value for a in plan.actions)}"
        return diag, plan

    def decide_batch(self, exc: BaseException, step: int, where: str) -> tuple[Diagnosis, Any]:
        """A batch that could not be built (`where`: the collator, the tokenizer...): skip it,
        until data errors hit more batches than `max_skipped_batches` allows."""
        d = diagnose_exception(exc, step=step, origin=where)
        return d, self.healer.policy.plan(d, step)

    def decide_exception(self, facts: ExceptionFacts) -> ExceptionDecision:
        """An exception that escaped the training loop: diagnose it by what it is and where it
        was raised, escalate, and say how it is healed (or that it is not)."""
        exc, step, origin = facts.exception, facts.step, facts.origin
        phase = origin if origin in ("eval", "save") else "train"
        d = diagnose_exception(exc, step=step, state=facts.state, phase=phase, origin=origin)
        if d.failure == FailureKind.DATA_ERROR and facts.streamed_data and origin in ("data", "collate"):
            d.healable = False  # resuming would re-read the stream up to the same batch
            d.summary += STREAMED_DATA
        details: dict[str, Any] = {"phase": phase}
        if not d.healable:  # a bug: not planned, not counted; it surfaces unchanged
            return ExceptionDecision(step, d, (), phase=phase, raise_unchanged=True, details=details, exception=exc)
        plan = self.healer.policy.plan(d, step, can_rollback=facts.can_rollback)
        actions, reason = list(plan.actions), plan.reason
        out: dict[str, Any] = {}
        if Action.GIVE_UP not in actions:
            if d.failure == FailureKind.OOM:
                out["free_memory"] = True
                if phase == "train":
                    change = plan_batch_cut(facts.batch)
                    if change is None:
                        actions, reason = [Action.GIVE_UP], OOM_AT_FLOOR
                    else:
                        out["batch"] = change
                        details["batch"] = dict(change.record)
                        actions = [change.action]
                else:
                    eval_change = plan_eval_batch_cut(facts.batch)
                    out["eval_batch"] = eval_change
                    details["eval_batch"] = dict(eval_change.record) if eval_change is not None else None
                    if eval_change is None:
                        actions, reason = [Action.GIVE_UP], OOM_IN_EVAL_AT_FLOOR
            elif d.failure == FailureKind.API_ERROR and d.evidence.get("enospc"):
                out["free_disk"] = True
            elif d.failure == FailureKind.API_ERROR:
                out["backoff_attempt"] = self.healer.policy.attempts
        stop = Action.GIVE_UP in actions
        resume = None if stop else Resume(prefer_current=d.failure not in _CORRUPTED,
                                          skip_steps=1 if d.failure == FailureKind.DATA_ERROR else 0,
                                          agreed=isinstance(exc, RankFailure))
        return ExceptionDecision(step, d, tuple(actions), reason, stop=stop, details=details, phase=phase,
                                 resume=resume, exception=exc, **out)

    def disk_freed(self, decision: ExceptionDecision, freed: list[str]) -> ExceptionDecision:
        """After a full disk: what freeing it gave; nothing freed is the end of the run."""
        details = {**decision.details, "freed": freed}
        if freed:
            return replace(decision, details=details)
        return replace(decision, actions=(Action.GIVE_UP,), reason=DISK_FULL, stop=True, resume=None, details=details)


__all__ = ["Decider", "Decision", "Finding", "UndoRequest", "RestorableState", "ExceptionDecision", "ExceptionFacts",
           "BatchFacts", "BatchChange", "EvalBatchChange", "Resume", "plan_batch_cut", "plan_eval_batch_cut"]
