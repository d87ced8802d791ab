"""Early warning: see a failure coming, several steps before the basic detectors fire.

Opt-in (`HealingConfig.growth_forecast`, `oscillation_check`, `probe_every_steps`,
`curvature_every_steps`); `SelfHealingCallback.attach` registers an `EarlyWarning` only when one of
them is on, so a run without them pays nothing. It works through the callback's own machinery: it
is an observer (`on_step` gets each step's loss and pre-clip grad norm after the basic detectors,
`on_event` sees every decision) and a Trainer callback added after the main one (its
`on_pre_optimizer_step` runs after the basic detectors, before `optimizer.step()`; its
`on_optimizer_step` right after the update). Its failures go to the engine as detections
(`callback.engine.handle`: rollback and LR cut, with the escalation policy and attempt budget of
every other failure; the callback then does what only the Trainer can), its advisories through
`engine.apply_advisory` (a bounded LR cut), its early snapshots through `engine.capture`.

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
  and after the update; a relative rise above its calibrated bound undoes the update (weights and
  optimizer state copied back from a host copy taken just before it). After a rejection every
  update is checked for `PROBE_BOOST_STEPS`; two rejections within five probes cut the LR.
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
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any

import torch
from transformers import TrainerCallback

from .detectors import Detection, compare_state
from .diagnosis import REFERENCES, Action, Diagnosis, FailureKind
from .signals import (Calibrator, FisherEMA, GrowthRate, autograd_hvp, dominant_period, finite_difference_hvp,
                      fisher_interpolate, hutchinson_trace, power_iteration, sam_sharpness)
from .snapshot import _copy_into, _host_buffer, model_tensors, state_report, unwrap_optimizer

logger = logging.getLogger("self_healing")

CONFIRM_STEPS = 20
"""Steps after which a step with no intervention counts as healthy for calibration."""
FORECAST_HORIZON = 20
"""A growth failure also needs the quantity to double within this many steps at its current rate."""
GROWTH_PERSIST = 2
"""Consecutive steps above the failure bound before a growth failure is declared (a one-step spike
of the grad norm is the basic detectors' job)."""
STANDARDIZE = 50
"""Healthy scores whose median and MAD standardise the next one (`signals.Calibrator`)."""
SAMPLE_TENSORS, SAMPLE_PER_TENSOR = 32, 256
PROBE_LR_RULE = (2, 5)
"""(rejections, within the last N probes) that cut the LR: a repeated regression is the dynamics."""
PROBE_BOOST_STEPS = 10
"""After a rejected update, every update is probe-checked for this many steps."""
WARNING_CALM_STEPS = 10
CURVATURE_HISTORY = 100


def _several_processes() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def wanted(config: Any) -> bool:
    return bool(config.growth_forecast or config.oscillation_check or config.probe_every_steps
                or config.curvature_every_steps or config.fisher_every_steps)


def attach_early_warning(callback: Any) -> "EarlyWarning | None":
    """Called by `SelfHealingCallback.attach`: an `EarlyWarning` when any signal is on."""
    if not wanted(callback.config):
        return None
    return EarlyWarning(callback).install()


class _UpdateUndo:
    """A host copy of the weights and the optimizer state, taken just before an update, into
    reused buffers: copying it back undoes exactly that update (Adam's step counts included)."""

    def __init__(self) -> None:
        self.src: list[torch.Tensor] = []
        self.buf: list[torch.Tensor] = []
        self.signature: list[tuple[int, str]] = []
        self.seconds = 0.0

    @staticmethod
    def _tensors(model: Any, optimizer: Any) -> tuple[list[torch.Tensor], list[tuple[int, str]]]:
        tensors = list(model_tensors(model))
        sig: list[tuple[int, str]] = []
        opt = unwrap_optimizer(optimizer)
        for group in opt.param_groups:
            for p in group["params"]:
                for k, v in opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        tensors.append(v)
                        sig.append((id(p), k))
        return tensors, sig

    def capture(self, model: Any, optimizer: Any) -> bool:
        t0 = time.perf_counter()
        tensors, sig = self._tensors(model, optimizer)
        if not sig:  # no optimizer state yet (first step): nothing exact to go back to
            return False
        if len(self.buf) != len(tensors) or any(b.shape != t.shape or b.dtype != t.dtype
                                                for b, t in zip(self.buf, tensors)):
            self.buf = [_host_buffer(t) for t in tensors]
        _copy_into(self.buf, tensors)
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize()
        self.src, self.signature = tensors, sig
        self.seconds += time.perf_counter() - t0
        return True

    def restore(self, model: Any, optimizer: Any) -> bool:
        tensors, sig = self._tensors(model, optimizer)
        if sig != self.signature or len(tensors) != len(self.buf):
            return False
        with torch.no_grad():
            _copy_into(tensors, self.buf)
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize()
        return True


class EarlyWarning(TrainerCallback):
    """The opt-in early-warning signals of one `SelfHealingCallback` (see the module docstring)."""

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
        self.growth = {n: GrowthRate(cfg.growth_ema) for n in ("grad_norm_growth", "update_norm_growth", "loss_growth")}
        self.lr_growth = GrowthRate(cfg.growth_ema)
        self.fisher = FisherEMA(0.95) if cfg.fisher_every_steps else None
        self._anchor: list[torch.Tensor] | None = None
        self._ewc_until = -1
        self.loss_window: deque[float] = deque(maxlen=cfg.oscillation_window)
        self.grad_window: deque[float] = deque(maxlen=cfg.oscillation_window)
        self.pending: deque[tuple[int, dict[str, float]]] = deque()
        self.enabled = True
        self.probe_batch: dict[str, Any] | None = None
        self.undo = _UpdateUndo()
        self._signals: Any = None
        self._info: dict[str, Any] = {}
        self._step_scores: dict[str, float] = {}
        self._sample_idx: list[tuple[torch.Tensor, int]] | None = None
        self._sample_prev: torch.Tensor | None = None
        self._prev_lr: float | None = None
        self._lr_rising = True
        """While True (warm-up and `CONFIRM_STEPS` after it) scores are judged but not calibrated on."""
        self._burn_in_until: int | None = None
        self._probe_before: float | None = None
        self._probe_step: int | None = None
        self._probe_history: deque[bool] = deque(maxlen=PROBE_LR_RULE[1])
        self._warning_since: int | None = None
        self._calm = 0
        self._osc_cooldown_until = 0
        self._fail_quiet_until = 0
        self._fail_streak = 0
        self._probe_boost_until = 0
        self.summary: dict[str, Any] = {
            "mode": cfg.early_warning_mode, "signals": self.enabled_signals(),
            "target_false_alarm_rate": self.alpha_fail, "warning_false_alarm_rate": self.alpha_warn,
            "calibration": {}, "warnings": 0, "failures": 0, "first_warning_step": None,
            "first_failure_step": None, "probe": {"probes": 0, "rejected": 0},
            "curvature": [], "seconds": {},
        }
        if self.fisher is not None:
            self.summary["fisher"] = {"updates": 0, "fisher_weighted_rollbacks": 0, "ewc_steps": 0}

    # ------------------------------------------------------------------------------------------
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

    # ------------------------------------------------------------------------------------------
    # observer hooks (called by the main callback)
    # ------------------------------------------------------------------------------------------
    def on_step(self, step: int, signals: Any, info: dict[str, Any]) -> None:
        self._signals, self._info = signals, info

    def on_event(self, event: dict[str, Any]) -> None:
        """Any intervention (ours or the basic detectors'): the build-up before it is not healthy
        history, and after a rollback or LR change the rates describe another trajectory."""
        actions = set(event.get("actions") or [])
        # Observe-mode records (no actions) change nothing: the run goes on as if unseen.
        if actions & {"skip_step", "rollback", "reduce_lr", "restore_lr", "give_up"}:
            self.pending.clear()
        if actions & {"rollback", "reduce_lr", "raise_lr"}:
            self._reset_trajectory()
        if "rollback" in actions and self.fisher is not None and self.config.ewc_steps:
            # the weights were just restored: they are the anchor the EWC pull holds the run near
            self._anchor = [p.detach().clone() for p in self._params()]
            self._ewc_until = int(event.get("step", 0)) + self.config.ewc_steps

    def _reset_trajectory(self) -> None:
        for g in self.growth.values():
            g.reset()
        self.lr_growth.reset()
        self._sample_prev = None
        self.loss_window.clear()
        self.grad_window.clear()

    # ------------------------------------------------------------------------------------------
    # Trainer hooks
    # ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if _several_processes() and self.enabled:
            self.enabled = False
            logger.warning("self-healing: early-warning signals are not supported with several processes yet; off")
        if self.enabled and self.probe_batch is None and (self.config.probe_every_steps
                                                           or self.config.curvature_every_steps):
            self.probe_batch = self._make_probe_batch()
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        s, self._signals = self._signals, None
        self._probe_step = None
        if not self.enabled or s is None or self.cb.gave_up:
            return control
        step = s.step
        if self._info.get("skipped"):  # the basic detectors acted on this step: no update lands
            self._sample_prev = None
            for g in self.growth.values():
                g.last = None
            return control
        lr = s.lrs[0] if s.lrs else None
        ref = s.scheduled_lrs[0] if s.scheduled_lrs else lr
        rising = False
        if ref is not None:
            rising = self._prev_lr is not None and ref > self._prev_lr * (1 + 1e-9)
            self._prev_lr = ref
        if self._burn_in_until is None or (rising and step < self._burn_in_until):
            # warm-up, and the steps right after it while Adam's moments settle, is not the regime
            # the thresholds are for
            self._burn_in_until = step + CONFIRM_STEPS
        self._lr_rising = rising or step < self._burn_in_until
        scores: dict[str, float] = {}
        cfg = self.config
        if cfg.growth_forecast:
            t0 = time.perf_counter()
            scores.update(self._growth_scores(s))
            self._cost("growth", t0)
        if cfg.oscillation_check:
            t0 = time.perf_counter()
            scores.update(self._oscillation_scores(s, step))
            self._cost("oscillation", t0)
        acted = False
        if cfg.growth_forecast:
            acted = self._judge_growth(step, scores, s, control)
        if not acted and cfg.oscillation_check:
            acted = self._judge_oscillation(step, scores, control)
        if not acted and cfg.curvature_every_steps and step % cfg.curvature_every_steps == 0 and self.probe_batch:
            t0 = time.perf_counter()
            self._curvature(step)
            self._cost("curvature", t0)
        probe_due = cfg.probe_every_steps and (step % cfg.probe_every_steps == 0 or step <= self._probe_boost_until)
        if not acted and probe_due and self.probe_batch:
            t0 = time.perf_counter()
            before = self._probe_loss()
            if math.isfinite(before) and (self.observe_only or self.undo.capture(self.cb.model, self.cb.optimizer)):
                self._probe_before, self._probe_step = before, step
            self._cost("probe", t0)
        if not acted and self.fisher is not None:
            t0 = time.perf_counter()
            self._fisher_and_ewc(step)
            self._cost("fisher", t0)
        self._step_scores = {} if acted else scores
        if not acted and scores:
            self.pending.append((step, {k: v for k, v in scores.items() if not self._lr_rising}))
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._probe_step is None or not self.enabled:
            return control
        t0 = time.perf_counter()
        step, before = self._probe_step, self._probe_before
        self._probe_step = None
        after = self._probe_loss()
        score = (after - before) / max(abs(before), 1e-8) if math.isfinite(after) else math.inf
        self.summary["probe"]["probes"] += 1
        cal = self.calibrators["probe"]
        above, thr, method = cal.test(score, self.alpha_fail) if math.isfinite(score) else (True, None, "nonfinite")
        self._calibration_note("probe", thr, method)
        self._probe_history.append(bool(above))
        if above:
            self._reject_update(step, before, after, score, thr, method, control)
        elif not self._lr_rising:
            self._step_scores["probe"] = score
            if self.pending and self.pending[-1][0] == step:
                self.pending[-1][1]["probe"] = score
            else:
                self.pending.append((step, {"probe": score}))
        self._cost("probe", t0)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if not self.enabled:
            return control
        step = state.global_step
        while self.pending and self.pending[0][0] <= step - CONFIRM_STEPS:
            _, scores = self.pending.popleft()
            for name, v in scores.items():
                if name in self.calibrators:
                    self.calibrators[name].add(v)
        if self._warning_since is not None:
            self._calm = self._calm + 1 if not self._above_warning(self._step_scores) else 0
            if self._calm >= WARNING_CALM_STEPS:
                self._warning_since, self._calm = None, 0
        if step % 10 == 0:
            self._refresh_summary()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._refresh_summary()
        return control

    # ------------------------------------------------------------------------------------------
    # growth
    # ------------------------------------------------------------------------------------------
    def _growth_scores(self, s: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        upd = self._update_norm()
        self.lr_growth.update(s.lrs[0] if s.lrs else None)
        for name, x in (("grad_norm_growth", s.grad_norm), ("update_norm_growth", upd), ("loss_growth", s.loss)):
            g = self.growth[name]
            r = g.update(x)
            if r is not None and g.count >= 3:
                out[name] = r
        return out

    def _update_norm(self) -> float | None:
        """Norm of the last update on a fixed sample of weights (<= 32 tensors x 256 values): the
        difference between the sample now and one step ago. One small gather and one host sync."""
        params = [p for p in self.cb.model.parameters() if p.requires_grad]
        if self._sample_idx is None:
            stride = max(len(params) // SAMPLE_TENSORS, 1)
            chosen = params[::stride][:SAMPLE_TENSORS]
            self._sample_idx = [(p, max(p.numel() // SAMPLE_PER_TENSOR, 1)) for p in chosen]
        with torch.no_grad():
            cur = torch.cat([p.detach().reshape(-1)[::st][:SAMPLE_PER_TENSOR].float().to(self._sample_idx[0][0].device)
                             for p, st in self._sample_idx])
        prev, self._sample_prev = self._sample_prev, cur
        if prev is None or prev.shape != cur.shape:
            return None
        n = float(torch.linalg.vector_norm(cur - prev))
        return n if n > 0 else None

    def _judge_growth(self, step: int, scores: dict[str, float], s: Any, control: Any) -> bool:
        names = [n for n in ("grad_norm_growth", "update_norm_growth", "loss_growth") if n in scores]
        if not names:
            return False
        # three rates watched at once: each gets a third of the false-alarm budget (Bonferroni)
        fail, warn = self.alpha_fail / 3, self.alpha_warn / 3
        worst_fail, worst_warn = None, None
        floor = math.log(2) / FORECAST_HORIZON
        for n in names:
            above, thr, method = self.calibrators[n].test(scores[n], fail)
            self._calibration_note(n, thr, method)
            above = above and scores[n] >= floor  # unusual for this run *and* doubling within the horizon
            if above and (worst_fail is None or scores[n] / max(thr, 1e-12) > worst_fail[1]):
                worst_fail = (n, scores[n] / max(thr, 1e-12), thr, method)
        self._fail_streak = self._fail_streak + 1 if worst_fail is not None else 0
        if self._fail_streak < GROWTH_PERSIST:
            worst_fail = None
            w_above, w_thr, _ = self.calibrators[n].test(scores[n], warn)
            if w_above and worst_warn is None:
                worst_warn = (n, w_thr)
        if worst_fail is not None and step >= self._fail_quiet_until:
            self._fail_quiet_until = step + WARNING_CALM_STEPS  # one event per episode, not one per step
            n, _, thr, method = worst_fail
            ev = self._growth_evidence(n, scores, thr, method, s)
            self._failure(step, "instability_forecast", ev, control)
            return not self.observe_only
        if worst_warn is not None and self._warning_since is None:
            n, thr = worst_warn
            self._warning(step, self._growth_evidence(n, scores, thr, "", s))
        return False

    def _growth_evidence(self, name: str, scores: dict[str, float], thr: float, method: str, s: Any) -> dict[str, Any]:
        ev: dict[str, Any] = {"signal_name": name.replace("_", " "), "score": scores[name], "threshold": thr,
                              "calibration": method, "target_rate": self.alpha_fail}
        ev.update({f"{k}_per_step": round(v, 6) for k, v in scores.items() if k.endswith("growth")})
        g = self.growth["grad_norm_growth"]
        mean = self.cb.monitor.grad.window.mean if self.cb.monitor is not None and len(self.cb.monitor.grad.window) else None
        if mean and mean > 0:  # when the basic gradient test would fire at this rate
            ev["steps_to_grad_spike_forecast"] = round(g.forecast_steps(self.config.grad_spike_factor * mean), 1)
        ev["loss"], ev["grad_norm"] = s.loss, s.grad_norm
        # the diagnosis: did the LR itself grow enough to explain it? Then the cure is an LR cut;
        # otherwise a rollback alone (the policy adds the cut if it comes back)
        lr_rate = self.lr_growth.rate or 0.0
        ev["lr_growth_per_step"] = round(lr_rate, 6)
        ev["lr_cause"] = lr_rate > 0.01 and lr_rate >= 0.5 * max(scores.get("update_norm_growth", 0.0), 0.0)
        return ev

    def _warning(self, step: int, ev: dict[str, Any]) -> None:
        """Warning state: an early snapshot (so a rollback loses little) and tighter clipping,
        once per episode; the episode ends after `WARNING_CALM_STEPS` calm steps."""
        self._warning_since, self._calm = step, 0
        ev = {**ev, "level": "warning"}
        self.summary["warnings"] += 1
        if self.summary["first_warning_step"] is None:
            self.summary["first_warning_step"] = step
        actions: list[Action] = []
        details: dict[str, Any] = {}
        if not self.observe_only:
            snap = self._early_snapshot(step)
            if snap is not None:
                actions.append(Action.CHECKPOINT)
                details["snapshot_step"] = snap
            details["clipping"] = self.cb.engine.tighten_clipping()
            actions.append(Action.TIGHTEN_CLIPPING)
        diag = Diagnosis(FailureKind.INSTABILITY_FORECAST,
                         f"{ev['signal_name']} is growing {ev['score']:.3g}/step at step {step}, above its warning bound "
                         f"{ev['threshold']:.3g}: " + ("early snapshot taken and clipping tightened" if actions
                                                       else "observed only"),
                         ev, actions, list(REFERENCES.get(FailureKind.INSTABILITY_FORECAST, [])), step)
        self._record(step, diag, details)

    def _early_snapshot(self, step: int) -> int | None:
        """Snapshot the state the coming update starts from (the one after step - 1), if it is
        sound and newer than the newest snapshot."""
        latest = self.cb.ring.latest
        if latest is not None and latest.step >= step - 1:
            return None
        report = state_report(self.cb.model, self.cb.optimizer, step - 1)
        if compare_state(report, self.cb.engine.ref_report, self.config.weight_growth_factor) is not None:
            return None
        self.cb.engine.capture(step - 1, report)
        return step - 1

    # ------------------------------------------------------------------------------------------
    # oscillation
    # ------------------------------------------------------------------------------------------
    def _oscillation_scores(self, s: Any, step: int) -> dict[str, float]:
        if s.loss is not None and math.isfinite(s.loss):
            self.loss_window.append(s.loss)
        if s.grad_norm is not None and math.isfinite(s.grad_norm):
            self.grad_window.append(s.grad_norm)
        w = self.config.oscillation_window
        out: dict[str, float] = {}
        for name, win in (("loss_oscillation", self.loss_window), ("grad_norm_oscillation", self.grad_window)):
            if len(win) == w:
                sp = dominant_period(list(win), min_cycles=4)
                if sp is not None:
                    out[name] = sp.power_fraction
                    self._last_period = {**getattr(self, "_last_period", {}), name: sp.period}
        return out

    def _judge_oscillation(self, step: int, scores: dict[str, float], control: Any) -> bool:
        if step < self._osc_cooldown_until:
            return False
        for n in ("loss_oscillation", "grad_norm_oscillation"):
            if n not in scores:
                continue
            above, thr, method = self.calibrators[n].test(scores[n], self.alpha_fail / 2)
            self._calibration_note(n, thr, method)
            if not above:
                continue
            period = getattr(self, "_last_period", {}).get(n)
            ev = {"signal_name": n.replace("_", " "), "power_fraction": scores[n], "threshold": thr,
                  "calibration": method, "period_steps": period, "target_rate": self.alpha_fail,
                  "window": self.config.oscillation_window}
            self._osc_cooldown_until = step + self.config.oscillation_window
            self._count_failure(step)
            can_cut = self.cb.policy.lr_scale * self.config.lr_reduction_factor >= self.config.min_lr_scale
            actions = [Action.REDUCE_LR] if not self.observe_only and can_cut else []
            what = (f"LR reduced by {self.config.lr_reduction_factor}" if actions else
                    "recommendation: reduce the LR" + (" (observed only)" if self.observe_only else
                                                        " (already at min_lr_scale)"))
            diag = Diagnosis(FailureKind.OSCILLATION,
                             f"{ev['signal_name']} oscillates with a period of {period:.3g} steps at step {step} "
                             f"({scores[n]:.0%} of its power, calibrated bound {thr:.0%}): the LR is past the stability "
                             f"edge; {what}", ev, actions, list(REFERENCES.get(FailureKind.OSCILLATION, [])), step)
            if actions:
                self.cb.engine.apply_advisory(diag, step)
            else:
                self._record(step, diag, {})
            self.loss_window.clear()
            self.grad_window.clear()
            return False  # an LR cut does not discard this step's update
        return False

    # ------------------------------------------------------------------------------------------
    # probe-checked updates
    # ------------------------------------------------------------------------------------------
    def _make_probe_batch(self) -> dict[str, Any] | None:
        """The first evaluation batch (else the first training batch), cut to `probe_batch_size`
        rows, on the model's device. Every RNG state is put back afterwards, so taking it changes
        nothing in the run (the data order included)."""
        import random

        import numpy as np

        t = self.cb.trainer
        states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                  torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
        batch = None
        try:
            loader = t.get_eval_dataloader() if getattr(t, "eval_dataset", None) is not None else t.get_train_dataloader()
            for b in loader:
                if isinstance(b, dict) or hasattr(b, "keys"):
                    batch = b
                    break
        except Exception as exc:  # noqa: BLE001 - no probe batch: the probe signals turn off
            logger.warning("self-healing: no probe batch (%s: %s); probe/curvature signals off", type(exc).__name__, exc)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
            if states[3] is not None:
                torch.cuda.set_rng_state_all(states[3])
        if batch is None:
            return None
        import inspect

        model = self.cb.model
        try:
            accepted = set(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            accepted = set()
        k = self.config.probe_batch_size
        out = {}
        for key, v in batch.items():
            if accepted and key not in accepted and "kwargs" not in accepted:
                continue
            if isinstance(v, torch.Tensor):
                out[key] = v[:k].to(t.args.device)
        if "labels" not in out or "input_ids" not in out:
            logger.warning("self-healing: the probe needs a language-modelling batch (input_ids, labels); "
                           "probe/curvature signals off for %s", type(t).__name__)
            return None
        return out

    def _probe_loss(self) -> float:
        model = self.cb.model
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(**self.probe_batch)
            loss = out.loss if hasattr(out, "loss") else out[0]
            return float(loss)
        finally:
            model.train(was)

    def _reject_update(self, step: int, before: float, after: float, score: float, thr: float | None, method: str,
                       control: Any) -> None:
        self.summary["probe"]["rejected"] += 1
        self._probe_boost_until = step + PROBE_BOOST_STEPS  # in doubt: check every update for a while
        self._count_failure(step)
        ev = {"probe_loss_before": before, "probe_loss_after": after, "relative_rise": score, "threshold": thr,
              "calibration": method, "target_rate": self.alpha_fail}
        actions: list[Action] = []
        details: dict[str, Any] = {}
        recent = sum(self._probe_history)
        cut = recent >= PROBE_LR_RULE[0]
        can_cut = self.cb.policy.lr_scale * self.config.lr_reduction_factor >= self.config.min_lr_scale
        if not self.observe_only:
            if self.undo.restore(self.cb.model, self.cb.optimizer):
                actions.append(Action.SKIP_STEP)
                self.cb.recorder.counters["skipped_steps"] += 1
                self.cb.engine.step_flagged = True  # the step's update was not kept: it verifies no snapshot
                self._sample_prev = None
                for g in self.growth.values():
                    g.last = None
            if cut and can_cut:
                actions.append(Action.REDUCE_LR)
                self._probe_history.clear()
        bound = f"{thr:.3g}" if thr is not None else "n/a"
        what = {(): "observed only", (Action.SKIP_STEP,): "update undone (pre-update state restored)",
                (Action.SKIP_STEP, Action.REDUCE_LR): f"update undone; {recent} of the last {PROBE_LR_RULE[1]} probes "
                                                       "regressed, so the LR was reduced"}.get(tuple(actions), "")
        diag = Diagnosis(FailureKind.PROBE_REGRESSION,
                         f"the update at step {step} raised the probe loss {before:.4g} -> {after:.4g} "
                         f"({score:+.2%}, calibrated bound {bound}): {what}", ev, actions,
                         list(REFERENCES.get(FailureKind.PROBE_REGRESSION, [])), step)
        if Action.REDUCE_LR in actions:
            self.cb.engine.apply_advisory(diag, step)
        else:
            self._record(step, diag, details)

    # ------------------------------------------------------------------------------------------
    # importance: Fisher EMA, EWC after a recovery
    # ------------------------------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.cb.model.parameters() if p.requires_grad]

    def _fisher_and_ewc(self, step: int) -> None:
        params = self._params()
        if step % self.config.fisher_every_steps == 0:
            self.fisher.update([p.grad for p in params])
            self.summary["fisher"]["updates"] = self.fisher.updates
        if self._anchor is not None and step > self._ewc_until:
            self._anchor = None  # the pull is over: free the copy
        if self._anchor is None:
            return
        imp = self.fisher.importance("mean")
        live = [(p, a, f) for p, a, f in zip(params, self._anchor, imp or []) if p.grad is not None and f is not None]
        if not live:
            return
        with torch.no_grad():
            pulls = [f * (p.detach() - a) for p, a, f in live]
            pull_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(pulls))))
            grad_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p, _, _ in live]))))
            if not (pull_norm > 0 and math.isfinite(pull_norm) and math.isfinite(grad_norm)):
                return
            # the gradient of (lam/2) sum F (w - anchor)^2, scaled to `ewc_strength` x |g|
            torch._foreach_add_([p.grad for p, _, _ in live], pulls, alpha=self.config.ewc_strength * grad_norm / pull_norm)
        self.summary["fisher"]["ewc_steps"] += 1

    # ------------------------------------------------------------------------------------------
    # curvature (recorded only)
    # ------------------------------------------------------------------------------------------
    def _curvature(self, step: int) -> None:
        model = self.cb.model
        params = [p for p in model.parameters() if p.requires_grad]
        batch = self.probe_batch

        def loss_fn() -> torch.Tensor:
            return model(**batch).loss

        was = model.training
        model.eval()
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(step)
        row: dict[str, Any] = {"step": step}
        try:
            hvp = autograd_hvp(loss_fn, params)
            try:
                hvp([torch.zeros_like(p) for p in params])
                row["hvp"] = "autograd"
            except RuntimeError:  # an attention kernel without double backward
                hvp = finite_difference_hvp(loss_fn, params)
                row["hvp"] = "finite_difference"
            row["hessian_trace"], row["hessian_trace_se"] = hutchinson_trace(hvp, params, samples=4, generator=gen)
            row["top_eigenvalue"] = power_iteration(hvp, params, iters=10, generator=gen)
            row["sam_sharpness"], row["probe_loss"] = sam_sharpness(loss_fn, params, rho=0.05)
        except Exception as exc:  # noqa: BLE001 - a measurement must never kill the run
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            model.train(was)
        row["seconds"] = round(time.perf_counter() - t0, 4)
        hist = self.summary["curvature"]
        hist.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
        if len(hist) > CURVATURE_HISTORY:
            del hist[0]

    # ------------------------------------------------------------------------------------------
    # bookkeeping
    # ------------------------------------------------------------------------------------------
    def _above_warning(self, scores: dict[str, float]) -> bool:
        for n, v in scores.items():
            if n.endswith("growth"):
                thr, _ = self.calibrators[n].threshold(self.alpha_warn / 3)
                if thr is not None and v > thr:
                    return True
        return False

    def _count_failure(self, step: int) -> None:
        self.summary["failures"] += 1
        if self.summary["first_failure_step"] is None:
            self.summary["first_failure_step"] = step

    def _failure(self, step: int, signal: str, ev: dict[str, Any], control: Any) -> None:
        self._count_failure(step)
        if self.observe_only:
            from .diagnosis import diagnose

            diag = diagnose(Detection(signal, step, ev))
            diag.actions = []
            diag.summary = diag.summary.split(":")[0] + ": observed only (early_warning_mode='observe')"
            self._record(step, diag, {})
            return
        imp = self.fisher.importance("mean") if self.fisher is not None and self.fisher.updates else None
        params = self._params()
        current = [p.detach().clone() for p in params] if imp is not None else None
        rollbacks = self.cb.recorder.counters["rollbacks"]
        decision = self.cb.engine.handle([Detection(signal, step, ev)], step, before_update=True)
        self.cb.apply_decision(decision, control)  # the Trainer's part: stop it if the engine gave up
        if current is not None and self.cb.recorder.counters["rollbacks"] > rollbacks:
            # Fisher-weighted rollback: w = snapshot + (1 - importance) (w_before - snapshot)
            restored = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_copy_(params, current)
            fisher_interpolate(params, restored, imp)
            self.summary["fisher"]["fisher_weighted_rollbacks"] += 1
        self._warning_since = None

    def _record(self, step: int, diag: Diagnosis, details: dict[str, Any]) -> None:
        self.cb.engine.emit(step, diag, [a.value for a in diag.actions], details)

    def _calibration_note(self, name: str, thr: float | None, method: str) -> None:
        self._last_thr = getattr(self, "_last_thr", {})
        self._last_thr[name] = (thr, method)

    def _refresh_summary(self) -> None:
        cal = {}
        for n, c in self.calibrators.items():
            thr, method = getattr(self, "_last_thr", {}).get(n, (None, "calibrating"))
            cal[n] = {"scores": len(c), "threshold": thr, "method": method, "coverage": c.coverage()}
        self.summary["calibration"] = cal
        if self.undo.seconds:
            self.summary["seconds"]["probe_state_copy"] = self.undo.seconds


__all__ = ["EarlyWarning", "attach_early_warning", "wanted"]
