"""Tests of multi-seed studies and chained stages."""

from __future__ import annotations

import json
import math

import yaml

import pytest
import torch

from medtl.cli import main
from medtl.config import study_from_dict
from medtl.errors import ConfigError
from medtl.stages import format_summary, is_series, run_series, stage_studies, summarize

from adaptation_helpers import base_study, make_host


def test_stage_merges_sections_and_replaces_other_strategy(tmp_path):
    raw = base_study(tmp_path, strategy={"name": "finetune", "options": {"label_smoothing": 0.1}},
                     stages=[{"name": "pretrain", "strategy": {"name": "contrastive"}, "train": {"epochs": 1}},
                             {"name": "adapt", "strategy": {"options": {"mixup_alpha": 0.2}}}])
    study = study_from_dict(raw, base_dir=tmp_path)
    assert is_series(study)
    plan = stage_studies(study, seed=7, root=tmp_path / "series")
    (name0, init0, pretrain), (name1, init1, adapt) = plan
    assert (name0, init0, name1, init1) == ("pretrain", "previous", "adapt", "previous")
    assert pretrain["strategy"] == {"name": "contrastive"}
    assert pretrain["train"]["epochs"] == 1
    assert pretrain["train"]["batch_size"] == 8
    assert adapt["strategy"] == {"name": "finetune", "options": {"label_smoothing": 0.1, "mixup_alpha": 0.2}}
    assert adapt["seed"] == 7
    assert adapt["output"]["dir"] == str(tmp_path / "series" / "seed-7")


def test_invalid_stage_fails_before_any_run(tmp_path):
    raw = base_study(tmp_path, stages=[{"name": "a"}, {"name": "b", "train": {"epochs": 0}}])
    study = study_from_dict(raw, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="stage 'b'"):
        stage_studies(study, seed=0, root=tmp_path / "series")


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a"}, {"name": "a"}], "unique"),
    ([{"name": "a", "init": "b"}, {"name": "b"}], "not 'previous'"),
    ([{"name": "a", "optimiser": {}}], "unknown key"),
])
def test_invalid_stage_config(tmp_path, stages, message):
    with pytest.raises(ConfigError) as info:
        study_from_dict(base_study(tmp_path, stages=stages), base_dir=tmp_path)
    assert message in str(info.value) + str(getattr(info.value, "problems", ""))


def test_summary_mean_and_sample_std():
    metrics = {"run": {s: {"test": {"B": {"auc": v, "accuracy": 0.5, "n": 10}}, "best_epoch": 1}
                       for s, v in zip((0, 1, 2), (0.6, 0.7, 0.8))}}
    summary = summarize(metrics)
    auc = summary["stages"]["run"]["test"]["B"]["auc"]
    assert auc["mean"] == pytest.approx(0.7)
    assert auc["std"] == pytest.approx(0.1)
    assert auc["n"] == 3
    assert "0.7000 ± 0.1000 (n=3)" in format_summary(summary)


def test_pretrain_then_adapt_over_two_seeds(tmp_path):
    raw = base_study(
        tmp_path, name="chain", seeds=[0, 1],
        strategy={"name": "dann", "options": {"discriminator_width": 16}},
        train={"epochs": 1, "batch_size": 8, "device": "cpu"},
        stages=[
            {"name": "pretrain", "strategy": {"name": "contrastive",
                                              "options": {"projection_hidden": 16, "projection_dim": 8}}},
            {"name": "adapt"},
        ],
    )
    study = study_from_dict(raw, base_dir=tmp_path)
    series = run_series(study, make_host())

    root = series.root
    assert root.parent == tmp_path / "runs"
    assert root.name.startswith("chain-")
    for seed in (0, 1):
        pretrain, adapt = series.runs[seed]["pretrain"], series.runs[seed]["adapt"]
        assert pretrain == root / f"seed-{seed}" / "pretrain"
        # The adapt stage starts from the pretrain stage's backbone.
        record = json.loads((adapt / "run.json").read_text())
        assert record["weights"]["path"] == str((pretrain / "backbone.pt").resolve())
        assert record["weights"]["missing"] == []
        assert record["seed"] == seed
        exported = torch.load(pretrain / "backbone.pt", weights_only=True)
        best = torch.load(pretrain / "checkpoints" / "best.pt", weights_only=True)["model"]
        assert torch.equal(exported["stem.0.weight"], best["backbone.stem.0.weight"])
    summary = json.loads((root / "summary.json").read_text())
    assert summary["stage_order"] == ["pretrain", "adapt"]
    auc = summary["stages"]["adapt"]["test"]["B"]["auc"]
    assert auc["n"] == 2
    assert auc["mean"] == pytest.approx(sum(auc["values"]) / 2)
    assert auc["std"] == pytest.approx(math.sqrt(sum((v - auc["mean"]) ** 2 for v in auc["values"])))


def test_existing_series_folder_rejected(tmp_path):
    raw = base_study(tmp_path, name="again", seeds=[0], output={"dir": str(tmp_path / "runs"), "name": "fixed"})
    (tmp_path / "runs" / "fixed").mkdir(parents=True)
    with pytest.raises(ConfigError, match="exists already"):
        run_series(study_from_dict(raw, base_dir=tmp_path), make_host())


def test_cli_runs_seeds_and_prints_summary(tmp_path, capsys):
    raw = base_study(tmp_path, name="cli", seeds=[3, 4], train={"epochs": 1, "batch_size": 8, "device": "cpu"},
                     plugins={"modules": ["adaptation_helpers"]},
                     output={"dir": str(tmp_path / "runs"), "name": "cli-series"})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "(n=2)" in printed
    assert f"series folder: {tmp_path / 'runs' / 'cli-series'}" in printed
    summary = json.loads((tmp_path / "runs" / "cli-series" / "summary.json").read_text())
    assert summary["stage_order"] == ["run"]
    assert set(summary["runs"]) == {"3", "4"}
