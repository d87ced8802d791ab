"""An `accelerate` training loop kept alive by self-healing (CPU here; the same code runs on GPUs,
multi-GPU and mixed precision under `accelerate launch`).

    python examples/accelerate_loop.py                           # a clean run
    python examples/accelerate_loop.py --fault grad_scale@30     # exploding gradients: update skipped
    python examples/accelerate_loop.py --fault zero_exp_avg_sq@30  # Adam state zeroed: rolled back
"""

import torch

from _loop_common import batches, parse_args, rehearse, report, toy_task


def main(argv=None) -> int:
    args = parse_args("accelerate_loop", __doc__, argv)
    from accelerate import Accelerator

    from self_healing import Healer, HealingConfig

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, x, y = toy_task(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    healer = None if args.no_healer else Healer(model, optimizer, scheduler, config=HealingConfig.from_preset(
        args.preset), output_dir=args.output_dir, accelerator=accelerator)
    rehearse(healer, args)  # only with --fault

    for inputs, targets in batches(x, y, args.max_steps):
        inputs, targets = inputs.to(accelerator.device), targets.to(accelerator.device)
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        accelerator.backward(loss)
        if healer is None or healer.before_step(loss):  # False: this update is dropped
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad()
        if healer is not None:
            healer.after_step()  # weight/optimizer-state checks, snapshots, rollback
            if healer.stopped:
                break

    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x.to(accelerator.device)), y.to(accelerator.device)).item()
    return report(healer, final)


if __name__ == "__main__":
    raise SystemExit(main())
