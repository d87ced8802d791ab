"""The engine's snapshot management: what a snapshot carries besides the weights, taking one,
sizing the interval between them, and putting the plugin's own statistics back with the weights.
Used through `self_healing.engine.Healer`.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

from .detectors import StateReport
from .distributed import agree_max
from .snapshot import interval_on_ladder


class SnapshotKeeper:
    """Snapshots of a `Healer`'s live state (`healer`: its ring, monitor, policy, ZClip, recorder)."""

    def __init__(self, healer: Any) -> None:
        self.healer = healer

    def due(self, step: int) -> tuple[bool, bool]:
        """(the integrity pass, a snapshot) due after the update of `step`: periodic, not per-step work."""
        h = self.healer
        return step % h.config.integrity_check_every_steps == 0, step % h.snapshot_interval == 0

    def snapshot_extra(self) -> dict[str, Any]:
        h = self.healer
        extra: dict[str, Any] = {"monitor": h.monitor.state_dict(), "policy": h.policy.state_dict()}
        if h.extra_state is not None:
            extra.update(h.extra_state())
        if h.zclip is not None:
            extra["zclip"] = h.zclip.state_dict()
        return extra

    def capture(self, step: int, report: StateReport) -> Any:
        h = self.healer
        cfg = h.config
        if cfg.snapshot_spill_dir and h.ring.spill_dir is None and h.output_dir is not None:
            h.ring.spill_dir = Path(h.output_dir) / cfg.snapshot_spill_dir
        t0 = time.perf_counter()
        snap = h.ring.capture(h.model, h.optimizer, h.scheduler, step, h.snapshot_extra(), report)
        h.recorder.counters["snapshots"] += 1
        h.notify("on_snapshot", step, snap)
        if cfg.snapshot_every_steps == "auto":
            # everything this snapshot cost: the copy (on CUDA the device copy, once one has been
            # timed), the plugin state, the observers (the journal), and the integrity pass that
            # vouches for it when that pass was not due anyway
            cost = time.perf_counter() - t0 - snap.alloc_seconds  # a new buffer is a one-off
            if snap.events is not None:  # CUDA: the host only queued the copy
                cost += h.ring.last_copy_seconds
            if not self.due(step)[0]:
                cost += getattr(report, "seconds", 0.0) or 0.0
            h.tune_snapshot_interval(cost)
        return snap

    def tune_snapshot_interval(self, copy_seconds: float) -> None:
        """Pick the interval that keeps snapshot cost under `snapshot_budget` of step time, on a
        ladder of the integrity-check interval times 2**k (`snapshot.interval_on_ladder`): a noisy
        cost estimate cannot make snapshots bunch up, and they share the integrity pass."""
        h = self.healer
        if len(h.step_times) < 3:
            return
        step_time = statistics.median(h.step_times)
        if step_time <= 0:
            return
        need = math.ceil(copy_seconds / (h.config.snapshot_budget * step_time))
        interval = interval_on_ladder(need, h.config.integrity_check_every_steps)
        # every rank must snapshot (and gather its integrity check) at the same steps
        h.snapshot_interval = int(agree_max(interval))

    def restore_plugin_state(self, snap: Any) -> None:
        """The detectors' and ZClip's statistics go back with the weights they describe."""
        h = self.healer
        if "monitor" in snap.extra:
            h.monitor.load_state_dict(snap.extra["monitor"])
        h.monitor.reset_trend()
        if h.zclip is not None and "zclip" in snap.extra:
            h.zclip.load_state_dict(snap.extra["zclip"])
        h.ref_report = snap.report


__all__ = ["SnapshotKeeper"]
