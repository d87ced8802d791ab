"""Rank agreement: every skip, rollback, LR change, batch change and give-up is decided from the
same numbers on every rank, in the same step.

One small `all_gather` of a few floats per step (the step's loss, an exception code, a preemption
flag) replaces the single host sync the step needs anyway; nothing at all when there is one
process. Weight/optimizer integrity is gathered the same way, only on the steps it is checked.
A rank that dies outright is the launcher's job (`torchrun --max-restarts`, elastic); the
plugin's auto-resume then picks the run up from the newest verified checkpoint.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch

from .diagnosis import FailureKind

# Exception codes carried in the per-step gather; a larger code is the more severe.
EXCEPTION_CODES = {None: 0, FailureKind.NAN_LOSS: 1, FailureKind.DATA_ERROR: 2, FailureKind.OOM: 3}
CODE_KINDS = {v: k for k, v in EXCEPTION_CODES.items()}


def _loaded(module: str, name: str) -> Any:
    """`module.name` if that module was imported, else None: no DTensor or FSDP module can exist
    before torch.distributed imported them, and importing them here would cost every start-up."""
    return getattr(sys.modules.get(module), name, None)


def is_dtensor(t: Any) -> bool:
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(t, dtensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2, tensor parallel), sharing its storage; any other
    tensor itself. Under sharding the plugin snapshots, checks and restores what each rank holds,
    so nothing is gathered and a rank's host memory holds only its shard."""
    return t.to_local() if is_dtensor(t) else t


def reshard(model: torch.nn.Module) -> None:
    """FSDP2 leaves the root module's parameters unsharded after a forward outside backward (an
    evaluation, a probe); put every module back in its sharded state so what a snapshot copies
    and restores is always the shard."""
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is None:
        return
    for m in model.modules():
        if isinstance(m, fsdp_module):
            m.reshard()


def recover_fsdp_iteration(model: torch.nn.Module) -> None:
    """After an exception aborted a forward or backward under FSDP2: reset its per-iteration state
    (the root's parameters would otherwise stay unsharded and its next forward confused), so the
    rank can run the next step and its snapshots still match. A no-op without FSDP2."""
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is None or not isinstance(model, fsdp_module):
        return
    if hasattr(model, "reset_iter_state"):  # torch >= 2.13: the supported recovery
        try:
            model.reset_iter_state()
        except RuntimeError:  # not the root module: the reshard below is all we can do
            pass
    reshard(model)


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """[world, k] matrix of every rank's `local` vector (float32, on `local`'s device)."""
    if not is_distributed():
        return local.reshape(1, -1)
    local = local.float().reshape(-1).contiguous()
    if torch.distributed.get_backend() == "gloo":
        local = local.cpu()
    out = [torch.empty_like(local) for _ in range(world_size())]
    torch.distributed.all_gather(out, local)
    return torch.stack(out)


def agree_max(value: float) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


class RankFailure(RuntimeError):
    """Stands in, on the other ranks, for an exception raised on one rank only, so every rank
    diagnoses the same failure and takes the same action."""

    def __init__(self, failure: FailureKind, ranks: Sequence[int], message: str = "") -> None:
        self.failure = failure
        self.ranks = list(ranks)
        super().__init__(f"{failure.value} on rank(s) {self.ranks}" + (f": {message}" if message else ""))


def combine_losses(rows: Sequence[Sequence[float]]) -> float:
    """The loss every rank judges: the mean over ranks without an exception; NaN if any is NaN."""
    import math

    vals = [r[0] for r in rows if int(r[2]) == 0]
    if not vals:
        return 0.0
    if any(not math.isfinite(v) for v in vals):
        return next(v for v in vals if not math.isfinite(v))
    return sum(vals) / len(vals)


def per_rank_view(rows: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    return [{"rank": i, "loss": r[0], "exception": (CODE_KINDS.get(int(r[2])) or FailureKind.UNKNOWN).value
             if int(r[2]) else None} for i, r in enumerate(rows)]
