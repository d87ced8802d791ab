"""The plugin's host cost per healthy optimizer step, in microseconds, component by component.

    python benchmarks/step_cost.py                                  # tiny, 3M, 25M; default and aggressive
    python benchmarks/step_cost.py --sizes tiny --presets default --steps 40 --paths loop

A ratio of step times (overhead.py) cannot resolve a few microseconds; this script times the code
itself, in two settings. `--paths loop` (`loop_cost`): the engine's per-step path as a plain
PyTorch loop calls it (`self_healing.Healer`), one timer per call, warm (back to back: the code's
cost, the microbenchmark the target is set for) and where the loop makes each call (right after a
real backward and optimizer step, every cache cold: what a run pays). `--paths trainer`: a real
clean training of a tiny Llama through `SelfHealingTrainer` with every per-step hook of the
plugin's callbacks (`SelfHealingCallback`, the crash journal, the watchdog) and the pieces
inside them wrapped in `time.perf_counter_ns` timers, and the Trainer methods the plugin wraps
(`training_step`, `get_batch_samples`, `_get_grad_norm`, `_clip_grad_norm`) timed
inside and outside the plugin's wrappers, so their rows are the wrappers' own cost. Every row is
*exclusive* time (what a timed call spent outside the timed calls it made), summed per optimizer
step; the table gives the min, median and p90 over steps, and the total (on a shared, loaded CPU
the min is the code's cost and the median what contention makes of it; the header gives the
speed of an empty Python call at the time, ~40-50 ns on an idle core here). Periodic work (the integrity
pass every `integrity_check_every_steps`, the snapshot copy) lands on one step in N: it has its
own rows, per call and amortized, and is left out of the per-step total. The rank-agreement
packing (the multi-process path of the step's signals, `StepReader.gathered`: one all_gather of
every rank's loss, norm, exception code, preemption signal, own step time and LR ratio) is timed by
driving it directly, with the collective itself replaced by a one-row identity. Where the engine
(`Healer`, a facade) hands a piece to one of its parts (`StepReader`, `Reporter`, `SnapshotKeeper`),
both are timed under one row. A piece not found where this script looks, or timed but never run,
is an error (`MissingHook`), not a missing row. Target: the engine's per-step path under 200 us
(the exit status: the warm loop path with the DDP packing, and the Trainer run's engine median).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
import types
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_US = 200.0
DEFAULT_STEPS = {"tiny": 120, "3M": 80, "25M": 40}
PERIODIC = ("integrity pass (check_state)", "snapshot (capture)")
CLIP_ROWS = ("ZClip: measure the norm (wraps _clip_grad_norm)", "  ZClip: scale_gradients")
"""ZClip's clipping replaces the Trainer's own (clip_grad_norm_): not added to the plugin's cost,
which gets the difference from `clipping_us` instead."""
TRAINER_WORK = "[trainer's own work]"
"""The label of the Trainer's original methods, timed inside the plugin's wrappers: not the plugin's."""


class MissingHook(RuntimeError):
    """A row's code is not where this script looks for it, or it never ran when it should have."""


class Timers:
    """Exclusive-time timers, summed per optimizer step (`flush` at each step boundary).

    A timed call inside another adds its own wrapper's cost (`overhead_ns`, calibrated) to the
    caller's row; that much is taken back from the caller, so a row is the code's own time."""

    def __init__(self, overhead_ns: float = 0.0) -> None:
        self.overhead_ns = overhead_ns
        self.order: list[str] = []
        self.step: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.steps: list[dict[str, float]] = []
        self.stack: list[list[float]] = []  # per open call: [children's time, timed children]
        self.on = False

    def wrap(self, obj: Any, name: str, label: str) -> bool:
        """Replace `obj.name` (an instance attribute, or a module function) by a timed call; False
        when it is timed under this label already. No such attribute (the code moved) is an error:
        a row must not silently drop out of the table."""
        orig = getattr(obj, name, None) if obj is not None else None
        if orig is None:
            where = getattr(obj, "__name__", None) if isinstance(obj, types.ModuleType) else type(obj).__name__
            raise MissingHook(f"step_cost: nothing to time for the row {label!r}: {where}.{name} is gone (the "
                              "plugin's code moved; point benchmarks/step_cost.py at where it lives now)")
        if getattr(orig, "_step_cost_label", None) == label:
            return False
        setattr(obj, name, self.timed(orig, label))
        return True

    def timed(self, fn: Callable, label: str) -> Callable:
        if label not in self.order:
            self.order.append(label)
        stack, step, calls, clock = self.stack, self.step, self.calls, time.perf_counter_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            entered = clock()
            stack.append([0, 0, label])
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = clock() - t0
                children, n, _ = stack.pop()
                parent = stack[-1] if stack else None
                inner = parent is not None and parent[2] == label  # a facade's call into its part: one call
                if self.on:
                    step[label] += max(dt - children - n * self.overhead_ns, 0.0)
                    if not inner:
                        calls[label] += 1
                if parent is not None:
                    # The caller is charged neither this call's code nor its timer: everything from
                    # entering here to now. Right after the Trainer's backward or a batch fetch
                    # this bookkeeping runs cold (~10-30 us, not the ~1 us of a warm loop), and
                    # charged to the caller it made a wrapper of a few us read as 30-40 us.
                    parent[0] += clock() - entered
                    parent[1] += 1

        timed._step_cost_label = label  # type: ignore[attr-defined]
        return timed

    def flush(self) -> None:
        if self.on:
            self.steps.append(dict(self.step))
        self.step.clear()
        self.on = True


def timer_cost_ns(n: int = 2000, repeats: int = 50) -> float:
    """What a timed call costs its caller beyond a plain call, that its own clock does not see
    (the call into the timer and the return from it): the fastest of many short loops of timed
    calls, as the caller's row counts them, minus the fastest loop of plain calls (minima: a
    loaded machine only ever adds time)."""
    plain = lambda: None  # noqa: E731
    t = Timers()
    inner = t.timed(plain, "inner")

    def loop(fn: Callable) -> None:
        for _ in range(n):
            fn()

    outer = t.timed(loop, "outer")
    best_timed = best_plain = float("inf")
    for _ in range(repeats):
        t.on = True
        t.step.clear()
        outer(inner)
        best_timed = min(best_timed, t.step["outer"] / n)
        t0 = time.perf_counter_ns()
        loop(plain)
        best_plain = min(best_plain, (time.perf_counter_ns() - t0) / n)
    return max(best_timed - best_plain, 0.0)


def python_call_ns(n: int = 2000, repeats: int = 50) -> float:
    """ns per call of an empty Python function, best of a few tries: how fast this machine runs
    Python right now (tens of ns on an idle core; a loaded shared CPU multiplies every row by it)."""
    def f(x: int) -> int:
        return x

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for i in range(n):
            f(i)
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best  # (the loop's own cost included)


class TimedIterator:
    """The Trainer's epoch iterator, its `next()` timed as the Trainer's own work (the plugin's
    `get_batch_samples` fetches the batches itself, instead of calling the Trainer's method)."""

    def __init__(self, it: Any, next_timed: Callable) -> None:
        self.it, self._next = it, next_timed

    def __iter__(self) -> "TimedIterator":
        return self

    def __next__(self) -> Any:
        return self._next(self.it)


PATCHED = (("self_healing.engine", "scale_gradients", CLIP_ROWS[1]),
           ("self_healing.callback", "save_to_trainer_state", "  ZClip: save_to_trainer_state"))
"""Module functions the timers replace during a run (and put back after it): the modules that call them."""
SIGNALS = "  signals: stack + the step's one host sync"
ODOMETER = "update odometer (optimizer.step post-hook)"
ENGINE_ROWS = (SIGNALS, "  engine.judge_step", "  observers (journal, watchdog)", "  engine.end_step",
               "journal: progress line (on_step_end)", "  detectors: StepMonitor.check",
               "  detectors: StepMonitor.accept", "  postmortem history: recorder.observe", "  ZClip.observe",
               ODOMETER)
"""The engine's own per-step path (the step's facts, detectors, decision, record, journal line,
odometer): what a plain loop pays too. The rest is the HF adapter's (wrappers, callback events,
watchdog heartbeat)."""
LOG_ROWS = ("callback.on_log", "journal: metrics line (on_log)", "trackio: on_log")
"""Rows of the Trainer's logging steps (every `logging_steps`)."""


def instrument(tr: Any, sh: Any, inner: dict[str, Any], t: Timers) -> list[str]:
    """Time every per-step piece of the plugin on this trainer (see the module docstring): the
    callback's events, the engine (`cb.engine`, a facade: where it hands a piece to one of its
    parts, the facade's method and the part's are timed under one row), the preemption agreement,
    the observers. A piece that is not found raises `MissingHook`. Returns the Trainer methods the
    plugin wraps (their rows are expected on every step)."""
    cb = sh.callback
    eng = cb.engine
    wrapped = []
    for name in ("training_step", "get_batch_samples", "_get_grad_norm", "_clip_grad_norm"):
        if name in inner and getattr(tr, name) is not inner[name]:
            wrapped.append(name)
    must = [n for n in ("training_step", "get_batch_samples", "_get_grad_norm") if n in inner]  # on this Trainer
    if cb.zclip is not None and "_clip_grad_norm" in inner:
        must.append("_clip_grad_norm")
    lost = [n for n in must if n not in wrapped]
    if lost:
        raise MissingHook(f"step_cost: the plugin no longer wraps the Trainer's {', '.join(lost)}: their rows would "
                          "be missing (see self_healing.hf_patches.TrainerPatches / compat.install_grad_norm)")
    for name in ("training_step", "_get_grad_norm"):
        if name in wrapped:
            t.wrap(tr, name, f"wrapper: {name}")
    if "_clip_grad_norm" in wrapped:
        t.wrap(tr, "_clip_grad_norm", CLIP_ROWS[0])
    if "get_batch_samples" in wrapped:
        outer = t.timed(tr.get_batch_samples, "wrapper: get_batch_samples")
        fetch = t.timed(next, TRAINER_WORK)
        tr.get_batch_samples = lambda it, *a, **k: outer(TimedIterator(it, fetch), *a, **k)
    t.wrap(cb, "on_step_begin", "callback.on_step_begin")
    t.wrap(cb, "on_pre_optimizer_step", "callback.on_pre_optimizer_step (the decision)")
    for obj, name in ((cb.preemption, "step_signals"), (eng, "step_signals"), (eng.reader, "step_signals"),
                      (eng.reader, "gathered")):  # gathered: the multi-process path (see packing_us)
        t.wrap(obj, name, SIGNALS)
    t.wrap(eng, "judge_step", "  engine.judge_step")
    t.wrap(importlib.import_module(PATCHED[0][0]), PATCHED[0][1], PATCHED[0][2])  # scale_gradients
    for obj in (eng, eng.reporter):
        t.wrap(obj, "notify", "  observers (journal, watchdog)")
    t.wrap(cb, "on_step_end", "callback.on_step_end")
    t.wrap(eng, "end_step", "  engine.end_step")
    t.wrap(importlib.import_module(PATCHED[1][0]), PATCHED[1][1], PATCHED[1][2])  # save_to_trainer_state
    for obj in (eng, eng.reader):
        t.wrap(obj, "check_state", PERIODIC[0])
    for obj in (eng, eng.snapshots):
        t.wrap(obj, "capture", PERIODIC[1])
    t.wrap(cb, "on_log", LOG_ROWS[0])
    if cb.journal is not None:
        t.wrap(cb.journal, "on_step_end", "journal: progress line (on_step_end)")
        t.wrap(cb.journal, "on_log", LOG_ROWS[1])
    if cb.watchdog is not None:
        t.wrap(cb.watchdog, "on_step_end", "watchdog: heartbeat (on_step_end)")
    if cb.tracker is not None:
        for hook in ("on_step_end", "on_log"):
            t.wrap(cb.tracker, hook, f"trackio: {hook}")
    return wrapped


def instrument_run(cb: Any, t: Timers) -> None:
    """The objects a fresh `train()` call makes anew (detectors, record, ZClip): timed once it has."""
    eng = cb.engine
    t.wrap(eng.monitor, "check", "  detectors: StepMonitor.check")
    t.wrap(eng.monitor, "accept", "  detectors: StepMonitor.accept")
    t.wrap(eng.recorder, "observe", "  postmortem history: recorder.observe")
    if eng.zclip is not None:
        t.wrap(eng.zclip, "observe", "  ZClip.observe")
    from self_healing.snapshot import REACH, unwrap_optimizer

    reach = REACH.track(unwrap_optimizer(cb.trainer.optimizer))  # the one the engine's first report installs
    if reach is not None and reach.known:
        t.wrap(reach, "after_step", ODOMETER)


def check_rows(t: Timers, cb: Any, tr: Any) -> None:
    """Every timed row ran: each step's on every step, the periodic ones when the run was long
    enough to reach them. A row that never ran means its code is no longer on the path timed."""
    ran = {lab for s in t.steps for lab in s}
    n = len(t.steps)
    every = {PERIODIC[0]: cb.config.integrity_check_every_steps,
             PERIODIC[1]: cb.snapshot_interval}  # the interval changes only at a capture
    args = tr.args
    log_every = args.logging_steps if str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "steps" \
        and float(args.logging_steps) >= 1 else None
    for lab in LOG_ROWS:
        every[lab] = int(log_every) if log_every else None
    if cb.zclip is None:  # ZClip's functions are timed (PATCHED) but only run with ZClip on
        for _, _, lab in PATCHED:
            every[lab] = None
    every[PATCHED[0][2]] = None  # scale_gradients: only on a step ZClip clips
    if not getattr(args, "max_grad_norm", 0):  # the Trainer computes no norm then
        for lab in ("wrapper: _get_grad_norm", CLIP_ROWS[0]):
            every[lab] = None
    missing = [lab for lab in t.order if lab != TRAINER_WORK and lab not in ran
               and (lab not in every or (every[lab] is not None and n >= every[lab]))]
    if missing:
        raise MissingHook(f"step_cost: timed but never ran in {n} steps: {missing} (the plugin no longer calls "
                          "the code timed there; point benchmarks/step_cost.py at where it lives now)")


def clipping_us(tr: Any, n: int = 30) -> tuple[float, float] | None:
    """Median us of the Trainer's own `_clip_grad_norm` (clip_grad_norm_) and of what ZClip does
    in its place (measure the norm, then scale), on the same gradients, in turns."""
    import torch

    from self_healing.hf_patches import measure_grad_norm as measure
    from self_healing.zclip import scale_gradients

    model = tr.model
    if not getattr(tr.args, "max_grad_norm", 0):  # the Trainer clips nothing: nothing to compare with
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    saved = [torch.randn_like(p) for p in params]
    for p, g in zip(params, saved):
        p.grad = g.clone()
    grads = [p.grad for p in params]
    bare, zclip = [], []
    orig = type(tr)._clip_grad_norm
    try:
        for _ in range(n):
            torch._foreach_copy_(grads, saved)
            t0 = time.perf_counter_ns()
            orig(tr, model)
            bare.append(time.perf_counter_ns() - t0)
            torch._foreach_copy_(grads, saved)
            t0 = time.perf_counter_ns()
            norm = float(measure(tr.accelerator, model))
            scale_gradients(params, min(tr.args.max_grad_norm / (norm + 1e-6), 1.0))
            zclip.append(time.perf_counter_ns() - t0)
    finally:
        for p in params:
            p.grad = None
    return statistics.median(bare) / 1000, statistics.median(zclip) / 1000


def packing_us(cb: Any, n: int = 3000) -> float:
    """Median us of the rank-agreement packing and unpacking (the multi-process path of the step's
    signals, `StepReader.gathered`) with the all_gather replaced by a one-row identity: what that
    path adds on the host. The row carries what `StepReader.step_signals` gives it under
    torch.distributed: the preemption signal, this rank's own time, its LR ratio."""
    import torch

    own = cb.watchdog.watchdog.take_own_seconds() if cb.watchdog is not None else 0.0
    extra = [0.0, own, 1.0]  # preemption signal, own time (stragglers), LR over its schedule
    return _packing(cb.engine.reader, torch.tensor(2.5), torch.tensor(0.7), extra, n)


def _packing(reader: Any, loss: Any, grad_norm: Any, extra: list[float], n: int) -> float:
    """Median us of `reader.gathered` (pack, gather, unpack) with the collective an identity."""
    import self_healing.step_reader as mod

    saved = mod.gather_rows  # raises if the module no longer gathers (the code moved)
    mod.gather_rows = lambda v: v.reshape(1, -1)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            reader.gathered(loss, grad_norm, None, extra)
            out.append(time.perf_counter_ns() - t0)
    finally:
        mod.gather_rows = saved
        reader.healer.rank_rows = None
    return statistics.median(out) / 1000


STEP_EVENTS = ("on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end")


def dispatch_us(tr: Any, cb: Any, n: int = 3000) -> tuple[int, int, float]:
    """(the plugin's callbacks on the trainer's list, step events, median us per event) that the
    Trainer's `CallbackHandler` spends calling them: every event goes to every callback, whether
    it does anything there or not. Measured with the handler's own `call_event` on stand-ins that
    do nothing, against an empty list (the callbacks' own work is in the rows above)."""
    from transformers import TrainerCallback

    handler = tr.callback_handler
    ours = [c for c in handler.callbacks if type(c).__module__.startswith("self_healing")]
    saved = handler.callbacks
    args, state, control = tr.args, tr.state, tr.control
    out = []
    try:
        for _ in range(n):
            handler.callbacks = [TrainerCallback() for _ in ours]
            t0 = time.perf_counter_ns()
            handler.call_event("on_step_end", args, state, control)
            with_ours = time.perf_counter_ns() - t0
            handler.callbacks = []
            t0 = time.perf_counter_ns()
            handler.call_event("on_step_end", args, state, control)
            out.append(with_ours - (time.perf_counter_ns() - t0))
    finally:
        handler.callbacks = saved
    return len(ours), len(STEP_EVENTS), max(statistics.median(out), 0.0) / 1000


LOOP_ROWS = ("before_step (signals, detectors, decision)", "after_step (count, checks when due)",
             "odometer: its optimizer post-step hook", "journal: step record (CrashJournal.progress)")
"""The engine's per-step path as a plain loop calls it (`self_healing.Healer`), one timer per call."""


def loop_cost(size: str, preset: str, steps: int, warmup: int, warm_reps: int = 2000) -> dict[str, Any]:
    """The engine's per-step path in a plain PyTorch loop (`self_healing.Healer`), timed two ways
    with one timer per call and nothing nested (no timer's own cost lands in a row):

    - *in the loop*: each call where the loop makes it, right after a real forward, backward and
      AdamW step of the model (the caches as training leaves them), min/median/p90 over steps;
    - *warm*: the same calls on the same facts, back to back, `warm_reps` times: the code's own cost.

    The rows: `before_step` (the step's facts, detectors, decision; less the gradient norm it
    measures, given apart: a loop that clips measures it anyway), `after_step` (less the steps
    where the integrity pass or a snapshot was due: periodic, not per-step work), the update
    odometer (the optimizer's post-step hook) and the crash journal's step record (the call the
    Trainer adapter makes at every step end). Nothing here depends on the Trainer."""
    import torch

    from self_healing import HealingConfig, Healer
    from self_healing.journal import CrashJournal
    from self_healing.snapshot import REACH, unwrap_optimizer
    from self_healing.tiny import tiny_llama

    hidden, layers, bs = C.SIZES[size]
    torch.manual_seed(0)
    model = tiny_llama(hidden=hidden, layers=layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    clock = time.perf_counter_ns
    per_step: list[list[float]] = []
    norm_ns: list[int] = []
    with tempfile.TemporaryDirectory(prefix="sh-loop-cost-") as tmp:
        healer = Healer(model, opt, sched, config=getattr(HealingConfig, preset)(), output_dir=tmp)
        journal = CrashJournal(Path(tmp) / "healing-journal.jsonl")
        journal.start({"benchmark": "step_cost loop"})
        measure_norm = healer._grad_norm
        last_norm: list[Any] = [None]

        def timed_norm() -> Any:  # the loop's own measurement: taken out of before_step's row
            t0 = clock()
            last_norm[0] = measure_norm()
            norm_ns.append(clock() - t0)
            return last_norm[0]

        healer._grad_norm = timed_norm
        hook_ns = [0]
        reach = None

        def periodic() -> bool:  # asked before after_step: a capture there may change the interval
            return any(healer.snapshots.due(healer.step))

        try:
            for i in range(steps):
                ids = torch.randint(0, vocab, (bs, 64), generator=gen)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                t0 = clock()
                ok = healer.before_step(loss)
                before = clock() - t0 - norm_ns[-1]
                hook_ns[0] = 0
                if ok:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    if reach is None:
                        reach = REACH.track(unwrap_optimizer(opt))  # the one the engine's first report installed
                        if reach is not None and reach.known:
                            inner = reach.after_step

                            def odometer(o: Any, _inner: Any = inner) -> None:
                                t1 = clock()
                                _inner(o)
                                hook_ns[0] += clock() - t1

                            reach.after_step = odometer
                    opt.step()
                    sched.step()
                opt.zero_grad()
                due = periodic()
                t0 = clock()
                healer.after_step()
                after = clock() - t0
                facts = (healer.step, loss.item(), last_norm[0].item(), opt.param_groups[0]["lr"])  # floats, as
                t0 = clock()  # the Trainer adapter hands them over: the reads are not the record's
                journal.progress(*facts)
                record = clock() - t0
                if i >= warmup and not due:
                    per_step.append([before / 1000, after / 1000, hook_ns[0] / 1000, record / 1000])
            # warm: the same calls on the last step's facts, back to back
            norm = last_norm[0]
            healer._grad_norm = lambda: norm
            warm: list[list[int]] = [[], [], [], []]
            lv, nv, lr = loss.item(), norm.item(), opt.param_groups[0]["lr"]
            for _ in range(warm_reps):
                t0 = clock()
                healer.before_step(loss)
                t1 = clock()
                if reach is not None and reach.known:
                    inner(opt)
                t2 = clock()
                due = periodic()
                t3 = clock()
                healer.after_step()
                t4 = clock()
                journal.progress(healer.step, lv, nv, lr)
                t5 = clock()
                if not due:
                    for k, dt in enumerate((t1 - t0, t4 - t3, t2 - t1, t5 - t4)):
                        warm[k].append(dt)
            events = len(healer.recorder.events)
            pack = _packing(healer.reader, loss, norm, [1.0], warm_reps)
        finally:
            journal.close("completed", healer.step)
            healer.finish()
    rows = {}
    for k, lab in enumerate(LOOP_ROWS):
        vals = [s[k] for s in per_step]
        rows[lab] = (min(vals), statistics.median(vals), q(vals, 0.9), statistics.median(warm[k]) / 1000)
    totals = [sum(s) for s in per_step]
    warm_total = [sum(w) / 1000 for w in zip(*warm)]
    return dict(size=size, preset=preset, params=C.n_params(model), rows=rows, totals=totals,
                warm=statistics.median(warm_total), norm=statistics.median(norm_ns[warmup:]) / 1000, pack=pack,
                steps=len(per_step), events=events)


def report_loop(r: dict[str, Any]) -> bool:
    """Print the plain-loop table; True when the warm per-step path is within the target."""
    print(f"\n## plain loop: {r['size']} ({C.fmt_params(r['params'])} parameters), {r['preset']} preset: "
          f"{r['steps']} steps timed (those with an integrity pass or a snapshot due left out)")
    rows = [[lab, f"{warm:.1f}", f"{lo:.1f}", f"{med:.1f}", f"{p90:.1f}"]
            for lab, (lo, med, p90, warm) in r["rows"].items()]
    tot = r["totals"]
    rows.append(["**the engine's per-step path**", f"**{r['warm']:.1f}**", f"{min(tot):.1f}",
                 f"**{statistics.median(tot):.1f}**", f"{q(tot, 0.9):.1f}"])
    rows.append(["+ under DDP: the rank-agreement packing (the collective excluded)", f"{r['pack']:.1f}",
                 "-", "-", "-"])
    rows.append(["(apart) the gradient norm before_step measures (a loop that clips measures it too)", "-", "-",
                 f"{r['norm']:.1f}", "-"])
    print(C.table(["component (one timer per call)", "warm us", "in the loop: min us", "median us", "p90 us"], rows))
    good = r["warm"] + r["pack"] <= TARGET_US
    print(f"plain-loop engine path, {r['size']} {r['preset']}: warm {r['warm']:.1f} us, {r['warm'] + r['pack']:.1f} us "
          f"with the DDP packing (target <= {TARGET_US:.0f} us): "
          f"{'ok' if good else 'ABOVE TARGET'}; in the loop median {statistics.median(tot):.1f} us, "
          f"min {min(tot):.1f} us")
    if r["events"]:
        print(f"note: {r['events']} event(s) recorded on a clean loop")
    return good


def q(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(int(p * len(s)), len(s) - 1)] if s else float("nan")


def measure(size: str, preset: str, steps: int, warmup: int, overhead_ns: float) -> dict[str, Any]:
    from transformers import TrainerCallback

    from self_healing import HealingConfig, SelfHealingTrainer

    t = Timers(overhead_ns)
    sh: Any = None

    class StepBoundary(TrainerCallback):
        """First in the callback list: a step's window opens before the plugin's on_step_begin."""

        def on_train_begin(self, args, state, control, **kwargs):
            instrument_run(sh.callback, t)  # after start_run, before the plugin's own on_train_begin
            return control

        def on_step_begin(self, args, state, control, **kwargs):
            t.flush()
            return control

        def on_train_end(self, args, state, control, **kwargs):
            t.flush()
            t.on = False
            return control

    saved = [(m, n, getattr(importlib.import_module(m), n)) for m, n, _ in PATCHED]  # raises if one moved
    with tempfile.TemporaryDirectory(prefix="sh-step-cost-") as tmp:
        tr = C.build(size, tmp, max_steps=steps)
        tr.add_callback(StepBoundary())
        inner = {}
        for name in ("get_batch_samples", "training_step", "_get_grad_norm", "_clip_grad_norm",
                     "_get_num_items_in_batch"):
            if hasattr(tr, name):  # the Trainer's own method, timed where the plugin's wrapper calls it
                inner[name] = t.timed(getattr(tr, name), TRAINER_WORK)
                setattr(tr, name, inner[name])
        sh = SelfHealingTrainer(tr, getattr(HealingConfig, preset)())
        try:
            instrument(tr, sh, inner, t)
            sh.train()
        finally:
            for m, n, f in saved:
                setattr(sys.modules[m], n, f)
        cb = sh.callback
        check_rows(t, cb, tr)
        pack = packing_us(cb)
        dispatch = dispatch_us(tr, cb)
        clip = clipping_us(tr) if cb.zclip is not None else None
        n = C.n_params(tr.model)
        interval, check_every = cb.snapshot_interval, cb.config.integrity_check_every_steps
        events = len(cb.recorder.events)
    per_step = t.steps[warmup:-1]  # the last window holds the train-end work
    labels = [lab for lab in t.order if lab != TRAINER_WORK and any(lab in s for s in t.steps)]
    rows = {}
    for lab in labels:
        vals = [s.get(lab, 0) / 1000 for s in per_step]
        rows[lab] = (min(vals), statistics.median(vals), q(vals, 0.9), sum(vals) / len(vals), t.calls[lab])
    skip = (TRAINER_WORK,) + PERIODIC + CLIP_ROWS
    totals = [sum(v for k, v in s.items() if k not in skip) / 1000 for s in per_step]
    engine = [sum(v for k, v in s.items() if k in ENGINE_ROWS) / 1000 for s in per_step]
    if clip is not None:  # ZClip's clipping in place of the Trainer's: only the difference is the plugin's
        totals = [x + clip[1] - clip[0] for x in totals]
    periodic = {lab: [s[lab] / 1000 for s in t.steps if lab in s] for lab in PERIODIC}
    return dict(size=size, preset=preset, params=n, rows=rows, totals=totals, engine=engine, dispatch=dispatch,
                periodic=periodic, pack=pack,
                clip=clip, steps=len(per_step), all_steps=len(t.steps), interval=interval, check_every=check_every,
                events=events)


def report(r: dict[str, Any]) -> bool:
    """Print one run's table; True when the per-step path is within the target."""
    print(f"\n## {r['size']} ({C.fmt_params(r['params'])} parameters), {r['preset']} preset: {r['steps']} steps timed, "
          f"integrity pass every {r['check_every']}, snapshot every {r['interval']}")
    rows = [[lab + (" (replaces the Trainer's clipping)" if lab in CLIP_ROWS else ""), f"{lo:.1f}", f"{med:.1f}",
             f"{p90:.1f}", f"{mean:.1f}", calls] for lab, (lo, med, p90, mean, calls) in r["rows"].items()
            if lab not in PERIODIC]
    if r["clip"] is not None:
        bare, z = r["clip"]
        rows.append([f"ZClip clipping {z:.0f} us - the Trainer's clip_grad_norm_ {bare:.0f} us (direct, same grads)",
                     "-", f"{z - bare:+.1f}", "-", "-", "direct"])
    med_t, p90_t = statistics.median(r["totals"]), q(r["totals"], 0.9)
    eng = r["engine"]
    med_e, p90_e = statistics.median(eng), q(eng, 0.9)
    rows.append(["**the engine's per-step path** (signals, detectors, decision, record, journal line, odometer)",
                 f"{min(eng):.1f}", f"**{med_e:.1f}**", f"**{p90_e:.1f}**", f"{sum(eng) / len(eng):.1f}", ""])
    rows.append(["**per-step path in all** (+ the HF adapter: wrappers, callback events, watchdog)",
                 f"{min(r['totals']):.1f}", f"**{med_t:.1f}**",
                 f"**{p90_t:.1f}**", f"{sum(r['totals']) / len(r['totals']):.1f}", ""])
    for lab, vals in r["periodic"].items():
        if vals:
            rows.append([f"{lab}: median {statistics.median(vals):.0f} us per call", "-", "-", "-",
                         f"{sum(vals) / r['all_steps']:.1f} (amortized)", len(vals)])
    if r["pack"] is not None:
        rows.append(["rank-agreement packing (multi-process signals, collective excluded)", "-",
                     f"{r['pack']:.1f}", "-", "-", "direct"])
    n_cb, n_ev, per_event = r["dispatch"]
    rows.append([f"the Trainer's dispatch of {n_ev} step events to the plugin's {n_cb} callbacks (not in the rows "
                 "above)", "-", f"{per_event * n_ev:.1f}", "-", "-", "direct"])
    print(C.table(["component", "min us/step", "median us/step", "p90 us/step", "mean us/step", "calls"], rows))
    good = med_e <= TARGET_US
    print(f"engine per-step path, {r['size']} {r['preset']}: median {med_e:.1f} us, p90 {p90_e:.1f} us, "
          f"min {min(eng):.1f} us (target <= {TARGET_US:.0f} us): {'ok' if good else 'ABOVE TARGET'}; "
          f"in all with the HF adapter: median {med_t:.1f} us, min {min(r['totals']):.1f} us")
    if r["events"]:
        print(f"note: {r['events']} event(s) recorded on a clean run")
    return good


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "3M", "25M"], choices=list(C.SIZES))
    p.add_argument("--presets", nargs="+", default=["default", "aggressive"])
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: 120 tiny, 80 3M, 40 25M)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the statistics")
    p.add_argument("--paths", nargs="+", default=["trainer", "loop"], choices=["trainer", "loop"],
                   help="the Trainer run (every component, the HF adapter's too) and/or the plain loop")
    a = p.parse_args(argv)
    C.quiet()
    C.single_thread()
    overhead = timer_cost_ns()
    print(f"# step_cost: {C.device_name()}, {C.load_average()}, an empty Python call takes {python_call_ns():.0f} ns "
          f"now; a timer costs ~{overhead:.0f} ns (taken back from its caller's row)", flush=True)
    ok = True
    for size in a.sizes:
        for preset in a.presets:
            steps = a.steps or DEFAULT_STEPS[size]
            if "trainer" in a.paths:
                ok &= report(measure(size, preset, steps, a.warmup, overhead))
            if "loop" in a.paths:
                ok &= report_loop(loop_cost(size, preset, steps, a.warmup))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
