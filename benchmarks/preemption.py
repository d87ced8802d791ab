"""Time from SIGTERM to a verified checkpoint on disk and to the process's exit, when the signal
lands in the middle of a training step, an evaluation or a save.

    python benchmarks/preemption.py            # the four cases, a tiny model on the CPU (~1 min)

Each case is a fresh process training a tiny model whose step, evaluation step or save is made
slow on purpose (a 2 s step, 1 s evaluation steps, a 3 s save), preempted 0.5-2 s into it; the
fourth has a slow disk (a checkpoint takes ~3 s: weights 1 s, optimizer state 2 s) and a 3 s
grace, so the fastest resumable state is written instead of the full checkpoint. What is
measured: the postmortem's `preemption.seconds_to_checkpoint` (signal -> the checkpoint verified
on disk, as the process timed it) and the parent's signal -> exit. The bound is
`preemption_grace_seconds` (25 s by default: Slurm's KillWait is 30 s); before issue 15 a signal
during an evaluation waited for the whole evaluation, and one during a save trained and saved one
more step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {"step": ("STEP 6", 0.5), "evaluation": ("EVAL", 2.0), "save": ("SAVING", 1.0),
         "step, slow disk, 3 s grace": ("STEP 6", 0.0)}
GRACE = {"step, slow disk, 3 s grace": 3.0}


def child(output_dir: str, case: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers import TrainerCallback

    from self_healing import HealingConfig, SelfHealingTrainer
    from self_healing.tiny import build_trainer, sft_dataset

    torch.set_num_threads(1)

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            print(f"STEP {state.global_step}", flush=True)

        def on_prediction_step(self, args, state, control, **kwargs):
            print("EVAL", flush=True)

    extra = {}
    if case == "evaluation":
        extra = dict(eval_dataset=sft_dataset(240, seed=1), per_device_eval_batch_size=8, eval_strategy="steps",
                     eval_steps=6)
    tr = build_trainer("trainer", output_dir=output_dir, max_steps=40, callbacks=[Progress()],
                       save_strategy="steps", save_steps=6 if case == "save" else 1000, **extra)
    if case == "step":
        tr.model.register_forward_pre_hook(
            lambda m, a: time.sleep(2.0) if m.training and tr.state.global_step >= 6 else None)
    if case == "evaluation":
        tr.model.register_forward_pre_hook(lambda m, a: None if m.training else time.sleep(1.0))
    if case.startswith("step, slow disk"):  # weights 1 s, optimizer state (2x the bytes) 2 s: a full save ~3 s
        save_model, save_opt = tr.save_model, tr._save_optimizer_and_scheduler
        tr.save_model = lambda *a, **k: (time.sleep(1.0), save_model(*a, **k))[1]
        tr._save_optimizer_and_scheduler = lambda *a, **k: (time.sleep(2.0), save_opt(*a, **k))[1]
        tr.args.save_steps = 5
    if case == "save":
        orig = tr.save_model

        def slow_save(*a, **k):
            print("SAVING", flush=True)
            time.sleep(3.0)
            return orig(*a, **k)

        tr.save_model = slow_save
    cfg = HealingConfig(snapshot_every_steps=5, preemption_grace_seconds=GRACE.get(case, 25.0))
    SelfHealingTrainer(tr, cfg).train()


def measure(case: str) -> dict:
    from self_healing.checkpoints import verify_checkpoint

    marker, delay = CASES[case]
    with tempfile.TemporaryDirectory(prefix="sh-preempt-") as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        p = subprocess.Popen([sys.executable, __file__, "--child", str(out), case], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
        for line in p.stdout:
            if line.startswith(marker):
                time.sleep(delay)
                break
        p.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        p.stdout.read()
        code = p.wait(timeout=120)
        exited = time.monotonic() - sent
        pm = json.loads((out / "postmortem.json").read_text())
        pre = pm.get("preemption") or {}
        ok = bool(pm.get("checkpoint")) and verify_checkpoint(pm["checkpoint"])[0]
        return {"case": case, "exit_code": code, "step": pm.get("last_step"),
                "to_checkpoint_s": pre.get("seconds_to_checkpoint"), "to_exit_s": round(exited, 2),
                "verified": ok, "within_grace": pre.get("within_grace"), "grace": pre.get("grace_seconds"),
                "left_out": ", ".join((pre.get("fast_state") or {}).get("omitted") or []) if pre.get("fast_state")
                else None,
                "evaluation_aborted": pre.get("evaluation_aborted")}


def main() -> int:
    rows = [measure(c) for c in CASES]
    print("| signal during | grace | SIGTERM -> verified checkpoint | SIGTERM -> exit | checkpoint | exit code |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        kind = "full" if r["left_out"] is None else f"fast state (left out: {r['left_out'] or 'nothing'})"
        print(f"| {r['case']} | {r['grace']:g} s | {r['to_checkpoint_s']:.2f} s | {r['to_exit_s']:.2f} s | "
              f"{kind}{'' if r['verified'] else ', NOT verified'} | {r['exit_code']} |")
    return 0 if all(r["verified"] and r["within_grace"] for r in rows) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
