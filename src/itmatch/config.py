"""Configs as data: nested dataclasses filled from preset JSON files and `key=value` overrides.

A run is described by one `RunConfig`: the architecture's model config, the training schedule and
the loss. Presets (`src/itmatch/presets/*.json`) name a paper's or an official code's settings;
`--set model.attention.temperature=4` changes one field. Unknown keys and wrong types are errors
that list what is allowed, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from itmatch.errors import ConfigError
from itmatch.models.backbones import BackboneConfig

SHARED_TERMS = ("triplet", "cmpm", "identity")


@dataclass
class LossConfig:
    margin: float = 0.2
    # "sum": every violating negative in the batch; "hardest": the hardest one (VSE++ max
    # violation); "k:N": the N hardest (kNN-margin, Liu & Ye 2019).
    negatives: str = "hardest"
    # Epochs trained with "sum" before switching to `negatives` (VSE-infinity's warm-up): hardest
    # negatives from the start often stall at loss = 2 * batch * margin for several epochs.
    warmup_epochs: int = 0
    # The official CMCAN/SCAN code sums the loss over the batch instead of averaging it.
    reduction: Literal["sum", "mean"] = "sum"
    # Two captions of one image in a batch are not each other's negatives; the official code
    # (which masks only the diagonal) counts them as negatives.
    exclude_same_image: bool = True
    # Weight of each named term a model's `training_losses` returns (1 for a term not listed): a
    # number, or an epoch schedule [[first_epoch, weight], ...] whose latest begun entry applies
    # (0-based epochs; before the first entry the weight is 0).
    weights: dict[str, float | list[list[float]]] = field(default_factory=dict)
    # The shared objectives a model trains with (itmatch.losses): "triplet", "cmpm" (cross-modal
    # projection matching) and "identity" (norm-softmax over one class per training image); the
    # last two need one vector per item (an embedding model) and P x K batches to see positives.
    terms: list[str] = field(default_factory=lambda: ["triplet"])
    # Identity classes: set from the training data (its number of images) when training starts.
    identity_classes: int = 0
    identity_bias: bool = True  # the b of TIMAM's norm-softmax
    label_smoothing: float = 0.0  # of the identity cross-entropy (CMPC's FLAGS.label_smoothing)
    cmpm_epsilon: float = 1e-8  # the CMPM code's epsilon inside the log

    def __post_init__(self) -> None:
        hardest_k(self.negatives)  # validates
        unknown = sorted(set(self.terms) - set(SHARED_TERMS))
        if unknown or not self.terms:
            raise ConfigError(f"loss.terms must list some of {', '.join(SHARED_TERMS)}, got {self.terms!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check_ranges("loss.", self, at_least={"margin": 0}, above={"cmpm_epsilon": 0})
        for name, weight in self.weights.items():
            schedule = weight if isinstance(weight, list) else [[0, weight]]
            if any(len(entry) != 2 or entry[0] < 0 for entry in schedule):
                raise ConfigError(f"loss.weights.{name} must be a number or a list of [first_epoch >= 0, weight] pairs")

    def weight(self, term: str, epoch: int) -> float:
        """The weight of loss term `term` at `epoch` (0-based)."""
        weight = self.weights.get(term, 1.0)
        if not isinstance(weight, list):
            return weight
        begun = [value for first, value in sorted(weight) if first <= epoch]
        return begun[-1] if begun else 0.0


def hardest_k(negatives: str) -> int | None:
    """How many negatives count per query: None for all ("sum"), 1 for "hardest", N for "k:N"."""
    if negatives == "sum":
        return None
    if negatives == "hardest":
        return 1
    count = negatives[2:] if negatives.startswith("k:") else ""
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f'loss.negatives must be "sum", "hardest" or "k:N" with N >= 1, got {negatives!r}')
    return int(count)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 2e-4
    # Step decay: lr = learning_rate * lr_decay_factor ** (epoch // lr_decay_epochs).
    lr_decay_epochs: int = 15
    lr_decay_factor: float = 0.1
    grad_clip: float = 2.0
    # "adam" as SCAN, SGRAF, CMCAN and VSE++; "adamw" as VSE-infinity (torch's default decay 0.01).
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    workers: int = 0
    seed: int = 0
    # Peers validate on the first 5,000 dev captions (1,000 images); None uses the whole split.
    dev_max_captions: int | None = 5000
    eval_batch_size: int = 128
    # Also write last.pt every this many steps inside an epoch (0: only at epoch ends).
    checkpoint_every: int = 500
    log_every: int = 20
    # Batches of P images x K captions with K = captions_per_image (identity and CMPM losses need
    # several captions of one image per batch); 1: captions drawn at random.
    captions_per_image: int = 1
    # Learning rate of a model's adversary (its second optimizer), as a multiple of learning_rate.
    adversary_lr_scale: float = 1.0
    # Under torchrun: in-batch losses (hardest negatives, sums, CMPM...) see the global batch of
    # all processes instead of each process's own share (see itmatch.losses).
    global_negatives: bool = False
    # Forward passes under autocast in bf16, or "auto": bf16 where this machine's calibration
    # finds it clearly faster (itmatch.precision); the papers trained in fp32, the default.
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    # "active": a cross-attention model scores the batch without gradients, then again with
    # gradients only the pairs the loss reads (the positives and the kept or violating negatives:
    # the same loss and gradients, a fraction of the work; itmatch.losses.active_pair_scores);
    # "all": every pair with gradients, as the official codes train.
    backward_pairs: Literal["active", "all"] = "active"
    # Run the pair scorer through torch.compile (measured on a CPU: 5% faster steps after minutes
    # of compiling; see the README's benchmark (e)).
    compile: bool = False

    def __post_init__(self) -> None:
        # A triplet loss needs a negative in the batch, so 2 captions at least.
        lower = {"epochs": 1, "batch_size": 2, "lr_decay_epochs": 1, "eval_batch_size": 1, "log_every": 1}
        lower |= {"dev_max_captions": 1, "weight_decay": 0, "captions_per_image": 1}
        above = {"learning_rate": 0, "lr_decay_factor": 0, "adversary_lr_scale": 0}
        _check_ranges("train.", self, at_least=lower, above=above)
        if self.batch_size % self.captions_per_image:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.captions_per_image "
                f"({self.captions_per_image})"
            )


def _check_ranges(where: str, config, at_least: dict[str, float], above: dict | None = None) -> None:
    for name, bound in at_least.items():
        value = getattr(config, name)
        if value is not None and value < bound:
            raise ConfigError(f"{where}{name} must be >= {bound}, got {value}")
    for name, bound in (above or {}).items():
        if getattr(config, name) <= bound:
            raise ConfigError(f"{where}{name} must be > {bound}, got {getattr(config, name)}")


@dataclass
class RunConfig:
    preset: str
    architecture: str
    model: Any
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # The image encoder trained end to end on raw images; None for precomputed region features.
    backbone: BackboneConfig | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Builds dataclass `cls` from a nested dict, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {where + unknown[0]!r}; valid keys here: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], data[name], where + name) for name in data}
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where + ".")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where} must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError("; ".join(errors))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {_coerce(key_hint, k, where): _coerce(value_hint, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_coerce(item_hint, item, f"{where}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:  # no count, size or seed of any config is negative
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise ConfigError(f"{where} must be an integer >= 0, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {hint}")


def parse_overrides(assignments: list[str]) -> dict:
    """Turns ["model.embed_size=256", "loss.negatives=sum"] into a nested dict.

    Values are read as JSON when they parse (numbers, true/false, null), else as strings.
    """
    nested: dict = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {assignment!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a group of settings")
        node[parts[-1]] = value
    return nested


def merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Presets registered from code (a method defined outside the package), beside the packaged JSON files.
_REGISTERED_PRESETS: dict[str, dict] = {}


def register_preset(name: str, preset: dict) -> None:
    """Makes `preset` (the content of a preset JSON: architecture, model, train, loss...) available
    by `name`, as the packaged presets are; it is checked when a run is built from it."""
    _REGISTERED_PRESETS[name] = copy.deepcopy({**preset, "preset": name})


def preset_names() -> list[str]:
    folder = resources.files("itmatch") / "presets"
    packaged = {p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json")}
    return sorted(packaged | set(_REGISTERED_PRESETS))


def load_preset(name: str) -> dict:
    if name in _REGISTERED_PRESETS:
        return copy.deepcopy(_REGISTERED_PRESETS[name])
    path = resources.files("itmatch") / "presets" / f"{name}.json"
    if name not in preset_names():  # a name, never a path to a file elsewhere
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return json.loads(path.read_text())


def build_run_config(preset: str | dict, overrides: dict | None = None) -> RunConfig:
    """A RunConfig from a preset name (or a saved config dict) and nested overrides."""
    from itmatch.models.registry import config_class

    raw = load_preset(preset) if isinstance(preset, str) else copy.deepcopy(preset)
    raw.pop("description", None)
    raw.pop("reference", None)
    raw = merge(raw, overrides or {})
    for key in ("architecture", "preset"):
        if key not in raw:
            raise ConfigError(f"config has no {key!r}")
    model = from_dict(config_class(raw["architecture"]), raw.get("model", {}), "model.")
    unknown = sorted(set(raw) - {"architecture", "preset", "model", "train", "loss", "backbone"})
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r}; valid: preset, architecture, model, train, loss, backbone"
        )
    return RunConfig(
        preset=raw["preset"],
        architecture=raw["architecture"],
        model=model,
        train=from_dict(TrainConfig, raw.get("train", {}), "train."),
        loss=from_dict(LossConfig, raw.get("loss", {}), "loss."),
        backbone=_coerce(BackboneConfig | None, raw.get("backbone"), "backbone"),
    )
