"""``medtl plugin new NAME``: write a minimal plugin distribution to start from.

The package has a setup.cfg that declares the ``medtl`` entry point, one backbone,
a test that runs it through :mod:`medtl.testing`, and a README. Its tests pass right
after creation, with or without installing it, because setup.cfg puts ``src`` on
pytest's ``pythonpath``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from medtl.errors import ConfigError

__all__ = ["register", "plugin_new_command", "write_plugin"]

_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plugin", help="plugin tools: 'medtl plugin new NAME' writes a plugin package",
                                   description="Tools for plugin authors.")
    actions = parser.add_subparsers(dest="plugin_command", metavar="ACTION", required=True)
    new = actions.add_parser(
        "new", help="write a minimal plugin package with one backbone and its conformance test",
        description="Write the folder medtl-NAME with setup.cfg (entry point in the group 'medtl'), "
                    "one backbone, a conformance test and a README. Run 'python -m pytest' inside it "
                    "to check it, and 'pip install -e .' to make medtl find it.",
    )
    new.add_argument("name", help="plugin name: lowercase letters, digits, '-' and '_', starting with a letter")
    new.add_argument("--dir", default=".", help="folder in which medtl-NAME is created (default: current folder)")
    new.set_defaults(func=plugin_new_command)


def plugin_new_command(args: argparse.Namespace) -> int:
    folder = write_plugin(args.name, Path(args.dir))
    print(f"wrote {folder}")
    print(f"next: cd {folder} && python -m pytest && pip install -e . && medtl plugins")
    return 0


def write_plugin(name: str, parent: Path) -> Path:
    """Write the plugin package ``medtl-NAME`` under ``parent`` and return its folder.

    Raises:
        ConfigError: the name is invalid, or the folder exists already.
    """
    short = name.removeprefix("medtl-").removeprefix("medtl_")
    if not _NAME.match(short):
        raise ConfigError(f"invalid plugin name {name!r}: use lowercase letters, digits, '-' and '_', "
                          "starting with a letter, for example 'lung-nets'")
    dist = f"medtl-{short}"
    package = dist.replace("-", "_")
    folder = parent / dist
    if folder.exists():
        raise ConfigError(f"{folder} exists already; choose another name or --dir, or remove the folder")
    fields = {
        "name": short,
        "dist": dist,
        "package": package,
        "component": f"{short}-convnet",
        "cls": "".join(part.capitalize() for part in re.split(r"[-_]", short)) + "Net",
    }
    files = {
        "setup.cfg": _SETUP_CFG,
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"src/{package}/__init__.py": _INIT,
        f"src/{package}/plugin.py": _PLUGIN,
        f"tests/test_{package}.py": _TEST,
    }
    for relative, template in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**fields), encoding="utf-8")
    return folder


_SETUP_CFG = """\
[metadata]
name = {dist}
version = 0.1.0
description = A medtl plugin
long_description = file: README.md
long_description_content_type = text/markdown

[options]
python_requires = >=3.10
package_dir =
    = src
packages = find:
install_requires =
    medtl
    torch

[options.packages.find]
where = src

[options.extras_require]
test =
    pytest

# medtl loads every module named in the entry-point group "medtl".
[options.entry_points]
medtl =
    {name} = {package}.plugin

[tool:pytest]
pythonpath = src
testpaths = tests
"""

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"
"""

_README = """\
# {dist}

A medtl plugin. It adds the backbone `{component}`.

```bash
pip install pytest      # if your environment does not have it yet
python -m pytest        # runs medtl's conformance checks on the backbone
pip install -e .        # registers the entry point, so medtl finds the plugin
medtl plugins           # lists "{name} ({dist} 0.1.0)" with its components
```

Use it in a study file:

```yaml
model:
  backbone: {{name: {component}}}
```

Add components in `src/{package}/plugin.py`; each kind has a hook
(`medtl_register_poolings`, `medtl_register_strategies`, ...). medtl's
docs/plugins.md describes every hook, and `medtl.testing` has a check for each
component kind.
"""

_INIT = '''\
"""{dist}: a medtl plugin."""

__version__ = "0.1.0"
'''

_PLUGIN = '''\
"""Hook implementations of {dist}."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

import medtl


class {cls}(nn.Module):
    """A two-stage ConvNet returning its last feature map, for 2D and 3D images.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        width: channels of the first stage (default 16); the output has twice as many.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, width: int = 16):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.stem = nn.Sequential(conv(in_channels, width, 3, padding=1), norm(width), nn.ReLU())
        self.body = nn.Sequential(conv(width, 2 * width, 3, stride=2, padding=1), norm(2 * width), nn.ReLU())
        #: channels of the feature map, read by medtl to size the pooling
        self.out_channels = 2 * width
        #: stage names in input-to-output order, for strategies that freeze stages
        self.stages = ["stem", "body"]

    def stage_modules(self, stage: str) -> list[nn.Module]:
        return [getattr(self, stage)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x))


@medtl.hookimpl
def medtl_register_backbones() -> dict[str, Callable[..., Any]]:
    return {{"{component}": {cls}}}
'''

_TEST = '''\
"""Conformance of {dist}'s components."""

from medtl.testing import check_backbone

from {package}.plugin import {cls}, medtl_register_backbones


def test_backbone_conforms():
    check_backbone({cls}, options={{"width": 4}}, image_size=16)


def test_backbone_is_registered():
    assert medtl_register_backbones() == {{"{component}": {cls}}}
'''
