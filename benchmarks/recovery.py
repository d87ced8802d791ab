"""What a fault costs: in-memory rollback against a resume from disk.

    python benchmarks/recovery.py                       # ~3M model, 7 faults
    python benchmarks/recovery.py --size 25M --faults nan_loss grad_scale nan_weight

Each fault is injected once, for one step, at step `--fault-step` (36), into two runs of the same
SFT model:

- **in-memory**: `SelfHealingTrainer` as shipped, snapshots every `--interval` (10) steps in host
  memory. It skips the step or copies the last verified snapshot back in place and the same
  `train()` call goes on.
- **disk resume**: the same detection, but the run restarts from the newest verified Trainer
  checkpoint (`save_steps` = the same interval), the way a run without in-memory snapshots must:
  `train()` stops and is entered again with `resume_from_checkpoint=` (which also restores the
  data position, RNG, scheduler and optimizer).

Columns: **lost** is the work thrown away, in optimizer steps: updates discarded by a rollback, or
steps computed again after a disk resume. **recovery** is the wall time from the moment the fault is
detected to the start of the first healthy step after it (the faulty step's own compute and the
healthy step's compute are the same in both modes and left out). **+ recompute** adds, for the disk
resume, the time to compute the lost steps again (back at the fault's step number). The speed-up
is disk recovery / in-memory recovery. Targets: >= 10x, and lost <= the snapshot interval.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FAULTS = ["nan_loss", "nan_grad", "grad_scale", "nan_weight", "weight_scale", "zero_exp_avg_sq", "lr_scale"]
REQUIRED = ("nan_loss", "grad_scale", "nan_weight")  # the targets: NaN loss, explosion, corruption
SPEEDUP_TARGET = 10.0


class Timeline:
    """Wall-clock times of each step's begin/end, per `train()` call, and of each detection."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        outer = self
        self.begins: list[tuple[int, float]] = []  # (step about to run, time)
        self.ends: list[tuple[int, float]] = []
        self.detections: list[tuple[int, float]] = []
        self.stop_requested: int | None = None
        self.resume_call = 0

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                outer.begins.append((state.global_step + 1, time.perf_counter()))
                return control

            def on_step_end(self, args, state, control, **kw):
                outer.ends.append((state.global_step, time.perf_counter()))
                return control

        self.callback = _CB()

    def step_times(self) -> list[float]:
        b = dict(self.begins)
        return [t - b[s] for s, t in self.ends if s in b]


def watch_detections(cb: Any, tl: Timeline, disk: bool) -> None:
    """Note when the plugin's detectors fire. In disk mode, what happens next is a restart from disk:
    the update is dropped (as the plugin always does before it is applied) and training stops."""
    from self_healing.diagnosis import Diagnosis, FailureKind
    from self_healing.engine import Decision
    from self_healing.healing import skip_update

    engine = cb.engine
    orig = engine.handle

    def handle(detections, step, before_update, exception=None):
        tl.detections.append((step, time.perf_counter()))
        if not disk:
            return orig(detections, step, before_update, exception=exception)
        if before_update:
            skip_update(cb.model)
        tl.stop_requested = step
        return Decision(step, Diagnosis(FailureKind.UNKNOWN, "disk mode: restart from the last checkpoint"), (),
                        skipped=before_update, stop=True)  # the callback stops the Trainer

    engine.handle = handle


def run(size: str, fault: str, mode: str, fault_step: int, interval: int, tmp: str, extra_steps: int) -> dict:
    from self_healing import HealingConfig, SelfHealingCallback, SelfHealingTrainer
    from self_healing.checkpoints import latest_verified_checkpoint
    from self_healing.faults import Fault, inject_faults

    out = f"{tmp}/{fault}-{mode}"
    steps = fault_step + extra_steps
    disk = mode == "disk"
    overrides: dict[str, Any] = {"save_strategy": "steps", "save_steps": interval} if disk else {}
    tr = C.build(size, out, max_steps=steps, **overrides)
    tl = Timeline()
    tr.add_callback(tl.callback)
    injector = inject_faults(tr, Fault(fault, step=fault_step))  # one step; lr_scale too (a one-step LR spike)
    cfg = HealingConfig(snapshot_every_steps=interval if not disk else 10**6)
    if not disk:
        sh = SelfHealingTrainer(tr, cfg)
        watch_detections(sh.callback, tl, disk=False)
        sh.train()
        cb = sh.callback
        resumed_from = None
    else:
        cb = SelfHealingCallback(cfg).attach(tr)
        watch_detections(cb, tl, disk=True)
        tr.train()
        resumed_from = None
        if tl.stop_requested is not None:
            ckpt, _ = latest_verified_checkpoint(out)
            resumed_from = int(ckpt.name.split("-")[-1]) if ckpt else 0
            tl.resume_call = len(tl.begins)
            injector.faults = []  # a transient fault: it does not come back when the steps are computed again
            tr.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if not tl.detections:
        return dict(fault=fault, mode=mode, detected=False)
    det_step, t_det = tl.detections[0]
    events = cb.recorder.events
    row: dict[str, Any] = dict(fault=fault, mode=mode, detected=True, det_step=det_step,
                               step_ms=1000 * C.median(tl.step_times()))
    if not disk:
        row["failure"] = _distinct(e.get("failure", "?") for e in events)
        row["action"] = _distinct(a for e in events for a in e.get("actions", []))
        row["lost"] = cb.recorder.counters.get("steps_lost", 0)
        # the first step to begin after the last intervention (a state corruption may first show as
        # a gradient spike and be rolled back at the next integrity check: all of it is recovery)
        last = max(e["step"] for e in events) if events else det_step
        first = next(((s, t) for s, t in tl.begins if t > t_det and s > last), None)
        row["recovery"] = first[1] - t_det if first else float("nan")
        row["recompute"] = row["recovery"]
        row["ok"] = sh.exit_reason == "completed"
        row["final_step"] = tr.state.global_step
    else:
        row["failure"] = "?"
        row["action"] = f"restart from checkpoint-{resumed_from}"
        row["lost"] = det_step - 1 - (resumed_from or 0)
        resumed = tl.begins[tl.resume_call:]
        row["recovery"] = resumed[0][1] - t_det if resumed else float("nan")
        back = next((t for s, t in resumed if s >= det_step), None)
        row["recompute"] = back - t_det if back else float("nan")
        row["ok"] = tr.state.global_step == steps
        row["final_step"] = tr.state.global_step
    row["interval"] = interval
    return row


def _distinct(items) -> str:
    out: list[str] = []
    for x in items:
        if x not in out:
            out.append(x)
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="3M", choices=list(C.SIZES))
    p.add_argument("--faults", nargs="+", default=FAULTS, choices=FAULTS)
    p.add_argument("--fault-step", type=int, default=36)
    p.add_argument("--interval", type=int, default=10, help="snapshot interval = checkpoint interval (steps)")
    p.add_argument("--extra-steps", type=int, default=4, help="steps run after the fault")
    a = p.parse_args(argv)
    C.quiet()
    C.single_thread()
    print(f"# recovery: {C.device_name()}, model {a.size}, fault at step {a.fault_step}, snapshots/checkpoints "
          f"every {a.interval} steps, {C.load_average()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sh-recovery-") as tmp:
        for fault in a.faults:
            pair = {mode: run(a.size, fault, mode, a.fault_step, a.interval, tmp, a.extra_steps)
                    for mode in ("memory", "disk")}
            rows.append(pair)
            m, d = pair["memory"], pair["disk"]
            print(f"# {fault}: memory {m.get('recovery', float('nan')):.3f}s, disk {d.get('recovery', float('nan')):.3f}s",
                  flush=True)
    table_rows = []
    ok = True
    for pair in rows:
        m, d = pair["memory"], pair["disk"]
        if not (m["detected"] and d["detected"]):
            table_rows.append([m["fault"], "not detected"] + [""] * 8)
            ok &= m["fault"] not in REQUIRED
            continue
        speedup = d["recovery"] / m["recovery"] if m["recovery"] > 0 else float("inf")
        speedup_all = d["recompute"] / m["recompute"] if m["recompute"] > 0 else float("inf")
        good = speedup >= SPEEDUP_TARGET and m["lost"] <= m["interval"] and m["ok"] and d["ok"]
        if m["fault"] in REQUIRED:
            ok &= good
        table_rows.append([m["fault"], m["failure"], m["action"], m["lost"], f"{1000 * m['recovery']:.1f}",
                           d["lost"], f"{1000 * d['recovery']:.0f}", f"{1000 * d['recompute']:.0f}",
                           f"{speedup:.0f}x", f"{speedup_all:.0f}x"])
    print(C.table(["fault", "detected as", "in-memory action", "lost", "recovery ms", "disk: lost",
                   "recovery ms", "+ recompute ms", "speed-up", "speed-up incl. recompute"], table_rows))
    step_ms = C.median([pair["memory"].get("step_ms", float("nan")) for pair in rows])
    print(f"# median step {step_ms:.0f} ms; lost work target <= {a.interval} steps; speed-up target >= "
          f"{SPEEDUP_TARGET:.0f}x for {', '.join(REQUIRED)}: {'ok' if ok else 'NOT MET'}; {C.load_average()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
