"""Tokenisation as SCAN did it, and SCAN's vocabulary files (round trip, the real F30K vocab, bad files)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SHARED

from itmatch.data.tokenizer import tokenize
from itmatch.data.vocab import END, PAD, START, UNK, Vocabulary, build_vocab_for_dir
from itmatch.errors import DataError, InputError

F30K = SHARED / "data" / "f30k_test_text"
needs_f30k = pytest.mark.skipif(not F30K.exists(), reason=f"Flickr30K test captions and vocab not found at {F30K}")


@pytest.mark.parametrize(
    ("caption", "tokens"),
    [
        ("A man wears an orange hat and glasses .", "a man wears an orange hat and glasses ."),
        ("Two dogs don't play.", "two dogs do n't play ."),
        ("A girl's T-shirt, (blue) & jeans!", "a girl 's t-shirt , ( blue ) & jeans !"),
        ('A sign that says " Hello "', "a sign that says `` hello ``"),
        # Punkt ends a sentence at "word. next": the period is split off mid-caption...
        ("A dog runs. It is brown.", "a dog runs . it is brown ."),
        ("A man... walks. OK", "a man ... walks . ok"),
        # ...but not after abbreviations or single letters (initials).
        ("St. Patrick's day parade. Mr. Smith waves", "st. patrick 's day parade . mr. smith waves"),
        ("The letter A. on a sign", "the letter a. on a sign"),
        ("", ""),
    ],
)
def test_tokenize(caption: str, tokens: str) -> None:
    assert tokenize(caption) == tokens.split()


def test_tokenize_refuses_bytes() -> None:
    with pytest.raises(TypeError, match="bytes"):
        tokenize(b"a dog")  # type: ignore[arg-type]


def small_vocab() -> Vocabulary:
    return Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "."])


def test_encode_decode() -> None:
    vocab = small_vocab()
    assert (PAD, START, END, UNK) == (0, 1, 2, 3)
    assert len(vocab) == 7
    assert vocab.word_to_id("dog") == 5 and vocab.word_to_id("cat") == UNK
    assert vocab.encode("A dog, a cat.") == [START, 4, 5, UNK, 4, UNK, 6, END]
    assert vocab.decode([START, 4, 5, 6, END, PAD, PAD]) == "a dog ."
    assert vocab.unk_rate(["A dog.", "a cat"]) == pytest.approx(1 / 5)
    with pytest.raises(InputError, match="outside"):
        vocab.decode([7])


def test_constructor_checks_the_specials() -> None:
    with pytest.raises(InputError, match="ids 0-3"):
        Vocabulary(["<start>", "<pad>", "<end>", "<unk>"])
    with pytest.raises(InputError, match="more than once"):
        Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "a"])


def test_save_writes_scan_format_and_round_trips(tmp_path: Path) -> None:
    vocab = small_vocab()
    path = tmp_path / "vocab.json"
    vocab.save(path)
    data = json.loads(path.read_text())
    assert set(data) == {"word2idx", "idx2word", "idx"}
    assert data["idx2word"] == {str(i): w for i, w in enumerate(vocab.words)}  # string keys, as SCAN
    assert data["word2idx"] == {w: i for i, w in enumerate(vocab.words)}
    assert data["idx"] == 7
    assert Vocabulary.load(path).words == vocab.words
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temporary file left behind


def test_load_plain_word_list(tmp_path: Path) -> None:
    path = tmp_path / "words.json"
    path.write_text(json.dumps(small_vocab().words))
    assert Vocabulary.load(path).words == small_vocab().words


def test_build_keeps_frequent_words_in_first_appearance_order() -> None:
    captions = ["a cat sits .", "a dog sits .", "a dog runs .", "the dog sits ."]
    vocab = Vocabulary.build(captions, threshold=3)
    assert vocab.words == ["<pad>", "<start>", "<end>", "<unk>", "a", "sits", ".", "dog"]
    assert Vocabulary.build(captions, threshold=1).words[4:] == ["a", "cat", "sits", ".", "dog", "runs", "the"]


def test_build_vocab_for_dir(tmp_path: Path) -> None:
    (tmp_path / "train_caps.txt").write_text("A dog .\nA dog runs\n")
    (tmp_path / "dev_caps.txt").write_text("a cat\n")
    (tmp_path / "test_caps.txt").write_text("zebra zebra zebra\n")
    assert build_vocab_for_dir(tmp_path, threshold=2).words[4:] == ["a", "dog"]
    assert build_vocab_for_dir(tmp_path, threshold=1).words[4:] == ["a", "dog", ".", "runs", "cat"]
    (tmp_path / "dev_caps.txt").unlink()  # no dev split: train alone
    assert build_vocab_for_dir(tmp_path, threshold=1).words[4:] == ["a", "dog", ".", "runs"]
    (tmp_path / "train_caps.txt").unlink()
    with pytest.raises(DataError, match="train_caps.txt"):
        build_vocab_for_dir(tmp_path)


SCAN_OK = {
    "word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "a": 4},
    "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "a"},
    "idx": 5,
}


def _with(**changes: object) -> str:
    return json.dumps({**SCAN_OK, **changes})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe[]", "not valid JSON"),
        (json.dumps({"word2idx": {}, "idx": 0}), "idx2word"),
        (json.dumps(42), "list of words or an object"),
        (_with(idx2word={"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "5": "a"}), "not contiguous"),
        (_with(idx2word={"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "x": "a"}), "integer ids"),
        (_with(idx=6), '"idx" is 6'),
        (_with(word2idx={"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "a": 7}), "disagree"),
        (_with(word2idx={"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}), "disagree"),
        (_with(idx2word={"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": 4}), "strings"),
        (
            _with(
                word2idx={"<start>": 0, "<pad>": 1, "<end>": 2, "<unk>": 3, "a": 4},
                idx2word={"0": "<start>", "1": "<pad>", "2": "<end>", "3": "<unk>", "4": "a"},
            ),
            "ids 0-3 must be",
        ),
        (json.dumps(["<pad>", "<start>", "<end>"]), "ids 0-3 must be"),
        (json.dumps(["<pad>", "<start>", "<end>", "<unk>", "a", "a"]), "more than once"),
    ],
)
def test_bad_vocab_files(tmp_path: Path, content: str | bytes, problem: str) -> None:
    path = tmp_path / "bad_vocab.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=problem) as caught:
        Vocabulary.load(path)
    assert caught.value.path == path and "bad_vocab.json" in str(caught.value)


def test_missing_vocab_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.json: file not found"):
        Vocabulary.load(tmp_path / "missing.json")


@needs_f30k
def test_real_scan_vocab_and_unk_rate(record_property: Callable[[str, object], None]) -> None:
    vocab = Vocabulary.load(F30K / "f30k_precomp_vocab.json")
    assert len(vocab) == 8481
    assert vocab.words[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    captions = (F30K / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    assert len(captions) == 5000
    rate = vocab.unk_rate(captions)
    record_property("f30k_test_unk_rate", rate)
    print(f"\n<unk> rate of the 5,000 Flickr30K test captions with SCAN's vocab: {rate:.4%}")
    # Measured: 0.9741% (657 of 67,446 tokens); the test words SCAN's train+dev vocab never saw.
    assert rate < 0.015
    assert vocab.decode(vocab.encode(captions[4])) == "a man wears an orange hat and glasses ."
