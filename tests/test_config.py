import math

import pytest

from self_healing import HealingConfig
from self_healing.config import PRESET_NAMES


def test_presets_match_issue_values():
    a = HealingConfig.aggressive()
    assert (a.nan_patience, a.zclip_z_threshold, a.max_recovery_attempts) == (1, 2.0, 10)
    c = HealingConfig.conservative()
    assert (c.nan_patience, c.loss_spike_factor, c.zclip_z_threshold, c.max_recovery_attempts) == (10, 10.0, 4.0, 2)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_yaml_presets_equal_python_presets(name):
    assert HealingConfig.from_preset(name) == getattr(HealingConfig, name)()


def test_from_preset_reads_a_user_file(tmp_path):
    p = tmp_path / "mine.yaml"
    HealingConfig.aggressive().replace(nan_patience=4).save(p)
    assert HealingConfig.from_preset(str(p)).nan_patience == 4
    assert not list(tmp_path.glob(".*.tmp")), "atomic save left a temp file behind"


@pytest.mark.parametrize("field,value,accepted", [
    ("nan_patience", -1, "integer >= 0"),
    ("nan_patience", 1.5, "integer >= 0"),
    ("nan_patience", True, "integer >= 0"),
    ("loss_spike_factor", 1.0, "(1.0"),
    ("loss_spike_factor", math.nan, "finite number"),
    ("lr_reduction_factor", 1.0, "(0.0, 1.0)"),
    ("lr_reduction_factor", 0, "(0.0, 1.0)"),
    ("grad_norm_threshold", -3.0, "grad_norm_threshold"),
    ("snapshot_every_steps", 0, "'auto' or an integer"),
    ("snapshot_every_steps", "sometimes", "'auto' or an integer"),
    ("zclip_enabled", "yes", "true or false"),
    ("zclip_mode", "median", "'zscore' or 'percentile'"),
    ("max_recovery_attempts", "3", "integer >= 0"),
])
def test_bad_values_name_the_field_and_what_is_accepted(field, value, accepted):
    with pytest.raises(ValueError) as e:
        HealingConfig(**{field: value})
    assert field in str(e.value) and accepted in str(e.value)


def test_unknown_key_lists_accepted_fields():
    with pytest.raises(ValueError) as e:
        HealingConfig.from_dict({"nan_patiense": 2})
    assert "nan_patiense" in str(e.value) and "nan_patience" in str(e.value)


def test_unknown_preset_name():
    with pytest.raises(ValueError, match="aggressive"):
        HealingConfig.from_preset("yolo")


@pytest.mark.parametrize("text,needle", [
    (b"nan_patience: [1, 2", "not valid YAML"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
    (b"- 1\n- 2\n", "mapping"),
    (b"nan_patience: .nan\n", "nan_patience"),
    (b"loss_spike_factor: .inf\n", "loss_spike_factor"),
])
def test_bad_yaml_is_a_clear_error(text, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        HealingConfig.from_yaml_text(text)


# --- an unknown keyword and a bad assignment are the same clear ValueError as a bad value --------
def test_an_unknown_keyword_names_the_field_and_the_closest_one():
    with pytest.raises(ValueError) as e:
        HealingConfig(nan_patiance=2)
    assert str(e.value) == "unknown HealingConfig field 'nan_patiance': did you mean 'nan_patience'?"
    with pytest.raises(ValueError, match="'bogus': accepted fields: .*nan_patience"):
        HealingConfig(bogus=1)


@pytest.mark.parametrize("field,value", [("nan_patience", -3), ("nan_patience", 1.5), ("zclip_mode", "median"),
                                         ("lr_reduction_factor", 1.0), ("snapshot_every_steps", 0),
                                         ("preemption_signals", ["SIGKILL"]), ("history_size", 10 ** 6)])
def test_assignment_is_validated_like_construction(field, value):
    with pytest.raises(ValueError) as built:
        HealingConfig(**{field: value})
    cfg = HealingConfig.aggressive()
    before = getattr(cfg, field)
    with pytest.raises(ValueError) as assigned:
        setattr(cfg, field, value)
    assert str(assigned.value) == str(built.value)
    assert getattr(cfg, field) == before and cfg == HealingConfig.aggressive()  # the old value stays


def test_assignment_of_good_values_and_of_an_unknown_name():
    cfg = HealingConfig()
    cfg.nan_patience = 7
    cfg.preemption_signals = ["SIGUSR1"]
    assert cfg == HealingConfig(nan_patience=7, preemption_signals=("SIGUSR1",))
    with pytest.raises(ValueError, match="did you mean 'nan_patience'"):
        cfg.nan_patiance = 2
    assert not hasattr(cfg, "nan_patiance")


def test_copies_and_pickles_stay_validated():
    import copy
    import pickle

    for c in (copy.copy(HealingConfig()), copy.deepcopy(HealingConfig()), pickle.loads(pickle.dumps(HealingConfig()))):
        with pytest.raises(ValueError, match="nan_patience"):
            c.nan_patience = -1


def test_unknown_keys_in_yaml_name_the_source_and_the_closest_field(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("nan_patiance: 2\n")
    with pytest.raises(ValueError) as e:
        HealingConfig.from_preset(str(p))
    assert str(e.value) == f"{p}: unknown HealingConfig field 'nan_patiance': did you mean 'nan_patience'?"
    with pytest.raises(ValueError, match="'nan_patiense': did you mean 'nan_patience'"):
        HealingConfig.from_dict({"nan_patiense": 2})
