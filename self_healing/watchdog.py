"""Hangs and goodput: a heartbeat per phase, a thread that watches it, and where the time went.

A job that stops making progress wastes more GPU hours than any NaN: a collective waiting on a
rank that died, a deadlocked dataloader worker, a save stuck on a network filesystem, a generation
that never returns. `ddp_timeout` (30 min by default, often raised to "never") sees only the first
of these. Here each process gets one daemon thread, the **watchdog**; the training thread only
leaves a heartbeat (a tuple of phase, monotonic time and step assigned to an attribute: no lock,
about a microsecond; ~5 us per optimizer step in all, `benchmarks/overhead.py`) when it moves
from one phase to the next:

==============  ==============================================================================
phase           from ... to ...
==============  ==============================================================================
startup         `train()` called -> the first batch is asked for (model placement, resume load)
data_wait       the next batch is asked for -> it arrived (`get_batch_samples`)
train_step      the batch arrived -> the optimizer step ended (forward, backward, all-reduce,
                optimizer; GRPO/RLOO generation is its own phase, `generation`)
after_step      the step ended -> the next batch is asked for (the Trainer's logging, callbacks)
evaluation      `evaluate()` entered -> its first prediction step ended; after the last one, the
                metrics (`compute_metrics`)
eval_step       one prediction step to the next
save            `_save_checkpoint` and the `on_save` callbacks after it (an upload, a copy); loading
                the best model at the end
recovery        an exception left the training loop -> the loop is entered again (the
                orchestrator's diagnosis, resume checkpoint, reload)
finishing       the loop returned -> the postmortem is written
preemption      a preemption signal was acted on -> checkpoint, postmortem, exit
==============  ==============================================================================

The watchdog wakes every `hang_poll_seconds` (1 s by default) and compares the time spent in
the current phase with that phase's bound, `max(floor, hang_factor x the longest of its last 64
durations)` (a run's own history: a slow-but-steady eval step or save calibrates its own bound);
the floor is `hang_floor_seconds` for steps, `hang_startup_seconds` for startup and for the first
`_WARMUP` durations of every step-like phase (compilation, cache warm-up), `hang_save_seconds`
for saves, recovery, the end-of-evaluation metrics and the end of training. `hang_phase_seconds`
fixes the bound of a phase outright. When the bound is passed:

1. every thread's Python stack is dumped with `faulthandler` (it reads the frames without the GIL
   being released by the blocked thread: a thread stuck in a C++ collective or a `queue.get` is
   shown where it is), and torch's flight recorder of the last collectives where there is one, to
   `output_dir/self-healing/hang-<step>-rank<r>.txt`;
2. the postmortem is written with `exit_reason: "hung"` and a `hang` block: phase, step, seconds
   waited and the bound, the training thread's stack, and every rank's last heartbeat (each rank's
   watchdog writes `output_dir/self-healing/heartbeat-rank<r>.json` every few seconds: no
   collective is needed to say which rank was last seen at which step);
3. with `on_hang="exit"` (the default) the process ends with `os._exit(HANG_EXIT_CODE)` (75,
   `EX_TEMPFAIL`: "try again"), so `torchrun --max-restarts`, Slurm `--requeue` or a job controller
   relaunches it and auto-resume continues from the newest verified checkpoint (`hung` is a
   resumable exit). `on_hang="warn"` writes the file and logs, once per stuck phase, and waits.

The same phase clock gives **goodput** (productive step time over wall time, with the badput
split by cause) in the postmortem's `goodput` block and in `self-healing report`'s first lines,
for this launch and for the job across relaunches (see `Goodput`).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

from . import compat

logger = logging.getLogger("self_healing")

HANG_EXIT_CODE = 75
"""`os._exit` code of a hung process (`EX_TEMPFAIL` of sysexits.h: a temporary failure, retry).
Distinct from the plugin's other exits: 128 + signal number after a preemption, 1 (the CLI's
"the run did not complete"), 2 (CLI usage errors)."""

HANG_DIR = "self-healing"
"""Inside `output_dir`: hang dumps and heartbeat files (the plugin's own directory)."""

PHASES = ("startup", "data_wait", "train_step", "generation", "after_step", "evaluation", "eval_step", "save",
          "recovery", "finishing", "preemption")
_STEP_PHASES = ("data_wait", "train_step", "generation", "after_step", "eval_step")
"""Phases bounded by `hang_floor_seconds` (after warm-up) and their own history."""
_LONG_PHASES = ("save", "recovery", "finishing", "evaluation")
"""Phases bounded by `hang_save_seconds`: I/O and one-off work of unpredictable length."""
_WARMUP = 3
"""Durations a step-like phase needs before its floor drops from `hang_startup_seconds`."""
_HISTORY = 64
_IDLE = "idle"
_HEARTBEAT_FILE_SECONDS = 5.0
_REPORT_TIMEOUT = 60.0
_PEER_WAIT_SECONDS = 3.0
"""How long a rank whose collective failed on a lost connection looks for a peer's `hung` heartbeat."""
"""The most the hang report (dump, postmortem) may take before the process exits anyway."""

GOODPUT_PARTS = ("productive", "lost", "recovery", "checkpointing", "evaluation", "startup", "data_and_logging",
                 "finishing", "hung", "preemption", "between_launches", "unaccounted")
"""Where a launch's (and the job's) wall time went; the parts sum to the wall time.

- productive: optimizer steps that count (forward, backward, all-reduce, optimizer, generation);
- lost: steps whose work was thrown away: skipped, rolled back, failed with an exception, or
  recomputed after a resume (the steps between the checkpoint and where the previous launch got);
- recovery: from an exception leaving the training loop to training again (diagnosis, resume
  checkpoint, reload);
- checkpointing: saves; evaluation: evaluations; startup: `train()` to the first batch;
- data_and_logging: waiting for batches, and the Trainer's logging and callbacks between steps;
- finishing: the end of training to the postmortem; hung: a phase past its bound until the exit;
  preemption: a preemption's checkpoint and exit;
- between_launches (job only): from a launch's last sign of life to the next launch's start
  (a hang's or a kill's wait for the relaunch, the scheduler's queue);
- unaccounted (job only): a launch killed before its first heartbeat file."""

_PHASE_PART = {"startup": "startup", "data_wait": "data_and_logging", "after_step": "data_and_logging",
               "evaluation": "evaluation", "eval_step": "evaluation", "save": "checkpointing",
               "recovery": "recovery", "finishing": "finishing", "preemption": "preemption"}


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


def _rank_info(trainer: Any) -> tuple[int, int]:
    from .distributed import rank, world_size

    try:
        return rank(), world_size()
    except Exception:  # noqa: BLE001
        return int(getattr(trainer.args, "process_index", 0) or 0), int(getattr(trainer.args, "world_size", 1) or 1)


class Watchdog:
    """One per `SelfHealingCallback` (per process). `beat(phase)` is the training thread's whole
    cost; everything else runs on the watchdog thread or at the run's edges."""

    def __init__(self, callback: Any) -> None:
        self.cb = callback
        self.config = callback.config
        self._beat: tuple[str, float, int] = (_IDLE, time.monotonic(), 0)
        """(phase, monotonic time it began, trainer step): replaced whole, never mutated."""
        self._spent: dict[str, float] = {}
        self._history: dict[str, deque[float]] = {}
        self._thread: threading.Thread | None = None
        self._hb_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._main_ident = threading.main_thread().ident
        """The training thread (the one that called `train()`; set again by `start_run`)."""
        self._warned_beat: tuple[str, float, int] | None = None
        self.tripped: dict[str, Any] | None = None
        self.hang_warnings: list[dict[str, Any]] = []
        self.exit = os._exit  # tests replace it
        # goodput
        self.started_wall = time.time()
        self.started_mono = time.monotonic()
        self._step_time = 0.0
        """Train-step time of the step in progress (phases train_step + generation)."""
        self._step_skipped = False
        self._recent_steps: deque[list[Any]] = deque(maxlen=4096)
        """[step, seconds, lost?] of recent finished steps (a rollback moves them to lost)."""
        self.lost = {"skipped": 0.0, "rolled_back": 0.0, "failed": 0.0, "recomputed": 0.0}
        self._seen_steps_lost = 0
        self.recompute_until = -1
        self.job_base: dict[str, Any] | None = None
        self.preempt_time: float | None = None
        self.where = ""
        """Inside a train step: "forward", "backward" (DDP's gradient all-reduce runs there) or
        "optimizer"; a plain attribute write from a forward pre-hook and around `accelerator.backward`,
        read only by the heartbeat file, so a hung rank can be told from the ranks waiting for it."""
        self._hooks: list[Any] = []
        self._own = 0.0
        """This rank's own time in the step so far, none of it spent waiting for other ranks: its
        data wait and its forward passes (DDP's all-reduce starts in backward). Gathered each step
        with the step's signals for straggler detection."""
        self._fwd_t: float | None = None
        self.stragglers = Stragglers()
        self._grace_checked = False
        self.grace_estimate: dict[str, Any] | None = None
        self._report_lock = threading.Lock()
        """Held by whichever thread writes this process's hang report (the watchdog at a bound, the
        training thread when a collective failed because a peer hung): one report, one exit."""
        self._reported = threading.Event()
        self.hung_marker: dict[str, Any] | None = None
        """Set when this process ends as hung: written into its heartbeat file before the exit, so
        the ranks whose collectives then fail on the closed connection know why."""

    # ------------------------------------------------------------------------------------------
    # the training thread's side: microseconds
    # ------------------------------------------------------------------------------------------
    def beat(self, phase: str, step: int | None = None) -> None:
        """Enter `phase` now (the same phase again restarts its clock)."""
        now = time.monotonic()
        prev = self._beat
        d = now - prev[1]
        last = prev[0]
        self._spent[last] = self._spent.get(last, 0.0) + d
        if last == "train_step" or last == "generation":
            self._step_time += d
        elif last == "data_wait":
            self._own += d
        h = self._history.get(last)
        if h is None:
            h = self._history[last] = deque(maxlen=_HISTORY)
        h.append(d)
        if step is None:
            st = getattr(getattr(self.cb, "trainer", None), "state", None)
            step = getattr(st, "global_step", prev[2]) if st is not None else prev[2]
        self._beat = (phase, now, step)
        self.where = ""

    @property
    def phase(self) -> str:
        return self._beat[0]

    # ------------------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------------------
    def start_run(self) -> None:
        """A fresh `train()`: new clocks, phase `startup`, the threads running (when enabled)."""
        self._spent = {}
        self._history = {}
        self.tripped = None
        self.hang_warnings = []
        self._warned_beat = None
        self.started_wall, self.started_mono = time.time(), time.monotonic()
        self._main_ident = threading.get_ident()  # train() may run in a thread of its own
        self._step_time, self._step_skipped = 0.0, False
        self._recent_steps.clear()
        self.lost = dict.fromkeys(self.lost, 0.0)
        self._seen_steps_lost = 0
        self.recompute_until = -1
        self.job_base = None
        self.preempt_time = None
        self._own, self._fwd_t, self.stragglers = 0.0, None, Stragglers()
        self._grace_checked, self.grace_estimate = False, None
        self._report_lock, self._reported, self.hung_marker = threading.Lock(), threading.Event(), None
        self._beat = ("startup", self.started_mono, 0)
        self._prev_heartbeat = None  # a killed launch's last word on its goodput, before ours replaces it
        t = getattr(self.cb, "trainer", None)
        if t is not None:
            try:
                self._prev_heartbeat = read_heartbeats(t.args.output_dir).get(0)
            except Exception:  # noqa: BLE001
                pass
        self._stop.set()  # the threads of an earlier train() end at their next wake-up
        self._stop = stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(stop,), name="self-healing-watchdog", daemon=True)
        self._thread.start()  # hangs when hang_detection is on; the preemption grace always
        self._hb_thread = threading.Thread(target=self._heartbeat_files, args=(stop,), name="self-healing-heartbeat",
                                           daemon=True)
        self._hb_thread.start()
        self._add_step_hooks()

    def stop(self) -> None:
        """Back to idle: nothing is watched (the threads end at their next wake-up)."""
        self.beat(_IDLE)
        self._stop.set()
        self._remove_step_hooks()

    def _add_step_hooks(self) -> None:
        """Under several processes: where in the step this rank is (forward, backward, optimizer)."""
        self._remove_step_hooks()
        t = getattr(self.cb, "trainer", None)
        if t is None or _rank_info(t)[1] <= 1:
            return
        try:
            def forward(module: Any, args: Any) -> None:
                self.where = "forward"
                self._fwd_t = time.monotonic()

            self._hooks.append(t.model.register_forward_pre_hook(forward, prepend=True))
            acc = t.accelerator
            orig = acc.backward

            def backward(*args: Any, **kwargs: Any) -> Any:
                self.where = "backward"
                if self._fwd_t is not None:
                    self._own += time.monotonic() - self._fwd_t
                    self._fwd_t = None
                out = orig(*args, **kwargs)
                self.where = "optimizer"
                return out

            acc.backward = backward
            self._hooks.append(lambda: acc.__dict__.pop("backward", None))
        except Exception:  # noqa: BLE001 - a finer heartbeat is a nicety
            pass

    def _remove_step_hooks(self) -> None:
        for h in self._hooks:
            try:
                h.remove() if hasattr(h, "remove") else h()
            except Exception:  # noqa: BLE001
                pass
        self._hooks = []

    def _check_grace_fits(self, beat: tuple[str, float, int], signal_time: float) -> None:
        """Right after a preemption signal: will the phase in progress plus a checkpoint fit in the
        grace? Said at once (from the run's own timings), so a too-short grace is not a surprise."""
        phase, since, _step = beat

        def typical(ph: str) -> float | None:
            h = sorted(self._history.get(ph) or ())
            return h[len(h) // 2] if h else None

        left = None
        if phase in ("train_step", "generation", "eval_step", "data_wait", "after_step"):
            t = typical(phase)
            left = max(0.0, t - (time.monotonic() - since)) if t is not None else None
        save = typical("save")
        self.grace_estimate = {"phase": phase, "phase_seconds_left": None if left is None else round(left, 2),
                               "save_seconds": None if save is None else round(save, 2)}
        need = (left or 0.0) + (save or 0.0)
        grace = self.config.preemption_grace_seconds - (time.monotonic() - signal_time)
        if need > grace:
            logger.warning("self-healing: preemption: the %s in progress (~%.1fs left) and a checkpoint (~%.1fs) will "
                           "likely not fit in the %.1fs of grace left (preemption_grace_seconds=%g); raise it, or "
                           "the scheduler's kill delay (Slurm KillWait, spot notice), or save faster", phase,
                           left or 0.0, save or 0.0, grace, self.config.preemption_grace_seconds)

    def save_plan(self) -> tuple[float | None, float | None]:
        """At a preemption: (the `time.monotonic()` by which its checkpoint must be on disk, what a
        save takes here in seconds): the grace less a reserve for the postmortem and the exit, and
        the longest of this launch's last 8 saves (None before the first one, or without a signal)."""
        if self.preempt_time is None:
            return None, None
        grace = float(self.config.preemption_grace_seconds)
        saves = list(self._history.get("save") or ())[-8:]
        return self.preempt_time + grace - min(2.0, 0.1 * grace), (max(saves) if saves else None)

    def on_preempt_signal(self) -> None:
        """Called from the signal handler: the grace starts now."""
        if self.preempt_time is None:
            self.preempt_time = time.monotonic()

    # ------------------------------------------------------------------------------------------
    # bounds
    # ------------------------------------------------------------------------------------------
    def bound(self, phase: str) -> float:
        cfg = self.config
        fixed = (cfg.hang_phase_seconds or {}).get(phase)
        if fixed is not None:
            return float(fixed)
        if phase == "startup":
            return float(cfg.hang_startup_seconds)
        if phase == "preemption":
            return float(cfg.preemption_grace_seconds)
        try:
            hist = list(self._history.get(phase) or ())
        except RuntimeError:  # mutated while copied (only under free-threading)
            hist = []
        if phase in _LONG_PHASES:
            floor = float(cfg.hang_save_seconds)
        elif len(hist) < _WARMUP:
            floor = float(cfg.hang_startup_seconds)
        else:
            floor = float(cfg.hang_floor_seconds)
        return max(floor, cfg.hang_factor * max(hist)) if hist else floor

    # ------------------------------------------------------------------------------------------
    # the watchdog thread
    # ------------------------------------------------------------------------------------------
    def _watch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            phase, since, step = beat = self._beat
            pt = self.preempt_time
            if pt is not None and not self._grace_checked and phase != _IDLE:
                self._grace_checked = True
                try:
                    self._check_grace_fits(beat, pt)
                except Exception:  # noqa: BLE001
                    pass
            if pt is not None and phase != _IDLE and self.tripped is None and \
                    time.monotonic() - pt > self.config.preemption_grace_seconds:
                try:
                    self._on_grace_exceeded(beat, time.monotonic() - pt)
                except Exception as exc:  # noqa: BLE001
                    logger.warning("self-healing: watchdog check failed (%s: %s)", type(exc).__name__, exc)
            elif self.config.hang_detection and phase != _IDLE and beat is not self._warned_beat:
                try:
                    b = self.bound(phase)
                    waited = time.monotonic() - since
                    if waited > b:
                        if self._still_training():
                            self._on_hang(beat, waited, b)
                        else:  # train() left without a postmortem (an error before training began): stale
                            self.stop()
                except Exception as exc:  # noqa: BLE001 - the watchdog must never take the run down by mistake
                    logger.warning("self-healing: watchdog check failed (%s: %s)", type(exc).__name__, exc)
            stop.wait(self.config.hang_poll_seconds)

    def _heartbeat_files(self, stop: threading.Event) -> None:
        while True:
            try:
                self.write_heartbeat()
            except Exception:  # noqa: BLE001 - best effort: an unwritable output_dir must not matter here
                pass
            if stop.wait(min(_HEARTBEAT_FILE_SECONDS, max(5 * self.config.hang_poll_seconds, 0.5))):
                break

    def write_heartbeat(self) -> None:
        t = getattr(self.cb, "trainer", None)
        if t is None:
            return
        from .io import atomic_write_text

        r, world = _rank_info(t)
        phase, since, step = self._beat
        data = {"rank": r, "world_size": world, "pid": os.getpid(), "host": socket.gethostname(), "step": step,
                "phase": phase, "where": self.where, "phase_seconds": round(time.monotonic() - since, 3),
                "time": time.time(),
                "run_id": self.cb.recorder.extra.get("run_id"), "hung": self.hung_marker,
                "goodput": self.goodput() if r == 0 else None}
        atomic_write_text(heartbeat_path(t.args.output_dir, r), json.dumps(data, default=str))

    # ------------------------------------------------------------------------------------------
    # a hang
    # ------------------------------------------------------------------------------------------
    def _in_progress_step(self, phase: str, step: int) -> int:
        return step + 1 if phase in ("data_wait", "train_step", "generation") else step

    def _on_hang(self, beat: tuple[str, float, int], waited: float, bound: float,
                 peers: dict[int, dict[str, Any]] | None = None, error: BaseException | None = None) -> None:
        """Report a hang (and by default exit). `peers` (rank -> heartbeat): other ranks that ended
        as hung, whose exit made this rank's collective fail with `error`: the same hang, seen here."""
        phase, _since, step = beat
        self._warned_beat = beat
        t = self.cb.trainer
        r, world = _rank_info(t)
        at = self._in_progress_step(phase, step)
        exiting = self.config.on_hang == "exit" or peers is not None  # a peer is gone: the group cannot go on
        paused = _debugger_or_notebook(self._main_ident)
        if exiting and paused and peers is None:  # a program stopped at a breakpoint is not hung
            logger.warning("self-healing: %s: on_hang='exit' acts as 'warn' here", paused)
            exiting = False
        if exiting and not self._report_lock.acquire(blocking=False):
            return  # the other thread is writing this process's hang report and exits
        backstop = None
        if exiting:  # whatever happens below (a write stuck on the same filesystem), the process ends
            backstop = threading.Timer(_REPORT_TIMEOUT, lambda: self.exit(HANG_EXIT_CODE))
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
                       f"{self._bound_reason(phase)})")
        stack = self._training_stack()
        path = self._dump(at, r, summary, stack)
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
        ranks[str(r)] = {**ranks.get(str(r), {}), "step": step, "phase": phase, "where": self.where,
                         "host": socket.gethostname(), "seconds_since_seen": 0.0, "phase_seconds": round(waited, 1)}
        hang = {"phase": phase, "step": at, "last_completed_step": step, "seconds_waited": round(waited, 2),
                "bound_seconds": round(bound, 2), "bound_reason": self._bound_reason(phase), "rank": r,
                "world_size": world, "dump": str(path) if path else None, "stack": stack,
                "action": "exit" if exiting else "warn"}
        if peers:
            hang["hung_peers"] = sorted(peers)
            hang["error"] = f"{type(error).__name__}: {str(error).strip()[:300]}"
        if world > 1:
            hang["ranks"] = ranks
            behind = _ranks_behind(ranks)
            stale = [k for k, v in ranks.items() if (v.get("seconds_since_seen") or 0) > 3 * _HEARTBEAT_FILE_SECONDS]
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
        self.tripped = hang
        self._hang_spent = waited
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
        self.exit(HANG_EXIT_CODE)
        self._reported.set()  # only reached where `exit` was replaced (tests)

    def loop_failed(self, error: BaseException) -> None:
        """The training thread, as an exception leaves the training loop, before anything judges it:
        when this process's own hang report is being written, wait for its exit (no second verdict);
        when another rank ended as hung (its heartbeat file says so), this exception is that hang seen
        from here (a collective failing on the closed connection): report `hung`, naming it."""
        if self._report_lock.locked():
            self._reported.wait(_REPORT_TIMEOUT + 5.0)
            return
        t = getattr(self.cb, "trainer", None)
        if t is None or _rank_info(t)[1] <= 1 or self.phase == _IDLE:
            return
        peers = self._hung_peers(wait=_PEER_WAIT_SECONDS if _looks_like_peer_loss(error) else 0.0)
        if peers:
            beat = self._beat
            self._on_hang(beat, time.monotonic() - beat[1], self.bound(beat[0]), peers=peers, error=error)

    def _hung_peers(self, wait: float) -> dict[int, dict[str, Any]]:
        """Other ranks whose heartbeat file says they ended as hung; polled up to `wait` seconds
        (a file written just before a peer's exit may reach a shared filesystem a little later)."""
        t = self.cb.trainer
        me = _rank_info(t)[0]
        deadline = time.monotonic() + wait
        while True:
            try:
                found = {r: hb for r, hb in read_heartbeats(t.args.output_dir).items()
                         if r != me and isinstance(hb.get("hung"), dict)
                         and float(hb.get("time") or 0) >= self.started_wall}  # not a previous launch's
            except Exception:  # noqa: BLE001
                found = {}
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.1)

    def _on_grace_exceeded(self, beat: tuple[str, float, int], since_signal: float) -> None:
        """The preemption grace ran out before the checkpoint and exit: say so (stacks, postmortem)
        and exit now, before the SIGKILL that is coming would leave nothing."""
        import signal as _signal

        phase, _since, step = beat
        t = self.cb.trainer
        sig = self.cb.preempt_signal or _signal.SIGTERM
        name = _signal.Signals(sig).name
        r, _world = _rank_info(t)
        summary = (f"{name} {since_signal:.1f}s ago and no checkpoint yet (preemption_grace_seconds="
                   f"{self.config.preemption_grace_seconds:g}): still in {phase} at step {step}")
        stack = self._training_stack()
        path = self._dump(step, r, summary, stack)
        self.tripped = {"phase": phase, "step": step}
        self._hang_spent = 0.0
        fast = self._fast_state()
        if fast is not None:
            summary += f"; the fast resumable state {fast} was written before (a relaunch resumes from it)"
        logger.error("self-healing: %s; stacks in %s; exiting now", summary, path)
        try:
            self.cb.finish("interrupted", extra={"signal": name, "checkpoint": str(fast) if fast else None,
                                                 "checkpoint_problem": summary,
                                                 "preemption": {"grace_seconds": self.config.preemption_grace_seconds,
                                                                "seconds_since_signal": round(since_signal, 2),
                                                                "grace_exceeded": True, "phase": phase,
                                                                "dump": str(path) if path else None,
                                                                "fast_state": fast_state_info(fast),
                                                                "stack": stack}})
        except Exception as exc:  # noqa: BLE001
            logger.error("self-healing: the postmortem could not be written (%s: %s)", type(exc).__name__, exc)
        sys.stderr.flush()
        self.exit(128 + int(sig))

    def _fast_state(self) -> Path | None:
        """The verified fast resumable state of the preemption in progress, if one was written."""
        from .checkpoints import PLUGIN_DIR, resume_info, verify_checkpoint

        at = getattr(self.cb, "preempted_at", None)
        t = getattr(self.cb, "trainer", None)
        if at is None or t is None:
            return None
        p = Path(t.args.output_dir) / PLUGIN_DIR / f"resume-step-{at}"
        return p if resume_info(p) is not None and verify_checkpoint(p, check_finite=False)[0] else None

    def _bound_reason(self, phase: str) -> str:
        cfg = self.config
        if (cfg.hang_phase_seconds or {}).get(phase) is not None:
            return f"hang_phase_seconds[{phase!r}]"
        if phase == "startup":
            return "hang_startup_seconds"
        if phase == "preemption":
            return "preemption_grace_seconds"
        hist = list(self._history.get(phase) or ())
        floor = ("hang_save_seconds" if phase in _LONG_PHASES else
                 "hang_startup_seconds (warm-up)" if len(hist) < _WARMUP else "hang_floor_seconds")
        if hist and cfg.hang_factor * max(hist) > self.bound(phase) - 1e-9 and cfg.hang_factor * max(hist) > 0:
            return f"hang_factor {cfg.hang_factor:g} x the longest of its last {len(hist)} ({max(hist):.3g}s)"
        return floor

    def _still_training(self) -> bool:
        """Is the training thread still inside `train()`? A phase left behind by a `train()` that
        raised before its loop (and wrote no postmortem) must not end a process that moved on."""
        frame = sys._current_frames().get(self._main_ident)
        while frame is not None:
            code = frame.f_code
            if code.co_name in ("train", "_inner_training_loop", "_finish_preempted") and (
                    "self_healing" in code.co_filename or "transformers" in code.co_filename
                    or "trl" in code.co_filename):
                return True
            frame = frame.f_back
        return False

    def _training_stack(self) -> list[str]:
        frame = sys._current_frames().get(self._main_ident)
        if frame is None:
            return []
        return [line.rstrip() for line in traceback.format_stack(frame)][-40:]

    def _dump(self, step: int, r: int, summary: str, stack: list[str]) -> Path | None:
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
                fr = _flight_recorder()
                if fr is None:
                    f.write("\nflight recorder: not available (no process group, or a torch without one)\n")
                else:
                    kind, data = fr
                    side = path.with_name(path.stem + (".flight-recorder.json" if kind == "json" else
                                                       ".flight-recorder.pkl"))
                    side.write_bytes(data)
                    f.write(f"\ntorch's flight recorder (the last collectives of every process group): {side.name}\n")
                    f.write(_flight_recorder_summary(kind, data))
            return path
        except OSError as exc:
            logger.error("self-healing: could not write the hang dump %s (%s); all threads' stacks go to stderr",
                         path, exc)
            try:
                faulthandler.dump_traceback(sys.stderr, all_threads=True)
            except Exception:  # noqa: BLE001
                pass
            return None

    # ------------------------------------------------------------------------------------------
    # goodput
    # ------------------------------------------------------------------------------------------
    def step_ended(self, step: int) -> None:
        """The optimizer step `step` ended (after `beat("after_step")`): where its time goes."""
        secs, self._step_time = self._step_time, 0.0
        if step <= self.recompute_until:
            self.lost["recomputed"] += secs
        elif self._step_skipped:
            self.lost["skipped"] += secs
        else:
            self._recent_steps.append([step, secs, False])
        self._step_skipped = False
        self._note_steps_lost()

    def step_failed(self) -> None:
        """An exception left the training loop: the step in progress is lost."""
        self.lost["failed"] += self._step_time
        self._step_time = 0.0
        self._step_skipped = False
        self._note_steps_lost()

    def _note_steps_lost(self) -> None:
        """Rolled-back steps (the callback's rollbacks, the orchestrator's resumes to a snapshot):
        the newest steps counted productive become lost."""
        n = int(self.cb.recorder.counters.get("steps_lost", 0) or 0)
        more, self._seen_steps_lost = n - self._seen_steps_lost, n
        for item in reversed(self._recent_steps):
            if more <= 0:
                break
            if not item[2]:
                item[2] = True
                self.lost["rolled_back"] += item[1]
                more -= 1

    def goodput(self) -> dict[str, Any]:
        """This launch's and the job's wall time by part (seconds), and goodput = productive / wall."""
        phase, since, _ = self._beat
        spent = dict(self._spent)
        if phase != _IDLE:
            spent[phase] = spent.get(phase, 0.0) + (time.monotonic() - since)
        hung = 0.0
        if self.tripped is not None:  # the stuck phase's time is the hang's
            hung = min(spent.get(self.tripped["phase"], 0.0), getattr(self, "_hang_spent", 0.0))
            spent[self.tripped["phase"]] = spent.get(self.tripped["phase"], 0.0) - hung
        parts = dict.fromkeys(GOODPUT_PARTS[:-2], 0.0)
        parts["hung"] = hung
        stepping = spent.pop("train_step", 0.0) + spent.pop("generation", 0.0)
        lost = sum(self.lost.values())
        parts["lost"] = min(lost, stepping)
        parts["productive"] = stepping - parts["lost"]
        for ph, s in spent.items():
            if ph == _IDLE:
                continue
            parts[_PHASE_PART.get(ph, "data_and_logging")] += s
        wall = sum(parts.values())
        launch = {"wall_seconds": _r(wall), "goodput": _ratio(parts["productive"], wall),
                  "seconds": {k: _r(v) for k, v in parts.items()},
                  "lost_seconds": {k: _r(v) for k, v in self.lost.items()},
                  "started": _r(self.started_wall), "ended": _r(self.started_wall + wall)}
        job_parts = {k: v for k, v in parts.items()}
        job_parts["between_launches"] = 0.0
        job_parts["unaccounted"] = 0.0
        launches, job_started = 1, self.started_wall
        base = self.job_base
        if base:
            for k, v in (base.get("seconds") or {}).items():
                if k in job_parts and isinstance(v, (int, float)) and math.isfinite(v):
                    job_parts[k] += float(v)
            job_parts["between_launches"] += max(0.0, self.started_wall - float(base.get("ended", self.started_wall)))
            job_parts["unaccounted"] += float(base.get("unaccounted_extra", 0.0))
            launches += int(base.get("launches", 1))
            job_started = float(base.get("started", job_started))
        jwall = sum(job_parts.values())
        job = {"wall_seconds": _r(jwall), "goodput": _ratio(job_parts["productive"], jwall),
               "seconds": {k: _r(v) for k, v in job_parts.items()}, "launches": launches,
               "started": _r(job_started), "ended": launch["ended"]}
        return {"launch": launch, "job": job}

    def load_job_base(self) -> None:
        """At train begin: when this launch resumes the previous one, the job so far (the previous
        postmortem's `goodput.job`, else a killed launch's last heartbeat file)."""
        resumed = self.cb.recorder.extra.get("resumed")
        if not resumed:
            return
        from .postmortem import load_postmortem

        t = self.cb.trainer
        prev_last = resumed.get("previous_last_step")
        if isinstance(prev_last, int):
            self.recompute_until = prev_last
        try:
            prev = load_postmortem(self.config.resolved_postmortem_path(t.args.output_dir))
        except ValueError:
            prev = {}
        job = (prev.get("goodput") or {}).get("job") if isinstance(prev.get("goodput"), dict) else None
        if isinstance(job, dict) and isinstance(job.get("seconds"), dict):
            self.job_base = job
            return
        hb = getattr(self, "_prev_heartbeat", None) or {}  # a launch killed without a postmortem of its own
        g = hb.get("goodput") if isinstance(hb.get("goodput"), dict) else None
        if g and isinstance(g.get("job"), dict):
            self.job_base = dict(g["job"])
            self.job_base["ended"] = hb.get("time", g["job"].get("ended"))
            return
        run_time = prev.get("running_time_seconds")
        if isinstance(run_time, (int, float)):  # no heartbeat file either: its time, unaccounted
            self.job_base = {"seconds": {}, "launches": 1, "unaccounted_extra": float(run_time),
                             "started": self.started_wall - float(run_time), "ended": self.started_wall}

    # ------------------------------------------------------------------------------------------
    # postmortem fields
    # ------------------------------------------------------------------------------------------
    def observe_rank_times(self, times: list[float], step: int) -> None:
        """Every rank's own step time, from the step's gather: name a persistent straggler."""
        for entry in self.stragglers.observe(times, step):
            t = getattr(self.cb, "trainer", None)
            try:
                hb = read_heartbeats(t.args.output_dir).get(entry["rank"]) if t is not None else None
            except Exception:  # noqa: BLE001
                hb = None
            entry["host"] = (hb or {}).get("host")
            msg = (f"rank {entry['rank']}" + (f" on {entry['host']}" if entry["host"] else "")
                   + f" is a straggler: its own step time (data wait + forward) is {entry['slower_by']}x the other "
                   f"ranks' median ({entry['own_seconds_per_step']:.3g}s vs {entry['others_median_seconds_per_step']:.3g}s) "
                   f"on each of the last {entry['steps']} steps; every rank waits for it at the all-reduce")
            logger.warning("self-healing: step %s: %s", step, msg)
            self._alert(f"straggler: rank {entry['rank']}", msg, "WARN", step)

    def _alert(self, title: str, text: str, level: str, step: int) -> None:
        """A trackio alert when the run reports there; an alert must never disturb the watchdog."""
        tracker = getattr(self.cb, "tracker", None)
        if tracker is not None:
            try:
                tracker._alert(title, text, level, step)
            except Exception:  # noqa: BLE001
                pass

    def take_own_seconds(self) -> float:
        """This rank's own (not waiting) time since the last call: one number per step for the gather."""
        own, self._own = self._own, 0.0
        return own

    def postmortem_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"goodput": self.goodput()}
        if self.stragglers.found:
            out["stragglers"] = self.stragglers.found[-20:]
        if self.hang_warnings:
            out["hang_warnings"] = self.hang_warnings[-20:]
        return out


STRAGGLER_WINDOW = 20
"""Steps a rank must be slower on, in a row, to be named a straggler."""
STRAGGLER_FACTOR = 1.5
"""How much slower than the median of the other ranks (its own time: data wait and forward)."""
STRAGGLER_MIN_SECONDS = 0.005
"""...and by at least this much per step (sub-millisecond noise on tiny steps is nobody's fault)."""


class Stragglers:
    """Each rank's own step time (data wait + forward, which no other rank can slow down) arrives
    every step in the gather that already carries the step's signals; a rank slower than the
    median of the others by `STRAGGLER_FACTOR` on `STRAGGLER_WINDOW` steps in a row is named
    (rank, host, how much slower) in the log, trackio and the postmortem. Every rank sees the same
    rows, so every rank reaches the same verdict without another collective."""

    def __init__(self) -> None:
        self.streak: dict[int, int] = {}
        self.sums: dict[int, list[float]] = {}
        self.named: set[int] = set()
        self.found: list[dict[str, Any]] = []

    def observe(self, times: list[float], step: int) -> list[dict[str, Any]]:
        new = []
        n = len(times)
        if n < 2:
            return new
        for r, t in enumerate(times):
            others = sorted(times[:r] + times[r + 1:])
            med = others[len(others) // 2] if len(others) % 2 else 0.5 * (others[len(others) // 2 - 1]
                                                                           + others[len(others) // 2])
            slow = t > STRAGGLER_FACTOR * med and t - med > STRAGGLER_MIN_SECONDS
            self.streak[r] = self.streak.get(r, 0) + 1 if slow else 0
            acc = self.sums.setdefault(r, [0.0, 0.0, 0])
            if slow:
                acc[0] += t
                acc[1] += med
                acc[2] += 1
            else:
                self.sums[r] = [0.0, 0.0, 0]
                self.named.discard(r)  # re-armed once it keeps up again
            if self.streak[r] >= STRAGGLER_WINDOW and r not in self.named:
                self.named.add(r)
                own, med_sum, k = self.sums[r]
                entry = {"rank": r, "step": step, "steps": k, "own_seconds_per_step": round(own / k, 4),
                         "others_median_seconds_per_step": round(med_sum / k, 4),
                         "slower_by": round(own / med_sum, 2) if med_sum > 0 else None}
                self.found.append(entry)
                new.append(entry)
        return new


_ORDER = {p: i for i, p in enumerate(("startup", "data_wait", "train_step", "generation", "after_step", "evaluation",
                                       "eval_step", "save"))}
_WHERE = {"": 0, "forward": 1, "backward": 2, "optimizer": 3}


def _ranks_behind(ranks: dict[str, dict[str, Any]]) -> list[str]:
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


def fast_state_info(path: Path | None) -> dict[str, Any] | None:
    """The postmortem's account of a fast resumable state: where, what it left out, what that means."""
    from .checkpoints import resume_info

    info = resume_info(path) if path is not None else None
    if info is None:
        return None
    out = {"path": str(path), "omitted": info["omitted"]}
    if "optimizer" in info["omitted"]:
        out["not_saved"] = ("the optimizer state (Adam's moments): the relaunch re-initialises it; weights, LR "
                            "schedule, RNG and data position resume exactly")
    return out


def _looks_like_peer_loss(error: BaseException) -> bool:
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


def _debugger_or_notebook(main_ident: int | None) -> str | None:
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


def _r(x: float) -> float:
    return round(float(x), 3)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None


def _flight_recorder() -> tuple[str, bytes] | None:
    """torch's flight recorder (the last collectives of every process group: NCCL, and gloo in
    recent torch) as ("json", bytes) or ("pickle", bytes); None without a process group or one."""
    try:
        import torch

        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        import torch._C._distributed_c10d as c10d

        if hasattr(c10d, "_dump_fr_trace_json"):
            return "json", c10d._dump_fr_trace_json()
        for name in ("_dump_fr_trace", "_dump_nccl_trace"):
            if hasattr(c10d, name):
                return "pickle", getattr(c10d, name)()
    except Exception:  # noqa: BLE001 - a dump that fails must not stop the hang report
        return None
    return None


def _flight_recorder_summary(kind: str, data: bytes) -> str:
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


# ------------------------------------------------------------------------------------------------
# the Trainer side: phase changes from hooks, the watchdog's Trainer callback
# ------------------------------------------------------------------------------------------------
class PreemptedInEvaluation(BaseException):
    """Raised from a prediction step when a preemption signal arrived during an evaluation: its
    metrics are not needed to save. A `BaseException`, so no user `except Exception` swallows it;
    the orchestrator catches it, checkpoints, writes the postmortem and exits."""


class WatchdogHooks:
    """Feeds the watchdog from Trainer events and from wrappers the plugin installs on the trainer
    instance; warns at train begin about settings that hide hangs; acts on a preemption signal in
    the middle of an evaluation or right after a save."""

    def __init__(self, callback: Any) -> None:
        self.cb = callback
        self.watchdog = Watchdog(callback)
        self._eval_steps = 0
        self._eval_len: int | None = None
        self._phase_before_eval = "after_step"
        self._warned_long_run = False
        self._warn_at = 10

    # --- wrappers --------------------------------------------------------------------------------
    def install(self) -> None:
        cb, t = self.cb, self.cb.trainer
        wd = self.watchdog

        def around(name: str, phase: str, after: str | None = None, on_error: str | None = None,
                   keep: bool = False, fresh: tuple[str, ...] = ()) -> None:
            """`phase` while `name` runs; then `after` (default: the phase before), or with `keep` the
            same phase runs on (a save's `on_save` callbacks, which upload or copy it, belong to it);
            `fresh`: phases whose history starts over (the first batch after a resume skips the
            data already seen)."""
            if not compat.present(t, name):  # a Trainer internal every supported version has is warned about
                return

            def factory(orig):
                def wrapped(*args, **kwargs):
                    if wd.phase == _IDLE or cb.passthrough:
                        return orig(*args, **kwargs)
                    before = wd.phase
                    wd.beat(phase)
                    for f in fresh:
                        wd._history.pop(f, None)
                    try:
                        out = orig(*args, **kwargs)
                    except BaseException as exc:
                        if on_error is not None and not isinstance(exc, PreemptedInEvaluation):
                            wd.loop_failed(exc)  # a peer's hang, seen here as a failed collective
                            wd.beat(on_error)  # closes the step in progress first: its time is lost
                            wd.step_failed()
                        raise
                    if wd.phase != _IDLE and not keep:
                        wd.beat(after or before)
                    return out

                return wrapped

            cb.wrap(name, factory)  # on the callback's own wrapper, if any (detach drops both)

        around("get_batch_samples", "data_wait", after="train_step")
        around("evaluate", "evaluation")
        around("_save_checkpoint", "save", keep=True)
        around("_load_best_model", "save", keep=True)
        around("_inner_training_loop", "startup", after="finishing", on_error="recovery", fresh=("data_wait",))
        for gen in ("_generate_and_score_completions", "_generate"):
            if hasattr(t, gen):
                around(gen, "generation", after="train_step")
                break
        if hasattr(t, "_load_optimizer_and_scheduler") and not cb.is_wrapped("_load_optimizer_and_scheduler"):
            cb.wrap("_load_optimizer_and_scheduler", self._load_with_fast_state)

    def _load_with_fast_state(self, orig):
        """A resume from a fast state without the optimizer state: the Trainer then loads neither it nor
        the scheduler; the scheduler is loaded here (the optimizer starts afresh, said once)."""
        from .checkpoints import restore_scheduler_without_optimizer

        def _load_optimizer_and_scheduler(checkpoint, *args, **kwargs):
            out = orig(checkpoint, *args, **kwargs)
            if not self.cb.passthrough and restore_scheduler_without_optimizer(self.cb.trainer, checkpoint):
                logger.warning("self-healing: %s is a fast resumable state written at a preemption without the "
                               "optimizer state: the LR schedule, RNG and data position resume exactly; the "
                               "optimizer's moments start afresh", checkpoint)
            return out

        return _load_optimizer_and_scheduler

    # --- observer API of SelfHealingCallback --------------------------------------------------------
    def on_step(self, step: int, signals: Any, info: dict[str, Any]) -> None:
        if info.get("skipped"):
            self.watchdog._step_skipped = True

    def on_finish(self, postmortem: dict[str, Any]) -> None:
        self.watchdog.stop()

    # --- Trainer callback ------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        wd = self.watchdog
        if wd.phase == _IDLE:  # a bare callback without the orchestrator's start_run
            wd.start_run()
        try:
            wd.load_job_base()
        except Exception as exc:  # noqa: BLE001
            logger.warning("self-healing: could not read the previous launch's goodput (%s)", exc)
        self._warn_hidden_hangs(args, state)
        self._warn_at = state.global_step + 10  # once 10 steps have shown the step time
        return control

    def on_step_end(self, args, state, control, **kwargs):
        wd = self.watchdog
        if wd.phase == _IDLE:
            return control
        wd.beat("after_step", state.global_step)
        wd.step_ended(state.global_step)
        if self.cb.preempted_at == state.global_step and control.should_save:
            self._fast_state_first(state, control)
        if not self._warned_long_run and state.global_step == self._warn_at:
            self._warned_long_run = True
            self._warn_no_checkpoints(args, state)
        return control

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        wd = self.watchdog
        cb = self.cb
        if wd.phase == _IDLE:
            return control
        if wd.phase == "evaluation" and self._eval_steps == 0:
            try:
                self._eval_len = len(eval_dataloader) if eval_dataloader is not None else None
            except TypeError:
                self._eval_len = None
        self._eval_steps += 1
        last = self._eval_len is not None and self._eval_steps >= self._eval_len
        wd.beat("evaluation" if last else "eval_step")
        if last:
            self._eval_steps = 0
        if cb.orchestrator_active and cb.trainer is not None and getattr(cb.trainer, "is_in_train", False):
            self._maybe_abort_evaluation(state, control)
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        self._eval_steps = 0
        return control

    def on_save(self, args, state, control, **kwargs):
        """A signal that arrived during (or just before) this save: the checkpoint just written is
        the preemption checkpoint; stop now instead of running one more step and saving again."""
        cb = self.cb
        from .distributed import is_distributed

        if (cb.preempt_signal and cb.preempted_at is None and not is_distributed()
                and cb.orchestrator_active and not cb.gave_up):
            cb.preempt_now(state.global_step, control, cb.preempt_signal)
            control.should_save = False  # written already
        return control

    def on_train_end(self, args, state, control, **kwargs):
        return control

    # --- preemption: the fastest resumable state first -------------------------------------------------
    def _fast_state_first(self, state, control) -> None:
        """The step is done and the Trainer is about to checkpoint for a preemption: when the run's
        own save time says that checkpoint will not fit in the grace left, write the fastest state a
        relaunch can resume from first (`write_resume_checkpoint`'s `deadline`), then let the
        Trainer's full checkpoint go ahead only if there is still time for it."""
        from .checkpoints import fast_state_possible, too_late, verify_checkpoint, write_resume_checkpoint
        from .distributed import agree_max, rank

        wd, t = self.watchdog, self.cb.trainer
        deadline, full = wd.save_plan()
        main = rank() == 0

        def too_long() -> float:
            return 1.0 if main and too_late(deadline, full) else 0.0

        if not fast_state_possible(t) or not agree_max(too_long()):
            return
        logger.warning("self-healing: preemption: a checkpoint takes ~%.1fs here (this run's saves), more than the "
                       "%.1fs of grace left: writing the fastest resumable state of step %s first", full,
                       deadline - time.monotonic(), state.global_step)
        wd.beat("preemption", state.global_step)
        try:
            path = write_resume_checkpoint(t, state.global_step, deadline=deadline)
            ok, why = verify_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - the Trainer's own checkpoint is still attempted
            logger.error("self-healing: the fast resumable state could not be written (%s: %s)", type(exc).__name__,
                         exc)
            ok = False
        wd.beat("after_step", state.global_step)
        if not ok:
            return
        info = fast_state_info(path) or {}
        logger.warning("self-healing: fast resumable state %s written and verified%s", path,
                       f" (left out: {', '.join(info['omitted'])})" if info.get("omitted") else "")
        if agree_max(too_long()):
            control.should_save = False
            logger.warning("self-healing: the full checkpoint is skipped: ~%.1fs, %.1fs of grace left", full,
                           deadline - time.monotonic())

    # --- preemption during evaluation ----------------------------------------------------------------
    def _maybe_abort_evaluation(self, state, control) -> None:
        from .distributed import agree_max, is_distributed

        cb = self.cb
        flag = float(cb.preempt_signal or 0)
        if is_distributed():  # every rank leaves the evaluation at the same prediction step
            flag = agree_max(flag)
        if not flag or cb.preempted_at is not None:
            return
        cb.preempt_signal = cb.preempt_signal or int(flag)
        cb.preempt_now(state.global_step, control, int(flag))
        cb.recorder.extra["evaluation_aborted"] = True
        self._eval_steps = 0
        self.watchdog.beat("preemption")
        raise PreemptedInEvaluation(f"preemption signal during the evaluation at step {state.global_step}")

    # --- warnings at train begin --------------------------------------------------------------------
    def _warn_hidden_hangs(self, args, state) -> None:
        timeout = getattr(args, "ddp_timeout", None)
        if isinstance(timeout, (int, float)) and timeout > 3600 and int(getattr(args, "world_size", 1) or 1) > 1:
            logger.warning("self-healing: ddp_timeout=%ss: a rank stuck in a collective keeps every GPU idle for "
                           "%.1f h before torch gives up%s", timeout, timeout / 3600,
                           "; the plugin's watchdog still ends a hung process at its phase bound"
                           if self.cb.config.hang_detection else
                           " (and hang_detection is off: nothing else will notice)")
        if not self.cb.config.hang_detection:
            logger.info("self-healing: hang_detection is off: a hang outside a collective (dataloader, save) is "
                        "never detected")

    def _warn_no_checkpoints(self, args, state) -> None:
        if str(getattr(args, "save_strategy", "no")).lower().endswith("no"):
            times = list(self.watchdog._history.get("train_step") or ())
            if not times or not state.max_steps:
                return
            per = sorted(times)[len(times) // 2]
            left = per * max(state.max_steps - state.global_step, 0)
            if left > 3600:
                logger.warning("self-healing: save_strategy='no' on a run of about %.1f more hours (%s steps at "
                               "%.2fs): a hang, a preemption or a crash has no checkpoint to resume from; set "
                               "save_strategy='steps' with save_steps", left / 3600,
                               state.max_steps - state.global_step, per)


_callback_class: type | None = None


def make_watchdog(callback: Any) -> Any:
    """The watchdog's Trainer callback (a `WatchdogHooks` and a `transformers.TrainerCallback`) for
    an attached `SelfHealingCallback`: registers it as an observer, a Trainer callback, and its
    wrappers on the trainer instance. `.watchdog` is the `Watchdog`."""
    global _callback_class
    if _callback_class is None:
        from transformers import TrainerCallback

        _callback_class = type("WatchdogCallback", (WatchdogHooks, TrainerCallback),
                               {"__module__": __name__, "__doc__": WatchdogHooks.__doc__})
    hooks = _callback_class(callback)
    hooks.install()
    callback.observers.append(hooks)
    callback.trainer.add_callback(hooks)
    return hooks


__all__ = ["Watchdog", "WatchdogHooks", "make_watchdog", "PreemptedInEvaluation", "HANG_EXIT_CODE",
           "read_heartbeats", "heartbeat_path", "GOODPUT_PARTS"]
