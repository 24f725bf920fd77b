"""The converted official checkpoint reproduces the official forward pass (../shared/fixtures)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from conftest import SHARED

from itmatch.checkpoint import load_checkpoint
from itmatch.convert.cmcan import convert_official_cmcan
from itmatch.errors import CheckpointError
from itmatch.models.cmcan import neighbour_slots
from itmatch.scoring import ScoringOptions, grid_view, score_grid

FIXTURES = SHARED / "fixtures"
OFFICIAL = FIXTURES / "cmcan_official_small_ckpt.pth.tar"
pytestmark = pytest.mark.skipif(not OFFICIAL.exists(), reason="../shared/fixtures is not beside the project")
ATOL = 1e-5


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIXTURES / "cmcan_official_small_io.npz"))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def model(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "cmcan.pt"
    convert_official_cmcan(OFFICIAL, out)
    return load_checkpoint(out, device=request.param)


def inputs(io):
    return (
        torch.from_numpy(io["images"]),
        torch.from_numpy(io["captions"]),
        torch.from_numpy(io["lengths"]),
        torch.from_numpy(io["adjacency"]),
    )


def close(actual: torch.Tensor, expected: np.ndarray, atol: float = ATOL) -> None:
    actual = actual.detach().cpu().numpy()
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


def test_converted_config_is_the_official_preset(model):
    config = model.run_config
    assert config.preset == "cmcan-official"
    assert (config.model.img_dim, config.model.embed_size, config.model.sim_dim) == (64, 48, 16)
    assert config.model.vocab_size == 60 and config.model.n_regions == 36
    assert config.model.context.slots == 5 and config.model.context.per_direction == 1


def test_scores_equal_the_official_outputs(model, io):
    images, captions, lengths, adjacency = inputs(io)
    with torch.no_grad():
        sims = model.similarity(images, captions, lengths, region_graph=adjacency)
    close(sims, io["sims"])


def test_adjacency_derived_from_boxes_gives_the_same_scores(model, io):
    images, captions, lengths, _ = inputs(io)
    with torch.no_grad():
        sims = model.similarity(
            images,
            captions,
            lengths,
            boxes=torch.from_numpy(io["boxes"]),
            image_sizes=torch.from_numpy(io["image_sizes"]),
        )
    close(sims, io["sims"])


def test_caption_order_and_tiling_do_not_matter(model, io):
    images, captions, lengths, adjacency = inputs(io)
    order = torch.tensor([3, 8, 0, 5, 1, 7, 2, 6, 4])  # no longer sorted by length
    with torch.no_grad():
        image_codes = model.encode_images(images, adjacency)
        text_codes = model.encode_texts(captions[order], lengths[order])
        tiny_tiles = score_grid(model, image_codes, text_codes, ScoringOptions(memory_budget=1))  # one pair per tile
    close(tiny_tiles, io["sims"][:, order.numpy()])


def test_image_and_text_stages(model, io):
    images, captions, lengths, adjacency = inputs(io)
    with torch.no_grad():
        image_codes = model.encode_images(images, adjacency)
        text_codes = model.encode_texts(captions, lengths)
    close(image_codes["regions"], io["img_embs"])
    close(text_codes["words"], io["cap_embs"])
    close(image_codes["pool_logits"], io["stage_img_attn_logits"])
    close(image_codes["global"], io["stage_img_global"])
    close(image_codes["global_norm"], io["stage_img_global_norm"])
    close(image_codes["context"], io["stage_img_partial"])
    close(text_codes["global"], io["stage_cap_global"])
    slots = neighbour_slots(adjacency, model.config.context.slots)
    np.testing.assert_array_equal(np.sort(slots.cpu().numpy(), -1), np.sort(io["stage_partial_ids"], -1))


def test_pair_stages(model, io):
    images, captions, lengths, adjacency = inputs(io)
    with torch.no_grad():
        views = grid_view(model.encode_images(images, adjacency), model.encode_texts(captions, lengths))
        stages = {key: value.transpose(0, 1) for key, value in model.pair_stages(*views).items()}  # image-major
    close(stages["word_align"], io["stage_word_align"])
    close(stages["global_align"], io["stage_global_align"])
    close(stages["region_confidence"], io["stage_region_confidence"])
    close(stages["visual_nodes"], io["stage_visual_nodes"])
    close(stages["text_graph_out"], io["stage_text_graph_out"])
    close(stages["visual_graph_out"], io["stage_visual_graph_out"])
    close(stages["logits"], io["stage_logits"], atol=5e-5)


def official_payload() -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(OFFICIAL, map_location="cpu", weights_only=True)


def test_earlier_sgr_module_spelling_converts_identically(tmp_path, model, io):
    payload = official_payload()
    payload["model"][4] = {k.replace("module_", "SGR_module_"): v for k, v in payload["model"][4].items()}
    torch.save(payload, tmp_path / "old.pth.tar")
    convert_official_cmcan(tmp_path / "old.pth.tar", tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt", device=model.device)
    images, captions, lengths, adjacency = inputs(io)
    with torch.no_grad():
        close(old.similarity(images, captions, lengths, region_graph=adjacency), io["sims"])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p["model"][3].pop("ln.weight"), "confidence_norm"),
        (lambda p: p["model"][4].__setitem__("extra.weight", torch.zeros(1)), "unexpected tensor sim_enc.extra.weight"),
        (lambda p: p["model"].pop(), "list of 5 state dicts"),
        (lambda p: p["model"][0].__setitem__("fc.weight", torch.zeros(3, 3)), "do not fit"),
    ],
)
def test_damaged_official_checkpoints_are_named(tmp_path, damage, message):
    payload = official_payload()
    damage(payload)
    torch.save(payload, tmp_path / "bad.pth.tar")
    with pytest.raises(CheckpointError, match=message) as error:
        convert_official_cmcan(tmp_path / "bad.pth.tar", tmp_path / "out.pt")
    assert "bad.pth.tar" in str(error.value)


def test_loading_an_official_checkpoint_directly_says_to_convert(tmp_path):
    with pytest.raises(CheckpointError, match="itmatch convert official-cmcan"):
        load_checkpoint(OFFICIAL)


def test_a_checkpoint_of_another_architecture_is_refused(model, tmp_path):
    out = tmp_path / "cmcan.pt"
    convert_official_cmcan(OFFICIAL, out)
    with pytest.raises(CheckpointError, match="holds a cmcan model"):
        load_checkpoint(out, architecture="vsepp")
    with pytest.raises(CheckpointError, match="preset cmcan-official, not cmcan-paper"):
        load_checkpoint(out, preset="cmcan-paper")


def test_garbage_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="junk.pt"):
        convert_official_cmcan(tmp_path / "junk.pt", tmp_path / "out.pt")
