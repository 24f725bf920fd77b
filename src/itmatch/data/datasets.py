"""Torch datasets over a split, read through the named-input readers of `itmatch.data.inputs`:
caption-image pairs for training, and images and captions separately for evaluation (each image
is encoded once, not once per caption).

Captions are tokenised lazily in the workers and need not be sorted by length: the text encoders
pack variable-length batches themselves.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from itmatch.data.inputs import Reader, Readers


class ImageDataset(Dataset):
    """One item per image: its named inputs and its "image_index"."""

    def __init__(self, split, readers: dict[str, Reader]):
        self.split, self.readers = split, readers

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, image: int) -> dict:
        return {name: read(image) for name, read in self.readers.items()} | {"image_index": image}


class CaptionDataset(Dataset):
    """One item per caption: its named inputs and its "caption_index"."""

    def __init__(self, split, readers: dict[str, Reader]):
        self.split, self.readers = split, readers

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, caption: int) -> dict:
        return {name: read(caption) for name, read in self.readers.items()} | {"caption_index": caption}


class PairDataset(Dataset):
    """One item per caption, with its image's inputs: what a training batch is made of. The
    "image_index" of each caption is the identity label losses read."""

    def __init__(self, split, readers: Readers):
        self.images, self.captions = ImageDataset(split, readers.image), CaptionDataset(split, readers.text)
        self.split = split

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, caption: int) -> dict:
        return self.images[int(self.split.image_of_caption(caption))] | self.captions[caption]


def collate(items: list[dict]) -> dict:
    """Stacks tensors of equal shapes; pads variable-length ones with 0 along their first axis and
    records the lengths ("lengths" for "tokens", "{name}_lengths" for others); numbers become a
    tensor."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if not torch.is_tensor(values[0]):
            batch[key] = torch.tensor(values)
        elif all(v.shape == values[0].shape for v in values) and key != "tokens":
            batch[key] = torch.stack(values)
        else:
            batch["lengths" if key == "tokens" else f"{key}_lengths"] = torch.tensor([len(v) for v in values])
            batch[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True)
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
