"""Per-step cost of `SelfHealingTrainer` on a clean run, against the bare trainer.

    python benchmarks/overhead.py                    # ~3M and ~25M models, default and aggressive presets
    python benchmarks/overhead.py --sizes 3M --steps 300
    python benchmarks/overhead.py --sizes 3M --presets none default   # with an A/A check of the method

The bare trainer and one protected trainer per preset train the same model from the same seed on
the same data, in one process, taking turns one optimizer step at a time (benchmarks/_common.py
says why, and why the process runs with MALLOC_ARENA_MAX=1). The run is split in rounds, each
with a different trainer in the main thread. The headline is the median over steps of
protected/bare time of the same step (target: <= 1.02 for the default preset). What comes every N
steps (integrity passes, snapshots) lands on one step in N, which the median does not see: it is
timed directly and added ("amortized"). The total-time ratio carries it too, along with every
stall of either run, and is the noisiest column.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.platform.startswith("linux") and not os.environ.get("MALLOC_ARENA_MAX"):
    os.environ["MALLOC_ARENA_MAX"] = "1"  # one malloc arena for every thread: see benchmarks/_common.py
    os.execv(sys.executable, [sys.executable] + sys.argv)

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEFAULT_STEPS = {"tiny": 150, "3M": 240, "25M": 120}
TARGET = 1.02


class Periodic:
    """Seconds spent in the work that comes every N steps (integrity passes, snapshots), from step 1
    on, and apart from it the one-off allocation of each ring slot's buffer. The median of per-step
    ratios does not see periodic work (it lands on one step in N) and the total-time ratio sees it
    buried in noise; timed directly, it is exact."""

    def __init__(self, cb) -> None:
        self.seconds = 0.0
        self.alloc_seconds = 0.0
        for name in ("check_state", "capture"):  # the engine's: every caller (callback, early warning) goes there
            setattr(cb.engine, name, self._timed(cb, getattr(cb.engine, name)))

    def _timed(self, cb, orig):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = orig(*args, **kwargs)
            if cb.trainer.state.global_step >= 1:
                alloc = getattr(out, "alloc_seconds", 0.0) or 0.0
                self.seconds += time.perf_counter() - t0 - alloc
                self.alloc_seconds += alloc
            return out

        return timed


def one_round(size: str, names: list[str], main: str, steps: int, kind: str) -> tuple[C.Turns, dict, int, float]:
    from self_healing import HealingConfig, SelfHealingTrainer

    turns = C.Turns(names)
    runners, protected = {}, {}
    n = 0
    with tempfile.TemporaryDirectory(prefix="sh-overhead-") as tmp:
        for name in names:
            tr = C.build(size, f"{tmp}/{name}", max_steps=steps + 1, kind=kind)
            turn = C.TurnCallback(turns, name)
            tr.add_callback(turn)
            n = C.n_params(tr.model)
            if name in ("bare", "none"):  # "none": a second bare trainer, the A/A check of the method
                runners[name] = tr.train
            else:
                sh = SelfHealingTrainer(tr, getattr(HealingConfig, name)())
                turn.feed_step_times_to(sh.callback)
                sh.periodic = Periodic(sh.callback)
                protected[name] = sh
                runners[name] = sh.train
        t0 = time.perf_counter()
        errors = C.run_interleaved(turns, runners, main=main)
        wall = time.perf_counter() - t0
    if errors:
        raise next(iter(errors.values()))
    return turns, protected, n, wall


def measure(size: str, presets: list[str], steps: int, warmup: int, kind: str, rounds: int) -> list[dict]:
    names = ["bare"] + presets
    per_round = max(steps // rounds, warmup + 5)
    ratios = {p: [] for p in presets}
    prot_t = {p: [] for p in presets}
    bare_t: list[float] = []
    sums = {p: [0.0, 0.0] for p in presets}
    periodic = {p: [0.0, 0.0, 0.0] for p in presets}  # seconds of periodic work, of bare steps, of allocations
    info: dict[str, dict] = {}
    wall = 0.0
    n = 0
    for r in range(rounds):
        main = names[(r + 1) % len(names)]  # the first round has the default preset in the main thread
        turns, protected, n, w = one_round(size, names, main, per_round, kind)
        wall += w
        bare = turns.times["bare"]
        bare_t += bare[warmup:]
        for p in presets:
            prot = turns.times[p]
            ratios[p] += C.paired_ratios(prot, bare, warmup)
            prot_t[p] += prot[warmup:]
            k = min(len(prot), len(bare))
            sums[p][0] += sum(prot[warmup:k])
            sums[p][1] += sum(bare[warmup:k])
            sh = protected.get(p)
            if sh is not None:
                periodic[p][0] += sh.periodic.seconds
                periodic[p][1] += sum(bare[:len(prot)])
                periodic[p][2] += sh.periodic.alloc_seconds
                cb = sh.callback
                d = info.setdefault(p, {"interval": cb.snapshot_interval, "copies": [], "events": 0})
                d["copies"] += [s.copy_seconds for s in cb.ring.snapshots]
                d["events"] += len(cb.recorder.events) + (sh.exit_reason != "completed")
    rows = []
    for p in presets:
        lo, hi = C.ci95_of_median(ratios[p])
        d = info.get(p, {})
        copies = d.get("copies") or []
        rows.append(dict(model=size, params=C.fmt_params(n), preset=p, steps=len(ratios[p]),
                         bare_ms=1000 * C.median(bare_t), prot_ms=1000 * C.median(prot_t[p]),
                         ratio=C.median(ratios[p]), lo=lo, hi=hi, total=sums[p][0] / sums[p][1],
                         periodic=periodic[p][0] / periodic[p][1] if periodic[p][1] else 0.0,
                         alloc_ms=1000 * periodic[p][2] / rounds,
                         interval=d.get("interval", "-"),
                         copy_ms=1000 * sum(copies) / len(copies) if copies else "-",
                         events=d.get("events", 0), wall=wall))
    return rows


def heartbeat_cost(steps: int = 200_000) -> float:
    """Microseconds per optimizer step of the watchdog's work on the training thread: the phase
    changes of one step (data wait, train step, between steps) and the step's goodput bookkeeping,
    timed directly (a ratio of step times cannot resolve a microsecond)."""
    from types import SimpleNamespace

    from self_healing.config import HealingConfig
    from self_healing.watchdog import Watchdog

    state = SimpleNamespace(global_step=0)
    cb = SimpleNamespace(config=HealingConfig(), trainer=SimpleNamespace(state=state),
                         recorder=SimpleNamespace(counters={"steps_lost": 0}, extra={}))
    wd = Watchdog(cb)
    wd.clock.current = ("after_step", time.monotonic(), 0)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        wd.beat("data_wait")
        wd.beat("train_step")
        state.global_step = i
        wd.beat("after_step", i)
        wd.step_ended(i)
    return (time.perf_counter() - t0) / steps * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["3M", "25M"], choices=list(C.SIZES))
    p.add_argument("--presets", nargs="+", default=["default", "aggressive"],
                   help="HealingConfig presets to time; 'none' is a second bare trainer (A/A check of the method)")
    p.add_argument("--steps", type=int, help="timed steps per trainer, all rounds together "
                                             "(default: 240 for 3M, 120 for 25M)")
    p.add_argument("--rounds", type=int, help="rounds, each with another trainer in the main thread "
                                              "(default: one per trainer)")
    p.add_argument("--warmup", type=int, default=8, help="first steps of each round left out of the statistics")
    p.add_argument("--kind", default="sft", help="trainer kind from self_healing.tiny (default: sft)")
    a = p.parse_args(argv)
    C.quiet()
    C.single_thread()
    print(f"# overhead: {C.device_name()}, MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX')}, "
          f"{C.load_average()}", flush=True)
    rows = []
    for size in a.sizes:
        steps = a.steps or DEFAULT_STEPS[size]
        rows += measure(size, a.presets, steps, a.warmup, a.kind, a.rounds or len(a.presets) + 1)
        print(f"# {size}: {rows[-1]['wall']:.0f}s, {C.load_average()}", flush=True)
    headers = ["model", "params", "preset", "steps", "bare ms/step", "protected ms/step",
               "ratio (median of pairs)", "95% CI", "+ periodic work", "= amortized", "ratio (total time)",
               "snapshot every", "copy ms", "one-off ms"]
    print(C.table(headers, [[r["model"], r["params"], r["preset"], r["steps"], r["bare_ms"], r["prot_ms"],
                             f"{r['ratio']:.3f}", f"{r['lo']:.3f}-{r['hi']:.3f}", f"{100 * r['periodic']:.2f}%",
                             f"{r['ratio'] + r['periodic']:.3f}", f"{r['total']:.3f}",
                             r["interval"], r["copy_ms"], f"{r['alloc_ms']:.0f}"] for r in rows]))
    print("(periodic work: integrity passes and snapshots, timed directly, over the bare steps' time; one-off: "
          "allocating the snapshot ring's buffers, per run, once per slot, not in the ratios; the total-time "
          "ratio carries both, with every stall of either run, over short rounds)")
    per_step_us = heartbeat_cost()
    for r in rows:
        if r["preset"] == "default":
            bare = float(r["bare_ms"])
            print(f"heartbeat (self_healing.watchdog, inside the protected time above): {per_step_us:.2f} us per "
                  f"optimizer step = {100 * per_step_us / 1000 / bare:.4f}% of the {bare:.1f} ms bare step of "
                  f"{r['model']} (target < 0.1%)")
    ok = True
    for r in rows:
        if r["preset"] == "default":
            good = r["ratio"] <= TARGET
            ok &= good
            print(f"default preset, {r['model']}: ratio {r['ratio']:.3f} (target <= {TARGET}): "
                  f"{'ok' if good else 'ABOVE TARGET'}")
        if r["events"]:
            print(f"note: {r['preset']} on {r['model']} recorded {r['events']} event(s) on a clean run")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
