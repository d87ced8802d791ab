"""trackio dashboards: the plugin's series and decisions in the run the Trainer already reports to.

Attached by `SelfHealingCallback.attach()` when `"trackio" in args.report_to` (and
`HealingConfig.trackio_logging`); otherwise nothing here is imported. Every optimizer step logs
`healing/recovery_attempts`, `healing/nan_count`, `healing/skipped_steps`, `healing/rollbacks`,
`healing/loss_spike_ratio` (when defined), every 10th step `healing/goodput` and
`healing/job_goodput` (self_healing.watchdog) and, with ZClip on, `zclip/raw_grad_norm`,
`zclip/clipped_grad_norm`, `zclip/z_score` (after warm-up), `zclip/total_clips`; each evaluation
logs `healing/eval_gap`. Every decision raises `trackio.alert`: INFO when ZClip clips an outlier,
WARN on a skipped step, rollback, LR change or monitor finding, ERROR when the run gives up or dies.

Same step axis as the Trainer: transformers' `TrackioCallback` logs without a step, so trackio
numbers its rows by call count. Our rows carry `step=global_step`, and before each Trainer log
the run's next auto step is set to `global_step` too, so both land on the optimizer step (each
row also carries `train/global_step`). Works offline: local trackio writes to
`$TRACKIO_DIR/<project>.db` and nothing here opens a connection.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

from transformers import TrainerCallback

from . import compat
from .redact import redact_text

logger = logging.getLogger("self_healing")

_ADVISORY = {"dpo_plateau", "reward_collapse", "overfitting", "kl_blowup"}


def reports_to_trackio(args: Any) -> bool:
    report_to = getattr(args, "report_to", None)
    if isinstance(report_to, str):
        report_to = [report_to]
    return bool(report_to) and "trackio" in report_to


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class TrackioTracker(TrainerCallback):
    """Observer of a `SelfHealingCallback` (its `on_step`/`on_event`/`on_finish`) and a Trainer
    callback (for the step alignment and evaluations). Never raises into the training loop: the
    callback's `_notify` already swallows observer errors, and the Trainer hooks guard themselves."""

    def __init__(self, callback: Any) -> None:
        import trackio

        self.trackio = trackio
        self.cb = callback
        self.logged_steps = 0
        self.alerts = 0
        self._alerted_exit = False

    # --------------------------------------------------------------------------------------------
    def _run(self) -> Any:
        try:
            return self.trackio.context_vars.current_run.get()
        except (AttributeError, LookupError):
            return None

    def _log(self, metrics: dict[str, Any], step: int) -> None:
        run = self._run()
        if run is None:
            return
        clean = {k: float(v) for k, v in metrics.items() if _finite(v)}
        clean["train/global_step"] = step
        run.log(clean, step=step)
        self.logged_steps += 1

    def alert(self, title: str, text: str, level: str, step: int | None) -> None:
        run = self._run()
        if run is None:
            return
        lvl = getattr(self.trackio.AlertLevel, level)
        title, text = redact_text(title), redact_text(text)  # no token in an alert (self_healing.redact)
        if step is not None and "step" in inspect.signature(run.alert).parameters:
            run.alert(title=title, text=text, level=lvl, step=step)
        else:
            self.trackio.alert(title=title, text=text, level=lvl)
        self.alerts += 1

    def _align(self, global_step: int) -> None:
        """Make trackio's next auto-numbered row (the Trainer's) land on `global_step`."""
        run = self._run()
        if run is not None:
            compat.set_trackio_next_step(run, global_step)

    # --------------------------------------------------------------------------------------------
    # SelfHealingCallback observer API
    # --------------------------------------------------------------------------------------------
    def on_step(self, step: int, signals: Any, info: dict[str, Any]) -> None:
        cb = self.cb
        c = cb.recorder.counters
        m: dict[str, Any] = {"healing/recovery_attempts": cb.policy.total_attempts, "healing/nan_count": c["nan_count"],
                             "healing/skipped_steps": c["skipped_steps"], "healing/rollbacks": c["rollbacks"],
                             "healing/lr_scale": cb.policy.lr_scale}
        ratio = getattr(cb.monitor, "last_spike_ratio", None)
        if ratio is not None:
            m["healing/loss_spike_ratio"] = ratio
        wd = getattr(cb, "watchdog", None)
        if wd is not None and step % 10 == 0:  # goodput so far (self_healing.watchdog), every 10th step
            g = wd.watchdog.goodput()
            m["healing/goodput"], m["healing/job_goodput"] = g["launch"]["goodput"], g["job"]["goodput"]
        z = info.get("zclip")
        if cb.zclip is not None:
            m["zclip/total_clips"] = cb.zclip.total_clips
        if z is not None:
            m.update({"zclip/raw_grad_norm": z.raw_norm, "zclip/clipped_grad_norm": z.clipped_norm,
                      "zclip/z_score": z.z_score})
        self._log(m, step)
        if z is not None and z.adaptive:
            self.alert(f"ZClip clipped step {step}",
                        f"gradient norm {z.raw_norm:.4g} is a z={z.z_score:.2f} outlier (threshold "
                        f"{cb.zclip.z_thresh:g}): clipped to {z.clipped_norm:.4g}", "INFO", step)

    def on_event(self, event: dict[str, Any]) -> None:
        actions = list(event.get("actions") or [])
        failure = event.get("failure", "unknown")
        level = "ERROR" if "give_up" in actions else "WARN"
        text = str(event.get("diagnosis", ""))
        if event.get("escalation"):
            text += f" (escalation: {event['escalation']})"
        if actions:
            text += f" -> {', '.join(actions)}"
        title = f"self-healing: {failure} at step {event.get('step')}"
        self.alert(title, text, level, event.get("step"))
        if "give_up" in actions:
            self._alerted_exit = True

    def on_finish(self, postmortem: dict[str, Any]) -> None:
        reason = postmortem.get("exit_reason")
        if reason in ("completed", None) or self._alerted_exit or self._run() is None:
            return
        text = f"run ended: {reason}"
        if postmortem.get("exception_type"):
            text += f" ({postmortem['exception_type']}: {str(postmortem.get('exception_message', ''))[:300]})"
        if postmortem.get("give_up_reason"):
            text += f"; {postmortem['give_up_reason']}"
        self.alert(f"self-healing: run {reason} at step {postmortem.get('last_step')}", text,
                    "WARN" if reason == "interrupted" else "ERROR", postmortem.get("last_step"))
        self._alerted_exit = True

    # --------------------------------------------------------------------------------------------
    # Trainer callback hooks (this object is also added to the Trainer, after TrackioCallback)
    # --------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._alerted_exit = False
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._guarded(self._align, state.global_step)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._guarded(self._align, state.global_step)
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        for m in self.cb.monitors:
            gap = getattr(m, "last_gap", None)
            if gap is not None:
                self._guarded(self._log, {"healing/eval_gap": gap}, state.global_step)
                self._guarded(self._align, state.global_step)
                break
        return control

    def _guarded(self, fn, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - dashboards must never kill a run
            logger.warning("self-healing: trackio logging failed: %s", exc)


def make_tracker(callback: Any, args: Any) -> TrackioTracker | None:
    """The tracker for a trainer's args, or None when it does not report to trackio (or trackio
    cannot be imported: then the plugin simply does not log there)."""
    if not reports_to_trackio(args) or not getattr(callback.config, "trackio_logging", True):
        return None
    try:
        return TrackioTracker(callback)
    except ImportError:
        logger.warning("self-healing: report_to includes trackio but it cannot be imported; not logging there")
        return None


__all__ = ["TrackioTracker", "make_tracker", "reports_to_trackio"]
