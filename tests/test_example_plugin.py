"""The example plugin installs as its own distribution and its components run in a study.

The distribution is built and installed with pip into a throwaway folder, which goes
on PYTHONPATH for `python -m medtl` subprocesses only, so the test environment does
not change. pip runs offline and without build isolation, so the test environment
needs setuptools with a bdist_wheel command (setuptools>=70.1, or the wheel package).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "plugins" / "examples" / "medtl-example"
SAMPLE_MANIFEST = REPO / "sample_data" / "manifest.csv"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Install medtl-example into a fresh folder; return its source copy and an environment that imports it."""
    tmp = tmp_path_factory.mktemp("example-plugin")
    # A copy, because pip builds in the source folder and would leave build/ in the repository.
    source = tmp / "source"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"pip could not install {EXAMPLE}:\n{result.stdout}\n{result.stderr}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env.pop("MEDTL_BLOCK_PLUGINS", None)
    return {"env": env, "source": source}


def _medtl(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medtl", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_example_own_tests_pass(installed, tmp_path):
    tests = installed["source"] / "tests"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                            env=installed["env"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_listed_by_medtl_plugins(installed, tmp_path):
    result = _medtl(installed["env"], "plugins", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = {info["name"]: info for info in json.loads(result.stdout)}
    example = listed["example"]
    assert example["status"] == "loaded"
    assert example["distribution"] == "medtl-example"
    assert example["version"] == "0.1.0"
    assert example["components"] == {
        "backbone": ["example-convnet"],
        "pooling": ["example-attention"],
        "strategy": ["example-entropy"],
    }


@pytest.mark.skipif(not SAMPLE_MANIFEST.is_file(), reason="sample_data/manifest.csv is missing")
def test_study_uses_example_components(installed, tmp_path):
    # Eight patients per site, to keep the run short.
    header, *rows = SAMPLE_MANIFEST.read_text().splitlines()
    lines = [header]
    for row in rows:
        path, rest = row.split(",", 1)
        patient = rest.rsplit(",", 1)[1]
        if int(patient[1:]) < 8:
            lines.append(f"{SAMPLE_MANIFEST.parent / path},{rest}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    study = tmp_path / "study.yaml"
    study.write_text(f"""
name: example-plugin
data:
  manifest: {manifest}
  image_size: [32, 32]
  split: {{val: 0.2, test: 0.25}}
sites:
  A: {{role: source}}
  B: {{role: target}}
transforms: {{preset: none}}
model:
  backbone: {{name: example-convnet, options: {{width: 4, depth: 2}}}}
  pooling: {{name: example-attention, options: {{hidden: 8}}}}
strategy: {{name: example-entropy, options: {{weight: 0.5}}}}
train: {{epochs: 1, batch_size: 8, steps_per_epoch: 2, device: cpu}}
plugins: {{strict: true}}
output: {{dir: {tmp_path / "runs"}, name: run}}
""")
    result = _medtl(installed["env"], "run", str(study), cwd=tmp_path)
    assert result.returncode == 0, f"medtl run failed:\n{result.stdout}\n{result.stderr}"
    run_dir = tmp_path / "runs" / "run"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["versions"]["plugins"]["example"] == "medtl-example 0.1.0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]) == {"A", "B"}
    assert "entropy" in metrics["history"][0]
    assert "entropy_weight" in metrics["history"][0]


def test_main_distribution_leaves_example_out():
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    packages = config["options"]["packages"].split()
    assert "find:" not in packages, "packages = find: would pick up plugins/examples"
    assert not [p for p in packages if "example" in p]
