"""Fuzzed inputs (hypothesis): HealingConfig fields, YAML presets and postmortem files read by the
CLI. Whatever goes in, the answer is a value or a `ValueError` whose message names the field (or
the file and why) -- never another exception from deep inside, never a hang. Example counts are
bounded for CI (200 per property, the same ones each run; FUZZ_EXAMPLES=5000 for a longer hunt with
fresh examples); each example has a deadline."""
import dataclasses
import json
import math
import os
import time

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from self_healing import HealingConfig
from self_healing.cli import main as cli_main
from self_healing.postmortem import format_postmortem, headline, load_postmortem

FIELDS = HealingConfig.field_names()
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None,
                derandomize="FUZZ_EXAMPLES" not in os.environ,  # CI: the same examples each run; a hunt: new ones
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

LOADED_BOUND_S = 60.0
"""What 'quickly' means here: a bomb or an unbounded read takes minutes to forever; a bounded one
takes milliseconds, and a few seconds when another job shares the 2 cores (5 s flaked)."""

# values of every shape a YAML file or a careless caller can produce
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10 ** 6), max_value=10 ** 6),
    st.integers(min_value=-(10 ** 4000), max_value=10 ** 4000),  # huge: overflow floats
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e308, -1e-308, 5e-324]),
    st.text(max_size=30),
    st.sampled_from(["auto", "SIGTERM", "SIGKILL", "signal", "SIG_DFL", "zscore", "mean", "", "null", "\x00"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)


def assert_clear(exc: BaseException, names) -> None:
    """A ValueError whose message names one of `names`, short enough to read."""
    assert isinstance(exc, ValueError), f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    # named as is, or by its repr (a key with control characters must not reach a terminal raw)
    assert any(str(n) in msg or repr(str(n)) in msg for n in names), msg[:500]
    assert len(msg) < 5000, f"message of {len(msg)} characters"


@FUZZ
@given(field=st.sampled_from(FIELDS), value=values)
def test_any_value_for_any_field_is_accepted_or_named(field, value):
    try:
        cfg = HealingConfig.from_dict({field: value})
    except Exception as e:  # noqa: BLE001 - the assertion is about what was raised
        assert_clear(e, [field])
        assert HealingConfig.problems({field: value}), "from_dict refused what problems() accepts"
        return
    # accepted: then it is usable as is
    assert HealingConfig.problems({field: value}) == []
    assert HealingConfig.from_yaml_text(cfg.to_yaml()) == cfg
    cfg.validate()


@FUZZ
@given(changes=st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=12)), values, max_size=6))
@example(changes={"\U0001019d\U0001019d\U00010b92\U0001b2fc\U0001bca0\U0002ebe1": None})  # CI: its repr was cut
def test_mappings_of_fields_are_accepted_or_name_a_field(changes):
    try:
        HealingConfig.from_dict(changes)
    except Exception as e:  # noqa: BLE001
        assert_clear(e, list(changes) or ["HealingConfig"])
    problems = HealingConfig.problems(changes)
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)


@FUZZ
@given(field=st.sampled_from(FIELDS), value=values)
def test_constructor_keywords_are_accepted_or_named(field, value):
    try:
        HealingConfig(**{field: value})
    except Exception as e:  # noqa: BLE001
        assert_clear(e, [field])


# --- YAML presets --------------------------------------------------------------------------------
def _yaml_of(mapping) -> str:
    try:
        return yaml.safe_dump(mapping, allow_unicode=True)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
        return "nan_patience: [unterminated"


yaml_docs = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), values, max_size=5).map(_yaml_of),
    st.text(max_size=200),
    st.sampled_from([
        "nan_patience: .nan", "loss_spike_factor: .inf", "max_recovery_attempts: -3", "history_size: 1e999",
        "history_size: 99999999999999999999999999999999", "snapshot_keep: 10000000000000",
        "nan_patience: !!python/object/apply:os.system ['echo pwned']", "- a\n- b", "42", "'just a string'",
        "nan_patience: 1\nnan_patience: 2", "? [1, 2]\n: 3", "nan_patience: &a [*a]", "{" * 5000,
        "a: &a ['x','x','x','x','x','x','x','x','x']\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
        "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
        "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\nsnapshot_keep: *f\n",
        "preemption_signals: [SIGKILL]", "preemption_signals: [signal]", "postmortem_path: \"a\\0b\"",
    ]),
)
yaml_bytes = st.one_of(yaml_docs.map(lambda s: s.encode("utf-8", "surrogatepass")), st.binary(max_size=200),
                       st.sampled_from([b"\xff\xfe\x00n\x00a", b"nan_patience: \xc3\x28", b"\x00" * 10]))


@FUZZ
@given(data=yaml_bytes)
def test_yaml_presets_load_or_raise_a_clear_error(data, tmp_path):
    t0 = time.monotonic()
    try:
        cfg = HealingConfig.from_yaml_text(data, source="fuzz.yaml")
        assert isinstance(cfg, HealingConfig)
    except Exception as e:  # noqa: BLE001
        assert_clear(e, ["fuzz.yaml", *FIELDS, "HealingConfig"])
    p = tmp_path / "preset.yaml"
    p.write_bytes(data)
    try:
        HealingConfig.from_preset(str(p))
    except Exception as e:  # noqa: BLE001
        assert_clear(e, [str(p), *FIELDS, "HealingConfig"])
    assert cli_main(["validate", str(p)]) in (0, 1)
    assert time.monotonic() - t0 < LOADED_BOUND_S


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    """Aliases nested 9 deep would expand to 9**9 items in anything that walks the value."""
    levels = ["a: &a ['x','x','x','x','x','x','x','x','x']"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    doc = "\n".join(levels) + "\nsnapshot_keep: *i\n"
    t0 = time.monotonic()
    with pytest.raises(ValueError) as ei:
        HealingConfig.from_yaml_text(doc, source="bomb.yaml")
    assert time.monotonic() - t0 < LOADED_BOUND_S
    assert "unknown HealingConfig field" in str(ei.value) or "snapshot_keep" in str(ei.value)
    (tmp_path / "bomb.yaml").write_text(doc)
    t0 = time.monotonic()
    assert cli_main(["validate", str(tmp_path / "bomb.yaml")]) == 1
    assert time.monotonic() - t0 < LOADED_BOUND_S


def test_a_huge_preset_file_is_refused_without_reading_it_all(tmp_path):
    p = tmp_path / "huge.yaml"
    with open(p, "wb") as f:
        f.write(b"# " + b"x" * (64 << 20) + b"\n")
    with pytest.raises(ValueError, match="huge.yaml"):
        HealingConfig.from_preset(str(p))


@pytest.mark.parametrize("text,field", [
    ("nan_patience: .nan", "nan_patience"), ("loss_spike_factor: .inf", "loss_spike_factor"),
    ("max_recovery_attempts: -3", "max_recovery_attempts"), ("history_size: 99999999999999999999999", "history_size"),
    ("preemption_signals: [SIGKILL]", "preemption_signals"), ("preemption_signals: [signal]", "preemption_signals"),
    ("nan_patience: {a: 1}", "nan_patience"), ("snapshot_every_steps: often", "snapshot_every_steps"),
    ("nan_patiance: 3", "nan_patiance"), ("postmortem_path: \"a\\0b\"", "postmortem_path"),
])
def test_known_bad_presets_name_their_field(text, field):
    with pytest.raises(ValueError, match=field):
        HealingConfig.from_yaml_text(text)


@pytest.mark.parametrize("field", ["nan_patience", "loss_spike_factor", "history_size", "postmortem_path"])
def test_values_past_the_int_repr_limit_are_named(field):
    """Python refuses to print an int of more than 4300 digits: the message must not need to."""
    with pytest.raises(ValueError, match=field):
        HealingConfig.from_dict({field: 10 ** 5000})


# --- postmortem files read by the CLI -------------------------------------------------------------
PM_FIELDS = ["exit_reason", "exception_type", "exception_message", "traceback", "last_step", "max_steps",
             "timestamp", "running_time_seconds", "trainer_class", "final_metrics", "recovery_actions",
             "recovery_actions_dropped", "event_counts", "counters", "skipped_batches", "curve", "config",
             "lr_scale", "give_up_reason", "diagnosis", "resumed", "killed"]
EVENT_FIELDS = ["step", "failure", "diagnosis", "actions", "evidence", "details", "history", "escalation"]
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10 ** 30, 10 ** 30),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
              st.sampled_from(["nan", "inf", "-inf"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)
events = st.one_of(json_values, st.fixed_dictionaries({}, optional={k: json_values for k in EVENT_FIELDS}),
                   st.fixed_dictionaries({"step": st.integers(0, 100), "failure": st.sampled_from(["nan_loss", "oom"]),
                                          "actions": st.lists(st.sampled_from(["skip_step", "rollback"]), max_size=2),
                                          "history": st.lists(st.lists(json_values, max_size=3), max_size=4)}))
postmortems = st.fixed_dictionaries(
    {"exit_reason": st.one_of(st.sampled_from(["completed", "gave_up", "killed", "exception"]), json_values)},
    optional={**{k: json_values for k in PM_FIELDS if k != "exit_reason"},
              "recovery_actions": st.lists(events, max_size=5),
              "curve": st.fixed_dictionaries({}, optional={"points": st.lists(st.lists(json_values, max_size=4),
                                                                              max_size=5), "stride": json_values})})
pm_files = st.one_of(postmortems.map(lambda d: json.dumps(d).encode()),
                     json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=100),
                     st.sampled_from([b"", b"{", b"[" * 100000, b'{"exit_reason": 1' + b"0" * 6000 + b"}",
                                      b'{"exit_reason": "completed", "counters": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                      b"\xef\xbb\xbf{}", b'{"exit_reason": NaN}']))


@FUZZ
@given(data=pm_files)
def test_postmortem_files_read_by_the_cli_never_crash_it(data, tmp_path, capsys):
    p = tmp_path / "postmortem.json"
    p.write_bytes(data)
    t0 = time.monotonic()
    try:
        pm = load_postmortem(p)
    except Exception as e:  # noqa: BLE001
        assert_clear(e, [str(p)])
    else:  # what load_postmortem accepts, the report can print
        assert headline(pm) and format_postmortem(pm)
    code = cli_main(["report", str(p)])
    err = capsys.readouterr().err
    assert code in (0, 1, 2)
    if code == 2:
        assert str(p) in err
    assert time.monotonic() - t0 < LOADED_BOUND_S


# --- crash journals read at launch ----------------------------------------------------------------
KINDS = ["open", "progress", "metrics", "event", "snapshot", "checkpoint", "resume", "compacted", "close"]
records = st.one_of(
    st.fixed_dictionaries({"kind": st.sampled_from(KINDS)},
                          optional={k: json_values for k in ["step", "time", "loss", "metrics", "event", "counters",
                                                             "event_counts", "events_dropped", "last_step", "kept",
                                                             "max_steps", "config", "trainer_class", "start_step",
                                                             "pid", "host", "compactions"]}),
    st.fixed_dictionaries({"kind": st.just("event"), "event": events}),
    json_values)
journal_lines = st.lists(st.one_of(records.map(lambda r: json.dumps(r).encode()), st.binary(max_size=40)), max_size=12)


@FUZZ
@given(lines=journal_lines, torn=st.binary(max_size=30))
def test_any_journal_yields_a_reportable_postmortem_or_nothing(lines, torn, tmp_path, capsys):
    from self_healing.journal import JOURNAL_NAME, read_journal, recover_killed_run

    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    (out / "postmortem.json").unlink(missing_ok=True)
    header = json.dumps({"kind": "open", "run_id": "r", "pid": -1, "time": 1.0}).encode()
    (out / JOURNAL_NAME).write_bytes(b"\n".join([header, *lines]) + b"\n" + torn)
    t0 = time.monotonic()
    read_journal(out / JOURNAL_NAME)
    pm = recover_killed_run(out)
    if pm is not None:
        assert load_postmortem(out)["exit_reason"] == "killed"
        assert cli_main(["report", str(out)]) == 1
        assert "KILLED" in capsys.readouterr().out
    assert time.monotonic() - t0 < LOADED_BOUND_S


@pytest.mark.parametrize("pm,field", [
    ({"exit_reason": "completed", "recovery_actions": 5}, "recovery_actions"),
    ({"exit_reason": "completed", "recovery_actions": [{"actions": [1, 2]}]}, "recovery_actions[0].actions"),
    ({"exit_reason": "completed", "counters": []}, "counters"),
    ({"exit_reason": "completed", "event_counts": {"nan_loss": "many"}}, "event_counts"),
    ({"exit_reason": ["completed"]}, "exit_reason"),
    ({"exit_reason": "completed", "curve": {"points": [1, 2]}}, "curve.points"),
])
def test_a_malformed_postmortem_names_the_field(pm, field, tmp_path, capsys):
    p = tmp_path / "postmortem.json"
    p.write_text(json.dumps(pm))
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_postmortem(p)
    assert cli_main(["report", str(p)]) == 2
    assert field in capsys.readouterr().err


def test_every_field_has_a_fuzzable_default():
    """The fuzz draws from every field: a new field is covered as soon as it exists."""
    assert set(FIELDS) == {f.name for f in dataclasses.fields(HealingConfig)}
    assert all(math.isfinite(v) for v in HealingConfig().to_dict().values() if isinstance(v, float))
