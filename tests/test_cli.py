"""The `itmatch` command end to end on small data: every subcommand and its error messages."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from conftest import SHARED

from itmatch.cli import main, memory_size
from itmatch.data.vocab import Vocabulary


def itmatch(command: str) -> int:
    """Runs `itmatch COMMAND` in-process (the paths in these tests have no spaces)."""
    return main(command.split())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    assert itmatch(f"make-synthetic {out} --train 120 --dev 20 --test 50 --regions 8 --feature-dim 16 --seed 2") == 0
    return out


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    sizes = "--set model.embed_size=32 --set model.text.word_dim=16"
    assert itmatch(f"train --model vsepp --data {data} --out {run} --epochs 2 --batch-size 16 --quiet {sizes}") == 0
    return run


def test_make_synthetic_writes_the_precomp_layout(data):
    for split, n in (("train", 120), ("dev", 20), ("test", 50)):
        assert np.load(data / f"{split}_ims.npy", mmap_mode="r").shape == (n, 8, 16)
        assert len((data / f"{split}_caps.txt").read_text().splitlines()) == 5 * n


def test_build_vocab(data, tmp_path, capsys):
    assert itmatch(f"build-vocab {data} --out {tmp_path / 'vocab.json'}") == 0
    vocab = Vocabulary.load(tmp_path / "vocab.json")
    assert vocab.words[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and "dog" in vocab.words
    assert f"{len(vocab)} words" in capsys.readouterr().out


def test_models_lists_every_preset(capsys):
    assert itmatch("models") == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("cmcan-paper", "cmcan-official", "vsepp"))


def test_train_then_evaluate_writes_the_json(trained, data, tmp_path, capsys):
    assert itmatch(f"evaluate {trained / 'best.pt'} --data {data} --json {tmp_path / 'm.json'} --quiet") == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert set(result) >= {"i2t", "t2i", "rsum", "protocol", "n_images", "n_captions"}
    assert set(result["i2t"]) == {"r1", "r5", "r10", "medr", "meanr"}
    assert (result["n_images"], result["n_captions"], result["protocol"]) == (50, 250, "1k")
    table = capsys.readouterr().out
    assert "t2i R@10" in table and f"{result['rsum']:.1f}" in table


def test_five_fold_protocol_averages_folds_with_workers(trained, data, tmp_path):
    options = "--protocol coco-5fold --quiet --memory-budget 1M --workers 2"
    assert itmatch(f"evaluate {trained / 'best.pt'} --data {data} --json {tmp_path / 'f.json'} {options}") == 0
    result = json.loads((tmp_path / "f.json").read_text())
    assert result["n_folds"] == 5 and result["n_images"] == 10
    recalls = [result[d][k] for d in ("i2t", "t2i") for k in ("r1", "r5", "r10")]
    assert result["rsum"] == pytest.approx(sum(recalls))


def test_convert_official_checkpoint(tmp_path, capsys):
    official = SHARED / "fixtures" / "cmcan_official_small_ckpt.pth.tar"
    if not official.exists():
        pytest.skip("../shared/fixtures is not beside the project")
    assert itmatch(f"convert official-cmcan {official} {tmp_path / 'cmcan.pt'}") == 0
    assert "cmcan-official" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command, message",
    [
        ("evaluate {missing} --data {data}", "missing.pt: no such file"),
        ("evaluate {best} --data {data} --split val", "val_ims.npy: file not found"),
        ("evaluate {best} --data {data} --split test --protocol coco-5fold --memory-budget lots", None),
        ("train --model nope --data {data} --out {out}", "unknown preset 'nope'"),
        ("train --model vsepp --data {data} --out {out} --set train.epoch=3", "unknown config key 'train.epoch'"),
        ("train --model vsepp --data {data} --out {out} --resume", "nothing to resume"),
        ("build-vocab {out}", "train_caps.txt: file not found"),
    ],
)
def test_errors_are_one_clear_line(command, message, trained, data, tmp_path, capsys):
    fill = {"missing": tmp_path / "missing.pt", "data": data, "best": trained / "best.pt", "out": tmp_path / "out"}
    if message is None:  # argparse's own usage error
        with pytest.raises(SystemExit):
            itmatch(command.format(**fill))
        assert "not a memory size: 'lots'" in capsys.readouterr().err
        return
    assert itmatch(command.format(**fill)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_memory_sizes():
    assert memory_size("512M") == 512 << 20 and memory_size("2G") == 2 << 30 and memory_size("1000") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        memory_size("lots")


def test_ensemble_with_inverted_softmax(trained, data, tmp_path, capsys):
    best = trained / "best.pt"
    options = f"--inverted-softmax 0.05 --json {tmp_path / 'e.json'} --quiet"
    assert itmatch(f"evaluate {best} {best} --data {data} {options}") == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["checkpoints"] == [str(best), str(best)] and result["inverted_softmax"] == 0.05
    assert "vsepp + vsepp (inverted softmax 0.05)" in capsys.readouterr().out


def test_two_stage_evaluation_reports_the_pairs_it_scored(trained, data, tmp_path):
    options = f"--rerank-k 5 --json {tmp_path / 'r.json'} --quiet --precision bf16 --compile"
    assert itmatch(f"evaluate {trained / 'best.pt'} --data {data} {options}") == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["rerank_k"] == 5 and result["precision"] == "bf16"
    assert 0 < result["pairs_scored"] <= 5 * (50 + 250) < 50 * 250


def test_two_stage_evaluation_by_margin_scores_its_budget_exactly(trained, data, tmp_path, capsys):
    options = f"--rerank-k 5 --candidates margin --json {tmp_path / 'r.json'} --quiet"
    assert itmatch(f"evaluate {trained / 'best.pt'} --data {data} {options}") == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["candidates"] == "margin" and result["pairs_scored"] == 5 * 250
    assert "(5 per query by margin of its embeddings)" in capsys.readouterr().out
