"""Generated invalid study files: each one gives a ConfigError that names the key path."""

from __future__ import annotations

import copy
import string
import tempfile
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from medtl.config import Study, load_study, study_from_dict  # noqa: E402
from medtl.errors import ConfigError  # noqa: E402

BASE = {
    "name": "fuzz",
    "data": {"manifest": "manifest.csv", "image_size": [32, 32], "split": {"val": 0.2, "test": 0.2}},
    "sites": {"A": {"role": "source"}},
    "model": {"backbone": {"name": "resnet10"}, "head": {"dropout": 0.1}},
    "optimizer": {"name": "adamw", "lr": 0.001},
    "train": {"epochs": 2, "batch_size": 8},
    "output": {"dir": "runs"},
}

# pydantic's lax mode accepts integral floats and digit strings as integers, so
# these are the values no integer field may accept.
not_an_int = st.one_of(st.text(alphabet=string.ascii_letters, min_size=1, max_size=5),
                       st.floats(allow_infinity=False, allow_nan=False).filter(lambda f: f % 1 != 0),
                       st.lists(st.integers(), max_size=2))
non_positive = st.integers(max_value=0)
bad_word = st.text(alphabet=string.ascii_letters, min_size=1, max_size=8)

#: key path -> values that the schema must reject there
INVALID_VALUES: dict[tuple[str, ...], st.SearchStrategy] = {
    ("train", "epochs"): st.one_of(non_positive, not_an_int),
    ("train", "batch_size"): st.one_of(non_positive, not_an_int),
    ("train", "steps_per_epoch"): non_positive,
    ("train", "num_workers"): st.integers(max_value=-1),
    ("train", "precision"): bad_word.filter(lambda w: w not in ("fp32", "bf16", "fp16")),
    ("train", "grad_clip"): st.floats(max_value=0.0),
    ("optimizer", "lr"): st.floats(max_value=0.0),
    ("optimizer", "name"): bad_word.filter(lambda w: w not in ("sgd", "adam", "adamw")),
    ("optimizer", "momentum"): st.floats(min_value=1.0, allow_infinity=False),
    ("schedule", "name"): bad_word.filter(lambda w: w not in ("constant", "cosine", "dann")),
    ("data", "spatial_dims"): st.integers().filter(lambda v: v not in (2, 3)),
    ("data", "channels"): non_positive,
    ("data", "intensity"): bad_word.filter(lambda w: w not in ("minmax", "zscore", "none")),
    ("data", "on_bad_file"): bad_word.filter(lambda w: w not in ("fail", "skip")),
    ("data", "split", "val"): st.one_of(st.floats(min_value=1.0, allow_infinity=False),
                                        st.floats(max_value=-1e-9, allow_infinity=False)),
    ("model", "head", "dropout"): st.floats(min_value=1.0, allow_infinity=False),
    ("sites", "A", "role"): bad_word.filter(lambda w: w not in ("source", "target")),
    ("evaluation", "bootstrap"): st.integers(max_value=-1),
}

SECTIONS = [("train",), ("data",), ("optimizer",), ("model", "backbone"), ("data", "split"), ("output",), ()]


def _set(raw: dict, path: tuple[str, ...], value) -> dict:
    raw = copy.deepcopy(raw)
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return raw


def _problem_keys(exc: ConfigError) -> list[str]:
    return [key for key, _ in exc.problems]


def _validate_through_yaml(raw: dict) -> Study:
    # Round-trip through YAML text, as a study file would be read.
    return study_from_dict(yaml.safe_load(yaml.safe_dump(raw)), source="fuzz.yaml")


def test_base_study_is_valid():
    assert _validate_through_yaml(BASE).train.epochs == 2


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_invalid_value_names_key_path(data):
    path = data.draw(st.sampled_from(sorted(INVALID_VALUES)))
    value = data.draw(INVALID_VALUES[path])
    with pytest.raises(ConfigError) as info:
        _validate_through_yaml(_set(BASE, path, value))
    dotted = ".".join(path)
    assert any(key == dotted or key.startswith(dotted + ".") for key in _problem_keys(info.value)), \
        (dotted, value, info.value.problems)


@settings(max_examples=60, deadline=None)
@given(section=st.sampled_from(SECTIONS),
       key=st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12))
def test_unknown_key_names_key_path(section, key):
    node = BASE
    for part in section:
        node = node.get(part, {})
    if key in node or key in (Study.model_fields if not section else {}):
        return
    with pytest.raises(ConfigError) as info:
        _validate_through_yaml(_set(BASE, (*section, key), 1))
    dotted = ".".join((*section, key))
    assert dotted in _problem_keys(info.value)
    assert "unknown key" in str(info.value)


@settings(max_examples=60, deadline=None)
@given(section=st.sampled_from(["train", "data", "optimizer", "model", "plugins", "evaluation"]),
       value=st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)))
def test_section_of_wrong_type_names_section(section, value):
    with pytest.raises(ConfigError) as info:
        _validate_through_yaml(_set(BASE, (section,), value))
    assert any(key == section or key.startswith(section + ".") for key in _problem_keys(info.value))


@settings(max_examples=80, deadline=None)
@given(text=st.text(max_size=80))
def test_arbitrary_text_gives_config_error_or_study(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "study.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_study(path)
        except ConfigError:
            pass
