"""Crashes that heal: OOM, bad batches, flaky I/O, preemption, a full disk, and the dry run,
on real tiny trainers."""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import read_postmortem, run_healed, weights_finite
from self_healing import HealingConfig, SelfHealingTrainer
from self_healing.checkpoints import latest_verified_checkpoint, verify_checkpoint
from self_healing.faults import Fault, inject_faults
from self_healing.tiny import build_trainer

FAST = HealingConfig(snapshot_every_steps=5, api_backoff_seconds=0.001)


def oom_fault(bs0):
    return Fault("exception", step=10, duration=10**6,
                 exception=lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                 when=lambda t, inputs: t.args.per_device_train_batch_size > bs0 // 2)


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_oom_halves_the_batch_and_keeps_the_effective_batch(kind, tmp_path):
    tr = build_trainer(kind, output_dir=str(tmp_path / kind), max_steps=20)
    bs0, ga0 = tr.args.per_device_train_batch_size, tr.args.gradient_accumulation_steps
    inject_faults(tr, oom_fault(bs0))
    sh = SelfHealingTrainer(tr, FAST)
    sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and tr.state.global_step == 20
    assert tr.args.per_device_train_batch_size == bs0 // 2
    assert tr.args.per_device_train_batch_size * tr.args.gradient_accumulation_steps == bs0 * ga0
    ev = [a for a in pm["recovery_actions"] if a["failure"] == "oom"]
    assert len(ev) == 1 and ev[0]["step"] == 10 and "reduce_batch" in ev[0]["actions"]
    assert ev[0]["details"]["batch"]["effective_batch"] == [bs0 * ga0, bs0 * ga0]
    assert weights_finite(tr.model)


def test_oom_at_batch_one_turns_on_gradient_checkpointing_then_gives_up(tmp_path):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "t"), max_steps=12, per_device_train_batch_size=2)
    inject_faults(tr, Fault("exception", step=4, duration=10**6,
                            exception=lambda: torch.OutOfMemoryError("CUDA out of memory")))
    sh = SelfHealingTrainer(tr, FAST)
    out = sh.train()
    pm = read_postmortem(sh)
    actions = [a["actions"][0] for a in pm["recovery_actions"]]
    assert actions == ["reduce_batch", "enable_gradient_checkpointing", "give_up"]
    assert pm["exit_reason"] == "gave_up" and "per-device batch 1" in pm["give_up_reason"]
    assert out.global_step == tr.state.global_step


def test_eval_oom_does_not_shrink_the_training_batch(tmp_path):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "t"), max_steps=12, per_device_eval_batch_size=8)
    tr.eval_dataset = tr.train_dataset.select(range(32))
    tr.args.eval_strategy, tr.args.eval_steps = "steps", 5
    calls = {"n": 0}
    orig = tr.evaluation_loop

    def evaluation_loop(*a, **k):
        calls["n"] += 1
        if tr.args.per_device_eval_batch_size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory during eval")
        return orig(*a, **k)

    tr.evaluation_loop = evaluation_loop
    sh = SelfHealingTrainer(tr, FAST)
    sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and tr.state.global_step == 12
    assert tr.args.per_device_train_batch_size == 8 and tr.args.per_device_eval_batch_size == 4
    ev = [a for a in pm["recovery_actions"] if a["failure"] == "oom"]
    assert ev and ev[0]["actions"][0] == "reduce_eval_batch"


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_shape_error_once_skips_the_batch(kind, tmp_path):
    err = lambda: RuntimeError("The size of tensor a (64) must match the size of tensor b (65) at non-singleton dimension 1")  # noqa: E731
    sh = run_healed(kind, tmp_path, faults=[Fault("exception", step=25, exception=err, times=1)], config=FAST,
                    max_steps=40)
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and sh.trainer.state.global_step == 40
    assert [(b["step"], b["exception_type"]) for b in pm["skipped_batches"]] == [(25, "RuntimeError")]
    assert "must match the size" in pm["skipped_batches"][0]["error"]
    assert [a["failure"] for a in pm["recovery_actions"]] == ["data_error"]


def test_broken_collation_skips_that_batch_and_takes_the_next(tmp_path):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "t"), max_steps=20)
    collate = tr.data_collator
    seen = {"n": 0}

    def flaky(features):
        seen["n"] += 1
        if seen["n"] == 7:
            raise KeyError("input_ids")
        return collate(features)

    tr.data_collator = flaky
    sh = SelfHealingTrainer(tr, FAST)
    sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and tr.state.global_step == 20
    assert [b["where"] for b in pm["skipped_batches"]] == ["collate"]


def test_too_many_bad_batches_is_a_pipeline_bug(tmp_path):
    err = lambda: KeyError("label")  # noqa: E731
    cfg = FAST.replace(max_skipped_batches=3)
    sh = run_healed("sft", tmp_path, faults=[Fault("exception", step=10, duration=100, exception=err)], config=cfg,
                    max_steps=40)
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "gave_up" and "max_skipped_batches=3" in pm["give_up_reason"]
    assert len(pm["skipped_batches"]) == 4


def test_connection_error_heals_after_backoff(tmp_path):
    err = lambda: ConnectionError("Connection reset by peer")  # noqa: E731
    sh = run_healed("sft", tmp_path, faults=[Fault("exception", step=12, exception=err, times=1)], config=FAST,
                    max_steps=20)
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and sh.trainer.state.global_step == 20
    assert pm["counters"]["api_retries"] == 1
    # the retry is an event of its own: when it struck and what was raised
    [ev] = pm["recovery_actions"]
    assert ev["step"] == 12 and ev["failure"] == "api_error" and ev["actions"] == ["backoff_retry"]
    assert "Connection reset by peer" in ev["diagnosis"] and ev["evidence"]["exception_type"] == "ConnectionError"


def test_persistent_network_failure_outside_the_step_resumes_then_gives_up(tmp_path):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "t"), max_steps=20, save_strategy="steps", save_steps=5)
    orig = tr._save_checkpoint
    state = {"n": 0}

    def save(*a, **k):
        state["n"] += 1
        if state["n"] == 2:
            raise TimeoutError("hub upload timed out")
        return orig(*a, **k)

    tr._save_checkpoint = save
    sh = SelfHealingTrainer(tr, FAST)
    sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and tr.state.global_step == 20
    ev = pm["recovery_actions"][0]
    assert ev["failure"] == "api_error" and ev["actions"] == ["backoff_retry", "resume"] and ev["step"] == 11


def test_disk_full_frees_half_written_checkpoints_but_never_the_good_one(tmp_path):
    out = tmp_path / "t"
    tr = build_trainer("trainer", output_dir=str(out), max_steps=20, save_strategy="steps", save_steps=5)
    orig = tr._save_checkpoint
    state = {"n": 0}

    def save(*a, **k):
        state["n"] += 1
        if state["n"] == 2:  # a half-written checkpoint, then the disk is full
            (out / "checkpoint-10").mkdir(parents=True, exist_ok=True)
            (out / "checkpoint-10" / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(*a, **k)

    tr._save_checkpoint = save
    sh = SelfHealingTrainer(tr, FAST)
    sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed"
    ev = pm["recovery_actions"][0]
    assert ev["evidence"]["enospc"] and any("checkpoint-10" in p for p in ev["details"]["freed"])
    assert verify_checkpoint(out / "checkpoint-5")[0]


def test_user_code_bug_is_not_retried(tmp_path):
    tr = build_trainer("sft", output_dir=str(tmp_path / "bug"), max_steps=20)
    inject_faults(tr, Fault("exception", step=10, exception=lambda: ZeroDivisionError("division by zero")))
    sh = SelfHealingTrainer(tr, FAST)
    with pytest.raises(ZeroDivisionError):
        sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "exception" and pm["recovery_actions"] == []
    assert "loss" in pm["final_metrics"] and pm["traceback"]


def test_sigterm_checkpoints_exits_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "run"
    # 80 steps: ~3.5 s of steps after the signal at step 10 (40 left 1.5 s: a starved reader could miss it)
    cmd = [sys.executable, str(Path(__file__).parent / "scripts" / "preemptible_run.py"), str(out), "80"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in p.stdout:
        if line.startswith("STEP ") and int(line.split()[1]) >= 10:
            p.send_signal(signal.SIGTERM)
            break
    rest = p.stdout.read()
    assert p.wait(timeout=120) == 128 + signal.SIGTERM
    assert "DONE" not in rest
    pm = json.loads((out / "postmortem.json").read_text())
    assert pm["exit_reason"] == "interrupted" and pm["signal"] == "SIGTERM"
    stopped = pm["last_step"]
    assert 10 <= stopped < 80 and pm["checkpoint"].endswith(f"checkpoint-{stopped}")
    assert verify_checkpoint(pm["checkpoint"])[0]

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    steps = [int(line.split()[1]) for line in again.stdout.splitlines() if line.startswith("STEP ")]
    assert steps[0] == stopped + 1 and steps[-1] == 80
    assert "DONE 80 completed" in again.stdout
    pm2 = json.loads((out / "postmortem.json").read_text())
    assert pm2["exit_reason"] == "completed" and pm2["resumed"]["from"].endswith(f"checkpoint-{stopped}")


def test_auto_resume_skips_a_half_written_checkpoint(tmp_path):
    out = tmp_path / "t"
    tr = build_trainer("trainer", output_dir=str(out), max_steps=10, save_strategy="steps", save_steps=5)
    tr.train()
    (out / "checkpoint-10" / "trainer_state.json").unlink()  # the save of step 10 was cut short
    (out / "postmortem.json").write_text(json.dumps({"exit_reason": "interrupted"}))
    ckpt, skipped = latest_verified_checkpoint(out)
    assert ckpt.name == "checkpoint-5" and "trainer_state.json" in skipped[0]["reason"]
    tr2 = build_trainer("trainer", output_dir=str(out), max_steps=12)
    sh = SelfHealingTrainer(tr2, FAST)
    sh.train()
    pm = read_postmortem(sh)
    assert pm["resumed"]["from"].endswith("checkpoint-5") and tr2.state.global_step == 12


def test_a_checkpoint_with_nan_weights_is_not_trusted(tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "t"
    tr = build_trainer("trainer", output_dir=str(out), max_steps=10, save_strategy="steps", save_steps=5)
    tr.train()
    f = out / "checkpoint-10" / "model.safetensors"
    sd = load_file(str(f))
    k = next(iter(sd))
    sd[k][0] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    ok, why = verify_checkpoint(out / "checkpoint-10")
    assert not ok and "not finite" in why
    assert latest_verified_checkpoint(out)[0].name == "checkpoint-5"


def _state(tr):
    return ({k: v.clone() for k, v in tr.model.state_dict().items()},
            {pid: {k: v.clone() for k, v in st.items()} for pid, st in tr.optimizer.state_dict()["state"].items()},
            tr.state.global_step, torch.get_rng_state().clone())


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_dry_run_leaves_state_bit_identical_and_reports_an_oom(kind, tmp_path):
    tr = build_trainer(kind, output_dir=str(tmp_path / kind), max_steps=8)
    tr.train()  # a run in progress: optimizer state exists
    w, opt, step, rng = _state(tr)
    bs0 = tr.args.per_device_train_batch_size
    inject_faults(tr, Fault("exception", step=1, duration=10**6,
                            exception=lambda: torch.OutOfMemoryError("CUDA out of memory"),
                            when=lambda t, inputs: t.args.per_device_train_batch_size > bs0 // 2))
    sh = SelfHealingTrainer(tr, FAST)
    # the fault is keyed on global_step; move it to the dry run's steps
    report = sh.dry_run(num_steps=2, find_max_batch_size=True)
    assert not report.ok and report.problems[0]["failure"] == "oom"
    assert report.max_batch_size == bs0 // 2
    w2, opt2, step2, rng2 = _state(tr)
    assert step2 == step and torch.equal(rng, rng2)
    assert all(torch.equal(w[k], w2[k]) for k in w)
    assert all(torch.equal(opt[p][k], opt2[p][k]) for p in opt for k in opt[p])
    assert tr.args.per_device_train_batch_size == bs0 and tr.args.max_steps == 8


def test_dry_run_reports_a_broken_collator_and_a_clean_setup(tmp_path):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "t"), max_steps=8)
    sh = SelfHealingTrainer(tr, FAST)
    assert sh.dry_run().ok
    good = tr.data_collator
    tr.data_collator = lambda features: (_ for _ in ()).throw(TypeError("collator got an unexpected field 'txt'"))
    report = sh.dry_run()
    assert not report.ok and report.problems[0]["failure"] == "data_error"
    assert "unexpected field" in report.problems[0]["summary"]
    tr.data_collator = good
    sh.train()
    assert tr.state.global_step == 8 and read_postmortem(sh)["recovery_actions"] == []
