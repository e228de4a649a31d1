"""The noise-aware digit classifier p(y | x_t, t) used for classifier guidance.

It must use the same noise schedule as the diffusion model it guides (configs/ddpm_digits.py).
Train:   python -m jaxgen.train --cfg noisy_classifier_digits
"""

from jaxgen.config import Config, DataConfig, DiffusionConfig, OptimConfig, TrainConfig
from jaxgen.models.classifier import NoisyClassifierConfig


def get_config(arg=None):
    if arg not in (None, "tiny"):
        raise ValueError(f"unknown noisy_classifier_digits preset {arg!r}; use 'tiny' or none")
    tiny = arg == "tiny"
    return Config(
        task="noisy_classifier",
        model=NoisyClassifierConfig(image_size=16),
        data=DataConfig(image_size=16, batch_size=16 if tiny else 128),
        diffusion=DiffusionConfig(schedule="linear"),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=2 if tiny else 100, weight_decay=1e-4, ema_decay=0.99),
        train=TrainConfig(num_steps=4 if tiny else 1500, log_every=1 if tiny else 50, checkpoint_every=500,
                          sample_every=0, eval_every=0 if tiny else 500, seed=2,
                          workdir="runs/noisy_classifier_digits_tiny" if tiny else "runs/noisy_classifier_digits"),
    )
