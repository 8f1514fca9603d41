"""DistributedDataParallel on CPU: 2 gloo processes against one process with the same global batch."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from _engine_helpers import PYTHON, subprocess_env, tiny_study_dict, write_two_site_study
from _gather_worker import gather_worker
from _strategy_ddp_worker import build_strategy, global_batch, step, strategy_step_worker
from medtl.config import study_from_dict
from medtl.engine import run_study

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")

# Both runs see the same samples and augmentations per global batch; only the order
# of floating-point sums differs (an all-reduce of two half-batch gradients against
# one full-batch gradient), so losses and probabilities agree to about 1e-6.
TOLERANCE = 1e-4


def _study_dict(manifest: Path, output_dir: Path) -> dict:
    raw = tiny_study_dict(manifest, output_dir, epochs=2)
    # Dropout and mixup draw per process, so they differ between 1 and 2 processes.
    raw["model"]["head"]["dropout"] = 0.0
    raw["strategy"]["options"] = {}
    return raw


def _probabilities(run_dir: Path) -> dict[tuple[str, str], list[float]]:
    with (run_dir / "predictions.csv").open() as fh:
        return {(r["split"], r["row"]): [float(v) for k, v in r.items() if k.startswith("prob_")]
                for r in csv.DictReader(fh)}


def test_two_processes_match_one(tmp_path):
    manifest = write_two_site_study(tmp_path / "data")
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(_study_dict(manifest, tmp_path / "ddp")))
    ddp = subprocess.run([PYTHON, "-m", "medtl", "run", "--nproc", "2", str(study_file)], cwd=tmp_path,
                         env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert ddp.stdout.count("run folder:") == 1, "only rank 0 prints the result"
    runs = [p.name for p in (tmp_path / "ddp").iterdir() if p.name != "cache"]
    assert runs == ["run"], "only rank 0 creates a run folder"

    single = run_study(study_from_dict(_study_dict(manifest, tmp_path / "single"), base_dir=manifest.parent))

    ddp_dir = tmp_path / "ddp" / "run"
    assert json.loads((ddp_dir / "run.json").read_text())["world_size"] == 2
    ddp_metrics = json.loads((ddp_dir / "metrics.json").read_text())
    assert len(ddp_metrics["history"]) == len(single.metrics["history"])
    for ddp_epoch, single_epoch in zip(ddp_metrics["history"], single.metrics["history"]):
        assert ddp_epoch["loss"] == pytest.approx(single_epoch["loss"], abs=TOLERANCE)
        assert ddp_epoch["val_loss"] == pytest.approx(single_epoch["val_loss"], abs=TOLERANCE)

    # Evaluation covers every test image exactly once: no padded duplicates.
    for site, values in single.metrics["test"].items():
        assert ddp_metrics["test"][site]["n"] == values["n"], site
    ddp_probs, single_probs = _probabilities(ddp_dir), _probabilities(single.run_dir)
    assert sorted(ddp_probs) == sorted(single_probs)
    for key, probs in single_probs.items():
        assert ddp_probs[key] == pytest.approx(probs, abs=TOLERANCE), key

    checkpoint = torch.load(ddp_dir / "checkpoints" / "best.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in checkpoint["model"])
    assert len(checkpoint["rng"]) == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_all_gather_with_grad_sums_gradients(tmp_path):
    torch.multiprocessing.spawn(gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((3, 3), 2.0)])
    for result in results:
        assert torch.equal(result["gathered"], expected)
    # Rank r's loss weights the gathered rows by arange * (r + 1); the gradient that
    # reaches a row is the sum over both ranks' losses: arange * 3.
    summed = torch.arange(15, dtype=torch.float32).reshape(5, 3) * 3
    assert torch.equal(results[0]["grad"], summed[:2])
    assert torch.equal(results[1]["grad"], summed[2:])


def test_all_gather_with_grad_single_process_is_identity():
    from medtl.distributed import all_gather_with_grad

    tensor = torch.randn(4, 2, requires_grad=True)
    assert all_gather_with_grad(tensor) is tensor


@pytest.mark.parametrize("name", ["dann", "contrastive"])
def test_ddp_strategy_step_matches_single(tmp_path, name):
    """DANN's discriminator and the contrastive losses get the global batch's gradients under DDP."""
    torch.multiprocessing.spawn(strategy_step_worker, args=(2, _free_port(), name, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in range(2)]

    strategy = build_strategy(name)
    source, target = global_batch()
    loss, grads = step(strategy, strategy.network, source, target)

    # Each process's loss averages its own rows (the contrastive terms see the whole
    # gathered batch on every process), so the mean over processes is the global loss.
    assert sum(r["loss"] for r in ranks) / 2 == pytest.approx(loss, abs=1e-5)
    extra = "discriminator" if name == "dann" else "projector"
    assert any(key.startswith(extra) for key in grads), sorted(grads)
    for rank in ranks:
        assert sorted(rank["grads"]) == sorted(grads)
        for key, grad in grads.items():
            assert torch.allclose(rank["grads"][key], grad, atol=1e-5), key
