"""What a healed run carries across a disk resume or a fresh `train()` that is neither the
engine's nor the Trainer's own: the LR cut taken so far (a checkpoint brings the scheduler back
with the LR it had then), ZClip's statistics (kept in trainer_state.json), and the Trainer
counters an in-memory snapshot restores."""

from __future__ import annotations

import logging
from typing import Any

from .config import HealingConfig
from .healing import scale_lr
from .zclip import ZClip, load_from_trainer_state

logger = logging.getLogger("self_healing")


class RunCarryOver:
    """Puts back, at each train begin, what a resume would otherwise lose."""

    def __init__(self, config: HealingConfig) -> None:
        self.config = config
        self.base_lrs: list[float] | None = None
        """The scheduler's base LRs before any cut (the first train begin of this run)."""

    def reset(self) -> None:
        """A fresh run: the next train begin takes the scheduler's LRs as they are."""
        self.base_lrs = None

    def new_zclip(self, args: Any) -> ZClip:
        """ZClip from the config; during its warm-up the Trainer's `max_grad_norm` clips."""
        z = ZClip.from_config(self.config)
        cap = float(getattr(args, "max_grad_norm", 0) or 0)
        z.warmup_max_norm = cap if cap > 0 else None
        return z

    def begin_train(self, zclip: ZClip | None, args: Any, state: Any) -> None:
        """ZClip's statistics come back from the checkpoint a resume started from."""
        if zclip is not None and args.max_grad_norm and args.max_grad_norm > 0:
            logger.info("self-healing: ZClip is on; the Trainer's fixed max_grad_norm=%s clips only during ZClip's "
                        "%s warm-up steps, then ZClip's adaptive threshold replaces it",
                        args.max_grad_norm, zclip.warmup_steps)
        if zclip is not None and state.global_step > 0 and load_from_trainer_state(zclip, state):
            logger.info("self-healing: ZClip statistics restored from the checkpoint (step %s)", state.global_step)

    def reapply_lr_cut(self, optimizer: Any, scheduler: Any, lr_scale: float) -> None:
        """After a disk resume the scheduler comes back with the LR of the checkpoint; an LR cut
        taken since must survive it."""
        if scheduler is None or not hasattr(scheduler, "base_lrs"):
            return
        if self.base_lrs is None:
            self.base_lrs = list(scheduler.base_lrs)
            return
        want = [b * lr_scale for b in self.base_lrs]
        cur = list(scheduler.base_lrs)
        if cur and cur[0] > 0 and abs(want[0] / cur[0] - 1) > 1e-6:
            scale_lr(optimizer, scheduler, want[0] / cur[0])

    @staticmethod
    def trainer_counters(trainer: Any) -> dict[str, Any]:
        """What a snapshot carries of the Trainer's own counters (a resume from it restores them)."""
        st = trainer.state
        return {"trainer_state": {"epoch": st.epoch, "num_input_tokens_seen": st.num_input_tokens_seen,
                                  "total_flos": st.total_flos}}
