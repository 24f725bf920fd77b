"""Torch datasets over a precomp split (or a raw-image split, read through a PixelTransform):
caption-image pairs for training, and images and captions separately for evaluation (each image
is encoded once, not once per caption).

Captions are tokenised lazily in the workers and need not be sorted by length: the text encoders
pack variable-length batches themselves.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from itmatch.data.precomp import PrecompSplit
from itmatch.data.raw import PixelTransform, RawImageSplit
from itmatch.data.sources import check_image_input
from itmatch.data.vocab import Vocabulary


class PairDataset(Dataset):
    """One item per caption, with its image: what a training batch is made of."""

    def __init__(
        self,
        split: PrecompSplit | RawImageSplit,
        vocab: Vocabulary,
        adjacency: np.ndarray | None = None,
        pixels: PixelTransform | None = None,
    ):
        self.split, self.vocab, self.adjacency, self.pixels = split, vocab, adjacency, pixels

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, caption: int) -> dict:
        image = int(self.split.image_of_caption(caption))
        return {
            **image_item(self.split, image, self.adjacency, self.pixels),
            **caption_item(self.split, self.vocab, caption),
        }


class ImageDataset(Dataset):
    def __init__(
        self,
        split: PrecompSplit | RawImageSplit,
        adjacency: np.ndarray | None = None,
        pixels: PixelTransform | None = None,
    ):
        self.split, self.adjacency, self.pixels = split, adjacency, pixels

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, image: int) -> dict:
        return image_item(self.split, image, self.adjacency, self.pixels)


class CaptionDataset(Dataset):
    def __init__(self, split: PrecompSplit, vocab: Vocabulary):
        self.split, self.vocab = split, vocab

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, caption: int) -> dict:
        return caption_item(self.split, self.vocab, caption)


def image_item(
    split: PrecompSplit | RawImageSplit, image: int, adjacency: np.ndarray | None, pixels: PixelTransform | None = None
) -> dict:
    """Region features (and graph rows) of a precomp split, or the pixels of a raw image."""
    if pixels is not None:
        return {"pixels": pixels(split.image_paths[image]), "image_index": image}
    split.check_finite(image)
    item = {"features": torch.from_numpy(np.array(split.features[image], dtype=np.float32)), "image_index": image}
    if adjacency is not None:
        item["adjacency"] = torch.from_numpy(np.array(adjacency[image], dtype=np.float32))
    return item


def caption_item(split: PrecompSplit, vocab: Vocabulary, caption: int) -> dict:
    return {"tokens": torch.tensor(vocab.encode(split.captions[caption])), "caption_index": caption}


def image_reading(model, split: PrecompSplit | RawImageSplit, augment=None) -> dict:
    """How `model` reads the split's images, as dataset arguments: raw images through a
    PixelTransform to its backbone's input size (with `augment`, an AugmentConfig, for training),
    or region features with the region graph the model needs."""
    check_image_input(split, model)
    if model.backbone is not None:
        return {"pixels": PixelTransform(model.backbone.config.image_size, augment)}
    return {"adjacency": split.adjacency(*model.adjacency_spec()) if model.needs_adjacency else None}


def image_input(batch: dict) -> torch.Tensor:
    """A batch's images as the model takes them: pixels of raw images, else region features."""
    return batch["pixels"] if "pixels" in batch else batch["features"]


def collate(items: list[dict]) -> dict:
    """Stacks features/adjacency, pads token ids with 0 (<pad>) and records lengths."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "tokens":
            batch["lengths"] = torch.tensor([len(v) for v in values])
            batch["tokens"] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True)
        elif torch.is_tensor(values[0]):
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.tensor(values)
    return batch


def make_loader(dataset: Dataset, batch_size: int, workers: int = 0, **options) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        **options,
    )
