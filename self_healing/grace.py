"""The preemption grace: from a preemption signal to the SIGKILL that follows it.

Its own class because a preemption is not a hang: the clock starts at the signal, not at a phase,
and what matters is whether a checkpoint fits in the time left (said at once, from this run's own
timings), and, when it did not, leaving a postmortem and the fast resumable state before the kill."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .hangs import HangDetector
from .phases import PhaseClock, rank_info

logger = logging.getLogger("self_healing")


class PreemptionGrace:
    """When the signal came, what a save takes here, whether the rest of the step and a checkpoint
    fit in `preemption_grace_seconds`, and the exit when the grace runs out first."""

    def __init__(self, callback: Any, clock: PhaseClock, hangs: HangDetector, exit: Callable[[int], Any]) -> None:
        self.cb = callback
        self.config = callback.config
        self.clock = clock
        self.hangs = hangs
        self._exit = exit  # the watchdog's `exit`, looked up at the call (tests replace it)
        self.preempt_time: float | None = None
        self.grace_estimate: dict[str, Any] | None = None
        self._checked = False

    def reset(self) -> None:
        self.preempt_time = None
        self._checked, self.grace_estimate = False, None

    def on_preempt_signal(self) -> None:
        """Called from the signal handler: the grace starts now."""
        if self.preempt_time is None:
            self.preempt_time = time.monotonic()

    def save_plan(self) -> tuple[float | None, float | None]:
        """At a preemption: (the `time.monotonic()` by which its checkpoint must be on disk, what a
        save takes here in seconds): the grace less a reserve for the postmortem and the exit, and
        the longest of this launch's last 8 saves (None before the first one, or without a signal)."""
        if self.preempt_time is None:
            return None, None
        grace = float(self.config.preemption_grace_seconds)
        saves = list(self.clock.history.get("save") or ())[-8:]
        return self.preempt_time + grace - min(2.0, 0.1 * grace), (max(saves) if saves else None)

    def check_once(self, beat: tuple[str, float, int], signal_time: float) -> None:
        """The watchdog thread's first wake-up after the signal: `check_grace_fits`, once per signal."""
        if self._checked:
            return
        self._checked = True
        try:
            self.check_grace_fits(beat, signal_time)
        except Exception:  # noqa: BLE001
            pass

    def check_grace_fits(self, beat: tuple[str, float, int], signal_time: float) -> None:
        """Right after a preemption signal: will the phase in progress plus a checkpoint fit in the
        grace? Said at once (from the run's own timings), so a too-short grace is not a surprise."""
        phase, since, _step = beat

        def typical(ph: str) -> float | None:
            h = sorted(self.clock.history.get(ph) or ())
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

    def on_grace_exceeded(self, beat: tuple[str, float, int], since_signal: float) -> None:
        """The preemption grace ran out before the checkpoint and exit: say so (stacks, postmortem)
        and exit now, before the SIGKILL that is coming would leave nothing."""
        import signal as _signal

        phase, _since, step = beat
        t = self.cb.trainer
        sig = self.cb.preempt_signal or _signal.SIGTERM
        name = _signal.Signals(sig).name
        r, _world = rank_info(t)
        summary = (f"{name} {since_signal:.1f}s ago and no checkpoint yet (preemption_grace_seconds="
                   f"{self.config.preemption_grace_seconds:g}): still in {phase} at step {step}")
        stack = self.hangs.training_stack()
        path = self.hangs.dump(step, r, summary, stack)
        self.hangs.trip({"phase": phase, "step": step}, 0.0)
        fast = self.fast_state()
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
        self._exit(128 + int(sig))

    def fast_state(self) -> Path | None:
        """The verified fast resumable state of the preemption in progress, if one was written."""
        from .checkpoints import PLUGIN_DIR, resume_info, verify_checkpoint

        at = getattr(self.cb, "preempted_at", None)
        t = getattr(self.cb, "trainer", None)
        if at is None or t is None:
            return None
        p = Path(t.args.output_dir) / PLUGIN_DIR / f"resume-step-{at}"
        return p if resume_info(p) is not None and verify_checkpoint(p, check_finite=False)[0] else None


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
