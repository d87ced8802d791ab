"""LoRA fine-tuning (PEFT adapters on TRL's `SFTTrainer`) kept alive by self-healing.

    python examples/lora_sft.py                          # offline: tiny model, CPU, seconds
    python examples/lora_sft.py --fault nan_grad@15      # rehearse a NaN gradient: the step is skipped
    python examples/lora_sft.py --model meta-llama/Llama-3.2-1B --dataset trl-lib/Capybara --lora-r 16

Only the adapters train, so only they (and their optimizer state) are snapshotted for rollback:
snapshots of a LoRA run are small and cheap. Then read what happened:
`self-healing report outputs/lora_sft --plot report.png`.
"""

from _common import dataset, finish, inject, model_and_tokenizer, parse_args, training_args


def main(argv=None) -> int:
    args = parse_args("lora_sft", __doc__, argv, lora_r={"type": int, "default": 8, "help": "LoRA rank"})
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from self_healing import HealingConfig, SelfHealingTrainer
    from self_healing.tiny import sft_dataset

    model, tokenizer = model_and_tokenizer(args)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**training_args(args, lr_offline=3e-2, lr_model=2e-4,
                                       per_device_train_batch_size=8 if args.offline else 4,
                                       max_length=64 if args.offline else 1024)),
        train_dataset=dataset(args, sft_dataset),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                               target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    inject(trainer, args)  # only with --fault

    # The one line: wrap the trainer, pick a preset, train as before.
    sh = SelfHealingTrainer(trainer, HealingConfig.from_preset(args.preset))
    sh.train()
    return finish(sh)


if __name__ == "__main__":
    raise SystemExit(main())
