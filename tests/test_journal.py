"""Crash journal: a run killed without warning (SIGKILL, OOM killer, segfault) leaves its story in
`healing-journal.jsonl`; the next launch writes its `killed` postmortem and resumes. Plus the
journal's own guarantees: decisions fsynced, torn lines tolerated, compaction bounded and atomic,
and bounded memory/disk over a million-step run."""
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from transformers import TrainerCallback

from self_healing import HealingConfig, SelfHealingTrainer
from self_healing.checkpoints import checkpoint_step, latest_verified_checkpoint
from self_healing.faults import Fault, inject_faults
from self_healing.journal import (JOURNAL_NAME, PREVIOUS_NAME, CrashJournal, read_journal, recover_killed_run,
                                  trim_event)
from self_healing.postmortem import load_postmortem
from self_healing.tiny import build_trainer, weights_finite

SCRIPTS = Path(__file__).parent / "scripts"
KILLS = 20
MAX_STEPS = 40
PHASES = ("pre_optimizer", "step_end", "mid_save", "after_save", "free")
PATIENCE = 900.0
"""Seconds a launch may stay silent before the test calls it hung. Generous on purpose: on a CPU
shared with other heavy jobs one launch (fork, build, verify checkpoints, resume) can take minutes;
a slow machine is not a failure, and a real hang still fails, only later."""
NAN_STEP = 5  # tests/scripts/killable_run.py injects a NaN loss here


class Launcher:
    """tests/scripts/killable_run.py serve: forks one real training launch per request."""

    def __init__(self, env):
        self.p = subprocess.Popen([sys.executable, str(SCRIPTS / "killable_run.py"), "serve"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self.child: int | None = None
        threading.Thread(target=self._pump, args=(self.p.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.p.stderr, self.stderr.append), daemon=True).start()
        line = self.readline(timeout=PATIENCE)
        assert line.startswith("READY"), line
        assert line.strip() == "READY threads=1", f"the launcher must not fork with threads running: {line}"

    @staticmethod
    def _pump(stream, put):
        for line in stream:
            put(line)
        put(None)

    def readline(self, timeout=PATIENCE) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            tail = "".join(self.stderr[-30:])
            raise AssertionError(f"launcher silent for {timeout}s; stderr tail:\n{tail}") from None
        if line is None:
            raise AssertionError(f"launcher died; stderr tail:\n{''.join(self.stderr[-30:])}")
        return line

    def launch(self, **cmd) -> int:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        line = self.readline()
        assert line.startswith("PID "), line
        self.child = int(line.split()[1])
        return self.child

    def close(self):
        if self.child is not None:  # a launch left running by a failed assertion
            try:
                os.kill(self.child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.p.stdin.close()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()


def test_sigkill_at_20_random_points_then_each_next_launch_writes_a_killed_postmortem_and_resumes(tmp_path):
    seed = int(os.environ.get("KILL_SEED", random.randrange(2 ** 31)))
    rng = random.Random(seed)
    ctx = f"KILL_SEED={seed}"
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    launcher = Launcher(env)
    prev_last: set[int] | None = None  # what the previous (killed) launch's postmortem must say
    prev_steps: list[int] = []
    kinds = []
    try:
        for i in range(KILLS):
            ckpt, _ = latest_verified_checkpoint(out)
            start = checkpoint_step(ckpt) if ckpt else 0
            phase = rng.choice(PHASES)
            hang = min(start + rng.randint(1, 3), MAX_STEPS - 1)
            if phase in ("mid_save", "after_save") and hang % 2:  # checkpoints every 2 steps
                hang = hang + 1 if hang + 1 < MAX_STEPS else hang - 1
                if hang <= start:  # no checkpoint step left before the end: stop at a step end instead
                    phase, hang = "step_end", start + 1
            assert start < hang < MAX_STEPS, f"{ctx}: kill point {phase} {hang} outside steps {start + 1}..{MAX_STEPS - 1}"
            kinds.append((phase, hang))
            # "free": the test kills at a moment of its choosing after step `hang`; how many steps the
            # launch gets through before the kill lands depends on the machine's load (a starved test
            # process reads late), so it is stopped at the last step end as a backstop: a kill must
            # land on a launch that has not finished (before, a loaded CPU let it run to the end, or
            # carried `start` to the last checkpoint where no kill point was left)
            pid = launcher.launch(output_dir=str(out), max_steps=MAX_STEPS,
                                  **({"phase": "step_end", "hang_step": MAX_STEPS - 1} if phase == "free"
                                     else {"phase": phase, "hang_step": hang}))
            steps: list[int] = []
            began = None
            while True:  # run until the chosen point
                line = launcher.readline()
                if line.startswith("BEGIN "):
                    began = int(line.split()[1])
                elif line.startswith("STEP "):
                    steps.append(int(line.split()[1]))
                    if phase == "free" and steps[-1] >= hang:
                        time.sleep(rng.uniform(0.0, 0.4))  # anywhere: mid-step, mid-save, mid-write
                        break
                elif line.startswith("HANG "):
                    break
                elif line.startswith(("DONE", "EXIT")):
                    raise AssertionError(f"{ctx}: launch {i} ended before its kill point: {line}")
            os.kill(pid, signal.SIGKILL)
            while not (line := launcher.readline()).startswith("EXIT "):
                if line.startswith("STEP "):
                    steps.append(int(line.split()[1]))
            assert int(line.split()[1]) == -signal.SIGKILL, f"{ctx}: launch {i}: {line}"
            # it resumed from the newest verified checkpoint, skipping any torn one
            assert began == start, f"{ctx}: launch {i} began at {began}, newest verified checkpoint is {start}"
            # on its way in, it wrote the previous launch's postmortem from the journal
            if prev_last is not None:
                pm = load_postmortem(out)
                assert pm["exit_reason"] == "killed", f"{ctx}: launch {i}: {pm['exit_reason']}"
                assert pm["last_step"] in prev_last, \
                    f"{ctx}: launch {i - 1} died after step {prev_last}, its postmortem says {pm['last_step']}"
                if 5 in prev_steps:  # the NaN at step 5 was skipped in that launch: the decision is in its postmortem
                    assert any(a["step"] == 5 and a["failure"] == "nan_loss" for a in pm["recovery_actions"]), ctx
                if prev_steps:  # it trained at least one step: its last logged metrics are there; the
                    # loss too, unless the last logged step was the skipped NaN step (logged without a loss,
                    # by design, and a non-finite grad norm): where a kill lands relative to that log line
                    # depends on timing (a loaded CPU moved it), so both must be accepted, and told apart
                    fm = pm["final_metrics"]
                    assert "learning_rate" in fm, f"{ctx}: {fm}"
                    assert "loss" in fm or (fm.get("grad_norm") == "nan" and NAN_STEP in prev_steps), f"{ctx}: {fm}"
            # the last completed step, as this launch's own output shows it
            last_printed = steps[-1] if steps else start
            if phase == "pre_optimizer":
                prev_last = {hang - 1}
            elif phase in ("step_end", "mid_save", "after_save"):
                prev_last = {hang}
            else:  # the kill may land between the journal's record of step n+1 and the print of it
                prev_last = {last_printed, last_printed + 1}
            prev_steps = steps
    finally:
        launcher.close()

    # a fresh interpreter, no fork: the same command resumes and completes
    done = subprocess.run([sys.executable, str(SCRIPTS / "killable_run.py"), "run", str(out), str(MAX_STEPS)],
                          capture_output=True, text=True, env=env, timeout=PATIENCE)
    assert done.returncode == 0, f"{ctx}\n{done.stderr[-3000:]}"
    assert f"DONE {MAX_STEPS} completed finite=True" in done.stdout, f"{ctx}\n{done.stdout[-2000:]}"
    pm = load_postmortem(out)
    assert pm["exit_reason"] == "completed" and pm["last_step"] == MAX_STEPS
    assert pm["resumed"]["previous_exit_reason"] == "killed", ctx
    assert pm["resumed"]["previous_last_step"] in prev_last, ctx
    prev = read_journal(out / PREVIOUS_NAME)
    assert prev.closed["exit_reason"] == "killed" and prev.closed["recovered"] is True
    assert read_journal(out / JOURNAL_NAME).closed["exit_reason"] == "completed"
    print(f"{ctx}: kills {kinds}")


# ------------------------------------------------------------------------------------------------
# in-process: the orchestrator's side, decisions, compaction, torn lines
# ------------------------------------------------------------------------------------------------
def _abandon(sh):
    """Leave the journal as a SIGKILL would: the descriptor closed by the kernel, no close record."""
    sh.callback.journal.journal.close_fd()


def test_a_killed_run_is_noticed_reported_and_resumed(tmp_path, caplog):
    out = tmp_path / "run"
    tr = build_trainer("sft", output_dir=str(out), max_steps=12, save_strategy="steps", save_steps=4)
    inject_faults(tr, Fault("nan_loss", step=6))

    class Die(Exception):
        pass

    class KillAt10(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 10:
                raise Die  # stands in for the SIGKILL (the real one is above): nothing after this runs

    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=3))
    tr.add_callback(KillAt10())
    sh.callback.finish = lambda *a, **k: None  # the dead process writes no postmortem
    with pytest.raises(Die):
        sh.train()
    _abandon(sh)
    assert not (out / "postmortem.json").exists()
    st = read_journal(out / JOURNAL_NAME)
    assert st.closed is None and st.last_step == 10
    assert [m["step"] for m in st.marks if m["kind"] == "checkpoint"] == [4, 8]
    assert [m["step"] for m in st.marks if m["kind"] == "snapshot"] == [3, 9]  # step 6 was the NaN: no snapshot

    tr2 = build_trainer("sft", output_dir=str(out), max_steps=12, save_strategy="steps", save_steps=4)
    sh2 = SelfHealingTrainer(tr2, HealingConfig(snapshot_every_steps=3))
    caplog.set_level("WARNING", logger="self_healing")
    sh2.train()
    said = caplog.text
    assert "was killed after step 10" in said and "resuming from" in said
    assert said.index("was killed") < said.index("resuming from")
    pm = load_postmortem(out)
    assert pm["exit_reason"] == "completed" and pm["resumed"]["previous_exit_reason"] == "killed"
    assert pm["resumed"]["previous_last_step"] == 10 and pm["resumed"]["from"].endswith("checkpoint-8")
    assert tr2.state.global_step == 12 and weights_finite(tr2.model)
    prev = read_journal(out / PREVIOUS_NAME)
    assert prev.closed["exit_reason"] == "killed" and [(e["step"], e["failure"]) for e in prev.events] == [
        (6, "nan_loss")]


def test_the_killed_postmortem_has_the_last_step_metrics_and_decisions(tmp_path):
    out = tmp_path / "run"
    j = CrashJournal(out / JOURNAL_NAME)
    j.start({"trainer_class": "SFTTrainer", "max_steps": 100, "start_step": 0, "config": {"nan_patience": 3}})
    for s in range(1, 31):
        j.progress(s, 2.0 - s / 100, 1.0, 1e-3, skipped=(s == 25))
        if s % 10 == 0:
            j.metrics(s, {"loss": 2.0 - s / 100, "learning_rate": 1e-3, "note": "x"})
        if s == 20:
            j.decision("snapshot", step=20, verified_step=15)
    j.decision("event", event=trim_event({"step": 25, "failure": "nan_loss", "diagnosis": "loss is nan",
                                          "actions": ["skip_step"], "history": [[24, 1.0, 1.0]], "references": ["..."],
                                          "evidence": {"dump": "x" * 100_000}}), counters={"skipped_steps": 1})
    j.close_fd()  # killed: no close record
    pm = recover_killed_run(out)
    assert pm["exit_reason"] == "killed" and pm["last_step"] == 30 and pm["max_steps"] == 100
    assert pm["final_metrics"]["loss"] == pytest.approx(1.7) and pm["counters"] == {"skipped_steps": 1}
    assert [(a["step"], a["failure"], a["actions"]) for a in pm["recovery_actions"]] == [
        (25, "nan_loss", ["skip_step"])]
    assert "history" not in pm["recovery_actions"][0]  # the journal keeps decisions lean
    assert max(len(line) for line in (out / JOURNAL_NAME).read_bytes().splitlines()) < 5000
    assert pm["killed"]["last_snapshot_step"] == 20 and pm["curve"]["points"][-1][0] == 30
    assert load_postmortem(out)["exit_reason"] == "killed"  # on disk, and valid for `self-healing report`
    assert recover_killed_run(out) is None  # closed now: noticed once


def test_a_journal_whose_run_wrote_its_postmortem_is_not_called_killed(tmp_path):
    out = tmp_path / "run"
    tr = build_trainer("trainer", output_dir=str(out), max_steps=4)
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=2))
    sh.train()
    # the process died between writing postmortem.json and closing the journal
    lines = (out / JOURNAL_NAME).read_bytes().splitlines(keepends=True)
    assert json.loads(lines[-1])["kind"] == "close"
    (out / JOURNAL_NAME).write_bytes(b"".join(lines[:-1]))
    assert recover_killed_run(out) is None
    assert load_postmortem(out)["exit_reason"] == "completed"
    assert read_journal(out / JOURNAL_NAME).closed["recovered"] == "postmortem existed"


def _journal_with_steps(path, last, loss=1.0):
    """An open journal at `path` whose run recorded steps 1..`last`."""
    j = CrashJournal(path)
    j.start({"max_steps": 10})
    for s in range(1, last + 1):
        j.progress(s, loss, 1.0, 0.1)
    return j


def test_torn_and_garbage_lines_are_skipped(tmp_path):
    p = tmp_path / JOURNAL_NAME
    _journal_with_steps(p, 5).close_fd()
    with open(p, "ab") as f:
        f.write(b"\xff\xfe not json\n" + b"[1, 2]\n" + b'{"kind": "progress", "step": "x"}\n' + b"{" * 10 + b"\n"
                + b"x" * 70000 + b"\n" + b'{"kind":"progress","step":6,"ti')  # torn: the kill landed in write()
    st = read_journal(p)
    assert st.last_step == 5 and st.closed is None and st.bad_lines == 5


def test_decisions_are_fsynced_and_healthy_steps_are_not(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    j = CrashJournal(tmp_path / JOURNAL_NAME)
    j.start({"max_steps": 10})
    calls.clear()
    for s in range(1, 101):
        j.progress(s, 1.0, 1.0, 0.1)
        j.metrics(s, {"loss": 1.0})
    assert calls == []
    j.decision("event", event={"step": 50, "failure": "nan_loss", "actions": ["skip_step"]})
    j.decision("snapshot", step=60)
    j.decision("checkpoint", step=60, path="x")
    assert len(calls) == 3
    j.close("completed", 100)
    assert len(calls) == 4


def test_a_healthy_step_is_one_binary_record_and_reads_back_as_a_line_would(tmp_path, monkeypatch):
    """A step's record is one pwrite() of 64 bytes into its slot of the step ring (no JSON line,
    the journal file does not grow); read back, it is what the JSON line said, non-finite and
    missing values included, and the journal of a killed run has it."""
    from self_healing.step_ring import ring_path

    p = tmp_path / JOURNAL_NAME
    j = CrashJournal(p)
    j.start({"max_steps": 10})
    size = p.stat().st_size
    writes, pwrites = [], []
    real_write, real_pwrite = os.write, os.pwrite
    monkeypatch.setattr(os, "write", lambda fd, b: (writes.append(b), real_write(fd, b))[1])
    monkeypatch.setattr(os, "pwrite", lambda fd, b, off: (pwrites.append(len(b)), real_pwrite(fd, b, off))[1])
    values = [(1, 2.5, 1.0, 1e-3, False), (2, float("nan"), float("inf"), 1e-3, True),
              (3, None, -float("inf"), None, False), (4, 7, True, "x", False)]
    for v in values:
        j.progress(*v)
    for s in range(5, 5 + 100):
        j.progress(s, 1.0, 1.0, 0.1)
    assert writes == [] and pwrites == [64] * 104 and p.stat().st_size == size
    monkeypatch.undo()
    j.close_fd()  # killed
    st = read_journal(p)
    assert st.closed is None and st.last_step == 104 and len(st.progress) == 64
    assert [r["step"] for r in st.progress] == list(range(41, 105))
    j2 = CrashJournal(tmp_path / "j2.jsonl")
    j2.start({"max_steps": 10})
    for v in values:
        j2.progress(*v)
    j2.close_fd()
    got = [{k: r.get(k) for k in ("step", "loss", "grad_norm", "lr", "skipped")}
           for r in read_journal(tmp_path / "j2.jsonl").progress]
    assert got == [{"step": 1, "loss": 2.5, "grad_norm": 1.0, "lr": 1e-3, "skipped": None},
                   {"step": 2, "loss": "nan", "grad_norm": "inf", "lr": 1e-3, "skipped": True},
                   {"step": 3, "loss": None, "grad_norm": "-inf", "lr": None, "skipped": None},
                   {"step": 4, "loss": 7.0, "grad_norm": None, "lr": None, "skipped": None}]
    assert ring_path(p).stat().st_size == 64 + 64 * 64


def test_a_torn_step_record_and_another_runs_ring_are_ignored(tmp_path):
    from self_healing.step_ring import HEADER_BYTES, SLOT_BYTES, SLOTS, ring_path

    p = tmp_path / JOURNAL_NAME
    _journal_with_steps(p, 10).close_fd()
    ring = ring_path(p)
    data = bytearray(ring.read_bytes())
    off = HEADER_BYTES + (10 % SLOTS) * SLOT_BYTES  # step 10's slot, torn: its trailing seq is the old one
    data[off + SLOT_BYTES - 8:off + SLOT_BYTES] = (0).to_bytes(8, "little")
    ring.write_bytes(bytes(data))
    st = read_journal(p)
    assert st.last_step == 9 and [r["step"] for r in st.progress] == list(range(1, 10))
    _journal_with_steps(tmp_path / "other.jsonl", 30).close_fd()
    os.replace(ring_path(tmp_path / "other.jsonl"), ring)  # a kill between the two files: not this run's steps
    st = read_journal(p)
    assert st.last_step is None and list(st.progress) == []


def test_the_previous_runs_steps_go_with_its_journal(tmp_path):
    p = tmp_path / JOURNAL_NAME
    _journal_with_steps(p, 7).close("completed", 7)
    j = _journal_with_steps(p, 3, loss=2.0)
    assert read_journal(tmp_path / PREVIOUS_NAME).last_step == 7
    assert [r["loss"] for r in read_journal(p).progress] == [2.0, 2.0, 2.0]
    import copy

    dup = copy.deepcopy(j)  # a deep-copied callback list: the copy does not share the ring
    assert dup._ring is None and j._ring is not None
    j.close("completed", 3)


def test_without_a_step_ring_steps_are_journal_lines(tmp_path, monkeypatch):
    from self_healing import journal

    def no_ring(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(journal, "StepRing", no_ring)
    p = tmp_path / JOURNAL_NAME
    _journal_with_steps(p, 5).close_fd()
    assert sum(b'"kind":"progress"' in line for line in p.read_bytes().splitlines()) == 5
    assert read_journal(p).last_step == 5


def test_a_truncated_step_ring_costs_its_records_not_the_run(tmp_path):
    """Someone truncates the ring file under a live run (a cleanup script, `: > file`): the next
    step's record is written and training goes on. (A memory mapping was tried: a store into a
    page past the end of the truncated file is a SIGBUS that kills the process; so is one that a
    copy-on-write filesystem with a full disk cannot allocate.)"""
    code = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from self_healing.journal import CrashJournal
from self_healing.step_ring import ring_path
j = CrashJournal({str(tmp_path / JOURNAL_NAME)!r})
j.start({{"max_steps": 10}})
j.progress(1, 1.0, 1.0, 0.1)
os.truncate(ring_path(j.path), 0)
for s in range(2, 200):
    j.progress(s, 1.0, 1.0, 0.1)
j.close("completed", 199)
print("ALIVE")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ALIVE" in r.stdout, (r.returncode, r.stderr[-2000:])
    st = read_journal(tmp_path / JOURNAL_NAME)
    assert st.closed["exit_reason"] == "completed" and st.closed["last_step"] == 199


def test_odd_ring_paths_odd_steps_forks_and_copies_never_cost_the_journal(tmp_path):
    """The ring is optional: a directory where it or the previous run's ring should be still
    leaves a working journal; a step that is not an int64 is not recorded (and raises nothing); a
    forked child (a DataLoader worker) writes no records into its parent's ring; a deep copy is
    closed."""
    import copy

    from self_healing.step_ring import ring_path

    p = tmp_path / JOURNAL_NAME
    j = CrashJournal(p)
    j.start({"max_steps": 10})
    j.close("completed", 0)
    ring_path(tmp_path / PREVIOUS_NAME).mkdir()
    (ring_path(tmp_path / PREVIOUS_NAME) / "x").write_text("x")
    j.start({"max_steps": 10})  # the ring cannot move to .prev.steps: the journal starts anyway
    assert j.is_open
    for step in (1, 2 ** 64, -(2 ** 70), 3):
        j.progress(step, 1.0, 1.0, 0.1)
    j.progress(4.0, 1.0, 1.0, 0.1)
    assert type(j._ring.last_step()) is int and j._ring.last_step() == 4
    pid = os.fork()
    if pid == 0:  # the child: what a DataLoader worker would do by mistake
        try:
            for s in range(100, 110):
                j.progress(s, 9.0, 9.0, 9.0)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    j.progress(5, 1.0, 1.0, 0.1)
    dup = copy.deepcopy(j)
    assert not dup.is_open
    dup.progress(6, 1.0, 1.0, 0.1)  # a closed copy writes nothing
    j.close_fd()
    st = read_journal(p)
    assert [r["step"] for r in st.progress] == [1, 3, 4, 5] and st.last_step == 5
    j2 = CrashJournal(tmp_path / "d" / JOURNAL_NAME)
    ring_path(j2.path).mkdir(parents=True)  # a directory in the ring's place: steps go into the journal
    j2.start({"max_steps": 10})
    j2.progress(1, 1.0, 1.0, 0.1)
    j2.close_fd()
    assert read_journal(j2.path).last_step == 1


def test_recovering_a_killed_run_compacts_without_duplicating_its_steps(tmp_path):
    p = tmp_path / JOURNAL_NAME
    _journal_with_steps(p, 5).close_fd()  # killed
    st = read_journal(p)
    w = CrashJournal(p)
    w.state = st
    w._open_fd()
    w.compact()  # what recover_killed_run's close does when it pushes the file past max_bytes
    w.close("killed", 5)
    assert [r["step"] for r in read_journal(p).progress] == [1, 2, 3, 4, 5]


def test_compaction_keeps_the_journal_bounded_and_readable(tmp_path):
    p = tmp_path / JOURNAL_NAME
    j = CrashJournal(p)
    j.max_bytes = 64 * 1024
    j.start({"max_steps": 10 ** 6, "config": {"x": 1}})
    for s in range(1, 30001):
        j.progress(s, 1.0, 1.0, 0.1)
        if s % 50 == 0:
            j.decision("event", event={"step": s, "failure": "nan_loss", "diagnosis": "d" * 3000,
                                       "actions": ["skip_step"], "evidence": {"blob": "e" * 20000}})
        assert p.stat().st_size <= j.max_bytes
    st = read_journal(p)
    assert st.last_step == 30000 and st.compactions > 10
    assert st.event_counts == {"nan_loss": 600} and len(st.events) + st.events_dropped == 600
    assert st.events[0]["step"] == 50 and st.events[-1]["step"] == 30000  # both ends kept
    assert st.header["max_steps"] == 10 ** 6
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------
# resource bounds: a million steps through the per-step code paths, without training
# ------------------------------------------------------------------------------------------------
def _footprint(obj, seen=None, depth=0) -> int:
    """Items held in every container reachable from obj's attributes (what grows if a window is unbounded)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 8 or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        return len(obj) + sum(_footprint(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
        return len(obj) + sum(_footprint(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("self_healing"):
        return _footprint(vars(obj), seen, depth + 1)
    return 0


def test_a_million_steps_stay_bounded_in_memory_journal_and_postmortem(tmp_path):
    """Drives, step by step, what the callback does on every optimizer step -- the detectors'
    windows, the postmortem recorder and the crash journal (as observer and Trainer callback) --
    with a 600-step NaN streak, a decision every 5,000 steps and a snapshot every 1,000, for
    1,000,000 steps; what is held at step 1M is no more than at step 200k."""
    from types import SimpleNamespace

    from self_healing.callback import SelfHealingCallback
    from self_healing.detectors import StepMonitor, StepSignals
    from self_healing.diagnosis import Action, Diagnosis, FailureKind
    from self_healing.journal import make_journal_callback
    from self_healing.postmortem import dumps_postmortem

    cfg = HealingConfig()
    cb = SelfHealingCallback(cfg)
    cb.monitor = StepMonitor(cfg)
    cb.trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path), hub_token=None))
    jc = make_journal_callback(cb)
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=0, max_steps=10 ** 6, is_world_process_zero=True)
    jc.on_train_begin(args, state, None)
    sizes = {}
    rng = random.Random(0)
    t0 = time.monotonic()
    for step in range(1, 1_000_001):
        sig = StepSignals(step=step, loss=2.0 + rng.random() * 0.1, grad_norm=1.0 + rng.random(), lrs=[1e-3],
                          scheduled_lrs=[1e-3])
        cb.recorder.observe(step, sig.loss, sig.grad_norm, 1e-3)
        if not cb.monitor.check(sig):
            cb.monitor.accept(sig)
        jc.on_step(step, sig, {"skipped": False})
        state.global_step = step
        jc.on_step_end(args, state, None)
        if step % 1000 == 0:
            jc.on_snapshot(step)
        if 10_000 <= step < 10_600 or step % 5000 == 0:  # a 600-step NaN streak, then one event every 5000 steps
            d = Diagnosis(FailureKind.NAN_LOSS, f"loss is nan at step {step}", {"loss": "nan"}, [Action.SKIP_STEP],
                          step)
            jc.on_event(cb.recorder.record(step, d, ["skip_step"], {}))
        if step in (200_000, 1_000_000):
            pm = dumps_postmortem(cb.recorder.build("completed", last_step=step))
            sizes[step] = {"recorder": _footprint(cb.recorder), "monitor": _footprint(cb.monitor),
                           "journal": _footprint(jc.journal.state),
                           "journal_bytes": (tmp_path / JOURNAL_NAME).stat().st_size, "postmortem_bytes": len(pm)}
    elapsed = time.monotonic() - t0
    small, big = sizes[200_000], sizes[1_000_000]
    for k in ("recorder", "monitor", "journal"):  # 5x the steps, (about) the same number of items held
        assert big[k] <= small[k] * 1.1 + 100, (k, small, big)
    assert len(cb.recorder.events) + len(cb.recorder.recent_events) == 500
    assert big["postmortem_bytes"] < 1 << 20 and big["postmortem_bytes"] <= small["postmortem_bytes"] * 1.25
    assert big["journal_bytes"] <= CrashJournal.max_bytes
    st = read_journal(tmp_path / JOURNAL_NAME)
    assert st.last_step == 1_000_000 and st.event_counts == {"nan_loss": 600 + 200 - 1}
    print(f"1M steps in {elapsed:.0f}s: {big}")
