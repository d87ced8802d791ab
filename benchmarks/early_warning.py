"""Early-warning signals against the basic detectors, on failures that build up over many steps.

    python benchmarks/early_warning.py           # 5 clean seeds, 3 scenarios x 2 seeds x 5 configs: ~6 min on 2 CPUs
    python benchmarks/early_warning.py --quick   # 1 seed, basic/growth/probe (a smoke run, ~2 min)
    python benchmarks/early_warning.py --cost tiny 3M   # each signal's cost per call, against a bare step

Every run is the tiny SFT model of `self_healing.tiny` (Llama, hidden 64, 2 layers, batch 8, AdamW
at 3e-3, constant LR after 5 warm-up steps), `--steps` optimizer steps (200), the fault starting
at `--fault-step` (100). Scenarios (`self_healing.faults`):

- `lr_ramp`: the scheduled LR grows 10%/step for 60 steps, then stays at 1.1^60 (304x): a peak LR
  set far too high; the `lr_spike` detector cannot see it (the scheduler set that LR);
- `weight_drift`: every weight x1.02 per step for 40 steps (x2.2 in all), then the drift stops;
- `noisy_data`: random tokens replace a share of inputs and labels, rising to 30% over 50 steps
  and staying there (the rest of the run trains on that stream).

Per scenario and signal:

- **lead time**: steps between the first firing of the signal and the first firing of any basic
  detector, measured on runs where every signal is on in `observe` mode (they record what they
  would do and change nothing, so every signal sees the same trajectory, and the basic detectors
  act as usual);
- **work lost**: updates discarded (rolled-back steps + skipped/undone updates) when that signal
  heals (mode `heal`, the basic detectors on too; a signal that never fired on a seed's observe
  run would heal exactly like the basic detectors there, so that run is not repeated);
- **tail loss**: loss of the final model on 64 held-out clean sentences, over the clean run's of
  the same seed (a clean run with every signal observing is bit-identical to the bare one);
- **false alarms**: on `--seeds` clean runs (no fault) in `observe` mode, the failure-level events
  of each signal (and warnings apart), over the judged steps.
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

SCENARIOS: dict[str, dict[str, Any]] = {
    "lr_ramp": dict(kind="lr_ramp", duration=60, factor=1.1),
    "weight_drift": dict(kind="weight_drift", duration=40, factor=1.02),
    "noisy_data": dict(kind="noisy_data", duration=50, factor=0.3),
}
SIGNALS: dict[str, dict[str, Any]] = {
    "basic": {},
    "growth": dict(growth_forecast=True),
    "growth+fisher": dict(growth_forecast=True, fisher_every_steps=1),
    "oscillation": dict(oscillation_check=True),
    "probe": dict(probe_every_steps=1),
}
ALL_ON = dict(growth_forecast=True, oscillation_check=True, probe_every_steps=1)
BASIC_KINDS = {"nan_loss", "nonfinite_gradient", "loss_spike", "divergence", "gradient_explosion", "weight_corruption",
               "optimizer_state_corruption", "lr_spike"}
SIGNAL_KIND = {"growth": "instability_forecast", "oscillation": "oscillation", "probe": "probe_regression"}
BENCH_CONFIG = dict(calibration_window=100, snapshot_every_steps=10)
"""A 200-step run is all transient: the calibration window follows the last 100 healthy steps
(docs/early-warning.md). A fixed snapshot interval keeps the runs deterministic ("auto" depends on timings)."""


def heldout_loss(trainer, n: int = 64, seed: int = 12345) -> float:
    """Mean token loss of the model on `n` clean sentences it never trained on."""
    import torch

    from self_healing.tiny import sentence
    import random

    rng = random.Random(seed)
    tok = trainer.processing_class
    texts = [f"{sentence(rng)}. {sentence(rng)}." + tok.eos_token for _ in range(n)]
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model = trainer.model
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"].to(model.device), attention_mask=enc["attention_mask"].to(model.device),
                        labels=labels.to(model.device))
        return float(out.loss)
    finally:
        model.train(was)


def run(tmp: str, name: str, steps: int, seed: int, fault: dict | None, fault_step: int, cfg: dict) -> dict[str, Any]:
    from self_healing import HealingConfig, SelfHealingTrainer
    from self_healing.faults import Fault, inject_faults

    tr = C.build("tiny", f"{tmp}/{name}", max_steps=steps, seed=seed, logging_steps=1)
    if fault is not None:
        inject_faults(tr, Fault(fault["kind"], step=fault_step, duration=fault["duration"], factor=fault["factor"]))
    sh = SelfHealingTrainer(tr, HealingConfig(**{**BENCH_CONFIG, **cfg}))
    t0 = time.perf_counter()
    sh.train()
    wall = time.perf_counter() - t0
    cb = sh.callback
    ew = getattr(cb, "early_warning", None)
    events = cb.recorder.events + list(cb.recorder.recent_events)
    c = cb.recorder.counters
    return dict(name=name, exit=sh.exit_reason, events=events, counters=dict(c), wall=wall,
                lost=int(c.get("steps_lost", 0) + c.get("skipped_steps", 0)), lr_scale=cb.policy.lr_scale,
                heldout=heldout_loss(tr), summary=ew.summary if ew is not None else None, steps=steps)


def first_step(events: list[dict], kinds: set[str], warnings: bool = False) -> int | None:
    for e in events:
        level = (e.get("evidence") or {}).get("level")
        if e["failure"] in kinds and ((level == "warning") == warnings):
            return e["step"]
    return None


def measure_cost(sizes: list[str], steps: int = 40) -> None:
    """Per-call cost of every signal, all on in observe mode (curvature every 20 steps), against
    a bare trainer of the same size."""
    from self_healing import HealingConfig, SelfHealingTrainer

    rows = []
    with tempfile.TemporaryDirectory(prefix="sh-ew-cost-") as tmp:
        for size in sizes:
            bare = C.build(size, f"{tmp}/bare-{size}", max_steps=steps, logging_steps=10)
            t0 = time.perf_counter()
            bare.train()
            bare_ms = 1000 * (time.perf_counter() - t0) / steps
            tr = C.build(size, f"{tmp}/on-{size}", max_steps=steps, logging_steps=10)
            cfg = HealingConfig(growth_forecast=True, oscillation_check=True, probe_every_steps=1,
                                curvature_every_steps=20, fisher_every_steps=1, early_warning_mode="observe",
                                oscillation_window=16, snapshot_every_steps=10)
            sh = SelfHealingTrainer(tr, cfg)
            sh.train()
            summ = sh.callback.early_warning.summary
            sec = summ["seconds"]
            calls = max(len(summ["curvature"]), 1)
            for name in ("growth", "oscillation", "probe", "fisher"):
                ms = 1000 * sec.get(name, 0.0) / steps
                rows.append([size, C.fmt_params(C.n_params(tr.model)), name, "every step", ms,
                             f"{100 * ms / bare_ms:.1f}%", bare_ms])
            rows.append([size, C.fmt_params(C.n_params(tr.model)), "curvature",
                         f"per call ({summ['curvature'][-1].get('hvp')} HVPs)", 1000 * sec.get("curvature", 0.0) / calls,
                         f"{1000 * sec.get('curvature', 0.0) / calls / bare_ms:.1f} steps", bare_ms])
    print(C.table(["model", "params", "signal", "cost", "ms", "of a bare step", "bare ms/step"], rows))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--fault-step", type=int, default=100)
    p.add_argument("--seeds", type=int, default=5, help="clean seeds for the false-alarm count")
    p.add_argument("--fault-seeds", type=int, default=2, help="seeds per fault scenario (<= --seeds)")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--signals", nargs="+", default=list(SIGNALS), choices=list(SIGNALS))
    p.add_argument("--quick", action="store_true", help="1 seed, signals basic/growth/probe")
    p.add_argument("--cost", nargs="+", metavar="SIZE", choices=list(C.SIZES),
                   help="only measure each signal's cost per call on these model sizes (e.g. tiny 3M)")
    a = p.parse_args(argv)
    if a.cost:
        C.quiet()
        C.single_thread()
        print(f"# early-warning cost: {C.device_name()}, {C.load_average()}", flush=True)
        measure_cost(a.cost)
        return 0
    if a.quick:
        a.seeds, a.fault_seeds, a.signals = 1, 1, ["basic", "growth", "probe"]
    a.fault_seeds = min(a.fault_seeds, a.seeds)
    a.signals = ["basic"] + [s for s in a.signals if s != "basic"]  # the reference of every row
    C.quiet()
    C.single_thread()
    print(f"# early warning: {C.device_name()}, {C.load_average()}", flush=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sh-ew-") as tmp:
        # clean runs, every signal observing: false alarms, cost, and (observe changes nothing) the
        # clean reference of each seed
        fa_counts: dict[str, list[int]] = {s: [0, 0] for s in SIGNAL_KIND}
        cost: dict[str, float] = {}
        clean: dict[int, dict[str, Any]] = {}
        basic_fa = 0
        for seed in range(a.seeds):
            r = clean[seed] = run(tmp, f"clean-{seed}", a.steps, seed, None, a.fault_step,
                                  {**ALL_ON, "early_warning_mode": "observe"})
            for sig, kind in SIGNAL_KIND.items():
                for e in r["events"]:
                    if e["failure"] == kind:
                        fa_counts[sig][(e.get("evidence") or {}).get("level") == "warning"] += 1
            for k, v in (r["summary"] or {}).get("seconds", {}).items():
                cost[k] = cost.get(k, 0.0) + v / r["steps"] / a.seeds
            basic_fa += sum(1 for e in r["events"] if e["failure"] in BASIC_KINDS)
            print(f"# clean seed {seed}: held-out {r['heldout']:.4f}, {len(r['events'])} events ({r['wall']:.0f}s)",
                  flush=True)
        lead: dict[tuple[str, str], list[str]] = {}
        heal: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for sc in a.scenarios:
            fault = SCENARIOS[sc]
            for seed in range(a.fault_seeds):
                obs = run(tmp, f"{sc}-observe-{seed}", a.steps, seed, fault, a.fault_step,
                          {**ALL_ON, "early_warning_mode": "observe"})
                basic_at = first_step(obs["events"], BASIC_KINDS)
                fired = {"basic"}
                for sig, kind in SIGNAL_KIND.items():
                    at = first_step(obs["events"], {kind})
                    if at is not None:
                        fired.update(n for n in SIGNALS if n.split("+")[0] == sig)
                    lead.setdefault((sc, sig), []).append(
                        "-" if at is None else f"{at - a.fault_step}/{basic_at - a.fault_step if basic_at else '-'}")
                print(f"# {sc} seed {seed}: basic detectors first at {basic_at}", flush=True)
                base = None
                for sig in a.signals:
                    if sig not in fired:  # it never fired on this trajectory: it heals exactly like basic
                        r = dict(base, same_as_basic=True)
                    else:
                        r = run(tmp, f"{sc}-{sig.replace('+', '_')}-{seed}", a.steps, seed, fault, a.fault_step,
                                SIGNALS[sig])
                        print(f"#   {sig}: held-out {r['heldout']:.4f}, lost {r['lost']} ({r['wall']:.0f}s)", flush=True)
                    r["ratio"] = r["heldout"] / clean[seed]["heldout"]
                    base = r if sig == "basic" else base
                    heal.setdefault((sc, sig), []).append(r)
    judged = a.steps * a.seeds
    print()
    print(f"## Detection: steps after the fault started at which each signal / the basic detectors first fired "
          f"(observe runs, seeds 0-{a.fault_seeds - 1})")
    rows = [[sc, sig, ", ".join(v), _lead(v)] for (sc, sig), v in lead.items()]
    print(C.table(["scenario", "signal", "signal/basic per seed", "mean lead (steps)"], rows))
    print()
    print(f"## Healing: held-out loss of the final model / the clean run's (mean of {a.fault_seeds} seeds)")
    rows = []
    for (sc, sig), rs in heal.items():
        kinds = [e["failure"] for r in rs for e in r["events"]]
        rows.append([sc, sig, _mean([r["ratio"] for r in rs]), " / ".join(f"{r['ratio']:.2f}" for r in rs),
                     _mean([r["lost"] for r in rs]), ", ".join(sorted({r["exit"] for r in rs})),
                     " / ".join(f"{r['lr_scale']:.3g}" for r in rs),
                     "= basic (never fired)" if all(r.get("same_as_basic") for r in rs) else
                     ", ".join(f"{k} x{kinds.count(k)}" for k in dict.fromkeys(kinds)) or "-"])
    print(C.table(["scenario", "healed by", "x clean (mean)", "per seed", "work lost (updates, mean)", "exit",
                   "LR scale at end", "events"], rows))
    print()
    print(f"## False alarms on {a.seeds} clean seeds x {a.steps} steps ({judged} steps, observe mode)")
    fa_rows = [[sig, fa_counts[sig][0], fa_counts[sig][1], f"{fa_counts[sig][0] / judged:.2g}"] for sig in SIGNAL_KIND]
    print(C.table(["signal", "failure-level alarms", "warnings", "alarms per step"], fa_rows))
    print(f"basic detectors on the same clean runs: {basic_fa} events")
    print()
    bare_ms = 1000 * _mean([r["wall"] / r["steps"] for r in clean.values()])
    print(f"## Cost per step (clean runs, mean; a step of this model with every signal on took ~{bare_ms:.1f} ms here)")
    print(C.table(["signal", "ms per step"], [[k, 1000 * v] for k, v in sorted(cost.items())]))
    print(f"# total {time.perf_counter() - t_start:.0f}s, {C.load_average()}")
    return 0


def _lead(v: list[str]) -> str:
    leads = []
    for x in v:
        sig, _, basic = x.partition("/")
        if sig != "-" and basic not in ("-", ""):
            leads.append(int(basic) - int(sig))
    never_basic = sum(1 for x in v if x != "-" and x.endswith("/-"))
    out = f"{_mean(leads):+.1f}" if leads else "-"
    return out + (f" ({never_basic} seed(s): only this signal fired)" if never_basic else "")


if __name__ == "__main__":
    sys.exit(main())
