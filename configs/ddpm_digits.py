"""Class-conditional DDPM on the 16x16 handwritten digits, with a learned null class for guidance.

Train:   python -m jaxgen.train --cfg ddpm_digits
Sample:  python -m jaxgen.sample --run runs/ddpm_digits --sampler ddim --steps 50 --guidance 3
Tiny:    python -m jaxgen.train --cfg ddpm_digits --cfg-arg tiny   (a few steps of a tiny model, for tests)
"""

from jaxgen.config import Config, DataConfig, DiffusionConfig, OptimConfig, SampleConfig, TrainConfig
from jaxgen.models.unet_2d_condition import UNet2DConditionConfig


def get_config(arg=None):
    model = UNet2DConditionConfig(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        # Attention only at the 4x4 level: on XLA CPU, self-attention over the 64 tokens of the 8x8
        # level doubled the step time (2.1 vs 4.5 steps/s, benchmarks/train_speed.py on 2 cores).
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,
        num_class_embeds=11,  # ten digits and the null class
    )
    config = Config(
        task="diffusion",
        model=model,
        data=DataConfig(image_size=16, batch_size=64),
        diffusion=DiffusionConfig(schedule="linear", prediction_type="epsilon", cond_drop_prob=0.1),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=200, ema_decay=0.999),
        sample=SampleConfig(sampler="ddim", num_steps=50, guidance_scale=3.0),
        train=TrainConfig(num_steps=2000, log_every=50, checkpoint_every=500, sample_every=1000, eval_every=0,
                          workdir="runs/ddpm_digits"),
    )
    if arg == "tiny":
        import dataclasses

        config = dataclasses.replace(
            config,
            model=dataclasses.replace(model, block_out_channels=(8, 16), cross_attention_dim=16,
                                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                      attention_head_dim=8, norm_num_groups=4),
            data=dataclasses.replace(config.data, batch_size=16),
            optim=dataclasses.replace(config.optim, warmup_steps=2),
            sample=dataclasses.replace(config.sample, num_steps=5, samples_per_class=1),
            train=dataclasses.replace(config.train, num_steps=6, log_every=1, checkpoint_every=3, sample_every=6,
                                      workdir="runs/ddpm_digits_tiny"),
        )
    elif arg is not None:
        raise ValueError(f"unknown ddpm_digits preset {arg!r}; use 'tiny' or none")
    return config
