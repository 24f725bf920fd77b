"""Fuzzing the command line: whatever `--set` values and numeric options a user types, `itmatch`
succeeds or prints one error line; it never shows a traceback. Tiny data, made once."""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from itmatch.cli import main

FUZZ = settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
TINY = [
    "--set",
    "train.epochs=1",
    "--set",
    "model.embed_size=8",
    "--set",
    "model.text.word_dim=8",
    "--set",
    "train.batch_size=8",
    "--quiet",
]

KEYS = [
    *(f"train.{name}" for name in ("epochs", "batch_size", "learning_rate", "lr_decay_epochs", "lr_decay_factor")),
    *(f"train.{name}" for name in ("grad_clip", "weight_decay", "workers", "seed", "dev_max_captions")),
    *(f"train.{name}" for name in ("eval_batch_size", "checkpoint_every", "log_every", "optimizer")),
    *(f"loss.{name}" for name in ("margin", "negatives", "warmup_epochs", "reduction", "exclude_same_image")),
    *(f"model.{name}" for name in ("embed_size", "text.word_dim", "text.num_layers", "text.dropout", "image_norm")),
    *("train", "model", "loss", "model.text", "train.nope", "backbone", "preset"),
]
ODD_VALUES = ["0", "-1", "NaN", "Infinity", "-Infinity", "1e308", "-1e-9", "null", "true", "[]", "{}", '"x"', "abc"]
ODD_VALUES += ["", "1.5", "0.5", "0.001", "k:0", "k:2", "sum", "hardest", "mean", "adamw", "2.0"]
# Integers stay small: a size of 10**9 would be a real (if refused) allocation, and epochs a real run.
VALUES = st.one_of(st.integers(-3, 3).map(str), st.sampled_from(ODD_VALUES), st.text(max_size=4))
NUMBERS = st.one_of(st.integers(-3, 4).map(str), st.sampled_from(["0", "-0", "1e3", "nan", "inf", "x", "", "2.5"]))


def run(argv: list[str]) -> tuple[int, str]:
    """Exit status and stderr of `itmatch ARGV`; any exception but SystemExit fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    return code, err.getvalue()


def assert_success_or_one_line(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].startswith("itmatch"), err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    data = root / "data"
    options = "--train 16 --dev 5 --test 10 --regions 4 --feature-dim 8 --seed 1".split()
    assert run(["make-synthetic", str(data), *options])[0] == 0
    assert (
        run(["train", "--model", "vsepp", "--data", str(data), "--out", str(root / "run"), "--epochs", "1"] + TINY)[0]
        == 0
    )
    checkpoint = root / "run" / "best.pt"
    assert run(["index", str(checkpoint), "--data", str(data), "--out", str(root / "index"), "--quiet"])[0] == 0
    return {"root": root, "data": data, "checkpoint": checkpoint, "index": root / "index", "count": itertools.count()}


def fresh(workspace, name: str) -> Path:
    return workspace["root"] / f"{name}-{next(workspace['count'])}"


TRAIN_FUZZ = settings(FUZZ, max_examples=10)  # each example is a (tiny) training run


@TRAIN_FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_any_set_values(workspace, assignments):
    sets = [arg for key, value in assignments for arg in ("--set", f"{key}={value}")]
    out = fresh(workspace, "run")
    command = ["train", "--model", "vsepp", "--data", str(workspace["data"]), "--out", str(out), *TINY, *sets]
    assert_success_or_one_line(*run(command))


@TRAIN_FUZZ
@given(epochs=NUMBERS, batch_size=NUMBERS)
def test_train_numbers(workspace, epochs, batch_size):
    out = fresh(workspace, "run")
    numbers = [f"--epochs={epochs}", f"--batch-size={batch_size}"]
    command = ["train", "--model", "vsepp", "--data", str(workspace["data"]), "--out", str(out), *TINY, *numbers]
    assert_success_or_one_line(*run(command))


@FUZZ
@given(
    batch_size=NUMBERS,
    workers=st.sampled_from(["-1", "0", "1", "x"]),
    rerank_k=NUMBERS,
    temperature=NUMBERS,
    budget=st.sampled_from(["1", "0", "-1", "1k", "64M", "x", "0.5"]),
    protocol=st.sampled_from(["1k", "coco-5fold", "coco-5k"]),
)
def test_evaluate_numbers(workspace, batch_size, workers, rerank_k, temperature, budget, protocol):
    options = [f"--batch-size={batch_size}", f"--workers={workers}", f"--protocol={protocol}"]
    options += [f"--rerank-k={rerank_k}", f"--inverted-softmax={temperature}", f"--memory-budget={budget}"]
    json_out = fresh(workspace, "metrics")
    command = ["evaluate", str(workspace["checkpoint"]), "--data", str(workspace["data"]), "--quiet", *options]
    assert_success_or_one_line(*run([*command, "--json", str(json_out)]))


@FUZZ
@given(k=NUMBERS, rerank_k=NUMBERS, image=NUMBERS, by_image=st.booleans())
def test_search_numbers(workspace, k, rerank_k, image, by_image):
    query = [f"--image={image}"] if by_image else ["a red dog"]
    assert_success_or_one_line(*run(["search", str(workspace["index"]), *query, f"-k={k}", f"--rerank-k={rerank_k}"]))


@FUZZ
@given(port=st.one_of(NUMBERS, st.sampled_from(["65535", "65536", "99999", "80"])), rerank_k=NUMBERS)
def test_serve_numbers(workspace, port, rerank_k, monkeypatch_module):
    command = ["serve", str(workspace["index"]), f"--port={port}", f"--rerank-k={rerank_k}"]
    assert_success_or_one_line(*run(command))


@FUZZ
@given(counts=st.lists(NUMBERS, min_size=6, max_size=6), threshold=NUMBERS)
def test_make_synthetic_and_vocab_numbers(workspace, counts, threshold):
    names = ["--train", "--dev", "--test", "--regions", "--feature-dim", "--seed"]
    out = fresh(workspace, "synthetic")
    options = [f"{name}={value}" for name, value in zip(names, counts, strict=True)]
    assert_success_or_one_line(*run(["make-synthetic", str(out), *options]))
    vocab = fresh(workspace, "vocab.json")
    command = ["build-vocab", str(workspace["data"]), f"--threshold={threshold}", "--out", str(vocab)]
    assert_success_or_one_line(*run(command))


@pytest.fixture(scope="module")
def monkeypatch_module():
    """`itmatch serve` with acceptable numbers would run until stopped: uvicorn.run returns at once."""
    import uvicorn

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
        yield patch
