"""Hangs (self_healing.watchdog): a step, a batch or an evaluation that never ends is found within
its bound, dumped, written up as `hung`, and the process exits so the relaunch resumes; a healthy
run with slow saves and evaluations never trips it; a SIGTERM in the middle of an evaluation
checkpoints and exits within the grace."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import read_postmortem
from self_healing import HealingConfig, SelfHealingTrainer
from self_healing.checkpoints import verify_checkpoint
from self_healing.postmortem import format_postmortem, load_postmortem
from self_healing.tiny import build_trainer, sft_dataset
from self_healing.hangs import read_heartbeats
from self_healing.watchdog import HANG_EXIT_CODE, Watchdog

SCRIPT = Path(__file__).parent / "scripts" / "hang_run.py"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def _launch(out, mode, steps=12):
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), mode, str(steps)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _steps(text):
    return [int(line.split()[1]) for line in text.splitlines() if line.startswith("STEP ")]


def _bounded(hang):
    """Found within max(floor, k x the calibrated step time): hang_floor_seconds is 2 s in the script,
    hang_factor 10 (a step slowed by a busy machine may raise the bound above the floor)."""
    bound = hang["bound_seconds"]
    assert 2.0 <= bound < 20.0 and (bound == 2.0) == (hang["bound_reason"] == "hang_floor_seconds")
    assert bound <= hang["seconds_waited"] < bound + 4.0  # waited > bound, but both are rounded to 0.01 s


def test_a_forward_that_never_returns_is_a_hung_exit_and_the_relaunch_resumes(tmp_path):
    out = tmp_path / "run"
    p = _launch(out, "forward", steps=36)
    stdout, stderr = p.communicate(timeout=150)
    assert p.returncode == HANG_EXIT_CODE, stderr[-3000:]
    assert _steps(stdout)[-1] == 29 and "DONE" not in stdout
    pm = load_postmortem(out)
    hang = pm["hang"]
    assert pm["exit_reason"] == "hung" and hang["phase"] == "train_step" and hang["step"] == 30
    _bounded(hang)
    assert any("sleep_forever" in line for line in hang["stack"])  # the training thread, where it is stuck
    dump = (out / "self-healing" / "hang-30-rank0.txt").read_text()
    assert "sleep_forever" in dump and "Thread" in dump  # faulthandler's every-thread dump
    assert format_postmortem(pm).startswith("HUNG at step 30/36")

    again = _launch(out, "forward", steps=36)
    stdout, stderr = again.communicate(timeout=150)
    assert again.returncode == 0, stderr[-3000:]
    assert _steps(stdout)[0] == 26 and "DONE 36 completed" in stdout  # from checkpoint-25, the last verified
    pm = load_postmortem(out)
    assert pm["resumed"]["previous_exit_reason"] == "hung" and pm["resumed"]["from"].endswith("checkpoint-25")
    job = pm["goodput"]["job"]
    assert job["launches"] == 2 and job["seconds"]["hung"] >= 2.0 and job["seconds"]["between_launches"] > 0
    assert pm["goodput"]["launch"]["lost_seconds"]["recomputed"] > 0  # steps 26 to 29, done twice
    assert sum(job["seconds"].values()) == pytest.approx(job["wall_seconds"], rel=0.01)


def test_a_dataloader_that_never_returns_is_a_hung_exit(tmp_path):
    out = tmp_path / "run"
    p = _launch(out, "data", steps=36)
    stdout, stderr = p.communicate(timeout=150)
    assert p.returncode == HANG_EXIT_CODE, stderr[-3000:]
    pm = load_postmortem(out)
    assert pm["exit_reason"] == "hung" and pm["hang"]["phase"] == "data_wait" and pm["hang"]["step"] == 30
    _bounded(pm["hang"])
    assert any("__getitem__" in line for line in pm["hang"]["stack"])
    assert (out / "self-healing" / "hang-30-rank0.txt").is_file()

    again = _launch(out, "data", steps=36)
    stdout, stderr = again.communicate(timeout=150)
    assert again.returncode == 0, stderr[-3000:]
    assert _steps(stdout)[0] == 26 and "DONE 36 completed" in stdout  # from checkpoint-25
    assert load_postmortem(out)["resumed"]["from"].endswith("checkpoint-25")


def test_sigterm_during_a_long_evaluation_checkpoints_within_the_grace_and_the_relaunch_resumes(tmp_path):
    out = tmp_path / "run"
    p = _launch(out, "slow_eval")
    sent = None
    for line in p.stdout:
        if line.startswith("EVAL ") and sent is None:
            time.sleep(2.0)  # 2 s into an evaluation of 60 one-second steps
            p.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            break
    stdout = p.stdout.read()
    assert p.wait(timeout=60) == 128 + signal.SIGTERM, p.stderr.read()[-3000:]
    took = time.monotonic() - sent
    assert took < 45.0  # the evaluation alone had ~58 s left; the exit itself (teardown) is slow under load
    assert "DONE" not in stdout
    pm = load_postmortem(out)
    assert pm["exit_reason"] == "interrupted" and pm["signal"] == "SIGTERM" and pm["last_step"] == 6
    pre = pm["preemption"]
    # the grace (10 s in the script) is the plugin's own measurement: signal -> verified checkpoint
    assert pre["evaluation_aborted"] and pre["within_grace"] and pre["seconds_to_checkpoint"] < 10.0
    assert verify_checkpoint(pm["checkpoint"])[0]

    again = _launch(out, "slow_eval")
    stdout, stderr = again.communicate(timeout=150)
    assert again.returncode == 0, stderr[-3000:]
    assert _steps(stdout)[0] == 7 and "DONE 12 completed" in stdout
    assert load_postmortem(out)["resumed"]["from"] == pm["checkpoint"]


def test_a_healthy_run_with_slow_saves_and_evaluations_never_trips(tmp_path):
    from transformers import TrainerCallback

    class SlowHooks(TrainerCallback):  # a callback that uploads each checkpoint, one that posts the metrics
        def on_save(self, args, state, control, **kwargs):
            time.sleep(2.5)

        def on_evaluate(self, args, state, control, **kwargs):
            time.sleep(2.5)

    out = tmp_path / "run"
    tr = build_trainer("trainer", output_dir=str(out), max_steps=12, save_strategy="steps", save_steps=6,
                       eval_dataset=sft_dataset(32, seed=1), per_device_eval_batch_size=8, eval_strategy="steps",
                       eval_steps=6, callbacks=[SlowHooks()])
    save_model = tr.save_model

    def slow_save(*a, **k):  # a network filesystem: 2.5 s per save, above the 2 s step floor
        time.sleep(2.5)
        return save_model(*a, **k)

    tr.save_model = slow_save
    tr.compute_metrics = lambda p: (time.sleep(2.5), {"x": 1.0})[1]  # slow metrics after the last eval step

    def slow_eval_step(module, args):
        if not module.training:
            time.sleep(0.6)  # an evaluation step far slower than a training step

    tr.model.register_forward_pre_hook(slow_eval_step)
    cfg = HealingConfig(snapshot_every_steps=5, hang_floor_seconds=2.0, hang_startup_seconds=30.0,
                        hang_poll_seconds=0.1, on_hang="warn")  # 2 s: a 1 s pause under load is not a hang
    sh = SelfHealingTrainer(tr, cfg)
    sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and "hang_warnings" not in pm
    assert not list((out / "self-healing").glob("hang-*"))
    g = pm["goodput"]["launch"]["seconds"]
    assert g["checkpointing"] > 7.5 and g["evaluation"] > 8.0


def test_warn_mode_dumps_and_training_goes_on(tmp_path):
    out = tmp_path / "run"
    tr = build_trainer("trainer", output_dir=str(out), max_steps=10)
    state = {"slept": False}

    def stall(module, args):
        """Step 7 stalls until the watchdog has warned about it (a fixed 2 s sleep flaked: under
        load the calibrated bound, 10x the step time, can pass 2 s), at most 60 s."""
        if module.training and tr.state.global_step + 1 == 7 and not state["slept"]:
            state["slept"] = True
            give_up = time.monotonic() + 60.0
            while (not any(w["step"] == 7 for w in sh.callback.watchdog.watchdog.hang_warnings)
                   and time.monotonic() < give_up):
                time.sleep(0.05)

    tr.model.register_forward_pre_hook(stall)
    cfg = HealingConfig(snapshot_every_steps=5, hang_floor_seconds=2.0, hang_startup_seconds=30.0,
                        hang_poll_seconds=0.05, on_hang="warn")  # 2 s: a GC pause under load is not a hang
    sh = SelfHealingTrainer(tr, cfg)
    sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and tr.state.global_step == 10
    (w,) = [w for w in pm["hang_warnings"] if w["step"] == 7]  # one warning per stuck phase
    assert w["phase"] == "train_step" and w["step"] == 7 and w["action"] == "warn"
    assert "stall" in (out / "self-healing" / "hang-7-rank0.txt").read_text()


def test_bounds_calibrate_from_the_phase_history_with_floors_and_overrides():
    class _CB:
        config = HealingConfig(hang_floor_seconds=5.0, hang_startup_seconds=100.0, hang_save_seconds=300.0,
                               hang_factor=10.0, hang_phase_seconds={"eval_step": 42.0})
        trainer = None

    wd = Watchdog(_CB())
    assert wd.bound("startup") == 100.0 and wd.bound("train_step") == 100.0  # no history yet: warm-up floor
    wd.clock.history["train_step"] = [0.1, 0.2, 0.1]
    assert wd.bound("train_step") == 5.0  # 10 x 0.2 < the floor
    wd.clock.history["train_step"] = [0.1, 2.0, 0.1, 0.3]
    assert wd.bound("train_step") == pytest.approx(20.0)  # 10 x the longest recent step
    wd.clock.history["save"] = [40.0]
    assert wd.bound("save") == 400.0 and wd.bound("recovery") == 300.0
    assert wd.bound("eval_step") == 42.0


@pytest.mark.parametrize("bad", [{"hang_factor": 0.5}, {"on_hang": "kill"}, {"hang_phase_seconds": {"train": 5}},
                                 {"hang_phase_seconds": {"save": -1}}, {"preemption_grace_seconds": 0},
                                 {"hang_floor_seconds": float("nan")}])
def test_hang_settings_are_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        HealingConfig(**bad)


def test_hung_is_a_resumable_exit():
    from self_healing.orchestration import RESUMABLE_EXITS

    assert "hung" in RESUMABLE_EXITS


def test_a_long_ddp_timeout_is_warned_about(tmp_path, caplog):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "run"), max_steps=2, ddp_timeout=180000000)
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5))
    hooks = sh.callback.watchdog
    with caplog.at_level("WARNING", logger="self_healing"):
        hooks._warn_hidden_hangs(_Args(tr.args, world_size=2), tr.state)
    assert "ddp_timeout=180000000" in caplog.text


def test_no_checkpointing_on_a_long_run_is_warned_about(tmp_path, caplog):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "run"), max_steps=2)
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5))
    hooks = sh.callback.watchdog
    hooks.watchdog.clock.history["train_step"] = [2.0] * 10
    tr.state.max_steps, tr.state.global_step = 5000, 10
    with caplog.at_level("WARNING", logger="self_healing"):
        hooks._warn_no_checkpoints(tr.args, tr.state)
    assert "save_strategy='no'" in caplog.text and "2.8 more hours" in caplog.text


class _Args:
    def __init__(self, args, **over):
        self._a, self._o = args, over

    def __getattr__(self, name):
        return self._o[name] if name in self._o else getattr(self._a, name)


def _torchrun(out, *mode):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(Path(__file__).parent / "scripts" / "ddp_hang_run.py"), str(out), *mode]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=170, env={**ENV, "TORCH_FR_BUFFER_SIZE": "2000"})


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
def test_two_ranks_one_stuck_before_the_all_reduce_both_exit_hung_naming_it(tmp_path):
    out = tmp_path / "ddp"
    start = time.monotonic()
    p = _torchrun(out)
    assert p.returncode != 0 and "DONE" not in p.stdout, p.stderr[-3000:]
    assert time.monotonic() - start < 120  # ddp_timeout is 600 s
    pm = load_postmortem(out)  # rank 0's: it was waiting in the all-reduce, in backward
    hang = pm["hang"]
    assert pm["exit_reason"] == "hung" and hang["rank"] == 0 and hang["step"] == 30 and hang["world_size"] == 2
    assert hang["ranks"]["0"]["where"] == "backward" and hang["ranks"]["1"]["where"] == "forward"
    assert hang["ranks_behind"] == ["1"] and "rank(s) 1 behind the others" in hang["summary"]
    report = format_postmortem(pm)
    assert "  hang: train_step at step 30" in report and "rank(s) 1 behind the others" in report
    assert "every thread's stack: " in report
    dump = (out / "self-healing" / "hang-30-rank0.txt").read_text()
    assert "gloo:all_reduce" in dump and "process group 0: last enqueued collective" in dump  # flight recorder
    assert (out / "self-healing" / "hang-30-rank0.flight-recorder.json").is_file()
    assert (out / "self-healing" / "hang-30-rank1.txt").is_file()
    assert json.loads((out / "self-healing" / "heartbeat-rank1.json").read_text())["hung"]["step"] == 30
    assert p.stderr.count("exitcode  : 75 ") == 2  # torchrun's summary: both ranks ended as hung


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
def test_a_collective_that_fails_because_a_peer_hung_is_reported_as_that_hang(tmp_path):
    """The race of the test above made certain: rank 1's watchdog ends it first, so rank 0's
    all-reduce fails on the closed connection; rank 0 reads rank 1's `hung` heartbeat and reports the
    hang (was: an 'exception' postmortem, exit code 1)."""
    out = tmp_path / "ddp"
    p = _torchrun(out, "race")
    assert p.returncode != 0 and "DONE" not in p.stdout, p.stderr[-3000:]
    pm = load_postmortem(out)
    assert pm["exit_reason"] == "hung" and "hang" in pm, (pm["exit_reason"], pm.get("exception"), p.stderr[-3000:])
    hang = pm["hang"]
    assert hang["rank"] == 0 and hang["step"] == 30 and hang["hung_peers"] == [1] and hang["ranks_behind"] == ["1"]
    assert "Connection closed" in hang["error"] or "gloo" in hang["error"]
    assert hang["summary"].startswith("rank(s) 1 hung (train_step at step 30)")
    assert hang["seconds_waited"] < 60  # rank 0's own bound (120 s) never came into it
    assert p.stderr.count("exitcode  : 75 ") == 2


def test_a_periodic_heartbeat_in_flight_never_overwrites_the_hung_one(tmp_path, monkeypatch):
    """The heartbeat thread builds its line, then the hang report writes `hung` and exits; the
    periodic write's slow fsync must not land last and erase it (CI saw a peer then read no hang and
    write an 'exception' postmortem: the race of the torchrun test below)."""
    import threading

    from self_healing import hangs as hangs_mod

    tr = build_trainer("trainer", output_dir=str(tmp_path / "run"), max_steps=2)
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5))
    det = sh.callback.watchdog.watchdog.hangs
    real, in_write, release = hangs_mod.atomic_write_text, threading.Event(), threading.Event()

    def slow_first(path, text):
        if threading.current_thread().name == "periodic":
            in_write.set()
            release.wait(5)
        real(path, text)

    monkeypatch.setattr(hangs_mod, "atomic_write_text", slow_first)
    periodic = threading.Thread(target=det.write_heartbeat, name="periodic")
    periodic.start()
    assert in_write.wait(5)
    done = threading.Event()

    def report():  # the hang report: marker, then its own heartbeat write
        det.hung_marker = {"phase": "train_step", "step": 30, "summary": "stuck"}
        det.write_heartbeat()
        done.set()

    threading.Thread(target=report).start()
    time.sleep(0.2)
    release.set()
    periodic.join(5)
    assert done.wait(5)
    (hb,) = read_heartbeats(tr.args.output_dir).values()
    assert hb["hung"] == {"phase": "train_step", "step": 30, "summary": "stuck"}


def test_the_signal_handler_never_raises_into_the_training_thread(tmp_path):
    """A log handler that fails inside the signal handler (stderr's "reentrant call") must not
    raise wherever the training thread was (a hang postmortem being written); the flags still land."""
    import logging

    class Failing(logging.Handler):
        def emit(self, record):
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")

    tr = build_trainer("trainer", output_dir=str(tmp_path / "run"), max_steps=2)
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5))
    log, h = logging.getLogger("self_healing"), Failing()
    log.addHandler(h)
    try:
        sh._on_signal(signal.SIGTERM, None)
    finally:
        log.removeHandler(h)
    assert sh.callback.preempt_signal == signal.SIGTERM
    assert sh.callback.watchdog.watchdog.preemption.preempt_time is not None


def test_exit_becomes_warn_under_a_debugger_or_in_a_notebook(monkeypatch):
    import threading

    from self_healing.hangs import debugger_or_notebook

    assert debugger_or_notebook(threading.main_thread().ident) is None
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    assert "interactive" in debugger_or_notebook(threading.main_thread().ident)


def test_a_rank_persistently_slower_is_named_a_straggler(tmp_path):
    import socket

    out = tmp_path / "ddp"
    p = _torchrun(out, "straggler")
    assert p.returncode == 0, p.stderr[-3000:]
    pm = load_postmortem(out)
    assert pm["exit_reason"] == "completed"
    s = pm["stragglers"][0]  # 60 steps: one slow step of rank 0's can break a streak, a later one names it again
    assert {x["rank"] for x in pm["stragglers"]} == {1}
    assert s["rank"] == 1 and s["host"] == socket.gethostname() and s["slower_by"] > 1.5
    assert s["own_seconds_per_step"] - s["others_median_seconds_per_step"] == pytest.approx(0.15, abs=0.08)
    assert "rank 1 on" in p.stderr and "is a straggler" in p.stderr
    assert f"  straggler: rank 1 on {socket.gethostname()}" in format_postmortem(pm)


def test_a_grace_too_short_for_the_step_and_the_save_is_said_at_the_signal(caplog):
    class _CB:
        config = HealingConfig(preemption_grace_seconds=25.0)
        trainer = None

    wd = Watchdog(_CB())
    wd.clock.history["train_step"] = [30.0] * 5
    wd.clock.history["save"] = [10.0] * 2
    now = time.monotonic()
    with caplog.at_level("WARNING", logger="self_healing"):
        wd.preemption.check_grace_fits(("train_step", now - 5.0, 7), now)
    assert "will likely not fit" in caplog.text
    assert wd.grace_estimate == {"phase": "train_step", "phase_seconds_left": pytest.approx(25.0, abs=1.0),
                                 "save_seconds": 10.0}


def test_a_phase_left_behind_outside_train_never_ends_the_process(tmp_path):
    """train() raised before its loop without a postmortem: the stale phase must not trip later."""
    tr = build_trainer("trainer", output_dir=str(tmp_path / "run"), max_steps=2)
    sh = SelfHealingTrainer(tr, HealingConfig(hang_startup_seconds=0.3, hang_poll_seconds=0.05))
    wd = sh.callback.watchdog.watchdog
    exits = []
    wd.exit = exits.append
    wd.start_run()  # as train() does, then it "raised" and this thread moved on
    time.sleep(1.0)
    assert not exits and wd.phase == "idle" and not (tmp_path / "run" / "postmortem.json").exists()


def test_sigterm_during_a_save_stops_right_after_it(tmp_path):
    out = tmp_path / "run"
    tr = build_trainer("trainer", output_dir=str(out), max_steps=20, save_strategy="steps", save_steps=6)
    save_model = tr.save_model

    def preempted_save(*a, **k):
        if tr.state.global_step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # the notice lands in the middle of this save
        return save_model(*a, **k)

    tr.save_model = preempted_save
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5, exit_on_preemption=False))
    sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "interrupted" and pm["last_step"] == 6 and tr.state.global_step == 6
    assert pm["checkpoint"].endswith("checkpoint-6") and verify_checkpoint(pm["checkpoint"])[0]
    assert pm["preemption"]["within_grace"] and not pm["preemption"]["evaluation_aborted"]
    assert not (out / "checkpoint-7").exists()


def _slow_disk(tr, weights=2.0, optimizer=4.0):
    """A slow filesystem: the weights take `weights` seconds to write, the optimizer state (Adam's two
    moments, twice the bytes) `optimizer` seconds. Slow enough that the real work around them (the
    rest of the step, state files, the postmortem) is a small part of the grace, even under load."""
    save_model, save_opt = tr.save_model, tr._save_optimizer_and_scheduler

    def slow_model(*a, **k):
        time.sleep(weights)
        return save_model(*a, **k)

    def slow_opt(*a, **k):
        time.sleep(optimizer)
        return save_opt(*a, **k)

    tr.save_model, tr._save_optimizer_and_scheduler = slow_model, slow_opt


@pytest.mark.parametrize("grace,upload,omitted", [(6.0, 0.0, ["optimizer"]), (12.0, 6.0, [])])
def test_a_checkpoint_too_slow_for_the_grace_writes_the_fastest_resumable_state_and_the_relaunch_resumes(
        tmp_path, grace, upload, omitted):
    """Saves take ~6 s here (weights 2 s, optimizer 4 s; + a 6 s upload in the second case) against a
    grace of 6 s (12 s): at the SIGTERM the weights, scheduler, RNG and trainer state go first, the
    optimizer state only where it fits (second case), the full checkpoint is skipped, and the
    relaunch resumes from that state, LR schedule included (was: the full save ran past the grace, no
    checkpoint)."""
    from transformers import TrainerCallback

    class Preempt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 6:
                os.kill(os.getpid(), signal.SIGTERM)  # during step 7

        def on_save(self, args, state, control, **kwargs):
            time.sleep(upload)  # a callback that uploads each checkpoint

    out = tmp_path / "run"
    tr = build_trainer("trainer", output_dir=str(out), max_steps=12, save_strategy="steps", save_steps=5,
                       callbacks=[Preempt()])
    _slow_disk(tr)
    cfg = HealingConfig(snapshot_every_steps=5, exit_on_preemption=False, preemption_grace_seconds=grace)
    sh = SelfHealingTrainer(tr, cfg)
    exits = []
    sh.callback.watchdog.watchdog.exit = exits.append  # the grace running out would end the process
    sh.train()
    pm = read_postmortem(sh)
    assert not exits and pm["exit_reason"] == "interrupted" and pm["last_step"] == 7
    fast = out / "self-healing" / "resume-step-7"
    assert pm["checkpoint"] == str(fast) and verify_checkpoint(fast)[0]
    assert (fast / "optimizer.pt").is_file() == (not omitted) and (fast / "scheduler.pt").is_file()
    assert not (out / "checkpoint-7").exists()  # the full checkpoint did not fit: not attempted
    pre = pm["preemption"]
    assert pre["within_grace"] and pre["seconds_to_checkpoint"] < grace
    assert pre["fast_state"]["omitted"] == omitted and ("not_saved" in pre["fast_state"]) == bool(omitted)

    tr2 = build_trainer("trainer", output_dir=str(out), max_steps=12, save_strategy="steps", save_steps=5)
    sh2 = SelfHealingTrainer(tr2, HealingConfig(snapshot_every_steps=5))
    sh2.train()
    pm2 = read_postmortem(sh2)
    assert pm2["exit_reason"] == "completed" and tr2.state.global_step == 12
    assert pm2["resumed"]["from"] == str(fast) and pm2["resumed"]["not_restored"] == omitted
    assert tr2.lr_scheduler.last_epoch == 12  # the schedule resumed at step 7, not at 0
    assert (out / "checkpoint-10").is_dir()


def test_a_sigterm_in_an_evaluation_on_a_slow_disk_writes_the_fastest_resumable_state(tmp_path):
    """The evaluation is aborted and there is no Trainer checkpoint of the step: the plugin's own,
    written by `preemption_checkpoint`, is the fast state too when the full one cannot fit."""
    from transformers import TrainerCallback

    class Preempt(TrainerCallback):
        def on_prediction_step(self, args, state, control, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "run"
    tr = build_trainer("trainer", output_dir=str(out), max_steps=12, save_strategy="steps", save_steps=5,
                       eval_dataset=sft_dataset(64, seed=1), per_device_eval_batch_size=8, eval_strategy="steps",
                       eval_steps=6, callbacks=[Preempt()])
    _slow_disk(tr)
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5, exit_on_preemption=False,
                                              preemption_grace_seconds=6.0))
    exits = []
    sh.callback.watchdog.watchdog.exit = exits.append
    sh.train()
    pm = read_postmortem(sh)
    assert not exits and pm["last_step"] == 6 and pm["preemption"]["evaluation_aborted"]
    assert pm["checkpoint"] == str(out / "self-healing" / "resume-step-6") and verify_checkpoint(pm["checkpoint"])[0]
    assert pm["preemption"]["fast_state"]["omitted"] == ["optimizer"] and pm["preemption"]["within_grace"]
    assert "did not fit in the preemption grace" in pm["checkpoint_problem"]


def test_when_the_grace_runs_out_after_a_fast_state_the_postmortem_names_it(tmp_path):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "run"), max_steps=12)
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5, preemption_grace_seconds=3.0))
    sh.train()
    from self_healing.checkpoints import write_resume_checkpoint

    path = write_resume_checkpoint(tr, 12, deadline=time.monotonic() - 1.0)  # no time: the optimizer left out
    assert not (path / "optimizer.pt").exists() and verify_checkpoint(path)[0]
    cb = sh.callback
    wd = cb.watchdog.watchdog
    exits = []
    wd.exit = exits.append
    cb.preempt_signal, cb.preempted_at = signal.SIGTERM, 12
    wd.preemption.on_grace_exceeded(("save", time.monotonic() - 3.5, 12), 3.5)  # the full save still running
    pm = load_postmortem(tmp_path / "run")
    assert exits == [128 + signal.SIGTERM] and pm["checkpoint"] == str(path)
    assert pm["preemption"]["grace_exceeded"] and pm["preemption"]["fast_state"]["omitted"] == ["optimizer"]
