"""Rollback targets kept in host memory (or spilled to disk), whatever the user's `save_strategy`.

A snapshot is one device-to-host copy of weights and optimizer state (plus scheduler, RNG and the
plugin's own detector/ZClip state). It counts as a rollback target only once it is *verified*: its
tensors were finite when taken and training stayed healthy for `verify_steps` steps after it.

Cost, and what makes it cheap:

- **One reused buffer.** A snapshot's tensors live in one flat host buffer per dtype, views into
  it standing in for each tensor. The ring recycles its oldest snapshot's buffer for the next
  capture, so once the ring is full no capture allocates (nor pins, nor page-faults) memory.
- **Pinned and non-blocking on CUDA.** The buffer is pinned when the model is on a CUDA device;
  the copy runs on a side stream, after the work already queued, and the host goes on at once.
  An optimizer step pre-hook makes the compute stream wait for the copy (on the GPU, the host
  never blocks) before the next update can touch the tensors being copied; anything else that
  writes weights in place outside the optimizer must call `SnapshotRing.fence()` first. A restore
  waits for the copy to be complete. On CPU a copy is a plain memcpy.
- **Rarely.** How often is the callback's business (`snapshot_every_steps`; "auto" picks the
  interval from the measured cost so that it stays under `snapshot_budget` of step time).

Host memory: about `keep` x (parameters + optimizer state) bytes: with fp32 AdamW that is 12 bytes
per trainable parameter per snapshot (weights, `exp_avg`, `exp_avg_sq`), so 3 snapshots of a 1B
model take ~36 GB. With `spill_dir` set, the tensors go to a safetensors file per snapshot instead,
written one tensor at a time (host memory then peaks at the largest single tensor); only the small
non-tensor state (scheduler, RNG, detector statistics, a few KB) stays in memory. A spilled file is
checked (size, header, every tensor's name/shape/dtype) before anything is copied back, so a
truncated or damaged file raises `SnapshotError` and leaves the live state untouched.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import struct
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from . import compat
from .detectors import (EPOCH_KEY, FIRST_LOSS_KEY, GROWTH_KEY, LOSS_KEY, LOSS_SCATTER_KEY, REACH_KEY, StateReport,
                        adam_update_bound, adamax_update_bound, current_losses)
from .distributed import local_tensor, reshard
from .io import as_float


class SnapshotError(RuntimeError):
    """A snapshot that cannot be restored: its spilled file is missing, truncated or damaged, or
    the model's tensors no longer match it. The live state is left as it was."""


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """accelerate's `AcceleratedOptimizer` keeps the real optimizer in `.optimizer`."""
    while hasattr(optimizer, "optimizer") and isinstance(getattr(optimizer, "optimizer"), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters then floating buffers, deduplicated (tied weights appear once), as this rank's
    local tensors (shards under FSDP2)."""
    reshard(model)
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(local_tensor(t))
    return out


def param_keyed_states(group: dict[str, Any]) -> list[str]:
    """Keys of a param group that hold per-parameter state (a dict keyed by parameter tensors):
    GrokAdamW keeps its `exp_avg`/`exp_avg_sq`/`grok_ema` in `group["state"][p]`, not in
    `optimizer.state`."""
    out = []
    for k, v in group.items():
        if k != "params" and isinstance(v, dict) and v and all(isinstance(x, torch.Tensor) for x in v):
            out.append(k)
    return out


def iter_param_states(opt: Any) -> Iterable[tuple[int, str | None, torch.Tensor, dict[str, Any]]]:
    """(group index, where, param, state) for every per-parameter state the optimizer keeps:
    `where` is None for `optimizer.state[p]`, else the param-group key holding it."""
    for gi, group in enumerate(opt.param_groups):
        held = param_keyed_states(group)
        for p in group["params"]:
            st = opt.state.get(p) if hasattr(opt.state, "get") else None
            if st:
                yield gi, None, p, st
            for k in held:
                st = group[k].get(p)
                if isinstance(st, dict) and st:
                    yield gi, k, p, st


def optimizer_state_tensors(optimizer: Any) -> dict[str, list[torch.Tensor]]:
    """Per state key (`exp_avg`, `exp_avg_sq`, `state1`, `absmax2`, `step`...), the (local) tensors
    of every parameter, in param order: every floating tensor the optimizer keeps per parameter,
    in `optimizer.state` or in a param group (GrokAdamW), 0-dim ones included. Integer tensors
    (bitsandbytes' 8-bit codes) have no NaN to look for; their float scales (`absmax*`) do."""
    opt = unwrap_optimizer(optimizer)
    out: dict[str, list[torch.Tensor]] = {}
    for _, _, _, st in iter_param_states(opt):
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 0:
                out.setdefault(str(k), []).append(local_tensor(v))
    return out


def second_moment_beta(opt: Any) -> float | None:
    """beta2 of an Adam-like optimizer (`betas=(b1, b2[, b3])`, or StableAdamW-style `beta2`), for
    the second-moment decay test; None when the test does not apply: torch-optimi debiases its
    betas (its effective beta2 starts at 0 and climbs to beta2, so early decay is far faster), and
    optimizers without such a key (Adafactor's decay_rate schedule, RMSprop...) are not covered."""
    if type(opt).__module__.split(".")[0] == "optimi":
        return None
    for g in opt.param_groups:
        betas = g.get("betas")
        if isinstance(betas, (tuple, list)) and len(betas) >= 2:
            try:
                return float(betas[1])
            except (TypeError, ValueError):
                return None
        b2 = g.get("beta2")
        if isinstance(b2, (int, float, torch.Tensor)) and not isinstance(b2, bool):
            return float(b2)
    return None


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    if not tensors:
        return None
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.detach())
    parts = []
    for ts in by_device.values():
        norms = compat.foreach_norm(ts)
        parts.append(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).cpu())
    return torch.linalg.vector_norm(torch.stack(parts))


# ------------------------------------------------------------------------------------------------
# How far the optimizer's own updates could have moved the weights (the finite corruption test)
# ------------------------------------------------------------------------------------------------
class UpdateReach:
    """Process-wide odometers of how far optimizer steps could move the weights.

    A post-step hook on each optimizer that `state_report` has seen adds, per step, an upper
    bound on the norm of the update it just applied: the LR of each param group as used x the
    per-element bound of its update rule x sqrt(elements updated). Adam/AdamW/Adamax/Adagrad/
    RMSprop (not centered) have a constant per-element bound (see `detectors.adam_update_bound`);
    SGD's step is lr x its momentum buffer or gradient (after clipping), measured on the device
    without a host sync and folded in at the next `state_report`; transformers' Adafactor clips
    the RMS of its update. Weight decay can only shrink weights unless lr x decay > 2, which
    goes into the multiplicative odometer. An optimizer whose rule is not known here (a subclass,
    bitsandbytes, GrokAdamW, schedule-free, DeepSpeed's...) gets no odometer: its reports carry
    none, and only non-finite values or the loss can then condemn the weights.

    Each optimizer has its own odometers (from 0, in float64) and an epoch number that goes into
    its reports; two reports of different optimizers (a snapshot of an earlier `train()`) are not
    compared. A process-wide odometer was tried first: after a run at a huge LR it reached 1e12+,
    where a small-LR step's bound is below its ulp and adds nothing (a false positive).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.epochs = 0
        self.reach = 0.0  # the old process-wide odometers: unused now (tests may still reset them)
        self.log_growth = 0.0
        self.optimizers: "weakref.WeakKeyDictionary[Any, _OptimizerReach]" = weakref.WeakKeyDictionary()

    def track(self, opt: Any) -> "_OptimizerReach | None":
        """The optimizer's reach state, installing its hook the first time."""
        try:
            info = self.optimizers.get(opt)
        except TypeError:
            return None
        if info is None:
            info = _OptimizerReach(self, opt)
            try:
                self.optimizers[opt] = info
            except TypeError:
                return None
        return info


REACH = UpdateReach()


class _OptimizerReach:
    """The per-optimizer part of `UpdateReach`: its rule, per-group step counts, its hook."""

    def __init__(self, owner: UpdateReach, opt: Any) -> None:
        self.owner = owner
        self.rule = _rule_for(opt)
        self.known = self.rule is not None and hasattr(opt, "register_step_post_hook")
        self.reach = 0.0
        """What the hook added: written by the hook alone, so its steady path needs no lock."""
        self.folded = 0.0
        """What `fold` added from the device accumulators (SGD), under the owner's lock."""
        self.log_growth = 0.0
        self.device_acc: dict[torch.device, torch.Tensor] = {}
        owner.epochs += 1
        self.epoch = float(owner.epochs)
        """Which optimizer the odometers belong to: reports of two optimizers are not compared (a
        process-wide odometer reached 1e12+ after a huge-LR run, where a small step adds nothing)."""
        self.steps: dict[int, int] = {}
        self.betas: dict[int, Any] = {}
        self.peak: dict[int, float] = {}
        self.sizes: dict[int, tuple[list, int, int]] = {}
        """Per param group: (its params list, its length, its elements), for `elements`."""
        self.steady: list[tuple[list, int, tuple, float, float, float, list]] | None = None
        """Adam's usual step, per group: (params list, its length, betas as seen, b1, b2,
        sqrt(elements), [t0, adam_update_bound(b1, b2, t) for the 256 steps from t0]);
        `_steady_step` then needs no call per group, the bound is a lookup."""
        self.handle = None
        if self.known:
            ref = weakref.ref(self)

            def hook(optimizer, args, kwargs):  # never lets an error escape into optimizer.step()
                me = ref()
                if me is not None:
                    me.after_step(optimizer)

            self.handle = opt.register_step_post_hook(hook)
            if hasattr(opt, "register_load_state_dict_post_hook"):
                def loaded(optimizer):  # its step counts may be anyone's now: read them again
                    me = ref()
                    if me is not None:
                        me.steps.clear()
                        me.steady = None

                opt.register_load_state_dict_post_hook(loaded)

    def after_step(self, opt: Any) -> None:
        try:
            if self.steady is not None and self._steady_step(opt.param_groups):
                return
            total, growth, dev = 0.0, 0.0, []
            for gi, group in enumerate(opt.param_groups):
                params = group["params"]
                # The group stepped if one parameter has a gradient (the first, almost always). A
                # per-element bound needs only how many elements moved, at most the group's: a
                # parameter without a gradient is not moved, so counting it only loosens the bound
                # (never a false alarm), and the group's size is counted once, not a Python call
                # per parameter every step. A rule that reads the gradients picks its own.
                if not any(p.grad is not None for p in params):
                    continue
                if gi not in self.steps:  # resumed optimizers start at their saved step, not 1
                    self.steps[gi] = _saved_step(opt, group)
                self.steps[gi] += 1
                b, a = self.rule(self, opt, gi, group, params, self.elements(gi, params))
                if b is None:
                    raise _Unknown
                if isinstance(b, torch.Tensor):
                    dev.append(b)
                else:
                    total += b
                growth = max(growth, math.log(a) if a > 1 else 0.0)
            with self.owner.lock:
                if math.isfinite(total) and math.isfinite(growth):  # else: non-finite weights, see fold()
                    self.reach += total
                    self.log_growth += growth
                for t in dev:
                    self.add_device(t)
            self.steady = self._steady_groups(opt.param_groups)
        except Exception:  # noqa: BLE001 - an unknown layout: no odometer for this optimizer, ever
            self.known = False
            if self.handle is not None:
                self.handle.remove()
                self.handle = None

    def _steady_groups(self, groups: list[dict[str, Any]]) -> list[tuple] | None:
        """What `_steady_step` checks each group against, or None where it does not apply (not
        Adam/AdamW's bound, betas that are not two floats or not those seen)."""
        if getattr(self.rule, "bound", None) is not adam_update_bound:
            return None
        steady = []
        for gi, g in enumerate(groups):
            betas = g.get("betas")
            if type(betas) is not tuple or len(betas) != 2 or not all(type(x) is float for x in betas) \
                    or self.betas.get(gi, betas) != betas:
                return None
            table = self.steady[gi][6] if self.steady is not None and gi < len(self.steady) \
                and self.steady[gi][2] == betas else [0, []]
            steady.append((g["params"], len(g["params"]), betas, *betas, math.sqrt(self.elements(gi, g["params"])),
                           table))
        return steady

    def _steady_step(self, groups: list[dict[str, Any]]) -> bool:
        """`after_step` for Adam/AdamW's usual step, in one pass (the hook runs right after the
        optimizer touched every weight, when each call and dict costs several times its warm cost):
        the same bound, lr x adam_update_bound(b1, b2, t) x sqrt(elements) per group that stepped,
        and |1 - lr x decay| > 1 into the growth odometer. False, with nothing changed, when any
        group is not as it was (its list, betas, a non-float LR or decay): the general path then."""
        steady, steps = self.steady, self.steps
        if len(groups) != len(steady):
            return False
        total, growth, moved = 0.0, 0.0, []
        for gi, group in enumerate(groups):
            params, n, betas, b1, b2, root, table = steady[gi]
            lr, wd = group["lr"], group.get("weight_decay")
            if (group["params"] is not params or len(params) != n or type(lr) is not float or type(wd) is not float
                    or group.get("betas") != betas):
                return False
            if n == 0 or (params[0].grad is None and not any(p.grad is not None for p in params)):
                continue
            if gi not in steps:  # its first step: the general path reads its saved step count
                return False
            t = steps[gi] + 1
            k = t - table[0]
            if 0 <= k < len(table[1]):
                per = table[1][k]
            else:  # the group's next 256 steps (the list is replaced, so a refusal below changes nothing)
                table[0], table[1] = t, [adam_update_bound(b1, b2, t + i) for i in range(256)]
                per = table[1][0]
            if per == math.inf:
                return False
            moved.append((gi, t))
            lr = abs(lr)
            total += lr * per * root
            a = abs(1.0 - lr * wd)
            if a > 1.0:
                growth = max(growth, math.log(a))
        for gi, t in moved:
            steps[gi] = t
        if math.isfinite(total) and math.isfinite(growth):  # the hook alone writes these: no lock
            self.reach += total
            self.log_growth += growth
        return True

    def elements(self, gi: int, params: list[torch.Tensor]) -> int:
        """The elements of param group `gi` (`params`), counted once per list."""
        cached = self.sizes.get(gi)
        if cached is None or cached[0] is not params or cached[1] != len(params):
            cached = self.sizes[gi] = (params, len(params), _count(params))
        return cached[2]

    def add_device(self, value: torch.Tensor) -> None:
        acc = self.device_acc.get(value.device)
        if acc is None:
            self.device_acc[value.device] = value.detach().double() if value.device.type == "cpu" else value.detach().float()
        else:
            acc.add_(value.detach().to(acc.dtype))

    def pending(self) -> list[torch.Tensor]:
        """Device accumulators still to fold in (read in the report's one host sync)."""
        return list(self.device_acc.values())

    def fold(self, values: list[float]) -> None:
        """Add the device accumulators' values (as read) to the host odometer and zero them. A
        non-finite value comes from a non-finite update, which left non-finite weights behind
        (condemned by that alone, then rolled back past every step folded here): it adds nothing."""
        for v in values:
            if math.isfinite(v):
                self.folded += v
        for acc in self.device_acc.values():
            acc.zero_()


class _Unknown(Exception):
    pass


def _saved_step(opt: Any, group: dict[str, Any]) -> int:
    best = 0
    for p in group["params"]:
        st = opt.state.get(p) if hasattr(opt.state, "get") else None
        v = as_float(st.get("step")) if st else None
        if v is not None and math.isfinite(v):
            best = max(best, int(v))
    return best


def _count(ps: list[torch.Tensor]) -> int:
    return sum(local_tensor(p).numel() for p in ps)


def _decay_growth(lr: float, wd: Any) -> float:
    """Weight decay w <- w (1 - lr wd) scales the norm by |1 - lr wd| <= 1 unless lr wd > 2."""
    x = lr * (as_float(wd) or 0.0)
    return max(1.0, abs(1.0 - x))


def _adam_rule(bound_fn):
    def rule(me: _OptimizerReach, opt: Any, gi: int, group: dict[str, Any], ps: list[torch.Tensor], n: int):
        lr, betas, wd = group.get("lr"), group.get("betas"), group.get("weight_decay")
        seen = me.betas.get(gi)
        if type(lr) is float and type(betas) is tuple and betas == seen and type(wd) is float:
            b1, b2 = seen  # every step of a usual run: plain floats, the betas as before
        else:
            lr = as_float(lr)
            if lr is None or not isinstance(betas, (tuple, list)) or len(betas) != 2:
                return None, 1.0
            b1, b2 = as_float(betas[0]), as_float(betas[1])
            if b1 is None or b2 is None:
                return None, 1.0
            if me.betas.setdefault(gi, (b1, b2)) != (b1, b2):
                return None, 1.0  # betas changed during the run: the bound assumes constant ones
        per = bound_fn(b1, b2, me.steps[gi])
        if not math.isfinite(per):
            return None, 1.0
        lr = abs(lr)
        return lr * per * math.sqrt(n), _decay_growth(lr, wd)
    rule.bound = bound_fn  # type: ignore[attr-defined]  # Adam's own: `_steady_step` applies
    return rule


def _adagrad_rule(me, opt, gi, group, ps, n):
    lr = as_float(group.get("lr"))
    if lr is None or (as_float(group.get("lr_decay")) or 0.0) < 0:
        return None, 1.0
    return abs(lr) * math.sqrt(n), 1.0  # |g| / sqrt(sum of g^2, g included) <= 1


def _rmsprop_rule(me, opt, gi, group, ps, n):
    lr, alpha, mom = as_float(group.get("lr")), as_float(group.get("alpha")), as_float(group.get("momentum")) or 0.0
    if lr is None or alpha is None or group.get("centered") or not (0.0 <= alpha < 1.0) or not (0.0 <= mom < 1.0):
        return None, 1.0
    per = 1.0 / math.sqrt(1.0 - alpha) / (1.0 - mom)  # |g| / sqrt(v) <= 1/sqrt(1-alpha); momentum sums it
    return abs(lr) * per * math.sqrt(n), 1.0


def _sgd_rule(me, opt, gi, group, ps, n):
    """w <- w - lr (g + wd w) without momentum; w <- w - lr buf with it; nesterov:
    w <- w - lr (g + wd w + mu buf). Bound: lr (||g|| + max(mu, 1) ||buf||), times |1 - lr wd|."""
    lr, mom = as_float(group.get("lr")), as_float(group.get("momentum")) or 0.0
    if lr is None or mom < 0:
        return None, 1.0
    ps = [p for p in ps if p.grad is not None]  # the parameters this step moved
    grads = [local_tensor(p.grad).detach() for p in ps]
    terms = []
    if mom == 0 or group.get("nesterov"):
        terms.append(_device_norm(grads))
    if mom > 0:
        bufs = [local_tensor(opt.state[p]["momentum_buffer"]).detach() for p in ps
                if isinstance(opt.state.get(p, {}).get("momentum_buffer"), torch.Tensor)]
        if bufs:
            terms.append(_device_norm(bufs) * max(mom, 1.0))
        elif not terms:
            terms.append(_device_norm(grads))
    total = terms[0] if len(terms) == 1 else terms[0] + terms[1].to(terms[0].device)
    return total * abs(lr), _decay_growth(abs(lr), group.get("weight_decay"))


def _device_norm(ts: list[torch.Tensor]) -> torch.Tensor:
    devs = {t.device for t in ts}
    if len(devs) == 1:
        return torch.linalg.vector_norm(torch.stack([n.float() for n in compat.foreach_norm(ts)]))
    first = ts[0].device
    parts = [torch.linalg.vector_norm(torch.stack([n.float() for n in compat.foreach_norm([t for t in ts if t.device == d])])).to(first)
             for d in devs]
    return torch.linalg.vector_norm(torch.stack(parts))


def _adafactor_rule(me, opt, gi, group, ps, n):
    """transformers' Adafactor: the update's RMS is clipped to `clip_threshold` per tensor, then
    multiplied by the LR: `lr` or, with `relative_step`, min(1e-2, ...) <= 1e-2; with
    `scale_parameter` also by max(eps2, RMS(p)) (multiplicative growth, no first moment)."""
    clip = as_float(group.get("clip_threshold"))
    r = 1e-2 if group.get("relative_step") else as_float(group.get("lr"))
    if clip is None or r is None or clip < 0:
        return None, 1.0
    r = abs(r)
    n = math.sqrt(n)
    momentum = group.get("beta1") is not None
    if group.get("scale_parameter"):
        if momentum:
            return None, 1.0
        eps = group.get("eps")
        eps2 = as_float(eps[1]) if isinstance(eps, (tuple, list)) and len(eps) == 2 else None
        if eps2 is None:
            return None, 1.0
        return r * clip * eps2 * n, (1.0 + r * clip) * _decay_growth(r, group.get("weight_decay"))
    b = r * clip * n
    if momentum:  # exp_avg is a convex combination of past (lr x clipped) updates
        b = me.peak[gi] = max(b, me.peak.get(gi, 0.0))
    return b, _decay_growth(r, group.get("weight_decay"))


def _rule_for(opt: Any):
    """The update-rule bound for the optimizer's exact class (a subclass may change the rule)."""
    cls = type(opt)
    torch_rules = {torch.optim.Adam: _adam_rule(adam_update_bound), torch.optim.AdamW: _adam_rule(adam_update_bound),
                   torch.optim.Adamax: _adam_rule(adamax_update_bound), torch.optim.Adagrad: _adagrad_rule,
                   torch.optim.RMSprop: _rmsprop_rule, torch.optim.SGD: _sgd_rule}
    if cls in torch_rules:
        return torch_rules[cls]
    if cls.__name__ == "Adafactor" and cls.__module__ == "transformers.optimization":
        return _adafactor_rule
    return None


def state_report(model: torch.nn.Module, optimizer: Any, step: int) -> StateReport:
    """Global norms of weights and of each optimizer-state key, and the update odometers: one
    fused pass, one host sync. A NaN/Inf anywhere shows up as a non-finite norm.
    `report.seconds` is what it took."""
    t0 = time.perf_counter()
    norms: list[torch.Tensor] = []
    keys: list[str] = []
    reshard(model)
    w = _global_norm([local_tensor(p) for p in model.parameters()])  # under FSDP2: this rank's shard
    norms.append(w if w is not None else torch.zeros(()))
    beta2 = None
    tracked = None
    pending: list[torch.Tensor] = []
    if optimizer is not None:
        opt = unwrap_optimizer(optimizer)
        for k, ts in optimizer_state_tensors(opt).items():
            n = _global_norm(ts)
            if n is not None:
                keys.append(k)
                norms.append(n)
        beta2 = second_moment_beta(opt)
        tracked = REACH.track(opt)
        if tracked is not None and tracked.known:
            with REACH.lock:
                pending = [t.cpu() for t in tracked.pending()]
    values = torch.stack([n.double().reshape(()) for n in norms] + [t.double().reshape(()) for t in pending]).tolist()
    extra = values[len(norms):]
    values = values[:len(norms)]
    opt_norms = dict(zip(keys, values[1:]))
    if tracked is not None and tracked.known:
        with REACH.lock:
            tracked.fold(extra)
            opt_norms[REACH_KEY] = tracked.reach + tracked.folded
            opt_norms[GROWTH_KEY] = tracked.log_growth
            opt_norms[EPOCH_KEY] = tracked.epoch
    loss, first, scatter = current_losses()  # the run's loss, for a blow-up the loss must confirm
    if loss is not None and first is not None and math.isfinite(loss) and math.isfinite(first):
        opt_norms[LOSS_KEY], opt_norms[FIRST_LOSS_KEY] = loss, first
        if scatter is not None and math.isfinite(scatter):
            opt_norms[LOSS_SCATTER_KEY] = scatter
    report = StateReport(weight_norm=values[0], optimizer_norms=opt_norms, beta2=beta2, step=step)
    report.seconds = time.perf_counter() - t0
    return report


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def host_buffer(t: torch.Tensor) -> torch.Tensor:
    """A host tensor shaped like `t` (pinned when `t` is on a CUDA device)."""
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda and torch.cuda.is_available())


def copy_into(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if not src:
        return
    try:
        compat.foreach_copy_(dst, [s.detach() for s in src], non_blocking=True)
    except (RuntimeError, TypeError):
        for d, s in zip(dst, src):
            d.copy_(s.detach(), non_blocking=True)


def interval_on_ladder(need: int, check_every: int, lo: int = 5, hi: int = 1000) -> int:
    """The snapshot interval for an automatic schedule: the smallest rung >= `need` of a ladder
    made of the integrity-check interval times 2**k (and its halvings down to `lo`), within
    [lo, hi]. Each rung divides the next, so changing rungs never brings the next snapshot (the
    next multiple of the interval) closer than the smaller rung; and from `check_every` up,
    every snapshot falls on an integrity check and shares its pass instead of paying its own."""
    rungs: set[int] = set()
    r = max(int(check_every), 1)
    while r <= hi:
        rungs.add(r)
        r *= 2
    r = max(int(check_every), 1)
    while r % 2 == 0 and r // 2 >= lo:
        r //= 2
        rungs.add(r)
    ladder = sorted(x for x in rungs if lo <= x <= hi) or [min(max(lo, int(check_every)), hi)]
    for x in ladder:
        if x >= need:
            return x
    return ladder[-1]


Spec = tuple[tuple[int, ...], torch.dtype]

_ALIGN = 64
"""Byte alignment of each tensor inside a flat buffer (a cache line; keeps every view aligned)."""


class HostStore:
    """One flat host buffer per dtype and a view into it per tensor, in order."""

    def __init__(self, specs: Sequence[Spec], pin: bool) -> None:
        self.specs = list(specs)
        self.pin = pin
        sizes: dict[torch.dtype, int] = {}
        offsets: list[int] = []
        for shape, dtype in self.specs:
            per = max(_ALIGN // _itemsize(dtype), 1)
            off = sizes.get(dtype, 0)
            offsets.append(off)
            sizes[dtype] = off + -(-_numel(shape) // per) * per
        self.flats = {dt: torch.empty(n, dtype=dt, device="cpu", pin_memory=pin) for dt, n in sizes.items()}
        if not pin:  # fault the pages in now (a pinned allocation already did): the first copy into fresh
            for f in self.flats.values():  # memory runs several times slower than the next ones
                f.zero_()
        self.views = [self.flats[dt][off:off + _numel(shape)].view(shape)
                      for (shape, dt), off in zip(self.specs, offsets)]

    def fits(self, specs: Sequence[Spec], pin: bool) -> bool:
        return self.pin == pin and self.specs == list(specs)

    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.flats.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    size = getattr(dtype, "itemsize", None)  # torch >= 2.1
    return size if isinstance(size, int) else torch.empty((), dtype=dtype).element_size()


def _spec(t: torch.Tensor) -> Spec:
    return tuple(t.shape), t.dtype


@dataclass
class _OnDisk:
    """Stands for tensor number `index` of a spilled snapshot's file."""

    index: int


@dataclass
class Snapshot:
    step: int
    weights: list[torch.Tensor]
    """Host copies of the model's tensors (`model_tensors` order); empty when spilled to disk."""
    optimizer_state: list[dict[str, Any]]
    """Per optimizer parameter (param-group order): its state, tensors in host buffers (or
    `_OnDisk` placeholders when spilled)."""
    scheduler_state: dict[str, Any] | None
    rng_state: dict[str, Any]
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    """The optimizer's param-group hyperparameters (`lr`, `initial_lr`, betas...), without params."""
    group_state: list[dict[str, list[dict[str, Any]]]] = field(default_factory=list)
    """Per param group, per-parameter state kept inside the group (GrokAdamW's `group["state"]`):
    {group key: [per param of the group: its state, like `optimizer_state`]}."""
    extra: dict[str, Any] = field(default_factory=dict)
    report: StateReport | None = None
    healthy_steps_after: int = 0
    taken_at: float = 0.0
    copy_seconds: float = 0.0
    """Host time the capture took, allocation aside (on CUDA, the copy itself runs on after it)."""
    alloc_seconds: float = 0.0
    """Time spent allocating (and faulting in) a new buffer: once per ring slot, not per snapshot."""
    specs: list[Spec] = field(default_factory=list, repr=False)
    """(shape, dtype) of every tensor: the weights first, then optimizer state in param/key order."""
    n_weights: int = 0
    store: HostStore | None = field(default=None, repr=False)
    path: str | None = None
    """The safetensors file holding the tensors, when spilled to disk."""
    file_size: int | None = None
    """Bytes written to `path` (a shorter file was truncated)."""
    events: tuple[Any, Any] | None = field(default=None, repr=False)
    """CUDA (start, end) events of a copy that may still be running."""

    def nbytes(self) -> int:
        return sum(_numel(shape) * _itemsize(dt) for shape, dt in self.specs)

    def wait(self) -> None:
        """Block until the copy is complete (a no-op on CPU and once done)."""
        if self.events is not None:
            self.events[1].synchronize()


# ------------------------------------------------------------------------------------------------
# safetensors, written one tensor at a time (host memory stays at one tensor, whatever the model)
# ------------------------------------------------------------------------------------------------
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


def _write_safetensors(path: Path, tensors: Sequence[torch.Tensor], metadata: dict[str, str]) -> int:
    """Write `tensors` as `t0, t1, ...` in the safetensors format to `path` (atomically: a temp
    file renamed into place). Returns the file size."""
    header: dict[str, Any] = {"__metadata__": metadata}
    off = 0
    for i, t in enumerate(tensors):
        if t.dtype not in _ST_DTYPES:
            raise SnapshotError(f"cannot spill a tensor of dtype {t.dtype} to safetensors")
        n = t.numel() * t.element_size()
        header[f"t{i}"] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for t in tensors:
            c = t.detach()
            if c.device.type != "cpu":
                c = c.to("cpu")
            c = c.contiguous().reshape(-1)
            if c.numel():
                f.write(memoryview(c.view(torch.uint8).numpy()))
    os.replace(tmp, path)
    return 8 + len(hb) + off


class _SpilledReader:
    """Opens a spilled snapshot's file and checks all of it against the snapshot before a single
    live tensor is touched."""

    def __init__(self, snap: Snapshot) -> None:
        from safetensors import safe_open

        path = snap.path
        assert path is not None
        expected = snap.file_size
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise SnapshotError(f"the snapshot of step {snap.step} spilled to {path} cannot be read ({e.strerror or e})"
                                ) from None
        if expected is not None and size != expected:
            raise SnapshotError(f"the snapshot of step {snap.step} spilled to {path} is truncated or damaged: "
                                f"{size} bytes on disk, {expected} written")
        try:
            self._file = safe_open(path, framework="pt", device="cpu")
            keys = set(self._file.keys())
        except Exception as e:  # noqa: BLE001 - any parse failure means the file is not the one written
            raise SnapshotError(f"the snapshot of step {snap.step} spilled to {path} is not a readable safetensors "
                                f"file ({type(e).__name__}: {e})") from None
        for i, (shape, dtype) in enumerate(snap.specs):
            name = f"t{i}"
            if name not in keys:
                raise SnapshotError(f"the snapshot of step {snap.step} spilled to {path} lacks tensor {name}")
            sl = self._file.get_slice(name)
            if tuple(sl.get_shape()) != tuple(shape) or sl.get_dtype() != _ST_DTYPES.get(dtype):
                raise SnapshotError(f"tensor {name} of the snapshot spilled to {path} is {sl.get_dtype()} "
                                    f"{sl.get_shape()}, expected {_ST_DTYPES.get(dtype)} {list(shape)}")

    def get(self, i: int) -> torch.Tensor:
        return self._file.get_tensor(f"t{i}")


# ------------------------------------------------------------------------------------------------
def _like_param(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A state tensor for parameter `p` from a snapshot's copy `v` of its local part: on `p`'s
    device, and a DTensor laid out like `p` when `p` is one (as the optimizer would create it)."""
    local = local_tensor(p)
    out = v.to(local.device, copy=True)
    if local is not p:
        from torch.distributed.tensor import DTensor

        out = DTensor.from_local(out, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return out


class SnapshotRing:
    """The last `keep` snapshots; the oldest one's buffer is reused for the next capture.

    `spill_dir`: write each snapshot's tensors to a safetensors file there instead of keeping them
    in host memory (for a model whose state does not fit in host memory `keep` times)."""

    def __init__(self, keep: int = 3, verify_steps: int = 3, spill_dir: str | os.PathLike | None = None) -> None:
        self.keep = keep
        self.verify_steps = verify_steps
        self.spill_dir = spill_dir
        self.snapshots: list[Snapshot] = []
        self.bytes_copied = 0
        self.last_copy_seconds = 0.0
        """What the last completed copy took: host time on CPU; on CUDA, the copy's own duration on
        the device, once known (the host time there is only the time to queue it)."""
        self._stream: Any = None
        self._hooked: set[int] = set()
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------------------------------
    def capture(self, model: torch.nn.Module, optimizer: Any, scheduler: Any, step: int,
                extra: dict[str, Any] | None = None, report: StateReport | None = None) -> Snapshot:
        t0 = time.perf_counter()
        self._note_finished_copies()
        tensors = model_tensors(model)
        opt = unwrap_optimizer(optimizer) if optimizer is not None else None

        # the tensors to copy, in order, and the optimizer state's layout around them
        src: list[torch.Tensor] = list(tensors)
        layout: list[dict[str, Any]] = []
        held_layout: list[dict[str, Any]] = []
        """Per param group: {group key: [per param: its state entry]} for state kept in the group."""
        if opt is not None:
            groups = opt.param_groups

            def entry_of(state: dict[str, Any]) -> dict[str, Any]:
                entry: dict[str, Any] = {}
                for k, v in state.items():
                    if isinstance(v, torch.Tensor):
                        entry[k] = len(src)
                        src.append(local_tensor(v))
                    else:
                        entry[k] = _Value(_copy_value(v, groups))
                return entry

            for group in groups:
                for p in group["params"]:
                    layout.append(entry_of(opt.state.get(p, {})))
                held_layout.append({k: [entry_of(group[k].get(p, {})) for p in group["params"]]
                                    for k in param_keyed_states(group)})
        specs = [_spec(t) for t in src]
        cuda = any(t.is_cuda for t in src) and torch.cuda.is_available()

        recycled = self._pop_recyclable() if len(self.snapshots) >= self.keep else None
        if recycled is not None:
            recycled.wait()
        snap = Snapshot(step=step, weights=[], optimizer_state=[], scheduler_state=None, rng_state={},
                        specs=specs, n_weights=len(tensors))
        if self.spill_dir is not None:
            self._spill(snap, src, recycled)
            ref: Any = _OnDisk
        else:
            if recycled is not None and recycled.store is not None and recycled.store.fits(specs, cuda):
                store = recycled.store
            else:
                t_alloc = time.perf_counter()
                store = HostStore(specs, pin=cuda)
                snap.alloc_seconds = time.perf_counter() - t_alloc
            if recycled is not None and store is not recycled.store:
                self._delete_file(recycled)
            snap.store = store
            if cuda:
                snap.events = self._copy_async(store.views, src, opt)
            else:
                copy_into(store.views, src)
            snap.weights = store.views[:len(tensors)]
            ref = store.views.__getitem__
        snap.optimizer_state = [{k: (v.value if isinstance(v, _Value) else ref(v)) for k, v in entry.items()}
                                for entry in layout]
        snap.group_state = [{gk: [{k: (v.value if isinstance(v, _Value) else ref(v)) for k, v in entry.items()}
                                  for entry in entries] for gk, entries in held.items()} for held in held_layout]
        snap.scheduler_state = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
        if opt is not None:
            # hyperparameters only: per-parameter state kept in a group went through the buffer above
            # (deep-copying it would copy every tensor, and the parameters keying it, per snapshot)
            snap.param_groups = [{k: _copy_value(v, opt.param_groups) for k, v in g.items()
                                  if k != "params" and k not in param_keyed_states(g)} for g in opt.param_groups]
        snap.rng_state = rng_state()
        snap.extra = copy.deepcopy(extra or {})
        snap.report = report
        snap.taken_at = time.time()
        snap.copy_seconds = time.perf_counter() - t0 - snap.alloc_seconds
        if snap.events is None:
            self.last_copy_seconds = snap.copy_seconds
        self.bytes_copied += snap.nbytes()
        self.snapshots.append(snap)
        return snap

    def restore(self, snap: Snapshot, model: torch.nn.Module, optimizer: Any, scheduler: Any = None,
                restore_scheduler: bool = True, restore_rng: bool = True) -> None:
        """Copy a snapshot back in place: the same tensors, so the optimizer and any wrapper keep
        pointing at them and the running `train()` call continues. `restore_scheduler=False`
        leaves the LR schedule where it is now (scheduler state and param-group hyperparameters):
        a rollback moves the weights back, not the schedule, and an LR cut taken since persists.
        Raises `SnapshotError`, with the live state untouched, when the snapshot cannot be read
        back or does not fit the model."""
        tensors = model_tensors(model)
        if [_spec(t) for t in tensors] != snap.specs[:snap.n_weights]:
            raise SnapshotError("snapshot does not match the model's tensors (was the model changed after it was taken?)")
        snap.wait()
        if snap.path is not None:
            reader = _SpilledReader(snap)  # everything is checked here, before any live tensor changes
            get = reader.get
        else:
            assert snap.store is not None
            get = snap.store.views.__getitem__
        with torch.no_grad():
            if snap.path is not None:
                for i, t in enumerate(tensors):
                    t.copy_(get(i))
            else:
                copy_into(tensors, snap.store.views[:snap.n_weights])
            if optimizer is not None:
                self._restore_optimizer(snap, unwrap_optimizer(optimizer), get)
        if restore_scheduler:  # the schedule as it was: the scheduler and the LRs it had set
            if scheduler is not None and snap.scheduler_state is not None:
                scheduler.load_state_dict(copy.deepcopy(snap.scheduler_state))
            if optimizer is not None and len(snap.param_groups) == len(unwrap_optimizer(optimizer).param_groups):
                groups = unwrap_optimizer(optimizer).param_groups
                for g, saved in zip(groups, snap.param_groups):
                    g.update({k: _copy_value(v, groups) for k, v in saved.items()})
        if restore_rng:
            set_rng_state(snap.rng_state)
        if any(t.is_cuda for t in tensors) and torch.cuda.is_available():
            torch.cuda.synchronize()  # the host buffers may be reused as soon as this returns

    @staticmethod
    def _restore_optimizer(snap: Snapshot, opt: torch.optim.Optimizer, get: Any) -> None:
        i = 0
        for gi, group in enumerate(opt.param_groups):
            for p in group["params"]:
                saved = snap.optimizer_state[i] if i < len(snap.optimizer_state) else {}
                i += 1
                if not saved:
                    opt.state.pop(p, None)
                    continue
                _restore_entry(opt.state.setdefault(p, {}), saved, p, get, opt.param_groups, like_param=True)
            held = snap.group_state[gi] if gi < len(snap.group_state) else {}
            for gk in param_keyed_states(group) + [k for k in held if k not in group]:
                entries = held.get(gk)
                if entries is None or len(entries) != len(group["params"]):
                    continue
                store = group.setdefault(gk, {})
                for p, saved in zip(group["params"], entries):
                    if not saved:
                        store.pop(p, None)
                        continue
                    _restore_entry(store.setdefault(p, {}), saved, p, get, opt.param_groups, like_param=False)

    # ------------------------------------------------------------------------------------------
    # CUDA: copy on a side stream; the next optimizer step waits for it on the device
    # ------------------------------------------------------------------------------------------
    def _copy_async(self, dst: list[torch.Tensor], src: list[torch.Tensor], opt: Any) -> tuple[Any, Any]:
        device = next(t.device for t in src if t.is_cuda)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._stream.wait_stream(torch.cuda.current_stream(device))  # after the update that produced them
        with torch.cuda.stream(self._stream):
            start.record()
            copy_into(dst, src)
            end.record()
        for t in src:
            if t.is_cuda:
                t.record_stream(self._stream)
        if opt is not None and id(opt) not in self._hooked and hasattr(opt, "register_step_pre_hook"):
            self._hooked.add(id(opt))
            self._hooks.append(opt.register_step_pre_hook(lambda *_: self.fence()))
        return start, end

    def fence(self) -> None:
        """Make the current CUDA stream wait (on the device; the host does not block) for every
        snapshot copy still running. Runs before each optimizer step; call it before writing
        weights or optimizer state in place anywhere else."""
        for s in self.snapshots:
            if s.events is not None:
                torch.cuda.current_stream().wait_event(s.events[1])

    def _note_finished_copies(self) -> None:
        for s in self.snapshots:
            if s.events is not None and s.events[1].query():
                self.last_copy_seconds = max(s.events[0].elapsed_time(s.events[1]) / 1000, s.copy_seconds)
                s.events = None

    # ------------------------------------------------------------------------------------------
    # spilling to disk
    # ------------------------------------------------------------------------------------------
    def _spill(self, snap: Snapshot, src: list[torch.Tensor], recycled: Snapshot | None) -> None:
        d = Path(self.spill_dir)  # type: ignore[arg-type]
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"snapshot-step-{snap.step}-{time.monotonic_ns()}.safetensors"
        if recycled is not None:  # free its disk space first: it is never the last verified one
            self._delete_file(recycled)
        with torch.no_grad():
            size = _write_safetensors(path, src, {"step": str(snap.step), "format": "self-healing-snapshot-1"})
        snap.path = str(path)
        snap.file_size = size

    @staticmethod
    def _delete_file(snap: Snapshot) -> None:
        if snap.path is not None:
            try:
                os.remove(snap.path)
            except OSError:
                pass
            snap.path = None

    def clear(self) -> None:
        """Drop every snapshot (and its spilled file)."""
        for s in self.snapshots:
            self._delete_file(s)
        self.snapshots = []

    # ------------------------------------------------------------------------------------------
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
        self._drop([s for s in self.snapshots if s not in keep])
        self.snapshots = keep
        return dropped

    def discard_after(self, step: int) -> None:
        self._drop([s for s in self.snapshots if s.step > step])
        self.snapshots = [s for s in self.snapshots if s.step <= step]

    def discard(self, snap: Snapshot) -> None:
        """Drop one snapshot (one that turned out unreadable, say)."""
        self._drop([snap])
        self.snapshots = [s for s in self.snapshots if s is not snap]

    def _drop(self, snaps: Iterable[Snapshot]) -> None:
        for s in snaps:
            self._delete_file(s)

    @property
    def latest(self) -> Snapshot | None:
        return self.snapshots[-1] if self.snapshots else None

    def __len__(self) -> int:
        return len(self.snapshots)


def _restore_entry(cur: dict[str, Any], saved: dict[str, Any], p: torch.Tensor, get: Any, groups: Any,
                   like_param: bool) -> None:
    """Put one parameter's saved state back into `cur` in place (tensors copied into the live ones
    when they fit; else new ones, on the parameter's device for `optimizer.state`, on the saved
    tensor's host for state kept in a param group, as GrokAdamW keeps it on the CPU)."""
    for k in list(cur):
        if k not in saved:
            del cur[k]
    for k, v in saved.items():
        if isinstance(v, _OnDisk):
            v = get(v.index)
        if isinstance(v, torch.Tensor):
            t = cur.get(k)
            t_local = local_tensor(t) if isinstance(t, torch.Tensor) else None
            if t_local is not None and t_local.shape == v.shape and t_local.dtype == v.dtype:
                t_local.copy_(v, non_blocking=True)
            elif v.dim() > 0 and like_param:
                cur[k] = _like_param(p, v)
            else:
                cur[k] = v.clone()
        else:
            cur[k] = _copy_value(v, groups)


_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None))


def _copy_value(v: Any, groups: Any = ()) -> Any:
    """A copy of a non-tensor optimizer value (a hyperparameter, a step count) that never copies
    what it only points at: numbers and strings as they are, containers copied item by item,
    tensors cloned, a param group (torch-optimi keeps `state["group"]`) and anything else
    (callables such as GrokAdamW's `grokking_signal_fns`, whose deep copy would copy whatever
    object they are bound to) by reference."""
    if isinstance(v, _IMMUTABLE):
        return v
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if any(v is g for g in groups):
        return v
    if isinstance(v, tuple):
        return tuple(_copy_value(x, groups) for x in v)
    if isinstance(v, list):
        return [_copy_value(x, groups) for x in v]
    if isinstance(v, dict) and not any(isinstance(k, torch.Tensor) for k in v):
        return {k: _copy_value(x, groups) for k, x in v.items()}
    return v


@dataclass
class _Value:
    """A non-tensor optimizer state entry, already deep-copied."""

    value: Any


def _same_shapes(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> bool:
    a, b = list(a), list(b)
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(a, b))
