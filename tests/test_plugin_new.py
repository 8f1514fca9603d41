"""`medtl plugin new NAME` writes a plugin package whose tests pass right away."""

from __future__ import annotations

import configparser
import subprocess
import sys

import pytest

from medtl.cli import main
from medtl.commands.plugin_new import write_plugin
from medtl.errors import EXIT_CONFIG, ConfigError


def test_writes_package(tmp_path, capsys):
    assert main(["plugin", "new", "lung-nets", "--dir", str(tmp_path)]) == 0
    folder = tmp_path / "medtl-lung-nets"
    assert str(folder) in capsys.readouterr().out
    for relative in ("setup.cfg", "pyproject.toml", "README.md", "src/medtl_lung_nets/__init__.py",
                     "src/medtl_lung_nets/plugin.py", "tests/test_medtl_lung_nets.py"):
        assert (folder / relative).is_file(), relative
    config = configparser.ConfigParser()
    config.read(folder / "setup.cfg")
    assert config["metadata"]["name"] == "medtl-lung-nets"
    assert config["options.entry_points"]["medtl"].strip() == "lung-nets = medtl_lung_nets.plugin"
    assert "lung-nets-convnet" in (folder / "README.md").read_text()


def test_generated_tests_pass(tmp_path):
    folder = write_plugin("medtl-demo", tmp_path)
    assert folder.name == "medtl-demo"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=folder,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_generated_plugin_registers(tmp_path, monkeypatch):
    from medtl import PluginHost

    folder = write_plugin("scaffold-check", tmp_path)
    monkeypatch.syspath_prepend(str(folder / "src"))
    host = PluginHost(entry_points=False, modules=["medtl_scaffold_check.plugin"], strict=True)
    try:
        backbone = host.create("backbone", "scaffold-check-convnet", spatial_dims=2, in_channels=1)
        assert backbone.out_channels == 32
    finally:
        for name in [m for m in sys.modules if m.startswith("medtl_scaffold_check")]:
            del sys.modules[name]


@pytest.mark.parametrize("name", ["Lung", "1net", "lung nets", "lung--nets", ""])
def test_rejects_invalid_name(tmp_path, name):
    with pytest.raises(ConfigError, match="invalid plugin name"):
        write_plugin(name, tmp_path)


def test_refuses_existing_folder(tmp_path, capsys):
    (tmp_path / "medtl-taken").mkdir()
    assert main(["plugin", "new", "taken", "--dir", str(tmp_path)]) == EXIT_CONFIG
    assert "exists already" in capsys.readouterr().err
