"""Shared helpers for the tests that train real tiny models."""
import json
from pathlib import Path

from self_healing import HealingConfig, SelfHealingTrainer
from self_healing.faults import Fault, inject_faults
from self_healing.tiny import build_trainer, tail_loss, weights_finite  # noqa: F401

FAULT_FAILURE = {
    "nan_loss": "nan_loss",
    "inf_loss": "nan_loss",
    "nan_grad": "nonfinite_gradient",
    "grad_scale": "gradient_explosion",
    "nan_weight": "weight_corruption",
    "weight_scale": "weight_corruption",
    "zero_exp_avg_sq": "optimizer_state_corruption",
    "lr_scale": "lr_spike",
}


def fault_for(kind: str, step: int = 25) -> Fault:
    return Fault(kind, step=step, duration=3 if kind == "lr_scale" else 1)


def run_healed(kind, tmp_path, faults=(), config=None, **overrides):
    tr = build_trainer(kind, output_dir=str(tmp_path / kind), **overrides)
    if faults:
        inject_faults(tr, *faults)
    sh = SelfHealingTrainer(tr, config or HealingConfig(snapshot_every_steps=5))
    sh.train()
    return sh


def read_postmortem(sh) -> dict:
    return json.loads(Path(sh.trainer.args.output_dir, "postmortem.json").read_text())
