"""trackio: after real tiny runs that report to trackio, its local SQLite store holds the
`healing/*` and `zclip/*` series on the Trainer's step axis and an alert per decision; nothing
touches the network; without trackio nothing breaks."""
import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from self_healing import HealingConfig, SelfHealingCallback
from self_healing.tiny import build_trainer
from self_healing.tracking import TrackioTracker

# Runs in a fresh interpreter so TRACKIO_DIR (read by trackio at import) is this test's tmp dir,
# with every socket connection refused and recorded.
SCRIPT = textwrap.dedent("""
    import json, os, socket, sys
    attempts = []
    def refuse(self, addr, *a, **k):
        attempts.append(repr(addr))
        raise OSError("network blocked by test_tracking")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    import torch
    torch.set_num_threads(1)
    import transformers
    transformers.logging.set_verbosity_error()
    from self_healing import HealingConfig, SelfHealingTrainer
    from self_healing.faults import Fault, inject_faults
    from self_healing.tiny import build_trainer, sft_dataset

    def run(name, steps, faults, cfg, **kw):
        tr = build_trainer("sft", output_dir=os.path.join(sys.argv[1], name), max_steps=steps, report_to="trackio",
                           project="sh-test", run_name=name, **kw)
        inject_faults(tr, *faults)
        sh = SelfHealingTrainer(tr, cfg)
        sh.train()
        return sh

    # r1: a NaN loss at step 12 (skipped: WARN), a 4x gradient at step 20 (ZClip clips it: INFO),
    # evaluations at steps 12 and 24
    sh = run("r1", 24, [Fault("nan_loss", step=12), Fault("grad_scale", step=20, factor=4.0)],
             HealingConfig(zclip_enabled=True, zclip_warmup_steps=5, snapshot_every_steps=5),
             eval_dataset=sft_dataset(16, seed=1), eval_strategy="steps", eval_steps=12)
    # r2: NaN on every step from 6 with no recovery attempts left: gives up (ERROR)
    sh2 = run("r2", 12, [Fault("nan_loss", step=6, duration=100)],
              HealingConfig(nan_patience=0, max_recovery_attempts=0, snapshot_every_steps=5))
    print(json.dumps({"attempts": attempts, "r1": sh.exit_reason, "r2": sh2.exit_reason,
                      "r1_events": [[e["step"], e["failure"], e["actions"]] for e in sh.postmortem["recovery_actions"]]}))
""")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp / "store"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    env.pop("TRACKIO_SPACE_ID", None)
    env.pop("TRACKIO_SERVER_URL", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp / "out")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    db = sqlite3.connect(tmp / "store" / "sh-test.db")
    metrics: dict[str, list[tuple[int, dict]]] = {}
    for run, step, blob in db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY id"):
        metrics.setdefault(run, []).append((step, json.loads(blob)))
    alerts = [dict(zip(("run", "title", "text", "level", "step"), row))
              for row in db.execute("SELECT run_name, title, text, level, step FROM alerts ORDER BY id")]
    return result, metrics, alerts


def series(rows, key):
    return {step: m[key] for step, m in rows if key in m}


def test_offline_with_local_storage_and_no_network(store):
    result, metrics, _ = store
    assert result["attempts"] == [], "trackio or the plugin tried to open a network connection"
    assert result["r1"] == "completed" and result["r2"] == "gave_up"
    assert set(metrics) == {"r1", "r2"}


def test_healing_and_zclip_series_every_step(store):
    result, metrics, _ = store
    rows = metrics["r1"]
    for key in ("healing/recovery_attempts", "healing/nan_count", "healing/skipped_steps", "healing/loss_spike_ratio",
                "healing/eval_gap", "zclip/raw_grad_norm", "zclip/clipped_grad_norm", "zclip/z_score",
                "zclip/total_clips"):
        assert key in {k for _, m in rows for k in m}, key
    nan = series(rows, "healing/nan_count")
    assert sorted(nan) == list(range(1, 25))  # one point per optimizer step
    assert nan[11] == 0 and nan[12] == 1 and nan[24] == 1
    assert series(rows, "healing/skipped_steps")[12] == 1
    raw, clipped, z = (series(rows, k) for k in ("zclip/raw_grad_norm", "zclip/clipped_grad_norm", "zclip/z_score"))
    assert 12 not in raw  # the skipped step's NaN norm is not plotted as a ZClip decision
    assert min(z) == 6  # z-scores exist once warm-up (5 steps) is over
    assert clipped[20] < 0.8 * raw[20] and z[20] > 2.5  # the 4x gradient, clipped by ZClip
    assert all(clipped[s] == raw[s] for s in raw if s > 5 and z[s] <= 2.5)  # no outlier, no clip
    assert series(rows, "zclip/total_clips")[24] >= 1
    gap, eval_loss = series(rows, "healing/eval_gap"), series(rows, "eval/loss")
    assert sorted(gap) == sorted(eval_loss) == [12, 24]
    train = series(rows, "train/loss")
    for s in (12, 24):  # eval_loss minus the mean of the last 5 logged train losses (the NaN step's is not one)
        recent = [train[t] for t in range(s - 5, s + 1) if t in train and t != 12][-5:]
        assert gap[s] == pytest.approx(eval_loss[s] - sum(recent) / len(recent), rel=1e-5)


def test_goodput_every_tenth_step(store):
    _, metrics, _ = store
    good = series(metrics["r1"], "healing/goodput")
    assert sorted(good) == [10, 20] and all(0 < v < 1 for v in good.values())
    assert series(metrics["r1"], "healing/job_goodput") == good  # one launch: the job is this launch


def test_same_step_axis_as_the_trainer(store):
    _, metrics, _ = store
    rows = metrics["r1"]
    trainer_rows = [(step, m) for step, m in rows if "train/learning_rate" in m]
    assert len(trainer_rows) == 24
    assert all(step == m["train/global_step"] for step, m in trainer_rows)
    # the skipped NaN step is logged without a loss (the Trainer's NaN filter would plot 0.0 there)
    assert [step for step, m in trainer_rows if "train/loss" not in m] == [12]
    assert sorted(step for step, m in rows if "eval/loss" in m) == [12, 24]  # evaluations too
    ours = series(rows, "healing/nan_count")
    assert set(ours) == {step for step, _ in trainer_rows}


def test_an_alert_at_every_decision(store):
    _, _, alerts = store
    r1 = [a for a in alerts if a["run"] == "r1"]
    warn = [a for a in r1 if a["level"] == "warn"]
    assert len(warn) == 1 and warn[0]["step"] == 12 and "nan_loss" in warn[0]["title"]
    assert "skipped before it reached the weights" in warn[0]["text"] and "skip_step" in warn[0]["text"]
    info = [a for a in r1 if a["level"] == "info"]
    assert info and {a["step"] for a in info} >= {20} and "clipped" in info[0]["text"]
    assert not [a for a in r1 if a["level"] == "error"]
    r2 = [a for a in alerts if a["run"] == "r2"]
    assert [a["level"] for a in r2][-1] == "error" and "give_up" in r2[-1]["text"]


def test_without_trackio_nothing_breaks(tmp_path, monkeypatch):
    tr = build_trainer("sft", output_dir=str(tmp_path / "none"), max_steps=3)
    cb = SelfHealingCallback(HealingConfig(zclip_enabled=True)).attach(tr)
    assert cb.tracker is None and not [o for o in cb.observers if isinstance(o, TrackioTracker)]
    # report_to trackio, but trackio cannot be imported: a warning, no tracker, training runs
    import transformers.integrations.integration_utils as iu
    monkeypatch.setitem(sys.modules, "trackio", None)
    monkeypatch.setattr(iu, "is_trackio_available", lambda: False)
    tr2 = build_trainer("sft", output_dir=str(tmp_path / "missing"), max_steps=3)
    tr2.args.report_to = ["trackio"]
    cb2 = SelfHealingCallback(HealingConfig(zclip_enabled=True)).attach(tr2)
    assert cb2.tracker is None
    tr2.train()
    assert tr2.state.global_step == 3


def test_tracker_without_an_active_run_is_a_noop(tmp_path):
    pytest.importorskip("trackio")
    tr = build_trainer("sft", output_dir=str(tmp_path / "norun"), max_steps=4)
    tr.args.report_to = ["trackio"]  # tracker attached, but no TrackioCallback ever starts a run
    cb = SelfHealingCallback(HealingConfig()).attach(tr)
    assert cb.tracker is not None
    tr.train()
    assert tr.state.global_step == 4 and cb.tracker.logged_steps == 0 and cb.tracker.alerts == 0
