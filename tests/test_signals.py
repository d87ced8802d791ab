"""The early-warning estimators against values known in closed form (self_healing.signals)."""
import math
import random

import numpy as np
import pytest
import torch

from self_healing.signals import (Calibrator, FisherEMA, GrowthRate, add_ewc_gradient, autograd_hvp,
                                  dominant_period, finite_difference_hvp, fisher_interpolate, hutchinson_trace,
                                  power_iteration, sam_sharpness)

# ---------------------------------------------------------------------------------------------
# growth
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.05, -0.02, math.log(2) / 7])
def test_growth_rate_of_an_exponential_is_its_exponent(rate):
    g = GrowthRate(beta=0.8)
    for t in range(30):
        g.update(3.0 * math.exp(rate * t))
    assert g.rate == pytest.approx(rate, rel=1e-9)
    if rate > 0:
        assert g.doubling_steps == pytest.approx(math.log(2) / rate)
        # from x_29 = 3e^{29r}, reaching 3e^{39r} takes 10 steps
        assert g.forecast_steps(3.0 * math.exp(rate * 39)) == pytest.approx(10.0)
    else:
        assert g.forecast_steps(1e9) == math.inf


def test_growth_rate_ignores_nonfinite_values_and_restarts_the_chain():
    g = GrowthRate(beta=0.5)
    for x in (1.0, 2.0, 4.0):
        g.update(x)
    assert g.rate == pytest.approx(math.log(2))
    g.update(float("nan"))
    g.update(100.0)  # no ratio against the NaN, nor across it
    assert g.rate == pytest.approx(math.log(2)) and g.count == 2
    g.update(200.0)
    assert g.rate == pytest.approx(math.log(2))


def test_growth_rate_ema_of_noisy_flat_series_is_near_zero():
    rng = random.Random(0)
    g = GrowthRate(beta=0.9)
    rates = [g.update(1.0 + 0.05 * rng.random()) for _ in range(500)]
    assert abs(sum(r for r in rates[10:] if r is not None) / 490) < 0.01


# ---------------------------------------------------------------------------------------------
# oscillation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("period", [2, 4, 8, 16])
def test_fft_finds_the_period_of_a_sine(period):
    t = np.arange(64)
    sp = dominant_period(np.sin(2 * np.pi * t / period + 0.5) + 0.3)
    assert sp.period == pytest.approx(period)
    assert sp.power_fraction > 0.95


def test_fft_period_survives_a_falling_trend_and_noise():
    rng = np.random.default_rng(0)
    t = np.arange(128)
    loss = 3.0 - 0.01 * t + 0.2 * np.sin(2 * np.pi * t / 6) + 0.05 * rng.standard_normal(128)
    sp = dominant_period(loss)
    assert abs(sp.period - 6) < 0.3 and sp.power_fraction > 0.6


def test_fft_of_white_noise_has_no_dominant_period():
    rng = np.random.default_rng(1)
    fractions = [dominant_period(rng.standard_normal(64)).power_fraction for _ in range(50)]
    assert np.mean(fractions) < 0.25


def test_fft_min_cycles_and_degenerate_windows():
    t = np.arange(64)
    slow = np.sin(2 * np.pi * t / 32) + 0.2 * np.sin(2 * np.pi * t / 4)
    assert dominant_period(slow).period == pytest.approx(32)
    # the Hann window leaks the slow sine into its neighbouring bins (k = 1, 3): start past them
    assert dominant_period(slow, min_cycles=4).period == pytest.approx(4)
    assert dominant_period([1.0] * 64) is None
    assert dominant_period([1.0, float("nan")] * 32) is None
    assert dominant_period([1.0, 2.0]) is None


# ---------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------


def test_conformal_threshold_is_the_finite_sample_quantile():
    c = Calibrator(window=100, min_samples=5)
    for x in range(1, 20):  # 1..19
        c.add(float(x))
    thr, method = c.threshold(0.1)  # k = ceil(20 * 0.9) = 18 -> the 18th smallest
    assert (thr, method) == (18.0, "conformal")
    assert c.p_value(18.5) == pytest.approx(2 / 20)
    assert c.threshold(0.01)[1] == "evt"  # 1/alpha - 1 = 99 > 19 scores: extrapolated


def test_calibrator_waits_for_min_samples_and_slides():
    c = Calibrator(window=10, min_samples=5)
    for x in range(4):
        c.add(float(x))
    assert c.threshold(0.1) == (None, "calibrating")
    assert c.test(100.0, 0.1)[0] is False
    for x in range(100, 120):
        c.add(float(x))
    assert len(c) == 10 and min(c._sorted) == 110.0


@pytest.mark.parametrize("standardize", [0, 50])
def test_calibrator_meets_its_target_rate_on_exchangeable_scores(standardize):
    rng = random.Random(0)
    c = Calibrator(window=2000, min_samples=30, standardize=standardize)
    for _ in range(4000):
        x = rng.gauss(0.0, 1.0)
        c.test(x, 0.05)
        c.test(x, 0.001)
        c.add(x)
    cov = c.coverage()
    assert 0.035 < cov["0.05"]["empirical_rate"] < 0.065
    assert cov["0.001"]["empirical_rate"] < 0.004
    # the 1e-4 quantile of N(0,1) is 3.72: the exponential tail is conservative, not wild
    thr, method = c.threshold(1e-4)
    assert 3.5 < thr < 5.5 and method in ("conformal", "evt")


def test_standardized_calibration_follows_a_drifting_level():
    """A healthy score whose level falls over the run (a loss decreasing): raw calibration keeps
    the early, high tail; standardised calibration moves the threshold down with the level."""
    rng = random.Random(2)
    raw, std = Calibrator(window=1000, min_samples=30), Calibrator(window=1000, min_samples=30, standardize=50)
    for t in range(600):
        x = -0.01 * t + 0.1 * rng.gauss(0, 1)
        raw.add(x)
        std.add(x)
    level_now = -6.0
    assert std.threshold(0.01)[0] < level_now + 1.0 < raw.threshold(0.01)[0]


# ---------------------------------------------------------------------------------------------
# curvature
# ---------------------------------------------------------------------------------------------


def _quadratic(eigs, seed=0):
    """A = Q diag(eigs) Q^T and the loss 0.5 x^T A x at a random x."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    x = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    return a, x, (lambda: 0.5 * x @ a @ x)


def test_hutchinson_trace_of_a_known_quadratic():
    a, x, loss = _quadratic([5.0, 3.0, 2.0, 1.0, 0.5, -1.0, 0.25, 4.0])
    hvp = autograd_hvp(loss, [x])
    est, se = hutchinson_trace(hvp, [x], samples=400, generator=torch.Generator().manual_seed(0))
    assert abs(est - float(torch.trace(a))) < max(4 * se, 0.05)
    # for a diagonal matrix a Rademacher probe is exact: v^T D v = tr(D)
    d = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    est, _ = hutchinson_trace(lambda v: [d @ v[0]], [torch.zeros(3, dtype=torch.float64)], samples=3)
    assert est == pytest.approx(6.0)


def test_power_iteration_finds_the_top_eigenvalue():
    a, x, loss = _quadratic([7.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    lam = power_iteration(autograd_hvp(loss, [x]), [x], iters=200, tol=1e-10,
                          generator=torch.Generator().manual_seed(1))
    assert lam == pytest.approx(7.0, rel=1e-4)


def test_finite_difference_hvp_matches_the_exact_product_and_restores_weights():
    a, x, loss = _quadratic([2.0, 1.0, 0.5, 3.0])
    before = x.detach().clone()
    v = [torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))]
    exact = autograd_hvp(loss, [x])(v)[0]
    approx = finite_difference_hvp(loss, [x])(v)[0]
    assert torch.allclose(exact, a @ v[0]) and torch.allclose(approx, exact, rtol=1e-5, atol=1e-6)
    assert torch.equal(x.detach(), before)


def test_sam_sharpness_of_a_quadratic_is_closed_form():
    a, x, loss = _quadratic([4.0, 1.0, 0.5])
    g = (a @ x).detach()
    rho = 0.05
    gn = g.norm()
    want = float(rho * gn + 0.5 * rho ** 2 * (g @ a @ g) / gn ** 2)
    before = x.detach().clone()
    sharp, base = sam_sharpness(loss, [x], rho=rho)
    assert sharp == pytest.approx(want, rel=1e-9) and base == pytest.approx(float(loss()))
    assert torch.equal(x.detach(), before)


# ---------------------------------------------------------------------------------------------
# importance
# ---------------------------------------------------------------------------------------------


def test_fisher_ema_interpolation_and_ewc_gradient():
    f = FisherEMA(beta=0.5)
    g = [torch.tensor([1.0, 2.0]), torch.tensor([0.0])]
    for _ in range(30):
        f.update(g)
    assert torch.allclose(f.fisher[0], torch.tensor([1.0, 4.0]), atol=1e-6) and f.updates == 30
    imp = f.importance()
    assert torch.allclose(imp[0], torch.tensor([0.25, 1.0]), atol=1e-6) and float(imp[1]) == 0.0
    # by the mean (5/3): the weight above it counts fully, the others in proportion
    assert torch.allclose(f.importance("mean")[0], torch.tensor([0.6, 1.0]), atol=1e-6)

    anchor = [torch.tensor([0.0, 0.0]), torch.tensor([1.0])]
    w = [torch.tensor([4.0, 4.0]), torch.tensor([3.0])]
    fisher_interpolate(w, anchor, imp)
    # important weight (imp 1) back to the anchor, the other keeps 3/4 of its progress
    assert torch.allclose(w[0], torch.tensor([3.0, 0.0])) and torch.allclose(w[1], torch.tensor([3.0]))

    p = torch.nn.Parameter(torch.tensor([2.0, 2.0]))
    p.grad = torch.zeros(2)
    pen = add_ewc_gradient([p], [torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 4.0])], lam=0.5)
    assert torch.allclose(p.grad, torch.tensor([0.5, 4.0]))  # lam * F * (w - anchor)
    assert pen == pytest.approx(0.25 * (1 * 1 + 4 * 4))


# ---------------------------------------------------------------------------------------------
# preemption: the checkpoint always holds what a resume needs, save_only_model or not
# ---------------------------------------------------------------------------------------------
_PREEMPTED_RUN = '''
import os, signal, sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
from transformers import TrainerCallback
from self_healing import HealingConfig, SelfHealingTrainer
from self_healing.tiny import build_trainer

out, max_steps, term_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

class Progress(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(f"STEP {state.global_step}", flush=True)
        if state.global_step == term_at:  # the scheduler's SIGTERM, at a known step
            os.kill(os.getpid(), signal.SIGTERM)

tr = build_trainer("sft", output_dir=out, max_steps=max_steps, callbacks=[Progress()], save_only_model=True,
                   save_strategy="steps", save_steps=4)
sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5))
sh.train()
adam_steps = {int(s["step"]) for s in tr.optimizer.state_dict()["state"].values()}
print(f"DONE {tr.state.global_step} {sh.exit_reason} ADAM {sorted(adam_steps)}", flush=True)
'''


def test_sigterm_with_save_only_model_leaves_a_full_checkpoint_and_the_relaunch_resumes_it(tmp_path):
    """`save_only_model=True`: the Trainer's checkpoint has weights only. The preemption must still
    leave what a resume needs (optimizer, scheduler, RNG, trainer state), and the relaunch resume
    from it: the optimizer carries on (Adam's step count is the total), not a fresh start at 0."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from pathlib import Path

    from self_healing.checkpoints import verify_checkpoint

    script = tmp_path / "run.py"
    script.write_text(_PREEMPTED_RUN)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.run([sys.executable, str(script), str(out), "14", "6"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    pm = json.loads((out / "postmortem.json").read_text())
    stopped = pm["last_step"]  # the step the signal arrived in, or the next (where the plugin saw it)
    assert pm["exit_reason"] == "interrupted" and stopped in (6, 7)
    assert pm["checkpoint"] is not None, pm.get("checkpoint_problem")
    ckpt = Path(pm["checkpoint"])
    assert verify_checkpoint(ckpt) == (True, "ok")
    for f in ("optimizer.pt", "scheduler.pt", "trainer_state.json"):
        assert (ckpt / f).is_file(), f
    assert list(ckpt.glob("rng_state*.pth"))
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == stopped
    assert "save_only_model" in first.stderr  # said why the plugin wrote its own

    again = subprocess.run([sys.executable, str(script), str(out), "14", "-1"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [int(line.split()[1]) for line in again.stdout.splitlines() if line.startswith("STEP ")]
    assert steps[0] == stopped + 1 and steps[-1] == 14, steps
    assert "DONE 14 completed ADAM [14]" in again.stdout, again.stdout[-500:]
    pm2 = json.loads((out / "postmortem.json").read_text())
    assert pm2["resumed"]["from"] == str(ckpt)


def test_a_preemption_that_leaves_no_resumable_checkpoint_says_so_loudly(tmp_path, caplog, monkeypatch):
    """When no full checkpoint can be written either, the interrupted postmortem says why, an error
    is logged at exit, and the relaunch warns that it starts from scratch."""
    import signal

    import self_healing.checkpoints as ck
    from self_healing import HealingConfig, SelfHealingTrainer
    from self_healing.tiny import build_trainer
    from transformers import TrainerCallback

    class Term(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                import os

                os.kill(os.getpid(), signal.SIGTERM)

    def disk_gone(trainer, step, extra_state=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "write_resume_checkpoint", disk_gone)
    out = tmp_path / "run"
    tr = build_trainer("trainer", output_dir=str(out), max_steps=8, callbacks=[Term()], save_only_model=True)
    with caplog.at_level("WARNING", logger="self_healing"), pytest.raises(SystemExit) as e:
        SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5)).train()
    assert e.value.code == 128 + signal.SIGTERM
    import json

    pm = json.loads((out / "postmortem.json").read_text())
    assert pm["checkpoint"] is None and "No space left" in pm["checkpoint_problem"]
    assert "no optimizer.pt" in pm["checkpoint_problem"]
    assert any(r.levelname == "ERROR" and "NO resumable checkpoint" in r.getMessage() for r in caplog.records)
    caplog.clear()
    tr2 = build_trainer("trainer", output_dir=str(out), max_steps=4)
    with caplog.at_level("WARNING", logger="self_healing"):
        SelfHealingTrainer(tr2, HealingConfig(snapshot_every_steps=5)).train()
    assert "left no verified checkpoint; starting from scratch" in caplog.text
