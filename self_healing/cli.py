"""`self-healing` command line: demo, report, presets, validate."""

from __future__ import annotations

import argparse
import json
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
}


def _quiet() -> None:
    warnings.filterwarnings("ignore")
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
    _quiet()
    from . import HealingConfig, SelfHealingTrainer
    from .faults import Fault, inject_faults
    from .postmortem import format_postmortem
    from .tiny import build_trainer, logged_losses

    kind, extra = DEMO_FAULTS[args.fault]
    out = Path(args.output_dir)
    print(f"self-healing demo: tiny {args.trainer.upper()} run, {args.steps} steps on CPU, "
          f"fault '{kind}' injected at step {args.step}\n")
    trainer = build_trainer(args.trainer, output_dir=str(out), max_steps=args.steps, logging_steps=10)
    inject_faults(trainer, Fault(kind, step=args.step, **extra))
    sh = SelfHealingTrainer(trainer, HealingConfig.from_preset(args.preset))
    sh.train()
    pm = sh.postmortem
    print()
    print(format_postmortem(pm))
    print(f"\nfinal loss {logged_losses(trainer)[-1]:.4f}; postmortem: {out / 'postmortem.json'}")
    brief = {k: pm[k] for k in ("exit_reason", "last_step", "timestamp", "running_time_seconds")}
    brief["recovery_actions"] = [{k: v for k, v in a.items() if k in ("step", "failure", "diagnosis", "actions")}
                                 for a in pm["recovery_actions"]]
    print(json.dumps(brief, indent=2))
    return 0 if pm["exit_reason"] == "completed" else 1


def cmd_report(args: argparse.Namespace) -> int:
    from .postmortem import format_postmortem, load_postmortem

    try:
        pm = load_postmortem(args.path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_postmortem(pm))
    return 0 if pm.get("exit_reason") == "completed" else 1


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import PRESET_NAMES, HealingConfig

    cfgs = {n: HealingConfig.from_preset(n).to_dict() for n in PRESET_NAMES}
    width = max(len(k) for k in cfgs["default"])
    print(f"{'field':<{width}}  " + "  ".join(f"{n:>13}" for n in PRESET_NAMES))
    for k in cfgs["default"]:
        print(f"{k:<{width}}  " + "  ".join(f"{str(cfgs[n][k]):>13}" for n in PRESET_NAMES))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .config import HealingConfig

    try:
        HealingConfig.from_preset(args.path)
    except ValueError as e:
        print(f"invalid: {e}", file=sys.stderr)
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
    d.set_defaults(func=cmd_demo)
    r = sub.add_parser("report", help="summarise a postmortem (exit code 0 only if the run completed)")
    r.add_argument("path", help="an output dir or a postmortem.json")
    r.set_defaults(func=cmd_report)
    ps = sub.add_parser("presets", help="list the presets and their values")
    ps.set_defaults(func=cmd_presets)
    v = sub.add_parser("validate", help="check a YAML config file")
    v.add_argument("path")
    v.set_defaults(func=cmd_validate)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
