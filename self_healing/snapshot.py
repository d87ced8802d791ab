"""Rollback targets kept in host memory, whatever the user's `save_strategy`.

A snapshot is one device-to-host copy of weights and optimizer state (plus scheduler, RNG and the
plugin's own detector/ZClip state) into buffers that are reused from one snapshot to the next. It
counts as a rollback target only once it is *verified*: its tensors were finite when taken and
training stayed healthy for `verify_steps` steps after it. Host memory needed ≈ parameters +
optimizer state (about 3× the fp32 parameter bytes for AdamW) per kept snapshot.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from .detectors import StateReport


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """accelerate's `AcceleratedOptimizer` keeps the real optimizer in `.optimizer`."""
    while hasattr(optimizer, "optimizer") and isinstance(getattr(optimizer, "optimizer"), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters then floating buffers, deduplicated (tied weights appear once)."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def optimizer_state_tensors(optimizer: Any) -> dict[str, list[torch.Tensor]]:
    """Per state key (`exp_avg`, `exp_avg_sq`, ...), the tensors of every parameter, in param order."""
    opt = unwrap_optimizer(optimizer)
    out: dict[str, list[torch.Tensor]] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                    out.setdefault(k, []).append(v)
    return out


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    if not tensors:
        return None
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.detach())
    parts = []
    for ts in by_device.values():
        norms = torch._foreach_norm(ts)
        parts.append(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).cpu())
    return torch.linalg.vector_norm(torch.stack(parts))


def state_report(model: torch.nn.Module, optimizer: Any, step: int) -> StateReport:
    """Global norms of weights and of each optimizer-state key: one fused pass, one host sync.
    A NaN/Inf anywhere shows up as a non-finite norm."""
    norms: list[torch.Tensor] = []
    keys: list[str] = []
    w = _global_norm([p for p in model.parameters()])
    norms.append(w if w is not None else torch.zeros(()))
    beta2 = None
    if optimizer is not None:
        for k, ts in optimizer_state_tensors(optimizer).items():
            n = _global_norm(ts)
            if n is not None:
                keys.append(k)
                norms.append(n)
        for g in unwrap_optimizer(optimizer).param_groups:
            betas = g.get("betas")
            if isinstance(betas, (tuple, list)) and len(betas) == 2:
                beta2 = float(betas[1])
                break
    values = torch.stack([n.float() for n in norms]).tolist()
    return StateReport(weight_norm=values[0], optimizer_norms=dict(zip(keys, values[1:])), beta2=beta2, step=step)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _host_buffer(t: torch.Tensor) -> torch.Tensor:
    buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda and torch.cuda.is_available())
    return buf


@dataclass
class Snapshot:
    step: int
    weights: list[torch.Tensor]
    optimizer_state: list[dict[str, Any]]
    """Per optimizer parameter (param-group order): its state, tensors in host buffers."""
    scheduler_state: dict[str, Any] | None
    rng_state: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    report: StateReport | None = None
    healthy_steps_after: int = 0
    taken_at: float = 0.0
    copy_seconds: float = 0.0

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.weights)
        for st in self.optimizer_state:
            n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
        return n


def _copy_into(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if not src:
        return
    try:
        torch._foreach_copy_(dst, [s.detach() for s in src], non_blocking=True)
    except (RuntimeError, TypeError):
        for d, s in zip(dst, src):
            d.copy_(s.detach(), non_blocking=True)


class SnapshotRing:
    """The last `keep` snapshots; the oldest one's buffers are reused for the next capture."""

    def __init__(self, keep: int = 3, verify_steps: int = 3) -> None:
        self.keep = keep
        self.verify_steps = verify_steps
        self.snapshots: list[Snapshot] = []
        self.bytes_copied = 0

    # ------------------------------------------------------------------------------------------
    def capture(self, model: torch.nn.Module, optimizer: Any, scheduler: Any, step: int,
                extra: dict[str, Any] | None = None, report: StateReport | None = None) -> Snapshot:
        t0 = time.perf_counter()
        tensors = model_tensors(model)
        opt = unwrap_optimizer(optimizer) if optimizer is not None else None
        recycled = self._pop_recyclable() if len(self.snapshots) >= self.keep else None

        weights = recycled.weights if recycled and _same_shapes(recycled.weights, tensors) else [_host_buffer(t) for t in tensors]
        _copy_into(weights, tensors)

        opt_state: list[dict[str, Any]] = []
        if opt is not None:
            old = recycled.optimizer_state if recycled else []
            src_list, dst_list = [], []
            i = 0
            for group in opt.param_groups:
                for p in group["params"]:
                    st = opt.state.get(p, {})
                    prev = old[i] if i < len(old) else {}
                    entry: dict[str, Any] = {}
                    for k, v in st.items():
                        if isinstance(v, torch.Tensor):
                            b = prev.get(k)
                            if not (isinstance(b, torch.Tensor) and b.shape == v.shape and b.dtype == v.dtype):
                                b = _host_buffer(v)
                            entry[k] = b
                            src_list.append(v)
                            dst_list.append(b)
                        else:
                            entry[k] = copy.deepcopy(v)
                    opt_state.append(entry)
                    i += 1
            _copy_into(dst_list, src_list)
        if any(t.is_cuda for t in tensors) and torch.cuda.is_available():
            torch.cuda.synchronize()  # the host copy must be complete before it is trusted

        snap = Snapshot(
            step=step,
            weights=weights,
            optimizer_state=opt_state,
            scheduler_state=copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
            rng_state=_rng_state(),
            extra=copy.deepcopy(extra or {}),
            report=report,
            taken_at=time.time(),
        )
        snap.copy_seconds = time.perf_counter() - t0
        self.bytes_copied += snap.nbytes()
        self.snapshots.append(snap)
        return snap

    def restore(self, snap: Snapshot, model: torch.nn.Module, optimizer: Any, scheduler: Any = None,
                restore_scheduler: bool = True, restore_rng: bool = True) -> None:
        """Copy a snapshot back in place: the same tensors, so the optimizer and any wrapper keep
        pointing at them and the running `train()` call continues."""
        tensors = model_tensors(model)
        if not _same_shapes(snap.weights, tensors):
            raise RuntimeError("snapshot does not match the model's tensors (was the model changed after it was taken?)")
        with torch.no_grad():
            _copy_into(tensors, snap.weights)
            if optimizer is not None:
                opt = unwrap_optimizer(optimizer)
                i = 0
                for group in opt.param_groups:
                    for p in group["params"]:
                        saved = snap.optimizer_state[i] if i < len(snap.optimizer_state) else {}
                        i += 1
                        if not saved:
                            opt.state.pop(p, None)
                            continue
                        cur = opt.state.setdefault(p, {})
                        for k in list(cur):
                            if k not in saved:
                                del cur[k]
                        for k, v in saved.items():
                            if isinstance(v, torch.Tensor):
                                t = cur.get(k)
                                if isinstance(t, torch.Tensor) and t.shape == v.shape and t.dtype == v.dtype:
                                    t.copy_(v, non_blocking=True)
                                else:
                                    dev = p.device if v.dim() > 0 else v.device
                                    cur[k] = v.to(dev, copy=True)
                            else:
                                cur[k] = copy.deepcopy(v)
        if restore_scheduler and scheduler is not None and snap.scheduler_state is not None:
            scheduler.load_state_dict(copy.deepcopy(snap.scheduler_state))
        if restore_rng:
            _set_rng_state(snap.rng_state)
        if any(t.is_cuda for t in tensors) and torch.cuda.is_available():
            torch.cuda.synchronize()

    def _pop_recyclable(self) -> Snapshot | None:
        """The oldest snapshot, unless it is the newest verified one: rotation never deletes the
        last good state in favour of one not yet proven good."""
        protected = self.latest_verified()
        for i, s in enumerate(self.snapshots):
            if s is not protected:
                return self.snapshots.pop(i)
        return None  # keep == 1 and it is the only good state: hold one extra until the new one is verified

    # ------------------------------------------------------------------------------------------
    def mark_healthy_step(self) -> None:
        for s in self.snapshots:
            s.healthy_steps_after += 1

    def latest_verified(self, before_step: int | None = None) -> Snapshot | None:
        for s in reversed(self.snapshots):
            if s.healthy_steps_after >= self.verify_steps and (before_step is None or s.step <= before_step):
                return s
        return None

    def discard_unverified(self) -> int:
        """A failure inside a snapshot's verification window makes it suspect: drop it."""
        keep = [s for s in self.snapshots if s.healthy_steps_after >= self.verify_steps]
        dropped = len(self.snapshots) - len(keep)
        self.snapshots = keep
        return dropped

    def discard_after(self, step: int) -> None:
        self.snapshots = [s for s in self.snapshots if s.step <= step]

    @property
    def latest(self) -> Snapshot | None:
        return self.snapshots[-1] if self.snapshots else None

    def __len__(self) -> int:
        return len(self.snapshots)


def _same_shapes(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> bool:
    a, b = list(a), list(b)
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(a, b))
