"""A DistributedDataParallel loop kept alive by self-healing: every rank takes the same decision at
the same step (each step's loss and gradient norm travel in one small all_gather).

    torchrun --nproc_per_node 2 examples/ddp_loop.py                       # gloo on CPU, NCCL on GPUs
    torchrun --nproc_per_node 2 examples/ddp_loop.py --fault nan_loss@30
    python examples/ddp_loop.py --fault nan_weight@30                      # starts 2 CPU processes itself
"""

import os

import torch
import torch.distributed as dist

from _loop_common import batches, parse_args, rehearse, report, toy_task


def train(args) -> tuple:
    """The loop on this rank; returns (healer, model, final loss)."""
    from self_healing import Healer, HealingConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if dist.get_backend() == "nccl" else None
    model, x, y = toy_task(args.seed)  # the same initial weights on every rank
    model = torch.nn.parallel.DistributedDataParallel(model.to(device) if device else model,
                                                      device_ids=[device] if device else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    healer = None if args.no_healer else Healer(model, optimizer, scheduler, config=HealingConfig.from_preset(
        args.preset), output_dir=args.output_dir)
    rehearse(healer, args)  # only with --fault (injected on every rank)

    for inputs, targets in batches(x, y, args.max_steps, rank=rank, world=world):
        if device is not None:
            inputs, targets = inputs.to(device), targets.to(device)
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()  # DDP all-reduces the gradients: every rank holds the same ones
        if healer is None or healer.before_step(loss):  # the same answer on every rank
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad()
        if healer is not None:
            healer.after_step()
            if healer.stopped:
                break

    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model.module(x.to(device) if device else x),
                                             y.to(device) if device else y).item()
    return healer, model, final


def _worker(rank: int, world: int, port: int, argv) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    raise SystemExit(main(argv))


def main(argv=None) -> int:
    args = parse_args("ddp_loop", __doc__, argv)
    if "RANK" not in os.environ:  # not under torchrun: start 2 CPU processes
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(2, port, argv), nprocs=2)
        return 0
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        healer, _, final = train(args)
        if dist.get_rank() != 0:
            if healer is not None:
                healer.finish()
            return 0
        return report(healer, final)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
