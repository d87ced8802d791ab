"""The retry orchestrator and the postmortem, on real tiny trainers."""
import json
import math

import pytest

from helpers import read_postmortem, run_healed, tail_loss, weights_finite
from self_healing import HealingConfig, SelfHealingCallback, SelfHealingTrainer
from self_healing.faults import Fault, inject_faults
from self_healing.tiny import build_trainer, logged_losses


def test_persistent_fault_gives_up_within_max_recovery_attempts(tmp_path):
    cfg = HealingConfig(snapshot_every_steps=5, max_recovery_attempts=3, nan_patience=2)
    sh = run_healed("sft", tmp_path, faults=[Fault("nan_loss", step=20, duration=10_000)], config=cfg)
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "gave_up" and sh.exit_reason == "gave_up"
    assert pm["counters"]["rollbacks"] == 3
    assert pm["recovery_actions"][-1]["actions"] == ["give_up"]
    assert "max_recovery_attempts=3" in pm["give_up_reason"]
    assert sh.trainer.state.global_step < 60
    assert weights_finite(sh.trainer.model)  # the last verified-good state is left loaded


def test_too_high_lr_is_healed_by_repeated_lr_reduction(tmp_path):
    bare = build_trainer("sft", output_dir=str(tmp_path / "bare"), lr=1.0, max_grad_norm=0.0, max_steps=80)
    bare.train()
    sh = run_healed("sft", tmp_path, lr=1.0, max_grad_norm=0.0, max_steps=80)
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and sh.trainer.state.global_step == 80
    cuts = [a for a in pm["recovery_actions"] if "reduce_lr" in a["actions"]]
    assert len(cuts) >= 2 and pm["lr_scale"] <= 0.25
    # the cut persists in the scheduler: the LR the run ends with is the cut one
    assert sh.trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1.0 * pm["lr_scale"])
    assert tail_loss(sh.trainer) < 0.5 * tail_loss(bare)
    assert weights_finite(sh.trainer.model)


def test_keyboard_interrupt_is_not_healed(tmp_path):
    tr = build_trainer("sft", output_dir=str(tmp_path / "kbd"))
    inject_faults(tr, Fault("exception", step=10, exception=KeyboardInterrupt))
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5))
    with pytest.raises(KeyboardInterrupt):
        sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "interrupted" and pm["exception_type"] == "KeyboardInterrupt"
    assert pm["last_step"] == 9


def test_user_bug_is_not_retried(tmp_path):
    tr = build_trainer("sft", output_dir=str(tmp_path / "bug"))
    inject_faults(tr, Fault("exception", step=10, exception=lambda: ZeroDivisionError("division by zero")))
    sh = SelfHealingTrainer(tr)
    with pytest.raises(ZeroDivisionError):
        sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "exception" and pm["exception_type"] == "ZeroDivisionError"
    assert pm["traceback"] and pm["diagnosis"]["failure"] == "unknown"


def test_postmortem_schema_and_strict_json(tmp_path):
    sh = run_healed("sft", tmp_path, faults=[Fault("nan_loss", step=25)])
    raw = (tmp_path / "sft" / "postmortem.json").read_text()
    pm = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    for key in ("exit_reason", "exception_type", "last_step", "timestamp", "final_metrics", "recovery_actions",
                "running_time_seconds", "config"):
        assert key in pm
    assert pm["timestamp"].endswith("Z") and "T" in pm["timestamp"]
    ev = pm["recovery_actions"][0]
    assert set(ev) >= {"step", "failure", "diagnosis", "actions", "evidence"}
    assert ev["evidence"]["loss"] == "nan"  # NaN written as a string: the file stays standard JSON
    assert pm["config"]["nan_patience"] == HealingConfig().nan_patience
    assert "loss" in pm["final_metrics"]
    assert not list((tmp_path / "sft").glob(".postmortem.json.*")), "temp file left behind"


def test_detection_is_per_step_whatever_logging_steps(tmp_path):
    sh = run_healed("sft", tmp_path, faults=[Fault("nan_grad", step=23)], logging_steps=50)
    pm = read_postmortem(sh)
    assert [a["step"] for a in pm["recovery_actions"]] == [23]


def test_gradient_accumulation(tmp_path):
    sh = run_healed("sft", tmp_path, faults=[Fault("nan_loss", step=12)], max_steps=30,
                    per_device_train_batch_size=4, gradient_accumulation_steps=2)
    pm = read_postmortem(sh)
    assert [(a["step"], a["failure"]) for a in pm["recovery_actions"]] == [(12, "nan_loss")]
    assert weights_finite(sh.trainer.model) and sh.trainer.state.global_step == 30


def test_nan_is_kept_out_of_the_logged_loss_without_the_trainer_filter(tmp_path):
    sh = run_healed("sft", tmp_path, faults=[Fault("nan_loss", step=12)], max_steps=30,
                    logging_nan_inf_filter=False, logging_steps=5)
    losses = logged_losses(sh.trainer)
    assert all(math.isfinite(x) for x in losses[3:]), losses


def test_callback_alone_writes_the_postmortem(tmp_path):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "cb"), max_steps=20)
    inject_faults(tr, Fault("nan_grad", step=10))
    cb = SelfHealingCallback(HealingConfig(snapshot_every_steps=5)).attach(tr)
    tr.train()
    pm = json.loads((tmp_path / "cb" / "postmortem.json").read_text())
    assert pm["exit_reason"] == "completed" and pm["recovery_actions"][0]["failure"] == "nonfinite_gradient"
    cb.detach()


def test_aggressive_preset_heals_with_zclip_on(tmp_path):
    sh = run_healed("sft", tmp_path, faults=[Fault("weight_scale", step=30)],
                    config=HealingConfig.aggressive().replace(snapshot_every_steps=5))
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and pm["zclip"]["initialized"]
    assert pm["recovery_actions"][0]["failure"] == "weight_corruption"
    assert weights_finite(sh.trainer.model)
