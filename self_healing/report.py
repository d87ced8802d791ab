"""The postmortem as a picture: loss, gradient norm and LR over the run, every event marked.

    from self_healing.report import plot_postmortem
    plot_postmortem(load_postmortem("outputs/run"), "report.png")

matplotlib is an optional extra (`pip install "self-healing[plot]"`), imported only here, only when
a plot is asked for, and drawn on a bare Agg canvas: no pyplot, no display, no global backend
change in the caller's process. Without it `plot_postmortem` raises `PlotUnavailable` and the
text report (`postmortem.format_postmortem`) still works.

What is drawn: the whole-run curve (decimated in the file for long runs) joined with the per-step
history kept around each event, so an event is seen at full resolution; non-finite values as red
crosses on the top edge; each event as a vertical line coloured by what was done (skip, rollback
with the discarded updates shaded, LR change, batch change, give up, detected only), labelled when
there are few enough to read.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import atomic_write_bytes
from .postmortem import format_postmortem, group_events, headline

# category -> (colour, legend label); the first category whose action an event took wins
CATEGORIES: dict[str, tuple[str, str]] = {
    "give_up": ("#111111", "gave up"),
    "rollback": ("#d62728", "rolled back"),
    "lr_change": ("#9467bd", "LR changed"),
    "batch_change": ("#1f77b4", "batch changed"),
    "skip": ("#ff7f0e", "skipped"),
    "detected": ("#7f7f7f", "detected (no action)"),
}
_ACTION_CATEGORY = {"give_up": "give_up", "rollback": "rollback", "reduce_lr": "lr_change",
                    "restore_lr": "lr_change", "raise_lr": "lr_change", "reduce_batch": "batch_change",
                    "skip_step": "skip", "skip_batch": "skip"}
MAX_LABELS = 6


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


@dataclass
class PlotInfo:
    """What `plot_postmortem` drew, so callers (and tests) need not read pixels."""

    path: Path
    markers: dict[str, list[int]] = field(default_factory=dict)
    """category -> the steps marked with it."""
    nonfinite_steps: list[int] = field(default_factory=list)
    points: int = 0
    """Steps on the loss line."""
    labels: int = 0
    """Incidents labelled with their failure and actions."""
    goodput: dict[str, float] = field(default_factory=dict)
    """The launch's wall time by part (seconds) drawn as the goodput bar, when the postmortem has it."""


def event_category(event: dict[str, Any]) -> str:
    actions = event.get("actions") or []
    for cat in CATEGORIES:
        if any(_ACTION_CATEGORY.get(a) == cat for a in actions):
            return cat
    return "detected"


def _value(v: Any) -> float | None:
    """A plotted number: None when missing, nan/inf kept (the file writes them as strings)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
        return float(v)
    return None


def series(pm: dict[str, Any]) -> dict[int, tuple[float | None, float | None, float | None]]:
    """step -> (loss, grad_norm, lr): the decimated whole-run curve joined with the per-step
    history stored around each event (history wins where both have a step; it has no LR)."""
    out: dict[int, tuple[float | None, float | None, float | None]] = {}
    for pt in (pm.get("curve") or {}).get("points") or []:
        if isinstance(pt, list) and len(pt) >= 3 and isinstance(pt[0], int):
            out[pt[0]] = (_value(pt[1]), _value(pt[2]), _value(pt[3]) if len(pt) > 3 else None)
    for ev in pm.get("recovery_actions") or []:
        for h in ev.get("history") or []:
            if isinstance(h, list) and len(h) >= 3 and isinstance(h[0], int):
                lr = out.get(h[0], (None, None, None))[2]
                out[h[0]] = (_value(h[1]), _value(h[2]), lr)
    return dict(sorted(out.items()))


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _use_log(values: list[float], positive_only: bool = False) -> bool:
    """Log scale when the values are positive and their range would flatten the interesting part.
    `positive_only`: judge on the positive values alone (an LR warm-up starting at 0)."""
    if positive_only:
        values = [v for v in values if v > 0]
    if not values or min(values) <= 0:
        return False
    vs = sorted(values)
    return vs[-1] / max(vs[len(vs) // 2], 1e-30) > 20 or vs[len(vs) // 2] / vs[0] > 20


def plot_postmortem(pm: dict[str, Any], path: str | Path, title: str | None = None, dpi: int = 110) -> PlotInfo:
    """Draw `pm` into the PNG at `path` and say what was marked."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as e:
        raise PlotUnavailable("the plot needs matplotlib: pip install 'self-healing[plot]'") from e

    path = Path(path)
    data = series(pm)
    steps = list(data)
    losses = [data[s][0] for s in steps]
    norms = [data[s][1] for s in steps]
    lrs = [(s, data[s][2]) for s in steps if _finite(data[s][2])]
    info = PlotInfo(path=path, points=sum(1 for v in losses if v is not None))

    has_lr = len(lrs) >= 2
    lines = format_postmortem(pm, max_events=0).splitlines()
    facts = [ln.strip()[:150] for ln in lines if ln.startswith(("  healing:", "  goodput:", "  loss:", "  weights:"))]
    height = (7.4 if has_lr else 6.4) + 0.17 * len(facts)
    top = 1 - (0.8 + 0.17 * len(facts)) / height  # room for the title, the facts and the legend rows
    fig = Figure(figsize=(10, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ratios = [3, 2, 1] if has_lr else [3, 2]
    axes = fig.subplots(len(ratios), 1, sharex=True, gridspec_kw={"height_ratios": ratios, "hspace": 0.08})
    ax_loss, ax_gn = axes[0], axes[1]
    ax_lr = axes[2] if has_lr else None

    def draw(ax, values: list[float | None], colour: str, label: str, positive: bool = False) -> list[int]:
        # non-finite values stay in as NaN so the line breaks there instead of bridging the failure
        xs = [s for s, v in zip(steps, values) if v is not None]
        ys = [v if math.isfinite(v) else math.nan for v in values if v is not None]
        finite = [v for v in ys if math.isfinite(v)]
        if finite:
            ax.plot(xs, ys, color=colour, lw=1.3, label=label)
            if _use_log(finite, positive_only=positive):
                ax.set_yscale("log")
        bad = [s for s, v in zip(steps, values) if v is not None and not math.isfinite(v)]
        if bad:  # a NaN has no height: a cross on the top edge at its step
            ax.scatter(bad, [0.96] * len(bad), transform=ax.get_xaxis_transform(), marker="x", color="#d62728",
                       s=40, lw=2, zorder=5, clip_on=False)
        ax.set_ylabel(label)
        ax.grid(alpha=0.25)
        return bad

    bad_loss = draw(ax_loss, losses, "#2a6fbb", "loss")
    bad_gn = draw(ax_gn, norms, "#2ca02c", "grad norm (pre-clip)", positive=True)
    info.nonfinite_steps = sorted(set(bad_loss) | set(bad_gn))
    if ax_lr is not None:
        ax_lr.step([s for s, _ in lrs], [v for _, v in lrs], where="post", color="#555555", lw=1.2)
        if _use_log([v for _, v in lrs], positive_only=True):
            ax_lr.set_yscale("log")
        ax_lr.set_ylabel("LR")
        ax_lr.grid(alpha=0.25)

    events = [ev for ev in pm.get("recovery_actions") or [] if isinstance(ev.get("step"), int)]
    counts: dict[str, int] = {}
    for ev in events:
        cat = event_category(ev)
        colour = CATEGORIES[cat][0]
        step = ev["step"]
        counts[cat] = counts.get(cat, 0) + 1
        info.markers.setdefault(cat, []).append(step)
        for ax in axes:
            ax.axvline(step, color=colour, lw=1.4, alpha=0.85, ls="--" if cat == "detected" else "-", zorder=3)
        back = (ev.get("details") or {}).get("rolled_back_to_step")
        if isinstance(back, int) and back < step:  # the updates the rollback discarded
            for ax in axes:
                ax.axvspan(back, step, color=colour, alpha=0.10, lw=0)
    xs_all = steps + [ev["step"] for ev in events]
    lo, hi = (min(xs_all), max(xs_all)) if xs_all else (0, 0)
    groups = group_events(events)
    labelled = groups if len(groups) <= MAX_LABELS else [g for g in groups[:1] + groups[-1:]]
    for i, g in enumerate(labelled):  # one label per incident, staggered down the panel
        ev = g[0]
        colour = CATEGORIES[event_category(ev)][0]
        where = f"step {ev['step']}" if len(g) == 1 else f"steps {ev['step']}-{g[-1]['step']}"
        text = f"{where}: {ev.get('failure')}\n\u2192 {', '.join(ev.get('actions') or [])}"
        right = lo < hi and (ev["step"] - lo) / (hi - lo) > 0.7  # near the right edge: text to the left
        ax_loss.annotate(text, xy=(ev["step"], 0.90 - 0.17 * (i % 5)), xycoords=ax_loss.get_xaxis_transform(),
                         xytext=(-6 if right else 6, 0), textcoords="offset points", fontsize=8.5, color=colour,
                         va="top", ha="right" if right else "left",
                         bbox=dict(boxstyle="round,pad=0.25", fc="white", ec=colour, alpha=0.9), zorder=6)
    info.labels = len(labelled)

    handles = [Line2D([], [], color=CATEGORIES[c][0], lw=2, ls="--" if c == "detected" else "-",
                      label=f"{CATEGORIES[c][1]} ({counts[c]})") for c in CATEGORIES if c in counts]
    if any(isinstance((ev.get("details") or {}).get("rolled_back_to_step"), int) for ev in events):
        handles.append(Patch(color=CATEGORIES["rollback"][0], alpha=0.15, label="updates discarded by rollback"))
    if info.nonfinite_steps:
        handles.append(Line2D([], [], color="#d62728", marker="x", lw=0, mew=2, label="non-finite value"))
    dropped = pm.get("recovery_actions_dropped") or 0
    if dropped:
        handles.append(Line2D([], [], lw=0, label=f"+{dropped} events not stored"))
    if handles:  # above the panels, where it hides no data
        fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.07, top + 0.002), ncol=min(len(handles), 4),
                   fontsize=8.5, frameon=False, handlelength=1.6, columnspacing=1.2)
    if not steps:
        ax_loss.text(0.5, 0.5, "no per-step data in this postmortem", transform=ax_loss.transAxes, ha="center")
    axes[-1].set_xlabel("optimizer step")

    head = title or headline(pm)
    ok = pm.get("exit_reason") == "completed"
    fig.suptitle(head if len(head) <= 110 else head[:107] + "...", fontsize=11, fontweight="bold",
                 color="#1a7f37" if ok else "#b42318", x=0.01, y=0.995, ha="left", va="top")
    if facts:  # the numbers that say whether the model is fine, under the title
        fig.text(0.01, 1 - 0.34 / height, "\n".join(facts), fontsize=8.5, color="#444444", ha="left", va="top",
                 linespacing=1.3)
    info.goodput = _goodput_bar(fig, pm, height)
    fig.subplots_adjust(left=0.08, right=0.98, top=top, bottom=0.08)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())  # a killed `report --plot` never leaves a torn PNG
    return info


_GOODPUT_COLOURS = {"productive": "#2ca02c", "lost": "#d62728", "recovery": "#ff7f0e", "checkpointing": "#1f77b4",
                    "evaluation": "#9467bd", "startup": "#8c564b", "data_and_logging": "#bcbd22", "finishing": "#7f7f7f",
                    "hung": "#111111", "preemption": "#e377c2"}


def _goodput_bar(fig: Any, pm: dict[str, Any], height: float) -> dict[str, float]:
    """The launch's wall time as one bar, top right: productive in green, each badput part shaded
    in its colour (`self_healing.watchdog.GOODPUT_PARTS`)."""
    g = pm.get("goodput") if isinstance(pm.get("goodput"), dict) else {}
    launch = g.get("launch") if isinstance(g.get("launch"), dict) else {}
    secs = launch.get("seconds") if isinstance(launch.get("seconds"), dict) else {}
    parts = {k: float(v) for k, v in secs.items() if k in _GOODPUT_COLOURS and isinstance(v, (int, float))
             and not isinstance(v, bool) and math.isfinite(v) and v > 0}
    total = sum(parts.values())
    if total <= 0:
        return {}
    ax = fig.add_axes((0.72, 0.1 / height, 0.26, 0.14 / height))  # bottom right, clear of the facts and title
    left = 0.0
    for k in _GOODPUT_COLOURS:
        if k in parts:
            w = parts[k] / total
            ax.barh(0, w, left=left, color=_GOODPUT_COLOURS[k], alpha=1.0 if k == "productive" else 0.55, lw=0)
            if w > 0.08:
                ax.text(left + w / 2, 0, k.replace("_and_", "/").replace("checkpointing", "ckpt"), ha="center",
                        va="center", fontsize=7, color="white" if k in ("productive", "hung") else "#222222")
            left += w
    ax.set_xlim(0, 1)
    ax.set_axis_off()
    ratio = launch.get("goodput")
    ax.text(-0.01, 0.5, f"goodput {100 * ratio:.1f}%" if isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
            and math.isfinite(ratio) else "goodput", fontsize=8, ha="right", va="center", transform=ax.transAxes)
    return parts


__all__ = ["plot_postmortem", "PlotInfo", "PlotUnavailable", "series", "event_category", "CATEGORIES"]
