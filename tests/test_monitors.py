"""Trainer-aware monitors: DPO-family plateau, GRPO reward collapse and KL blow-up, overfitting.
Each finding is shown on a real tiny run that has the problem (and not on one that does not),
plus unit tests of the rules on synthetic logs (absent metrics, eval logs, caps, re-arming)."""
import math

import pytest

from self_healing import HealingConfig, SelfHealingTrainer
from self_healing.monitors import (LN2, KLMonitor, OverfittingMonitor, PreferencePlateauMonitor,
                                   RewardCollapseMonitor)
from self_healing.tiny import build_trainer, constant_reward, memorise_dataset, tied_preference_dataset

PREF = dict(per_device_train_batch_size=4, max_length=32)


def run(kind, tmp_path, config, **kw):
    sh = SelfHealingTrainer(build_trainer(kind, output_dir=str(tmp_path / kind), **kw), config)
    sh.train()
    return sh, sh.postmortem["recovery_actions"]


def cfg(**kw) -> HealingConfig:
    return HealingConfig(snapshot_every_steps=5, **kw)


# ---------------------------------------------------------------------------------------------
# preference trainers
# ---------------------------------------------------------------------------------------------
def test_dpo_with_identical_pairs_reports_dpo_plateau(tmp_path):
    sh, events = run("dpo", tmp_path, cfg(plateau_patience_steps=4), max_steps=12,
                     train_dataset=tied_preference_dataset(), **PREF)
    plateau = [e for e in events if e["failure"] == "dpo_plateau"]
    # warm-up: the LR logged at step 6 is the first at its peak, so the patience window is 7..11
    assert plateau and plateau[0]["step"] == 11, events
    e = plateau[0]
    assert e["actions"] == ["alert"] and e["evidence"]["identical_pairs"] is True
    assert e["evidence"]["preference_loss"] == pytest.approx(LN2, abs=1e-3) and abs(e["evidence"]["margin"]) < 1e-6
    assert "identical" in e["diagnosis"] and "chosen/rejected" in e["diagnosis"]
    assert sh.callback.policy.lr_scale == 1.0  # no LR can fix identical pairs: left alone
    assert sh.postmortem["exit_reason"] == "completed" and sh.postmortem["counters"]["rollbacks"] == 0


def test_stalled_dpo_gets_its_lr_raised_within_the_cap(tmp_path):
    """LR 1e-9: loss stays at ln 2 with distinct pairs. The monitor raises the LR 2x, 2x, then
    1.25x to reach the 5x cap, then only alerts, pointing at the data. (Windows: steps 7-10, then,
    as the step after each raise logs a risen LR and does not count: 12-15, 17-20, 22-25.)"""
    sh, events = run("dpo", tmp_path, cfg(plateau_patience_steps=3), max_steps=25, lr=1e-9, **PREF)
    plateau = [e for e in events if e["failure"] == "dpo_plateau"]
    assert [e["actions"] for e in plateau] == [["raise_lr", "alert"]] * 3 + [["alert"]], plateau
    assert [e["step"] for e in plateau] == [10, 15, 20, 25]
    assert [e["evidence"]["lr_factor"] for e in plateau[:3]] == pytest.approx([2.0, 2.0, 1.25])
    assert "cap" in plateau[-1]["diagnosis"] and "check that chosen and rejected differ" in plateau[-1]["diagnosis"]
    assert sh.callback.policy.lr_scale == pytest.approx(5.0)
    assert sh.trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(5e-9)  # persisted in the scheduler


def test_learning_dpo_run_is_not_a_plateau(tmp_path):
    _, events = run("dpo", tmp_path, cfg(plateau_patience_steps=3), max_steps=12, **PREF)
    assert not [e for e in events if e["failure"] == "dpo_plateau"], events


@pytest.mark.parametrize("kind,chance", [("kto", 0.5), ("orpo", -LN2), ("cpo", LN2)])
def test_plateau_uses_each_trainers_own_metrics(kind, chance, tmp_path):
    """KTO's loss is 1 - σ(0) = 0.5 at chance, ORPO logs log σ(0) = -ln 2 as `log_odds_ratio`,
    CPO's loss minus its NLL term is ln 2: the same plateau, read from what each trainer logs."""
    _, events = run(kind, tmp_path, cfg(plateau_patience_steps=3), max_steps=11, lr=1e-9,
                    train_dataset=tied_preference_dataset(), **PREF)
    plateau = [e for e in events if e["failure"] == "dpo_plateau"]
    assert plateau, events
    ev = plateau[0]["evidence"]
    assert ev["chance_value"] == pytest.approx(chance) and ev["preference_loss"] == pytest.approx(chance, abs=0.01)


# ---------------------------------------------------------------------------------------------
# RL trainers
# ---------------------------------------------------------------------------------------------
def test_grpo_with_constant_reward_reports_reward_collapse(tmp_path):
    sh, events = run("grpo", tmp_path, cfg(reward_collapse_patience_steps=4), max_steps=7, reward_funcs=constant_reward)
    collapse = [e for e in events if e["failure"] == "reward_collapse"]
    assert collapse and collapse[0]["step"] == 5, events
    assert collapse[0]["actions"] == ["alert"] and collapse[0]["evidence"]["frac_reward_zero_std"] == 1.0
    assert "no learning signal" in collapse[0]["diagnosis"]
    assert sh.postmortem["exit_reason"] == "completed" and sh.postmortem["counters"]["rollbacks"] == 0


def test_grpo_kl_blowup_against_the_reference_cuts_the_lr(tmp_path):
    """beta=0.04 and LR 3e-2: the policy runs away from the reference, KL jumps >10x its median."""
    sh, events = run("grpo", tmp_path, cfg(), max_steps=8, lr=3e-2, beta=0.04)
    kl = [e for e in events if e["failure"] == "kl_blowup"]
    assert kl, events
    assert kl[0]["actions"] == ["reduce_lr", "alert"] and kl[0]["evidence"]["kl"] > 0.05
    assert sh.callback.policy.lr_scale == pytest.approx(0.5 ** len(kl))
    assert sh.trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(3e-2 * 0.5 ** len(kl))


# ---------------------------------------------------------------------------------------------
# overfitting
# ---------------------------------------------------------------------------------------------
def test_overfit_run_reports_overfitting_and_only_alerts(tmp_path):
    sh, events = run("sft", tmp_path, cfg(), max_steps=20, lr=1e-2, train_dataset=memorise_dataset(8),
                     eval_dataset=memorise_dataset(8, seed=1), eval_strategy="steps", eval_steps=10)
    over = [e for e in events if e["failure"] == "overfitting"]
    assert over, events
    e = over[-1]
    assert e["actions"] == ["alert"] and e["evidence"]["gap"] > 0.5
    assert e["evidence"]["gap"] == pytest.approx(e["evidence"]["eval_loss"] - e["evidence"]["train_loss"])
    assert "load_best_model_at_end" in e["diagnosis"]
    pm = sh.postmortem
    assert pm["counters"]["rollbacks"] == 0 and sh.callback.policy.lr_scale == 1.0 and pm["exit_reason"] == "completed"


# ---------------------------------------------------------------------------------------------
# the rules, on synthetic logs
# ---------------------------------------------------------------------------------------------
class Args:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_plateau_rules_absent_metrics_eval_logs_and_loss_types():
    c = cfg(plateau_patience_steps=2)
    m = PreferencePlateauMonitor("DPOTrainer", c, Args(loss_type=["sigmoid"]))
    assert m.on_log(1, {"grad_norm": 1.0}) == [] and m.on_log(2, {"loss": None}) == []  # nothing to judge
    for s in range(1, 4):
        assert m.on_log(s, {"eval_loss": LN2, "eval_rewards/margins": 0.0}) == []  # eval logs ignored
    assert m.streak.count == 0
    # another loss type: no chance value for the loss, the margin alone decides
    ipo = PreferencePlateauMonitor("DPOTrainer", c, Args(loss_type=["ipo"]))
    assert ipo.chance is None
    out = [d for s in range(1, 5) for d in ipo.on_log(s, {"loss": 5.0, "rewards/margins": 0.001})]
    assert out and out[0].failure.value == "dpo_plateau" and "preference_loss" not in out[0].evidence
    # a margin away from 0 breaks the streak
    m2 = PreferencePlateauMonitor("DPOTrainer", c, Args(loss_type="sigmoid"))
    seq = [(1, 0.0), (2, 0.0), (3, 0.5), (4, 0.0), (5, 0.0)]
    assert [d for s, mg in seq for d in m2.on_log(s, {"loss": LN2, "rewards/margins": mg})] == []
    # LR warm-up: at ln 2 by construction while the LR rises, not a plateau; counted once it stops
    m3 = PreferencePlateauMonitor("DPOTrainer", c, Args(loss_type="sigmoid"))
    lrs = [1e-7, 2e-7, 3e-7, 4e-7, 5e-7, 5e-7, 5e-7, 4.9e-7]
    out = [(s, d) for s, lr in enumerate(lrs, 1) for d in m3.on_log(s, {"loss": LN2, "rewards/margins": 0.0,
                                                                        "learning_rate": lr})]
    assert [s for s, _ in out] == [8]  # window starts at step 6, the first step the LR did not rise


def test_reward_collapse_mean_drop_and_std_fallback():
    c = cfg(reward_collapse_patience_steps=3)
    m = RewardCollapseMonitor(c)
    rewards = [0.1, 0.3, 0.6, 0.9, 1.0, 1.0, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2]
    out = [d for s, r in enumerate(rewards, 1) for d in m.on_log(s, {"reward": r, "frac_reward_zero_std": 0.0})]
    assert len(out) == 1 and "fell" in out[0].summary and out[0].evidence["best_step"] in (5, 6)
    # older TRL without frac_reward_zero_std: reward_std at 0 is the signal
    m2 = RewardCollapseMonitor(c)
    out2 = [d for s in range(1, 6) for d in m2.on_log(s, {"reward_std": 0.0})]
    assert len(out2) == 1 and out2[0].evidence["frac_reward_zero_std"] is None


def test_kl_monitor_floor_rearm_and_absence():
    m = KLMonitor(cfg(kl_max=10.0))
    assert m.on_log(1, {"loss": 0.1}) == []  # beta = 0: no `kl` logged, nothing to do
    early = [0.0, 0.0, 0.001, 0.002, 0.001, 0.01]  # tiny KL: huge ratios, but below the floor
    assert [d for s, k in enumerate(early, 1) for d in m.on_log(s, {"kl": k})] == []
    assert m.on_log(7, {"kl": 0.5}) and m.on_log(8, {"kl": 0.6}) == []  # fires once...
    assert m.on_log(9, {"kl": 0.001}) == [] and m.on_log(10, {"kl": 50.0})  # ...re-armed; kl_max


def test_overfitting_rearms_only_after_growth_or_recovery():
    m = OverfittingMonitor(cfg(overfit_gap=0.5))
    assert m.on_evaluate(1, {"eval_loss": 9.0}) == []  # no train loss yet
    for s in range(1, 6):
        m.on_log(s, {"loss": 1.0})
    m.on_log(6, {"train_loss": 0.1, "train_runtime": 1.0})  # end-of-training summary: ignored
    m.on_log(6, {"loss": 0.0, "grad_norm": float("nan")})  # a skipped NaN step's made-up loss: ignored
    assert len(m.on_evaluate(6, {"eval_loss": 2.0})) == 1 and m.last_gap == pytest.approx(1.0)
    assert m.on_evaluate(7, {"eval_loss": 2.2}) == []  # gap 1.2 < 1.5x the alerted 1.0
    assert len(m.on_evaluate(8, {"eval_loss": 2.6})) == 1  # 1.6
    assert m.on_evaluate(9, {"eval_loss": 1.2}) == [] and len(m.on_evaluate(10, {"eval_loss": 1.6})) == 1
    assert math.isclose(m.last_gap, 0.6)


def test_reward_saturation_at_the_top_is_an_info_note_not_a_collapse(caplog):
    """GRPO that *solved* its task: the rewards varied, climbed, and now every completion gets the
    top reward (std 0). Before: "reward collapse ... check the reward function" (a WARN finding).
    Now an INFO note, no finding; real collapses (flat from the start, flat below the best) stay."""
    import logging

    m = RewardCollapseMonitor(cfg(reward_collapse_patience_steps=4))
    found = []
    for step in range(1, 6):  # learning: spread, mean climbing to 1.0
        found += m.on_log(step, {"reward": 0.5 + 0.1 * step, "reward_std": 0.3, "frac_reward_zero_std": 0.0})
    with caplog.at_level(logging.INFO, logger="self_healing"):
        for step in range(6, 30):  # solved: every completion at the top reward
            found += m.on_log(step, {"reward": 1.0, "reward_std": 0.0, "frac_reward_zero_std": 1.0})
    assert found == []
    assert len(m.notes) == 1 and "solved or too easy" in m.notes[0]["summary"]
    info = [r for r in caplog.records if "solved or too easy" in r.getMessage()]
    assert len(info) == 1 and info[0].levelno == logging.INFO

    # flat below the best the run reached: a collapse
    m = RewardCollapseMonitor(cfg(reward_collapse_patience_steps=4))
    for step in range(1, 6):
        m.on_log(step, {"reward": 0.9, "reward_std": 0.3, "frac_reward_zero_std": 0.0})
    hits = [d for step in range(6, 14) for d in m.on_log(step, {"reward": 0.0, "reward_std": 0.0,
                                                                "frac_reward_zero_std": 1.0})]
    assert hits and hits[0].failure.value == "reward_collapse" and m.notes == []

    # flat from the first step (a constant reward function): a collapse, as before
    m = RewardCollapseMonitor(cfg(reward_collapse_patience_steps=4))
    hits = [d for step in range(1, 9) for d in m.on_log(step, {"reward": 1.0, "reward_std": 0.0,
                                                               "frac_reward_zero_std": 1.0})]
    assert hits and "check the reward function" in hits[0].summary.lower() and m.notes == []
