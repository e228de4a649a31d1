"""The digit classifier that scores generated samples (conditional accuracy and Fréchet distance features).

Train:   python -m jaxgen.train --cfg digit_classifier
"""

from jaxgen.config import Config, DataConfig, OptimConfig, TrainConfig
from jaxgen.models.classifier import DigitClassifierConfig


def get_config(arg=None):
    if arg not in (None, "tiny"):
        raise ValueError(f"unknown digit_classifier preset {arg!r}; use 'tiny' or none")
    tiny = arg == "tiny"
    return Config(
        task="classifier",
        model=DigitClassifierConfig(image_size=16),
        data=DataConfig(image_size=16, batch_size=16 if tiny else 128),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=2 if tiny else 50, weight_decay=1e-4, ema_decay=0.99),
        train=TrainConfig(num_steps=4 if tiny else 800, log_every=1 if tiny else 50, checkpoint_every=400,
                          sample_every=0, eval_every=0 if tiny else 200, seed=1,
                          workdir="runs/digit_classifier_tiny" if tiny else "runs/digit_classifier"),
    )
