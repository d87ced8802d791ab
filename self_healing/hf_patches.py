"""The Trainer methods the plugin wraps, and the step facts those wrappers capture.

transformers gives callbacks neither the loss nor the grad norm, no event can skip an optimizer
step, and an exception inside forward/backward or the collator ends the run. So `TrainerPatches`
wraps methods *on the trainer instance* (never the class), keeps the originals so `detach` puts
them back, and holds what the wrappers saw during a step (loss, pre-clip norm, exception) until
the callback hands them to the engine in `on_pre_optimizer_step`:

- `training_step`: keeps the step's loss tensor (summed over micro-batches, on device) and turns a
  healable exception raised inside forward/backward into a skipped step instead of a dead run;
- `get_batch_samples` / `get_train_dataloader`: a batch whose collation failed is skipped;
- `evaluate` / the Trainer's checkpoint save: which phase an error happened in (an OOM in eval must
  not shrink the training batch);
- `log`: the logged loss of a window with a skipped step is the mean of its finite losses;
- `train`: whichever way it is called, it runs through the orchestrator;
- the grad-norm hooks, through `compat.install_grad_norm` (the private names live there).
"""

from __future__ import annotations

import gc
import math
import pickle
from typing import Any, Callable

import torch

from . import compat
from .diagnosis import FailureKind, diagnose_exception, exception_origin, tag_origin
from .distributed import EXCEPTION_CODES, is_distributed, is_dtensor, recover_fsdp_iteration

IN_LOOP_FAILURES = {FailureKind.NAN_LOSS, FailureKind.DATA_ERROR}
"""Failures inside the step that a skipped step heals; everything else goes to the orchestrator."""


def free_memory(model: Any = None) -> None:
    """After an OOM: drop this step's gradients, collect garbage, empty the device cache."""
    if model is not None:
        for p in model.parameters():
            p.grad = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def raised_inside(exc: BaseException, path_part: str, function: str | None = None) -> bool:
    """Whether `exc` was raised below a frame of a file whose path contains `path_part` (and, if
    given, of that function): where in the step a failure happened decides what was issued."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if path_part in code.co_filename.replace("\\", "/") and (function is None or code.co_name == function):
            return True
        tb = tb.tb_next
    return False


def step_origin(exc: BaseException) -> str:
    """Where inside the training step `exc` was raised: in the model's forward/backward on the
    batch (`forward`), in a tokenizer call (`collate`: building the batch), else `step` (the loss
    computation, a reward function, the trainer's own code)."""
    if raised_inside(exc, "/tokenization_utils") or raised_inside(exc, "/tokenizers/"):
        return "collate"
    if raised_inside(exc, "torch/nn/modules/module.py") or raised_inside(exc, "torch/autograd/"):
        return "forward"
    return "step"


def _is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def _first_row(inputs: Any) -> Any:
    """The first example of a batch (dict of tensors, or a list of rows), for a minimal step."""
    if isinstance(inputs, list):
        return inputs[:1]
    if hasattr(inputs, "items"):
        sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
        n = max(sizes) if sizes else None
        return type(inputs)({k: (v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v)
                             for k, v in inputs.items()}) if not hasattr(inputs, "data") else \
            {k: (v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v)
             for k, v in inputs.items()}
    return inputs


def _batch_indices(inputs: Any) -> list[int] | None:
    """Dataset indices of a batch when the collator kept them (an `idx`/`index` column)."""
    if isinstance(inputs, dict):
        for key in ("idx", "index", "indices", "sample_idx"):
            v = inputs.get(key)
            if isinstance(v, torch.Tensor):
                return [int(x) for x in v.flatten().tolist()][:256]
            if isinstance(v, (list, tuple)) and all(isinstance(x, int) for x in v):
                return list(v)[:256]
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict):
        idx = [row.get("idx", row.get("index")) for row in inputs]
        if all(isinstance(x, int) for x in idx):
            return idx[:256]
    return None


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:  # noqa: BLE001
        return False


class SkippedBatch:
    """What a guarded collator returns instead of raising: an exception escaping the data loader's
    generator would end the epoch for good, so the failure travels as a value to the step loop."""

    def __init__(self, exc: BaseException) -> None:
        self.exception_type = type(exc).__name__
        self.message = str(exc)[:500]
        self.exception = exc if _picklable(exc) else RuntimeError(f"{self.exception_type}: {self.message}")


class GuardedCollator:
    """Wraps the Trainer's collator (picklable, for worker processes): a data error becomes a
    `SkippedBatch`; anything else propagates."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate
        self.passthrough = False

    def __call__(self, features: Any) -> Any:
        if self.passthrough:
            return self.collate(features)
        try:
            return self.collate(features)
        except Exception as exc:  # noqa: BLE001 - classified below
            tag_origin(exc, "collate")
            if diagnose_exception(exc).failure == FailureKind.DATA_ERROR:
                return SkippedBatch(exc)
            raise

    def __getattr__(self, name: str) -> Any:  # tokenizer, pad_token_id, ... of the wrapped collator
        if name == "collate":
            raise AttributeError(name)
        return getattr(self.collate, name)


def measure_grad_norm(accelerator: Any, model: Any) -> torch.Tensor | None:
    """The pre-clip gradient norm without touching the gradients.

    Plain and DDP gradients (identical on every rank after the all-reduce) are measured with one
    fused norm, after accelerate's fp16 unscale; `clip_grad_norm_(inf)` would add a x1.0 pass over
    every gradient. Sharded (FSDP, DTensor) and DeepSpeed gradients need the engine's own global
    norm, so they keep that call."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA):
        if hasattr(torch.nn.utils, "get_total_norm") and not any(is_dtensor(p.grad) for p in model.parameters()):
            accelerator.unscale_gradients()
            grads = [p.grad for p in model.parameters() if p.grad is not None]  # after: unscale may replace them
            return torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros(())
    return accelerator.clip_grad_norm_(model.parameters(), float("inf"))


class TrainerPatches:
    """Owns the wrapped originals (so `detach` restores the trainer exactly) and the step's facts
    the wrappers capture. `callback` is read through its public attributes only (trainer, config,
    engine, orchestrator, orchestrator_active)."""

    def __init__(self, callback: Any) -> None:
        self.callback = callback
        self.passthrough = False
        """While True (during `dry_run`), the wrappers only call through: failures must surface."""
        self.phase = "train"
        """What the Trainer is doing: "train", "eval" or "save"."""
        self.streamed_data = False
        """The training data is an iterable dataset (a stream): its bad batches cannot be skipped."""
        self.step_loss: torch.Tensor | None = None
        self.grad_norm: Any = None
        self.step_exception: BaseException | None = None
        self.grad_norm_fallback = False
        """True when compat measures the norm itself (no grad-norm hook on this transformers)."""
        self.orig_train: Any = None
        """The Trainer's own `train`, which the orchestrator calls."""
        self.log_window = [0, 0, 0.0]
        """This logging window's (steps, finite steps, sum of finite losses), as judged."""
        self.last_window_skipped = False
        self._originals: dict[str, Any] = {}
        self._undo: list[Callable[[], None]] = []

    @property
    def trainer(self) -> Any:
        return self.callback.trainer

    @property
    def config(self) -> Any:
        return self.callback.config

    @property
    def engine(self) -> Any:
        return self.callback.engine

    # ------------------------------------------------------------------------------------------
    # install and undo
    # ------------------------------------------------------------------------------------------
    def install(self) -> None:
        """The step's wraps, in the order `detach` undoes them (the `train` wrap comes later, once
        the orchestrator exists: `install_train`)."""
        self.wrap("training_step", self.make_training_step)
        self.wrap("get_batch_samples", self.make_get_batch_samples)
        self.wrap("get_train_dataloader", self.make_get_train_dataloader)
        self.wrap("evaluate", self.make_phase("eval"))
        self.wrap("log", self.make_log)
        compat.wrap_save_checkpoint(self.trainer, self.wrap, self.make_phase("save"))

    def install_grad_norm(self) -> None:
        """Keep the pre-clip norm (and with ZClip on, turn the Trainer's clipping into a measurement)."""
        compat.install_grad_norm(self)

    def install_train(self) -> None:
        self.wrap("train", self.make_train)

    def wrap(self, name: str, factory: Callable[[Any], Any]) -> None:
        """Wrap the trainer's method `name` with `factory(orig)` so that `unwrap_all` undoes it; a
        method wrapped already gets the new layer on top (undo drops both)."""
        t = self.trainer
        if name not in self._originals:
            self._originals[name] = t.__dict__.get(name)
        setattr(t, name, factory(getattr(t, name)))

    def is_wrapped(self, name: str) -> bool:
        return name in self._originals

    def add_undo(self, fn: Callable[[], None]) -> None:
        """Something installed on an object other than the trainer; `unwrap_all` calls `fn` to remove it."""
        self._undo.append(fn)

    def unwrap_all(self) -> None:
        """The trainer's methods as they were, then whatever `add_undo` registered (last first)."""
        t = self.trainer
        for name, orig in reversed(list(self._originals.items())):
            if orig is None:
                t.__dict__.pop(name, None)
            else:
                setattr(t, name, orig)
        self._originals.clear()
        for fn in reversed(self._undo):
            fn()
        self._undo = []

    # ------------------------------------------------------------------------------------------
    # the step's facts
    # ------------------------------------------------------------------------------------------
    def reset_step(self) -> None:
        self.step_loss = None
        self.grad_norm = None
        self.step_exception = None

    def keep_grad_norm(self, out: Any) -> None:
        """The step's pre-clip norm (FSDP2's replicated DTensor as the plain value for the gather)."""
        self.grad_norm = out if type(out) is torch.Tensor or not hasattr(out, "full_tensor") else out.full_tensor()

    def count_logged_step(self, loss: Any, failed: bool) -> None:
        """The judged step's loss joins this logging window (see `make_log`)."""
        self.last_window_skipped = failed
        if isinstance(loss, float):
            finite = math.isfinite(loss) and not failed
            self.log_window = [self.log_window[0] + 1, self.log_window[1] + finite,
                               self.log_window[2] + (loss if finite else 0.0)]

    def reset_log_window(self) -> None:
        self.log_window = [0, 0, 0.0]

    # ------------------------------------------------------------------------------------------
    # the wrappers
    # ------------------------------------------------------------------------------------------
    def make_training_step(self, orig: Callable) -> Callable:
        def training_step(model, inputs, num_items_in_batch=None, *args, **kwargs):
            if self.passthrough:
                return orig(model, inputs, num_items_in_batch, *args, **kwargs)
            retries = 0
            while True:
                try:
                    loss = orig(model, inputs, num_items_in_batch, *args, **kwargs)
                    break
                except Exception as exc:  # noqa: BLE001 - classified below; anything else propagates
                    tag_origin(exc, step_origin(exc))
                    step = self.trainer.state.global_step + 1
                    d = diagnose_exception(exc, step=step)
                    if d.failure == FailureKind.API_ERROR and retries < self.config.max_api_retries:
                        retries += 1  # a reward model behind an API, a streamed shard: wait and retry
                        self.engine.backoff(retries, d, step, record=True, phase=self.phase)
                        continue
                    recover_fsdp_iteration(self.trainer.model)
                    if d.failure == FailureKind.OOM:
                        free_memory(self.trainer.model)
                    distributed = is_distributed()
                    if d.failure not in IN_LOOP_FAILURES and not (distributed and d.failure == FailureKind.OOM):
                        raise
                    self.step_exception = exc
                    eng = self.engine
                    eng.step_exception_kind = max(eng.step_exception_kind, EXCEPTION_CODES.get(d.failure, 0))
                    if d.failure == FailureKind.DATA_ERROR:
                        eng.note_skipped_batch(exc, "forward", _batch_indices(inputs), step)
                    if distributed:
                        self.join_gradient_sync(orig, model, inputs, num_items_in_batch, exc)
                    return torch.zeros((), device=self.trainer.args.device)
            if isinstance(loss, torch.Tensor):
                l = loss.detach() if loss.requires_grad else loss  # the Trainer returns it detached
                self.step_loss = l if self.step_loss is None else self.step_loss + l
            return loss

        return training_step

    def join_gradient_sync(self, orig: Any, model: Any, inputs: Any, num_items: Any, exc: BaseException) -> None:
        """This rank's step failed; the other ranks are (or will be) inside the same step's
        collectives: DDP's gradient all-reduce, and whatever the trainer gathers in its loss
        (TRL's token counts and metrics). Run the trainer's own step once more on a single row, so
        this rank issues the same collectives and nobody hangs; the agreed decision then drops the
        step on every rank. If even that fails, the collective timeout (`ddp_timeout`) ends the
        ranks and the launcher's restart plus auto-resume take over.

        Where the failed attempt already issued some of the step's collectives, the re-run must not
        issue them again: DDP broadcasts its buffers at the start of every forward, so after a
        failure inside the model the re-run skips that broadcast. FSDP all-gathers layer by layer
        inside the forward; how many the failed attempt issued is unknowable, so there it stops
        with a clear error instead of pairing mismatched collectives (which can hang, or on NCCL
        silently mix data)."""
        t = self.trainer
        if raised_inside(exc, "torch/distributed/fsdp/") or (
                raised_inside(exc, "torch/nn/modules/module.py") and _is_fsdp(t.accelerator)):
            raise RuntimeError(
                f"rank {t.args.process_index}: {type(exc).__name__} inside the FSDP model's forward/backward; "
                "the ranks' collectives cannot be re-aligned, so this rank stops (the others stop at the collective "
                "timeout). Relaunch with `torchrun --max-restarts N`: auto-resume continues from the newest verified "
                "checkpoint") from exc
        compat.skip_ddp_buffer_broadcast(model, exc)  # when the failed forward already broadcast them
        try:
            free_memory(model)
            orig(model, _first_row(inputs), num_items)
        except Exception as e:  # noqa: BLE001 - nothing more can be done on this rank
            raise RuntimeError(f"rank could not join the step's collectives after {type(exc).__name__}: {e}") from exc

    def make_get_batch_samples(self, orig: Callable) -> Callable:
        def get_batch_samples(epoch_iterator, num_batches, *args, **kwargs):
            """The Trainer's own fetch loop, plus: a batch whose collation failed (a `SkippedBatch`
            from the guarded collator) is recorded and the next one taken in its place."""
            if self.passthrough:
                try:
                    return orig(epoch_iterator, num_batches, *args, **kwargs)
                except Exception as exc:
                    tag_origin(exc, "data")
                    raise
            batches: list[Any] = []
            while len(batches) < num_batches:
                try:
                    batch = next(epoch_iterator)
                except StopIteration:
                    break  # end of epoch
                except Exception as exc:  # the dataset or its iterator raised (not the guarded collator)
                    tag_origin(exc, "data")
                    raise
                if isinstance(batch, SkippedBatch):
                    if self.engine.skip_batch(batch.exception, self.trainer.state.global_step + 1).stop:
                        raise batch.exception
                    continue
                batches.append(batch)
            return batches, compat.num_items_in_batch(self.trainer, orig, batches, *args, **kwargs)

        return get_batch_samples

    def make_phase(self, phase: str) -> Callable[[Callable], Callable]:
        def factory(orig):
            def wrapped(*args, **kwargs):
                before, self.phase = self.phase, phase
                try:
                    return orig(*args, **kwargs)
                except BaseException as exc:
                    if exception_origin(exc) not in ("eval", "save"):  # the innermost phase is where it failed
                        tag_origin(exc, phase, override=True)
                    raise
                finally:
                    self.phase = before

            return wrapped

        return factory

    def make_get_train_dataloader(self, orig: Callable) -> Callable:
        def get_train_dataloader(*args, **kwargs):
            """The training dataloader collates through `GuardedCollator` (a bad batch is skipped,
            not fatal); evaluation and prediction dataloaders keep the user's collator, so their
            errors surface unchanged."""
            t = self.trainer
            c = getattr(t, "data_collator", None)
            # A stream is dispatched batch by batch (accelerate broadcasts and slices each one): a
            # skipped batch cannot travel through it, so a stream's data errors surface unchanged.
            self.streamed_data = isinstance(getattr(t, "train_dataset", None), torch.utils.data.IterableDataset)
            if self.passthrough or c is None or isinstance(c, GuardedCollator) or self.streamed_data:
                return orig(*args, **kwargs)
            t.data_collator = GuardedCollator(c)
            try:
                return orig(*args, **kwargs)
            finally:
                t.data_collator = c

        return get_train_dataloader

    def make_train(self, orig: Callable) -> Callable:
        self.orig_train = orig
        cb = self.callback

        def train(*args, **kwargs):
            if cb.orchestrator is not None and not cb.orchestrator_active:
                return cb.orchestrator.train(*args, **kwargs)
            return orig(*args, **kwargs)

        return train

    def make_log(self, orig: Callable) -> Callable:
        def log(logs, *args, **kwargs):
            """The Trainer's logged loss over a window with a skipped non-finite step is fiction: its
            NaN filter puts the window's running mean (0.0 when the window is that one step) in its
            place. Log the mean of the window's finite losses instead, or no loss at all."""
            if not self.passthrough and isinstance(logs, dict) and "loss" in logs:
                (n, n_finite, total), self.log_window = self.log_window, [0, 0, 0.0]
                if n_finite < n:
                    if n_finite:
                        logs["loss"] = total / n_finite
                    else:
                        logs.pop("loss")
                if self.last_window_skipped:  # the norm of the gradients a failed step never had
                    logs.pop("grad_norm", None)
            return orig(logs, *args, **kwargs)

        return log

    def make_get_grad_norm(self, orig: Callable) -> Callable:
        """For the Trainer's grad-norm hook (compat installs it): keep the norm it computes anyway."""
        def get_grad_norm(model, grad_norm=None, *args, **kwargs):
            out = orig(model, grad_norm, *args, **kwargs)
            self.keep_grad_norm(out)
            return out

        return get_grad_norm

    def make_clip_grad_norm(self, orig: Callable) -> Callable:
        """For the Trainer's clipping hook with ZClip on (compat installs it): measure only; a
        fixed max_grad_norm clipping first would hide the spike ZClip is there to see. ZClip clips
        in on_pre_optimizer_step, once the step's (loss, norm) have reached the host in one sync."""
        trainer = self.trainer

        def clip_grad_norm(model, *args, **kwargs):
            return measure_grad_norm(trainer.accelerator, model)

        return clip_grad_norm
