"""A tiny Trainer run that hangs or is preempted on purpose, for tests/test_watchdog.py.

    python hang_run.py OUTPUT_DIR MODE MAX_STEPS

MODE: "forward" (the model's forward sleeps forever at step 30), "data" (the dataset blocks forever
while building step 30's batch), "slow_eval" (every evaluation step takes a second: a 60 s
evaluation, which a SIGTERM during it must abort), "none". Each fault strikes once per output dir (a marker file), so the
same command run again is the relaunch. Prints "STEP n" after each step, "EVAL n" after each
prediction step, "DONE step exit_reason" at the end. "steady": 0.1 s per training forward; "faults":
the same, and the first launch has a NaN loss (skipped), NaN weights (rolled back) and an OOM (the
batch halved).
"""
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from self_healing import HealingConfig, SelfHealingTrainer  # noqa: E402
from self_healing.tiny import build_trainer, sft_dataset  # noqa: E402

HANG_AT = 30


class Progress(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(f"STEP {state.global_step}", flush=True)

    def on_prediction_step(self, args, state, control, **kwargs):
        print(f"EVAL {state.global_step}", flush=True)


def once(out: Path, name: str) -> bool:
    marker = out / f"fault-{name}"
    if marker.exists():
        return False
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("struck")
    return True


class BlockingData(torch.utils.data.Dataset):
    def __init__(self, ds, out: Path, block_after: int) -> None:
        self.ds, self.out, self.block_after, self.calls = ds, out, block_after, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.calls += 1
        if self.calls > self.block_after and once(self.out, "data"):
            time.sleep(3600)  # a worker that never answers, a mount that never returns
        return self.ds[i]


def main(output_dir: str, mode: str, max_steps: int) -> None:
    torch.set_num_threads(1)
    out = Path(output_dir)
    extra = {}
    if mode == "slow_eval":
        extra = dict(eval_dataset=sft_dataset(480, seed=1), per_device_eval_batch_size=8, eval_strategy="steps",
                     eval_steps=6)
    tr = build_trainer("trainer", output_dir=output_dir, max_steps=max_steps, save_strategy="steps", save_steps=5,
                       callbacks=[Progress()], **extra)
    if mode == "forward":
        def sleep_forever(module, args):
            if module.training and tr.state.global_step + 1 == HANG_AT and once(out, "forward"):
                time.sleep(3600)  # a collective waiting on a dead rank, a generation that never returns

        tr.model.register_forward_pre_hook(sleep_forever)
    if mode in ("steady", "faults"):  # 0.1 s of compute per step, so a test can kill it mid-run
        tr.model.register_forward_pre_hook(lambda module, args: time.sleep(0.1) if module.training else None)
    if mode == "faults" and once(out, "faults"):  # the first launch: a NaN skip, a rollback, an OOM batch change
        from self_healing.faults import Fault, inject_faults

        bs0 = tr.args.per_device_train_batch_size
        inject_faults(tr, Fault("nan_loss", step=4), Fault("nan_weight", step=9),
                      Fault("exception", step=13, times=1,
                            exception=lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                            when=lambda t, inputs: t.args.per_device_train_batch_size == bs0))
    if mode == "data":
        # accelerate's dataloader reads one batch ahead: step 30's fetch is the one that reads batch 31
        tr.train_dataset = BlockingData(tr.train_dataset, out, HANG_AT * tr.args.per_device_train_batch_size)
    if mode == "slow_eval" and not (out / "fault-slow_eval").exists():
        def slow_eval(module, args):
            if not module.training:
                (out / "fault-slow_eval").write_text("seen")
                time.sleep(1.0)

        tr.model.register_forward_pre_hook(slow_eval)
    cfg = HealingConfig(snapshot_every_steps=5, hang_floor_seconds=2.0, hang_startup_seconds=60.0,
                        hang_poll_seconds=0.2, preemption_grace_seconds=10.0)
    sh = SelfHealingTrainer(tr, cfg)
    sh.train()
    print(f"DONE {tr.state.global_step} {sh.exit_reason}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
