"""The private internals of `self_healing.compat`: a guard per internal on the installed versions
(it exists, with the signature and behaviour the plugin relies on; an upgrade that moves it fails
here, loudly), and a test per fallback, forced on the installed version by hiding the internal
from the trainer, showing the feature still works. `.ci/versions` runs this file on the oldest and
newest supported releases, where some fallbacks are the real path."""
import contextlib
import inspect
import logging
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import Trainer

from helpers import read_postmortem
from self_healing import HealingConfig, SelfHealingCallback, SelfHealingTrainer, compat
from self_healing.checkpoints import latest_verified_checkpoint, verify_checkpoint, write_resume_checkpoint
from self_healing.faults import Fault, inject_faults
from self_healing.tiny import build_trainer, weights_finite

# the per-step loop: its own method since 5.3 (`_run_epoch`), inside `_inner_training_loop` before
LOOP = inspect.getsource(getattr(Trainer, "_run_epoch", Trainer._inner_training_loop))
HAS_NORM_HOOKS = hasattr(Trainer, "_get_grad_norm")


@contextlib.contextmanager
def hidden(trainer, *names):
    """`trainer` as a release without `names`: `hasattr` is False for them while this lasts (a
    property raising AttributeError shadows the method or the instance attribute)."""
    cls = type(trainer)

    def gone(name):
        def get(self):
            raise AttributeError(name)

        return property(get)

    trainer.__class__ = type(cls.__name__, (cls,), {n: gone(n) for n in names})
    try:
        yield trainer
    finally:
        trainer.__class__ = cls


def tiny(tmp_path, name="t", steps=2, **kw):
    return build_trainer("sft", output_dir=str(tmp_path / name), max_steps=steps, **kw)


# ---------------------------------------------------------------------------------------------
# guards: the internal is there and does what compat relies on
# ---------------------------------------------------------------------------------------------
def test_every_listed_trainer_internal_goes_through_compat():
    """A private name listed in compat.INTERNALS used anywhere else in the package bypasses the
    version handling (and its fallback)."""
    names = ["_get_grad_norm", "_clip_grad_norm", "_get_num_items_in_batch", "_save_optimizer_and_scheduler",
             "_save_scaler", "_save_rng_state", "_tr_loss", "_train_batch_size", "_created_lr_scheduler",
             "_buffered_inputs", "_last_lr", "_next_step", "safe_globals", "_run_ddp_forward", "_save_checkpoint",
             "_load_best_model", "_inner_training_loop", "_load_optimizer_and_scheduler",
             "_generate_and_score_completions", "_dump_fr_trace_json", "_dump_fr_trace", "_dump_nccl_trace",
             "_foreach_norm", "_foreach_copy_", "_foreach_add_", "_foreach_mul_", "_foreach_addcmul_"]
    pkg = Path(compat.__file__).parent
    offenders = []
    for f in sorted(pkg.glob("*.py")):
        if f.name == "compat.py":
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            for n in names:
                if re.search(rf"[.\"']{n}\b", line):
                    offenders.append(f"{f.name}:{i}: {n}")
    assert not offenders, offenders
    assert all(row.checked and row.when_absent for row in compat.INTERNALS.values())


def test_guard_training_step_signature():
    params = list(inspect.signature(Trainer.training_step).parameters)
    assert params[:4] == ["self", "model", "inputs", "num_items_in_batch"]


def test_guard_grad_norm_path_is_the_one_compat_takes():
    """5.3+: the loop calls `_clip_grad_norm(model)` then `_get_grad_norm(model, grad_norm=...)`;
    before: `accelerator.clip_grad_norm_(...)` straight from the loop (the fallback wraps it)."""
    if HAS_NORM_HOOKS:
        assert "self._clip_grad_norm(model)" in LOOP and "self._get_grad_norm(model, grad_norm=" in LOOP
        assert list(inspect.signature(Trainer._get_grad_norm).parameters)[:3] == ["self", "model", "grad_norm"]
        assert list(inspect.signature(Trainer._clip_grad_norm).parameters) == ["self", "model"]
    else:
        assert not hasattr(Trainer, "_clip_grad_norm")
        assert "self.accelerator.clip_grad_norm_(" in LOOP
    assert "on_pre_optimizer_step" in LOOP
    # the callback's decision must come after the clipping call and before optimizer.step()
    clip = LOOP.index("_clip_grad_norm(" if HAS_NORM_HOOKS else "self.accelerator.clip_grad_norm_(")
    assert clip < LOOP.index("on_pre_optimizer_step") < LOOP.index("self.optimizer.step(")


def test_guard_get_batch_samples_and_item_count():
    assert list(inspect.signature(Trainer.get_batch_samples).parameters) == [
        "self", "epoch_iterator", "num_batches", "device"]
    assert list(inspect.signature(Trainer._get_num_items_in_batch).parameters) == ["self", "batch_samples", "device"]
    assert "self.get_batch_samples(epoch_iterator, num_batches" in LOOP


def test_guard_phase_wraps_exist():
    assert list(inspect.signature(Trainer._save_checkpoint).parameters)[:3] == ["self", "model", "trial"]
    assert callable(Trainer._load_best_model) and callable(Trainer._inner_training_loop)
    assert "self._save_checkpoint(" in inspect.getsource(Trainer)


def test_guard_watchdog_internals():
    """The watchdog wraps `_load_optimizer_and_scheduler(checkpoint)` for fast-state resumes, and finds
    the training thread by `train` -> `_inner_training_loop` frames from transformers' files."""
    assert list(inspect.signature(Trainer._load_optimizer_and_scheduler).parameters)[:2] == ["self", "checkpoint"]
    assert "self._load_optimizer_and_scheduler(" in LOOP or "_load_optimizer_and_scheduler(" in inspect.getsource(Trainer)
    assert compat.TRAINER_INNER_LOOP in inspect.getsource(Trainer.train)
    assert all(callable(getattr(Trainer, n)) for n in (compat.TRAINER_SAVE_CHECKPOINT, compat.TRAINER_LOAD_BEST_MODEL,
                                                        compat.TRAINER_INNER_LOOP, compat.TRAINER_LOAD_OPTIMIZER))


@pytest.mark.parametrize("fused", [True, False])
def test_foreach_ops_and_their_fallback_agree(fused, monkeypatch):
    """The fused multi-tensor ops and the one-op-per-tensor fallback give the same numbers."""
    monkeypatch.setattr(compat, "_FOREACH", fused)
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    b = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    want = [x * 2 + 0.5 * y + 0.25 * y * y for x, y in zip(a, b)]
    out = [torch.empty_like(x) for x in a]
    compat.foreach_copy_(out, a)
    compat.foreach_mul_(out, 2.0)
    compat.foreach_add_(out, b, alpha=0.5)
    compat.foreach_addcmul_(out, b, b, value=0.25)
    assert all(torch.allclose(o, w) for o, w in zip(out, want))
    assert [float(n) for n in compat.foreach_norm(out)] == pytest.approx([float(w.norm()) for w in want])


def test_guard_flight_recorder(monkeypatch):
    """No process group: nothing to dump. A gloo group: torch 2.13 dumps its collectives as JSON."""
    import torch.distributed as dist

    assert compat.flight_recorder() is None
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # no port to collide on
    try:
        kind, data = compat.flight_recorder()
        assert kind in ("json", "pickle") and isinstance(data, bytes) and data
    finally:
        dist.destroy_process_group()


def test_guard_save_internals_write_a_state_the_trainer_can_resume(tmp_path):
    tr = tiny(tmp_path)
    tr.train()
    out = tmp_path / "state"
    out.mkdir()
    compat.save_training_state(tr, str(out))
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {p.name for p in out.iterdir()}
    with compat.numpy_safe_globals():  # how the Trainer loads it on resume
        rng = torch.load(out / "rng_state.pth", weights_only=True)
    assert {"python", "numpy", "cpu"} <= set(rng)


def test_guard_train_batch_size_drives_the_training_dataloader(tmp_path):
    tr = tiny(tmp_path)
    assert compat.train_batch_size(tr) == tr.args.train_batch_size == 8
    compat.set_train_batch_size(tr, 2)
    assert "self._train_batch_size" in inspect.getsource(Trainer.train)  # train() hands it to the loop
    assert next(iter(tr.get_train_dataloader()))["input_ids"].shape[0] == 2


def test_guard_created_lr_scheduler_flag(tmp_path):
    tr = tiny(tmp_path)
    assert compat.created_lr_scheduler(tr) is False
    tr.create_optimizer_and_scheduler(num_training_steps=2)
    assert compat.created_lr_scheduler(tr) is True


def test_guard_running_loss(tmp_path):
    """5.3+ keeps the running loss on the trainer (compat repairs a NaN there); older loops keep a
    local `tr_loss` (compat warns instead)."""
    tr = tiny(tmp_path)
    tr.train()
    if isinstance(getattr(tr, "_tr_loss", None), torch.Tensor):
        tr._tr_loss.fill_(float("nan"))
        compat.repair_running_loss(tr)
        assert float(tr._tr_loss) == 0.0
    else:
        assert re.search(r"\btr_loss = ", LOOP)


def test_guard_grpo_generation_buffers(tmp_path):
    tr = build_trainer("grpo", output_dir=str(tmp_path / "g"), max_steps=1)
    assert hasattr(tr, "_buffered_inputs") and isinstance(tr._step, int)
    assert isinstance(tr._metrics, dict) and callable(tr._generate_and_score_completions)
    tr._step = 3
    compat.reset_generation_buffers(tr)
    assert tr._buffered_inputs is None and tr._step == 0


def test_guard_scheduler_last_lr_is_what_get_last_lr_reports():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    compat.scale_last_lr(sched, 0.5)
    assert sched.get_last_lr() == [0.5]
    compat.scale_last_lr(sched, lrs=[0.25])
    assert sched.get_last_lr() == [0.25]


def test_guard_trackio_run_numbers_rows_from_next_step():
    import trackio.run

    init, log = inspect.getsource(trackio.run.Run.__init__), inspect.getsource(trackio.run.Run.log)
    assert "self._next_step =" in init and "self._next_step" in log


def test_guard_ddp_forward_frame_and_param_sync_flag():
    """A rank re-running a step that failed inside DDP's forward recognises that frame by name and
    turns off the buffer broadcast through `require_forward_param_sync` (compat)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    assert callable(ddp._run_ddp_forward) and "require_forward_param_sync" in inspect.getsource(ddp)
    assert ddp._run_ddp_forward.__code__.co_filename.replace("\\", "/").endswith("torch/nn/parallel/distributed.py")


def test_guard_foreach_mul():
    ts = [torch.ones(2), torch.ones(3)]
    compat.foreach_mul_(ts, 3.0)
    assert all(torch.equal(t, torch.full_like(t, 3.0)) for t in ts)


# ---------------------------------------------------------------------------------------------
# fallbacks, forced on the installed version
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_fallback_grad_norm_still_detects_an_explosion(tmp_path, max_grad_norm):
    """Without `_get_grad_norm` (transformers < 5.3) the norm comes from the wrapped
    `accelerator.clip_grad_norm_`, or the plugin's own measurement when the loop clips nothing:
    the explosion is still caught (before: 'nothing to heal'), and the norms are the Trainer's."""
    tr = tiny(tmp_path, steps=16, max_grad_norm=max_grad_norm)
    inject_faults(tr, Fault("grad_scale", step=12))
    with hidden(tr, "_get_grad_norm", "_clip_grad_norm"):
        sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5))
    assert sh.callback.patches.grad_norm_fallback
    seen, at_step = [], []
    sh.callback.observers.append(type("Obs", (), {"on_step": lambda self, step, s, info: seen.append(s)})())
    tr.create_optimizer()
    tr.optimizer.register_step_pre_hook(lambda opt, *_: at_step.append(float(torch.nn.utils.get_total_norm(
        [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]))))
    sh.train()
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "completed" and weights_finite(tr.model)
    assert [a["failure"] for a in pm["recovery_actions"]] == ["gradient_explosion"]
    assert pm["recovery_actions"][0]["step"] == 12
    norms = [s.grad_norm for s in seen if s.step != 12]
    if max_grad_norm:  # the Trainer's own pre-clip norms
        truth = [h["grad_norm"] for h in tr.state.log_history if "grad_norm" in h and h["step"] != 12]
    else:  # nothing clips: the norm the optimizer sees (older loops log no grad_norm then)
        truth = [n for i, n in enumerate(at_step) if i != 11]
    assert len(norms) == 15 and norms == pytest.approx(truth, rel=1e-5)


def test_fallback_zclip_still_clips(tmp_path):
    """Without `_clip_grad_norm` (before: AttributeError at attach) the Trainer's fixed clip is
    turned into a measurement and ZClip's decision is what reaches the optimizer."""
    tr = tiny(tmp_path, steps=12, max_grad_norm=1.0)
    with hidden(tr, "_get_grad_norm", "_clip_grad_norm"):
        cb = SelfHealingCallback(HealingConfig(zclip_enabled=True, zclip_warmup_steps=5,
                                               snapshot_every_steps=5)).attach(tr)
    seen, at_step = [], []
    cb.observers.append(type("Obs", (), {"on_step": lambda self, step, s, info: seen.append(info["zclip"])})())
    tr.create_optimizer()
    tr.optimizer.register_step_pre_hook(lambda opt, *_: at_step.append(float(torch.nn.utils.get_total_norm(
        [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]))))
    tr.train()
    logged = [h["grad_norm"] for h in tr.state.log_history if "grad_norm" in h]
    assert [d.raw_norm for d in seen] == pytest.approx(logged, rel=1e-5) and len(seen) == 12
    assert [d.clipped_norm for d in seen] == pytest.approx(at_step, rel=1e-4)
    assert all(a <= 1.0 + 1e-4 for a in at_step[:5])  # warm-up: the Trainer's max_grad_norm
    late = [a for d, a in zip(seen[5:], at_step[5:]) if not d.clipped]
    assert late and all(a > 1.0 for a in late), "the Trainer's fixed clip must not act after warm-up"
    cb.detach()
    assert "clip_grad_norm_" not in tr.accelerator.__dict__


def test_fallback_safe_globals_our_checkpoint_still_verifies_and_resumes(tmp_path, monkeypatch):
    """Without `trainer_pt_utils.safe_globals` (transformers < 5.2) the RNG file is still loaded
    with the Trainer's numpy allowlist (before: every checkpoint refused), and a run resumes."""
    import transformers.trainer_pt_utils as tpu

    tr = tiny(tmp_path, "run", steps=4)
    tr.train()
    path = write_resume_checkpoint(tr, 4)
    monkeypatch.delattr(tpu, "safe_globals", raising=False)
    assert verify_checkpoint(path) == (True, "ok")
    assert latest_verified_checkpoint(tr.args.output_dir)[0] == path
    tr2 = tiny(tmp_path, "run", steps=6)
    tr2.train(resume_from_checkpoint=str(path))
    assert tr2.state.global_step == 6


def test_fallback_item_count_is_the_trainers(tmp_path):
    """Without `_get_num_items_in_batch`, the count comes from the Trainer's own get_batch_samples
    over the batches already fetched (bad ones skipped): the same number."""
    tr = tiny(tmp_path)
    batches = [b for _, b in zip(range(2), tr.get_train_dataloader())]
    want = tr._get_num_items_in_batch(batches, tr.args.device)

    class OldTrainer:  # a release without the internal; its get_batch_samples is the real one below
        args = tr.args

    got = compat.num_items_in_batch(OldTrainer(), tr.get_batch_samples, batches, tr.args.device)
    assert want is not None and int(got) == int(want) > 0


def test_fallback_running_loss_warns_once(tmp_path, caplog):
    tr = tiny(tmp_path, logging_nan_inf_filter=False)
    compat._warned.discard("_tr_loss")
    with hidden(tr, "_tr_loss"), caplog.at_level(logging.WARNING, logger="self_healing"):
        compat.repair_running_loss(tr)
        compat.repair_running_loss(tr)
    msgs = [r.getMessage() for r in caplog.records if "_tr_loss" in r.getMessage()]
    assert len(msgs) == 1 and transformers.__version__ in msgs[0] and "logging_nan_inf_filter=True" in msgs[0]


def test_fallback_trackio_foreach_and_last_lr(monkeypatch, caplog):
    class Run:
        _next_step = 3

    run = Run()
    assert compat.set_trackio_next_step(run, 10) and run._next_step == 10
    compat._warned.discard("trackio._next_step")
    with caplog.at_level(logging.WARNING, logger="self_healing"):
        assert compat.set_trackio_next_step(object(), 10) is False
    assert any("_next_step" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(compat, "_FOREACH", False)  # a torch without the fused ops (decided at import)
    ts = [torch.ones(2)]
    compat.foreach_mul_(ts, 2.0)
    assert torch.equal(ts[0], torch.full((2,), 2.0))
    sched = type("S", (), {})()
    compat.scale_last_lr(sched, 0.5)  # no _last_lr: nothing to update, no error
    assert not hasattr(sched, "_last_lr")


@pytest.mark.parametrize("name", ["_save_rng_state", "_train_batch_size", "get_batch_samples"])
def test_missing_required_internal_is_a_clear_error_at_attach(tmp_path, name):
    tr = tiny(tmp_path)
    with hidden(tr, name), pytest.raises(compat.UnsupportedVersion, match=re.escape(name)) as e:
        SelfHealingCallback(HealingConfig()).attach(tr)
    assert compat.SUPPORTED in str(e.value) and transformers.__version__ in str(e.value)
    assert "training_step" not in tr.__dict__ and not any(isinstance(c, SelfHealingCallback)
                                                          for c in tr.callback_handler.callbacks)


def test_missing_save_checkpoint_is_warned_at_attach(tmp_path, caplog):
    tr = tiny(tmp_path)
    compat._warned.discard("_save_checkpoint")
    with hidden(tr, "_save_checkpoint"), caplog.at_level(logging.WARNING, logger="self_healing"):
        cb = SelfHealingCallback(HealingConfig()).attach(tr)
    assert any("Trainer._save_checkpoint is missing" in r.getMessage() for r in caplog.records)
    assert not cb.is_wrapped("_save_checkpoint")
    cb.detach()


def test_on_this_version_the_fallback_is_used_exactly_when_the_hooks_are_missing(tmp_path):
    """transformers 5.3+: no accelerator wrapper (healthy runs stay bit-identical to the bare
    trainer); older: the wrapper is installed."""
    tr = tiny(tmp_path)
    cb = SelfHealingCallback(HealingConfig(zclip_enabled=True)).attach(tr)
    assert cb.patches.grad_norm_fallback is (not HAS_NORM_HOOKS)
    assert ("clip_grad_norm_" in tr.accelerator.__dict__) is (not HAS_NORM_HOOKS)
    assert cb.is_wrapped("_get_grad_norm") is HAS_NORM_HOOKS
    cb.detach()
    assert "clip_grad_norm_" not in tr.accelerator.__dict__ and "_get_grad_norm" not in tr.__dict__
