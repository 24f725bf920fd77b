"""torchvision-format ResNet state dicts made here, from torchvision's architecture (parameter names
and shapes written out independently of itmatch), and a functional ResNet forward pass over such
a state dict to check itmatch's network against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LAYOUTS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def _batchnorm(prefix: str, channels: int) -> dict[str, tuple]:
    names = ("weight", "bias", "running_mean", "running_var")
    return {f"{prefix}.{name}": (channels,) for name in names} | {f"{prefix}.num_batches_tracked": ()}


def torchvision_shapes(name: str) -> dict[str, tuple]:
    """Every parameter and buffer of torchvision's `models.<name>()`, with its shape."""
    kind, layers = LAYOUTS[name]
    expansion = 1 if kind == "basic" else 4
    shapes = {"conv1.weight": (64, 3, 7, 7), **_batchnorm("bn1", 64)}
    inplanes = 64
    for stage, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512), strict=True), start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}."
            if kind == "basic":
                shapes[prefix + "conv1.weight"] = (planes, inplanes, 3, 3)
                shapes[prefix + "conv2.weight"] = (planes, planes, 3, 3)
                norms = {"bn1": planes, "bn2": planes}
            else:
                shapes[prefix + "conv1.weight"] = (planes, inplanes, 1, 1)
                shapes[prefix + "conv2.weight"] = (planes, planes, 3, 3)
                shapes[prefix + "conv3.weight"] = (planes * 4, planes, 1, 1)
                norms = {"bn1": planes, "bn2": planes, "bn3": planes * 4}
            for norm, channels in norms.items():
                shapes |= _batchnorm(prefix + norm, channels)
            if block == 0 and (stage > 1 or inplanes != planes * expansion):
                shapes[prefix + "downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                shapes |= _batchnorm(prefix + "downsample.1", planes * expansion)
            inplanes = planes * expansion
    return shapes | {"fc.weight": (1000, 512 * expansion), "fc.bias": (1000,)}


def torchvision_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in torchvision's format: He-scaled convs, plausible BatchNorm statistics."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in torchvision_shapes(name).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=generator) * (2 / fan_in) ** 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.1 + (1.0 if key.endswith("weight") else 0.0)
    return state


def resnet18_reference(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """torchvision's resnet18 trunk on [0, 1] pixels with ImageNet normalisation: (n, 512, h, w)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def bn(x, prefix):
        return F.batch_norm(
            x,
            state[f"{prefix}.running_mean"],
            state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"],
            state[f"{prefix}.bias"],
            training=False,
            eps=1e-5,
        )

    x = (pixels - mean) / std
    x = F.relu(bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for stage in range(1, 5):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            out = F.relu(bn(F.conv2d(x, state[f"{prefix}.conv1.weight"], stride=stride, padding=1), f"{prefix}.bn1"))
            out = bn(F.conv2d(out, state[f"{prefix}.conv2.weight"], padding=1), f"{prefix}.bn2")
            if f"{prefix}.downsample.0.weight" in state:
                x = bn(F.conv2d(x, state[f"{prefix}.downsample.0.weight"], stride=stride), f"{prefix}.downsample.1")
            x = F.relu(out + x)
    return x
