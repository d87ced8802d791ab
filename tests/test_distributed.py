"""Two CPU processes (gloo) under torchrun: a failure on rank 1 only is healed on both ranks in the
same step, and both ranks end with identical, finite weights. Each launch has a timeout: a hang
fails the test."""
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_run.py"
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, fault):
    out = tmp_path / fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(SCRIPT), str(out), fault, "40"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks hung with a fault '{fault}' on rank 1")
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    pm = json.loads((out / "postmortem.json").read_text())
    assert not list(out.glob("postmortem*.json"))[1:], "only rank 0 writes the postmortem"
    for r in ranks:
        assert r["world_size"] == 2 and r["global_step"] == 40 and r["finite"] and r["exit_reason"] == "completed"
    assert ranks[0]["weights_sha"] == ranks[1]["weights_sha"], "replicas diverged"
    return ranks, pm


def test_nan_on_rank1_is_skipped_on_both_ranks(tmp_path):
    ranks, pm = _launch(tmp_path, "nan")
    [ev] = pm["recovery_actions"]
    assert (ev["step"], ev["failure"], ev["actions"]) == (25, "nan_loss", ["skip_step"])
    per_rank = {r["rank"]: r["loss"] for r in ev["evidence"]["per_rank"]}
    assert per_rank[1] == "nan" and isinstance(per_rank[0], float)


def test_oom_on_rank1_reduces_the_batch_on_both_ranks(tmp_path):
    ranks, pm = _launch(tmp_path, "oom")
    for r in ranks:
        assert (r["per_device_train_batch_size"], r["gradient_accumulation_steps"]) == (2, 2)
    [ev] = pm["recovery_actions"]
    assert ev["failure"] == "oom" and ev["step"] == 25 and ev["evidence"]["ranks"] == [1]
    assert ev["details"]["batch"]["effective_batch"] == [4, 4]
