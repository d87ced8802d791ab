"""Early warning: see a failure coming, several steps before the basic detectors fire.

Opt-in (`HealingConfig.growth_forecast`, `oscillation_check`, `probe_every_steps`,
`curvature_every_steps`); `SelfHealingCallback.attach` registers an `EarlyWarning` only when one of
them is on, so a run without them pays nothing. It works through the callback's own machinery: it
is an observer (`on_step` gets each step's loss and pre-clip grad norm after the basic detectors,
`on_event` sees every decision) and a Trainer callback added after the main one (its
`on_pre_optimizer_step` runs after the basic detectors, before `optimizer.step()`; its
`on_optimizer_step` right after the update). What it sees goes to the engine as typed findings
(`decider.Finding`, through `engine.act_on`, the one call it makes): a failure is decided and applied
there like every other (rollback and LR cut, with the escalation policy and attempt budget), an
advisory is a bounded LR cut, a warning an early snapshot and tighter clipping; the callback then
does what only the Trainer can with the decision.

Per step, with the signal on:

- **growth** (`instability_forecast`): EMA of log ratios of the pre-clip grad norm, of the norm of
  the last update on a fixed sample of <= 8192 weights, and of the loss. Each rate has its own
  calibrated bound. Above the warning bound: an early snapshot and tighter clipping (once per
  episode); above the failure bound on `GROWTH_PERSIST` steps in a row, at a rate that doubles the
  quantity within `FORECAST_HORIZON` steps: when the LR itself grew enough to explain it, skip this
  update and cut the LR (the weights are still sound: that is the point of seeing it early);
  otherwise skip and roll back (the policy adds an LR cut if it comes back).
- **oscillation**: the FFT of the last `oscillation_window` losses and grad norms (~50 us); the dominant period's share of the power above its calibrated bound means
  the LR is past the stability edge: `oscillation`, LR cut (once per window).
- **probe** (`probe_regression`): every `probe_every_steps`, the loss of a fixed probe batch before
  and after the update; a relative rise above its calibrated bound undoes the update (the engine
  copies weights and optimizer state back from a host copy taken just before it). After a
  rejection every update is checked for `PROBE_BOOST_STEPS`; two rejections within five probes cut
  the LR.
- **curvature** (recorded only): Hutchinson trace, top eigenvalue and SAM sharpness on the probe
  batch every `curvature_every_steps`.
- **Fisher** (`fisher_every_steps`): a diagonal Fisher EMA of the squared gradients. An
  `instability_forecast` rollback is then Fisher-weighted (w = snapshot + (1 - importance)
  (w - snapshot), importance = Fisher / its mean, clipped at 1), and for `ewc_steps` after any
  rollback an EWC pull F (w - restored) is added to the gradient, scaled to `ewc_strength` x |g|.

Calibration (`signals.Calibrator`): a score enters its signal's calibration window only once its
step is confirmed healthy, `CONFIRM_STEPS` steps later with no skip, rollback or LR cut in between
(from any detector): the build-up to a failure never teaches the thresholds that it is normal.
Scores are not collected during the LR warm-up nor for `CONFIRM_STEPS` steps after it (Adam's
moments settling); they are judged all along.

The parts live in their own modules, each measuring and judging only: `early_growth.GrowthJudge`,
`early_oscillation.OscillationJudge`, `early_probe.ProbeCheck` / `FisherEWC` / `measure_curvature`.
`EarlyWarning` here translates the Trainer's events for them and turns their verdicts into events
and actions (the failure count, the warning state and the summary are its own).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch
from transformers import TrainerCallback

from .decider import Finding, UndoRequest
from .detectors import Detection
from .diagnosis import Action, Diagnosis, diagnose
from .early_calibration import CONFIRM_STEPS, CalibrationGate
from .early_growth import (FORECAST_HORIZON, GROWTH_PERSIST, SAMPLE_PER_TENSOR, SAMPLE_TENSORS, WARNING_CALM_STEPS,
                           GrowthJudge, GrowthVerdict, warning_diagnosis)
from .early_oscillation import OscillationJudge, oscillation_diagnosis
from .early_probe import (CURVATURE_HISTORY, PROBE_BOOST_STEPS, PROBE_LR_RULE, FisherEWC, ProbeCheck, ProbeResult,
                          UpdateUndo, make_probe_batch, measure_curvature, probe_diagnosis)
from .signals import Calibrator
from .snapshot import state_report

logger = logging.getLogger("self_healing")

STANDARDIZE = 50
"""Healthy scores whose median and MAD standardise the next one (`signals.Calibrator`)."""


def _several_processes() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def wanted(config: Any) -> bool:
    return bool(config.growth_forecast or config.oscillation_check or config.probe_every_steps
                or config.curvature_every_steps or config.fisher_every_steps)


def observed_diagnosis(detection: Detection) -> Diagnosis:
    """The standard diagnosis of `detection`, with no action: what observe mode records."""
    diag = diagnose(detection)
    diag.actions = []
    diag.summary = diag.summary.split(":")[0] + ": observed only (early_warning_mode='observe')"
    return diag


def attach_early_warning(callback: Any) -> "EarlyWarning | None":
    """Called by `SelfHealingCallback.attach`: an `EarlyWarning` when any signal is on."""
    if not wanted(callback.config):
        return None
    return EarlyWarning(callback).install()


class EarlyWarning(TrainerCallback):
    """The opt-in early-warning signals of one `SelfHealingCallback` (see the module docstring): the
    Trainer's events in, the judges' verdicts out to the engine as events and actions."""

    def __init__(self, callback: Any) -> None:
        self.cb = callback
        cfg = self.config = callback.config
        self.observe_only = cfg.early_warning_mode == "observe"
        self.alpha_fail = cfg.target_false_alarm_rate
        self.alpha_warn = max(cfg.warning_false_alarm_rate, cfg.target_false_alarm_rate)
        names = []
        if cfg.growth_forecast:
            names += ["grad_norm_growth", "update_norm_growth", "loss_growth"]
        if cfg.oscillation_check:
            names += ["loss_oscillation", "grad_norm_oscillation"]
        if cfg.probe_every_steps:
            names += ["probe"]
        self.calibrators = {n: Calibrator(cfg.calibration_window, cfg.calibration_min_steps, standardize=STANDARDIZE)
                            for n in names}
        own = lambda suffix: {n: c for n, c in self.calibrators.items() if n.endswith(suffix)}  # noqa: E731
        self.growth_judge = GrowthJudge(cfg.growth_ema, own("growth"), self.alpha_fail, self.alpha_warn)
        self.oscillation = OscillationJudge(cfg.oscillation_window, own("oscillation"), self.alpha_fail)
        self.probe = ProbeCheck(cfg.probe_every_steps, self.calibrators.get("probe"), self.alpha_fail)
        self.fisher_ewc = FisherEWC(cfg.fisher_every_steps, cfg.ewc_strength) if cfg.fisher_every_steps else None
        self.fisher = self.fisher_ewc.fisher if self.fisher_ewc is not None else None
        self.gate = CalibrationGate(self.calibrators)
        self.enabled = True
        self._signals: Any = None
        self._info: dict[str, Any] = {}
        self._step_scores: dict[str, float] = {}
        self._warning_since: int | None = None
        self._calm = 0
        self.summary: dict[str, Any] = {
            "mode": cfg.early_warning_mode, "signals": self.enabled_signals(),
            "target_false_alarm_rate": self.alpha_fail, "warning_false_alarm_rate": self.alpha_warn,
            "calibration": {}, "warnings": 0, "failures": 0, "first_warning_step": None,
            "first_failure_step": None, "probe": {"probes": 0, "rejected": 0},
            "curvature": [], "seconds": {},
        }
        if self.fisher is not None:
            self.summary["fisher"] = {"updates": 0, "fisher_weighted_rollbacks": 0, "ewc_steps": 0}

    # the state under the names it had before the judges moved out
    growth = property(lambda self: self.growth_judge.rates)
    lr_growth = property(lambda self: self.growth_judge.lr_rate)
    loss_window = property(lambda self: self.oscillation.loss_window)
    grad_window = property(lambda self: self.oscillation.grad_window)
    probe_batch = property(lambda self: self.probe.batch)
    undo = property(lambda self: self.probe.undo)
    pending = property(lambda self: self.gate.pending)

    def enabled_signals(self) -> list[str]:
        c = self.config
        return [n for n, on in (("growth", c.growth_forecast), ("oscillation", c.oscillation_check),
                                ("probe", bool(c.probe_every_steps)), ("curvature", bool(c.curvature_every_steps)),
                                ("fisher", bool(c.fisher_every_steps)))
                if on]

    def install(self) -> "EarlyWarning":
        self.cb.observers.append(self)
        self.cb.trainer.add_callback(self)  # after the main callback: its hooks run after the basic detectors
        self.cb.recorder.extra["early_warning"] = self.summary
        return self

    def _cost(self, name: str, t0: float) -> None:
        s = self.summary["seconds"]
        s[name] = s.get(name, 0.0) + time.perf_counter() - t0

    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.cb.model.parameters() if p.requires_grad]

    # observer hooks (called by the engine) ----------------------------------------------------
    def on_step(self, step: int, signals: Any, info: dict[str, Any]) -> None:
        self._signals, self._info = signals, info

    def on_event(self, event: dict[str, Any]) -> None:
        """Any intervention (ours or the basic detectors'): the build-up before it is not healthy
        history, and after a rollback or LR change the rates describe another trajectory."""
        actions = set(event.get("actions") or [])
        # Observe-mode records (no actions) change nothing: the run goes on as if unseen.
        if actions & {"skip_step", "rollback", "reduce_lr", "restore_lr", "give_up"}:
            self.gate.forget()
        if actions & {"rollback", "reduce_lr", "raise_lr"}:
            self.growth_judge.reset()
            self.oscillation.clear()
        if "rollback" in actions and self.fisher_ewc is not None and self.config.ewc_steps:
            self.fisher_ewc.set_anchor(self._params(), int(event.get("step", 0)) + self.config.ewc_steps)

    # Trainer hooks ----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if _several_processes() and self.enabled:
            self.enabled = False
            logger.warning("self-healing: early-warning signals are not supported with several processes yet; off")
        if self.enabled and self.probe.batch is None and (self.config.probe_every_steps
                                                           or self.config.curvature_every_steps):
            self.probe.batch = make_probe_batch(self.cb.trainer, self.cb.model, self.config.probe_batch_size)
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        s, self._signals = self._signals, None
        self.probe.pending_step = None
        if not self.enabled or s is None or self.cb.gave_up:
            return control
        step = s.step
        if self._info.get("skipped"):  # the basic detectors acted on this step: no update lands
            self.growth_judge.forget_last()
            return control
        lr = s.lrs[0] if s.lrs else None
        self.gate.note_lr(step, s.scheduled_lrs[0] if s.scheduled_lrs else lr)
        scores: dict[str, float] = {}
        cfg = self.config
        if cfg.growth_forecast:
            t0 = time.perf_counter()
            scores.update(self.growth_judge.scores(lr, s.grad_norm, s.loss, self._params()))
            self._cost("growth", t0)
        if cfg.oscillation_check:
            t0 = time.perf_counter()
            scores.update(self.oscillation.scores(s.loss, s.grad_norm))
            self._cost("oscillation", t0)
        acted = False
        if cfg.growth_forecast:
            acted = self._submit(self._growth_finding(step, scores, s), control)
        if not acted and cfg.oscillation_check:
            self._submit(self._oscillation_finding(step, scores), control)  # an LR cut: the update stays
        if not acted and cfg.curvature_every_steps and step % cfg.curvature_every_steps == 0 and self.probe.batch:
            t0 = time.perf_counter()
            hist = self.summary["curvature"]
            hist.append(measure_curvature(self.cb.model, self.probe.batch, step))
            if len(hist) > CURVATURE_HISTORY:
                del hist[0]
            self._cost("curvature", t0)
        if not acted and self.probe.due(step) and self.probe.batch:
            t0 = time.perf_counter()
            self.probe.before_update(step, self.cb.model, self.cb.optimizer, self.observe_only)
            self._cost("probe", t0)
        if not acted and self.fisher_ewc is not None:
            t0 = time.perf_counter()
            if self.fisher_ewc.step(step, self._params()):
                self.summary["fisher"]["ewc_steps"] += 1
            self.summary["fisher"]["updates"] = self.fisher.updates
            self._cost("fisher", t0)
        self._step_scores = {} if acted else scores
        if not acted and scores:
            self.gate.hold(step, scores)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.probe.pending_step is None or not self.enabled:
            return control
        t0 = time.perf_counter()
        r = self.probe.after_update(self.cb.model)
        self.summary["probe"]["probes"] += 1
        if r.above:
            self._submit(self._rejected_update(r), control)
        elif not self.gate.lr_rising:
            self._step_scores["probe"] = r.score
            self.gate.hold_one(r.step, "probe", r.score)
        self._cost("probe", t0)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if not self.enabled:
            return control
        step = state.global_step
        self.gate.confirm(step)
        if self._warning_since is not None:
            self._calm = self._calm + 1 if not self.growth_judge.above_warning(self._step_scores) else 0
            if self._calm >= WARNING_CALM_STEPS:
                self._warning_since, self._calm = None, 0
        if step % 10 == 0:
            self._refresh_summary()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._refresh_summary()
        return control

    # acting on the verdicts -------------------------------------------------------------------
    def _submit(self, finding: Finding | None, control: Any) -> bool:
        """The one place findings reach the engine (`engine.act_on`); the callback does the
        Trainer's part of the decision. True when the step's update is dropped."""
        if finding is None:
            return False
        if finding.kind != "failure":
            decision = self.cb.engine.act_on(finding)
            if decision is not None and decision.skipped:  # the engine took the update back
                self.growth_judge.forget_last()
            return False
        imp = self.fisher_ewc.importance() if self.fisher_ewc is not None else None
        if imp is not None:  # a rollback, if decided, is Fisher-weighted (by the engine)
            finding = replace(finding, fisher_weights=(self._params(), imp))
        decision = self.cb.engine.act_on(finding)
        self.cb.apply_decision(decision, control)  # the Trainer's part: stop it if the engine gave up
        if imp is not None and decision is not None and decision.rolled_back_to is not None:
            self.summary["fisher"]["fisher_weighted_rollbacks"] += 1
        self._warning_since = None
        return True

    def _growth_finding(self, step: int, scores: dict[str, float], s: Any) -> Finding | None:
        v = self.growth_judge.judge(step, scores)
        if v is None:
            return None
        if v.level == "failure":
            return self._failure(step, "instability_forecast", self._growth_evidence(v, scores, s))
        if self._warning_since is None:
            return self._warning(step, self._growth_evidence(v, scores, s))
        return None

    def _growth_evidence(self, v: GrowthVerdict, scores: dict[str, float], s: Any) -> dict[str, Any]:
        mon = self.cb.monitor
        mean = mon.grad.window.mean if mon is not None and len(mon.grad.window) else None
        return self.growth_judge.evidence(v, scores, s.loss, s.grad_norm, mean, self.config.grad_spike_factor)

    def _warning(self, step: int, ev: dict[str, Any]) -> Finding:
        """Warning state: an early snapshot (so a rollback loses little) and tighter clipping,
        once per episode; the episode ends after `WARNING_CALM_STEPS` calm steps."""
        self._warning_since, self._calm = step, 0
        ev = {**ev, "level": "warning"}
        self.summary["warnings"] += 1
        if self.summary["first_warning_step"] is None:
            self.summary["first_warning_step"] = step
        if self.observe_only:
            return Finding("record", step, diagnosis=warning_diagnosis(step, ev, []))
        snap = self._early_state(step)
        actions = ([Action.CHECKPOINT] if snap is not None else []) + [Action.TIGHTEN_CLIPPING]
        return Finding("warning", step, diagnosis=warning_diagnosis(step, ev, actions), snapshot=snap)

    def _early_state(self, step: int) -> Any:
        """A state report of the state the coming update starts from (the one after step - 1),
        when it is newer than the newest snapshot: the engine snapshots it if it is sound."""
        latest = self.cb.ring.latest
        if latest is not None and latest.step >= step - 1:
            return None
        return state_report(self.cb.model, self.cb.optimizer, step - 1)

    def _can_cut_lr(self) -> bool:
        return self.cb.policy.lr_scale * self.config.lr_reduction_factor >= self.config.min_lr_scale

    def _oscillation_finding(self, step: int, scores: dict[str, float]) -> Finding | None:
        """An LR cut (once per window); it does not discard this step's update."""
        v = self.oscillation.judge(step, scores)
        if v is None:
            return None
        self._count_failure(step)
        actions = [Action.REDUCE_LR] if not self.observe_only and self._can_cut_lr() else []
        diag = oscillation_diagnosis(step, v, self.alpha_fail, self.config.oscillation_window, actions,
                                     self.config.lr_reduction_factor, self.observe_only)
        self.oscillation.clear()
        return Finding("advisory" if actions else "record", step, diagnosis=diag)

    def _rejected_update(self, r: ProbeResult) -> Finding:
        """The probe found the update made the probe loss worse: the engine is asked to undo it
        from the probe's pre-update copy (unless observing only); two rejections within five probes
        also cut the LR. The event says "undone" only if the engine could restore the copy."""
        self.summary["probe"]["rejected"] += 1
        self._count_failure(r.step)
        actions, recent = self.probe.reject(r.step, self.observe_only, self._can_cut_lr())
        undo = None
        if Action.SKIP_STEP in actions:
            kept = [a for a in actions if a != Action.SKIP_STEP]
            undo = UndoRequest(self.probe.undo, probe_diagnosis(r, self.alpha_fail, kept, recent, undo_failed=True))
        return Finding("advisory" if Action.REDUCE_LR in actions else "record", r.step,
                       diagnosis=probe_diagnosis(r, self.alpha_fail, actions, recent), undo=undo)

    # bookkeeping ------------------------------------------------------------------------------
    def _count_failure(self, step: int) -> None:
        self.summary["failures"] += 1
        if self.summary["first_failure_step"] is None:
            self.summary["first_failure_step"] = step

    def _failure(self, step: int, signal: str, ev: dict[str, Any]) -> Finding:
        self._count_failure(step)
        detection = Detection(signal, step, ev)
        if self.observe_only:
            return Finding("record", step, diagnosis=observed_diagnosis(detection))
        return Finding("failure", step, detection=detection)

    def _refresh_summary(self) -> None:
        notes = {**self.growth_judge.thresholds, **self.oscillation.thresholds, **self.probe.thresholds}
        cal = {}
        for n, c in self.calibrators.items():
            thr, method = notes.get(n, (None, "calibrating"))
            cal[n] = {"scores": len(c), "threshold": thr, "method": method, "coverage": c.coverage()}
        self.summary["calibration"] = cal
        if self.undo.seconds:
            self.summary["seconds"]["probe_state_copy"] = self.undo.seconds


__all__ = ["EarlyWarning", "attach_early_warning", "wanted", "UpdateUndo", "GrowthJudge", "OscillationJudge",
           "ProbeCheck", "FisherEWC", "CONFIRM_STEPS", "FORECAST_HORIZON", "GROWTH_PERSIST", "STANDARDIZE",
           "SAMPLE_TENSORS", "SAMPLE_PER_TENSOR", "PROBE_LR_RULE", "PROBE_BOOST_STEPS", "WARNING_CALM_STEPS",
           "CURVATURE_HISTORY"]
