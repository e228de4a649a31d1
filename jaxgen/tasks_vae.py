"""Training a KL autoencoder (Stable Diffusion's VAE architecture) on the digits (task `vae`).

The loss is `jaxgen.vae_loss.vae_losses`: reconstruction + KL, optionally LPIPS and a hinge-loss PatchGAN
that switches on after `model.loss.disc_start` updates. The trained model contains the VAE as `vae` and, when
loss.disc_weight > 0, the discriminator as `discriminator`. A frozen LPIPS network, loaded from local
files when loss.perceptual_weight > 0, sits beside them as `lpips` and is left out of the trainable
variables, so it is neither optimised nor checkpointed.

Data: the digits at data.image_size (16 or 32) in [-1, 1], one channel. An RGB VAE (vae.in_channels=3)
receives each digit tinted with a foreground and a background colour drawn uniformly from [-1, 1]^3 per
example and step, so every channel carries information and the colours vary. The held-out images get
colours from a fixed key, so their reconstruction error is comparable between evaluations. The digits are
used rather than the image-caption folder because they arrive as one array of equal-sized images, which
the trainer's array-based batch loader takes as it is.

During training the task evaluates the held-out reconstruction error of the EMA weights, writes grids of
held-out inputs (top row) over their reconstructions (bottom row), and after each checkpoint exports the
EMA VAE as a diffusers model folder, `vae/` in the run folder, that `diffusers.AutoencoderKL.from_pretrained`
and `conversion.diffusers_io.load_vae` read.

Axis letters: B batch, H W image height and width, C channels.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen import images as image_io
from jaxgen.config import Config
from jaxgen.models.autoencoder_kl import AutoencoderKL
from jaxgen.models.discriminator import NLayerDiscriminator
from jaxgen.models.lpips import LPIPS
from jaxgen.tasks import Task
from jaxgen.vae_loss import VAETrainingConfig, vae_losses

__all__ = ["AutoencoderWithDiscriminator", "VAETask", "tint_digits"]

HELD_OUT_COLOUR_SEED = 0
SAMPLE_COLUMNS = 8
EXPORT_FOLDER = "vae"


class AutoencoderWithDiscriminator(nnx.Module):
    """The modules the `vae` task trains (vae, discriminator) and the frozen LPIPS network it scores with."""

    def __init__(self, vae: AutoencoderKL, discriminator: NLayerDiscriminator | None, lpips: LPIPS | None):
        self.vae = vae
        self.discriminator = discriminator
        self.lpips = lpips


def tint_digits(key: jax.Array, images: jax.Array) -> jax.Array:
    """Colour one-channel images [B, H, W, 1] in [-1, 1] as RGB [B, H, W, 3] in [-1, 1].

    Each example gets a foreground and a background colour, uniform in [-1, 1]^3. The pixel value sets the
    mix: -1 gives the background colour and 1 the foreground colour.
    """
    foreground_key, background_key = jax.random.split(key)
    colour_shape = (images.shape[0], 1, 1, 3)
    foreground = jax.random.uniform(foreground_key, colour_shape, images.dtype, -1.0, 1.0)
    background = jax.random.uniform(background_key, colour_shape, images.dtype, -1.0, 1.0)
    alpha = (images + 1.0) / 2.0
    return background + alpha * (foreground - background)


class VAETask(Task):
    """Reconstruction + KL training of an AutoencoderKL, with optional LPIPS and PatchGAN terms."""

    model_config_type = VAETrainingConfig
    # The discriminator's warm-up depends on the update count, which the trainer adds as batch["step"].
    loss_needs_step = True

    def __init__(self, config: Config, held_out: dict[str, np.ndarray]):
        super().__init__(config, held_out)
        model_config: VAETrainingConfig = config.model
        channels = model_config.vae.in_channels
        if channels not in (1, 3):
            raise ValueError(
                f"model.vae.in_channels={channels} is invalid for the digits; use 1 (grey) or 3 (tinted RGB)"
            )
        factor = model_config.vae.downsample_factor
        if config.data.image_size % factor:
            raise ValueError(
                f"data.image_size={config.data.image_size} is not divisible by the VAE's downsampling factor "
                f"{factor}; use fewer model.vae.block_out_channels entries or another image size"
            )
        if model_config.loss.perceptual_weight > 0:
            # LPIPS is a Param (so conversion.rules fills it by name) but stays frozen: leave it out here.
            self.trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("lpips")))
        self._reconstruct_fn = None
        self._held_out_images = None

    def build_model(self, rngs: nnx.Rngs) -> AutoencoderWithDiscriminator:
        model_config: VAETrainingConfig = self.config.model
        vae = AutoencoderKL(model_config.vae, rngs=rngs)
        discriminator = None
        if model_config.loss.uses_discriminator:
            discriminator = NLayerDiscriminator(model_config.discriminator, rngs=rngs)
        lpips = None
        if model_config.loss.perceptual_weight > 0:
            lpips = self._load_lpips()
        return AutoencoderWithDiscriminator(vae, discriminator, lpips)

    def _load_lpips(self) -> LPIPS:
        from conversion.lpips_io import load_lpips

        loss = self.config.model.loss
        try:
            return load_lpips(loss.lpips_vgg16_weights, loss.lpips_linear_weights)
        except FileNotFoundError as error:
            raise ValueError(
                f"model.loss.lpips_vgg16_weights / lpips_linear_weights: {error}; point them at local files"
            ) from error

    def model_images(self, images: jax.Array, key: jax.Array) -> jax.Array:
        """Return the digits [B, H, W, 1] as the VAE's input: unchanged for one channel, tinted for three."""
        if self.config.model.vae.in_channels == 1:
            return images
        return tint_digits(key, images)

    def loss_fn(self, model, batch, key):
        if "step" not in batch:
            raise ValueError(
                "the vae task needs the update count as batch['step']; the trainer adds it for tasks with "
                "loss_needs_step = True"
            )
        colour_key, sample_key = jax.random.split(key)
        images = self.model_images(batch["image"], colour_key)
        return vae_losses(
            model.vae,
            images,
            sample_key,
            batch["step"],
            self.config.model.loss,
            discriminator=model.discriminator,
            lpips=model.lpips,
        )

    def held_out_images(self) -> jax.Array:
        """Return the held-out digits as VAE input, tinted with fixed colours."""
        if self._held_out_images is None:
            images = jnp.asarray(self.held_out["image"])
            self._held_out_images = self.model_images(images, jax.random.PRNGKey(HELD_OUT_COLOUR_SEED))
        return self._held_out_images

    def reconstruct_held_out(self, vae: AutoencoderKL) -> tuple[np.ndarray, np.ndarray]:
        """Return (inputs, reconstructions of the posterior mean) for all held-out images, [N, H, W, C] each.

        Evaluation and sample grids both call this, so they share one compiled program.
        """
        if self._reconstruct_fn is None:
            self._reconstruct_fn = jax.jit(_reconstruct, static_argnums=0)
        graphdef, state = nnx.split(vae)
        inputs = self.held_out_images()
        return np.asarray(inputs), np.asarray(self._reconstruct_fn(graphdef, state, inputs))

    def evaluate(self, model):
        """Return the held-out L1, MSE and PSNR (dB) of reconstructions of the posterior mean."""
        inputs, reconstructions = self.reconstruct_held_out(model.vae)
        error = reconstructions.astype(np.float64) - inputs
        mse = float(np.mean(np.square(error)))
        # PSNR for a signal range of 2 ([-1, 1]) equals PSNR of the same images mapped to [0, 1].
        return {
            "held_out_l1": float(np.mean(np.abs(error))),
            "held_out_mse": mse,
            "held_out_psnr_db": 10.0 * np.log10(4.0 / mse),
        }

    def write_samples(self, graphdef, rest, params, step, workdir):
        model = nnx.merge(graphdef, params, rest)
        inputs, reconstructions = self.reconstruct_held_out(model.vae)
        indices = np.linspace(0, len(inputs) - 1, SAMPLE_COLUMNS).round().astype(int)
        grid = np.concatenate([inputs[indices], reconstructions[indices]])
        path = workdir / "samples" / f"step_{step:06d}.png"
        return image_io.save_grid(grid, path, ncols=len(indices))

    def export(self, graphdef, rest, params, step, workdir) -> pathlib.Path:
        """Write the EMA VAE as a diffusers model folder `vae/` in the run folder, replacing older exports."""
        from conversion.diffusers_io import save_vae

        model = nnx.merge(graphdef, params, rest)
        folder = pathlib.Path(workdir) / EXPORT_FOLDER
        save_vae(model.vae, folder)
        return folder


def _reconstruct(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    """Decode the posterior mean of images [B, H, W, C]."""
    vae = nnx.merge(graphdef, state)
    return vae.decode(vae.encode(images).mode())
