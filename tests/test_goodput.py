"""Goodput (self_healing.watchdog): a launch's wall time split by cause adds up, failures show as
badput, and the job's goodput carries across a kill and a relaunch."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import read_postmortem
from self_healing import HealingConfig, SelfHealingTrainer
from self_healing.faults import Fault, inject_faults
from self_healing.postmortem import format_postmortem, load_postmortem
from self_healing.tiny import build_trainer
from self_healing.watchdog import GOODPUT_PARTS

SCRIPT = Path(__file__).parent / "scripts" / "hang_run.py"


def _adds_up(block):
    parts = block["seconds"]
    assert set(parts) <= set(GOODPUT_PARTS) and all(v >= 0 for v in parts.values())
    assert sum(parts.values()) == pytest.approx(block["wall_seconds"], rel=0.01)
    assert block["goodput"] == pytest.approx(parts["productive"] / block["wall_seconds"], abs=1e-3)


def test_goodput_of_a_run_with_a_nan_skip_a_rollback_and_an_oom_adds_up(tmp_path):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "run"), max_steps=30, save_strategy="steps", save_steps=10)
    bs0 = tr.args.per_device_train_batch_size
    inject_faults(tr, Fault("nan_loss", step=6), Fault("nan_weight", step=17),
                  Fault("exception", step=24, times=1,
                        exception=lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                        when=lambda t, inputs: t.args.per_device_train_batch_size == bs0))
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5, api_backoff_seconds=0.001))
    sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and tr.state.global_step == 30
    c = pm["counters"]
    assert c["skipped_steps"] >= 1 and c["rollbacks"] >= 1 and c["exceptions_healed"] == 1
    launch = pm["goodput"]["launch"]
    _adds_up(launch)
    _adds_up(pm["goodput"]["job"])
    lost = launch["lost_seconds"]
    assert lost["skipped"] > 0 and lost["rolled_back"] > 0 and lost["failed"] > 0
    s = launch["seconds"]
    assert s["lost"] == pytest.approx(sum(lost.values()), abs=2e-3)
    assert s["recovery"] > 0 and s["checkpointing"] > 0 and s["startup"] > 0 and s["productive"] > 0
    assert 0 < launch["goodput"] < 1
    # the run's own clock agrees: the wall time is train()'s
    assert launch["wall_seconds"] == pytest.approx(pm["running_time_seconds"], abs=0.5)
    assert format_postmortem(pm).splitlines()[1].startswith("  goodput: ")


def test_job_goodput_of_a_nan_skip_a_rollback_an_oom_and_a_kill_and_relaunch_adds_up(tmp_path):
    """The Done-when run: one job with a NaN skip, a rollback, an OOM batch change, then a SIGKILL and
    a relaunch; its goodput is in the postmortem and the report, and the parts sum to the wall time."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(SCRIPT), str(out), "faults", "40"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    hb = out / "self-healing" / "heartbeat-rank0.json"

    def seen_all_faults() -> bool:  # the heartbeat file (written every second here) has the three failures
        if not hb.is_file():
            return False
        g = json.loads(hb.read_text())
        lost = (g.get("goodput") or {}).get("launch", {}).get("lost_seconds", {})
        return (g["step"] or 0) >= 16 and all(lost.get(k, 0) > 0 for k in ("skipped", "rolled_back", "failed"))

    for line in p.stdout:
        if line.startswith("STEP ") and seen_all_faults():
            p.send_signal(signal.SIGKILL)  # no postmortem, no goodput of its own: its heartbeat file is what is left
            break
    p.wait(timeout=60)
    killed_at = json.loads(hb.read_text())
    assert p.returncode == -signal.SIGKILL, "the run ended before the heartbeat showed the three failures"
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=150)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "DONE 40 completed" in again.stdout
    pm = load_postmortem(out)
    assert pm["resumed"]["previous_exit_reason"] == "killed" and "checkpoint-" in pm["resumed"]["from"]
    g = pm["goodput"]
    _adds_up(g["launch"])
    _adds_up(g["job"])
    job, launch = g["job"], g["launch"]
    assert job["launches"] == 2 and job["wall_seconds"] > launch["wall_seconds"]
    assert job["seconds"]["between_launches"] > 0  # from the killed launch's last heartbeat to this start
    before = killed_at["goodput"]["launch"]["seconds"]  # the killed launch, as its last heartbeat saw it
    assert before["productive"] > 0 and before["lost"] > 0 and before["recovery"] > 0
    for part in ("productive", "lost", "recovery"):  # the first launch's failures stay in the job's badput
        assert job["seconds"][part] == pytest.approx(launch["seconds"][part] + before[part], abs=2e-3)
    if pm["resumed"]["previous_last_step"] > int(pm["resumed"]["from"].rsplit("-", 1)[1]):
        assert launch["lost_seconds"]["recomputed"] > 0  # the steps after the checkpoint, done again
    assert job["goodput"] < launch["goodput"]
    report = format_postmortem(pm).splitlines()
    assert report[1].startswith("  goodput: ") and "job goodput" in report[2]


def test_any_goodput_hang_or_straggler_block_is_reported_without_crashing():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from self_healing.postmortem import headline, postmortem_problem

    leaf = st.one_of(st.none(), st.booleans(), st.integers(-10, 10 ** 6), st.floats(allow_nan=True),
                     st.text(max_size=8), st.sampled_from(["nan", "inf", "-inf"]))
    anyv = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=8)
    block = st.fixed_dictionaries({}, optional={"wall_seconds": anyv, "goodput": anyv, "launches": anyv,
                                                "seconds": st.one_of(anyv, st.dictionaries(
                                                    st.sampled_from(list(GOODPUT_PARTS)), anyv, max_size=4))})
    pms = st.fixed_dictionaries({"exit_reason": st.sampled_from(["hung", "completed", "interrupted"])}, optional={
        "goodput": st.one_of(anyv, st.fixed_dictionaries({}, optional={"launch": block, "job": block})),
        "hang": st.one_of(st.dictionaries(st.sampled_from(["phase", "step", "seconds_waited", "bound_seconds",
                                                          "summary", "dump", "stack"]), anyv, max_size=5)),
        "stragglers": anyv, "max_steps": st.integers(0, 100), "last_step": st.integers(0, 100)})

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(pm=pms)
    def check(pm):
        if postmortem_problem(pm) is None:
            assert headline(pm) and format_postmortem(pm)

    check()
