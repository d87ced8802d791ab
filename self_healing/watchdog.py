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
`WARMUP` durations of every step-like phase (compilation, cache warm-up), `hang_save_seconds`
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

import logging
import os
import threading
import time
from typing import Any

from . import compat
from .facade import forwarded
from .goodput import GOODPUT_PARTS, Goodput
from .grace import PreemptionGrace, fast_state_info
from .compat import TRAINER_INNER_LOOP, TRAINER_LOAD_BEST_MODEL, TRAINER_LOAD_OPTIMIZER, TRAINER_SAVE_CHECKPOINT, \
    TRL_GENERATION
from .hangs import HANG_EXIT_CODE, HangDetector, heartbeat_path, read_heartbeats
from .phases import IDLE, PhaseClock

logger = logging.getLogger("self_healing")


class Watchdog:
    """One per `SelfHealingCallback` (per process). `beat(phase)` is the training thread's whole
    cost; everything else runs on the watchdog thread or at the run's edges.

    A facade over its parts, each with one concern: `clock` (the phases, their history and bounds),
    `hangs` (heartbeat files, the hang report and exit), `preemption` (the grace after a signal) and
    `accounting` (goodput, stragglers). It owns the two threads and what they run."""

    def __init__(self, callback: Any) -> None:
        self.cb = callback
        self.config = callback.config
        self.exit = os._exit  # tests replace it; the parts call it through here
        self.clock = PhaseClock(callback)
        self.beat = self.clock.beat  # the training thread's per-phase call, without a delegation hop
        self.hangs = HangDetector(callback, self.clock, exit=lambda code: self.exit(code), alert=self._alert,
                                  goodput=lambda: self.goodput())
        self.preemption = PreemptionGrace(callback, self.clock, self.hangs, exit=lambda code: self.exit(code))
        self.accounting = Goodput(callback, self.clock, self.hangs, alert=self._alert)
        self._thread: threading.Thread | None = None
        self._hb_thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- what the rest of the plugin reads and writes here ------------------------------------------
    def beat(self, phase: str, step: int | None = None) -> None:  # replaced in __init__ by clock.beat
        """Enter `phase` now (the same phase again restarts its clock)."""
        self.clock.beat(phase, step)

    @property
    def phase(self) -> str:
        return self.clock.current[0]

    where = forwarded("clock", "where", "Inside a train step: forward, backward or optimizer.")
    started_wall = forwarded("clock", "started_wall", "This launch's start (time.time()).")
    started_mono = forwarded("clock", "started_mono", "This launch's start (time.monotonic()).")
    tripped = forwarded("hangs", "tripped", "The hang (or grace overrun) this process ends with.")
    hang_warnings = forwarded("hangs", "hang_warnings", "Hangs reported with on_hang='warn'.")
    hung_marker = forwarded("hangs", "hung_marker", "Written into the heartbeat file before a hang's exit.")
    preempt_time = forwarded("preemption", "preempt_time", "time.monotonic() of the preemption signal.")
    grace_estimate = forwarded("preemption", "grace_estimate", "The step's rest and a save, estimated at the signal.")
    lost = forwarded("accounting", "lost", "Seconds of lost steps by cause.")
    recompute_until = forwarded("accounting", "recompute_until", "Steps up to here redo the previous launch's.")
    job_base = forwarded("accounting", "job_base", "The job's goodput before this launch.")
    stragglers = forwarded("accounting", "stragglers", "The straggler detector.")

    def bound(self, phase: str) -> float:
        return self.clock.bound(phase)

    def save_plan(self) -> tuple[float | None, float | None]:
        return self.preemption.save_plan()

    def on_preempt_signal(self) -> None:
        self.preemption.on_preempt_signal()

    def write_heartbeat(self) -> None:
        self.hangs.write_heartbeat()

    def loop_failed(self, error: BaseException) -> None:
        self.hangs.loop_failed(error)

    def mark_step_skipped(self) -> None:
        self.accounting.mark_step_skipped()

    def step_ended(self, step: int) -> None:
        self.accounting.step_ended(step)

    def step_failed(self) -> None:
        self.accounting.step_failed()

    def goodput(self) -> dict[str, Any]:
        return self.accounting.goodput()

    def load_job_base(self) -> None:
        self.accounting.load_job_base()

    def observe_rank_times(self, times: list[float], step: int) -> None:
        self.accounting.observe_rank_times(times, step)

    def take_own_seconds(self) -> float:
        """This rank's own (not waiting) time since the last call: one number per step for the gather."""
        return self.clock.take_own()

    def postmortem_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"goodput": self.goodput()}
        if self.stragglers.found:
            out["stragglers"] = self.stragglers.found[-20:]
        if self.hang_warnings:
            out["hang_warnings"] = self.hang_warnings[-20:]
        return out

    # --- lifecycle ------------------------------------------------------------------------------------
    def start_run(self) -> None:
        """A fresh `train()`: new clocks, phase `startup`, the threads running (when enabled)."""
        self.clock.reset()
        self.hangs.reset()  # train() may run in a thread of its own: that thread is the one watched
        self.accounting.reset()
        self.preemption.reset()
        self.hangs.reset_report()
        self.clock.start("startup")
        self.accounting.remember_previous_heartbeat()  # before ours replaces it
        self._stop.set()  # the threads of an earlier train() end at their next wake-up
        self._stop = stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(stop,), name="self-healing-watchdog", daemon=True)
        self._thread.start()  # hangs when hang_detection is on; the preemption grace always
        self._hb_thread = threading.Thread(target=self.hangs.heartbeat_files, args=(stop,),
                                           name="self-healing-heartbeat", daemon=True)
        self._hb_thread.start()
        self.clock.add_step_hooks()

    def stop(self) -> None:
        """Back to idle: nothing is watched (the threads end at their next wake-up)."""
        self.beat(IDLE)
        self._stop.set()
        self.clock.remove_step_hooks()

    def _watch(self, stop: threading.Event) -> None:
        """The watchdog thread: the preemption grace first (once a signal came), else the phase bound."""
        clock, hangs, grace = self.clock, self.hangs, self.preemption
        while not stop.is_set():
            phase, since, step = beat = clock.current
            pt = grace.preempt_time
            if pt is not None and phase != IDLE:
                grace.check_once(beat, pt)
            if pt is not None and phase != IDLE and hangs.tripped is None and \
                    time.monotonic() - pt > self.config.preemption_grace_seconds:
                try:
                    grace.on_grace_exceeded(beat, time.monotonic() - pt)
                except Exception as exc:  # noqa: BLE001
                    logger.warning("self-healing: watchdog check failed (%s: %s)", type(exc).__name__, exc)
            elif self.config.hang_detection and phase != IDLE and beat is not hangs.warned_beat:
                try:
                    b = clock.bound(phase)
                    waited = time.monotonic() - since
                    if waited > b:
                        if hangs.still_training():
                            hangs.on_hang(beat, waited, b)
                        else:  # train() left without a postmortem (an error before training began): stale
                            self.stop()
                except Exception as exc:  # noqa: BLE001 - the watchdog must never take the run down by mistake
                    logger.warning("self-healing: watchdog check failed (%s: %s)", type(exc).__name__, exc)
            stop.wait(self.config.hang_poll_seconds)

    def _alert(self, title: str, text: str, level: str, step: int) -> None:
        """A trackio alert when the run reports there; an alert must never disturb the watchdog."""
        tracker = getattr(self.cb, "tracker", None)
        if tracker is not None:
            try:
                tracker.alert(title, text, level, step)
            except Exception:  # noqa: BLE001
                pass


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

            clock, patches = wd.clock, cb.patches  # read directly: a batch fetch passes here every step

            def factory(orig):
                def wrapped(*args, **kwargs):
                    before = clock.current[0]
                    if before == IDLE or patches.passthrough:
                        return orig(*args, **kwargs)
                    wd.beat(phase)
                    for f in fresh:
                        clock.forget(f)
                    try:
                        out = orig(*args, **kwargs)
                    except BaseException as exc:
                        if on_error is not None and not isinstance(exc, PreemptedInEvaluation):
                            wd.loop_failed(exc)  # a peer's hang, seen here as a failed collective
                            wd.beat(on_error)  # closes the step in progress first: its time is lost
                            wd.step_failed()
                        raise
                    if not keep and clock.current[0] != IDLE:
                        wd.beat(after or before)
                    return out

                return wrapped

            cb.wrap(name, factory)  # on the callback's own wrapper, if any (detach drops both)

        around("get_batch_samples", "data_wait", after="train_step")
        around("evaluate", "evaluation")
        around(TRAINER_SAVE_CHECKPOINT, "save", keep=True)
        around(TRAINER_LOAD_BEST_MODEL, "save", keep=True)
        around(TRAINER_INNER_LOOP, "startup", after="finishing", on_error="recovery", fresh=("data_wait",))
        for gen in TRL_GENERATION:
            if hasattr(t, gen):
                around(gen, "generation", after="train_step")
                break
        if hasattr(t, TRAINER_LOAD_OPTIMIZER) and not cb.is_wrapped(TRAINER_LOAD_OPTIMIZER):
            cb.wrap(TRAINER_LOAD_OPTIMIZER, self._load_with_fast_state)

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
            self.watchdog.mark_step_skipped()

    def on_finish(self, postmortem: dict[str, Any]) -> None:
        self.watchdog.stop()

    # --- Trainer callback ------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        wd = self.watchdog
        if wd.phase == IDLE:  # a bare callback without the orchestrator's start_run
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
        if wd.phase == IDLE:
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
        if wd.phase == IDLE:
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
            times = list(self.watchdog.clock.history.get("train_step") or ())
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
