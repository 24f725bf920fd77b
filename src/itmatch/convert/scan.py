"""Official SCAN checkpoints (github.com/kuanghuei/SCAN) as itmatch checkpoints.

train.py saves `{'model': [img_enc.state_dict(), txt_enc.state_dict()], 'opt': argparse.Namespace,
'epoch', 'best_rsum', 'Eiters'}`. The preset is chosen by the options the model was trained with
(--cross_attn, --agg_func, --data_name) and then set to every model option of the checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from itmatch.config import build_run_config
from itmatch.convert.official import (
    check_option_sizes,
    map_state,
    read_official_checkpoint,
    require,
    save_converted,
    schedule_overrides,
    text_overrides,
)
from itmatch.errors import CheckpointError

# The official state is a list [img_enc, txt_enc]; EncoderImagePrecomp's Linear is `fc`, and
# EncoderText has `embed` and the GRU `rnn`.
SCAN_KEY_MAP = [
    (0, r"fc\.(weight|bias)", r"image_proj.\1"),
    (1, r"embed\.(weight)", r"text_encoder.embed.\1"),
    (1, r"rnn\.((?:weight|bias)_(?:ih|hh)_l\d+(?:_reverse)?)", r"text_encoder.rnn.\1"),
]
SCAN_PARTS = ["img_enc", "txt_enc"]

# --raw_feature_norm -> (activation, normalization) of CrossAttentionConfig
RAW_FEATURE_NORMS = {
    "clipped_l2norm": ("leaky_relu", "l2"),
    "l2norm": ("none", "l2"),
    "clipped_l1norm": ("leaky_relu", "l1"),
    "l1norm": ("none", "l1"),
    "softmax": ("none", "softmax"),
    "clipped": ("leaky_relu", "none"),
    "no_norm": ("none", "none"),
}
AGG_FUNCS = {"LogSumExp": "lse", "Mean": "mean", "Max": "max", "Sum": "sum"}
# train.py's defaults, for options an older checkpoint may not have
DEFAULTS = {
    "cross_attn": "t2i",
    "agg_func": "LogSumExp",
    "raw_feature_norm": "clipped_l2norm",
    "lambda_softmax": 9.0,
    "lambda_lse": 6.0,
    "precomp_enc_type": "basic",
    "no_imgnorm": False,
    "data_name": "precomp",
}


def _option(opt: argparse.Namespace, name: str, allowed, path: Path):
    value = vars(opt).get(name, DEFAULTS[name])
    if value not in allowed:
        raise CheckpointError(path, f"--{name}={value!r} is not supported; itmatch knows {', '.join(allowed)}")
    return value


def scan_preset(opt: argparse.Namespace, path: Path) -> str:
    """The preset whose README command matches the checkpoint's direction, pooling and data."""
    direction = _option(opt, "cross_attn", ("t2i", "i2t"), path)
    pooling = "lse" if _option(opt, "agg_func", AGG_FUNCS, path) == "LogSumExp" else "ave"
    coco = "coco" in str(vars(opt).get("data_name", DEFAULTS["data_name"]))
    return f"scan-{direction}-{pooling}" + ("-coco" if coco else "")


def scan_overrides(opt: argparse.Namespace, state: dict[str, torch.Tensor], path: Path) -> dict:
    """The checkpoint's model options and tensor shapes, and its training schedule."""
    options = vars(opt)
    activation, normalization = RAW_FEATURE_NORMS[_option(opt, "raw_feature_norm", RAW_FEATURE_NORMS, path)]
    embed_size, img_dim = (int(n) for n in state["image_proj.weight"].shape)
    text = text_overrides(opt, state)
    shapes = {
        "embed_size": embed_size,
        "img_dim": img_dim,
        "word_dim": text["text"]["word_dim"],
        "vocab_size": text["vocab_size"],
    }
    check_option_sizes(options, shapes, path)
    model = {
        **text,
        "img_dim": img_dim,
        "embed_size": embed_size,
        "image_norm": not options.get("no_imgnorm", DEFAULTS["no_imgnorm"]),
        "direction": options.get("cross_attn", DEFAULTS["cross_attn"]),
        "attention": {
            "temperature": float(options.get("lambda_softmax", DEFAULTS["lambda_softmax"])),
            "activation": activation,
            "normalization": normalization,
        },
        "pooling": AGG_FUNCS[options.get("agg_func", DEFAULTS["agg_func"])],
        "lse_lambda": float(options.get("lambda_lse", DEFAULTS["lambda_lse"])),
    }
    # The official loss masks only the diagonal and sums over the batch (as in the presets).
    return {"model": model, **schedule_overrides(opt)}


def convert_official_scan(checkpoint: str | Path, out: str | Path, vocab: str | Path | None = None):
    """Writes an itmatch checkpoint (preset scan-{t2i,i2t}-{lse,ave}[-coco]) from an official SCAN
    training checkpoint; returns the converted model.

    `vocab` is the SCAN vocabulary JSON the checkpoint was trained with (e.g. f30k_precomp_vocab.json);
    without it the converted model takes word ids only.
    """
    path = Path(checkpoint)
    payload = read_official_checkpoint(path)
    opt = payload["opt"]
    encoder = vars(opt).get("precomp_enc_type", DEFAULTS["precomp_enc_type"])
    if encoder != "basic":
        raise CheckpointError(
            path, f"--precomp_enc_type={encoder!r}: only the 'basic' image encoder (a Linear layer) is supported"
        )
    preset = scan_preset(opt, path)
    state = map_state(payload["model"], SCAN_PARTS, SCAN_KEY_MAP, "SCAN", path)
    require(state, ["image_proj.weight", "image_proj.bias", "text_encoder.embed.weight"], "SCAN", path)
    config = build_run_config(preset, scan_overrides(opt, state, path))
    return save_converted(config, state, payload, path, out, vocab)
