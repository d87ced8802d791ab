"""The checks behind `HealingConfig`: which values each field accepts, and reading a preset.

Kept apart from the field declarations so `config.py` reads as the list of knobs; the messages here
are the ones users see (field name, the value, what is accepted).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .config import HealingConfig

MAX_PRESET_BYTES = 1 << 20


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_INT_MAX = 10 ** 9
"""No integer field needs more (steps, counts, sizes); larger ones would overflow C sizes deep inside."""


def is_finite_number(v: Any) -> bool:
    try:
        return math.isfinite(v)
    except (OverflowError, TypeError):  # an int too large for a float is not a usable setting
        return False


def short_repr(v: Any, maxstring: int = 60) -> str:
    """repr of a value for an error message: bounded in size and depth (a YAML alias bomb, a
    5000-digit integer or a megabyte string must not become the message). A field name gets a
    longer bound: it is what the user must find in their file (12 non-Latin characters are a
    repr of 122)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlong, r.maxlevel = maxstring, 60, 40, 3
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 6
    try:
        return r.repr(v)
    except Exception:  # noqa: BLE001 - e.g. an int past the str-conversion limit
        return f"<{type(v).__name__}>"


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def value_problems(cfg: "HealingConfig") -> list[str]:
    """Every field of `cfg` whose value is not accepted, one message each, in field order."""
    problems: list[str] = []

    def need(cond: bool, name: str, accepted: str) -> None:
        if not cond:
            problems.append(
                f"HealingConfig.{name}={short_repr(getattr(cfg, name))} is not accepted: expected {accepted}"
            )

    def int_at_least(name: str, lo: int, hi: int = _INT_MAX) -> None:
        v = getattr(cfg, name)
        need(is_int(v) and lo <= v <= hi, name, f"an integer >= {lo}" + (f" and <= {hi}" if is_int(v) and v > hi
                                                                          else ""))

    def num_in(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
        v = getattr(cfg, name)
        ok = is_number(v) and is_finite_number(v)
        if ok:
            ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        need(ok, name, f"a finite number in {lb}{lo}, {hi}{rb}")

    int_at_least("max_recovery_attempts", 0)
    int_at_least("recovery_reset_steps", 1)
    int_at_least("nan_patience", 0)
    num_in("loss_spike_factor", 1.0, 1e12, lo_open=True)
    int_at_least("loss_spike_window", 2)
    int_at_least("loss_spike_patience", 0)
    int_at_least("divergence_patience", 2)
    num_in("divergence_tolerance", 0.0, 1e6, lo_open=True)
    if cfg.grad_norm_threshold is not None:
        num_in("grad_norm_threshold", 0.0, math.inf, lo_open=True, hi_open=True)
    num_in("grad_z_threshold", 0.0, 1e6, lo_open=True)
    num_in("grad_spike_factor", 1.0, 1e12, lo_open=True)
    num_in("lr_spike_factor", 1.0, 1e12, lo_open=True)
    num_in("weight_growth_factor", 1.0, 1e12, lo_open=True)
    int_at_least("integrity_check_every_steps", 1)
    num_in("lr_reduction_factor", 0.0, 1.0, lo_open=True, hi_open=True)
    num_in("min_lr_scale", 0.0, 1.0, lo_open=True)
    num_in("clip_tighten_factor", 0.0, 1.0, lo_open=True, hi_open=True)
    need(isinstance(cfg.zclip_enabled, bool), "zclip_enabled", "true or false")
    num_in("zclip_z_threshold", 0.0, 1e6, lo_open=True)
    num_in("zclip_alpha", 0.0, 1.0, lo_open=True, hi_open=True)
    int_at_least("zclip_warmup_steps", 0)
    need(cfg.zclip_mode in ("zscore", "percentile"), "zclip_mode", "'zscore' or 'percentile'")
    need(cfg.zclip_clip_option in ("adaptive_scaling", "mean"), "zclip_clip_option", "'adaptive_scaling' or 'mean'")
    need(isinstance(cfg.monitors_enabled, bool), "monitors_enabled", "true or false")
    int_at_least("plateau_patience_steps", 1)
    num_in("plateau_loss_tolerance", 0.0, 10.0)
    num_in("plateau_margin_tolerance", 0.0, 1e6)
    num_in("plateau_lr_factor", 1.0, 5.0, lo_open=True)
    num_in("plateau_max_lr_scale", 1.0, 1e3)
    int_at_least("reward_collapse_patience_steps", 1)
    num_in("reward_std_tolerance", 0.0, 1e6)
    num_in("reward_drop_fraction", 0.0, 1.0, lo_open=True)
    num_in("kl_max", 0.0, 1e12, lo_open=True)
    num_in("kl_spike_factor", 1.0, 1e12, lo_open=True)
    num_in("overfit_gap", 0.0, 1e12, lo_open=True)
    need(isinstance(cfg.trackio_logging, bool), "trackio_logging", "true or false")
    need(isinstance(cfg.growth_forecast, bool), "growth_forecast", "true or false")
    need(isinstance(cfg.oscillation_check, bool), "oscillation_check", "true or false")
    int_at_least("probe_every_steps", 0)
    int_at_least("curvature_every_steps", 0)
    need(cfg.early_warning_mode in ("heal", "observe"), "early_warning_mode", "'heal' or 'observe'")
    num_in("target_false_alarm_rate", 0.0, 0.5, lo_open=True)
    num_in("warning_false_alarm_rate", 0.0, 0.5, lo_open=True)
    int_at_least("calibration_window", 10)
    int_at_least("calibration_min_steps", 5)
    num_in("growth_ema", 0.0, 1.0, hi_open=True)
    int_at_least("oscillation_window", 16)
    int_at_least("probe_batch_size", 1)
    int_at_least("fisher_every_steps", 0)
    int_at_least("ewc_steps", 0)
    num_in("ewc_strength", 0.0, 100.0)
    need(
        cfg.snapshot_every_steps == "auto" or (is_int(cfg.snapshot_every_steps) and cfg.snapshot_every_steps >= 1),
        "snapshot_every_steps",
        "'auto' or an integer >= 1",
    )
    num_in("snapshot_budget", 0.0, 1.0, lo_open=True)
    int_at_least("snapshot_keep", 1)
    int_at_least("snapshot_verify_steps", 0)
    spill = cfg.snapshot_spill_dir
    need(spill is None or (isinstance(spill, str) and spill.strip() != ""), "snapshot_spill_dir",
         "a directory path string or null")
    num_in("api_backoff_seconds", 0.0, 3600.0)
    num_in("api_backoff_max_seconds", 0.0, 86400.0)
    int_at_least("max_api_retries", 0)
    int_at_least("max_skipped_batches", 0)
    import signal as _signal

    sigs = cfg.preemption_signals
    need(isinstance(sigs, (list, tuple)) and all(
        isinstance(x, str) and isinstance(getattr(_signal, x, None), _signal.Signals) and x not in ("SIGKILL", "SIGSTOP")
        for x in sigs), "preemption_signals", "a list of catchable signal names such as ['SIGTERM', 'SIGUSR1']")
    if isinstance(sigs, list):
        object.__setattr__(cfg, "preemption_signals", tuple(sigs))
    need(isinstance(cfg.exit_on_preemption, bool), "exit_on_preemption", "true or false")
    num_in("preemption_grace_seconds", 0.0, 86400.0, lo_open=True)
    need(isinstance(cfg.auto_resume, bool), "auto_resume", "true or false")
    need(isinstance(cfg.hang_detection, bool), "hang_detection", "true or false")
    need(cfg.on_hang in ("exit", "warn"), "on_hang", "'exit' or 'warn'")
    num_in("hang_floor_seconds", 0.0, 1e7, lo_open=True)
    num_in("hang_startup_seconds", 0.0, 1e7, lo_open=True)
    num_in("hang_save_seconds", 0.0, 1e7, lo_open=True)
    num_in("hang_factor", 1.0, 1e6)
    from .phases import PHASES as _PHASES

    hps = cfg.hang_phase_seconds
    need(hps is None or (isinstance(hps, dict) and all(
        k in _PHASES and is_number(v) and is_finite_number(v) and 0 < v <= 1e7 for k, v in hps.items())),
        "hang_phase_seconds", f"null or a mapping of phase name ({', '.join(_PHASES)}) to seconds in (0, 1e7]")
    num_in("hang_poll_seconds", 0.01, 60.0)
    need(cfg.postmortem_path is None or (isinstance(cfg.postmortem_path, str) and "\0" not in cfg.postmortem_path
                                          and len(cfg.postmortem_path) < 4096),
         "postmortem_path", "a path string or null")
    int_at_least("history_size", 1, 10_000)
    return problems



def mapping_problems(cls: type, values: Any, unknown_field_message: Any) -> list[str]:
    """Everything wrong with a would-be config mapping: each unknown key and each field whose value is
    not accepted (empty when `cls.from_dict(values)` would succeed)."""
    if not isinstance(values, Mapping):
        return [f"a HealingConfig must be a mapping of field: value, got {type(values).__name__}"]
    known = {f.name for f in fields(cls)}
    out = [unknown_field_message(k, cls) for k in values if k not in known]
    obj = cls.__new__(cls)  # the defaults, then the given values, without __post_init__'s raise
    for f in fields(cls):
        setattr(obj, f.name, f.default_factory() if f.default is dataclasses.MISSING else f.default)
    for k, v in values.items():
        if k in known:
            setattr(obj, k, v)
    return out + value_problems(obj)


def parse_yaml(text: bytes | str, source: str = "YAML") -> Any:
    """The YAML document in `text` (`{}` when empty); undecodable or malformed text is a `ValueError`."""
    import yaml

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{source} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:  # libyaml's parser when there is one: it refuses absurd nesting at once (pure PyYAML recurses)
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise ValueError(f"{source} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ValueError(f"{source} is nested too deeply to be a preset") from None
    return {} if data is None else data


def checked_assign(cfg: "HealingConfig", name: str, value: Any) -> None:
    """Assign a known field, then re-check: a refused value raises the field's message and the old
    value stays (or the attribute is removed again when there was none)."""
    d = cfg.__dict__
    missing = object()
    old = d.get(name, missing)
    object.__setattr__(cfg, name, value)
    problems = value_problems(cfg)
    if problems:
        if old is missing:
            object.__delattr__(cfg, name)
        else:
            object.__setattr__(cfg, name, old)
        own = [m for m in problems if m.startswith(f"HealingConfig.{name}=")]
        raise ValueError((own or problems)[0])


def preset_text(name_or_path: "str | Path", names: tuple[str, ...]) -> tuple[bytes, str]:
    """The YAML bytes of a shipped preset (by name) or of a preset file, and how to name it in errors.
    A missing or oversized file, or an unknown name (with the closest one), is a `ValueError`."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ValueError(f"preset file {str(path)!r} does not exist")
        if path.stat().st_size > MAX_PRESET_BYTES:
            raise ValueError(f"preset file {str(path)!r} is {path.stat().st_size} bytes: a preset is a few "
                             f"kilobytes (at most {MAX_PRESET_BYTES} accepted)")
        return path.read_bytes(), str(path)
    if str(name_or_path) not in names:
        close = difflib.get_close_matches(str(name_or_path), names, n=1)
        raise ValueError(
            f"unknown preset {short_repr(str(name_or_path))}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; accepted: {', '.join(names)} or a path to a .yaml file"
        )
    text = resources.files("self_healing.presets").joinpath(f"{name_or_path}.yaml").read_bytes()
    return text, f"preset {name_or_path!r}"
