from __future__ import annotations

import os
from pathlib import Path

import torch

# ../shared beside the project root (CI has it there too); ITMATCH_SHARED overrides.
SHARED = Path(os.environ.get("ITMATCH_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))

# precision="auto" picks bf16 on some CPUs and fp32 on others: the suite pins it to fp32 so that its
# results do not depend on the machine (test_precision.py tests "auto" itself).
os.environ.setdefault("ITMATCH_PRECISION", "fp32")

# Two cores here: keep test timings stable and comparable with the official measurements.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for running `python -m itmatch.cli` from the source tree."""
    source = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
