"""A preemption signal ends the run at one step boundary on every rank, with a checkpoint.

The signal handler only raises a flag (`signal`); the flag travels in the step's one gather (beside
each rank's own step time, which names a persistent straggler), the largest one wins, and the
step that carried it checkpoints and stops. Without agreement one rank would stop while the others
wait for it in a collective."""

from __future__ import annotations

import signal as signals_module
from typing import Any

from .detectors import StepSignals
from .diagnosis import Action, Diagnosis, FailureKind
from .distributed import is_distributed


class PreemptionAgreement:
    """This rank's preemption flag, the one the ranks agreed on, and the step the run stopped at."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.signal: int | None = None
        """The signal this rank received (or learnt from another rank), None without one."""
        self.at: int | None = None
        """The step the run checkpointed and stopped at."""
        self.agreed = 0
        """The signal every rank acts on after this step (0: none)."""

    def reset(self) -> None:
        self.signal = self.at = None
        self.agreed = 0

    def step_signals(self, step: int, loss: Any, grad_norm: Any, exception: BaseException | None,
                     watchdog: Any) -> StepSignals:
        """The step's facts, through the engine's one host sync (one gather when distributed,
        which also carries this rank's preemption flag and its own step time for stragglers)."""
        if not is_distributed():
            self.agreed = self.signal or 0
            return self.engine.step_signals(step, loss, grad_norm, exception, distributed=False)
        own = watchdog.watchdog.take_own_seconds() if watchdog is not None else 0.0  # stragglers
        out = self.engine.step_signals(step, loss, grad_norm, exception, extra=[float(self.signal or 0), own],
                                       distributed=True)
        rows = self.engine.rank_rows
        if watchdog is not None:  # each rank's own step time: a persistent straggler is named
            watchdog.watchdog.observe_rank_times([r[4] for r in rows], step)
        self.agreed = max(int(r[3]) for r in rows)
        if self.agreed and self.signal is None:
            self.signal = self.agreed
        return out

    @property
    def due(self) -> bool:
        """The ranks agreed on a signal and the run has not stopped for it yet."""
        return bool(self.agreed) and self.at is None

    def act(self, step: int, control: Any, signum: int | None = None) -> None:
        """The step is done: ask the Trainer to checkpoint now and stop (it saves whatever its
        save_strategy, "no" included). `signum`: a signal agreed outside the step's gather."""
        if signum is not None:
            self.agreed = int(signum)
        self.at = step
        control.should_save = True
        control.should_training_stop = True
        name = signals_module.Signals(self.agreed or self.signal).name
        diag = Diagnosis(FailureKind.INTERRUPTED, f"{name} received: finished step {step}, checkpointing and exiting "
                         "(run the same command again to resume)", {"signal": name}, [Action.CHECKPOINT], step)
        self.engine.emit(step, diag, [Action.CHECKPOINT.value], message=f"self-healing: {diag.summary}")
