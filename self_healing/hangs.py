"""Hang detection: a phase past its bound is reported (stacks, flight recorder, postmortem, every
rank's last heartbeat) and, by default, ends the process so the launcher relaunches it.

Split from `self_healing.watchdog` (which documents the phases, bounds and exit code) so the hang
report, the most intricate part of the watchdog, is one class with one job."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .compat import TRAINING_FRAME_FILES, TRAINING_FRAMES, flight_recorder
from .io import atomic_write_text
from .phases import IDLE, PhaseClock, rank_info


logger = logging.getLogger("self_healing")

HANG_EXIT_CODE = 75
"""`os._exit` code of a hung process (`EX_TEMPFAIL` of sysexits.h: a temporary failure, retry).
Distinct from the plugin's other exits: 128 + signal number after a preemption, 1 (the CLI's
"the run did not complete"), 2 (CLI usage errors)."""

HANG_DIR = "self-healing"
"""Inside `output_dir`: hang dumps and heartbeat files (the plugin's own directory)."""

HEARTBEAT_FILE_SECONDS = 5.0
"""How often each rank rewrites its heartbeat file (at most)."""
REPORT_TIMEOUT = 60.0
"""The most the hang report (dump, postmortem) may take before the process exits anyway."""
PEER_WAIT_SECONDS = 3.0
"""How long a rank whose collective failed on a lost connection looks for a peer's `hung` heartbeat."""


def hang_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / HANG_DIR


def heartbeat_path(output_dir: str | os.PathLike, rank: int) -> Path:
    return hang_dir(output_dir) / f"heartbeat-rank{rank}.json"


def read_heartbeats(output_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """Every rank's last heartbeat file in `output_dir` (rank -> its content)."""
    out: dict[int, dict[str, Any]] = {}
    for p in hang_dir(output_dir).glob("heartbeat-rank*.json"):
        try:
            r = int(p.stem.rsplit("rank", 1)[1])
            data = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, OSError, IndexError):
            continue
        if isinstance(data, dict):
            out[r] = data
    return dict(sorted(out.items()))


class HangDetector:
    """Writes this rank's heartbeat file and, when the watchdog finds a phase past its bound (or a
    peer's hang broke this rank's collective), the one hang report of this process and its exit."""

    def __init__(self, callback: Any, clock: PhaseClock, exit: Callable[[int], Any],
                 alert: Callable[[str, str, str, int], None], goodput: Callable[[], dict[str, Any]]) -> None:
        self.cb = callback
        self.config = callback.config
        self.clock = clock
        self._exit = exit  # the watchdog's `exit`, looked up at the call (tests replace it)
        self._alert = alert
        self._goodput = goodput
        self.main_ident = threading.main_thread().ident
        """The training thread (the one that called `train()`; set again by `reset`)."""
        self.warned_beat: tuple[str, float, int] | None = None
        """The beat already reported: one report per stuck phase."""
        self.tripped: dict[str, Any] | None = None
        self.hang_spent = 0.0
        """Of the stuck phase's time, what goodput counts as `hung`."""
        self.hang_warnings: list[dict[str, Any]] = []
        self._report_lock = threading.Lock()
        """Held by whichever thread writes this process's hang report (the watchdog at a bound, the
        training thread when a collective failed because a peer hung): one report, one exit."""
        self._reported = threading.Event()
        self.hung_marker: dict[str, Any] | None = None
        """Set when this process ends as hung: written into its heartbeat file before the exit, so
        the ranks whose collectives then fail on the closed connection know why."""
        self._heartbeat_lock = threading.Lock()
        """One heartbeat write at a time, its line built inside: a periodic write in flight (a slow
        fsync) can never land after the hang report's and erase `hung` before the exit."""

    def reset(self) -> None:
        """A fresh `train()`, possibly in a thread of its own."""
        self.tripped = None
        self.hang_warnings = []
        self.warned_beat = None
        self.main_ident = threading.get_ident()

    def reset_report(self) -> None:
        self._report_lock, self._reported, self.hung_marker = threading.Lock(), threading.Event(), None

    def trip(self, record: dict[str, Any], spent: float) -> None:
        """This process ends now; `spent` seconds of the stuck phase count as `hung` in goodput."""
        self.tripped = record
        self.hang_spent = spent

    # --- heartbeat files ------------------------------------------------------------------------------
    def heartbeat_files(self, stop: threading.Event) -> None:
        while True:
            try:
                self.write_heartbeat()
            except Exception:  # noqa: BLE001 - best effort: an unwritable output_dir must not matter here
                pass
            if stop.wait(min(HEARTBEAT_FILE_SECONDS, max(5 * self.config.hang_poll_seconds, 0.5))):
                break

    def write_heartbeat(self) -> None:
        t = getattr(self.cb, "trainer", None)
        if t is None:
            return
        with self._heartbeat_lock:
            r, world = rank_info(t)
            phase, since, step = self.clock.current
            data = {"rank": r, "world_size": world, "pid": os.getpid(), "host": socket.gethostname(), "step": step,
                    "phase": phase, "where": self.clock.where, "phase_seconds": round(time.monotonic() - since, 3),
                    "time": time.time(),
                    "run_id": self.cb.recorder.extra.get("run_id"), "hung": self.hung_marker,
                    "goodput": self._goodput() if r == 0 else None}
            atomic_write_text(heartbeat_path(t.args.output_dir, r), json.dumps(data, default=str))

    # --- a hang ---------------------------------------------------------------------------------------
    def on_hang(self, beat: tuple[str, float, int], waited: float, bound: float,
                peers: dict[int, dict[str, Any]] | None = None, error: BaseException | None = None) -> None:
        """Report a hang (and by default exit). `peers` (rank -> heartbeat): other ranks that ended
        as hung, whose exit made this rank's collective fail with `error`: the same hang, seen here."""
        phase, _since, step = beat
        self.warned_beat = beat
        t = self.cb.trainer
        r, world = rank_info(t)
        at = step + 1 if phase in ("data_wait", "train_step", "generation") else step  # the step in progress
        exiting = self.config.on_hang == "exit" or peers is not None  # a peer is gone: the group cannot go on
        paused = debugger_or_notebook(self.main_ident)
        if exiting and paused and peers is None:  # a program stopped at a breakpoint is not hung
            logger.warning("self-healing: %s: on_hang='exit' acts as 'warn' here", paused)
            exiting = False
        if exiting and not self._report_lock.acquire(blocking=False):
            return  # the other thread is writing this process's hang report and exits
        backstop = None
        if exiting:  # whatever happens below (a write stuck on the same filesystem), the process ends
            backstop = threading.Timer(REPORT_TIMEOUT, lambda: self._exit(HANG_EXIT_CODE))
            backstop.daemon = True
            backstop.start()
        if peers:
            who = ", ".join(str(k) for k in sorted(peers))
            first = next(iter(peers.values())).get("hung") or {}
            summary = (f"rank(s) {who} hung ({first.get('phase')} at step {first.get('step')}) and were ended by "
                       f"their watchdog; this rank's {phase} at step {at} then failed "
                       f"({type(error).__name__}: {str(error).strip()[:200]})")
        else:
            summary = (f"{phase} at step {at} has not progressed for {waited:.1f}s (its bound is {bound:.1f}s: "
                       f"{self.clock.bound_reason(phase)})")
        stack = self.training_stack()
        path = self.dump(at, r, summary, stack)
        ranks = {}
        try:
            now = time.time()
            for rr, hb in read_heartbeats(t.args.output_dir).items():
                ranks[str(rr)] = {"step": hb.get("step"), "phase": hb.get("phase"), "where": hb.get("where"),
                                  "host": hb.get("host"),
                                  "seconds_since_seen": round(now - float(hb.get("time", now)), 1),
                                  "phase_seconds": hb.get("phase_seconds")}
        except Exception:  # noqa: BLE001
            pass
        ranks[str(r)] = {**ranks.get(str(r), {}), "step": step, "phase": phase, "where": self.clock.where,
                         "host": socket.gethostname(), "seconds_since_seen": 0.0, "phase_seconds": round(waited, 1)}
        hang = {"phase": phase, "step": at, "last_completed_step": step, "seconds_waited": round(waited, 2),
                "bound_seconds": round(bound, 2), "bound_reason": self.clock.bound_reason(phase), "rank": r,
                "world_size": world, "dump": str(path) if path else None, "stack": stack,
                "action": "exit" if exiting else "warn"}
        if peers:
            hang["hung_peers"] = sorted(peers)
            hang["error"] = f"{type(error).__name__}: {str(error).strip()[:300]}"
        if world > 1:
            hang["ranks"] = ranks
            behind = ranks_behind(ranks)
            stale = [k for k, v in ranks.items() if (v.get("seconds_since_seen") or 0) > 3 * HEARTBEAT_FILE_SECONDS]
            missing = [str(k) for k in range(world) if str(k) not in ranks]
            hang["ranks_behind"], hang["ranks_not_seen"] = behind, sorted(set(stale + missing))
            if behind:
                v = ranks[behind[0]]
                summary += (f"; rank(s) {', '.join(behind)} behind the others (at {v.get('phase')}"
                            + (f"/{v['where']}" if v.get("where") else "") + f" of step {(v.get('step') or 0) + 1}): "
                            "the others are waiting for them")
            if hang["ranks_not_seen"]:
                summary += f"; rank(s) {', '.join(hang['ranks_not_seen'])} not seen lately (dead?)"
            hang["summary"] = summary
        if peers and not behind:
            hang["ranks_behind"] = [str(k) for k in sorted(peers)]
        logger.error("self-healing: HANG: %s; stacks in %s%s", summary, path,
                     "; exiting so the launcher can relaunch (auto-resume continues from the newest verified "
                     f"checkpoint), exit code {HANG_EXIT_CODE}" if exiting else " (on_hang='warn': waiting)")
        if not exiting:
            self.hang_warnings.append({k: v for k, v in hang.items() if k != "stack"})
            self._alert(f"hang at step {at}", summary, "ERROR", step)
            return
        self.trip(hang, waited)
        self.hung_marker = {"phase": phase, "step": at, "summary": summary[:500]}
        try:  # before the exit closes this rank's connections: the others read why their collective failed
            self.write_heartbeat()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.cb.finish("hung", extra={"hang": hang, "diagnosis": {"failure": "hang", "summary": summary}})
        except Exception as exc:  # noqa: BLE001 - exit regardless
            logger.error("self-healing: the hang postmortem could not be written (%s: %s)", type(exc).__name__, exc)
        for h in logging.getLogger().handlers + logger.handlers:
            try:
                h.flush()
            except Exception:  # noqa: BLE001
                pass
        sys.stderr.flush()
        if backstop is not None:
            backstop.cancel()
        self._exit(HANG_EXIT_CODE)
        self._reported.set()  # only reached where `exit` was replaced (tests)

    def loop_failed(self, error: BaseException) -> None:
        """The training thread, as an exception leaves the training loop, before anything judges it:
        when this process's own hang report is being written, wait for its exit (no second verdict);
        when another rank ended as hung (its heartbeat file says so), this exception is that hang seen
        from here (a collective failing on the closed connection): report `hung`, naming it."""
        if self._report_lock.locked():
            self._reported.wait(REPORT_TIMEOUT + 5.0)
            return
        t = getattr(self.cb, "trainer", None)
        if t is None or rank_info(t)[1] <= 1 or self.clock.phase == IDLE:
            return
        peers = self._hung_peers(wait=PEER_WAIT_SECONDS if looks_like_peer_loss(error) else 0.0)
        if peers:
            beat = self.clock.current
            self.on_hang(beat, time.monotonic() - beat[1], self.clock.bound(beat[0]), peers=peers, error=error)

    def _hung_peers(self, wait: float) -> dict[int, dict[str, Any]]:
        """Other ranks whose heartbeat file says they ended as hung; polled up to `wait` seconds
        (a file written just before a peer's exit may reach a shared filesystem a little later)."""
        t = self.cb.trainer
        me = rank_info(t)[0]
        deadline = time.monotonic() + wait
        while True:
            try:
                found = {r: hb for r, hb in read_heartbeats(t.args.output_dir).items()
                         if r != me and isinstance(hb.get("hung"), dict)
                         and float(hb.get("time") or 0) >= self.clock.started_wall}  # not a previous launch's
            except Exception:  # noqa: BLE001
                found = {}
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.1)

    # --- the training thread, seen from here --------------------------------------------------------
    def still_training(self) -> bool:
        """Is the training thread still inside `train()`? A phase left behind by a `train()` that
        raised before its loop (and wrote no postmortem) must not end a process that moved on."""
        frame = sys._current_frames().get(self.main_ident)
        while frame is not None:
            code = frame.f_code
            if code.co_name in TRAINING_FRAMES and any(p in code.co_filename for p in TRAINING_FRAME_FILES):
                return True
            frame = frame.f_back
        return False

    def training_stack(self) -> list[str]:
        frame = sys._current_frames().get(self.main_ident)
        if frame is None:
            return []
        return [line.rstrip() for line in traceback.format_stack(frame)][-40:]

    def dump(self, step: int, r: int, summary: str, stack: list[str]) -> Path | None:
        """Every thread's stack and the flight recorder to `hang-<step>-rank<r>.txt` (None if unwritable)."""
        t = self.cb.trainer
        path = hang_dir(t.args.output_dir) / f"hang-{step}-rank{r}.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"self-healing hang report\n{summary}\npid {os.getpid()} on {socket.gethostname()}, "
                        f"rank {r}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n\n")
                f.write("training thread:\n" + "\n".join(stack) + "\n\nall threads (faulthandler):\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
                f.flush()
                fr = flight_recorder()
                if fr is None:
                    f.write("\nflight recorder: not available (no process group, or a torch without one)\n")
                else:
                    kind, data = fr
                    side = path.with_name(path.stem + (".flight-recorder.json" if kind == "json" else
                                                       ".flight-recorder.pkl"))
                    side.write_bytes(data)
                    f.write(f"\ntorch's flight recorder (the last collectives of every process group): {side.name}\n")
                    f.write(flight_recorder_summary(kind, data))
            return path
        except OSError as exc:
            logger.error("self-healing: could not write the hang dump %s (%s); all threads' stacks go to stderr",
                         path, exc)
            try:
                faulthandler.dump_traceback(sys.stderr, all_threads=True)
            except Exception:  # noqa: BLE001
                pass
            return None


_ORDER = {p: i for i, p in enumerate(("startup", "data_wait", "train_step", "generation", "after_step", "evaluation",
                                       "eval_step", "save"))}
_WHERE = {"": 0, "forward": 1, "backward": 2, "optimizer": 3}


def ranks_behind(ranks: dict[str, dict[str, Any]]) -> list[str]:
    """The ranks the others are waiting for: the furthest behind (step, phase, place in the step)
    when not every rank is at the same point (a rank still in its forward while the others sit in
    backward's all-reduce). Empty when all are level."""
    def key(v: dict[str, Any]) -> tuple[int, int, int]:
        step = v.get("step") if isinstance(v.get("step"), int) else -1
        return step, _ORDER.get(str(v.get("phase")), 0), _WHERE.get(str(v.get("where") or ""), 0)

    if len(ranks) < 2:
        return []
    keys = {r: key(v) for r, v in ranks.items()}
    lo, hi = min(keys.values()), max(keys.values())
    return [r for r, k in keys.items() if k == lo] if lo != hi else []


def looks_like_peer_loss(error: BaseException) -> bool:
    """Does this exception (or one in its chain) look like a collective that lost a peer?"""
    seen = 0
    e: BaseException | None = error
    while e is not None and seen < 8:
        text = f"{type(e).__name__} {e}".lower()
        if any(k in text for k in ("distbackenderror", "distnetworkerror", "connection closed", "connection reset",
                                   "broken pipe", "gloo", "nccl", "peer", "socket", "timed out")):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def debugger_or_notebook(main_ident: int | None) -> str | None:
    """Why exiting on a hang would be wrong here, or None: a debugger is tracing the training
    thread (a breakpoint), or the process is an interactive kernel (Jupyter, IPython)."""
    frame = sys._current_frames().get(main_ident) if main_ident is not None else None
    while frame is not None:
        if frame.f_trace is not None:
            return "a debugger is attached to the training thread"
        frame = frame.f_back
    if "ipykernel" in sys.modules or hasattr(sys, "ps1"):
        return "an interactive session (notebook or REPL): its kernel is not ours to end"
    return None


def flight_recorder_summary(kind: str, data: bytes) -> str:
    """Where each process group stands and its last collectives, in a few lines."""
    if kind != "json":
        return "  (pickled: torch's tools/flight_recorder reads it)\n"
    try:
        fr = json.loads(data)
    except ValueError:
        return ""
    lines = []
    for pg, st in (fr.get("pg_status") or {}).items():
        lines.append(f"  process group {pg}: last enqueued collective {st.get('last_enqueued_collective')}, started "
                     f"{st.get('last_started_collective')}, completed {st.get('last_completed_collective')}")
    entries = fr.get("entries") or []
    for e in entries[-8:]:
        lines.append(f"  #{e.get('collective_seq_id')} {e.get('profiling_name')} {e.get('input_sizes')} "
                     f"state={e.get('state')}")
    if not entries:
        lines.append("  no entries: set TORCH_FR_BUFFER_SIZE=2000 in the launch environment to record them")
    return "\n".join(lines) + "\n"
