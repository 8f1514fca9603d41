"""Helpers shared by the engine benchmarks: machine description, medians, tables."""

from __future__ import annotations

import os
import platform
import statistics
from typing import Any


def machine() -> dict[str, Any]:
    """Describe the machine and the library versions behind a measurement."""
    import monai
    import numpy
    import torch

    import medtl

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_1min": load,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "medtl": medtl.__version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_machine(info: dict[str, Any]) -> None:
    gpu = info["cuda"] or "none"
    print(f"machine: {info['cpu']}, {info['cores']} cores (1-min load {info['load_1min']}), GPU {gpu}; "
          f"torch {info['torch']}, MONAI {info['monai']}, numpy {info['numpy']}, Python {info['python']}")
