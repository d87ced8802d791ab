"""What the plain-loop examples share: a toy task small enough for a CPU (an MLP fitting a noisy
linear map), their command line, and the report at the end. The loops themselves are in each
example, written out, since they are what the example shows."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

import torch  # noqa: E402


def parse_args(name: str, doc: str | None, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"examples/{name}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--preset", default="default",
                   help="self-healing preset: default, aggressive, conservative, or a YAML file")
    p.add_argument("--output-dir", default=f"outputs/{name}")
    p.add_argument("--fault", metavar="KIND@STEP",
                   help="rehearse a failure, e.g. nan_loss@30 or nan_weight@30 (kinds: self_healing.faults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-healer", action="store_true", help="the same loop without self-healing (to compare)")
    return p.parse_args(argv)


def toy_task(seed: int = 0, n: int = 1024, dim: int = 16) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP and a noisy linear regression data set for it."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, dim, generator=g)
    y = x @ torch.randn(dim, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    return model, x, y


def batches(x: torch.Tensor, y: torch.Tensor, steps: int, size: int = 32, rank: int = 0, world: int = 1):
    """`steps` batches, cycling through the data; under DDP each rank takes its own slice."""
    n = x.shape[0]
    for s in range(steps):
        start = (s * size * world + rank * size) % n
        idx = torch.arange(start, start + size) % n
        yield x[idx], y[idx]


def rehearse(healer: Any, args: argparse.Namespace) -> None:
    """`--fault KIND@STEP`: install a rehearsal failure on the healer's loop."""
    if not args.fault or healer is None:
        return
    from self_healing.faults import Fault, inject_faults

    kind, _, step = args.fault.partition("@")
    try:
        inject_faults(healer, Fault(kind, step=int(step or max(args.max_steps // 2, 1))))
    except ValueError as e:
        raise SystemExit(f"--fault {args.fault!r}: {e}") from None
    print(f"rehearsal: {kind} will be injected at step {healer.faults.faults[0].step}")


def report(healer: Any, final_loss: float) -> int:
    """Print the run's report; the exit code says whether it completed."""
    print(f"final loss on the whole data set: {final_loss:.4f}")
    if healer is None:
        return 0
    from self_healing.postmortem import format_postmortem

    pm = healer.finish()
    print()
    print(format_postmortem(pm))
    if healer.output_dir is not None:
        print(f"\npostmortem: {healer.config.resolved_postmortem_path(healer.output_dir)}")
    return 0 if pm["exit_reason"] == "completed" else 1
