"""SCAN: the batched scoring equals a per-caption loop written the way the official code is
(model.py of github.com/kuanghuei/SCAN: func_attention, xattn_score_t2i / xattn_score_i2t), the
converter reproduces an official checkpoint, and short training runs learn."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from itmatch import Vocabulary, build_run_config, create_model, load_checkpoint
from itmatch.cli import main as cli_main
from itmatch.config import merge
from itmatch.convert.scan import convert_official_scan
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.errors import CheckpointError
from itmatch.evaluation.runner import evaluate_split
from itmatch.scoring import ScoringOptions, score_grid
from itmatch.training import train

ATOL = 1e-5
RAW_FEATURE_NORMS = ["clipped_l2norm", "l2norm", "softmax", "l1norm", "clipped_l1norm", "clipped", "no_norm"]
ACTIVATION_NORMALIZATION = {
    "clipped_l2norm": ("leaky_relu", "l2"),
    "l2norm": ("none", "l2"),
    "clipped_l1norm": ("leaky_relu", "l1"),
    "l1norm": ("none", "l1"),
    "softmax": ("none", "softmax"),
    "clipped": ("leaky_relu", "none"),
    "no_norm": ("none", "none"),
}
AGG_FUNCS = {"mean": "Mean", "lse": "LogSumExp", "max": "Max", "sum": "Sum"}
AGG_POOLING = {name: pooling for pooling, name in AGG_FUNCS.items()}


# -- the reference: the official structure, one caption at a time ---------------------------------
def ref_l2norm(x: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def ref_l1norm(x: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    # The official l1norm options call an undefined `l1norm_d`; this is its evident meaning.
    return x / (x.abs().sum(dim=dim, keepdim=True) + eps)


def ref_attention(query: torch.Tensor, context: torch.Tensor, raw_feature_norm: str, smooth: float) -> torch.Tensor:
    """func_attention: query (n, queryL, d) attends to context (n, sourceL, d); (n, queryL, d)."""
    n, query_len, source_len = query.shape[0], query.shape[1], context.shape[1]
    attn = torch.bmm(context, query.transpose(1, 2))  # (n, sourceL, queryL)
    leaky = nn.LeakyReLU(0.1)
    if raw_feature_norm == "softmax":
        attn = torch.softmax(attn.reshape(n * source_len, query_len), dim=1).view(n, source_len, query_len)
    elif raw_feature_norm == "l2norm":
        attn = ref_l2norm(attn, 2)
    elif raw_feature_norm == "clipped_l2norm":
        attn = ref_l2norm(leaky(attn), 2)
    elif raw_feature_norm == "l1norm":
        attn = ref_l1norm(attn, 2)
    elif raw_feature_norm == "clipped_l1norm":
        attn = ref_l1norm(leaky(attn), 2)
    elif raw_feature_norm == "clipped":
        attn = leaky(attn)
    else:
        assert raw_feature_norm == "no_norm"
    attn = attn.transpose(1, 2).contiguous().view(n * query_len, source_len)
    attn = torch.softmax(attn * smooth, dim=1).view(n, query_len, source_len)
    weighted = torch.bmm(context.transpose(1, 2), attn.transpose(1, 2))  # (n, d, queryL)
    return weighted.transpose(1, 2)


def ref_cosine(x1: torch.Tensor, x2: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    w12 = (x1 * x2).sum(dim)
    return w12 / (torch.norm(x1, 2, dim) * torch.norm(x2, 2, dim)).clamp(min=eps)


def ref_aggregate(row: torch.Tensor, agg_func: str, lambda_lse: float) -> torch.Tensor:
    if agg_func == "LogSumExp":
        return torch.log((row * lambda_lse).exp().sum(dim=1, keepdim=True)) / lambda_lse
    if agg_func == "Max":
        return row.max(dim=1, keepdim=True)[0]
    if agg_func == "Sum":
        return row.sum(dim=1, keepdim=True)
    assert agg_func == "Mean"
    return row.mean(dim=1, keepdim=True)


def ref_scores(images: torch.Tensor, captions: torch.Tensor, lengths, opt: argparse.Namespace) -> torch.Tensor:
    """xattn_score_t2i / xattn_score_i2t: (n_image, n_caption), a loop over the captions."""
    columns = []
    for i in range(captions.shape[0]):
        caption = captions[i, : int(lengths[i])].unsqueeze(0).repeat(images.shape[0], 1, 1)
        if opt.cross_attn == "t2i":
            row = ref_cosine(caption, ref_attention(caption, images, opt.raw_feature_norm, opt.lambda_softmax), 2)
        else:
            row = ref_cosine(images, ref_attention(images, caption, opt.raw_feature_norm, opt.lambda_softmax), 2)
        columns.append(ref_aggregate(row, opt.agg_func, opt.lambda_lse))
    return torch.cat(columns, dim=1)


def ref_opt(config) -> argparse.Namespace:
    """The official options equivalent to a SCANConfig's scoring settings."""
    norms = {pair: name for name, pair in ACTIVATION_NORMALIZATION.items()}
    attention = config.attention
    return argparse.Namespace(
        cross_attn=config.direction,
        raw_feature_norm=norms[attention.activation, attention.normalization],
        lambda_softmax=attention.temperature,
        agg_func=AGG_FUNCS[config.pooling],
        lambda_lse=config.lse_lambda,
    )


# -- batched scoring == the reference ---------------------------------------------------------------
def scan_model(direction: str, pooling: str, raw_feature_norm: str, **sizes):
    activation, normalization = ACTIVATION_NORMALIZATION[raw_feature_norm]
    preset = f"scan-{direction}-{'lse' if pooling == 'lse' else 'ave'}"
    model = {"vocab_size": 30, "img_dim": 20, "embed_size": 48, "text": {"word_dim": 16}, **sizes}
    model.update(pooling=pooling, attention={"activation": activation, "normalization": normalization})
    torch.manual_seed(0)
    return create_model("scan", build_run_config(preset, {"model": model}).model).eval()


def batch(n_images=5, n_regions=11, img_dim=20, lengths=(1, 9, 4, 12, 2, 7, 12), vocab_size=30, seed=0):
    """Region features and captions of different lengths, padded to 14 (more than the longest)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n_images, n_regions, img_dim, generator=generator)
    lengths = torch.tensor(lengths)
    tokens = torch.randint(4, vocab_size, (len(lengths), 14), generator=generator)
    return features, tokens * (torch.arange(14) < lengths[:, None]), lengths


@pytest.mark.parametrize(
    "direction, pooling, raw_feature_norm",
    [(d, p, n) for d, p, n in itertools.product(["t2i", "i2t"], ["mean", "lse"], RAW_FEATURE_NORMS)]
    + [(d, p, "clipped_l2norm") for d, p in itertools.product(["t2i", "i2t"], ["max", "sum"])],
)
def test_batched_scores_equal_the_official_loop(direction, pooling, raw_feature_norm):
    model = scan_model(direction, pooling, raw_feature_norm)
    features, tokens, lengths = batch()
    with torch.no_grad():
        sims = model.similarity(features, tokens, lengths)
        images, texts = model.encode_images(features), model.encode_texts(tokens, lengths)
        expected = ref_scores(images["regions"], texts["words"], lengths, ref_opt(model.config))
        one_pair_tiles = score_grid(model, images, texts, ScoringOptions(memory_budget=1))
    assert sims.shape == (5, 7)
    torch.testing.assert_close(sims, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(one_pair_tiles, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("preset", ["scan-t2i-lse", "scan-i2t-ave", "scan-i2t-lse-coco"])
def test_official_sizes_equal_the_official_loop(preset):
    """1024-d embeddings, 36 regions, 2048-d features: the scores stay within 1e-5 at full size."""
    torch.manual_seed(0)
    model = create_model("scan", build_run_config(preset, {"model": {"vocab_size": 50}}).model).eval()
    features, tokens, lengths = batch(n_images=4, n_regions=36, img_dim=2048, vocab_size=50, seed=1)
    features = features.clamp(min=0)  # like bottom-up features (ReLU outputs)
    with torch.no_grad():
        images, texts = model.encode_images(features), model.encode_texts(tokens, lengths)
        sims = score_grid(model, images, texts)
        expected = ref_scores(images["regions"], texts["words"], lengths, ref_opt(model.config))
    torch.testing.assert_close(sims, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_region_order_does_not_matter(direction):
    model = scan_model(direction, "lse", "clipped_l2norm")
    features, tokens, lengths = batch()
    order = torch.randperm(features.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(
            model.similarity(features[:, order], tokens, lengths),
            model.similarity(features, tokens, lengths),
            atol=ATOL,
            rtol=0,
        )


def test_any_number_of_regions_and_no_image_norm():
    model = scan_model("t2i", "mean", "clipped_l2norm", image_norm=False, text={"word_dim": 16, "normalize": False})
    for n_regions in (1, 7, 50):
        features, tokens, lengths = batch(n_regions=n_regions)
        with torch.no_grad():
            images, texts = model.encode_images(features), model.encode_texts(tokens, lengths)
            expected = ref_scores(images["regions"], texts["words"], lengths, ref_opt(model.config))
            torch.testing.assert_close(score_grid(model, images, texts), expected, atol=ATOL, rtol=0)


def test_presets_encode_the_readme_commands():
    expected = {
        # name: (direction, pooling, lambda_softmax, lambda_lse, epochs, lr_update, learning rate)
        "scan-t2i-lse": ("t2i", "lse", 9, 6, 30, 15, 2e-4),
        "scan-t2i-ave": ("t2i", "mean", 9, None, 30, 15, 2e-4),
        "scan-i2t-lse": ("i2t", "lse", 4, 5, 30, 15, 2e-4),
        "scan-i2t-ave": ("i2t", "mean", 4, None, 30, 15, 2e-4),
        "scan-t2i-lse-coco": ("t2i", "lse", 9, 6, 20, 10, 5e-4),
        "scan-t2i-ave-coco": ("t2i", "mean", 9, None, 20, 10, 5e-4),
        "scan-i2t-lse-coco": ("i2t", "lse", 4, 20, 20, 10, 5e-4),
        "scan-i2t-ave-coco": ("i2t", "mean", 4, None, 20, 10, 5e-4),
    }
    for name, (direction, pooling, softmax, lse, epochs, lr_update, lr) in expected.items():
        config = build_run_config(name)
        model, schedule, loss = config.model, config.train, config.loss
        assert (model.direction, model.pooling, model.attention.temperature) == (direction, pooling, softmax)
        assert lse is None or model.lse_lambda == lse
        assert (model.attention.activation, model.attention.normalization) == ("leaky_relu", "l2")
        assert model.attention.normalize_over == "queries" and not model.attention.normalize_output
        assert model.text.bidirectional and model.text.dropout == 0 and model.embed_size == 1024
        assert (schedule.epochs, schedule.lr_decay_epochs, schedule.learning_rate) == (epochs, lr_update, lr)
        assert (schedule.batch_size, schedule.grad_clip, loss.margin, loss.negatives) == (128, 2.0, 0.2, "hardest")
        assert loss.reduction == "sum" and not loss.exclude_same_image


# -- converting official checkpoints ----------------------------------------------------------------
SIZES = {"vocab_size": 40, "word_dim": 16, "embed_size": 24, "img_dim": 20}


def official_opt(**changes) -> argparse.Namespace:
    """train.py's options (the README's Flickr30K t-i LSE command) at small sizes."""
    options = dict(
        data_path="./data/",
        data_name="f30k_precomp",
        vocab_path="./vocab/",
        margin=0.2,
        num_epochs=30,
        batch_size=128,
        word_dim=SIZES["word_dim"],
        embed_size=SIZES["embed_size"],
        grad_clip=2.0,
        num_layers=1,
        learning_rate=0.0002,
        lr_update=15,
        workers=10,
        log_step=10,
        val_step=500,
        logger_name="runs/f30k_scan/log",
        model_name="runs/f30k_scan/log",
        resume="",
        max_violation=True,
        img_dim=SIZES["img_dim"],
        no_imgnorm=False,
        no_txtnorm=False,
        raw_feature_norm="clipped_l2norm",
        agg_func="LogSumExp",
        cross_attn="t2i",
        precomp_enc_type="basic",
        bi_gru=True,
        lambda_lse=6.0,
        lambda_softmax=9.0,
        vocab_size=SIZES["vocab_size"],
    )
    options.update(changes)
    return argparse.Namespace(**options)


def official_payload(opt: argparse.Namespace) -> dict:
    """What the official train.py saves, with the official module names (fc; embed, rnn)."""
    torch.manual_seed(1)
    fc = nn.Linear(opt.img_dim, opt.embed_size)
    embed = nn.Embedding(opt.vocab_size, opt.word_dim)
    rnn = nn.GRU(opt.word_dim, opt.embed_size, opt.num_layers, batch_first=True, bidirectional=opt.bi_gru)
    img_enc = {f"fc.{k}": v for k, v in fc.state_dict().items()}
    txt_enc = {"embed.weight": embed.weight.detach().clone(), **{f"rnn.{k}": v for k, v in rnn.state_dict().items()}}
    return {"epoch": 17, "model": [img_enc, txt_enc], "best_rsum": 412.5, "opt": opt, "Eiters": 3300}


def ref_encode(payload: dict, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor):
    """EncoderImagePrecomp ('basic') and EncoderText from the raw official tensors."""
    opt = payload["opt"]
    img_enc, txt_enc = payload["model"]
    images = features @ img_enc["fc.weight"].T + img_enc["fc.bias"]
    if not opt.no_imgnorm:
        images = ref_l2norm(images, -1)
    rnn = nn.GRU(opt.word_dim, opt.embed_size, opt.num_layers, batch_first=True, bidirectional=opt.bi_gru)
    rnn.load_state_dict({k[len("rnn.") :]: v for k, v in txt_enc.items() if k.startswith("rnn.")})
    order = torch.argsort(lengths, descending=True)  # the official collate_fn sorts by length
    embedded = txt_enc["embed.weight"][tokens[order]]
    packed = nn.utils.rnn.pack_padded_sequence(embedded, lengths[order], batch_first=True)
    words, _ = nn.utils.rnn.pad_packed_sequence(rnn(packed)[0], batch_first=True)
    words = words[torch.argsort(order)]
    if opt.bi_gru:
        half = words.shape[2] // 2
        words = (words[:, :, :half] + words[:, :, half:]) / 2
    if not opt.no_txtnorm:
        words = ref_l2norm(words, -1)
    return images, words


@pytest.mark.parametrize(
    "changes, preset",
    [
        ({}, "scan-t2i-lse"),
        ({"cross_attn": "i2t", "agg_func": "Mean", "lambda_softmax": 4.0}, "scan-i2t-ave"),
        (
            {"cross_attn": "i2t", "lambda_lse": 20.0, "lambda_softmax": 4.0, "data_name": "coco_precomp"},
            "scan-i2t-lse-coco",
        ),
        ({"agg_func": "Mean", "raw_feature_norm": "softmax", "no_imgnorm": True, "bi_gru": False}, "scan-t2i-ave"),
        ({"raw_feature_norm": "l1norm", "no_txtnorm": True, "num_layers": 2, "lambda_softmax": 5.0}, "scan-t2i-lse"),
    ],
)
def test_converted_checkpoint_reproduces_the_official_scores(tmp_path, changes, preset):
    payload = official_payload(official_opt(**changes))
    torch.save(payload, tmp_path / "model_best.pth.tar")
    convert_official_scan(tmp_path / "model_best.pth.tar", tmp_path / "scan.pt")
    model = load_checkpoint(tmp_path / "scan.pt", device="cpu", architecture="scan", preset=preset)
    opt = payload["opt"]
    config = model.config
    assert (config.direction, config.attention.temperature, config.lse_lambda) == (
        opt.cross_attn,
        opt.lambda_softmax,
        opt.lambda_lse,
    )
    sizes = {"img_dim": config.img_dim, "embed_size": config.embed_size, "vocab_size": config.vocab_size}
    assert {**sizes, "word_dim": config.text.word_dim} == SIZES
    assert config.pooling == AGG_POOLING[opt.agg_func] and ref_opt(config).raw_feature_norm == opt.raw_feature_norm
    assert config.image_norm != opt.no_imgnorm and config.text.normalize != opt.no_txtnorm
    assert config.text.bidirectional == opt.bi_gru and config.text.num_layers == opt.num_layers
    assert model.run_config.train.epochs == opt.num_epochs and model.run_config.loss.negatives == "hardest"

    features, tokens, lengths = batch(img_dim=SIZES["img_dim"], vocab_size=SIZES["vocab_size"], seed=2)
    with torch.no_grad():
        images, words = ref_encode(payload, features, tokens, lengths)
        expected = ref_scores(images, words, lengths, opt)
        sims = model.similarity(features, tokens, lengths)
        codes = model.encode_texts(tokens, lengths)
    torch.testing.assert_close(codes["words"][:, : words.shape[1]], words, atol=ATOL, rtol=0)
    torch.testing.assert_close(sims, expected, atol=ATOL, rtol=0)


def test_convert_with_vocabulary_through_the_cli(tmp_path, capsys):
    torch.save(official_payload(official_opt()), tmp_path / "ckpt.pth.tar")
    Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(36))]).save(tmp_path / "vocab.json")
    command = ["convert", "official-scan", str(tmp_path / "ckpt.pth.tar"), str(tmp_path / "scan.pt")]
    assert cli_main([*command, "--vocab", str(tmp_path / "vocab.json")]) == 0
    assert "scan-t2i-lse" in capsys.readouterr().out
    model = load_checkpoint(tmp_path / "scan.pt", device="cpu")
    assert len(model.vocab) == 40 and model.vocab.words[4] == "w0"
    tokens, lengths = model.vocab.encode_batch(["w1 w2 w3", "w5"])
    assert model.similarity(torch.rand(2, 6, SIZES["img_dim"]), tokens, lengths).shape == (2, 2)


def _drop(part: int, key: str):
    return lambda p: p["model"][part].pop(key)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p["model"][1].__setitem__("extra.weight", torch.zeros(1)), "unexpected tensor txt_enc.extra.weight"),
        (_drop(0, "fc.bias"), "missing tensor for image_proj.bias"),
        (_drop(1, "rnn.weight_hh_l0_reverse"), "(?s)do not fit.*weight_hh_l0_reverse"),
        (lambda p: p["model"].pop(), "list of 2 state dicts"),
        (lambda p: setattr(p["opt"], "precomp_enc_type", "weight_norm"), "only the 'basic' image encoder"),
        (lambda p: setattr(p["opt"], "raw_feature_norm", "l3norm"), "raw_feature_norm='l3norm' is not supported"),
        (lambda p: setattr(p["opt"], "cross_attn", "both"), "cross_attn='both' is not supported"),
        (lambda p: setattr(p["opt"], "agg_func", "Median"), "agg_func='Median' is not supported"),
        (lambda p: setattr(p["opt"], "embed_size", 1024), "opt.embed_size is 1024 but the tensors give 24"),
        (lambda p: setattr(p["opt"], "bi_gru", False), "do not fit"),
    ],
)
def test_damaged_official_checkpoints_are_named(tmp_path, damage, message):
    payload = official_payload(official_opt())
    damage(payload)
    torch.save(payload, tmp_path / "bad.pth.tar")
    with pytest.raises(CheckpointError, match=message) as error:
        convert_official_scan(tmp_path / "bad.pth.tar", tmp_path / "out.pt")
    assert "bad.pth.tar" in str(error.value)
    assert not (tmp_path / "out.pt").exists()


def test_weight_norm_checkpoint_is_refused_by_its_option(tmp_path):
    payload = official_payload(official_opt(precomp_enc_type="weight_norm"))
    weight = payload["model"][0].pop("fc.weight")
    payload["model"][0].update({"fc.weight_g": weight.norm()[None], "fc.weight_v": weight})
    torch.save(payload, tmp_path / "wn.pth.tar")
    with pytest.raises(CheckpointError, match="wn.pth.tar.*precomp_enc_type='weight_norm'"):
        convert_official_scan(tmp_path / "wn.pth.tar", tmp_path / "out.pt")


def test_vocabulary_of_another_size_is_named(tmp_path):
    torch.save(official_payload(official_opt()), tmp_path / "ckpt.pth.tar")
    Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "dog", "cat"]).save(tmp_path / "small_vocab.json")
    with pytest.raises(CheckpointError, match="ckpt.pth.tar: has 40 word embeddings but .*small_vocab.json has 6"):
        convert_official_scan(tmp_path / "ckpt.pth.tar", tmp_path / "out.pt", vocab=tmp_path / "small_vocab.json")


# -- short training on synthetic scenes ---------------------------------------------------------------
N_TEST = 50
FAST = {
    "model": {"embed_size": 64, "text": {"word_dim": 32}},
    "train": {"batch_size": 32, "checkpoint_every": 0, "dev_max_captions": None},
    "loss": {"negatives": "sum", "exclude_same_image": True},
}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    spec = SyntheticSpec(n_regions=8, feature_dim=32, regions_per_object=(1, 2))
    return make_synthetic(
        tmp_path_factory.mktemp("scenes"), {"train": 400, "dev": 40, "test": N_TEST}, seed=5, spec=spec
    )


@pytest.mark.parametrize(
    "preset, settings",
    [
        ("scan-t2i-lse", {"train": {"epochs": 4, "learning_rate": 2e-3}}),
        ("scan-i2t-ave", {"train": {"epochs": 4, "learning_rate": 2e-3}}),
    ],
)
def test_short_training_beats_chance_by_a_wide_margin(scenes, tmp_path, preset, settings):
    torch.manual_seed(0)
    config = build_run_config(preset, merge(FAST, settings))
    state = train(config, scenes, tmp_path, progress=False, log=lambda *_: None)
    model = load_checkpoint(tmp_path / "best.pt", device="cpu", preset=preset)
    metrics = evaluate_split(model, PrecompSplit(scenes, "test"), progress=False)
    chance_t2i_r10 = 100 * 10 / N_TEST
    assert metrics["t2i"]["r10"] > 2.5 * chance_t2i_r10, metrics
    assert metrics["rsum"] > 2 * 6 * 100 * 5.5 / N_TEST, metrics  # twice the chance recalls (~66)
    assert state.best_rsum > 0
