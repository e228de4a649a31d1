"""Open-Sora 1.2 video VAE: jaxgen model against its torch twin, weight conversion, frame counts and sizes.

Key names, the v1.2 structure and the latent-size rule were read from hpcaitech/Open-Sora tag v1.2.0
(opensora/models/vae/vae.py and vae_temporal.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_npu_backend.video_vae as torch_video_vae
from conversion.diffusers_io import _write_safetensors, abstract_model
from conversion.opensora_io import load_video_vae, read_state_dict, save_video_vae
from conversion.rules import CheckpointMismatchError, torch_shapes
from jaxgen.models.video_vae import TemporalVAEConfig, VideoAutoencoder, VideoVAEConfig, parameter_count
from torch_npu_backend.models import find_twin, jaxgen_model_from_state_dict, jaxgen_twin, torch_state_dict, torch_twin

# fp32 parity: largest |jaxgen - torch| over the largest |torch output|. Measured 2e-6 to 6e-6 on the tiny
# model below (2-core x86, jax 0.10.2, torch 2.13.0).
PARITY_TOLERANCE = 2e-5
# Two compiled programs of the same maths (whole batch against micro-batches) differ by float rounding only.
SAME_MATHS_TOLERANCE = 1e-6

TINY = VideoVAEConfig.from_preset("tiny")
# Micro-batching that splits the tiny clips: frames in spatial batches of 3, and 16 frames into the temporal
# chunks 6, 6 and 4.
TINY_MICRO = dataclasses.replace(TINY, micro_batch_size=3, micro_frame_size=6)

# Keys of Open-Sora's VideoAutoencoderPipeline state_dict (v1.2), from its module structure.
OPENSORA_KEYS = (
    "spatial_vae.module.encoder.conv_in.weight",
    "spatial_vae.module.encoder.down_blocks.0.resnets.0.norm1.weight",
    "spatial_vae.module.quant_conv.weight",
    "spatial_vae.module.decoder.conv_out.bias",
    "temporal_vae.encoder.conv_in.conv.weight",
    "temporal_vae.encoder.block_res_blocks.0.0.norm1.weight",
    "temporal_vae.encoder.block_res_blocks.1.0.conv3.conv.weight",
    "temporal_vae.encoder.conv_blocks.1.conv.weight",
    "temporal_vae.encoder.conv_blocks.1.conv.bias",
    "temporal_vae.encoder.res_blocks.0.conv2.conv.weight",
    "temporal_vae.encoder.norm1.bias",
    "temporal_vae.encoder.conv2.conv.weight",
    "temporal_vae.quant_conv.conv.weight",
    "temporal_vae.post_quant_conv.conv.bias",
    "temporal_vae.decoder.conv1.conv.weight",
    "temporal_vae.decoder.res_blocks.3.norm2.weight",
    "temporal_vae.decoder.block_res_blocks.2.0.conv3.conv.weight",
    "temporal_vae.decoder.conv_blocks.2.conv.weight",
    "temporal_vae.decoder.norm1.weight",
    "temporal_vae.decoder.conv_out.conv.bias",
)
# SDXL's AutoencoderKL, as diffusers builds it from the PixArt-Sigma vae/config.json.
SDXL_VAE_PARAMETERS = 83_653_863


def noisy_torch_model(config: VideoVAEConfig, seed: int = 0, noise: float = 0.05) -> torch_video_vae.VideoAutoencoder:
    """Build the twin and add noise to every weight, so norm scales and biases are not 1 and 0."""
    torch.manual_seed(seed)
    model = torch_video_vae.VideoAutoencoder(config).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(noise * torch.randn_like(tensor))
    return model


def make_video(seed: int = 0, shape: tuple[int, ...] = (2, 16, 32, 32, 3)) -> np.ndarray:
    """Return a channels-last video [B, T, H, W, C] in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def to_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 4, 1, 2, 3)))


def from_torch(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(0, 2, 3, 4, 1).numpy()


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@nnx.jit
def jaxgen_encode(model, x, key):
    return model.encode(x, key)


@nnx.jit(static_argnums=2)
def jaxgen_decode(model, z, num_frames):
    return model.decode(z, num_frames)


def encode_shape(model: VideoAutoencoder, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return the shape `model.encode` gives a video of this shape, by tracing only."""
    graphdef, state = nnx.split(model)
    video = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state, video).shape


def decode_shape(model: VideoAutoencoder, shape: tuple[int, ...], num_frames: int) -> tuple[int, ...]:
    graphdef, state = nnx.split(model)
    latent = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z, num_frames), state, latent).shape


@pytest.fixture(scope="module")
def twins():
    torch_model = noisy_torch_model(TINY)
    return torch_model, jaxgen_twin(torch_model)


# ----- names, registration and conversion ----------------------------------------------------------------


def test_keys_match_twin_and_opensora():
    v12 = VideoVAEConfig.from_preset("v1.2")
    jaxgen_keys = set(torch_shapes(nnx.state(abstract_model(lambda rngs: VideoAutoencoder(v12, rngs=rngs)))))
    with torch.device("meta"):
        torch_keys = set(torch_video_vae.VideoAutoencoder(v12).state_dict())

    assert jaxgen_keys == torch_keys
    assert set(OPENSORA_KEYS) <= jaxgen_keys
    # temporal_downsample[0] is False, so conv_blocks.0 is Open-Sora's nn.Identity, without weights.
    assert not any(".conv_blocks.0." in key for key in jaxgen_keys)
    # ResBlock convolutions have no bias.
    assert "temporal_vae.encoder.res_blocks.0.conv1.conv.bias" not in jaxgen_keys


def test_twin_is_registered(twins):
    _, jaxgen_model = twins

    assert find_twin(jaxgen_model).torch_class is torch_video_vae.VideoAutoencoder
    assert isinstance(torch_twin(jaxgen_model), torch_video_vae.VideoAutoencoder)


def test_conversion_torch_to_jaxgen_to_torch_exact(twins):
    torch_model, jaxgen_model = twins
    expected = torch_model.state_dict()
    round_trip = torch_state_dict(jaxgen_model)

    assert set(round_trip) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(round_trip[key], tensor), key


def test_conversion_jaxgen_to_torch_to_jaxgen_exact(twins):
    _, model = twins
    round_trip = jaxgen_model_from_state_dict(VideoAutoencoder, TINY, torch_twin(model).state_dict())

    expected = dict(nnx.to_flat_state(nnx.state(model)))
    actual = dict(nnx.to_flat_state(nnx.state(round_trip)))
    assert set(actual) == set(expected)
    for path, variable in expected.items():
        assert type(actual[path]) is type(variable), path
        np.testing.assert_array_equal(np.asarray(actual[path].get_value()), np.asarray(variable.get_value()))


def test_safetensors_round_trip(twins, tmp_path):
    _, model = twins
    config = dataclasses.replace(TINY, shift=(0.1, -0.2, 0.3, 0.0), scale=(2.0, 1.5, 1.0, 3.0))
    model = jaxgen_model_from_state_dict(VideoAutoencoder, config, torch_state_dict(model))
    path = tmp_path / "model.safetensors"
    save_video_vae(model, path)
    state_dict = read_state_dict(path)

    loaded = load_video_vae(path, config)

    assert state_dict["scale"].shape == (1, 4, 1, 1, 1)
    np.testing.assert_array_equal(state_dict["shift"].reshape(-1), np.float32([0.1, -0.2, 0.3, 0.0]))
    for (path_a, a), (path_b, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))):
        assert path_a == path_b
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    with pytest.raises(ValueError, match=r"checkpoint's shift buffer is \(0.1, -0.2, 0.3, 0.0\), but config.shift"):
        load_video_vae(path, TINY)
    with pytest.raises(ValueError, match=r"replace\(config, scale=\(2.0, 1.5, 1.0, 3.0\)\)"):
        load_video_vae(path, dataclasses.replace(config, scale=2.0))
    with pytest.raises(FileNotFoundError, match="It contains model.safetensors; pass that file"):
        load_video_vae(tmp_path, config)


def test_load_rejects_missing_and_unexpected_keys(twins, tmp_path):
    _, model = twins
    path = tmp_path / "vae.safetensors"
    save_video_vae(model, path)
    state_dict = read_state_dict(path)
    # The tiny encoder has two conv_blocks, so index 2 names no layer.
    state_dict["temporal_vae.encoder.conv_blocks.2.conv.weight"] = state_dict.pop(
        "temporal_vae.encoder.conv_blocks.1.conv.weight"
    )
    _write_safetensors(state_dict, path)

    with pytest.raises(CheckpointMismatchError) as error:
        load_video_vae(path, TINY)
    assert error.value.missing == ["temporal_vae.encoder.conv_blocks.1.conv.weight"]
    assert error.value.unexpected == ["temporal_vae.encoder.conv_blocks.2.conv.weight"]


# ----- forward parity ------------------------------------------------------------------------------------


def test_parity_fp32(twins):
    torch_model, jaxgen_model = twins
    video = make_video()

    z = np.asarray(jaxgen_encode(jaxgen_model, jnp.asarray(video), None))
    with torch.no_grad():
        expected_z = from_torch(torch_model.encode(to_torch(video)))
        expected_x = from_torch(torch_model.decode(to_torch(expected_z), 16))
    x = np.asarray(jaxgen_decode(jaxgen_model, jnp.asarray(expected_z), 16))

    assert z.shape == (2, 4, 8, 8, 4)
    assert x.shape == video.shape
    assert relative_error(z, expected_z) < PARITY_TOLERANCE
    assert relative_error(x, expected_x) < PARITY_TOLERANCE


def test_parity_fp32_micro_batches(twins):
    torch_model = torch_video_vae.VideoAutoencoder(TINY_MICRO).eval()
    torch_model.load_state_dict(twins[0].state_dict())
    jaxgen_model = jaxgen_twin(torch_model)
    video = make_video(seed=1, shape=(2, 17, 32, 32, 3))

    z = np.asarray(jaxgen_encode(jaxgen_model, jnp.asarray(video), None))
    with torch.no_grad():
        expected_z = from_torch(torch_model.encode(to_torch(video)))
        expected_x = from_torch(torch_model.decode(to_torch(expected_z), 17))
    x = np.asarray(jaxgen_decode(jaxgen_model, jnp.asarray(expected_z), 17))

    # Chunks of 6, 6 and 5 frames, 2 latent frames each; the last decodes to 5 frames.
    assert z.shape == (2, 6, 8, 8, 4)
    assert x.shape == video.shape
    assert relative_error(z, expected_z) < PARITY_TOLERANCE
    assert relative_error(x, expected_x) < PARITY_TOLERANCE


# ----- micro-batching --------------------------------------------------------------------------------------


def test_spatial_micro_batches_equal_one_batch(twins):
    _, model = twins
    micro = jaxgen_model_from_state_dict(
        VideoAutoencoder, dataclasses.replace(TINY, micro_batch_size=5), torch_state_dict(model)
    )
    video = jnp.asarray(make_video(seed=2))

    whole = np.asarray(jaxgen_encode(model, video, None))
    in_micro_batches = np.asarray(jaxgen_encode(micro, video, None))

    assert relative_error(in_micro_batches, whole) < SAME_MATHS_TOLERANCE


def test_temporal_chunks_equal_separate_calls(twins):
    _, model = twins
    micro = jaxgen_model_from_state_dict(VideoAutoencoder, TINY_MICRO, torch_state_dict(model))
    x_z = jnp.asarray(make_video(seed=3, shape=(1, 16, 8, 8, 4)))

    @nnx.jit
    def chunked_and_separate(micro, x_z):
        chunked = micro.temporal_posterior(x_z).mean  # two chunks through jax.lax.map, then the rest
        separate = jnp.concatenate(
            [micro.temporal_vae.encode(x_z[:, start : start + 6]).mean for start in (0, 6, 12)], axis=1
        )
        decoded = micro.temporal_decode(separate, 16)
        decoded_separately = jnp.concatenate(
            [micro.temporal_vae.decode(separate[:, 0:2], 6), micro.temporal_vae.decode(separate[:, 2:4], 6),
             micro.temporal_vae.decode(separate[:, 4:5], 4)], axis=1
        )  # fmt: skip
        return chunked, separate, decoded, decoded_separately

    chunked, separate, decoded, decoded_separately = map(np.asarray, chunked_and_separate(micro, x_z))

    assert chunked.shape == (1, 5, 8, 8, 4)
    assert decoded.shape == (1, 16, 8, 8, 4)
    assert relative_error(chunked, separate) < SAME_MATHS_TOLERANCE
    assert relative_error(decoded, decoded_separately) < SAME_MATHS_TOLERANCE


def test_one_chunk_clip_ignores_micro_frame_size(twins):
    _, model = twins
    config = dataclasses.replace(TINY, micro_frame_size=17)
    micro = jaxgen_model_from_state_dict(VideoAutoencoder, config, torch_state_dict(model))
    video = jnp.asarray(make_video(seed=4))

    assert relative_error(np.asarray(jaxgen_encode(micro, video, None)),
                          np.asarray(jaxgen_encode(model, video, None))) < SAME_MATHS_TOLERANCE  # fmt: skip


# ----- sampling and training interface ---------------------------------------------------------------------


def test_encode_with_key_samples(twins):
    _, model = twins
    video = jnp.asarray(make_video(seed=5))  # the shape of test_parity_fp32, so the means reuse its compile
    key = jax.random.key(0)

    mean = np.asarray(jaxgen_encode(model, video, None))
    first = np.asarray(jaxgen_encode(model, video, key))
    again = np.asarray(jaxgen_encode(model, video, key))
    other = np.asarray(jaxgen_encode(model, video, jax.random.key(1)))

    np.testing.assert_array_equal(first, again)
    assert np.abs(first - mean).max() > 1e-3
    assert np.abs(first - other).max() > 1e-3


def test_training_interface_matches_encode_and_decode(twins):
    _, model = twins
    video = jnp.asarray(make_video(seed=6, shape=(1, 5, 32, 32, 3)))

    @nnx.jit
    def run(model, video):
        temporal, spatial, x_z = model.encode_for_training(video, None)
        _, spatial_trained, _ = model.encode_for_training(video, None, train_spatial=True)
        x_rec, x_z_rec = model.decode_for_training(temporal.mode(), 5)
        reference = model.decode(model.normalize(temporal.mode()), 5)
        return temporal, spatial, spatial_trained, x_z, x_rec, x_z_rec, reference, model.encode(video)

    temporal, spatial, spatial_trained, x_z, x_rec, x_z_rec, reference, z = run(model, video)

    assert spatial is None
    assert spatial_trained.mean.shape == (1, 5, 8, 8, 4)
    assert x_z.shape == x_z_rec.shape == (1, 5, 8, 8, 4)
    assert temporal.mean.shape == (1, 2, 8, 8, 4)  # 5 frames: 3 zero frames padded, 2 latent frames
    assert temporal.kl().shape == (1,)
    np.testing.assert_allclose(np.asarray(model.normalize(temporal.mode())), np.asarray(z), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(x_rec), np.asarray(reference), rtol=0, atol=1e-6)


def test_frozen_spatial_vae_gets_no_gradient(twins):
    _, model = twins
    video = jnp.asarray(make_video(seed=7, shape=(1, 1, 32, 32, 3)))

    def latent_sum(video, train_spatial):
        _, _, x_z = model.encode_for_training(video, None, train_spatial=train_spatial)
        return x_z.sum()

    gradient = jax.jit(jax.grad(latent_sum), static_argnums=1)
    frozen = gradient(video, False)
    trained = gradient(video, True)

    assert np.abs(np.asarray(frozen)).max() == 0.0
    assert np.abs(np.asarray(trained)).max() > 0.0


# ----- frame counts and sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, num_frames, latent_frames",
    [
        (TINY, 1, 1), (TINY, 4, 1), (TINY, 5, 2), (TINY, 16, 4), (TINY, 17, 5),
        (TINY_MICRO, 1, 1), (TINY_MICRO, 6, 2), (TINY_MICRO, 7, 3), (TINY_MICRO, 16, 5), (TINY_MICRO, 17, 6),
    ],
)  # fmt: skip
def test_latent_size_matches_shapes(config, num_frames, latent_frames):
    model = abstract_model(lambda rngs: VideoAutoencoder(config, rngs=rngs))

    latent = model.latent_size(num_frames, 32, 16)
    z_shape = encode_shape(model, (2, num_frames, 32, 16, 3))

    assert latent == (latent_frames, 8, 4)
    assert z_shape == (2, *latent, 4)
    assert decode_shape(model, z_shape, num_frames) == (2, num_frames, 32, 16, 3)


def test_v12_latent_frames_follow_opensora():
    config = VideoVAEConfig.from_preset("v1.2")

    def opensora_latent_frames(frames: int) -> int:
        # VideoAutoencoderPipeline.get_latent_size with micro_frame_size 17 and a time factor of 4.
        whole, rest = divmod(frames, 17)
        return whole * ((17 + 3) // 4) + (rest + (-rest % 4)) // 4

    for frames in (1, 2, 4, 5, 16, 17, 18, 34, 51, 68, 102, 204):
        assert config.latent_frames(frames) == opensora_latent_frames(frames), frames
    assert config.latent_size(51, 256, 512) == (15, 32, 64)
    assert config.frames_for_latent_frames(4) == range(13, 17)
    assert config.frames_for_latent_frames(5) == range(17, 18)  # 18 frames are a chunk of 17 plus one
    assert config.frames_for_latent_frames(6) == range(18, 22)


# ----- parameter counts --------------------------------------------------------------------------------------


def opensora_temporal_parameters(config: TemporalVAEConfig) -> int:
    """Count VAE_Temporal's parameters from the layer shapes that Open-Sora's constructors build."""

    def conv(c_in: int, c_out: int, kernel: int, bias: bool = True) -> int:
        return c_in * c_out * kernel**3 + (c_out if bias else 0)

    def res_block(c_in: int, c_out: int) -> int:
        shortcut = conv(c_in, c_out, 1, bias=False) if c_in != c_out else 0
        return 2 * c_in + conv(c_in, c_out, 3, False) + 2 * c_out + conv(c_out, c_out, 3, False) + shortcut

    def stack(c_in: int, c_out: int) -> int:
        return res_block(c_in, c_out) + (config.num_res_blocks - 1) * res_block(c_out, c_out)

    widths = [config.filters * multiplier for multiplier in config.channel_multipliers]
    encoder = conv(config.in_out_channels, config.filters, 3, bias=False)
    previous = config.filters
    for level, width in enumerate(widths):
        encoder += stack(previous, width)
        previous = width
        if level < len(widths) - 1 and config.temporal_downsample[level]:
            encoder += conv(width, width, 3)
    encoder += stack(previous, previous) + 2 * previous + conv(previous, 2 * config.latent_embed_dim, 1)

    decoder = conv(config.latent_embed_dim, widths[-1], 3) + stack(widths[-1], widths[-1])
    previous = widths[-1]
    for level in reversed(range(len(widths))):
        decoder += stack(previous, widths[level])
        previous = widths[level]
        if level > 0 and config.temporal_downsample[level - 1]:
            decoder += conv(previous, 2 * previous, 3)
    decoder += 2 * previous + conv(previous, config.in_out_channels, 3)

    quant_convs = conv(2 * config.latent_embed_dim, 2 * config.embed_dim, 1) + conv(config.embed_dim,
                                                                                     config.latent_embed_dim, 1)
    return encoder + decoder + quant_convs


def test_v12_parameter_count():
    config = VideoVAEConfig.from_preset("v1.2")

    counts = parameter_count(config)
    with torch.device("meta"):
        torch_model = torch_video_vae.VideoAutoencoder(config)
    torch_count = sum(parameter.numel() for parameter in torch_model.parameters())

    assert counts["spatial"] == SDXL_VAE_PARAMETERS
    assert counts["temporal"] == opensora_temporal_parameters(config.temporal)
    assert counts["temporal"] == 309_687_144
    assert counts["total"] == SDXL_VAE_PARAMETERS + counts["temporal"]
    assert torch_count == counts["total"]


# ----- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 32, 32, 3), r"x must be a channels-last video \[B, T, H, W, C\], got shape \(2, 32, 32, 3\)"),
        ((1, 3, 4, 32, 32), "x has 32 channels on its last axis, but the VAE expects 3 .* looks channels-first"),
        ((1, 4, 30, 32, 3), "height=30 is not a positive multiple of 4"),
        ((1, 4, 32, 18, 3), "width=18 is not a positive multiple of 4"),
        ((1, 0, 32, 32, 3), "num_frames must be an int >= 1, got 0"),
    ],
)
def test_encode_rejects_bad_video(twins, shape, message):
    _, model = twins

    with pytest.raises(ValueError, match=message):
        model.encode(jnp.zeros(shape))


def test_decode_rejects_wrong_latent_frames(twins):
    _, model = twins
    micro = abstract_model(lambda rngs: VideoAutoencoder(TINY_MICRO, rngs=rngs))

    with pytest.raises(ValueError, match=r"z has 3 latent frames, but num_frames=16 encodes to 4 .*clips of 9 to 12"):
        model.decode(jnp.zeros((1, 3, 8, 8, 4)), 16)
    with pytest.raises(ValueError, match="z has 4 latent frames, but num_frames=16 encodes to 5 .*clips of 11 to 12"):
        micro.decode(jnp.zeros((1, 4, 8, 8, 4)), 16)
    with pytest.raises(ValueError, match="num_frames must be an int >= 1, got 0"):
        model.decode(jnp.zeros((1, 1, 8, 8, 4)), 0)
    with pytest.raises(ValueError, match="z has 8 channels on its last axis, but the VAE expects embed_dim=4"):
        model.decode(jnp.zeros((1, 4, 8, 8, 8)), 16)
    with pytest.raises(ValueError, match="z must be a channels-last latent"):
        model.decode(jnp.zeros((4, 8, 8, 4)), 16)


def test_torch_twin_rejects_wrong_shapes(twins):
    torch_model, _ = twins

    with pytest.raises(ValueError, match="permute a channels-last video"):
        torch_model.encode(torch.zeros(1, 4, 32, 32, 3))
    with pytest.raises(ValueError, match=r"z must be \[B, 4, 4, h, w\] for num_frames=16"):
        torch_model.decode(torch.zeros(1, 4, 3, 8, 8), 16)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="temporal_downsample has 3 entries, but 3 channel_multipliers need 2"):
        TemporalVAEConfig(channel_multipliers=(1, 2, 2), temporal_downsample=(True, True, True))
    with pytest.raises(ValueError, match="level width 24 .* not divisible by num_groups 16"):
        TemporalVAEConfig(filters=24, num_groups=16)
    with pytest.raises(ValueError, match="shift has 3 entries, but the latent has embed_dim=4 channels"):
        dataclasses.replace(TINY, shift=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="scale must be finite and non-zero"):
        dataclasses.replace(TINY, scale=(1.0, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="micro_frame_size must be a positive int or None, got 0"):
        dataclasses.replace(TINY, micro_frame_size=0)
    with pytest.raises(ValueError, match="temporal.in_out_channels=8 must equal spatial.latent_channels=4"):
        dataclasses.replace(TINY, temporal=dataclasses.replace(TINY.temporal, in_out_channels=8))
    with pytest.raises(ValueError, match="Unknown video VAE preset 'v1.3'"):
        VideoVAEConfig.from_preset("v1.3")
