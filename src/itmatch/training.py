"""Training any matcher on a precomp folder: Adam, step decay, gradient clipping, triplet loss,
best checkpoint by dev rSum, resumable at any point, and multi-process under torchrun.

RUN_DIR receives config.json, vocab.json, last.pt (every epoch and every `checkpoint_every`
steps), best.pt and tensorboard logs. A killed run restarted with `resume=True` continues from
last.pt: the batch order of an epoch is a function of (seed, epoch), so a run resumed mid-epoch
skips exactly the batches it had already trained on.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from itmatch.checkpoint import model_from_payload, read_checkpoint, save_checkpoint
from itmatch.config import LossConfig, RunConfig, build_run_config, merge
from itmatch.data.datasets import PairDataset, make_loader
from itmatch.data.inputs import readers_for
from itmatch.data.precomp import PrecompSplit
from itmatch.data.raw import RawImageSplit, skip_summary, write_skip_list
from itmatch.data.sources import check_image_input, open_split, split_names
from itmatch.data.vocab import Vocabulary, build_vocab_for_dir
from itmatch.distributed import Process, join_process_group
from itmatch.errors import CheckpointError, ConfigError, DataError, ItmatchError
from itmatch.evaluation.runner import evaluate_split
from itmatch.extract import recorded_extraction
from itmatch.files import atomic_write, folder_lock, remove_leftover_temps
from itmatch.losses import TrainingContext
from itmatch.models.backbones import BackboneConfig, build_backbone, load_weights
from itmatch.models.registry import architecture_class, build_model
from itmatch.precision import precision_dtype, training_precision
from itmatch.scoring import ScoringOptions


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    batches_done: int = 0  # batches of epoch `epoch` already trained (a mid-epoch checkpoint)
    step: int = 0
    best_rsum: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)


def train(
    config: RunConfig,
    data_dir: str | Path,
    run_dir: str | Path,
    resume: bool = False,
    vocab_path: str | Path | None = None,
    overrides: dict | None = None,
    progress: bool = True,
    log=print,
) -> TrainState:
    """Trains `config` on DATA_DIR's train split, selecting by dev rSum; returns the final state.

    With `resume`, the run in RUN_DIR continues from its last.pt; `overrides` (e.g. more epochs)
    are applied to its saved config.
    """
    process = join_process_group()
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    # One run per folder at a time: the main process holds the folder's lock until it ends.
    with folder_lock(run_dir, "run folder") if process.main else contextlib.nullcontext():
        if process.main:
            remove_leftover_temps(run_dir)
        return _train(config, data_dir, run_dir, resume, vocab_path, overrides, progress, log, process)


def _train(config, data_dir, run_dir, resume, vocab_path, overrides, progress, log, process) -> TrainState:
    train_split = open_split(data_dir, "train", progress=progress)
    if resume:
        model, config, state, optimizer_states = _resume(run_dir, config, overrides, log)
    else:
        if process.main:
            _refuse_overwrite(run_dir)
        vocab = _word_vocabulary(config, data_dir, vocab_path, run_dir, process, log)
        config = _fit_to_data(config, train_split, vocab)
        torch.manual_seed(config.train.seed)  # the initial weights are the seed's too
        model, state, optimizer_states = build_model(config), TrainState(), {}
        model.vocab = vocab
        if config.backbone is not None and config.backbone.weights:
            load_weights(model.backbone, config.backbone.weights)
    check_image_input(train_split, model)
    if config.backbone is not None:
        log(f"raw images: the {config.backbone.name} image encoder ({config.backbone.image_size} px) trains too")
    model.run_config = config
    dev_split = _dev_split(data_dir, config, progress, log)
    if process.main:
        _report_skipped([train_split, dev_split], run_dir, log)
    log(f"unknown words in train captions: {100 * model.tokenizer.unk_rate(train_split.captions[:20000]):.2f}%")
    if process.main:
        _write_json(run_dir / "config.json", config.to_dict())
    model.to(process.device)
    trainer = _Trainer(config, model, state, train_split, dev_split, run_dir, process, progress, log)
    trainer.load_optimizer_states(optimizer_states)
    return trainer.run()


class _Trainer:
    def __init__(self, config, model, state, train_split, dev_split, run_dir, process, progress, log):
        self.config, self.model, self.state = config, model, state
        self.optimizer = _optimizer(model, config)
        self.train_split, self.dev_split, self.run_dir = train_split, dev_split, run_dir
        self.process, self.progress, self.log = process, progress, log
        augment = config.backbone.augment if config.backbone is not None else None
        self.dataset = PairDataset(train_split, readers_for(model, train_split, augment))
        self.adversary = _adversary_optimizer(model, config)
        if process.world_size == 1:
            self.network = model
        else:  # the adversary's parameters take no part in the main loss, and the reverse
            self.network = DistributedDataParallel(model, find_unused_parameters=self.adversary is not None)
        self.writer = SummaryWriter(str(run_dir / "tensorboard")) if process.main else None
        self.autocast_dtype = precision_dtype(training_precision(config.train.precision, process.device))
        # How the features were made, so that new photos can be read the same way (itmatch.extract).
        self.extraction = recorded_extraction(train_split.data_dir) if isinstance(train_split, PrecompSplit) else None

    def load_optimizer_states(self, states: dict) -> None:
        """The optimizers' states saved in last.pt (none for a new run)."""
        for name, optimizer in (("optimizer", self.optimizer), ("adversary_optimizer", self.adversary)):
            if states.get(name) is not None and optimizer is not None:
                optimizer.load_state_dict(states[name])

    def run(self) -> TrainState:
        train = self.config.train
        if self.state.epoch >= train.epochs:
            self.log(f"{self.run_dir}: already trained for {self.state.epoch} epochs (train.epochs={train.epochs})")
        while self.state.epoch < train.epochs:
            started = time.time()
            losses = self._train_epoch()
            self._end_epoch(losses, time.time() - started)
        if self.writer:
            self.writer.close()
        return self.state

    def _learning_rate(self, epoch: int) -> float:
        train = self.config.train
        return train.learning_rate * train.lr_decay_factor ** (epoch // train.lr_decay_epochs)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of `epoch`, minus those already trained before a resume."""
        train, world = self.config.train, self.process.world_size
        generator = torch.Generator().manual_seed(train.seed * 100_003 + epoch)
        if train.captions_per_image > 1:
            order = grouped_caption_order(self.train_split, train.captions_per_image, generator)
        else:
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
        per_step = train.batch_size * world
        steps = len(order) // per_step  # drop the last partial batch: BatchNorm needs > 1 item
        # Each process takes a contiguous share, so that P x K groups stay whole.
        share = train.batch_size
        first = self.process.rank * share
        batches = [order[s * per_step + first : s * per_step + first + share] for s in range(steps)]
        if not batches:
            raise DataError(
                self.train_split.data_dir, f"train split has {len(order)} captions: fewer than one batch of {per_step}"
            )
        return batches[self.state.batches_done :]

    def _train_epoch(self) -> dict[str, float]:
        """Trains one epoch; returns the mean of the loss and of each term over its batches."""
        epoch, train = self.state.epoch, self.config.train
        torch.manual_seed(train.seed * 100_003 + epoch + self.state.batches_done)  # dropout
        lr = self._learning_rate(epoch)
        for optimizer, scale in ((self.optimizer, 1.0), (self.adversary, train.adversary_lr_scale)):
            for group in optimizer.param_groups if optimizer else ():
                group["lr"] = lr * scale * group.get("lr_scale", 1.0)  # states saved before lr_scale have none
        global_batch = train.global_negatives and self.process.world_size > 1
        active = train.backward_pairs == "active"
        context = TrainingContext(self.config.loss, epoch, global_batch, active, train.compile)
        loader = make_loader(self.dataset, 1, train.workers, batch_sampler=self._epoch_batches(epoch))
        self.model.train()
        totals, count = {}, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{train.epochs}", disable=not (self.progress and self.process.main))
        for batch in bar:
            values, count = self._step(batch, context), count + 1
            totals = {name: totals.get(name, 0.0) + value for name, value in values.items()}
            bar.set_postfix({name: f"{value:.3f}" for name, value in values.items()} | {"lr": f"{lr:.1e}"})
            if self.writer and self.state.step % train.log_every == 0:
                for name, value in values.items():
                    self.writer.add_scalar(f"train/{name}", value, self.state.step)
                self.writer.add_scalar("train/lr", lr, self.state.step)
            if train.checkpoint_every and self.state.batches_done % train.checkpoint_every == 0:
                self._save("last.pt")
        return {name: total / max(count, 1) for name, total in totals.items()}

    def _step(self, batch: dict, context: TrainingContext) -> dict[str, float]:
        """One optimizer step on the weighted sum of the model's loss terms, then one of the
        adversary (if the model has one) on its own terms; returns "loss" and every term."""
        batch = {key: value.to(self.process.device) for key, value in batch.items()}
        terms = self._forward(batch, context)
        loss = weighted_loss(terms, self.config.loss, context.epoch)
        self._descend(self.optimizer, loss)
        values = {"loss": loss.item()} | {name: value.item() for name, value in terms.items()}
        if self.adversary is not None:
            adversary_terms = self._forward(batch, context, adversary=True)
            self._descend(self.adversary, weighted_loss(adversary_terms, self.config.loss, context.epoch))
            values |= {name: value.item() for name, value in adversary_terms.items()}
        self.state.step += 1
        self.state.batches_done += 1
        return values

    def _forward(self, batch: dict, context: TrainingContext, adversary: bool = False) -> dict[str, torch.Tensor]:
        """The loss terms, under autocast in bf16 when training in it (the weights stay fp32)."""
        dtype, device = self.autocast_dtype, self.process.device.type
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            terms = self.network(batch, context, adversary=adversary)
        return {name: value.float() for name, value in terms.items()}

    def _descend(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise ItmatchError(
                f"the loss became {loss.item()} at step {self.state.step}; last.pt holds the last good state"
            )
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.train.grad_clip > 0:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.train.grad_clip)
        optimizer.step()

    def _end_epoch(self, losses: dict[str, float], seconds: float) -> None:
        state = self.state
        state.epoch, state.batches_done = state.epoch + 1, 0
        record = {
            "epoch": state.epoch,
            **losses,
            "lr": self._learning_rate(state.epoch - 1),
            "seconds": round(seconds, 1),
        }
        if self.dev_split is not None:
            record |= self._dev_metrics()
        if self.process.main:
            for key in ("dev_rsum", "dev_i2t_r1", "dev_t2i_r1") if self.dev_split is not None else ():
                self.writer.add_scalar(key.replace("_", "/", 1), record[key], state.epoch)
            state.history.append(record)
            rsum = record.get("dev_rsum", float(state.epoch))  # no dev split: the latest is best
            improved = rsum > state.best_rsum
            if improved:
                state.best_rsum, state.best_epoch = rsum, state.epoch
            # best.pt first: a run killed between the two writes redoes this epoch from the
            # previous last.pt, instead of resuming from a last.pt whose best epoch has no best.pt.
            if improved:
                self._save("best.pt", with_optimizer=False)
            self._save("last.pt")
            self.log(_epoch_line(record, improved))
        if self.process.world_size > 1:
            dist.barrier()

    def _dev_metrics(self) -> dict[str, float]:
        """Dev recalls, every process scoring a share of the pairs (each encodes the whole split)."""
        train = self.config.train
        metrics = evaluate_split(
            self.model,
            self.dev_split,
            batch_size=train.eval_batch_size,
            workers=train.workers,
            progress=False,
            scoring=ScoringOptions(across_processes=True),
        )
        return {"dev_rsum": metrics["rsum"], "dev_i2t_r1": metrics["i2t"]["r1"], "dev_t2i_r1": metrics["t2i"]["r1"]}

    def _save(self, name: str, with_optimizer: bool = True) -> None:
        if not self.process.main:
            return
        extra = {"optimizer": self.optimizer.state_dict()} if with_optimizer else {}
        if with_optimizer and self.adversary is not None:
            extra["adversary_optimizer"] = self.adversary.state_dict()
        state = asdict(self.state)
        save_checkpoint(self.run_dir / name, self.model, self.config, state=state, extraction=self.extraction, **extra)


def _optimizer(model, config: RunConfig) -> torch.optim.Optimizer:
    train = config.train
    kind = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return kind(model.parameter_groups(), lr=train.learning_rate, weight_decay=train.weight_decay)


def _adversary_optimizer(model, config: RunConfig) -> torch.optim.Optimizer | None:
    """The second optimizer, over the model's adversary parameters (None if it has none)."""
    params = model.adversary_parameters()
    if not params:
        return None
    train = config.train
    kind = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=train.learning_rate * train.adversary_lr_scale, weight_decay=train.weight_decay)


def weighted_loss(terms: dict[str, torch.Tensor], config: LossConfig, epoch: int) -> torch.Tensor:
    """The sum of the loss terms, each times its weight at `epoch` (`LossConfig.weight`)."""
    if not terms:
        raise ItmatchError("the model returned no loss terms")
    return sum(config.weight(name, epoch) * value for name, value in terms.items())


def grouped_caption_order(split, per_image: int, generator: torch.Generator) -> list[int]:
    """Captions in groups of `per_image` of one image, images in random order: batches of P images
    x K captions (identity and CMPM losses need several captions per identity in a batch). Each
    image contributes one group of randomly chosen captions; images with fewer are left out."""
    image_of = torch.as_tensor(split.image_of_caption(np.arange(split.n_captions)))
    shuffled = torch.randperm(len(image_of), generator=generator)
    by_image = shuffled[torch.argsort(image_of[shuffled], stable=True)]  # random order inside each image
    counts = torch.bincount(image_of, minlength=split.n_images)
    starts = torch.cumsum(counts, 0) - counts
    images = torch.randperm(split.n_images, generator=generator)
    images = images[counts[images] >= per_image]
    picks = starts[images, None] + torch.arange(per_image)
    return by_image[picks.flatten()].tolist()


def _epoch_line(record: dict, improved: bool) -> str:
    line = f"epoch {record['epoch']}: loss {record['loss']:.4f}, {record['seconds']:.0f} s"
    if "dev_rsum" in record:
        recalls = f"i2t R@1 {record['dev_i2t_r1']:.1f}, t2i R@1 {record['dev_t2i_r1']:.1f}"
        line += f", dev rSum {record['dev_rsum']:.1f} ({recalls})"
    return line + (" *best" if improved else "")


def _dev_split(data_dir: Path, config: RunConfig, progress: bool, log) -> PrecompSplit | RawImageSplit | None:
    if "dev" not in split_names(data_dir):
        log(f"{data_dir}: no dev split; best.pt will follow the last epoch")
        return None
    return open_split(data_dir, "dev", max_captions=config.train.dev_max_captions, progress=progress)


def _report_skipped(splits: list, run_dir: Path, log) -> None:
    """Writes what raw-image splits left out to RUN_DIR/{split}_skipped.txt, with a summary line."""
    for split in splits:
        if isinstance(split, RawImageSplit) and split.skipped:
            path = run_dir / f"{split.split}_skipped.txt"
            write_skip_list(split.skipped, path)
            log(skip_summary(split, path))


RUN_FILES = ("last.pt", "best.pt", "config.json", "tensorboard")


def _refuse_overwrite(run_dir: Path) -> None:
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found:
        resume = "continue it with --resume or " if "last.pt" in found else ""
        raise ItmatchError(f"{run_dir} already holds a run ({', '.join(found)}); {resume}choose another --out")


def _word_vocabulary(config: RunConfig, data_dir: Path, vocab_path, run_dir: Path, process: Process, log):
    """The word vocabulary of a GRU text encoder; None for a pretrained one (it has its own tokenizer)."""
    text = config.model.text
    if not text.pretrained:
        return _vocabulary(data_dir, vocab_path, run_dir, process, log)
    if vocab_path is not None:
        raise ConfigError(f"{vocab_path}: model.text.encoder={text.encoder} reads its own tokenizer, not a vocabulary")
    return None


def _vocabulary(data_dir: Path, vocab_path, run_dir: Path, process: Process, log) -> Vocabulary:
    if vocab_path is not None:
        vocab = Vocabulary.load(vocab_path)
    elif (data_dir / "vocab.json").exists():
        vocab = Vocabulary.load(data_dir / "vocab.json")
    else:
        vocab = build_vocab_for_dir(data_dir)
        log(f"built a vocabulary of {len(vocab)} words from the train and dev captions of {data_dir}")
    if process.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        vocab.save(run_dir / "vocab.json")
    return vocab


def _fit_to_data(config: RunConfig, split: PrecompSplit | RawImageSplit, vocab: Vocabulary | None) -> RunConfig:
    """Sets what the data decides: vocabulary, feature dimension, regions per image, identity
    classes, and for raw images a backbone (the from-scratch convnet unless backbone.* names another)."""
    if isinstance(split, RawImageSplit) and config.backbone is None:
        config = replace(config, backbone=BackboneConfig())
    regions = split if config.backbone is None else build_backbone(config.backbone)  # both know the shape
    model_class = architecture_class(config.architecture)
    sizes = model_class.data_settings(config.model, regions.feature_dim, regions.n_regions, vocab)
    # One identity class per training image (the identity loss's labels are image indices).
    classes = {"identity_classes": split.n_images} if "identity" in config.loss.terms else {}
    return build_run_config(config.to_dict(), {"model": sizes, "loss": classes})


def _resume(run_dir: Path, requested: RunConfig, overrides: dict | None, log):
    last = run_dir / "last.pt"
    if not last.exists():
        raise ItmatchError(f"{run_dir}: nothing to resume (no last.pt)")
    payload = read_checkpoint(last)
    if payload["preset"] != requested.preset:
        raise ItmatchError(f"{last} was trained with preset {payload['preset']}, not {requested.preset}")
    if overrides:  # the model is built with them, so its weights must still fit
        saved = payload["config"]
        payload = {**payload, "config": build_run_config(merge(saved, overrides)).to_dict()}
        changed = _changed_settings(saved, payload["config"], ("model", "backbone"))
        try:
            model, config = model_from_payload(payload, last)
        except CheckpointError:
            raise ConfigError(
                f"--resume cannot change {', '.join(changed)}: the weights in {last} do not fit the new shape; "
                "train a new run in another --out"
            ) from None
    else:
        model, config = model_from_payload(payload, last)
    state = _train_state(payload, last)
    log(
        f"resuming {run_dir} after epoch {state.epoch}"
        + (f", batch {state.batches_done}" if state.batches_done else "")
    )
    return model, config, state, {name: payload.get(name) for name in ("optimizer", "adversary_optimizer")}


def _changed_settings(before: dict, after: dict, groups: tuple[str, ...], where: str = "") -> list[str]:
    """The dotted names of the settings under `groups` whose values differ, with both values."""
    changed = []
    for key in sorted(set(before) | set(after)):
        if not where and key not in groups:
            continue
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_settings(old, new, groups, f"{where}{key}.")
        elif old != new:
            changed.append(f"{where}{key} ({old} -> {new})")
    return changed


def _train_state(payload: dict, path: Path) -> TrainState:
    try:
        return TrainState(**payload["state"])
    except (KeyError, TypeError) as error:
        raise CheckpointError(path, f"has no usable training state to resume from ({error})") from None


def _write_json(path: Path, data: dict) -> None:
    text = (json.dumps(data, indent=2) + "\n").encode()
    atomic_write(path, lambda file: file.write(text))
