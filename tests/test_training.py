"""Short real training runs on synthetic scenes: learning, checkpoints, resuming after a kill."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subprocess_env

from itmatch import build_run_config, load_checkpoint
from itmatch.checkpoint import read_checkpoint
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.errors import DataError, ItmatchError
from itmatch.evaluation.runner import evaluate_split
from itmatch.training import train

N_TEST = 50
# Fast settings: small dimensions, a high learning rate and the sum of violations (the hardest
# negative alone stalls for epochs at the start of training).
FAST = {
    "train": {"batch_size": 32, "learning_rate": 1e-3, "checkpoint_every": 0, "dev_max_captions": None},
    "loss": {"negatives": "sum", "exclude_same_image": True},
}
SIZES = {
    "vsepp": {"model": {"embed_size": 64, "text": {"word_dim": 32}}, "train": {"epochs": 25}},
    "cmcan-official": {
        "model": {"embed_size": 32, "sim_dim": 16, "text": {"word_dim": 32}},
        "train": {"epochs": 6, "learning_rate": 3e-3},
    },
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    spec = SyntheticSpec(n_regions=8, feature_dim=32, regions_per_object=(1, 2))
    return make_synthetic(
        tmp_path_factory.mktemp("scenes"), {"train": 400, "dev": 40, "test": N_TEST}, seed=5, spec=spec
    )


def quiet(*_):
    pass


def fast_config(preset: str, **extra):
    from itmatch.config import merge

    return build_run_config(preset, merge(merge(FAST, SIZES[preset]), extra))


@pytest.mark.parametrize("preset", ["vsepp", "cmcan-official"])
def test_short_training_beats_chance_by_a_wide_margin(data, tmp_path, preset):
    torch.manual_seed(0)
    state = train(fast_config(preset), data, tmp_path, progress=False, log=quiet)
    metrics = evaluate_split(load_checkpoint(tmp_path / "best.pt"), PrecompSplit(data, "test"), progress=False)
    chance_t2i_r10 = 100 * 10 / N_TEST
    assert metrics["t2i"]["r10"] > 2.5 * chance_t2i_r10, metrics
    assert metrics["rsum"] > 2 * 6 * 100 * 5.5 / N_TEST, metrics  # twice the chance recalls (~66)
    assert state.best_rsum > 0 and len(state.history) == state.epoch
    for name in ("config.json", "vocab.json", "last.pt", "best.pt"):
        assert (tmp_path / name).exists()
    assert list((tmp_path / "tensorboard").iterdir())


def test_the_same_seed_trains_the_same_weights(data, tmp_path):
    config = fast_config("vsepp", train={"epochs": 1})
    for run in ("one", "two"):
        torch.manual_seed(hash(run) % 1000)  # whatever the process's random state was
        train(config, data, tmp_path / run, progress=False, log=quiet)
    one, two = (read_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)


def test_a_run_is_never_overwritten(data, tmp_path):
    config = fast_config("vsepp", train={"epochs": 1})
    train(config, data, tmp_path, progress=False, log=quiet)
    with pytest.raises(ItmatchError, match="--resume"):
        train(config, data, tmp_path, progress=False, log=quiet)
    with pytest.raises(ItmatchError, match="preset vsepp, not cmcan-official"):
        train(fast_config("cmcan-official"), data, tmp_path, resume=True, progress=False, log=quiet)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "itmatch.cli", *args]


def train_args(data: Path, out: Path, epochs: int) -> list[str]:
    settings = (
        "train.checkpoint_every=3 train.learning_rate=0.001 model.embed_size=32 model.sim_dim=16 "
        "model.text.word_dim=32 loss.negatives=sum train.dev_max_captions=null"
    )
    command = f"train --model cmcan-official --data {data} --out {out} --epochs {epochs} --batch-size 16 --quiet"
    return command.split() + [arg for setting in settings.split() for arg in ("--set", setting)]


def test_killed_mid_epoch_then_resumed_finishes_the_same_steps(data, tmp_path):
    env = subprocess_env()
    process = subprocess.Popen(
        cli(*train_args(data, tmp_path, 2)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    last = tmp_path / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if last.exists() and read_checkpoint(last)["state"]["batches_done"] >= 6:
            break
        time.sleep(0.1)
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = read_checkpoint(last)["state"]
    assert killed_at["epoch"] == 0 and killed_at["batches_done"] >= 6

    resumed = subprocess.run(cli(*train_args(data, tmp_path, 2), "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    final = read_checkpoint(last)["state"]
    steps_per_epoch = 400 * 5 // 16
    assert final["epoch"] == 2 and final["step"] == 2 * steps_per_epoch
    assert [record["epoch"] for record in final["history"]] == [1, 2]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["epochs"] == 2


def test_resume_with_more_epochs_extends_the_run(data, tmp_path):
    env = subprocess_env()
    first = subprocess.run(cli(*train_args(data, tmp_path, 1)), env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(cli(*train_args(data, tmp_path, 2), "--resume"), env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert read_checkpoint(tmp_path / "last.pt")["state"]["epoch"] == 2


def test_torchrun_two_processes_train_one_model(data, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    # Two processes share this machine's CPU (gloo), also where one GPU could not hold both ranks.
    env = subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "itmatch.cli", *train_args(data, tmp_path, 1)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = read_checkpoint(tmp_path / "last.pt")["state"]
    assert state["epoch"] == 1 and state["step"] == 400 * 5 // 32  # each step trains 2 x 16 captions


def test_nan_features_stop_training_with_the_file_and_image_named(data, tmp_path):
    broken = tmp_path / "data"
    broken.mkdir()
    for path in data.iterdir():
        (broken / path.name).symlink_to(path)
    features = np.load(data / "train_ims.npy")
    features[17, 3, 0] = np.nan
    (broken / "train_ims.npy").unlink()
    np.save(broken / "train_ims.npy", features)
    with pytest.raises(DataError, match=r"train_ims.npy: image 17 has NaN"):
        train(fast_config("vsepp", train={"epochs": 1}), broken, tmp_path / "run", progress=False, log=quiet)


def test_optimizer_follows_the_preset():
    from itmatch.models.registry import build_model
    from itmatch.training import _optimizer

    adamw, adam = (
        _optimizer(build_model(config), config) for config in map(build_run_config, ("vse-infty-bigru", "vsepp"))
    )
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.01
    assert type(adam) is torch.optim.Adam and adam.defaults["weight_decay"] == 0.0
