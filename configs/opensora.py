"""Open-Sora 1.2 text-to-video: the video VAE, then STDiT3 with rectified flow (task `opensora`, two stages).

Train:   python -m jaxgen.train --cfg opensora.py                  (the tiny preset, built-in digit clips)
Sample:  python -m jaxgen.sample --cfg opensora.py --prompt "the digit seven moves to the left" --out seven.mp4
Score:   python -m benchmarks.video_quality --run runs/opensora/stdit
v1.2:    python -m jaxgen.train --cfg opensora.py:v1.2 --set model.stdit.data.csv=PATH/train.csv ...
         (Open-Sora 1.2's real sizes, for accelerators; see the v1.2 notes below)
Tests:   --cfg opensora.py:smoke   (a few steps of each stage, for tests)

Presets:
- `tiny` (default): trains both stages on this repository's built-in clips (real handwritten digits from
  scikit-learn moving left, right, up or down on a 32x32 canvas, 8 frames, captions such as "the digit
  seven moves to the left"). No pretrained T5 is available offline. So the STDiT stage uses a small T5 with
  frozen random weights and a word-level tokenizer built from the captions, as the module docstring of
  jaxgen.tasks_opensora explains. The VAE compresses 4x in space (32x32 -> 8x8) and 4x in time
  (8 -> 2 latent frames).
- `v1.2`: Open-Sora 1.2's sizes: the SDXL VAE per frame (8x) with the causal temporal VAE (4x), STDiT3-XL/2
  (1.21B parameters) and T5 v1.1 XXL text features (4096 channels, 300 tokens). It expects local weights:
  model.stdit.model.text_encoder_path (a transformers T5 v1.1 XXL encoder folder with tokenizer.json) and
  model.vae.model.pretrained_spatial (the SDXL VAE as a diffusers folder), and a metadata CSV of your videos
  in model.*.data.csv. As in Open-Sora 1.2's VAE training, the 2D VAE stays frozen and only the temporal
  VAE trains. Shard the model with --set model.stdit.train.fsdp=N on N accelerators.

Every stage setting can be overridden through the stage's section, for example
--set model.stdit.train.num_steps=2000 or --set model.vae.optim.learning_rate=5e-4.
"""

import dataclasses

from jaxgen.config import Config, OptimConfig, SampleConfig, TrainConfig
from jaxgen.models.discriminator import NLayerDiscriminatorConfig
from jaxgen.models.stdit3 import STDiT3Config
from jaxgen.models.t5 import T5Config
from jaxgen.models.video_vae import VideoVAEConfig
from jaxgen.tasks_opensora import OpenSoraStages, OpenSoraSTDiTConfig, OpenSoraVAEConfig, VideoDataConfig
from jaxgen.vae_loss import VAELossConfig

ROOT = "runs/opensora"


def tiny() -> Config:
    # 8 frames at 2 pixels per frame: the digit travels 14 of the 16 free pixels, and each step of the VAE
    # stage costs half of what 16 frames at 1 pixel per frame cost.
    data = VideoDataConfig(resolutions=(32,), frame_counts=(8,), bucket_multiple=16, fps=8,
                           builtin_train_clips=2048, builtin_test_clips=40, builtin_digit_side=16, builtin_speed=2)
    vae = VideoVAEConfig.from_preset("tiny")
    # A narrower first level than the preset's (16, 32, 32): the 32x32 convolutions dominate each step on CPU.
    vae = dataclasses.replace(vae, spatial=dataclasses.replace(vae.spatial, block_out_channels=(8, 16, 32)))
    vae_stage = Config(
        task="opensora_vae",
        model=OpenSoraVAEConfig(
            vae=vae,
            loss=VAELossConfig(reconstruction="l1", kl_weight=1e-6),
            spatial_kl_weight=1e-6,
            sample_posterior=False,
            spatial_rec_weight=1.0,
            latent_rec_weight=1.0,
            discriminator=NLayerDiscriminatorConfig(in_channels=3, base_channels=16, num_layers=2, norm_num_groups=8),
        ),
        data=dataclasses.replace(data, batch_size=4),
        # In a trial with 16-frame clips at 1e-3, the reconstructions were still blank frames after 200 steps.
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=50, ema_decay=0.99),
        train=TrainConfig(num_steps=1800, log_every=50, checkpoint_every=600, sample_every=1800, eval_every=600,
                          host_devices=2),
    )
    text_channels = 32
    stdit_stage = Config(
        task="opensora_stdit",
        model=OpenSoraSTDiTConfig(
            stdit=STDiT3Config(input_sq_size=32, in_channels=4, patch_size=(1, 2, 2), hidden_size=128, depth=4,
                               num_heads=4, caption_channels=text_channels, model_max_length=12),
            text_encoder=T5Config(d_model=text_channels, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                  feed_forward_proj="gated-gelu"),
            velocity_convention="data_minus_noise",
            timestep_sampling="logit_normal",
            shift_mode="fixed",
            timestep_shift=1.0,
            caption_dropout_prob=0.1,
            samples_per_caption=2,
        ),
        data=dataclasses.replace(data, batch_size=32),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100, ema_decay=0.995),
        sample=SampleConfig(sampler="euler", num_steps=30, guidance_scale=4.0),
        train=TrainConfig(num_steps=2000, log_every=50, checkpoint_every=500, sample_every=2000, eval_every=0,
                          host_devices=2),
    )
    return Config(task="opensora", model=OpenSoraStages(vae=vae_stage, stdit=stdit_stage),
                  train=TrainConfig(workdir=ROOT))


def smoke() -> Config:
    """Return a config that trains a few steps of each stage with smaller models, for tests."""
    config = tiny()
    stages = config.model
    vae_train = dataclasses.replace(stages.vae.train, num_steps=4, log_every=2, checkpoint_every=2, sample_every=4,
                                    eval_every=4, host_devices=1)
    stdit_train = dataclasses.replace(stages.stdit.train, num_steps=4, log_every=2, checkpoint_every=2,
                                      sample_every=4, eval_every=0, host_devices=1)
    data = dataclasses.replace(stages.vae.data, builtin_train_clips=16, builtin_test_clips=4, batch_size=4)
    stdit_model = dataclasses.replace(
        stages.stdit.model, samples_per_caption=1,
        stdit=dataclasses.replace(stages.stdit.model.stdit, hidden_size=32, depth=1),
    )
    return dataclasses.replace(
        config,
        model=OpenSoraStages(
            vae=dataclasses.replace(stages.vae, data=data, train=vae_train,
                                    optim=dataclasses.replace(stages.vae.optim, warmup_steps=1)),
            stdit=dataclasses.replace(stages.stdit, model=stdit_model, data=data, train=stdit_train,
                                      sample=dataclasses.replace(stages.stdit.sample, num_steps=3),
                                      optim=dataclasses.replace(stages.stdit.optim, warmup_steps=1)),
        ),
        train=TrainConfig(workdir="runs/opensora_smoke"),
    )


def v1_2() -> Config:
    """Return Open-Sora 1.2's model sizes and training settings (hpcaitech/Open-Sora, tag v1.2.0)."""
    data = VideoDataConfig(csv="data/opensora/train.csv", resolutions=(256, 512), frame_counts=(51, 102),
                           bucket_multiple=16, fps=24, batch_size=4)
    vae = VideoVAEConfig.from_preset("v1.2")
    vae_stage = Config(
        task="opensora_vae",
        model=OpenSoraVAEConfig(vae=vae, loss=VAELossConfig(reconstruction="l1", kl_weight=1e-6),
                                train_spatial=False, pretrained_spatial="pretrained/sdxl_vae",
                                measure_latent_stats=False,
                                discriminator=NLayerDiscriminatorConfig(in_channels=3)),
        data=dataclasses.replace(data, batch_size=1),
        optim=OptimConfig(learning_rate=1e-5, warmup_steps=0, ema_decay=0.99),
        train=TrainConfig(num_steps=100_000, checkpoint_every=1000, sample_every=5000, eval_every=5000,
                          host_devices=1),
    )
    t5_xxl = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu")
    stdit_stage = Config(
        task="opensora_stdit",
        model=OpenSoraSTDiTConfig(
            stdit=STDiT3Config.from_preset("v1.2"),
            text_encoder=t5_xxl,
            text_encoder_path="pretrained/t5-v1_1-xxl",
            velocity_convention="data_minus_noise",
            timestep_sampling="logit_normal",
            shift_mode="resolution",
        ),
        data=data,
        # Open-Sora 1.2 trains STDiT3 with lr 1e-4 and an EMA of 0.99.
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=1000, ema_decay=0.99, grad_clip_norm=1.0),
        sample=SampleConfig(sampler="euler", num_steps=30, guidance_scale=7.0),
        train=TrainConfig(num_steps=100_000, checkpoint_every=1000, sample_every=5000, eval_every=0,
                          host_devices=1),
    )
    return Config(task="opensora", model=OpenSoraStages(vae=vae_stage, stdit=stdit_stage),
                  train=TrainConfig(workdir="runs/opensora_v1.2"))


PRESETS = {"tiny": tiny, "smoke": smoke, "v1.2": v1_2}


def get_config(arg=None):
    name = arg or "tiny"
    if name not in PRESETS:
        raise ValueError(f"unknown opensora preset {name!r}; use one of {sorted(PRESETS)}")
    return PRESETS[name]()
