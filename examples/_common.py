"""What the examples share and that is not about self-healing: command-line flags, the offline tiny
model versus a Hub model, the per-device training arguments, and the closing report.

Offline (the default, and what CI runs): a tiny Llama built from a config, a character tokenizer and
small synthetic datasets from `self_healing.tiny`. Nothing is downloaded; each example trains on a
laptop CPU in seconds. With `--model NAME` (a Hub name or a local directory) the same script loads
it with `from_pretrained` and trains on the GPU in bf16 when there is one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing


def parse_args(name: str, doc: str | None, argv: list[str] | None = None, **extra: Any) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"examples/{name}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hub model name or local path (default: the tiny offline model)")
    p.add_argument("--dataset", help="a Hub dataset name in TRL's format for this trainer (default: a small "
                                     "synthetic one, which works with any tokenizer)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: 30 offline, 200 with --model)")
    p.add_argument("--preset", default="default",
                   help="self-healing preset: default, aggressive, conservative, or a YAML file")
    p.add_argument("--output-dir", default=f"outputs/{name}")
    p.add_argument("--fault", metavar="KIND@STEP",
                   help="rehearse a failure, e.g. nan_loss@15 or lr_scale@10 (kinds: self_healing.faults)")
    p.add_argument("--seed", type=int, default=0)
    for flag, kwargs in extra.items():
        p.add_argument(f"--{flag.replace('_', '-')}", **kwargs)
    args = p.parse_args(argv)
    args.offline = args.model is None
    if args.max_steps is None:
        args.max_steps = 30 if args.offline else 200
    quiet(args.offline)
    return args


def quiet(offline: bool = True) -> None:
    """The demo's quiet output, unless SELF_HEALING_EXAMPLES_VERBOSE is set."""
    if not os.environ.get("SELF_HEALING_EXAMPLES_VERBOSE"):
        from self_healing.cli import quiet as _quiet

        _quiet(offline)


def model_and_tokenizer(args: argparse.Namespace, seed_offset: int = 0):
    """The tiny offline Llama and its tokenizer, or `--model` with `from_pretrained`."""
    if args.offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from self_healing.tiny import tiny_llama, tiny_tokenizer

        tok = tiny_tokenizer()
        return tiny_llama(tok, seed=args.seed + seed_offset), tok
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype), tok


def dataset(args: argparse.Namespace, synthetic):
    """`--dataset` from the Hub, or the synthetic one (`synthetic(seed=...)` from self_healing.tiny)."""
    if args.dataset:
        from datasets import load_dataset

        return load_dataset(args.dataset, split="train")
    return synthetic(seed=args.seed)


def training_args(args: argparse.Namespace, lr_offline: float, lr_model: float, **overrides: Any) -> dict[str, Any]:
    """Arguments for any TRL config: the tiny model trains on the CPU, a real one on the GPU in bf16."""
    import torch

    cuda = torch.cuda.is_available() and not args.offline
    out = dict(output_dir=args.output_dir, max_steps=args.max_steps,
               learning_rate=lr_offline if args.offline else lr_model,
               logging_steps=5 if args.offline else 10, report_to="none", save_strategy="no", seed=args.seed,
               lr_scheduler_type="constant_with_warmup", warmup_steps=3 if args.offline else 20,
               use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(), disable_tqdm=args.offline,
               dataloader_num_workers=0)
    out.update(overrides)
    return out


def inject(trainer: Any, args: argparse.Namespace) -> None:
    """`--fault KIND@STEP`: install a rehearsal failure (see self_healing.faults)."""
    if not args.fault:
        return
    from self_healing.faults import Fault, inject_faults

    kind, _, step = args.fault.partition("@")
    try:
        fault = Fault(kind, step=int(step or max(args.max_steps // 2, 1)))
    except ValueError as e:
        raise SystemExit(f"--fault {args.fault!r}: {e}") from None
    inject_faults(trainer, fault)
    print(f"rehearsal: {fault.kind} will be injected at step {fault.step}")


def finish(sh: Any) -> int:
    """Print the run's report; the exit code says whether it completed (for schedulers)."""
    from self_healing.postmortem import format_postmortem

    print()
    print(format_postmortem(sh.postmortem))
    path = sh.config.resolved_postmortem_path(sh.trainer.args.output_dir)
    print(f"\npostmortem: {path}  (plot: self-healing report {path} --plot report.png)")
    return 0 if sh.exit_reason == "completed" else 1
