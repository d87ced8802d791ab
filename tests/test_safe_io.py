"""Safe loading and atomic writes: what the plugin reads back is loaded the safe way only and
verified before it is trusted (a truncated, tampered or non-finite file is refused with the reason
and the previous good state is used); what it writes is written atomically, so a kill at any
moment leaves the old file or the new one, never a torn one."""
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from self_healing import HealingConfig, SelfHealingTrainer
from self_healing.checkpoints import latest_verified_checkpoint, verify_checkpoint
from self_healing.faults import Fault, inject_faults
from self_healing.journal import JOURNAL_NAME, read_journal
from self_healing.postmortem import load_postmortem
from self_healing.tiny import build_trainer, weights_finite

SCRIPTS = Path(__file__).parent / "scripts"
FAST = HealingConfig(snapshot_every_steps=5, api_backoff_seconds=0.001)


# ------------------------------------------------------------------------------------------------
# atomic writes under SIGKILL
# ------------------------------------------------------------------------------------------------
def _kill_at_random(mode: str, path: Path, rng: random.Random, before_ready: bool = False) -> None:
    p = subprocess.Popen([sys.executable, str(SCRIPTS / "atomic_writer.py"), mode, str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if before_ready:  # anywhere from interpreter start-up to the middle of the first writes
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            assert p.stdout.readline().strip() == "READY", p.stderr.read()
            time.sleep(rng.uniform(0.0, 0.15))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)


@pytest.mark.parametrize("mode,kills", [("bytes", 30), ("preset", 15), ("journal", 15)])
def test_a_kill_at_any_moment_leaves_the_old_or_the_new_file(mode, kills, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("atomic_writer", SCRIPTS / "atomic_writer.py")
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    seed = int(os.environ.get("KILL_SEED", random.randrange(2 ** 31)))
    rng = random.Random(seed)
    path = tmp_path / {"journal": "healing-journal.jsonl", "preset": "file.yaml", "bytes": "file.bin"}[mode]
    seen = set()
    presets = {"default": HealingConfig.default(), "aggressive": HealingConfig.aggressive()}
    k = 0
    # `kills` kills, then more (up to 4x) until both versions were seen: the coverage check below
    # must not depend on where a handful of random kills happened to land
    while k < kills or (len(seen) < 2 and k < 4 * kills):
        _kill_at_random(mode, path, rng, before_ready=(mode == "journal" and k % 2 == 1))
        k += 1
        ctx = f"KILL_SEED={seed} kill {k}"
        if mode == "bytes":
            data = path.read_bytes()
            assert data in (writer.A, writer.B), f"{ctx}: torn file of {len(data)} bytes"
            seen.add(data[:1])
        elif mode == "preset":
            cfg = HealingConfig.from_preset(str(path))
            name = next((n for n, c in presets.items() if c == cfg), None)
            assert name is not None, f"{ctx}: a preset that is neither version"
            seen.add(name)
        else:
            st = read_journal(path)
            assert st is not None and st.header is not None, f"{ctx}: no readable journal"
            assert st.bad_lines <= 1, f"{ctx}: {st.bad_lines} unreadable lines (only a torn last one may be)"
            seen.add(st.compactions > 0)
            prev = path.with_name("healing-journal.prev.jsonl")
            if prev.exists():
                assert read_journal(prev) is not None, ctx
    # the kills did land on both versions (not always before the first rename)
    assert len(seen) == 2, f"KILL_SEED={seed}: only saw {seen}"
    from self_healing.io import remove_stale_temps

    remove_stale_temps(path)
    assert not list(tmp_path.glob(f".{path.name}.*.tmp"))


# ------------------------------------------------------------------------------------------------
# checkpoints: verified before trusted, loaded the safe way only
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run that leaves checkpoint-5/10/15 and the plugin's own resume checkpoint (written
    when it healed an OOM at step 12 by halving the batch)."""
    out = tmp_path_factory.mktemp("safe") / "run"
    tr = build_trainer("trainer", output_dir=str(out), max_steps=15, save_strategy="steps", save_steps=5)
    inject_faults(tr, Fault("exception", step=12, times=1,
                            exception=lambda: torch.OutOfMemoryError("CUDA out of memory")))
    sh = SelfHealingTrainer(tr, FAST)
    sh.train()
    assert sh.exit_reason == "completed"
    resume = sorted((out / "self-healing").glob("resume-step-*"))
    assert [p.name for p in resume] == ["resume-step-11"]
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _truncate(f: Path, keep: float = 0.5) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def test_good_checkpoints_verify(trained):
    for p in ["checkpoint-5", "checkpoint-10", "checkpoint-15", "self-healing/resume-step-11"]:
        assert verify_checkpoint(trained / p) == (True, "ok"), p


@pytest.mark.parametrize("damage,reason", [
    ("truncate:model.safetensors", "model.safetensors cannot be read"),
    ("truncate:optimizer.pt", "optimizer.pt cannot be loaded safely"),
    ("truncate:scheduler.pt", "scheduler.pt cannot be loaded safely"),
    ("truncate:rng_state.pth", "rng_state.pth cannot be loaded safely"),
    ("truncate:trainer_state.json", "trainer_state.json is unreadable"),
    ("nan:model.safetensors", "is not finite"),
    ("nan:optimizer.pt", "in optimizer.pt is not finite"),
    ("tamper:optimizer.pt", "optimizer.pt cannot be loaded safely"),
    ("tamper:rng_state.pth", "rng_state.pth cannot be loaded safely"),
    ("state:trainer_state.json", "no valid global_step"),
])
def test_a_damaged_checkpoint_is_refused_with_the_reason(trained, tmp_path, damage, reason):
    how, name = damage.split(":")
    ck = _copy(trained / "checkpoint-10", tmp_path / "checkpoint-10")
    f = ck / name
    marker = tmp_path / "pwned"
    if how == "truncate":
        _truncate(f)
    elif how == "nan" and name.endswith(".safetensors"):
        sd = load_file(str(f))
        k = next(iter(sd))
        sd[k].view(-1)[0] = float("nan")
        save_file(sd, str(f), metadata={"format": "pt"})
    elif how == "nan":
        opt = torch.load(f, weights_only=True)
        next(iter(opt["state"].values()))["exp_avg"].view(-1)[0] = float("inf")
        torch.save(opt, f)
    elif how == "tamper":  # a pickle that runs code when loaded the unsafe way

        class Payload:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        torch.save({"state": {}, "param_groups": [], "x": Payload()}, f)
    elif how == "state":
        f.write_text(json.dumps({"global_step": "ten", "log_history": []}))
    ok, why = verify_checkpoint(ck)
    assert not ok and reason in why, why
    assert not marker.exists(), "verifying ran the tampered file's code"
    if how == "tamper":  # the payload is live: an unsafe load would have run it
        torch.load(f, weights_only=False)
        assert marker.exists()


def test_a_truncated_plugin_snapshot_and_a_nan_checkpoint_are_refused_and_the_run_resumes_from_the_last_good_one(
        trained, tmp_path, caplog):
    out = _copy(trained, tmp_path / "run")
    # the plugin's own on-disk snapshot (resume-step-11): cut in half, as a kill mid-write or a bad disk leaves it
    _truncate(out / "self-healing" / "resume-step-11" / "model.safetensors")
    # the newest Trainer checkpoint: a NaN in the weights
    f = out / "checkpoint-15" / "model.safetensors"
    sd = load_file(str(f))
    sd[next(iter(sd))].view(-1)[0] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    # the run that wrote them died (no postmortem, an unclosed journal): the next launch must resume
    lines = (out / JOURNAL_NAME).read_bytes().splitlines(keepends=True)
    (out / JOURNAL_NAME).write_bytes(b"".join(lines[:-1]))
    (out / "postmortem.json").unlink()
    ckpt, skipped = latest_verified_checkpoint(out)
    assert ckpt.name == "checkpoint-10"
    assert [(Path(s["path"]).name, s["reason"].split(" ")[0]) for s in skipped] == [
        ("checkpoint-15", "tensor"), ("resume-step-11", "model.safetensors")]
    caplog.set_level("WARNING", logger="self_healing")
    tr = build_trainer("trainer", output_dir=str(out), max_steps=20)
    sh = SelfHealingTrainer(tr, FAST)
    sh.train()
    pm = load_postmortem(out)
    assert pm["exit_reason"] == "completed" and tr.state.global_step == 20 and weights_finite(tr.model)
    assert pm["resumed"]["previous_exit_reason"] == "killed" and pm["resumed"]["previous_last_step"] == 15
    assert pm["resumed"]["from"].endswith("checkpoint-10")
    reasons = {Path(s["path"]).name: s["reason"] for s in pm["resumed"]["skipped"]}
    assert "is not finite" in reasons["checkpoint-15"]
    assert "model.safetensors cannot be read" in reasons["resume-step-11"]
    assert "SafetensorError" in reasons["resume-step-11"]
    assert "not resuming from" in caplog.text and "resume-step-11" in caplog.text
    assert read_journal(out / JOURNAL_NAME).closed["exit_reason"] == "completed"


def test_the_plugins_resume_checkpoint_is_fsynced_and_holds_no_hub_token(trained, tmp_path):
    args = torch.load(trained / "self-healing" / "resume-step-11" / "training_args.bin", weights_only=False)
    assert args.hub_token is None  # nothing planted here; test_redact plants one
    assert not list((trained / "self-healing").glob(".tmp-*")), "a temp dir was left behind"


def test_pickle_payloads_never_reach_the_plugins_own_readers(tmp_path):
    """The journal and the postmortem are JSON; presets are YAML read with a safe loader."""
    evil = pickle.dumps({"exit_reason": "completed"})
    (tmp_path / "postmortem.json").write_bytes(evil)
    with pytest.raises(ValueError, match="not"):
        load_postmortem(tmp_path)
    (tmp_path / JOURNAL_NAME).write_bytes(evil)
    assert read_journal(tmp_path / JOURNAL_NAME) is None
    (tmp_path / "p.yaml").write_text("nan_patience: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        HealingConfig.from_preset(str(tmp_path / "p.yaml"))
    assert not (Path.cwd() / "pwned").exists()


def _fsdp_checkpoint(d: Path, sharded: bool, opt_value: float = 0.5) -> Path:
    """The files accelerate's FSDP save writes (names and formats; the values are made up)."""
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    torch.save({"last_epoch": 10}, d / "scheduler.pt")
    if sharded:  # torch.distributed.checkpoint directories: a .metadata and one .distcp per rank
        for sub in ("pytorch_model_fsdp_0", "optimizer_0"):
            (d / sub).mkdir()
            (d / sub / ".metadata").write_bytes(b"metadata")
            for r in (0, 1):
                (d / sub / f"__{r}_0.distcp").write_bytes(b"shard")
    else:
        torch.save({"w": torch.ones(3)}, d / "pytorch_model_fsdp.bin")
        torch.save({"state": {"w": {"exp_avg": torch.full((3,), opt_value)}}, "param_groups": []}, d / "optimizer.bin")
    return d


def test_fsdp_checkpoints_verify_and_are_never_freed_as_half_written(tmp_path):
    """Without knowing FSDP's layouts every FSDP checkpoint looked incomplete: auto-resume ignored
    them and an ENOSPC clean-up would have deleted them all."""
    from self_healing.checkpoints import free_disk_space

    full = _fsdp_checkpoint(tmp_path / "checkpoint-10", sharded=False)
    sharded = _fsdp_checkpoint(tmp_path / "checkpoint-20", sharded=True)
    assert verify_checkpoint(full) == (True, "ok") and verify_checkpoint(sharded) == (True, "ok")
    assert latest_verified_checkpoint(tmp_path)[0] == sharded
    assert free_disk_space(tmp_path) == [] and full.is_dir() and sharded.is_dir()

    nan_opt = _fsdp_checkpoint(tmp_path / "bad" / "checkpoint-30", sharded=False, opt_value=float("nan"))
    ok, why = verify_checkpoint(nan_opt)
    assert not ok and "optimizer.bin" in why and "not finite" in why
    (sharded / "optimizer_0" / ".metadata").unlink()
    ok, why = verify_checkpoint(sharded)
    assert not ok and "optimizer_0/.metadata" in why and "did not finish" in why
    (sharded / "optimizer_0" / ".metadata").write_bytes(b"metadata")
    (sharded / "pytorch_model_fsdp_0" / "__1_0.distcp").write_bytes(b"")
    ok, why = verify_checkpoint(sharded)
    assert not ok and "pytorch_model_fsdp_0" in why and "empty" in why


def test_disk_full_clean_up_deletes_only_what_the_trainer_never_finished(tmp_path):
    """A complete checkpoint in a layout the plugin cannot verify (DeepSpeed's `global_step*/`) is
    not deleted to free space; one without `trainer_state.json` (written last) is."""
    from self_healing.checkpoints import free_disk_space

    ds = tmp_path / "checkpoint-10"
    (ds / "global_step10").mkdir(parents=True)
    (ds / "global_step10" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    (ds / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    assert not verify_checkpoint(ds)[0]
    torn = tmp_path / "checkpoint-20"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    assert free_disk_space(tmp_path) == [str(torn)] and ds.is_dir() and not torn.exists()


# ------------------------------------------------------------------------------------------------
# file modes: what the plugin writes is readable as the user's umask says, like the Trainer's files
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def umask():
    """Set the process umask for one test (pytest runs tests in one thread) and restore it."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_atomic_writes_get_the_umasks_mode_and_stay_atomic(tmp_path, umask, mask):
    from self_healing.io import atomic_write_bytes, atomic_write_json, create_temp_file

    umask(mask)
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")  # what any normally created file gets here
    want = plain.stat().st_mode & 0o777
    assert want == 0o666 & ~mask
    atomic_write_bytes(tmp_path / "a.bin", b"1")
    atomic_write_bytes(tmp_path / "a.bin", b"22")  # replacing an existing file
    atomic_write_json(tmp_path / "sub" / "b.json", {"x": float("nan")})
    HealingConfig.aggressive().save(tmp_path / "c.yaml")
    for f in ("a.bin", "sub/b.json", "c.yaml"):
        assert (tmp_path / f).stat().st_mode & 0o777 == want, f"{f}: {oct((tmp_path / f).stat().st_mode)}"
    assert (tmp_path / "a.bin").read_bytes() == b"22"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "b.json", "c.yaml", "plain", "sub"]
    fd, name = create_temp_file(tmp_path, ".x.")
    os.close(fd)
    assert Path(name).stat().st_mode & 0o777 == want and Path(name).name.startswith(".x.")


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_every_file_the_plugin_writes_in_a_run_gets_the_umasks_mode(tmp_path, umask, mask):
    """Postmortem, journal, resume checkpoint, redacted training args, snapshot spill files and the
    report PNG: each as readable as the Trainer's own files beside them (0644 under umask 022)."""
    from self_healing.report import PlotUnavailable, plot_postmortem
    from self_healing.snapshot import _write_safetensors

    umask(mask)
    out = tmp_path / "run"
    tr = build_trainer("trainer", output_dir=str(out), max_steps=8, save_strategy="steps", save_steps=4)
    inject_faults(tr, Fault("exception", step=6, times=1, exception=lambda: torch.OutOfMemoryError("CUDA out of memory")))
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=2, api_backoff_seconds=0.001,
                                              snapshot_spill_dir="spill"))
    sh.train()
    assert sh.exit_reason == "completed"
    assert list((out / "self-healing").glob("resume-step-*")), "no resume checkpoint was written"
    _write_safetensors(out / "spill" / "s.safetensors", [torch.ones(3)], {"step": "1"})
    try:
        plot_postmortem(sh.postmortem, out / "report.png")
    except PlotUnavailable:
        pass
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    # the Trainer's own checkpoint-N/ is the Trainer's (safetensors 0.8 writes model.safetensors
    # 0600 there); of it, the plugin writes only the redacted training_args.bin
    ours = [p for p in out.rglob("*") if p.relative_to(out).parts[0].startswith("checkpoint-") is False
            or p.name == "training_args.bin"]
    wrong = [f"{p.relative_to(out)}: {oct(p.stat().st_mode & 0o777)}" for p in ours
             if p.stat().st_mode & 0o777 != (want_dir if p.is_dir() else want_file)]
    assert not wrong, f"umask {oct(mask)}: want {oct(want_file)} files, {oct(want_dir)} dirs; got {wrong}"
    for name in ("postmortem.json", JOURNAL_NAME, "checkpoint-4/training_args.bin"):
        assert (out / name).is_file()


# ------------------------------------------------------------------------------------------------
# a postmortem that cannot be written at the end does not cost the finished run
# ------------------------------------------------------------------------------------------------
def test_an_output_dir_gone_unwritable_at_the_end_keeps_the_train_output(tmp_path, caplog, monkeypatch):
    """The output dir disappears under the run at its last step (a file in its place: unwritable
    even for root). train() still returns its TrainOutput, the run is `completed`, and the error
    names the path, the reason and where the postmortem went instead."""
    import tempfile

    from transformers import TrainerCallback
    from transformers.trainer_utils import TrainOutput

    out = tmp_path / "run"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systmp"))
    (tmp_path / "systmp").mkdir()

    class PullTheDisk(TrainerCallback):
        def on_train_end(self, args, state, control, **kw):
            out.rename(tmp_path / "moved")
            out.write_text("not a directory any more")

    tr = build_trainer("trainer", output_dir=str(out), max_steps=4, callbacks=[PullTheDisk()])
    sh = SelfHealingTrainer(tr, FAST)
    with caplog.at_level("ERROR", logger="self_healing"):
        result = sh.train()
    assert isinstance(result, TrainOutput) and result.global_step == 4
    assert sh.exit_reason == "completed" and sh.postmortem["exit_reason"] == "completed"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "postmortem" in r.getMessage()]
    assert errors, caplog.text
    fallback = list((tmp_path / "systmp").glob("self-healing-postmortem-*.json"))
    assert len(fallback) == 1 and load_postmortem(fallback[0])["exit_reason"] == "completed"
    assert str(out / "postmortem.json") in errors[0]
    assert "NotADirectoryError" in errors[0] or "FileExistsError" in errors[0]  # the reason, whichever mkdir met
    assert str(fallback[0]) in errors[0]


def test_a_postmortem_that_fits_nowhere_is_logged_not_raised(tmp_path, caplog, monkeypatch):
    import self_healing.postmortem as pmod
    from self_healing.postmortem import PostmortemRecorder

    def refuse(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(pmod, "atomic_write_text", refuse)
    rec = PostmortemRecorder(HealingConfig())
    with caplog.at_level("ERROR", logger="self_healing"):
        assert rec.write(tmp_path / "postmortem.json", rec.build("completed", last_step=1)) is None
    assert "PermissionError" in caplog.text and str(tmp_path / "postmortem.json") in caplog.text
