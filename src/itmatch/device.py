"""Device choice: CUDA when present, else CPU; nothing else in the package names a device."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """This process's GPU (torchrun's LOCAL_RANK picks one per process), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
