"""Secrets never written: planted tokens and credentials appear in none of the files a real run
writes (postmortem, crash journal, checkpoints, trackio's store) nor in any line it logs."""
import json
import logging
import os
import secrets
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from self_healing.redact import (REDACTED, RedactingFilter, is_secret_key, redact, redact_text, redacted_copy,
                                 register_secret)

SCRIPTS = Path(__file__).parent / "scripts"


def _tok(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("text,secret", [
    ("hub_token='hf_{a}'", "hf_{a}"),
    ("token: hf_{a} expired", "hf_{a}"),
    ("Authorization: Bearer {a}", "{a}"),
    ("GET https://user:{a}@example.com/data failed", "{a}"),
    ("clone https://{a}@github.com/org/repo", "{a}"),
    ("https://api.example.com/v1?api_key={a}&page=2", "{a}"),
    ("https://bucket.s3.amazonaws.com/x?X-Amz-Signature={a}", "{a}"),
    ('{{"password": "{a}", "lr": 0.1}}', "{a}"),
    ("OPENAI_API_KEY=sk-proj-{a}", "sk-proj-{a}"),
    ("key sk-ant-api03-{a} rejected", "sk-ant-api03-{a}"),
    ("wandb login {hex40}", "{hex40}"),
    ("push with ghp_{a}", "ghp_{a}"),
    ("aws AKIA{upper16} denied", "AKIA{upper16}"),
    ("client_secret={a}", "{a}"),
    ("db_password: {a}", "{a}"),
    ("jwt eyJ{a}.eyJ{a}.{a}", "eyJ{a}.eyJ{a}.{a}"),
])
def test_secret_shapes_are_redacted_in_text(text, secret):
    a = _tok(36)
    fill = {"a": a, "hex40": secrets.token_hex(20), "upper16": _tok(16, string.ascii_uppercase + string.digits)}
    text, secret = text.format(**fill), secret.format(**fill)
    out = redact_text(text)
    assert secret not in out and REDACTED in out, out
    assert redact_text(out) == out  # idempotent


@pytest.mark.parametrize("text", [
    "loss is nan at step 25 while weights and optimizer state are finite",
    "num_input_tokens_seen=5000 tokens: 20 max_grad_norm=1.0",
    "pad_token=<pad> eos_token_id: 2",
    "gradient norm 3.2e+04 is a z=7.10 outlier",
    "resuming from /runs/exp-1/checkpoint-40",
])
def test_ordinary_text_is_left_alone(text):
    assert redact_text(text) == text


def test_nested_data_is_redacted_by_key_and_by_shape():
    hf = "hf_" + _tok(34)
    data = {"hub_token": "anything", "args": {"push_to_hub_token": "x", "wandb_api_key": "y", "client_secret": "z",
                                              "password": 1234, "learning_rate": 1e-3, "pad_token": "<pad>",
                                              "hub_token": None, "notes": [f"see https://u:p4ss@h/x and {hf}"]},
            "tokens": 5, "num_tokens": 7.0, "flags": (True, "x")}
    out = redact(data)
    assert out["hub_token"] == REDACTED and out["args"]["wandb_api_key"] == REDACTED
    assert out["args"]["push_to_hub_token"] == REDACTED and out["args"]["client_secret"] == REDACTED
    assert out["args"]["password"] == REDACTED and out["args"]["hub_token"] is None
    assert out["args"]["learning_rate"] == 1e-3 and out["args"]["pad_token"] == "<pad>"
    assert out["tokens"] == 5 and out["num_tokens"] == 7.0 and out["flags"] == (True, "x")
    assert hf not in json.dumps(out) and "p4ss" not in json.dumps(out)
    assert data["hub_token"] == "anything"  # a copy: the caller's data is untouched
    assert [k for k in ("hub_token", "openai_api_key", "AWS_SECRET_ACCESS_KEY", "db-password", "token")
            if not is_secret_key(k)] == []
    assert [k for k in ("pad_token", "num_tokens", "max_steps", "tokenizer", "monkey") if is_secret_key(k)] == []


def test_environment_and_registered_values_are_redacted_whatever_their_shape(monkeypatch):
    shapeless = "correct-horse-" + _tok(12)
    monkeypatch.setenv("MY_SERVICE_PASSWORD", shapeless)
    assert shapeless not in redact_text(f"connecting with {shapeless}!")
    mine = "zz-" + _tok(20)
    register_secret(mine)
    assert redact({"note": f"x{mine}y"}) == {"note": f"x{REDACTED}y"}


def test_the_log_filter_redacts_messages_arguments_and_tracebacks(caplog):
    tok = "hf_" + _tok(34)
    lg = logging.getLogger("self_healing")
    assert any(isinstance(f, RedactingFilter) for f in lg.filters)
    caplog.set_level(logging.INFO, logger="self_healing")
    lg.warning("self-healing: retry %s of https://u:%s@h/", 1, "pw123456789")
    try:
        raise ConnectionError(f"bad token {tok}")
    except ConnectionError:
        lg.exception("self-healing: failed")
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert tok not in text and "pw123456789" not in text and REDACTED in text


def test_a_redacted_copy_of_training_arguments_keeps_the_rest():
    from transformers import TrainingArguments

    tok = "hf_" + _tok(34)
    args = TrainingArguments(output_dir="/tmp/x", hub_token=tok, report_to="none", learning_rate=0.01)
    clean = redacted_copy(args)
    assert clean.hub_token == REDACTED and clean.learning_rate == 0.01 and args.hub_token == tok


def test_planted_secrets_appear_in_no_written_file_and_no_log_line(tmp_path):
    planted = {
        "hub_token": "hf_" + _tok(34), "hf_token": "hf_" + _tok(34), "vendor_key": "vk-" + _tok(24),
        "url_password": "pw" + _tok(16), "query_key": "qk" + _tok(20), "bearer": "br" + _tok(30),
        "openai_key": "sk-proj-" + _tok(40), "wandb_key": secrets.token_hex(20), "db_password": "horse-" + _tok(14),
    }
    (tmp_path / "secrets.json").write_text(json.dumps(planted))
    out, store = tmp_path / "run", tmp_path / "trackio"
    env = {**os.environ, "TRACKIO_DIR": str(store), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "HF_TOKEN": planted["hf_token"],
           "WANDB_API_KEY": planted["wandb_key"], "OPENAI_API_KEY": planted["openai_key"],
           "MY_DB_PASSWORD": planted["db_password"]}
    for k in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        env.pop(k, None)
    cmd = [sys.executable, str(SCRIPTS / "planted_secrets_run.py"), str(out), str(tmp_path / "secrets.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert "DONE exception 9" in r.stdout, r.stderr[-3000:]
    logs = r.stdout + r.stderr
    # the run did reach every place a secret could leak through
    pm = json.loads((out / "postmortem.json").read_text())
    assert pm["exit_reason"] == "exception" and pm["exception_type"] == "ZeroDivisionError"
    assert REDACTED in pm["exception_message"]
    failures = [a["failure"] for a in pm["recovery_actions"]]
    assert "oom" in failures
    assert "self-healing:" in logs and "retry 1/" in logs and REDACTED in logs
    assert list(out.glob("checkpoint-*/training_args.bin")) and list(out.glob("self-healing/resume-step-*"))
    assert list(store.rglob("*.db")), "trackio wrote nothing"
    files = [p for p in list(out.rglob("*")) + list(store.rglob("*")) if p.is_file()]
    assert any(p.name == "healing-journal.jsonl" for p in files)
    leaks = []
    for name, value in planted.items():
        needle = value.encode()
        leaks += [f"{name} in {p}" for p in files if needle in p.read_bytes()]
        if value in logs:
            leaks.append(f"{name} in the logs")
    assert not leaks, leaks
    # ...and the unredacted args are really gone, not just hidden: the checkpoints still load
    args = torch.load(next(out.glob("checkpoint-*/training_args.bin")), weights_only=False)
    assert args.hub_token == REDACTED and args.max_steps == 12
