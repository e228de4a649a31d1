"""Rectified-flow Euler sampling: torch_npu_backend.rectified_flow against jaxgen.diffusion.rectified_flow.

The main test samples as Open-Sora 1.2's RFLOW does (30 Euler steps, guidance 7, "data_minus_noise", the
resolution shift of the pixel size) with the tiny STDiT3 in both backends. Both start from the same noise and
the same random captions with a padding mask, in float32. Every weight of the model is perturbed, so the
temporal blocks, whose output projections start at zero, change the result. Torch runs on one thread.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_npu_backend.stdit3  # noqa: F401  (registers the STDiT3 twin for torch_twin)
from jaxgen.diffusion import cfg_model_fn, resolution_shift, rf_euler_sample, rf_euler_step, rf_timestep_grid
from jaxgen.models.stdit3 import STDiT3, STDiT3Config
from torch_npu_backend import rectified_flow as torch_rf
from torch_npu_backend.models import torch_twin

TINY = STDiT3Config.from_preset("tiny")
BATCH = 2
# Open-Sora 1.2's VAE maps 17 pixel frames to 5 latent frames and 8 x 8 pixels to one latent pixel.
NUM_FRAMES, HEIGHT, WIDTH = 17, 32, 48
LATENT_SHAPE = (BATCH, 5, HEIGHT // 8, WIDTH // 8, TINY.in_channels)  # [B, T, H, W, C]
FPS = 24.0
GUIDANCE = 7.0
NUM_STEPS = 30
SHIFT = float(resolution_shift(HEIGHT, WIDTH, NUM_FRAMES))  # about 0.171 at this small size
PER_EXAMPLE_SHIFT = np.array([0.5, 3.0], np.float32)

# Largest |jaxgen - torch| over the largest |torch sample| after 30 steps with guidance 7. Measured 4.4e-6 here,
# and 3e-6 to 8e-6 for model seeds 0 to 3, on a 2-core x86 (jax 0.10.2, torch 2.13.0). Guidance 6.99 in place of 7
# moves the sample by 1e-3, and a null half without the text mask or a wrong shift, step count or velocity sign by
# more than 0.1. Larger weight noise makes the model less well conditioned: with noise 0.3 the measured error
# grew to between 1.6e-5 and 1.4e-4.
SAMPLE_TOLERANCE = 3e-5
# Weight noise added to every parameter. With 0.1 the temporal blocks change the 30-step sample by more than 50%.
WEIGHT_NOISE = 0.1
# One float32 rounding or FMA difference in shift * t / (1 + (shift - 1) * t). The grids were bitwise equal here.
GRID_ATOL = 2e-7


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # Two threads on a loaded 2-core machine ran 20 times slower.
    yield
    torch.set_num_threads(previous)


def noisy_jaxgen_model(seed: int = 0, noise: float = WEIGHT_NOISE) -> STDiT3:
    """Build the tiny STDiT3 and add noise to every parameter, so the layers initialised to zero are not zero."""
    model = STDiT3(TINY, rngs=nnx.Rngs(seed))
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    # NumPy draws the noise because 87 eager jax.random calls, one compile per shape, took 15 s (2-core x86).
    rng = np.random.default_rng(seed)
    noisy = [np.asarray(leaf) + noise * rng.standard_normal(leaf.shape).astype(np.float32) for leaf in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, [jnp.asarray(leaf) for leaf in noisy]))
    return model


@pytest.fixture(scope="module")
def twins() -> tuple[STDiT3, torch.nn.Module]:
    model = noisy_jaxgen_model()
    return model, torch_twin(model).eval()


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Return channels-last noise x_T, random captions y [B, 1, L, E] and a text mask [B, L] with padding."""
    rng = np.random.default_rng(seed)
    length = TINY.model_max_length
    mask = np.ones((BATCH, length), np.int64)
    mask[0, 5:] = 0  # sample 0 ends with 3 padded tokens
    mask[1, 2] = 0  # sample 1 has one dropped token in the middle
    mask[1, -1] = 0
    return {
        "x_T": rng.standard_normal(LATENT_SHAPE).astype(np.float32),
        "y": rng.standard_normal((BATCH, 1, length, TINY.caption_channels)).astype(np.float32),
        "mask": mask,
    }


def to_channels_first(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def jaxgen_stdit_velocity_fn(model, y, mask, null_y, guidance_scale, fps, height, width):
    """Build jaxgen's counterpart of torch_rf.stdit_velocity_fn with cfg_model_fn, channels-last.

    cfg_model_fn concatenates the condition (y, mask, fps) with the null condition (null_y, mask, fps), so the
    null half keeps the prompt's text mask, as in Open-Sora 1.2. The velocity is the first in_channels channels.
    """
    channels = model.config.in_channels
    if null_y is None:
        null_y = model.null_caption(y.shape[0])
    fps = jnp.broadcast_to(jnp.asarray(fps, jnp.float32), (y.shape[0],))

    def velocity(x, t, cond):
        captions, text_mask, frame_rate = cond
        return model(x, t, captions, text_mask, fps=frame_rate, height=height, width=width)[..., :channels]

    guided = cfg_model_fn(velocity, guidance_scale, (null_y, mask, fps))

    def bound(x, t, cond):
        del cond  # The captions are bound above, as in the torch helper.
        return guided(x, t, (y, mask, fps))

    return bound


def toy_velocity(x, model_time, cond, xp):
    """A velocity field of x, the model time in [0, 1000] and cond [B], for NumPy-like modules xp (jnp or torch)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    time = (model_time / 1000.0).reshape(shape)
    return -0.4 * x * xp.cos(time) + 0.3 * xp.sin(3.0 * time) + cond.reshape(shape)


# ----- grid and Euler step -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 7, NUM_STEPS])
@pytest.mark.parametrize("shift", [1.0, SHIFT, 3.0, "per_example"])
def test_grid_matches_jaxgen(num_steps, shift):
    if shift == "per_example":
        shift = PER_EXAMPLE_SHIFT
    expected = np.asarray(rf_timestep_grid(num_steps, shift))
    actual = torch_rf.rf_timestep_grid(num_steps, torch.as_tensor(shift)).numpy()

    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=GRID_ATOL)
    # shift / (1 + (shift - 1)) rounds to 1 - 6e-8 for some shifts in float32, in both backends.
    np.testing.assert_allclose(actual[0], 1.0, rtol=0, atol=1e-7)
    assert np.all(actual[-1] == 0.0)
    assert np.all(np.diff(actual, axis=0) < 0)


def test_grid_shift_moves_towards_noise():
    plain = torch_rf.rf_timestep_grid(10).numpy()
    shifted = torch_rf.rf_timestep_grid(10, 3.0).numpy()

    np.testing.assert_allclose(plain, np.linspace(1.0, 0.0, 11), rtol=0, atol=1e-7)
    assert np.all(shifted[1:-1] > plain[1:-1])


@pytest.mark.parametrize("convention", ["noise_minus_data", "data_minus_noise"])
def test_euler_step_matches_jaxgen(convention):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
    velocity = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
    t, t_next = np.array([1.0, 0.6], np.float32), np.array([0.9, 0.25], np.float32)

    expected = np.asarray(rf_euler_step(velocity, x, t, t_next, velocity_convention=convention))
    actual = torch_rf.rf_euler_step(
        torch.from_numpy(velocity), torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(t_next),
        velocity_convention=convention,
    ).numpy()
    sign = 1.0 if convention == "noise_minus_data" else -1.0
    by_formula = x + sign * (t_next - t)[:, None, None, None, None] * velocity

    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(actual, by_formula, rtol=0, atol=1e-6)


@pytest.mark.parametrize("convention", ["noise_minus_data", "data_minus_noise"])
@pytest.mark.parametrize("start_step", [0, 4])
def test_toy_sample_matches_jaxgen(convention, start_step):
    rng = np.random.default_rng(2)
    x_T = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
    cond = np.array([0.3, -0.2], np.float32)
    options = dict(num_steps=10, shift=PER_EXAMPLE_SHIFT, velocity_convention=convention, start_step=start_step)

    expected = rf_euler_sample(
        lambda x, t, c: toy_velocity(x, t, c, jnp), jnp.asarray(x_T), None, jnp.asarray(cond), **options
    )
    actual = torch_rf.rf_euler_sample(
        lambda x, t, c: toy_velocity(x, t, c, torch), torch.from_numpy(x_T), torch.from_numpy(cond), **options
    )

    np.testing.assert_allclose(actual.numpy(), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert np.abs(actual.numpy() - x_T).max() > 0.1


def test_sample_model_times_and_dtype():
    seen = []

    def record_times(x, model_time, cond):
        seen.append(model_time.clone())
        return torch.zeros_like(x)

    x_T = torch.ones(BATCH, 3, dtype=torch.bfloat16)
    result = torch_rf.rf_euler_sample(record_times, x_T, None, num_steps=4, shift=2.0)
    grid = torch_rf.rf_timestep_grid(4, 2.0)

    assert result.dtype == torch.bfloat16
    assert len(seen) == 4
    for step, model_time in enumerate(seen):
        assert model_time.dtype == torch.float32
        assert model_time.shape == (BATCH,)
        torch.testing.assert_close(model_time, (grid[step] * 1000.0).expand(BATCH), rtol=0, atol=0)


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(num_steps=0), ValueError, "num_steps must be at least 1"),
        (dict(num_steps=2.0), TypeError, "num_steps must be a Python int"),
        (dict(num_steps=3, start_step=3), ValueError, "start_step must be at least 0 and below 3"),
        (dict(num_steps=3, shift=0.0), ValueError, "shift must be positive"),
        (dict(num_steps=3, shift=torch.tensor([1.0, -2.0])), ValueError, "shift must be positive"),
        (dict(num_steps=3, shift=torch.ones(3)), ValueError, r"shift has shape \(3,\)"),
        (dict(num_steps=3, timestep_scale=float("nan")), ValueError, "timestep_scale must be positive"),
        (dict(num_steps=3, velocity_convention="eps"), ValueError, "Unknown velocity_convention 'eps'"),
    ],
)
def test_sample_rejects_invalid_options(options, error, match):
    with pytest.raises(error, match=match):
        torch_rf.rf_euler_sample(lambda x, t, c: x, torch.zeros(BATCH, 3), None, **options)


# ----- guided STDiT3 velocity ----------------------------------------------------------------------------


def test_stdit_velocity_is_guided_first_half(twins):
    _, model = twins
    inputs = make_inputs(seed=3)
    x = to_channels_first(inputs["x_T"])
    t = torch.tensor([950.0, 420.0])
    y, mask = torch.from_numpy(inputs["y"]), torch.from_numpy(inputs["mask"])
    sizes = dict(fps=torch.full((BATCH,), FPS), height=torch.full((BATCH,), float(HEIGHT)),
                 width=torch.full((BATCH,), float(WIDTH)))

    with torch.inference_mode():
        guided = torch_rf.stdit_velocity_fn(model, y, mask, None, GUIDANCE, FPS, HEIGHT, WIDTH)(x, t, None)
        unguided = torch_rf.stdit_velocity_fn(model, y, mask, None, 1.0, FPS, HEIGHT, WIDTH)(x, t, None)
        v_cond = model(x, t, y, mask, **sizes)[:, : TINY.in_channels]
        v_uncond = model(x, t, model.null_caption(BATCH), mask, **sizes)[:, : TINY.in_channels]

    assert guided.shape == x.shape
    torch.testing.assert_close(guided, v_uncond + GUIDANCE * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unguided, v_cond, rtol=1e-5, atol=1e-5)
    assert (guided - unguided).abs().max() > 1e-2


def test_stdit_velocity_invalid_inputs(twins):
    _, model = twins
    inputs = make_inputs(seed=4)
    y, mask = torch.from_numpy(inputs["y"]), torch.from_numpy(inputs["mask"])
    velocity = torch_rf.stdit_velocity_fn(model, y, mask, None, GUIDANCE, FPS, HEIGHT, WIDTH)
    x = to_channels_first(inputs["x_T"])

    with pytest.raises(ValueError, match="takes no condition"):
        velocity(x, torch.ones(BATCH), y)
    with pytest.raises(ValueError, match="x has batch size 1 but the captions have 2"):
        velocity(x[:1], torch.ones(1), None)
    with pytest.raises(ValueError, match="does not broadcast to y's shape"):
        torch_rf.stdit_velocity_fn(model, y, mask, y[:, :, :3], GUIDANCE, FPS, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match=r"fps has shape \(3,\)"):
        torch_rf.stdit_velocity_fn(model, y, mask, None, GUIDANCE, torch.ones(3), HEIGHT, WIDTH)
    with pytest.raises(ValueError, match=r"y has shape \(2, 8, 16\)"):
        torch_rf.stdit_velocity_fn(model, y[:, 0], mask, None, GUIDANCE, FPS, HEIGHT, WIDTH)


# ----- Euler-30 sampling parity --------------------------------------------------------------------------


def test_euler30_guided_stdit3_parity(twins):
    jaxgen_model, torch_model = twins
    inputs = make_inputs()
    options = dict(num_steps=NUM_STEPS, shift=SHIFT, velocity_convention="data_minus_noise")
    temporal_proj = jaxgen_model.temporal_blocks[0].attn.proj.kernel[...]
    assert float(jnp.abs(temporal_proj).max()) > 0.1

    graphdef, state = nnx.split(jaxgen_model)

    @jax.jit
    def jaxgen_sample(state, x_T, y, mask):
        model = nnx.merge(graphdef, state)
        velocity = jaxgen_stdit_velocity_fn(model, y, mask, None, GUIDANCE, FPS, HEIGHT, WIDTH)
        return rf_euler_sample(velocity, x_T, None, **options)

    expected = np.asarray(jaxgen_sample(state, inputs["x_T"], inputs["y"], inputs["mask"]))

    y, mask = torch.from_numpy(inputs["y"]), torch.from_numpy(inputs["mask"])
    with torch.inference_mode():
        velocity = torch_rf.stdit_velocity_fn(torch_model, y, mask, None, GUIDANCE, FPS, HEIGHT, WIDTH)
        actual = torch_rf.rf_euler_sample(velocity, to_channels_first(inputs["x_T"]), None, **options)
    actual = actual.numpy().transpose(0, 2, 3, 4, 1)

    max_abs_error = float(np.abs(actual - expected).max())
    error = relative_error(actual, expected)
    print(f"Euler-{NUM_STEPS} STDiT3 parity: max abs error {max_abs_error:.2e}, relative error {error:.2e}")
    assert actual.shape == LATENT_SHAPE
    assert np.all(np.isfinite(expected))
    assert error < SAMPLE_TOLERANCE
    # The sampler must have moved far from the noise, or the comparison would prove little.
    assert np.abs(expected - inputs["x_T"]).max() > 1.0
