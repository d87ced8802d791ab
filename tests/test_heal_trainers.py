"""Every numeric fault, injected once at step 25 of 60 into a real tiny Trainer/SFT/DPO/GRPO run,
heals: all steps run, weights finite, tail loss within 1.15x of a clean run (SFT/DPO/Trainer),
and the postmortem names the failure. A clean run sees zero interventions."""
import pytest

from helpers import FAULT_FAILURE, fault_for, read_postmortem, run_healed, tail_loss, weights_finite
from self_healing.tiny import build_trainer, logged_losses

KINDS = ["trainer", "sft", "dpo", "grpo"]
_clean: dict[str, list[float]] = {}


def clean_losses(kind, tmp_path_factory):
    if kind not in _clean:
        tr = build_trainer(kind, output_dir=str(tmp_path_factory.mktemp("bare") / kind))
        tr.train()
        _clean[kind] = logged_losses(tr)
    return _clean[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_clean_run_has_no_interventions_and_matches_the_bare_trainer(kind, tmp_path, tmp_path_factory):
    bare = clean_losses(kind, tmp_path_factory)
    sh = run_healed(kind, tmp_path)
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and pm["recovery_actions"] == []
    assert logged_losses(sh.trainer) == pytest.approx(bare, rel=1e-6, abs=1e-7)


# An Inf loss takes the NaN loss's path through every trainer (the same non-finite check on the same
# captured loss): nan_loss covers each trainer's loss capture, inf_loss is run once (a 60-step run each).
CASES = [(kind, fault) for kind in KINDS for fault in FAULT_FAILURE if fault != "inf_loss" or kind == "trainer"]


@pytest.mark.parametrize("kind,fault", CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_fault_heals(kind, fault, tmp_path, tmp_path_factory):
    bare = clean_losses(kind, tmp_path_factory)
    sh = run_healed(kind, tmp_path, faults=[fault_for(fault)])
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed"
    assert sh.trainer.state.global_step == 60 and pm["last_step"] == 60
    assert weights_finite(sh.trainer.model)
    failures = {a["failure"] for a in pm["recovery_actions"]}
    assert FAULT_FAILURE[fault] in failures, pm["recovery_actions"]
    first = pm["recovery_actions"][0]
    assert first["step"] == 25 or FAULT_FAILURE[fault] == "optimizer_state_corruption"
    assert first["diagnosis"] and first["evidence"] and first["actions"]
    if kind != "grpo":  # GRPO's policy loss hovers around 0: a ratio of it means nothing
        clean_tail = sum(bare[-10:]) / 10
        assert tail_loss(sh.trainer) <= 1.15 * clean_tail, (tail_loss(sh.trainer), clean_tail)
    if fault in ("nan_loss", "inf_loss", "nan_grad", "grad_scale", "lr_scale"):
        # caught before the update: skipped, never rolled back, and the LR is left alone
        assert all(a["actions"][0] == "skip_step" for a in pm["recovery_actions"])
        assert pm["counters"]["rollbacks"] == 0 and pm["lr_scale"] == 1.0


def test_a_skipped_nan_step_is_not_logged_as_a_loss_of_zero(tmp_path):
    """The Trainer's NaN filter logs 0.0 for a one-step window whose loss was NaN (and a made-up
    mean for longer windows): the skipped step is logged without a loss, and a longer window's loss
    is the mean of its finite steps."""
    from self_healing import HealingConfig, SelfHealingTrainer
    from self_healing.faults import Fault, inject_faults

    logged = {}
    for every in (1, 5):
        tr = build_trainer("sft", output_dir=str(tmp_path / str(every)), max_steps=15, logging_steps=every)
        inject_faults(tr, Fault("nan_loss", step=10))
        sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5))
        sh.train()
        logged[every] = {h["step"]: h.get("loss") for h in tr.state.log_history if "learning_rate" in h}
        assert read_postmortem(sh)["counters"]["skipped_steps"] == 1
    assert logged[1][10] is None and all(v is not None and v > 0 for s, v in logged[1].items() if s != 10)
    # the 5-step window 6-10 is the mean of its finite steps 6-9, as the 1-step run logged them
    assert logged[5][10] == pytest.approx(sum(logged[1][s] for s in (6, 7, 8, 9)) / 4, rel=1e-5)
    assert logged[5][5] == pytest.approx(sum(logged[1][s] for s in range(1, 6)) / 5, rel=1e-5)
