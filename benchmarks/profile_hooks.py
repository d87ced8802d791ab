"""Where the plugin's time goes: every hook and periodic job of a protected run, timed.

    python benchmarks/profile_hooks.py                       # ~3M model, default preset, 300 steps
    python benchmarks/profile_hooks.py --size 25M --preset aggressive --steps 60

Wraps the callback's Trainer hooks and its periodic work (integrity pass, snapshot copy, the
observers such as the crash journal) with timers, runs a clean training, and prints the time per
call and per step, and the share of the median step. A sampling profiler gives the same picture
from outside (see benchmarks/README.md for the py-spy command).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="3M", choices=list(C.SIZES))
    p.add_argument("--preset", default="default")
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args(argv)
    C.quiet()
    C.single_thread()
    from transformers import TrainerCallback

    from self_healing import HealingConfig, SelfHealingTrainer

    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    depth = [0]
    order: list[str] = []

    def timed(obj, name: str, label: str) -> None:
        orig = getattr(obj, name)
        order.append(label)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            depth[0] += 1
            try:
                return orig(*args, **kwargs)
            finally:
                depth[0] -= 1
                totals[label] += time.perf_counter() - t0
                calls[label] += 1

        setattr(obj, name, wrapper)

    step_times: list[float] = []

    class StepClock(TrainerCallback):
        t0 = None

        def on_step_begin(self, args, state, control, **kw):
            now = time.perf_counter()
            if self.t0 is not None:
                step_times.append(now - self.t0)
            self.t0 = now
            return control

    with tempfile.TemporaryDirectory(prefix="sh-profile-") as tmp:
        tr = C.build(a.size, tmp, max_steps=a.steps)
        tr.add_callback(StepClock())
        sh = SelfHealingTrainer(tr, getattr(HealingConfig, a.preset)())
        cb = sh.callback
        timed(cb, "on_step_begin", "callback.on_step_begin")
        timed(cb, "on_pre_optimizer_step", "callback.on_pre_optimizer_step")
        timed(cb.preemption, "step_signals", "  step_signals (the step's one host sync)")  # what the callback calls
        timed(cb, "on_step_end", "callback.on_step_end")
        timed(cb.engine, "check_state", "  check_state (integrity pass)")
        timed(cb.engine, "capture", "  capture (snapshot)")
        timed(cb.ring, "capture", "    ring.capture (copy)")
        order.append("      of which: new buffers (once per ring slot)")
        timed(cb.engine, "notify", "  observers (notify, inside the hooks above)")
        timed(cb, "on_log", "callback.on_log")
        orig_capture = cb.ring.capture

        def capture(*args, **kwargs):
            snap = orig_capture(*args, **kwargs)
            if snap.alloc_seconds:
                totals["      of which: new buffers (once per ring slot)"] += snap.alloc_seconds
                calls["      of which: new buffers (once per ring slot)"] += 1
            return snap

        cb.ring.capture = capture
        for other in tr.callback_handler.callbacks:  # the plugin's other callbacks (the crash journal...)
            if other is cb or not type(other).__module__.startswith("self_healing"):
                continue
            for hook in ("on_step_begin", "on_pre_optimizer_step", "on_step_end", "on_log"):
                if getattr(type(other), hook) is not getattr(TrainerCallback, hook):
                    timed(other, hook, f"{type(other).__name__}.{hook}")
        sh.train()
    n = len(step_times)
    step = C.median(step_times[5:]) if n > 10 else float("nan")
    rows = []
    for label in [k for k in order if k in totals]:
        per_step = totals[label] / max(a.steps, 1)
        rows.append([label, calls[label], f"{1000 * totals[label] / calls[label]:.3f}", f"{1e6 * per_step:.0f}",
                     f"{100 * per_step / step:.3f}%"])
    print(f"# {a.size} model ({C.fmt_params(C.n_params(tr.model))}), preset {a.preset}, {a.steps} steps, median step "
          f"{1000 * step:.1f} ms, snapshot every {cb.snapshot_interval} steps, {C.load_average()}")
    print(C.table(["what", "calls", "ms per call", "us per step (amortized)", "of a step"], rows))
    top = sum(v for k, v in totals.items() if not k.startswith(" ")) / max(a.steps, 1)  # outermost rows
    once = totals.get("      of which: new buffers (once per ring slot)", 0.0) / max(a.steps, 1)
    print(f"(indented rows are inside the row above them) plugin in all: {100 * top / step:.2f}% of a step, "
          f"{100 * (top - once) / step:.2f}% without the one-off buffer allocations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
