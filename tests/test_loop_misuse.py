"""The plain-loop Healer used the ways people get it wrong (found by an adversarial pass): each
mistake is said at once, in the caller's terms, instead of being judged as a failing run."""
import numpy as np
import pytest
import torch

from self_healing import Healer, HealingConfig
from self_healing.faults import Fault, inject_faults


def _loop(out: str, steps: int = 30, fault: Fault | None = None, loss_as=lambda t: t):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    healer = Healer(model, opt, None, HealingConfig(), output_dir=out)
    if fault is not None:
        inject_faults(healer, fault)
    for _ in range(steps):
        x = torch.randn(8, 4)
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        loss.backward()
        if healer.before_step(loss_as(loss)):
            opt.step()
        opt.zero_grad()
        healer.after_step()
    return healer, model, opt


@pytest.mark.parametrize("bad, error", [(None, TypeError), ("0.5", TypeError), (True, TypeError),
                                        (torch.ones(2), ValueError)], ids=["none", "str", "bool", "vector"])
def test_a_loss_that_is_not_a_scalar_is_an_error_not_a_nan(tmp_path, bad, error):
    """Judged as a number, such a loss read as NaN: every update of a healthy run was skipped and
    the healer gave up 'nan_loss'."""
    with pytest.raises(error, match=r"Healer.before_step\(loss\)"):
        _loop(steps=1, out=str(tmp_path), loss_as=lambda t: bad)


def test_numpy_and_python_losses_are_read_as_numbers(tmp_path):
    for conv in (lambda t: np.float32(t.item()), lambda t: np.array(t.item()), lambda t: t.item()):
        healer, _, _ = _loop(steps=12, out=str(tmp_path), loss_as=conv)
        pm = healer.finish()
        assert pm["exit_reason"] == "completed" and pm["recovery_actions"] == []


def test_lr_ramp_rehearses_on_a_plain_loop(tmp_path):
    """`lr_ramp` is listed as a loop fault kind; it raised AttributeError (`_ramp_lr` lived on the
    Trainer injector only)."""
    healer, _, opt = _loop(steps=20, fault=Fault("lr_ramp", step=5, duration=10), out=str(tmp_path))
    assert [f["kind"] for f in healer.faults.fired][:1] == ["lr_ramp"]
    assert opt.param_groups[0]["lr"] > 0.05


def test_using_the_healer_after_finish_is_an_error(tmp_path):
    healer, _, _ = _loop(steps=3, out=str(tmp_path))
    healer.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        healer.before_step(torch.tensor(1.0))


def test_sys_exit_zero_in_the_with_block_is_a_completed_run(tmp_path):
    model = torch.nn.Linear(2, 1)
    healer = Healer(model, torch.optim.SGD(model.parameters(), lr=0.1), None, output_dir=str(tmp_path))
    with pytest.raises(SystemExit):
        with healer:
            raise SystemExit(0)
    assert healer.postmortem["exit_reason"] == "completed"


def test_two_unwritable_postmortems_in_one_second_do_not_overwrite_each_other(tmp_path, monkeypatch):
    """The temp-dir fallback was named by second and pid only: the second run replaced the first's."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where output_dir should be")
    for _ in range(2):
        model = torch.nn.Linear(2, 1)
        Healer(model, torch.optim.SGD(model.parameters(), lr=0.1), None, output_dir=str(blocker / "run")).finish()
    assert len(list(tmp_path.glob("self-healing-postmortem-*.json"))) == 2
