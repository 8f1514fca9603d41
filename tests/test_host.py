"""The plugin host: registration, failures, blocking, local modules and tracing."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path

import pytest

import medtl
from medtl import PluginHost
from medtl._host import BUILTIN_PLUGINS, get_host, set_host
from medtl.cli import main
from medtl.config import load_study
from medtl.engine import build_host
from medtl.errors import PluginError


@pytest.fixture
def host(monkeypatch):
    """A host with the builtins only, unaffected by installed plugins and the environment."""
    monkeypatch.delenv("MEDTL_BLOCK_PLUGINS", raising=False)
    monkeypatch.delenv("MEDTL_TRACE_HOOKS", raising=False)
    return PluginHost(entry_points=False)


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """Install a distribution "fake-plugins 1.2" with a working and a broken entry point."""
    site = tmp_path / "site"
    info = site / "fake_plugins-1.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugins\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(
        "[medtl]\nbroken = medtl_fake_broken\ngood = medtl_fake_good\n"
    )
    (site / "medtl_fake_broken.py").write_text("raise RuntimeError('the GPU driver is too old')\n")
    (site / "medtl_fake_good.py").write_text(textwrap.dedent("""
        import medtl

        @medtl.hookimpl
        def medtl_register_poolings():
            from medtl_plugins.poolings import AvgPool
            return {"fake-avg": AvgPool}
    """))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("MEDTL_BLOCK_PLUGINS", raising=False)
    yield site
    for name in ("medtl_fake_broken", "medtl_fake_good"):
        sys.modules.pop(name, None)


class PoolingPlugin:
    def __init__(self, *names):
        self.names = names

    @medtl.hookimpl
    def medtl_register_poolings(self):
        from medtl_plugins.poolings import MaxPool

        return {name: MaxPool for name in self.names}


def test_builtins_loaded(host):
    assert set(BUILTIN_PLUGINS) <= {name for name, _ in host.pm.list_name_plugin()}
    assert "resnet18" in host.components("backbone")
    assert host.component_plugin("pooling", "avg") == "medtl_plugins.poolings"


def test_register_and_unregister(host):
    host.register(PoolingPlugin("top"), name="tops")
    assert "top" in host.components("pooling")
    assert host.component_plugin("pooling", "top") == "tops"
    assert host.create("pooling", "top", in_channels=4).out_features == 4
    host.unregister("tops")
    assert "top" not in host.components("pooling")


def test_duplicate_name_names_both_plugins(host):
    host.register(PoolingPlugin("avg"), name="shadow")
    with pytest.raises(PluginError) as info:
        host.components("pooling")
    message = str(info.value)
    assert "'medtl_plugins.poolings'" in message
    assert "'shadow'" in message
    assert "MEDTL_BLOCK_PLUGINS" in message


def test_unknown_component_suggests_name(host):
    with pytest.raises(medtl.errors.UnknownComponentError, match="Did you mean 'resnet18'"):
        host.create("backbone", "resnet81")


def test_entry_point_distribution_and_version(fake_distribution):
    host = PluginHost()
    assert "fake-avg" in host.components("pooling")
    info = {i["name"]: i for i in host.plugin_infos()}
    assert info["good"]["distribution"] == "fake-plugins"
    assert info["good"]["version"] == "1.2"
    assert info["good"]["origin"] == "entry point"
    assert info["good"]["components"] == {"pooling": ["fake-avg"]}
    assert info["good"]["hooks"] == ["medtl_register_poolings"]


def test_broken_entry_point_still_lists_others(fake_distribution, caplog):
    with caplog.at_level(logging.ERROR, logger="medtl"):
        host = PluginHost()
    failures = {f.name: f for f in host.failures}
    assert "the GPU driver is too old" in failures["broken"].error
    assert failures["broken"].distribution == "fake-plugins"
    assert "broken" in caplog.text and "the GPU driver is too old" in caplog.text
    assert "fake-avg" in host.components("pooling")
    info = {i["name"]: i for i in host.plugin_infos()}
    assert info["broken"]["status"] == "failed"
    assert info["good"]["status"] == "loaded"


def test_strict_mode_fails_on_broken_plugin(fake_distribution):
    with pytest.raises(PluginError, match="'broken' .*the GPU driver is too old"):
        PluginHost(strict=True)


def test_block_by_environment(fake_distribution, monkeypatch):
    monkeypatch.setenv("MEDTL_BLOCK_PLUGINS", "broken, medtl_plugins.poolings")
    host = PluginHost()
    assert host.failures == []
    assert host.components("pooling") == ["fake-avg"]


@pytest.fixture
def host_warnings(monkeypatch):
    """Collect the host's warnings on its own logger, because the CLI may stop medtl's from propagating."""
    import medtl._host

    monkeypatch.setattr(medtl._host, "_warned_block_names", set())
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    host_logger = logging.getLogger("medtl._host")
    host_logger.addHandler(handler)
    yield records
    host_logger.removeHandler(handler)


def test_block_typo_warns_with_known_names(fake_distribution, monkeypatch, host_warnings):
    monkeypatch.setenv("MEDTL_BLOCK_PLUGINS", "brokn, broken, medtl_plugins.poolings")
    host = PluginHost()
    messages = [record.getMessage() for record in host_warnings]

    assert host.failures == []
    assert len(messages) == 1
    assert messages[0].startswith("MEDTL_BLOCK_PLUGINS names 'brokn', which matches no known plugin, so it "
                                  "blocks nothing. Did you mean 'broken'? Known plugins: ")
    known = messages[0].split("Known plugins: ", 1)[1].split(". ", 1)[0].split(", ")
    assert {"broken", "good", "medtl_plugins.poolings"} <= set(known)
    assert messages[0].endswith("If it is a third-party plugin that is not installed, nothing needs "
                                "blocking and this warning can be ignored.")


def test_block_typo_warned_once(monkeypatch, host_warnings):
    monkeypatch.setenv("MEDTL_BLOCK_PLUGINS", "medtl_plugins.sourcs")
    PluginHost(entry_points=False)
    PluginHost(entry_points=False, block=["medtl_plugins.sourcs"])
    assert len(host_warnings) == 1
    assert "Did you mean 'medtl_plugins.sources'?" in host_warnings[0].getMessage()


def test_study_block_typo_names_key(tmp_path, monkeypatch, host_warnings):
    monkeypatch.delenv("MEDTL_BLOCK_PLUGINS", raising=False)
    build_host(load_study(_write_study(tmp_path, "plugins: {block: [medtl_plugins.dan]}\n")))
    assert len(host_warnings) == 1
    assert host_warnings[0].getMessage().startswith("plugins.block names 'medtl_plugins.dan'")


def test_block_by_study_file(fake_distribution, tmp_path):
    study = _write_study(tmp_path, "plugins: {block: [broken, good], strict: true}\n")
    host = build_host(load_study(study))
    assert host.failures == []
    assert "fake-avg" not in host.components("pooling")


def test_allow_list(fake_distribution):
    host = PluginHost(allow=["good", "medtl_plugins.backbones"])
    assert host.components("pooling") == ["fake-avg"]
    assert "resnet18" in host.components("backbone")
    assert host.components("strategy") == []
    assert host.failures == []


def test_unknown_hook_rejected_on_register(host):
    class Typo:
        @medtl.hookimpl
        def medtl_register_backbone(self):
            return {}

    with pytest.raises(PluginError, match="medtl_register_backbone"):
        host.register(Typo(), name="typo")
    assert not host.pm.has_plugin("typo")


def test_unknown_hook_rejected_at_load(tmp_path, monkeypatch):
    (tmp_path / "typo_plugin.py").write_text(textwrap.dedent("""
        import medtl

        @medtl.hookimpl
        def medtl_register_pooling():
            return {}
    """))
    try:
        local = PluginHost(entry_points=False, modules=["typo_plugin"], search_path=[tmp_path])
        assert [f.name for f in local.failures] == ["typo_plugin"]
        assert "medtl_register_pooling, which medtl does not define" in local.failures[0].error
        assert not local.pm.has_plugin("typo_plugin")
        assert "avg" in local.components("pooling")
        with pytest.raises(PluginError, match="'typo_plugin'.*medtl_register_pooling"):
            PluginHost(entry_points=False, modules=["typo_plugin"], search_path=[tmp_path], strict=True)
    finally:
        sys.modules.pop("typo_plugin", None)


def test_raising_hook_drops_only_that_plugin(host, caplog):
    class Raises:
        @medtl.hookimpl
        def medtl_register_poolings(self):
            raise KeyError("missing config")

    host.register(Raises(), name="raises")
    with caplog.at_level(logging.ERROR, logger="medtl"):
        assert "avg" in host.components("pooling")
    assert [f.name for f in host.failures] == ["raises"]
    assert "medtl_register_poolings raised KeyError" in host.failures[0].error
    assert not host.pm.has_plugin("raises")


def test_hook_returning_list_is_reported(host):
    class ReturnsList:
        @medtl.hookimpl
        def medtl_register_poolings(self):
            return ["avg2"]

    host.strict = True
    host.register(ReturnsList(), name="lister")
    with pytest.raises(PluginError, match="'lister'.*returned list"):
        host.components("pooling")


def _write_study(folder: Path, extra: str) -> Path:
    study = folder / "study.yaml"
    study.write_text("data: {manifest: manifest.csv}\n" + extra)
    return study


def test_local_module_from_study_folder(tmp_path, host):
    (tmp_path / "my_local_pooling.py").write_text(textwrap.dedent("""
        import medtl
        from medtl_plugins.poolings import AvgPool

        @medtl.hookimpl
        def medtl_register_poolings():
            return {"local-avg": AvgPool}
    """))
    study = load_study(_write_study(tmp_path, "plugins: {modules: [my_local_pooling], strict: true}\n"))
    path_before = list(sys.path)
    try:
        local = build_host(study)
        assert "local-avg" in local.components("pooling")
        assert local.component_plugin("pooling", "local-avg") == "my_local_pooling"
        assert local.origins["my_local_pooling"].kind == "module"
        assert sys.path == path_before
    finally:
        sys.modules.pop("my_local_pooling", None)


def test_local_py_file(tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "strategy_file.py").write_text(textwrap.dedent("""
        import medtl
        from medtl_plugins.finetune import FineTune

        @medtl.hookimpl
        def medtl_register_strategies():
            return {"my-finetune": FineTune}
    """))
    study = load_study(_write_study(tmp_path, "plugins: {modules: [tools/strategy_file.py]}\n"))
    local = build_host(study)
    assert local.failures == []
    assert local.component_plugin("strategy", "my-finetune") == "strategy_file"


def test_missing_local_module_reported(tmp_path):
    study = load_study(_write_study(tmp_path, "plugins: {modules: [no_such_plugin_module, gone.py]}\n"))
    local = build_host(study)
    errors = {f.name: f.error for f in local.failures}
    assert "no module named 'no_such_plugin_module' in the study file's folder" in errors["no_such_plugin_module"]
    assert "gone.py not found" in errors["gone"]
    assert "avg" in local.components("pooling")


def test_trace_logs_hook_calls(monkeypatch, caplog):
    monkeypatch.setenv("MEDTL_TRACE_HOOKS", "1")

    class Tracker:
        @medtl.hookimpl
        def medtl_run_end(self, run, metrics, status):
            pass

    # The builtin trackers also implement the run events; block them so that the
    # traced call reaches only this test's plugin.
    traced = PluginHost(entry_points=False,
                        block=["medtl_plugins.mlflow_tracker", "medtl_plugins.tensorboard_tracker"])
    traced.register(Tracker(), name="tracker")
    with caplog.at_level(logging.INFO, logger="medtl.hooks"):
        traced.components("backbone")
        traced.pm.hook.medtl_run_end(run=None, metrics={}, status="completed")
    lines = [r.getMessage() for r in caplog.records if r.name == "medtl.hooks"]
    assert any(line.startswith("hook medtl_register_backbones on [medtl_plugins.backbones]: ")
               and line.endswith(" ms") for line in lines), lines
    assert any(line.startswith("hook medtl_run_end on [tracker]: ") for line in lines), lines


def test_trace_off_by_default(host, caplog):
    with caplog.at_level(logging.INFO, logger="medtl.hooks"):
        host.components("backbone")
    assert not [r for r in caplog.records if r.name == "medtl.hooks"]


@pytest.fixture
def current_host(fake_distribution):
    previous = set_host(PluginHost())
    yield get_host()
    set_host(previous)


def test_plugins_command_json(current_host, capsys):
    assert main(["plugins", "--json"]) == 0
    listed = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"good", "broken"}
    assert listed["good"]["distribution"] == "fake-plugins"
    assert listed["good"]["version"] == "1.2"


def test_plugins_command_all_text(current_host, capsys):
    assert main(["plugins", "--all"]) == 0
    out = capsys.readouterr().out
    assert "good  (fake-plugins 1.2)" in out
    assert "    pooling: fake-avg" in out
    assert "broken  (fake-plugins 1.2)\n    FAILED: RuntimeError: the GPU driver is too old" in out
    assert "medtl_plugins.backbones  (medtl " in out
    assert "    hooks: medtl_register_backbones" in out


def test_raising_hook_reported_at_start(tmp_path):
    (tmp_path / "raising_plugin.py").write_text(textwrap.dedent("""
        import medtl

        @medtl.hookimpl
        def medtl_register_backbones():
            raise ImportError("timm is not installed")
    """))
    try:
        local = PluginHost(entry_points=False, modules=["raising_plugin"], search_path=[tmp_path])
        assert [f.name for f in local.failures] == ["raising_plugin"]
        assert "timm is not installed" in local.failures[0].error
        with pytest.raises(PluginError, match="'raising_plugin'.*timm is not installed"):
            PluginHost(entry_points=False, modules=["raising_plugin"], search_path=[tmp_path], strict=True)
    finally:
        sys.modules.pop("raising_plugin", None)


def test_invalid_option_value_is_config_error(host):
    from medtl.errors import EXIT_CONFIG, ConfigError

    with pytest.raises(ConfigError) as info:
        host.create("strategy", "finetune", mixup_alpha=-1.0)
    assert info.value.exit_code == EXIT_CONFIG
    assert "strategy 'finetune'" in str(info.value)
    assert "mixup_alpha" in str(info.value)
    assert "strategy.options" in str(info.value)


def test_default_preset_flips_listed_axes(host):
    from types import SimpleNamespace

    from monai.transforms import RandFlipd

    from medtl.errors import ConfigError

    data = SimpleNamespace(spatial_dims=2)
    both = [t for t in host.create("transform", "default", data=data, flip_axes=[0, 1]) if isinstance(t, RandFlipd)]
    assert [t.flipper.spatial_axis for t in both] == [0, 1]
    last = [t for t in host.create("transform", "default", data=data) if isinstance(t, RandFlipd)]
    assert [t.flipper.spatial_axis for t in last] == [1]
    with pytest.raises(ConfigError, match="flip_axes"):
        host.create("transform", "default", data=data, flip_axes=[2])


def test_block_short_name_suggests_module(monkeypatch, host_warnings):
    monkeypatch.setenv("MEDTL_BLOCK_PLUGINS", "dann")
    PluginHost()
    messages = [record.getMessage() for record in host_warnings]
    assert any("names 'dann'" in m and "Did you mean 'medtl_plugins.dann'?" in m for m in messages), messages
