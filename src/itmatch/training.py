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
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from itmatch.checkpoint import model_from_payload, read_checkpoint, save_checkpoint
from itmatch.config import RunConfig, build_run_config, merge
from itmatch.data.datasets import PairDataset, image_input, image_reading, make_loader
from itmatch.data.precomp import PrecompSplit
from itmatch.data.raw import RawImageSplit, skip_summary, write_skip_list
from itmatch.data.sources import check_image_input, open_split, split_names
from itmatch.data.vocab import Vocabulary, build_vocab_for_dir
from itmatch.device import default_device
from itmatch.errors import CheckpointError, ConfigError, DataError, ItmatchError
from itmatch.evaluation.runner import evaluate_split
from itmatch.files import atomic_write, folder_lock, remove_leftover_temps
from itmatch.losses import triplet_ranking_loss
from itmatch.models.backbones import BackboneConfig, build_backbone, load_weights
from itmatch.models.registry import build_model


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    batches_done: int = 0  # batches of epoch `epoch` already trained (a mid-epoch checkpoint)
    step: int = 0
    best_rsum: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)


@dataclass
class Process:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=default_device)

    @property
    def main(self) -> bool:
        return self.rank == 0


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
    process = _join_process_group()
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    # One run per folder at a time: the main process holds the folder's lock until it ends.
    with folder_lock(run_dir, "run folder") if process.main else contextlib.nullcontext():
        if process.main:
            remove_leftover_temps(run_dir)
        return _train(config, data_dir, run_dir, resume, vocab_path, overrides, progress, log, process)


def _train(config, data_dir, run_dir, resume, vocab_path, overrides, progress, log, process) -> TrainState:
    train_split = open_split(data_dir, "train", progress=progress)
    if resume:
        model, config, state, optimizer_state = _resume(run_dir, config, overrides, log)
    else:
        if process.main:
            _refuse_overwrite(run_dir)
        vocab = _word_vocabulary(config, data_dir, vocab_path, run_dir, process, log)
        config = _fit_to_data(config, train_split, vocab)
        model, state, optimizer_state = build_model(config), TrainState(), None
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
    optimizer = _optimizer(model, config)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    trainer = _Trainer(config, model, optimizer, state, train_split, dev_split, run_dir, process, progress, log)
    return trainer.run()


class _Trainer:
    def __init__(self, config, model, optimizer, state, train_split, dev_split, run_dir, process, progress, log):
        self.config, self.model, self.optimizer, self.state = config, model, optimizer, state
        self.train_split, self.dev_split, self.run_dir = train_split, dev_split, run_dir
        self.process, self.progress, self.log = process, progress, log
        augment = config.backbone.augment if config.backbone is not None else None
        self.dataset = PairDataset(train_split, model.tokenizer, **image_reading(model, train_split, augment))
        self.network = model if process.world_size == 1 else DistributedDataParallel(model)
        self.writer = SummaryWriter(str(run_dir / "tensorboard")) if process.main else None

    def run(self) -> TrainState:
        train = self.config.train
        if self.state.epoch >= train.epochs:
            self.log(f"{self.run_dir}: already trained for {self.state.epoch} epochs (train.epochs={train.epochs})")
        while self.state.epoch < train.epochs:
            started = time.time()
            loss = self._train_epoch()
            self._end_epoch(loss, time.time() - started)
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
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        per_step = train.batch_size * world
        steps = len(order) // per_step  # drop the last partial batch: BatchNorm needs > 1 item
        batches = [order[s * per_step : (s + 1) * per_step][self.process.rank :: world] for s in range(steps)]
        if not batches:
            raise DataError(
                self.train_split.data_dir, f"train split has {len(order)} captions: fewer than one batch of {per_step}"
            )
        return batches[self.state.batches_done :]

    def _train_epoch(self) -> float:
        epoch, train, loss_config = self.state.epoch, self.config.train, self.config.loss
        torch.manual_seed(train.seed * 100_003 + epoch + self.state.batches_done)  # dropout
        lr = self._learning_rate(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # optimizer states saved before lr_scale have none
        negatives = "sum" if epoch < loss_config.warmup_epochs else loss_config.negatives
        loader = make_loader(self.dataset, 1, train.workers, batch_sampler=self._epoch_batches(epoch))
        self.model.train()
        total, count = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{train.epochs}", disable=not (self.progress and self.process.main))
        for batch in bar:
            loss = self._step(batch, negatives)
            total, count = total + loss, count + 1
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
            if self.writer and self.state.step % train.log_every == 0:
                self.writer.add_scalar("train/loss", loss, self.state.step)
                self.writer.add_scalar("train/lr", lr, self.state.step)
            if train.checkpoint_every and self.state.batches_done % train.checkpoint_every == 0:
                self._save("last.pt")
        return total / max(count, 1)

    def _step(self, batch: dict, negatives: str) -> float:
        device = self.process.device
        scores = self.network(
            image_input(batch).to(device),
            batch["tokens"].to(device),
            batch["lengths"],
            batch["adjacency"].to(device) if "adjacency" in batch else None,
        )
        image_ids = batch["image_index"].to(device) if self.config.loss.exclude_same_image else None
        loss = triplet_ranking_loss(scores, self.config.loss, image_ids, negatives)
        if not torch.isfinite(loss):
            raise ItmatchError(
                f"the loss became {loss.item()} at step {self.state.step}; last.pt holds the last good state"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.state.step += 1
        self.state.batches_done += 1
        return loss.item()

    def _end_epoch(self, loss: float, seconds: float) -> None:
        state = self.state
        state.epoch, state.batches_done = state.epoch + 1, 0
        record = {
            "epoch": state.epoch,
            "loss": loss,
            "lr": self._learning_rate(state.epoch - 1),
            "seconds": round(seconds, 1),
        }
        if self.process.main:
            if self.dev_split is not None:
                train = self.config.train
                metrics = evaluate_split(
                    self.model, self.dev_split, batch_size=train.eval_batch_size, workers=train.workers, progress=False
                )
                record.update(
                    dev_rsum=metrics["rsum"], dev_i2t_r1=metrics["i2t"]["r1"], dev_t2i_r1=metrics["t2i"]["r1"]
                )
                for key in ("dev_rsum", "dev_i2t_r1", "dev_t2i_r1"):
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

    def _save(self, name: str, with_optimizer: bool = True) -> None:
        if not self.process.main:
            return
        extra = {"optimizer": self.optimizer.state_dict()} if with_optimizer else {}
        save_checkpoint(self.run_dir / name, self.model, self.config, state=asdict(self.state), **extra)


def _optimizer(model, config: RunConfig) -> torch.optim.Optimizer:
    train = config.train
    kind = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return kind(model.parameter_groups(), lr=train.learning_rate, weight_decay=train.weight_decay)


def _epoch_line(record: dict, improved: bool) -> str:
    line = f"epoch {record['epoch']}: loss {record['loss']:.4f}, {record['seconds']:.0f} s"
    if "dev_rsum" in record:
        recalls = f"i2t R@1 {record['dev_i2t_r1']:.1f}, t2i R@1 {record['dev_t2i_r1']:.1f}"
        line += f", dev rSum {record['dev_rsum']:.1f} ({recalls})"
    return line + (" *best" if improved else "")


def _join_process_group() -> Process:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Process()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Process(rank, world_size, device)


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
    """Sets what the data decides: vocabulary, feature dimension, regions per image, and for raw
    images a backbone (the from-scratch convnet unless backbone.* names another)."""
    if isinstance(split, RawImageSplit) and config.backbone is None:
        config = replace(config, backbone=BackboneConfig())
    regions = split if config.backbone is None else build_backbone(config.backbone)  # both know the shape
    sizes = {"img_dim": regions.feature_dim} | ({} if vocab is None else {"vocab_size": len(vocab)})
    if hasattr(config.model, "n_regions"):
        sizes["n_regions"] = regions.n_regions
    return build_run_config(config.to_dict(), {"model": sizes})


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
    return model, config, state, payload.get("optimizer")


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
