"""CLIP text encoders against transformers: parity, masks, pooling rules, conversion and the tokenizer.

Reference models are tiny random transformers models saved into tmp_path. Parity tolerance in
float32: every output must satisfy |ours - reference| <= RTOL * |reference| + RTOL * max|reference|,
with RTOL = 1e-4. The largest error measured over the parity cases was 5e-7 of max|reference|
(2-core x86 CPU, jax 0.10.2, torch 2.13.0, transformers 5.25.0).
"""

from __future__ import annotations

import json
import logging
import string

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file as load_numpy_safetensors
from safetensors.numpy import save_file as save_numpy_safetensors
from transformers.activations import ACT2FN

from conversion.rules import CheckpointMismatchError
from conversion.transformers_io import (
    load_clip_text,
    load_clip_tokenizer,
    read_transformers_state_dict,
    save_clip_text,
    tokenize,
)
from jaxgen.models.clip_text import (
    ACTIVATIONS,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

RTOL = 1e-4
VOCAB_SIZE = 100
LEGACY_EOS = 2  # pools at argmax(input_ids)
EOS = 50  # pools at the first occurrence of 50
TINY_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=48,
    projection_dim=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=0,
    pad_token_id=1,
)
# Rows chosen so that the two pooling rules pick different positions: argmax(input_ids) is the
# first 99, the first EOS comes earlier in every row.
INPUT_IDS = np.array(
    [
        [0, 70, EOS, 99, 12, EOS, EOS, EOS],
        [0, 12, 33, EOS, 99, 98, 4, EOS],
    ],
    dtype=np.int32,
)
TORCH_CLASSES = {False: transformers.CLIPTextModel, True: transformers.CLIPTextModelWithProjection}


def make_reference(folder, *, with_projection: bool, hidden_act: str = "quick_gelu", eos_token_id: int = EOS):
    """Save a random transformers CLIP text model into folder and return it in eval mode."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**TINY_CONFIG, hidden_act=hidden_act, eos_token_id=eos_token_id)
    reference = TORCH_CLASSES[with_projection](config).eval()
    # Random layer norms as well, so that swapped or unconverted scales and biases show.
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.2)
    reference.save_pretrained(folder)
    return reference


def run_reference(reference, input_ids, attention_mask=None):
    mask = None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))
    with torch.no_grad():
        return reference(
            torch.from_numpy(np.asarray(input_ids, dtype=np.int64)), attention_mask=mask, output_hidden_states=True
        )


@nnx.jit
def run_jaxgen(model, input_ids, attention_mask):
    return model(input_ids, attention_mask)


def assert_close(actual, expected, name):
    expected = np.asarray(expected)
    np.testing.assert_allclose(
        np.asarray(actual), expected, rtol=RTOL, atol=RTOL * np.abs(expected).max(), err_msg=name
    )


# ----- config ----------------------------------------------------------------------------------


def test_config_reads_transformers_dict():
    reference_config = transformers.CLIPTextConfig(**TINY_CONFIG, hidden_act="gelu", eos_token_id=EOS)
    config = CLIPTextConfig.from_transformers(reference_config.to_dict())
    assert config == CLIPTextConfig(**TINY_CONFIG, hidden_act="gelu", eos_token_id=EOS)


def test_config_round_trip():
    config = CLIPTextConfig(**TINY_CONFIG, hidden_act="gelu", eos_token_id=LEGACY_EOS)
    assert CLIPTextConfig.from_transformers(config.to_transformers()) == config


def test_config_accepts_transformers_4_keys():
    # Keys found in configs written by transformers 4.x, such as the old "dropout" field.
    old = dict(TINY_CONFIG, dropout=0.0, attention_dropout=0.0, torch_dtype="float32", _name_or_path="x",
               architectures=["CLIPTextModel"], transformers_version="4.22.0.dev0")  # fmt: skip
    assert CLIPTextConfig.from_transformers(old) == CLIPTextConfig(**TINY_CONFIG)


def test_config_unknown_key_names_nearest():
    with pytest.raises(ValueError, match="'hiden_size'.*nearest supported key is 'hidden_size'"):
        CLIPTextConfig.from_transformers(dict(TINY_CONFIG, hiden_size=32))


def test_config_rejects_dropout():
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        CLIPTextConfig.from_transformers(dict(TINY_CONFIG, attention_dropout=0.1))


def test_config_rejects_full_clip_config():
    with pytest.raises(ValueError, match="model_type 'clip'.*text_config"):
        CLIPTextConfig.from_transformers({"model_type": "clip", "projection_dim": 512})


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="hidden_size 32 is not divisible by num_attention_heads 5"):
        CLIPTextConfig(**dict(TINY_CONFIG, num_attention_heads=5))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_matches_transformers(name):
    x = np.linspace(-6.0, 6.0, 101, dtype=np.float32)
    expected = ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ACTIVATIONS[name](x)), expected, rtol=1e-6, atol=1e-6)


# ----- parity ----------------------------------------------------------------------------------

PARITY_CASES = [
    pytest.param(False, "quick_gelu", LEGACY_EOS, id="text-quick_gelu-legacy_eos"),
    pytest.param(False, "gelu", EOS, id="text-gelu-eos"),
    pytest.param(True, "gelu", LEGACY_EOS, id="projection-gelu-legacy_eos"),
    pytest.param(True, "quick_gelu", EOS, id="projection-quick_gelu-eos"),
]


@pytest.mark.parametrize("with_projection, hidden_act, eos_token_id", PARITY_CASES)
def test_parity_with_transformers(tmp_path, with_projection, hidden_act, eos_token_id):
    reference = make_reference(tmp_path, with_projection=with_projection, hidden_act=hidden_act,
                               eos_token_id=eos_token_id)  # fmt: skip
    model = load_clip_text(tmp_path)
    expected = run_reference(reference, INPUT_IDS)
    output = run_jaxgen(model, INPUT_IDS, None)

    assert isinstance(model, CLIPTextModelWithProjection if with_projection else CLIPTextModel)
    assert_close(output.last_hidden_state, expected.last_hidden_state, "last_hidden_state")
    assert len(output.hidden_states) == TINY_CONFIG["num_hidden_layers"] + 1
    assert len(output.hidden_states) == len(expected.hidden_states)
    for index, (ours, theirs) in enumerate(zip(output.hidden_states, expected.hidden_states)):
        assert_close(ours, theirs, f"hidden_states[{index}]")
    if with_projection:
        # transformers' WithProjection output has no pooler_output, so compare the projection input.
        pooled = reference.text_model(torch.from_numpy(INPUT_IDS.astype(np.int64))).pooler_output
        assert_close(output.pooler_output, pooled.detach().numpy(), "pooler_output")
        assert_close(output.text_embeds, expected.text_embeds, "text_embeds")
    else:
        assert_close(output.pooler_output, expected.pooler_output, "pooler_output")
        assert output.text_embeds is None


@pytest.mark.parametrize("eos_token_id, positions", [(LEGACY_EOS, [3, 4]), (EOS, [2, 3])])
def test_pooler_position_per_eos_rule(tmp_path, eos_token_id, positions):
    make_reference(tmp_path, with_projection=False, eos_token_id=eos_token_id)
    output = run_jaxgen(load_clip_text(tmp_path), INPUT_IDS, None)
    expected = np.asarray(output.last_hidden_state)[np.arange(2), positions]
    np.testing.assert_array_equal(np.asarray(output.pooler_output), expected)


def test_padding_mask_matches_transformers(tmp_path):
    reference = make_reference(tmp_path, with_projection=False, hidden_act="gelu")
    model = load_clip_text(tmp_path)
    right = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]], dtype=np.int32)
    left = right[:, ::-1].copy()

    expected = run_reference(reference, INPUT_IDS, right)
    output = run_jaxgen(model, INPUT_IDS, right)
    unmasked = run_jaxgen(model, INPUT_IDS, None)
    assert_close(output.last_hidden_state, expected.last_hidden_state, "right padding: last_hidden_state")
    assert_close(output.pooler_output, expected.pooler_output, "right padding: pooler_output")
    # Only padding queries see padding keys under the causal mask, so the mask changes their rows.
    assert not np.allclose(output.last_hidden_state[:, -1], unmasked.last_hidden_state[:, -1], rtol=1e-3, atol=1e-3)

    # Left padding: queries of padding tokens see no key at all, and implementations differ
    # there, so compare the rows of real tokens.
    expected = run_reference(reference, INPUT_IDS, left)
    output = run_jaxgen(model, INPUT_IDS, left)
    real = left.astype(bool)
    assert_close(np.asarray(output.last_hidden_state)[real], expected.last_hidden_state.numpy()[real],
                 "left padding: last_hidden_state")  # fmt: skip


def test_rejects_too_many_tokens(tmp_path):
    make_reference(tmp_path, with_projection=False)
    model = load_clip_text(tmp_path)
    with pytest.raises(ValueError, match="17 tokens but max_position_embeddings is 16"):
        model(np.zeros((1, 17), dtype=np.int32))


# ----- conversion ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_projection", [False, True], ids=["text", "projection"])
def test_round_trip_bit_identical(tmp_path, with_projection):
    reference = make_reference(tmp_path / "reference", with_projection=with_projection)
    save_clip_text(load_clip_text(tmp_path / "reference"), tmp_path / "ours")

    written = load_numpy_safetensors(tmp_path / "ours" / "model.safetensors")
    original = {key: value.numpy() for key, value in reference.state_dict().items()}
    if not with_projection:
        original = {f"text_model.{key}": value for key, value in original.items()}
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)

    reloaded, info = TORCH_CLASSES[with_projection].from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    expected = run_reference(reference, INPUT_IDS)
    again = run_reference(reloaded.eval(), INPUT_IDS)
    np.testing.assert_array_equal(again.last_hidden_state.numpy(), expected.last_hidden_state.numpy())


def test_loads_pytorch_bin_with_position_ids(tmp_path):
    reference = make_reference(tmp_path / "reference", with_projection=False)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "reference" / "config.json").read_text())
    # The layout of transformers 4.x checkpoints: prefixed keys plus the position_ids buffer.
    state_dict = {f"text_model.{key}": value for key, value in reference.state_dict().items()}
    state_dict["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    torch.save(state_dict, folder / "pytorch_model.bin")

    model = load_clip_text(folder)
    expected = run_reference(reference, INPUT_IDS)
    assert_close(run_jaxgen(model, INPUT_IDS, None).last_hidden_state, expected.last_hidden_state, "from .bin")


def test_with_projection_needs_architectures(tmp_path):
    make_reference(tmp_path, with_projection=True)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Pass with_projection=True"):
        load_clip_text(tmp_path)
    assert isinstance(load_clip_text(tmp_path, with_projection=True), CLIPTextModelWithProjection)


def test_mismatched_keys_are_named(tmp_path):
    make_reference(tmp_path, with_projection=True)
    path = tmp_path / "model.safetensors"
    state_dict = read_transformers_state_dict(tmp_path)
    del state_dict["text_model.final_layer_norm.bias"]
    state_dict["text_model.extra.weight"] = np.zeros(3, np.float32)
    state_dict["text_projection.weight"] = np.zeros((24, 31), np.float32)
    save_numpy_safetensors(state_dict, path, metadata={"format": "pt"})

    with pytest.raises(CheckpointMismatchError) as raised:
        load_clip_text(tmp_path)
    assert raised.value.missing == ["text_model.final_layer_norm.bias"]
    assert raised.value.unexpected == ["text_model.extra.weight"]
    assert raised.value.shape_mismatches == [("text_projection.weight", (24, 31), (24, 32))]
    assert "missing key: text_model.final_layer_norm.bias" in str(raised.value)


def test_missing_weights_named(tmp_path):
    make_reference(tmp_path, with_projection=False)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_clip_text(tmp_path)


# ----- tokenizer -------------------------------------------------------------------------------


@pytest.fixture()
def tokenizer(tmp_path):
    """A CLIP BPE tokenizer over lowercase letters, with whole-word tokens for "cat" and "dog"."""
    letters = string.ascii_lowercase
    vocab = {letter: index for index, letter in enumerate(letters)}
    vocab.update({f"{letter}</w>": len(letters) + index for index, letter in enumerate(letters)})
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return load_clip_tokenizer(tmp_path)


def test_tokenize_pads_to_max_length(tokenizer, caplog):
    cat, dog = tokenizer.convert_tokens_to_ids(["cat</w>", "dog</w>"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    with caplog.at_level(logging.WARNING, logger="conversion.transformers_io"):
        batch = tokenize(tokenizer, ["cat dog", "dog"], max_length=6)
    np.testing.assert_array_equal(batch["input_ids"], [[bos, cat, dog, eos, eos, eos], [bos, dog, eos, eos, eos, eos]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    assert batch["input_ids"].dtype == np.int32
    assert not caplog.records


def test_tokenize_truncation_warns_with_count(tokenizer, caplog):
    cat, dog = tokenizer.convert_tokens_to_ids(["cat</w>", "dog</w>"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    with caplog.at_level(logging.WARNING, logger="conversion.transformers_io"):
        batch = tokenize(tokenizer, ["dog", "cat dog cat dog cat dog"], max_length=5)
    np.testing.assert_array_equal(batch["input_ids"][1], [bos, cat, dog, cat, eos])
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "Prompt 1" in message
    assert "3 of its tokens were dropped" in message
    assert "'dog cat dog'" in message


def test_tokenizer_folder_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        load_clip_tokenizer(tmp_path)

