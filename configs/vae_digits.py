"""A small KL autoencoder (Stable Diffusion's VAE layout) on the 32x32 digits, tinted RGB, with a PatchGAN.

Train:   python -m jaxgen.train --cfg vae_digits
Tiny:    python -m jaxgen.train --cfg vae_digits --cfg-arg tiny   (a few steps of a tiny model, for tests)
LPIPS:   add --set model.loss.perceptual_weight=1.0 --set model.loss.lpips_vgg16_weights=PATH/vgg16-397923af.pth
         (torchvision's VGG16 state_dict; the linear heads come from the installed lpips package unless
         model.loss.lpips_linear_weights is set)

The run folder gets metrics.jsonl (losses and held-out L1/MSE/PSNR), samples/step_*.png (held-out inputs over
their reconstructions) and vae/, the EMA VAE as a diffusers model folder. On the 2-core CPU machine the default
run took about 5 minutes (3.4 steps/s on 2 host devices, 16 s to compile) and reached a held-out PSNR of
31 dB (one run, seed 0).
"""

import dataclasses

from jaxgen.config import Config, DataConfig, OptimConfig, TrainConfig
from jaxgen.models.autoencoder_kl import AutoencoderKLConfig
from jaxgen.models.discriminator import NLayerDiscriminatorConfig
from jaxgen.vae_loss import VAELossConfig, VAETrainingConfig


def get_config(arg=None):
    vae = AutoencoderKLConfig(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        # 32x32 images -> 8x8x4 latents. A 32-channel first block made each step about 2x slower on the
        # 2-core CPU machine (benchmarked while other jobs shared the cores).
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    model = VAETrainingConfig(
        vae=vae,
        loss=VAELossConfig(reconstruction="l1", kl_weight=1e-6, disc_weight=0.1, disc_start=500),
        discriminator=NLayerDiscriminatorConfig(in_channels=3, base_channels=16, num_layers=2, norm_num_groups=8),
    )
    config = Config(
        task="vae",
        model=model,
        data=DataConfig(image_size=32, batch_size=32),
        # taming-transformers trains its autoencoder GANs with Adam betas (0.5, 0.9).
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100, b1=0.5, b2=0.9, ema_decay=0.999),
        train=TrainConfig(num_steps=1000, log_every=50, checkpoint_every=250, sample_every=250, eval_every=250,
                          host_devices=2, workdir="runs/vae_digits"),
    )
    if arg == "tiny":
        tiny_vae = dataclasses.replace(vae, down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                       norm_num_groups=4, mid_block_add_attention=False)
        config = dataclasses.replace(
            config,
            model=dataclasses.replace(
                model,
                vae=tiny_vae,
                loss=dataclasses.replace(model.loss, disc_start=3),
                discriminator=dataclasses.replace(model.discriminator, base_channels=8, norm_num_groups=4),
            ),
            data=dataclasses.replace(config.data, batch_size=8),
            optim=dataclasses.replace(config.optim, warmup_steps=2),
            train=dataclasses.replace(config.train, num_steps=6, log_every=1, checkpoint_every=3, sample_every=6,
                                      eval_every=6, workdir="runs/vae_digits_tiny"),
        )
    elif arg is not None:
        raise ValueError(f"unknown vae_digits preset {arg!r}; use 'tiny' or none")
    return config
