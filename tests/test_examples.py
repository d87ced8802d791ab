"""Every example runs in its offline mode (tiny model, CPU, nothing downloaded), as a user would run
it, and its `--model` path loads a model with `from_pretrained` (here from a local directory)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["sft", "dpo", "grpo", "lora_sft"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("SELF_HEALING_EXAMPLES_VERBOSE", None)
    return env


def _start(script, *args, out: Path):
    cmd = [sys.executable, str(ROOT / "examples" / f"{script}.py"), "--output-dir", str(out), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory):
    """All examples at once (one CPU thread each): their offline defaults, one rehearsed fault."""
    base = tmp_path_factory.mktemp("examples")
    procs = {name: (_start(name, out=base / name), base / name) for name in EXAMPLES}
    procs["sft+fault"] = (_start("sft", "--fault", "nan_loss@12", "--preset", "aggressive", out=base / "sft_fault"),
                          base / "sft_fault")
    runs = {}
    for name, (proc, out) in procs.items():
        rc, text = _finish(proc)
        runs[name] = (rc, text, out)
    return runs


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_offline_and_completes(example_runs, name):
    rc, text, out = example_runs[name]
    assert rc == 0, text[-3000:]
    pm = json.loads((out / "postmortem.json").read_text())
    assert pm["exit_reason"] == "completed" and pm["last_step"] == 30
    assert pm["recovery_actions"] == []  # a clean tiny run needs no healing
    assert "COMPLETED at step 30/30" in text  # the report is printed at the end


def test_example_heals_a_rehearsed_fault(example_runs):
    rc, text, out = example_runs["sft+fault"]
    assert rc == 0, text[-3000:]
    pm = json.loads((out / "postmortem.json").read_text())
    assert pm["exit_reason"] == "completed"
    assert [(a["step"], a["failure"]) for a in pm["recovery_actions"]] == [(12, "nan_loss")]
    assert pm["config"]["nan_patience"] == 1  # --preset aggressive reached the wrapper
    assert "rehearsal: nan_loss will be injected at step 12" in text


def test_example_model_flag_loads_with_from_pretrained(tmp_path):
    from self_healing.tiny import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_llama(tok, seed=3).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rc, text = _finish(_start("sft", "--model", str(model_dir), "--max-steps", "4", out=tmp_path / "out"))
    assert rc == 0, text[-3000:]
    pm = json.loads((tmp_path / "out" / "postmortem.json").read_text())
    assert pm["exit_reason"] == "completed" and pm["last_step"] == 4
    lrs = [pt[3] for pt in pm["curve"]["points"]]
    assert 0 < max(lrs) <= 2e-5  # the real-model settings (lr, warm-up), not the tiny ones


def test_example_rejects_an_unknown_fault(tmp_path):
    rc, text = _finish(_start("sft", "--fault", "melt@3", out=tmp_path / "x"))
    assert rc != 0 and "melt" in text and "expected one of" in text
