"""Official GSMN checkpoints (github.com/CrossmodalGroup/GSMN) as itmatch checkpoints.

train.py saves `{'model': [img_enc, txt_enc, i2t_match_G, t2i_match_G] state dicts, 'opt':
argparse.Namespace, 'epoch', 'best_rsum', 'Eiters'}`. The graph heads are `nn.utils.weight_norm`
layers (`out_k.weight_g`, `out_k.weight_v`), which itmatch holds as the parametrizations API's
`original0` (g) and `original1` (v). `--is_sparse` picks gsmn-official-sparse, else -dense; the
released code's semantics (neighbour vectors, boxes) come with the preset.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from itmatch.config import build_run_config
from itmatch.convert.official import (
    map_state,
    read_official_checkpoint,
    require,
    save_converted,
    schedule_overrides,
    text_overrides,
)
from itmatch.errors import CheckpointError

_HEAD = [
    (r"out_(\d)\.weight_g", r"out_\1.parametrizations.weight.original0"),
    (r"out_(\d)\.weight_v", r"out_\1.parametrizations.weight.original1"),
    (r"out_(\d)\.bias", r"out_\1.bias"),
]
GSMN_KEY_MAP = [
    (0, r"fc\.(weight|bias)", r"image_proj.\1"),
    (1, r"embed\.(weight)", r"text_encoder.embed.\1"),
    (1, r"rnn\.((?:weight|bias)_(?:ih|hh)_l\d+(?:_reverse)?)", r"text_encoder.rnn.\1"),
    (2, r"graph_convolution_1\.conv_weights\.(\d+)\.weight", r"visual_graph.conv_weights.\1.weight"),
    (2, r"graph_convolution_1\.(mean_rho|mean_theta|precision_rho|precision_theta)", r"visual_kernels.\1"),
    *[(2, pattern, "visual_graph." + out) for pattern, out in _HEAD],
    (3, r"graph_convolution_3\.conv_weights\.(\d+)\.(weight|bias)", r"text_graph.conv_weights.\1.\2"),
    (3, r"graph_convolution_3\.params", "text_kernels"),
    *[(3, pattern, "text_graph." + out) for pattern, out in _HEAD],
]
GSMN_PARTS = ["img_enc", "txt_enc", "i2t_match_G", "t2i_match_G"]
# train.py's defaults, for options a checkpoint may not have.
DEFAULT_LAMBDA = 9.0
DEFAULT_BLOCKS = 16


def gsmn_overrides(opt: argparse.Namespace, state: dict, path: Path) -> dict:
    """The checkpoint's model options and tensor shapes, and its training schedule."""
    options = vars(opt)
    embed_size, img_dim = (int(n) for n in state["image_proj.weight"].shape)
    blocks = int(state["visual_graph.conv_weights.0.weight"].shape[1])
    kernels = int(state["visual_kernels.mean_rho"].shape[0])
    hidden = int(state["visual_graph.out_1.bias"].shape[0])
    if int(options.get("num_block", DEFAULT_BLOCKS)) != blocks:
        raise CheckpointError(path, f"opt.num_block is {options['num_block']} but the tensors give {blocks}")
    temperature = float(options.get("lambda_softmax", DEFAULT_LAMBDA))
    model = {
        **text_overrides(opt, state),
        "img_dim": img_dim,
        "embed_size": embed_size,
        "image_norm": not options.get("no_imgnorm", False),
        "blocks": blocks,
        "kernels": kernels,
        "hidden_dim": hidden,
        "attention": {"temperature": temperature},
        "affinity_temperature": temperature,
    }
    return {"model": model, **schedule_overrides(opt)}


def convert_official_gsmn(checkpoint: str | Path, out: str | Path, vocab: str | Path | None = None):
    """Writes an itmatch checkpoint (preset gsmn-official-dense or -sparse) from an official GSMN
    training checkpoint; returns the converted model. `vocab` is the vocabulary JSON it was
    trained with (e.g. f30k_precomp_vocab.json)."""
    path = Path(checkpoint)
    payload = read_official_checkpoint(path)
    opt = payload["opt"]
    preset = "gsmn-official-sparse" if vars(opt).get("is_sparse", False) else "gsmn-official-dense"
    state = map_state(payload["model"], GSMN_PARTS, GSMN_KEY_MAP, "GSMN", path)
    require(
        state,
        ["image_proj.weight", "text_encoder.embed.weight", "visual_graph.conv_weights.0.weight"]
        + ["visual_kernels.mean_rho", "visual_graph.out_1.bias", "text_kernels"],
        "GSMN",
        path,
    )
    config = build_run_config(preset, gsmn_overrides(opt, state, path))
    return save_converted(config, state, payload, path, out, vocab)
