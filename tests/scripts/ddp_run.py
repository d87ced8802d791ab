"""Run under torchrun with 2 CPU processes (gloo): a fault on rank 1 only, healed on both ranks.

    python -m torch.distributed.run --nproc_per_node 2 ddp_run.py OUT FAULT STEPS [ddp|fsdp]

`fsdp` shards the model with FSDP2 (`fully_shard`: every parameter a DTensor holding its rank's
rows). torch runs FSDP on CPU/gloo, but accelerate only switches to FSDP on an accelerator and
silently falls back to DDP on CPU (`AcceleratorState.__init__`'s MULTI_CPU branch drops the
plugin), so this script puts the plugin back: the Trainer then wraps the model exactly as it
does on GPUs, and the run exercises the real sharded code paths.
"""
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402


def keep_fsdp_on_cpu() -> None:
    import accelerate.state as st
    from accelerate.utils import DistributedType

    orig = st.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        orig(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            st.PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # later AcceleratorState()s

    st.AcceleratorState.__init__ = init


def full_weights(model) -> torch.Tensor:
    """Every parameter, whole (shards gathered), in order: identical on all ranks by construction
    under FSDP, so compared against the DDP run of the same fault instead."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        return torch.cat([(p.full_tensor() if isinstance(p, DTensor) else p).detach().flatten().float()
                          for p in model.parameters()])


def main(output_dir: str, fault: str, max_steps: int, mode: str = "ddp") -> None:
    from self_healing import HealingConfig, SelfHealingTrainer
    from self_healing.faults import Fault, inject_faults
    from self_healing.tiny import build_trainer

    torch.set_num_threads(1)
    extra = {}
    if mode == "fsdp":
        keep_fsdp_on_cpu()
        extra = dict(use_cpu=True, fsdp="full_shard",
                     fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                  "state_dict_type": os.environ.get("FSDP_STATE_DICT", "FULL_STATE_DICT")})
    if os.environ.get("SAVE_STEPS"):
        extra.update(save_strategy="steps", save_steps=int(os.environ["SAVE_STEPS"]))
    tr = build_trainer("sft", output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=4, **extra)
    if fault == "nan":
        inject_faults(tr, Fault("nan_loss", step=25, rank=1))
    elif fault == "nan_weight":
        inject_faults(tr, Fault("nan_weight", step=25, rank=1))
    elif fault == "oom":
        inject_faults(tr, Fault("exception", step=25, duration=10**6, rank=1,
                                exception=lambda: torch.OutOfMemoryError("CUDA out of memory (rank 1)"),
                                when=lambda t, inputs: inputs["input_ids"].shape[0] > 2))
    elif fault == "sigterm":  # a preemption notice that reaches rank 1 only, during step 25
        import signal

        from transformers import TrainerCallback

        class Preempt(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if args.process_index == 1 and state.global_step + 1 == 25:
                    os.kill(os.getpid(), signal.SIGTERM)
        tr.add_callback(Preempt())
    elif fault == "oom_forward":  # mid-forward, inside a sharded layer: FSDP is left mid-iteration
        layer = tr.model.model.layers[1]

        def hook(module, args):
            if tr.args.process_index == 1 and tr.state.global_step + 1 >= 25 and args[0].shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (rank 1, in layer 1's forward)")
        layer.register_forward_pre_hook(hook)
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5))
    sh.train()
    model = tr.model_wrapped
    full = full_weights(model)
    rank = tr.args.process_index
    if rank == 0:
        torch.save(full, Path(output_dir, "weights.pt"))
    from torch.distributed.tensor import DTensor
    Path(output_dir, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": tr.args.world_size, "global_step": tr.state.global_step,
        "finite": bool(torch.isfinite(full).all()), "weights_sha": hashlib.sha256(full.numpy().tobytes()).hexdigest(),
        "sharded": any(isinstance(p, DTensor) for p in model.parameters()),
        "distributed_type": str(tr.accelerator.distributed_type),
        "per_device_train_batch_size": tr.args.per_device_train_batch_size,
        "gradient_accumulation_steps": tr.args.gradient_accumulation_steps, "exit_reason": sh.exit_reason,
        "resumed": sh.callback.recorder.extra.get("resumed")}))
    if mode == "fsdp":
        # torch's FSDP on gloo sometimes aborts in interpreter teardown after a finished run
        # ("terminate called without an active exception"); everything is written by now.
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
