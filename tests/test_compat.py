"""Compatibility: one row of the trainer table in docs/compatibility.md per trainer type, each proven here on a
real tiny run, with and without a LoRA adapter: the plugin attaches the row's monitors, a NaN
loss injected at step 5 is skipped before it reaches the weights, and the run completes."""
import re
from pathlib import Path

import pytest
import torch

from helpers import read_postmortem
from self_healing import HealingConfig, SelfHealingTrainer
from self_healing.callback import trainer_kind
from self_healing.faults import Fault, inject_faults
from self_healing.monitors import MONITOR_TABLE
from self_healing.tiny import build_trainer, weights_finite

KIND = {"Trainer": "trainer", "SFTTrainer": "sft", "DPOTrainer": "dpo", "KTOTrainer": "kto", "ORPOTrainer": "orpo",
        "CPOTrainer": "cpo", "RewardTrainer": "reward", "GRPOTrainer": "grpo", "RLOOTrainer": "rloo"}
SMALL = {"grpo": {}, "rloo": {}, "trainer": dict(per_device_train_batch_size=4)}
PREF = dict(per_device_train_batch_size=4, max_length=32)


def readme_table() -> dict[str, list[str]]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "compatibility.md").read_text()
    section = text.split("## Trainer-aware monitors", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| (?:transformers|TRL) `(\w+)`[^|]*\| ([^|]*) \|", line)
        if m:
            rows[m.group(1)] = re.findall(r"`(\w+)`", m.group(2))
    return rows


def test_readme_table_is_the_code_table():
    assert readme_table() == {k: list(v) for k, v in MONITOR_TABLE.items()}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("trainer", list(MONITOR_TABLE))
def test_row_runs_and_heals_a_nan(trainer, lora, tmp_path):
    kind = KIND[trainer]
    tr = build_trainer(kind, output_dir=str(tmp_path / kind), max_steps=8, lora=lora, **SMALL.get(kind, PREF))
    assert trainer_kind(tr) == trainer
    inject_faults(tr, Fault("nan_loss", step=5))
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=2))
    assert [m.name for m in sh.callback.monitors] == list(MONITOR_TABLE[trainer])
    model = tr.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and tr.state.global_step == 8
    assert [(a["step"], a["failure"], a["actions"]) for a in pm["recovery_actions"]] == [(5, "nan_loss", ["skip_step"])]
    assert pm["counters"]["rollbacks"] == 0 and weights_finite(model)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), trainable[n])]
    assert moved, "nothing trained"
    if lora:
        from peft import PeftModel

        assert isinstance(model, PeftModel) and all("lora_" in n or "modules_to_save" in n for n in trainable)
        assert frozen and all(torch.equal(p.detach(), frozen[n]) for n, p in model.named_parameters() if n in frozen)
