"""SAEM: the image layer is bert.py's BERTLayer, the TextCNN reads all max_words states as the
official Conv2d does, the text model is frozen and loaded strictly (old pytorch-pretrained-BERT
names accepted, a missing or unexpected weight refused in one line), the angular loss and the
weight-norm penalty equal the official loops, the angular weight follows the official schedule,
and short training learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from itmatch import build_run_config, load_checkpoint
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import COLOURS, SyntheticSpec, make_synthetic
from itmatch.errors import ConfigError
from itmatch.evaluation.runner import evaluate_split
from itmatch.losses import TrainingContext
from itmatch.models.registry import build_model
from itmatch.models.saem import angular_loss
from itmatch.training import train

transformers = pytest.importorskip("transformers", reason="SAEM's text branch needs transformers")

WORDS = (
    "a an the of to is there on in at left right above below next small large water grass car dog cat "
    "boat bus man woman child ball tree house sky road sand snow wall floor and".split()
)
CAPTIONS = ["A red dog to the left of a blue car .", "a cat", " ".join(["the small dog"] * 15)]


def old_layout_bert(folder: Path, drop: str | None = None, extra: str | None = None) -> Path:
    """A tiny BERT saved as the old pytorch-pretrained-BERT layout: `bert.` prefix, LayerNorm
    gamma/beta, the pre-training heads (`cls.*`); optionally one weight dropped or one added."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS, *COLOURS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    config.save_pretrained(folder)
    torch.manual_seed(0)
    state = {}
    for key, value in transformers.BertModel(config).state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[f"bert.{key}"] = value
    state["cls.predictions.bias"] = torch.zeros(len(vocab))
    state.pop(drop, None)
    if extra:
        state[extra] = torch.zeros(3)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return old_layout_bert(tmp_path_factory.mktemp("old-bert"))


def saem(bert: Path, **model):
    torch.manual_seed(0)
    settings = {"img_dim": 20, "embed_size": 32, "heads": 4, "channels": 16, "text": {"encoder": str(bert)}}
    return build_model(build_run_config("saem", {"model": settings | model}))


def test_old_layout_weights_are_read_exactly(bert):
    model = saem(bert)
    state = torch.load(bert / "pytorch_model.bin")
    loaded = model.text_encoder.transformer
    torch.testing.assert_close(
        loaded.encoder.layer[1].output.LayerNorm.weight, state["bert.encoder.layer.1.output.LayerNorm.gamma"]
    )
    torch.testing.assert_close(
        loaded.embeddings.word_embeddings.weight, state["bert.embeddings.word_embeddings.weight"]
    )


@pytest.mark.parametrize(
    "drop, extra, message",
    [
        ("bert.encoder.layer.1.output.dense.weight", None, "missing weight encoder.layer.1.output.dense.weight"),
        (None, "bert.encoder.layer.2.output.dense.weight", "unexpected weight bert.encoder.layer.2.output"),
    ],
)
def test_a_missing_or_unexpected_bert_weight_is_one_line(tmp_path, drop, extra, message):
    folder = old_layout_bert(tmp_path / "bert", drop=drop, extra=extra)
    with pytest.raises(ConfigError, match=message) as error:
        saem(folder)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


def test_a_missing_pooler_is_no_problem_since_it_is_dropped(tmp_path):
    folder = old_layout_bert(tmp_path / "bert", drop="bert.pooler.dense.weight")
    assert saem(folder).text_encoder.transformer.pooler is None


def test_googles_bert_config_json_is_named(tmp_path):
    folder = old_layout_bert(tmp_path / "bert")
    (folder / "config.json").rename(folder / "bert_config.json")
    with pytest.raises(ConfigError, match='bert_config.json is: copy it to config.json with "model_type"'):
        saem(folder)


def official_bert_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """bert.py's BERTLayer (eval mode) written out: TF-style LayerNorm, erf GELU, additive mask of 0."""

    def layer_norm(norm, t):
        u = t.mean(-1, keepdim=True)
        s = (t - u).pow(2).mean(-1, keepdim=True)
        return norm.weight * (t - u) / torch.sqrt(s + 1e-12) + norm.bias

    n, length, size = x.shape
    heads = layer.heads

    def split(t):
        return t.view(n, length, heads, size // heads).permute(0, 2, 1, 3)

    scores = torch.matmul(split(layer.query(x)), split(layer.key(x)).transpose(-1, -2)) / math.sqrt(size // heads)
    context = torch.matmul(nn.Softmax(dim=-1)(scores + 0.0), split(layer.value(x)))
    context = context.permute(0, 2, 1, 3).contiguous().view(n, length, size)
    attention = layer_norm(layer.attention_norm, layer.attention_out(context) + x)
    hidden = layer.intermediate(attention)
    hidden = hidden * 0.5 * (1.0 + torch.erf(hidden / math.sqrt(2.0)))
    return layer_norm(layer.output_norm, layer.output(hidden) + attention)


def test_image_branch_is_one_bert_layer_then_the_mean(bert):
    model = saem(bert).eval()
    features = torch.randn(3, 9, 20)
    with torch.no_grad():
        branch = model.image_encoder
        expected = official_bert_layer(branch.layer, branch.proj(features)).mean(1)
        vectors = model.encode_images(features)["vector"]
    torch.testing.assert_close(vectors, expected / expected.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-5)


def test_text_cnn_reads_all_max_words_states_as_the_official_conv2d(bert):
    model = saem(bert).eval()
    tokens, lengths = model.tokenize(CAPTIONS)
    assert lengths.tolist()[2] == 32 and tokens[2, 31] == model.tokenizer.hf.sep_token_id  # cut to 30 pieces
    encoder = model.text_encoder
    with torch.no_grad():
        states, mask, vectors = encoder(tokens, lengths)
        padded_more = encoder(nn.functional.pad(tokens, (0, 9)), lengths)[2]
        features = []
        for conv in encoder.convs:  # text_net.py: Conv2d(1, C, (K, hidden)) over (n, 1, 32, hidden)
            conv2d = nn.Conv2d(1, conv.out_channels, (conv.kernel_size[0], conv.in_channels))
            conv2d.load_state_dict({"weight": conv.weight.transpose(1, 2)[:, None], "bias": conv.bias})
            out = torch.relu(conv2d(states[:, None])).squeeze(3)
            features.append(nn.functional.max_pool1d(out, out.shape[2]).squeeze(2))
        expected = encoder.mapping(torch.cat(features, 1))
    assert states.shape == (3, 32, 32) and mask.sum(1).tolist() == lengths.tolist()
    torch.testing.assert_close(vectors, expected / expected.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_more, vectors)


def batch_of(model, n_images=4):
    tokens, lengths = model.tokenize(CAPTIONS + ["a blue boat", "the man is next to a tree ."])
    features = torch.randn(len(lengths), 7, 20, generator=torch.Generator().manual_seed(2))
    image_index = torch.tensor([0, 1, 1, 2, 3])[: len(lengths)]
    return {"features": features, "tokens": tokens, "lengths": lengths, "image_index": image_index}


@pytest.mark.parametrize("frozen", [True, False])
def test_the_text_model_is_frozen_by_default_and_its_dropout_runs(bert, frozen):
    model = saem(bert, freeze_text_model=frozen).train()
    batch = batch_of(model)
    terms = model.training_losses(batch, TrainingContext(build_run_config("saem").loss))
    assert set(terms) == {"triplet", "angular", "weight_norm"} and all(torch.isfinite(t) for t in terms.values())
    sum(terms.values()).backward()
    grads = [p.grad for p in model.text_encoder.transformer.parameters()]
    assert all(g is None for g in grads) if frozen else any(g is not None and g.abs().sum() > 0 for g in grads)
    assert model.text_encoder.convs[0].weight.grad.abs().sum() > 0 and model.image_encoder.proj.weight.grad is not None
    with torch.no_grad():
        first, second = (model.text_encoder(batch["tokens"], batch["lengths"])[0] for _ in range(2))
    assert not torch.equal(first, second)  # BERT's dropout, as in the official training


def test_the_shared_loss_terms_come_with_its_own(bert):
    model = saem(bert).train()
    config = build_run_config("saem", {"loss": {"terms": ["cmpm"]}})
    assert set(model.training_losses(batch_of(model), TrainingContext(config.loss))) == {
        "cmpm",
        "angular",
        "weight_norm",
    }


def official_angular(anchors, positives, negatives_of) -> torch.Tensor:
    """loss.py's AngularLoss.angular_loss (max_violation, angle_bound 1), one anchor at a time."""
    total = torch.zeros(())
    for i, (a, p) in enumerate(zip(anchors, positives, strict=True)):
        x = [4.0 * torch.dot(a + p, positives[j]) - 2.0 * 2.0 * torch.dot(a, p) for j in negatives_of(i)]
        total = total + torch.log(1 + torch.exp(max(x)))
    return total


def test_angular_loss_and_weight_norm_equal_the_official_loops(bert):
    generator = torch.Generator().manual_seed(4)
    images = nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=1)
    texts = nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=1)
    eye = torch.eye(6, dtype=torch.bool)
    others = lambda i: [j for j in range(6) if j != i]  # noqa: E731  (get_n_pairs: every other item)
    torch.testing.assert_close(angular_loss(images, texts, eye, 1.0), official_angular(images, texts, others))
    torch.testing.assert_close(angular_loss(texts, images, eye, 1.0), official_angular(texts, images, others))
    same_image = eye | torch.tensor([0, 0, 1, 2, 3, 4])[:, None].eq(torch.tensor([0, 0, 1, 2, 3, 4])[None, :])
    not_same = lambda i: [j for j in range(6) if not same_image[i, j]]  # noqa: E731
    torch.testing.assert_close(angular_loss(images, texts, same_image, 1.0), official_angular(images, texts, not_same))

    branch = saem(bert).image_encoder
    expected = sum(  # model.py: every image-branch parameter but biases and LayerNorm gamma/beta
        p.norm() for name, p in branch.named_parameters() if not name.endswith("bias") and "norm" not in name
    )
    torch.testing.assert_close(branch.weight_norms(), expected)
    assert len([name for name, _ in branch.named_parameters() if name.endswith("weight") and "norm" not in name]) == 7


def test_the_preset_has_the_official_loss_weights_and_schedule():
    config = build_run_config("saem")
    for epoch in range(30):
        alpha = 0 if epoch > 20 else 0.5 * (0.1 ** (epoch // 5))
        assert math.isclose(config.loss.weight("angular", epoch), alpha, rel_tol=1e-9)
        assert config.loss.weight("weight_norm", epoch) == 0.01 and config.loss.weight("triplet", epoch) == 1.0
    train_config, loss = config.train, config.loss
    assert (train_config.batch_size, train_config.learning_rate, train_config.lr_decay_epochs) == (64, 1e-4, 10)
    assert (loss.margin, loss.negatives, loss.exclude_same_image) == (0.2, "hardest", False)
    assert (config.model.embed_size, config.model.heads, config.model.max_words) == (256, 16, 32)


N_TEST = 50


def test_short_training_beats_chance_by_a_wide_margin(bert, tmp_path):
    spec = SyntheticSpec(n_regions=8, feature_dim=32, regions_per_object=(1, 2))
    data = make_synthetic(tmp_path / "scenes", {"train": 300, "dev": 30, "test": N_TEST}, seed=5, spec=spec)
    settings = {
        "model": {"embed_size": 64, "heads": 4, "feed_forward": 128, "channels": 64, "text": {"encoder": str(bert)}},
        "train": {
            "epochs": 4,
            "batch_size": 32,
            "learning_rate": 2e-3,
            "checkpoint_every": 0,
            "dev_max_captions": None,
        },
        "loss": {"negatives": "sum", "exclude_same_image": True},
    }
    torch.manual_seed(0)
    train(build_run_config("saem", settings), data, tmp_path / "run", progress=False, log=lambda *_: None)
    model = load_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    metrics = evaluate_split(model, PrecompSplit(data, "test"), progress=False)
    assert metrics["rsum"] > 2 * 6 * 100 * 5.5 / N_TEST, metrics  # twice the chance recalls (~66)
