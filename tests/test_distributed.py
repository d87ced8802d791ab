"""Two CPU processes (gloo) under torchrun: a failure on rank 1 only is healed on both ranks in the
same step, and both ranks end with identical, finite weights. Each launch has a timeout: a hang
fails the test. The same faults under FSDP2 (every parameter sharded across the two ranks; see
`scripts/ddp_run.py` for how the Trainer is made to shard on CPU) must heal the same way and end
where the DDP run ends."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_run.py"
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RUNS: dict = {}


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Run (and remember, for the FSDP-vs-DDP comparisons) one 2-rank launch per (fault, mode)."""
    def run(fault: str, mode: str = "ddp"):
        if (fault, mode) not in _RUNS:
            _RUNS[fault, mode] = _launch(tmp_path_factory.mktemp(f"{fault}_{mode}"), fault, mode)
        out = _RUNS[fault, mode]
        assert not isinstance(out, subprocess.CompletedProcess), out.stderr[-3000:]
        return out

    yield run
    _RUNS.clear()


def _launch(out, fault, mode, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(SCRIPT), str(out), fault, "40", mode]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, **env})
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks hung with a fault '{fault}' on rank 1 ({mode})")
    if p.returncode != 0:
        return p
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    pm = json.loads((out / "postmortem.json").read_text())
    assert not list(out.glob("postmortem*.json"))[1:], "only rank 0 writes the postmortem"
    for r in ranks:
        assert r["world_size"] == 2 and r["global_step"] == 40 and r["finite"] and r["exit_reason"] == "completed"
        assert r["sharded"] == (mode == "fsdp") and r["distributed_type"].endswith(mode.upper() if mode == "fsdp"
                                                                                    else "MULTI_CPU")
    assert ranks[0]["weights_sha"] == ranks[1]["weights_sha"], "replicas diverged"
    return ranks, pm, torch.load(out / "weights.pt")


def test_nan_on_rank1_is_skipped_on_both_ranks(launch):
    ranks, pm, _ = launch("nan")
    [ev] = pm["recovery_actions"]
    assert (ev["step"], ev["failure"], ev["actions"]) == (25, "nan_loss", ["skip_step"])
    per_rank = {r["rank"]: r["loss"] for r in ev["evidence"]["per_rank"]}
    assert per_rank[1] == "nan" and isinstance(per_rank[0], float)


def test_oom_on_rank1_reduces_the_batch_on_both_ranks(launch):
    ranks, pm, _ = launch("oom")
    for r in ranks:
        assert (r["per_device_train_batch_size"], r["gradient_accumulation_steps"]) == (2, 2)
    [ev] = pm["recovery_actions"]
    assert ev["failure"] == "oom" and ev["step"] == 25 and ev["evidence"]["ranks"] == [1]
    assert ev["details"]["batch"]["effective_batch"] == [4, 4]


def test_oom_inside_the_forward_on_rank1_heals_under_ddp(launch):
    """A real OOM comes from inside the model, after DDP's forward already broadcast its buffers:
    the re-run that keeps rank 1 in step must not broadcast them again."""
    ranks, pm, _ = launch("oom_forward")
    for r in ranks:
        assert (r["per_device_train_batch_size"], r["gradient_accumulation_steps"]) == (2, 2)
    [ev] = pm["recovery_actions"]
    assert ev["failure"] == "oom" and ev["step"] == 25 and ev["evidence"]["ranks"] == [1]


def test_fsdp_exception_inside_the_forward_on_rank1_stops_loudly_not_silently(tmp_path):
    """Under FSDP the forward all-gathers layer by layer, so a rank that failed half-way cannot be
    put back in step: it must stop at once and say why (not hang, not pair mismatched collectives)."""
    p = _launch(tmp_path, "oom_forward", "fsdp")
    assert isinstance(p, subprocess.CompletedProcess) and p.returncode != 0
    assert "inside the FSDP model's forward/backward; the ranks' collectives cannot be re-aligned" in p.stderr
    assert "--max-restarts" in p.stderr


def _close_to_ddp(weights, ddp_weights):
    # Same data, seed and healing; only the reduction order differs (reduce-scatter vs all-reduce),
    # which 40 AdamW steps amplify to ~4e-3 at most. A shard skipped or restored wrongly is off by
    # the size of the weights themselves (or NaN).
    assert torch.allclose(weights, ddp_weights, atol=2e-2, rtol=0), float((weights - ddp_weights).abs().max())


def test_fsdp_nan_on_rank1_is_skipped_on_both_ranks(launch):
    ranks, pm, w = launch("nan", "fsdp")
    [ev] = pm["recovery_actions"]
    assert (ev["step"], ev["failure"], ev["actions"]) == (25, "nan_loss", ["skip_step"])
    assert {r["rank"]: r["loss"] for r in ev["evidence"]["per_rank"]}[1] == "nan"
    _close_to_ddp(w, launch("nan")[2])


def test_fsdp_corrupt_shard_on_rank1_rolls_back_every_shard(launch):
    """A NaN written into rank 1's shard only: both ranks roll back, each to its own shard of the
    same snapshot, and the run ends where the DDP run with the same fault ends."""
    ranks, pm, w = launch("nan_weight", "fsdp")
    [ev] = pm["recovery_actions"]
    assert (ev["step"], ev["failure"], ev["actions"]) == (25, "weight_corruption", ["rollback"])
    assert ev["evidence"]["rank"] == 1  # whose shard was bad
    ddp_ranks, ddp_pm, ddp_w = launch("nan_weight")
    assert [(e["step"], e["failure"], e["actions"]) for e in ddp_pm["recovery_actions"]] == \
        [(25, "weight_corruption", ["rollback"])]
    _close_to_ddp(w, ddp_w)


def test_fsdp_oom_on_rank1_reduces_the_batch_on_both_ranks(launch):
    ranks, pm, _ = launch("oom", "fsdp")
    for r in ranks:
        assert (r["per_device_train_batch_size"], r["gradient_accumulation_steps"]) == (2, 2)
    [ev] = pm["recovery_actions"]
    assert ev["failure"] == "oom" and ev["step"] == 25 and ev["evidence"]["ranks"] == [1]
    assert ev["details"]["batch"]["effective_batch"] == [4, 4]


def test_fsdp_preemption_on_rank1_saves_a_sharded_checkpoint_and_the_same_command_resumes(launch, tmp_path):
    """SIGTERM reaching rank 1 only: both ranks finish step 25, save a sharded (torch.distributed.
    checkpoint) checkpoint and exit; the same launch again finds it verified, resumes, and ends
    exactly where an uninterrupted run ends."""
    env = dict(SAVE_STEPS="10", FSDP_STATE_DICT="SHARDED_STATE_DICT")
    first = _launch(tmp_path, "sigterm", "fsdp", **env)
    assert isinstance(first, subprocess.CompletedProcess) and first.returncode != 0
    pm = json.loads((tmp_path / "postmortem.json").read_text())
    assert (pm["exit_reason"], pm["last_step"]) == ("interrupted", 25)
    assert (tmp_path / "checkpoint-25" / "pytorch_model_fsdp_0" / ".metadata").is_file()
    ranks, pm, w = _launch(tmp_path, "none", "fsdp", **env)
    assert pm["exit_reason"] == "completed"
    for r in ranks:
        assert r["resumed"]["from"].endswith("checkpoint-25") and r["resumed"]["previous_exit_reason"] == "interrupted"
    assert torch.equal(w, launch("none", "fsdp")[2])
