"""The plain-loop `Healer`: a hand-written PyTorch loop, an `accelerate` loop and a 2-process DDP
loop heal the rehearsed faults, and a healthy run trains bit-identically to the bare loop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from self_healing import Fault, HealingConfig, Healer, inject_faults

ROOT = Path(__file__).resolve().parent.parent
STEPS, AT = 150, 80
FAULTS = {  # kind -> the failure the postmortem must name
    "nan_loss": "nan_loss", "inf_loss": "nan_loss", "nan_grad": "nonfinite_gradient",
    "grad_scale": "gradient_explosion", "nan_weight": "weight_corruption", "weight_scale": "weight_corruption",
    "zero_exp_avg_sq": "optimizer_state_corruption", "lr_scale": "lr_spike",
}


def _task():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(512, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(512, 1, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    return model, x, y


def run_loop(fault=None, healer_on=True, accelerate=False, steps=STEPS, **cfg):
    """The README's loop on a small regression task; returns (final loss, weights, healer)."""
    model, x, y = _task()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 if s < 100 else 0.3)
    accelerator = None
    if accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    cfg.setdefault("snapshot_every_steps", 10)
    healer = Healer(model, optimizer, scheduler, config=HealingConfig(**cfg), accelerator=accelerator) \
        if healer_on else None
    if fault is not None:
        inject_faults(healer, fault)
    for s in range(steps):
        idx = torch.arange(s * 16, s * 16 + 16) % x.shape[0]
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        if healer is None or healer.before_step(loss):
            if accelerator is not None:
                accelerator.clip_grad_norm_(model.parameters(), 5.0)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad()
        if healer is not None:
            healer.after_step()
            assert not healer.stopped
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x), y).item()
    return final, [p.detach().clone() for p in model.parameters()], healer


@pytest.fixture(scope="module")
def clean():
    return {acc: run_loop(healer_on=False, accelerate=acc) for acc in (False, True)}


@pytest.mark.parametrize("accelerate", [False, True], ids=["plain", "accelerate"])
def test_a_healthy_loop_trains_bit_identically_to_the_bare_loop(clean, accelerate):
    final, weights, healer = run_loop(accelerate=accelerate)
    assert all(torch.equal(a, b) for a, b in zip(clean[accelerate][1], weights))
    assert healer.recorder.events == [] and healer.recorder.counters["snapshots"] > 1


@pytest.mark.parametrize("accelerate", [False, True], ids=["plain", "accelerate"])
@pytest.mark.parametrize("kind", list(FAULTS))
def test_the_loop_heals_each_rehearsed_fault(clean, kind, accelerate):
    final, weights, healer = run_loop(Fault(kind, step=AT), accelerate=accelerate)
    assert healer.faults.fired and healer.faults.fired[0]["step"] == AT
    failures = [e["failure"] for e in healer.recorder.events]
    assert failures and failures[0] == FAULTS[kind] and healer.recorder.events[0]["step"] == AT
    assert all(torch.isfinite(w).all() for w in weights)
    assert final <= 1.15 * clean[accelerate][0], (final, clean[accelerate][0], healer.recorder.events)


def test_a_plain_loop_without_a_scheduler_catches_an_lr_spike_against_its_last_healthy_lr():
    model, x, y = _task()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    healer = Healer(model, optimizer)
    inject_faults(healer, Fault("lr_scale", step=5))
    for s in range(8):
        loss = torch.nn.functional.mse_loss(model(x[:16]), y[:16])
        loss.backward()
        if healer.before_step(loss):
            optimizer.step()
        optimizer.zero_grad()
        healer.after_step()
    assert [e["failure"] for e in healer.recorder.events] == ["lr_spike"]
    assert optimizer.param_groups[0]["lr"] == 0.05


def test_finish_writes_the_postmortem_and_the_context_manager_records_the_users_exception(tmp_path):
    model, x, y = _task()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(KeyError, match="labels"):  # the user's bug surfaces unchanged
        with Healer(model, optimizer, output_dir=tmp_path) as healer:
            loss = torch.nn.functional.mse_loss(model(x[:16]), y[:16])
            loss.backward()
            healer.before_step(loss)
            healer.after_step()
            raise KeyError("labels")
    pm = json.loads((tmp_path / "postmortem.json").read_text())
    assert pm["exit_reason"] == "exception" and pm["exception_type"] == "KeyError" and pm["last_step"] == 1
    assert healer.finish() is healer.postmortem  # a second finish changes nothing


def test_bad_arguments_and_unsupported_loop_faults_say_what_was_expected():
    model, _, _ = _task()
    with pytest.raises(TypeError, match="optimizer"):
        Healer(model, object())
    with pytest.raises(TypeError, match="HealingConfig"):
        Healer(model, torch.optim.SGD(model.parameters(), lr=0.1), config={"nan_patience": 3})
    healer = Healer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="plain loop"):
        inject_faults(healer, Fault("noisy_data", step=3))
    with pytest.raises(RuntimeError, match="before_step"):
        healer.after_step()


def test_a_two_process_ddp_loop_takes_the_same_decisions_on_every_rank(tmp_path):
    """Faults on rank 1 only (a NaN loss, later NaN weights, then its LR x100): both ranks must still
    skip, roll back, and put the LR back together, and end with the same weights. (The LR spike was
    judged by rank 1 alone: it skipped, rank 0 stepped, and the weights parted for good.)"""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "ddp_loop_run.py"), str(tmp_path),
                           "nan_loss@12,nan_weight@25,lr_scale@33"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert [d[:2] for d in ranks[0]["decisions"]][:3] == [[12, "nan_loss"], [25, "weight_corruption"], [33, "lr_spike"]]
    assert ranks[0]["decisions"][1][2] == ["rollback"]
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["finite"] and ranks[1]["finite"]
    assert ranks[1]["fired"] and not ranks[0]["fired"]  # the faults were on rank 1 alone


@pytest.mark.parametrize("script,fault,failure", [("plain_pytorch", "nan_weight@30", "weight_corruption"),
                                                  ("accelerate_loop", "grad_scale@30", "gradient_explosion")])
def test_the_loop_examples_rehearse_a_fault_and_write_the_postmortem(tmp_path, script, fault, failure):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{script}.py"), "--fault", fault,
                           "--output-dir", str(tmp_path), "--preset", str(ROOT / "presets" / "default.yaml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pm = json.loads((tmp_path / "postmortem.json").read_text())
    assert pm["exit_reason"] == "completed" and pm["last_step"] == 60
    assert [e["failure"] for e in pm["recovery_actions"]] == [failure]
    assert "COMPLETED at step 60" in proc.stdout
