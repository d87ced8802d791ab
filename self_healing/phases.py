"""The phase clock: the training thread's heartbeat and the per-phase history every watchdog bound
comes from (see `self_healing.watchdog` for the phases and how they are bounded).

Kept apart from what reads it (hang detection, the preemption grace, goodput) so that the training
thread's whole cost stays in one small object: `beat` is a tuple assignment and a few dict updates,
no lock; the watchdog thread only ever reads `current`, which is replaced whole, never mutated."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

PHASES = ("startup", "data_wait", "train_step", "generation", "after_step", "evaluation", "eval_step", "save",
          "recovery", "finishing", "preemption")
STEP_PHASES = ("data_wait", "train_step", "generation", "after_step", "eval_step")
"""Phases bounded by `hang_floor_seconds` (after warm-up) and their own history."""
LONG_PHASES = ("save", "recovery", "finishing", "evaluation")
"""Phases bounded by `hang_save_seconds`: I/O and one-off work of unpredictable length."""
WARMUP = 3
"""Durations a step-like phase needs before its floor drops from `hang_startup_seconds`."""
HISTORY = 64
"""Durations kept per phase: the bound follows the run's recent behaviour, not its whole past."""
IDLE = "idle"
"""The phase outside `train()`: nothing is watched."""


def rank_info(trainer: Any) -> tuple[int, int]:
    """(rank, world size): from torch.distributed, else the trainer's arguments (a rank must still
    name its own files when the process group is gone)."""
    from .distributed import rank, world_size

    try:
        return rank(), world_size()
    except Exception:  # noqa: BLE001
        return int(getattr(trainer.args, "process_index", 0) or 0), int(getattr(trainer.args, "world_size", 1) or 1)


class PhaseClock:
    """The current phase, the time spent in each and their recent durations, written only by the
    training thread; read by the watchdog's hang bounds, the preemption grace and goodput."""

    def __init__(self, callback: Any) -> None:
        self.cb = callback
        self.config = callback.config
        self.current: tuple[str, float, int] = (IDLE, time.monotonic(), 0)
        """(phase, monotonic time it began, trainer step): replaced whole, never mutated."""
        self.spent: dict[str, float] = {}
        self.history: dict[str, deque[float]] = {}
        self.started_wall = time.time()
        self.started_mono = time.monotonic()
        self.step_time = 0.0
        """Train-step time of the step in progress (phases train_step + generation)."""
        self.own = 0.0
        """This rank's own time in the step so far, none of it spent waiting for other ranks: its
        data wait and its forward passes (DDP's all-reduce starts in backward). Gathered each step
        with the step's signals for straggler detection."""
        self.where = ""
        """Inside a train step: "forward", "backward" (DDP's gradient all-reduce runs there) or
        "optimizer"; a plain attribute write from a forward pre-hook and around `accelerator.backward`,
        read only by the heartbeat file, so a hung rank can be told from the ranks waiting for it."""
        self._fwd_t: float | None = None
        self._hooks: list[Any] = []

    # --- the training thread: microseconds ----------------------------------------------------------
    def beat(self, phase: str, step: int | None = None) -> None:
        """Enter `phase` now (the same phase again restarts its clock)."""
        now = time.monotonic()
        prev = self.current
        d = now - prev[1]
        last = prev[0]
        self.spent[last] = self.spent.get(last, 0.0) + d
        if last == "train_step" or last == "generation":
            self.step_time += d
        elif last == "data_wait":
            self.own += d
        h = self.history.get(last)
        if h is None:
            h = self.history[last] = deque(maxlen=HISTORY)
        h.append(d)
        if step is None:
            st = getattr(getattr(self.cb, "trainer", None), "state", None)
            step = getattr(st, "global_step", prev[2]) if st is not None else prev[2]
        self.current = (phase, now, step)
        self.where = ""

    @property
    def phase(self) -> str:
        return self.current[0]

    def take_step_time(self) -> float:
        """The train-step time of the step in progress, which starts over at zero."""
        secs, self.step_time = self.step_time, 0.0
        return secs

    def take_own(self) -> float:
        """This rank's own (not waiting) time since the last call, which starts over at zero."""
        own, self.own = self.own, 0.0
        return own

    def forget(self, phase: str) -> None:
        """`phase`'s history starts over (the first batch after a resume skips the data already seen)."""
        self.history.pop(phase, None)

    # --- a fresh train() ------------------------------------------------------------------------------
    def reset(self) -> None:
        """New clocks; the phase itself is set by `start` (the old one still runs until then)."""
        self.spent = {}
        self.history = {}
        self.started_wall, self.started_mono = time.time(), time.monotonic()
        self.step_time = 0.0
        self.own, self._fwd_t = 0.0, None

    def start(self, phase: str) -> None:
        """Enter `phase` at the launch's start time, with nothing accounted to the phase before."""
        self.current = (phase, self.started_mono, 0)

    # --- bounds ---------------------------------------------------------------------------------------
    def bound(self, phase: str) -> float:
        """Seconds `phase` may last: fixed by the config, else the run's own history over a floor."""
        cfg = self.config
        fixed = (cfg.hang_phase_seconds or {}).get(phase)
        if fixed is not None:
            return float(fixed)
        if phase == "startup":
            return float(cfg.hang_startup_seconds)
        if phase == "preemption":
            return float(cfg.preemption_grace_seconds)
        try:
            hist = list(self.history.get(phase) or ())
        except RuntimeError:  # mutated while copied (only under free-threading)
            hist = []
        if phase in LONG_PHASES:
            floor = float(cfg.hang_save_seconds)
        elif len(hist) < WARMUP:
            floor = float(cfg.hang_startup_seconds)
        else:
            floor = float(cfg.hang_floor_seconds)
        return max(floor, cfg.hang_factor * max(hist)) if hist else floor

    def bound_reason(self, phase: str) -> str:
        """Which setting (or the history) made `bound(phase)`, for the hang report."""
        cfg = self.config
        if (cfg.hang_phase_seconds or {}).get(phase) is not None:
            return f"hang_phase_seconds[{phase!r}]"
        if phase == "startup":
            return "hang_startup_seconds"
        if phase == "preemption":
            return "preemption_grace_seconds"
        hist = list(self.history.get(phase) or ())
        floor = ("hang_save_seconds" if phase in LONG_PHASES else
                 "hang_startup_seconds (warm-up)" if len(hist) < WARMUP else "hang_floor_seconds")
        if hist and cfg.hang_factor * max(hist) > self.bound(phase) - 1e-9 and cfg.hang_factor * max(hist) > 0:
            return f"hang_factor {cfg.hang_factor:g} x the longest of its last {len(hist)} ({max(hist):.3g}s)"
        return floor

    # --- where in the step (several processes) ------------------------------------------------------
    def add_step_hooks(self) -> None:
        """Under several processes: where in the step this rank is (forward, backward, optimizer)."""
        self.remove_step_hooks()
        t = getattr(self.cb, "trainer", None)
        if t is None or rank_info(t)[1] <= 1:
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
                    self.own += time.monotonic() - self._fwd_t
                    self._fwd_t = None
                out = orig(*args, **kwargs)
                self.where = "optimizer"
                return out

            acc.backward = backward
            self._hooks.append(lambda: acc.__dict__.pop("backward", None))
        except Exception:  # noqa: BLE001 - a finer heartbeat is a nicety
            pass

    def remove_step_hooks(self) -> None:
        for h in self._hooks:
            try:
                h.remove() if hasattr(h, "remove") else h()
            except Exception:  # noqa: BLE001
                pass
        self._hooks = []
