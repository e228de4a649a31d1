"""Turn captions into token ids for a T5 text encoder: a local tokenizer file, or a word-level one built from captions.

Open-Sora 1.2 encodes captions with T5 v1.1 XXL. Its tokenizer loads from a local folder with
`conversion.t5_io.load_t5_tokenizer` (tokenizer.json through transformers). The tiny preset has no pretrained
tokenizer offline. For it, `build_word_tokenizer` writes a T5-style word-level tokenizer.json for a fixed set
of captions. Words are lower-cased and split on whitespace and punctuation. T5's special tokens keep T5's ids:
pad 0, end of sequence "</s>" 1, unknown word 2. transformers reads that file as well
(`PreTrainedTokenizerFast(tokenizer_file=...)`).

`CaptionTokenizer.encode` pads every caption to `max_length` tokens, ends it with "</s>" as T5 does, and
truncates a longer one with a logged warning that names the caption, so a long prompt never fails silently.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, as in T5's vocabulary


class CaptionTokenizer:
    """A `tokenizers.Tokenizer` with T5's padding and end-of-sequence conventions and a fixed length."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, max_length: int):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r} is invalid; use at least 2 (one word and '</s>')")
        for token, expected in zip(SPECIAL_TOKENS, range(3)):
            if tokenizer.token_to_id(token) != expected:
                raise ValueError(
                    f"the tokenizer maps {token!r} to id {tokenizer.token_to_id(token)}, but T5 encoders expect "
                    f"{expected}; build it with build_word_tokenizer or use a T5 tokenizer.json"
                )
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, max_length: int) -> CaptionTokenizer:
        """Load tokenizer.json (a file, or a folder that contains one)."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found; build one with build_word_tokenizer or "
                                    "point at the folder of a T5 tokenizer (tokenizer.json)")
        return cls(tokenizers.Tokenizer.from_file(str(path)), max_length=max_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Return (input_ids int32 [N, max_length], mask int32 [N, max_length]) for N captions.

        Each row is the caption's tokens, then "</s>", then padding. A caption with more than
        max_length - 1 tokens keeps its first max_length - 1 and is reported with a warning.
        """
        if isinstance(captions, str):
            raise TypeError("encode takes a sequence of captions; wrap a single caption in a list")
        ids = np.zeros((len(captions), self.max_length), np.int32)
        mask = np.zeros_like(ids)
        eos = self.tokenizer.token_to_id(EOS_TOKEN)
        for row, caption in enumerate(captions):
            tokens = list(self.tokenizer.encode(caption, add_special_tokens=False).ids)
            if len(tokens) > self.max_length - 1:
                logger.warning(
                    "caption %r has %d tokens; it was cut to the text length of %d tokens (%d words and '</s>'). "
                    "Shorten it or raise the text length (model_max_length)",
                    caption, len(tokens), self.max_length, self.max_length - 1,
                )
                tokens = tokens[: self.max_length - 1]
            tokens.append(eos)
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask

    def unknown_words(self, caption: str) -> list[str]:
        """Return the words of `caption` that the vocabulary lacks (they encode as "<unk>")."""
        encoding = self.tokenizer.encode(caption, add_special_tokens=False)
        unk = self.tokenizer.token_to_id(UNK_TOKEN)
        return [caption[start:end] for (start, end), index in zip(encoding.offsets, encoding.ids) if index == unk]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])


def build_word_tokenizer(captions: Iterable[str], folder: str | os.PathLike[str]) -> pathlib.Path:
    """Write a word-level tokenizer.json for `captions` into `folder` and return its path.

    The vocabulary is T5's three special tokens followed by every lower-cased word of the captions, sorted,
    so the file depends only on the set of words. Words outside it encode as "<unk>".
    """
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre_tokenizer = _pre_tokenizer()
    words: set[str] = set()
    for caption in captions:
        text = normalizer.normalize_str(caption)
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words - set(SPECIAL_TOKENS)):
        vocab[word] = len(vocab)
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, vocab[EOS_TOKEN])]
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TOKENIZER_FILE
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(json.loads(tokenizer.to_str()), indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)
    return path


__all__ = ["CaptionTokenizer", "SPECIAL_TOKENS", "TOKENIZER_FILE", "build_word_tokenizer"]
