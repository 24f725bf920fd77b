"""Image backbones: pixels (n, 3, S, S) -> grid region features (n, R, F), one region per cell of
the last feature map, with the cells' pixel boxes.

`resnet18` ... `resnet152` are torchvision's ResNets (v1.5: the stride sits in the 3x3 conv of a
bottleneck) with its parameter names, so that torchvision-format state dicts load from a local
file; `itmatch extract` runs them frozen. `convnet` is a small residual network trained from
scratch inside `itmatch train` on raw images (no pretrained weights are needed). A model with a
backbone keeps it as `model.backbone`, saved in its checkpoints like any other part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from itmatch.errors import DataError
from itmatch.safe_pickle import load_error

# torchvision's ImageNet normalisation, part of its weights' contract: backbones take uint8 or
# [0, 1] pixels and normalise them themselves.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    """Training-time augmentation of raw images (evaluation squashes the whole image to S x S)."""

    # Random resized crop: the crop keeps at least this fraction of the image area (1.0: none).
    min_crop_area: float = 0.5
    # The crop's aspect ratio lies within [1 / max_aspect, max_aspect] (torchvision's 3/4..4/3).
    max_aspect: float = 4 / 3
    flip: bool = True


@dataclass
class BackboneConfig:
    """The image encoder of end-to-end training on raw images (RunConfig.backbone)."""

    name: Literal["convnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "convnet"
    # Images are resized to image_size x image_size pixels; the grid is image_size / 16 (convnet
    # with 3 stages) or image_size / 32 (ResNets) cells on a side.
    image_size: int = 112
    # convnet only: channels after the stem, doubled by each of `stages` stride-2 residual stages.
    width: int = 32
    stages: int = 3
    # A torchvision-format state dict for a ResNet, loaded when training starts (None: random).
    weights: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, channels * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv1x1(in_channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = conv1x1(channels, channels * self.expansion)
        self.bn3 = nn.BatchNorm2d(channels * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, channels * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """torchvision's `downsample`: a strided 1x1 conv and BatchNorm when the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class GridBackbone(nn.Module):
    """Normalises pixels, runs `trunk`, and returns each cell of its last feature map as a region."""

    def __init__(self, config: BackboneConfig, feature_dim: int, halvings: int):
        super().__init__()
        self.config = config
        self.feature_dim = feature_dim
        self.grid_size = config.image_size
        for _ in range(halvings):  # each stride-2 layer (kernel 3, padding 1 or 7 / 3) rounds up
            self.grid_size = (self.grid_size + 1) // 2
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def n_regions(self) -> int:
        return self.grid_size**2

    def trunk(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, pixels: Tensor) -> Tensor:
        """(n, 3, S, S) uint8 or [0, 1] float pixels -> (n, R, F) region features, row by row."""
        pixels = pixels.to(self.mean.device)
        scale = 255.0 if pixels.dtype == torch.uint8 else 1.0
        x = (pixels.float() / scale - self.mean) / self.std
        return self.trunk(x).flatten(2).transpose(1, 2)

    def grid_boxes(self, width: float | None = None, height: float | None = None) -> Tensor:
        """(R, 4) x1, y1, x2, y2 of the grid cells, in an image of width x height pixels (default:
        the input size), in the order of the regions."""
        width = width or self.config.image_size
        height = height or self.config.image_size
        edges = torch.linspace(0, 1, self.grid_size + 1)
        y1, x1 = torch.meshgrid(edges[:-1], edges[:-1], indexing="ij")
        y2, x2 = torch.meshgrid(edges[1:], edges[1:], indexing="ij")
        return torch.stack([x1 * width, y1 * height, x2 * width, y2 * height], -1).reshape(-1, 4)


class ResNet(GridBackbone):
    """torchvision's ResNet trunk (conv1 ... layer4) with its parameter names; `fc` is not kept."""

    def __init__(self, config: BackboneConfig, block: type[nn.Module], layers: tuple[int, ...]):
        super().__init__(config, feature_dim=512 * block.expansion, halvings=5)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        channels = 64
        for index, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            stride = 1 if index == 0 else 2
            stage = [block(channels, width, stride)]
            channels = width * block.expansion
            stage += [block(channels, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
        _init_like_torchvision(self)

    def trunk(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ConvNet(GridBackbone):
    """A small residual network for training from scratch: a stride-2 3x3 stem, then `stages`
    stride-2 BasicBlocks doubling the channels."""

    def __init__(self, config: BackboneConfig):
        super().__init__(config, feature_dim=config.width * 2**config.stages, halvings=config.stages + 1)
        self.stem = nn.Sequential(conv3x3(3, config.width, 2), nn.BatchNorm2d(config.width), nn.ReLU(inplace=True))
        widths = [config.width * 2**stage for stage in range(config.stages + 1)]
        self.stages = nn.Sequential(*(BasicBlock(a, b, 2) for a, b in pairwise(widths)))
        _init_like_torchvision(self)

    def trunk(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))


def _init_like_torchvision(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


RESNET_LAYOUTS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def build_backbone(config: BackboneConfig) -> GridBackbone:
    """The untrained backbone of a config (pretrained weights are loaded by `load_weights`)."""
    if config.name == "convnet":
        return ConvNet(config)
    return ResNet(config, *RESNET_LAYOUTS[config.name])


def load_weights(backbone: GridBackbone, path: str | Path) -> None:
    """Loads a torchvision-format ResNet state dict (its `fc.*` is ignored), checking every name
    and shape; a file of another ResNet depth is named as such."""
    path = Path(path)
    if not isinstance(backbone, ResNet):
        raise DataError(path, f"pretrained weights load into ResNets only, not {backbone.config.name}")
    state = _read_state_dict(path)
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    expected = backbone.state_dict()
    # Older torchvision files predate BatchNorm's num_batches_tracked counter.
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [key for key in state if key in expected and state[key].shape != expected[key].shape]
    if missing or unexpected or wrong_shape:
        raise DataError(path, _mismatch(backbone.config.name, state, missing, unexpected, wrong_shape, expected))
    backbone.load_state_dict(state, strict=False)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign or damaged files
        raise DataError(path, f"not a readable PyTorch state dict ({load_error(error)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(state, dict) or not all(torch.is_tensor(value) for value in state.values()):
        raise DataError(path, "does not hold a state dict (a mapping of parameter names to tensors)")
    return {key.removeprefix("module."): value for key, value in state.items()}  # DataParallel saves


def _mismatch(name: str, state: dict, missing: list, unexpected: list, wrong_shape: list, expected: dict) -> str:
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameters missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown parameters (e.g. {unexpected[0]})")
    if wrong_shape:
        key = wrong_shape[0]
        problems.append(f"{key} has shape {tuple(state[key].shape)}, {name} needs {tuple(expected[key].shape)}")
    guess = _guess_resnet(state)
    hint = f"; the file looks like {guess} weights" if guess and guess != name else ""
    return f"not torchvision {name} weights: {', '.join(problems)}{hint}"


def _guess_resnet(state: dict) -> str | None:
    """The torchvision ResNet whose layout the names of `state` have, if any."""
    bottleneck = "layer1.0.conv3.weight" in state
    blocks = tuple(len({key.split(".")[1] for key in state if key.startswith(f"layer{i}.")}) for i in range(1, 5))
    for name, (block, layers) in RESNET_LAYOUTS.items():
        if layers == blocks and (block is Bottleneck) == bottleneck:
            return name
    return None
