"""Synthetic scenes in the precomp layout: the demo and test data, a bag-of-words trap.

Every scene holds a few objects (a category, a colour, a size, a box). Scenes come in sibling
groups that share the same categories, colours, sizes and places but bind them differently: in
one sibling the dog is red and on the left, in another the dog is blue and on the right. Captions
name two objects with their colours and their true spatial relation, or one object and where it
is. A model that sees bags of words, or mean-pooled regions, cannot tell siblings apart; a model
that aligns words with regions can.

A region's feature is a sum of random codes: category + colour + size + a code of its box centre
+ noise, so the binding of a colour to an object exists only inside a region. Each object gives a
few overlapping regions (like a detector's); the rest of the regions are background clutter.
Written files: {split}_ims.npy, {split}_caps.txt (5 per image), {split}_ims_bbx.npy,
{split}_ims_size.npy (dicts with image_w / image_h), {split}_ids.txt, and {split}_scenes.jsonl
with each image's true content.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itmatch.files import atomic_write

CATEGORIES = tuple(
    "dog cat horse bird car bus boat bicycle tree house chair table ball kite umbrella man woman child".split()
)
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
SIZES = ("small", "large")
BACKGROUNDS = ("grass", "sky", "wall", "road", "water", "sand", "snow", "floor")
GRID = 3  # objects sit in distinct cells of a GRID x GRID layout
CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class SceneObject:
    category: str
    colour: str
    size: str
    cell: tuple[int, int]  # (column, row)


@dataclass
class SyntheticSpec:
    n_regions: int = 36
    feature_dim: int = 256
    objects_per_scene: tuple[int, int] = (3, 4)
    group_size: int = 6  # siblings with the same bag of words
    regions_per_object: tuple[int, int] = (1, 3)
    noise: float = 0.35


class _Codes:
    """The random feature codes of one synthetic world (fixed by the seed, shared by splits)."""

    def __init__(self, rng: np.random.Generator, dim: int):
        def table(n: int) -> np.ndarray:
            return rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)

        self.category, self.colour, self.size = table(len(CATEGORIES)), table(len(COLOURS)), table(len(SIZES))
        self.background = table(len(BACKGROUNDS))
        # Box centres are coded by soft membership of a 4x4 grid of anchors (linear in features).
        self.anchors = table(16)

    def position(self, centre: np.ndarray) -> np.ndarray:
        grid = (np.arange(4) + 0.5) / 4
        ax, ay = np.meshgrid(grid, grid, indexing="xy")
        distance = (ax.ravel() - centre[0]) ** 2 + (ay.ravel() - centre[1]) ** 2
        weights = np.exp(-distance / (2 * 0.15**2))
        return (weights / weights.sum()) @ self.anchors


def make_synthetic(
    out_dir: str | Path, splits: dict[str, int], seed: int = 0, spec: SyntheticSpec | None = None
) -> Path:
    """Writes the given splits ({"train": 1200, "dev": 240, "test": 240}) into `out_dir`."""
    spec = spec or SyntheticSpec()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    codes = _Codes(np.random.default_rng(seed), spec.feature_dim)
    for offset, (split, n_images) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, offset + 1])
        _write_split(out_dir, split, _scenes(rng, n_images, spec), codes, spec, rng)
    return out_dir


def _scenes(rng: np.random.Generator, n_images: int, spec: SyntheticSpec) -> list[list[SceneObject]]:
    scenes: list[list[SceneObject]] = []
    while len(scenes) < n_images:
        scenes.extend(_sibling_group(rng, spec))
    return scenes[:n_images]


def _sibling_group(rng: np.random.Generator, spec: SyntheticSpec) -> list[list[SceneObject]]:
    """Scenes with one bag of categories, colours, sizes and cells, bound differently."""
    k = int(rng.integers(spec.objects_per_scene[0], spec.objects_per_scene[1] + 1))
    categories = rng.choice(len(CATEGORIES), k, replace=False)
    colours = rng.choice(len(COLOURS), k, replace=False)
    sizes = rng.integers(0, len(SIZES), k)
    cells = [divmod(int(c), GRID) for c in rng.choice(GRID * GRID, k, replace=False)]
    bindings = list(itertools.product(itertools.permutations(range(k)), itertools.permutations(range(k))))
    chosen = rng.choice(len(bindings), min(spec.group_size, len(bindings)), replace=False)
    group = []
    for index in chosen:
        colour_of, cell_of = bindings[index]
        group.append(
            [
                SceneObject(
                    CATEGORIES[categories[i]], COLOURS[colours[colour_of[i]]], SIZES[sizes[i]], cells[cell_of[i]]
                )
                for i in range(k)
            ]
        )
    return group


def _write_split(out_dir, split, scenes, codes: _Codes, spec: SyntheticSpec, rng: np.random.Generator) -> None:
    n = len(scenes)
    features = np.empty((n, spec.n_regions, spec.feature_dim), dtype=np.float32)
    boxes = np.empty((n, spec.n_regions, 4), dtype=np.float32)
    sizes = np.empty(n, dtype=object)
    captions, records = [], []
    for i, scene in enumerate(scenes):
        width, height = int(rng.integers(480, 641)), int(rng.integers(360, 481))
        object_boxes = [_object_box(obj, rng) for obj in scene]
        features[i], boxes[i] = _regions(scene, object_boxes, codes, spec, rng, width, height)
        sizes[i] = {"image_w": width, "image_h": height}
        captions.extend(_captions(scene, object_boxes, rng))
        records.append(
            {
                "image": i,
                "objects": [
                    {"category": o.category, "colour": o.colour, "size": o.size, "box": [round(float(v), 4) for v in b]}
                    for o, b in zip(scene, object_boxes, strict=False)
                ],
            }
        )
    np.save(out_dir / f"{split}_ims.npy", features)
    np.save(out_dir / f"{split}_ims_bbx.npy", boxes)
    np.save(out_dir / f"{split}_ims_size.npy", sizes, allow_pickle=True)
    _write_text(out_dir / f"{split}_caps.txt", captions)
    _write_text(out_dir / f"{split}_ids.txt", [str(i) for i in range(n)])
    _write_text(out_dir / f"{split}_scenes.jsonl", [json.dumps(r) for r in records])


def _write_text(path: Path, lines: list[str]) -> None:
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode("utf-8")))


def _object_box(obj: SceneObject, rng: np.random.Generator) -> np.ndarray:
    """Normalised box (x1, y1, x2, y2) inside the object's grid cell."""
    extent = (0.75 if obj.size == "large" else 0.4) * rng.uniform(0.85, 1.0, 2) / GRID
    centre = (np.array(obj.cell) + 0.5 + rng.uniform(-0.12, 0.12, 2)) / GRID
    return np.concatenate([centre - extent / 2, centre + extent / 2])


def _regions(scene, object_boxes, codes: _Codes, spec: SyntheticSpec, rng, width: int, height: int):
    feats, boxes = [], []
    for obj, box in zip(scene, object_boxes, strict=False):
        content = (
            codes.category[CATEGORIES.index(obj.category)]
            + codes.colour[COLOURS.index(obj.colour)]
            + codes.size[SIZES.index(obj.size)]
        )
        for _ in range(int(rng.integers(spec.regions_per_object[0], spec.regions_per_object[1] + 1))):
            part = _jitter(box, rng)
            feats.append(content + codes.position(_centre(part)))
            boxes.append(part)
    while len(feats) < spec.n_regions:
        part = _random_box(rng)
        feats.append(0.6 * codes.background[rng.integers(len(BACKGROUNDS))] + codes.position(_centre(part)))
        boxes.append(part)
    order = rng.permutation(len(feats))[: spec.n_regions]
    feats = np.stack(feats)[order]
    feats += rng.standard_normal(feats.shape).astype(np.float32) * spec.noise / np.sqrt(spec.feature_dim)
    pixel_boxes = np.stack(boxes)[order] * np.array([width, height, width, height])
    return feats, pixel_boxes


def _jitter(box: np.ndarray, rng) -> np.ndarray:
    size = box[2:] - box[:2]
    low = box[:2] + rng.uniform(-0.1, 0.2, 2) * size
    high = box[2:] - rng.uniform(-0.1, 0.2, 2) * size
    return np.clip(np.concatenate([low, np.maximum(high, low + 0.05 * size)]), 0, 1)


def _random_box(rng) -> np.ndarray:
    low = rng.uniform(0, 0.8, 2)
    return np.concatenate([low, np.minimum(low + rng.uniform(0.1, 0.5, 2), 1.0)])


def _centre(box: np.ndarray) -> np.ndarray:
    return (box[:2] + box[2:]) / 2


def _relation(a: np.ndarray, b: np.ndarray) -> str:
    """Where box a is relative to box b (image y points down)."""
    dx, dy = _centre(a) - _centre(b)
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _place(box: np.ndarray) -> str:
    x, y = _centre(box)
    horizontal = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "middle"
    vertical = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else "centre"
    return f"{vertical} {horizontal}" if horizontal != "middle" else vertical if vertical != "centre" else "middle"


def _captions(scene, object_boxes, rng) -> list[str]:
    captions = []
    for _ in range(CAPTIONS_PER_IMAGE):
        if len(scene) >= 2 and rng.random() < 0.8:
            i, j = rng.choice(len(scene), 2, replace=False)
            a, b = scene[i], scene[j]
            relation = _relation(object_boxes[i], object_boxes[j])
            template = rng.integers(3)
            if template == 0:
                text = f"{_a(a.colour)} {a.category} {relation} {_a(b.colour)} {b.category}"
            elif template == 1:
                text = f"there is a {a.size} {a.colour} {a.category} {relation} the {b.colour} {b.category}"
            else:
                text = f"the {a.category} {relation} the {b.category} is {a.colour} and the {b.category} is {b.colour}"
        else:
            a = scene[rng.integers(len(scene))]
            text = f"a {a.size} {a.colour} {a.category} in the {_place(object_boxes[scene.index(a)])} of the picture"
        captions.append(text[0].upper() + text[1:] + " .")
    return captions


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def describe(objects: list[dict]) -> str:
    """One line of an image's true content, from its {split}_scenes.jsonl record."""
    return ", ".join(f"{o['colour']} {o['category']} ({_place(np.array(o['box']))})" for o in objects)
