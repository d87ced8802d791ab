"""`postmortem.json`: what happened in a run and what was done about it.

Written atomically on every exit (completed, gave_up, exception, interrupted). Its size is bounded
whatever the run's length: events beyond `MAX_EVENTS` are counted, not stored, and each keeps only
a short window of loss/grad-norm history around it.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

from .config import HealingConfig
from .diagnosis import Diagnosis
from .io import atomic_write_json, json_safe

MAX_EVENTS = 500
MAX_CURVE_POINTS = 2000
SCHEMA_VERSION = 1


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class PostmortemRecorder:
    """Collects events during a run; `build()` turns them into the postmortem dict."""

    def __init__(self, config: HealingConfig) -> None:
        self.config = config
        self.started = time.time()
        self.events: list[dict[str, Any]] = []
        self.events_dropped = 0
        self.history: deque[tuple[int, float | None, float | None]] = deque(maxlen=config.history_size)
        self.last_metrics: dict[str, Any] = {}
        self.counters: dict[str, float] = {"nan_count": 0, "skipped_steps": 0, "rollbacks": 0, "lr_reductions": 0,
                                           "steps_lost": 0, "snapshots": 0, "exceptions_healed": 0}
        self.skipped_batches: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self.curve: list[list[Any]] = []
        """[step, loss, grad_norm, lr] over the whole run, decimated to at most MAX_CURVE_POINTS."""
        self._curve_stride = 1

    def observe(self, step: int, loss: float | None, grad_norm: float | None, lr: float | None = None) -> None:
        self.history.append((step, loss, grad_norm))
        if step % self._curve_stride == 0:
            self.curve.append([step, loss, grad_norm, lr])
            if len(self.curve) >= MAX_CURVE_POINTS:  # keep the size bounded for a run of any length
                self._curve_stride *= 2
                self.curve = [pt for pt in self.curve if pt[0] % self._curve_stride == 0]

    def record(self, step: int, diagnosis: Diagnosis, actions: list[str], details: dict[str, Any] | None = None,
               reason: str = "") -> dict[str, Any]:
        event = {
            "step": step,
            "failure": diagnosis.failure.value,
            "diagnosis": diagnosis.summary,
            "actions": actions,
            "evidence": diagnosis.evidence,
            "references": diagnosis.references,
            "time": utc_now_iso(),
        }
        if reason:
            event["escalation"] = reason
        if details:
            event["details"] = details
        event["history"] = [list(h) for h in self.history]
        if len(self.events) < MAX_EVENTS:
            self.events.append(event)
        else:
            self.events_dropped += 1
        return event

    def build(self, exit_reason: str, *, last_step: int, max_steps: int | None = None,
              exception: BaseException | None = None, trainer_class: str | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        pm: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "exit_reason": exit_reason,
            "exception_type": type(exception).__name__ if exception is not None else None,
            "exception_message": str(exception)[:1000] if exception is not None else None,
            "traceback": _tb_summary(exception) if exception is not None else None,
            "last_step": last_step,
            "max_steps": max_steps,
            "timestamp": utc_now_iso(),
            "running_time_seconds": round(time.time() - self.started, 3),
            "trainer_class": trainer_class,
            "final_metrics": dict(self.last_metrics),
            "recovery_actions": list(self.events),
            "recovery_actions_dropped": self.events_dropped,
            "counters": dict(self.counters),
            "skipped_batches": list(self.skipped_batches),
            "curve": {"columns": ["step", "loss", "grad_norm", "lr"], "stride": self._curve_stride,
                      "points": list(self.curve)},
            "config": self.config.to_dict(),
        }
        pm.update(self.extra)
        if extra:
            pm.update(extra)
        return pm

    def write(self, path: str | Path, postmortem: dict[str, Any]) -> None:
        atomic_write_json(path, postmortem)


def _tb_summary(exc: BaseException, limit: int = 8) -> list[str]:
    frames = traceback.extract_tb(exc.__traceback__)[-limit:]
    return [f"{Path(f.filename).name}:{f.lineno} in {f.name}: {f.line or ''}".strip() for f in frames]


def load_postmortem(path: str | Path) -> dict[str, Any]:
    """Read a postmortem (or the one inside an output dir); bad input is a `ValueError` saying why."""
    p = Path(path)
    if p.is_dir():
        p = p / "postmortem.json"
    if not p.is_file():
        raise ValueError(f"no postmortem at {str(p)!r}")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{str(p)!r} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(p)!r} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict) or "exit_reason" not in data:
        raise ValueError(f"{str(p)!r} is not a postmortem (no 'exit_reason' field)")
    return data


def format_postmortem(pm: dict[str, Any]) -> str:
    """A short human summary: first line says how the run ended."""
    pm = json_safe(pm)
    lines = [f"run {pm.get('exit_reason')} at step {pm.get('last_step')}"
             + (f"/{pm['max_steps']}" if pm.get("max_steps") else "")
             + f" after {pm.get('running_time_seconds')} s"]
    if pm.get("exception_type"):
        lines.append(f"  exception: {pm['exception_type']}: {pm.get('exception_message')}")
    acts = pm.get("recovery_actions") or []
    lines.append(f"  recoveries: {len(acts)}" + (f" (+{pm['recovery_actions_dropped']} not stored)"
                                                 if pm.get("recovery_actions_dropped") else ""))
    for ev in acts:
        lines.append(f"  - step {ev.get('step')}: {ev.get('failure')} -> {', '.join(ev.get('actions') or [])}")
        lines.append(f"      {ev.get('diagnosis')}")
        if ev.get("escalation"):
            lines.append(f"      escalation: {ev['escalation']}")
    fm = pm.get("final_metrics") or {}
    if fm:
        keys = [k for k in ("loss", "train_loss", "grad_norm", "learning_rate", "eval_loss") if k in fm]
        lines.append("  final metrics: " + ", ".join(
            f"{k}={fm[k]:.4g}" if isinstance(fm[k], float) else f"{k}={fm[k]}" for k in keys))
    return "\n".join(lines)
