"""Official SGRAF checkpoints (github.com/Paranioar/SGRAF) as itmatch checkpoints.

The official state is a list [img_enc, txt_enc, sim_enc]; `opt.module_name` says which of the two
separately trained models (SGR or SAF) it holds, and the tensors must agree.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

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

# Official SGRAF module names (model.py) -> ours. The Sequential indices are the official
# Linear (0) and BatchNorm1d (1) positions inside VisualSA / TextSA.
SGRAF_KEY_MAP = [
    (0, r"fc\.(.*)", r"image_proj.\1"),
    (1, r"embed\.(.*)", r"text_encoder.embed.\1"),
    (1, r"cap_rnn\.(.*)", r"text_encoder.rnn.\1"),
    (2, r"v_global_w\.embedding_local\.0\.(.*)", r"image_pool.item_proj.\1"),
    (2, r"v_global_w\.embedding_local\.1\.(.*)", r"image_pool.item_norm.\1"),
    (2, r"v_global_w\.embedding_global\.0\.(.*)", r"image_pool.mean_proj.\1"),
    (2, r"v_global_w\.embedding_global\.1\.(.*)", r"image_pool.mean_norm.\1"),
    (2, r"v_global_w\.embedding_common\.0\.(.*)", r"image_pool.score.\1"),
    (2, r"t_global_w\.embedding_local\.0\.(.*)", r"text_pool.item_proj.\1"),
    (2, r"t_global_w\.embedding_global\.0\.(.*)", r"text_pool.mean_proj.\1"),
    (2, r"t_global_w\.embedding_common\.0\.(.*)", r"text_pool.score.\1"),
    (2, r"sim_tranloc_w\.(.*)", r"word_align.proj.\1"),
    (2, r"sim_tranglo_w\.(.*)", r"global_align.proj.\1"),
    (2, r"sim_eval_w\.(.*)", r"head.\1"),
    (2, r"SGR_module\.(\d+)\.graph_query_w\.(.*)", r"reasoning.\1.query.\2"),
    (2, r"SGR_module\.(\d+)\.graph_key_w\.(.*)", r"reasoning.\1.key.\2"),
    (2, r"SGR_module\.(\d+)\.sim_graph_w\.(.*)", r"reasoning.\1.update.\2"),
    (2, r"SAF_module\.attn_sim_w\.(.*)", r"filter_score.\1"),
    (2, r"SAF_module\.bn\.(.*)", r"filter_norm.\1"),
]
SGRAF_PARTS = ["img_enc", "txt_enc", "sim_enc"]


def sgraf_module(opt: argparse.Namespace, state: dict[str, torch.Tensor], path: Path) -> str:
    """ "SGR" or "SAF": what the tensors hold, which opt.module_name (when present) must agree with."""
    found = {"SGR" for key in state if key.startswith("reasoning.")}
    found |= {"SAF" for key in state if key.startswith("filter_")}
    named = vars(opt).get("module_name")
    if len(found) > 1:
        raise CheckpointError(path, "holds both SGR_module and SAF_module tensors: not one official SGRAF model")
    if not found and named not in ("SGR", "SAF"):
        raise CheckpointError(path, f"opt.module_name is {named!r} and there are no SGR/SAF tensors")
    module = found.pop() if found else named
    if named is not None and named != module:
        raise CheckpointError(path, f"opt.module_name is {named!r} but the tensors are those of an {module} model")
    return module


def sgraf_overrides(opt: argparse.Namespace, state: dict[str, torch.Tensor], module: str, path: Path) -> dict:
    """The matching sgraf preset adjusted to the checkpoint's options and tensor shapes."""
    text = text_overrides(opt, state)
    # The GRU's tensors decide its shape (SGRAF's opts default to a BiGRU: `--bi_gru` turns it off).
    rnn = [key for key in state if key.startswith("text_encoder.rnn.")]
    text["text"]["bidirectional"] = any(key.endswith("_reverse") for key in rnn)
    text["text"]["num_layers"] = sum(bool(re.fullmatch(r"text_encoder\.rnn\.weight_ih_l\d+", key)) for key in rnn)
    model = {
        **text,
        "img_dim": int(state["image_proj.weight"].shape[1]),
        "n_regions": int(state["image_pool.item_norm.weight"].shape[0]),
        "embed_size": int(state["image_proj.weight"].shape[0]),
        "sim_dim": int(state["head.weight"].shape[1]),
        "image_norm": not vars(opt).get("no_imgnorm", False),
        "module": module,
    }
    if module == "SGR":
        model["sgr_steps"] = len({key.split(".")[1] for key in state if key.startswith("reasoning.")})
        named = vars(opt).get("sgr_step", model["sgr_steps"])
        if named != model["sgr_steps"]:
            raise CheckpointError(path, f"opt.sgr_step is {named} but SGR_module holds {model['sgr_steps']} steps")
    return {"model": model, **schedule_overrides(opt)}


def convert_official_sgraf(checkpoint: str | Path, out: str | Path, vocab: str | Path | None = None):
    """Writes an itmatch checkpoint (preset sgraf-sgr / sgraf-saf, or their -coco variants when the
    checkpoint was trained on coco_precomp) from an official SGRAF checkpoint.

    `vocab` is the SCAN-format vocabulary JSON the checkpoint was trained with; without it the
    converted model takes word ids only.
    """
    path = Path(checkpoint)
    payload = read_official_checkpoint(path)
    opt = payload["opt"]
    state = map_state(payload["model"], SGRAF_PARTS, SGRAF_KEY_MAP, "SGRAF", path)
    require(
        state,
        ["image_proj.weight", "text_encoder.embed.weight", "image_pool.item_norm.weight", "head.weight"],
        "SGRAF",
        path,
    )
    module = sgraf_module(opt, state, path)
    if module == "SAF":
        require(state, ["filter_score.weight", "filter_norm.running_var"], "SGRAF (SAF)", path)
    coco = str(vars(opt).get("data_name", "")).startswith("coco")
    preset = f"sgraf-{module.lower()}{'-coco' if coco else ''}"
    config = build_run_config(preset, sgraf_overrides(opt, state, module, path))
    return save_converted(config, state, payload, path, out, vocab)
