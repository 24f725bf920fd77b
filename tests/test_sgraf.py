"""SGRAF (SGR and SAF) against a per-caption reference loop that follows the official code
(github.com/Paranioar/SGRAF, model.py: EncoderImage, EncoderText, VisualSA, TextSA, SCAN_attention,
GraphReasoning, AttentionFiltration, EncoderSimilarity.forward), official checkpoint conversion,
and short training runs on synthetic scenes."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmatch import build_run_config, create_model, load_checkpoint
from itmatch.config import merge
from itmatch.convert.sgraf import convert_official_sgraf
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.data.vocab import SPECIALS, Vocabulary
from itmatch.errors import CheckpointError
from itmatch.evaluation.runner import evaluate_split
from itmatch.scoring import ScoringOptions, score_grid
from itmatch.training import train

ATOL = 1e-5
SIZES = {"vocab_size": 40, "img_dim": 20, "n_regions": 7, "embed_size": 24, "sim_dim": 12, "text": {"word_dim": 16}}


# -- the reference: the official forward pass, one caption at a time, on official tensor names ----
def ref_l2norm(x, dim=-1):
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + 1e-8)


def ref_l1norm(x, dim):
    return x / (x.abs().sum(dim=dim, keepdim=True) + 1e-8)


def linear(x, state, prefix):
    return F.linear(x, state[prefix + "weight"], state[prefix + "bias"])


def batchnorm(x, state, prefix, training):
    """nn.BatchNorm1d: in training, batch statistics and an in-place update of the running ones."""
    return F.batch_norm(
        x,
        state[prefix + "running_mean"],
        state[prefix + "running_var"],
        state[prefix + "weight"],
        state[prefix + "bias"],
        training=training,
        momentum=0.1,
        eps=1e-5,
    )


def ref_images(img_state, images, no_imgnorm=False):
    emb = linear(images, img_state, "fc.")
    return emb if no_imgnorm else ref_l2norm(emb)


def ref_texts(txt_state, captions, lengths, bi_gru=True, num_layers=1):
    word_dim = txt_state["embed.weight"].shape[1]
    embed_size = txt_state["cap_rnn.weight_hh_l0"].shape[1]
    rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bi_gru)
    rnn.load_state_dict({k[len("cap_rnn.") :]: v for k, v in txt_state.items() if k.startswith("cap_rnn.")})
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))  # the official loader sorts
    sorted_lengths = [int(lengths[i]) for i in order]
    packed = pack_padded_sequence(F.embedding(captions[order], txt_state["embed.weight"]), sorted_lengths, True)
    out, _ = pad_packed_sequence(rnn(packed)[0], batch_first=True)
    if bi_gru:
        out = (out[:, :, : out.size(2) // 2] + out[:, :, out.size(2) // 2 :]) / 2
    out = ref_l2norm(out)
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return unsorted


def ref_self_attention(state, prefix, local, raw_global, training, batchnorms):
    """VisualSA (batchnorms=True) / TextSA; dropout is off in these tests."""
    l_emb = linear(local, state, prefix + "embedding_local.0.")
    g_emb = linear(raw_global, state, prefix + "embedding_global.0.")
    if batchnorms:
        l_emb = batchnorm(l_emb, state, prefix + "embedding_local.1.", training)
        g_emb = batchnorm(g_emb, state, prefix + "embedding_global.1.", training)
    l_emb, g_emb = torch.tanh(l_emb), torch.tanh(g_emb)
    g_emb = g_emb.unsqueeze(1).repeat(1, l_emb.size(1), 1)
    weights = torch.softmax(linear(l_emb * g_emb, state, prefix + "embedding_common.0.").squeeze(2), dim=1)
    return ref_l2norm((weights.unsqueeze(2) * local).sum(dim=1))


def ref_scan_attention(query, context, smooth):
    attn = torch.bmm(context, query.transpose(1, 2))  # (n, regions, words)
    attn = ref_l2norm(F.leaky_relu(attn, 0.1), 2)  # over the words
    attn = torch.softmax(attn.transpose(1, 2) * smooth, dim=2)  # (n, words, regions)
    return ref_l2norm(torch.bmm(context.transpose(1, 2), attn.transpose(1, 2)).transpose(1, 2))


def ref_similarity(sim_state, module, img_emb, cap_emb, cap_lens, training=False):
    """EncoderSimilarity.forward: (n_image, n_caption)."""
    n_image = img_emb.size(0)
    img_glo = ref_self_attention(sim_state, "v_global_w.", img_emb, img_emb.mean(1), training, True)
    columns = []
    for i in range(cap_emb.size(0)):
        cap_i = cap_emb[i, : int(cap_lens[i])].unsqueeze(0)
        cap_i_expand = cap_i.repeat(n_image, 1, 1)
        cap_glo_i = ref_self_attention(sim_state, "t_global_w.", cap_i, cap_i.mean(1), training, False)

        context_img = ref_scan_attention(cap_i_expand, img_emb, smooth=9.0)
        sim_loc = ref_l2norm(linear((context_img - cap_i_expand).pow(2), sim_state, "sim_tranloc_w."))
        sim_glo = ref_l2norm(linear((img_glo - cap_glo_i).pow(2), sim_state, "sim_tranglo_w."))
        sim_emb = torch.cat([sim_glo.unsqueeze(1), sim_loc], 1)

        if module == "SGR":
            step = 0
            while f"SGR_module.{step}.graph_query_w.weight" in sim_state:
                prefix = f"SGR_module.{step}."
                query = linear(sim_emb, sim_state, prefix + "graph_query_w.")
                key = linear(sim_emb, sim_state, prefix + "graph_key_w.")
                edge = torch.softmax(torch.bmm(query, key.permute(0, 2, 1)), dim=-1)
                sim_emb = torch.relu(linear(torch.bmm(edge, sim_emb), sim_state, prefix + "sim_graph_w."))
                step += 1
            sim_vec = sim_emb[:, 0, :]
        else:
            gate_logits = linear(sim_emb, sim_state, "SAF_module.attn_sim_w.").permute(0, 2, 1)
            gate_logits = batchnorm(gate_logits, sim_state, "SAF_module.bn.", training)
            sim_attn = ref_l1norm(torch.sigmoid(gate_logits), dim=-1)
            sim_vec = ref_l2norm(torch.matmul(sim_attn, sim_emb).squeeze(1))
        columns.append(torch.sigmoid(linear(sim_vec, sim_state, "sim_eval_w.")))
    return torch.cat(columns, 1)


def ref_scores(parts, module, images, captions, lengths, training=False):
    img_state, txt_state, sim_state = parts
    img_emb = ref_images(img_state, images)
    cap_emb = ref_texts(txt_state, captions, lengths, bi_gru="cap_rnn.weight_ih_l0_reverse" in txt_state)
    return ref_similarity(sim_state, module, img_emb, cap_emb, lengths, training)


# -- our model's tensors under the official names (written out here, not taken from the converter) --
OFFICIAL_NAMES = [
    ("image_proj.", 0, "fc."),
    ("text_encoder.embed.", 1, "embed."),
    ("text_encoder.rnn.", 1, "cap_rnn."),
    ("image_pool.item_proj.", 2, "v_global_w.embedding_local.0."),
    ("image_pool.item_norm.", 2, "v_global_w.embedding_local.1."),
    ("image_pool.mean_proj.", 2, "v_global_w.embedding_global.0."),
    ("image_pool.mean_norm.", 2, "v_global_w.embedding_global.1."),
    ("image_pool.score.", 2, "v_global_w.embedding_common.0."),
    ("text_pool.item_proj.", 2, "t_global_w.embedding_local.0."),
    ("text_pool.mean_proj.", 2, "t_global_w.embedding_global.0."),
    ("text_pool.score.", 2, "t_global_w.embedding_common.0."),
    ("word_align.proj.", 2, "sim_tranloc_w."),
    ("global_align.proj.", 2, "sim_tranglo_w."),
    ("head.", 2, "sim_eval_w."),
    ("filter_score.", 2, "SAF_module.attn_sim_w."),
    ("filter_norm.", 2, "SAF_module.bn."),
]
GRAPH_NAMES = {"query": "graph_query_w", "key": "graph_key_w", "update": "sim_graph_w"}


def official_parts(model) -> list[dict]:
    parts = [{}, {}, {}]
    for key, value in model.state_dict().items():
        graph = re.fullmatch(r"reasoning\.(\d+)\.(query|key|update)\.(.*)", key)
        if graph:
            step, layer, rest = graph.groups()
            parts[2][f"SGR_module.{step}.{GRAPH_NAMES[layer]}.{rest}"] = value.clone()
            continue
        ours, part, theirs = next(entry for entry in OFFICIAL_NAMES if key.startswith(entry[0]))
        parts[part][theirs + key[len(ours) :]] = value.clone()
    return parts


def small_model(preset: str, **changes):
    config = build_run_config(preset, {"model": merge(SIZES, changes)})
    torch.manual_seed(0)
    model = create_model("sgraf", config.model)
    with torch.no_grad():  # biases and BatchNorm statistics away from their initial values
        for name, value in model.state_dict().items():
            if name.endswith("bias") and "text_encoder" not in name:
                value.add_(0.1 * torch.randn_like(value))
            elif name.endswith("running_mean"):
                value.copy_(0.1 * torch.randn_like(value))
            elif name.endswith("running_var"):
                value.copy_(0.5 + torch.rand_like(value))
            elif name.endswith("norm.weight"):
                value.copy_(0.5 + torch.rand_like(value))
    return model


def inputs(n_images=5, n_captions=7, max_length=9, seed=0, vocab_size=40, n_regions=7, img_dim=20):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n_images, n_regions, img_dim, generator=generator)
    lengths = torch.tensor([9, 2, 5, 1, 7, 3, 9][:n_captions])
    tokens = torch.randint(4, vocab_size, (n_captions, max_length), generator=generator)
    return images, tokens * (torch.arange(max_length) < lengths[:, None]), lengths


@pytest.mark.parametrize("preset", ["sgraf-sgr", "sgraf-saf"])
def test_batched_scores_equal_the_official_per_caption_loop(preset):
    model = small_model(preset).eval()
    images, tokens, lengths = inputs()
    module = model.config.module
    with torch.no_grad():
        expected = ref_scores(official_parts(model), module, images, tokens, lengths)
        sims = model.similarity(images, tokens, lengths)
        tiny_tiles = score_grid(
            model, model.encode_images(images), model.encode_texts(tokens, lengths), ScoringOptions(memory_budget=1)
        )
    assert sims.shape == (5, 7)
    torch.testing.assert_close(sims, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny_tiles, expected, atol=ATOL, rtol=0)
    assert (expected.max() - expected.min()) > 1e-2  # not a trivially constant matrix


def test_sgr_with_one_step_and_no_steps_equals_the_loop():
    for steps in (0, 1):
        model = small_model("sgraf-sgr", sgr_steps=steps).eval()
        images, tokens, lengths = inputs(seed=steps)
        with torch.no_grad():
            expected = ref_scores(official_parts(model), "SGR", images, tokens, lengths)
            torch.testing.assert_close(model.similarity(images, tokens, lengths), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("preset", ["sgraf-sgr", "sgraf-saf"])
def test_training_mode_statistics_equal_the_official_loop(preset):
    """With dropout off, a training forward pass (BatchNorm batch statistics, running-statistics
    updates: SAF's once per caption) matches the official loop run in training mode."""
    model = small_model(preset, pool_dropout=0.0, text={"dropout": 0.0}).train()
    parts = official_parts(model)
    images, tokens, lengths = inputs(n_images=6, seed=3)
    with torch.no_grad():
        expected = ref_scores(parts, model.config.module, images, tokens, lengths, training=True)
        scores = model.similarity(images, tokens, lengths)
    torch.testing.assert_close(scores, expected, atol=ATOL, rtol=0)
    after = official_parts(model)
    for part, state in enumerate(parts):
        for key, value in state.items():
            if "running" in key:
                torch.testing.assert_close(after[part][key], value, atol=1e-6, rtol=0, msg=key)
    if preset == "sgraf-saf":
        assert int(after[2]["SAF_module.bn.num_batches_tracked"]) == len(lengths)


def test_padding_words_change_no_training_gradient():
    for preset in ("sgraf-sgr", "sgraf-saf"):
        model = small_model(preset, pool_dropout=0.0, text={"dropout": 0.0}).train()
        images, tokens, lengths = inputs(n_images=7)
        losses = []
        for extra in (0, 6):
            model.zero_grad()
            scores = model.similarity(images, F.pad(tokens, (0, extra)), lengths)
            scores.sum().backward()
            # every parameter takes part (DistributedDataParallel needs it), padded or not
            assert all(p.grad is not None for p in model.parameters())
            losses.append([p.grad.clone() for p in model.parameters()])
        for short, padded in zip(*losses, strict=True):
            torch.testing.assert_close(padded, short, atol=1e-5, rtol=1e-4)


# -- official checkpoints --------------------------------------------------------------------
def official_payload(module: str, data_name: str = "f30k_precomp", seed: int = 1) -> dict:
    """A checkpoint as the official train.py saves it, with random non-trivial tensors."""
    g = torch.Generator().manual_seed(seed)
    vocab, word, dim, img, sim, regions = 40, 16, 24, 20, 12, 7

    def rand(*shape, scale=None):
        scale = scale if scale is not None else 1.0 / shape[-1] ** 0.5
        return torch.randn(*shape, generator=g) * scale

    def lin(prefix, out_dim, in_dim):
        return {prefix + "weight": rand(out_dim, in_dim), prefix + "bias": rand(out_dim, scale=0.1)}

    def bn(prefix, n):
        return {
            prefix + "weight": 0.5 + torch.rand(n, generator=g),
            prefix + "bias": rand(n, scale=0.1),
            prefix + "running_mean": rand(n, scale=0.1),
            prefix + "running_var": 0.5 + torch.rand(n, generator=g),
            prefix + "num_batches_tracked": torch.tensor(1234),
        }

    img_enc = lin("fc.", dim, img)
    txt_enc = {"embed.weight": torch.rand(vocab, word, generator=g) * 0.2 - 0.1}
    for suffix in ("", "_reverse"):
        txt_enc |= {
            f"cap_rnn.weight_ih_l0{suffix}": rand(3 * dim, word),
            f"cap_rnn.weight_hh_l0{suffix}": rand(3 * dim, dim),
            f"cap_rnn.bias_ih_l0{suffix}": rand(3 * dim, scale=0.1),
            f"cap_rnn.bias_hh_l0{suffix}": rand(3 * dim, scale=0.1),
        }
    sim_enc = {
        **lin("v_global_w.embedding_local.0.", dim, dim),
        **bn("v_global_w.embedding_local.1.", regions),
        **lin("v_global_w.embedding_global.0.", dim, dim),
        **bn("v_global_w.embedding_global.1.", dim),
        **lin("v_global_w.embedding_common.0.", 1, dim),
        **lin("t_global_w.embedding_local.0.", dim, dim),
        **lin("t_global_w.embedding_global.0.", dim, dim),
        **lin("t_global_w.embedding_common.0.", 1, dim),
        **lin("sim_tranloc_w.", sim, dim),
        **lin("sim_tranglo_w.", sim, dim),
        "sim_eval_w.weight": rand(1, sim, scale=3.0),
        "sim_eval_w.bias": rand(1, scale=0.1),
    }
    if module == "SGR":
        for step in range(3):
            for name in ("graph_query_w", "graph_key_w", "sim_graph_w"):
                sim_enc |= lin(f"SGR_module.{step}.{name}.", sim, sim)
    else:
        sim_enc |= lin("SAF_module.attn_sim_w.", 1, sim) | bn("SAF_module.bn.", 1)
    opt = argparse.Namespace(
        data_path="/data",
        data_name=data_name,
        vocab_path="/vocab",
        model_name="/runs/checkpoint",
        logger_name="/runs/log",
        batch_size=128,
        num_epochs=40 if module == "SGR" else 30,
        lr_update=30 if module == "SGR" else 20,
        learning_rate=0.0002,
        workers=10,
        log_step=10,
        val_step=1000,
        grad_clip=2.0,
        margin=0.2,
        max_violation=True,
        img_dim=img,
        word_dim=word,
        embed_size=dim,
        sim_dim=sim,
        num_layers=1,
        bi_gru=True,
        no_imgnorm=False,
        no_txtnorm=False,
        module_name=module,
        sgr_step=3,
        vocab_size=vocab,
    )
    return {"epoch": 17, "model": [img_enc, txt_enc, sim_enc], "best_rsum": 480.5, "opt": opt, "Eiters": 9999}


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_converted_official_checkpoint_equals_the_loop_on_the_raw_tensors(tmp_path, module):
    payload = official_payload(module)
    torch.save(payload, tmp_path / "model_best.pth.tar")
    words = [*SPECIALS, *(f"w{i}" for i in range(36))]
    Vocabulary(words).save(tmp_path / "vocab.json")
    convert_official_sgraf(tmp_path / "model_best.pth.tar", tmp_path / "sgraf.pt", tmp_path / "vocab.json")
    model = load_checkpoint(tmp_path / "sgraf.pt", device="cpu")

    config = model.run_config
    assert config.preset == f"sgraf-{module.lower()}" and config.model.module == module
    assert (config.model.img_dim, config.model.embed_size, config.model.sim_dim) == (20, 24, 12)
    assert (config.model.vocab_size, config.model.n_regions, config.model.text.word_dim) == (40, 7, 16)
    assert config.model.text.bidirectional and config.model.text.dropout == 0.4
    assert config.train.epochs == payload["opt"].num_epochs and config.loss.negatives == "hardest"
    assert len(model.vocab) == 40

    images, tokens, lengths = inputs(seed=4)
    with torch.no_grad():
        expected = ref_scores(payload["model"], module, images, tokens, lengths)
        torch.testing.assert_close(model.similarity(images, tokens, lengths), expected, atol=ATOL, rtol=0)
    assert (expected.max() - expected.min()) > 1e-2


def test_coco_checkpoint_gets_the_coco_preset(tmp_path):
    torch.save(official_payload("SAF", data_name="coco_precomp"), tmp_path / "coco.pth.tar")
    convert_official_sgraf(tmp_path / "coco.pth.tar", tmp_path / "coco.pt")
    assert load_checkpoint(tmp_path / "coco.pt", device="cpu").run_config.preset == "sgraf-saf-coco"


def _pop(part, key):
    return lambda p: p["model"][part].pop(key)


@pytest.mark.parametrize(
    "module, damage, message",
    [
        ("SGR", lambda p: p["model"][2].__setitem__("extra.weight", torch.zeros(1)), "unexpected tensor sim_enc.extra"),
        ("SAF", lambda p: p["model"][0].__setitem__("pos.weight", torch.zeros(1)), "unexpected tensor img_enc.pos"),
        ("SAF", lambda p: p["model"][0].__setitem__("fc.scale", torch.zeros(1)), "(?s)do not fit.*image_proj.scale"),
        ("SGR", _pop(2, "sim_eval_w.weight"), "missing tensor for head.weight"),
        ("SAF", _pop(2, "SAF_module.bn.running_var"), "missing tensor for filter_norm.running_var"),
        ("SGR", _pop(2, "SGR_module.1.graph_key_w.bias"), "(?s)do not fit.*reasoning.1.key.bias"),
        ("SGR", lambda p: [p["model"][2].pop(k) for k in list(p["model"][2]) if ".2." in k], "sgr_step is 3"),
        ("SGR", lambda p: setattr(p["opt"], "module_name", "SAF"), "module_name is 'SAF'"),
        ("SAF", lambda p: p["model"].pop(), "list of 3 state dicts"),
        ("SAF", lambda p: p.pop("opt"), "expected a dict with 'model' and 'opt'"),
    ],
)
def test_damaged_official_checkpoints_are_named(tmp_path, module, damage, message):
    payload = official_payload(module)
    damage(payload)
    torch.save(payload, tmp_path / "bad.pth.tar")
    with pytest.raises(CheckpointError, match=message) as error:
        convert_official_sgraf(tmp_path / "bad.pth.tar", tmp_path / "out.pt")
    assert "bad.pth.tar" in str(error.value)
    assert not (tmp_path / "out.pt").exists()


def test_wrong_vocabulary_size_is_named(tmp_path):
    torch.save(official_payload("SGR"), tmp_path / "sgr.pth.tar")
    Vocabulary([*SPECIALS, "a", "b"]).save(tmp_path / "small_vocab.json")
    with pytest.raises(CheckpointError, match="40 word embeddings but .*small_vocab.json has 6 words") as error:
        convert_official_sgraf(tmp_path / "sgr.pth.tar", tmp_path / "out.pt", tmp_path / "small_vocab.json")
    assert "sgr.pth.tar" in str(error.value)


def test_options_without_a_bigru_and_norms_are_read(tmp_path):
    payload = official_payload("SGR")
    payload["model"][1] = {k: v for k, v in payload["model"][1].items() if not k.endswith("_reverse")}
    payload["opt"].bi_gru, payload["opt"].no_imgnorm, payload["opt"].max_violation = False, True, False
    torch.save(payload, tmp_path / "uni.pth.tar")
    convert_official_sgraf(tmp_path / "uni.pth.tar", tmp_path / "uni.pt")
    config = load_checkpoint(tmp_path / "uni.pt", device="cpu").run_config
    assert not config.model.text.bidirectional and not config.model.image_norm
    assert config.loss.negatives == "sum"


# -- short training runs -------------------------------------------------------------------------
N_TEST = 50
FAST = {
    "model": {"embed_size": 32, "sim_dim": 16, "text": {"word_dim": 32}},
    "train": {
        "batch_size": 32,
        "learning_rate": 3e-3,
        "checkpoint_every": 0,
        "dev_max_captions": None,
        "epochs": 4,
    },
    "loss": {"negatives": "sum", "exclude_same_image": True},
}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    spec = SyntheticSpec(n_regions=8, feature_dim=32, regions_per_object=(1, 2))
    return make_synthetic(
        tmp_path_factory.mktemp("scenes"), {"train": 400, "dev": 40, "test": N_TEST}, seed=5, spec=spec
    )


@pytest.mark.parametrize("preset", ["sgraf-sgr", "sgraf-saf"])
def test_short_training_beats_chance_by_a_wide_margin(scenes, tmp_path, preset):
    torch.manual_seed(0)
    config = build_run_config(preset, copy.deepcopy(FAST))
    train(config, scenes, tmp_path, progress=False, log=lambda *_: None)
    model = load_checkpoint(tmp_path / "best.pt", device="cpu")
    metrics = evaluate_split(model, PrecompSplit(scenes, "test"), progress=False)
    chance_t2i_r10 = 100 * 10 / N_TEST
    assert metrics["t2i"]["r10"] > 2.5 * chance_t2i_r10, metrics
    assert metrics["rsum"] > 2 * 6 * 100 * 5.5 / N_TEST, metrics  # twice the chance recalls (~66)
    assert dataclasses.asdict(model.config)["module"] == preset.split("-")[1].upper()


def test_score_takes_every_option_of_the_common_interface():
    model = small_model("sgraf-saf").eval()
    images, tokens, lengths = inputs()
    with torch.no_grad():
        encoded = model.encode_images(images), model.encode_texts(tokens, lengths)
        options = score_grid(model, *encoded, ScoringOptions(memory_budget=1, precision="fp32", compile=False))
        torch.testing.assert_close(options, score_grid(model, *encoded))
