"""`medtl compare` on hand-made run folders: output folder and printed paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtl.cli import main


def _fake_run(folder: Path, auc: float) -> Path:
    """Write the three files that compare reads: config.yaml, run.json and metrics.json."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"# Resolved study; base_dir: {folder}\n"
                                        "data: {manifest: manifest.csv}\nstrategy: {name: finetune}\n")
    (folder / "run.json").write_text(json.dumps({"source_sites": ["A"]}))
    (folder / "metrics.json").write_text(json.dumps({"test": {"A": {"auc": auc, "n": 10},
                                                              "B": {"auc": auc - 0.1, "n": 10}}}))
    return folder


def test_compare_default_out_folder(tmp_path, monkeypatch, capsys):
    runs = [_fake_run(tmp_path / "runs" / name, auc) for name, auc in (("one", 0.8), ("two", 0.7))]
    monkeypatch.chdir(tmp_path)

    assert main(["-q", "compare", *map(str, runs)]) == 0
    printed = capsys.readouterr().out

    assert (tmp_path / "comparison" / "comparison.json").is_file()
    assert (tmp_path / "comparison" / "report.html").is_file()
    assert ("wrote comparison/comparison.json and comparison/report.html (the default folder; "
            "set --out DIR to write elsewhere)") in printed


def test_compare_explicit_out_folder(tmp_path, capsys):
    runs = [_fake_run(tmp_path / "runs" / "one", 0.8)]
    out = tmp_path / "elsewhere"

    assert main(["-q", "compare", *map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    assert json.loads((out / "comparison.json").read_text())["matrix"]["A"]["B"]["mean"] == pytest.approx(0.7)
    assert f"wrote {out / 'comparison.json'} and {out / 'report.html'}\n" in printed
    assert "default folder" not in printed
