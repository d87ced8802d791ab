"""The `self-healing` command line on real tiny runs: demo, report (exit codes, first line), presets,
validate (every bad field named)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import read_postmortem, run_healed
from self_healing import HealingConfig, SelfHealingTrainer
from self_healing.cli import main
from self_healing.config import PRESET_NAMES
from self_healing.faults import Fault, inject_faults
from self_healing.tiny import build_trainer

ROOT = Path(__file__).resolve().parent.parent


def is_png(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, asserting its signature and header chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _run(*args, cwd=ROOT, timeout=300):
    exe = shutil.which("self-healing")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "self_healing", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# --- demo -------------------------------------------------------------------------------------------
def test_demo_heals_one_failure_prints_the_report_and_draws_the_png(tmp_path):
    out = tmp_path / "demo"
    r = _run("demo", "--output-dir", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = r.stdout[r.stdout.index("COMPLETED"):]
    assert report.startswith("COMPLETED at step 60/60") and "1 failure healed (nan_loss)" in report.splitlines()[0]
    assert "- step 25: nan_loss -> skip_step" in report
    assert "self-healing: step 25:" in r.stdout + r.stderr  # healed live, said while training
    pm = json.loads((out / "postmortem.json").read_text())
    assert pm["exit_reason"] == "completed" and [a["step"] for a in pm["recovery_actions"]] == [25]
    w, h = is_png(out / "report.png")
    assert w >= 800 and h >= 500 and (out / "report.png").stat().st_size > 20_000
    assert f"plot: {out / 'report.png'}" in r.stdout


def test_python_dash_m_runs_the_same_cli():
    r = subprocess.run([sys.executable, "-m", "self_healing", "presets"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.split()[:4] == ["field", "default", "aggressive", "conservative"]


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert eps.get("self-healing") == "self_healing.cli:main"


# --- report -----------------------------------------------------------------------------------------
def test_report_of_a_gave_up_run_exits_non_zero_and_says_why_first(tmp_path, capsys):
    cfg = HealingConfig(snapshot_every_steps=5, max_recovery_attempts=2, nan_patience=1)
    sh = run_healed("sft", tmp_path, faults=[Fault("nan_loss", step=20, duration=10_000)], config=cfg, max_steps=40)
    assert sh.exit_reason == "gave_up"
    capsys.readouterr()
    rc = main(["report", str(tmp_path / "sft"), "--plot", str(tmp_path / "gave_up.png")])
    out = capsys.readouterr().out
    assert rc == 1
    first = out.splitlines()[0]
    assert first.startswith("GAVE UP at step ") and "nan_loss" in first and "max_recovery_attempts=2" in first
    assert "weights: the last verified snapshot (step " in out
    assert "-> give_up" in out and "rollback" in out
    is_png(tmp_path / "gave_up.png")


def test_report_of_an_exception_names_it_in_the_first_line(tmp_path, capsys):
    tr = build_trainer("sft", output_dir=str(tmp_path / "bug"), max_steps=20)
    inject_faults(tr, Fault("exception", step=8, exception=lambda: ZeroDivisionError("division by zero")))
    with pytest.raises(ZeroDivisionError):
        SelfHealingTrainer(tr).train()
    capsys.readouterr()
    rc = main(["report", str(tmp_path / "bug" / "postmortem.json")])
    out = capsys.readouterr().out
    assert rc == 1
    assert out.splitlines()[0].startswith("EXCEPTION at step 7/20")
    assert "ZeroDivisionError: division by zero" in out.splitlines()[0]


def test_report_of_a_completed_run_exits_zero_with_every_recovery(tmp_path, capsys):
    sh = run_healed("sft", tmp_path, faults=[Fault("nan_weight", step=15), Fault("lr_scale", step=28, duration=2)],
                    max_steps=40)
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed"
    capsys.readouterr()
    assert main(["report", str(tmp_path / "sft")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("COMPLETED at step 40/40")
    assert "- step 15: weight_corruption -> rollback" in out and "rolled_back_to_step=" in out
    assert "- steps 28-29: lr_spike -> skip_step, restore_lr (each of 2 steps)" in out
    assert "evidence: " in out and "why: " in out and "loss around it: " in out


def test_report_text_works_without_matplotlib(tmp_path, capsys, monkeypatch):
    run_healed("sft", tmp_path, faults=[Fault("nan_loss", step=10)], max_steps=20)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib -> ImportError
    capsys.readouterr()
    rc = main(["report", str(tmp_path / "sft"), "--plot", str(tmp_path / "p.png")])
    cap = capsys.readouterr()
    assert rc == 0 and cap.out.startswith("COMPLETED") and "- step 10: nan_loss" in cap.out
    assert "matplotlib" in cap.err and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("content", [None, b"{not json", b"\xff\xfe", b'{"a": 1}'])
def test_report_on_unreadable_input_exits_2(tmp_path, capsys, content):
    p = tmp_path / "postmortem.json"
    if content is not None:
        p.write_bytes(content)
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# --- presets ----------------------------------------------------------------------------------------
def test_presets_lists_every_field_with_each_presets_value(capsys):
    assert main(["presets"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(HealingConfig.field_names())
    assert rows["nan_patience"] == [str(getattr(HealingConfig.from_preset(n), "nan_patience")) for n in PRESET_NAMES]
    assert rows["zclip_enabled"] == ["False", "True", "False"]


def test_presets_name_prints_yaml_that_round_trips(capsys, tmp_path):
    assert main(["presets", "aggressive"]) == 0
    text = capsys.readouterr().out
    assert HealingConfig.from_dict(yaml.safe_load(text)) == HealingConfig.aggressive()
    assert main(["presets", "nope"]) == 2


# --- validate ---------------------------------------------------------------------------------------
def test_validate_names_both_bad_fields(tmp_path, capsys):
    f = tmp_path / "cfg.yaml"
    f.write_text("nan_patience: -1\nmax_recovery_attempts: 3\nlr_reduction_factor: 1.5\n")
    assert main(["validate", str(f)]) == 1
    err = capsys.readouterr().err
    assert "2 problems" in err.splitlines()[0]
    assert "HealingConfig.nan_patience=-1" in err and "HealingConfig.lr_reduction_factor=1.5" in err
    assert "max_recovery_attempts" not in err


def test_validate_names_unknown_keys_and_bad_values_together(tmp_path, capsys):
    f = tmp_path / "cfg.yaml"
    f.write_text("nan_patiense: 2\nzclip_mode: fast\nsnapshot_every_steps: 0\nbogus: 1\n")
    assert main(["validate", str(f)]) == 1
    err = capsys.readouterr().err
    assert "4 problems" in err
    assert "'nan_patiense': did you mean 'nan_patience'?" in err
    assert "'bogus': accepted fields: " in err
    assert "HealingConfig.zclip_mode='fast'" in err and "HealingConfig.snapshot_every_steps=0" in err


@pytest.mark.parametrize("text,why", [("a: [1\n", "not valid YAML"), ("- 1\n- 2\n", "must be a mapping"),
                                      (b"\xff\xfe", "not UTF-8")])
def test_validate_rejects_files_that_are_not_configs(tmp_path, capsys, text, why):
    f = tmp_path / "cfg.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["validate", str(f)]) == 1
    assert why in capsys.readouterr().err


def test_validate_accepts_the_shipped_presets_and_a_missing_file_is_an_error(capsys, tmp_path):
    for name in PRESET_NAMES:
        assert main(["validate", str(ROOT / "presets" / f"{name}.yaml")]) == 0
    assert main(["validate", str(tmp_path / "none.yaml")]) == 1


_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["auto", "zscore", "percentile", "x", "SIGTERM"]),
                    st.lists(st.sampled_from(["SIGTERM", "SIGUSR1", "NOPE"]), max_size=2))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(HealingConfig.field_names() + ["not_a_field"]), _values, max_size=6))
def test_problems_agree_with_construction(values):
    """`problems()` reuses the constructor's checks: empty exactly when the config can be built, and
    its first value problem is the constructor's error."""
    problems = HealingConfig.problems(values)
    try:
        HealingConfig.from_dict(values)
        built = True
    except ValueError as e:
        built = False
        if "not_a_field" not in values:
            assert problems and problems[0] == str(e)
    assert built == (problems == [])
    assert len(problems) <= len(values)  # one message per offending field, never more


# --- input errors: one line, exit 2, before any model is built; a closed pipe is not an error ------
def _tiny_postmortem(tmp_path: Path, exit_reason: str = "completed") -> Path:
    from self_healing.postmortem import PostmortemRecorder, dumps_postmortem

    rec = PostmortemRecorder(HealingConfig())
    for step in range(1, 6):
        rec.observe(step, 2.0 / step, 1.0, 1e-3)
    pm = rec.build(exit_reason, last_step=5, max_steps=5, trainer_class="SFTTrainer")
    p = tmp_path / "pm" / "postmortem.json"
    p.parent.mkdir()
    p.write_text(dumps_postmortem(pm))
    return p


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command builds a model."""
    import self_healing.tiny

    def refuse(*a, **k):
        raise AssertionError("a model was built for an input error")

    monkeypatch.setattr(self_healing.tiny, "build_trainer", refuse)


@pytest.mark.parametrize("argv,needles", [
    (["demo", "--preset", "agressive"], ["--preset", "did you mean 'aggressive'", "conservative"]),
    (["demo", "--step", "0"], ["--step", "from 1 to"]),
    (["demo", "--steps", "10", "--step", "11"], ["--step", "from 1 to --steps (10)"]),
    (["demo", "--steps", "-5"], ["--steps", "from 1 to 100000", "'-5'"]),
    (["demo", "--steps", "many"], ["--steps", "integer"]),
    (["demo", "--fault", "fire"], ["--fault", "choose from", "nan"]),
    (["demo", "--trainer", "ppo"], ["--trainer", "sft"]),
    (["demo", "--plot", "a.png", "--no-plot"], ["--no-plot", "--plot"]),
    (["demo", "--output-dir", "{file}/out"], ["--output-dir", "is a file, not a directory", "writable directory"]),
    (["demo", "--output-dir", "{file}"], ["--output-dir", "not a directory"]),
    (["demo", "--plot", "{file}/x.png"], ["--plot", "is a file, not a directory", "FILE.png"]),
    (["demo", "--preset", "{tmp}/no.yaml"], ["--preset", "does not exist"]),
    (["report", "{pm}", "--plot", "{file}/x.png"], ["--plot", "is a file, not a directory"]),
    (["report", "{pm}", "--plot", "{tmp}"], ["--plot", "not a file path"]),
    (["report"], ["path"]),
    (["bogus"], ["invalid choice", "demo"]),
    ([], ["command"]),
])
def test_every_input_error_is_one_line_and_exit_2_before_a_model_is_built(argv, needles, tmp_path, capsys, no_model):
    f = tmp_path / "a_file"
    f.write_text("x")
    pm = _tiny_postmortem(tmp_path)
    argv = [a.format(file=f, tmp=tmp_path, pm=pm) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    cap = capsys.readouterr()
    assert e.value.code == 2, cap.err
    assert cap.out == "" and cap.err.count("\n") == 1 and cap.err.startswith("self-healing"), cap.err
    for n in needles:
        assert n in cap.err, cap.err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_an_unwritable_output_dir_is_an_input_error(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--output-dir", str(ro / "out")])
    assert e.value.code == 2 and "--output-dir" in capsys.readouterr().err


def test_a_plot_that_cannot_be_written_after_the_checks_is_exit_2_not_a_traceback(tmp_path, capsys, monkeypatch):
    import self_healing.report

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(self_healing.report, "plot_postmortem", full)
    assert main(["report", str(_tiny_postmortem(tmp_path)), "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot" in capsys.readouterr().err


class _ClosedAfter:
    """A stdout whose reader goes away after `n` writes."""

    def __init__(self, n: int) -> None:
        self.n, self.text = n, ""

    def write(self, s: str) -> int:
        if self.n <= 0:
            raise BrokenPipeError(32, "Broken pipe")
        self.n -= 1
        self.text += s
        return len(s)

    def flush(self) -> None:
        if self.n <= 0:
            raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("writes", [0, 1, 3])
@pytest.mark.parametrize("exit_reason,rc", [("completed", 0), ("gave_up", 1)])
def test_a_closed_pipe_keeps_the_reports_own_exit_code(tmp_path, monkeypatch, capsys, writes, exit_reason, rc):
    pm = _tiny_postmortem(tmp_path, exit_reason)
    out = _ClosedAfter(writes)
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["report", str(pm)]) == rc
    assert sys.stdout is out
    assert capsys.readouterr().err == ""


# one interpreter start each (torch and transformers imported): a verdict of each exit code, and a
# command other than report (`presets NAME` writes through the same guarded stdout as `presets`)
@pytest.mark.parametrize("argv,rc", [(["presets"], 0), (["report", "{pm}"], 0), (["report", "{gave_up}"], 1)])
def test_report_piped_into_a_closed_reader_exits_with_its_verdict_quietly(tmp_path, argv, rc):
    """`self-healing report OUT | head -1`: the reader is gone before the first write (closed at
    once here, so the outcome cannot depend on timing): no traceback, the verdict's exit code."""
    pm = _tiny_postmortem(tmp_path)
    (tmp_path / "g").mkdir()
    gave_up = _tiny_postmortem(tmp_path / "g", "gave_up")
    argv = [a.format(pm=pm, gave_up=gave_up) for a in argv]
    exe = shutil.which("self-healing")
    cmd = [exe, *argv] if exe else [sys.executable, "-m", "self_healing", *argv]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == rc, err
    assert err == ""
