"""Study-file validation and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtl.cli import main
from medtl.config import apply_overrides, load_study, parse_override, study_from_dict
from medtl.errors import EXIT_CONFIG, ConfigError

MINIMAL = {"data": {"manifest": "manifest.csv"}}


def test_minimal_study_gets_defaults():
    study = study_from_dict(MINIMAL)
    assert study.model.backbone.name == "resnet18"
    assert study.strategy.name == "finetune"
    assert study.output.dir == "runs"


def test_unknown_key_names_key_path():
    with pytest.raises(ConfigError) as info:
        study_from_dict({**MINIMAL, "train": {"epocs": 3}})
    assert "train.epocs" in str(info.value)
    assert "unknown key" in str(info.value)


def test_wrong_type_shows_value_received():
    with pytest.raises(ConfigError) as info:
        study_from_dict({**MINIMAL, "train": {"epochs": "many"}})
    message = str(info.value)
    assert "train.epochs" in message
    assert "'many'" in message


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        study_from_dict({"data": {"manifest": "m.csv", "spatial_dims": 4}, "train": {"epochs": 0}})
    keys = [key for key, _ in info.value.problems]
    assert "data.spatial_dims" in keys
    assert "train.epochs" in keys


def test_missing_required_key():
    with pytest.raises(ConfigError) as info:
        study_from_dict({})
    assert "data" in [key for key, _ in info.value.problems]


def test_image_size_must_match_spatial_dims():
    with pytest.raises(ConfigError, match="image_size has 2 values but spatial_dims is 3"):
        study_from_dict({"data": {"manifest": "m.csv", "spatial_dims": 3, "image_size": [32, 32]}})


def test_site_roles_need_a_source():
    with pytest.raises(ConfigError, match="role: source"):
        study_from_dict({**MINIMAL, "sites": {"A": {"role": "target"}}})


def test_override_parses_yaml_values():
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("data.image_size=[32, 32]") == (["data", "image_size"], [32, 32])
    assert parse_override("model.backbone.weights=w.pt") == (["model", "backbone", "weights"], "w.pt")


def test_override_creates_sections():
    raw = apply_overrides(MINIMAL, ["strategy.options.mixup_alpha=0.2"])
    assert raw["strategy"]["options"]["mixup_alpha"] == 0.2
    assert "strategy" not in MINIMAL  # the input is not modified


@pytest.mark.parametrize("text", ["train.epochs", "=3", "train..epochs=3"])
def test_malformed_override_rejected(text):
    with pytest.raises(ConfigError, match="invalid override"):
        parse_override(text)


def test_override_into_a_value_rejected():
    with pytest.raises(ConfigError, match="seed is a value"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_yaml_tags_are_not_evaluated(tmp_path: Path):
    path = tmp_path / "study.yaml"
    path.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(path)


def test_paths_resolve_against_study_folder(tmp_path: Path):
    path = tmp_path / "sub" / "study.yaml"
    path.parent.mkdir()
    path.write_text("data: {manifest: m.csv}\n")
    study = load_study(path)
    assert study.resolve_path(study.data.manifest) == path.parent / "m.csv"


def test_cli_reports_config_error_without_traceback(tmp_path: Path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("data: {manifest: m.csv}\ntrain: {epochs: -1}\n")
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG
    assert "train.epochs" in err
    assert "Traceback" not in err


def test_cli_missing_study_file(tmp_path: Path, capsys):
    code = main(["run", str(tmp_path / "nope.yaml")])
    assert code == EXIT_CONFIG
    assert "study file not found" in capsys.readouterr().err


def test_base_dir_is_absolute(tmp_path: Path, monkeypatch):
    (tmp_path / "study.yaml").write_text("data: {manifest: m.csv}\n")
    monkeypatch.chdir(tmp_path)
    study = load_study("study.yaml")
    assert Path(study.base_dir).is_absolute()
    assert study.resolve_path(study.data.manifest) == tmp_path / "m.csv"


def test_binary_study_file_is_config_error(tmp_path: Path):
    path = tmp_path / "study.yaml"
    path.write_bytes(b"data:\n\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_study(path)


def test_tta_axis_beyond_spatial_dims_rejected():
    with pytest.raises(ConfigError) as info:
        study_from_dict({"data": {"manifest": "m.csv", "spatial_dims": 2}, "evaluation": {"tta_flip_axes": [0, 2]}})
    assert "evaluation.tta_flip_axes" in str(info.value)
    assert "[2]" in str(info.value)


def test_tta_axes_must_be_distinct():
    with pytest.raises(ConfigError) as info:
        study_from_dict({**MINIMAL, "evaluation": {"tta_flip_axes": [1, 1]}})
    assert "evaluation.tta_flip_axes" in str(info.value)
