"""Supervised fine-tuning (TRL `SFTTrainer`) kept alive by self-healing.

    python examples/sft.py                          # offline: tiny model, CPU, seconds
    python examples/sft.py --fault nan_loss@15      # rehearse a NaN: watch it detected and healed
    python examples/sft.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --preset aggressive

Then read what happened: `self-healing report outputs/sft --plot report.png`.
"""

from _common import dataset, finish, inject, model_and_tokenizer, parse_args, training_args


def main(argv=None) -> int:
    args = parse_args("sft", __doc__, argv)
    from trl import SFTConfig, SFTTrainer

    from self_healing import HealingConfig, SelfHealingTrainer
    from self_healing.tiny import sft_dataset

    model, tokenizer = model_and_tokenizer(args)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**training_args(args, lr_offline=3e-3, lr_model=2e-5,
                                       per_device_train_batch_size=8 if args.offline else 4,
                                       max_length=64 if args.offline else 1024)),
        train_dataset=dataset(args, sft_dataset),
        processing_class=tokenizer,
    )
    inject(trainer, args)  # only with --fault

    # The one line: wrap the trainer, pick a preset, train as before.
    sh = SelfHealingTrainer(trainer, HealingConfig.from_preset(args.preset))
    sh.train()
    return finish(sh)


if __name__ == "__main__":
    raise SystemExit(main())
