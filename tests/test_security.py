"""Security: no pickle payload runs, YAML is never evaluated, plugins load only when named and allowed."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

import medtl
from medtl._host import BUILTIN_PLUGINS, PluginHost
from medtl.checkpoint import load_checkpoint
from medtl.cli import main
from medtl.config import load_study
from medtl.errors import EXIT_CONFIG, ConfigError
from medtl.weights import read_state_dict

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this object opens (so creates) ``marker`` for writing."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _crafted_file(path: Path, marker: Path) -> Path:
    torch.save({"format": "medtl-checkpoint-2", "model": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    return path


def test_payload_runs_under_plain_unpickling(tmp_path):
    # The control: the crafted file really does run code when fully unpickled.
    marker = tmp_path / "control-marker"
    path = _crafted_file(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_weights_loader_rejects_payload(tmp_path):
    marker = tmp_path / "marker"
    path = _crafted_file(tmp_path / "evil.pt", marker)
    with pytest.raises(ConfigError, match="weights_only=True"):
        read_state_dict(path)
    assert not marker.exists()


def test_checkpoint_loader_rejects_payload(tmp_path):
    marker = tmp_path / "marker"
    path = _crafted_file(tmp_path / "last.pt", marker)
    with pytest.raises(ConfigError, match="weights_only=True"):
        load_checkpoint(path)
    assert not marker.exists()


def test_resume_from_crafted_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("data: {manifest: m.csv}\n")
    (run_dir / "run.json").write_text('{"status": "interrupted", "base_dir": "."}')
    marker = tmp_path / "marker"
    _crafted_file(run_dir / "checkpoints" / "last.pt", marker)
    assert main(["-q", "run", "--resume", str(run_dir)]) == EXIT_CONFIG
    assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists()


def _torch_load_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]


def test_every_torch_load_is_weights_only():
    calls = 0
    for folder in ("medtl", "plugins"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for call in _torch_load_calls(path):
                calls += 1
                flags = {k.arg: k.value for k in call.keywords}
                assert "weights_only" in flags, f"{path}:{call.lineno} calls torch.load without weights_only"
                assert isinstance(flags["weights_only"], ast.Constant) and flags["weights_only"].value is True, \
                    f"{path}:{call.lineno}"
    assert calls > 0
    for folder in ("medtl", "plugins"):
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            assert "pickle.load" not in text, path
            assert "yaml.load(" not in text, path
            assert "yaml.unsafe_load" not in text, path


def test_yaml_tags_are_not_evaluated(tmp_path):
    marker = tmp_path / "marker"
    study = tmp_path / "study.yaml"
    study.write_text(f'data: !!python/object/apply:builtins.open ["{marker}", "w"]\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(study)
    assert not marker.exists()


def test_strings_are_not_evaluated(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text('data: {manifest: m.csv}\ntrain: {epochs: "__import__(\'os\').getpid()"}\n')
    with pytest.raises(ConfigError, match="train.epochs"):
        load_study(study)


@pytest.fixture()
def side_effect_plugin(tmp_path, monkeypatch) -> tuple[str, Path]:
    """A plugin module that leaves a marker file when it is imported."""
    marker = tmp_path / "imported"
    (tmp_path / "medtl_test_vetted_plugin.py").write_text(
        "from pathlib import Path\n"
        "import medtl\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "@medtl.hookimpl\n"
        "def medtl_register_poolings():\n"
        "    return {'vetted-avg': lambda in_channels: None}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "medtl_test_vetted_plugin", marker


def test_allow_list_blocks_unlisted_module(side_effect_plugin):
    name, marker = side_effect_plugin
    host = PluginHost(allow=list(BUILTIN_PLUGINS), modules=[name], entry_points=False)
    assert not marker.exists()
    assert "vetted-avg" not in host.components("pooling")
    assert "avg" in host.components("pooling")


def test_allow_list_admits_listed_module(side_effect_plugin):
    name, marker = side_effect_plugin
    host = PluginHost(allow=[*BUILTIN_PLUGINS, name], modules=[name], entry_points=False)
    assert marker.exists()
    assert "vetted-avg" in host.components("pooling")


def test_allow_list_can_drop_builtins():
    host = PluginHost(allow=["medtl_plugins.backbones"], entry_points=False)
    assert host.components("pooling") == []
    assert "resnet18" in host.components("backbone")


def test_unnamed_module_is_never_imported(side_effect_plugin):
    _, marker = side_effect_plugin
    medtl.set_host(PluginHost(entry_points=False))
    assert "vetted-avg" not in medtl.components("pooling")
    assert not marker.exists()


def test_study_allow_list_reaches_host(tmp_path):
    from medtl.engine import build_host

    study = tmp_path / "study.yaml"
    study.write_text("data: {manifest: m.csv}\nplugins: {allow: [medtl_plugins.backbones]}\n")
    host = build_host(load_study(study))
    assert set(host.plugin_versions()) <= {"medtl_plugins.backbones"} | _entry_point_names()


def _entry_point_names() -> set[str]:
    import importlib.metadata

    return {ep.name for ep in importlib.metadata.entry_points(group=medtl.ENTRY_POINT_GROUP)}


def test_pickle_module_untouched_by_loader(tmp_path, monkeypatch):
    # read_state_dict must never fall back to full unpickling after weights_only fails.
    calls = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(a))
    path = _crafted_file(tmp_path / "evil.pt", tmp_path / "marker")
    with pytest.raises(ConfigError):
        read_state_dict(path)
    assert calls == []


PHI = {"PatientName": "Doe^Janet^Q", "PatientID": "MRN-77341902", "PatientBirthDate": "19610417",
       "StudyDate": "20240229", "AccessionNumber": "ACC-5550123", "InstitutionName": "Saint Example Hospital"}


def test_checkpoints_and_record_hold_no_dicom_values(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from _engine_helpers import tiny_study_dict
    from medtl.config import study_from_dict
    from medtl.engine import run_study

    sample = sorted((REPO / "sample_data" / "site_a").glob("*.dcm"))[:16]
    lines = ["path,label,site,patient_id"]
    uids = []
    for i, source in enumerate(sample):
        ds = pydicom.dcmread(str(source))
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        uids += [str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)]
        ds.save_as(str(tmp_path / f"img{i}.dcm"))
        lines.append(f"img{i}.dcm,{'ab'[i % 2]},A,P{i // 2}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    raw = tiny_study_dict(manifest, tmp_path / "out", epochs=1, steps_per_epoch=1)
    raw["sites"] = {"A": {"role": "source"}}
    run_dir = run_study(study_from_dict(raw, base_dir=tmp_path)).run_dir

    outputs = [*sorted((run_dir / "checkpoints").glob("*.pt")), run_dir / "run.json", run_dir / "config.yaml",
               run_dir / "metrics.json", run_dir / "history.json"]
    for path in outputs:
        data = path.read_bytes()
        for value in [*PHI.values(), "Doe", *uids]:
            assert value.encode() not in data, f"{value!r} found in {path.name}"
