"""The postmortem as a report: bounded size for a million-step run, history around each event, the
first line of the text summary, and the PNG with every event marked."""
import json
import math
import random

import pytest

from helpers import read_postmortem, run_healed
from self_healing import HealingConfig
from self_healing.detectors import Detection
from self_healing.diagnosis import diagnose, diagnose_state
from self_healing.faults import Fault
from self_healing.postmortem import (DETAILED_EVENTS, HISTORY_AFTER, MAX_CURVE_POINTS, MAX_EVENTS, SHORT_AFTER,
                                     SHORT_BEFORE, PostmortemRecorder, dumps_postmortem, format_postmortem,
                                     group_events, headline, load_postmortem)
from self_healing.report import plot_postmortem, series
from test_cli import is_png


def drive(steps: int, every: int, config: HealingConfig | None = None):
    """A synthetic run through the real recorder: a NaN skipped every `every` steps, every tenth of
    them escalated to a rollback with an LR cut."""
    rec = PostmortemRecorder(config or HealingConfig())
    rng = random.Random(0)
    nan = Detection("nonfinite_loss", 0, {"loss": math.nan, "grad_norm": math.nan})
    for step in range(1, steps + 1):
        bad = step % every == 0
        loss = math.nan if bad else 2.0 + rng.random() / (1 + step / 1000)
        rec.observe(step, loss, math.nan if bad else 1.0 + rng.random(), 3e-4)
        if not bad:
            continue
        if (step // every) % 10 == 0:
            d = diagnose_state(Detection("weight_corruption", step, {"weight_norm": math.nan, "finite": False}),
                               trigger=nan)
            rec.record(step, d, ["rollback", "reduce_lr"],
                       {"rolled_back_to_step": step - 37, "steps_lost": 36,
                        "lr": {"lr_before": [3e-4], "lr_after": [1.5e-4], "factor": 0.5}},
                       reason="3 bad steps in a row (patience 2): the state itself is suspect, rolling back; "
                              "failure came back 3 steps after the last rollback: LR cut")
        else:
            rec.record(step, diagnose(Detection("nonfinite_loss", step, dict(nan.evidence))), ["skip_step"])
    return rec.build("completed", last_step=steps, max_steps=steps, trainer_class="SFTTrainer")


@pytest.mark.parametrize("every", [2000, 150])
def test_a_million_step_postmortem_stays_under_1mb(every, tmp_path):
    pm = drive(1_000_000, every)  # no wall-clock bound: the suite must pass on a loaded machine
    text = dumps_postmortem(pm)
    size = len(text.encode("utf-8"))
    assert size < 1_000_000, size
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    n_events = 1_000_000 // every
    stored = back["recovery_actions"]
    assert sum(back["event_counts"].values()) == n_events
    assert len(stored) == min(n_events, MAX_EVENTS)
    assert back["recovery_actions_dropped"] == n_events - len(stored)
    # the first events and the last one (the one that ends a run) are always kept
    assert stored[0]["step"] == every and stored[-1]["step"] == n_events * every
    # the curve spans the whole run within its point budget
    pts = back["curve"]["points"]
    assert len(pts) <= MAX_CURVE_POINTS and pts[0][0] <= back["curve"]["stride"] and pts[-1][0] > 999_000
    # history around each event: whole at both ends, short between
    hs = HealingConfig().history_size
    first, mid = stored[0], stored[len(stored) // 2]
    assert [h[0] for h in first["history"]] == list(range(every - hs + 1, every + HISTORY_AFTER + 1))
    assert first["history"][hs - 1][1] == "nan" and all(isinstance(h[1], float) for h in first["history"][:hs - 1])
    assert [h[0] for h in mid["history"]] == list(range(mid["step"] - SHORT_BEFORE + 1, mid["step"] + SHORT_AFTER + 1))
    assert len(stored[-1]["history"]) == hs + min(HISTORY_AFTER, 1_000_000 - stored[-1]["step"])
    assert "references" in first and "references" not in mid
    assert len(stored[DETAILED_EVENTS]["history"]) < len(stored[DETAILED_EVENTS - 1]["history"])
    # the report reads it
    (tmp_path / "postmortem.json").write_text(text)
    summary = format_postmortem(load_postmortem(tmp_path))
    assert summary.splitlines()[0].startswith("COMPLETED at step 1000000/1000000")
    assert f"recoveries: {n_events} events" in summary and "more in the postmortem" in summary


def test_the_file_keeps_number_arrays_compact(tmp_path):
    pm = drive(3000, 500)
    text = dumps_postmortem(pm)
    assert '"history": [[' in text  # one line per history, not one line per number
    points = json.loads(text)["curve"]["points"]
    assert text.count("\n      [") == len(points) > 1000  # curve points one per line


def test_real_run_history_around_the_event_and_plot_marking_it(tmp_path):
    sh = run_healed("sft", tmp_path, faults=[Fault("nan_loss", step=25)], max_steps=50)
    pm = read_postmortem(sh)
    ev = pm["recovery_actions"][0]
    steps = [h[0] for h in ev["history"]]
    assert steps == list(range(1, 25 + HISTORY_AFTER + 1))  # everything before, HISTORY_AFTER after
    assert ev["history"][24][1] == "nan" and all(isinstance(h[1], float) for h in ev["history"][25:])
    info = plot_postmortem(pm, tmp_path / "r.png")
    w, h = is_png(tmp_path / "r.png")
    assert w >= 800 and h >= 500 and (tmp_path / "r.png").stat().st_size > 20_000
    assert info.markers == {"skip": [25]} and info.nonfinite_steps == [25] and info.labels == 1
    assert info.points == 50
    parts = pm["goodput"]["launch"]["seconds"]  # the goodput bar: every non-zero part, productive included
    assert info.goodput == {k: v for k, v in parts.items() if v > 0} and info.goodput["productive"] > 0


def test_plot_marks_rollback_lr_change_and_give_up(tmp_path):
    sh = run_healed("sft", tmp_path, faults=[Fault("nan_weight", step=12), Fault("lr_scale", step=20, duration=2),
                                             Fault("nan_loss", step=30, duration=10_000)],
                    config=HealingConfig(snapshot_every_steps=5, max_recovery_attempts=2, nan_patience=1),
                    max_steps=50)
    pm = read_postmortem(sh)
    assert pm["exit_reason"] == "gave_up"
    info = plot_postmortem(pm, tmp_path / "g.png")
    is_png(tmp_path / "g.png")
    assert 12 in info.markers["rollback"] and info.markers["lr_change"][:2] == [20, 21]
    assert info.markers["give_up"] == [pm["last_step"]]
    assert 12 in info.nonfinite_steps and 30 in info.nonfinite_steps


def test_series_joins_the_curve_with_event_history():
    pm = {"curve": {"points": [[0, 3.0, 1.0, 1e-3], [8, 2.0, 1.0, 1e-3]]},
          "recovery_actions": [{"step": 5, "history": [[4, 2.5, 1.1], [5, "nan", "inf"], [6, 2.4, 1.2]]}]}
    s = series(pm)
    assert list(s) == [0, 4, 5, 6, 8]
    assert math.isnan(s[5][0]) and s[5][1] == math.inf and s[8] == (2.0, 1.0, 1e-3)


@pytest.mark.parametrize("pm,first", [
    ({"exit_reason": "gave_up", "last_step": 31, "max_steps": 60, "running_time_seconds": 4.0,
      "give_up_reason": "nan_loss: 3 recovery attempts spent"},
     "GAVE UP at step 31/60 after 4.0 s: nan_loss: 3 recovery"),
    ({"exit_reason": "exception", "last_step": 7, "exception_type": "ValueError", "exception_message": "bad\nrow"},
     "EXCEPTION at step 7: ValueError: bad"),
    ({"exit_reason": "interrupted", "last_step": 9, "exception_type": "KeyboardInterrupt", "exception_message": ""},
     "INTERRUPTED at step 9: KeyboardInterrupt"),
    ({"exit_reason": "completed", "last_step": 10, "running_time_seconds": 7300},
     "COMPLETED at step 10 after 2.0 h: nothing"),
])
def test_headline_says_how_and_why(pm, first):
    assert headline(pm).startswith(first)
    assert format_postmortem(pm).splitlines()[0] == headline(pm)


def test_group_events_keeps_rollbacks_apart():
    ev = lambda s, a: {"step": s, "failure": "nan_loss", "actions": a}  # noqa: E731
    groups = group_events([ev(1, ["skip_step"]), ev(2, ["skip_step"]), ev(3, ["rollback"]), ev(4, ["rollback"]),
                           ev(6, ["skip_step"])])
    assert [[e["step"] for e in g] for g in groups] == [[1, 2], [3], [4], [6]]
