"""self-healing: keeps Hugging Face Trainer and TRL runs alive through numeric failures and crashes."""

from .callback import SelfHealingCallback
from .config import HealingConfig
from .diagnosis import Action, Diagnosis, FailureKind, diagnose, diagnose_exception
from .faults import Fault, inject_faults
from .loop import Healer
from .trainer import SelfHealingTrainer

__version__ = "0.1.0"

__all__ = ["SelfHealingTrainer", "SelfHealingCallback", "Healer", "HealingConfig", "FailureKind", "Action", "Diagnosis",
           "diagnose", "diagnose_exception", "Fault", "inject_faults", "__version__"]
