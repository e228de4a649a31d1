"""Tests of the caption tokenizer (jaxgen.text_tokenizer) and of `--cfg FILE:ARG` parsing."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from jaxgen import config as config_lib
from jaxgen.text_tokenizer import CaptionTokenizer, build_word_tokenizer

CAPTIONS = ["the digit seven moves to the left", "the digit one moves up", "The digit two moves down."]


@pytest.fixture()
def tokenizer(tmp_path) -> CaptionTokenizer:
    build_word_tokenizer(CAPTIONS, tmp_path)
    return CaptionTokenizer.from_file(tmp_path, max_length=8)


def test_vocabulary_has_t5_special_ids_and_every_word(tokenizer):
    vocab = tokenizer.tokenizer.get_vocab()
    assert [vocab["<pad>"], vocab["</s>"], vocab["<unk>"]] == [0, 1, 2]
    words = {"the", "digit", "seven", "moves", "to", "left", "one", "up", "two", "down", "."}
    assert words <= set(vocab)
    assert tokenizer.vocab_size == 3 + len(words)


def test_encode_pads_and_ends_with_eos(tokenizer):
    ids, mask = tokenizer.encode(["the digit one moves up"])
    vocab = tokenizer.tokenizer.get_vocab()
    expected = [vocab[w] for w in "the digit one moves up".split()] + [1, 0, 0]
    np.testing.assert_array_equal(ids[0], expected)
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 1, 1, 0, 0])
    assert ids.dtype == np.int32
    assert ids.shape == (1, 8)


def test_case_is_folded(tokenizer):
    upper, _ = tokenizer.encode(["THE DIGIT ONE MOVES UP"])
    lower, _ = tokenizer.encode(["the digit one moves up"])
    np.testing.assert_array_equal(upper, lower)


def test_long_caption_is_truncated_with_a_warning(tokenizer, caplog):
    caption = "the digit seven moves to the left the digit one moves up"
    with caplog.at_level(logging.WARNING, logger="jaxgen.text_tokenizer"):
        ids, mask = tokenizer.encode([caption])
    assert "cut to the text length of 8 tokens" in caplog.text
    assert caption in caplog.text
    assert mask[0].sum() == 8
    assert ids[0, -1] == 1  # "</s>" ends the truncated caption


def test_unknown_words_are_reported(tokenizer):
    assert tokenizer.unknown_words("the digit Nine moves up!") == ["Nine", "!"]
    ids, _ = tokenizer.encode(["nine"])
    assert ids[0, 0] == 2


def test_tokenizer_file_is_deterministic_and_read_by_transformers(tmp_path):
    first = build_word_tokenizer(CAPTIONS, tmp_path / "a").read_bytes()
    second = build_word_tokenizer(list(reversed(CAPTIONS)), tmp_path / "b").read_bytes()
    assert first == second
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "a" / "tokenizer.json"))
    ours, _ = CaptionTokenizer.from_file(tmp_path / "a", max_length=8).encode(["the digit one moves up"])
    assert fast("the digit one moves up").input_ids == [int(i) for i in ours[0] if i]


def test_bad_inputs(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="build_word_tokenizer"):
        CaptionTokenizer.from_file(tmp_path / "missing", max_length=8)
    with pytest.raises(ValueError, match="max_length=1"):
        CaptionTokenizer(tokenizer.tokenizer, max_length=1)
    with pytest.raises(TypeError, match="sequence of captions"):
        tokenizer.encode("the digit one moves up")


def test_split_config_arg(tmp_path):
    assert config_lib.split_config_arg("opensora.py:v1.2") == ("opensora.py", "v1.2")
    assert config_lib.split_config_arg("opensora.py") == ("opensora.py", None)
    assert config_lib.split_config_arg("opensora.py", "tiny") == ("opensora.py", "tiny")
    with pytest.raises(config_lib.ConfigError, match="pass one"):
        config_lib.split_config_arg("opensora.py:v1.2", "tiny")
    odd = tmp_path / "a:b.py"
    odd.write_text("")
    assert config_lib.split_config_arg(str(odd)) == (str(odd), None)
