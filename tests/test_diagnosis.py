"""Diagnosis on plain detections and exceptions: no trainer."""
import errno

import pytest
import torch

from self_healing.detectors import Detection
from self_healing.diagnosis import Action, FailureKind, diagnose, diagnose_exception


def test_nan_loss_with_clean_weights_is_skipped():
    d = diagnose(Detection("nonfinite_loss", 25, {"loss": float("nan")}))
    assert d.failure == FailureKind.NAN_LOSS and d.actions == [Action.SKIP_STEP]
    assert "step 25" in d.summary and d.references


def test_nan_loss_with_nan_weights_is_weight_corruption():
    state = Detection("weight_corruption", 25, {"weight_norm": float("nan"), "finite": False})
    d = diagnose(Detection("nonfinite_loss", 25, {"loss": float("nan")}), state)
    assert d.failure == FailureKind.WEIGHT_CORRUPTION and d.actions == [Action.ROLLBACK]
    assert d.evidence["triggered_by"] == "nonfinite_loss"


@pytest.mark.parametrize("signal,kind,actions", [
    ("nonfinite_gradient", FailureKind.NONFINITE_GRADIENT, [Action.SKIP_STEP]),
    ("gradient_explosion", FailureKind.GRADIENT_EXPLOSION, [Action.SKIP_STEP]),
    ("lr_spike", FailureKind.LR_SPIKE, [Action.SKIP_STEP, Action.RESTORE_LR]),
    ("loss_spike", FailureKind.LOSS_SPIKE, [Action.SKIP_STEP]),
    ("divergence", FailureKind.DIVERGENCE, [Action.ROLLBACK, Action.REDUCE_LR]),
    ("optimizer_state_corruption", FailureKind.OPTIMIZER_STATE_CORRUPTION, [Action.ROLLBACK]),
])
def test_each_signal_maps_to_a_failure_and_actions(signal, kind, actions):
    ev = {"grad_norm": 1e9, "ratio": 1e9, "running_mean": 1.0, "z_score": 40.0, "lr": 3.0, "scheduled_lr": 1e-3,
          "loss": 40.0, "smoothed_loss": 5.0, "best_smoothed_loss": 2.0, "rising_steps": 20,
          "exp_avg_sq_norm": 0.0, "reference_exp_avg_sq_norm": 1.0, "steps_apart": 5, "lowest_possible": 0.99}
    d = diagnose(Detection(signal, 7, ev))
    assert d.failure == kind and d.actions == actions and "step 7" in d.summary


def test_lr_cut_only_for_lr_related_failures():
    for signal in ("nonfinite_loss", "nonfinite_gradient", "gradient_explosion", "lr_spike", "loss_spike"):
        assert Action.REDUCE_LR not in diagnose(Detection(signal, 1, {})).actions


@pytest.mark.parametrize("exc,origin,kind,healable", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "step", FailureKind.OOM, True),
    (RuntimeError("CUDA error: out of memory"), "eval", FailureKind.OOM, True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), "trainer", FailureKind.OOM, True),
    (RuntimeError("The size of tensor a (4) must match the size of tensor b (5)"), "forward", FailureKind.DATA_ERROR, True),
    (KeyError("input_ids"), "collate", FailureKind.DATA_ERROR, True),
    (IndexError("index out of range in self"), "forward", FailureKind.DATA_ERROR, True),
    (ValueError("bad row"), "data", FailureKind.DATA_ERROR, True),
    (ConnectionError("Connection reset by peer"), "step", FailureKind.API_ERROR, True),
    (TimeoutError("read timed out"), "save", FailureKind.API_ERROR, True),
    (OSError(errno.ESTALE, "Stale file handle"), "trainer", FailureKind.API_ERROR, True),
    (RuntimeError("probability tensor contains either `inf`, `nan` or element < 0"), "step", FailureKind.NAN_LOSS, True),
    (ZeroDivisionError("division by zero"), "forward", FailureKind.UNKNOWN, False),
    (AssertionError("bug"), "collate", FailureKind.UNKNOWN, False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "forward", FailureKind.UNKNOWN, False),
    (KeyboardInterrupt(), "step", FailureKind.INTERRUPTED, False),
])
def test_exception_classification(exc, origin, kind, healable):
    d = diagnose_exception(exc, step=3, origin=origin)
    assert d.failure == kind and d.healable == healable
    assert d.evidence["exception_type"] == type(exc).__name__ and d.evidence["origin"] == origin


@pytest.mark.parametrize("exc,origin", [
    (KeyError("accuracy"), "eval"),  # compute_metrics
    (ValueError("Can't find a valid checkpoint at /wrong/path"), "trainer"),  # resume path validation
    (ValueError("The model did not return a loss from the inputs"), "step"),  # compute_loss
    (TypeError("'<' not supported between instances of 'NoneType' and 'int'"), "trainer"),  # max_grad_norm=None
    (TypeError("unsupported operand type(s) for +: 'int' and 'str'"), "step"),  # a reward function's bug
    (TypeError("forward() got an unexpected keyword argument 'foo'"), "forward"),  # the model's code
    (KeyError("label"), "eval"),  # a collator error during evaluation
    (RuntimeError("The size of tensor a (4) must match the size of tensor b (5)"), "step"),
    (RuntimeError("loss is nan"), "eval"),
    (KeyError("input_ids"), None),  # where it came from is unknown: never guessed to be data
])
def test_a_data_like_type_outside_batch_building_is_a_bug_not_data(exc, origin):
    d = diagnose_exception(exc, step=3, origin=origin)
    assert d.failure == FailureKind.UNKNOWN and not d.healable and not d.actions


def test_origin_travels_on_the_exception_and_evaluation_owns_what_it_raises():
    from self_healing.diagnosis import exception_origin, tag_origin

    exc = KeyError("input_ids")
    tag_origin(exc, "collate")
    tag_origin(exc, "data")  # an outer wrapper does not overwrite the innermost origin ...
    assert exception_origin(exc) == "collate" and diagnose_exception(exc).failure == FailureKind.DATA_ERROR
    tag_origin(exc, "eval", override=True)  # ... except evaluation/saving, whose batches are never skipped
    assert diagnose_exception(exc).failure == FailureKind.UNKNOWN


def test_http_5xx_and_429_are_transient():
    class Resp:
        status_code = 503

    class HfHubHTTPError(Exception):
        response = Resp()

    assert diagnose_exception(HfHubHTTPError("server error"), origin="step").failure == FailureKind.API_ERROR


def test_eval_oom_does_not_shrink_the_training_batch():
    d = diagnose_exception(torch.OutOfMemoryError("CUDA out of memory"), phase="eval")
    assert d.failure == FailureKind.OOM and Action.REDUCE_BATCH not in d.actions


def test_diagnosis_serialises():
    d = diagnose(Detection("nonfinite_loss", 3, {"loss": float("nan")}))
    out = d.to_dict()
    assert out["failure"] == "nan_loss" and out["actions"] == ["skip_step"]
