"""What the benchmarks share: quiet offline setup, model sizes, step-by-step turn taking between
trainers in one process, and plain-text tables.

Timing method (see /work/shared/field-notes.md, "Measuring overhead on this noisy 2-core machine"):
two runs of the same program differ by 3-10% here from one run to the next, so the trainers being
compared run in *one* process with `torch.set_num_threads(1)`, each in its own thread, and take
turns one optimizer step at a time (`Turns`, a `threading.Condition` waited on at
`on_step_begin`). A step is timed from the moment its trainer gets the turn to its next
`on_step_begin`, so it includes everything the Trainer and the plugin do per step (data, forward,
backward, clipping, the optimizer, callbacks, logging) and none of the time spent waiting for the
others. The ratio quoted is the median of per-step ratios between neighbouring steps.

One more thing matters on Linux: glibc gives the main thread and each other thread their own
malloc arena, and with several model-sized trainers in one process the main thread's steps ran
2-9% faster than the same trainer's in a helper thread (an A/A run, two bare trainers, read
0.92-0.97 instead of 1.00 under load). `MALLOC_ARENA_MAX=1` (one arena for every thread) brings
the A/A ratio to 1.00 +- 0.01; `overhead.py` restarts itself with it set before anything is
allocated, and the runs also rotate which trainer owns the main thread.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

# name -> (hidden, layers, per-device batch): ~3M and ~25M parameter Llamas with the tiny
# character tokenizer. The 25M one trains on a smaller batch to keep a CPU run to minutes; a
# shorter step only makes a fixed per-step cost weigh more.
SIZES = {
    "tiny": (64, 2, 8),
    "3M": (256, 5, 8),
    "25M": (512, 10, 2),
}


def quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("self_healing").setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    for name in ("arc", "ARC", "arc.core"):
        logging.getLogger(name).setLevel(logging.ERROR)


def single_thread() -> None:
    """One intra-op thread per trainer: the comparison is then between equal, unshared workloads."""
    torch.set_num_threads(1)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, torch threads={torch.get_num_threads()})"


def load_average() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def build(size: str, output_dir: str, max_steps: int, kind: str = "sft", seed: int = 0, **overrides: Any):
    from self_healing.tiny import build_trainer

    hidden, layers, bs = SIZES[size]
    args: dict[str, Any] = dict(per_device_train_batch_size=bs, logging_steps=10)
    if torch.cuda.is_available():
        args["use_cpu"] = False
    else:
        # TRL's configs default to bf16 where torch allows it; on this CPU bf16 autocast is emulated
        # and makes the 3M step ~15x slower (3 s, not 0.2 s): nobody trains that way, and a step that
        # slow hides the plugin's cost in the ratio. fp32 on CPU, as users run it there.
        args["bf16"] = False
    args.update(overrides)
    tr = build_trainer(kind, output_dir=output_dir, max_steps=max_steps, hidden=hidden, layers=layers, seed=seed,
                       **args)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    tr.remove_callback(PrinterCallback)  # the log dicts printed every logging step
    tr.remove_callback(ProgressCallback)
    return tr


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


# ------------------------------------------------------------------------------------------------
# turn taking
# ------------------------------------------------------------------------------------------------
class Turns:
    """A ring of named runners that take one step each in turn."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.cond = threading.Condition()
        self.turn = self.names[0]
        self.done: set[str] = set()
        self.times: dict[str, list[float]] = {n: [] for n in self.names}

    def _next_after(self, me: str) -> str:
        i = self.names.index(me)
        for k in range(1, len(self.names) + 1):
            cand = self.names[(i + k) % len(self.names)]
            if cand not in self.done:
                return cand
        return me

    def hand_over_and_wait(self, me: str) -> None:
        with self.cond:
            self.turn = self._next_after(me)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.turn == me)

    def wait_first_turn(self, me: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == me)

    def finish(self, me: str) -> None:
        with self.cond:
            self.done.add(me)
            self.turn = self._next_after(me)
            self.cond.notify_all()


class TurnCallback(TrainerCallback):
    """Waits for its turn at every `on_step_begin` and times the step that just ended."""

    def __init__(self, turns: Turns, name: str) -> None:
        self.turns = turns
        self.name = name
        self.t0: float | None = None
        self.sinks: list[Any] = []

    def feed_step_times_to(self, callback: Any) -> None:
        """The plugin times steps from one `on_step_end` to the next, which here would include the
        other trainers' turns and make "auto" snapshot several times too often. Give it the step
        times measured here instead, as it would see them running alone."""
        window = _StepTimes(maxlen=callback.engine.step_times.maxlen)
        callback.engine.step_times = window
        self.sinks.append(window)

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.t0 is None:
            self.turns.wait_first_turn(self.name)
        else:
            self.turns.times[self.name].append(now - self.t0)
            for sink in self.sinks:
                sink.feed(now - self.t0)
            self.turns.hand_over_and_wait(self.name)
        self.t0 = time.perf_counter()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.turns.finish(self.name)  # the last step is not timed: it also holds the train-end work
        return control


class _StepTimes(deque):
    """A step-time window that only `TurnCallback` writes to."""

    def append(self, x: float) -> None:
        pass

    def feed(self, x: float) -> None:
        super().append(x)


def run_interleaved(turns: Turns, runners: dict[str, Callable[[], Any]], main: str) -> dict[str, BaseException]:
    """Run each `runners[name]()` (a `train()` call whose trainer carries a `TurnCallback(name)`),
    `main` in this thread and the others in helper threads. Returns the exceptions raised."""
    errors: dict[str, BaseException] = {}

    def wrap(name: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def go() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the caller
                errors[name] = exc
                turns.finish(name)  # never leave the others waiting for a turn that will not come

        return go

    threads = [threading.Thread(target=wrap(n, fn), name=n, daemon=True) for n, fn in runners.items() if n != main]
    for t in threads:
        t.start()
    wrap(main, runners[main])()
    for t in threads:
        t.join()
    return errors


def paired_ratios(num: Sequence[float], den: Sequence[float], skip: int) -> list[float]:
    return [a / b for a, b in zip(list(num)[skip:], list(den)[skip:]) if b > 0]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ci95_of_median(xs: Sequence[float]) -> tuple[float, float]:
    """Distribution-free 95% interval of the median (order statistics)."""
    s = sorted(xs)
    n = len(s)
    if n < 6:
        return (float("nan"), float("nan"))
    half = 1.96 * (n ** 0.5) / 2
    lo = max(int(n / 2 - half), 0)
    hi = min(int(n / 2 + half), n - 1)
    return s[lo], s[hi]


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (readable in a terminal too)."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def _cell(c: Any) -> str:
    if isinstance(c, float):
        if c != c:
            return "n/a"
        if abs(c) >= 100:
            return f"{c:.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        return f"{c:.3f}" if abs(c) < 1 else f"{c:.2f}"
    return str(c)
