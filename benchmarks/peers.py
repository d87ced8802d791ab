"""self-healing against its peers on the same tiny model and the same faults.

    pip install -e ".[bench]"          # zclip, arc-training 5.2
    python benchmarks/peers.py
    python benchmarks/peers.py --faults nan_loss nan_weight --steps 200

Contenders (all train the same SFT model from the same seed with AdamW, lr 3e-3):

- **bare**: the Trainer as it comes, fixed clipping at `max_grad_norm=1.0`.
- **zclip**: the `zclip` package (1.0, defaults: alpha 0.97, z 2.5, warm-up 25, cap 1.0) called in
  `on_pre_optimizer_step`, the Trainer's own clipping off.
- **arc (callback)**: `arc-training` 5.2's own Trainer callback, `arc.api.integrations.HuggingFaceCallback`.
- **arc (loop)**: ARC's working engine, `arc.Controller(model, optimizer, scheduler).step(loss)`,
  in a plain PyTorch loop over the same batches (`should_skip` skips the update), the way its docs
  use it; compared with the same plain loop without ARC. (The README's `Arc(model, optimizer)`
  does not run.)
- **self-healing default / aggressive**: `SelfHealingTrainer` with the two presets.

Each fault is injected once at step `--fault-step` (80 of 160; lr_scale for 3 steps), as in
`self_healing.faults`. A run *survived* when it finished every step with finite weights, and
*recovered* when its tail loss (mean of the last 10 steps) is also within 1.15x of the clean run
of its own kind (the bare Trainer, or the plain loop for arc (loop)): the loss says what a
recovery cost (steps rolled back, an LR cut kept). Overhead: clean runs, every contender against its
bare reference, interleaved step by step in one process (benchmarks/_common.py).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.platform.startswith("linux") and not os.environ.get("MALLOC_ARENA_MAX"):
    os.environ["MALLOC_ARENA_MAX"] = "1"  # one malloc arena for every thread: see benchmarks/_common.py
    os.execv(sys.executable, [sys.executable] + sys.argv)

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import torch  # noqa: E402

FAULTS = ["nan_loss", "inf_loss", "nan_grad", "grad_scale", "nan_weight", "weight_scale", "zero_exp_avg_sq",
          "lr_scale"]
TRAINER_METHODS = ["bare", "zclip", "arc_callback", "sh_default", "sh_aggressive"]
LOOP_METHODS = ["arc_loop"]
LABELS = {"bare": "bare Trainer (clip 1.0)", "zclip": "zclip 1.0", "arc_callback": "arc 5.2 (HF callback)",
          "arc_loop": "arc 5.2 (Controller loop)", "sh_default": "self-healing default",
          "sh_aggressive": "self-healing aggressive", "plain": "plain loop (clip 1.0)"}
TAIL_STEPS = 10
LOG_EVERY = 5
"""Trainer logging interval: the tail loss is the mean of the last TAIL_STEPS // LOG_EVERY logs."""
RECOVERED_TAIL = 1.15
_DATASET: dict[str, Any] = {}


def processed_dataset(size: str) -> Any:
    """The SFT dataset tokenized once (SFTTrainer skips tokenizing a dataset that has `input_ids`)."""
    if "ds" not in _DATASET:
        with tempfile.TemporaryDirectory(prefix="sh-peers-ds-") as tmp:
            _DATASET["ds"] = C.build(size, tmp, max_steps=1).train_dataset
    return _DATASET["ds"]


# ------------------------------------------------------------------------------------------------
# the contenders on a Trainer
# ------------------------------------------------------------------------------------------------
def zclip_callback():
    from transformers import TrainerCallback
    from zclip import ZClip

    class ZClipCallback(TrainerCallback):
        def __init__(self) -> None:
            self.zclip = ZClip()

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            self.zclip.step(model)
            return control

    return ZClipCallback()


def build_trainer_run(method: str, size: str, out: str, steps: int, fault: str | None, fault_step: int):
    """(trainer, train function, what to read the outcome from)."""
    from self_healing import HealingConfig, SelfHealingTrainer
    from self_healing.faults import Fault, inject_faults

    overrides: dict[str, Any] = {"logging_steps": LOG_EVERY, "train_dataset": processed_dataset(size)}
    if method == "zclip":
        overrides["max_grad_norm"] = 0.0  # ZClip clips (its own cap is 1.0)
    tr = C.build(size, out, max_steps=steps, **overrides)
    if fault:
        inject_faults(tr, Fault(fault, step=fault_step, duration=3 if fault == "lr_scale" else 1))
    if method == "zclip":
        tr.add_callback(zclip_callback())
    elif method == "arc_callback":
        from arc.api.integrations import HuggingFaceCallback

        tr.add_callback(HuggingFaceCallback(verbose=False))
    if method.startswith("sh_"):
        sh = SelfHealingTrainer(tr, getattr(HealingConfig, method[3:])())
        return tr, sh.train
    return tr, tr.train


# ------------------------------------------------------------------------------------------------
# ARC's Controller in a plain loop (and the same loop without it)
# ------------------------------------------------------------------------------------------------
def plain_loop(size: str, out: str, steps: int, fault: str | None, fault_step: int, use_arc: bool,
               on_step_begin: Callable[[], None] | None = None) -> tuple[list[float], torch.nn.Module]:
    from self_healing.faults import _DEFAULT_FACTOR, _pick_param
    from self_healing.snapshot import unwrap_optimizer
    from transformers.trainer_utils import set_seed

    tr = C.build(size, out, max_steps=steps, logging_steps=LOG_EVERY, train_dataset=processed_dataset(size))
    set_seed(tr.args.seed)
    model = tr.model
    model.train()
    tr.create_optimizer_and_scheduler(num_training_steps=steps)
    opt, sched = tr.optimizer, tr.lr_scheduler
    ctrl = None
    if use_arc:
        from arc import Controller, ControllerConfig

        ctrl = Controller(model, opt, scheduler=sched, config=ControllerConfig(verbose=False))
    dl = tr.get_train_dataloader()
    it = iter(dl)
    losses: list[float] = []
    duration = 3 if fault == "lr_scale" else 1
    factor = _DEFAULT_FACTOR.get(fault or "", None)
    for step in range(1, steps + 1):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(dl)
            batch = next(it)
        batch = tr._prepare_inputs(batch)
        if on_step_begin is not None:
            on_step_begin()
        active = fault is not None and fault_step <= step < fault_step + duration
        with torch.no_grad():
            if active and fault == "nan_weight":
                _pick_param(model, None)[1].fill_(float("nan"))
            elif active and fault == "weight_scale":
                torch._foreach_mul_([p for p in model.parameters() if p.requires_grad], factor)
            elif active and fault == "zero_exp_avg_sq":
                for st in unwrap_optimizer(opt).state.values():
                    if "exp_avg_sq" in st:
                        st["exp_avg_sq"].zero_()
            elif active and fault == "lr_scale":
                for g in unwrap_optimizer(opt).param_groups:
                    g["lr"] *= factor
        loss = tr.compute_loss(model, batch)
        if active and fault in ("nan_loss", "inf_loss"):
            loss = loss * (float("nan") if fault == "nan_loss" else float("inf"))
        loss.backward()
        with torch.no_grad():
            if active and fault == "nan_grad":
                p = _pick_param(model, None)[1]
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            elif active and fault == "grad_scale":
                torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], factor)
        skip = False
        if ctrl is not None:
            skip = ctrl.step(loss).should_skip
        if not skip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if ctrl is not None:
        ctrl.close()
    return losses, model


# ------------------------------------------------------------------------------------------------
def outcome(method: str, size: str, tmp: str, steps: int, fault: str | None, fault_step: int) -> dict[str, Any]:
    from self_healing.tiny import logged_losses, weights_finite

    out = f"{tmp}/{method}-{fault or 'clean'}"
    try:
        if method in ("arc_loop", "plain"):
            losses, model = plain_loop(size, out, steps, fault, fault_step, use_arc=method == "arc_loop")
            done = len(losses)
            tail = losses[-TAIL_STEPS:]
        else:
            tr, train = build_trainer_run(method, size, out, steps, fault, fault_step)
            train()
            model, done = tr.model, tr.state.global_step
            tail = logged_losses(tr)[-(TAIL_STEPS // LOG_EVERY):]  # each log is the mean of LOG_EVERY steps
    except Exception as exc:  # noqa: BLE001 - a crash is an outcome
        return {"crashed": f"{type(exc).__name__}: {str(exc)[:80]}", "trace": traceback.format_exc(limit=3)}
    return {"crashed": None, "steps": done, "finite": weights_finite(model),
            "tail": sum(tail) / len(tail) if tail else math.nan}


def overhead(size: str, steps: int, warmup: int) -> dict[str, float]:
    """Median per-step time ratio of each contender to its bare reference, interleaved."""
    ratios: dict[str, float] = {}
    names = TRAINER_METHODS
    per: dict[str, list[float]] = {m: [] for m in names[1:]}
    for r in range(len(names)):
        turns = C.Turns(names)
        runners = {}
        with tempfile.TemporaryDirectory(prefix="sh-peers-oh-") as tmp:
            for m in names:
                tr, train = build_trainer_run(m, size, f"{tmp}/{m}", steps + 1, None, 0)
                turn = C.TurnCallback(turns, m)
                tr.add_callback(turn)
                if m.startswith("sh_"):
                    turn.feed_step_times_to(train.__self__.callback)
                runners[m] = train
            errors = C.run_interleaved(turns, runners, main=names[r])
        if errors:
            raise next(iter(errors.values()))
        for m in names[1:]:
            per[m] += C.paired_ratios(turns.times[m], turns.times["bare"], warmup)
    for m, xs in per.items():
        ratios[m] = C.median(xs)
    # ARC's engine in a plain loop against the same loop without it
    loops = ["plain", "arc_loop"]
    per_loop: list[float] = []
    for r in range(2):
        turns = C.Turns(loops)
        with tempfile.TemporaryDirectory(prefix="sh-peers-oh-") as tmp:
            def loop_runner(m: str, tmp: str = tmp, turns: C.Turns = turns) -> Callable[[], None]:
                cb = C.TurnCallback(turns, m)

                def go() -> None:
                    plain_loop(size, f"{tmp}/{m}", steps + 1, None, 0, use_arc=m == "arc_loop",
                               on_step_begin=lambda: cb.on_step_begin(None, None, None))
                    turns.finish(m)

                return go

            errors = C.run_interleaved(turns, {m: loop_runner(m) for m in loops}, main=loops[r])
        if errors:
            raise next(iter(errors.values()))
        per_loop += C.paired_ratios(turns.times["arc_loop"], turns.times["plain"], warmup)
    ratios["arc_loop"] = C.median(per_loop)
    ratios["bare"] = 1.0
    return ratios


def _num(x: float) -> str:
    return "dead" if math.isinf(x) else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=list(C.SIZES))
    p.add_argument("--faults", nargs="+", default=FAULTS, choices=FAULTS)
    p.add_argument("--methods", nargs="+", default=TRAINER_METHODS + LOOP_METHODS,
                   choices=TRAINER_METHODS + LOOP_METHODS)
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--fault-step", type=int, default=80,
                   help="after ARC's 50-step calibration, with as many steps after it to recover")
    p.add_argument("--overhead-steps", type=int, default=40, help="steps per round of the overhead measurement")
    p.add_argument("--no-overhead", action="store_true")
    a = p.parse_args(argv)
    C.quiet()
    C.single_thread()
    print(f"# peers: {C.device_name()}, model {a.size}, {a.steps} steps, fault at step {a.fault_step}, "
          f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX')}, {C.load_average()}", flush=True)
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="sh-peers-") as tmp:
        clean_ref = {"trainer": outcome("bare", a.size, tmp, a.steps, None, a.fault_step),
                     "loop": outcome("plain", a.size, tmp, a.steps, None, a.fault_step)}
        for m in a.methods:
            results[m] = {}
            for f in [None] + a.faults:
                results[m][f or "clean"] = outcome(m, a.size, tmp, a.steps, f, a.fault_step)
            print(f"# {LABELS[m]} done, {C.load_average()}", flush=True)
    ratios = {} if a.no_overhead else overhead(a.size, a.overhead_steps, warmup=5)

    def ref(m: str) -> float:
        return clean_ref["loop" if m == "arc_loop" else "trainer"]["tail"]

    def tail_ratio(m: str, f: str) -> float:
        """Tail loss / clean; inf for a run that crashed or ended with non-finite weights."""
        r = results[m][f]
        if r["crashed"] or not r["finite"] or not math.isfinite(r["tail"]):
            return math.inf
        return r["tail"] / ref(m)

    def cell(m: str, f: str) -> tuple[str, bool]:
        r = results[m][f]
        if r["crashed"]:
            return "crash x", False
        if not r["finite"]:
            return "NaN weights x", False
        ratio = tail_ratio(m, f)
        ok = r["steps"] >= a.steps and ratio <= RECOVERED_TAIL
        return f"{ratio:.2f}" + ("" if ok else " x"), ok

    # per fault: tail loss / clean
    headers = ["fault"] + [LABELS[m] for m in a.methods]
    rows = []
    for f in ["clean"] + a.faults:
        rows.append([f] + [cell(m, f)[0] for m in a.methods])
    print("\nTail loss (mean of the last 10 steps) / clean run; x = not recovered (crash, NaN weights, or > "
          f"{RECOVERED_TAIL}x clean):")
    print(C.table(headers, rows))
    # summary
    srows = []
    for m in a.methods:
        oks = [cell(m, f)[1] for f in a.faults]
        alive = [not results[m][f]["crashed"] and results[m][f]["finite"] and results[m][f]["steps"] >= a.steps
                 for f in a.faults]
        tails = [tail_ratio(m, f) for f in a.faults]
        srows.append([LABELS[m], f"{sum(alive)}/{len(alive)}", f"{sum(oks)}/{len(oks)}",
                      _num(C.median(tails)) if tails else "n/a", _num(max(tails)) if tails else "n/a",
                      f"{ratios[m]:.3f}" if m in ratios else "n/a"])
    print("\nSummary:")
    print(C.table(["method", "finished, weights finite", f"recovered (and tail <= {RECOVERED_TAIL}x clean)",
                   "median tail / clean", "worst tail / clean", "step time vs bare (median of pairs)"], srows))
    print("(dead: the run ended with NaN/Inf weights)")
    crashes = [(m, f, results[m][f]["crashed"]) for m in a.methods for f in results[m] if results[m][f]["crashed"]]
    for m, f, why in crashes:
        print(f"# {LABELS[m]} crashed on {f}: {why}")
    print(f"# {C.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
