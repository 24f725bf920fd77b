"""Issue 18's probes: a resume or a kill loses no run, run and index folders are guarded, the
service serves only the index's own files to its own host, and every bad input is one line."""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHARED
from fastapi.testclient import TestClient
from PIL import Image
from service_setup import make_checkpoint, make_gallery

import itmatch.checkpoint as checkpoint_module
import itmatch.training as training
from itmatch.checkpoint import read_checkpoint
from itmatch.cli import main
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.data.vocab import Vocabulary
from itmatch.errors import DataError
from itmatch.files import LOCK_FILE
from itmatch.service.app import allowed_host_names, create_app
from itmatch.service.index import SearchIndex

TINY = "--set model.embed_size=8 --set model.text.word_dim=8 --set train.checkpoint_every=0 --set train.batch_size=8"
TINY += " --quiet"
OFFICIAL_CMCAN = SHARED / "fixtures" / "cmcan_official_small_ckpt.pth.tar"


def itmatch(command: str) -> int:
    """The exit status of `itmatch COMMAND` run in-process (the paths here have no spaces)."""
    try:
        return main(command.split())
    except SystemExit as exit:  # argparse's usage errors
        return exit.code


def one_line_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    for text in expected:
        assert text in err
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    spec = SyntheticSpec(n_regions=4, feature_dim=8)
    return make_synthetic(tmp_path_factory.mktemp("data"), {"train": 24, "dev": 8, "test": 8}, seed=1, spec=spec)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "vsepp"
    assert itmatch(f"train --model vsepp --data {data} --out {out} --epochs 1 {TINY}") == 0
    return out


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# -- 2. --resume refuses what changes the model's shape --------------------------------------------


def test_resume_refuses_settings_that_change_the_model_shape(data, run_copy, capsys):
    assert itmatch(f"train --model vsepp --data {data} --out {run_copy} --resume --set model.embed_size=16") == 2
    one_line_error(capsys, "--resume cannot change model.embed_size (8 -> 16)")
    assert read_checkpoint(run_copy / "last.pt")["config"]["model"]["embed_size"] == 8
    safe = "--epochs 2 --set train.learning_rate=0.001 --set train.workers=0 --quiet"
    assert itmatch(f"train --model vsepp --data {data} --out {run_copy} --resume {safe}") == 0
    assert itmatch(f"evaluate {run_copy / 'last.pt'} --data {data} --quiet") == 0


# -- 3. a kill between the two checkpoint writes -----------------------------------------------------


def test_a_kill_between_last_and_best_still_ends_with_best_of_the_best_epoch(tmp_path, monkeypatch):
    """Without a dev split every epoch is the best so far, so epoch 2 writes both files; the
    process dies after the first of them."""
    spec = SyntheticSpec(n_regions=4, feature_dim=8)
    data = make_synthetic(tmp_path / "data", {"train": 24}, seed=1, spec=spec)
    Vocabulary.build((data / "train_caps.txt").read_text().splitlines(), threshold=1).save(data / "vocab.json")
    overrides = {"model": {"embed_size": 8, "text": {"word_dim": 8}}, "train": {"epochs": 2, "batch_size": 8}}
    overrides["train"]["checkpoint_every"] = 0
    config = training.build_run_config("vsepp", overrides)
    saves, real_save = [], training.save_checkpoint

    def dies_at_the_fourth_write(path, *args, **kwargs):
        saves.append(Path(path).name)
        if len(saves) == 4:
            raise KeyboardInterrupt  # SIGKILL, as far as the run folder can tell
        real_save(path, *args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", dies_at_the_fourth_write)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, data, tmp_path / "run", progress=False, log=lambda *_: None)
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    state = training.train(config, data, tmp_path / "run", resume=True, progress=False, log=lambda *_: None)
    assert state.best_epoch == 2
    assert read_checkpoint(tmp_path / "run" / "best.pt")["state"]["epoch"] == 2


# -- 4. run folders: no overwrite, one run at a time, leftovers cleaned --------------------------------


def test_a_folder_with_only_best_pt_is_not_overwritten(data, run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(run / "best.pt", out / "best.pt")
    before = (out / "best.pt").read_bytes()
    assert itmatch(f"train --model vsepp --data {data} --out {out} --epochs 1 {TINY}") == 2
    one_line_error(capsys, "already holds a run (best.pt)")
    assert (out / "best.pt").read_bytes() == before


def test_two_runs_cannot_share_a_folder(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_FILE, "a") as held:  # a run in progress in another process
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert itmatch(f"train --model vsepp --data {data} --out {out} --epochs 1 {TINY}") == 2
        fcntl.flock(held, fcntl.LOCK_UN)
    one_line_error(capsys, "another process is using this run folder")
    assert not (out / "config.json").exists()


def test_leftover_temp_files_of_a_killed_save_are_removed_at_the_next_start(data, run_copy):
    leftover = run_copy / ".last.pt.k1ll3d.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert itmatch(f"train --model vsepp --data {data} --out {run_copy} --resume --epochs 2 --quiet") == 0
    assert not leftover.exists()


# -- 5. an index's model is the checkpoint it was built with -----------------------------------------


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    return make_gallery(tmp_path_factory.mktemp("gallery"), images=6)


@pytest.fixture(scope="module")
def index(gallery, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("index") / "index"
    checkpoint = make_checkpoint(gallery, "vsepp", folder.parent / "vsepp.pt")
    assert itmatch(f"index {checkpoint} --data {gallery} --out {folder} --quiet") == 0
    return folder


@pytest.fixture
def index_copy(index, tmp_path) -> Path:
    return Path(shutil.copytree(index, tmp_path / "index"))


def test_a_swapped_model_in_an_index_is_refused(index_copy, gallery, tmp_path, capsys):
    payload = read_checkpoint(index_copy / "model.pt")
    payload["model"] = {key: value + 1 for key, value in payload["model"].items()}  # same shapes, other weights
    torch.save(payload, index_copy / "model.pt")
    with pytest.raises(DataError, match="model.pt: is not the checkpoint this index was built with"):
        SearchIndex.open(index_copy, "cpu")
    assert itmatch(f"search {index_copy} a_dog") == 2
    one_line_error(capsys, "model.pt: is not the checkpoint")


# -- 6. the service: its own files, its own host, no CDN ----------------------------------------------


@pytest.fixture
def served(index_copy):
    app = create_app(SearchIndex.open(index_copy, "cpu"), allowed_hosts=allowed_host_names("127.0.0.1", []))
    return index_copy, TestClient(app, base_url="http://127.0.0.1:8000")


def test_pictures_are_regular_files_inside_the_index_only(served, tmp_path):
    folder, client = served
    assert client.get("/api/images/0/thumbnail").status_code == 200
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((folder / "pictures" / "1.jpg").read_bytes())
    (folder / "pictures" / "1.jpg").unlink()
    (folder / "pictures" / "1.jpg").symlink_to(secret)
    (folder / "pictures" / "2.jpg").unlink()
    (folder / "pictures" / "3.jpg").unlink()
    (folder / "pictures" / "3.jpg").mkdir()
    for image in (1, 2, 3):
        answer = client.get(f"/api/images/{image}/thumbnail")
        assert answer.status_code == 404 and "error" in answer.json()


def test_requests_for_another_host_are_refused(served, index_copy):
    _, client = served
    assert client.get("/api/info").status_code == 200
    assert client.get("/api/info", headers={"host": "localhost:8000"}).status_code == 200
    rebound = client.get("/api/info", headers={"host": "evil.example:8000"})
    assert rebound.status_code == 400 and "--allow-host evil.example" in rebound.json()["error"]
    allowed = allowed_host_names("0.0.0.0", ["photos.lan"])
    app = create_app(SearchIndex.open(index_copy, "cpu"), allowed_hosts=allowed)
    assert TestClient(app, base_url="http://photos.lan").get("/api/info").status_code == 200


def test_no_third_party_assets(served):
    _, client = served
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 200
    assert "cdn" not in client.get("/").text.lower()


# -- 7. every bad input is one line ------------------------------------------------------------------


def test_disk_full_while_saving_keeps_the_checkpoint_and_says_so(data, run_copy, monkeypatch, capsys):
    before = {name: (run_copy / name).read_bytes() for name in ("best.pt", "last.pt")}

    def disk_full(payload, file):
        file.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    assert itmatch(f"train --model vsepp --data {data} --out {run_copy} --resume --epochs 2 --quiet") == 2
    monkeypatch.undo()
    one_line_error(capsys, ".pt: cannot be written (No space left on device); the previous version is intact")
    assert {name: (run_copy / name).read_bytes() for name in before} == before
    assert not list(run_copy.glob(".*.tmp"))


TRAIN = "train --model vsepp --data {data} --out {out} --epochs 1 " + TINY
BAD_TRAIN_SETTINGS = {
    "--set train.batch_size=0": "train.batch_size must be >= 2, got 0",
    "--set train.lr_decay_epochs=0": "train.lr_decay_epochs must be >= 1, got 0",
    "--set train.log_every=0": "train.log_every must be >= 1, got 0",
    "--set train.learning_rate=-1": "train.learning_rate must be > 0",
    "--set train.learning_rate=NaN": "train.learning_rate must be a finite number",
    "--set train.workers=-1": "train.workers must be an integer >= 0, got -1",
    "--set model.embed_size=0": "the settings of vsepp do not make a model",
    "--epochs 0": "argument --epochs: must be >= 1, got 0",
    "--epochs -2": "argument --epochs: must be >= 1, got -2",
    "--set train=5": "--set train.epochs: train is not a group of settings",
    "--vocab {data}": "is a folder; name the vocabulary JSON file",
    "--vocab {nested}": "is nested too deeply to be a vocabulary",
}


@pytest.mark.parametrize("extra, message", BAD_TRAIN_SETTINGS.items(), ids=list(BAD_TRAIN_SETTINGS))
def test_bad_training_settings_are_one_line(extra, message, data, tmp_path, capsys):
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    command = f"{TRAIN} {extra}".format(data=data, out=tmp_path / "out", nested=nested)
    assert itmatch(command) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "out" / "last.pt").exists()


def test_a_preset_is_a_name_not_a_path(data, tmp_path, capsys):
    elsewhere = tmp_path / "mine"
    elsewhere.with_suffix(".json").write_text(json.dumps({"architecture": "vsepp", "preset": "vsepp"}))
    assert itmatch(f"train --model {elsewhere} --data {data} --out {tmp_path / 'out'}") == 2
    one_line_error(capsys, f"unknown preset '{elsewhere}'")


def test_make_synthetic_never_overwrites_data(data, capsys):
    before = (data / "train_caps.txt").read_bytes()
    assert itmatch(f"make-synthetic {data} --train 10 --dev 0 --test 0") == 2
    one_line_error(capsys, "not empty")
    assert (data / "train_caps.txt").read_bytes() == before


def _checkpoint_variant(run: Path, tmp_path: Path, **changes) -> Path:
    payload = read_checkpoint(run / "best.pt")
    payload.update(changes)
    for key in [key for key, value in changes.items() if value is KeyError]:
        del payload[key]
    path = tmp_path / "variant.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"config": KeyError}, "its 'config' entry is missing"),
        ({"model": [torch.zeros(2)]}, "its 'model' entry is missing or not a dict"),
        ({"vocab": None}, "the model has no vocabulary"),
    ],
)
def test_crafted_itmatch_checkpoints_are_one_line(changes, message, run, data, tmp_path, capsys):
    path = _checkpoint_variant(run, tmp_path, **changes)
    assert itmatch(f"evaluate {path} --data {data} --quiet") == 2
    one_line_error(capsys, str(path), message)


def test_a_checkpoint_that_is_not_a_safe_pickle_is_one_line(run, data, tmp_path, capsys):
    path = _checkpoint_variant(run, tmp_path, note=argparse.Namespace(x=1))
    assert itmatch(f"evaluate {path} --data {data} --quiet") == 2
    err = one_line_error(capsys, str(path), "argparse.Namespace", "refused")
    assert "weights_only" not in err


def test_features_of_another_dimension_name_the_file(run, tmp_path, capsys):
    other = make_synthetic(tmp_path / "wide", {"test": 8}, seed=1, spec=SyntheticSpec(n_regions=4, feature_dim=12))
    assert itmatch(f"evaluate {run / 'best.pt'} --data {other} --quiet") == 2
    one_line_error(capsys, f"best.pt on {other / 'test_ims.npy'}: the model expects 8-d region features, got 12-d")


@pytest.mark.parametrize(
    "options, message",
    [("--batch-size 0", "argument --batch-size: must be >= 1, got 0"), ("--json {folder}", "is a folder")],
)
def test_bad_evaluate_options_are_one_line(options, message, run, data, tmp_path, capsys):
    command = f"evaluate {run / 'best.pt'} --data {data} --quiet " + options.format(folder=tmp_path)
    assert itmatch(command) == 2
    one_line_error(capsys, message)


@pytest.mark.skipif(not OFFICIAL_CMCAN.exists(), reason="../shared/fixtures is not beside the project")
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.update(model=[1, 2, 3, 4, 5]), "'model' part 0 (img_enc) is not a state dict of tensors"),
        (lambda p: setattr(p["opt"], "num_layers", "two"), "is not a well-formed official-cmcan checkpoint"),
    ],
)
def test_malformed_official_checkpoints_are_one_line(damage, message, tmp_path, capsys):
    with torch.serialization.safe_globals([argparse.Namespace]):
        payload = torch.load(OFFICIAL_CMCAN, map_location="cpu", weights_only=True)
    damage(payload)
    path = tmp_path / "damaged.pth.tar"
    torch.save(payload, path)
    assert itmatch(f"convert official-cmcan {path} {tmp_path / 'out.pt'}") == 2
    one_line_error(capsys, str(path), message)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "manifest.json").write_text("{not json"), "manifest.json: is not a readable manifest"),
        (lambda f: _edit_manifest(f, lambda m: m.pop("counts")), "manifest.json: is damaged: no counts"),
        (lambda f: _edit_manifest(f, lambda m: m["counts"].update(images="six")), "manifest.json: is damaged"),
        (lambda f: _edit_manifest(f, lambda m: m.update(version=7)), "index format version 7 is not supported"),
        (lambda f: _truncate(f / "images.vector.bin"), "images.vector.bin: holds"),
        (lambda f: (f / "captions.txt").unlink(), "captions.txt: is missing"),
        (
            lambda f: _edit_manifest(f, lambda m: m["schema"]["images"]["keys"]["vector"].update(dtype="object")),
            "unsupported layout",
        ),
        (lambda f: (f / "manifest.json").rename(f / "index.pt"), "index.pt: is an index of itmatch's previous format"),
    ],
)
def test_a_corrupt_index_is_one_line(damage, message, index_copy, capsys):
    damage(index_copy)
    assert itmatch(f"search {index_copy} a_dog") == 2
    one_line_error(capsys, message)


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_decompression_bomb_photo_is_one_line(index, gallery, tmp_path, monkeypatch, capsys):
    data = Path(shutil.copytree(gallery, tmp_path / "data"))
    Image.new("RGB", (400, 300)).save(tmp_path / "bomb.png")
    (data / "test_paths.txt").write_text("\n".join([str(tmp_path / "bomb.png")] * 6) + "\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 400 x 300 is a bomb now
    checkpoint = index / "model.pt"
    assert itmatch(f"index {checkpoint} --data {data} --out {tmp_path / 'index'} --quiet") == 2
    one_line_error(capsys, "bomb.png: is too large to decode safely")


def test_a_scene_without_a_box_is_one_line(index, gallery, tmp_path, capsys):
    data = Path(shutil.copytree(gallery, tmp_path / "data"))
    lines = (data / "test_scenes.jsonl").read_text().splitlines()
    scene = json.loads(lines[2])
    del scene["objects"][0]["box"]
    lines[2] = json.dumps(scene)
    (data / "test_scenes.jsonl").write_text("\n".join(lines) + "\n")
    assert itmatch(f"index {index / 'model.pt'} --data {data} --out {tmp_path / 'index'} --quiet") == 2
    one_line_error(capsys, "test_scenes.jsonl: line 3")


@pytest.mark.parametrize(
    "options, message",
    [("--port 99999", "argument --port: must be 1..65535, got 99999"), ("--rerank-k -3", "must be >= 1, got -3")],
)
def test_serve_refuses_bad_numbers_before_starting(options, message, index, capsys):
    assert itmatch(f"serve {index} {options}") == 2
    one_line_error(capsys, message)
