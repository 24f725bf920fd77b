"""itmatch checkpoints: one file with the model weights, the full run config and the vocabulary
(or a pretrained text encoder's configuration and tokenizer files); a model trained on features
of `itmatch extract` also records that extraction (`extraction`: itmatch.extract.RECORD_KEYS).

Files hold only tensors, numbers, strings, bytes, lists and dicts, so they load with
`torch.load(weights_only=True)` (no pickled code runs), and are written atomically: a run killed
while saving keeps its previous checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from itmatch.config import RunConfig, build_run_config
from itmatch.data.vocab import Vocabulary
from itmatch.device import default_device
from itmatch.errors import CheckpointError, ConfigError, DataError
from itmatch.files import atomic_write
from itmatch.models.registry import build_model, recognize_official
from itmatch.models.text import from_stored_files
from itmatch.safe_pickle import load_error

FORMAT = "itmatch-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, model, config: RunConfig, **state) -> None:
    """Writes model weights, config, vocabulary and any extra training `state` atomically."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": config.architecture,
        "preset": config.preset,
        "config": config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": None if model.vocab is None else list(model.vocab.words),
        # A pretrained text encoder's configuration and tokenizer files: loading needs no folder.
        "text_encoder_files": model.text_encoder.stored_files(),
        **state,
    }
    atomic_write(Path(path), lambda file: torch.save(payload, file))


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict, after checking that it is an itmatch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        family = _official_family(path)
        if family:
            raise CheckpointError(
                path,
                f"this is an official {family} training checkpoint; convert it first with "
                f"`itmatch convert official-{family} CKPT OUT.pt`",
            ) from None
        raise CheckpointError(path, f"not a readable itmatch checkpoint ({load_error(error)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(path, "not an itmatch checkpoint (no 'format: itmatch-checkpoint' entry)")
    if payload.get("version") != VERSION:
        raise CheckpointError(path, f"checkpoint format version {payload.get('version')} is not supported")
    _check_parts(payload, path)
    return payload


# What every itmatch checkpoint holds, and the type of each part.
PARTS = {"architecture": str, "preset": str, "config": dict, "model": dict}


def _check_parts(payload: dict, path: Path) -> None:
    for name, kind in PARTS.items():
        if not isinstance(payload.get(name), kind):
            raise CheckpointError(path, f"is damaged: its {name!r} entry is missing or not a {kind.__name__}")
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in payload["model"].items()):
        raise CheckpointError(path, "is damaged: its 'model' entry is not a state dict of tensors")
    optional = (("vocab", list), ("state", dict), ("optimizer", dict), ("adversary_optimizer", dict))
    for name, kind in (*optional, ("text_encoder_files", dict), ("extraction", dict)):
        if payload.get(name) is not None and not isinstance(payload[name], kind):
            raise CheckpointError(path, f"is damaged: its {name!r} entry is not a {kind.__name__}")


def _official_family(path: Path) -> str | None:
    """The architecture whose official training checkpoint `path` is, if it is one."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return recognize_official(payload) if isinstance(payload, dict) else None


def load_checkpoint(
    path: str | Path,
    device: torch.device | str | None = None,
    architecture: str | None = None,
    preset: str | None = None,
):
    """The model of an itmatch checkpoint, in eval mode on `device` (default: CUDA if present).

    `architecture` / `preset`, when given, must match the checkpoint's: a checkpoint of another
    model is an error, not a silently half-loaded model.
    """
    payload = read_checkpoint(path)
    model, _ = model_from_payload(payload, path, architecture, preset)
    return model.to(device or default_device()).eval()


def model_from_payload(payload: dict, path, architecture: str | None = None, preset: str | None = None):
    """(model, run config) of a checkpoint payload; the weights are loaded strictly."""
    if architecture is not None and payload["architecture"] != architecture:
        raise CheckpointError(
            path, f"holds a {payload['architecture']} model ({payload['preset']}), not {architecture}"
        )
    if preset is not None and payload["preset"] != preset:
        raise CheckpointError(path, f"was trained with preset {payload['preset']}, not {preset}")
    try:
        config = build_run_config(payload["config"])
    except ConfigError as error:
        raise CheckpointError(path, f"its config does not fit this version of itmatch: {error}") from None
    try:
        with from_stored_files(payload.get("text_encoder_files") or None):
            model = build_model(config)
    except ConfigError as error:
        raise CheckpointError(path, f"its text encoder cannot be built: {error}") from None
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise CheckpointError(path, f"weights do not fit the {config.preset} model: {error}") from None
    if payload.get("vocab") is not None:
        try:
            model.vocab = Vocabulary(payload["vocab"])
        except DataError as error:
            raise CheckpointError(path, f"its vocabulary is invalid: {error.problem}") from None
    return model, config
