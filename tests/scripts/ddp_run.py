"""Run under torchrun with 2 CPU processes (gloo): a fault on rank 1 only, healed on both ranks."""
import hashlib
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from self_healing import HealingConfig, SelfHealingTrainer  # noqa: E402
from self_healing.faults import Fault, inject_faults  # noqa: E402
from self_healing.tiny import build_trainer, weights_finite  # noqa: E402


def main(output_dir: str, fault: str, max_steps: int) -> None:
    torch.set_num_threads(1)
    tr = build_trainer("sft", output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=4)
    if fault == "nan":
        inject_faults(tr, Fault("nan_loss", step=25, rank=1))
    elif fault == "oom":
        inject_faults(tr, Fault("exception", step=25, duration=10**6, rank=1,
                                exception=lambda: torch.OutOfMemoryError("CUDA out of memory (rank 1)"),
                                when=lambda t, inputs: inputs["input_ids"].shape[0] > 2))
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5))
    sh.train()
    flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()]).numpy().tobytes()
    rank = tr.args.process_index
    Path(output_dir, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": tr.args.world_size, "global_step": tr.state.global_step,
        "finite": weights_finite(tr.model), "weights_sha": hashlib.sha256(flat).hexdigest(),
        "per_device_train_batch_size": tr.args.per_device_train_batch_size,
        "gradient_accumulation_steps": tr.args.gradient_accumulation_steps, "exit_reason": sh.exit_reason}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
