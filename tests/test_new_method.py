"""The contract from the outside: a toy method defined here, with an input of its own and a loss
term of its own, registered from this file, then trained, evaluated, indexed and searched through
the CLI. Nothing in the library knows it (the "Adding a method" section of the README does the same).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from itmatch.cli import main
from itmatch.config import register_preset
from itmatch.data.inputs import Inputs, image_input
from itmatch.models.base import EmbeddingMatcher, Encoded
from itmatch.models.layers import l2norm
from itmatch.models.registry import register
from itmatch.models.text import TextConfig, build_text_encoder

SEEN_BATCHES: list[dict] = []


@image_input("region_norms")
def region_norms(split):
    """The new input: the length of each region's feature vector."""
    return lambda image: torch.from_numpy(np.linalg.norm(np.asarray(split.features[image], np.float32), axis=-1))


@dataclass
class ToyConfig:
    img_dim: int = 16
    vocab_size: int = 100
    embed_size: int = 32
    text: TextConfig = field(default_factory=lambda: TextConfig(word_dim=16))


@register
class ToyMatcher(EmbeddingMatcher):
    """Regions weighted by their norm, a GRU for words, and a loss term keeping vectors spread."""

    architecture = "toy_norm_weighted"
    config_class = ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.image_proj = nn.Linear(config.img_dim, config.embed_size)
        self.text_encoder = build_text_encoder(config.text, config.vocab_size, config.embed_size)

    def inputs(self) -> Inputs:
        return Inputs(image=("features", "region_norms"))

    def encode_images(self, features: Tensor, region_norms: Tensor) -> Encoded:
        features = self._check_features(features, self.config.img_dim, None)
        weights = torch.softmax(region_norms.to(features.device), dim=1)
        return Encoded({"vector": l2norm((self.image_proj(features) * weights[..., None]).sum(1))})

    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        tokens, lengths = self._check_tokens(tokens, lengths)
        words, mask, last = self.text_encoder(tokens, lengths)
        return Encoded({"vector": l2norm(last)})

    def training_losses(self, batch, context) -> dict[str, Tensor]:
        SEEN_BATCHES.append({key: tuple(value.shape) for key, value in batch.items()})
        terms = super().training_losses(batch, context)
        images = self.encode_image_batch(batch)["vector"]
        return terms | {"spread": images.mean(0).pow(2).sum()}


register_preset(
    "toy-norm-weighted",
    {
        "architecture": "toy_norm_weighted",
        "description": "a method defined in a test",
        "train": {"learning_rate": 0.004, "lr_decay_epochs": 100},
        "loss": {"negatives": "sum", "weights": {"spread": [[0, 0.0], [1, 0.5]]}},
    },
)


def itmatch(command: str) -> int:
    return main(command.split())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data, run = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("run")
    assert itmatch(f"make-synthetic {data} --train 300 --dev 20 --test 50 --regions 8 --feature-dim 16 --seed 3") == 0
    SEEN_BATCHES.clear()
    assert itmatch(f"train --model toy-norm-weighted --data {data} --out {run} --epochs 4 --batch-size 25 --quiet") == 0
    return data, run


def test_the_toy_method_trains_with_its_input_and_its_loss_term(trained):
    data, run = trained
    assert SEEN_BATCHES and SEEN_BATCHES[0]["region_norms"] == (25, 8)
    history = torch.load(run / "last.pt", weights_only=True)["state"]["history"]
    assert all({"loss", "triplet", "spread"} <= set(record) for record in history)
    # the weight schedule: no spread term in the first epoch, half of it after
    first, last = history[0], history[-1]
    assert first["loss"] == pytest.approx(first["triplet"], rel=1e-6)
    assert last["loss"] == pytest.approx(last["triplet"] + 0.5 * last["spread"], rel=1e-6)


def test_the_toy_method_evaluates_well_above_chance(trained, tmp_path):
    data, run = trained
    assert itmatch(f"evaluate {run / 'best.pt'} --data {data} --json {tmp_path / 'm.json'} --quiet") == 0
    result = json.loads((tmp_path / "m.json").read_text())
    # chance on 50 images: R@1, R@5, R@10 = 2, 10, 20% each way, an rSum of 64
    assert result["rsum"] > 2 * 64


def test_the_toy_method_indexes_and_searches(trained, tmp_path, capsys):
    data, run = trained
    index = tmp_path / "index"
    assert itmatch(f"index {run / 'best.pt'} --data {data} --out {index} --quiet") == 0
    capsys.readouterr()
    caption = (data / "test_caps.txt").read_text().splitlines()[0]
    assert main(["search", str(index), caption, "-k", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    scores = [r["score"] for r in results]
    assert len(results) == 5 and scores == sorted(scores, reverse=True)
    assert all(0 <= r["image"] < 50 for r in results)
