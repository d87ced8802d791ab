"""Snapshots restore bit-exactly: weights, optimizer state, scheduler, RNG, and the plugin's own
state; from one reused host buffer or from a safetensors file on disk (a damaged file is refused
before anything is touched). No timing is asserted anywhere here: benchmarks/ measures cost."""
import copy
import math
import os
import random

import numpy as np
import pytest
import torch

from self_healing import HealingConfig, SelfHealingTrainer
from self_healing.faults import Fault, inject_faults
from self_healing.snapshot import SnapshotError, SnapshotRing, model_tensors, state_report
from self_healing.tiny import build_trainer, tiny_llama, tiny_tokenizer
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


# ------------------------------------------------------------------------------------------------
# one reused buffer, spilling to disk, and what the callback does with them
# ------------------------------------------------------------------------------------------------


def _full_state(model, opt, sched):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()),
            torch.get_rng_state().clone())


def _assert_state(model, opt, sched, want):
    w, o, s, rng = want
    for k, v in model.state_dict().items():
        assert torch.equal(v, w[k]), k
    got = opt.state_dict()
    assert got["param_groups"] == o["param_groups"]
    assert set(got["state"]) == set(o["state"])
    for pid, st in o["state"].items():
        assert set(got["state"][pid]) == set(st)
        for k, v in st.items():
            assert torch.equal(got["state"][pid][k], v), (pid, k)
    assert sched.state_dict() == s
    assert torch.equal(torch.get_rng_state(), rng)


def test_one_flat_buffer_per_dtype_reused_once_the_ring_is_full():
    model, opt, sched = _setup()
    _train_steps(model, opt, sched, 1)
    ring = SnapshotRing(keep=2, verify_steps=0)
    snaps = [ring.capture(model, opt, sched, step=s) for s in range(1, 6)]
    store = snaps[-1].store
    assert list(store.flats) == [torch.float32]  # weights, Adam moments and the 0-dim `step` in one buffer
    assert all(v.data_ptr() >= store.flats[torch.float32].data_ptr() for v in store.views)
    buffers = {s.store.flats[torch.float32].data_ptr() for s in snaps[2:]}
    assert len(buffers) <= 2  # from the third capture on, nothing new is allocated
    assert snaps[-1].nbytes() == sum(t.numel() * t.element_size() for t in
                                     model_tensors(model) + [v for st in opt.state.values() for v in st.values()])


def test_restore_of_an_older_snapshot_after_the_ring_recycled_is_bit_exact():
    model, opt, sched = _setup()
    _train_steps(model, opt, sched, 2)
    ring = SnapshotRing(keep=3, verify_steps=1)
    first = ring.capture(model, opt, sched, step=2)
    want = _full_state(model, opt, sched)
    ring.mark_healthy_step()
    for s in range(3, 8):  # the ring recycles around the verified one, never over it
        _train_steps(model, opt, sched, 1)
        ring.capture(model, opt, sched, step=s)
    assert first in ring.snapshots
    ring.restore(first, model, opt, sched)
    _assert_state(model, opt, sched, want)


@pytest.mark.parametrize("keep", [1, 2])
def test_spilled_snapshot_restores_bit_exactly(tmp_path, keep):
    model, opt, sched = _setup()
    _train_steps(model, opt, sched, 3)
    zc = ZClip(warmup_steps=2)
    for x in (1.0, 2.0, 1.5):
        zc.observe(x)
    ring = SnapshotRing(keep=keep, verify_steps=0, spill_dir=tmp_path / "spill")
    snap = ring.capture(model, opt, sched, step=3, extra={"zclip": zc.state_dict()})
    want = _full_state(model, opt, sched)
    want_py, want_np, want_zclip = random.random(), np.random.rand(), zc.state_dict()
    assert snap.weights == [] and snap.store is None and os.path.isfile(snap.path)

    _train_steps(model, opt, sched, 4)
    zc.observe(50.0)
    ring.restore(snap, model, opt, sched)
    zc.load_state_dict(snap.extra["zclip"])
    _assert_state(model, opt, sched, want)
    assert random.random() == want_py and np.random.rand() == want_np
    assert zc.state_dict() == want_zclip


def test_spill_file_is_plain_safetensors_and_rotates(tmp_path):
    from safetensors.torch import load_file

    model, opt, sched = _setup()
    _train_steps(model, opt, sched, 1)
    ring = SnapshotRing(keep=2, verify_steps=0, spill_dir=tmp_path)
    snaps = [ring.capture(model, opt, sched, step=s) for s in (1, 2, 3, 4)]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files)  # recycled files are deleted
    loaded = load_file(snaps[-1].path)  # no pickle anywhere: the reference reader loads it
    assert torch.equal(loaded["t0"], next(model.parameters()).detach())
    ring.discard_after(3)
    assert len(list(tmp_path.iterdir())) == 1
    ring.clear()
    assert list(tmp_path.iterdir()) == []


def test_truncated_spill_file_is_rejected_and_the_live_state_is_untouched(tmp_path):
    model, opt, sched = _setup()
    _train_steps(model, opt, sched, 2)
    ring = SnapshotRing(keep=2, verify_steps=0, spill_dir=tmp_path)
    snap = ring.capture(model, opt, sched, step=2)
    _train_steps(model, opt, sched, 2)
    live = _full_state(model, opt, sched)
    size = os.path.getsize(snap.path)
    with open(snap.path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(SnapshotError, match="truncated"):
        ring.restore(snap, model, opt, sched)
    _assert_state(model, opt, sched, live)
    with open(snap.path, "r+b") as f:  # a damaged header of the right length is caught too
        f.truncate(0)
        f.write(b"\xff" * size)
    with pytest.raises(SnapshotError, match="not a readable safetensors"):
        ring.restore(snap, model, opt, sched)
    os.remove(snap.path)
    with pytest.raises(SnapshotError, match="cannot be read"):
        ring.restore(snap, model, opt, sched)
    _assert_state(model, opt, sched, live)


def test_restore_into_a_changed_model_is_refused():
    model, opt, sched = _setup()
    ring = SnapshotRing(keep=2, verify_steps=0)
    snap = ring.capture(model, opt, sched, step=0)
    other = tiny_llama(tiny_tokenizer(), hidden=16, layers=1)
    with pytest.raises(SnapshotError, match="does not match"):
        ring.restore(snap, other, None)


def test_state_report_times_itself():
    model, opt, sched = _setup()
    _train_steps(model, opt, sched, 1)
    r = state_report(model, opt, 1)
    assert r.seconds > 0
    assert r == state_report(model, opt, 1)  # the timing is not part of the comparison


def test_spill_dir_must_be_a_path_or_null():
    assert HealingConfig(snapshot_spill_dir="snapshots").snapshot_spill_dir == "snapshots"
    for bad in ("", "  ", 3):
        with pytest.raises(ValueError, match="snapshot_spill_dir"):
            HealingConfig(snapshot_spill_dir=bad)


def test_auto_interval_keeps_the_snapshot_under_its_budget():
    from self_healing.callback import SelfHealingCallback

    cb = SelfHealingCallback(HealingConfig())
    cb.engine.step_times.extend([0.2] * 5)
    cb.engine.tune_snapshot_interval(0.01)  # 10 ms per snapshot, 200 ms steps, 0.5% budget: every 10 steps
    assert cb.snapshot_interval == 10
    cb.engine.tune_snapshot_interval(0.0001)
    assert cb.snapshot_interval == 5  # never more often than every 5 steps
    cb.engine.tune_snapshot_interval(0.013)  # 13 steps would do: the next rung up, on an integrity check
    assert cb.snapshot_interval == 20
    cb.engine.tune_snapshot_interval(100.0)
    assert cb.snapshot_interval == 640  # the top rung under 1000


def test_interval_ladder_rungs_divide_each_other():
    from self_healing.snapshot import interval_on_ladder

    assert [interval_on_ladder(n, 10) for n in (1, 5, 6, 10, 11, 21, 700)] == [5, 5, 10, 10, 20, 40, 640]
    assert [interval_on_ladder(n, 5) for n in (1, 6, 11)] == [5, 10, 20]
    assert interval_on_ladder(3, 1) == 8 and interval_on_ladder(1, 7) == 7
    rungs = sorted({interval_on_ladder(n, 10) for n in range(1, 2000)})
    assert all(b % a == 0 for a, b in zip(rungs, rungs[1:]))


def _run(tmp_path, name, config, *faults, steps=40):
    tr = build_trainer("trainer", output_dir=str(tmp_path / name), max_steps=steps)
    if faults:
        inject_faults(tr, *faults)
    sh = SelfHealingTrainer(tr, config)
    sh.train()
    return sh


def test_rollback_from_a_spilled_snapshot_equals_the_in_memory_one(tmp_path):
    """The same run, the same weight corruption: spilled and in-memory snapshots roll back to the
    same step and end bit-identical."""
    fault = Fault("nan_weight", step=27)
    mem = _run(tmp_path, "mem", HealingConfig(snapshot_every_steps=5), fault)
    fault = Fault("nan_weight", step=27)
    disk = _run(tmp_path, "disk", HealingConfig(snapshot_every_steps=5, snapshot_spill_dir="snaps"), fault)
    for sh in (mem, disk):
        assert sh.exit_reason == "completed" and sh.callback.recorder.counters["rollbacks"] == 1
    ev = [e for e in disk.callback.recorder.events if "rolled_back_to_step" in e.get("details", {})]
    assert ev and ev[0]["details"]["rolled_back_to_step"] == 20 and ev[0]["details"]["steps_lost"] == 6
    assert os.listdir(tmp_path / "disk" / "snaps")
    for a, b in zip(mem.trainer.model.parameters(), disk.trainer.model.parameters()):
        assert torch.equal(a, b)


def test_a_damaged_spill_file_falls_back_to_an_older_snapshot(tmp_path):
    from transformers import TrainerCallback

    class Truncate(TrainerCallback):
        """Damage the newest verified snapshot's file just before the fault."""

        def __init__(self):
            self.cb = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == 27:
                with open(self.cb.ring.latest_verified().path, "r+b") as f:
                    f.truncate(64)
            return control

    tr = build_trainer("trainer", output_dir=str(tmp_path / "run"), max_steps=40)
    inject_faults(tr, Fault("nan_weight", step=27))
    trunc = Truncate()
    tr.add_callback(trunc)
    sh = SelfHealingTrainer(tr, HealingConfig(snapshot_every_steps=5, snapshot_spill_dir="snaps"))
    trunc.cb = sh.callback
    sh.train()
    assert sh.exit_reason == "completed"
    ev = [e for e in sh.callback.recorder.events if "rolled_back_to_step" in e.get("details", {})][0]
    assert ev["details"]["rolled_back_to_step"] == 15 and "truncated" in ev["details"]["unreadable_snapshots"][0]
    assert all(bool(torch.isfinite(p).all()) for p in sh.trainer.model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_snapshot_is_pinned_async_and_bit_exact():
    model, opt, sched = _setup()
    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    def steps(n):
        for _ in range(n):
            ids = torch.randint(0, 40, (2, 12), device="cuda")
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    steps(2)
    ring = SnapshotRing(keep=2, verify_steps=0)
    snap = ring.capture(model, opt, sched, step=2)
    assert snap.store.pin and all(f.is_pinned() for f in snap.store.flats.values())
    snap.wait()
    want = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    steps(3)  # the optimizer pre-hook fences each update behind the copy
    ring.restore(snap, model, opt, sched)
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[0][k]), k
    for pid, st in want[1]["state"].items():
        for k, v in st.items():
            assert torch.equal(opt.state_dict()["state"][pid][k], v)


# ------------------------------------------------------------------------------------------------
# optimizer state wherever the optimizer keeps it (emulations with the real packages' layouts)
# ------------------------------------------------------------------------------------------------
class GrokAdamWLike(torch.optim.Optimizer):
    """grokadamw 0.1.2's layout: per-parameter state in `group['state'][p]` (on the CPU), not in
    `optimizer.state`; a list of callables in the group."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, alpha_init=0.98, lamb=2.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha_init=alpha_init,
                                      lamb=lamb, grokking_signal_fns=[lambda: 0.0]))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = group.setdefault("state", {}).setdefault(p, {})
                if not st:
                    st.update(step=0, exp_avg=torch.zeros_like(p, device="cpu"),
                              exp_avg_sq=torch.zeros_like(p, device="cpu"), grok_ema=torch.zeros_like(p, device="cpu"))
                b1, b2 = group["betas"]
                st["step"] += 1
                st["grok_ema"].mul_(group["alpha_init"]).add_(p.grad, alpha=1 - group["alpha_init"])
                g = p.grad + group["lamb"] * st["grok_ema"]
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                size = group["lr"] * (1 - b2 ** st["step"]) ** 0.5 / (1 - b1 ** st["step"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(st["exp_avg"], st["exp_avg_sq"].sqrt().add_(group["eps"]), value=-size)


class StableAdamWLike(torch.optim.Adam):
    """torch-optimi's StableAdamW param-group naming: `beta1`/`beta2` instead of `betas`."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99)):
        super().__init__(params, lr=lr, betas=betas)
        for g in self.param_groups:
            g["beta1"], g["beta2"] = g["betas"]

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            g.pop("betas", None)
            g["betas"] = (g["beta1"], g["beta2"])
        out = super().step(closure)
        for g in self.param_groups:
            g.pop("betas")
        return out


class EightBitAdamLike(torch.optim.Optimizer):
    """bitsandbytes' 8-bit Adam layout: `state1`/`state2` uint8 codes with float `absmax1`/`absmax2`
    per block and a float `qmap`; a plain linear code here, the layout is what matters."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.995), block=64):
        super().__init__(params, dict(lr=lr, betas=betas, eps=1e-8, block=block))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2, blk = *group["betas"], group["block"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                n = p.numel()
                nb = -(-n // blk)
                if not st:
                    st.update(step=torch.zeros(()), state1=torch.zeros(n, dtype=torch.uint8),
                              state2=torch.zeros(n, dtype=torch.uint8), absmax1=torch.zeros(nb), absmax2=torch.zeros(nb),
                              qmap1=torch.linspace(-1, 1, 256), qmap2=torch.linspace(0, 1, 256))
                st["step"] += 1

                def deq(code, absmax, qmap):
                    v = qmap[code.long()].view(-1)
                    return (torch.nn.functional.pad(v, (0, nb * blk - n)).view(nb, blk) * absmax[:, None]).view(-1)[:n]

                def q(v, qmap, signed):
                    vb = torch.nn.functional.pad(v, (0, nb * blk - n)).view(nb, blk)
                    am = vb.abs().amax(1).clamp_min(1e-30)
                    x = (vb / am[:, None]).view(-1)[:n]
                    code = ((x + 1) / 2 * 255).round() if signed else (x * 255).round()
                    return code.to(torch.uint8), am

                g = p.grad.view(-1)
                m = deq(st["state1"], st["absmax1"], st["qmap1"]) * b1 + (1 - b1) * g
                v = deq(st["state2"], st["absmax2"], st["qmap2"]) * b2 + (1 - b2) * g * g
                st["state1"], st["absmax1"] = q(m, st["qmap1"], True)
                st["state2"], st["absmax2"] = q(v, st["qmap2"], False)
                t = float(st["step"])
                p.view(-1).addcdiv_(m / (1 - b1 ** t), (v / (1 - b2 ** t)).sqrt() + group["eps"], value=-group["lr"])


def _variant_setup(cls, **kw):
    torch.manual_seed(0)
    model = tiny_llama(tiny_tokenizer(), hidden=32, layers=1)
    opt = cls(model.parameters(), **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


@pytest.mark.parametrize("cls", [GrokAdamWLike, StableAdamWLike, EightBitAdamLike])
def test_every_floating_state_tensor_is_checked_wherever_it_is_kept(cls):
    """Before: GrokAdamW's state (in the param group) and the 8-bit scales escaped the check."""
    from self_healing.snapshot import iter_param_states, optimizer_state_tensors

    model, opt, sched = _variant_setup(cls)
    _train_steps(model, opt, sched, 2)
    report = state_report(model, opt, 2)
    assert report.optimizer_finite and report.state_norms()
    keys = set(optimizer_state_tensors(opt))
    want = {GrokAdamWLike: {"exp_avg", "exp_avg_sq", "grok_ema"}, StableAdamWLike: {"exp_avg", "exp_avg_sq", "step"},
            EightBitAdamLike: {"absmax1", "absmax2", "qmap1", "qmap2", "step"}}[cls]
    assert want <= keys, keys
    _, _, _, st = next(iter(iter_param_states(opt)))
    name = {GrokAdamWLike: "grok_ema", StableAdamWLike: "exp_avg", EightBitAdamLike: "absmax2"}[cls]
    st[name].view(-1)[0] = float("nan")
    bad = state_report(model, opt, 2)
    assert not bad.optimizer_finite and not math.isfinite(bad.optimizer_norms[name])


@pytest.mark.parametrize("cls,key", [(GrokAdamWLike, "exp_avg_sq"), (StableAdamWLike, "exp_avg_sq"),
                                     (EightBitAdamLike, "absmax2")])
def test_second_moment_decay_test_recognises_the_variants(cls, key):
    """A zeroed second moment (the `zero_exp_avg_sq` fault) is seen for `exp_avg_sq` in a group's
    state, with `beta1`/`beta2` names, and for 8-bit state through its per-block scales."""
    from self_healing.detectors import compare_state
    from self_healing.snapshot import iter_param_states

    model, opt, sched = _variant_setup(cls)
    _train_steps(model, opt, sched, 3)
    ref = state_report(model, opt, 3)
    assert ref.beta2 is not None
    _train_steps(model, opt, sched, 2)
    assert compare_state(state_report(model, opt, 5), ref, 10.0) is None  # healthy decay
    for _, _, _, st in iter_param_states(opt):
        st[key].zero_()
    hit = compare_state(state_report(model, opt, 5), ref, 10.0)
    assert hit is not None and hit.signal == "optimizer_state_corruption" and hit.evidence["state_key"] == key


def test_state_kept_in_param_groups_is_snapshotted_once_not_deep_copied_and_restored():
    """Before: every snapshot deep-copied GrokAdamW's `group['state']` (its tensors and, keying
    them, the parameters themselves) and the callables in the group."""
    model, opt, sched = _variant_setup(GrokAdamWLike)
    _train_steps(model, opt, sched, 2)
    ring = SnapshotRing(keep=2, verify_steps=0)
    snap = ring.capture(model, opt, sched, step=2)
    assert all("state" not in g for g in snap.param_groups)
    assert snap.param_groups[0]["grokking_signal_fns"][0] is opt.param_groups[0]["grokking_signal_fns"][0]
    held = snap.group_state[0]["state"]
    assert len(held) == len(opt.param_groups[0]["params"])
    store = {id(v) for v in snap.store.views}
    assert all(id(e["exp_avg_sq"]) in store for e in held)  # in the reused host buffer
    want = {k: v.clone() for k, v in opt.param_groups[0]["state"][opt.param_groups[0]["params"][0]].items()
            if isinstance(v, torch.Tensor)}
    want_step = opt.param_groups[0]["state"][opt.param_groups[0]["params"][0]]["step"]
    _train_steps(model, opt, sched, 3)
    ring.restore(snap, model, opt, sched)
    got = opt.param_groups[0]["state"][opt.param_groups[0]["params"][0]]
    assert got["step"] == want_step and all(torch.equal(got[k], v) for k, v in want.items())
