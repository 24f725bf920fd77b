"""What every official checkpoint of the SCAN family shares: `torch.save({'model': [state dicts
of the parts], 'opt': argparse.Namespace, 'epoch', 'best_rsum', ...})` from a training script."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from itmatch.checkpoint import save_checkpoint
from itmatch.config import RunConfig
from itmatch.data.vocab import Vocabulary
from itmatch.errors import CheckpointError
from itmatch.models.registry import build_model
from itmatch.safe_pickle import load_error

# (part index, regular expression on the official key, replacement giving the itmatch key)
KeyMap = list[tuple[int, str, str]]


def read_official_checkpoint(path: str | Path) -> dict:
    """torch.load of an official training checkpoint on the CPU, allowing only argparse.Namespace
    beyond tensors (the checkpoints were saved from GPUs, and torch >= 2.6 loads weights only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(path, f"cannot be read as a PyTorch checkpoint ({load_error(error)})") from None
    if not isinstance(payload, dict) or "model" not in payload or "opt" not in payload:
        raise CheckpointError(path, "not an official training checkpoint: expected a dict with 'model' and 'opt'")
    if not isinstance(payload["opt"], argparse.Namespace):
        raise CheckpointError(path, "'opt' is not the argparse.Namespace of the official opts.py")
    return payload


def map_state(parts, part_names: list[str], key_map: KeyMap, model: str, path: Path) -> dict[str, torch.Tensor]:
    """The official list of state dicts as one itmatch state dict; every key must map."""
    if not isinstance(parts, list) or len(parts) != len(part_names):
        raise CheckpointError(
            path,
            f"'model' must be a list of {len(part_names)} state dicts {part_names} (is this a {model} checkpoint?)",
        )
    state = {}
    for index, part in enumerate(parts):
        if not isinstance(part, dict) or not all(isinstance(value, torch.Tensor) for value in part.values()):
            raise CheckpointError(path, f"'model' part {index} ({part_names[index]}) is not a state dict of tensors")
        for key, value in part.items():
            state[_map_key(index, key, key_map, part_names, model, path)] = value
    return state


def _map_key(index: int, key: str, key_map: KeyMap, part_names: list[str], model: str, path: Path) -> str:
    for part, pattern, replacement in key_map:
        if part == index and re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise CheckpointError(path, f"unexpected tensor {part_names[index]}.{key}: not part of the official {model} model")


def require(state: dict, keys: list[str], model: str, path: Path) -> None:
    for key in keys:
        if key not in state:
            raise CheckpointError(path, f"missing tensor for {key}: not a complete {model} checkpoint")


def check_option_sizes(options: dict, sizes: dict[str, int], path: Path) -> None:
    """Each size the official options record (opt.embed_size, ...) must be the tensors' one."""
    for name, size in sizes.items():
        if name in options and options[name] is not None and int(options[name]) != size:
            raise CheckpointError(path, f"opt.{name} is {options[name]} but the tensors give {size}")


def save_converted(config: RunConfig, state: dict, payload: dict, path: Path, out, vocab=None, untrained=()):
    """Builds the model of `config`, loads `state` strictly, checks the vocabulary and writes the
    itmatch checkpoint `out`; returns the model. Modules whose names start with a prefix in
    `untrained` are not in official checkpoints (a training-only branch) and keep their
    initialisation."""
    model = build_model(config)
    if untrained:
        state = {key: value for key, value in model.state_dict().items() if key.startswith(tuple(untrained))} | state
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        reason = " ".join(str(error).split())  # torch's message spans lines
        raise CheckpointError(path, f"tensors do not fit the {config.preset} architecture: {reason}") from None
    if vocab is not None:
        model.vocab = Vocabulary.load(vocab)
        if len(model.vocab) != config.model.vocab_size:
            raise CheckpointError(
                path, f"has {config.model.vocab_size} word embeddings but {vocab} has {len(model.vocab)} words"
            )
    extra = {"epoch": int(payload.get("epoch", 0)), "best_rsum": float(payload.get("best_rsum", 0.0))}
    save_checkpoint(out, model, config, source=path.name, **extra)
    return model


def text_overrides(opt: argparse.Namespace, state: dict[str, torch.Tensor]) -> dict:
    """The GRU text encoder's settings (module `text_encoder` in every itmatch model)."""
    options = vars(opt)
    return {
        "vocab_size": int(state["text_encoder.embed.weight"].shape[0]),
        "text": {
            "word_dim": int(state["text_encoder.embed.weight"].shape[1]),
            "num_layers": int(options.get("num_layers", 1)),
            "bidirectional": bool(options.get("bi_gru", False)),
            "normalize": not options.get("no_txtnorm", False),
        },
    }


def schedule_overrides(opt: argparse.Namespace) -> dict:
    """Training schedule and loss options shared by the SCAN family's opts.py."""
    options = vars(opt)
    names = [
        ("epochs", "num_epochs"),
        ("batch_size", "batch_size"),
        ("learning_rate", "learning_rate"),
        ("lr_decay_epochs", "lr_update"),
        ("grad_clip", "grad_clip"),
    ]
    train = {key: options[name] for key, name in names if name in options}
    loss = {"margin": float(options.get("margin", 0.2))}
    if "max_violation" in options:
        loss["negatives"] = "hardest" if options["max_violation"] else "sum"
    return {"train": train, "loss": loss}
