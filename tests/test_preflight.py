"""Component names and weights files are checked before a run folder exists or an image is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptation_helpers import base_study, make_host
from conftest import SAMPLE_STUDY
from medtl.cli import main
from medtl.config import study_from_dict
from medtl.errors import EXIT_CONFIG, ConfigError
from medtl.stages import run_series


@pytest.fixture
def no_work(monkeypatch):
    """Make creating a run folder or reading data fail the test."""
    import medtl.engine

    def forbidden(*args, **kwargs):
        raise AssertionError("the run started work before its configuration was checked")

    monkeypatch.setattr(medtl.engine, "create_run_dir", forbidden)
    monkeypatch.setattr(medtl.engine._Study, "load_data", forbidden)


def _run(tmp_path: Path, *overrides: str) -> list[str]:
    args = ["run", str(SAMPLE_STUDY), "--set", f"output.dir={tmp_path / 'runs'}", "--set", "train.device=cpu"]
    for override in overrides:
        args += ["--set", override]
    return args


def test_unknown_names_fail_before_run(tmp_path, capsys, no_work):
    code = main(_run(tmp_path, "model.backbone.name=resnt18", "model.pooling.name=avgg", "strategy.name=dan",
                     "transforms.preset=defualt", "train.select=sndd", "data.sources.dicomm.voi=true"))
    err = capsys.readouterr().err

    assert code == EXIT_CONFIG
    assert not (tmp_path / "runs").exists()
    assert "so nothing was run and no run folder was created:" in err
    assert "model.backbone.name: unknown backbone 'resnt18'. Did you mean 'resnet18'? Valid names: " in err
    assert "resnet10, resnet18, resnet34" in err
    assert "The value came from --set 'model.backbone.name=resnt18'." in err
    assert "model.pooling.name: unknown pooling 'avgg'. Did you mean 'avg'?" in err
    assert "strategy.name: unknown strategy 'dan'. Did you mean 'dann'?" in err
    assert "transforms.preset: unknown transform 'defualt'. Did you mean 'default'?" in err
    assert "train.select: unknown validator 'sndd'. Did you mean 'snd'?" in err
    assert "data.sources.dicomm: unknown source 'dicomm'. Did you mean 'dicom'?" in err


def test_missing_weights_fail_before_run(tmp_path, capsys, no_work):
    code = main(_run(tmp_path, "model.backbone.weights=missing-weights.pt"))
    err = capsys.readouterr().err

    assert code == EXIT_CONFIG
    assert not (tmp_path / "runs").exists()
    expected = SAMPLE_STUDY.parent.resolve() / "missing-weights.pt"
    assert f"model.backbone.weights: weights file not found: {expected} (value 'missing-weights.pt')" in err


def test_stage_name_checked_before_series(tmp_path):
    raw = base_study(tmp_path, seeds=[0, 1],
                     stages=[{"name": "pretrain"}, {"name": "adapt", "strategy": {"name": "coarl"}}])
    study = study_from_dict(raw, base_dir=tmp_path)

    with pytest.raises(ConfigError) as info:
        run_series(study, make_host())

    assert [key for key, _ in info.value.problems] == ["stages.1.strategy.name"]
    assert info.value.problems[0][1].startswith("unknown strategy 'coarl'. Did you mean 'coral'? Valid names: ")
    assert not (tmp_path / "runs").exists()


def test_manifest_source_column_checked(tmp_path, capsys, no_work):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,site,patient_id,source\n"
                        "a.dcm,0,A,p1,dicm\nb.dcm,1,A,p2,dicm\nc.nii,1,A,p3,nifti\n")
    study = tmp_path / "study.yaml"
    study.write_text(f"data: {{manifest: manifest.csv}}\noutput: {{dir: {tmp_path / 'runs'}}}\n")

    code = main(["run", str(study)])
    err = capsys.readouterr().err

    assert code == EXIT_CONFIG
    assert not (tmp_path / "runs").exists()
    assert (f"data.manifest: {manifest}, source column, row 2 and 1 more: unknown source 'dicm'. "
            "Did you mean 'dicom'?") in err
    assert "unknown source 'nifti'" not in err


def test_missing_manifest_fails_before_run(tmp_path, capsys, no_work):
    code = main(_run(tmp_path, "data.manifest=nope.csv"))
    err = capsys.readouterr().err

    assert code == EXIT_CONFIG
    assert not (tmp_path / "runs").exists()
    assert "data.manifest: manifest not found:" in err
    assert "--set 'data.manifest=nope.csv'" in err
