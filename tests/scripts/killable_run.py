"""A tiny real SFT run that a test SIGKILLs, again and again, in the same output_dir.

    killable_run.py run OUT MAX_STEPS [PHASE HANG_STEP]   one launch in this interpreter
    killable_run.py serve                                 a launcher: imports once, then forks one
                                                          launch per JSON line read on stdin

A launch prints `BEGIN <global_step>` when training starts (after any resume), `STEP n` after each
optimizer step (after the crash journal has recorded it), `DONE n <exit_reason> finite=<bool>` at
the end. With PHASE/HANG_STEP it stops at that point, prints `HANG <last completed step>` and waits
there to be killed:

- `pre_optimizer`: step HANG_STEP's forward/backward done, its update not applied (last step HANG_STEP-1);
- `step_end`:      step HANG_STEP done, before its checkpoint (if any) is saved;
- `mid_save`:      inside the save of checkpoint-HANG_STEP: weights written, optimizer and
                   trainer_state.json not (a torn checkpoint);
- `after_save`:    checkpoint-HANG_STEP complete;
- `free`:          no hang: the test kills at a random moment of its choosing.

Why a forking launcher: importing torch + transformers + TRL takes 5-15 s on a small shared CPU
box, which would make 20 fresh launches cost minutes of imports. Each forked launch is still a
separate process that builds its trainer from scratch, trains for real, is killed by a real
SIGKILL and shares nothing with the next launch but the files in output_dir. The launcher itself
never runs a torch op before forking (so no thread pool is inherited).
"""
import json
import os
import sys
import threading
import time
import traceback
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import TrainerCallback  # noqa: E402

import self_healing.journal as journal  # noqa: E402
from self_healing import HealingConfig, SelfHealingTrainer  # noqa: E402
from self_healing.faults import Fault, inject_faults  # noqa: E402
from self_healing.tiny import build_trainer, weights_finite  # noqa: E402

journal.CrashJournal.max_bytes = 16 * 1024  # compact every few dozen steps: kills land in compactions too
NAN_STEP = 5  # a NaN loss here gives the journal a decision to carry into the killed run's postmortem


class Progress(TrainerCallback):
    """Added after SelfHealingTrainer, so its hooks run after the journal's."""

    def __init__(self, phase: str | None, hang_step: int | None) -> None:
        self.phase, self.hang_step = phase, hang_step

    def hang(self, last_done: int) -> None:
        print(f"HANG {last_done}", flush=True)
        while True:
            time.sleep(60)

    def on_train_begin(self, args, state, control, **kwargs):
        print(f"BEGIN {state.global_step}", flush=True)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.phase == "pre_optimizer" and state.global_step + 1 == self.hang_step:
            self.hang(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        print(f"STEP {state.global_step}", flush=True)
        if self.phase == "step_end" and state.global_step == self.hang_step:
            self.hang(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.phase == "after_save" and state.global_step == self.hang_step:
            self.hang(state.global_step)


def run(output_dir: str, max_steps: int, phase: str | None = None, hang_step: int | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    trainer = build_trainer("sft", output_dir=output_dir, max_steps=max_steps, save_strategy="steps", save_steps=2,
                            logging_steps=1, disable_tqdm=True)
    inject_faults(trainer, Fault("nan_loss", step=NAN_STEP))
    sh = SelfHealingTrainer(trainer, HealingConfig(snapshot_every_steps=3))
    progress = Progress(phase, hang_step)
    trainer.add_callback(progress)
    if phase == "mid_save":
        orig = trainer._save_optimizer_and_scheduler

        def save_optimizer_and_scheduler(out):  # the weights of this checkpoint are on disk already
            if trainer.state.global_step == hang_step:
                progress.hang(hang_step)
            return orig(out)

        trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    sh.train()
    print(f"DONE {trainer.state.global_step} {sh.exit_reason} finite={weights_finite(trainer.model)}", flush=True)


def serve() -> None:
    print(f"READY threads={threading.active_count()}", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the launch
            code = 1
            try:
                run(**cmd)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - report, then exit like a crashed launch
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        phase, hang = (sys.argv[4], int(sys.argv[5])) if len(sys.argv) > 5 else (None, None)
        run(sys.argv[2], int(sys.argv[3]), phase, hang)
