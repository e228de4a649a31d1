"""The T5 encoder against transformers: config, relative position buckets, parity, precision, conversion, tokenizer.

Reference models are tiny random transformers T5 models saved into a temporary folder. Parity
tolerance in float32: every output must satisfy |ours - reference| <= RTOL * |reference| +
RTOL * max|reference|, with RTOL = 1e-5. Padding masks hide keys only, so the rows of padding
queries are well defined in both implementations and are compared too.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file as load_numpy_safetensors
from safetensors.numpy import save_file as save_numpy_safetensors
from transformers.models.t5.modeling_t5 import T5Attention as TorchT5Attention

from conversion.rules import CheckpointMismatchError
from conversion.t5_io import load_t5_encoder, load_t5_tokenizer, save_t5_encoder
from conversion.transformers_io import read_transformers_state_dict, tokenize
from jaxgen.models.t5 import T5Config, T5EncoderModel, relative_position_buckets

RTOL = 1e-5
# Bounds on the bfloat16 error relative to the float32 output: mean |error| / mean |output| and
# max |error| / max |output|. The noisy test weights give large attention logits, which bfloat16
# rounding of q and k shifts. Measured: mean 1.3e-2 and max 7.1e-2 for v1.1 (transformers 5.25
# loaded in bfloat16: 1.9e-2 and 4.4e-2), mean 1.0e-2 and max 1.5e-2 for v1.0. A wrong mask or
# a skipped layer gives errors of order 1.
BF16_MEAN_TOLERANCE = 3e-2
BF16_MAX_TOLERANCE = 0.15
TINY_CONFIG = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
# Bucket settings small enough that LENGTH tokens reach the log-spaced buckets and the last,
# clipped bucket (distances >= max_distance).
VARIANTS = {
    "v1_1-gated-gelu": dict(feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                            relative_attention_max_distance=16),
    "v1_0-relu": dict(feed_forward_proj="relu", relative_attention_num_buckets=8, relative_attention_max_distance=12),
}  # fmt: skip
LENGTH = 20
INPUT_IDS = np.random.default_rng(0).integers(2, TINY_CONFIG["vocab_size"], size=(3, LENGTH)).astype(np.int32)
# Row 0 has no padding, row 1 is right-padded after 13 tokens and row 2 is left-padded by 5 tokens.
ATTENTION_MASK = np.ones((3, LENGTH), dtype=np.int32)
ATTENTION_MASK[1, 13:] = 0
ATTENTION_MASK[2, :5] = 0


def build_reference(variant: str, model_class=transformers.T5EncoderModel):
    """Return a seeded random transformers T5 model in eval mode, with noise on every weight."""
    torch.manual_seed(0)
    config = transformers.T5Config(**TINY_CONFIG, **VARIANTS[variant], dropout_rate=0.0)
    reference = model_class(config).eval()
    # Noise on top of T5's initialisation, so that the layer norm scales are not all 1 and a
    # swapped or untransposed weight shows.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return reference


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved_reference(request, tmp_path_factory):
    """(variant, transformers model, folder it was saved to)."""
    variant = request.param
    folder = tmp_path_factory.mktemp(variant)
    reference = build_reference(variant)
    reference.save_pretrained(folder)
    return variant, reference, folder


def run_reference(reference, input_ids, attention_mask=None):
    mask = None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))
    with torch.no_grad():
        return reference(
            input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)),
            attention_mask=mask,
            output_hidden_states=True,
        )


@functools.partial(nnx.jit, static_argnames="output_hidden_states")
def run_jaxgen(model, input_ids, attention_mask, output_hidden_states=True):
    return model(input_ids, attention_mask, output_hidden_states=output_hidden_states)


def assert_close(actual, expected, name):
    expected = np.asarray(expected)
    np.testing.assert_allclose(
        np.asarray(actual), expected, rtol=RTOL, atol=RTOL * np.abs(expected).max(), err_msg=name
    )


# ----- config ----------------------------------------------------------------------------------


def test_config_reads_saved_config_json(saved_reference):
    variant, _, folder = saved_reference
    config = T5Config.from_transformers(json.loads((folder / "config.json").read_text()))
    assert config == T5Config(**TINY_CONFIG, **VARIANTS[variant], dropout_rate=0.0)


def test_config_round_trip():
    config = T5Config(**TINY_CONFIG, feed_forward_proj="gated-silu", eos_token_id=(1, 5), layer_norm_epsilon=1e-5)
    assert T5Config.from_transformers(config.to_transformers()) == config
    reference = transformers.T5Config(**config.to_transformers())
    assert reference.is_gated_act
    assert reference.dense_act_fn == "silu"


def test_config_reads_full_t5_config():
    # A T5ForConditionalGeneration config with decoder keys and keys of older transformers versions.
    old = dict(TINY_CONFIG, architectures=["T5ForConditionalGeneration"], decoder_start_token_id=0,
               dense_act_fn="gelu_new", dropout_rate=0.1, eos_token_id=1, feed_forward_proj="gated-gelu",
               initializer_factor=1.0, is_encoder_decoder=True, is_gated_act=True, layer_norm_epsilon=1e-6,
               model_type="t5", num_decoder_layers=3, n_positions=512, output_past=True, pad_token_id=0,
               relative_attention_max_distance=128, relative_attention_num_buckets=32, tie_word_embeddings=False,
               torch_dtype="float32", transformers_version="4.21.0.dev0", use_cache=True)  # fmt: skip
    assert T5Config.from_transformers(old) == T5Config(**TINY_CONFIG, feed_forward_proj="gated-gelu")


def test_config_unknown_key_names_nearest():
    with pytest.raises(ValueError, match="'d_modle'.*nearest supported key is 'd_model'"):
        T5Config.from_transformers(dict(TINY_CONFIG, d_modle=32))


def test_config_rejects_inconsistent_activation():
    with pytest.raises(ValueError, match="dense_act_fn='relu'.*implies dense_act_fn='gelu_new'"):
        T5Config.from_transformers(dict(TINY_CONFIG, feed_forward_proj="gated-gelu", dense_act_fn="relu"))


def test_config_rejects_unknown_activation():
    with pytest.raises(ValueError, match="Unsupported feed_forward_proj 'gated-mish'"):
        T5Config(**TINY_CONFIG, feed_forward_proj="gated-mish")


def test_config_rejects_decoder_and_other_models():
    with pytest.raises(ValueError, match="is_decoder=true"):
        T5Config.from_transformers(dict(TINY_CONFIG, is_decoder=True))
    with pytest.raises(ValueError, match="model_type 'mt5'"):
        T5Config.from_transformers(dict(TINY_CONFIG, model_type="mt5"))


def test_config_rejects_bad_buckets():
    with pytest.raises(ValueError, match="relative_attention_max_distance 2 must exceed"):
        T5Config(**TINY_CONFIG, relative_attention_num_buckets=8, relative_attention_max_distance=2)


# ----- relative position buckets ---------------------------------------------------------------


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 12), (32, 16), (64, 256), (6, 7)])
def test_buckets_match_transformers(num_buckets, max_distance):
    # 300 tokens reach every bucket of these settings.
    length = 300
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    expected = TorchT5Attention._relative_position_bucket(
        relative, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance
    ).numpy()
    buckets = relative_position_buckets(length, length, num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(buckets, expected)
    # Every bucket is reached except num_buckets // 2, which would hold keys after the query at
    # distance 0.
    assert sorted(np.unique(buckets)) == [bucket for bucket in range(num_buckets) if bucket != num_buckets // 2]


# ----- parity ----------------------------------------------------------------------------------


def test_parity_with_transformers(saved_reference):
    _, reference, folder = saved_reference
    model = load_t5_encoder(folder)

    for attention_mask in (None, ATTENTION_MASK):
        case = "no mask" if attention_mask is None else "padding mask"
        expected = run_reference(reference, INPUT_IDS, attention_mask)
        output = run_jaxgen(model, INPUT_IDS, attention_mask)
        assert_close(output.last_hidden_state, expected.last_hidden_state, f"{case}: last_hidden_state")
        assert len(output.hidden_states) == TINY_CONFIG["num_layers"] + 1
        assert len(output.hidden_states) == len(expected.hidden_states)
        for index, (ours, theirs) in enumerate(zip(output.hidden_states, expected.hidden_states)):
            assert_close(ours, theirs, f"{case}: hidden_states[{index}]")


def test_padding_mask_changes_real_rows(saved_reference):
    _, _, folder = saved_reference
    model = load_t5_encoder(folder)
    masked = np.asarray(run_jaxgen(model, INPUT_IDS, ATTENTION_MASK).last_hidden_state)
    unmasked = np.asarray(run_jaxgen(model, INPUT_IDS, None).last_hidden_state)
    # The unpadded row does not change; real tokens of padded rows no longer see the padding.
    np.testing.assert_array_equal(masked[0], unmasked[0])
    real = ATTENTION_MASK[1:].astype(bool)
    assert np.abs(masked[1:][real] - unmasked[1:][real]).min(axis=-1).max() > 1e-3


def test_hidden_states_only_when_requested(saved_reference):
    _, _, folder = saved_reference
    model = load_t5_encoder(folder)
    output = run_jaxgen(model, INPUT_IDS, ATTENTION_MASK, output_hidden_states=False)
    assert output.hidden_states is None
    assert output.last_hidden_state.shape == (3, LENGTH, TINY_CONFIG["d_model"])


def test_rejects_mask_of_wrong_shape(saved_reference):
    _, _, folder = saved_reference
    model = load_t5_encoder(folder)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 19\)"):
        model(INPUT_IDS, ATTENTION_MASK[:, :-1])


# ----- precision -------------------------------------------------------------------------------


def test_bfloat16_keeps_feed_forward_float32(saved_reference):
    _, _, folder = saved_reference
    full = load_t5_encoder(folder)
    mixed = load_t5_encoder(folder, dtype=jnp.bfloat16)

    for path, parameter in nnx.to_flat_state(nnx.state(mixed, nnx.Param)):
        assert parameter.get_value().dtype == jnp.float32, path
    x = jnp.ones((1, 4, TINY_CONFIG["d_model"]), dtype=jnp.bfloat16)
    for block in mixed.encoder.block:
        attention, feed_forward = block.layer
        assert attention.SelfAttention.q.dtype == jnp.bfloat16
        assert attention.SelfAttention.o.dtype == jnp.bfloat16
        linears = [layer for name, layer in vars(feed_forward.DenseReluDense).items() if name.startswith("w")]
        assert len(linears) in (2, 3)
        for linear in linears:
            assert linear.dtype == jnp.float32
        # A bfloat16 input comes out as float32, because the feed-forward computes in float32.
        assert feed_forward.DenseReluDense(x).dtype == jnp.float32
        assert attention.SelfAttention.o(x).dtype == jnp.bfloat16

    expected = np.asarray(run_jaxgen(full, INPUT_IDS, ATTENTION_MASK).last_hidden_state)
    output = run_jaxgen(mixed, INPUT_IDS, ATTENTION_MASK).last_hidden_state
    assert output.dtype == jnp.float32
    error = np.abs(np.asarray(output) - expected)
    assert error.mean() / np.abs(expected).mean() < BF16_MEAN_TOLERANCE
    assert error.max() / np.abs(expected).max() < BF16_MAX_TOLERANCE
    assert error.max() / np.abs(expected).max() > 1e-4  # the attention really ran in bfloat16


# ----- conversion ------------------------------------------------------------------------------


def test_round_trip_bit_identical(saved_reference, tmp_path):
    _, reference, folder = saved_reference
    save_t5_encoder(load_t5_encoder(folder), tmp_path)

    written = load_numpy_safetensors(tmp_path / "model.safetensors")
    original = load_numpy_safetensors(folder / "model.safetensors")
    assert "shared.weight" in written
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)

    reloaded, info = transformers.T5EncoderModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert reloaded.config.feed_forward_proj == reference.config.feed_forward_proj
    expected = run_reference(reference, INPUT_IDS, ATTENTION_MASK).last_hidden_state
    again = run_reference(reloaded.eval(), INPUT_IDS, ATTENTION_MASK).last_hidden_state
    np.testing.assert_array_equal(again.numpy(), expected.numpy())


def test_reads_embed_tokens_key(saved_reference, tmp_path):
    # A checkpoint with only encoder.embed_tokens.weight, as written by some converters.
    _, reference, folder = saved_reference
    state_dict = read_transformers_state_dict(folder)
    state_dict["encoder.embed_tokens.weight"] = state_dict.pop("shared.weight")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_numpy_safetensors(state_dict, tmp_path / "model.safetensors", metadata={"format": "pt"})

    output = run_jaxgen(load_t5_encoder(tmp_path), INPUT_IDS, None)
    expected = run_reference(reference, INPUT_IDS)
    assert_close(output.last_hidden_state, expected.last_hidden_state, "from encoder.embed_tokens.weight")


def test_differing_embeddings_follow_transformers(saved_reference, tmp_path, caplog):
    _, _, folder = saved_reference
    state_dict = read_transformers_state_dict(folder)
    noise = np.random.default_rng(2).normal(size=state_dict["shared.weight"].shape).astype(np.float32)
    state_dict["encoder.embed_tokens.weight"] = state_dict["shared.weight"] + noise
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_numpy_safetensors(state_dict, tmp_path / "model.safetensors", metadata={"format": "pt"})

    with caplog.at_level(logging.WARNING, logger="conversion.t5_io"):
        model = load_t5_encoder(tmp_path)
    assert "Using encoder.embed_tokens.weight" in caplog.text
    # transformers 5.25 leaves the two untied and embeds with encoder.embed_tokens.
    reference = transformers.T5EncoderModel.from_pretrained(tmp_path).eval()
    expected = run_reference(reference, INPUT_IDS, ATTENTION_MASK)
    assert_close(run_jaxgen(model, INPUT_IDS, ATTENTION_MASK).last_hidden_state, expected.last_hidden_state,
                 "differing embeddings")  # fmt: skip


def test_loads_encoder_of_full_t5(tmp_path):
    reference = build_reference("v1_1-gated-gelu", transformers.T5ForConditionalGeneration)
    reference.save_pretrained(tmp_path)
    model = load_t5_encoder(tmp_path)
    with torch.no_grad():
        expected = reference.get_encoder()(
            input_ids=torch.from_numpy(INPUT_IDS.astype(np.int64)),
            attention_mask=torch.from_numpy(ATTENTION_MASK.astype(np.int64)),
        )
    assert_close(run_jaxgen(model, INPUT_IDS, ATTENTION_MASK).last_hidden_state, expected.last_hidden_state,
                 "encoder of T5ForConditionalGeneration")  # fmt: skip


def test_mismatched_keys_are_named(saved_reference, tmp_path):
    _, _, folder = saved_reference
    state_dict = read_transformers_state_dict(folder)
    del state_dict["encoder.final_layer_norm.weight"]
    state_dict["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros((8, 4), np.float32)
    state_dict["encoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((32, 31), np.float32)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_numpy_safetensors(state_dict, tmp_path / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(CheckpointMismatchError) as raised:
        load_t5_encoder(tmp_path)
    assert raised.value.missing == ["encoder.final_layer_norm.weight"]
    assert raised.value.unexpected == ["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"]
    assert raised.value.shape_mismatches == [("encoder.block.0.layer.0.SelfAttention.q.weight", (32, 31), (32, 32))]
    assert "missing key: encoder.final_layer_norm.weight" in str(raised.value)


def test_save_rejects_other_models(tmp_path):
    with pytest.raises(TypeError, match="expects a T5EncoderModel, got Linear"):
        save_t5_encoder(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), tmp_path)


def test_random_model_loads_in_transformers(tmp_path):
    # A model that never came from transformers: its saved folder must load without leftovers.
    config = T5Config(**TINY_CONFIG, **VARIANTS["v1_0-relu"])
    model = T5EncoderModel(config, rngs=nnx.Rngs(3))
    save_t5_encoder(model, tmp_path)
    reference, info = transformers.T5EncoderModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    # transformers applies dropout_rate only in training mode; eval mode matches.
    expected = run_reference(reference.eval(), INPUT_IDS, ATTENTION_MASK)
    assert_close(run_jaxgen(model, INPUT_IDS, ATTENTION_MASK).last_hidden_state, expected.last_hidden_state,
                 "saved random model")  # fmt: skip


# ----- tokenizer -------------------------------------------------------------------------------


@pytest.fixture()
def tokenizer(tmp_path):
    """A T5 unigram tokenizer with whole-word pieces for "a", "cat" and "dog", saved as tokenizer.json."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("▁a", -1.0), ("▁cat", -1.5),
              ("▁dog", -1.5)]  # fmt: skip
    transformers.T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(tmp_path)
    return load_t5_tokenizer(tmp_path)


def test_tokenizer_pads_and_appends_eos(tokenizer):
    a, cat, dog = tokenizer.convert_tokens_to_ids(["▁a", "▁cat", "▁dog"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert (eos, pad) == (1, 0)
    batch = tokenize(tokenizer, ["a cat", "dog a cat dog"], max_length=4)
    np.testing.assert_array_equal(batch["input_ids"], [[a, cat, eos, pad], [dog, a, cat, eos]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 0], [1, 1, 1, 1]])


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is not None, reason="sentencepiece is installed")
def test_tokenizer_spiece_without_sentencepiece(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"")
    with pytest.raises(ImportError, match="needs the sentencepiece and protobuf packages"):
        load_t5_tokenizer(tmp_path)


def test_tokenizer_folder_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or spiece.model"):
        load_t5_tokenizer(tmp_path)
