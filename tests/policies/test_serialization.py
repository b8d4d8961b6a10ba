"""Policies are data: every registered type round-trips through dict, JSON and YAML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from freezelab.policies import (
    FreezePolicy,
    PolicyError,
    dump_policy,
    from_dict,
    get_policy_class,
    list_policies,
    load_policy,
    register_policy,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

GROUP_NAMES = ["head", "layer4", "layer3", "block5.conv3", "stages.1.blocks.0", "pre_logits"]
PATTERNS = ["layer4.*", "*.bias", "features.2[468].*", "head.*", "*bn*"]
REGEXES = [r"^layer4\.", r"\.bias$", r"features\.(24|26|28)\.", r"bn\d"]

# Fields every policy has; ``allow_infinity`` off: an infinite LR factor is no policy.
positive = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False)
common = {
    "unit": st.sampled_from(["stage", "layer"]),
    "lr_decay": st.floats(min_value=1e-6, max_value=1.0, allow_nan=False),
    "head_lr_mult": positive,
    "bn": st.sampled_from(["frozen", "train", "eval", "adapt"]),
}
epochs = st.integers(min_value=0, max_value=10_000)
positive_int = st.integers(min_value=1, max_value=10_000)

# One strategy per registered type: the fields beyond the common ones.
SPECIFIC = {
    "full": {},
    "head_only": {},
    "last_n": {"n": positive_int},
    "patterns": {
        "mode": st.sampled_from(["train", "freeze"]),
        "include": st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=3),
        "exclude": st.lists(st.sampled_from(PATTERNS), max_size=2),
        "with_head": st.booleans(),
    },
    "gradual": {"every": positive_int},
    "lp_ft": {"probe_epochs": positive_int, "ft_lr_factor": positive},
    "bitfit": {"include_norm": st.booleans()},
    "progressive_freeze": {"start": epochs, "every": positive_int, "keep": epochs},
    "surgical": {"first": epochs},
}
# Variants the field-by-field strategies above do not reach.
EXTRA = [
    st.fixed_dictionaries(
        {
            "type": st.just("surgical"),
            "groups": st.lists(st.sampled_from(GROUP_NAMES), min_size=1, max_size=3),
        },
        optional=common,
    ),
    st.fixed_dictionaries(
        {"type": st.just("surgical"), "first": st.just(0), "last": epochs}, optional=common
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("gradual"),
            "schedule": st.dictionaries(
                epochs,
                st.lists(st.sampled_from(GROUP_NAMES), min_size=1, max_size=3),
                min_size=1,
                max_size=4,
            ),
        },
        optional=common,
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("patterns"),
            "syntax": st.just("regex"),
            "include": st.lists(st.sampled_from(REGEXES), min_size=1, max_size=3),
            "exclude": st.lists(st.sampled_from(REGEXES), max_size=2),
        },
        optional=common,
    ),
]


def policy_dicts(policy_type: str):
    """Valid policy dicts of ``policy_type``; common fields present or defaulted."""
    return st.fixed_dictionaries(
        {"type": st.just(policy_type), **SPECIFIC[policy_type]}, optional=common
    )


all_policy_dicts = st.one_of(*(policy_dicts(t) for t in SPECIFIC), *EXTRA)


def test_every_registered_policy_has_a_strategy():
    # A new policy type must come with a strategy here, or it goes untested.
    assert set(SPECIFIC) == set(list_policies())


@pytest.mark.parametrize("policy_type", list(list_policies()))
def test_registered_class_builds_its_own_type(policy_type):
    cls = get_policy_class(policy_type)
    assert issubclass(cls, FreezePolicy)
    assert cls.model_fields["type"].default == policy_type
    assert cls.description  # shown by ``freezelab policies``


@pytest.mark.parametrize("policy_type", list(SPECIFIC))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_round_trip(policy_type, data):
    raw = data.draw(policy_dicts(policy_type))
    policy = from_dict(raw)
    assert type(policy) is get_policy_class(policy_type)
    for field, value in raw.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(policy, field) == expected, field

    as_dict = policy.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict  # plain JSON data, no callables
    assert from_dict(as_dict) == policy
    assert load_policy(dump_policy(policy, "json")) == policy
    assert load_policy(dump_policy(policy, "yaml")) == policy


@settings(max_examples=40, deadline=None)
@given(raw=st.one_of(*EXTRA))
def test_round_trip_schedules_and_regexes(raw):
    policy = from_dict(raw)
    assert from_dict(policy.to_dict()) == policy
    assert load_policy(dump_policy(policy, "json")) == policy
    assert load_policy(dump_policy(policy, "yaml")) == policy


def test_schedule_keys_survive_json_as_ints():
    policy = from_dict({"type": "gradual", "schedule": {0: ["head"], 3: ["layer4", "layer3"]}})
    text = dump_policy(policy, "json")
    assert json.loads(text)["schedule"] == {"0": ["head"], "3": ["layer4", "layer3"]}
    loaded = load_policy(text)
    assert loaded.schedule == {0: ("head",), 3: ("layer4", "layer3")}


def test_dump_formats():
    policy = from_dict({"type": "last_n", "n": 3, "unit": "layer"})
    assert json.loads(dump_policy(policy, "json"))["n"] == 3
    assert yaml.safe_load(dump_policy(policy, "yaml"))["unit"] == "layer"
    with pytest.raises(ValueError, match="format must be 'json' or 'yaml'"):
        dump_policy(policy, "toml")


@settings(max_examples=30, deadline=None)
@given(raw=all_policy_dicts)
def test_policy_is_immutable(raw):
    policy = from_dict(raw)
    with pytest.raises(ValidationError):
        policy.unit = "layer"
    with pytest.raises(ValidationError):
        policy.type = "full"
    # The dict form is a copy: editing it leaves the policy alone.
    before = policy.to_dict()
    edited = policy.to_dict()
    edited["head_lr_mult"] = 123.0
    assert policy.to_dict() == before


def test_policy_fields_are_immutable_containers():
    policy = from_dict({"type": "patterns", "include": ["layer4.*"]})
    assert isinstance(policy.include, tuple)
    with pytest.raises(ValidationError):
        policy.include = ("layer3.*",)


def test_from_dict_passes_a_policy_through():
    policy = from_dict({"type": "head_only"})
    assert from_dict(policy) is policy


def test_registering_a_duplicate_name_raises():
    before = list_policies()
    full = get_policy_class("full")

    with pytest.raises(ValueError, match="'full' is already registered"):

        @register_policy("full")
        class AnotherFull(FreezePolicy):
            type: Literal["full"] = "full"

    assert list_policies() == before
    assert get_policy_class("full") is full


def test_registering_a_mismatched_or_foreign_class_raises():
    before = list_policies()
    with pytest.raises(TypeError, match="must default to 'not_registered_a'"):

        @register_policy("not_registered_a")
        class WrongTag(FreezePolicy):
            type: Literal["other"] = "other"

    with pytest.raises(TypeError, match="is not a FreezePolicy"):
        register_policy("not_registered_b")(dict)
    assert list_policies() == before


# -- load_policy: files, inline text, train configs ----------------------------------


def test_load_policy_from_json_and_yaml_files(tmp_path):
    json_file = tmp_path / "policy.json"
    json_file.write_text('{"type": "lp_ft", "probe_epochs": 2, "ft_lr_factor": 0.5}')
    yaml_file = tmp_path / "policy.yaml"
    yaml_file.write_text("type: lp_ft\nprobe_epochs: 2\nft_lr_factor: 0.5\n")
    expected = from_dict({"type": "lp_ft", "probe_epochs": 2, "ft_lr_factor": 0.5})
    assert load_policy(json_file) == expected
    assert load_policy(str(json_file)) == expected
    assert load_policy(yaml_file) == expected
    assert load_policy(str(yaml_file)) == expected


def test_load_policy_inline_json_yaml_and_dict():
    expected = from_dict({"type": "last_n", "n": 3, "unit": "layer"})
    assert load_policy('{"type": "last_n", "n": 3, "unit": "layer"}') == expected
    assert load_policy("type: last_n\nn: 3\nunit: layer\n") == expected
    assert load_policy({"type": "last_n", "n": 3, "unit": "layer"}) == expected
    assert load_policy("type: full") == from_dict({"type": "full"})


def test_load_policy_from_a_train_config(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(
        "name: run\n"
        "model:\n  name: vgg16\n  head: {pool: flatten, hidden: [256]}\n"
        "policy:\n  type: gradual\n  every: 2\n  unit: layer\n"
        "epochs: 10\n"
    )
    assert load_policy(config) == from_dict({"type": "gradual", "every": 2, "unit": "layer"})


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("policies/*.yaml")), ids=lambda p: p.name)
def test_shipped_policy_files_load(path):
    policy = load_policy(path)
    assert from_dict(policy.to_dict()) == policy


def test_keras_recipe_file_is_last_three_conv_layers():
    policy = load_policy(EXAMPLES / "policies" / "vgg16_keras_last5.yaml")
    assert policy == from_dict({"type": "last_n", "n": 3, "unit": "layer"})


def test_shipped_train_configs_hold_a_policy():
    configs = sorted(EXAMPLES.glob("vgg16_*.yaml"))
    assert configs
    for path in configs:
        assert isinstance(load_policy(path), FreezePolicy), path


def test_load_policy_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "nope.yaml")


def test_load_policy_unparsable_text():
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy('{"type": "full"')


def test_load_policy_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- full\n- head_only\n")
    with pytest.raises(PolicyError, match="not a policy"):
        load_policy(path)


# -- errors ------------------------------------------------------------------------


def test_unknown_type_lists_the_registered_types():
    with pytest.raises(PolicyError, match="unknown policy type 'freeze_everything'") as info:
        from_dict({"type": "freeze_everything"})
    for name in list_policies():
        assert name in str(info.value)


def test_missing_type_lists_the_registered_types():
    with pytest.raises(PolicyError, match="has no 'type'") as info:
        from_dict({"n": 3})
    assert all(name in str(info.value) for name in list_policies())


def test_unknown_field_is_named():
    with pytest.raises(PolicyError, match="layers: unknown field"):
        load_policy('{"type": "last_n", "n": 3, "layers": 5}')


def test_missing_field_is_named():
    with pytest.raises(PolicyError, match="n: missing"):
        from_dict({"type": "last_n"})
    with pytest.raises(PolicyError, match="probe_epochs: missing"):
        from_dict({"type": "lp_ft"})
    with pytest.raises(PolicyError, match="include: missing"):
        from_dict({"type": "patterns"})


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"type": "last_n", "n": 0}, "n"),
        ({"type": "full", "lr_decay": 1.5}, "lr_decay"),
        ({"type": "full", "lr_decay": 0.0}, "lr_decay"),
        ({"type": "full", "head_lr_mult": 0}, "head_lr_mult"),
        ({"type": "full", "unit": "block"}, "unit"),
        ({"type": "full", "bn": "sometimes"}, "bn"),
        ({"type": "patterns", "include": []}, "include"),
        ({"type": "lp_ft", "probe_epochs": 0}, "probe_epochs"),
        ({"type": "progressive_freeze", "keep": -1}, "keep"),
    ],
)
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(PolicyError, match=f"policy: {field}: "):
        from_dict(raw)


def test_bad_regex_is_reported():
    with pytest.raises(PolicyError, match=r"invalid regex 'layer\(4'"):
        from_dict({"type": "patterns", "include": ["layer(4"], "syntax": "regex"})
    with pytest.raises(PolicyError, match=r"invalid regex '\[bn'"):
        from_dict(
            {"type": "patterns", "include": ["layer4"], "exclude": ["[bn"], "syntax": "regex"}
        )


def test_glob_patterns_are_not_compiled_as_regex():
    # "layer(4" is a fine glob (it matches itself literally).
    assert from_dict({"type": "patterns", "include": ["layer(4"]}).include == ("layer(4",)


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "gradual"},
        {"type": "gradual", "every": 2, "schedule": {0: ["head"]}},
    ],
    ids=["neither", "both"],
)
def test_gradual_needs_exactly_one_of_every_and_schedule(raw):
    with pytest.raises(PolicyError, match="set exactly one of 'every' and 'schedule'"):
        from_dict(raw)


def test_gradual_schedule_epochs_are_not_negative():
    with pytest.raises(PolicyError, match="schedule epochs must be >= 0"):
        from_dict({"type": "gradual", "schedule": {-1: ["head"]}})
