"""The plugin's parts beside the callback, each an observer of the engine and a Trainer callback
of its own: trainer-aware monitors (chosen by the trainer's type), the trackio dashboard, the crash
journal, the hang and goodput watchdog, and the opt-in early-warning signals. They are built from
the callback (they read its engine and trainer), so `SelfHealingCallback` only wires them in."""

from __future__ import annotations

from typing import Any

from .journal import make_journal_callback
from .monitors import monitors_for
from .tracking import make_tracker
from .watchdog import make_watchdog


class PluginParts:
    """Builds, renews (a fresh `train()`) and removes the parts; the callback exposes each under
    its old name (`cb.monitors`, `cb.tracker`, `cb.journal`, `cb.watchdog`, `cb.early_warning`)."""

    def __init__(self) -> None:
        self.monitors: list[Any] = []
        """Trainer-aware monitors: optional `on_log(step, logs)` / `on_evaluate(step, metrics)`
        returning a list of `Diagnosis` to act on."""
        self.tracker: Any = None
        """The trackio tracker when the Trainer reports to trackio (`self_healing.tracking`)."""
        self.journal: Any = None
        """The crash journal (`self_healing.journal`): every decision on disk as it happens."""
        self.watchdog: Any = None
        """Hangs and goodput (`self_healing.watchdog`): its hooks; `.watchdog` the heartbeat and thread."""
        self.early_warning: Any = None
        """The early-warning signals (`self_healing.early_warning`); None while they are off."""

    def attach(self, callback: Any, trainer: Any, kind: str) -> None:
        """Build every part for `trainer` and add it to the trainer's callbacks and the engine's observers."""
        self.monitors = monitors_for(kind, callback.config, trainer.args)
        self.tracker = make_tracker(callback, trainer.args)
        if self.tracker is not None:
            callback.observers.append(self.tracker)
            trainer.add_callback(self.tracker)  # after TrackioCallback: its hooks align the step axis
        self.journal = make_journal_callback(callback)
        callback.observers.append(self.journal)
        trainer.add_callback(self.journal)
        self.watchdog = make_watchdog(callback)  # hangs, goodput, preemption mid-evaluation
        from .early_warning import attach_early_warning  # nothing is attached while off

        self.early_warning = attach_early_warning(callback)

    def start_run(self, callback: Any, trainer: Any, kind: str | None) -> None:
        """A fresh `train()`: new monitors and early-warning state, the watchdog's clocks anew."""
        self.monitors = monitors_for(kind, callback.config, trainer.args)
        if self.early_warning is not None:
            from .early_warning import attach_early_warning

            trainer.remove_callback(self.early_warning)
            callback.observers.remove(self.early_warning)
            self.early_warning = attach_early_warning(callback)
        if self.watchdog is not None:  # new clocks, phase "startup", the watchdog thread running
            self.watchdog.watchdog.start_run()

    def trainer_callbacks(self) -> list[Any]:
        """The parts on the trainer's callback list, in the order detach takes them off."""
        return [self.tracker, self.journal, self.early_warning, self.watchdog]

    def postmortem_fields(self) -> dict[str, Any]:
        """The watchdog's fields, and the monitors' INFO findings that changed nothing (a GRPO
        task solved), kept for the record."""
        more: dict[str, Any] = {}
        if self.watchdog is not None:
            more.update(self.watchdog.watchdog.postmortem_fields())
        notes = [n for m in self.monitors for n in getattr(m, "notes", [])]
        if notes:
            more["notes"] = notes
        return more
