"""The healing engine on its own: plain facts in (a step's loss and gradient norm, the live
model and optimizer, an exception), typed decisions out, applied once, emitted once."""

import logging

import pytest
import torch

from self_healing import HealingConfig
from self_healing.detectors import Detection
from self_healing.diagnosis import Action, Diagnosis, FailureKind
from self_healing.engine import Decision, Healer


def _setup(lr=1e-2, **cfg):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    cfg.setdefault("snapshot_every_steps", 5)
    cfg.setdefault("integrity_check_every_steps", 5)
    healer = Healer(model, opt, config=HealingConfig(**cfg))
    healer.start(0)
    return healer, model, opt


def _step(healer, model, opt, step, loss_factor=1.0):
    """One step of a regression loop fed to the engine; returns (decision, loss)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=g)
    loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean() * loss_factor
    loss.backward()
    healer.begin_step()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    decision = healer.judge_step(healer.step_signals(step, loss, norm))
    if decision is None:
        opt.step()
    opt.zero_grad()
    healer.observe_step_time()
    after = healer.end_step(step)
    return decision or after, loss


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_healthy_steps_decide_nothing_and_change_nothing():
    healer, model, opt = _setup()
    for s in range(1, 21):
        d, _ = _step(healer, model, opt, s)
        assert d is None
    assert healer.recorder.events == []
    assert healer.ring.latest_verified() is not None  # snapshots were taken and verified along the way


def test_nan_loss_is_skipped_before_the_update_and_the_weights_keep_their_values():
    healer, model, opt = _setup()
    for s in range(1, 11):
        _step(healer, model, opt, s)
    before = _weights(model)
    d, _ = _step(healer, model, opt, 11, loss_factor=float("nan"))
    assert isinstance(d, Decision) and d.skipped and d.actions == (Action.SKIP_STEP,)
    assert d.failure == FailureKind.NAN_LOSS and not d.stop and d.rolled_back_to is None
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))
    assert healer.recorder.counters["skipped_steps"] == 1 and healer.recorder.counters["nan_count"] == 1


def test_bad_steps_past_patience_escalate_to_a_rollback_to_the_verified_snapshot():
    healer, model, opt = _setup(nan_patience=2)
    for s in range(1, 16):
        _step(healer, model, opt, s)
    target = healer.ring.latest_verified().step
    decisions = [_step(healer, model, opt, s, loss_factor=float("nan"))[0] for s in range(16, 19)]
    assert [d.actions for d in decisions[:2]] == [(Action.SKIP_STEP,), (Action.SKIP_STEP,)]
    assert decisions[2].actions == (Action.ROLLBACK,) and decisions[2].rolled_back_to == target
    assert "patience 2" in decisions[2].reason


def test_corrupted_weights_found_after_the_update_roll_back_in_place():
    healer, model, opt = _setup()
    for s in range(1, 6):
        _step(healer, model, opt, s)
    at_5 = _weights(model)
    for s in range(6, 11):
        _step(healer, model, opt, s)
    assert healer.ring.latest_verified().step == 5  # step 10's snapshot has no healthy steps after it yet
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    d = healer.end_step(15)  # an integrity check falls due: the corruption is seen after the update
    assert d is not None and d.failure == FailureKind.WEIGHT_CORRUPTION and not d.skipped
    assert d.rolled_back_to == 5 and all(torch.equal(a, b) for a, b in zip(at_5, _weights(model)))


def test_an_lr_set_far_above_the_reference_is_put_back():
    healer, model, opt = _setup(lr=1e-3)
    healer.lr_reference = [1e-3]
    for s in range(1, 6):
        _step(healer, model, opt, s)
    opt.param_groups[0]["lr"] = 3.0
    d, _ = _step(healer, model, opt, 6)
    assert d.failure == FailureKind.LR_SPIKE and Action.RESTORE_LR in d.actions and d.skipped
    assert opt.param_groups[0]["lr"] == 1e-3


def test_an_unhealable_exception_stops_with_the_last_good_weights_loaded():
    healer, model, opt = _setup()
    for s in range(1, 11):
        _step(healer, model, opt, s)
    snap = healer.ring.latest_verified()
    exc = TypeError("unsupported operand type(s) for +: 'int' and 'str'")
    d = healer.handle([Detection("exception", 11, {"exception_type": "TypeError"})], 11, before_update=True,
                      exception=exc)
    assert d.stop and d.actions == (Action.GIVE_UP,) and healer.gave_up
    assert d.details["restored_step"] == snap.step and healer.give_up_reason.startswith(d.failure.value)


def test_every_decision_is_emitted_once_recorder_then_observers_then_log(caplog):
    healer, model, opt = _setup()
    seen = []

    class Observer:
        def on_event(self, event):
            seen.append(("event", event is healer.recorder.events[-1]))

        def on_step(self, step, signals, info):
            seen.append(("step", step, info["skipped"]))

    healer.observers.append(Observer())
    with caplog.at_level(logging.WARNING, logger="self_healing"):
        _step(healer, model, opt, 1, loss_factor=float("inf"))
    assert seen == [("event", True), ("step", 1, True)]
    lines = [r.getMessage() for r in caplog.records if "step 1:" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith("-> skip_step")


def test_a_failing_observer_never_stops_a_decision(caplog):
    healer, model, opt = _setup()

    class Broken:
        def on_event(self, event):
            raise RuntimeError("dashboard down")

    healer.observers.append(Broken())
    d, _ = _step(healer, model, opt, 1, loss_factor=float("nan"))
    assert d.skipped and healer.recorder.events[-1]["failure"] == "nan_loss"
    assert any("dashboard down" in r.getMessage() for r in caplog.records)


def test_an_advisory_changes_only_the_lr_it_asks_for():
    healer, model, opt = _setup(lr=1e-2)
    before = _weights(model)
    diag = Diagnosis(FailureKind.OSCILLATION, "loss oscillates", {}, [Action.REDUCE_LR], 7)
    d = healer.apply_advisory(diag, 7)
    assert d.lr_factor == healer.config.lr_reduction_factor and not d.skipped and not d.stop
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * healer.config.lr_reduction_factor)
    assert healer.policy.lr_scale == pytest.approx(healer.config.lr_reduction_factor)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))


def test_the_objects_callable_follows_a_host_that_replaces_them():
    """A Trainer creates its optimizer late and may replace the model: the engine reads them live."""
    _, model, opt = _setup()
    host = {"model": None, "opt": None}
    healer = Healer(config=HealingConfig(), objects=lambda: (host["model"], host["opt"], None))
    host["model"], host["opt"] = model, opt
    assert healer.model is model and healer.optimizer is opt
    assert healer.start(0) and healer.ring.latest_verified().step == 0


def test_a_batch_that_could_not_be_built_is_skipped_until_data_errors_look_like_a_pipeline_bug():
    healer, _, _ = _setup(max_skipped_batches=2)
    errors = [KeyError(f"'text' missing in row {i}") for i in range(3)]
    for e in errors:  # a collator's KeyError, tagged as raised while building the batch
        from self_healing.diagnosis import tag_origin

        tag_origin(e, "collate")
    decisions = [healer.skip_batch(e, 5 + i) for i, e in enumerate(errors)]
    assert [d.actions for d in decisions[:2]] == [(Action.SKIP_BATCH,), (Action.SKIP_BATCH,)]
    assert decisions[2].stop and decisions[2].actions == (Action.GIVE_UP,) and "max_skipped_batches=2" in decisions[2].reason
    assert [b["step"] for b in healer.recorder.skipped_batches] == [5, 6, 7]


def test_a_step_whose_update_was_dropped_verifies_no_snapshot():
    healer, model, opt = _setup()
    for s in range(1, 6):
        _step(healer, model, opt, s)  # snapshot at 5, unverified
    snap = healer.ring.latest
    healer.begin_step()
    d = healer.handle([Detection("instability_forecast", 6, {"lr_cause": True})], 6, before_update=True)
    assert d.actions == (Action.SKIP_STEP, Action.REDUCE_LR)  # no rollback: the step-5 snapshot stays
    healer.end_step(6)
    assert healer.ring.latest is snap and snap.healthy_steps_after == 0 and healer.step_flagged
