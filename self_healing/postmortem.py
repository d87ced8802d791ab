"""`postmortem.json`: what happened in a run and what was done about it.

Written atomically on every exit (completed, gave_up, exception, interrupted). Its size is bounded
whatever the run's length (about 0.65 MB for a million-step run with thousands of events, tested
under 1 MB with the default `history_size`):

- the whole-run curve `[step, loss, grad_norm, lr]` is decimated to `MAX_CURVE_POINTS`;
- of the events, the first and the most recent `MAX_EVENTS // 2` are stored (so the one that
  ended a run is always there); the ones between are counted, per failure kind in `event_counts`;
- each stored event carries the per-step `[step, loss, grad_norm]` history around it
  (`history_size` steps before, `HISTORY_AFTER` after): whole for the `DETAILED_EVENTS` at each
  end, `SHORT_BEFORE`/`SHORT_AFTER` steps (and no `references`) for the ones between;
- floats in the curve and the histories keep 6 significant digits; arrays of numbers are written
  compactly (see `dumps_postmortem`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import tempfile
import time
import traceback
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from .config import HealingConfig
from .diagnosis import Diagnosis
from .io import atomic_write_text, json_safe
from .redact import redact

MAX_EVENTS = 500
MAX_CURVE_POINTS = 2000
HISTORY_AFTER = 16
DETAILED_EVENTS = 50
SHORT_BEFORE, SHORT_AFTER = 8, 4
SCHEMA_VERSION = 1
_ONE_PER_LINE = {"points", "traceback"}
"""Keys whose list items are written one per line in the file; other arrays of numbers stay on one line."""


def _round(x: Any) -> Any:
    """6 significant digits: plenty for a report, a third of the bytes of a float's repr."""
    if isinstance(x, float) and math.isfinite(x):
        return float(f"{x:.6g}")
    return x


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


logger = logging.getLogger("self_healing")


class PostmortemRecorder:
    """Collects events during a run; `build()` turns them into the postmortem dict."""

    def __init__(self, config: HealingConfig) -> None:
        self.config = config
        self.started = time.time()
        self.written_path: str | None = None
        """Where `write()` last put the postmortem (the fallback in the temp dir if it had to)."""
        self.events: list[dict[str, Any]] = []
        """The first `MAX_EVENTS // 2` events; the most recent ones are in `recent_events`."""
        self.recent_events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS - MAX_EVENTS // 2)
        self.events_dropped = 0
        self.event_counts: dict[str, int] = {}
        self._open: list[list[Any]] = []  # [event, steps of history still to append after it]
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
        if self._open:  # the steps after a recent event: did the run recover?
            for item in self._open:
                item[0]["history"].append([step, _round(loss), _round(grad_norm)])
                item[1] -= 1
            self._open = [item for item in self._open if item[1] > 0]
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
        event = redact(event)  # exception text, evidence, details: no token reaches a log, alert or file
        event["history"] = [[h[0], _round(h[1]), _round(h[2])] for h in self.history]
        self.event_counts[event["failure"]] = self.event_counts.get(event["failure"], 0) + 1
        if len(self.events) < MAX_EVENTS // 2:
            self.events.append(event)
        else:
            if len(self.recent_events) == self.recent_events.maxlen:
                self.events_dropped += 1
            self.recent_events.append(event)
        if HISTORY_AFTER > 0:
            self._open.append([event, HISTORY_AFTER])
        return event

    def stored_events(self) -> list[dict[str, Any]]:
        """The events as written: the detailed ones at both ends keep their whole history window,
        the ones between a short one."""
        events = self.events + list(self.recent_events)
        out = []
        for i, ev in enumerate(events):
            if DETAILED_EVENTS <= i < len(events) - DETAILED_EVENTS:
                s = ev["step"]
                ev = {k: v for k, v in ev.items() if k != "references"}  # the detailed ones carry them
                ev["history"] = [h for h in ev.get("history", []) if s - SHORT_BEFORE < h[0] <= s + SHORT_AFTER]
            out.append(ev)
        return out

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
            "recovery_actions": self.stored_events(),
            "recovery_actions_dropped": self.events_dropped,
            "event_counts": dict(self.event_counts),
            "counters": dict(self.counters),
            "skipped_batches": list(self.skipped_batches),
            "curve": {"columns": ["step", "loss", "grad_norm", "lr"], "stride": self._curve_stride,
                      "points": [[pt[0], *(_round(v) for v in pt[1:])] for pt in self.curve]},
            "config": self.config.to_dict(),
        }
        pm.update(self.extra)
        if extra:
            pm.update(extra)
        return redact(pm)

    def write(self, path: str | Path, postmortem: dict[str, Any]) -> str | None:
        """Write the postmortem atomically to `path`; the path written, or None.

        Never raises for a disk that refuses it (an `output_dir` that became unwritable, a full
        disk): the run is over, its `TrainOutput` and exit are the caller's and must not be lost to
        its report. It is written instead to the system temp directory, and logged as an error
        that names both paths and the reason."""
        text = dumps_postmortem(redact(postmortem))
        try:
            atomic_write_text(path, text)
            self.written_path = str(path)
            return self.written_path
        except OSError as e:
            first = e
        fallback = Path(tempfile.gettempdir()) / (f"self-healing-postmortem-{time.strftime('%Y%m%d-%H%M%S')}-"
                                                  f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json")  # two runs, one second: two files
        try:
            atomic_write_text(fallback, text)
        except OSError as e:
            logger.error("self-healing: the postmortem could not be written to %s (%s: %s), nor to %s (%s: %s); "
                         "its summary is in this log and in the returned postmortem only", path,
                         type(first).__name__, first, fallback, type(e).__name__, e)
            self.written_path = None
            return None
        logger.error("self-healing: the postmortem could not be written to %s (%s: %s); written to %s instead",
                     path, type(first).__name__, first, fallback)
        self.written_path = str(fallback)
        return self.written_path


def dumps_postmortem(pm: dict[str, Any]) -> str:
    """Standard JSON (NaN/Inf as strings), indented, with arrays of numbers kept compact."""
    return _encode(json_safe(pm), 0, "") + "\n"


def _is_leaf_list(v: Any) -> bool:
    return isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v)


def _encode(o: Any, level: int, key: str) -> str:
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(o, dict):
        if not o:
            return "{}"
        items = [f"{inner}{_leaf(k)}: {_encode(v, level + 1, k)}" for k, v in o.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(o, list):
        if not o:
            return "[]"
        if key not in _ONE_PER_LINE and all(_is_leaf_list(x) or not isinstance(x, (dict, list)) for x in o):
            return _leaf(o)
        items = [inner + (_leaf(x) if _is_leaf_list(x) else _encode(x, level + 1, "")) for x in o]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return _leaf(o)


def _leaf(o: Any) -> str:
    return json.dumps(o, allow_nan=False, ensure_ascii=False)


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
    size = p.stat().st_size
    if size > MAX_POSTMORTEM_BYTES:
        raise ValueError(f"{str(p)!r} is {size} bytes: not a postmortem (they stay under 1 MB)")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{str(p)!r} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(p)!r} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting deeper than Python recurses
        raise ValueError(f"{str(p)!r} is not a usable JSON document ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(data, dict) or "exit_reason" not in data:
        raise ValueError(f"{str(p)!r} is not a postmortem (no 'exit_reason' field)")
    problem = postmortem_problem(data)
    if problem:
        raise ValueError(f"{str(p)!r} is not a valid postmortem: {problem}")
    return data


MAX_POSTMORTEM_BYTES = 64 << 20


def _opt(check):
    return lambda v: v is None or check(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_int_(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or v in ("nan", "inf", "-inf")


def _list_of(check):
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _is_row(v: Any) -> bool:
    return isinstance(v, list) and len(v) >= 1 and _is_int_(v[0])


_PM_FIELDS: dict[str, tuple[Any, str]] = {
    "exit_reason": (_is_str, "a string"),
    "exception_type": (_opt(_is_str), "a string or null"),
    "exception_message": (_opt(_is_str), "a string or null"),
    "traceback": (_opt(_list_of(_is_str)), "a list of strings or null"),
    "last_step": (_opt(_is_int_), "an integer or null"),
    "max_steps": (_opt(_is_int_), "an integer or null"),
    "timestamp": (_opt(_is_str), "a string or null"),
    "running_time_seconds": (_opt(_is_num), "a number or null"),
    "trainer_class": (_opt(_is_str), "a string or null"),
    "final_metrics": (_opt(lambda v: isinstance(v, dict)), "an object or null"),
    "recovery_actions": (_opt(lambda v: isinstance(v, list)), "a list of events or null"),
    "recovery_actions_dropped": (_opt(_is_int_), "an integer or null"),
    "event_counts": (_opt(lambda v: isinstance(v, dict) and all(_is_int_(x) for x in v.values())),
                     "an object of integer counts or null"),
    "counters": (_opt(lambda v: isinstance(v, dict)), "an object or null"),
    "skipped_batches": (_opt(lambda v: isinstance(v, list)), "a list or null"),
    "curve": (_opt(lambda v: isinstance(v, dict)), "an object or null"),
    "config": (_opt(lambda v: isinstance(v, dict)), "an object or null"),
    "lr_scale": (_opt(_is_num), "a number or null"),
    "give_up_reason": (_opt(_is_str), "a string or null"),
    "diagnosis": (_opt(lambda v: isinstance(v, dict)), "an object or null"),
    "hang": (_opt(lambda v: isinstance(v, dict)), "an object or null"),
    "goodput": (_opt(lambda v: isinstance(v, dict)), "an object or null"),
    "stragglers": (_opt(lambda v: isinstance(v, list)), "a list or null"),
    "hang_warnings": (_opt(lambda v: isinstance(v, list)), "a list or null"),
}
_EVENT_FIELDS: dict[str, tuple[Any, str]] = {
    "step": (_opt(_is_int_), "an integer or null"),
    "failure": (_opt(_is_str), "a string or null"),
    "diagnosis": (_opt(_is_str), "a string or null"),
    "escalation": (_opt(_is_str), "a string or null"),
    "actions": (_opt(_list_of(_is_str)), "a list of strings or null"),
    "evidence": (_opt(lambda v: isinstance(v, dict)), "an object or null"),
    "details": (_opt(lambda v: isinstance(v, dict)), "an object or null"),
    "history": (_opt(_list_of(_is_row)), "a list of [step, loss, grad_norm] rows or null"),
}


def event_problem(ev: Any, where: str = "event") -> str | None:
    """What is wrong with one recovery event, naming the field; None when it can be reported."""
    if not isinstance(ev, dict):
        return f"field {where!r} must be an object, got {type(ev).__name__}"
    for name, (check, expected) in _EVENT_FIELDS.items():
        if name in ev and not check(ev[name]):
            return f"field '{where}.{name}' must be {expected}, got {type(ev[name]).__name__}"
    return None


def postmortem_problem(pm: dict[str, Any]) -> str | None:
    """What is wrong with a would-be postmortem, naming the field; None when it can be reported."""
    for name, (check, expected) in _PM_FIELDS.items():
        if name in pm and not check(pm[name]):
            return f"field {name!r} must be {expected}, got {type(pm[name]).__name__}"
    for i, ev in enumerate(pm.get("recovery_actions") or []):
        problem = event_problem(ev, f"recovery_actions[{i}]")
        if problem:
            return problem
    curve = pm.get("curve") or {}
    if "points" in curve and not _opt(_list_of(_is_row))(curve["points"]):
        return "field 'curve.points' must be a list of [step, loss, grad_norm, lr] rows"
    return None


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _curve_points(pm: dict[str, Any]) -> list[list[Any]]:
    curve = pm.get("curve") or {}
    return [pt for pt in curve.get("points") or [] if isinstance(pt, list) and len(pt) >= 2]


def headline(pm: dict[str, Any]) -> str:
    """One line: how the run ended, where, and why."""
    pm = json_safe(pm)
    reason = str(pm.get("exit_reason"))
    where = f"at step {pm.get('last_step')}" + (f"/{pm['max_steps']}" if pm.get("max_steps") else "")
    t = pm.get("running_time_seconds")
    took = f" after {_duration(t)}" if isinstance(t, (int, float)) else ""
    acts = pm.get("recovery_actions") or []
    n = sum((pm.get("event_counts") or {}).values()) or len(acts)
    if reason == "completed":
        why = (f"{n} failure{'s' if n != 1 else ''} healed" + (f" ({_kinds(pm)})" if n else "")) if n else \
            "nothing to heal"
        return f"COMPLETED {where}{took}: {why}"
    if reason == "hung" and isinstance(pm.get("hang"), dict):
        h = pm["hang"]  # the step that never finished, not the last one that did
        if _is_int_(h.get("step")):
            where = f"at step {h['step']}" + (f"/{pm['max_steps']}" if pm.get("max_steps") else "")
        waited, bound = h.get("seconds_waited"), h.get("bound_seconds")
        how = f" for {_num(waited)}s (bound {_num(bound)}s)" if _is_num(waited) and _is_num(bound) else ""
        return f"HUNG {where}{took}: {str(h.get('phase'))[:100]} made no progress{how}"
    if reason == "gave_up":
        why = pm.get("give_up_reason") or next((a.get("escalation") or a.get("diagnosis") for a in reversed(acts)
                                               if "give_up" in (a.get("actions") or [])), "reason not recorded")
        return f"GAVE UP {where}{took}: {why}"
    if pm.get("exception_type"):
        msg = str(pm.get("exception_message") or "").strip().splitlines()
        return f"{reason.upper()} {where}{took}: {pm['exception_type']}" + (f": {msg[0][:200]}" if msg else "")
    return f"{reason.upper()} {where}{took}"


_GOODPUT_LABELS = {"productive": "productive", "lost": "lost steps", "recovery": "recovery",
                   "checkpointing": "checkpointing", "evaluation": "evaluation", "startup": "startup",
                   "data_and_logging": "data/logging", "finishing": "finishing", "hung": "hung",
                   "preemption": "preemption", "between_launches": "between launches", "unaccounted": "unaccounted"}


def goodput_lines(pm: dict[str, Any]) -> list[str]:
    """`goodput: 91.2% of 14.3 min (lost steps 0.4 min, checkpointing 0.6 min, ...)`, for this
    launch and, after relaunches, for the job: productive step time over wall time, the badput
    largest first."""
    def real(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    g = pm.get("goodput")
    if not isinstance(g, dict):
        return []
    out = []
    for key, label in (("launch", "goodput"), ("job", "job goodput")):
        part = g.get(key)
        if not isinstance(part, dict) or not real(part.get("wall_seconds")) or not isinstance(part.get("seconds"), dict):
            continue
        launches = part.get("launches")
        if key == "job" and not (_is_int_(launches) and launches > 1):
            continue
        wall = float(part["wall_seconds"])
        ratio = part.get("goodput")
        bad = sorted(((str(k), float(v)) for k, v in part["seconds"].items() if k != "productive" and real(v) and v > 0),
                     key=lambda kv: -kv[1])
        head = f"  {label}: " + (f"{100 * ratio:.1f}%" if real(ratio) else "n/a") + f" of {_duration(wall)}"
        if key == "job":
            head += f" over {part.get('launches')} launches"
        if bad:
            head += " (" + ", ".join(f"{_GOODPUT_LABELS.get(k, k)} {_duration(float(v))}" for k, v in bad[:5]) + ")"
        out.append(head)
    return out


def _n(count: Any, noun: str) -> str:
    return f"{_num(count)} {noun}" + ("" if count == 1 else "s")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _kinds(pm: dict[str, Any]) -> str:
    counts = pm.get("event_counts") or {}
    if not counts:
        for a in pm.get("recovery_actions") or []:
            counts[a.get("failure")] = counts.get(a.get("failure"), 0) + 1
    return ", ".join(f"{k} x{v}" if v > 1 else str(k) for k, v in counts.items())


def _around(group: list[dict[str, Any]], before: int = 3, after: int = 3) -> str:
    """The loss a few steps either side of an incident (its steps bracketed), e.g.
    `22:1.93 23:1.91 [25:nan] 26:1.89`."""
    first, last = group[0].get("step"), group[-1].get("step")
    if not isinstance(first, int) or not isinstance(last, int):
        return ""
    seen: dict[int, Any] = {}
    for ev in group:
        for h in ev.get("history") or []:
            if isinstance(h, list) and len(h) >= 2 and isinstance(h[0], int):
                seen[h[0]] = h
    hist = [seen[k] for k in sorted(seen)]
    pre = [h for h in hist if h[0] < first][-before:]
    at = [h for h in hist if first <= h[0] <= last]
    post = [h for h in hist if h[0] > last][:after]
    parts = [f"{h[0]}:{_num(h[1])}" for h in pre] + [f"[{h[0]}:{_num(h[1])}]" for h in at] + \
        [f"{h[0]}:{_num(h[1])}" for h in post]
    return " ".join(parts)


def group_events(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Runs of events on consecutive steps with the same failure and actions (a NaN streak that was
    skipped step after step) grouped, so a report reads as incidents, not as one line per step.
    A rollback or a give-up is always an incident of its own."""
    groups: list[list[dict[str, Any]]] = []
    for ev in events:
        last = groups[-1][-1] if groups else None
        if (last is not None and isinstance(ev.get("step"), int) and isinstance(last.get("step"), int)
                and ev["step"] == last["step"] + 1 and ev.get("failure") == last.get("failure")
                and ev.get("actions") == last.get("actions") and ev.get("escalation") == last.get("escalation")
                and not {"rollback", "give_up"} & set(ev.get("actions") or [])):
            groups[-1].append(ev)
        else:
            groups.append([ev])
    return groups


def _detail(k: str, v: Any) -> str:
    if isinstance(v, dict) and "lr_before" in v and "lr_after" in v:
        before, after = (x[0] if isinstance(x, list) and x else x for x in (v["lr_before"], v["lr_after"]))
        return f"LR {_num(before)} -> {_num(after)}"
    if isinstance(v, dict):
        return f"{k}(" + ", ".join(f"{k2}={_num(v2)}" for k2, v2 in v.items()) + ")"
    return f"{k}={_num(v)}"


def format_postmortem(pm: dict[str, Any], max_events: int = 20) -> str:
    """A short human summary. The first line says how the run ended and why; then the run's
    numbers, and each recovery: step, failure, diagnosis, actions, evidence, the loss around it.
    With more than `max_events` recoveries, the first and last `max_events // 2` are listed."""
    pm = json_safe(pm)
    lines = [headline(pm)]
    lines += goodput_lines(pm)
    c = pm.get("counters") or {}
    facts = [f"trainer {pm['trainer_class']}" if pm.get("trainer_class") else "",
             f"ended {pm['timestamp']}" if pm.get("timestamp") else ""]
    if any(facts):
        lines.append("  run: " + ", ".join(f for f in facts if f))
    if c:
        parts = [_n(c.get("skipped_steps", 0), "step") + " skipped", _n(c.get("rollbacks", 0), "rollback")
                 + (f" ({_n(c.get('steps_lost', 0), 'step')} lost)" if c.get("rollbacks") else ""),
                 _n(c.get("lr_reductions", 0), "LR cut")]
        if pm.get("lr_scale") not in (None, 1, 1.0):
            parts.append(f"LR now x{_num(pm['lr_scale'])} of the original")
        for k in ("exceptions_healed", "batch_reductions", "skipped_batches"):
            if isinstance(c.get(k), (int, float)) and c.get(k):
                parts.append(f"{k.replace('_', ' ')} {c[k]}")
        lines.append("  healing: " + ", ".join(parts))
    pts = [pt for pt in _curve_points(pm) if isinstance(pt[1], (int, float))]
    if pts:
        lines.append(f"  loss: {_num(pts[0][1])} at step {pts[0][0]} -> {_num(pts[-1][1])} at step {pts[-1][0]}"
                     f" (lowest {_num(min(p[1] for p in pts))})")
    fm = pm.get("final_metrics") or {}
    keys = [k for k in ("loss", "train_loss", "eval_loss", "grad_norm", "learning_rate", "reward") if k in fm]
    if keys:
        lines.append("  final metrics: " + ", ".join(f"{k}={_num(fm[k])}" for k in keys))
    if pm.get("exception_type"):
        lines.append(f"  exception: {pm['exception_type']}: {pm.get('exception_message')}")
        diag = pm.get("diagnosis") if isinstance(pm.get("diagnosis"), dict) else {}
        if diag.get("summary"):
            lines.append(f"    diagnosis: {diag['summary']}")
        for fr in (pm.get("traceback") or [])[-3:]:
            lines.append(f"    at {fr}")
    hang = pm.get("hang") if isinstance(pm.get("hang"), dict) else None
    if hang:
        lines.append(f"  hang: {hang.get('summary') or hang.get('phase')}")
        if hang.get("dump"):
            lines.append(f"    every thread's stack: {hang['dump']}")
        stack = hang.get("stack") if isinstance(hang.get("stack"), list) else []
        frames = [str(f).strip().splitlines()[0] for f in stack if str(f).strip()]
        for fr in frames[-2:]:
            lines.append(f"    at {fr}")
    for s in (pm.get("stragglers") or [])[:3] if isinstance(pm.get("stragglers"), list) else []:
        if isinstance(s, dict):
            lines.append(f"  straggler: rank {s.get('rank')}" + (f" on {s['host']}" if s.get("host") else "")
                         + f", {_num(s.get('slower_by'))}x the others' own step time from step {s.get('step')}")
    acts = pm.get("recovery_actions") or []
    dropped = pm.get("recovery_actions_dropped") or 0
    restored = next((a["details"]["restored_step"] for a in reversed(acts)
                     if isinstance(a.get("details"), dict) and "restored_step" in a["details"]), None)
    if restored is not None:
        lines.append(f"  weights: the last verified snapshot (step {restored}) was loaded back before stopping")
    if acts:
        groups = group_events(acts)
        lines.append(f"  recoveries: {_n(len(acts) + dropped, 'event')}" + (f" ({dropped} not stored)" if dropped else "")
                     + (f" in {len(groups)} incidents" if len(groups) != len(acts) else "") + ":")
        half = max_events // 2
        shown = groups if len(groups) <= max_events else groups[:half] + [None] + groups[len(groups) - half:]
        for g in shown:
            if g is None:
                lines.append(f"  ... {len(groups) - 2 * half} more in the postmortem (report --all lists them) ...")
                continue
            ev = g[0]
            where = f"step {ev.get('step')}" if len(g) == 1 else f"steps {ev.get('step')}-{g[-1].get('step')}"
            lines.append(f"  - {where}: {ev.get('failure')} -> {', '.join(ev.get('actions') or [])}"
                         + (f" (each of {len(g)} steps)" if len(g) > 1 else ""))
            lines.append(f"      why: {ev.get('diagnosis')}")
            ev_ = ev.get("evidence") or {}
            if ev_:
                lines.append("      evidence: " + ", ".join(_detail(k, v) for k, v in ev_.items()))
            if ev.get("escalation"):
                lines.append(f"      escalation: {ev['escalation']}")
            if ev.get("details"):
                lines.append("      done: " + ", ".join(_detail(k, v) for k, v in ev["details"].items()))
            around = _around(g)
            if around:
                lines.append(f"      loss around it: {around}")
    return "\n".join(lines)
