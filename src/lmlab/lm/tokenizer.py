"""Byte-level BPE tokenizers: train on a corpus with Hugging Face `tokenizers`, save/load as HF tokenizers.

What we return is always a ``transformers.PreTrainedTokenizerFast``, so everything downstream (the
Trainer, scoring, SILO datastores) sees the same interface as for a pretrained model's tokenizer.

- :func:`train_bpe`: GPT-2-style byte-level BPE (every byte is in the base vocabulary, so no input
  is ever out of vocabulary) trained on an iterator of texts.
- :func:`byte_tokenizer`: the same pre-tokenisation with no merges (256 byte tokens plus specials):
  needs no training, which makes it the tokenizer of the ``tiny:*`` test models.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from lmlab.errors import ConfigError, DataError, first_line

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]
MAX_VOCAB = 2**24  # 64x the largest LLM vocabularies (~256k); `tokenizers` aborts the process on absurd sizes


def _wrap(tok) -> "PreTrainedTokenizerFast":  # noqa: F821
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                 unk_token=None)
    hf.model_max_length = 1 << 30  # the model, not the tokenizer, bounds the context
    return hf


def _byte_level_base():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def byte_tokenizer():
    """A byte-level tokenizer with no merges: ids 0-255 are bytes, then the special tokens."""
    from tokenizers import models, pre_tokenizers

    tok = _byte_level_base()
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok.model = models.BPE(vocab=vocab, merges=[])
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tok)


def train_bpe(texts: Iterable[str], *, vocab_size: int = 8192, min_frequency: int = 2,
              out_dir: str | os.PathLike | None = None):
    """Train a byte-level BPE tokenizer on ``texts``; save it to ``out_dir`` when given.

    vocab_size counts the 256 byte tokens and the special tokens. Training 50 MB takes ~10 s here.
    ``texts`` is an iterable of strings (one string is refused: it would be read as one text per character).
    """
    from tokenizers import pre_tokenizers, trainers

    if isinstance(texts, str | bytes):
        raise ConfigError("train_bpe needs an iterable of texts, not one string: pass [text]")
    if not 256 + len(SPECIAL_TOKENS) <= vocab_size <= MAX_VOCAB:
        raise ConfigError(f"vocab_size must be in [{256 + len(SPECIAL_TOKENS)}, {MAX_VOCAB}] (at least the bytes and "
                          f"special tokens), not {vocab_size}")
    if out_dir is not None:
        _check_replaceable(Path(out_dir))  # before training, not after
    tok = _byte_level_base()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = {"n": 0}

    def counted():
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DataError(f"text {i} is a {type(t).__name__}, not a string: the tokenizer trains on str only")
            if t:
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:  # a lone surrogate (e.g. from a JSON "\ud800" escape)
                    raise DataError(f"text {i} is not valid Unicode ({e.reason} at character {e.start}); "
                                    "clean it or drop it") from None
                seen["n"] += 1
                yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen["n"] == 0:
        raise DataError("no text to train the tokenizer on")
    hf = _wrap(tok)
    if out_dir is not None:
        save(hf, out_dir)
    return hf


def _check_replaceable(out_dir: Path) -> None:
    """:func:`save` replaces the whole folder: only an empty one or a tokenizer's, never a user's other files."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "tokenizer.json").is_file():
        raise ConfigError(f"{out_dir} holds files that are not a tokenizer, and saving replaces the whole folder: "
                          "pick a new or empty folder")


def save(tokenizer, out_dir: str | os.PathLike) -> Path:
    """save_pretrained into a temporary folder, then rename it into place (replacing an earlier tokenizer there)."""
    from lmlab.io import atomic_dir

    _check_replaceable(Path(out_dir))
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def load(path: str | os.PathLike):
    """Load a tokenizer folder written by :func:`save` (or any HF tokenizer folder)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise DataError(f"tokenizer folder {p} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # OSError, ValueError, JSONDecodeError...: no or a damaged tokenizer in the folder
        reason = first_line(e, 200)
        raise DataError(f"{p} holds no loadable tokenizer ({reason}); expected a folder written by "
                        "`lmlab lm tokenizer` or a Hugging Face tokenizer folder") from e
