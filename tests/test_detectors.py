"""Detectors on plain numbers: no trainer."""
import math

import pytest

from self_healing import HealingConfig
from self_healing.detectors import (GROWTH_KEY, REACH_KEY, DivergenceDetector, GradNormDetector, LossSpikeDetector,
                                    RunningWindow, StateReport, StepMonitor, StepSignals, adam_update_bound,
                                    check_lr, compare_state)


def test_running_window_mean_std_and_bound():
    w = RunningWindow(3)
    for x in [1.0, 2.0, 3.0, 4.0]:
        w.push(x)
    assert list(w.values) == [2.0, 3.0, 4.0]
    assert w.mean == 3.0 and abs(w.std - 1.0) < 1e-12


def test_loss_spike_needs_ratio_and_z():
    d = LossSpikeDetector(factor=3.0, window=20, min_history=5)
    for x in [2.0, 2.1, 1.9, 2.0, 2.05, 1.95]:
        assert d.check(x) is None
        d.accept(x)
    assert d.check(5.0) is None            # 2.5x: below the factor
    hit = d.check(9.0)
    assert hit and hit.signal == "loss_spike" and abs(hit.evidence["ratio"] - 4.5) < 0.01


def test_loss_spike_ignores_noise_around_zero():
    d = LossSpikeDetector(factor=5.0, window=50, min_history=5)
    for x in [0.01, -0.02, 0.03, 0.0, -0.01, 0.02, 0.01]:
        d.accept(x)
    assert d.check(0.05) is None  # ratio is large, but it is well within the noise


def test_divergence_fires_after_patience_rising_steps():
    d = DivergenceDetector(patience=5, tolerance=0.2, alpha=0.5, warmup=3)
    fired = [d.update(x) for x in [3.0, 2.5, 2.0, 2.0, 2.2, 2.5, 2.9, 3.4, 4.0, 4.8]]
    first = next(i for i, f in enumerate(fired) if f)
    assert first >= 8 and fired[first].evidence["rising_steps"] >= 5


def test_divergence_quiet_on_a_decreasing_noisy_loss():
    d = DivergenceDetector(patience=5, tolerance=0.2)
    xs = [3.0 * math.exp(-i / 30) + 0.05 * ((i * 7919) % 11 - 5) / 5 for i in range(300)]
    assert not any(d.update(x) for x in xs)


def test_grad_norm_threshold_and_zscore():
    g = GradNormDetector(threshold=100.0, z_threshold=6.0, factor=10.0, min_history=5)
    assert g.check(150.0).evidence["threshold"] == 100.0
    for x in [1.0, 1.2, 0.9, 1.1, 1.0, 1.05]:
        g.accept(x)
    assert g.check(3.0) is None              # z large, but only 3x the mean
    assert g.check(50.0) is None             # 6 of 50 norms seen: the ratio asked is 5x larger
    hit = g.check(80.0)                      # (under the absolute threshold of 100)
    assert hit and hit.evidence["ratio"] > 50
    for _ in range(44):
        g.accept(1.0)
    hit = g.check(50.0)                      # a full window: 10x its mean and its largest
    assert hit and hit.evidence["ratio"] > 10


def test_lr_spike_against_scheduled():
    assert check_lr([1e-3], [1e-3], 10.0) is None
    hit = check_lr([3.0], [1e-3], 10.0)
    assert hit and hit.evidence["scheduled_lr"] == 1e-3
    assert check_lr([float("nan")], [1e-3], 10.0) is not None
    assert check_lr([1.0], None, 10.0) is None


def _with_reach(norms: dict, reach: float, log_growth: float = 0.0) -> dict:
    return {**norms, REACH_KEY: reach, GROWTH_KEY: log_growth}


def test_state_nonfinite_and_growth_beyond_the_updates_reach():
    ref = StateReport(weight_norm=10.0, optimizer_norms=_with_reach({"exp_avg_sq": 1.0}, 100.0), beta2=0.999, step=10)
    assert compare_state(StateReport(float("nan")), ref, 10).signal == "weight_corruption"
    assert compare_state(StateReport(10.0, {"exp_avg": float("inf")}), ref, 10).signal == "optimizer_state_corruption"
    # the updates since step 10 could move the weights by 1.5 in norm (odometer 100 -> 101.5)
    grown = compare_state(StateReport(3000.0, _with_reach({"exp_avg_sq": 1.0}, 101.5), 0.999, 20), ref, 10)
    assert grown.signal == "weight_corruption" and grown.evidence["ratio"] == 300
    assert grown.evidence["update_reach"] == pytest.approx(1.5)
    assert compare_state(StateReport(11.0, _with_reach({"exp_avg_sq": 0.98}, 101.5), 0.999, 20), ref, 10) is None
    # within factor x the reach: training can do that
    assert compare_state(StateReport(24.0, _with_reach({"exp_avg_sq": 1.0}, 101.5), 0.999, 20), ref, 10) is None


def test_small_weights_that_grow_while_learning_are_not_corruption():
    """The old test (norm > 10x the reference's) rolled back a healthy run whose tiny initial
    weights grew: 0.01 -> 0.5 in 10 steps of lr 0.1 is 50x, well within what 10 steps can do."""
    ref = StateReport(0.01, _with_reach({"exp_avg_sq": 1e-4}, 0.0), beta2=0.999, step=0)
    cur = StateReport(0.5, _with_reach({"exp_avg_sq": 1e-4}, 10 * 0.1 * 2.0), beta2=0.999, step=10)
    assert compare_state(cur, ref, 10) is None
    # zero initial weights: no ratio exists, only the reach
    assert compare_state(StateReport(0.5, _with_reach({}, 2.0), step=10), StateReport(0.0, _with_reach({}, 0.0)), 10) \
        is None
    # without odometers (an optimizer whose update rule is not bounded here): no finite verdict at all
    assert compare_state(StateReport(3000.0, {"exp_avg_sq": 1.0}, 0.999, 20),
                         StateReport(10.0, {"exp_avg_sq": 1.0}, 0.999, 10), 10) is None


def test_exp_avg_sq_cannot_fall_faster_than_beta2():
    ref = StateReport(10.0, {"exp_avg_sq": 1.0}, beta2=0.999, step=0)
    # 10 steps of pure decay: 0.999**10 = 0.990 -> healthy
    assert compare_state(StateReport(10.0, {"exp_avg_sq": 0.99}, 0.999, 10), ref, 10) is None
    hit = compare_state(StateReport(10.0, {"exp_avg_sq": 0.01}, 0.999, 10), ref, 10)
    assert hit.signal == "optimizer_state_corruption"
    assert abs(hit.evidence["lowest_possible"] - 0.999 ** 10) < 1e-12


def test_monitor_reports_nonfinite_before_statistics_and_never_learns_from_bad_steps():
    m = StepMonitor(HealingConfig())
    for i in range(20):
        s = StepSignals(step=i, loss=2.0, grad_norm=1.0, lrs=[1e-3], scheduled_lrs=[1e-3])
        assert m.check(s) == []
        m.accept(s)
    bad = StepSignals(step=21, loss=float("nan"), grad_norm=float("nan"), lrs=[1e-3], scheduled_lrs=[1e-3])
    assert [d.signal for d in m.check(bad)] == ["nonfinite_loss"]
    assert m.spike.window.mean == 2.0
    gbad = StepSignals(step=22, loss=2.0, grad_norm=float("inf"), lrs=[1e-3], scheduled_lrs=[1e-3])
    assert [d.signal for d in m.check(gbad)] == ["nonfinite_gradient"]


def test_monitor_under_amp_scaler_leaves_overflow_to_the_scaler():
    m = StepMonitor(HealingConfig(), amp_scaler=True)
    s = StepSignals(step=1, loss=2.0, grad_norm=float("inf"), lrs=[1e-3], scheduled_lrs=[1e-3])
    assert m.check(s) == []


def test_policy_losses_turn_off_loss_signals():
    m = StepMonitor(HealingConfig(), loss_signals=False)
    for i in range(30):
        m.accept(StepSignals(step=i, loss=0.01, grad_norm=1.0))
    assert m.check(StepSignals(step=31, loss=5.0, grad_norm=1.0)) == []


def test_adam_update_bound_is_1_at_the_first_step_and_grows_to_its_limit():
    assert adam_update_bound(0.9, 0.999, 1) == pytest.approx(1.0)
    bounds = [adam_update_bound(0.9, 0.999, t) for t in (1, 2, 10, 100, 1000, 10 ** 6)]
    assert bounds == sorted(bounds) and bounds[-1] == pytest.approx(0.1 / (1 - 0.9 / 0.999 ** 0.5) / 0.001 ** 0.5)
    assert adam_update_bound(0.99, 0.9, 10 ** 6) == math.inf  # beta1 >= sqrt(beta2): unbounded, no verdict


def test_grad_norm_zero_steps_and_heavy_tails_are_not_explosions():
    """GRPO steps whose groups all got the same reward have a zero gradient (beta=0) or a tiny
    KL-only one; the first step with a learning signal after 50 of them was an "explosion" (ratio
    and z-score against a window of ~0). Per-example norms (batch size 1) are heavy-tailed."""
    old_style = GradNormDetector(threshold=None, z_threshold=6.0, factor=10.0)
    g = GradNormDetector(threshold=None, z_threshold=6.0, factor=10.0)
    for det in (old_style, g):
        det.accept(0.8)  # one step with a learning signal
        for i in range(60):
            det.accept(0.0 if i % 2 else 1e-4 * (1 + (i % 3)))  # no signal: zero, or KL-only
    assert g.check(0.9) is None
    assert old_style.window.values.count(0.0) == 0 and g.reference() >= 0.79  # zeros never entered
    # a real explosion is still one
    assert g.check(1e6) is not None
    heavy = GradNormDetector(threshold=None, z_threshold=6.0, factor=10.0)
    for i in range(50):
        heavy.accept(1.0 if i % 10 else 8.0)  # an 8x outlier every 10 steps is this run's normal
    assert heavy.check(30.0) is None and heavy.check(1e4) is not None


def test_loss_spike_near_a_loss_of_zero_is_not_a_spike():
    """DPO driven to ~0: a batch at 0.01 is 100x the mean 1e-4 and far outside its spread, and
    still a loss 70x below where the run started (ln 2)."""
    d = LossSpikeDetector(factor=5.0, window=50, min_history=10)
    for x in [0.69] * 10 + [1e-4 * (1 + (i % 3) / 10) for i in range(60)]:
        d.accept(x)
    assert d.check(0.01) is None
    assert d.check(5.0) is not None  # above where it started: a spike


def test_a_warm_restart_of_the_lr_starts_a_new_divergence_trend():
    """cosine_with_restarts: the LR jumps from ~0 to its peak and the loss rises with it for a
    while: not a divergence (before: rollback + LR cut)."""
    def losses():
        return [2.0 - 0.005 * i for i in range(30)] + [1.85 + 0.04 * i for i in range(25)] + \
            [2.85 - 0.03 * i for i in range(20)]

    def lrs():
        return [1e-3 * (1 - i / 30) for i in range(30)] + [1e-3] * 45

    plain = DivergenceDetector(patience=20, tolerance=0.25)
    assert any(plain.update(x) for x in losses())  # what the schedule-blind detector did
    d = DivergenceDetector(patience=20, tolerance=0.25)
    fired = []
    for x, lr in zip(losses(), lrs()):
        d.observe_lr(lr)
        fired.append(d.update(x))
    assert not any(fired)
    # a divergence under a constant LR is still one
    d = DivergenceDetector(patience=20, tolerance=0.25)
    seq = [2.0 - 0.005 * i for i in range(30)] + [1.85 + 0.04 * i for i in range(40)]
    assert any((d.observe_lr(1e-3), d.update(x))[1] for x in seq)


def test_weights_blowing_up_while_the_loss_rises_is_the_lr_not_learning():
    """An LR far too high: the optimizer's own updates (within their reach) grow the weights 15x in
    5 steps and the loss climbs: rolled back with the LR cut. The same growth with a falling loss
    (small initial weights learning) is left alone."""
    from self_healing.detectors import FIRST_LOSS_KEY, LOSS_KEY
    from self_healing.diagnosis import diagnose_state

    ref = StateReport(18.8, _with_reach({}, 0.0), step=0)
    bad = StateReport(279.0, {**_with_reach({}, 5000.0), LOSS_KEY: 9.0, FIRST_LOSS_KEY: 3.8}, step=5)
    hit = compare_state(bad, ref, 10)
    assert hit is not None and hit.evidence["loss_confirmed"]
    d = diagnose_state(hit)
    assert d.failure.value == "divergence" and [a.value for a in d.actions] == ["rollback", "reduce_lr"]
    learning = StateReport(279.0, {**_with_reach({}, 5000.0), LOSS_KEY: 2.0, FIRST_LOSS_KEY: 3.8}, step=5)
    assert compare_state(learning, ref, 10) is None
    no_loss = StateReport(279.0, _with_reach({}, 5000.0), step=5)  # RL policy loss: not a quality measure
    assert compare_state(no_loss, ref, 10) is None


def test_a_loss_rise_the_loss_own_scatter_explains_confirms_nothing():
    """Batch size 1: a squared error scatters by ~2 in log from step to step, so a smoothed loss
    tripling (5.4 -> 12.9 on a healthy chain) is noise; a token-mean loss scattering by 0.33 that
    rises 0.78 in log is an LR blowing the model up."""
    from self_healing.detectors import FIRST_LOSS_KEY, LOSS_KEY, LOSS_SCATTER_KEY

    ref = StateReport(0.06, _with_reach({}, 0.0), step=0)
    noisy = StateReport(1.5, {**_with_reach({}, 50.0), LOSS_KEY: 12.9, FIRST_LOSS_KEY: 5.4, LOSS_SCATTER_KEY: 2.2},
                        step=10)
    assert compare_state(noisy, ref, 10) is None
    steady = StateReport(1.5, {**_with_reach({}, 50.0), LOSS_KEY: 8.29, FIRST_LOSS_KEY: 3.81,
                               LOSS_SCATTER_KEY: 0.33}, step=5)
    hit = compare_state(steady, ref, 10)
    assert hit is not None and hit.evidence["loss_scatter"] == 0.33


def test_where_a_run_started_is_the_median_of_its_first_losses_and_survives_a_rollback():
    """One batch-size-1 loss can be an outlier (0.096 where the typical one was ~8); the median of
    the first three is not, and a blow-up from the third loss on does not raise it. A rollback to a
    state saved before they were all seen keeps them; a resume (fresh monitor) takes the saved ones."""
    from self_healing.detectors import FIRST_LOSSES

    m = StepMonitor(HealingConfig())
    early = m.state_dict()
    for i, loss in enumerate([0.096, 8.0, 40.0, 0.01], 1):
        m.accept(StepSignals(step=i, loss=loss, grad_norm=1.0))
    assert FIRST_LOSSES == 3 and m.first_loss == 8.0
    assert m.loss_scatter == pytest.approx(
        (0.1 * 0.9 ** 2 * math.log(8 / 0.096) + 0.1 * 0.9 * math.log(40 / 8) + 0.1 * math.log(4000))
        / (1 - 0.9 ** 3))
    m.load_state_dict(early)  # a rollback to the start
    assert m.first_loss == 8.0
    fresh = StepMonitor(HealingConfig())
    fresh.load_state_dict(m.state_dict())
    assert fresh.first_loss == 8.0 and fresh.loss_scatter == m.loss_scatter
