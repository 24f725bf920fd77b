"""Official CMCAN checkpoints (github.com/CrossmodalGroup/CMCAN) as itmatch checkpoints."""

from __future__ import annotations

import argparse
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

# Official CMCAN module names (model.py at 6512cf9, and the earlier SGR_module_* spelling) -> ours.
# The official state is a list [img_enc, txt_enc, sim_embt, sim_embv, sim_enc].
CMCAN_KEY_MAP = [
    (0, r"fc\.(.*)", r"image_proj.\1"),
    (1, r"embed\.(.*)", r"text_encoder.embed.\1"),
    (1, r"cap_rnn\.(.*)", r"text_encoder.rnn.\1"),
    (2, r"sim_tranloc_wt\.(.*)", r"word_align.proj.\1"),
    (3, r"t_global_w\.embedding_local\.0\.(.*)", r"text_pool.item_proj.\1"),
    (3, r"t_global_w\.embedding_global\.0\.(.*)", r"text_pool.mean_proj.\1"),
    (3, r"t_global_w\.embedding_common\.0\.(.*)", r"text_pool.score.\1"),
    (3, r"emb_local_li\.(.*)", r"image_pool.item_proj.\1"),
    (3, r"emb_local_bn\.(.*)", r"image_pool.item_norm.\1"),
    (3, r"emb_global_li\.(.*)", r"image_pool.mean_proj.\1"),
    (3, r"emb_global_bn\.(.*)", r"image_pool.mean_norm.\1"),
    (3, r"emb_common\.(.*)", r"image_pool.score.\1"),
    (3, r"sim_tranloc_wv\.(.*)", r"region_align.proj.\1"),
    (3, r"sim_tranpar_wv\.(.*)", r"context_align.proj.\1"),
    (3, r"sim_tranglo_w\.(.*)", r"global_align.proj.\1"),
    (3, r"emb_similarity\.(.*)", r"confidence.\1"),
    (3, r"ln\.(.*)", r"confidence_norm.\1"),
    (4, r"sim_eval_w\.(.*)", r"head.\1"),
    (4, r"(?:SGR_)?module_t\.(\d+)\.graph_query_w\.(.*)", r"text_reasoning.\1.query.\2"),
    (4, r"(?:SGR_)?module_t\.(\d+)\.graph_key_w\.(.*)", r"text_reasoning.\1.key.\2"),
    (4, r"(?:SGR_)?module_t\.(\d+)\.sim_graph_w\.(.*)", r"text_reasoning.\1.update.\2"),
    (4, r"(?:SGR_)?module_v\.(\d+)\.graph_query_w\.(.*)", r"visual_reasoning.\1.query.\2"),
    (4, r"(?:SGR_)?module_v\.(\d+)\.graph_key_w\.(.*)", r"visual_reasoning.\1.key.\2"),
    (4, r"(?:SGR_)?module_v\.(\d+)\.sim_graph_w\.(.*)", r"visual_reasoning.\1.update.\2"),
]
CMCAN_PARTS = ["img_enc", "txt_enc", "sim_embt", "sim_embv", "sim_enc"]


def cmcan_overrides(opt: argparse.Namespace, state: dict[str, torch.Tensor]) -> dict:
    """The cmcan-official preset adjusted to the checkpoint's options and tensor shapes."""
    text = text_overrides(opt, state)
    text["text"]["bidirectional"] = bool(vars(opt).get("bi_gru", True))  # CMCAN's opts default to a BiGRU
    model = {
        **text,
        "img_dim": int(state["image_proj.weight"].shape[1]),
        "n_regions": int(state["confidence_norm.weight"].shape[0]),
        "embed_size": int(state["image_proj.weight"].shape[0]),
        "sim_dim": int(state["head.weight"].shape[1] // 2),
        "image_norm": not vars(opt).get("no_imgnorm", False),
        "reasoning_layers": len({k.split(".")[1] for k in state if k.startswith("text_reasoning.")}),
    }
    return {"model": model, **schedule_overrides(opt)}


def convert_official_cmcan(checkpoint: str | Path, out: str | Path, vocab: str | Path | None = None):
    """Writes an itmatch checkpoint (preset cmcan-official) from an official CMCAN checkpoint.

    `vocab` is the SCAN-format vocabulary JSON the checkpoint was trained with; without it the
    converted model takes word ids only.
    """
    path = Path(checkpoint)
    payload = read_official_checkpoint(path)
    state = map_state(payload["model"], CMCAN_PARTS, CMCAN_KEY_MAP, "CMCAN", path)
    require(
        state,
        ["image_proj.weight", "text_encoder.embed.weight", "confidence_norm.weight", "head.weight"],
        "CMCAN",
        path,
    )
    config = build_run_config("cmcan-official", cmcan_overrides(payload["opt"], state))
    return save_converted(config, state, payload, path, out, vocab)
