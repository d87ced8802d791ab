"""ZClip: the arithmetic against hand-computed values, NaN/Inf norms, state round trips, and its
integration with real tiny trainers (one norm pass, no fixed clip first, gradient accumulation,
bf16, rollback, checkpoint resume), plus the LR x3000 scenario with the numbers it really gives."""
import json
import math

import pytest
import torch

from helpers import read_postmortem
from self_healing import HealingConfig, SelfHealingCallback, SelfHealingTrainer
from self_healing.faults import Fault, inject_faults
from self_healing.tiny import build_trainer, logged_losses, tail_loss, weights_finite
from self_healing.zclip import ZClip, load_from_trainer_state, save_to_trainer_state, scale_gradients

# Warm-up on norms 1, 2, 3: mean 2, population variance ((-1)^2 + 0 + 1^2) / 3 = 2/3.
# Step 4, norm 2.5: z = 0.5 / sqrt(2/3) = 0.6124 (< 2.5, no clip);
#   mean = 0.97*2 + 0.03*2.5 = 2.015; var = 0.97*(2/3) + 0.03*(2.5 - 2.015)^2 = 0.65372341667.
# Step 5, norm 10: std = sqrt(0.65372341667) = 0.80853; z = (10 - 2.015) / 0.80853 = 9.87592;
#   zscore/adaptive_scaling: eta = z / 2.5 = 3.95037, clip at 2.015 + 2.5*0.80853/3.95037 = 2.52668;
#   zscore/mean: clip at 2.015; percentile: clip at 2.015 + 2.5*0.80853 = 4.03633.
#   EMA fed the clip value: mean = 0.97*2.015 + 0.03*2.52668 = 2.03035, var = 0.64150205.
MEAN3, VAR3 = 2.0, 2.0 / 3.0
Z4, MEAN4, VAR4 = 0.6123716856967131, 2.015, 0.6537234166666667
Z5, THR5, MEAN5, VAR5 = 9.875915432282717, 2.5266814536617948, 2.030350443609854, 0.6415020483128421
PCT5 = 4.036329105852549


def warmed(**kw) -> ZClip:
    z = ZClip(warmup_steps=3, warmup_max_norm=2.5, **kw)
    for n in (1.0, 2.0, 3.0):
        z.observe(n)
    return z


def test_defaults_are_the_reference_implementations():
    z = ZClip()
    assert (z.alpha, z.z_thresh, z.warmup_steps, z.mode, z.clip_option) == (0.97, 2.5, 25, "zscore", "adaptive_scaling")


def test_warmup_statistics_and_fixed_clip():
    z = ZClip(warmup_steps=3, warmup_max_norm=2.5)
    d1, d2, d3 = z.observe(1.0), z.observe(2.0), z.observe(3.0)
    assert not d1.clipped and not d2.clipped and d1.z_score is None
    assert d3.clipped and d3.clipped_norm == 2.5 and d3.coefficient == pytest.approx(2.5 / (3.0 + 1e-6))
    assert (z.mean, z.var) == (pytest.approx(MEAN3), pytest.approx(VAR3))
    assert z.total_clips == 1 and not d3.adaptive


def test_zscore_adaptive_scaling_hand_computed():
    z = warmed()
    d4 = z.observe(2.5)
    assert not d4.clipped and d4.z_score == pytest.approx(Z4, rel=1e-9)
    assert (z.mean, z.var) == (pytest.approx(MEAN4, rel=1e-12), pytest.approx(VAR4, rel=1e-12))
    d5 = z.observe(10.0)
    assert d5.clipped and d5.adaptive and d5.z_score == pytest.approx(Z5, rel=1e-9)
    assert d5.clipped_norm == pytest.approx(THR5, rel=1e-9)
    assert d5.coefficient == pytest.approx(THR5 / (10.0 + 1e-6), rel=1e-9)
    assert (z.mean, z.var) == (pytest.approx(MEAN5, rel=1e-12), pytest.approx(VAR5, rel=1e-12))


def test_zscore_mean_option_and_percentile_mode():
    zm = warmed(clip_option="mean")
    zm.observe(2.5)
    assert zm.observe(10.0).clipped_norm == pytest.approx(MEAN4, rel=1e-12)
    zp = warmed(mode="percentile")
    zp.observe(2.5)
    d = zp.observe(10.0)
    assert d.clipped_norm == pytest.approx(PCT5, rel=1e-9)
    assert zp.mean == pytest.approx(0.97 * MEAN4 + 0.03 * PCT5, rel=1e-12)


def test_max_grad_norm_caps_after_warmup_and_bad_options_are_rejected():
    z = warmed(max_grad_norm=2.2)
    assert z.observe(2.5).clipped_norm == 2.2  # not an outlier, but above the hard cap
    with pytest.raises(ValueError, match="mode"):
        ZClip(mode="median")
    with pytest.raises(ValueError, match="clip_option"):
        ZClip(clip_option="max")
    with pytest.raises(ValueError, match="alpha"):
        ZClip(alpha=1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_norm_never_enters_the_statistics(bad):
    ref, z = warmed(), warmed()
    d = z.observe(bad)
    assert not d.clipped and d.coefficient == 1.0 and d.z_score is None
    assert z.nonfinite_ignored == 1 and z.steps == ref.steps
    assert (z.mean, z.var) == (ref.mean, ref.var)
    # the next steps decide exactly as if the bad norm had never happened
    for n in (2.5, 10.0, 2.0):
        assert z.observe(n) == ref.observe(n)
    # the reference implementation's EMA update, for contrast: one NaN and the mean is NaN for good
    mean = 2.0
    mean = 0.97 * mean + 0.03 * math.nan
    assert math.isnan(0.97 * mean + 0.03 * 2.0)


def test_nonfinite_norm_during_warmup_is_not_buffered():
    z = ZClip(warmup_steps=3)
    for n in (1.0, math.nan, 2.0, math.inf, 3.0):
        z.observe(n)
    assert z.initialized and (z.mean, z.var) == (pytest.approx(MEAN3), pytest.approx(VAR3))


def test_state_round_trip_through_json_and_trainer_state(tmp_path):
    from transformers import TrainerState

    rng = torch.Generator().manual_seed(0)
    norms = (1.0 + torch.rand(60, generator=rng) + 8.0 * (torch.rand(60, generator=rng) > 0.9)).tolist()
    a = ZClip(warmup_steps=10)
    for n in norms[:30]:
        a.observe(n)
    b = ZClip(warmup_steps=10)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [b.observe(n) for n in norms[30:]] == [a.observe(n) for n in norms[30:]]
    # mid-warm-up state too (the buffer), through a real trainer_state.json
    c = ZClip(warmup_steps=10)
    for n in norms[:4]:
        c.observe(n)
    st = TrainerState()
    save_to_trainer_state(c, st)
    st.save_to_json(str(tmp_path / "trainer_state.json"))
    d = ZClip(warmup_steps=10)
    assert load_from_trainer_state(d, TrainerState.load_from_json(str(tmp_path / "trainer_state.json")))
    assert d.state_dict() == c.state_dict()
    assert not load_from_trainer_state(ZClip(), TrainerState())


def test_scale_gradients_and_standalone_step():
    model = torch.nn.Linear(4, 3)
    model(torch.ones(2, 4)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    scale_gradients(model.parameters(), 0.5)
    assert all(torch.allclose(p.grad, 0.5 * b) for p, b in zip(model.parameters(), before))
    scale_gradients(model.parameters(), 1.0)  # no-op
    z = ZClip(warmup_steps=1, warmup_max_norm=0.1)
    d = z.step(model)
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert d.clipped and float(after) == pytest.approx(0.1, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# with real tiny trainers
# ---------------------------------------------------------------------------------------------
def _zclip_run(tmp_path, name, steps, cfg=None, faults=(), **overrides):
    tr = build_trainer("sft", output_dir=str(tmp_path / name), max_steps=steps, **overrides)
    if faults:
        inject_faults(tr, *faults)
    cb = SelfHealingCallback(cfg or HealingConfig(zclip_enabled=True, zclip_warmup_steps=5,
                                                  snapshot_every_steps=5)).attach(tr)
    seen = []
    cb.observers.append(type("Obs", (), {"on_step": lambda self, step, s, info: seen.append((step, s, info))})())
    return tr, cb, seen


def test_one_norm_pass_and_no_fixed_clip_before_zclip(tmp_path, monkeypatch):
    """One fused norm per step is the only pass over the gradients (no clip_grad_norm_, whose x1.0
    multiply would be a second); with max_grad_norm=1.0 the Trainer's limit applies only during
    ZClip's warm-up; after it the update sees ZClip's decision."""
    tr, cb, seen = _zclip_run(tmp_path, "pass", 14, max_grad_norm=1.0)
    calls, norms = [], []
    acc = tr.accelerator
    orig = acc.clip_grad_norm_
    acc.clip_grad_norm_ = lambda *a, **k: (calls.append(a[1] if len(a) > 1 else k.get("max_norm")), orig(*a, **k))[1]
    real_norm = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: (norms.append(1), real_norm(*a, **k))[1])
    at_step = []
    tr.create_optimizer()
    tr.optimizer.register_step_pre_hook(lambda opt, *_: at_step.append(float(real_norm(
        [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]))))
    tr.train()
    assert calls == [] and len(norms) == 14  # one measuring pass per step, never a fixed clip
    logged = [h["grad_norm"] for h in tr.state.log_history if "grad_norm" in h]
    decisions = [info["zclip"] for _, _, info in seen]
    assert [d.raw_norm for d in decisions] == pytest.approx(logged, rel=1e-5)
    for i, (d, applied) in enumerate(zip(decisions, at_step)):
        assert applied == pytest.approx(d.clipped_norm, rel=1e-4), i
        if i < 5:
            assert applied <= 1.0 + 1e-4  # warm-up: the Trainer's max_grad_norm
    late = [(d, a) for d, a in zip(decisions[5:], at_step[5:]) if not d.clipped]
    assert late and all(a > 1.0 for d, a in late), "after warm-up an unclipped norm above 1.0 must reach the optimizer"


def test_gradient_accumulation_observes_once_per_optimizer_step(tmp_path):
    tr, cb, seen = _zclip_run(tmp_path, "accum", 8, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    tr.train()
    assert cb.zclip.steps == 8 and [s for s, _, _ in seen] == list(range(1, 9))
    logged = [h["grad_norm"] for h in tr.state.log_history if "grad_norm" in h]
    assert [info["zclip"].raw_norm for _, _, info in seen] == pytest.approx(logged, rel=1e-5)


def test_bf16_mixed_precision_heals_a_nan_with_zclip(tmp_path):
    tr, cb, seen = _zclip_run(tmp_path, "bf16", 12, faults=[Fault("nan_grad", step=8)], bf16=True)
    tr.train()
    assert tr.accelerator.mixed_precision == "bf16"
    assert cb.recorder.counters["skipped_steps"] == 1 and weights_finite(tr.model)
    assert cb.zclip.steps == 11 and math.isfinite(cb.zclip.mean) and math.isfinite(cb.zclip.var)


def test_rollback_restores_zclip_statistics(tmp_path):
    cfg = HealingConfig(zclip_enabled=True, zclip_warmup_steps=5, snapshot_every_steps=5)
    tr, cb, _ = _zclip_run(tmp_path, "rb", 20, cfg=cfg, faults=[Fault("nan_weight", step=16)])
    restored = []
    cb.observers.append(type("Obs", (), {"on_event": lambda self, ev: restored.append(
        (ev["actions"], cb.zclip.state_dict(), cb.ring.latest_verified().extra["zclip"]))})())
    tr.train()
    actions, now, snap = restored[0]
    assert "rollback" in actions and now == snap and now["steps"] < 16


def test_zclip_state_is_saved_with_checkpoints_and_restored_on_resume(tmp_path):
    tr, cb, _ = _zclip_run(tmp_path, "ckpt", 8, save_strategy="steps", save_steps=8)
    tr.train()
    saved = json.loads((tmp_path / "ckpt" / "checkpoint-8" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["SelfHealingZClip"]["attributes"] == cb.zclip.state_dict()
    tr2, cb2, seen2 = _zclip_run(tmp_path, "ckpt", 10)
    tr2.train(resume_from_checkpoint=str(tmp_path / "ckpt" / "checkpoint-8"))
    assert [s for s, _, _ in seen2] == [9, 10]
    assert seen2[0][2]["zclip"].z_score is not None  # warm-up was not redone
    assert cb2.zclip.steps == 10


def test_lr_x3000_spike_zclip_alone_vs_fixed_clipping(tmp_path):
    """The issue's scenario: SFT, LR x3000 for steps 25-27 of 60, AdamW.

    "ZClip alone": the callback with ZClip on (warm-up 10 so it is live at step 25) and every other
    detector set so it cannot fire (`OFF`); "fixed clipping": the bare Trainer, max_grad_norm=1.0.
    What really happens, and what this test pins down: the step-25 gradient is computed on healthy
    weights, so it is normal (ZClip's z-score is small, nothing to clip) and any clipper lets it
    through; AdamW then moves every weight by ~LR x m/sqrt(v), i.e. ~3e-3 x 3000 = 9 regardless of
    the gradient's scale. The weights are wrecked before any huge gradient exists. ZClip then clips
    the huge gradients that follow (protecting Adam's second moment) but cannot undo the update:
    measured tail losses (mean of the last 10) ~9500 with ZClip alone, ~7600 with fixed clipping
    at 1.0 and ~3300 with no clipping at all, against 0.985 clean. So the issue's "ZClip alone
    within 1.25x of clean" is NOT met, by ZClip or any gradient clipper; asserted here as such.
    What does heal it is the lr_spike detector (skip the step, restore the scheduled LR; tail
    0.974, no rollback), shown last.
    """
    OFF = dict(loss_spike_factor=1e12, grad_z_threshold=1e6, grad_spike_factor=1e12, lr_spike_factor=1e12,
               weight_growth_factor=1e12, divergence_patience=100000, snapshot_every_steps=5)
    spike = Fault("lr_scale", step=25, duration=3, factor=3000.0)

    clean = build_trainer("sft", output_dir=str(tmp_path / "clean"))
    clean.train()
    clean_tail = tail_loss(clean)

    fixed = build_trainer("sft", output_dir=str(tmp_path / "fixed"), max_grad_norm=1.0)
    inject_faults(fixed, spike)
    fixed.train()

    zc, cb, seen = _zclip_run(tmp_path, "zclip", 60, cfg=HealingConfig(zclip_enabled=True, zclip_warmup_steps=10, **OFF),
                              faults=[spike])
    zc.train()
    assert cb.recorder.counters["rollbacks"] == 0 and cb.recorder.counters["skipped_steps"] == 0  # ZClip alone
    d25 = seen[24][2]["zclip"]
    assert seen[24][0] == 25 and not d25.clipped and d25.z_score < cb.zclip.z_thresh  # the damaging step looked normal
    losses = logged_losses(zc)
    assert losses[25] > 100 * losses[23]  # ...and the weights were wrecked by its update
    assert cb.zclip.total_clips >= 10  # ZClip did clip the huge gradients that followed
    zclip_ratio, fixed_ratio = tail_loss(zc) / clean_tail, tail_loss(fixed) / clean_tail
    assert zclip_ratio > 1.25 and fixed_ratio > 1.25, (zclip_ratio, fixed_ratio)

    sh = SelfHealingTrainer(inject_and_return(build_trainer("sft", output_dir=str(tmp_path / "healed")), spike),
                            HealingConfig(zclip_enabled=True, snapshot_every_steps=5))
    sh.train()
    pm = read_postmortem(sh)
    assert pm["counters"]["rollbacks"] == 0 and {a["failure"] for a in pm["recovery_actions"]} == {"lr_spike"}
    assert tail_loss(sh.trainer) <= 1.25 * clean_tail, (tail_loss(sh.trainer), clean_tail)


def inject_and_return(trainer, *faults):
    inject_faults(trainer, *faults)
    return trainer


def test_warm_up_clipping_is_the_trainers_fixed_clipping_bit_for_bit(tmp_path):
    """During ZClip's warm-up it clips with the Trainer's max_grad_norm: the run must be the bare
    run exactly (torch computes the coefficient in float32; a float64 one differs in the last bit)."""
    import torch

    from self_healing import HealingConfig, SelfHealingTrainer
    from self_healing.tiny import build_trainer

    def run(cfg):
        tr = build_trainer("trainer", output_dir=str(tmp_path / ("sh" if cfg else "bare")), max_steps=12,
                           max_grad_norm=0.5)
        (SelfHealingTrainer(tr, cfg) if cfg else tr).train()
        return tr

    bare = run(None)
    sh = run(HealingConfig.aggressive().replace(snapshot_every_steps=5))  # ZClip warm-up: 25 steps
    assert sh.callback_handler.callbacks  # ran with the plugin
    w0, w1 = bare.model.state_dict(), sh.model.state_dict()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
