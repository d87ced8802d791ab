"""`self-healing` command line: demo, report, presets, validate."""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

DEMO_FAULTS = {
    "nan": ("nan_loss", {}),
    "inf": ("inf_loss", {}),
    "nan_grad": ("nan_grad", {}),
    "grad": ("grad_scale", {}),
    "weights": ("nan_weight", {}),
    "scale": ("weight_scale", {}),
    "adam": ("zero_exp_avg_sq", {}),
    "spike": ("lr_scale", {"duration": 3}),
    "oom": ("exception", {}),   # an OOM for any batch larger than half the configured one, from `step` on
    "data": ("exception", {}),  # a shape error from one batch, once
}


def _exception_fault(name: str, step: int, trainer):
    import torch

    from .faults import Fault

    if name == "oom":
        half = trainer.args.per_device_train_batch_size // 2
        return Fault("exception", step=step, duration=10**6,
                     exception=lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                     when=lambda t, inputs: t.args.per_device_train_batch_size > half)
    return Fault("exception", step=step, times=1, exception=lambda: RuntimeError(
        "The size of tensor a (64) must match the size of tensor b (65) at non-singleton dimension 1"))


def quiet(offline: bool = True) -> None:
    """Keep a demo's or an example's output to the training logs and what self-healing says."""
    warnings.filterwarnings("ignore")
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


def cmd_demo(args: argparse.Namespace) -> int:
    quiet()
    from . import HealingConfig, SelfHealingTrainer
    from .faults import Fault, inject_faults
    from .tiny import build_trainer

    kind, extra = DEMO_FAULTS[args.fault]
    out = Path(args.output_dir)
    cfg = args.config if isinstance(getattr(args, "config", None), HealingConfig) else HealingConfig.from_preset(args.preset)
    print(f"self-healing demo: tiny {args.trainer.upper()} run, {args.steps} steps on CPU, "
          f"fault '{kind}' injected at step {args.step}\n")
    trainer = build_trainer(args.trainer, output_dir=str(out), max_steps=args.steps, logging_steps=10)
    fault = (_exception_fault(args.fault, args.step, trainer) if kind == "exception"
             else Fault(kind, step=args.step, **extra))
    inject_faults(trainer, fault)
    sh = SelfHealingTrainer(trainer, cfg)
    sh.train()
    print()
    plot = None if args.no_plot else (args.plot or str(out / "report.png"))
    return _report(sh.postmortem, plot, source=str(out / "postmortem.json"))


def _report(pm: dict, plot: str | None, source: str, max_events: int = 20) -> int:
    """Print the summary, draw the plot when asked; 0 only when the run completed."""
    from .postmortem import format_postmortem

    print(format_postmortem(pm, max_events=max_events))
    print(f"\npostmortem: {source}")
    if plot:
        from .report import PlotUnavailable, plot_postmortem

        try:
            plot_postmortem(pm, plot)
            print(f"plot: {plot}")
        except PlotUnavailable as e:
            print(f"no plot: {e}", file=sys.stderr)
        except OSError as e:  # checked before the run; the disk can still change under it
            print(f"self-healing: error: argument --plot: cannot write {plot!r} ({_os_error(e)})", file=sys.stderr)
            return 2
    return 0 if pm.get("exit_reason") == "completed" else 1


def cmd_report(args: argparse.Namespace) -> int:
    from .postmortem import load_postmortem

    try:
        pm = load_postmortem(args.path)
    except ValueError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a postmortem the user may not read
        print(f"error: cannot read {args.path!r} ({_os_error(e)})", file=sys.stderr)
        return 2
    src = Path(args.path)
    return _report(pm, args.plot, source=str(src / "postmortem.json" if src.is_dir() else src),
                   max_events=10**9 if args.all else 20)


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import PRESET_NAMES, HealingConfig

    if args.name:
        try:
            print(HealingConfig.from_preset(args.name).to_yaml(), end="")
        except (ValueError, OSError) as e:
            print(f"error: {_one_line(str(e))}", file=sys.stderr)
            return 2
        return 0
    cfgs = {n: HealingConfig.from_preset(n).to_dict() for n in PRESET_NAMES}
    width = max(len(k) for k in cfgs["default"])
    print(f"{'field':<{width}}  " + "  ".join(f"{n:>13}" for n in PRESET_NAMES))
    for k in cfgs["default"]:
        print(f"{k:<{width}}  " + "  ".join(f"{_cell(cfgs[n][k]):>13}" for n in PRESET_NAMES))
    return 0


def _cell(v: object) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def cmd_validate(args: argparse.Namespace) -> int:
    from .config import HealingConfig

    path = Path(args.path)
    try:
        if not path.is_file():
            raise ValueError(f"{str(path)!r} is not a file")
        problems = HealingConfig.problems(HealingConfig.parse_yaml(path.read_bytes(), source=str(path)))
    except (OSError, ValueError) as e:
        problems = [str(e)]
    if problems:
        print(f"{args.path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}", file=sys.stderr)
        for msg in problems:
            print(f"  - {msg}", file=sys.stderr)
        return 1
    print(f"{args.path}: valid")
    return 0


class _Parser(argparse.ArgumentParser):
    """An input error is one line on stderr (the option, what was given, what is accepted) and
    exit code 2; exit code 1 stays "the run did not complete"."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _os_error(e: OSError) -> str:
    return f"{type(e).__name__}: {e.strerror or e}"


def _int_at_least(lo: int, hi: int = 10**9):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}, got {text!r}")
        return v

    return parse


def _writable_dir(d: Path) -> str | None:
    """None when files can be created in `d` (made, with its parents, if missing), else why not.
    The check writes and removes one empty file: the only reliable answer (permissions, ACLs,
    read-only mounts, a full quota, root's exemptions)."""
    from .io import create_temp_file

    for parent in (d, *d.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{str(parent)!r} is a file, not a directory"
            break
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, name = create_temp_file(d, prefix=".self-healing-write-check.")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return _os_error(e)
    return None


def _check_plot(parser: argparse.ArgumentParser, plot: str | None) -> None:
    if plot is None:
        return
    p = Path(plot)
    if plot.strip() == "" or p.is_dir():
        parser.error(f"argument --plot: {plot!r} is not a file path (expected FILE.png in a writable directory)")
    why = _writable_dir(p.parent)
    if why is not None:
        parser.error(f"argument --plot: cannot write {plot!r} ({why}); expected FILE.png in a writable directory")


def _check_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every demo input, before anything is imported or built (a bad one costs no model)."""
    from .config import HealingConfig

    if not 1 <= args.step <= args.steps:
        parser.error(f"argument --step: {args.step} is outside the run: expected an integer from 1 to --steps "
                     f"({args.steps})")
    try:
        args.config = HealingConfig.from_preset(args.preset)
    except (ValueError, OSError) as e:
        parser.error(f"argument --preset: {e}")
    out = Path(args.output_dir)
    if args.output_dir.strip() == "" or (out.exists() and not out.is_dir()):
        parser.error(f"argument --output-dir: {args.output_dir!r} is not a directory (expected a writable directory)")
    why = _writable_dir(out)
    if why is not None:
        parser.error(f"argument --output-dir: cannot write to {args.output_dir!r} ({why}); expected a writable "
                     "directory")
    _check_plot(parser, args.plot)


class _QuietOnBrokenPipe:
    """sys.stdout while a command runs. When the reader goes away (`self-healing report OUT | head
    -1`), the rest of the output is discarded -- stdout is pointed at os.devnull, as Python's docs
    recommend, so the interpreter's final flush cannot fail either -- and the command finishes
    with the exit code its own result gives: no traceback, and no exit code that depends on how
    fast the reader closed the pipe."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False

    def _discard(self) -> None:
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass  # not a real file descriptor (captured output): nothing will flush it at exit

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._discard()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._discard()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="self-healing", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="a tiny offline run with one injected fault, healed live")
    d.add_argument("--fault", choices=sorted(DEMO_FAULTS), default="nan")
    d.add_argument("--trainer", choices=["trainer", "sft", "dpo", "grpo"], default="sft")
    d.add_argument("--steps", type=_int_at_least(1, 100_000), default=60, help="training steps (1 to 100000)")
    d.add_argument("--step", type=_int_at_least(1, 100_000), default=25,
                   help="step at which the fault is injected (1 to --steps)")
    d.add_argument("--preset", default="default", help="default, aggressive, conservative or a .yaml file")
    d.add_argument("--output-dir", default="demo_output")
    plot = d.add_mutually_exclusive_group()
    plot.add_argument("--plot", metavar="FILE.png", help="where to draw the report (default: OUTPUT_DIR/report.png)")
    plot.add_argument("--no-plot", action="store_true", help="text report only")
    d.set_defaults(func=cmd_demo)
    r = sub.add_parser("report", help="summarise a postmortem; exit code 0 only if the run completed",
                       description="Print what happened in a run: how it ended and why (first line), its numbers, "
                                   "each recovery. Exit code: 0 completed, 1 any other ending, 2 unreadable input.")
    r.add_argument("path", help="an output dir or a postmortem.json")
    r.add_argument("--plot", metavar="FILE.png",
                   help="also draw loss, grad norm and LR with every event marked (needs matplotlib)")
    r.add_argument("--all", action="store_true", help="list every stored recovery (default: first and last 10)")
    r.set_defaults(func=cmd_report)
    ps = sub.add_parser("presets", help="list the presets and their values; with NAME, print that preset as YAML")
    ps.add_argument("name", nargs="?", help="a preset name or YAML file to print as YAML (a starting point to edit)")
    ps.set_defaults(func=cmd_presets)
    v = sub.add_parser("validate", help="check a YAML config file and name every bad field (exit code 1)")
    v.add_argument("path")
    v.set_defaults(func=cmd_validate)
    args = p.parse_args(argv)
    if args.command == "demo":
        _check_demo(d, args)
    elif args.command == "report":
        _check_plot(r, args.plot)
    real, guarded = sys.stdout, _QuietOnBrokenPipe(sys.stdout)
    sys.stdout = guarded
    try:
        rc = args.func(args)
        guarded.flush()
        return rc
    finally:
        if sys.stdout is guarded:
            sys.stdout = real


if __name__ == "__main__":
    raise SystemExit(main())
