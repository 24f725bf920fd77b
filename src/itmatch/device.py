"""Device choice: CUDA when present, else CPU; nothing else in the package names a device."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
