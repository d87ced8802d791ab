"""Diagnosis: turn a detector's signal or an exception into what failed, why we think so, and the
ordered actions that heal it. Pure code: testable without a trainer.
"""

from __future__ import annotations

import errno
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .detectors import Detection


class FailureKind(str, Enum):
    NAN_LOSS = "nan_loss"
    NONFINITE_GRADIENT = "nonfinite_gradient"
    LOSS_SPIKE = "loss_spike"
    DIVERGENCE = "divergence"
    GRADIENT_EXPLOSION = "gradient_explosion"
    WEIGHT_CORRUPTION = "weight_corruption"
    OPTIMIZER_STATE_CORRUPTION = "optimizer_state_corruption"
    LR_SPIKE = "lr_spike"
    OOM = "oom"
    DATA_ERROR = "data_error"
    API_ERROR = "api_error"
    DPO_PLATEAU = "dpo_plateau"
    REWARD_COLLAPSE = "reward_collapse"
    OVERFITTING = "overfitting"
    KL_BLOWUP = "kl_blowup"
    # early warning (self_healing.early_warning)
    INSTABILITY_FORECAST = "instability_forecast"
    OSCILLATION = "oscillation"
    PROBE_REGRESSION = "probe_regression"
    INTERRUPTED = "interrupted"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


class Action(str, Enum):
    """Healing actions, in the vocabulary the postmortem uses."""

    SKIP_STEP = "skip_step"
    """Drop this step's update; the weights never see it."""
    ROLLBACK = "rollback"
    """Restore the newest verified-good snapshot in place and continue."""
    REDUCE_LR = "reduce_lr"
    RESTORE_LR = "restore_lr"
    """Put the LR back to what the scheduler set (the spike came from outside the schedule)."""
    RAISE_LR = "raise_lr"
    """Only for a stalled preference run (DPO plateau), within a cap."""
    TIGHTEN_CLIPPING = "tighten_clipping"
    SKIP_BATCH = "skip_batch"
    REDUCE_BATCH = "reduce_batch"
    BACKOFF_RETRY = "backoff_retry"
    ENABLE_GRADIENT_CHECKPOINTING = "enable_gradient_checkpointing"
    REDUCE_EVAL_BATCH = "reduce_eval_batch"
    RESUME = "resume"
    """Re-enter training from the last good state (in memory, else a verified checkpoint)."""
    CHECKPOINT = "checkpoint"
    ALERT = "alert"
    GIVE_UP = "give_up"

    def __str__(self) -> str:
        return self.value


REFERENCES: dict[FailureKind, list[str]] = {
    FailureKind.NAN_LOSS: [
        "Megatron-LM: NaN/Inf check of loss and gradients before the update",
        "PaLM (arXiv:2204.02311) §5.1: skip the bad batches, restart from an earlier checkpoint",
    ],
    FailureKind.NONFINITE_GRADIENT: ["Megatron-LM: NaN/Inf check of loss and gradients before the update"],
    FailureKind.LOSS_SPIKE: [
        "PaLM (arXiv:2204.02311) §5.1: loss spikes healed by restart + data skip",
        "OLMo-core SkipStepOptimizer: skip updates whose loss is a z-score outlier",
    ],
    FailureKind.GRADIENT_EXPLOSION: [
        "ZClip (arXiv:2504.02507): z-score gradient-norm outliers",
        "Pascanu et al. (arXiv:1211.5063): exploding gradients",
    ],
    FailureKind.DIVERGENCE: ["OPT-175B logbook (arXiv:2205.01068): restart from a checkpoint with a lower LR"],
    FailureKind.WEIGHT_CORRUPTION: ["ARC (arc-training): restore a verified host-memory snapshot"],
    FailureKind.OPTIMIZER_STATE_CORRUPTION: [
        "Adam (arXiv:1412.6980): the second moment is an EMA, so it cannot fall faster than beta2 per step"
    ],
    FailureKind.LR_SPIKE: ["LR outside the schedule: restore the scheduled value before the update lands"],
    FailureKind.OOM: ["Composer auto-microbatching: halve the microbatch, keep the global batch"],
    FailureKind.DATA_ERROR: ["PaLM (arXiv:2204.02311): skip the offending batches"],
    # trainer-aware monitors (self_healing.monitors)
    FailureKind.DPO_PLATEAU: [
        "DPO (arXiv:2305.18290): loss -log σ(β·margin) is ln 2 at zero margin, so loss ≈ ln 2 with margin ≈ 0 means "
        "nothing is being learned",
        "ORPO (arXiv:2403.07691), KTO (arXiv:2402.01306), CPO (arXiv:2401.08417): the same chance values of their losses",
    ],
    FailureKind.REWARD_COLLAPSE: [
        "GRPO (DeepSeekMath, arXiv:2402.03300): group-normalised advantages are 0 when a group's rewards are all equal",
        "DAPO (arXiv:2503.14476) §3.2: zero-variance groups give no gradient (dynamic sampling drops them)",
    ],
    FailureKind.KL_BLOWUP: [
        "InstructGPT (arXiv:2203.02155): the KL penalty to the reference policy bounds how far RL moves the model",
    ],
    FailureKind.OVERFITTING: ["Prechelt, Early Stopping - But When? (1998): stop when validation loss departs from "
                              "training loss"],
    # early warning (self_healing.early_warning)
    FailureKind.INSTABILITY_FORECAST: [
        "ARC (arc-training): act on the growth of the gradient and update norms before the loss explodes",
        "Siffer et al., Anomaly Detection in Streams with Extreme Value Theory (KDD 2017): calibrated thresholds",
    ],
    FailureKind.OSCILLATION: [
        "Cohen et al., Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability "
        "(arXiv:2103.00065): an LR above the stability edge makes the loss oscillate",
    ],
    FailureKind.PROBE_REGRESSION: [
        "Automatic Stability and Recovery for Neural Network Training: reject an update whose innovation "
        "(the loss change on a fixed probe batch) is out of its calibrated bound",
    ],
}


@dataclass
class Diagnosis:
    failure: FailureKind
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    step: int | None = None
    healable: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"failure": self.failure.value, "summary": self.summary, "evidence": self.evidence,
                "actions": [a.value for a in self.actions], "references": self.references, "step": self.step,
                "healable": self.healable}


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.4g}"
    return str(x)


def _make(kind: FailureKind, summary: str, evidence: dict, actions: list[Action], step: int | None,
          healable: bool = True) -> Diagnosis:
    return Diagnosis(kind, summary, dict(evidence), list(actions), list(REFERENCES.get(kind, [])), step, healable)


def diagnose(detection: Detection, state: Detection | None = None) -> Diagnosis:
    """Explain one step's detection. `state` is the integrity verdict on weights/optimizer state,
    taken only when something fired, so a NaN loss from NaN weights is told apart from a bad batch."""
    e, step = detection.evidence, detection.step
    if state is not None and state.signal in ("weight_corruption", "optimizer_state_corruption"):
        return diagnose_state(state, trigger=detection)
    sig = detection.signal
    if sig == "nonfinite_loss":
        return _make(FailureKind.NAN_LOSS,
                     f"loss is {_fmt(e.get('loss'))} at step {step} while weights and optimizer state are finite: "
                     "the update was skipped before it reached the weights", e, [Action.SKIP_STEP], step)
    if sig == "nonfinite_gradient":
        return _make(FailureKind.NONFINITE_GRADIENT,
                     f"gradient norm is {_fmt(e.get('grad_norm'))} at step {step} (loss {_fmt(e.get('loss'))} is finite): "
                     "the update was skipped before it reached the weights", e, [Action.SKIP_STEP], step)
    if sig == "gradient_explosion":
        how = (f"above the limit {_fmt(e['threshold'])}" if "threshold" in e
               else f"{_fmt(e.get('ratio'))}x the running mean {_fmt(e.get('running_mean'))}, z-score {_fmt(e.get('z_score'))}")
        return _make(FailureKind.GRADIENT_EXPLOSION,
                     f"pre-clip gradient norm {_fmt(e.get('grad_norm'))} at step {step} is {how}: update skipped",
                     e, [Action.SKIP_STEP], step)
    if sig == "lr_spike":
        return _make(FailureKind.LR_SPIKE,
                     f"learning rate {_fmt(e.get('lr'))} at step {step} is far above the scheduled "
                     f"{_fmt(e.get('scheduled_lr'))}: update skipped, scheduled LR restored", e,
                     [Action.SKIP_STEP, Action.RESTORE_LR], step)
    if sig == "loss_spike":
        return _make(FailureKind.LOSS_SPIKE,
                     f"loss {_fmt(e.get('loss'))} at step {step} is {_fmt(e.get('ratio'))}x the running mean "
                     f"{_fmt(e.get('running_mean'))}; weights look sound, so the batch's update was skipped", e,
                     [Action.SKIP_STEP], step)
    if sig == "divergence":
        return _make(FailureKind.DIVERGENCE,
                     f"smoothed loss rose for {e.get('rising_steps')} steps to {_fmt(e.get('smoothed_loss'))} "
                     f"(best {_fmt(e.get('best_smoothed_loss'))}) by step {step}: the LR is too high for this phase; rolled back "
                     "and the LR reduced", e, [Action.ROLLBACK, Action.REDUCE_LR], step)
    if sig == "instability_forecast":
        lr = bool(e.get("lr_cause"))
        return _make(FailureKind.INSTABILITY_FORECAST,
                     f"{e.get('signal_name', 'growth rate')} grew {_fmt(e.get('score'))}/step by step {step}, above its "
                     f"calibrated bound {_fmt(e.get('threshold'))} (target false-alarm rate {_fmt(e.get('target_rate'))}): "
                     + ("the LR grew with it, so the update was skipped and the LR reduced" if lr else "rolled back")
                     + " before the loss explodes", e, [Action.SKIP_STEP, Action.REDUCE_LR] if lr else [Action.ROLLBACK],
                     step)
    if sig in ("weight_corruption", "optimizer_state_corruption"):
        return diagnose_state(detection)
    if sig == "exception":
        exc = e.get("exception")
        if isinstance(exc, BaseException):
            return diagnose_exception(exc, step=step, state=state)
        return _make(FailureKind.UNKNOWN, f"exception at step {step}: {e.get('message')}", e, [], step, healable=False)
    return _make(FailureKind.UNKNOWN, f"unrecognised signal {sig!r} at step {step}", e, [], step, healable=False)


def diagnose_state(state: Detection, trigger: Detection | None = None) -> Diagnosis:
    e = dict(state.evidence)
    step = trigger.step if trigger is not None else state.step
    if trigger is not None:
        e["triggered_by"] = trigger.signal
        e.update({f"trigger_{k}": v for k, v in trigger.evidence.items() if isinstance(v, (int, float, str))})
    if state.signal == "weight_corruption" and e.get("loss_confirmed"):
        return _make(FailureKind.DIVERGENCE,
                     f"global weight norm grew {_fmt(e.get('ratio'))}x in {e.get('steps_apart')} steps (to "
                     f"{_fmt(e.get('weight_norm'))}) while the smoothed loss rose to {_fmt(e.get('smoothed_loss'))} from "
                     f"{_fmt(e.get('reference_loss'))}"
                     + (f", still rising since step {e['first_seen_step']} ({_fmt(e.get('first_seen_loss'))})"
                        if "first_seen_step" in e else "")
                     + f": the optimizer's own updates are wrecking the model (the LR is too "
                     f"high) at step {step}: rolled back and the LR reduced", e, [Action.ROLLBACK, Action.REDUCE_LR], step)
    if state.signal == "weight_corruption":
        if e.get("finite") is False:
            why = f"weights contain NaN/Inf (global norm {_fmt(e.get('weight_norm'))})"
        elif "update_reach" in e:
            why = (f"global weight norm grew to {_fmt(e.get('weight_norm'))} from {_fmt(e.get('reference_weight_norm'))} "
                   f"in {e.get('steps_apart')} steps, while the optimizer's updates (the LRs used x the update rule's "
                   f"bound) could move it by at most {_fmt(e.get('update_reach'))}: changed outside the optimizer")
        else:
            why = (f"global weight norm {_fmt(e.get('weight_norm'))} is {_fmt(e.get('ratio'))}x the last good state's "
                   f"{_fmt(e.get('reference_weight_norm'))}")
        return _make(FailureKind.WEIGHT_CORRUPTION, f"{why} at step {step}: rolled back to the last verified snapshot",
                     e, [Action.ROLLBACK], step)
    if "nonfinite_state" in e:
        why = f"optimizer state {', '.join(e['nonfinite_state'])} contains NaN/Inf"
    else:
        why = (f"Adam's second moment ({e.get('state_key', 'exp_avg_sq')}) norm fell to {_fmt(e.get('exp_avg_sq_norm'))} "
               f"from {_fmt(e.get('reference_exp_avg_sq_norm'))} "
               f"in {e.get('steps_apart')} steps; decay alone allows no lower than {_fmt(e.get('lowest_possible'))}")
    return _make(FailureKind.OPTIMIZER_STATE_CORRUPTION,
                 f"{why} at step {step}: rolled back to the last verified snapshot", e, [Action.ROLLBACK], step)


_OOM_MARKERS = ("out of memory", "cuda error: out of memory", "cudnn_status_alloc_failed", "cublas_status_alloc_failed",
                "hip out of memory", "mps backend out of memory", "failed to allocate memory")
_DATA_EXC = (IndexError, KeyError, TypeError, ValueError)
_DATA_MARKERS = ("shape", "size mismatch", "dimension", "index", "dtype", "expected scalar type", "collat",
                 "tokeniz", "must match the size", "sizes of tensors", "out of bounds", "out of range")
_API_EXC_NAMES = ("ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "HTTPError", "HfHubHTTPError",
                  "RemoteDisconnected", "ProtocolError", "ChunkedEncodingError", "IncompleteRead")
_TRANSIENT_ERRNO = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ESTALE,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EBUSY}


def _http_status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    code = getattr(resp, "status_code", None) or getattr(exc, "status_code", None)
    return code if isinstance(code, int) else None


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in msg for m in _OOM_MARKERS)


ORIGINS = ("collate", "data", "forward", "step", "eval", "save", "trainer")
"""Where an exception was raised: `collate` (the collator), `data` (the dataset or its iterator),
`forward` (inside the model's forward/backward on a batch), `step` (elsewhere in the training
step: the loss, a reward function, generation), `eval`, `save`, `trainer` (the loop itself, a
callback, argument or resume-path validation)."""
_ORIGIN_ATTR = "_self_healing_origin"


def tag_origin(exc: BaseException, origin: str, override: bool = False) -> None:
    """Remember where `exc` was raised. The innermost wrapper it passes knows best, except that
    evaluation and saving (`override=True`) own everything raised inside them."""
    if override or getattr(exc, _ORIGIN_ATTR, None) is None:
        try:
            setattr(exc, _ORIGIN_ATTR, origin)
        except (AttributeError, TypeError):  # an exception class with __slots__: origin unknown
            pass


def exception_origin(exc: BaseException) -> str | None:
    origin = getattr(exc, _ORIGIN_ATTR, None)
    return origin if origin in ORIGINS else None


_ORIGIN_WORDS = {"collate": "in the data collator", "data": "while loading a batch", "forward": "in the model's forward",
                 "step": "in the training step", "eval": "during evaluation", "save": "while saving",
                 "trainer": "in the training loop", None: "outside the training step"}


def _is_data_like(exc: BaseException, low: str) -> bool:
    return isinstance(exc, _DATA_EXC) or (isinstance(exc, RuntimeError) and any(m in low for m in _DATA_MARKERS))


def _is_batch_error_in_forward(exc: BaseException, low: str) -> bool:
    """Inside the model, only a batch's shape or content (an index out of range, a missing key, a
    size mismatch) is blamed on the data; any other error there is the model's code."""
    return isinstance(exc, (IndexError, KeyError)) or (
        isinstance(exc, (RuntimeError, ValueError, TypeError)) and any(m in low for m in _DATA_MARKERS))


def diagnose_exception(exc: BaseException, step: int | None = None, state: Detection | None = None,
                       phase: str | None = None, origin: str | None = None) -> Diagnosis:
    """Classify an exception by what it is *and where it was raised* (`origin`, else the tag the
    plugin's wrappers left on it; see `ORIGINS`).

    Healable wherever they come from: OOM, transient network/filesystem errors, a full disk. A
    data error only where a batch is built (collator, dataset, tokenizer) or a shape/index error
    inside the model's forward on that batch; non-finite values raising inside the training step.
    Everything else -- a bug in a callback, `compute_metrics`, a reward function, a bad argument
    or resume path, a model that returns no loss -- is not healable: it propagates unchanged.
    """
    origin = origin or exception_origin(exc)
    if phase is None:
        phase = origin if origin in ("eval", "save") else "train"
    name = type(exc).__name__
    msg = str(exc)
    low = msg.lower()
    ev: dict[str, Any] = {"exception_type": name, "message": msg[:500], "phase": phase, "origin": origin or "unknown"}
    agreed = getattr(exc, "failure", None)
    if name == "RankFailure" and isinstance(agreed, FailureKind):  # one rank's failure, agreed by all
        ev["ranks"] = getattr(exc, "ranks", [])
        actions = {FailureKind.OOM: [Action.REDUCE_BATCH] if phase == "train" else [Action.REDUCE_EVAL_BATCH],
                   FailureKind.DATA_ERROR: [Action.SKIP_BATCH], FailureKind.NAN_LOSS: [Action.SKIP_STEP]}
        return _make(agreed, f"{agreed.value} on rank(s) {ev['ranks']} at step {step}: {msg[:160]}", ev,
                     actions.get(agreed, []), step, healable=agreed in actions)
    if isinstance(exc, KeyboardInterrupt):
        return _make(FailureKind.INTERRUPTED, "interrupted by the user (KeyboardInterrupt): not healed", ev, [],
                     step, healable=False)
    if "illegal memory access" in low or "device-side assert" in low or isinstance(exc, AssertionError):
        return _make(FailureKind.UNKNOWN, f"{name}: {msg[:200]} — a program error, not retried", ev, [], step,
                     healable=False)
    if is_oom(exc):
        actions = [Action.REDUCE_BATCH] if phase == "train" else [Action.REDUCE_EVAL_BATCH]
        return _make(FailureKind.OOM, f"out of memory during {phase} at step {step}: {msg[:160]}", ev, actions, step)
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == errno.ENOSPC:
        return _make(FailureKind.API_ERROR, f"disk full while writing at step {step}: {msg[:160]}",
                     {**ev, "enospc": True}, [Action.BACKOFF_RETRY], step)
    code = _http_status(exc)
    if (isinstance(exc, (ConnectionError, TimeoutError)) or any(n in name for n in _API_EXC_NAMES)
            or (code is not None and (code >= 500 or code == 429))
            or (isinstance(exc, OSError) and getattr(exc, "errno", None) in _TRANSIENT_ERRNO)):
        if code is not None:
            ev["http_status"] = code
        return _make(FailureKind.API_ERROR, f"{name} at step {step} (network/storage, transient): {msg[:160]}", ev,
                     [Action.BACKOFF_RETRY], step)
    if state is not None and state.signal in ("weight_corruption", "optimizer_state_corruption"):
        d = diagnose_state(state)
        d.evidence.update(ev)
        return d
    if origin in ("forward", "step") and isinstance(exc, RuntimeError) and (
            "probability tensor contains" in low or re.search(r"\b(nan|inf)\b", low)):
        return _make(FailureKind.NAN_LOSS, f"non-finite values raised {name} at step {step}: {msg[:160]}", ev,
                     [Action.SKIP_STEP], step)
    if (origin in ("collate", "data") and _is_data_like(exc, low)) or (
            origin == "forward" and _is_batch_error_in_forward(exc, low)):
        return _make(FailureKind.DATA_ERROR, f"{name} from a batch ({_ORIGIN_WORDS[origin]}) at step {step}: {msg[:160]}",
                     ev, [Action.SKIP_BATCH], step)
    return _make(FailureKind.UNKNOWN, f"{name} raised {_ORIGIN_WORDS.get(origin, 'outside the training step')}: "
                 f"{msg[:200]} — not a failure this plugin heals, so it was not retried", ev, [], step, healable=False)
