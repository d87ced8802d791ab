"""The engine's reading of a step: its loss and gradient norm as numbers (in the step's one host
sync, one gather under torch.distributed) and the state's integrity verdict, judged the same on
every rank. Used through `self_healing.engine.Healer`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from .detectors import Detection, StateReport, StepSignals, compare_state
from .distributed import CODE_KINDS, RankFailure, combine_losses, gather_rows, is_distributed
from .healing import scheduled_lrs
from .snapshot import state_report, unwrap_optimizer


def _lr_ratio(lrs: list[float], reference: list[float] | None) -> float:
    """How far this rank's LR is above its schedule (inf: not finite); 1.0 when there is no
    schedule to compare with. Shared in the step's gather, so an LR corrupted on one rank only
    is judged on every rank and the ranks' weights cannot part."""
    if not reference:
        return 1.0
    ratios = [math.inf if not math.isfinite(lr) else lr / ref for lr, ref in zip(lrs, reference) if ref > 0]
    return max(ratios, default=1.0)


_EXACT_ON_HOST = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes whose `.item()` is exactly `.float().item()`: a host tensor of these is read directly."""


def _host_scalar(x: Any) -> float | None:
    """A host tensor's value without the detach/float/reshape copies (each ~1-10 us, per step);
    None where that shortcut would not give the same number (device tensors, float64, not a scalar)."""
    if type(x) is torch.Tensor and x.is_cpu and x.dtype in _EXACT_ON_HOST and x.dim() == 0:
        return x.item()
    return None


class StepReader:
    """The facts of a `Healer`'s step (`healer`: its live objects, config, LR reference and the
    step's exception code; `rank_rows` is written back to it)."""

    def __init__(self, healer: Any) -> None:
        self.healer = healer
        self._wrapped: Any = None
        self._opt: Any = None

    def step_signals(self, step: int, loss: Any, grad_norm: Any, exception: BaseException | None = None,
                     extra: Iterable[float] | None = None, distributed: bool | None = None) -> StepSignals:
        """The step's facts as numbers, in its one host sync. `loss`/`grad_norm` may be device
        tensors. Under torch.distributed every rank's (loss, norm, exception code, *extra) travel
        in one all_gather and every rank returns the same signals (`rank_rows` keeps the rows).
        `distributed`: `is_distributed()`, where the caller has just asked it."""
        h = self.healer
        _, raw, scheduler = h.live_objects()
        if raw is not self._wrapped:  # the torch optimizer inside the loop's wrapper: unwrapped once per object
            self._wrapped, self._opt = raw, unwrap_optimizer(raw)
        opt = self._opt
        lrs = [g["lr"] for g in opt.param_groups]
        reference = scheduled_lrs(raw, scheduler, opt) or h.lr_reference
        if distributed if distributed is not None else is_distributed():
            own = _lr_ratio(lrs, reference)  # travels last in the row: the extras keep their places
            loss_f, norm_f, exception = self.gathered(loss, grad_norm, exception, [*(extra or ()), own])
            worst = max(r[-1] for r in h.rank_rows or [[own]])
            if worst > max(own, h.config.lr_spike_factor) and reference:  # a peer's LR spiked: every rank judges it
                lrs = [ref * worst for ref in reference]
        else:
            h.rank_rows = None
            loss_f, norm_f = _host_scalar(loss), _host_scalar(grad_norm)
            if loss_f is None or (norm_f is None and grad_norm is not None):
                loss_f, norm_f = self._synced(loss, grad_norm, exception)
        return StepSignals(step=step, loss=loss_f, grad_norm=norm_f, lrs=lrs, scheduled_lrs=reference,
                           exception=exception)

    @staticmethod
    def _synced(loss: Any, grad_norm: Any, exception: BaseException | None) -> tuple[float, float | None]:
        """(loss, norm) as floats; device tensors reach the host together, in one sync."""
        parts: list[torch.Tensor] = []
        if isinstance(loss, torch.Tensor):
            parts.append(loss.detach().float().reshape(()))
        if isinstance(grad_norm, torch.Tensor):
            parts.append(grad_norm.detach().float().reshape(()).to(parts[0].device if parts else grad_norm.device))
        if all(t.device.type == "cpu" for t in parts):  # nothing to sync: skip the stack's allocation
            values = [t.item() for t in parts]
        else:
            values = torch.stack(parts).tolist()  # the one host sync of the step
        if isinstance(loss, torch.Tensor):
            loss_f = values.pop(0)
        elif isinstance(loss, (int, float)):
            loss_f = float(loss)
        else:
            loss_f = float("nan") if exception is None else 0.0
        if isinstance(grad_norm, torch.Tensor):
            norm_f = values.pop(0)
        elif isinstance(grad_norm, (int, float)):
            norm_f = float(grad_norm)
        else:
            norm_f = None
        return loss_f, norm_f

    def gathered(self, loss_t: Any, gn: Any, exception: BaseException | None,
                 extra: list[float]) -> tuple[float, float | None, BaseException | None]:
        h = self.healer
        dev = loss_t.device if isinstance(loss_t, torch.Tensor) else h.device
        nan = torch.tensor(float("nan"), device=dev)
        if isinstance(loss_t, torch.Tensor):
            loss_v = loss_t.detach().float().reshape(())
        elif isinstance(loss_t, (int, float)):
            loss_v = torch.tensor(float(loss_t), device=dev)
        else:
            loss_v = torch.zeros((), device=dev) if exception is not None else nan
        if isinstance(gn, torch.Tensor):
            gn_v = gn.detach().float().reshape(()).to(dev)
        else:
            gn_v = torch.tensor(float(gn) if isinstance(gn, (int, float)) else float("nan"), device=dev)
        meta = torch.tensor([float(h.step_exception_kind), *extra], device=dev)
        rows = gather_rows(torch.cat([loss_v.reshape(1), gn_v.reshape(1), meta])).tolist()
        h.rank_rows = rows
        norms = [r[1] for r in rows if not math.isnan(r[1])]
        grad_norm = max(norms) if norms else (None if gn is None else float("nan"))
        codes = [int(r[2]) for r in rows]
        agreed = None
        if any(codes):
            worst = max(codes)
            ranks = [i for i, c in enumerate(codes) if c == worst]
            local = exception if h.step_exception_kind == worst else None
            agreed = RankFailure(CODE_KINDS[worst], ranks, str(local)[:200] if local else "")
            if local is not None:
                agreed.__cause__ = local
        return combine_losses(rows), grad_norm, agreed

    def check_state(self, step: int, agreed: bool = True) -> tuple[StateReport, Detection | None]:
        """This rank's state report, and the first rank's verdict that is bad (one gather when
        distributed, so a corruption on any rank is seen by all). Each rank's numbers travel with
        its own reference: under FSDP a rank's norms are of its shard, comparable only with the
        reference of that same shard; every rank then judges the same rows the same way.
        `agreed=False` (the other ranks are not known to be here too): this rank's verdict alone."""
        h = self.healer
        report = state_report(h.model, h.optimizer, step)
        ref = h.ref_report
        if not agreed or not is_distributed():
            return report, compare_state(report, ref, h.config.weight_growth_factor)
        keys = sorted(report.optimizer_norms)
        n, nan = 1 + len(keys), float("nan")
        ref_vals = [ref.weight_norm] + [ref.optimizer_norms.get(k, nan) for k in keys] if ref else [nan] * n
        vec = torch.tensor([report.weight_norm] + [report.optimizer_norms[k] for k in keys] + ref_vals
                           + [float(ref.step) if ref else -1.0], dtype=torch.float32, device=h.device)
        for r, row in enumerate(gather_rows(vec).tolist()):
            rep = StateReport(row[0], dict(zip(keys, row[1:n])), report.beta2, step)
            ref_r = None if row[-1] < 0 else StateReport(
                row[n], {k: v for k, v in zip(keys, row[n + 1:2 * n]) if not math.isnan(v)}, report.beta2, int(row[-1]))
            bad = compare_state(rep, ref_r, h.config.weight_growth_factor)
            if bad is not None:
                bad.evidence["rank"] = r
                return report, bad
        return report, None


__all__ = ["StepReader"]
