"""The training objective of a KL autoencoder: reconstruction, KL, LPIPS and a hinge-loss PatchGAN.

This follows the LPIPSWithDiscriminator loss of taming-transformers / latent-diffusion, which Stable
Diffusion's VAE was trained with, in one function of the modules, the batch and the step:

    generator_loss = rec + perceptual_weight * lpips + kl_weight * kl + f(step) * disc_weight * g_adv
    disc_loss      = f(step) * 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))
    loss           = generator_loss + disc_loss,     g_adv = -mean(D(x_rec)),    f(step) = [step >= disc_start]

rec is the per-element mean of |x - x_rec| (or its square). lpips is the batch mean of the LPIPS distance.
kl is KL(q(z | x) || N(0, I)) summed over the latent elements and averaged over the batch.
taming-transformers sums the reconstruction over the pixels instead of averaging it, so its kl_weight
equals this kl_weight times H * W * C. Unlike taming-transformers, disc_weight is fixed here: its adaptive
weight, the ratio of the gradient norms of the two generator terms at the decoder's last layer, is not
implemented.

One optimizer updates the VAE and the discriminator together. Each still gets the gradient of its own
term, because the discriminator enters g_adv through stop_gradient and the reconstruction enters disc_loss
through stop_gradient. So d loss / d VAE = d generator_loss / d VAE, and d loss / d D = d disc_loss / d D.
NOTE: the trainer clips the global norm of all gradients together, so the discriminator's gradient changes
the factor that the VAE's gradient is scaled by. Adam's update is nearly invariant to a constant factor,
but a factor that varies from step to step couples the two.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from jaxgen.models.discriminator import NLayerDiscriminator, NLayerDiscriminatorConfig
from jaxgen.models.lpips import LPIPS

__all__ = ["RECONSTRUCTION_LOSSES", "VAELossConfig", "VAETrainingConfig", "hinge_discriminator_loss", "vae_losses"]

RECONSTRUCTION_LOSSES = ("l1", "mse")


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
    """Weights of the VAE loss terms. The module docstring gives the formula."""

    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    # LPIPS needs local weight files: torchvision's VGG16 state_dict and lpips' weights/v0.1/vgg.pth. With
    # lpips_linear_weights None, the heads come from the installed lpips package (see conversion.lpips_io).
    perceptual_weight: float = 0.0
    lpips_vgg16_weights: str | None = None
    lpips_linear_weights: str | None = None
    # A discriminator is built only when disc_weight > 0, and it starts to count at update disc_start.
    disc_weight: float = 0.0
    disc_start: int = 0

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"loss.reconstruction={self.reconstruction!r} is invalid; use one of {RECONSTRUCTION_LOSSES}"
            )
        for name in ("kl_weight", "perceptual_weight", "disc_weight"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"loss.{name}={value!r} is invalid; use a weight >= 0")
        if isinstance(self.disc_start, bool) or not isinstance(self.disc_start, int) or self.disc_start < 0:
            raise ValueError(f"loss.disc_start={self.disc_start!r} is invalid; use an update count >= 0")
        if self.perceptual_weight > 0 and self.lpips_vgg16_weights is None:
            raise ValueError(
                f"loss.perceptual_weight={self.perceptual_weight} needs loss.lpips_vgg16_weights, the path of "
                "torchvision's VGG16 state_dict (vgg16-397923af.pth); set it or set perceptual_weight=0"
            )

    @property
    def uses_discriminator(self) -> bool:
        return self.disc_weight > 0


@dataclasses.dataclass(frozen=True)
class VAETrainingConfig:
    """The model config of the `vae` task: the autoencoder, its loss and the discriminator."""

    vae: AutoencoderKLConfig = AutoencoderKLConfig()
    loss: VAELossConfig = VAELossConfig()
    # Used only when loss.disc_weight > 0.
    discriminator: NLayerDiscriminatorConfig = NLayerDiscriminatorConfig()

    def __post_init__(self):
        if self.vae.in_channels != self.vae.out_channels:
            raise ValueError(
                f"vae.in_channels={self.vae.in_channels} and vae.out_channels={self.vae.out_channels} differ; "
                "an autoencoder reconstructs its input, so set them equal"
            )
        if self.loss.uses_discriminator and self.discriminator.in_channels != self.vae.out_channels:
            raise ValueError(
                f"discriminator.in_channels={self.discriminator.in_channels} does not match "
                f"vae.out_channels={self.vae.out_channels}; set them equal"
            )
        if self.loss.perceptual_weight > 0 and self.vae.out_channels != 3:
            raise ValueError(
                f"loss.perceptual_weight > 0 needs RGB images, but vae.out_channels={self.vae.out_channels}; "
                "set perceptual_weight=0 or use 3 channels"
            )


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Return 0.5 * (mean(relu(1 - logits_real)) + mean(relu(1 + logits_fake)))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def _frozen(module: nnx.Module) -> nnx.Module:
    """Return `module` with stop_gradient on every variable: a caller differentiates only its inputs."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def vae_losses(
    vae: AutoencoderKL,
    images: jax.Array,
    key: jax.Array,
    step: jax.Array,
    config: VAELossConfig,
    *,
    discriminator: NLayerDiscriminator | None = None,
    lpips: LPIPS | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Compute the VAE objective on images [B, H, W, C] in [-1, 1] at update `step`; return (loss, metrics).

    The reconstruction decodes a posterior sample drawn with `key`. `discriminator` must be given when
    config.disc_weight > 0, and `lpips` when config.perceptual_weight > 0. The metrics always contain loss,
    generator_loss, rec_loss and kl; perceptual_loss with LPIPS; and adversarial_loss, disc_loss,
    logits_real, logits_fake and disc_factor with a discriminator. Both adversarial_loss and disc_loss
    include the factor f(step), so they are 0 before disc_start.
    """
    if config.uses_discriminator and discriminator is None:
        raise ValueError(f"loss.disc_weight={config.disc_weight} needs a discriminator; pass discriminator=")
    if config.perceptual_weight > 0 and lpips is None:
        raise ValueError(f"loss.perceptual_weight={config.perceptual_weight} needs an LPIPS module; pass lpips=")

    posterior = vae.encode(images)
    reconstruction = vae.decode(posterior.sample(key))
    error = reconstruction - images
    rec_loss = jnp.mean(jnp.abs(error)) if config.reconstruction == "l1" else jnp.mean(jnp.square(error))
    kl = jnp.mean(posterior.kl())
    generator_loss = rec_loss + config.kl_weight * kl
    metrics = {"rec_loss": rec_loss, "kl": kl}

    if config.perceptual_weight > 0:
        perceptual_loss = jnp.mean(_frozen(lpips)(images, reconstruction))
        generator_loss = generator_loss + config.perceptual_weight * perceptual_loss
        metrics["perceptual_loss"] = perceptual_loss

    disc_loss = jnp.float32(0.0)
    if config.uses_discriminator:
        disc_factor = (jnp.asarray(step) >= config.disc_start).astype(jnp.float32)
        # Generator term: gradients reach the reconstruction but not the discriminator's weights.
        adversarial_loss = disc_factor * -jnp.mean(_frozen(discriminator)(reconstruction))
        generator_loss = generator_loss + config.disc_weight * adversarial_loss
        # Discriminator term: gradients reach the discriminator's weights but not the VAE.
        logits_real = discriminator(jax.lax.stop_gradient(images))
        logits_fake = discriminator(jax.lax.stop_gradient(reconstruction))
        disc_loss = disc_factor * hinge_discriminator_loss(logits_real, logits_fake)
        metrics.update(
            adversarial_loss=adversarial_loss,
            disc_loss=disc_loss,
            logits_real=jnp.mean(logits_real),
            logits_fake=jnp.mean(logits_fake),
            disc_factor=disc_factor,
        )

    loss = generator_loss + disc_loss
    return loss, {"loss": loss, "generator_loss": generator_loss, **metrics}
