"""Goodput: where a launch's (and the job's, across relaunches) wall time went, and which rank is
a persistent straggler.

Both read the phase clock that the hang watchdog already keeps (`self_healing.phases`), so the
accounting costs the training thread nothing more than the heartbeat; kept apart from hang
detection because it answers another question (was the time well spent?, not: is it stuck?)."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any, Callable

from .hangs import HangDetector, read_heartbeats
from .phases import IDLE, PhaseClock

logger = logging.getLogger("self_healing")

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

PHASE_PART = {"startup": "startup", "data_wait": "data_and_logging", "after_step": "data_and_logging",
              "evaluation": "evaluation", "eval_step": "evaluation", "save": "checkpointing",
              "recovery": "recovery", "finishing": "finishing", "preemption": "preemption"}


class Goodput:
    """Productive step time over wall time, with the badput split by cause (`GOODPUT_PARTS`), for
    this launch and the job so far; and the stragglers named from each step's gathered timings."""

    def __init__(self, callback: Any, clock: PhaseClock, hangs: HangDetector,
                 alert: Callable[[str, str, str, int], None]) -> None:
        self.cb = callback
        self.config = callback.config
        self.clock = clock
        self.hangs = hangs
        self._alert = alert
        self._step_skipped = False
        self._recent_steps: deque[list[Any]] = deque(maxlen=4096)
        """[step, seconds, lost?] of recent finished steps (a rollback moves them to lost)."""
        self.lost = {"skipped": 0.0, "rolled_back": 0.0, "failed": 0.0, "recomputed": 0.0}
        self._seen_steps_lost = 0
        self.recompute_until = -1
        self.job_base: dict[str, Any] | None = None
        self.stragglers = Stragglers()
        self._prev_heartbeat: dict[str, Any] | None = None

    def reset(self) -> None:
        """A fresh `train()`: nothing counted yet."""
        self._step_skipped = False
        self._recent_steps.clear()
        self.lost = dict.fromkeys(self.lost, 0.0)
        self._seen_steps_lost = 0
        self.recompute_until = -1
        self.job_base = None
        self.stragglers = Stragglers()

    def remember_previous_heartbeat(self) -> None:
        """A killed launch's last word on its goodput, read before this launch's file replaces it."""
        self._prev_heartbeat = None
        t = getattr(self.cb, "trainer", None)
        if t is not None:
            try:
                self._prev_heartbeat = read_heartbeats(t.args.output_dir).get(0)
            except Exception:  # noqa: BLE001
                pass

    # --- steps ----------------------------------------------------------------------------------------
    def mark_step_skipped(self) -> None:
        """The step in progress was skipped (its update thrown away): its time is lost."""
        self._step_skipped = True

    def step_ended(self, step: int) -> None:
        """The optimizer step `step` ended (after `beat("after_step")`): where its time goes."""
        secs = self.clock.take_step_time()
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
        self.lost["failed"] += self.clock.take_step_time()
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

    # --- the account ----------------------------------------------------------------------------------
    def goodput(self) -> dict[str, Any]:
        """This launch's and the job's wall time by part (seconds), and goodput = productive / wall."""
        phase, since, _ = self.clock.current
        spent = dict(self.clock.spent)
        if phase != IDLE:
            spent[phase] = spent.get(phase, 0.0) + (time.monotonic() - since)
        hung = 0.0
        tripped = self.hangs.tripped
        if tripped is not None:  # the stuck phase's time is the hang's
            hung = min(spent.get(tripped["phase"], 0.0), self.hangs.hang_spent)
            spent[tripped["phase"]] = spent.get(tripped["phase"], 0.0) - hung
        parts = dict.fromkeys(GOODPUT_PARTS[:-2], 0.0)
        parts["hung"] = hung
        stepping = spent.pop("train_step", 0.0) + spent.pop("generation", 0.0)
        lost = sum(self.lost.values())
        parts["lost"] = min(lost, stepping)
        parts["productive"] = stepping - parts["lost"]
        for ph, s in spent.items():
            if ph == IDLE:
                continue
            parts[PHASE_PART.get(ph, "data_and_logging")] += s
        wall = sum(parts.values())
        started_wall = self.clock.started_wall
        launch = {"wall_seconds": _r(wall), "goodput": _ratio(parts["productive"], wall),
                  "seconds": {k: _r(v) for k, v in parts.items()},
                  "lost_seconds": {k: _r(v) for k, v in self.lost.items()},
                  "started": _r(started_wall), "ended": _r(started_wall + wall)}
        job_parts = {k: v for k, v in parts.items()}
        job_parts["between_launches"] = 0.0
        job_parts["unaccounted"] = 0.0
        launches, job_started = 1, started_wall
        base = self.job_base
        if base:
            for k, v in (base.get("seconds") or {}).items():
                if k in job_parts and isinstance(v, (int, float)) and math.isfinite(v):
                    job_parts[k] += float(v)
            job_parts["between_launches"] += max(0.0, started_wall - float(base.get("ended", started_wall)))
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
        hb = self._prev_heartbeat or {}  # a launch killed without a postmortem of its own
        g = hb.get("goodput") if isinstance(hb.get("goodput"), dict) else None
        if g and isinstance(g.get("job"), dict):
            self.job_base = dict(g["job"])
            self.job_base["ended"] = hb.get("time", g["job"].get("ended"))
            return
        run_time = prev.get("running_time_seconds")
        if isinstance(run_time, (int, float)):  # no heartbeat file either: its time, unaccounted
            started_wall = self.clock.started_wall
            self.job_base = {"seconds": {}, "launches": 1, "unaccounted_extra": float(run_time),
                             "started": started_wall - float(run_time), "ended": started_wall}

    # --- stragglers -----------------------------------------------------------------------------------
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


def _r(x: float) -> float:
    return round(float(x), 3)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None
