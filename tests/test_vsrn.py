"""VSRN: the region-relation blocks are the official Rs_GCN (and the identity at initialisation),
the image vector reads the regions in order, the caption targets and loss are the official ones,
official checkpoints (written here as Python 2 wrote them) convert exactly, and short training
learns."""

from __future__ import annotations

import argparse
import pickle
import struct
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from itmatch import build_run_config, create_model, load_checkpoint
from itmatch.config import merge
from itmatch.convert.vsrn import convert_official_vsrn
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.errors import CheckpointError
from itmatch.evaluation.runner import evaluate_split
from itmatch.losses import TrainingContext
from itmatch.models.vsrn import caption_targets
from itmatch.training import train

SIZES = {"vocab_size": 30, "img_dim": 20, "embed_size": 24, "text": {"word_dim": 16}}
SIZES |= {"caption": {"hidden_size": 12, "word_dim": 8, "max_len": 9}}


def vsrn(preset="vsrn-f30k", **changes):
    torch.manual_seed(0)
    return create_model("vsrn", build_run_config(preset, {"model": merge(SIZES, changes)}).model)


def batch(n=5, n_regions=7, lengths=(3, 9, 5, 12, 2), seed=1):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, n_regions, 20, generator=generator)
    lengths = torch.tensor(lengths)
    tokens = torch.randint(4, 30, (len(lengths), 12), generator=generator)
    tokens[:, 0] = 1  # <start>
    tokens[torch.arange(len(lengths)), lengths - 1] = 2  # <end>
    return features, tokens * (torch.arange(12) < lengths[:, None]), lengths


def official_rs_gcn(block, v: torch.Tensor) -> torch.Tensor:
    """GCN_lib/Rs_GCN.py's forward on (B, D, N) with 1x1 convolutions holding the block's weights."""
    size = v.shape[1]
    conv = {}
    for name in ("g", "theta", "phi", "out"):
        conv[name] = nn.Conv1d(size, size, 1)
        conv[name].load_state_dict(
            {k: (w[..., None] if k == "weight" else w) for k, w in getattr(block, name).state_dict().items()}
        )
    g_v = conv["g"](v).permute(0, 2, 1)
    theta_v = conv["theta"](v).permute(0, 2, 1)
    phi_v = conv["phi"](v)
    relation = torch.matmul(theta_v, phi_v) / phi_v.shape[-1]
    y = torch.matmul(relation, g_v).permute(0, 2, 1).contiguous()
    return block.norm(conv["out"](y)) + v


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_each_gcn_block_is_the_identity_at_initialisation(mode):
    model = vsrn().train(mode == "train")
    regions = torch.randn(5, 7, 24)
    for block in model.gcn:
        torch.testing.assert_close(block(regions), regions, atol=0, rtol=0)
    assert len(model.gcn) == 4


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gcn_block_equals_the_official_convolutions(mode):
    block = vsrn().gcn[0].train(mode == "train")
    with torch.no_grad():  # a trained block: gain, bias and running statistics away from zero
        for tensor in (block.norm.weight, block.norm.bias, block.norm.running_mean):
            tensor.uniform_(-1, 1)
        block.norm.running_var.uniform_(0.5, 2)
    regions = torch.randn(5, 7, 24)
    expected = official_rs_gcn(block, regions.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(block(regions), expected, atol=1e-5, rtol=1e-5)


def test_image_vector_reads_the_regions_in_order_and_the_data_branch_decides_the_layers():
    f30k, coco = vsrn().eval(), vsrn("vsrn-coco").eval()
    features, _, _ = batch()
    order = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        vector, regions = f30k.reason(features)
        shuffled, shuffled_regions = f30k.reason(features[:, order])
    torch.testing.assert_close(shuffled_regions, regions[:, order])  # the GCN is order-equivariant...
    assert (shuffled - vector).abs().max() > 1e-3  # ...the GRU is not
    torch.testing.assert_close(vector.norm(dim=1), torch.ones(5))
    assert isinstance(f30k.final_norm, nn.BatchNorm1d) and coco.final_norm is None
    seen = []
    coco.gcn[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    coco.encode_images(features)
    torch.testing.assert_close(seen[0].norm(dim=-1), torch.ones(5, 7))  # COCO: unit regions after fc


def official_targets(caption: list[int], max_len: int) -> tuple[list[int], list[float]]:
    """data.py's caption_label / caption_mask of one caption (ids with <start> and <end>)."""
    gts, mask = [0] * (max_len + 1), [0.0] * (max_len + 1)
    if len(caption) > max_len - 1:
        caption = caption[:max_len]
        caption[-1] = 2
    gts[: len(caption)] = caption
    first_zero = gts.index(0)
    mask[: first_zero + 1] = [1.0] * (first_zero + 1)
    return gts, mask


@pytest.mark.parametrize("max_len", [4, 8, 9, 12, 60])
def test_caption_targets_are_the_official_ones(max_len):
    _, tokens, lengths = batch()
    labels, mask = caption_targets(tokens, lengths, max_len)
    for row, length in enumerate(lengths.tolist()):
        gts, official_mask = official_targets(tokens[row, :length].tolist(), max_len)
        # the decoder's max_len - 1 steps predict positions 1 .. max_len - 1, where we stop at the longest
        width = labels.shape[1]
        assert labels[row].tolist() == gts[:width] and mask[row].tolist() == official_mask[:width]
        assert not any(official_mask[width:max_len])


def official_caption_loss(decoder, regions, tokens, lengths, max_len) -> torch.Tensor:
    """S2VTAttModel in train mode as the official code runs it: all max_len - 1 steps, the
    attention on the concatenation [encoder output; hidden] each step, LanguageModelCriterion."""
    labels, mask = [], []
    for row, length in enumerate(lengths.tolist()):
        gts, official_mask = official_targets(tokens[row, :length].tolist(), max_len)
        labels.append(gts)
        mask.append(official_mask)
    labels, mask = torch.tensor(labels), torch.tensor(mask)
    states, hidden = decoder.region_rnn(decoder.region_in(regions))
    hidden = hidden[0]
    outputs = []
    for step in range(max_len - 1):
        pairs = torch.cat([states, hidden[:, None].expand_as(states)], dim=2)
        alpha = decoder.attention_out(torch.tanh(decoder.attention_in(pairs))).squeeze(2).softmax(1)
        context = torch.bmm(alpha[:, None], states).squeeze(1)
        hidden = decoder.cell(torch.cat([decoder.embed(labels[:, step]), context], dim=1), hidden)
        outputs.append(torch.log_softmax(decoder.out(hidden), dim=1))
    logprobs = torch.stack(outputs, 1)
    nll = -logprobs.gather(2, labels[:, 1:max_len, None]).squeeze(2)
    return (nll * mask[:, 1:max_len]).sum() / len(tokens)


@pytest.mark.parametrize("max_len", [5, 9, 60])
def test_caption_loss_equals_the_official_decoder(max_len):
    model = vsrn(caption={"max_len": max_len}).eval()
    features, tokens, lengths = batch()
    with torch.no_grad():
        _, regions = model.reason(features)
        loss = model.captioner.loss(regions, tokens, lengths)
        expected = official_caption_loss(model.captioner, regions, tokens, lengths, max_len)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_training_losses_are_the_hinge_and_the_caption_terms():
    model = vsrn().train()
    features, tokens, lengths = batch()
    context = TrainingContext(build_run_config("vsrn-f30k").loss)
    terms = model.training_losses(
        {"features": features, "tokens": tokens, "lengths": lengths, "image_index": torch.arange(5)}, context
    )
    assert set(terms) == {"triplet", "caption"} and all(torch.isfinite(t) and t > 0 for t in terms.values())
    terms["caption"].backward()
    # the caption branch trains the reasoned regions (here through the gcn blocks' BatchNorm gains), not the text
    assert model.image_proj.weight.grad.abs().sum() > 0 and model.gcn[3].norm.weight.grad.abs().sum() > 0
    assert model.text_encoder.embed.weight.grad is None
    assert build_run_config("vsrn-f30k").loss.weight("caption", 29) == 1.0


def test_the_shared_loss_terms_come_with_the_caption_term():
    model = vsrn().train()
    features, tokens, lengths = batch()
    config = build_run_config("vsrn-f30k", {"loss": {"terms": ["triplet", "cmpm"]}})
    inputs = {"features": features, "tokens": tokens, "lengths": lengths, "image_index": torch.arange(5)}
    assert set(model.training_losses(inputs, TrainingContext(config.loss))) == {"triplet", "cmpm", "caption"}


# -- the official checkpoint ------------------------------------------------------------------------
class Python2Pickler(pickle._Pickler):
    """Writes every str as a Python 2 byte string (SHORT_BINSTRING / BINSTRING), as the official
    train.py, run by Python 2.7, pickled its Namespace and state dict keys."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, value: str) -> None:
        data = value.encode("utf-8")
        short = len(data) < 256
        self.write(
            (pickle.SHORT_BINSTRING + bytes([len(data)]))
            if short
            else (pickle.BINSTRING + struct.pack("<i", len(data)))
        )
        self.write(data)
        self.memoize(value)

    dispatch[str] = save_py2_str


PYTHON2_PICKLE = types.SimpleNamespace(
    __name__="python2_pickle",
    Pickler=Python2Pickler,
    dump=lambda value, file, protocol: Python2Pickler(file, protocol).dump(value),
)


def official_layout(model, data_name: str, with_batch_count: bool = True) -> dict:
    """The model's weights under the official names and shapes: [img_enc, txt_enc], Rs_GCN_k
    with Conv1d weights (D, D, 1), W = Sequential(conv, BatchNorm), bn for the F30K branch."""
    state = model.state_dict()
    image, text = OrderedDict(), OrderedDict()
    renames = {"image_proj.": "fc.", "region_rnn.": "img_rnn.", "final_norm.": "bn."}
    for key, value in state.items():
        if key.startswith("gcn."):
            _, index, module, name = key.split(".")
            official = {"out": "W.0", "norm": "W.1"}.get(module, module)
            value = value[..., None] if (module != "norm" and name == "weight") else value
            key = f"Rs_GCN_{int(index) + 1}.{official}.{name}"
        elif key.startswith("text_encoder."):
            text[key[len("text_encoder.") :]] = value.clone()
            continue
        elif key.startswith("captioner."):
            continue  # not saved by the official state_dict()
        else:
            key = next(new + key[len(old) :] for old, new in renames.items() if key.startswith(old))
        if with_batch_count or not key.endswith("num_batches_tracked"):
            image[key] = value.clone()
    opt = argparse.Namespace(
        data_name=data_name,
        margin=0.2,
        num_epochs=30,
        batch_size=128,
        word_dim=16,
        embed_size=24,
        grad_clip=2.0,
        num_layers=1,
        learning_rate=0.0002,
        lr_update=10,
        max_violation=True,
        img_dim=20,
        measure="cosine",
        use_abs=False,
        no_imgnorm=False,
        finetune=False,
        dim_vid=24,
        dim_hidden=12,
        input_dropout_p=0.2,
        rnn_dropout_p=0.5,
        dim_word=8,
        max_len=9,
        vocab_size=30,
        logger_name="runs/flickr_VSRN",
    )
    return {"epoch": 12, "model": [image, text], "best_rsum": 470.5, "opt": opt, "Eiters": 9000}


def trained_looking(model):
    """Weights away from the initialisation (GCN gains, running statistics), as a trained model has."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(noise + 0.5 if name.endswith("running_var") else tensor + 0.3 * (noise - 0.5))
    return model.eval()


@pytest.mark.parametrize("preset, data_name", [("vsrn-f30k", "f30k_precomp"), ("vsrn-coco", "coco_precomp")])
def test_official_checkpoint_written_by_python2_converts_exactly(tmp_path, preset, data_name):
    original = trained_looking(vsrn(preset))
    payload = official_layout(original, data_name, with_batch_count=data_name == "coco_precomp")
    path = tmp_path / "model_best.pth.tar"
    torch.save(payload, path, pickle_module=PYTHON2_PICKLE, pickle_protocol=2, _use_new_zipfile_serialization=False)
    assert pickle.SHORT_BINSTRING + bytes([len("data_name")]) + b"data_name" in path.read_bytes()
    with pytest.raises(CheckpointError, match="official vsrn .*itmatch convert official-vsrn"):
        load_checkpoint(path)  # recognised as VSRN's, not as SCAN's of the same [img_enc, txt_enc] layout

    convert_official_vsrn(path, tmp_path / "vsrn.pt")
    model = load_checkpoint(tmp_path / "vsrn.pt", device="cpu", architecture="vsrn", preset=preset)
    config, run = model.config, model.run_config
    assert (config.embed_size, config.img_dim, config.vocab_size, config.gcn_blocks) == (24, 20, 30, 4)
    assert (config.caption.hidden_size, config.caption.word_dim, config.caption.max_len) == (12, 8, 9)
    assert (run.train.lr_decay_epochs, run.loss.negatives) == (10, "hardest")
    features, tokens, lengths = batch()
    with torch.no_grad():
        expected = original.similarity(features, tokens, lengths)
        torch.testing.assert_close(model.similarity(features, tokens, lengths), expected, atol=1e-6, rtol=0)
    assert (expected - expected.mean()).abs().max() > 1e-3  # not a constant score


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p["opt"].__setattr__("data_name", "coco_precomp"), "data_name is 'coco_precomp' but"),
        (lambda p: p["model"][0].__setitem__("Rs_GCN_1.extra.weight", torch.zeros(1)), "unexpected tensor img_enc"),
        (lambda p: p["model"][0].pop("Rs_GCN_2.theta.weight"), "theta"),
        (lambda p: p["model"][0].__setitem__("Rs_GCN_1.g.weight", torch.zeros(24, 24, 3)), "1x1 convolution"),
        (lambda p: p["opt"].__setattr__("use_abs", True), "--use_abs is not supported"),
        (lambda p: p["opt"].__setattr__("embed_size", 32), "opt.embed_size is 32 but the tensors give 24"),
    ],
)
def test_malformed_official_checkpoints_are_one_line(tmp_path, damage, message):
    payload = official_layout(vsrn(), "f30k_precomp")
    damage(payload)
    torch.save(payload, tmp_path / "bad.pth.tar")
    with pytest.raises(CheckpointError, match=message) as error:
        convert_official_vsrn(tmp_path / "bad.pth.tar", tmp_path / "out.pt")
    assert "\n" not in str(error.value)


# -- training ---------------------------------------------------------------------------------------
N_TEST = 50


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    spec = SyntheticSpec(n_regions=8, feature_dim=32, regions_per_object=(1, 2))
    return make_synthetic(
        tmp_path_factory.mktemp("scenes"), {"train": 300, "dev": 30, "test": N_TEST}, seed=5, spec=spec
    )


def test_short_training_beats_chance_by_a_wide_margin(scenes, tmp_path):
    settings = {
        "model": {"embed_size": 64, "text": {"word_dim": 32}, "caption": {"hidden_size": 32, "word_dim": 16}},
        "train": {
            "epochs": 6,
            "batch_size": 32,
            "learning_rate": 2e-3,
            "checkpoint_every": 0,
            "dev_max_captions": None,
        },
        "loss": {"negatives": "sum", "exclude_same_image": True},
    }
    torch.manual_seed(0)
    train(build_run_config("vsrn-f30k", settings), scenes, tmp_path, progress=False, log=lambda *_: None)
    model = load_checkpoint(tmp_path / "best.pt", device="cpu")
    metrics = evaluate_split(model, PrecompSplit(scenes, "test"), progress=False)
    # twice the chance recalls (~66), as the other pooled embeddings' tests (measured: 190)
    assert metrics["rsum"] > 2 * 6 * 100 * 5.5 / N_TEST, metrics
