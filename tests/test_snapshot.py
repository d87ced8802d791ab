"""Snapshots restore bit-exactly: weights, optimizer state, scheduler, RNG, and the plugin's own state."""
import copy
import random

import numpy as np
import torch

from self_healing.snapshot import SnapshotRing, state_report
from self_healing.tiny import tiny_llama, tiny_tokenizer
from self_healing.zclip import ZClip


def _train_steps(model, opt, sched, n):
    for _ in range(n):
        ids = torch.randint(0, 40, (2, 12))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def _setup():
    torch.manual_seed(0)
    model = tiny_llama(tiny_tokenizer(), hidden=32, layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def test_restore_is_bit_exact():
    model, opt, sched = _setup()
    _train_steps(model, opt, sched, 3)
    zc = ZClip(warmup_steps=2)
    for x in (1.0, 2.0, 1.5):
        zc.observe(x)
    ring = SnapshotRing(keep=2, verify_steps=0)
    snap = ring.capture(model, opt, sched, step=3, extra={"zclip": zc.state_dict()},
                        report=state_report(model, opt, 3))
    want_w = copy.deepcopy(model.state_dict())
    want_opt = copy.deepcopy(opt.state_dict())
    want_sched = copy.deepcopy(sched.state_dict())
    want_rng = (torch.get_rng_state().clone(), random.random(), np.random.rand())
    want_zclip = zc.state_dict()

    _train_steps(model, opt, sched, 4)
    zc.observe(50.0)
    random.random(), np.random.rand(), torch.rand(3)

    ring.restore(snap, model, opt, sched)
    zc.load_state_dict(snap.extra["zclip"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, want_w[k]), k
    got = opt.state_dict()
    for pid, st in want_opt["state"].items():
        for k, v in st.items():
            assert torch.equal(got["state"][pid][k], v), (pid, k)
    assert sched.state_dict() == want_sched
    assert torch.equal(torch.get_rng_state(), want_rng[0])
    assert random.random() == want_rng[1] and np.random.rand() == want_rng[2]
    assert zc.state_dict() == want_zclip


def test_restore_keeps_the_same_tensor_objects():
    """In-place restore: the optimizer (and any wrapper) keeps pointing at the live tensors."""
    model, opt, sched = _setup()
    _train_steps(model, opt, sched, 2)
    ring = SnapshotRing(keep=2, verify_steps=0)
    snap = ring.capture(model, opt, sched, step=2)
    ids_before = [id(p) for p in model.parameters()]
    state_ids = {id(v) for st in opt.state.values() for v in st.values()}
    _train_steps(model, opt, sched, 2)
    ring.restore(snap, model, opt, sched)
    assert ids_before == [id(p) for p in model.parameters()]
    assert state_ids == {id(v) for st in opt.state.values() for v in st.values()}


def test_snapshot_taken_before_the_first_step_clears_optimizer_state():
    model, opt, sched = _setup()
    ring = SnapshotRing(keep=2, verify_steps=0)
    snap = ring.capture(model, opt, sched, step=0)
    _train_steps(model, opt, sched, 2)
    ring.restore(snap, model, opt, sched)
    assert len(opt.state) == 0


def test_ring_reuses_buffers_and_never_drops_the_last_verified():
    model, opt, sched = _setup()
    _train_steps(model, opt, sched, 1)
    ring = SnapshotRing(keep=2, verify_steps=2)
    a = ring.capture(model, opt, sched, step=1)
    ring.mark_healthy_step(); ring.mark_healthy_step()
    assert ring.latest_verified() is a
    b = ring.capture(model, opt, sched, step=5)
    c = ring.capture(model, opt, sched, step=10)   # must recycle b, not the verified a
    assert ring.latest_verified() is a and a in ring.snapshots and c in ring.snapshots
    assert c.weights[0].data_ptr() == b.weights[0].data_ptr()  # buffers reused, no new allocation
    assert len(ring) == 2


def test_state_report_sees_nan_anywhere():
    model, opt, sched = _setup()
    _train_steps(model, opt, sched, 1)
    assert state_report(model, opt, 1).weights_finite
    next(iter(opt.state.values()))["exp_avg"].view(-1)[0] = float("nan")
    assert not state_report(model, opt, 1).optimizer_finite
    with torch.no_grad():
        next(model.parameters()).view(-1)[3] = float("inf")
    assert not state_report(model, opt, 1).weights_finite
