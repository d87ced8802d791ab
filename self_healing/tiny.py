"""Tiny offline models, tokenizer and datasets for rehearsals, the demo, tests and benchmarks.

Nothing is downloaded: the tokenizer is built with the `tokenizers` library, the model from a
config (`LlamaConfig`, 2 layers, hidden 64 by default), the data from a small word grammar. All
four trainers (Trainer, SFT, DPO, GRPO) run tens of steps per second on a laptop CPU.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch

WORDS = ("the cat sat on a mat and the dog ran to the park while the birds sang in tall trees "
         "a man read his book by the warm fire as rain fell on the old roof").split()
SUBJECTS = ["the cat", "a dog", "the bird", "a man", "the girl", "my friend"]
VERBS = ["sat on", "ran to", "looked at", "jumped over", "walked past", "sang near"]
OBJECTS = ["the mat", "a park", "the tree", "his book", "the fire", "an old roof"]


def tiny_tokenizer():
    """A character-level tokenizer (about 45 tokens) with pad/bos/eos and a trivial chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz .,!?0123456789")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>")
    t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return t


def tiny_llama(tokenizer=None, hidden: int = 64, layers: int = 2, seed: int = 0, intermediate: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer or tiny_tokenizer()
    heads = 4 if hidden % 4 == 0 else 1
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                      max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"


def scrambled(rng: random.Random) -> str:
    words = sentence(rng).split()
    rng.shuffle(words)
    return " ".join(words)


def sft_dataset(n: int = 512, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_list([{"text": f"{sentence(rng)}. {sentence(rng)}."} for _ in range(n)])


def dpo_dataset(n: int = 256, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_list([{"prompt": rng.choice(SUBJECTS), "chosen": " " + sentence(rng).split(" ", 2)[2],
                               "rejected": " " + scrambled(rng)} for _ in range(n)])


def grpo_dataset(n: int = 256, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_list([{"prompt": rng.choice(SUBJECTS)} for _ in range(n)])


def letter_reward(completions, **kwargs) -> list[float]:
    """GRPO reward: how often the completion uses the letter 'a' (cheap, learnable, noisy)."""
    return [float(str(c).count("a")) / 4.0 for c in completions]


def _common_args(output_dir: str, max_steps: int, lr: float, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    args = dict(output_dir=output_dir, max_steps=max_steps, learning_rate=lr, logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=seed, data_seed=seed,
                lr_scheduler_type="constant_with_warmup", warmup_steps=5, dataloader_num_workers=0)
    args.update(overrides)
    return args


def build_trainer(kind: str = "sft", output_dir: str = "outputs/tiny", max_steps: int = 60, lr: float | None = None,
                  seed: int = 0, hidden: int = 64, layers: int = 2, callbacks: list | None = None,
                  **overrides: Any):
    """A ready tiny trainer of `kind` in {"trainer", "sft", "dpo", "grpo"}; `overrides` go to its args."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = tiny_tokenizer()
    model = tiny_llama(tok, hidden=hidden, layers=layers, seed=seed)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**_common_args(output_dir, max_steps, lr or 3e-3, seed,
                                        {"per_device_train_batch_size": 8, "max_length": 64, **overrides}))
        return SFTTrainer(model=model, args=args, train_dataset=sft_dataset(seed=seed), processing_class=tok,
                          callbacks=callbacks)
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**_common_args(output_dir, max_steps, lr or 5e-4, seed,
                                        {"per_device_train_batch_size": 8, "max_length": 64, **overrides}))
        ref = tiny_llama(tok, hidden=hidden, layers=layers, seed=seed)
        return DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dpo_dataset(seed=seed),
                          processing_class=tok, callbacks=callbacks)
    if kind == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**_common_args(output_dir, max_steps, lr or 1e-3, seed,
                                         {"per_device_train_batch_size": 4, "num_generations": 4,
                                          "max_completion_length": 8, **overrides}))
        return GRPOTrainer(model=model, reward_funcs=letter_reward, args=args, train_dataset=grpo_dataset(seed=seed),
                           processing_class=tok, callbacks=callbacks)
    if kind == "trainer":
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

        ds = sft_dataset(seed=seed).map(lambda b: tok(b["text"], truncation=True, max_length=64), batched=True,
                                        remove_columns=["text"])
        args = TrainingArguments(**_common_args(output_dir, max_steps, lr or 3e-3, seed,
                                                {"per_device_train_batch_size": 8, **overrides}))
        return Trainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                       data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=callbacks)
    raise ValueError(f"kind={kind!r} is not accepted: expected 'trainer', 'sft', 'dpo' or 'grpo'")


def logged_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


def tail_loss(trainer, n: int = 10) -> float:
    losses = logged_losses(trainer)[-n:]
    return sum(losses) / len(losses) if losses else float("nan")


def weights_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
