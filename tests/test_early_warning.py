"""Early-warning signals on real tiny runs (self_healing.early_warning) and the build-up faults."""
import math

import pytest
import torch
from transformers import TrainerCallback

from helpers import build_trainer, read_postmortem
from self_healing import HealingConfig, SelfHealingTrainer
from self_healing.callback import SelfHealingCallback
from self_healing.config import PRESET_NAMES
from self_healing.early_warning import EarlyWarning, UpdateUndo
from self_healing.faults import Fault, inject_faults
from self_healing.tiny import tail_loss

BASIC = {"nan_loss", "nonfinite_gradient", "loss_spike", "divergence", "gradient_explosion", "weight_corruption",
         "optimizer_state_corruption", "lr_spike"}
# short runs: the calibration is ready after ~60 steps instead of ~85 with the defaults
FAST = dict(calibration_window=100, calibration_min_steps=10, snapshot_every_steps=5)


def _events(sh):
    return sh.callback.recorder.events + list(sh.callback.recorder.recent_events)


def _first(events, kinds, warnings=False):
    return next((e["step"] for e in events if e["failure"] in kinds
                 and ((e.get("evidence") or {}).get("level") == "warning") == warnings), None)


# ---------------------------------------------------------------------------------------------
# off by default, config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_signal_is_off_in_the_presets_and_nothing_is_attached(tmp_path, name):
    cfg = HealingConfig.from_preset(name)
    assert not (cfg.growth_forecast or cfg.oscillation_check or cfg.probe_every_steps or cfg.curvature_every_steps)
    tr = build_trainer("sft", output_dir=str(tmp_path), max_steps=2)
    cb = SelfHealingCallback(cfg).attach(tr)
    assert cb.early_warning is None
    assert not any(isinstance(c, EarlyWarning) for c in tr.callback_handler.callbacks)
    assert not any(isinstance(o, EarlyWarning) for o in cb.observers)


@pytest.mark.parametrize("field,value", [("probe_every_steps", -1), ("early_warning_mode", "shadow"),
                                         ("target_false_alarm_rate", 0.0), ("growth_forecast", "yes"),
                                         ("growth_ema", 1.0), ("oscillation_window", 8)])
def test_bad_early_warning_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        HealingConfig(**{field: value})


# ---------------------------------------------------------------------------------------------
# mechanics
# ---------------------------------------------------------------------------------------------


def test_update_undo_restores_weights_and_adam_state_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step():
        opt.zero_grad()
        model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()

    step()
    undo = UpdateUndo()
    assert undo.capture(model, opt)
    want_w = [p.detach().clone() for p in model.parameters()]
    want_s = {k: v.clone() for st in opt.state.values() for k, v in st.items()}
    step()
    assert not torch.equal(next(model.parameters()), want_w[0])
    assert undo.restore(model, opt)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), want_w))
    got_s = {k: v for st in opt.state.values() for k, v in st.items()}
    assert all(torch.equal(got_s[k], v) for k, v in want_s.items())  # step counts included


class _LRs(TrainerCallback):
    def __init__(self):
        self.rows = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        self.rows.append((state.global_step + 1, optimizer.param_groups[0]["lr"], lr_scheduler.get_last_lr()[0]))


def test_build_up_faults(tmp_path):
    tr = build_trainer("sft", output_dir=str(tmp_path / "ramp"), max_steps=12, lr=1e-3)
    rec = _LRs()
    tr.add_callback(rec)
    w0 = [p.detach().clone() for p in tr.model.parameters()]
    inj = inject_faults(tr, Fault("lr_ramp", step=7, duration=3, factor=2.0),
                        Fault("weight_drift", step=2, duration=2, factor=1.5),
                        Fault("noisy_data", step=10, duration=2, factor=0.5))
    seen = {}
    orig = tr.training_step

    def spy(model, inputs, *a, **k):
        seen.setdefault(tr.state.global_step + 1, inputs["input_ids"].clone())
        return orig(model, inputs, *a, **k)

    tr.training_step = spy
    tr.train()
    lr = {s: (g, sched) for s, g, sched in rec.rows}
    # the scheduler itself ramps (so the lr_spike test sees nothing): x2, x4, x8, then held at x8
    for s, mult in ((6, 1), (7, 2), (8, 4), (9, 8), (10, 8), (12, 8)):
        assert lr[s][0] == pytest.approx(1e-3 * mult) and lr[s][1] == pytest.approx(lr[s][0])
    assert [f["kind"] for f in inj.fired[:2]] == ["weight_drift", "weight_drift"]
    assert inj.fired[0]["step"] == 2 and inj.fired[1]["step"] == 3
    fractions = [f["fraction"] for f in inj.fired if f["kind"] == "noisy_data"]
    assert fractions[:3] == [0.25, 0.5, 0.5]  # rises to `factor` over `duration` steps, then held
    assert seen and all(k in seen for k in (10, 11))
    assert not any(torch.equal(p, w) for p, w in zip(tr.model.parameters(), w0))


def test_observe_mode_changes_nothing_and_records_curvature(tmp_path):
    """Every signal on in observe mode (probes and curvature included) leaves the run bit-identical
    to the default plugin: taking the probe batch restores every RNG, probes run in no_grad."""
    def run(name, cfg):
        tr = build_trainer("sft", output_dir=str(tmp_path / name), max_steps=30)
        sh = SelfHealingTrainer(tr, cfg)
        sh.train()
        return sh

    ref = run("ref", HealingConfig())
    obs = run("obs", HealingConfig(growth_forecast=True, oscillation_check=True, probe_every_steps=1,
                                   curvature_every_steps=10, fisher_every_steps=5, early_warning_mode="observe",
                                   oscillation_window=16))
    for a, b in zip(ref.trainer.model.parameters(), obs.trainer.model.parameters()):
        assert torch.equal(a, b)
    pm = read_postmortem(obs)
    ew = pm["early_warning"]
    assert ew["mode"] == "observe" and ew["signals"] == ["growth", "oscillation", "probe", "curvature", "fisher"]
    assert ew["fisher"] == {"updates": 6, "fisher_weighted_rollbacks": 0, "ewc_steps": 0}
    assert ew["probe"]["probes"] >= 25 and ew["probe"]["rejected"] == 0
    curv = ew["curvature"]
    assert [r["step"] for r in curv] == [10, 20, 30]
    for r in curv:
        assert "error" not in r, r
        assert math.isfinite(r["hessian_trace"]) and math.isfinite(r["top_eigenvalue"]) and r["seconds"] > 0
        assert r["sam_sharpness"] > 0  # one ascent step of radius 0.05 raises the loss
    assert set(ew["seconds"]) >= {"growth", "oscillation", "probe", "curvature"}
    assert set(ew["calibration"]) == {"grad_norm_growth", "update_norm_growth", "loss_growth", "loss_oscillation",
                                      "grad_norm_oscillation", "probe"}


# ---------------------------------------------------------------------------------------------
# what the benchmark shows, in miniature
# ---------------------------------------------------------------------------------------------


def test_growth_and_probe_see_a_ramped_lr_before_the_basic_detectors(tmp_path):
    tr = build_trainer("sft", output_dir=str(tmp_path), max_steps=140)
    inject_faults(tr, Fault("lr_ramp", step=80, duration=60, factor=1.1))
    sh = SelfHealingTrainer(tr, HealingConfig(growth_forecast=True, probe_every_steps=1, early_warning_mode="observe",
                                              **FAST))
    sh.train()
    ev = _events(sh)
    basic = _first(ev, BASIC)
    growth, probe = _first(ev, {"instability_forecast"}), _first(ev, {"probe_regression"})
    assert growth is not None and probe is not None
    assert 80 <= growth and 80 <= probe, "no false alarm before the ramp starts"
    assert basic is None or (growth < basic and probe < basic), (growth, probe, basic)
    cov = read_postmortem(sh)["early_warning"]["calibration"]["update_norm_growth"]
    assert cov["method"] in ("evt", "conformal") and cov["coverage"]


def test_probe_checked_updates_heal_a_ramped_lr_better_than_rollback_alone(tmp_path):
    def run(name, **cfg):
        tr = build_trainer("sft", output_dir=str(tmp_path / name), max_steps=160)
        inject_faults(tr, Fault("lr_ramp", step=80, duration=60, factor=1.1))
        sh = SelfHealingTrainer(tr, HealingConfig(**FAST, **cfg))
        sh.train()
        return sh

    rollback = run("rollback")
    probed = run("probe", probe_every_steps=1)
    assert rollback.exit_reason == probed.exit_reason == "completed"
    rb_kinds = {e["failure"] for e in _events(rollback)}
    assert rb_kinds & {"divergence", "loss_spike", "gradient_explosion"}  # the basic detectors had to act
    assert rollback.callback.recorder.counters["rollbacks"] >= 1
    pr = [e for e in _events(probed) if e["failure"] == "probe_regression"]
    assert pr and "skip_step" in pr[0]["actions"] and any("reduce_lr" in e["actions"] for e in pr)
    rb_tail, pr_tail = tail_loss(rollback.trainer), tail_loss(probed.trainer)
    assert pr_tail < 0.7 * rb_tail, (pr_tail, rb_tail)


def test_fisher_weighted_rollback_and_ewc_after_a_growth_failure(tmp_path):
    """Weights drifting (not the LR): a growth failure rolls back, Fisher-weighted, then EWC pulls."""
    tr = build_trainer("sft", output_dir=str(tmp_path), max_steps=100)
    inject_faults(tr, Fault("weight_drift", step=80, duration=40, factor=1.02))
    sh = SelfHealingTrainer(tr, HealingConfig(growth_forecast=True, fisher_every_steps=1, ewc_steps=5, **FAST))
    sh.train()
    fails = [e for e in _events(sh) if e["failure"] == "instability_forecast" and "rollback" in e["actions"]]
    assert fails and fails[0]["evidence"]["lr_cause"] is False and fails[0]["step"] >= 80
    f = sh.callback.early_warning.summary["fisher"]
    assert f["fisher_weighted_rollbacks"] == len(fails) and f["ewc_steps"] >= 1
    assert sh.exit_reason == "completed" and all(torch.isfinite(p).all() for p in tr.model.parameters())
