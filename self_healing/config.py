"""`HealingConfig`: every knob of the plugin, validated when it is built.

A bad value fails here, at construction, with the field's name and what is accepted, instead of
hours later inside a training run.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .config_checks import checked_assign, mapping_problems, parse_yaml, preset_text, short_repr, value_problems

PRESET_NAMES = ("default", "aggressive", "conservative")



@dataclass
class HealingConfig:
    """What the plugin watches for and how hard it tries to heal.

    Defaults protect a run without changing a healthy one: a clean run with the default preset
    trains exactly like the bare trainer. Presets: `default()`, `aggressive()`, `conservative()`,
    or a YAML file through `from_preset()`.
    """

    # --- how hard to try ---------------------------------------------------------------------
    max_recovery_attempts: int = 5
    """Rollbacks/resumes allowed before the run gives up (`exit_reason: "gave_up"`). The count
    starts again after `recovery_reset_steps` healthy steps, so a week-long run with several
    unrelated incidents is not stopped by the sum of them."""
    recovery_reset_steps: int = 200
    """Healthy steps in a row after which the count of spent `max_recovery_attempts` starts again at 0."""
    nan_patience: int = 3
    """Consecutive non-finite steps that are skipped (weights untouched) before a rollback."""

    # --- loss signals --------------------------------------------------------------------------
    loss_spike_factor: float = 5.0
    """A step whose loss exceeds this many times the running mean is a spike."""
    loss_spike_window: int = 50
    """Healthy losses kept in the running window the spike test compares against (its mean, spread
    and largest loss)."""
    loss_spike_patience: int = 2
    """Consecutive spikes skipped before the weights themselves are suspected (rollback)."""
    divergence_patience: int = 20
    """Steps the smoothed loss must keep rising (and stay `divergence_tolerance` above its best)."""
    divergence_tolerance: float = 0.25
    """How far above its best the smoothed loss must be (0.25: 25%) to count as divergence, besides
    rising for `divergence_patience` steps and standing 3x its noise above the best."""

    # --- gradient / LR / state signals ---------------------------------------------------------
    grad_norm_threshold: float | None = None
    """Absolute pre-clip gradient-norm limit; `None` leaves only the adaptive z-score test."""
    grad_z_threshold: float = 6.0
    """z-score of the pre-clip gradient norm against its recent healthy norms above which a step is a
    `gradient_explosion` (if it is also `grad_spike_factor` x their mean and their largest)."""
    grad_spike_factor: float = 10.0
    """A z-score outlier counts only if it is also this many times the running mean norm."""
    lr_spike_factor: float = 10.0
    """An LR this many times above what the scheduler set is a spike."""
    weight_growth_factor: float = 10.0
    """Slack of the finite weight tests (docs/reliability.md, "Precision"): the weight norm must grow past this
    many times the largest growth the optimizer's updates since the last good check could cause
    (corruption: written outside the optimizer), or by this factor within one check interval while
    the loss rose (the LR is too high: divergence). Values near 1 are still sound."""
    integrity_check_every_steps: int = 10
    """How often weights and optimizer state are checked (one fused norm pass)."""

    # --- healing -------------------------------------------------------------------------------
    lr_reduction_factor: float = 0.5
    """Multiplier of the LR at each cut (divergence, a failure recurring soon after a rollback,
    `kl_blowup`, oscillation, a growth forecast the LR explains). The cut persists: param groups,
    `initial_lr` and the scheduler's `base_lrs`."""
    min_lr_scale: float = 1e-3
    """The LR is never cut below this fraction of the user's; past it the run gives up."""
    clip_tighten_factor: float = 0.5
    """Multiplier of the clipping threshold when clipping is tightened (a gradient explosion or loss
    spike recurring after a rollback; an early-warning growth warning): the Trainer's `max_grad_norm`
    (clipping that was off is turned on at the recent healthy norm), or ZClip's z threshold (not
    below 0.5) when ZClip is on."""

    # --- ZClip (adaptive clipping) -------------------------------------------------------------
    zclip_enabled: bool = False
    """Adaptive gradient clipping (ZClip, arXiv:2504.02507): after its warm-up it replaces the
    Trainer's fixed `max_grad_norm` clipping, which then only measures the norm."""
    zclip_z_threshold: float = 2.5
    """z-score of the gradient norm (against ZClip's EMA mean and std) above which ZClip clips."""
    zclip_alpha: float = 0.97
    """EMA decay of ZClip's running mean and variance of the gradient norm."""
    zclip_warmup_steps: int = 25
    """Steps in which ZClip only gathers statistics; the Trainer's `max_grad_norm` clips meanwhile."""
    zclip_mode: str = "zscore"
    """"zscore": clip an outlier as `zclip_clip_option` says; "percentile": clip at mean + z_t x std."""
    zclip_clip_option: str = "adaptive_scaling"
    """In `zscore` mode, how an outlier is clipped: "adaptive_scaling" (the paper's reciprocal
    threshold, mean + z·std / (z_t/z)) or "mean" (to the EMA mean)."""

    # --- trainer-aware monitors and trackio (self_healing.monitors, self_healing.tracking) -----
    monitors_enabled: bool = True
    """Monitors picked by trainer type (DPO plateau, GRPO reward collapse/KL, overfitting)."""
    plateau_patience_steps: int = 50
    """Steps a preference loss must sit at its chance value (ln 2 for DPO) with margin ~0."""
    plateau_loss_tolerance: float = 0.01
    """How close to its chance value the preference loss must stay to count towards a plateau."""
    plateau_margin_tolerance: float = 0.02
    """How close to 0 `rewards/margins` must stay to count towards a plateau."""
    plateau_lr_factor: float = 2.0
    """LR raise per plateau finding (2-5x), applied until `plateau_max_lr_scale` in total."""
    plateau_max_lr_scale: float = 5.0
    """Cap on the total LR raise from plateau findings (the product of the `plateau_lr_factor` raises)."""
    reward_collapse_patience_steps: int = 20
    """Steps (GRPO/RLOO) with no reward spread, or with the smoothed reward down by
    `reward_drop_fraction` of its gain, before `reward_collapse` is reported (alert only)."""
    reward_std_tolerance: float = 1e-4
    """`reward_std` at or below this counts as no spread (when TRL logs no `frac_reward_zero_std`)."""
    reward_drop_fraction: float = 0.5
    """Fraction of its gain the smoothed mean reward must lose to count as a collapse."""
    kl_max: float = 10.0
    """KL to the reference (GRPO/RLOO with `beta` > 0) above this is a `kl_blowup`: LR cut, alert."""
    kl_spike_factor: float = 10.0
    """KL above this many times its running median is a blow-up (as is KL above `kl_max`)."""
    overfit_gap: float = 0.5
    """eval_loss - train_loss above this at an evaluation is overfitting (alert only)."""
    trackio_logging: bool = True
    """When the Trainer reports to trackio, log `healing/*`, `zclip/*` and alerts to its run."""

    # --- early warning (self_healing.early_warning, self_healing.signals; docs/early-warning.md) ---
    # Every signal here is opt-in: none is on in any preset until benchmarks/early_warning.py shows
    # it beats the basic detectors above. While all are off nothing is attached and no step pays.
    growth_forecast: bool = False
    """Per-step growth rate of the grad norm, of the update norm (sampled weights) and of the loss:
    a warning takes an early snapshot and tightens clipping, a failure (`instability_forecast`)
    rolls back and cuts the LR before the loss explodes."""
    oscillation_check: bool = False
    """FFT of the recent loss and grad-norm window: a dominant period -> `oscillation`, LR cut."""
    probe_every_steps: int = 0
    """Every N steps, evaluate a fixed probe batch before and after the update; an update that
    raises the probe loss beyond its calibrated bound is undone (`probe_regression`). 0 = off."""
    curvature_every_steps: int = 0
    """Every N steps, Hutchinson Hessian trace, top Hessian eigenvalue and SAM sharpness on the
    probe batch, recorded in the postmortem (costly: see docs/early-warning.md). 0 = off."""
    early_warning_mode: str = "heal"
    """"heal": act on the signals above; "observe": only record what they would have done."""
    target_false_alarm_rate: float = 1e-4
    """Healthy steps on which a failure signal may fire: thresholds are calibrated on the run's
    own healthy history to this rate (1e-4: one step in 10,000) instead of a fixed factor."""
    warning_false_alarm_rate: float = 1e-3
    """The same for warnings (early snapshot, tighter clipping)."""
    calibration_window: int = 1000
    """Healthy scores kept per signal for calibration (a sliding window)."""
    calibration_min_steps: int = 30
    """Healthy scores a signal needs before it may fire."""
    growth_ema: float = 0.8
    """EMA decay of the per-step log growth rates (0.8: about 5 steps of memory)."""
    oscillation_window: int = 64
    """Steps of loss / grad norm in each FFT."""
    probe_batch_size: int = 8
    """Rows in the probe batch (the first evaluation batch, else the first training batch)."""
    fisher_every_steps: int = 0
    """Every N steps, fold the squared gradients into a diagonal Fisher EMA (one more copy of the
    weights on their device). With it on, an `instability_forecast` rollback is Fisher-weighted
    (important weights go back to the snapshot, the others keep their recent progress) and, for
    `ewc_steps` steps after any rollback, an EWC pull towards the restored weights is added to the
    gradient. 0 = off."""
    ewc_steps: int = 20
    """Steps after a rollback during which the EWC pull is added to the gradient (needs
    `fisher_every_steps`)."""
    ewc_strength: float = 0.5
    """Norm of the EWC pull as a fraction of the gradient's norm."""

    # --- rollback targets ----------------------------------------------------------------------
    snapshot_every_steps: int | str = "auto"
    """Steps between in-memory snapshots; "auto" picks the interval from the measured copy time so
    snapshots cost under `snapshot_budget` of step time."""
    snapshot_budget: float = 0.005
    """Share of step time that "auto" snapshots may cost (0.005: 0.5%)."""
    snapshot_keep: int = 3
    """Snapshots in the ring; host memory is about this many times weights plus optimizer state.
    Rotation never drops the last verified one."""
    snapshot_verify_steps: int = 3
    """Healthy steps after a snapshot before it counts as a verified-good rollback target."""
    snapshot_spill_dir: str | None = None
    """Write snapshots' tensors to safetensors files in this directory (relative to `output_dir`)
    instead of keeping `snapshot_keep` copies in host memory; for a model whose weights and
    optimizer state do not fit there that many times. Slower, so "auto" snapshots less often."""

    # --- crashes (OOM, data, I/O) --------------------------------------------------------------
    api_backoff_seconds: float = 1.0
    """First wait before retrying a transient network or storage error (ConnectionError,
    TimeoutError, HTTP 5xx/429, EIO...); doubled at each retry, jittered."""
    api_backoff_max_seconds: float = 60.0
    """Cap on that wait."""
    max_api_retries: int = 5
    """Retries of a transient error inside a training step; past them it goes to the orchestrator,
    which backs off and resumes from the current state."""
    max_skipped_batches: int = 10
    """Distinct batches a data error may skip before the run gives up (a pipeline bug, not noise)."""
    preemption_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    """On these signals: finish the step, checkpoint, write the postmortem, exit."""
    exit_on_preemption: bool = True
    """After a preemption signal's checkpoint and postmortem, exit with 128 + signal (what a
    launcher expects); false: `train()` returns instead."""
    preemption_grace_seconds: float = 25.0
    """Seconds from a preemption signal to the process's exit, checkpoint and postmortem on disk
    (Slurm's default KillWait gives 30 s before SIGKILL; spot VMs 30 s to 2 min). A signal during
    an evaluation aborts it at its next prediction step (its metrics are not needed to save); a
    signal during a save stops right after it; if the grace runs out first, the postmortem is
    written and the process exits (128 + signal) before the SIGKILL would land."""
    auto_resume: bool = True
    """Resume from the newest verified checkpoint when the last run in `output_dir` did not complete."""

    # --- hangs (self_healing.watchdog; docs/crashes-and-preemption.md) -------------------------
    hang_detection: bool = True
    """A watchdog thread per process compares the time spent in the current phase (startup, data
    wait, train step, generation, evaluation step, save...) with that phase's bound:
    max(floor, `hang_factor` x its longest recent duration). The training thread only leaves a
    heartbeat (about a microsecond per phase change, ~5 us per optimizer step)."""
    on_hang: str = "exit"
    """"exit": dump every thread's stack to `output_dir/self-healing/hang-<step>-rank<r>.txt`, write
    the postmortem (`exit_reason: "hung"`) and exit with code 75 (`HANG_EXIT_CODE`), so the
    launcher relaunches and auto-resume continues; "warn": the same dump and an error log only."""
    hang_floor_seconds: float = 600.0
    """The least a step-like phase (data wait, train step, generation, evaluation step, between
    steps) is allowed, however fast it usually is."""
    hang_startup_seconds: float = 1800.0
    """Bound on startup, and the floor of each step-like phase until it has been seen 3 times
    (compilation, cache warm-up, the first generation)."""
    hang_save_seconds: float = 1800.0
    """Floor for saves, recovery, the end-of-evaluation metrics and the end of training."""
    hang_factor: float = 10.0
    """A phase may take this many times its longest recent duration (the run's own history)."""
    hang_phase_seconds: dict[str, float] | None = None
    """Fixed bounds per phase that replace the computed ones, e.g. `{"save": 7200, "eval_step": 900}`;
    phases: startup, data_wait, train_step, generation, after_step, evaluation, eval_step, save,
    recovery, finishing, preemption."""
    hang_poll_seconds: float = 1.0
    """How often the watchdog thread wakes up."""

    # --- output --------------------------------------------------------------------------------
    postmortem_path: str | None = None
    """Defaults to `<output_dir>/postmortem.json`."""
    history_size: int = 64
    """Steps of loss/grad-norm history kept around each event in the postmortem."""

    def __post_init__(self) -> None:
        self.validate()
        object.__setattr__(self, "_validated", True)  # from here on, every assignment is checked

    def __setattr__(self, name: str, value: Any) -> None:
        """`cfg.nan_patience = -3` is refused like `HealingConfig(nan_patience=-3)`, with the same
        message, and the old value stays; an unknown name (`cfg.nan_patiance = 2`) is refused with
        the closest field. Only assignment pays for this: reads are plain attribute reads."""
        if not self.__dict__.get("_validated") or name.startswith("_"):  # still being built (or private)
            object.__setattr__(self, name, value)
        elif name not in _field_set(type(self)):
            raise ValueError(_unknown_field_message(name, type(self)))
        else:
            checked_assign(self, name, value)

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `ValueError` naming the first field whose value is not accepted."""
        problems = self._value_problems()
        if problems:
            raise ValueError(problems[0])

    def _value_problems(self) -> list[str]:
        """Every field whose value is not accepted, one message each, in field order."""
        return value_problems(self)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def problems(cls, values: Any) -> list[str]:
        """Everything wrong with a would-be config mapping: each unknown key and each field whose
        value is not accepted, one message per field (empty when `from_dict(values)` would succeed)."""
        return mapping_problems(cls, values, _unknown_field_message)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "HealingConfig":
        """Build from a mapping; an unknown key is an error that lists the accepted ones."""
        if not isinstance(values, Mapping):
            raise ValueError(f"a HealingConfig must be a mapping of field: value, got {type(values).__name__}")
        return cls(**dict(values))  # an unknown key: the ValueError of `_checked_init`

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "HealingConfig":
        return self.from_dict({**self.to_dict(), **changes})

    # --- presets --------------------------------------------------------------------------------
    @classmethod
    def default(cls) -> "HealingConfig":
        return cls()

    @classmethod
    def aggressive(cls) -> "HealingConfig":
        """Heal at the first sign of trouble; adaptive clipping on."""
        return cls(nan_patience=1, zclip_enabled=True, zclip_z_threshold=2.0, max_recovery_attempts=10,
                   loss_spike_patience=1, integrity_check_every_steps=5)

    @classmethod
    def conservative(cls) -> "HealingConfig":
        """Intervene only on clear failures; give up early rather than fight the run."""
        return cls(nan_patience=10, loss_spike_factor=10.0, zclip_z_threshold=4.0, max_recovery_attempts=2)

    @classmethod
    def from_preset(cls, name_or_path: str | Path) -> "HealingConfig":
        """A preset by name (`default`, `aggressive`, `conservative`) or a YAML file path."""
        text, source = preset_text(name_or_path, PRESET_NAMES)
        return cls.from_yaml_text(text, source=source)

    @classmethod
    def from_yaml_text(cls, text: bytes | str, source: str = "YAML") -> "HealingConfig":
        data = cls.parse_yaml(text, source)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:  # TypeError: e.g. a non-string key
            raise ValueError(f"{source}: {e}") from None

    @staticmethod
    def parse_yaml(text: bytes | str, source: str = "YAML") -> Any:
        """The YAML document in `text` (`{}` when empty); undecodable or malformed text is a `ValueError`."""
        return parse_yaml(text, source)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write as YAML, atomically (a crash leaves the old file or the new one)."""
        from .io import atomic_write_text

        atomic_write_text(path, self.to_yaml())

    def resolved_postmortem_path(self, output_dir: str) -> str:
        return self.postmortem_path or str(Path(output_dir) / "postmortem.json")


def _field_set(cls: type) -> frozenset[str]:
    names = cls.__dict__.get("_field_names_cache")
    if names is None:  # once per class (fields() walks the dataclass machinery)
        names = frozenset(f.name for f in fields(cls))
        type.__setattr__(cls, "_field_names_cache", names)
    return names


NAME_REPR = 240
"""An unknown field's name is shown whole up to this many characters of its repr."""


def _unknown_field_message(name: Any, cls: type = HealingConfig) -> str:
    """The one message for an unknown field, wherever it comes from (keyword, assignment, mapping,
    YAML): the name, and the closest field, else every accepted one."""
    known = sorted(_field_set(cls))
    close = difflib.get_close_matches(str(name), known, n=1)
    return f"unknown HealingConfig field {short_repr(name, NAME_REPR)}: " + (
        f"did you mean {close[0]!r}?" if close else f"accepted fields: {', '.join(known)}")


_dataclass_init = HealingConfig.__init__


@functools.wraps(_dataclass_init)
def _checked_init(self: HealingConfig, *args: Any, **kwargs: Any) -> None:
    """`HealingConfig(nan_patiance=2)` is a `ValueError` naming the field and the closest one
    (the dataclass's own `__init__` would raise a bare `TypeError`)."""
    known = _field_set(type(self))
    unknown = [k for k in kwargs if k not in known]
    if len(unknown) == 1:
        raise ValueError(_unknown_field_message(unknown[0], type(self)))
    if unknown:  # each with its closest field when there is one; the accepted list once
        parts = []
        for k in unknown[:10]:
            close = difflib.get_close_matches(str(k), sorted(known), n=1)
            parts.append(f"{short_repr(k, NAME_REPR)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ValueError(f"unknown HealingConfig fields {', '.join(parts)}{more}; "
                         f"accepted fields: {', '.join(sorted(known))}")
    _dataclass_init(self, *args, **kwargs)


HealingConfig.__init__ = _checked_init  # type: ignore[method-assign]

__all__ = ["HealingConfig", "PRESET_NAMES"]
