"""Open-Sora 1.2 in two training stages: the video VAE, then STDiT3 with rectified flow (tasks `opensora_*`).

`python -m jaxgen.train --cfg opensora.py` trains the task `opensora`, which runs two stages in order, each a
normal jaxgen training run in its own folder under `train.workdir`:

| stage | task | trains | on |
| --- | --- | --- | --- |
| `vae/` | `opensora_vae` | the video VAE (per-frame 2D VAE + causal temporal VAE) | reconstruction + KL, optional LPIPS and PatchGAN on frames |
| `stdit/` | `opensora_stdit` | STDiT3 | rectified flow on the frozen VAE's latents, conditioned on frozen T5 features |

Each stage resumes from its newest checkpoint, so rerunning the command after an interruption continues
where it stopped, and a finished stage is skipped after a check of its run folder. The VAE stage exports
its EMA weights after every checkpoint to `vae/vae/` (config.json and model.safetensors with Open-Sora's
VideoAutoencoderPipeline keys), which the STDiT stage and `jaxgen.sample` read.

Text: with `model.text_encoder_path` empty, the STDiT stage builds a word-level tokenizer from the captions
of the data (`jaxgen.text_tokenizer`) and a T5 encoder of `model.text_encoder` with frozen random weights
drawn from `model.text_encoder_seed`, because no pretrained T5 can be downloaded here. Both are written
into the stage's run folder (`tokenizer/`, `text_encoder/`) so that sampling reads the same ones. With a
path, the folder must hold a transformers T5 encoder (config.json, model.safetensors) and tokenizer.json,
as in a published T5 v1.1 XXL folder.

Data (`VideoDataConfig`): a metadata CSV of (path, text), prepared with the TFDS builder of
`jaxgen.data.video_caption` into buckets of resolution and frame count. With `data.csv` empty, the built-in
clips of handwritten digits moving across a canvas are written once into `data.data_dir` and read through
the same CSV path. Held-out clips come from the digits' test split (or `data.test_csv`).

Because the VAE and T5 are frozen in the STDiT stage, the stage encodes every training clip and caption once
when it starts and trains on the stored latents and text features. A sampling step during training draws
videos for the held-out captions with Euler-`sample.num_steps` and classifier-free guidance, then decodes
them. It writes `samples/step_NNNNNN.npz` beside a GIF and an MP4 grid. The .npz file contains the frames,
the captions and, for the built-in data, the digit and direction labels that `benchmarks/video_quality.py`
scores.

Axis letters: B batch, T frames, H W height and width, C channels, L text tokens, E text features.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen.config import Config, SampleConfig, TrainConfig
from jaxgen.data.bucket_loader import BucketBatchLoader
from jaxgen.diffusion import rectified_flow as rf
from jaxgen.models.discriminator import NLayerDiscriminator, NLayerDiscriminatorConfig
from jaxgen.models.stdit3 import STDiT3, STDiT3Config
from jaxgen.models.t5 import T5Config, T5EncoderModel
from jaxgen.models.video_vae import VideoAutoencoder, VideoVAEConfig
from jaxgen.tasks import Task
from jaxgen.vae_loss import VAELossConfig, _frozen, hinge_discriminator_loss

logger = logging.getLogger(__name__)

__all__ = [
    "OpenSoraSTDiTConfig",
    "OpenSoraStages",
    "OpenSoraSTDiTTask",
    "OpenSoraTask",
    "OpenSoraVAEConfig",
    "OpenSoraVAETask",
    "VideoDataConfig",
    "load_video_vae",
    "save_video_vae",
]

VAE_EXPORT_FOLDER = "vae"
TOKENIZER_FOLDER = "tokenizer"
TEXT_ENCODER_FOLDER = "text_encoder"
VAE_WEIGHTS_FILE = "model.safetensors"
VAE_CONFIG_FILE = "config.json"
# Clips encoded per call while the STDiT stage stores latents and text features.
ENCODE_CHUNK = 32


# ----- configs -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoDataConfig:
    """Captioned videos: a metadata CSV in bucketed shapes, or the built-in moving digits."""

    name: str = "video_caption"
    # Metadata CSV with `path` and `text` columns (Open-Sora's layout). Empty: the built-in digit clips.
    csv: str = ""
    path_column: str = "path"
    caption_column: str = "text"
    # Held-out CSV for sample captions and evaluation. Empty: built-in test-split clips (with csv empty) or none.
    test_csv: str = ""
    resolutions: tuple[int, ...] = (32,)
    frame_counts: tuple[int, ...] = (16,)
    bucket_multiple: int = 16
    max_aspect_ratio: float = 2.0
    fps: int = 8
    # The built-in clips: counts per split, the digit's side and its speed in pixels per frame.
    builtin_train_clips: int = 2048
    builtin_test_clips: int = 40
    builtin_digit_side: int = 16
    builtin_speed: int = 1
    builtin_video_format: str = "gif"
    data_dir: str = "data/tfds"
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("batch_size", "fps", "builtin_train_clips", "builtin_test_clips", "bucket_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name}={value!r} is invalid; use a positive integer")
        object.__setattr__(self, "resolutions", tuple(self.resolutions))
        object.__setattr__(self, "frame_counts", tuple(self.frame_counts))

    @property
    def image_size(self) -> int:
        return max(self.resolutions)


@dataclasses.dataclass(frozen=True)
class OpenSoraVAEConfig:
    """The VAE stage: the video VAE, its loss and the per-frame PatchGAN used when loss.disc_weight > 0."""

    vae: VideoVAEConfig = dataclasses.field(default_factory=lambda: VideoVAEConfig.from_preset("tiny"))
    loss: VAELossConfig = VAELossConfig(kl_weight=1e-6)
    # Weight of the KL of the per-frame 2D VAE's posterior, used while the 2D VAE trains.
    spatial_kl_weight: float = 1e-6
    # False freezes the 2D VAE, as Open-Sora 1.2 does with its pretrained SDXL VAE; then set pretrained_spatial.
    train_spatial: bool = True
    # A diffusers AutoencoderKL folder loaded into spatial_vae.module before training (empty: random init).
    pretrained_spatial: str = ""
    discriminator: NLayerDiscriminatorConfig = NLayerDiscriminatorConfig(in_channels=3)
    # True: the export stores the per-channel mean and standard deviation of the held-out clips' latents as
    # the VAE's shift and scale, so the STDiT stage trains on latents of about unit variance. False keeps
    # vae.shift and vae.scale, such as Open-Sora 1.2's fixed values.
    measure_latent_stats: bool = True
    # True draws both VAEs' latents from their posteriors while training, as Open-Sora does. False decodes the
    # posterior means: a randomly initialised encoder starts with unit variance, and on the tiny preset that
    # noise kept the reconstructions at digit-shaped blobs for the first 900 steps.
    sample_posterior: bool = True
    # Extra L1 terms: the 2D VAE alone (frame -> spatial latent -> frame), and the temporal VAE's
    # reconstruction of the spatial latents (Open-Sora 1.2's first VAE stage trains on that term alone).
    spatial_rec_weight: float = 0.0
    latent_rec_weight: float = 0.0

    def __post_init__(self):
        for name in ("spatial_kl_weight", "spatial_rec_weight", "latent_rec_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"model.{name}={value!r} is invalid; use a weight >= 0")
        if not self.train_spatial and not self.pretrained_spatial:
            raise ValueError("model.train_spatial=False freezes a randomly initialised 2D VAE; set "
                             "model.pretrained_spatial to a diffusers AutoencoderKL folder or train it")
        if self.loss.perceptual_weight > 0 and self.vae.spatial.out_channels != 3:
            raise ValueError("loss.perceptual_weight > 0 needs RGB video; set perceptual_weight=0")


@dataclasses.dataclass(frozen=True)
class OpenSoraSTDiTConfig:
    """The STDiT stage: STDiT3, the frozen text encoder and VAE, and the rectified-flow objective."""

    stdit: STDiT3Config = dataclasses.field(default_factory=lambda: STDiT3Config.from_preset("tiny"))
    text_encoder: T5Config = T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                      feed_forward_proj="gated-gelu")
    # Folder with a transformers T5 encoder and tokenizer.json. Empty: frozen random T5 + caption vocabulary.
    text_encoder_path: str = ""
    text_encoder_seed: int = 0
    # Folder written by the VAE stage (config.json + model.safetensors). Empty: the pipeline's VAE stage.
    vae_path: str = ""
    velocity_convention: str = "data_minus_noise"  # Open-Sora 1.2 trains on x0 - eps
    timestep_sampling: str = "logit_normal"
    # Timestep shift: "fixed" uses timestep_shift, "resolution" Open-Sora 1.2's size-dependent shift.
    shift_mode: str = "fixed"
    timestep_shift: float = 1.0
    caption_dropout_prob: float = 0.1
    # Held-out samples drawn per held-out caption at each sample step.
    samples_per_caption: int = 1

    def __post_init__(self):
        rf._check_choice("model.velocity_convention", self.velocity_convention, rf.VELOCITY_CONVENTIONS)
        rf._check_choice("model.timestep_sampling", self.timestep_sampling, rf.TIMESTEP_SAMPLING_METHODS)
        rf._check_choice("model.shift_mode", self.shift_mode, ("fixed", "resolution"))
        if not self.timestep_shift > 0:
            raise ValueError(f"model.timestep_shift={self.timestep_shift!r} is invalid; use a positive number")
        if not 0.0 <= self.caption_dropout_prob <= 1.0:
            raise ValueError(f"model.caption_dropout_prob={self.caption_dropout_prob!r} is invalid; use [0, 1]")
        if self.samples_per_caption < 1:
            raise ValueError(f"model.samples_per_caption={self.samples_per_caption!r} is invalid; use >= 1")
        if not self.text_encoder_path and self.stdit.caption_channels != self.text_encoder.d_model:
            raise ValueError(
                f"model.stdit.caption_channels={self.stdit.caption_channels} differs from the text encoder's "
                f"d_model={self.text_encoder.d_model}; set them equal"
            )


@dataclasses.dataclass(frozen=True)
class OpenSoraStages:
    """The two stage configs of the `opensora` task. Their train.workdir is replaced by ROOT/vae and ROOT/stdit."""

    vae: Config = Config(task="opensora_vae")
    stdit: Config = Config(task="opensora_stdit")


# ----- VAE export ------------------------------------------------------------------------------------


def save_video_vae(model: VideoAutoencoder, folder: str | os.PathLike[str]) -> pathlib.Path:
    """Write config.json and model.safetensors (Open-Sora VideoAutoencoderPipeline keys) into `folder`.

    Files are written under temporary names and renamed, so a reader never sees half a file.
    """
    from conversion import opensora_io
    from jaxgen.config import config_to_dict

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / (VAE_WEIGHTS_FILE + ".tmp")
    opensora_io.save_video_vae(model, temporary)
    os.replace(temporary, folder / VAE_WEIGHTS_FILE)
    config_path = folder / VAE_CONFIG_FILE
    temporary = folder / (VAE_CONFIG_FILE + ".tmp")
    temporary.write_text(json.dumps(config_to_dict(model.config), indent=1) + "\n")
    os.replace(temporary, config_path)
    return folder


def load_video_vae(folder: str | os.PathLike[str]) -> VideoAutoencoder:
    """Load a video VAE written by `save_video_vae` (strict: a missing or extra key raises, naming it)."""
    from conversion import opensora_io
    from jaxgen.config import config_from_dict

    folder = pathlib.Path(folder)
    for name in (VAE_CONFIG_FILE, VAE_WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} not found; model.vae_path must be a folder written by the VAE stage "
                f"(ROOT/vae/{VAE_EXPORT_FOLDER}/), so train that stage first: python -m jaxgen.train --cfg opensora.py"
            )
    config = config_from_dict(json.loads((folder / VAE_CONFIG_FILE).read_text()))
    if not isinstance(config, VideoVAEConfig):
        raise ValueError(f"{folder / VAE_CONFIG_FILE} contains a {type(config).__name__}, not a VideoVAEConfig")
    return opensora_io.load_video_vae(folder / VAE_WEIGHTS_FILE, config)


# ----- data ------------------------------------------------------------------------------------------


def builtin_clip_options(data: VideoDataConfig) -> dict[str, Any]:
    """Return make_digit_clips' geometry for the built-in clips of `data`."""
    if len(data.resolutions) != 1 or len(data.frame_counts) != 1:
        raise ValueError(
            f"the built-in clips have one size; set one data.resolutions entry (got {data.resolutions}) and one "
            f"data.frame_counts entry (got {data.frame_counts}), or point data.csv at your own videos"
        )
    side = data.resolutions[0]
    return {"num_frames": data.frame_counts[0], "size": (side, side), "digit_side": data.builtin_digit_side,
            "speed": data.builtin_speed}


def _builtin_csv(data: VideoDataConfig, split: str, num_clips: int) -> pathlib.Path:
    """Write the built-in clips of `split` into data_dir once (named after their settings); return the CSV."""
    from jaxgen.data.video_caption import write_digit_clip_folder

    options = builtin_clip_options(data)
    name = (f"digit_clips_n{num_clips}_t{options['num_frames']}_s{data.resolutions[0]}_d{data.builtin_digit_side}"
            f"_v{data.builtin_speed}_{data.builtin_video_format}_seed{data.seed}")
    folder = pathlib.Path(data.data_dir) / name
    csv_path = folder / f"{split}.csv"
    if not csv_path.is_file():
        logger.info("writing %d built-in %s clips to %s", num_clips, split, folder)
        write_digit_clip_folder(folder, num_clips, split=split, video_format=data.builtin_video_format, fps=data.fps,
                                seed=data.seed, **options)
    return csv_path


def load_clips(data: VideoDataConfig, split: str):
    """Prepare and read the clips of `split` ("train" or "test") as `VideoCaptionData`; None for no test data."""
    from jaxgen.data.video_caption import load_video_caption

    if split == "train":
        csv_path = data.csv or _builtin_csv(data, "train", data.builtin_train_clips)
    elif data.test_csv:
        csv_path = data.test_csv
    elif not data.csv:
        csv_path = _builtin_csv(data, "test", data.builtin_test_clips)
    else:
        return None
    try:
        clips = load_video_caption(csv_path, data_dir=data.data_dir, resolutions=data.resolutions,
                                   frame_counts=data.frame_counts, multiple=data.bucket_multiple,
                                   max_aspect_ratio=data.max_aspect_ratio, path_column=data.path_column,
                                   caption_column=data.caption_column)
    except AssertionError as error:
        # TFDS raises AssertionError when the builder yields no example at all.
        raise ValueError(f"no video of {csv_path} could be used: every row points at a missing, unreadable or too "
                         f"short file (the warnings above name each one). TFDS said: {error}") from error
    if clips.num_skipped:
        logger.warning("%s: skipped %d of %d videos (%s); the builder logged each file", csv_path, clips.num_skipped,
                       clips.num_records, {k: v for k, v in clips.skipped.items() if v})
    return clips


def builtin_labels(data: VideoDataConfig, captions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the (digit, direction) labels that built-in captions state; -1 where a caption is not one of them."""
    from jaxgen.data.image_caption.builtin import DIGIT_NAMES
    from jaxgen.data.video_caption.builtin import DIRECTIONS, _MOTION_WORDS

    lookup = {}
    for digit, digit_name in enumerate(DIGIT_NAMES):
        for direction, name in enumerate(DIRECTIONS):
            lookup[f"the digit {digit_name} {_MOTION_WORDS[name]}"] = (digit, direction)
    labels = np.asarray([lookup.get(str(caption), (-1, -1)) for caption in captions], np.int32).reshape(-1, 2)
    return labels[:, 0], labels[:, 1]


def to_unit_range(frames: np.ndarray) -> np.ndarray:
    """Map uint8 frames to float32 in [-1, 1]."""
    return np.asarray(frames, np.float32) / 127.5 - 1.0


def to_uint8(videos: np.ndarray) -> np.ndarray:
    """Map videos in [-1, 1] to uint8, clipping values outside."""
    return np.clip(np.round((np.asarray(videos, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def check_video_geometry(vae: VideoVAEConfig, patch_size: tuple[int, int, int] | None,
                         data: VideoDataConfig) -> None:
    """Raise ValueError when a bucket's frame count or size does not fit the VAE and STDiT's patch size."""
    from jaxgen.data.video_caption.builder import BucketLayout

    layout = BucketLayout(data.resolutions, data.frame_counts, data.bucket_multiple, data.max_aspect_ratio)
    factor = vae.spatial.downsample_factor
    settings = (f"data.resolutions={data.resolutions} with data.bucket_multiple={data.bucket_multiple} "
                f"(model.vae.data and model.stdit.data in configs/opensora.py)")
    for frames, height, width in layout.buckets:
        if height % factor or width % factor:
            raise ValueError(
                f"the aspect-ratio bucket {height}x{width} made from {settings} is not divisible by the VAE's "
                f"spatial factor {factor}; use resolutions and a bucket_multiple that are multiples of {factor}"
            )
        latent_t, latent_h, latent_w = vae.latent_size(frames, height, width)
        if patch_size is None:
            continue
        pt, ph, pw = patch_size
        if latent_h % ph or latent_w % pw:
            raise ValueError(
                f"the bucket {height}x{width} made from {settings} gives latents of {latent_h}x{latent_w}, not "
                f"divisible by STDiT's patch_size {patch_size[1:]} (H, W); use sizes that are multiples of "
                f"{factor * max(ph, pw)} pixels"
            )
        if latent_t % pt:
            raise ValueError(
                f"data.frame_counts entry {frames} gives {latent_t} latent frames, not divisible by STDiT's temporal "
                f"patch {pt}; use frame counts whose latent frame count is a multiple of {pt}"
            )


# ----- VAE stage -------------------------------------------------------------------------------------


class VideoVAEWithDiscriminator(nnx.Module):
    """Container of the modules the VAE stage trains: the video VAE and, when used, a per-frame PatchGAN."""

    def __init__(self, vae: VideoAutoencoder, discriminator: NLayerDiscriminator | None, lpips=None):
        self.vae = vae
        self.discriminator = discriminator
        self.lpips = lpips


def video_vae_losses(model: VideoVAEWithDiscriminator, videos: jax.Array, key: jax.Array, step: jax.Array,
                     model_config: OpenSoraVAEConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The VAE stage objective on videos [B, T, H, W, C] in [-1, 1]; returns (loss, metrics).

    loss = rec + kl_weight * KL_temporal + spatial_kl_weight * KL_spatial (while the 2D VAE trains)
           + spatial_rec_weight * rec(2D VAE alone) + latent_rec_weight * rec(spatial latents)
           + perceptual_weight * LPIPS(frames) + f(step) * disc_weight * g_adv + disc_loss,
    with the terms of `jaxgen.vae_loss` applied to every frame. The KLs are summed over latent elements and
    averaged over the batch.
    """
    config = model_config.loss
    vae = model.vae
    spatial_key, temporal_key = jax.random.split(key)
    sample = model_config.sample_posterior
    temporal_posterior, spatial_posterior, x_z = vae.encode_for_training(
        videos, spatial_key if sample else None, train_spatial=model_config.train_spatial)
    z = temporal_posterior.sample(temporal_key) if sample else temporal_posterior.mode()
    reconstruction, x_z_reconstruction = vae.decode_for_training(z, videos.shape[1])

    def distance(a, b):
        return jnp.mean(jnp.abs(a - b)) if config.reconstruction == "l1" else jnp.mean(jnp.square(a - b))

    rec_loss = distance(reconstruction, videos)
    kl = jnp.mean(temporal_posterior.kl())
    generator_loss = rec_loss + config.kl_weight * kl
    metrics = {"rec_loss": rec_loss, "kl": kl}
    if model_config.spatial_rec_weight > 0:
        spatial_rec_loss = distance(vae.spatial_decode(x_z), videos)
        generator_loss = generator_loss + model_config.spatial_rec_weight * spatial_rec_loss
        metrics["spatial_rec_loss"] = spatial_rec_loss
    if model_config.latent_rec_weight > 0:
        latent_rec_loss = distance(x_z_reconstruction, jax.lax.stop_gradient(x_z))
        generator_loss = generator_loss + model_config.latent_rec_weight * latent_rec_loss
        metrics["latent_rec_loss"] = latent_rec_loss
    if spatial_posterior is not None and model_config.train_spatial:
        spatial_kl = jnp.mean(spatial_posterior.kl())
        generator_loss = generator_loss + model_config.spatial_kl_weight * spatial_kl
        metrics["spatial_kl"] = spatial_kl

    frames = videos.reshape((-1, *videos.shape[2:]))
    reconstructed_frames = reconstruction.reshape(frames.shape)
    if config.perceptual_weight > 0:
        perceptual_loss = jnp.mean(_frozen(model.lpips)(frames, reconstructed_frames))
        generator_loss = generator_loss + config.perceptual_weight * perceptual_loss
        metrics["perceptual_loss"] = perceptual_loss
    disc_loss = jnp.float32(0.0)
    if config.uses_discriminator:
        disc_factor = (jnp.asarray(step) >= config.disc_start).astype(jnp.float32)
        adversarial_loss = disc_factor * -jnp.mean(_frozen(model.discriminator)(reconstructed_frames))
        generator_loss = generator_loss + config.disc_weight * adversarial_loss
        logits_real = model.discriminator(jax.lax.stop_gradient(frames))
        logits_fake = model.discriminator(jax.lax.stop_gradient(reconstructed_frames))
        disc_loss = disc_factor * hinge_discriminator_loss(logits_real, logits_fake)
        metrics.update(adversarial_loss=adversarial_loss, disc_loss=disc_loss, disc_factor=disc_factor)
    loss = generator_loss + disc_loss
    return loss, {"loss": loss, "generator_loss": generator_loss, **metrics}


class _VideoTask(Task):
    """Shared data handling of the two stages: bucketed clips in, resumable bucket loader out."""

    @classmethod
    def load_data(cls, config: Config):
        if not isinstance(config.data, VideoDataConfig):
            raise ValueError(f"task {config.task!r} needs data config VideoDataConfig, got {type(config.data).__name__}")
        train = load_clips(config.data, "train")
        test = load_clips(config.data, "test")
        held_out = {"frames": np.zeros((0,), np.uint8), "caption": np.zeros((0,), object)}
        if test is None:
            logger.warning("data.test_csv is empty, so task %s has no held-out clips: it writes no samples and no "
                           "held-out metrics, and the VAE export keeps vae.shift and vae.scale unmeasured. Set "
                           "data.test_csv to a CSV of held-out videos", config.task)
        else:
            largest = max(test.buckets, key=len)
            held_out = {"frames": largest.frames, "caption": largest.caption}
        return train, held_out

    def make_loader(self, train_data) -> BucketBatchLoader:
        return BucketBatchLoader(train_data, self.config.data.batch_size, seed=self.config.data.seed)


class OpenSoraVAETask(_VideoTask):
    """Stage 1: the video VAE on clips, with reconstruction, KL and optional LPIPS and GAN terms per frame."""

    model_config_type = OpenSoraVAEConfig
    loss_needs_step = True

    def __init__(self, config: Config, held_out: dict[str, np.ndarray]):
        super().__init__(config, held_out)
        model_config: OpenSoraVAEConfig = config.model
        if isinstance(config.data, VideoDataConfig):
            check_video_geometry(model_config.vae, None, config.data)
        trainable = [nnx.Param]
        if not model_config.train_spatial:
            trainable.append(nnx.Not(nnx.PathContains("spatial_vae")))
        if model_config.loss.perceptual_weight > 0:
            trainable.append(nnx.Not(nnx.PathContains("lpips")))
        self.trainable = nnx.All(*trainable) if len(trainable) > 1 else nnx.Param
        self._reconstruct_fn = None

    @classmethod
    def load_data(cls, config: Config):
        train, held_out = super().load_data(config)
        # The VAE trains on frames only: one uint8 array per bucket, mapped to [-1, 1] in the loss.
        buckets = [{"frames": bucket.frames} for bucket in train.buckets]
        return buckets, held_out

    def build_model(self, rngs: nnx.Rngs) -> VideoVAEWithDiscriminator:
        model_config: OpenSoraVAEConfig = self.config.model
        vae = VideoAutoencoder(model_config.vae, rngs=rngs)
        if model_config.pretrained_spatial:
            from conversion.diffusers_io import load_vae

            spatial = load_vae(model_config.pretrained_spatial)
            if spatial.config != model_config.vae.spatial:
                raise ValueError(f"model.pretrained_spatial={model_config.pretrained_spatial!r} has config "
                                 f"{spatial.config}, which differs from model.vae.spatial; make them equal")
            vae.spatial_vae.module = spatial
        discriminator = None
        if model_config.loss.uses_discriminator:
            discriminator = NLayerDiscriminator(model_config.discriminator, rngs=rngs)
        lpips = None
        if model_config.loss.perceptual_weight > 0:
            from conversion.lpips_io import load_lpips

            lpips = load_lpips(model_config.loss.lpips_vgg16_weights, model_config.loss.lpips_linear_weights)
        return VideoVAEWithDiscriminator(vae, discriminator, lpips)

    def loss_fn(self, model, batch, key):
        videos = batch["frames"].astype(jnp.float32) / 127.5 - 1.0
        return video_vae_losses(model, videos, key, batch["step"], self.config.model)

    def _reconstruct(self, vae: VideoAutoencoder) -> tuple[np.ndarray, np.ndarray]:
        """Return (inputs, reconstructions from posterior means) of the held-out clips, both in [-1, 1]."""
        inputs = to_unit_range(self.held_out["frames"])
        if not len(inputs):
            return inputs, inputs
        if self._reconstruct_fn is None:
            def reconstruct(graphdef, state, x):
                model = nnx.merge(graphdef, state)
                return model.decode(model.encode(x), x.shape[1])

            self._reconstruct_fn = jax.jit(reconstruct, static_argnums=0)
        graphdef, state = nnx.split(vae)
        outputs = [np.asarray(self._reconstruct_fn(graphdef, state, jnp.asarray(inputs[i:i + ENCODE_CHUNK])))
                   for i in range(0, len(inputs), ENCODE_CHUNK)]
        return inputs, np.concatenate(outputs)

    def evaluate(self, model):
        inputs, outputs = self._reconstruct(model.vae)
        if not len(inputs):
            return {}
        mse = float(np.mean(np.square(outputs.astype(np.float64) - inputs)))
        return {"held_out_l1": float(np.mean(np.abs(outputs - inputs))), "held_out_mse": mse,
                "held_out_psnr_db": 10.0 * math.log10(4.0 / max(mse, 1e-12))}

    def write_samples(self, graphdef, rest, params, step, workdir):
        model = nnx.merge(graphdef, params, rest)
        inputs, outputs = self._reconstruct(model.vae)
        if not len(inputs):
            return None
        count = min(8, len(inputs))
        # Inputs on the top row, reconstructions below.
        grid = np.concatenate([to_uint8(inputs[:count]), to_uint8(outputs[:count])])
        return write_video_grid(grid, pathlib.Path(workdir) / "samples" / f"step_{step:06d}", ncols=count,
                                fps=self.config.data.fps)

    def export(self, graphdef, rest, params, step, workdir) -> pathlib.Path:
        model = nnx.merge(graphdef, params, rest)
        vae = model.vae
        if self.config.model.measure_latent_stats and len(self.held_out["frames"]):
            vae = with_latent_stats(vae, self.held_out["frames"])
        return save_video_vae(vae, pathlib.Path(workdir) / VAE_EXPORT_FOLDER)


def with_latent_stats(vae: VideoAutoencoder, frames: np.ndarray) -> VideoAutoencoder:
    """Return a copy of `vae` whose shift and scale are the per-channel mean and std of the latents of `frames`."""
    plain = dataclasses.replace(vae.config, shift=0.0, scale=1.0)
    copy = nnx.merge(*nnx.split(vae))
    copy.config = plain
    latents = _encode_videos(copy, frames)
    channels = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
    mean = tuple(float(v) for v in channels.mean(axis=0))
    std = tuple(float(max(v, 1e-6)) for v in channels.std(axis=0))
    copy.config = dataclasses.replace(plain, shift=mean, scale=std)
    return copy


def write_video_grid(videos: np.ndarray, stem: pathlib.Path, *, ncols: int, fps: int) -> pathlib.Path:
    """Tile uint8 videos [N, T, H, W, 3] into one video and write it as STEM.gif and STEM.mp4; return the GIF."""
    from jaxgen import video_io

    n, t, h, w, c = videos.shape
    rows = -(-n // ncols)
    canvas = np.zeros((rows * ncols, t, h, w, c), np.uint8)
    canvas[:n] = videos
    tiled = canvas.reshape(rows, ncols, t, h, w, c).transpose(2, 0, 3, 1, 4, 5).reshape(t, rows * h, ncols * w, c)
    stem.parent.mkdir(parents=True, exist_ok=True)
    gif = stem.with_suffix(".gif")
    video_io.write_video(gif, tiled, fps=fps)
    try:
        video_io.write_video(stem.with_suffix(".mp4"), tiled, fps=fps)
    except (ValueError, OSError, RuntimeError) as error:  # MP4 needs even sizes and an encoder; the GIF does not
        logger.warning("could not write %s: %s", stem.with_suffix(".mp4"), error)
    return gif


# ----- STDiT stage -----------------------------------------------------------------------------------


class TextConditioner:
    """The frozen tokenizer and T5 encoder of the STDiT stage: captions -> (features [N, L, E], mask [N, L])."""

    def __init__(self, tokenizer, encoder: T5EncoderModel):
        self.tokenizer = tokenizer
        self.encoder = encoder
        graphdef, state = nnx.split(encoder)
        self._encode = jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask).last_hidden_state)
        self._state = state

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def __call__(self, captions) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self.tokenizer.encode(list(captions))
        features = [np.asarray(self._encode(self._state, jnp.asarray(ids[i:i + 256]), jnp.asarray(mask[i:i + 256])))
                    for i in range(0, len(ids), 256)]
        return np.concatenate(features).astype(np.float32), mask

    @classmethod
    def for_run(cls, config: Config, captions=()) -> TextConditioner:
        """Load the run's text encoder, building the caption tokenizer and random T5 on first use (see module doc)."""
        from conversion.t5_io import load_t5_encoder, save_t5_encoder
        from jaxgen.text_tokenizer import CaptionTokenizer, build_word_tokenizer

        model_config: OpenSoraSTDiTConfig = config.model
        max_length = model_config.stdit.model_max_length
        if model_config.text_encoder_path:
            folder = pathlib.Path(model_config.text_encoder_path)
            tokenizer = CaptionTokenizer.from_file(folder, max_length=max_length)
            encoder = load_t5_encoder(folder)
            if encoder.config.d_model != model_config.stdit.caption_channels:
                raise ValueError(f"the T5 in {folder} has d_model={encoder.config.d_model}, but "
                                 f"model.stdit.caption_channels={model_config.stdit.caption_channels}; set them equal")
            return cls(tokenizer, encoder)
        workdir = pathlib.Path(config.train.workdir)
        tokenizer_folder, encoder_folder = workdir / TOKENIZER_FOLDER, workdir / TEXT_ENCODER_FOLDER
        if not (tokenizer_folder / "tokenizer.json").is_file():
            if not len(captions):
                raise FileNotFoundError(f"{tokenizer_folder} has no tokenizer.json; train the run first")
            logger.info("no pretrained T5 is configured: building a word-level tokenizer from %d captions and a "
                        "T5 encoder with frozen random weights (seed %d) in %s", len(captions),
                        model_config.text_encoder_seed, workdir)
            build_word_tokenizer(captions, tokenizer_folder)
        tokenizer = CaptionTokenizer.from_file(tokenizer_folder, max_length=max_length)
        if (encoder_folder / "config.json").is_file():
            encoder = load_t5_encoder(encoder_folder)
        else:
            text_config = dataclasses.replace(model_config.text_encoder, vocab_size=tokenizer.vocab_size)
            encoder = T5EncoderModel(text_config, rngs=nnx.Rngs(model_config.text_encoder_seed))
            save_t5_encoder(encoder, encoder_folder)
        if encoder.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the text encoder in {encoder_folder} has {encoder.config.vocab_size} token embeddings "
                             f"but the tokenizer has {tokenizer.vocab_size}; delete both folders to rebuild them")
        return cls(tokenizer, encoder)


@functools.partial(jax.jit, static_argnums=0)
def _encode_chunk(graphdef: nnx.GraphDef, state: nnx.State, videos: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).encode(videos)


def _encode_videos(vae: VideoAutoencoder, frames: np.ndarray) -> np.ndarray:
    """Return the normalized latents (posterior means) of uint8 clips [N, T, H, W, 3].

    The jitted encoder is shared by every call with the same model structure, so the exports after each
    checkpoint compile it once.
    """
    graphdef, state = nnx.split(vae)
    return np.concatenate([
        np.asarray(_encode_chunk(graphdef, state, jnp.asarray(to_unit_range(frames[i:i + ENCODE_CHUNK]))))
        for i in range(0, len(frames), ENCODE_CHUNK)
    ])


def _vae_path(config: Config) -> pathlib.Path:
    if not config.model.vae_path:
        raise ValueError("model.vae_path is empty; point it at a folder written by the VAE stage (ROOT/vae/vae), or "
                         "train with --cfg opensora.py, which runs that stage first")
    return pathlib.Path(config.model.vae_path)


class OpenSoraSTDiTTask(_VideoTask):
    """Stage 2: STDiT3 trained with rectified flow on frozen-VAE latents and frozen-T5 caption features."""

    model_config_type = OpenSoraSTDiTConfig

    def __init__(self, config: Config, held_out: dict[str, np.ndarray]):
        super().__init__(config, held_out)
        self._vae = None
        self._text = None
        self._sample_fn = None

    @classmethod
    def load_data(cls, config: Config):
        clips, held_out = super().load_data(config)
        vae = load_video_vae(_vae_path(config))
        check_video_geometry(vae.config, config.model.stdit.patch_size, config.data)
        all_captions = [*(c for bucket in clips.buckets for c in bucket.caption), *held_out["caption"]]
        text = TextConditioner.for_run(config, sorted(set(map(str, all_captions))))
        buckets = []
        for bucket in clips.buckets:
            logger.info("encoding %d clips of %s frames x %sx%s pixels with the frozen VAE and T5", len(bucket),
                        *bucket.shape)
            features, mask = text(bucket.caption)
            latents = _encode_videos(vae, bucket.frames)
            _, height, width = bucket.shape
            buckets.append({"latent": latents, "y": features, "mask": mask,
                            "height": np.full(len(bucket), height, np.float32),
                            "width": np.full(len(bucket), width, np.float32),
                            "num_frames": np.full(len(bucket), bucket.shape[0], np.int32)})
        return buckets, held_out

    def build_model(self, rngs: nnx.Rngs) -> STDiT3:
        return STDiT3(self.config.model.stdit, rngs=rngs)

    def timestep_shift(self, height, width, num_frames) -> jax.Array | float:
        model_config: OpenSoraSTDiTConfig = self.config.model
        if model_config.shift_mode == "fixed":
            return model_config.timestep_shift
        return rf.resolution_shift(height, width, num_frames)

    def loss_fn(self, model: STDiT3, batch, key):
        model_config: OpenSoraSTDiTConfig = self.config.model
        x0 = batch["latent"]
        b = x0.shape[0]
        t_key, noise_key, drop_key = jax.random.split(key, 3)
        shift = self.timestep_shift(batch["height"], batch["width"], batch["num_frames"])
        t = rf.rf_sample_timesteps(t_key, b, method=model_config.timestep_sampling, shift=shift)
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        x_t = rf.rf_add_noise(x0, noise, t)
        drop = jax.random.bernoulli(drop_key, model_config.caption_dropout_prob, (b,))
        output = model(x_t, t * 1000.0, batch["y"][:, None], batch["mask"], fps=self.config.data.fps,
                       height=batch["height"], width=batch["width"], force_drop_ids=drop)
        velocity = output[..., : x0.shape[-1]]  # Open-Sora's learned-sigma channels get no loss
        loss = rf.rf_loss(velocity, x0, noise, velocity_convention=model_config.velocity_convention).mean()
        return loss, {"loss": loss}

    # ----- sampling ----------------------------------------------------------------------------------

    def vae(self) -> VideoAutoencoder:
        if self._vae is None:
            self._vae = load_video_vae(_vae_path(self.config))
        return self._vae

    def text(self) -> TextConditioner:
        if self._text is None:
            self._text = TextConditioner.for_run(self.config)
        return self._text

    def latent_shape(self) -> tuple[int, int, int, int]:
        """Return (T, H, W, C) of the latents of the first bucket's video size."""
        data: VideoDataConfig = self.config.data
        side = max(data.resolutions)
        latent = self.vae().config.latent_size(data.frame_counts[0], side, side)
        return (*latent, self.config.model.stdit.in_channels)

    def sample_videos(self, params_model: STDiT3, captions, key: jax.Array, *, num_steps: int,
                      guidance_scale: float) -> np.ndarray:
        """Draw one video per caption: Euler sampling with classifier-free guidance, then the VAE decode.

        Returns uint8 [N, T, H, W, 3].
        """
        features, mask = self.text()(captions)
        data: VideoDataConfig = self.config.data
        side = max(data.resolutions)
        num_frames = data.frame_counts[0]
        latent_shape = self.latent_shape()
        noise = jax.random.normal(key, (len(captions), *latent_shape), jnp.float32)
        if self._sample_fn is None or self._sample_fn[0] != num_steps:
            self._sample_fn = (num_steps, make_video_sample_fn(self, num_steps))
        graphdef, state = nnx.split(params_model)
        vae_graphdef, vae_state = nnx.split(self.vae())
        videos = self._sample_fn[1](graphdef, state, vae_graphdef, vae_state, noise, jnp.asarray(features),
                                    jnp.asarray(mask), jnp.float32(guidance_scale), num_frames, side)
        return to_uint8(np.asarray(videos))

    def held_out_captions(self) -> list[str]:
        captions = [str(c) for c in self.held_out["caption"]]
        return [c for c in captions for _ in range(self.config.model.samples_per_caption)]

    def write_samples(self, graphdef, rest, params, step, workdir):
        captions = self.held_out_captions()
        if not captions:
            return None
        s: SampleConfig = self.config.sample
        model = nnx.merge(graphdef, params, rest)
        videos = self.sample_videos(model, captions, jax.random.PRNGKey(self.config.train.seed),
                                    num_steps=s.num_steps, guidance_scale=s.guidance_scale)
        digit, direction = builtin_labels(self.config.data, np.asarray(captions, object))
        stem = pathlib.Path(workdir) / "samples" / f"step_{step:06d}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        temporary = stem.with_suffix(".npz.tmp")
        with temporary.open("wb") as file:
            np.savez(file, frames=videos, caption=np.asarray(captions), digit=digit, direction=direction)
        os.replace(temporary, stem.with_suffix(".npz"))
        return write_video_grid(videos, stem, ncols=min(8, len(videos)), fps=self.config.data.fps)


def make_video_sample_fn(task: OpenSoraSTDiTTask, num_steps: int):
    """Return a jitted fn(graphdef, state, vae_graphdef, vae_state, noise, y, mask, scale, num_frames, side) -> videos.

    Sampling and decoding are one XLA program: the Euler loop is a lax.scan over `num_steps` steps, each
    evaluating the conditional and null captions in one batch of 2N.
    """
    model_config: OpenSoraSTDiTConfig = task.config.model
    fps = task.config.data.fps

    def run(graphdef, state, vae_graphdef, vae_state, noise, y, mask, scale, num_frames, side):
        model = nnx.merge(graphdef, state)
        vae = nnx.merge(vae_graphdef, vae_state)
        n = noise.shape[0]
        null = model.null_caption(n)[:, 0]
        both_y = jnp.concatenate([y, null])[:, None]
        both_mask = jnp.concatenate([mask, mask])

        def velocity_fn(x, t, _):
            output = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both_y, both_mask, fps=fps,
                           height=side, width=side)
            velocity = output[..., : x.shape[-1]]
            conditional, unconditional = velocity[:n], velocity[n:]
            return unconditional + scale * (conditional - unconditional)

        shift = task.timestep_shift(jnp.float32(side), jnp.float32(side), num_frames)
        latents = rf.rf_euler_sample(velocity_fn, noise, None, None, num_steps=num_steps, shift=shift,
                                     velocity_convention=model_config.velocity_convention)
        return vae.decode(latents, num_frames)

    return jax.jit(run, static_argnums=(0, 2, 8, 9))


# ----- the two-stage pipeline -------------------------------------------------------------------------


class OpenSoraTask(Task):
    """The `opensora` task: no model of its own; `stage_configs` lists the two stages the trainer runs."""

    model_config_type = OpenSoraStages

    @staticmethod
    def stage_configs(config: Config) -> list[Config]:
        """Return the stage configs with their run folders under config.train.workdir, in training order."""
        if not isinstance(config.model, OpenSoraStages):
            raise ValueError(f"task 'opensora' needs model config OpenSoraStages, got {type(config.model).__name__}")
        root = pathlib.Path(config.train.workdir)
        vae_stage = dataclasses.replace(config.model.vae,
                                        train=dataclasses.replace(config.model.vae.train, workdir=str(root / "vae")))
        stdit = config.model.stdit
        model = stdit.model
        if not model.vae_path:
            model = dataclasses.replace(model, vae_path=str(root / "vae" / VAE_EXPORT_FOLDER))
        stdit_stage = dataclasses.replace(stdit, model=model,
                                          train=dataclasses.replace(stdit.train, workdir=str(root / "stdit")))
        for name, stage in (("vae", vae_stage), ("stdit", stdit_stage)):
            expected = {"vae": "opensora_vae", "stdit": "opensora_stdit"}[name]
            if stage.task != expected:
                raise ValueError(f"model.{name}.task={stage.task!r} is invalid; the {name} stage runs {expected!r}")
            if getattr(config.model, name).train.workdir != TrainConfig().workdir:
                logger.warning("model.%s.train.workdir is ignored: the stage runs in %s under train.workdir", name,
                               stage.train.workdir)
        # Check the STDiT stage's shapes against the VAE this pipeline trains before any stage starts.
        if not stdit.model.vae_path and isinstance(stdit_stage.data, VideoDataConfig):
            check_video_geometry(vae_stage.model.vae, model.stdit.patch_size, stdit_stage.data)
        return [vae_stage, stdit_stage]

    @classmethod
    def load_data(cls, config):
        raise ValueError("task 'opensora' has no data of its own; run it through jaxgen.train, which trains its stages")
