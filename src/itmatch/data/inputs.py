"""Named inputs: what a model reads, provided by the data layer by name.

A model declares its inputs (`Matcher.inputs()`: image side, text side, and options per input such
as the region graph's neighbours per direction). For each name, a provider registered here turns a
split into a reader of one item; `collate` stacks items into a batch and pads what needs it. A new
method that reads something new registers a provider for it (`@image_input("name")`) in its own
module: no data code changes, and the data layer never asks which model it serves.

Names provided here:
- image side: "features" (region features, precomp), "pixels" (raw images, through the model's
  backbone transform), "region_graph" (the directional graph, see `region_graph.py`), "boxes"
  (R x 4, pixels), "image_size" ((w, h));
- text side: "tokens" (token ids, padded in the batch, with "lengths");
- labels, in every training batch: "image_index" (the image of each caption, an identity label).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from itmatch.data.raw import PixelTransform
from itmatch.data.sources import check_image_input
from itmatch.errors import ConfigError, InputError

# name -> provider(split, **options) -> reader(item index) -> tensor; text providers also get the
# model's tokenizer.
Reader = Callable[[int], Tensor]
_IMAGE_PROVIDERS: dict[str, Callable[..., Reader]] = {}
_TEXT_PROVIDERS: dict[str, Callable[..., Reader]] = {}


@dataclass(frozen=True)
class Inputs:
    """What a model reads: image-side and text-side names, and options per name (keyword
    arguments of the provider, e.g. {"region_graph": {"per_direction": 1, "self_loops": True}})."""

    image: tuple[str, ...] = ("features",)
    text: tuple[str, ...] = ("tokens",)
    options: dict[str, dict] = field(default_factory=dict)


def image_input(name: str):
    """Registers `provider(split, **options) -> reader(image) -> tensor` for image input `name`."""
    return _registrar(_IMAGE_PROVIDERS, name)


def text_input(name: str):
    """Registers `provider(split, tokenizer, **options) -> reader(caption) -> tensor` for text
    input `name`; readers may return tensors of different lengths (collate pads them)."""
    return _registrar(_TEXT_PROVIDERS, name)


def _registrar(providers: dict, name: str):
    def register(provider):
        providers[name] = provider
        return provider

    return register


@dataclass
class Readers:
    """How a model reads one split: a reader per image input and per text input."""

    image: dict[str, Reader]
    text: dict[str, Reader]


def readers_for(model, split, augment=None) -> Readers:
    """The readers of every input `model` declares, on `split`: raw images through the model's
    backbone transform (with `augment`, an AugmentConfig, for training), else its image inputs."""
    check_image_input(split, model)
    inputs = model.inputs()
    if model.backbone is not None:
        image = {"pixels": pixel_reader(split, model.backbone.config.image_size, augment)}
    else:
        image = _readers(_IMAGE_PROVIDERS, "image", inputs.image, inputs, split)
    return Readers(image, text_readers(model, split))


def text_readers(model, split) -> dict[str, Reader]:
    """The readers of the text inputs `model` declares, on `split`'s captions."""
    inputs = model.inputs()
    return _readers(_TEXT_PROVIDERS, "text", inputs.text, inputs, split, model.tokenizer)


def pixel_reader(split, image_size: int, augment=None) -> Reader:
    """The pixels of a raw-image split's images at `image_size` (augmented when training)."""
    transform = PixelTransform(image_size, augment)
    return lambda image: transform(split.image_paths[image])


def _readers(providers: dict, side: str, names: tuple[str, ...], inputs: Inputs, split, *extra) -> dict[str, Reader]:
    readers = {}
    for name in names:
        if name not in providers:
            raise ConfigError(f"no data provider for {side} input {name!r}; known: {', '.join(sorted(providers))}")
        readers[name] = providers[name](split, *extra, **inputs.options.get(name, {}))
    return readers


@text_input("tokens")
def _tokens(split, tokenizer) -> Reader:
    return lambda caption: torch.tensor(tokenizer.encode(split.captions[caption]))


def _needs_precomp(split, name: str) -> None:
    if not hasattr(split, "features"):
        raise InputError(f"{split.data_dir} holds raw images: input {name!r} needs a precomp folder")


@image_input("features")
def _features(split) -> Reader:
    _needs_precomp(split, "features")

    def read(image: int) -> Tensor:
        split.check_finite(image)
        return torch.from_numpy(np.array(split.features[image], dtype=np.float32))

    return read


@image_input("region_graph")
def _region_graph(split, per_direction: int = 1, self_loops: bool = True) -> Reader:
    from itmatch.data.region_graph import split_region_graph

    _needs_precomp(split, "region_graph")
    graph = split_region_graph(split, per_direction, self_loops)
    return lambda image: torch.from_numpy(np.array(graph[image], dtype=np.float32))


@image_input("boxes")
def _boxes(split) -> Reader:
    _needs_precomp(split, "boxes")
    boxes = split.boxes
    return lambda image: torch.from_numpy(np.array(boxes[image], dtype=np.float32))


@image_input("image_size")
def _image_size(split) -> Reader:
    _needs_precomp(split, "image_size")
    sizes = split.image_sizes
    return lambda image: torch.from_numpy(np.array(sizes[image], dtype=np.float32))


def derived_image_inputs(names: list[str], inputs: Inputs, features: Tensor, boxes, image_sizes) -> dict[str, Tensor]:
    """Image inputs computed from `boxes` (n, R, 4) and `image_sizes` (n, 2) (w, h) for region
    features (n, R, D), outside any split: "boxes", "image_size" and "region_graph"."""
    if not names:
        return {}
    unknown = [name for name in names if name not in _FROM_BOXES]
    if unknown:
        raise InputError(f"the model reads {', '.join(unknown)}: pass them by name")
    if boxes is None or image_sizes is None:
        raise InputError(f"the model reads {', '.join(names)}: pass them by name, or boxes and image_sizes")
    boxes = np.asarray(torch.as_tensor(boxes).cpu(), dtype=np.float32)
    sizes = np.asarray(torch.as_tensor(image_sizes).cpu())
    if boxes.shape != (*features.shape[:2], 4) or sizes.shape != (features.shape[0], 2):
        raise InputError(
            f"boxes must be (n_images, n_regions, 4) and image_sizes (n_images, 2) for features "
            f"of shape {tuple(features.shape)}; got {boxes.shape} and {sizes.shape}"
        )
    return {name: _FROM_BOXES[name](boxes, sizes, **inputs.options.get(name, {})) for name in names}


def _graph_from_boxes(boxes: np.ndarray, sizes: np.ndarray, per_direction: int = 1, self_loops: bool = True) -> Tensor:
    from itmatch.data.region_graph import directional_adjacency

    return torch.from_numpy(directional_adjacency(boxes, sizes, per_direction, self_loops))


_FROM_BOXES = {
    "boxes": lambda boxes, sizes: torch.from_numpy(boxes),
    "image_size": lambda boxes, sizes: torch.from_numpy(sizes.astype(np.float32)),
    "region_graph": _graph_from_boxes,
}
