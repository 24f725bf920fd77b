"""Loading checkpoints that are not itmatch's says what they are and what to do."""

from __future__ import annotations

import argparse

import pytest
import torch

from itmatch.checkpoint import load_checkpoint
from itmatch.errors import CheckpointError


@pytest.mark.parametrize("parts, family", [(2, "scan"), (3, "sgraf"), (5, "cmcan")])
def test_official_checkpoints_name_their_converter(tmp_path, parts, family):
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "model": [{"w": torch.zeros(1)}] * parts, "opt": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError, match=f"official {family} .*itmatch convert official-{family}"):
        load_checkpoint(path)


def test_a_plain_state_dict_is_not_mistaken_for_an_official_checkpoint(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="not an itmatch checkpoint"):
        load_checkpoint(tmp_path / "weights.pt")
