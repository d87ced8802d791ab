"""Preference tuning (TRL `DPOTrainer`) kept alive by self-healing.

    python examples/dpo.py                          # offline: tiny model, CPU, seconds
    python examples/dpo.py --fault lr_scale@12      # rehearse an LR spike: the update is skipped, the LR put back
    python examples/dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized

The dataset has `prompt`, `chosen` and `rejected` columns (TRL's preference format). Then read
what happened: `self-healing report outputs/dpo --plot report.png`.
"""

from _common import dataset, finish, inject, model_and_tokenizer, parse_args, training_args


def main(argv=None) -> int:
    args = parse_args("dpo", __doc__, argv)
    from trl import DPOConfig, DPOTrainer

    from self_healing import HealingConfig, SelfHealingTrainer
    from self_healing.tiny import dpo_dataset

    model, tokenizer = model_and_tokenizer(args)
    # The frozen reference: a Hub model is loaded again by TRL from its name; the tiny offline one
    # has no name to load from, so it is built here, with the same weights.
    ref_model = model_and_tokenizer(args)[0] if args.offline else None
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=DPOConfig(**training_args(args, lr_offline=5e-4, lr_model=5e-7,
                                       per_device_train_batch_size=8 if args.offline else 2,
                                       max_length=64 if args.offline else 1024, beta=0.1)),
        train_dataset=dataset(args, dpo_dataset),
        processing_class=tokenizer,
    )
    inject(trainer, args)  # only with --fault

    # The one line: wrap the trainer, pick a preset, train as before.
    sh = SelfHealingTrainer(trainer, HealingConfig.from_preset(args.preset))
    sh.train()
    return finish(sh)


if __name__ == "__main__":
    raise SystemExit(main())
