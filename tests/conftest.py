"""Shared fixtures for medtl's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_STUDY = REPO / "sample_data" / "study.yaml"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _fresh_host():
    """Give every test a fresh process-wide plugin host."""
    import medtl

    previous = medtl.set_host(None)
    yield
    medtl.set_host(previous)
