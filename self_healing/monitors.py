"""Trainer-aware monitors: failures that are not numeric, read from the metrics TRL already logs.

A NaN check cannot tell that a DPO run learns nothing, that GRPO's rewards stopped varying, or
that the model memorises its training set. These monitors read the Trainer's `on_log` /
`on_evaluate` metrics (the names TRL 1.x logs, checked against its source), each returns
`Diagnosis` objects, and the callback applies them (`_apply_advisory`): recorded in the
postmortem, alerted, and at most a bounded LR change; never a rollback. A metric that is absent
(another TRL version, a loss type with no known chance value) turns the matching test off rather
than guessing.

Which monitors run is decided by the trainer's type (`monitors_for`; docs/compatibility.md):

====================  ==============================================================
DPO/KTO/ORPO/CPO      `PreferencePlateauMonitor` (dpo_plateau), `OverfittingMonitor`
GRPO/RLOO             `RewardCollapseMonitor` (reward_collapse), `KLMonitor` (kl_blowup)
Trainer/SFT/Reward    `OverfittingMonitor` (overfitting)
====================  ==============================================================
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from typing import Any, Mapping

from .diagnosis import REFERENCES, Action, Diagnosis, FailureKind

LN2 = math.log(2.0)

MONITOR_TABLE: dict[str, tuple[str, ...]] = {
    "Trainer": ("overfitting",),
    "SFTTrainer": ("overfitting",),
    "DPOTrainer": ("dpo_plateau", "overfitting"),
    "KTOTrainer": ("dpo_plateau", "overfitting"),
    "ORPOTrainer": ("dpo_plateau", "overfitting"),
    "CPOTrainer": ("dpo_plateau", "overfitting"),
    "RewardTrainer": ("overfitting",),
    "GRPOTrainer": ("reward_collapse", "kl_blowup"),
    "RLOOTrainer": ("reward_collapse", "kl_blowup"),
}
"""The failures monitored per trainer type, by `FailureKind` value (the trainer table in
docs/compatibility.md is checked against this). RL trainers get no overfitting monitor: their "loss" is a
policy-gradient surrogate, not a fit."""


def _num(logs: Mapping[str, Any], key: str) -> float | None:
    """A finite float metric, or None when absent/None/NaN (TRL logs None for an all-NaN window)."""
    v = logs.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:  # 0-d tensors (ORPO logs some metrics as tensors)
            v = float(v.item()) if hasattr(v, "item") else None
        except (TypeError, ValueError, RuntimeError):
            return None
    if v is None or not math.isfinite(v):
        return None
    return float(v)


def _is_train_log(logs: Mapping[str, Any]) -> bool:
    """A per-step training log (not an eval log, not the end-of-training summary)."""
    return not any(k.startswith("eval_") for k in logs) and "train_runtime" not in logs


def _diag(kind: FailureKind, summary: str, evidence: dict[str, Any], actions: list[Action], step: int) -> Diagnosis:
    return Diagnosis(kind, summary, evidence, actions, list(REFERENCES.get(kind, [])), step)


class _Streak:
    """Steps a condition has held without a break, counted on logged steps."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.count = 0

    def update(self, step: int, holds: bool) -> int:
        if not holds:
            self.start, self.count = None, 0
            return 0
        if self.start is None:
            self.start = step
        self.count += 1
        return step - self.start

    def reset(self) -> None:
        self.start, self.count = None, 0


# ---------------------------------------------------------------------------------------------
# preference trainers
# ---------------------------------------------------------------------------------------------
class PreferencePlateauMonitor:
    """DPO/KTO/ORPO/CPO learning nothing: the preference loss sits at its chance value and the
    reward margin at 0 for `plateau_patience_steps`.

    Chance values, from each loss at zero margin: DPO (sigmoid) and CPO (sigmoid, minus its NLL
    term) -log σ(0) = ln 2; ORPO's logged `log_odds_ratio` = log σ(0) = -ln 2; KTO 1 - σ(0) = 0.5.
    For other loss types only the margin is used. Steps where the logged LR is still rising
    (warm-up) do not count. Action: raise the LR by `plateau_lr_factor`
    within `plateau_max_lr_scale` in total, and point at the data; when chosen and rejected have
    identical log-probabilities (the pairs are the same text) only the alert, since no LR helps.
    """

    name = "dpo_plateau"

    def __init__(self, kind: str, config: Any, args: Any = None) -> None:
        self.kind = kind
        self.config = config
        self.chance_key, self.chance = self._chance_signal(kind, args)
        self.cpo_alpha = float(getattr(args, "cpo_alpha", 1.0) or 0.0)
        self.streak = _Streak()
        self.lr_scale = 1.0
        """Total LR raise this monitor applied (capped by `plateau_max_lr_scale`)."""
        self._peak_lr: float | None = None

    @staticmethod
    def _chance_signal(kind: str, args: Any) -> tuple[str | None, float | None]:
        lt = getattr(args, "loss_type", "sigmoid")
        types = list(lt) if isinstance(lt, (list, tuple)) else [lt]
        smoothing = float(getattr(args, "label_smoothing", 0.0) or 0.0)
        if kind == "ORPOTrainer":
            return "log_odds_ratio", -LN2
        if kind == "KTOTrainer":
            weights = (getattr(args, "desirable_weight", 1.0), getattr(args, "undesirable_weight", 1.0))
            return ("loss", 0.5) if types == ["kto"] and weights == (1.0, 1.0) else (None, None)
        if kind in ("DPOTrainer", "CPOTrainer") and types == ["sigmoid"] and smoothing == 0.0:
            return ("preference_loss" if kind == "CPOTrainer" else "loss"), LN2
        return None, None

    def preference_loss(self, logs: Mapping[str, Any]) -> float | None:
        if self.chance_key is None:
            return None
        if self.chance_key == "preference_loss":  # CPO logs loss = preference loss + cpo_alpha * nll_loss
            loss, nll = _num(logs, "loss"), _num(logs, "nll_loss")
            return None if loss is None or nll is None else loss - self.cpo_alpha * nll
        return _num(logs, self.chance_key)

    def on_log(self, step: int, logs: Mapping[str, Any]) -> list[Diagnosis]:
        if not _is_train_log(logs):
            return []
        cfg = self.config
        margin = _num(logs, "rewards/margins")
        pref = self.preference_loss(logs)
        if margin is None and pref is None:
            return []  # nothing this trainer logs tells us
        holds = ((pref is None or abs(pref - self.chance) <= cfg.plateau_loss_tolerance)
                 and (margin is None or abs(margin) <= cfg.plateau_margin_tolerance))
        lr = _num(logs, "learning_rate")
        if lr is not None:
            # while the LR still rises (scheduler warm-up) a loss at ln 2 is expected, not a plateau
            if self._peak_lr is None or lr > self._peak_lr * (1 + 1e-6):
                holds = False
            self._peak_lr = lr if self._peak_lr is None else max(self._peak_lr, lr)
        span = self.streak.update(step, holds)
        if span < cfg.plateau_patience_steps or self.streak.count < 2:
            return []
        start = self.streak.start
        self.streak.reset()  # the next finding needs another full patience window
        return [self._diagnose(step, start, span, pref, margin, logs)]

    def _diagnose(self, step: int, start: int | None, span: int, pref: float | None, margin: float | None,
                  logs: Mapping[str, Any]) -> Diagnosis:
        cfg = self.config
        name = self.kind.replace("Trainer", "")
        ev: dict[str, Any] = {"steps": span, "since_step": start, "margin": margin,
                              "margin_tolerance": cfg.plateau_margin_tolerance}
        parts = []
        if pref is not None:
            ev.update({"preference_loss": pref, "chance_value": self.chance, "loss_tolerance": cfg.plateau_loss_tolerance})
            parts.append(f"preference loss {pref:.4f} within {cfg.plateau_loss_tolerance:g} of its chance value "
                         f"{self.chance:.4f}")
        if margin is not None:
            parts.append(f"reward margin {margin:.2g} within ±{cfg.plateau_margin_tolerance:g} of 0")
        lc, lr = _num(logs, "logps/chosen"), _num(logs, "logps/rejected")
        tied = lc is not None and lr is not None and abs(lc - lr) <= 1e-4 * max(1.0, abs(lc))
        if lc is not None and lr is not None:
            ev.update({"logps_chosen": lc, "logps_rejected": lr})
        summary = f"{name} plateau: {' and '.join(parts)} for {span} steps (since step {start}): the policy is not " \
                  "separating chosen from rejected"
        if tied:
            ev["identical_pairs"] = True
            return _diag(FailureKind.DPO_PLATEAU, summary + ". Chosen and rejected have identical log-probabilities: "
                         "the pairs look identical, so no learning rate can help; check the dataset's chosen/rejected "
                         "columns", ev, [Action.ALERT], step)
        room = cfg.plateau_max_lr_scale / self.lr_scale
        factor = min(cfg.plateau_lr_factor, room)
        data = "; if it persists, check the data (chosen/rejected identical, swapped or mislabelled)"
        if factor > 1.0 + 1e-6:
            self.lr_scale *= factor
            ev.update({"lr_factor": factor, "lr_scale_total": self.lr_scale, "lr_scale_cap": cfg.plateau_max_lr_scale})
            return _diag(FailureKind.DPO_PLATEAU, f"{summary}; LR raised {factor:.3g}x ({self.lr_scale:.3g}x in total, "
                         f"cap {cfg.plateau_max_lr_scale:g}x){data}", ev, [Action.RAISE_LR, Action.ALERT], step)
        ev["lr_scale_total"] = self.lr_scale
        return _diag(FailureKind.DPO_PLATEAU, f"{summary}; the LR is already raised to its cap "
                     f"{cfg.plateau_max_lr_scale:g}x, so the data is the likely cause: check that chosen and rejected "
                     "differ and are not swapped or mislabelled", ev, [Action.ALERT], step)


# ---------------------------------------------------------------------------------------------
# RL trainers
# ---------------------------------------------------------------------------------------------
class RewardCollapseMonitor:
    """GRPO/RLOO: no spread of rewards inside the groups (TRL's `frac_reward_zero_std` at 1, or
    `reward_std` at 0 when that is not logged) for `reward_collapse_patience_steps`: every
    advantage is 0, so the policy gets no gradient at all. Or the mean `reward` (smoothed) falls
    back by `reward_drop_fraction` of what it had gained, for as long. Action: alert.

    Saturation is not collapse: when the rewards had a spread earlier in the run (the reward
    function does tell completions apart) and now sit, without spread, at the highest mean reward
    the run has reached, the policy *solved* the task: an INFO note ("the task is solved or too
    easy: no learning signal left"), logged once per episode, kept in `notes`, and no finding.
    Flat rewards that never varied (a constant or silently failing reward function) or that sit
    below the best the run reached stay a collapse."""

    name = "reward_collapse"

    def __init__(self, config: Any, ema_alpha: float = 0.7) -> None:
        self.config = config
        self.ema_alpha = ema_alpha
        self.spread = _Streak()
        self.drop = _Streak()
        self.ema: float | None = None
        self.first: float | None = None
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_reward: float | None = None
        """Highest logged mean reward (unsmoothed)."""
        self.had_spread = False
        """Some logged step had rewards that differed inside a group."""
        self.notes: list[dict[str, Any]] = []
        """INFO-level findings (saturation): not failures, never acted on."""
        self._saturated_noted = False

    def _at_top(self, reward: float | None) -> bool:
        if reward is None or self.best_reward is None or not self.had_spread:
            return False
        tol = max(self.config.reward_std_tolerance, 1e-6 * max(1.0, abs(self.best_reward)))
        return reward >= self.best_reward - tol

    def on_log(self, step: int, logs: Mapping[str, Any]) -> list[Diagnosis]:
        if not _is_train_log(logs):
            return []
        cfg = self.config
        out: list[Diagnosis] = []
        zero, std, reward = _num(logs, "frac_reward_zero_std"), _num(logs, "reward_std"), _num(logs, "reward")
        if reward is not None:
            self.best_reward = reward if self.best_reward is None else max(self.best_reward, reward)
        if zero is not None or std is not None:
            flat = zero >= 1.0 - 1e-6 if zero is not None else std <= cfg.reward_std_tolerance
            span = self.spread.update(step, flat)
            if span >= cfg.reward_collapse_patience_steps and self.spread.count >= 2:
                start = self.spread.start
                if self._at_top(reward):  # solved: a note, once per flat episode
                    if not self._saturated_noted:
                        self._saturated_noted = True
                        self._note_saturation(step, start, span, reward)
                else:
                    self.spread.reset()
                    ev = {"frac_reward_zero_std": zero, "reward_std": std, "reward": reward, "steps": span,
                          "since_step": start}
                    out.append(_diag(FailureKind.REWARD_COLLAPSE,
                                     f"reward collapse: every group of completions got the same reward for {span} "
                                     f"steps (since step {start}; reward {reward if reward is None else round(reward, 4)}, "
                                     f"std {std if std is None else round(std, 6)}): the group-normalised advantages "
                                     "are 0 and the policy receives no learning signal. Check the reward function "
                                     "(constant? failing silently?), raise the sampling temperature or num_generations",
                                     ev, [Action.ALERT], step))
            if not flat:
                self.had_spread = True
                self._saturated_noted = False
        if reward is not None:
            out.extend(self._mean_drop(step, reward))
        return out

    def _note_saturation(self, step: int, start: int | None, span: int, reward: float | None) -> None:
        note = {"step": step, "since_step": start, "steps": span, "reward": reward, "best_reward": self.best_reward,
                "summary": f"every group of completions got the top reward {reward:.4g} for {span} steps (since step "
                           f"{start}): the task is solved or too easy: no learning signal left (the advantages are "
                           "0). Not a failure; stop early, or make the task harder"}
        self.notes.append(note)
        logging.getLogger("self_healing").info("self-healing: step %s: %s", step, note["summary"])

    def _mean_drop(self, step: int, reward: float) -> list[Diagnosis]:
        cfg = self.config
        self.ema = reward if self.ema is None else self.ema_alpha * self.ema + (1 - self.ema_alpha) * reward
        if self.first is None:
            self.first = self.ema
        if self.best is None or self.ema > self.best:
            self.best, self.best_step = self.ema, step
        gain = self.best - self.first
        dropped = gain > cfg.reward_std_tolerance and self.ema < self.best - cfg.reward_drop_fraction * gain
        span = self.drop.update(step, dropped)
        if span < cfg.reward_collapse_patience_steps or self.drop.count < 2:
            return []
        self.drop.reset()
        ev = {"smoothed_reward": self.ema, "best_smoothed_reward": self.best, "best_step": self.best_step,
              "initial_smoothed_reward": self.first, "steps": span, "drop_fraction": cfg.reward_drop_fraction}
        return [_diag(FailureKind.REWARD_COLLAPSE,
                      f"reward collapse: the smoothed mean reward fell to {self.ema:.4g} from its best {self.best:.4g} "
                      f"(step {self.best_step}; it started at {self.first:.4g}) and stayed down for {span} steps: the "
                      f"policy degraded. Resume from a checkpoint before step {self.best_step} with a lower LR or a "
                      "larger KL coefficient (beta)", ev, [Action.ALERT], step)]


class KLMonitor:
    """GRPO/RLOO (only when a KL term is on, `beta` > 0, so TRL logs `kl`): the KL to the
    reference blows up, above `kl_max` or `kl_spike_factor` times its running median. Action:
    cut the LR (the policy moves too fast for the KL penalty) and alert; fires again only after
    the KL came back down."""

    name = "kl_blowup"

    def __init__(self, config: Any, window: int = 20, min_history: int = 5, floor: float = 0.05) -> None:
        self.config = config
        self.history: deque[float] = deque(maxlen=window)
        self.min_history = min_history
        self.floor = floor
        """KL values below this never count as a blow-up (early KL is ~0, so any ratio is huge)."""
        self.armed = True

    def on_log(self, step: int, logs: Mapping[str, Any]) -> list[Diagnosis]:
        if not _is_train_log(logs):
            return []
        kl = _num(logs, "kl")
        if kl is None:
            return []
        cfg = self.config
        median = statistics.median(self.history) if len(self.history) >= self.min_history else None
        over_abs = kl > cfg.kl_max
        over_rel = median is not None and kl > self.floor and kl > cfg.kl_spike_factor * max(median, self.floor / 10)
        if not (over_abs or over_rel):
            self.history.append(kl)
            self.armed = True
            return []
        if not self.armed:
            return []
        self.armed = False
        why = f"above kl_max={cfg.kl_max:g}" if over_abs else f"{kl / max(median, 1e-12):.3g}x its running median {median:.3g}"
        ev = {"kl": kl, "running_median": median, "kl_max": cfg.kl_max, "kl_spike_factor": cfg.kl_spike_factor}
        return [_diag(FailureKind.KL_BLOWUP,
                      f"KL to the reference model is {kl:.4g} at step {step}, {why}: the policy is moving away from the "
                      f"reference faster than the KL penalty holds it; LR cut by {cfg.lr_reduction_factor:g}x. If it "
                      "recurs, raise beta", ev, [Action.REDUCE_LR, Action.ALERT], step)]


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
class OverfittingMonitor:
    """`eval_loss` − recent train `loss` > `overfit_gap` at an evaluation: the model fits the
    training set better than held-out data by a margin. Alert with a recommendation, no rollback
    (the weights are not broken; which checkpoint to keep is the user's call). Fires again only
    when the gap grows by half again, or after it closed."""

    name = "overfitting"

    def __init__(self, config: Any, window: int = 5) -> None:
        self.config = config
        self.train_losses: deque[float] = deque(maxlen=window)
        self.last_gap: float | None = None
        self._alerted_gap: float | None = None

    def on_log(self, step: int, logs: Mapping[str, Any]) -> list[Diagnosis]:
        loss = _num(logs, "loss")
        gn = logs.get("grad_norm")
        if isinstance(gn, float) and not math.isfinite(gn):
            return []  # a skipped non-finite step: the Trainer's NaN filter logs a made-up loss (0 at logging_steps=1)
        if loss is not None and _is_train_log(logs):
            self.train_losses.append(loss)
        return []

    def on_evaluate(self, step: int, metrics: Mapping[str, Any]) -> list[Diagnosis]:
        eval_loss = _num(metrics, "eval_loss")
        if eval_loss is None or not self.train_losses:
            return []
        train_loss = sum(self.train_losses) / len(self.train_losses)
        gap = eval_loss - train_loss
        self.last_gap = gap
        limit = self.config.overfit_gap
        if gap <= limit:
            self._alerted_gap = None
            return []
        if self._alerted_gap is not None and gap < 1.5 * self._alerted_gap:
            return []
        self._alerted_gap = gap
        ev = {"eval_loss": eval_loss, "train_loss": train_loss, "gap": gap, "overfit_gap": limit,
              "train_loss_window": len(self.train_losses)}
        return [_diag(FailureKind.OVERFITTING,
                      f"overfitting: eval loss {eval_loss:.4g} is {gap:.3g} above the train loss {train_loss:.4g} at "
                      f"step {step} (limit {limit:g}). Not rolled back: keep the best checkpoint "
                      "(load_best_model_at_end=True with metric_for_best_model='eval_loss'), or train fewer epochs, "
                      "add data, raise weight decay/dropout", ev, [Action.ALERT], step)]


_BUILDERS = {
    "dpo_plateau": lambda kind, config, args: PreferencePlateauMonitor(kind, config, args),
    "reward_collapse": lambda kind, config, args: RewardCollapseMonitor(config),
    "kl_blowup": lambda kind, config, args: KLMonitor(config),
    "overfitting": lambda kind, config, args: OverfittingMonitor(config),
}


def monitors_for(kind: str, config: Any, args: Any = None) -> list[Any]:
    """The monitors for a trainer type (`callback.trainer_kind`); an unknown type gets the plain
    Trainer's. Empty when `config.monitors_enabled` is False."""
    if not getattr(config, "monitors_enabled", True):
        return []
    names = MONITOR_TABLE.get(kind, MONITOR_TABLE["Trainer"])
    return [_BUILDERS[n](kind, config, args) for n in names]


__all__ = ["PreferencePlateauMonitor", "RewardCollapseMonitor", "KLMonitor", "OverfittingMonitor", "monitors_for",
           "MONITOR_TABLE"]
