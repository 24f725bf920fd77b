"""How a model reads photos that are not in its training data (an index's gallery, a query photo):
pixels through its own backbone, or, for a model trained on `itmatch extract` features, through
the extraction its checkpoint records, made again (same backbone, image size and weights file,
checked by hash), so that the photos' features are those `itmatch extract` would write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset
from tqdm.auto import tqdm

from itmatch.data.datasets import ImageDataset, make_loader
from itmatch.data.inputs import derived_image_inputs, pixel_reader
from itmatch.data.raw import RawImageSplit
from itmatch.evaluation.runner import encode_images
from itmatch.extract import rebuild_extractor
from itmatch.models.backbones import GridBackbone
from itmatch.models.base import Encoded, Matcher


class PhotoReader:
    """Encodes photos for `model`; `record` is its checkpoint's extraction record (`checkpoint`
    names the file in errors) and `weights` the backbone weights file, when not the recorded one."""

    def __init__(
        self, model: Matcher, record: dict | None, checkpoint: Path, weights: str | Path | None = None
    ) -> None:
        self.model = model
        self.extractor: GridBackbone | None = None
        self.record = None  # the extraction made again, with the weights file it read
        if model.backbone is None:
            self.extractor = rebuild_extractor(record, checkpoint, weights).to(model.device)
            self.record = {**record, "weights": str(Path(weights or record["weights"]).resolve())}

    @property
    def network(self) -> GridBackbone:
        """The pixels -> regions network: the extraction's, or the model's own backbone."""
        return self.extractor if self.extractor is not None else self.model.backbone

    def boxes(self, n_images: int) -> Tensor:
        """(n_images, regions, 4) the grid cells as fractions of a photo (photos are squashed whole)."""
        return self.network.grid_boxes(1.0, 1.0)[None].expand(n_images, -1, -1).clone()

    @torch.no_grad()
    def encode(self, split: RawImageSplit, rows: list[int], batch_size: int = 32, progress: bool = True) -> Encoded:
        """The photos `rows` of `split`, encoded in order."""
        if self.extractor is None:
            return encode_images(self.model, split, batch_size, progress=progress, rows=rows)
        photos = ImageDataset(split, {"pixels": pixel_reader(split, self.extractor.config.image_size)})
        encoded = []
        for batch in tqdm(
            make_loader(Subset(photos, rows), batch_size), desc="encode photos", disable=not progress, leave=False
        ):
            features = self.extractor(batch["pixels"].to(self.model.device))
            others = self._grid_inputs(split, batch["image_index"], features)
            encoded.append(self.model.encode_image_batch({"features": features, **others}))
        return Encoded.cat(encoded)

    def _grid_inputs(self, split: RawImageSplit, images: Tensor, features: Tensor) -> dict[str, Tensor]:
        """The other image inputs the model reads (region graph, boxes...) as a precomp folder of the
        same extraction gives them: from the grid cells' boxes in each photo's pixels."""
        inputs = self.model.inputs()
        names = [name for name in inputs.image if name != "features"]
        sizes = split.image_sizes[images.numpy()]
        boxes = np.stack([self.extractor.grid_boxes(width, height).numpy() for width, height in sizes.tolist()])
        return derived_image_inputs(names, inputs, features, boxes, sizes)
