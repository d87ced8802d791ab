"""Tiny offline models, tokenizer and datasets for rehearsals, the demo, tests and benchmarks.

Nothing is downloaded: the tokenizer is built with the `tokenizers` library, the model from a
config (`LlamaConfig`, 2 layers, hidden 64 by default), the data from a small word grammar. Every
supported trainer (Trainer, SFT, DPO, GRPO, KTO, RLOO, Reward, and TRL's experimental ORPO/CPO)
can be built here, with or without a LoRA adapter, and runs several steps per second on a CPU.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch
from torch import nn

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


def tied_preference_dataset(n: int = 256, seed: int = 0):
    """Preference pairs whose chosen and rejected answers are the same text: nothing to learn, so a
    preference trainer's loss stays at its chance value (a DPO plateau, reproducibly)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = " " + sentence(rng).split(" ", 2)[2]
        rows.append({"prompt": rng.choice(SUBJECTS), "chosen": answer, "rejected": answer})
    return Dataset.from_list(rows)


def kto_dataset(n: int = 256, seed: int = 0):
    """Unpaired preference data (prompt, completion, label), half desirable, half not."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = i % 2 == 0
        completion = " " + (sentence(rng).split(" ", 2)[2] if good else scrambled(rng))
        rows.append({"prompt": rng.choice(SUBJECTS), "completion": completion, "label": good})
    return Dataset.from_list(rows)


def memorise_dataset(n: int = 8, seed: int = 0, length: int = 40):
    """A handful of random character strings: a model memorises them quickly and generalises to
    nothing, so eval loss on another such set rises while train loss falls (overfitting)."""
    from datasets import Dataset

    rng = random.Random(seed)
    chars = "abcdefghijklmnopqrstuvwxyz "
    return Dataset.from_list([{"text": "".join(rng.choice(chars) for _ in range(length))} for _ in range(n)])


def constant_reward(completions, **kwargs) -> list[float]:
    """A reward that ignores the completion: every group has zero reward spread (reward collapse)."""
    return [1.0 for _ in completions]


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


TRAINER_KINDS = ("trainer", "sft", "dpo", "grpo", "kto", "rloo", "reward", "orpo", "cpo")


def tiny_lora_config(task_type: str = "CAUSAL_LM"):
    """A small LoRA adapter on the attention projections (peft)."""
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type=task_type)


def _reload_from_disk(model, path: str):
    """Save the tiny model to `path` and load it back, so `config._name_or_path` names a local
    directory (TRL's GRPO/RLOO create their reference model from that name)."""
    model.save_pretrained(path)
    return type(model).from_pretrained(path)


def build_trainer(kind: str = "sft", output_dir: str = "outputs/tiny", max_steps: int = 60, lr: float | None = None,
                  seed: int = 0, hidden: int = 64, layers: int = 2, callbacks: list | None = None,
                  *, lora: bool = False, train_dataset: Any = None, eval_dataset: Any = None,
                  reward_funcs: Any = None, **overrides: Any):
    """A ready tiny trainer of `kind` (one of `TRAINER_KINDS`); `overrides` go to its args.

    `lora=True` trains a LoRA adapter instead of the full model (TRL trainers get `peft_config`, the
    plain Trainer a `get_peft_model` model). `train_dataset`/`eval_dataset`/`reward_funcs` replace the
    defaults (the GRPO/RLOO reward is `letter_reward` by default).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if kind not in TRAINER_KINDS:
        raise ValueError(f"kind={kind!r} is not accepted: expected one of {', '.join(TRAINER_KINDS)}")
    tok = tiny_tokenizer()
    model = tiny_llama(tok, hidden=hidden, layers=layers, seed=seed) if kind != "reward" else None
    peft = {"peft_config": tiny_lora_config("SEQ_CLS" if kind == "reward" else "CAUSAL_LM")} if lora else {}
    common = dict(processing_class=tok, callbacks=callbacks, eval_dataset=eval_dataset, **peft)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**_common_args(output_dir, max_steps, lr or 3e-3, seed,
                                        {"per_device_train_batch_size": 8, "max_length": 64, **overrides}))
        return SFTTrainer(model=model, args=args, train_dataset=train_dataset or sft_dataset(seed=seed), **common)
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**_common_args(output_dir, max_steps, lr or 5e-4, seed,
                                        {"per_device_train_batch_size": 8, "max_length": 64, **overrides}))
        # with LoRA the reference is the base model with the adapter disabled
        ref = None if lora else tiny_llama(tok, hidden=hidden, layers=layers, seed=seed)
        return DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=train_dataset or dpo_dataset(seed=seed),
                          **common)
    if kind == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(**_common_args(output_dir, max_steps, lr or 5e-4, seed,
                                        {"per_device_train_batch_size": 8, "max_length": 64, **overrides}))
        ref = None if lora else tiny_llama(tok, hidden=hidden, layers=layers, seed=seed)
        return KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=train_dataset or kto_dataset(seed=seed),
                          **common)
    if kind in ("orpo", "cpo"):
        import warnings

        with warnings.catch_warnings():  # "experimental" warnings on import
            warnings.simplefilter("ignore")
            if kind == "orpo":
                from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Cls
            else:
                from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Cls
        args = Config(**_common_args(output_dir, max_steps, lr or 5e-4, seed,
                                     {"per_device_train_batch_size": 8, "max_length": 64, **overrides}))
        return Cls(model=model, args=args, train_dataset=train_dataset or dpo_dataset(seed=seed), **common)
    if kind == "reward":
        from transformers import LlamaConfig, LlamaForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(seed)
        rm = LlamaForSequenceClassification(cfg)
        args = RewardConfig(**_common_args(output_dir, max_steps, lr or 1e-3, seed,
                                           {"per_device_train_batch_size": 8, "max_length": 64, **overrides}))
        return RewardTrainer(model=rm, args=args, train_dataset=train_dataset or dpo_dataset(seed=seed), **common)
    if kind in ("grpo", "rloo"):
        if kind == "grpo":
            from trl import GRPOConfig as Config, GRPOTrainer as Cls
        else:
            from trl import RLOOConfig as Config, RLOOTrainer as Cls
        args = Config(**_common_args(output_dir, max_steps, lr or 1e-3, seed,
                                     {"per_device_train_batch_size": 4, "num_generations": 4,
                                      "max_completion_length": 8, **overrides}))
        if args.beta != 0.0 and not lora:
            # TRL builds the KL reference model from the policy's name: give it a local one
            model = _reload_from_disk(model, os.path.join(output_dir, "tiny-base"))
        return Cls(model=model, reward_funcs=reward_funcs or letter_reward, args=args,
                   train_dataset=train_dataset or grpo_dataset(seed=seed), **common)
    # kind == "trainer"
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    def tokenize(ds):
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"])

    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, peft.pop("peft_config"))
        common.pop("peft_config")
    if eval_dataset is not None:
        common["eval_dataset"] = tokenize(eval_dataset)
    args = TrainingArguments(**_common_args(output_dir, max_steps, lr or 3e-3, seed,
                                            {"per_device_train_batch_size": 8, **overrides}))
    return Trainer(model=model, args=args, train_dataset=tokenize(train_dataset or sft_dataset(seed=seed)),
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False), **common)


# --- batch-size-1 regressions (the shape of transformers' own Trainer test models) ----------------
class NoisyLine(torch.utils.data.Dataset):
    """y = 2x + 3 + noise: a healthy regression whose per-sample loss is heavy-tailed (chi-square)."""

    def __init__(self, n: int = 64, noise: float = 1.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, generator=g)
        self.y = 2 * self.x + 3 + noise * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


class SmallInitChain(nn.Module):
    """Four 1-wide linear layers (output x3 each) and a head, initialised the way a `PreTrainedModel`
    is by default (weights N(0, `init_std`), zero bias): the weights must grow ~50x before it fits.
    `init_std=None`: torch's default `nn.Linear` init, seeded with `seed`."""

    def __init__(self, seed: int, init_std: float | None = 0.02) -> None:
        super().__init__()
        if init_std is None:
            torch.manual_seed(seed)
        self.blocks = nn.ModuleList(nn.Linear(1, 1) for _ in range(4))
        self.head = nn.Linear(1, 1)
        if init_std is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for m in [*self.blocks, self.head]:
                    m.weight.normal_(0.0, init_std, generator=g)
                    m.bias.zero_()

    def forward(self, x, labels=None):
        for block in self.blocks:
            x = 3 * block(x)
        out = self.head(x)
        loss = nn.functional.mse_loss(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out}


def regression_trainer(output_dir: str, max_steps: int = -1, seed: int = 7, lr: float = 0.1, callbacks=None,
                       **overrides: Any):
    """A `Trainer` on `SmallInitChain(seed)` and `NoisyLine(noise=0.1, seed)`, batch size 1, lr 0.1,
    3 epochs (192 steps) unless `max_steps`: healthy, with small weights that must grow ~50x and a
    chi-square loss that scatters by ~2 in log from one step to the next."""
    from transformers import Trainer, TrainingArguments

    args = dict(per_device_train_batch_size=1, num_train_epochs=3, max_steps=max_steps, learning_rate=lr,
                save_strategy="no", report_to=[], disable_tqdm=True, seed=42, logging_steps=1000)
    args.update(overrides)
    return Trainer(SmallInitChain(seed=seed), TrainingArguments(output_dir, **args),
                   train_dataset=NoisyLine(noise=0.1, seed=seed), callbacks=callbacks or [])


def logged_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


def tail_loss(trainer, n: int = 10) -> float:
    losses = logged_losses(trainer)[-n:]
    return sum(losses) / len(losses) if losses else float("nan")


def weights_finite(model) -> bool:
    from .distributed import local_tensor

    return all(bool(torch.isfinite(local_tensor(p)).all()) for p in model.parameters())  # this rank's shards
