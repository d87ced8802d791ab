"""A hand-written PyTorch loop kept alive by self-healing.

    python examples/plain_pytorch.py                        # a clean run: nothing to heal
    python examples/plain_pytorch.py --fault nan_loss@30    # a NaN loss: the update is skipped
    python examples/plain_pytorch.py --fault nan_weight@30  # NaN weights: rolled back in memory
"""

import torch

from _loop_common import batches, parse_args, rehearse, report, toy_task


def main(argv=None) -> int:
    args = parse_args("plain_pytorch", __doc__, argv)
    from self_healing import Healer, HealingConfig

    model, x, y = toy_task(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    healer = None if args.no_healer else Healer(model, optimizer, scheduler, config=HealingConfig.from_preset(
        args.preset), output_dir=args.output_dir)
    rehearse(healer, args)  # only with --fault

    for inputs, targets in batches(x, y, args.max_steps):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        if healer is None or healer.before_step(loss):  # False: this update is dropped
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad()
        if healer is not None:
            healer.after_step()  # weight/optimizer-state checks, snapshots, rollback
            if healer.stopped:
                break

    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x), y).item()
    return report(healer, final)


if __name__ == "__main__":
    raise SystemExit(main())
