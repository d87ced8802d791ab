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


def test_a_loss_confirmed_blowup_is_acted_on_only_when_the_next_check_confirms_it(monkeypatch):
    """Weights grown 10x while the smoothed loss rose: an LR wrecking the model keeps the loss
    climbing at the next check (then rollback + LR cut); small weights growing while a batch-size-1
    model starts to fit bump the loss and bring it down (then nothing, and the state becomes the
    reference). Until the next check the state is suspect: no snapshot, no new reference."""
    healer, model, opt = _setup()
    for s in range(1, 6):
        _step(healer, model, opt, s)
    real = healer.check_state

    def verdicts(script):
        def check_state(step, agreed=True):
            report, _ = real(step, agreed)
            loss = script.get(step)
            bad = None if loss is None else Detection("weight_corruption", step, {
                "weight_norm": 50.0, "reference_weight_norm": 1.0, "ratio": 50.0, "factor": 10.0,
                "smoothed_loss": loss, "reference_loss": 1.0, "loss_confirmed": True})
            return report, bad
        monkeypatch.setattr(healer, "check_state", check_state)

    verdicts({10: 8.0, 15: 4.0, 20: 8.0, 25: 12.0})
    ref_5 = healer.ref_report
    assert healer.end_step(10) is None and healer.decider.suspect == (10, 8.0)
    assert healer.ref_report is ref_5 and healer.ring.latest.step == 5  # suspect: no reference, no snapshot
    assert healer.end_step(15) is None and healer.decider.suspect is None  # it came down: a bump
    assert healer.ref_report.step == 15 and healer.ring.latest.step == 15
    assert healer.end_step(20) is None
    d = healer.end_step(25)  # still climbing: the LR
    assert d is not None and d.failure == FailureKind.DIVERGENCE and d.rolled_back_to is not None
    assert [a.value for a in d.actions] == ["rollback", "reduce_lr"]
    assert d.diagnosis.evidence["first_seen_step"] == 20 and healer.decider.suspect is None


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


# ---------------------------------------------------------------------------------------------
# exceptions that escaped the training loop: plain facts in, a typed decision out (no Trainer)
# ---------------------------------------------------------------------------------------------
import errno  # noqa: E402

from self_healing.decider import BatchFacts, ExceptionFacts, plan_batch_cut  # noqa: E402
from self_healing.diagnosis import tag_origin  # noqa: E402
from self_healing.engine import ExceptionDecision  # noqa: E402


class _Args:
    """The batch settings of a Trainer's args, as a plain object."""

    def __init__(self, bs=8, ga=1, gradient_checkpointing=False, eval_bs=8):
        self.per_device_train_batch_size = bs
        self.gradient_accumulation_steps = ga
        self.gradient_checkpointing = gradient_checkpointing
        self.per_device_eval_batch_size = eval_bs


def _apply_batch(args, change):
    """What the orchestrator does with a batch decision (`orchestration.apply_batch_change`)."""
    if change.enable:
        setattr(args, change.enable, True)
    else:
        args.per_device_train_batch_size = change.per_device_train_batch_size
        args.gradient_accumulation_steps = change.gradient_accumulation_steps


def _oom(origin="forward"):
    exc = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    tag_origin(exc, origin)
    return exc


def _facts(exc, step=11, origin="forward", args=None, **kw):
    return ExceptionFacts(exc, step, origin=origin, batch=BatchFacts.from_args(args or _Args()), **kw)


def test_oom_halves_the_batch_down_to_one_then_checkpointing_then_gives_up():
    healer, _, _ = _setup(max_recovery_attempts=10)
    args = _Args(bs=8, ga=2)
    seen = []
    for i in range(6):
        d = healer.decide_exception(_facts(_oom(), step=11 + i, args=args))
        assert isinstance(d, ExceptionDecision) and d.failure == FailureKind.OOM and not d.raise_unchanged
        seen.append(d)
        if d.stop:
            break
        assert d.free_memory and d.resume is not None and d.resume.prefer_current
        _apply_batch(args, d.batch)
    assert [d.actions for d in seen] == [(Action.REDUCE_BATCH,)] * 3 + [(Action.ENABLE_GRADIENT_CHECKPOINTING,),
                                                                       (Action.GIVE_UP,)]
    assert [d.details["batch"]["per_device_train_batch_size"] for d in seen[:3]] == [[8, 4], [4, 2], [2, 1]]
    assert [d.details["batch"]["effective_batch"] for d in seen[:3]] == [[16, 16]] * 3
    assert args.per_device_train_batch_size == 1 and args.gradient_accumulation_steps == 16
    assert args.gradient_checkpointing
    last = seen[-1]
    assert last.stop and last.batch is None and last.resume is None
    assert last.reason.startswith("out of memory at per-device batch 1 with gradient checkpointing on")
    # deciding applies nothing: no event, no give-up yet; the engine records it when applied
    assert healer.recorder.events == [] and not healer.gave_up
    applied = healer.apply_exception(last)
    assert healer.gave_up and healer.give_up_reason == f"oom: {last.reason}"
    assert healer.recorder.events[-1]["actions"] == ["give_up"] and applied.event is healer.recorder.events[-1]


def test_oom_batch_cut_keeps_the_effective_batch_when_it_does_not_halve():
    change = plan_batch_cut(BatchFacts.from_args(_Args(bs=6, ga=1)))
    assert change.per_device_train_batch_size == 3 and change.gradient_accumulation_steps == 2
    change = plan_batch_cut(BatchFacts.from_args(_Args(bs=9, ga=1)))
    assert change.per_device_train_batch_size == 3 and change.gradient_accumulation_steps == 3
    assert "does not halve evenly" in change.record["note"]


def test_oom_cuts_are_an_escalation_bounded_by_max_recovery_attempts():
    healer, _, _ = _setup(max_recovery_attempts=2)
    args = _Args(bs=64)
    decisions = [healer.decide_exception(_facts(_oom(), step=11 + i, args=args)) for i in range(3)]
    assert [d.stop for d in decisions] == [False, False, True]
    assert "max_recovery_attempts=2" in decisions[2].reason


def test_oom_in_evaluation_halves_the_eval_batch_only():
    healer, _, _ = _setup()
    d = healer.decide_exception(_facts(_oom("eval"), origin="eval", args=_Args(bs=8, eval_bs=4)))
    assert d.phase == "eval" and d.batch is None and d.eval_batch.per_device_eval_batch_size == 2
    assert d.details == {"phase": "eval", "eval_batch": {"per_device_eval_batch_size": [4, 2],
                                                         "training_batch": "unchanged"}}
    d = healer.decide_exception(_facts(_oom("eval"), origin="eval", args=_Args(eval_bs=1)))
    assert d.stop and d.reason == "out of memory in evaluation at per-device eval batch 1"
    assert d.details["eval_batch"] is None


def test_disk_full_frees_space_and_gives_up_only_when_nothing_was_freed():
    healer, _, _ = _setup()
    exc = OSError(errno.ENOSPC, "No space left on device")
    d = healer.decide_exception(_facts(exc, origin="save"))
    assert d.free_disk and not d.stop and d.backoff_attempt is None and d.failure == FailureKind.API_ERROR
    freed = healer.disk_freed(d, ["out/checkpoint-10"])
    assert not freed.stop and freed.details["freed"] == ["out/checkpoint-10"] and freed.resume is not None
    nothing = healer.disk_freed(d, [])
    assert nothing.stop and nothing.actions == (Action.GIVE_UP,) and nothing.resume is None
    assert nothing.reason.startswith("disk full, and nothing of the plugin's own")


def test_a_transient_error_is_retried_after_a_backoff_then_resumed(monkeypatch):
    import self_healing.applier as applier

    monkeypatch.setattr(applier.time, "sleep", lambda s: None)
    healer, _, _ = _setup(max_recovery_attempts=2)
    exc = ConnectionError("connection reset by peer")
    d = healer.decide_exception(_facts(exc, origin="data"))
    assert d.actions == (Action.BACKOFF_RETRY,) and d.backoff_attempt == 1 and not d.stop
    d = healer.apply_exception(d)
    assert "backoff_seconds" in d.details and healer.recorder.counters["api_retries"] == 1
    assert healer.recorder.events == []  # the resume is the event
    d = healer.record_resume(d, "the current state at step 10")
    ev = healer.recorder.events[-1]
    assert ev["actions"] == ["backoff_retry", "resume"] and ev["details"]["resume_from"].endswith("step 10")
    assert healer.recorder.counters["exceptions_healed"] == 1 and d.actions[-1] == Action.RESUME
    # the attempt budget holds across retries
    assert not healer.decide_exception(_facts(exc, step=12, origin="data")).stop
    assert healer.decide_exception(_facts(exc, step=13, origin="data")).stop


@pytest.mark.parametrize("exc, origin", [(ZeroDivisionError("division by zero"), "trainer"),
                                         (KeyError("labels"), "callback"),
                                         (TypeError("unsupported operand"), "forward"),
                                         (AssertionError("shapes"), "data")])
def test_a_bug_in_the_users_code_is_raised_unchanged_and_decides_nothing(exc, origin):
    healer, _, _ = _setup()
    before = healer.policy.state_dict()
    d = healer.decide_exception(_facts(exc, origin=origin, can_rollback=True))
    assert d.raise_unchanged and not d.diagnosis.healable and d.actions == () and d.resume is None
    assert d.exception is exc and d.failure == FailureKind.UNKNOWN
    assert healer.policy.state_dict() == before and healer.recorder.events == [] and not healer.gave_up


def test_a_data_error_skips_its_batch_unless_the_data_is_a_stream():
    healer, _, _ = _setup()
    exc = KeyError("'text' missing in row 3")
    d = healer.decide_exception(_facts(exc, origin="data"))
    assert d.failure == FailureKind.DATA_ERROR and d.resume.skip_steps == 1 and d.resume.prefer_current
    healer.apply_exception(d)
    assert healer.recorder.skipped_batches[-1]["step"] == 11
    streamed = healer.decide_exception(_facts(KeyError("'text'"), origin="data", streamed_data=True))
    assert streamed.raise_unchanged and "the training data is a stream" in streamed.diagnosis.summary


def test_weights_found_corrupted_at_an_exception_resume_from_the_verified_snapshot():
    healer, _, _ = _setup()
    state = Detection("weight_corruption", 11, {"weight_norm": float("nan")})
    d = healer.decide_exception(_facts(RuntimeError("expected a finite loss"), origin="trainer", state=state,
                                       can_rollback=True))
    assert not d.raise_unchanged and d.failure == FailureKind.WEIGHT_CORRUPTION and not d.resume.prefer_current


def test_an_observers_findings_are_acted_on_by_the_engine_alone():
    """The early-warning signals hand the engine typed findings (`Finding`) instead of calling into
    it: a failure is decided like any other (before the update: skipped, rolled back), a warning
    takes its early snapshot only when the state is sound, an undone update counts as a skip."""
    from types import SimpleNamespace

    from self_healing.decider import Finding, UndoRequest
    from self_healing.snapshot import state_report

    healer, model, opt = _setup()
    for s in range(1, 13):
        _step(healer, model, opt, s)
    diag = Diagnosis(FailureKind.INSTABILITY_FORECAST, "growing: early snapshot taken and clipping tightened", {},
                     [Action.CHECKPOINT, Action.TIGHTEN_CLIPPING], [], 13)
    sound = state_report(model, opt, 12)
    assert healer.act_on(Finding("warning", 13, diagnosis=diag, snapshot=sound)) is None
    ev = healer.recorder.events[-1]
    assert ev["actions"] == ["checkpoint", "tighten_clipping"] and ev["details"]["snapshot_step"] == 12
    assert healer.ring.latest.step == 12
    with torch.no_grad():
        model[0].weight.mul_(1e4)  # scaled outside the optimizer: not a state to snapshot
    bad = state_report(model, opt, 13)
    diag2 = Diagnosis(FailureKind.INSTABILITY_FORECAST, "growing", {}, [Action.CHECKPOINT, Action.TIGHTEN_CLIPPING],
                      [], 14)
    healer.act_on(Finding("warning", 14, diagnosis=diag2, snapshot=bad))
    ev = healer.recorder.events[-1]
    assert ev["actions"] == ["tighten_clipping"] and "refused" in ev["details"]["snapshot"]
    assert "early snapshot was not taken" in ev["diagnosis"] and healer.ring.latest.step == 12
    skipped = healer.recorder.counters["skipped_steps"]
    d = healer.act_on(Finding("failure", 14, detection=Detection("instability_forecast", 14, {"lr_cause": False})))
    assert isinstance(d, Decision) and d.skipped and d.rolled_back_to is not None  # the newest verified one
    assert healer.recorder.counters["skipped_steps"] >= skipped
    undone = Diagnosis(FailureKind.PROBE_REGRESSION, "undone", {}, [], [], 15)
    healer.act_on(Finding("record", 15, diagnosis=undone,
                          undo=UndoRequest(SimpleNamespace(restore=lambda m, o: True), undone)))
    assert healer.recorder.counters["skipped_steps"] >= skipped + 1 and healer.step_flagged
    with pytest.raises(ValueError, match="Finding.kind='alarm'"):
        Finding("alarm", 1, diagnosis=diag)
    with pytest.raises(ValueError, match="needs a detection"):
        Finding("failure", 1, diagnosis=diag)


class _Restore:
    """A stand-in for the probe check's pre-update copy: it records that the engine restored it (into
    which objects) and can fail, as a copy that no longer matches the optimizer state does."""

    def __init__(self, copy, works=True):
        self.copy, self.works, self.calls = copy, works, []

    def restore(self, model, optimizer):
        self.calls.append((model, optimizer))
        return self.works and self.copy.restore(model, optimizer)


def test_the_engine_undoes_an_update_an_observer_found_harmful():
    """The probe check only judges and copies; the engine's applier takes the update back
    (`Finding.undo`): restored -> the weights and Adam's state as before the update, the step
    counted as skipped and taking no snapshot, "update undone" in the event. A copy that cannot be
    restored leaves the update in place: nothing counted, and the event says so."""
    from self_healing.decider import Finding, UndoRequest
    from self_healing.early_probe import ProbeResult, UpdateUndo, probe_diagnosis

    def run(works, cut=False):
        healer, model, opt = _setup()
        for s in range(1, 15):
            _step(healer, model, opt, s)
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(15))
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        loss.backward()
        healer.begin_step()
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert healer.judge_step(healer.step_signals(15, loss, norm)) is None
        copy = UpdateUndo()
        assert copy.capture(model, opt)  # the probe's read, just before the update
        before = _weights(model) + [v.clone() for st in opt.state.values() for v in st.values()]
        opt.step()
        opt.zero_grad()
        updated = _weights(model)
        r = ProbeResult(15, 1.0, 1.5, 0.5, 0.1, "conformal", True)
        actions = [Action.SKIP_STEP] + ([Action.REDUCE_LR] if cut else [])
        handle = _Restore(copy, works)
        finding = Finding("advisory" if cut else "record", 15, diagnosis=probe_diagnosis(r, 0.01, actions, 2),
                          undo=UndoRequest(handle, probe_diagnosis(r, 0.01, actions[1:], 2, undo_failed=True)))
        skipped, lr = healer.recorder.counters["skipped_steps"], opt.param_groups[0]["lr"]
        d = healer.act_on(finding)
        flagged = healer.step_flagged
        healer.end_step(15)  # a snapshot is due at 15
        assert handle.calls == [(model, opt)]  # the engine restored the copy, into its own live objects
        now = _weights(model) + [v for st in opt.state.values() for v in st.values()]
        return (healer, d, healer.recorder.events[-1], healer.recorder.counters["skipped_steps"] - skipped,
                flagged, opt.param_groups[0]["lr"] / lr, now, before, updated)

    healer, d, ev, counted, flagged, _, now, before, _ = run(works=True)
    assert isinstance(d, Decision) and d.skipped and d.actions == (Action.SKIP_STEP,)
    assert all(torch.equal(a, b) for a, b in zip(now, before))  # weights and Adam's state (step counts too)
    assert counted == 1 and flagged and healer.ring.latest.step == 10  # no snapshot of an undone step
    assert ev["actions"] == ["skip_step"] and "update undone (pre-update state restored)" in ev["diagnosis"]

    healer, d, ev, counted, flagged, _, now, _, updated = run(works=False)
    assert d is not None and not d.skipped and d.actions == ()
    assert all(torch.equal(a, b) for a, b in zip(now, updated))  # the update stayed
    assert counted == 0 and not flagged and healer.ring.latest.step == 15
    assert ev["actions"] == [] and "undone" not in ev["diagnosis"]
    assert "the pre-update copy no longer matched the weights or optimizer state, so the update was kept" \
        in ev["diagnosis"]  # not "observed only": the run was not in observe mode

    healer, d, ev, counted, _, lr_ratio, now, before, _ = run(works=True, cut=True)  # the probe rule's LR cut
    assert d.skipped and d.actions == (Action.SKIP_STEP, Action.REDUCE_LR) and counted == 1
    assert lr_ratio == pytest.approx(healer.config.lr_reduction_factor) and ev["actions"] == ["skip_step", "reduce_lr"]
    assert "update undone; 2 of the last 5 probes regressed" in ev["diagnosis"]
    healer, d, ev, counted, _, lr_ratio, *_ = run(works=False, cut=True)  # the LR cut stands without the undo
    assert not d.skipped and counted == 0 and ev["actions"] == ["reduce_lr"]
    assert lr_ratio == pytest.approx(healer.config.lr_reduction_factor)
    assert ev["diagnosis"].endswith("so the update was kept; 2 of the last 5 probes regressed, so the LR was reduced")
    assert all(torch.equal(a, b) for a, b in zip(now[:4], before[:4]))


def test_a_findings_rollback_is_fisher_weighted_by_the_engine():
    """The early-warning signals hand their Fisher importance with a failure; the engine, having
    rolled back, weighs it: w = snapshot + (1 - importance) (w_before - snapshot). Importance 1
    is a plain rollback, 0 keeps the weights as they were, None rolls that parameter back."""
    from self_healing.decider import Finding

    def run(weighted):
        healer, model, opt = _setup()
        for s in range(1, 13):
            _step(healer, model, opt, s)
        before, params = _weights(model), list(model.parameters())
        importance = [torch.full_like(params[0], 0.25), torch.zeros_like(params[1]), None,
                      torch.ones_like(params[3])]
        d = healer.act_on(Finding("failure", 13, detection=Detection("instability_forecast", 13, {"lr_cause": False}),
                                  fisher_weights=(params, importance) if weighted else None))
        assert d is not None and d.rolled_back_to == 5  # the newest verified snapshot
        return before, _weights(model)

    before, snapshot = run(weighted=False)  # a plain rollback: the snapshot's weights
    before2, w = run(weighted=True)
    assert all(torch.equal(a, b) for a, b in zip(before, before2))  # the same run twice
    assert not torch.equal(before[0], snapshot[0])
    assert torch.allclose(w[0], snapshot[0] + 0.75 * (before[0] - snapshot[0]))
    assert torch.equal(w[1], before[1])  # importance 0: kept
    assert torch.equal(w[2], snapshot[2]) and torch.equal(w[3], snapshot[3])  # None, 1: rolled back
    with pytest.raises(ValueError, match="only a failure's rollback"):
        Finding("record", 1, diagnosis=Diagnosis(FailureKind.PROBE_REGRESSION, "x", {}, [], [], 1),
                fisher_weights=(before, before))
