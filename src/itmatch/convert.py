"""Reading the official training code's checkpoints into itmatch models."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from itmatch.checkpoint import save_checkpoint
from itmatch.config import build_run_config
from itmatch.data.vocab import Vocabulary
from itmatch.errors import CheckpointError
from itmatch.models.registry import build_model

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


def read_official_checkpoint(path: str | Path) -> dict:
    """torch.load of an official training checkpoint (argparse.Namespace inside), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            path, f"cannot be read as a PyTorch checkpoint ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(payload, dict) or "model" not in payload or "opt" not in payload:
        raise CheckpointError(path, "not an official training checkpoint: expected a dict with 'model' and 'opt'")
    return payload


def map_cmcan_state(parts: list[dict], path: Path) -> dict[str, torch.Tensor]:
    """The official list of 5 state dicts as one itmatch state dict; every key must map."""
    if not isinstance(parts, list) or len(parts) != len(CMCAN_PARTS):
        raise CheckpointError(
            path,
            f"'model' must be a list of {len(CMCAN_PARTS)} state dicts {CMCAN_PARTS} (is this a CMCAN checkpoint?)",
        )
    state = {}
    for index, part in enumerate(parts):
        for key, value in part.items():
            state[_map_key(index, key, path)] = value
    return state


def _map_key(index: int, key: str, path: Path) -> str:
    for part, pattern, replacement in CMCAN_KEY_MAP:
        if part == index and re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise CheckpointError(path, f"unexpected tensor {CMCAN_PARTS[index]}.{key}: not part of the official CMCAN model")


def cmcan_overrides(opt: argparse.Namespace, state: dict[str, torch.Tensor]) -> dict:
    """The cmcan-official preset adjusted to the checkpoint's options and tensor shapes."""
    options = vars(opt)
    model = {
        "vocab_size": int(state["text_encoder.embed.weight"].shape[0]),
        "img_dim": int(state["image_proj.weight"].shape[1]),
        "n_regions": int(state["confidence_norm.weight"].shape[0]),
        "embed_size": int(state["image_proj.weight"].shape[0]),
        "sim_dim": int(state["head.weight"].shape[1] // 2),
        "image_norm": not options.get("no_imgnorm", False),
        "text": {
            "word_dim": int(state["text_encoder.embed.weight"].shape[1]),
            "num_layers": int(options.get("num_layers", 1)),
            "bidirectional": bool(options.get("bi_gru", True)),
            "normalize": not options.get("no_txtnorm", False),
        },
        "reasoning_layers": len({k.split(".")[1] for k in state if k.startswith("text_reasoning.")}),
    }
    train = {
        key: options[name]
        for key, name in [
            ("epochs", "num_epochs"),
            ("batch_size", "batch_size"),
            ("learning_rate", "learning_rate"),
            ("lr_decay_epochs", "lr_update"),
            ("grad_clip", "grad_clip"),
        ]
        if name in options
    }
    loss = {"margin": float(options.get("margin", 0.2))}
    if "max_violation" in options:
        loss["negatives"] = "hardest" if options["max_violation"] else "sum"
    return {"model": model, "train": train, "loss": loss}


def convert_official_cmcan(checkpoint: str | Path, out: str | Path, vocab: str | Path | None = None):
    """Writes an itmatch checkpoint (preset cmcan-official) from an official CMCAN checkpoint.

    `vocab` is the SCAN-format vocabulary JSON the checkpoint was trained with; without it the
    converted model takes word ids only.
    """
    path = Path(checkpoint)
    payload = read_official_checkpoint(path)
    state = map_cmcan_state(payload["model"], path)
    if not isinstance(payload["opt"], argparse.Namespace):
        raise CheckpointError(path, "'opt' is not the argparse.Namespace of the official opts.py")
    for required in ("image_proj.weight", "text_encoder.embed.weight", "confidence_norm.weight", "head.weight"):
        if required not in state:
            raise CheckpointError(path, f"missing tensor for {required}: not a complete CMCAN checkpoint")
    config = build_run_config("cmcan-official", cmcan_overrides(payload["opt"], state))
    model = build_model(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(path, f"tensors do not fit the official CMCAN architecture: {error}") from None
    if vocab is not None:
        model.vocab = Vocabulary.load(vocab)
        if len(model.vocab) != config.model.vocab_size:
            raise CheckpointError(
                path,
                f"has {config.model.vocab_size} word embeddings but {vocab} has {len(model.vocab)} words",
            )
    save_checkpoint(
        out,
        model,
        config,
        epoch=int(payload.get("epoch", 0)),
        best_rsum=float(payload.get("best_rsum", 0.0)),
        source=str(path.name),
    )
    return model
