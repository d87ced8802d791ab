"""Disk checkpoints the plugin can trust: verified before a resume, written from a good state
after an exception, and never deleted in favour of a worse one.

`resume_from_checkpoint=True` in transformers takes the highest-numbered `checkpoint-*` without
checking that it is complete or finite; a preemption in the middle of a save leaves exactly such a
directory. `latest_verified_checkpoint()` skips those.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from . import compat
from .io import fsync_dir, fsync_tree, give_normal_modes
from .redact import redacted_copy

logger = logging.getLogger("self_healing")

PLUGIN_DIR = "self-healing"
"""Where the plugin's own resume checkpoints live inside `output_dir`, apart from the user's."""
_WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "adapter_model.bin", "pytorch_model.bin.index.json")
_FSDP_FULL_WEIGHTS, _FSDP_FULL_OPTIMIZER = "pytorch_model_fsdp.bin", "optimizer.bin"
"""accelerate's FSDP FULL_STATE_DICT files (weights from rank 0, optimizer state)."""
_FSDP_SHARDED = ("pytorch_model_fsdp_0", "optimizer_0")
"""accelerate's FSDP SHARDED_STATE_DICT directories (torch.distributed.checkpoint: `.metadata` and
one `*.distcp` per rank)."""
RESUME_INFO = "self-healing-resume.json"
"""In a resume checkpoint of the plugin's that leaves something out (the fast state written at a
preemption whose grace cannot hold a full checkpoint): what was left out and why. Verification
accepts the missing optimizer state only with it; auto-resume reports it."""
FAST_STATE_SAFETY = 1.1
"""The optimizer state goes into the fast state only when this times its estimate (at the rate the
weights were just written) still fits before the deadline."""
_STEP_RE = re.compile(r"(?:checkpoint|resume-step)-(\d+)$")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    m = _STEP_RE.search(Path(path).name)
    return int(m.group(1)) if m else None


def verify_checkpoint(path: str | os.PathLike, check_finite: bool = True) -> tuple[bool, str]:
    """(ok, reason). Complete means trainer state, weights, optimizer and scheduler are all there
    (the Trainer writes `trainer_state.json` last); finite means no NaN/Inf in the weights or the
    optimizer state. Every file that a resume reads is opened the safe way only (safetensors, or
    `torch.load(weights_only=True)`): a truncated or tampered file fails here, with the reason,
    instead of in the middle of the Trainer's resume (or running a pickle's code)."""
    p = Path(path)
    if not p.is_dir():
        return False, "not a directory"
    try:
        ts = json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False, "no trainer_state.json (the save did not finish)"
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as e:
        return False, f"trainer_state.json is unreadable ({e})"
    gs = ts.get("global_step") if isinstance(ts, dict) else None
    if not isinstance(gs, int) or isinstance(gs, bool) or gs < 0:
        return False, "trainer_state.json has no valid global_step (tampered or not a Trainer checkpoint)"
    weights = [p / f for f in (*_WEIGHT_FILES, _FSDP_FULL_WEIGHTS) if (p / f).is_file()]
    sharded_model, sharded_opt = (_dcp_problem(p / d) for d in _FSDP_SHARDED)
    if not weights and sharded_model is not None:
        return False, "no model weights file" if sharded_model == "missing" else sharded_model
    if not any((p / f).is_file() for f in ("optimizer.pt", _FSDP_FULL_OPTIMIZER)) and sharded_opt is not None \
            and "optimizer" not in (resume_info(p) or {}).get("omitted", ()):
        return False, "no optimizer.pt" if sharded_opt == "missing" else sharded_opt
    if not (p / "scheduler.pt").is_file():
        return False, "no scheduler.pt"
    if check_finite and weights:  # a sharded FSDP checkpoint is checked for completeness only (see _dcp_problem)
        bad = _nonfinite_tensor(weights[0], p)
        if bad is not None:
            return False, bad
    for f in [p / "optimizer.pt", p / _FSDP_FULL_OPTIMIZER, p / "scheduler.pt", p / "scaler.pt",
              *sorted(p.glob("rng_state*.pth"))]:
        if f.is_file():
            bad = _unsafe_or_nonfinite(f, check_finite=check_finite and f.name.startswith("optimizer."))
            if bad is not None:
                return False, bad
    return True, "ok"


def resume_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """What a fast resume state of the plugin's left out (its `RESUME_INFO`), or None: a full
    checkpoint, or a file outside the plugin's own directory (not ours to trust)."""
    p = Path(path)
    if p.parent.name != PLUGIN_DIR:
        return None
    try:
        info = json.loads((p / RESUME_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("omitted"), list):
        return None
    return info


def _dcp_problem(d: Path) -> str | None:
    """None when `d` is a complete torch.distributed.checkpoint directory, "missing" when absent,
    else what is wrong. Completeness only: its `.metadata` is a pickle, which the plugin does not
    unpickle (reading it is the resume's own business), so the shards' values are not checked."""
    if not d.is_dir():
        return "missing"
    meta = d / ".metadata"
    if not meta.is_file() or meta.stat().st_size == 0:
        return f"{d.name}/.metadata is missing or empty (the sharded save did not finish)"
    shards = list(d.glob("*.distcp"))
    if not shards or any(s.stat().st_size == 0 for s in shards):
        return f"{d.name} has no shard files, or an empty one (the sharded save did not finish)"
    return None


def _unsafe_or_nonfinite(f: Path, check_finite: bool) -> str | None:
    """Load a `torch.save` file the way the Trainer will on resume (`weights_only=True`; numpy
    RNG state allowed, as transformers allows it) and, when asked, check its tensors are finite."""
    try:
        ctx: Any = contextlib.nullcontext()
        if f.name.startswith("rng_state"):
            ctx = compat.numpy_safe_globals()
        with ctx:
            try:
                obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read safely means "not trusted"
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return f"{f.name} cannot be loaded safely (weights_only=True): {type(e).__name__}: {msg}"
    if check_finite:
        for key, t in _tensors(obj, ""):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"tensor {key} in {f.name} is not finite"
    return None


def _tensors(obj: Any, prefix: str, depth: int = 0):
    if depth > 20:
        return
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}[{k!r}]", depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]", depth + 1)


def _nonfinite_tensor(weights: Path, directory: Path) -> str | None:
    files: list[Path]
    if weights.name.endswith(".index.json"):
        try:
            index = json.loads(weights.read_text())
            files = sorted({directory / f for f in index.get("weight_map", {}).values()})
        except (json.JSONDecodeError, OSError) as e:
            return f"{weights.name} is unreadable ({e})"
    else:
        files = [weights]
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as st:
                    for key in st.keys():
                        t = st.get_tensor(key)
                        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                            return f"tensor {key!r} in {f.name} is not finite"
            else:
                sd = torch.load(f, map_location="cpu", weights_only=True)
                for key, t in sd.items():
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        return f"tensor {key!r} in {f.name} is not finite"
        except Exception as e:  # noqa: BLE001 - any failure to read means "not trusted"
            return f"{f.name} cannot be read ({type(e).__name__}: {e})"
    return None


def candidate_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint the Trainer or the plugin wrote under `output_dir`, newest step first."""
    out = Path(output_dir)
    found = [p for p in out.glob("checkpoint-*") if p.is_dir()]
    found += [p for p in (out / PLUGIN_DIR).glob("resume-step-*") if p.is_dir()]
    found = [p for p in found if checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: (checkpoint_step(p), p.parent.name != PLUGIN_DIR), reverse=True)


def latest_verified_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[dict[str, Any]]]:
    """The newest checkpoint that passes `verify_checkpoint`, and the ones skipped on the way."""
    skipped: list[dict[str, Any]] = []
    for p in candidate_checkpoints(output_dir):
        ok, why = verify_checkpoint(p)
        if ok:
            return p, skipped
        skipped.append({"path": str(p), "reason": why})
        logger.warning("self-healing: not resuming from %s: %s", p, why)
    return None, skipped


def write_resume_checkpoint(trainer: Any, step: int, extra_state: dict[str, Any] | None = None,
                            deadline: float | None = None) -> Path:
    """Save the trainer's *current* in-memory state as a resumable checkpoint at `step`, in the
    plugin's own directory, written to a temp dir and renamed so it is complete or absent. Every
    rank calls it (each saves its own RNG state; sharded states need all ranks); the main process
    alone creates, renames and prunes directories.

    `deadline` (a `time.monotonic()` time) asks for the *fast* state of a preemption whose grace
    cannot hold a full checkpoint: the weights first, timed; the optimizer state (Adam's moments,
    twice the weights) only if, at the rate the weights went to disk, it will be there before the
    deadline; else the scheduler, AMP scaler, RNG and trainer state without it, and a `RESUME_INFO`
    saying so (a resume re-initialises the moments). Older resume checkpoints are kept (a partial
    state never replaces a full one)."""
    from .distributed import agree_max, barrier

    main = bool(getattr(trainer.args, "should_save", True))
    root = Path(trainer.args.output_dir) / PLUGIN_DIR
    final = root / f"resume-step-{step}"
    tmp = root / f".tmp-resume-step-{step}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    barrier()
    state = trainer.state
    saved = (state.global_step, state.epoch, state.log_history)
    try:
        state.global_step = step
        if extra_state:
            for k, v in extra_state.items():
                setattr(state, k, v)
        state.log_history = [h for h in state.log_history if h.get("step", 0) <= step]
        t0 = time.monotonic()
        trainer.save_model(str(tmp), _internal_call=True)
        omit = 0.0
        if deadline is not None and main:
            est = _optimizer_seconds(trainer, time.monotonic() - t0)
            omit = 1.0 if time.monotonic() + FAST_STATE_SAFETY * est > deadline else 0.0
            info = {"kind": "preemption_fast_state", "step": step, "omitted": ["optimizer"] if omit else [],
                    "optimizer_seconds_estimate": round(est, 3),
                    "seconds_left": round(deadline - time.monotonic(), 3)}
        if deadline is not None:
            omit = agree_max(omit)  # every rank writes the same parts
        if omit:
            _save_state_without_optimizer(trainer, tmp, main)
        else:
            compat.save_training_state(trainer, str(tmp))
        if main and deadline is not None:
            (tmp / RESUME_INFO).write_text(json.dumps(info), encoding="utf-8")
        if main:
            if (tmp / "training_args.bin").is_file():  # the Trainer pickles its args whole, hub_token included
                torch.save(redacted_copy(trainer.args), str(tmp / "training_args.bin"))
            state.save_to_json(str(tmp / "trainer_state.json"))
    finally:
        state.global_step, state.epoch, state.log_history = saved
    barrier()
    if main:
        give_normal_modes(tmp)  # the umask's modes, as for any file (safetensors writes 0600)
        fsync_tree(tmp)  # on disk before the rename makes it a checkpoint
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        if deadline is None:
            prune_resume_checkpoints(trainer.args.output_dir, keep=final)
    barrier()
    return final


def _optimizer_seconds(trainer: Any, weight_seconds: float) -> float:
    """The optimizer state's write time at the rate the weights were just written (bytes)."""
    def nbytes(obj: Any) -> int:  # tied weights are written once
        return sum({t.data_ptr(): t.numel() * t.element_size() for _, t in _tensors(obj, "")}.values())

    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return weight_seconds * nbytes(dict(getattr(opt, "state", {}))) / max(nbytes(trainer.model.state_dict()), 1)


def _save_state_without_optimizer(trainer: Any, out: Path, main: bool) -> None:
    """Everything `compat.save_training_state` writes but the optimizer state: the scheduler (as
    the Trainer saves it), the AMP scaler and every rank's RNG state."""
    if main and trainer.lr_scheduler is not None:
        torch.save(trainer.lr_scheduler.state_dict(), str(out / "scheduler.pt"))
    compat.save_training_state(trainer, str(out), optimizer=False)


def restore_scheduler_without_optimizer(trainer: Any, checkpoint: str | os.PathLike | None) -> bool:
    """After the Trainer's `_load_optimizer_and_scheduler`: a fast state without the optimizer
    state makes it load neither, so the LR schedule would restart at its first step; load the
    scheduler, and put its last LR into the fresh optimizer's groups (the Trainer gets them from the
    optimizer state it loads). True when this was such a checkpoint."""
    info = resume_info(checkpoint) if checkpoint else None
    if not info or "optimizer" not in info["omitted"] or trainer.lr_scheduler is None:
        return False
    f = Path(checkpoint) / "scheduler.pt"
    if f.is_file():
        trainer.lr_scheduler.load_state_dict(torch.load(str(f), map_location="cpu", weights_only=True))
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        for group, lr in zip(opt.param_groups, trainer.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    return True


def preemption_checkpoint(trainer: Any, step: int, deadline: float | None = None,
                          full_seconds: float | None = None) -> tuple[Path | None, str | None]:
    """After the Trainer's save at a preemption (`step` finished): the checkpoint a relaunch will
    resume from, and what was wrong on the way (None when nothing was).

    The Trainer's `checkpoint-<step>` when it verifies. It does not with `save_only_model=True`
    (no optimizer, scheduler or RNG state: a resume from it would silently restart the optimizer,
    and auto-resume refuses it), nor when the save was cut short or skipped: then the in-memory
    state, which is exactly that of the finished step, is written as a resume checkpoint in the
    plugin's own directory (`resume-step-<step>`), which `latest_verified_checkpoint` finds: a full
    one when the run's own save time (`full_seconds`, its longest recent save) fits before `deadline` (the end of the
    preemption grace), else the fast state (`write_resume_checkpoint`'s `deadline`), kept when it
    was already written at the step's end. Every rank calls this; the main process decides and
    the ranks agree before any of them writes."""
    from .distributed import agree_max

    main = bool(getattr(trainer.args, "should_save", True))
    user = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    fast = Path(trainer.args.output_dir) / PLUGIN_DIR / f"resume-step-{step}"
    ok, why = verify_checkpoint(user)
    if agree_max(0.0 if ok else 1.0) == 0.0:
        if main and resume_info(fast) is not None:  # a fast state of this step, superseded by the full one
            shutil.rmtree(fast, ignore_errors=True)
        return user, None
    problem = f"{user.name}: {why}"
    fits = not too_late(deadline, full_seconds)
    have_fast = resume_info(fast) is not None and verify_checkpoint(fast)[0]
    go_fast = agree_max(1.0 if main and not fits and fast_state_possible(trainer) else 0.0) > 0
    if go_fast and not agree_max(1.0 if main and have_fast else 0.0):
        left = deadline - time.monotonic() if deadline is not None else float("nan")
        if main:
            logger.warning("self-healing: a full checkpoint of step %s takes ~%.1fs here, more than the %.1fs of "
                           "preemption grace left: writing the fastest resumable state first", step, full_seconds,
                           left)
        try:
            write_resume_checkpoint(trainer, step, deadline=deadline)
        except Exception as e:  # noqa: BLE001 - the full one below is the fallback
            problem += f"; the fast resumable state could not be written ({type(e).__name__}: {e})"
            go_fast = False
        else:
            ok, why_fast = verify_checkpoint(fast)
            if not ok:
                problem += f"; the fast resumable state {fast} does not verify ({why_fast})"
                go_fast = False
        if go_fast:  # the full one only if there is time for it still
            go_fast = agree_max(1.0 if main and too_late(deadline, full_seconds) else 0.0) > 0
    if go_fast:
        info = resume_info(fast) or {}
        left_out = ", ".join(info.get("omitted") or ()) or "nothing the resume reads"
        return fast, (f"{problem}; the full checkpoint (~{full_seconds:.1f}s, the run's own saves) did not fit in the "
                      f"preemption grace: the fast resumable state {fast.name} was written instead (left out: "
                      f"{left_out})")
    if main:
        logger.warning("self-healing: the preemption checkpoint %s cannot be resumed from (%s)%s; writing a full "
                       "resume checkpoint (weights, optimizer, scheduler, RNG, trainer state) of step %s", user, why,
                       " because save_only_model=True" if getattr(trainer.args, "save_only_model", False) else "",
                       step)
    try:
        path = write_resume_checkpoint(trainer, step)
    except Exception as e:  # noqa: BLE001 - the caller reports it; the run is stopping either way
        return None, f"{problem}; the full resume checkpoint could not be written ({type(e).__name__}: {e})"
    ok, why = verify_checkpoint(path)
    if not ok:
        return None, f"{problem}; the full resume checkpoint {path} does not verify either ({why})"
    return path, problem


def too_late(deadline: float | None, seconds: float | None) -> bool:
    """Would `seconds` of work started now end after `deadline`? False when either is unknown."""
    return deadline is not None and seconds is not None and time.monotonic() + seconds > deadline


def fast_state_possible(trainer: Any) -> bool:
    """The fast state leaves the optimizer state out; a sharded one (FSDP, DeepSpeed) is saved and
    loaded by collectives of its own, which it does not attempt."""
    return not (getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False))


def prune_resume_checkpoints(output_dir: str | os.PathLike, keep: Path) -> list[str]:
    """Delete the plugin's older resume checkpoints once `keep` exists and verifies."""
    removed: list[str] = []
    if not verify_checkpoint(keep, check_finite=False)[0]:
        return removed
    for p in (Path(output_dir) / PLUGIN_DIR).glob("resume-step-*"):
        if p.resolve() != keep.resolve():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
    return removed


def free_disk_space(output_dir: str | os.PathLike, protect: Path | None = None) -> list[str]:
    """After ENOSPC: remove half-written checkpoints and the plugin's own older resume
    checkpoints; never the newest verified checkpoint or `protect`. A user's checkpoint counts as
    half-written only when it has no `trainer_state.json` (the Trainer writes it last): one that is
    complete but fails verification (a layout the plugin does not know, such as DeepSpeed's, or
    non-finite values) is the user's to judge, not ours to delete."""
    removed: list[str] = []
    newest_good, _ = latest_verified_checkpoint(output_dir)
    keep = {p.resolve() for p in (newest_good, protect) if p is not None}
    root = Path(output_dir)
    for p in list(root.glob("checkpoint-*")) + list((root / PLUGIN_DIR).glob("*")):
        if not p.is_dir() or p.resolve() in keep:
            continue
        ours = p.parent.name == PLUGIN_DIR
        if ours or not (p / "trainer_state.json").is_file():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
    return removed
