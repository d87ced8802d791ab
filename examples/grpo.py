"""Online RL (TRL `GRPOTrainer`) kept alive by self-healing.

    python examples/grpo.py                          # offline: tiny model, CPU, seconds
    python examples/grpo.py --fault nan_weight@10    # rehearse corrupted weights: rolled back to a verified snapshot
    python examples/grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/tldr --preset conservative

The reward here is a toy (how often the completion uses the letter "a"); put yours in
`reward_funcs`. For GRPO the loss is a policy loss, not a quantity that should go down, so
self-healing watches gradients, weights, optimizer state and non-finite values rather than loss
spikes. Then read what happened: `self-healing report outputs/grpo --plot report.png`.
"""

from _common import dataset, finish, inject, model_and_tokenizer, parse_args, training_args


def main(argv=None) -> int:
    args = parse_args("grpo", __doc__, argv)
    from trl import GRPOConfig, GRPOTrainer

    from self_healing import HealingConfig, SelfHealingTrainer
    from self_healing.tiny import grpo_dataset, letter_reward

    model, tokenizer = model_and_tokenizer(args)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=letter_reward,
        args=GRPOConfig(**training_args(args, lr_offline=1e-3, lr_model=1e-6,
                                        per_device_train_batch_size=4 if args.offline else 8,
                                        num_generations=4, max_completion_length=8 if args.offline else 128)),
        train_dataset=dataset(args, grpo_dataset),
        processing_class=tokenizer,
    )
    inject(trainer, args)  # only with --fault

    # The one line: wrap the trainer, pick a preset, train as before.
    sh = SelfHealingTrainer(trainer, HealingConfig.from_preset(args.preset))
    sh.train()
    return finish(sh)


if __name__ == "__main__":
    raise SystemExit(main())
