"""A tiny SFT run that a test can preempt: prints 'STEP n' after each step, a little slowly."""
import sys
import time
import warnings

warnings.filterwarnings("ignore")

from transformers import TrainerCallback  # noqa: E402

from self_healing import HealingConfig, SelfHealingTrainer  # noqa: E402
from self_healing.tiny import build_trainer  # noqa: E402


class Progress(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(f"STEP {state.global_step}", flush=True)
        time.sleep(0.05)


def main(output_dir: str, max_steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    trainer = build_trainer("sft", output_dir=output_dir, max_steps=max_steps, callbacks=[Progress()])
    sh = SelfHealingTrainer(trainer, HealingConfig(snapshot_every_steps=5))
    sh.train()
    print(f"DONE {trainer.state.global_step} {sh.exit_reason}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
