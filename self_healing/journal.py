"""Crash journal: `output_dir/healing-journal.jsonl`, so that a run killed without warning still
leaves its story.

SIGKILL, the kernel OOM killer, a segfault or a power cut give the process no chance to write
`postmortem.json`. The journal is written as the run goes instead, one JSON object per line:

- `open` (the run: id, pid, host, trainer, max_steps, the redacted HealingConfig), written with the
  file, atomically;
- `progress` after every optimizer step (step, loss, grad norm, LR): a 64-byte binary record
  `pwrite()`-n into its slot of the step ring beside the journal (`healing-journal.steps`, the
  last 64 steps, see `step_ring`), **not** fsynced. The page cache belongs to the kernel, so it
  survives the process being killed (only a power cut can lose the last few steps). Where the
  ring cannot be created, the record is a line here instead (one `write()`, no fsync);
- `metrics` at each Trainer log (not fsynced);
- decisions, **flushed and fsynced** as they happen: `event` (a detection and what was done:
  skip, rollback, LR/batch change, give up...), `checkpoint` (the Trainer saved one), `resume`
  (training re-entered after a healed exception); `snapshot` (a rollback target taken) is written
  at once but fsynced only when spilled to disk: an in-memory one is lost in a power cut anyway;
- `close` (exit reason, last step), fsynced, when the run ends in any way the process sees.

A journal without `close` means the process died. The next `SelfHealingTrainer.train()` in the same
`output_dir` (or the next `on_train_begin` of a bare callback) notices, writes the dead run's
postmortem from the journal (`exit_reason: "killed"`, last step, last metrics, decisions so far),
says so, closes the old journal and auto-resumes from the newest verified checkpoint.

Bounded: when the file passes `CrashJournal.max_bytes` (1 MiB) it is compacted, atomically (temp
file, fsync, rename): the header, a summary record (counts of everything dropped, counters, last
metrics), the first 50 and the last 150 decisions, the last 16 snapshot/checkpoint marks and the
last 64 progress records (when they are lines here). The in-memory state is bounded the same way.
A new run moves the previous run's journal and ring to `healing-journal.prev.jsonl` / `.prev.steps`
(one generation kept).

The reader skips a torn last line (a kill in the middle of a `write()`), undecodable lines and
lines over 64 KiB, so a damaged journal still yields what it can.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from .io import atomic_write_bytes, json_safe, remove_stale_temps
from .redact import redact, redact_trackio_run_config, register_secrets_of, scrub_training_args
from .step_ring import StepRing, read_ring, ring_path

logger = logging.getLogger("self_healing")

JOURNAL_NAME = "healing-journal.jsonl"
PREVIOUS_NAME = "healing-journal.prev.jsonl"
FORMAT_VERSION = 1
MAX_LINE_BYTES = 64 * 1024
"""The reader ignores longer lines; the writer never writes one (events are trimmed)."""
_MAX_TEXT = 1000
_MAX_EVENT_BYTES = 4096


def journal_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / JOURNAL_NAME


def _num(x: Any) -> tuple[str, Any]:
    """x for the progress fast path: (its JSON text, the value a reader gets back) -- a number,
    null, or the strings "nan"/"inf"/"-inf" (JSON has no NaN)."""
    if x is None:
        return "null", None
    if type(x) is float:  # the common case first
        f = x
    elif isinstance(x, bool):
        return ("true" if x else "false"), x
    elif isinstance(x, int):
        return str(x), x
    else:
        try:
            f = float(x)
        except (TypeError, ValueError, OverflowError):
            return "null", None
    if f - f == 0.0:  # finite
        return repr(f), f
    v = "nan" if f != f else ("inf" if f > 0 else "-inf")
    return f'"{v}"', v


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _line(rec: dict[str, Any]) -> bytes:
    return (json.dumps(json_safe(rec), allow_nan=False, ensure_ascii=False, separators=(",", ":")) + "\n").encode(
        "utf-8", "replace")


def _short(v: Any) -> Any:
    """Long strings cut to `_MAX_TEXT` characters, recursively."""
    if isinstance(v, str):
        return v if len(v) <= _MAX_TEXT else v[:_MAX_TEXT] + "...[truncated]"
    if isinstance(v, dict):
        return {str(k): _short(x) for k, x in list(v.items())[:64]}
    if isinstance(v, (list, tuple)):
        return [_short(x) for x in list(v)[:64]]
    return v


def _bounded(rec: dict[str, Any], limit: int = 2 * _MAX_EVENT_BYTES) -> dict[str, Any]:
    """A record whose line stays under `limit` bytes (the reader skips lines over MAX_LINE_BYTES):
    long strings cut, then whatever field is still too big replaced by its truncated text."""
    if len(_line(rec)) <= limit:
        return rec
    rec = _short(rec)
    for k, v in sorted(rec.items(), key=lambda kv: -len(_line({"v": kv[1]}))):
        if len(_line(rec)) <= limit:
            break
        if k not in ("kind", "time", "step"):
            rec[k] = str(v)[:200] + "...[truncated]"
    return rec


def trim_event(event: dict[str, Any]) -> dict[str, Any]:
    """The parts of a recorder event worth a journal line: no per-step history, no references,
    long text cut, and at most `_MAX_EVENT_BYTES` of JSON."""
    ev = {k: v for k, v in event.items() if k not in ("history", "references")}
    ev = _short(json_safe(ev))
    if len(_line(ev)) > _MAX_EVENT_BYTES:
        for k in ("evidence", "details"):
            if k in ev:
                ev[k] = str(ev[k])[:500] + "...[truncated]"
        if len(_line(ev)) > _MAX_EVENT_BYTES:
            ev = {k: ev.get(k) for k in ("step", "failure", "actions", "time")}
            ev["diagnosis"] = "[event too large for the journal; see postmortem.json]"
    return ev


class JournalState:
    """What a journal says, kept bounded: fed one record at a time by the writer (as it writes)
    and by the reader (as it reads), so both hold the same thing."""

    keep_first_events = 50
    keep_last_events = 150
    keep_progress = 64
    keep_marks = 16
    max_metrics = 256

    def __init__(self) -> None:
        self.header: dict[str, Any] | None = None
        self.events_first: list[dict[str, Any]] = []
        self.events_last: deque[dict[str, Any]] = deque(maxlen=self.keep_last_events)
        self.events_dropped = 0
        self.event_counts: dict[str, int] = {}
        self.counters: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.progress: deque[dict[str, Any]] = deque(maxlen=self.keep_progress)
        self.marks: deque[dict[str, Any]] = deque(maxlen=self.keep_marks)
        self.last_step: int | None = None
        self.last_time: float | None = None
        self.closed: dict[str, Any] | None = None
        self.compactions = 0
        self.records = 0
        self.bad_lines = 0
        self.ring_records = 0
        """The last this many of `progress` came from the step ring: a compaction leaves them there."""

    # ------------------------------------------------------------------------------------------
    def apply(self, rec: dict[str, Any]) -> None:
        kind = rec.get("kind")
        if kind == "open":
            self.__init__()
            self.header = rec
            self.last_step = _int(rec.get("start_step"))
        elif self.header is None:
            return  # nothing before a header means anything
        elif kind == "progress":
            step = _int(rec.get("step"))
            if step is not None:
                self.last_step = step
                self.progress.append(rec)
        elif kind == "metrics":
            m = rec.get("metrics")
            if isinstance(m, dict):
                for k, v in m.items():
                    if k in self.metrics or len(self.metrics) < self.max_metrics:
                        self.metrics[str(k)] = v
        elif kind == "event":
            ev = rec.get("event")
            if isinstance(ev, dict):
                self._add_event(ev, count=not rec.get("kept"))
            if isinstance(rec.get("counters"), dict):
                self.counters = rec["counters"]
        elif kind in ("snapshot", "checkpoint", "resume"):
            self.marks.append(rec)
        elif kind == "compacted":
            self.events_dropped = _int(rec.get("events_dropped")) or 0
            if isinstance(rec.get("event_counts"), dict):
                self.event_counts = {str(k): v for k, v in rec["event_counts"].items() if _int(v) is not None}
            if isinstance(rec.get("counters"), dict):
                self.counters = rec["counters"]
            if isinstance(rec.get("metrics"), dict):
                self.metrics = dict(list(rec["metrics"].items())[: self.max_metrics])
            if _int(rec.get("last_step")) is not None:
                self.last_step = rec["last_step"]
            self.compactions = _int(rec.get("compactions")) or 0
        elif kind == "close":
            self.closed = rec
        t = rec.get("time")
        if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t):
            self.last_time = float(t)
        self.records += 1

    def add_steps(self, records: list[dict[str, Any]]) -> None:
        """Progress records read from the step ring (`step_ring`), oldest first: the latest steps,
        newer than any progress line of the file (the ring took them over), as old as its time says."""
        self.ring_records += len(records)
        for rec in records:
            self.progress.append(rec)
            self.last_step = rec["step"]
            t = rec.get("time")
            if isinstance(t, float) and (self.last_time is None or t > self.last_time):
                self.last_time = t
            self.records += 1

    def _add_event(self, ev: dict[str, Any], count: bool) -> None:
        if count:
            f = str(ev.get("failure"))
            self.event_counts[f] = self.event_counts.get(f, 0) + 1
        if len(self.events_first) < self.keep_first_events:
            self.events_first.append(ev)
            return
        if len(self.events_last) == self.events_last.maxlen:
            self.events_dropped += 1
        self.events_last.append(ev)

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.events_first + list(self.events_last)

    def compact_records(self, max_events: int | None = None) -> list[dict[str, Any]]:
        """The records of a compacted journal that reads back to this same state."""
        assert self.header is not None
        events = self.events
        dropped = self.events_dropped
        if max_events is not None and len(events) > max_events:  # drop from the middle, keep both ends
            keep_first = min(len(self.events_first), max(1, max_events // 3))
            kept = events[:keep_first] + events[len(events) - (max_events - keep_first):]
            dropped += len(events) - len(kept)
            events = kept
        out = [self.header, {"kind": "compacted", "time": time.time(), "events_dropped": dropped,
                             "event_counts": self.event_counts, "counters": self.counters,
                             "metrics": self.metrics, "last_step": self.last_step,
                             "compactions": self.compactions + 1}]
        out += [{"kind": "event", "kept": True, "event": ev} for ev in events]
        lines = list(self.progress)
        out += list(self.marks) + lines[:max(len(lines) - self.ring_records, 0)]
        if self.closed is not None:
            out.append(self.closed)
        return out


class CrashJournal:
    """The writer. `start()` begins a run's journal; `progress()`/`metrics()` append without
    fsync; `decision()` and `close()` append and fsync. Every method is safe to call when the
    journal is not open (it then does nothing)."""

    max_bytes = 1 << 20
    """Compact when the file would grow past this (the compacted file is at most half of it)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.state = JournalState()
        self._fd: int | None = None
        self._size = 0
        self._ring: StepRing | None = None
        self.run_id: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        """A copy (a deep-copied callback list) is closed: the files belong to this object, and a
        second writer of them would interleave its steps with this one's."""
        return {**self.__dict__, "_ring": None, "_fd": None}

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def start(self, header: dict[str, Any]) -> str:
        """Begin a new run's journal (the previous file, if any, becomes `healing-journal.prev.jsonl`)."""
        self.close_fd()
        self.run_id = uuid.uuid4().hex
        rec = {"kind": "open", "version": FORMAT_VERSION, "run_id": self.run_id, "time": time.time(),
               "pid": os.getpid(), "host": socket.gethostname(), "started": _iso(time.time())}
        rec.update(redact(json_safe(header)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path)
        remove_stale_temps(ring_path(self.path))
        if self.path.exists():
            self._keep_previous()
        self.state = JournalState()
        self.state.apply(rec)
        data = _line(rec)
        atomic_write_bytes(self.path, data)
        self._open_fd()
        self._size = len(data)
        try:
            self._ring = StepRing(ring_path(self.path), self.run_id)
        except (OSError, ValueError) as exc:  # no ring file here: a JSON line per step instead
            logger.debug("self-healing: no step ring (%s: %s); progress goes into the journal", type(exc).__name__, exc)
            self._ring = None
        return self.run_id

    def _keep_previous(self) -> None:
        """The current file becomes `healing-journal.prev.jsonl` while staying in place until the
        new journal replaces it: a kill at any point leaves a journal at `path` (old or new)."""
        prev = self.path.with_name(PREVIOUS_NAME)
        tmp = self.path.with_name(f".{PREVIOUS_NAME}.{os.getpid()}.link")
        try:
            for stale in self.path.parent.glob(f".{PREVIOUS_NAME}.*.link"):  # left by a kill right here
                stale.unlink(missing_ok=True)
            os.link(self.path, tmp)  # a second name for the same file, then renamed over the old prev
            os.replace(tmp, prev)
        except OSError:  # no hard links here: a plain rename (a kill right after it leaves no journal)
            os.replace(self.path, prev)
        try:  # its steps go with it (a ring is read only beside the journal of its run id)
            os.replace(ring_path(self.path), ring_path(prev))
        except OSError:  # none, or something odd in its place: the steps are optional, the journal is not
            pass

    def _open_fd(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides

    def close_fd(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._close_file()

    def _close_file(self) -> None:
        """The journal file's descriptor only (the step ring stays)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    # --- records ---------------------------------------------------------------------------------
    def progress(self, step: int, loss: Any = None, grad_norm: Any = None, lr: Any = None,
                 skipped: bool = False) -> None:
        """One optimizer step done: one binary record `pwrite()`-n into the step ring; where no ring
        could be created, one formatted line and one `write()`. Never fsynced."""
        if self._ring is not None:
            self._ring.add(step, time.time(), loss, grad_norm, lr, skipped)
            return
        if self._fd is None:
            return
        t = round(time.time(), 3)
        step = int(step)
        if type(loss) is float and type(grad_norm) is float and type(lr) is float \
                and loss - loss == 0.0 and grad_norm - grad_norm == 0.0 and lr - lr == 0.0:  # all finite: the usual step
            (lt, lv), (gt, gv), (rt, rv) = (repr(loss), loss), (repr(grad_norm), grad_norm), (repr(lr), lr)
        else:
            (lt, lv), (gt, gv), (rt, rv) = _num(loss), _num(grad_norm), _num(lr)
        line = f'{{"kind":"progress","step":{step},"time":{t!r},"loss":{lt},"grad_norm":{gt},"lr":{rt}'
        rec = {"kind": "progress", "step": step, "time": t, "loss": lv, "grad_norm": gv, "lr": rv}
        if skipped:
            line += ',"skipped":true'
            rec["skipped"] = True
        line += "}\n"
        st = self.state  # JournalState.apply(rec), inlined: this runs every step
        st.last_step, st.last_time = step, t
        st.progress.append(rec)
        st.records += 1
        self._write(line.encode(), sync=False)

    def metrics(self, step: int, metrics: dict[str, Any]) -> None:
        if self._fd is None:
            return
        scalars = {str(k): v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        rec = {"kind": "metrics", "step": int(step), "time": time.time(), "metrics": _short(redact(json_safe(scalars)))}
        self.state.apply(rec)
        self._write(_line(rec), sync=False)

    def decision(self, kind: str, *, sync: bool = True, **fields: Any) -> None:
        """A decision (`event`, `snapshot`, `checkpoint`, `resume`): written now, and fsynced unless
        `sync=False` (a mark whose subject would not survive a power cut either)."""
        if self._fd is None:
            return
        rec = _bounded(redact(json_safe({"kind": kind, "time": time.time(), **fields})))
        self.state.apply(rec)
        self._write(_line(rec), sync=sync)

    def close(self, exit_reason: str, last_step: int | None = None, **fields: Any) -> None:
        if self._fd is None:
            return
        rec = redact(json_safe({"kind": "close", "time": time.time(), "exit_reason": exit_reason,
                                "last_step": last_step, **fields}))
        self.state.apply(rec)
        try:
            self._write(_line(rec), sync=True)
        finally:
            self.close_fd()

    # --- size ------------------------------------------------------------------------------------
    def _write(self, data: bytes, sync: bool) -> None:
        if self._size + len(data) > self.max_bytes:
            self.compact()  # the state already holds this record: the compacted file has it
            return
        os.write(self._fd, data)
        self._size += len(data)
        if sync:
            os.fsync(self._fd)

    def compact(self) -> None:
        """Rewrite the journal as its bounded summary, atomically: a kill at any point leaves the
        old file or the new one. (The step ring keeps the latest steps: it needs no compaction.)"""
        last = self._ring.last_step() if self._ring is not None else None
        if last is not None:
            self.state.last_step = last
        records = self.state.compact_records()
        data = b"".join(_line(r) for r in records)
        n_events = len(self.state.events)
        while len(data) > self.max_bytes // 2 and n_events > 2:  # huge events: keep fewer
            n_events //= 2
            data = b"".join(_line(r) for r in self.state.compact_records(max_events=n_events))
        atomic_write_bytes(self.path, data)
        self._close_file()  # the descriptor of the file replaced
        self._open_fd()
        self._size = len(data)
        fresh = JournalState()  # the state is now exactly what the compacted file reads back as
        for line in data.splitlines():
            fresh.apply(json.loads(line))
        self.state = fresh


def _iso(t: float) -> str | None:
    import datetime as _dt

    try:
        return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):  # a damaged journal's time
        return None


# ------------------------------------------------------------------------------------------------
# reading, and the postmortem of a run that died
# ------------------------------------------------------------------------------------------------
def read_journal(path: str | os.PathLike) -> JournalState | None:
    """The state a journal file describes, or None when there is no file or no readable header.
    Torn, undecodable and over-long lines are skipped and counted in `bad_lines`."""
    try:
        f = open(path, "rb")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        return None
    state = JournalState()
    with f:
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            if not raw.endswith(b"\n"):
                if len(raw) > MAX_LINE_BYTES:  # over-long: skip to the end of that line
                    while raw and not raw.endswith(b"\n"):
                        raw = f.readline(MAX_LINE_BYTES + 1)
                state.bad_lines += 1  # or a torn last line: the process died inside write()
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
                if isinstance(rec, dict):
                    state.apply(rec)
                else:
                    state.bad_lines += 1
            except (UnicodeDecodeError, ValueError, RecursionError, TypeError, AttributeError):
                state.bad_lines += 1
    if state.header is None:
        return None
    state.add_steps(read_ring(ring_path(path), state.header.get("run_id")))
    return state


def _writer_alive(header: dict[str, Any]) -> bool:
    """Is the process that opened this journal still running (on this host)? Then it is not dead,
    just writing. A recycled pid (started after the journal was opened) or a zombie does not count."""
    pid = _int(header.get("pid"))
    if pid is None or pid == os.getpid() or header.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        pass  # exists, someone else's
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] in ("Z", "X"):
            return False
        ticks = os.sysconf("SC_CLK_TCK")
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime"))
        started = btime + int(fields[19]) / ticks
        opened = header.get("time")
        if isinstance(opened, (int, float)) and started > opened + 2:
            return False  # the pid was recycled by a process born after the journal was opened
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return True


def postmortem_from_journal(state: JournalState, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The postmortem of a run that died without writing one (`exit_reason: "killed"`)."""
    from .postmortem import SCHEMA_VERSION, event_problem, utc_now_iso

    h = state.header or {}
    opened = h.get("time") if isinstance(h.get("time"), (int, float)) else None
    last_time = state.last_time
    snaps = [m for m in state.marks if m.get("kind") == "snapshot"]
    ckpts = [m for m in state.marks if m.get("kind") == "checkpoint"]
    last_step = state.last_step
    progress = dict(state.progress[-1]) if state.progress else None
    if progress is not None:
        progress.pop("kind", None)
    final_metrics = dict(state.metrics)  # what the Trainer logged last, as in any postmortem
    if not final_metrics and progress is not None:  # died before its first log: the last step's own numbers
        final_metrics = {"loss": progress.get("loss"), "grad_norm": progress.get("grad_norm"),
                         "learning_rate": progress.get("lr")}
    killed = {
        "diagnosis": (f"the process ended without writing a postmortem after step {last_step} (SIGKILL, the kernel "
                      "OOM killer, a segfault or a power loss); this postmortem was rebuilt from the crash journal"),
        "detected_by": "crash journal without a closing record",
        "last_record_time": _iso(last_time) if last_time else None,
        "pid": h.get("pid"),
        "host": h.get("host"),
        "last_progress": progress,
        "last_snapshot_step": snaps[-1].get("step") if snaps else None,
        "last_checkpoint": ckpts[-1].get("path") if ckpts else None,
        "journal": str(path) if path else None,
        "journal_bad_lines": state.bad_lines,
        "journal_compactions": state.compactions,
    }
    points = [[p.get("step"), p.get("loss"), p.get("grad_norm"), p.get("lr")] for p in state.progress]
    pm = {
        "schema_version": SCHEMA_VERSION,
        "exit_reason": "killed",
        "exception_type": None,
        "exception_message": None,
        "traceback": None,
        "last_step": last_step,
        "max_steps": _int(h.get("max_steps")),
        "timestamp": utc_now_iso(),
        "running_time_seconds": round(last_time - opened, 3) if last_time and opened else None,
        "trainer_class": h.get("trainer_class") if isinstance(h.get("trainer_class"), str) else None,
        "final_metrics": final_metrics,
        "recovery_actions": [e for e in state.events if event_problem(e) is None],  # a damaged line is no event
        "recovery_actions_dropped": state.events_dropped,
        "event_counts": dict(state.event_counts),
        "counters": dict(state.counters),
        "skipped_batches": [],
        "curve": {"columns": ["step", "loss", "grad_norm", "lr"], "stride": 1, "points": points},
        "config": h.get("config") if isinstance(h.get("config"), dict) else None,
        "run_id": h.get("run_id"),
        "killed": killed,
    }
    return redact(pm)


def recover_killed_run(output_dir: str | os.PathLike, postmortem_path: str | os.PathLike | None = None
                       ) -> dict[str, Any] | None:
    """If the last run in `output_dir` died without closing its journal, write its postmortem
    (`exit_reason: "killed"`) from the journal, close the journal, and return the postmortem.
    None when there is nothing to recover (no journal, a closed one, or a live writer)."""
    path = journal_path(output_dir)
    state = read_journal(path)
    if state is None or state.closed is not None:
        return None
    header = state.header or {}
    if _writer_alive(header):
        logger.warning("self-healing: the journal in %s is open by a live process (pid %s): not treating that run "
                       "as dead", output_dir, header.get("pid"))
        return None
    from .postmortem import dumps_postmortem, load_postmortem

    pm_path = Path(postmortem_path) if postmortem_path else Path(output_dir) / "postmortem.json"
    try:
        prev = load_postmortem(pm_path)
    except ValueError:
        prev = None
    writer = CrashJournal(path)
    writer.state = state
    writer._open_fd()
    writer._size = path.stat().st_size
    if prev is not None and prev.get("run_id") == header.get("run_id"):
        # it wrote its postmortem and died before closing the journal: nothing was lost
        writer.close(prev.get("exit_reason", "unknown"), prev.get("last_step"), recovered="postmortem existed")
        return None
    pm = postmortem_from_journal(state, path)
    remove_stale_temps(pm_path)
    atomic_write_bytes(pm_path, dumps_postmortem(pm).encode("utf-8"))
    writer.close("killed", pm["last_step"], recovered=True, postmortem=str(pm_path))
    logger.warning("self-healing: the previous run in %s was killed after step %s without writing a postmortem "
                   "(SIGKILL, OOM killer or a crash); wrote its postmortem from the crash journal to %s",
                   output_dir, pm["last_step"], pm_path)
    return pm


# ------------------------------------------------------------------------------------------------
# the observer / Trainer callback
# ------------------------------------------------------------------------------------------------
class JournalHooks:
    """Feeds the journal: an observer of `SelfHealingCallback` (`on_step`, `on_event`,
    `on_snapshot`, `on_finish`) and a Trainer callback (`on_train_begin`, `on_step_end`, `on_log`,
    `on_save`). Never raises into training. Built by `make_journal_callback`."""

    def __init__(self, callback: Any) -> None:
        self.cb = callback
        self.journal: CrashJournal | None = None
        self.enabled = True
        self._pending: tuple[Any, Any, Any, bool] | None = None
        self._warned = False
        args = getattr(getattr(callback, "trainer", None), "args", None)
        if args is not None:
            register_secrets_of(args)  # hub_token and friends: redacted wherever they appear

    def _guard(self, fn: Any, *args: Any) -> None:
        if not self.enabled:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - the journal must never kill the run
            if not self._warned:
                self._warned = True
                logger.warning("self-healing: crash journal write failed (%s: %s); training goes on",
                               type(exc).__name__, exc)

    # --- Trainer events ----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._guard(redact_trackio_run_config)
        self._guard(self._begin, args, state)
        return control

    def _begin(self, args: Any, state: Any) -> None:
        if not getattr(state, "is_world_process_zero", True):
            self.enabled = False
            return
        if self.journal is not None and self.journal.is_open:  # re-entered after a healed exception
            self.journal.decision("resume", step=state.global_step)
            return
        out = args.output_dir
        cfg = self.cb.config
        recover_killed_run(out, cfg.resolved_postmortem_path(out))  # no-op when SelfHealingTrainer did it
        remove_stale_temps(cfg.resolved_postmortem_path(out))  # left by a kill inside a postmortem write
        self.journal = CrashJournal(journal_path(out))
        trainer = self.cb.trainer
        run_id = self.journal.start({"trainer_class": type(trainer).__name__, "max_steps": state.max_steps,
                                     "start_step": state.global_step, "output_dir": str(out),
                                     "config": cfg.to_dict()})
        self.cb.recorder.extra["run_id"] = run_id
        self._warned = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.journal is not None:
            pending, self._pending = self._pending, None
            self._guard(self.journal.progress, state.global_step, *(pending or ()))
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.journal is not None and logs:
            self._guard(self.journal.metrics, state.global_step, logs)
        return control

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.enabled and getattr(args, "should_save", True):  # the Trainer pickled its args, hub_token included
            self._guard(scrub_training_args, path / "training_args.bin", args)
        if self.journal is not None:
            self._guard(lambda: self.journal.decision("checkpoint", step=state.global_step, path=str(path)))
        return control

    # --- SelfHealingCallback observer API ---------------------------------------------------------
    def on_step(self, step: int, signals: Any, info: dict[str, Any]) -> None:
        lrs = getattr(signals, "lrs", None)
        self._pending = (getattr(signals, "loss", None), getattr(signals, "grad_norm", None),
                         lrs[0] if lrs else None, bool(info.get("skipped")))

    def on_event(self, event: dict[str, Any]) -> None:
        if self.journal is not None:
            self._guard(lambda: self.journal.decision("event", event=trim_event(event),
                                                      counters=dict(self.cb.recorder.counters)))

    def on_snapshot(self, step: int, snapshot: Any = None) -> None:
        if self.journal is not None:
            verified = self.cb.ring.latest_verified()
            spilled = getattr(snapshot, "path", None)
            # An in-memory snapshot dies with the machine, so its mark needs no fsync (1-4 ms each,
            # which set the auto interval); the write alone survives a killed process.
            self._guard(lambda: self.journal.decision("snapshot", sync=spilled is not None, step=step,
                                                      verified_step=verified.step if verified else None,
                                                      **({"spilled_to": str(spilled)} if spilled else {})))

    def on_finish(self, postmortem: dict[str, Any]) -> None:
        if self.journal is not None:
            self._guard(self.journal.close, postmortem.get("exit_reason"), postmortem.get("last_step"))


_callback_class: type | None = None


def make_journal_callback(callback: Any) -> Any:
    """A `JournalCallback` (a `transformers.TrainerCallback` with `JournalHooks`) for a
    `SelfHealingCallback`. transformers is imported here, not at module import, so the journal's
    reader and writer stay usable from a bare interpreter."""
    return __getattr__("JournalCallback")(callback)


def __getattr__(name: str) -> Any:
    global _callback_class
    if name == "JournalCallback":
        if _callback_class is None:
            from transformers import TrainerCallback

            _callback_class = type("JournalCallback", (JournalHooks, TrainerCallback),
                                   {"__module__": __name__, "__doc__": JournalHooks.__doc__})
        return _callback_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CrashJournal", "JournalState", "read_journal", "recover_killed_run", "postmortem_from_journal",
           "journal_path", "make_journal_callback", "JOURNAL_NAME"]
