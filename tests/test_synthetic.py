"""The synthetic scenes: valid precomp layout, true captions, and a real bag-of-words trap."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from itmatch.data.precomp import PrecompSplit
from itmatch.data.region_graph import split_region_graph
from itmatch.data.synthetic import SyntheticSpec, _centre, _relation, describe, make_synthetic


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(
        tmp_path_factory.mktemp("syn"),
        {"train": 60, "test": 48},
        seed=3,
        spec=SyntheticSpec(n_regions=12, feature_dim=32),
    )


def scenes(data, split):
    return [json.loads(line)["objects"] for line in (data / f"{split}_scenes.jsonl").read_text().splitlines()]


def test_layout_is_a_valid_precomp_split(data):
    split = PrecompSplit(data, "test")
    assert (split.n_images, split.n_regions, split.feature_dim, split.captions_per_image) == (48, 12, 32, 5)
    assert np.isfinite(split.features).all()
    sizes = split.image_sizes
    assert (split.boxes[..., 2] <= sizes[:, None, 0] + 1e-3).all() and (split.boxes >= 0).all()
    graph = split_region_graph(split, 1, True)
    assert graph.shape == (48, 12, 12)


def test_same_seed_same_data(data, tmp_path):
    again = make_synthetic(
        tmp_path, {"train": 60, "test": 48}, seed=3, spec=SyntheticSpec(n_regions=12, feature_dim=32)
    )
    for name in ("test_ims.npy", "test_caps.txt", "test_ims_bbx.npy"):
        assert (again / name).read_bytes() == (data / name).read_bytes()


RELATION = re.compile(r"^an? (\w+) (\w+) (to the left of|to the right of|above|below) an? (\w+) (\w+) \.$")


def test_captions_state_true_colours_and_relations(data):
    captions = (data / "test_caps.txt").read_text().splitlines()
    checked = 0
    for index, caption in enumerate(captions):
        match = RELATION.match(caption.lower())
        if not match:
            continue
        colour_a, category_a, relation, colour_b, category_b = match.groups()
        objects = {o["category"]: o for o in scenes(data, "test")[index // 5]}
        a, b = objects[category_a], objects[category_b]
        assert (a["colour"], b["colour"]) == (colour_a, colour_b)
        assert _relation(np.array(a["box"]), np.array(b["box"])) == relation
        checked += 1
    assert checked > 20


def test_bags_of_words_repeat_but_bindings_do_not(data):
    """Most images share their bag of categories and colours with a sibling; none share the binding."""
    test_scenes = scenes(data, "test")
    bags = Counter(tuple(sorted(o["category"] for o in s) + sorted(o["colour"] for o in s)) for s in test_scenes)
    shared = sum(count for count in bags.values() if count > 1) / len(test_scenes)
    assert shared > 0.9
    bindings = {
        tuple(
            sorted(
                (o["category"], o["colour"], tuple(np.round(_centre(np.array(o["box"])) * 3 - 0.5).astype(int)))
                for o in s
            )
        )
        for s in test_scenes
    }
    assert len(bindings) == len(test_scenes)


def test_describe_names_every_object(data):
    line = describe(scenes(data, "test")[0])
    assert line.count(",") == len(scenes(data, "test")[0]) - 1
