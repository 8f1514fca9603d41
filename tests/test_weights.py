"""Starting weights: key formats, channel adaptation, load report, chaining, safety."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import medtl
from conftest import SAMPLE_STUDY
from medtl.config import load_study
from medtl.engine import build_model
from medtl.errors import ConfigError
from medtl.model import Classifier
from medtl.weights import adapt_input_channels, load_backbone_weights, read_state_dict


def make_resnet(dims: int = 2, in_channels: int = 1, depth: str = "resnet10", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return medtl.create("backbone", depth, spatial_dims=dims, in_channels=in_channels).eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def without_shortcut_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the shortcut biases that torchvision and MedicalNet ResNets do not have."""
    return {k: v for k, v in state.items() if not k.endswith("downsample.0.bias")}


def zero_shortcut_bias(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if name.endswith("downsample.0.bias"):
            torch.nn.init.zeros_(param)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_plain_state_dict_round_trip(tmp_path: Path, suffix: str):
    source, target = make_resnet(seed=1), make_resnet(seed=2)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    report = load_backbone_weights(target, path, strict=True)
    assert_same_weights(source, target)
    assert report["loaded"] == len(state)
    assert report["n_missing"] == 0
    assert report["n_unexpected"] == 0


@pytest.mark.parametrize("prefix", ["module.", "model.", "backbone.", "module.backbone."])
def test_prefixes_stripped(tmp_path: Path, prefix: str):
    source, target = make_resnet(seed=1), make_resnet(seed=2)
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, tmp_path / "w.pt")
    load_backbone_weights(target, tmp_path / "w.pt", strict=True)
    assert_same_weights(source, target)


def test_torchvision_resnet_keys(tmp_path: Path):
    source, target = make_resnet(depth="resnet18", seed=1), make_resnet(depth="resnet18", seed=2)
    zero_shortcut_bias(source)
    state = without_shortcut_bias(source.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    torch.save(state, tmp_path / "resnet18.pth")
    report = load_backbone_weights(target, tmp_path / "resnet18.pth", strict=True)
    assert report["format"] == "torchvision"
    assert report["n_zero_filled"] == 3  # the shortcuts of layer2, layer3 and layer4
    assert_same_weights(source, target)


def test_medicalnet_keys(tmp_path: Path):
    source, target = make_resnet(dims=3, seed=1), make_resnet(dims=3, seed=2)
    zero_shortcut_bias(source)
    state = {"module." + k: v for k, v in without_shortcut_bias(source.state_dict()).items()}
    state["module.conv_seg.0.weight"] = torch.randn(32, 512, 3, 3, 3)
    torch.save({"state_dict": state, "epoch": torch.tensor(200)}, tmp_path / "resnet_10_23dataset.pth")
    report = load_backbone_weights(target, tmp_path / "resnet_10_23dataset.pth", strict=True)
    assert report["format"] == "medicalnet"
    assert_same_weights(source, target)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(source(x), target(x))


def test_medtl_checkpoint_chains_into_next_run(tmp_path: Path):
    # the checkpoint layout that the engine writes
    backbone = make_resnet(seed=1)
    classifier = Classifier(backbone, medtl.create("pooling", "avg", in_channels=512), num_classes=2)
    checkpoint = {"format": "medtl-checkpoint-1", "epoch": 3, "model": classifier.state_dict(),
                  "strategy": {}, "labels": ["a", "b"]}
    torch.save(checkpoint, tmp_path / "best.pt")

    study = load_study(SAMPLE_STUDY, [f"model.backbone.weights={tmp_path / 'best.pt'}",
                                      "model.backbone.strict=true", "model.pooling.name=isqrt-cov"])
    model, report = build_model(study, medtl.get_host(), num_classes=2)
    assert report["format"] == "medtl"
    assert report["n_unexpected"] == 0
    assert_same_weights(backbone, model.backbone)


@pytest.mark.parametrize(("saved", "wanted"), [(3, 1), (1, 3)])
def test_input_channels_adapted(tmp_path: Path, saved: int, wanted: int):
    source, target = make_resnet(in_channels=saved, seed=1), make_resnet(in_channels=wanted, seed=2)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    report = load_backbone_weights(target, tmp_path / "w.pt")
    assert report["adapted_channels"] == [saved, wanted]
    # an image with the same values on every channel gives the same features
    gray = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(source(gray.expand(1, saved, 64, 64)), target(gray.expand(1, wanted, 64, 64)),
                                   rtol=1e-4, atol=1e-5)


def test_adapt_three_to_one_sums():
    weight = torch.randn(8, 3, 7, 7)
    torch.testing.assert_close(adapt_input_channels(weight, 1), weight.sum(dim=1, keepdim=True))


def test_adapt_one_to_three_repeats_and_scales():
    weight = torch.randn(8, 1, 7, 7)
    adapted = adapt_input_channels(weight, 3)
    assert adapted.shape == (8, 3, 7, 7)
    torch.testing.assert_close(adapted, weight.repeat(1, 3, 1, 1) / 3)


def test_shape_mismatch_names_layer(tmp_path: Path):
    torch.save(make_resnet(depth="resnet50").state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"layer layer1\.0\.conv1\.weight has shape \(64, 64, 1, 1\).*\(64, 64, 3, 3\)"):
        load_backbone_weights(make_resnet(depth="resnet18"), tmp_path / "w.pt")


def test_strict_reports_missing_and_unexpected(tmp_path: Path):
    state = make_resnet().state_dict()
    state.pop("bn1.weight")
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"1 missing, 1 unexpected.*bn1\.weight.*extra\.weight"):
        load_backbone_weights(make_resnet(), tmp_path / "w.pt", strict=True)
    report = load_backbone_weights(make_resnet(), tmp_path / "w.pt", strict=False)
    assert report["missing"] == ["bn1.weight"]
    assert report["unexpected"] == ["extra.weight"]
    assert report["loaded"] == len(state) - 1


def test_report_logged(tmp_path: Path, caplog):
    torch.save(make_resnet().state_dict(), tmp_path / "w.pt")
    with caplog.at_level(logging.INFO, logger="medtl.weights"):
        report = load_backbone_weights(make_resnet(), tmp_path / "w.pt")
    assert f"{report['loaded']} tensors loaded, 0 missing, 0 unexpected" in caplog.text
    assert report["loaded_names"][0] == "conv1.weight"


class _RunsCodeOnLoad:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_rejected_without_running(tmp_path: Path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCodeOnLoad(marker)}, path)
    with pytest.raises(ConfigError, match="cannot be loaded safely"):
        read_state_dict(path)
    assert not marker.exists()
    # full unpickling does run the command, so the check above could have failed
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_file_is_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="weights file not found"):
        read_state_dict(tmp_path / "nope.pt")


def _write_bad_weights(kind: str, path: Path) -> Path:
    import argparse

    if kind == "unsafe":
        torch.save({"conv1.weight": torch.zeros(1), "args": argparse.Namespace(lr=0.1)}, path)
    elif kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "truncated":
        torch.save({"conv1.weight": torch.zeros(64)}, path)
        path.write_bytes(path.read_bytes()[:120])
    elif kind == "list":
        torch.save([torch.zeros(1)], path)
    elif kind == "not-tensor":
        torch.save({"conv1.weight": torch.zeros(1), "epoch": 3}, path)
    return path


@pytest.mark.parametrize("kind, expected", [
    ("unsafe", "cannot be loaded safely as weights: it contains a pickled argparse.Namespace, and medtl loads "
               "only tensors and plain containers (torch.load with weights_only=True) because unpickling other "
               "objects can run code. Re-save only the tensors"),
    ("text", "cannot be loaded as weights: it is not a file written by torch.save, or it is truncated or "
             "corrupt (torch.load raised "),
    ("truncated", "cannot be loaded as weights: it is not a file written by torch.save"),
    ("list", "contains no state dict: expected a dict of tensors, found an object of type list."),
    ("not-tensor", "contains no state dict: expected a dict of tensors, but entry 'epoch' has type int."),
])
def test_weights_error_is_one_line(tmp_path: Path, kind: str, expected: str):
    path = _write_bad_weights(kind, tmp_path / "weights.pt")
    with pytest.raises(ConfigError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message
    assert "PyTorch 2.6" not in message
    assert len(message) < len(str(path)) + 400


def test_weights_error_detail_logged_at_debug(tmp_path: Path, caplog):
    path = _write_bad_weights("unsafe", tmp_path / "weights.pt")
    with caplog.at_level(logging.DEBUG, logger="medtl.weights"), pytest.raises(ConfigError):
        read_state_dict(path)
    assert "Unsupported global" in caplog.text
