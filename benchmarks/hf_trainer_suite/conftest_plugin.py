"""pytest plugin: attach self-healing to every `transformers.Trainer` a test suite builds.

Load it with ``-p conftest_plugin`` (this folder on ``PYTHONPATH``) and pick the attach mode with
``SELF_HEALING_ATTACH``:

- ``none``      bare Trainer (the reference run; the plugin only sets the same env as the others);
- ``wrapper``   ``Trainer.train()`` goes through ``SelfHealingTrainer(trainer, HealingConfig())``;
- ``attach``    ``SelfHealingCallback(HealingConfig()).attach(trainer)`` right after construction;
- ``callbacks`` ``SelfHealingCallback(HealingConfig())`` appended to ``callbacks=[...]`` at construction.

``SELF_HEALING_PRESET`` picks a preset instead of ``HealingConfig()`` (default: the default config).

Subclasses (Seq2SeqTrainer, TRL trainers, a test's own ``class MyTrainer(Trainer)``) are covered:
``wrapper``/``attach`` act once the outermost ``__init__`` of the instance has returned, so the
plugin sees the finished trainer, as a user's ``.attach(trainer)`` would.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

MODES = ("none", "wrapper", "attach", "callbacks")
MODE = os.environ.get("SELF_HEALING_ATTACH", "none").strip().lower()
if MODE not in MODES:
    raise ValueError(f"SELF_HEALING_ATTACH must be one of {MODES}, got {MODE!r}")

_state = threading.local()
ATTACHED: list = []
"""(test nodeid, trainer class name, mode) for every Trainer the plugin attached to."""
_current_test = ["<collection>"]
EVENTS: list = []
"""(test nodeid, step, failure, actions) for every event the plugin recorded: in a healthy test any
event that acts (rollback, LR cut, skip) is a false positive even when the test still passes."""


def _config():
    from self_healing import HealingConfig

    preset = os.environ.get("SELF_HEALING_PRESET")
    return HealingConfig.from_preset(preset) if preset else HealingConfig()


def _post_init(trainer) -> None:
    """Attach after the outermost __init__ of `trainer` returned (wrapper / attach modes)."""
    from self_healing import SelfHealingCallback, SelfHealingTrainer

    if trainer.__dict__.get("_sh_done"):
        return
    trainer.__dict__["_sh_done"] = True
    if MODE == "attach":
        trainer.__dict__["_sh_callback"] = SelfHealingCallback(_config()).attach(trainer)
    elif MODE == "wrapper":
        trainer.__dict__["_sh_wrapper"] = SelfHealingTrainer(trainer, _config())
    ATTACHED.append((_current_test[0], type(trainer).__name__, MODE))


def _wrap_init(cls) -> None:
    """Wrap `cls.__init__` (only if `cls` defines its own) with a per-instance depth counter."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_sh_wrapped", False):
        return
    is_base = cls.__name__ == "Trainer" and cls.__module__ == "transformers.trainer"
    sig = inspect.signature(init) if is_base else None

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if is_base and MODE == "callbacks":
            from self_healing import SelfHealingCallback

            bound = sig.bind_partial(self, *args, **kwargs)
            cbs = list(bound.arguments.get("callbacks") or [])
            cbs.append(SelfHealingCallback(_config()))
            bound.arguments["callbacks"] = cbs
            args, kwargs = bound.args[1:], bound.kwargs
            ATTACHED.append((_current_test[0], type(self).__name__, MODE))
        depth = self.__dict__.get("_sh_depth", 0)
        self.__dict__["_sh_depth"] = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            self.__dict__["_sh_depth"] = depth
        if depth == 0 and MODE in ("wrapper", "attach"):
            _post_init(self)

    __init__._sh_wrapped = True
    cls.__init__ = __init__


def _all_subclasses(cls):
    seen, todo = [], [cls]
    while todo:
        c = todo.pop()
        seen.append(c)
        todo.extend(c.__subclasses__())
    return seen


def install() -> None:
    import torch
    import transformers
    from transformers import Trainer

    torch.set_num_threads(1)
    if MODE == "none":
        return
    # the lazily imported trainer subclasses, so that they exist before the patch
    for name in ("Seq2SeqTrainer",):
        getattr(transformers, name, None)
    for cls in _all_subclasses(Trainer):
        _wrap_init(cls)
    orig_init_subclass = Trainer.__dict__.get("__init_subclass__")

    @classmethod
    def __init_subclass__(cls, **kw):
        if orig_init_subclass is not None:
            orig_init_subclass.__func__(cls, **kw)
        else:
            super(Trainer, cls).__init_subclass__(**kw)
        _wrap_init(cls)

    Trainer.__init_subclass__ = __init_subclass__

    from self_healing import postmortem

    orig_record = postmortem.PostmortemRecorder.record

    @functools.wraps(orig_record)
    def record(self, step, diagnosis, actions, *args, **kwargs):
        EVENTS.append((_current_test[0], step, getattr(diagnosis.failure, "value", str(diagnosis.failure)),
                       list(actions)))
        return orig_record(self, step, diagnosis, actions, *args, **kwargs)

    postmortem.PostmortemRecorder.record = record

    if MODE == "wrapper":
        orig_train = Trainer.train

        @functools.wraps(orig_train)
        def train(self, resume_from_checkpoint=None, *args, **kwargs):
            wrapper = self.__dict__.get("_sh_wrapper")
            if wrapper is None or getattr(_state, "inside", False):
                return orig_train(self, resume_from_checkpoint, *args, **kwargs)
            if args:  # trial, ignore_keys_for_eval given positionally
                for name, value in zip(("trial", "ignore_keys_for_eval"), args):
                    kwargs[name] = value
            _state.inside = True
            try:
                return wrapper.train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            finally:
                _state.inside = False

        Trainer.train = train


# --- pytest hooks ------------------------------------------------------------------------------
def pytest_configure(config):
    install()
    config.addinivalue_line("markers", "torch_compile_test: transformers' marker")


def pytest_report_header(config):
    return f"self-healing attach mode: {MODE}"


def pytest_runtest_setup(item):
    _current_test[0] = item.nodeid
    _state.inside = False


def pytest_runtest_logreport(report):
    # record, on the report, how many trainers the plugin attached to during this test
    if report.when == "call":
        n = sum(1 for t, _, _ in ATTACHED if t == report.nodeid)
        report.user_properties.append(("self_healing_attached", n))
        ev = [e for e in EVENTS if e[0] == report.nodeid]
        report.user_properties.append(("self_healing_events", len(ev)))


def pytest_terminal_summary(terminalreporter, config):
    tests = {t for t, _, _ in ATTACHED}
    terminalreporter.write_line(
        f"self-healing ({MODE}): attached to {len(ATTACHED)} trainers in {len(tests)} tests"
    )
    by_test: dict = {}
    for t, step, failure, actions in EVENTS:
        by_test.setdefault(t, []).append(f"step {step}: {failure} -> {','.join(actions) or 'none'}")
    for t, evs in by_test.items():
        shown = "; ".join(evs[:4]) + (f"; ... ({len(evs)} events)" if len(evs) > 4 else "")
        terminalreporter.write_line(f"self-healing event in {t}: {shown}")
    out = os.environ.get("SELF_HEALING_EVENTS_JSON")
    if out:
        import json

        with open(out, "w") as f:
            json.dump(by_test, f, indent=1)
