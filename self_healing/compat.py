"""Every private transformers / TRL / accelerate / trackio / torch internal the plugin uses, in one place.

The plugin has to reach inside the Trainer: callbacks get neither the loss nor the grad norm, and
nothing public skips a step or writes a resume checkpoint. Private names move between releases, and
a `hasattr` that quietly turns a feature off is how a plugin stops healing without anyone noticing
(measured: on transformers 5.0 a gradient explosion went undetected because `_get_grad_norm` did
not exist yet). So each internal goes through one function here, listed in `INTERNALS` with the
versions it was checked against and what happens when it is absent: a fallback that keeps the
feature, or `UnsupportedVersion` at attach naming it and the supported versions. Never silence.

`tests/test_compat_internals.py` guards every row on the installed versions and forces every
fallback; `.ci/versions` runs those tests and a representative subset on the oldest and newest
releases of the supported range.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, NamedTuple

import torch

logger = logging.getLogger("self_healing")

SUPPORTED = "transformers 4.57.6-5.x (<6), TRL 0.29.1-1.x (<2), accelerate 1.4+"
"""What `.ci/versions` tests (the oldest and the newest release of each range) and pyproject declares."""

CHECKED = {"oldest": "transformers 4.57.6 + TRL 0.29.1 + accelerate 1.4.0 (huggingface_hub 0.36)",
           "oldest5": "transformers 5.0.0 + TRL 1.0.0 + accelerate 1.4.0",
           "newest": "transformers 5.24.0 + TRL 1.16.0 + accelerate 1.16.0"}
"""The version sets (the `.ci/versions` sessions) each row's `checked` column refers to (torch 2.13,
numpy 2.4; trackio 0.43, or 0.20 with huggingface_hub < 1)."""


class Internal(NamedTuple):
    used_for: str
    checked: str
    when_absent: str


INTERNALS: dict[str, Internal] = {
    "Trainer.training_step": Internal(
        "wrapped: the step's loss tensor; a healable forward/backward exception becomes a skipped step",
        "oldest, oldest5, newest", "required: UnsupportedVersion at attach"),
    "Trainer._get_grad_norm": Internal(
        "wrapped: keeps the pre-clip norm the Trainer computes anyway",
        "newest (added in 5.3; absent in oldest, oldest5)",
        "fallback: wrap accelerator.clip_grad_norm_ (the old loop calls it directly), else measure the norm "
        "in on_pre_optimizer_step"),
    "Trainer._clip_grad_norm": Internal(
        "wrapped with ZClip on: measure without clipping, ZClip clips", "newest (added in 5.3)",
        "fallback: the accelerator.clip_grad_norm_ wrapper measures without clipping"),
    "Accelerator.clip_grad_norm_": Internal(
        "public; wrapped only by the two fallbacks above", "oldest, oldest5, newest", "required by the fallbacks"),
    "Trainer.get_batch_samples": Internal(
        "wrapped: a batch whose collation failed is recorded and the next one taken", "oldest, oldest5, newest",
        "required: UnsupportedVersion at attach (the guarded collator's skipped batches need it)"),
    "Trainer._get_num_items_in_batch": Internal(
        "the loss normaliser of the batches get_batch_samples returns", "oldest, oldest5, newest",
        "fallback: the Trainer's own get_batch_samples over the batches already fetched"),
    "Trainer._save_checkpoint": Internal(
        "wrapped: errors while saving are tagged 'save'; the watchdog's save phase", "oldest, oldest5, newest",
        "warning at attach: save errors count as the step's, no save phase for the hang watchdog"),
    "Trainer._load_best_model": Internal("watchdog: save phase", "oldest, oldest5, newest", "warning at attach"),
    "Trainer._inner_training_loop": Internal("watchdog: startup/finishing phases", "oldest, oldest5, newest",
                                             "warning at attach"),
    "Trainer._load_optimizer_and_scheduler": Internal(
        "wrapped: a resume from the plugin's fast state (weights and schedule, no optimizer) loads what is there",
        "oldest, oldest5, newest", "optional: without it a fast-state resume is not offered (full checkpoints only)"),
    "Trainer.train/_inner_training_loop frames": Internal(
        "hang report: a thread whose stack holds these frames (from transformers, TRL or the plugin) is the "
        "training thread", "oldest, oldest5, newest",
        "fallback: the main thread's stack is reported"),
    "torch._C._distributed_c10d._dump_fr_trace_json/_dump_fr_trace/_dump_nccl_trace": Internal(
        "hang report: the flight recorder's last collectives of every process group", "torch 2.13",
        "fallback: the hang report has no flight-recorder section"),
    "Trainer._tr_loss": Internal(
        "a NaN is zeroed out of the running loss (logging_nan_inf_filter=False)", "newest (a local tr_loss in "
        "oldest, oldest5)", "warning once: the Trainer's logged loss reads NaN after a skipped NaN step"),
    "Trainer._train_batch_size": Internal(
        "OOM: the halved batch the relaunched loop uses", "oldest, oldest5, newest", "required: UnsupportedVersion"),
    "Trainer._created_lr_scheduler": Internal(
        "in-memory retry: the scheduler flag restored", "oldest, oldest5, newest", "required: UnsupportedVersion"),
    "Trainer._save_optimizer_and_scheduler": Internal(
        "the plugin's own resume checkpoint (preemption)", "oldest, oldest5, newest", "required: UnsupportedVersion"),
    "Trainer._save_scaler": Internal("same", "oldest, oldest5, newest", "required: UnsupportedVersion"),
    "Trainer._save_rng_state": Internal("same", "oldest, oldest5, newest", "required: UnsupportedVersion"),
    "transformers.trainer_pt_utils.safe_globals": Internal(
        "verify rng_state.pth the way the Trainer loads it (weights_only, numpy allowlisted)",
        "newest (5.2+; transformers.trainer.safe_globals in oldest, oldest5)",
        "fallback: torch.serialization.safe_globals with the same numpy allowlist"),
    "TRL GRPO/RLOO _buffered_inputs, _step": Internal(
        "a resume regenerates the buffered generation batch", "oldest, oldest5, newest", "optional per trainer"),
    "TRL _metrics": Internal("in-memory retry restores the metric buffers", "oldest, oldest5, newest",
                             "optional per trainer"),
    "TRL _generate_and_score_completions/_generate": Internal("watchdog: generation phase", "oldest, oldest5, newest",
                                                               "optional per trainer"),
    "torch LRScheduler._last_lr": Internal(
        "an LR cut shows in get_last_lr() (what the Trainer logs)", "torch 2.13", "fallback: nothing to update"),
    "trackio Run._next_step": Internal(
        "the Trainer's trackio rows land on global_step after a rollback", "trackio 0.43",
        "warning once: the dashboard's step axis is not realigned"),
    "torch DistributedDataParallel._run_ddp_forward, .require_forward_param_sync": Internal(
        "a rank re-running a step that failed inside DDP's forward skips the buffer broadcast it already issued",
        "torch 2.13", "unguarded (DDP only, a rank whose step failed): the re-run broadcasts again and the ranks end at "
        "the collective timeout (auto-resume takes over)"),
    "torch._foreach_mul_/_norm/_copy_/_add_/_addcmul_": Internal(
        "fused passes over many tensors: integrity norms, snapshot copies, ZClip scaling, early-warning "
        "probes and fault injection", "torch 2.13", "fallback: one op per tensor"),
}

_REQUIRED_ON_TRAINER = ("training_step", "get_batch_samples", "_train_batch_size", "_created_lr_scheduler",
                        "_save_optimizer_and_scheduler", "_save_scaler", "_save_rng_state")
_WARN_IF_ABSENT = ("_save_checkpoint", "_load_best_model", "_inner_training_loop")
_warned: set[str] = set()


class UnsupportedVersion(RuntimeError):
    """A private internal the plugin cannot work without is missing from the installed version."""


def _versions() -> str:
    import accelerate
    import transformers

    try:
        import trl

        t = f", TRL {trl.__version__}"
    except ImportError:
        t = ""
    return f"transformers {transformers.__version__}{t}, accelerate {accelerate.__version__}"


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning("self-healing: " + msg + " (installed: %s; supported: %s)", *args, _versions(), SUPPORTED)


def check_trainer(trainer: Any) -> None:
    """At attach: every internal with no fallback exists, else `UnsupportedVersion` naming it."""
    missing = [n for n in _REQUIRED_ON_TRAINER if not hasattr(trainer, n)]
    if missing:
        raise UnsupportedVersion(
            f"self-healing needs Trainer internal(s) {', '.join(missing)}, which {type(trainer).__name__} does not "
            f"have on {_versions()}; supported: {SUPPORTED}")
    for n in _WARN_IF_ABSENT:
        if not hasattr(trainer, n):
            _warn_once(n, "Trainer.%s is missing: %s", n, INTERNALS[f"Trainer.{n}"].when_absent)


def present(trainer: Any, name: str) -> bool:
    """Whether `trainer` has `name`; a Trainer internal every supported version has is warned about."""
    if hasattr(trainer, name):
        return True
    if name in _WARN_IF_ABSENT:
        _warn_once(name, "Trainer.%s is missing: %s", name, INTERNALS[f"Trainer.{name}"].when_absent)
    return False


# ------------------------------------------------------------------------------------------------
# gradient norm and ZClip
# ------------------------------------------------------------------------------------------------
def _measure_params(accelerator: Any, params: list) -> Any:
    """The pre-clip norm of `params` without touching them (the fallback's `measure_grad_norm`)."""
    from .hf_patches import measure_grad_norm

    class _Params:  # measure_grad_norm reads model.parameters() only
        def parameters(self):
            return iter(params)

    return measure_grad_norm(accelerator, _Params())


def install_grad_norm(patches: Any) -> None:
    """Keep the step's pre-clip grad norm in `patches.grad_norm` (a `hf_patches.TrainerPatches`);
    with ZClip on, make the Trainer's clipping measure only (ZClip clips in on_pre_optimizer_step).

    transformers 5.3+: wraps `_get_grad_norm` / `_clip_grad_norm` (no extra pass). Older releases
    call `accelerator.clip_grad_norm_` straight from the training loop (and nothing at all when
    `max_grad_norm` is 0): that public call is wrapped on the trainer's accelerator instead, and
    `ensure_grad_norm` measures the norm when the loop did not."""
    t = patches.trainer
    zclip_on = patches.config.zclip_enabled
    patches.grad_norm_fallback = not hasattr(t, "_get_grad_norm") or (zclip_on and not hasattr(t, "_clip_grad_norm"))
    if hasattr(t, "_get_grad_norm"):
        patches.wrap("_get_grad_norm", patches.make_get_grad_norm)
    if zclip_on and hasattr(t, "_clip_grad_norm"):
        patches.wrap("_clip_grad_norm", patches.make_clip_grad_norm)
    if not patches.grad_norm_fallback:
        return
    acc = t.accelerator
    orig = acc.clip_grad_norm_
    zclip = zclip_on and not hasattr(t, "_clip_grad_norm")
    record = not hasattr(t, "_get_grad_norm")

    def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
        """The Trainer's clipping call: measured only with ZClip on (ZClip clips later), and its
        pre-clip norm kept for the detectors; the plugin's own inf-norm measurement passes through."""
        if patches.passthrough or max_norm == float("inf"):
            return orig(parameters, max_norm, *args, **kwargs)
        if zclip:  # its FSDP/DeepSpeed path calls clip_grad_norm_(inf): passed through above
            out = _measure_params(acc, list(parameters))
        else:
            out = orig(parameters, max_norm, *args, **kwargs)
        if record or zclip:
            patches.keep_grad_norm(out)
        return out

    prev = acc.__dict__.get("clip_grad_norm_")
    acc.clip_grad_norm_ = clip_grad_norm_

    def restore() -> None:
        if prev is None:
            acc.__dict__.pop("clip_grad_norm_", None)
        else:
            acc.clip_grad_norm_ = prev

    patches.add_undo(restore)  # at detach: remove what was put on an object other than the trainer


def ensure_grad_norm(patches: Any) -> None:
    """On the fallback path, at on_pre_optimizer_step: measure the norm the loop did not compute
    (old transformers with `max_grad_norm` 0). A no-op on transformers 5.3+."""
    if patches.grad_norm_fallback and patches.grad_norm is None and not patches.passthrough:
        from .hf_patches import measure_grad_norm

        t = patches.trainer
        if any(p.grad is not None for p in t.model.parameters()):
            patches.grad_norm = measure_grad_norm(t.accelerator, t.model)


def wrap_save_checkpoint(trainer: Any, wrap: Callable[[str, Callable], None], factory: Callable) -> None:
    """`wrap("_save_checkpoint", factory)` where the release has it (errors while saving are
    tagged 'save'); a missing one is warned about once (`present`)."""
    if present(trainer, "_save_checkpoint"):
        wrap("_save_checkpoint", factory)


def skip_ddp_buffer_broadcast(model: Any, exc: BaseException) -> None:
    """A rank re-running a failed step to join the collectives: when the failure came out of DDP's
    forward (`DistributedDataParallel._run_ddp_forward`), that forward already broadcast the
    buffers, so the re-run must not broadcast them again (`require_forward_param_sync`)."""
    from .hf_patches import raised_inside

    ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
    if ddp is not None and raised_inside(exc, "torch/nn/parallel/distributed.py", "_run_ddp_forward"):
        ddp.require_forward_param_sync = False


# ------------------------------------------------------------------------------------------------
# batches, running loss, trainer fields
# ------------------------------------------------------------------------------------------------
def num_items_in_batch(trainer: Any, orig_get_batch_samples: Callable, batches: list, *args: Any,
                       **kwargs: Any) -> Any:
    """The Trainer's loss normaliser for `batches` (already fetched, bad ones skipped)."""
    if hasattr(trainer, "_get_num_items_in_batch"):
        device = args[0] if args else kwargs.get("device", trainer.args.device)
        return trainer._get_num_items_in_batch(batches, device)
    return orig_get_batch_samples(iter(batches), len(batches), *args, **kwargs)[1]


def repair_running_loss(trainer: Any) -> None:
    """Zero a non-finite running loss (transformers 5.3+ keeps it in `_tr_loss`); on older
    releases it is a local of the training loop, which nothing outside can reach: say so."""
    tr = getattr(trainer, "_tr_loss", None)
    if isinstance(tr, torch.Tensor):
        if not bool(torch.isfinite(tr).all()):
            tr.zero_()
    elif not getattr(trainer.args, "logging_nan_inf_filter", True):
        _warn_once("_tr_loss", "a skipped NaN step stays in the Trainer's running loss (Trainer._tr_loss is missing), "
                   "so its logged 'loss' reads NaN until the next log window; logging_nan_inf_filter=True avoids it")


def reset_generation_buffers(trainer: Any) -> None:
    """GRPO/RLOO: drop the buffered generation batch so a resume regenerates it."""
    if hasattr(trainer, "_buffered_inputs"):
        trainer._buffered_inputs = None
    if isinstance(getattr(trainer, "_step", None), int):
        trainer._step = 0


TRAINER_EXTRA_STATE = ("_step", "_metrics", "_buffered_inputs")
"""TRL trainers' own counters and buffers an in-memory retry restores (whichever exist)."""


def train_batch_size(trainer: Any) -> int | None:
    return getattr(trainer, "_train_batch_size", None)


def set_train_batch_size(trainer: Any, n: int) -> None:
    """The batch the next `_inner_training_loop` uses (`train()` passes `_train_batch_size`)."""
    if not hasattr(trainer, "_train_batch_size"):
        raise UnsupportedVersion(f"Trainer._train_batch_size is missing on {_versions()}; supported: {SUPPORTED}")
    trainer._train_batch_size = n


def created_lr_scheduler(trainer: Any) -> Any:
    return getattr(trainer, "_created_lr_scheduler", None)


def set_created_lr_scheduler(trainer: Any, value: Any) -> None:
    trainer._created_lr_scheduler = value


def save_training_state(trainer: Any, output_dir: str, optimizer: bool = True) -> None:
    """Optimizer and scheduler (unless not `optimizer`), AMP scaler and RNG state, as the Trainer
    writes them into a checkpoint."""
    names = ("_save_optimizer_and_scheduler",) if optimizer else ()
    for name in names + ("_save_scaler", "_save_rng_state"):
        fn = getattr(trainer, name, None)
        if fn is None:
            raise UnsupportedVersion(f"Trainer.{name} is missing on {_versions()}; the resume checkpoint cannot be "
                                     f"written; supported: {SUPPORTED}")
        fn(output_dir)


# ------------------------------------------------------------------------------------------------
# loading, schedulers, trackio, torch
# ------------------------------------------------------------------------------------------------
def numpy_safe_globals() -> Any:
    """`torch.load(weights_only=True)` context allowing the numpy objects of the Trainer's
    `rng_state.pth`: transformers' own (`trainer_pt_utils.safe_globals`, 5.2+), else the same
    allowlist through torch's `torch.serialization.safe_globals`."""
    try:
        from transformers.trainer_pt_utils import safe_globals

        return safe_globals()
    except ImportError:
        pass
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5 had no allowlist to extend
        return contextlib.nullcontext()
    return torch.serialization.safe_globals(numpy_allowlist())


def numpy_allowlist() -> list:
    """The numpy globals of a pickled `np.random.get_state()` (transformers' list)."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def scale_last_lr(scheduler: Any, factor: float | None = None, lrs: list[float] | None = None) -> None:
    """Make `scheduler.get_last_lr()` (what the Trainer logs) show an LR change made outside it:
    scaled by `factor`, or set to `lrs`. Nothing to do for a scheduler without `_last_lr`."""
    last = getattr(scheduler, "_last_lr", None)
    if last is None:
        return
    scheduler._last_lr = list(lrs) if lrs is not None else [lr * factor for lr in last]


def set_trackio_next_step(run: Any, step: int) -> bool:
    """Make trackio's next auto-numbered row land on `step`; False (warned once) when the run has
    no `_next_step` to set."""
    if isinstance(getattr(run, "_next_step", None), int):
        run._next_step = int(step)
        return True
    if run is not None:
        _warn_once("trackio._next_step", "trackio's run has no _next_step: after a rollback the Trainer's dashboard "
                   "rows are not realigned to global_step")
    return False


def foreach_mul_(tensors: list, factor: Any) -> None:
    """In-place multiply many tensors at once (`torch._foreach_mul_`), else one by one."""
    if not tensors:
        return
    if _FOREACH:
        torch._foreach_mul_(tensors, factor)
    else:
        for t in tensors:
            t.mul_(factor)


def foreach_norm(tensors: list) -> list:
    """The 2-norm of each tensor, in one fused kernel where torch has it."""
    return torch._foreach_norm(tensors) if _FOREACH else [torch.linalg.vector_norm(t) for t in tensors]


def foreach_copy_(dst: list, src: list, non_blocking: bool = False) -> None:
    if _FOREACH:
        torch._foreach_copy_(dst, src, non_blocking=non_blocking)
    else:
        for d, s in zip(dst, src):
            d.copy_(s, non_blocking=non_blocking)


def foreach_add_(tensors: list, others: list, alpha: float = 1.0) -> None:
    if _FOREACH:
        torch._foreach_add_(tensors, others, alpha=alpha)
    else:
        for t, o in zip(tensors, others):
            t.add_(o, alpha=alpha)


def foreach_addcmul_(tensors: list, t1: list, t2: list, value: float = 1.0) -> None:
    if _FOREACH:
        torch._foreach_addcmul_(tensors, t1, t2, value=value)
    else:
        for t, a, b in zip(tensors, t1, t2):
            t.addcmul_(a, b, value=value)


_FOREACH = all(hasattr(torch, n) for n in ("_foreach_mul_", "_foreach_norm", "_foreach_copy_", "_foreach_add_",
                                           "_foreach_addcmul_"))
"""torch's fused multi-tensor ops (private names, public in practice: torch.optim uses them)."""


# --- the watchdog's phases and hang report --------------------------------------------------------
TRAINER_SAVE_CHECKPOINT = "_save_checkpoint"
"""Wrapped as the watchdog's "save" phase (and by the callback: errors while saving are tagged 'save')."""
TRAINER_LOAD_BEST_MODEL = "_load_best_model"
"""Wrapped as the "save" phase: loading the best model at the end reads a whole checkpoint."""
TRAINER_INNER_LOOP = "_inner_training_loop"
"""Wrapped: the "startup" phase before the first step and "finishing" after the last."""
TRAINER_LOAD_OPTIMIZER = "_load_optimizer_and_scheduler"
"""Wrapped: resuming from the plugin's fast state, which may hold no optimizer."""
TRL_GENERATION = ("_generate_and_score_completions", "_generate")
"""TRL GRPO/RLOO's generation, newest name first: the "generation" phase."""
TRAINING_FRAMES = ("train", TRAINER_INNER_LOOP, "_finish_preempted")
"""Frame names that mean "inside train()" ("_finish_preempted" is `SelfHealingTrainer`'s own)."""
TRAINING_FRAME_FILES = ("self_healing", "transformers", "trl")
"""The packages those frames must come from (a user's own `train` function is not the Trainer's)."""


def flight_recorder() -> tuple[str, bytes] | None:
    """torch's flight recorder (the last collectives of every process group: NCCL, and gloo in
    recent torch) as ("json", bytes) or ("pickle", bytes); None without a process group or one."""
    try:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        import torch._C._distributed_c10d as c10d

        if hasattr(c10d, "_dump_fr_trace_json"):
            return "json", c10d._dump_fr_trace_json()
        for name in ("_dump_fr_trace", "_dump_nccl_trace"):
            if hasattr(c10d, name):
                return "pickle", getattr(c10d, name)()
    except Exception:  # noqa: BLE001 - a dump that fails must not stop the hang report
        return None
    return None
