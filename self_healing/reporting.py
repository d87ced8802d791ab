"""The engine's record: the one place events leave it (postmortem recorder, then observers, then
the log) and the postmortem at the end of a run. Used through `self_healing.engine.Healer`.
"""

from __future__ import annotations

import logging
from typing import Any

from .diagnosis import Diagnosis

logger = logging.getLogger("self_healing")


class Reporter:
    """Events and the postmortem of a `Healer` (`healer`: its recorder, observers, policy)."""

    def __init__(self, healer: Any) -> None:
        self.healer = healer

    def emit(self, step: int, diag: Diagnosis, actions: list[str], details: dict[str, Any] | None = None,
             reason: str = "", *, level: int = logging.WARNING, message: str | None = None) -> dict[str, Any]:
        """The one place events leave the engine: the postmortem record, then every observer, then
        the log (`message` replaces the standard line; "" logs nothing)."""
        h = self.healer
        event = h.recorder.record(step, diag, actions, details or {}, reason)
        h.notify("on_event", event)
        if message is None:
            message = (f"self-healing: step {step}: {diag.summary} -> {', '.join(actions) or 'observed'}"
                       + (f" ({reason})" if reason else ""))
        if message:
            logger.log(level, "%s", message)
        return event

    def notify(self, method: str, *args: Any) -> None:
        for o in self.healer.observers:
            fn = getattr(o, method, None)
            if fn is not None:
                try:
                    fn(*args)
                except Exception as exc:  # noqa: BLE001 - an observer must never kill the run
                    logger.warning("self-healing: observer %s.%s failed: %s", type(o).__name__, method, exc)

    def build_postmortem(self, exit_reason: str, *, last_step: int, max_steps: int | None = None,
                         exception: BaseException | None = None, trainer_class: str | None = None,
                         extra: dict[str, Any] | None = None) -> dict[str, Any]:
        h = self.healer
        more: dict[str, Any] = {"lr_scale": h.policy.lr_scale, "recovery_attempts": h.policy.total_attempts,
                                "snapshot_interval": h.snapshot_interval}
        if h.give_up_reason:
            more["give_up_reason"] = h.give_up_reason
        if h.zclip is not None:
            more["zclip"] = h.zclip.summary()
        if extra:
            more.update(extra)
        return h.recorder.build(exit_reason, last_step=last_step, max_steps=max_steps, exception=exception,
                                trainer_class=trainer_class, extra=more)

    def write_postmortem(self, pm: dict[str, Any], write: bool = True) -> None:
        """Write `pm` under `output_dir` (unless `write` is False: a rank that does not save) and
        tell the observers the run is over."""
        h = self.healer
        if write and h.output_dir is not None:
            h.recorder.write(h.config.resolved_postmortem_path(h.output_dir), pm)
        h.notify("on_finish", pm)


__all__ = ["Reporter"]
