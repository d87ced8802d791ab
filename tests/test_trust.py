"""Trust: a user's bug surfaces exactly as without the plugin, one `train()` is one run, and the
three ways of attaching (wrapper, `.attach()`, `callbacks=[...]`) heal alike.

Each test runs the bare trainer too, so "the same exception" means the one transformers raises."""
import json
import logging
from pathlib import Path

import pytest
import torch

from self_healing import HealingConfig, SelfHealingCallback, SelfHealingTrainer
from self_healing.faults import Fault, inject_faults
from self_healing.tiny import build_trainer, sft_dataset, tiny_llama, tiny_tokenizer

CFG = HealingConfig(snapshot_every_steps=5)
MODES = ("wrapper", "attach", "callbacks")


def protect(mode: str, build, config: HealingConfig = CFG):
    """(trainer, the train() a user of that mode calls)."""
    if mode == "callbacks":
        tr = build(callbacks=[SelfHealingCallback(config)])
        return tr, tr.train
    tr = build()
    if mode == "attach":
        SelfHealingCallback(config).attach(tr)
        return tr, tr.train
    return tr, SelfHealingTrainer(tr, config).train


def raised(fn, *args, **kwargs) -> BaseException:
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    return info.value


def bare_then_protected(mode: str, build):
    """The bare trainer's exception, then (trainer, exception) of the same build protected in `mode`.
    `build(name, callbacks=None)`."""
    bare = raised(build("bare").train)
    tr, train = protect(mode, lambda callbacks=None: build(mode, callbacks))
    return bare, tr, raised(train)


def postmortem(tr) -> dict:
    return json.loads(Path(tr.args.output_dir, "postmortem.json").read_text())


def _plugins(tr) -> list:
    return [c for c in tr.callback_handler.callbacks if isinstance(c, SelfHealingCallback)]


# ---------------------------------------------------------------------------------------------
# a user's bug is not healed
# ---------------------------------------------------------------------------------------------
def _with_bad_metrics(tmp_path, name, callbacks=None):
    from datasets import Dataset

    def compute_metrics(pred):
        return {"accuracy": {}["accuracy"]}  # the user's KeyError

    tr = build_trainer("trainer", output_dir=str(tmp_path / name), max_steps=30, callbacks=callbacks,
                       eval_dataset=Dataset.from_dict({"text": [r["text"] for r in sft_dataset(n=8)]}),
                       eval_strategy="steps", eval_steps=10, per_device_eval_batch_size=8)
    tr.compute_metrics = compute_metrics
    return tr


@pytest.mark.parametrize("mode", MODES)
def test_a_keyerror_in_compute_metrics_is_raised_unchanged_not_skipped(mode, tmp_path):
    bare, tr, exc = bare_then_protected(mode, lambda name, callbacks=None: _with_bad_metrics(tmp_path, name, callbacks))
    assert type(exc) is type(bare) and str(exc) == str(bare)
    assert tr.state.global_step == 10  # stopped where the bare run stops: no retry, no skipped batch
    pm = postmortem(tr)
    assert pm["exit_reason"] == "exception" and pm["recovery_actions"] == [] and pm["skipped_batches"] == []
    assert pm["diagnosis"]["evidence"]["origin"] == "eval"


@pytest.mark.parametrize("resume", ["/wrong/path", True])
def test_a_bad_resume_path_is_the_trainers_error_not_a_fresh_start(resume, tmp_path):
    bare = raised(build_trainer("trainer", output_dir=str(tmp_path / "bare"), max_steps=5).train,
                  resume_from_checkpoint=resume)
    tr, train = protect("wrapper", lambda: build_trainer("trainer", output_dir=str(tmp_path / "sh"), max_steps=5))
    exc = raised(train, resume_from_checkpoint=resume)
    assert type(exc) is type(bare) is ValueError and str(exc) == str(bare).replace("/bare", "/sh")
    assert tr.state.global_step == 0 and postmortem(tr)["exit_reason"] == "exception"


def _no_loss(tmp_path, name, callbacks=None):
    tr = build_trainer("trainer", output_dir=str(tmp_path / name), max_steps=10, callbacks=callbacks)
    collate = tr.data_collator
    tr.data_collator = lambda features: {k: v for k, v in collate(features).items() if k != "labels"}
    return tr


def test_a_model_that_returns_no_loss_raises_the_trainers_valueerror(tmp_path):
    bare = raised(_no_loss(tmp_path, "bare").train)
    for mode in MODES:
        tr, train = protect(mode, lambda callbacks=None, m=mode: _no_loss(tmp_path, m, callbacks))
        exc = raised(train)
        assert type(exc) is type(bare) is ValueError and str(exc) == str(bare), mode
        pm = postmortem(tr)
        assert pm["counters"]["skipped_steps"] == 0 and pm["skipped_batches"] == [] and pm["exit_reason"] == "exception"


def test_max_grad_norm_none_is_not_retried(tmp_path):
    bare = raised(build_trainer("trainer", output_dir=str(tmp_path / "b"), max_steps=5, max_grad_norm=None).train)
    tr, train = protect("wrapper", lambda: build_trainer("trainer", output_dir=str(tmp_path / "s"), max_steps=5,
                                                         max_grad_norm=None))
    exc = raised(train)
    assert type(exc) is type(bare) and str(exc) == str(bare)
    assert postmortem(tr)["recovery_actions"] == []


def test_a_bug_in_a_grpo_reward_function_is_raised(tmp_path):
    def reward(completions, **kwargs):
        return [len(c) + "x" for c in completions]  # TypeError: the user's bug

    def build(name, callbacks=None):
        return build_trainer("grpo", output_dir=str(tmp_path / name), max_steps=4, reward_funcs=reward,
                             callbacks=callbacks)

    bare = raised(build("bare").train)
    tr, train = protect("wrapper", lambda: build("sh"))
    exc = raised(train)
    assert type(exc) is type(bare) is TypeError and str(exc) == str(bare)
    pm = postmortem(tr)
    assert pm["exit_reason"] == "exception" and pm["counters"]["skipped_steps"] == 0


def _eval_collator_breaks(tmp_path, name, callbacks=None):
    from datasets import Dataset

    tr = build_trainer("trainer", output_dir=str(tmp_path / name), max_steps=12, callbacks=callbacks,
                       eval_dataset=Dataset.from_dict({"text": [r["text"] for r in sft_dataset(n=8)]}),
                       eval_strategy="steps", eval_steps=6)
    collate = tr.data_collator

    def collator(features):
        if not tr.model.training:  # only evaluation batches
            raise KeyError("label_ids")
        return collate(features)

    tr.data_collator = collator
    return tr


@pytest.mark.parametrize("mode", MODES)
def test_a_collator_error_in_evaluation_surfaces_as_the_users_error(mode, tmp_path):
    bare, tr, exc = bare_then_protected(
        mode, lambda name, callbacks=None: _eval_collator_breaks(tmp_path, name, callbacks))
    assert type(exc) is type(bare) is KeyError and str(exc) == str(bare)
    assert tr.state.global_step == 6


def test_a_streamed_datasets_collator_error_is_raised_not_restarted(tmp_path):
    rows = [dict(r) for r in build_trainer("trainer", output_dir=str(tmp_path / "x"), max_steps=1).train_dataset]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from rows

    def build(name):
        tr = build_trainer("trainer", output_dir=str(tmp_path / name), max_steps=8)
        collate, seen = tr.data_collator, {"n": 0}

        def collator(features):
            seen["n"] += 1
            if seen["n"] == 3:
                raise KeyError("input_ids")
            return collate(features)

        tr.train_dataset, tr.data_collator = Stream(), collator
        return tr

    bare = raised(build("bare").train)
    tr, train = protect("wrapper", lambda: build("sh"))
    exc = raised(train)
    assert type(exc) is type(bare) is KeyError and str(exc) == str(bare)
    pm = postmortem(tr)
    assert pm["exit_reason"] == "exception" and "stream" in pm["diagnosis"]["summary"]


# ---------------------------------------------------------------------------------------------
# every way of attaching heals the same
# ---------------------------------------------------------------------------------------------
def _faulty(tmp_path, name, callbacks=None):
    tr = build_trainer("trainer", output_dir=str(tmp_path / name), max_steps=20, callbacks=callbacks)
    oom = Fault("exception", step=12, duration=10**6, when=lambda t, inputs: len(inputs["input_ids"]) > 4,
                exception=lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    inject_faults(tr, Fault("nan_loss", step=6), oom)
    return tr


def test_callbacks_list_attach_and_wrapper_heal_alike(tmp_path):
    runs = {}
    for mode in MODES:
        tr, train = protect(mode, lambda callbacks=None, m=mode: _faulty(tmp_path, m, callbacks))
        train()
        pm = postmortem(tr)
        assert pm["exit_reason"] == "completed" and tr.state.global_step == 20, mode
        assert len(_plugins(tr)) == 1
        runs[mode] = ([(e["step"], e["failure"], e["actions"]) for e in pm["recovery_actions"]],
                      {k: v.clone() for k, v in tr.model.state_dict().items()})
    events, weights = runs["wrapper"]
    assert [e[1] for e in events] == ["nan_loss", "oom"]
    for mode in ("attach", "callbacks"):
        assert runs[mode][0] == events, mode
        assert all(torch.equal(weights[k], runs[mode][1][k]) for k in weights), mode


def test_a_callback_class_in_the_list_works_too(tmp_path):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "t"), max_steps=8, callbacks=[SelfHealingCallback])
    inject_faults(tr, Fault("nan_loss", step=4))
    tr.train()
    pm = postmortem(tr)
    assert pm["exit_reason"] == "completed" and [e["failure"] for e in pm["recovery_actions"]] == ["nan_loss"]


def test_wrapping_the_same_trainer_twice_keeps_one_plugin(tmp_path, caplog):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "t"), max_steps=10)
    inject_faults(tr, Fault("nan_loss", step=4))
    first = SelfHealingTrainer(tr, CFG)
    second = SelfHealingTrainer(tr, CFG)  # the notebook cell run again
    assert _plugins(tr) == [second.callback]
    with caplog.at_level(logging.WARNING, logger="self_healing"):
        second.train()
    pm = postmortem(tr)
    assert [e["failure"] for e in pm["recovery_actions"]] == ["nan_loss"] and pm["counters"]["nan_count"] == 1
    assert not any("killed" in r.getMessage() for r in caplog.records)
    assert sum("nan_loss" in r.getMessage() or "loss is nan" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="replaced"):
        first.train()
    # and .attach() on a wrapped trainer replaces the wrapper's plugin the same way
    cb = SelfHealingCallback(CFG).attach(tr)
    assert _plugins(tr) == [cb]


def test_a_step_whose_forward_raised_is_not_logged_as_loss_zero(tmp_path):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "t"), max_steps=10)
    inject_faults(tr, Fault("exception", step=5, times=1, exception=lambda: IndexError("index out of range in self")))
    sh = SelfHealingTrainer(tr, CFG)
    sh.train()
    pm = postmortem(tr)
    assert [b["step"] for b in pm["skipped_batches"]] == [5]
    logged = [h for h in tr.state.log_history if h.get("step") == 5 and "train_loss" not in h]
    assert logged and "loss" not in logged[0] and "grad_norm" not in logged[0]
    curve = {row[0]: row for row in pm["curve"]} if isinstance(pm.get("curve"), list) else {}
    if 5 in curve:
        assert curve[5][1] is None
    assert all(h["loss"] > 0.5 for h in tr.state.log_history if "loss" in h)


# ---------------------------------------------------------------------------------------------
# one train() is one run
# ---------------------------------------------------------------------------------------------
def _model_init_trainer(tmp_path, max_steps=12):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = tiny_tokenizer()
    ds = sft_dataset(n=256).map(lambda b: tok(b["text"], truncation=True, max_length=64), batched=True,
                                remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path / "mi"), max_steps=max_steps, learning_rate=3e-3, logging_steps=1,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                             per_device_train_batch_size=8, dataloader_num_workers=0)
    return Trainer(model_init=lambda: tiny_llama(tok, seed=0), args=args, train_dataset=ds,
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False))


def _losses(tr, since=0):
    return [h["loss"] for h in tr.state.log_history[since:] if "loss" in h and "train_loss" not in h]


def test_model_init_trained_twice_gives_the_same_run_twice(tmp_path):
    """With `model_init`, a second train() starts over: bare it repeats the first run exactly;
    with the plugin (ZClip statistics included) it must too."""
    tr = _model_init_trainer(tmp_path)
    sh = SelfHealingTrainer(tr, HealingConfig.aggressive().replace(snapshot_every_steps=5, zclip_warmup_steps=4))
    sh.train()
    first, n = _losses(tr), len(tr.state.log_history)
    sh.train()
    assert _losses(tr) == first  # log_history is reset by train()
    assert n == len(tr.state.log_history)


def test_a_second_train_starts_a_fresh_run_and_postmortem(tmp_path):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "t"), max_steps=20)
    inject_faults(tr, Fault("nan_weight", step=15, times=1))
    sh = SelfHealingTrainer(tr, CFG)
    sh.train()
    assert [e["failure"] for e in postmortem(tr)["recovery_actions"]] == ["weight_corruption"]
    inject_faults(tr, Fault("nan_weight", step=8, times=1))
    sh.train()  # train on from these weights: a new train() call (no resume), steps 1..20 again
    pm = postmortem(tr)
    events = pm["recovery_actions"]
    assert [(e["step"], e["failure"]) for e in events] == [(8, "weight_corruption")]  # run 1's event not repeated
    # rolled back to this run's snapshot (not run 1's step-15/20 state), and a one-off fault: no LR cut
    assert events[0]["details"]["rolled_back_to_step"] <= 7 and events[0]["details"]["steps_lost"] >= 1
    assert "reduce_lr" not in events[0]["actions"] and pm["lr_scale"] == 1.0
    assert tr.state.global_step == 20


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_the_callbacks_list_works_on_trl_trainers(kind, tmp_path):
    tr = build_trainer(kind, output_dir=str(tmp_path / kind), max_steps=8, callbacks=[SelfHealingCallback(CFG)])
    inject_faults(tr, Fault("nan_grad", step=4))
    tr.train()
    pm = postmortem(tr)
    assert pm["exit_reason"] == "completed" and tr.state.global_step == 8
    assert [e["failure"] for e in pm["recovery_actions"]] == ["nonfinite_gradient"] and len(_plugins(tr)) == 1


def test_a_collator_that_always_fails_gives_up_with_the_reason(tmp_path):
    tr = build_trainer("trainer", output_dir=str(tmp_path / "t"), max_steps=10)
    tr.data_collator = lambda features: {}["input_ids"]  # every batch: KeyError
    sh = SelfHealingTrainer(tr, CFG.replace(max_skipped_batches=1))
    sh.train()
    pm = postmortem(tr)
    assert pm["exit_reason"] == "gave_up" and "max_skipped_batches=1" in pm["give_up_reason"]
    assert tr.state.global_step == 0 and len(pm["skipped_batches"]) >= 2


def test_calling_the_wrapped_trainers_own_train_twice_is_two_runs(tmp_path):
    """`sh = SelfHealingTrainer(tr)` then `tr.train()` (not `sh.train()`): still one run per call."""
    tr = build_trainer("trainer", output_dir=str(tmp_path / "t"), max_steps=8)
    inject_faults(tr, Fault("nan_loss", step=3, times=1))
    SelfHealingTrainer(tr, CFG)
    tr.train()
    assert [e["failure"] for e in postmortem(tr)["recovery_actions"]] == ["nan_loss"]
    tr.train()
    pm = postmortem(tr)
    assert pm["exit_reason"] == "completed" and pm["recovery_actions"] == [] and pm["counters"]["nan_count"] == 0


def test_a_monitors_info_notes_reach_the_postmortem(tmp_path):
    """A GRPO task solved is an INFO note, not a failure: it must still be on record."""
    tr = build_trainer("trainer", output_dir=str(tmp_path / "t"), max_steps=3)
    sh = SelfHealingTrainer(tr, CFG)
    sh.train()

    class Solved:
        notes = [{"step": 2, "summary": "the task is solved or too easy: no learning signal left"}]

    sh.callback.monitors.append(Solved())
    pm = sh.callback.finish("completed")
    assert pm["notes"] == Solved.notes and postmortem(tr)["notes"] == Solved.notes
