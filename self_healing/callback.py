"""Trainer plumbing: move each step's numbers from the Trainer to the detectors, and carry the
healing actions back.

transformers gives callbacks neither the loss nor the grad norm, and no event can skip an
optimizer step; its `on_pre_optimizer_step` fires after the Trainer already clipped. So besides
the callback events, `attach()` wraps three methods *on the trainer instance* (never the class):

- `training_step`: keeps the step's loss tensor (summed over micro-batches, on device) and turns a
  healable exception raised inside forward/backward into a skipped step instead of a dead run;
- `_get_grad_norm`: keeps the pre-clip norm the Trainer computes anyway (no second pass);
- with ZClip on, `_clip_grad_norm`: measures without clipping, then applies ZClip's threshold
  (transformers < 5.3 has neither: `compat.install_grad_norm` wraps the accelerator's call).

The decision for a step is taken in `on_pre_optimizer_step`, after one host sync of (loss, norm),
before `optimizer.step()`: a skipped step sets every `.grad` to None so the optimizer leaves the
weights and its state untouched.
"""

from __future__ import annotations

import gc
import logging
import math
import signal
from typing import Any

import torch
from transformers import TrainerCallback

from . import compat
from .config import HealingConfig
from .detectors import StepMonitor, StepSignals
from .engine import Decision, Healer
from .diagnosis import Action, Diagnosis, FailureKind, diagnose_exception, exception_origin, tag_origin
from .distributed import EXCEPTION_CODES, is_distributed, is_dtensor, recover_fsdp_iteration
from .healing import scale_lr
from .monitors import monitors_for
from .tracking import make_tracker
from .journal import make_journal_callback
from .watchdog import make_watchdog
from .zclip import ZClip, load_from_trainer_state, save_to_trainer_state

logger = logging.getLogger("self_healing")

_POLICY_LOSS_TRAINERS = ("GRPOTrainer", "RLOOTrainer")
_IN_LOOP_FAILURES = {FailureKind.NAN_LOSS, FailureKind.DATA_ERROR}


def trainer_kind(trainer: Any) -> str:
    """The nearest known TRL/transformers trainer class name in the trainer's MRO."""
    known = ("GRPOTrainer", "RLOOTrainer", "DPOTrainer", "KTOTrainer", "ORPOTrainer", "CPOTrainer", "RewardTrainer",
             "SFTTrainer", "DistillationTrainer", "Trainer")
    for cls in type(trainer).__mro__:
        if cls.__name__ in known:
            return cls.__name__
    return type(trainer).__name__


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


def _raised_inside(exc: BaseException, path_part: str, function: str | None = None) -> bool:
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
    if _raised_inside(exc, "/tokenization_utils") or _raised_inside(exc, "/tokenizers/"):
        return "collate"
    if _raised_inside(exc, "torch/nn/modules/module.py") or _raised_inside(exc, "torch/autograd/"):
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


class SkippedBatch:
    """What a guarded collator returns instead of raising: an exception escaping the data loader's
    generator would end the epoch for good, so the failure travels as a value to the step loop."""

    def __init__(self, exc: BaseException) -> None:
        self.exception_type = type(exc).__name__
        self.message = str(exc)[:500]
        self.exception = exc if _picklable(exc) else RuntimeError(f"{self.exception_type}: {self.message}")


def _picklable(obj: Any) -> bool:
    import pickle

    try:
        pickle.dumps(obj)
        return True
    except Exception:  # noqa: BLE001
        return False


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



def _measure_grad_norm(accelerator, model) -> torch.Tensor | None:
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

def _engine_attr(name: str) -> property:
    """A callback attribute that is the engine's own (reads and assignments go to the engine)."""
    return property(lambda self: getattr(self.engine, name), lambda self, v: setattr(self.engine, name, v))


def _calling_trainer(callback: Any) -> Any:
    """The Trainer whose callback list holds `callback`, found on the call stack (during its
    `__init__` or `train`). None when there is none."""
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        handler = getattr(obj, "callback_handler", None)
        if handler is not None and hasattr(obj, "args") and any(c is callback for c in getattr(handler, "callbacks", [])):
            return obj
        frame = frame.f_back
    return None


class SelfHealingCallback(TrainerCallback):
    """Per-step detection and in-loop healing. Use through `SelfHealingTrainer`, or alone with
    `SelfHealingCallback(config).attach(trainer)` (then it writes the postmortem at train end)."""

    def __init__(self, config: HealingConfig | None = None) -> None:
        self.config = config or HealingConfig()
        self.trainer: Any = None
        self.engine = Healer(config=self.config, objects=self._objects, device=self._device)
        """The decider: detectors, policy, snapshots, record and observers live there; this
        callback translates the Trainer's events into its calls."""
        self.orchestrated = False
        self._step_loss: torch.Tensor | None = None
        self._grad_norm: Any = None
        self._step_exception: BaseException | None = None
        self._agreed_preempt = 0
        self._log_window = [0, 0, 0.0]
        """This logging window's (steps, finite steps, sum of finite losses), as judged."""
        self._orig_base_lrs: list[float] | None = None
        self._wrapped: dict[str, Any] = {}
        self._kind: str | None = None
        self.orchestrator: Any = None
        self._orig_train: Any = None
        """The Trainer's own `train`, which the orchestrator calls."""
        """The `SelfHealingTrainer` that `trainer.train` runs through when attached without one."""
        self.orchestrator_active = False
        """True while an orchestrator's `train()` is running (it writes the postmortem then)."""
        self.early_warning: Any = None
        self.postmortem: dict[str, Any] | None = None
        self._last_window_skipped = False
        self.streamed_data = False
        """The training data is an iterable dataset (a stream): its bad batches cannot be skipped."""
        self.passthrough = False
        """While True (during `dry_run`), the wrappers only call through: failures must surface."""
        self.phase = "train"
        """What the Trainer is doing: "train", "eval" or "save" (an OOM in eval must not shrink the
        training batch)."""
        self.preempt_signal: int | None = None
        self.preempted_at: int | None = None
        self.monitors: list[Any] = []
        """Trainer-aware monitors: optional methods `on_log(step, logs)` and
        `on_evaluate(step, metrics)` returning a list of `Diagnosis` to act on."""
        self.tracker: Any = None
        """The trackio tracker when the Trainer reports to trackio (`self_healing.tracking`)."""
        self.journal: Any = None
        """The crash journal (`self_healing.journal`), an observer and a Trainer callback."""
        self.watchdog: Any = None
        """Hangs and goodput (`self_healing.watchdog`): its hooks; `.watchdog` the heartbeat and thread."""

    # ------------------------------------------------------------------------------------------
    # wiring
    # ------------------------------------------------------------------------------------------
    def attach(self, trainer: Any, orchestrated: bool = False) -> "SelfHealingCallback":
        """Install the plugin on `trainer`. Without `orchestrated` (the `SelfHealingTrainer`
        wrapper passes it), `trainer.train` itself is wrapped, so `.attach()` and
        `callbacks=[SelfHealingCallback(cfg)]` heal exceptions exactly like the wrapper does.
        A plugin attached earlier to the same trainer (a re-run notebook cell) is replaced."""
        if self.trainer is not None:
            if self.trainer is trainer:
                return self
            raise RuntimeError("this SelfHealingCallback is already attached to another trainer; "
                               "create one SelfHealingCallback per trainer")
        compat.check_trainer(trainer)  # an internal with no fallback: a clear error now, not a silent gap later
        for other in [c for c in trainer.callback_handler.callbacks
                      if isinstance(c, SelfHealingCallback) and c is not self]:
            if other.trainer is trainer:
                logger.warning("self-healing: this trainer already had a self-healing plugin; the new one replaces it "
                               "(attach once per trainer)")
                other.detach()
            elif other.trainer is None:  # an unattached callbacks=[...] instance would be a second plugin
                trainer.remove_callback(other)
        self.trainer = trainer
        self.orchestrated = orchestrated
        if getattr(trainer.args, "process_index", 0) != 0:
            logger.setLevel(logging.ERROR)  # one voice: the main process logs, the others only errors
        self._kind = kind = trainer_kind(trainer)
        self.engine.loss_signals = kind not in _POLICY_LOSS_TRAINERS
        self.engine.clip_args = trainer.args
        self.engine.output_dir = trainer.args.output_dir
        self.engine.extra_state = self._trainer_state
        self.monitor = StepMonitor(self.config, loss_signals=self.engine.loss_signals)
        self._wrap("training_step", self._make_training_step)
        self._wrap("get_batch_samples", self._make_get_batch_samples)
        self._wrap("get_train_dataloader", self._make_get_train_dataloader)
        self._wrap("evaluate", self._make_phase("eval"))
        self._wrap("log", self._make_log)
        if compat.present(trainer, "_save_checkpoint"):
            self._wrap("_save_checkpoint", self._make_phase("save"))
        if self.config.zclip_enabled:
            self.zclip = self._new_zclip()
        compat.install_grad_norm(self)  # _get_grad_norm/_clip_grad_norm, or the accelerator's clip_grad_norm_
        self.orchestrator = None
        if not orchestrated:
            from .trainer import SelfHealingTrainer

            self.orchestrator = SelfHealingTrainer(trainer, self.config, callback=self)
        self._wrap("train", self._make_train)  # whichever way it is called, train() runs through the orchestrator
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        # trainer-aware monitors (chosen by the trainer's type) and the trackio dashboard
        self.monitors = monitors_for(kind, self.config, trainer.args)
        self.tracker = make_tracker(self, trainer.args)
        if self.tracker is not None:
            self.observers.append(self.tracker)
            trainer.add_callback(self.tracker)  # after TrackioCallback: its hooks align the step axis
        # the crash journal: every decision on disk as it happens (self_healing.journal)
        self.journal = make_journal_callback(self)
        self.observers.append(self.journal)
        trainer.add_callback(self.journal)
        self.watchdog = make_watchdog(self)  # hangs, goodput, preemption mid-evaluation (self_healing.watchdog)
        # opt-in early-warning signals (self_healing.early_warning): nothing is attached while off
        from .early_warning import attach_early_warning

        self.early_warning = attach_early_warning(self)
        return self

    def _new_zclip(self) -> ZClip:
        z = ZClip.from_config(self.config)
        cap = float(getattr(self.trainer.args, "max_grad_norm", 0) or 0)
        z.warmup_max_norm = cap if cap > 0 else None
        return z

    def start_run(self) -> None:
        """A fresh `train()` call (a resume included: what belongs to a checkpoint comes back
        from it) starts from a clean slate: snapshots, escalation, detector windows, ZClip
        statistics, monitors and the postmortem of an earlier `train()` describe another run."""
        self.engine.reset()
        if self.zclip is not None:
            self.zclip = self._new_zclip()
        self.monitors = monitors_for(self._kind, self.config, self.trainer.args)
        self.postmortem = None
        self.preempt_signal = self.preempted_at = None
        self._agreed_preempt = 0
        self._orig_base_lrs = None
        self._log_window = [0, 0, 0.0]
        if getattr(self, "early_warning", None) is not None:
            from .early_warning import attach_early_warning

            self.trainer.remove_callback(self.early_warning)
            self.observers.remove(self.early_warning)
            self.early_warning = attach_early_warning(self)
        if self.watchdog is not None:  # new clocks, phase "startup", the watchdog thread running
            self.watchdog.watchdog.start_run()

    def on_init_end(self, args, state, control, **kwargs):
        """`Trainer(..., callbacks=[SelfHealingCallback(cfg)])`: the Trainer gives callbacks no
        reference to itself, so find the one whose `__init__` is calling us and attach to it."""
        trainer = _calling_trainer(self)
        if trainer is None:
            return control
        if self.trainer is None:
            self.attach(trainer)
        elif self.trainer is not trainer:
            # One instance handed to several Trainers (a sweep): each gets a plugin of its own with
            # this config, in this one's place in its callback list (the first keeps this one).
            handler = trainer.callback_handler.callbacks
            own = SelfHealingCallback(self.config)
            handler[next(i for i, c in enumerate(handler) if c is self)] = own
            own.attach(trainer)
        return control

    def guard_collator(self) -> None:
        """Kept for compatibility: the collator is now guarded only while the training
        dataloader is built (`get_train_dataloader`), so evaluation sees the user's collator."""

    def set_passthrough(self, on: bool) -> None:
        self.passthrough = on

    def detach(self) -> None:
        """Undo `attach`: the trainer's methods and callback list are as they were."""
        for name, orig in reversed(list(self._wrapped.items())):
            if orig is None:
                self.trainer.__dict__.pop(name, None)
            else:
                setattr(self.trainer, name, orig)
        self._wrapped.clear()
        compat.undo(self)
        for cb in (self, self.tracker, self.journal, getattr(self, "early_warning", None), self.watchdog):
            if cb is not None and cb in self.trainer.callback_handler.callbacks:
                self.trainer.remove_callback(cb)
        self.observers.clear()
        self.trainer = None

    def _wrap(self, name: str, factory) -> None:
        t = self.trainer
        self._wrapped[name] = t.__dict__.get(name)
        setattr(t, name, factory(getattr(t, name)))

    def wrap(self, name: str, factory) -> None:
        """Wrap the trainer's method `name` with `factory(orig)` so that `detach` undoes it; a method
        the plugin wrapped already gets the new layer on top (detach drops both)."""
        if name in self._wrapped:
            setattr(self.trainer, name, factory(getattr(self.trainer, name)))
        else:
            self._wrap(name, factory)

    def is_wrapped(self, name: str) -> bool:
        return name in self._wrapped

    def preempt_now(self, step: int, control, signum: int) -> None:
        """Act on the agreed preemption signal `signum` at `step` (the watchdog's early exits: an
        aborted evaluation, a signal during a save)."""
        self._agreed_preempt = int(signum)
        self._preempt(step, control)

    def _make_training_step(self, orig):
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
                    d = diagnose_exception(exc, step=self.trainer.state.global_step + 1)
                    if d.failure == FailureKind.API_ERROR and retries < self.config.max_api_retries:
                        retries += 1  # a reward model behind an API, a streamed shard: wait and retry
                        self._backoff(retries, d, record=True)
                        continue
                    recover_fsdp_iteration(self.model)
                    if d.failure == FailureKind.OOM:
                        free_memory(self.model)
                    distributed = is_distributed()
                    if d.failure not in _IN_LOOP_FAILURES and not (distributed and d.failure == FailureKind.OOM):
                        raise
                    self._step_exception = exc
                    self._step_exception_kind = max(self._step_exception_kind, EXCEPTION_CODES.get(d.failure, 0))
                    if d.failure == FailureKind.DATA_ERROR:
                        self._note_skipped_batch(exc, "forward", inputs)
                    if distributed:
                        self._join_gradient_sync(orig, model, inputs, num_items_in_batch, exc)
                    return torch.zeros((), device=self.trainer.args.device)
            if isinstance(loss, torch.Tensor):
                l = loss.detach()
                self._step_loss = l if self._step_loss is None else self._step_loss + l
            return loss

        return training_step

    def _make_get_batch_samples(self, orig):
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

    def _make_phase(self, phase: str):
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

    def _make_get_train_dataloader(self, orig):
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

    @property
    def inner_train(self) -> Any:
        """The Trainer's own `train` (the orchestrator calls it; `trainer.train` itself runs
        through the orchestrator)."""
        return self._orig_train or self.trainer.train

    def _make_train(self, orig):
        self._orig_train = orig

        def train(*args, **kwargs):
            if self.orchestrator is not None and not self.orchestrator_active:
                return self.orchestrator.train(*args, **kwargs)
            return orig(*args, **kwargs)

        return train

    def _backoff(self, attempt: int, d: Diagnosis, record: bool = False) -> float:
        return self.engine.backoff(attempt, d, self.trainer.state.global_step + 1, record=record, phase=self.phase)

    def _note_skipped_batch(self, exc: BaseException, where: str, inputs: Any) -> None:
        self.engine.note_skipped_batch(exc, where, _batch_indices(inputs), self.trainer.state.global_step + 1)

    def _join_gradient_sync(self, orig: Any, model: Any, inputs: Any, num_items: Any, exc: BaseException) -> None:
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
        if _raised_inside(exc, "torch/distributed/fsdp/") or (
                _raised_inside(exc, "torch/nn/modules/module.py") and _is_fsdp(self.trainer.accelerator)):
            raise RuntimeError(
                f"rank {self.trainer.args.process_index}: {type(exc).__name__} inside the FSDP model's forward/backward; "
                "the ranks' collectives cannot be re-aligned, so this rank stops (the others stop at the collective "
                "timeout). Relaunch with `torchrun --max-restarts N`: auto-resume continues from the newest verified "
                "checkpoint") from exc
        ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
        if ddp is not None and _raised_inside(exc, "torch/nn/parallel/distributed.py", "_run_ddp_forward"):
            ddp.require_forward_param_sync = False  # the failed forward already broadcast the buffers
        try:
            free_memory(model)
            orig(model, _first_row(inputs), num_items)
        except Exception as e:  # noqa: BLE001 - nothing more can be done on this rank
            raise RuntimeError(f"rank could not join the step's collectives after {type(exc).__name__}: {e}") from exc

    def _make_log(self, orig):
        def log(logs, *args, **kwargs):
            """The Trainer's logged loss over a window with a skipped non-finite step is fiction: its
            NaN filter puts the window's running mean (0.0 when the window is that one step) in its
            place. Log the mean of the window's finite losses instead, or no loss at all."""
            if not self.passthrough and isinstance(logs, dict) and "loss" in logs:
                (n, n_finite, total), self._log_window = self._log_window, [0, 0, 0.0]
                if n_finite < n:
                    if n_finite:
                        logs["loss"] = total / n_finite
                    else:
                        logs.pop("loss")
                if self._last_window_skipped:  # the norm of the gradients a failed step never had
                    logs.pop("grad_norm", None)
            return orig(logs, *args, **kwargs)

        return log

    def _make_get_grad_norm(self, orig):
        def _get_grad_norm(model, grad_norm=None, *args, **kwargs):
            out = orig(model, grad_norm, *args, **kwargs)
            # FSDP2's norm is a replicated DTensor: the plain value for our stack/gather
            self._grad_norm = out.full_tensor() if hasattr(out, "full_tensor") else out
            return out

        return _get_grad_norm

    def _make_clip_grad_norm(self, orig):
        trainer = self.trainer

        def _clip_grad_norm(model, *args, **kwargs):
            # Measure only: a fixed max_grad_norm clipping first would hide the spike ZClip is there
            # to see. ZClip clips in on_pre_optimizer_step, once the step's (loss, norm) have reached
            # the host in the step's single sync.
            return _measure_grad_norm(trainer.accelerator, model)

        return _clip_grad_norm

    def _heal_in_loop(self, exc: BaseException) -> bool:
        """Exceptions inside forward/backward that a skipped step heals (non-finite sampling
        probabilities from NaN weights, ...). Everything else goes to the orchestrator."""
        return diagnose_exception(exc).failure in _IN_LOOP_FAILURES

    # ------------------------------------------------------------------------------------------
    # objects the actions work on
    # ------------------------------------------------------------------------------------------
    def _objects(self) -> tuple[Any, Any, Any]:
        t = self.trainer
        return t.model, t.optimizer, t.lr_scheduler

    def _device(self) -> Any:
        return self.trainer.args.device

    # the engine's state, under the names the rest of the plugin (and its users' code) reads
    recorder = _engine_attr("recorder")
    policy = _engine_attr("policy")
    ring = _engine_attr("ring")
    monitor = _engine_attr("monitor")
    zclip = _engine_attr("zclip")
    observers = _engine_attr("observers")
    gave_up = _engine_attr("gave_up")
    give_up_reason = _engine_attr("give_up_reason")
    snapshot_interval = _engine_attr("snapshot_interval")
    _ref_report = _engine_attr("ref_report")
    _step_times = _engine_attr("step_times")
    _step_flagged = _engine_attr("step_flagged")
    _rank_rows = _engine_attr("rank_rows")
    _step_exception_kind = _engine_attr("step_exception_kind")

    @property
    def model(self):
        return self.trainer.model

    @property
    def optimizer(self):
        return self.trainer.optimizer

    @property
    def scheduler(self):
        return self.trainer.lr_scheduler

    # ------------------------------------------------------------------------------------------
    # events
    # ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:  # callbacks=[...] on a trainer not found at its __init__
            trainer = _calling_trainer(self)
            if trainer is None:
                logger.error("self-healing: SelfHealingCallback could not find its Trainer; this run is NOT "
                             "protected. Use SelfHealingTrainer(trainer) or SelfHealingCallback(cfg).attach(trainer)")
                return control
            self.attach(trainer)
            self.start_run()
        elif not self.orchestrator_active and not self.passthrough:  # trainer.train() called around the wrapper
            self.start_run()
        self.gave_up = False
        self.give_up_reason = None
        self._reset_step()
        self._log_window = [0, 0, 0.0]  # the Trainer starts a new logging window too
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        self.monitor.amp_scaler = scaler is not None
        self._apply_persisted_lr_scale()
        if self.zclip is not None and args.max_grad_norm and args.max_grad_norm > 0:
            logger.info("self-healing: ZClip is on; the Trainer's fixed max_grad_norm=%s clips only during ZClip's "
                        "%s warm-up steps, then ZClip's adaptive threshold replaces it",
                        args.max_grad_norm, self.zclip.warmup_steps)
        if self.zclip is not None and state.global_step > 0 and load_from_trainer_state(self.zclip, state):
            logger.info("self-healing: ZClip statistics restored from the checkpoint (step %s)", state.global_step)
        self.engine.start(state.global_step)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.trainer is None:  # not attached (see on_train_begin)
            return control
        self._reset_step()
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer is None:  # not attached (see on_train_begin)
            return control
        step = state.global_step + 1
        compat.ensure_grad_norm(self)  # older transformers with max_grad_norm=0 compute no norm
        signals = self._signals(step)
        failed = signals.exception is not None  # the step's loss and norm are stand-ins, not measurements
        self._last_window_skipped = failed
        if isinstance(signals.loss, float):
            finite = math.isfinite(signals.loss) and not failed
            self._log_window = [self._log_window[0] + 1, self._log_window[1] + finite,
                                self._log_window[2] + (signals.loss if finite else 0.0)]
        self.apply_decision(self.engine.judge_step(signals), control)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is None:  # not attached (see on_train_begin)
            return control
        if self.zclip is not None:  # saved into trainer_state.json by the next checkpoint
            save_to_trainer_state(self.zclip, state)
        self.engine.observe_step_time()
        if self.gave_up:
            return control
        if self._agreed_preempt and self.preempted_at is None:
            self._preempt(state.global_step, control)
        self.apply_decision(self.engine.end_step(state.global_step), control)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.trainer is None:  # not attached (see on_train_begin)
            return control
        if logs:
            self.recorder.last_metrics.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
            for m in self.monitors:
                if hasattr(m, "on_log"):
                    for diag in m.on_log(state.global_step, logs) or []:
                        self.engine.apply_advisory(diag, state.global_step)
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.trainer is None:  # not attached (see on_train_begin)
            return control
        for m in self.monitors:
            if metrics and hasattr(m, "on_evaluate"):
                for diag in m.on_evaluate(state.global_step, metrics) or []:
                    self.engine.apply_advisory(diag, state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer is not None and not self.orchestrator_active:
            self.finish("gave_up" if self.gave_up else "completed")
        return control

    # ------------------------------------------------------------------------------------------
    # the decision
    # ------------------------------------------------------------------------------------------
    def _reset_step(self) -> None:
        self._step_loss = None
        self._grad_norm = None
        self._step_exception = None
        self.engine.begin_step()

    def _signals(self, step: int) -> StepSignals:
        """The step's facts, through the engine's one host sync (one gather when distributed,
        which also carries this rank's preemption flag and its own step time for stragglers)."""
        if not is_distributed():
            self._agreed_preempt = self.preempt_signal or 0
            return self.engine.step_signals(step, self._step_loss, self._grad_norm, self._step_exception)
        own = self.watchdog.watchdog.take_own_seconds() if self.watchdog is not None else 0.0  # stragglers
        signals = self.engine.step_signals(step, self._step_loss, self._grad_norm, self._step_exception,
                                           extra=[float(self.preempt_signal or 0), own])
        rows = self._rank_rows
        if self.watchdog is not None:  # each rank's own step time: a persistent straggler is named
            self.watchdog.watchdog.observe_rank_times([r[4] for r in rows], self.trainer.state.global_step + 1)
        self._agreed_preempt = max(int(r[3]) for r in rows)
        if self._agreed_preempt and self.preempt_signal is None:
            self.preempt_signal = self._agreed_preempt
        return signals

    def apply_decision(self, decision: Decision | None, control) -> None:
        """What only the Trainer can do about an engine decision (the engine applied the rest):
        stop its loop, and drop the NaN a skipped step left in its running loss. Whoever hands
        the engine a detection during a Trainer event (the early-warning signals) calls this
        with the decision it got back."""
        if decision is None:
            return
        if decision.stop:
            control.should_training_stop = True
        if decision.skipped:
            self._repair_logged_loss()

    def _preempt(self, step: int, control) -> None:
        """The step is done: ask the Trainer to checkpoint now and stop (it saves whatever its
        save_strategy, "no" included)."""
        self.preempted_at = step
        control.should_save = True
        control.should_training_stop = True
        name = signal.Signals(self._agreed_preempt or self.preempt_signal).name
        diag = Diagnosis(FailureKind.INTERRUPTED, f"{name} received: finished step {step}, checkpointing and exiting "
                         "(run the same command again to resume)", {"signal": name}, [Action.CHECKPOINT], step)
        self.engine.emit(step, diag, [Action.CHECKPOINT.value], message=f"self-healing: {diag.summary}")

    def _repair_logged_loss(self) -> None:
        """With `logging_nan_inf_filter=False` a NaN would stay in the Trainer's running loss sum
        (NaN - NaN is NaN) and every later log would read NaN."""
        compat.repair_running_loss(self.trainer)

    # ------------------------------------------------------------------------------------------
    # snapshots and LR persistence
    # ------------------------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        """What a snapshot carries of the Trainer's own counters (a resume from it restores them)."""
        st = self.trainer.state
        return {"trainer_state": {"epoch": st.epoch, "num_input_tokens_seen": st.num_input_tokens_seen,
                                  "total_flos": st.total_flos}}

    def _apply_persisted_lr_scale(self) -> None:
        """After a disk resume the scheduler comes back with the LR of the checkpoint; an LR cut
        taken since must survive it."""
        sched = self.scheduler
        if sched is None or not hasattr(sched, "base_lrs"):
            return
        if self._orig_base_lrs is None:
            self._orig_base_lrs = list(sched.base_lrs)
            return
        want = [b * self.policy.lr_scale for b in self._orig_base_lrs]
        cur = list(sched.base_lrs)
        if cur and cur[0] > 0 and abs(want[0] / cur[0] - 1) > 1e-6:
            scale_lr(self.optimizer, sched, want[0] / cur[0])

    # ------------------------------------------------------------------------------------------
    # end of run
    # ------------------------------------------------------------------------------------------
    def finish(self, exit_reason: str, exception: BaseException | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        t = self.trainer
        state = getattr(t, "state", None)
        more: dict[str, Any] = {}
        if self.watchdog is not None:
            more.update(self.watchdog.watchdog.postmortem_fields())
        notes = [n for m in self.monitors for n in getattr(m, "notes", [])]
        if notes:  # INFO findings that changed nothing (a GRPO task solved), kept for the record
            more["notes"] = notes
        if extra:
            more.update(extra)
        pm = self.engine.build_postmortem(exit_reason, last_step=getattr(state, "global_step", 0),
                                          max_steps=getattr(state, "max_steps", None), exception=exception,
                                          trainer_class=type(t).__name__, extra=more)
        self.postmortem = pm
        self.engine.write_postmortem(pm, write=t.args.should_save or not hasattr(t.args, "should_save"))
        return pm
