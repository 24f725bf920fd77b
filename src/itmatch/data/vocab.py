"""SCAN's word vocabulary: four specials, then every word seen at least 4 times in train + dev."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from itmatch.data.sources import split_captions, split_names
from itmatch.data.tokenizer import tokenize
from itmatch.errors import DataError, InputError
from itmatch.files import atomic_write

PAD, START, END, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")


def _words_problem(words: list[Any]) -> str | None:
    """What is wrong with a word list, or None."""
    if not all(isinstance(word, str) for word in words):
        return "words must all be strings"
    if tuple(words[:4]) != SPECIALS:
        return f"ids 0-3 must be {list(SPECIALS)}, got {words[:4]}"
    if len(set(words)) != len(words):
        duplicates = [word for word, count in Counter(words).items() if count > 1]
        return f"words occur more than once: {duplicates[:5]}"
    return None


class Vocabulary:
    """Word <-> id; id = position in `words`."""

    def __init__(self, words: Iterable[str]):
        words = list(words)
        problem = _words_problem(words)
        if problem:
            raise InputError(f"invalid vocabulary: {problem}")
        self.words = words
        self._ids = {word: i for i, word in enumerate(words)}

    def __len__(self) -> int:
        return len(self.words)

    def word_to_id(self, word: str) -> int:
        return self._ids.get(word, UNK)

    def encode(self, caption: str) -> list[int]:
        """`<start>` + token ids + `<end>`, SCAN's caption encoding."""
        return [START, *(self._ids.get(token, UNK) for token in tokenize(caption)), END]

    def encode_batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids padded with `<pad>` (n, longest) and lengths (n,): what models take."""
        if not captions or any(not caption.strip() for caption in captions):
            raise InputError("captions must be a non-empty list of non-empty strings")
        encoded = [torch.tensor(self.encode(caption)) for caption in captions]
        lengths = torch.tensor([len(ids) for ids in encoded])
        return torch.nn.utils.rnn.pad_sequence(encoded, batch_first=True, padding_value=PAD), lengths

    def decode(self, ids: Iterable[int]) -> str:
        """Words joined by spaces, without `<pad>`, `<start>` and `<end>`."""
        words = []
        for i in map(int, ids):
            if not 0 <= i < len(self.words):
                raise InputError(f"word id {i} is outside the vocabulary (0..{len(self.words) - 1})")
            if i not in (PAD, START, END):
                words.append(self.words[i])
        return " ".join(words)

    def unk_rate(self, captions: Iterable[str]) -> float:
        """Fraction of word tokens (not counting `<start>`/`<end>`) that map to `<unk>`."""
        unknown = total = 0
        for caption in captions:
            tokens = tokenize(caption)
            total += len(tokens)
            unknown += sum(token not in self._ids for token in tokens)
        return unknown / total if total else 0.0

    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 4) -> Vocabulary:
        """Words seen >= threshold times, in order of first appearance (SCAN's Counter order)."""
        counts = Counter(token for caption in captions for token in tokenize(caption))
        # No token can be a special: the tokenizer splits "<" and ">" off.
        frequent = [word for word, count in counts.items() if count >= threshold]
        return cls([*SPECIALS, *frequent])

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """SCAN's `{"word2idx", "idx2word", "idx"}` JSON, or a plain JSON list of words."""
        path = Path(path)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise DataError(path, "file not found") from None
        except IsADirectoryError:
            raise DataError(path, "is a folder; name the vocabulary JSON file") from None
        except OSError as error:
            raise DataError(path, f"cannot be read ({error.strerror or error})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(path, f"is not valid JSON ({error})") from None
        except RecursionError:
            raise DataError(path, "is nested too deeply to be a vocabulary") from None
        words = data if isinstance(data, list) else _official_format_words(path, data)
        problem = _words_problem(words)
        if problem:
            raise DataError(path, problem)
        return cls(words)

    def save(self, path: str | Path) -> None:
        """SCAN's JSON format (idx2word keys are strings), written atomically."""
        official_format = {
            "word2idx": self._ids,
            "idx2word": {str(i): word for i, word in enumerate(self.words)},
            "idx": len(self.words),
        }
        text = json.dumps(official_format).encode("utf-8")
        atomic_write(Path(path), lambda file: file.write(text))


def _official_format_words(path: Path, data: Any) -> list[str]:
    """The word list of SCAN's JSON, checking that its three fields agree."""
    if not isinstance(data, dict) or not {"word2idx", "idx2word", "idx"} <= data.keys():
        raise DataError(path, 'must be a list of words or an object with "word2idx", "idx2word", "idx"')
    word2idx, idx2word, size = data["word2idx"], data["idx2word"], data["idx"]
    if not isinstance(word2idx, dict) or not isinstance(idx2word, dict):
        raise DataError(path, '"word2idx" and "idx2word" must be objects')
    try:
        by_id = {int(key): word for key, word in idx2word.items()}
    except ValueError:
        raise DataError(path, '"idx2word" keys must be integer ids') from None
    if sorted(by_id) != list(range(len(by_id))):
        raise DataError(path, f'"idx2word" ids are not contiguous 0..{len(by_id) - 1}')
    if size != len(by_id):
        raise DataError(path, f'"idx" is {size} but "idx2word" has {len(by_id)} words')
    words = [by_id[i] for i in range(len(by_id))]
    if not all(isinstance(word, str) for word in words):
        raise DataError(path, '"idx2word" values must be strings')
    if len(word2idx) != len(words) or any(word2idx.get(word) != i for i, word in enumerate(words)):
        raise DataError(path, '"word2idx" and "idx2word" disagree')
    return words


def build_vocab_for_dir(data_dir: str | Path, threshold: int = 4) -> Vocabulary:
    """SCAN's vocabulary of the train + dev captions of a precomp folder or raw-image source
    (train alone when there is no dev split)."""
    captions = split_captions(data_dir, "train")
    if "dev" in split_names(data_dir) or (Path(data_dir) / "dev_caps.txt").is_file():  # a folder of captions
        captions += split_captions(data_dir, "dev")
    return Vocabulary.build(captions, threshold)
