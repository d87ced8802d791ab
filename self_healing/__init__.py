"""self-healing: keeps Hugging Face Trainer and TRL runs alive through numeric failures and crashes.

The public names load on first use (PEP 562): `self-healing report` and `check-config` then start
without importing torch and transformers (transformers' trainer pulls peft, ~10 s on a loaded box),
while `from self_healing import SelfHealingTrainer` works exactly as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "SelfHealingTrainer": ".trainer",
    "SelfHealingCallback": ".callback",
    "Healer": ".loop",
    "HealingConfig": ".config",
    "FailureKind": ".diagnosis",
    "Action": ".diagnosis",
    "Diagnosis": ".diagnosis",
    "diagnose": ".diagnosis",
    "diagnose_exception": ".diagnosis",
    "Fault": ".faults",
    "inject_faults": ".faults",
}

__all__ = ["SelfHealingTrainer", "SelfHealingCallback", "Healer", "HealingConfig", "FailureKind", "Action", "Diagnosis",
           "diagnose", "diagnose_exception", "Fault", "inject_faults", "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .callback import SelfHealingCallback
    from .config import HealingConfig
    from .diagnosis import Action, Diagnosis, FailureKind, diagnose, diagnose_exception
    from .faults import Fault, inject_faults
    from .loop import Healer
    from .trainer import SelfHealingTrainer


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'self_healing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
