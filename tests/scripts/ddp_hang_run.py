"""Under torchrun, 2 CPU processes (gloo): rank 1's forward blocks forever at step 30, so rank 0
waits in the gradient all-reduce. Both watchdogs must end their process long before ddp_timeout.
Rank 1's bound is a fixed 8 s and rank 0's about 3 s, so rank 0's watchdog reports first (with
equal bounds both fire within the same poll and either can win: CI under load saw rank 1 win,
the "race" case below).
With MODE "straggler", rank 1's forward takes 0.15 s longer on every step instead (no hang). With
MODE "race", rank 0's bounds are far longer than rank 1's: rank 1's watchdog always ends it first,
and rank 0's all-reduce fails on the closed connection (the race the default mode can hit).

    python -m torch.distributed.run --nproc_per_node 2 ddp_hang_run.py OUT [straggler]
"""
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

HANG_AT = 30


def main(output_dir: str, mode: str = "hang") -> None:
    from self_healing import HealingConfig, SelfHealingTrainer
    from self_healing.tiny import build_trainer

    torch.set_num_threads(1)
    tr = build_trainer("trainer", output_dir=output_dir, max_steps=60 if mode == "straggler" else 36,
                       per_device_train_batch_size=4, save_strategy="steps", save_steps=5, ddp_timeout=600)

    def stuck(module, args):
        if module.training and tr.args.process_index == 1:
            if mode == "straggler":
                time.sleep(0.15)  # a slower GPU, a throttled host
            elif tr.state.global_step + 1 == HANG_AT:  # "hang" and "race"
                time.sleep(3600)

    tr.model.register_forward_pre_hook(stuck)
    extra = {}
    if mode == "race":
        floor = 120.0 if tr.args.process_index == 0 else 3.0
    elif tr.args.process_index == 0:  # max(3 s, its longest step): never near rank 1's, however slow a step
        floor, extra = 3.0, {"hang_factor": 1.0}
    else:  # fixed: a slow step under load must not raise it toward rank 0's
        floor, extra = 3.0, {"hang_phase_seconds": {"train_step": 8.0}}
    cfg = HealingConfig(snapshot_every_steps=5, hang_floor_seconds=floor, hang_startup_seconds=60.0,
                        hang_poll_seconds=0.2, **extra)
    SelfHealingTrainer(tr, cfg).train()
    print("DONE", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
