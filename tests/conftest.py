from __future__ import annotations

import os
from pathlib import Path

import torch

# ../shared beside the project root (CI has it there too); ITMATCH_SHARED overrides.
SHARED = Path(os.environ.get("ITMATCH_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))

# Two cores here: keep test timings stable and comparable with the official measurements.
torch.set_num_threads(min(2, os.cpu_count() or 1))
