"""`SelfHealingTrainer`: the retry orchestrator around any transformers/TRL trainer.

Most failures are healed inside the running `train()` call by the callback (skip the step, roll
back in place, cut the LR). What escapes it as an exception comes here: it is diagnosed, and a
healable one (see `diagnosis.diagnose_exception`) is healed and the run resumed; anything else
leaves a postmortem and propagates. `KeyboardInterrupt` is never healed.
"""

from __future__ import annotations

import logging
from typing import Any

from .callback import SelfHealingCallback
from .config import HealingConfig
from .diagnosis import diagnose_exception

logger = logging.getLogger("self_healing")


class SelfHealingTrainer:
    """Wrap a trainer in one line::

        result = SelfHealingTrainer(trainer, HealingConfig.aggressive()).train()

    `train()` returns what `trainer.train()` returns. Attributes the wrapper does not define are
    read from the wrapped trainer, so `sh.model`, `sh.state`, `sh.save_model()` work as before.
    """

    def __init__(self, trainer: Any, config: HealingConfig | str | None = None) -> None:
        if isinstance(config, str):
            config = HealingConfig.from_preset(config)
        if config is not None and not isinstance(config, HealingConfig):
            raise ValueError(f"config must be a HealingConfig, a preset name or a YAML path, got {type(config).__name__}")
        self.trainer = trainer
        self.config = config or HealingConfig()
        self.callback = SelfHealingCallback(self.config).attach(trainer, orchestrated=True)
        self.postmortem: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "trainer":  # during unpickling / before __init__
            raise AttributeError(name)
        return getattr(self.trainer, name)

    @property
    def exit_reason(self) -> str | None:
        return self.postmortem["exit_reason"] if self.postmortem else None

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """Run `trainer.train()` until it completes or healing gives up."""
        cb = self.callback
        try:
            result = self.trainer.train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except KeyboardInterrupt as exc:
            self.postmortem = cb.finish("interrupted", exception=exc)
            logger.warning("self-healing: interrupted at step %s; postmortem written", self.postmortem["last_step"])
            raise
        except Exception as exc:
            d = diagnose_exception(exc, step=getattr(self.trainer.state, "global_step", None))
            self.postmortem = cb.finish("exception", exception=exc, extra={"diagnosis": d.to_dict()})
            logger.error("self-healing: %s; postmortem written", d.summary)
            raise
        self.postmortem = cb.finish("gave_up" if cb.gave_up else "completed")
        if cb.gave_up:
            logger.error("self-healing: gave up: %s. The last verified-good weights are loaded; see %s",
                         cb.give_up_reason, self.config.resolved_postmortem_path(self.trainer.args.output_dir))
        return result
