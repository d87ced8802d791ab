"""`self-healing` command line: demo, report, presets, validate."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

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
    print(f"self-healing demo: tiny {args.trainer.upper()} run, {args.steps} steps on CPU, "
          f"fault '{kind}' injected at step {args.step}\n")
    trainer = build_trainer(args.trainer, output_dir=str(out), max_steps=args.steps, logging_steps=10)
    fault = (_exception_fault(args.fault, args.step, trainer) if kind == "exception"
             else Fault(kind, step=args.step, **extra))
    inject_faults(trainer, fault)
    sh = SelfHealingTrainer(trainer, HealingConfig.from_preset(args.preset))
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
    return 0 if pm.get("exit_reason") == "completed" else 1


def cmd_report(args: argparse.Namespace) -> int:
    from .postmortem import load_postmortem

    try:
        pm = load_postmortem(args.path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    src = Path(args.path)
    return _report(pm, args.plot, source=str(src / "postmortem.json" if src.is_dir() else src),
                   max_events=10**9 if args.all else 20)


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import PRESET_NAMES, HealingConfig

    if args.name:
        try:
            print(HealingConfig.from_preset(args.name).to_yaml(), end="")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="self-healing", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="a tiny offline run with one injected fault, healed live")
    d.add_argument("--fault", choices=sorted(DEMO_FAULTS), default="nan")
    d.add_argument("--trainer", choices=["trainer", "sft", "dpo", "grpo"], default="sft")
    d.add_argument("--steps", type=int, default=60)
    d.add_argument("--step", type=int, default=25, help="step at which the fault is injected")
    d.add_argument("--preset", default="default")
    d.add_argument("--output-dir", default="demo_output")
    d.add_argument("--plot", metavar="FILE.png", help="where to draw the report (default: OUTPUT_DIR/report.png)")
    d.add_argument("--no-plot", action="store_true", help="text report only")
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
    try:
        return args.func(args)
    except BrokenPipeError:  # `self-healing presets | head`
        sys.stderr.close()
        return 0 if args.command in ("presets", "validate") else 1


if __name__ == "__main__":
    raise SystemExit(main())
