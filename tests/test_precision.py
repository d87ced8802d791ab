"""Precision: a healthy run is never touched. Healthy-but-unusual runs (the scenarios of
`benchmarks/false_positives.py`, shortened) end bit-identical to the bare trainer with zero
interventions, with the default and the aggressive preset; the update odometers behind the finite
weight-corruption test bound what every supported optimizer really does; and a NaN in the weights
is found at the first non-finite signal.

The runs here are at most 25 steps, inside ZClip's warm-up (25 steps, during which it clips like
the Trainer's fixed `max_grad_norm`), so `aggressive` is compared with bare as it is; after its
warm-up ZClip replaces the fixed clipping by design (the benchmark shows it)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from self_healing import HealingConfig, SelfHealingTrainer
from self_healing.detectors import compare_state
from self_healing.faults import Fault, inject_faults
from self_healing.snapshot import state_report
from self_healing.tiny import logged_losses, tiny_llama, tiny_tokenizer

_spec = importlib.util.spec_from_file_location(
    "false_positives", Path(__file__).resolve().parent.parent / "benchmarks" / "false_positives.py")
FP = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(FP)

# (scenario, steps): each long enough to pass an integrity check (every 10 steps by default, 5 aggressive);
# the benchmark runs every scenario (each optimizer alone too) for longer
RUNS = [("tiny-init-grows", 12), ("zero-init-sgd-heavy-decay", 11), ("batch1-mixed-lengths-restarts", 12),
        ("dpo-near-zero-loss", 10), ("grpo-saturating", 10), ("adafactor", 10), ("batch1-regression-small-init", 60)]


@pytest.mark.parametrize("name,steps", RUNS, ids=[r[0] for r in RUNS])
def test_healthy_unusual_run_is_bit_identical_with_zero_interventions(name, steps, tmp_path):
    """Before: tiny initial weights that grow (norm 0.01 -> 0.56 in 10 steps) were "weight
    corruption" against the step-0 norm: rolled back, and again, with the LR cut each time.

    `aggressive` must not intervene either; it is bit-identical too unless ZClip clipped: even in
    its warm-up, where it clips at the Trainer's `max_grad_norm`, its coefficient is computed in
    float64 where torch's `clip_grad_norm_` uses float32 (a last-bit difference, zclip.py)."""
    bare = FP.bare_run(name, steps, str(tmp_path / "bare"))
    for preset in ("default", "aggressive"):
        row = FP.healed_run(name, steps, str(tmp_path / preset), preset, bare)
        assert row["actions"] == [] and row["skipped"] == 0 and row["rollbacks"] == 0 and row["lr_cuts"] == 0, row
        assert row["exit"] == "completed" and row["lr_scale"] == 1.0, row
        assert row["identical"] or (preset == "aggressive" and row["zclip_clips"]), (preset, row)


def _model_and_batches(seed=0):
    torch.manual_seed(seed)
    model = tiny_llama(tiny_tokenizer(), hidden=32, layers=1)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(4, 40, (4, 16), generator=gen) for _ in range(6)]
    return model, batches


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-2, weight_decay=0.1),
    "adam-coupled-decay": lambda ps: torch.optim.Adam(ps, lr=3e-2, weight_decay=0.1),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=3e-2),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1.0),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, nesterov=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
    "rmsprop-momentum": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "adafactor": lambda ps: __import__("transformers").optimization.Adafactor(
        ps, lr=3e-2, scale_parameter=False, relative_step=False, warmup_init=False, beta1=0.9),
    "adafactor-relative": lambda ps: __import__("transformers").optimization.Adafactor(
        ps, lr=None, scale_parameter=True, relative_step=True, warmup_init=False),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_odometer_bounds_what_the_optimizer_really_moved(name):
    """Soundness of the finite test, measured: after every step the weights are no further from
    the reference than the odometer says (so healthy training never trips it), while a x300 scale
    of the weights is far outside it."""
    model, batches = _model_and_batches()
    opt = OPTIMIZERS[name](model.parameters())
    ref = state_report(model, opt, 0)
    w0 = [p.detach().clone() for p in model.parameters()]
    for i, ids in enumerate(batches, 1):
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rep = state_report(model, opt, i)
        assert rep.update_reach is not None, "no odometer for a supported optimizer"
        moved = math.sqrt(sum(float((p.detach() - q).pow(2).sum()) for p, q in zip(model.parameters(), w0)))
        reach = math.exp(rep.update_log_growth - ref.update_log_growth) * (ref.weight_norm + rep.update_reach
                                                                           - ref.update_reach) - ref.weight_norm
        assert rep.weight_norm - ref.weight_norm <= reach * (1 + 1e-5) + 1e-6, (i, rep.weight_norm, reach)
        if "adafactor-relative" != name:  # (that one's bound is multiplicative in ||w||, not a distance)
            assert moved <= reach * (1 + 1e-5) + 1e-6, (i, moved, reach)
        assert compare_state(rep, ref, 1.0) is None  # sound even without slack
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(300.0)
    hit = compare_state(state_report(model, opt, 7), ref, 10.0)
    assert hit is not None and hit.signal == "weight_corruption" and math.isfinite(hit.evidence["update_reach"])


def _odometer_run(steady: bool, monkeypatch) -> list[tuple[float, float, dict]]:
    from self_healing import snapshot

    if not steady:
        monkeypatch.setattr(snapshot._OptimizerReach, "_steady_step", lambda self, groups: False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    a, b, c = model
    opt = torch.optim.AdamW([{"params": [a.weight, b.weight], "weight_decay": 0.1},
                             {"params": [a.bias, b.bias], "weight_decay": 0.0}], lr=1e-2)
    info = snapshot.REACH.track(opt)
    out = []
    for step in range(1, 601):
        if step == 150:
            c.requires_grad_(False)
            opt.add_param_group({"params": list(c.parameters()), "weight_decay": 0.0})  # steps once (stale grads)
        if step == 320:
            opt.param_groups[1]["lr"] = torch.tensor(5e-3)  # a tensor LR (capturable schedules)
        if step == 330:
            opt.param_groups[1]["lr"] = 5e-3
        if step == 400:
            opt.param_groups[0]["weight_decay"] = 300.0  # lr x decay > 2: the growth odometer moves
        if step == 403:
            opt.param_groups[0]["weight_decay"] = 0.1
        if step == 500:
            opt.param_groups[0]["betas"] = (0.8, 0.99)  # changed mid-run: the bound no longer holds
        for g in opt.param_groups:
            if type(g["lr"]) is float:
                g["lr"] = 1e-2 * (1 + math.sin(step / 7)) / 2 + 1e-4  # a schedule
        x = torch.randn(16, 8)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((info.reach + info.folded, info.log_growth, dict(info.steps)))
    return out


def test_the_odometers_steady_path_adds_exactly_what_the_general_one_does(monkeypatch):
    """Adam's usual step takes a one-pass path with the bound tabled (the hook runs when every
    cache is cold); across a schedule, 600 steps (the table refilled), a frozen group added, the
    betas changed, a tensor LR and a decay that grows the weights, it adds bit for bit what the
    general path adds, and falls back to it where its assumptions break."""
    from self_healing import snapshot

    with monkeypatch.context() as m:
        general = _odometer_run(False, m)
    used = []
    real = snapshot._OptimizerReach._steady_step
    monkeypatch.setattr(snapshot._OptimizerReach, "_steady_step",
                        lambda self, groups: used.append(real(self, groups)) or used[-1])
    steady = _odometer_run(True, monkeypatch)
    assert steady == general
    assert used.count(True) > 450 and used.count(False) >= 3  # taken, and refused where it must be
    assert general[-1][1] > 0 and 2 in general[-1][2]  # the growth odometer moved; the late group stepped
    assert general[-1][:2] == general[498][:2]  # no odometer once the betas changed (no bound is assumed)


def test_the_odometer_tables_each_group_and_rereads_step_counts_after_a_load(monkeypatch):
    """Two groups with different betas, one stepping every other step: each keeps its own table
    (one table shared by the first stepping group was refilled nearly every step, 256 bounds each).
    A later optimizer state loaded mid-run: the step counts the bound grows with are read again,
    never left behind (a bound too small for the loaded state would condemn healthy weights)."""
    import copy

    from self_healing import snapshot

    calls = []
    real = snapshot.adam_update_bound
    monkeypatch.setattr(snapshot, "adam_update_bound", lambda *a: (calls.append(1), real(*a))[1])
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW([{"params": a.parameters(), "betas": (0.9, 0.999)},
                             {"params": b.parameters(), "betas": (0.8, 0.99)}], lr=1e-2)
    info = snapshot.REACH.track(opt)
    for step in range(1, 301):
        x = torch.randn(8, 4)
        (b(x).sum() + (a(x).sum() if step % 2 == 0 else 0)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert len(calls) < 2000, len(calls)
    later = copy.deepcopy(opt.state_dict())  # group 1 at step 300
    torch.manual_seed(1)
    fresh = torch.optim.AdamW([{"params": a.parameters(), "betas": (0.9, 0.999)},
                               {"params": b.parameters(), "betas": (0.8, 0.99)}], lr=1e-2)
    fi = snapshot.REACH.track(fresh)
    for _ in range(3):
        b(torch.randn(8, 4)).sum().backward()
        fresh.step()
        fresh.zero_grad(set_to_none=True)
    fresh.load_state_dict(later)
    b(torch.randn(8, 4)).sum().backward()
    fresh.step()
    assert fi.steps[1] >= 301


def test_an_optimizer_subclass_gets_no_odometer_and_so_no_finite_verdict():
    """A subclass may change the update rule: no bound is assumed, only non-finite values count."""
    class MyAdamW(torch.optim.AdamW):
        pass

    model, batches = _model_and_batches()
    opt = MyAdamW(model.parameters(), lr=1e-3)
    ref = state_report(model, opt, 0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(300.0)
    assert state_report(model, opt, 1).update_reach is None
    assert compare_state(state_report(model, opt, 1), ref, 10.0) is None


def test_nan_in_the_weights_is_rolled_back_at_the_first_nonfinite_gradient(tmp_path):
    """A NaN written into a weight the batch does not reach (an embedding row of a token that never
    occurs) leaves the loss finite; the same step's gradient is NaN (`nan_grad`). Before: that step
    was only skipped (the weights were not looked at), and the NaN weight stayed until the next
    integrity check; now the state is inspected at once and rolled back."""
    from self_healing.tiny import build_trainer
    from transformers import TrainerCallback

    tr = build_trainer("sft", output_dir=str(tmp_path / "sft"), max_steps=16, hidden=32, layers=1)
    unk = tr.processing_class.unk_token_id

    class NanRow(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step + 1 == 13:
                with torch.no_grad():
                    model.get_input_embeddings().weight[unk].fill_(float("nan"))

    inject_faults(tr, Fault("nan_grad", step=13))
    tr.add_callback(NanRow())
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5, integrity_check_every_steps=10))
    sh.train()
    first = sh.postmortem["recovery_actions"][0]
    assert (first["step"], first["failure"], first["actions"]) == (13, "weight_corruption", ["rollback"]), first
    assert all(bool(torch.isfinite(p).all()) for p in tr.model.parameters())
    assert len(logged_losses(tr)) >= 15
