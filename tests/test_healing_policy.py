"""The escalation policy on sequences of diagnoses: no trainer."""
from self_healing import HealingConfig
from self_healing.detectors import Detection
from self_healing.diagnosis import Action, diagnose
from self_healing.healing import HealingPolicy


def nan(step):
    return diagnose(Detection("nonfinite_loss", step, {"loss": float("nan")}))


def test_nan_patience_skips_then_rolls_back():
    p = HealingPolicy(HealingConfig(nan_patience=2))
    assert p.plan(nan(10), 10).actions == [Action.SKIP_STEP]
    assert p.plan(nan(11), 11).actions == [Action.SKIP_STEP]
    plan = p.plan(nan(12), 12)
    assert plan.actions == [Action.ROLLBACK] and "patience 2" in plan.reason


def test_healthy_step_resets_the_streak():
    p = HealingPolicy(HealingConfig(nan_patience=1))
    assert p.plan(nan(10), 10).actions == [Action.SKIP_STEP]
    p.healthy_step()
    assert p.plan(nan(12), 12).actions == [Action.SKIP_STEP]


def test_recurring_failure_after_rollback_cuts_lr_then_gives_up():
    cfg = HealingConfig(nan_patience=0, max_recovery_attempts=3)
    p = HealingPolicy(cfg)
    first = p.plan(nan(10), 10)
    assert first.actions == [Action.ROLLBACK]                     # a one-off: no LR cut
    second = p.plan(nan(12), 12)
    assert Action.REDUCE_LR in second.actions and second.lr_factor == cfg.lr_reduction_factor
    p.plan(nan(14), 14)
    assert abs(p.lr_scale - 0.25) < 1e-12
    assert p.plan(nan(16), 16).actions == [Action.GIVE_UP]


def test_weight_corruption_without_a_snapshot_gives_up():
    p = HealingPolicy(HealingConfig())
    d = diagnose(Detection("weight_corruption", 3, {"weight_norm": float("nan"), "finite": False}))
    plan = p.plan(d, 3, can_rollback=False)
    assert plan.actions == [Action.GIVE_UP] and "no verified snapshot" in plan.reason


def test_lr_floor_gives_up():
    p = HealingPolicy(HealingConfig(min_lr_scale=0.3, max_recovery_attempts=10))
    d = diagnose(Detection("divergence", 5, {}))
    assert Action.REDUCE_LR in p.plan(d, 5).actions      # 0.5
    assert p.plan(d, 6).actions == [Action.GIVE_UP]       # 0.25 < 0.3


def test_attempts_reset_after_a_long_healthy_stretch():
    cfg = HealingConfig(nan_patience=0, max_recovery_attempts=1, recovery_reset_steps=5)
    p = HealingPolicy(cfg)
    assert p.plan(nan(10), 10).actions == [Action.ROLLBACK]
    for _ in range(5):
        p.healthy_step()
    assert Action.ROLLBACK in p.plan(nan(500), 500).actions


def test_unhealable_gives_up():
    import torch  # noqa: F401

    from self_healing.diagnosis import diagnose_exception

    p = HealingPolicy(HealingConfig())
    assert p.plan(diagnose_exception(ZeroDivisionError("x")), 1).actions == [Action.GIVE_UP]
