"""LoRA fine-tuning of a Stable Diffusion 1.x/2.x U-Net on a folder of captioned images.

Train:   python -m jaxgen.train --cfg sd_lora
Resume:  rerun the same command; it continues from the newest checkpoint in runs/sd_lora.
Tiny:    python -m jaxgen.train --cfg sd_lora --cfg-arg tiny   (a few steps at 32x32, for tests)

Without --set model.pretrained=PATH, the base is a tiny randomly initialised pipeline written to
runs/tiny_sd_base, because no pretrained weights are available offline, and the data is the built-in digit
caption folder. A real checkpoint, e.g. a local copy of Stable Diffusion 1.5 on your own images:

    python -m jaxgen.train --cfg sd_lora --set model.pretrained=/models/sd15 --set data.folder=/data/pets \
        --set data.image_size=512 --set data.bucket_multiple=64 --set optim.learning_rate=1e-4 \
        --set train.workdir=runs/sd15_pets

The adapters are written to <workdir>/lora/pytorch_lora_weights.safetensors at every checkpoint, and diffusers
reads them with `pipeline.load_lora_weights("<workdir>/lora")`. The train step compiles once per bucket size,
so the default run compiles three times.
"""

import dataclasses

from jaxgen.config import (
    Config,
    ImageCaptionDataConfig,
    LoRAModelConfig,
    OptimConfig,
    PromptSampleConfig,
    TextDiffusionConfig,
    TrainConfig,
)

PROMPTS = (
    "a handwritten digit three in red on a white background, in the centre",
    "a handwritten digit seven in yellow on a black background, in the centre",
)


def get_config(arg=None, *, xl=False):
    name = "sdxl_lora" if xl else "sd_lora"
    config = Config(
        task="text_to_image_lora",
        model=LoRAModelConfig(xl=xl, random_base_dir=f"runs/tiny_{'sdxl' if xl else 'sd'}_base", rank=4, alpha=4.0),
        # The tiny base's VAE downsamples by 8 and its U-Net halves the latents once, so sides are multiples
        # of 16. 64 pixels gives the digit folder's square, wide and tall images three buckets.
        data=ImageCaptionDataConfig(image_size=64, bucket_multiple=16, max_aspect_ratio=2.0, batch_size=4),
        diffusion=TextDiffusionConfig(caption_dropout_prob=0.1),
        # ema_decay 0 makes the exported and sampled adapters the latest ones, as diffusers' LoRA scripts save.
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=20, weight_decay=1e-2, ema_decay=0.0),
        sample=PromptSampleConfig(prompts=PROMPTS, num_steps=20, guidance_scale=5.0),
        train=TrainConfig(num_steps=300, log_every=25, checkpoint_every=100, sample_every=0, eval_every=0,
                          workdir=f"runs/{name}"),
    )
    if arg == "tiny":
        config = dataclasses.replace(
            config,
            # One 32x32 bucket, so the train step compiles once.
            data=dataclasses.replace(config.data, image_size=32, batch_size=2),
            optim=dataclasses.replace(config.optim, warmup_steps=2),
            sample=dataclasses.replace(config.sample, prompts=()),
            train=dataclasses.replace(config.train, num_steps=6, log_every=1, checkpoint_every=3,
                                      workdir=f"runs/{name}_tiny"),
        )
    elif arg is not None:
        raise ValueError(f"unknown {name} preset {arg!r}; use 'tiny' or none")
    return config
