"""Official VSRN checkpoints (github.com/KunpengLi1994/VSRN) as itmatch checkpoints.

train.py (Python 2.7, torch 0.4.1) saves `{'model': [img_enc.state_dict(), txt_enc.state_dict()],
'opt': argparse.Namespace, 'epoch', 'best_rsum', 'Eiters'}`. The Rs_GCN blocks' 1x1 convolutions
(weights (D, D, 1)) become Linear weights. The checkpoint holds no caption branch (training only):
the converted model's keeps its initialisation, as the official code rebuilds it when it resumes.
The preset follows the tensors: a final BatchNorm (`bn.*`) is the Flickr30K branch, its absence
the COCO one, and `opt.data_name` must agree.
"""

from __future__ import annotations

import argparse
import re
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

VSRN_PARTS = ["img_enc", "txt_enc"]
GCN_BLOCK = re.compile(r"Rs_GCN_(\d+)\.")
# train.py's options for the caption branch -> CaptionConfig fields
CAPTION_OPTIONS = {
    "dim_hidden": "hidden_size",
    "dim_word": "word_dim",
    "input_dropout_p": "dropout",
    "max_len": "max_len",
}


def vsrn_key_map(n_blocks: int) -> list[tuple[int, str, str]]:
    """Official names -> ours; Rs_GCN_k (from 1) is gcn.k-1, its W = Sequential(conv, BatchNorm)."""
    blocks = []
    for k in range(1, n_blocks + 1):
        blocks += [
            (0, rf"Rs_GCN_{k}\.(g|theta|phi)\.(weight|bias)", rf"gcn.{k - 1}.\1.\2"),
            (0, rf"Rs_GCN_{k}\.W\.0\.(weight|bias)", rf"gcn.{k - 1}.out.\1"),
            (0, rf"Rs_GCN_{k}\.W\.1\.(.+)", rf"gcn.{k - 1}.norm.\1"),
        ]
    return [
        (0, r"fc\.(weight|bias)", r"image_proj.\1"),
        (0, r"img_rnn\.((?:weight|bias)_(?:ih|hh)_l0)", r"region_rnn.\1"),
        (0, r"bn\.(.+)", r"final_norm.\1"),
        *blocks,
        (1, r"embed\.(weight)", r"text_encoder.embed.\1"),
        (1, r"rnn\.((?:weight|bias)_(?:ih|hh)_l\d+)", r"text_encoder.rnn.\1"),
    ]


def gcn_block_count(parts, path: Path) -> int:
    """How many Rs_GCN blocks the image encoder holds (numbered 1..n without gaps)."""
    image = parts[0] if isinstance(parts, list) and parts and isinstance(parts[0], dict) else {}
    found = {int(m.group(1)) for key in image if isinstance(key, str) and (m := GCN_BLOCK.match(key))}
    if found != set(range(1, len(found) + 1)):
        raise CheckpointError(path, f"its Rs_GCN blocks are numbered {sorted(found)}, not 1..n")
    return len(found)


def linear_weights(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The Conv1d(kernel 1) weights (D, D, 1) of the GCN blocks as Linear weights (D, D)."""
    out = dict(state)
    for key, value in state.items():
        if re.fullmatch(r"gcn\.\d+\.(g|theta|phi|out)\.weight", key):
            if value.dim() != 3 or value.shape[2] != 1:
                raise CheckpointError(path, f"{key} has shape {tuple(value.shape)}, not a 1x1 convolution's")
            out[key] = value[..., 0]
    return out


def _check_supported(opt: argparse.Namespace, path: Path) -> None:
    options = vars(opt)
    for name in ("use_abs", "no_imgnorm", "finetune"):
        if options.get(name):
            raise CheckpointError(path, f"--{name} is not supported: itmatch's VSRN is the precomp model without it")
    if options.get("measure", "cosine") != "cosine":
        raise CheckpointError(path, f"--measure={options['measure']!r}: only the cosine similarity is supported")


def vsrn_overrides(opt: argparse.Namespace, state: dict[str, torch.Tensor], n_blocks: int, path: Path) -> dict:
    """The checkpoint's model options and tensor shapes, and its training schedule."""
    options = vars(opt)
    final_bn = "final_norm.weight" in state
    data_name = options.get("data_name")
    if data_name is not None and (data_name == "f30k_precomp") != final_bn:
        has = "has" if final_bn else "has no"
        raise CheckpointError(path, f"opt.data_name is {data_name!r} but the image encoder {has} the final bn.*")
    embed_size, img_dim = (int(n) for n in state["image_proj.weight"].shape)
    text = text_overrides(opt, state)
    text["text"]["normalize"] = False  # VSRN reads the GRU's last state only
    sizes = {"embed_size": embed_size, "img_dim": img_dim, "dim_vid": embed_size}
    check_option_sizes(options, sizes | {"word_dim": text["text"]["word_dim"], "vocab_size": text["vocab_size"]}, path)
    caption = {ours: options[name] for name, ours in CAPTION_OPTIONS.items() if name in options}
    model = {
        **text,
        "img_dim": img_dim,
        "embed_size": embed_size,
        "gcn_blocks": n_blocks,
        "data_branch": "f30k" if final_bn else "coco",
        "caption": caption,
    }
    return {"model": model, **schedule_overrides(opt)}


def convert_official_vsrn(checkpoint: str | Path, out: str | Path, vocab: str | Path | None = None):
    """Writes an itmatch checkpoint (preset vsrn-f30k or vsrn-coco) from an official VSRN training
    checkpoint; returns the converted model. `vocab` is the vocabulary JSON the checkpoint was
    trained with (VSRN's pickles hold SCAN's word lists); without it the model takes word ids only."""
    path = Path(checkpoint)
    payload = read_official_checkpoint(path)
    _check_supported(payload["opt"], path)
    n_blocks = gcn_block_count(payload["model"], path)
    state = map_state(payload["model"], VSRN_PARTS, vsrn_key_map(n_blocks), "VSRN", path)
    require(state, ["image_proj.weight", "image_proj.bias", "text_encoder.embed.weight"], "VSRN", path)
    state = linear_weights(state, path)
    overrides = vsrn_overrides(payload["opt"], state, n_blocks, path)
    preset = f"vsrn-{overrides['model']['data_branch']}"
    return save_converted(
        build_run_config(preset, overrides), state, payload, path, out, vocab, untrained=("captioner.",)
    )
