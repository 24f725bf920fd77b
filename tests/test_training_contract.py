"""The trainer's side of the contract: P x K batches, and a model's adversary trained by a second
optimizer in alternation with the rest."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from itmatch.config import TrainConfig, build_run_config
from itmatch.data.synthetic import make_synthetic
from itmatch.errors import ConfigError
from itmatch.models.registry import register
from itmatch.models.vsepp import VSEPP
from itmatch.training import grouped_caption_order, train


def test_grouped_caption_order_gives_k_captions_of_each_image():
    split = SimpleNamespace(n_images=6, n_captions=30, image_of_caption=lambda k: k // 5)
    order = grouped_caption_order(split, 2, torch.Generator().manual_seed(0))
    groups = np.array(order).reshape(-1, 2) // 5
    assert len(order) == 12 and len(set(order)) == 12
    assert (groups[:, 0] == groups[:, 1]).all() and sorted(groups[:, 0]) == list(range(6))


def test_batch_size_must_hold_whole_groups():
    with pytest.raises(ConfigError, match="multiple of train.captions_per_image"):
        TrainConfig(batch_size=10, captions_per_image=3)


@register
class WithAdversary(VSEPP):
    """VSE++ with a modality discriminator that the encoders are trained to fool."""

    architecture = "vsepp_with_adversary"

    def __init__(self, config):
        super().__init__(config)
        self.discriminator = nn.Linear(config.embed_size, 1)

    def adversary_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def _modality_logits(self, batch) -> tuple[Tensor, Tensor]:
        images, texts = self.encode_image_batch(batch)["vector"], self.encode_text_batch(batch)["vector"]
        return self.discriminator(images), self.discriminator(texts)

    def training_losses(self, batch, context) -> dict[str, Tensor]:
        image_logits, text_logits = self._modality_logits(batch)
        fool = nn.functional.softplus(image_logits).mean() + nn.functional.softplus(-text_logits).mean()
        return super().training_losses(batch, context) | {"fool": 0.1 * fool}

    def adversary_losses(self, batch, context) -> dict[str, Tensor]:
        image_logits, text_logits = self._modality_logits(batch)
        return {
            "discriminator": nn.functional.softplus(-image_logits).mean() + nn.functional.softplus(text_logits).mean()
        }


def test_the_adversary_trains_with_its_own_optimizer(tmp_path):
    data = tmp_path / "data"
    make_synthetic(data, {"train": 60, "dev": 10, "test": 10}, seed=1)
    overrides = {"model": {"embed_size": 16, "text": {"word_dim": 16}}, "train": {"epochs": 1, "batch_size": 10}}
    config = build_run_config("vsepp", overrides)
    config = build_run_config(config.to_dict() | {"architecture": "vsepp_with_adversary"})
    train(config, data, tmp_path / "run", progress=False, log=lambda *_: None)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    record = saved["state"]["history"][0]
    assert {"triplet", "fool", "discriminator"} <= set(record)
    assert record["loss"] == pytest.approx(record["triplet"] + record["fool"], rel=1e-6)
    # the second optimizer holds the discriminator's state, the first never steps it
    assert len(saved["adversary_optimizer"]["state"]) == 2
    main_params = len(saved["optimizer"]["param_groups"][0]["params"])
    assert main_params == sum(1 for name in saved["model"] if not name.startswith("discriminator"))
