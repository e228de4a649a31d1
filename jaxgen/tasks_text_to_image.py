"""Text-to-image fine-tuning of a Stable Diffusion or SDXL U-Net with LoRA adapters (task `text_to_image_lora`).

The base model is a local diffusers pipeline folder (`model.pretrained`). Without one, a tiny randomly
initialised pipeline is written on first use, because no pretrained weights can be downloaded offline. The
VAE, the text encoder(s) and the U-Net's base weights stay frozen. Only the `LoRAWeight` adapters that
`jaxgen.lora.apply_lora` adds to the U-Net are differentiated, optimised and checkpointed.

Each train step, inside one jitted program:

1. images uint8 [B, H, W, 3] are mapped to [-1, 1] and encoded into latents z_0 [B, h, w, C], a sample of
   the VAE posterior drawn with the step's key;
2. each caption, tokenized when the loader is built, is replaced by the empty caption with probability
   `diffusion.caption_dropout_prob`, so the model also learns the unconditional output that classifier-free
   guidance needs;
3. the pipeline's own prompt encoding turns the token ids into the U-Net's context (SDXL adds the pooled
   embedding and time_ids = original size, crop top-left and bucket size);
4. t ~ U{0, ..., T - 1}, eps ~ N(0, I), z_t = q_sample(z_0, t, eps);
5. the loss is the MSE of the U-Net output against the target of the scheduler config's prediction_type.

After each checkpoint the adapters are written as a diffusers/peft LoRA file, `lora/pytorch_lora_weights.safetensors`
in the run folder, which `diffusers.StableDiffusionPipeline.load_lora_weights(folder)` and
`conversion.lora_io.load_lora_weights` read.

Axis letters: B batch, H W image height and width, h w latent height and width (H / 8, W / 8), C latent
channels, L tokens.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen import images as image_io
from jaxgen.config import (
    Config,
    ImageCaptionDataConfig,
    LoRAModelConfig,
    PromptSampleConfig,
    TextDiffusionConfig,
)
from jaxgen.data.bucket_loader import BucketBatchLoader
from jaxgen.data.image_caption import ImageCaptionData, load_image_caption, write_digit_caption_folder
from jaxgen.diffusion import forward, guidance
from jaxgen.diffusion.scheduler_config import from_scheduler_config
from jaxgen.lora import LoRAWeight, apply_lora
from jaxgen.pipelines.stable_diffusion import (
    SD_COMPONENTS,
    SDXL_COMPONENTS,
    StableDiffusion,
    StableDiffusionXL,
    check_pipeline_folder,
)
from jaxgen.tasks import Task

logger = logging.getLogger(__name__)

# Subfolder of data.data_dir that receives the built-in digit caption folder.
DIGIT_CAPTION_FOLDER = "digit_captions"
# Subfolder of the run folder that receives the LoRA file.
LORA_FOLDER = "lora"
LORA_FILE = "pytorch_lora_weights.safetensors"
TOKENIZERS = ("tokenizer", "tokenizer_2")
# Batch keys of the token ids of each tokenizer, in TOKENIZERS order.
INPUT_ID_KEYS = ("input_ids", "input_ids_2")


def resolve_base_folder(model: LoRAModelConfig) -> pathlib.Path:
    """Return the base pipeline folder, writing the tiny random one into model.random_base_dir if needed.

    Raises:
        PipelineFolderError: model.pretrained is not a complete pipeline folder.
        ValueError: the folder is an SDXL pipeline and model.xl is False, or the other way round.
    """
    components = SDXL_COMPONENTS if model.xl else SD_COMPONENTS
    if model.pretrained:
        folder = pathlib.Path(model.pretrained)
    else:
        folder = pathlib.Path(model.random_base_dir)
        logger.warning(
            "the base pipeline is randomly initialised (%s in %s) because no pretrained weights are available "
            "offline; fine-tune a real checkpoint with --set model.pretrained=PATH, a diffusers pipeline folder "
            "such as one written by DiffusionPipeline.save_pretrained",
            "tiny SDXL" if model.xl else "tiny Stable Diffusion", folder,
        )
        if not (folder / "model_index.json").is_file():
            _write_random_base(folder, xl=model.xl)
    index = check_pipeline_folder(folder, components)
    is_xl = index.get("text_encoder_2") not in (None, [None, None])
    if is_xl != model.xl:
        kind = "an SDXL" if is_xl else "a Stable Diffusion 1.x/2.x"
        raise ValueError(f"{folder} is {kind} pipeline ({index.get('_class_name')}); set model.xl={is_xl}")
    return folder


def _write_random_base(folder: pathlib.Path, *, xl: bool) -> None:
    """Write the tiny random pipeline into a scratch folder and rename it, so a killed run leaves no partial base."""
    try:
        from jaxgen.pipelines.tiny import write_tiny_pipeline
    except ImportError as error:
        raise ValueError(f"writing the random base pipeline needs torch, diffusers and transformers ({error}); "
                         "install them or set model.pretrained=PATH") from error
    scratch = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    write_tiny_pipeline(scratch, xl=xl)
    try:
        scratch.rename(folder)
    except OSError:
        if not (folder / "model_index.json").is_file():
            raise
        logger.info("another process wrote %s first; using that one", folder)
    logger.info("wrote the random base pipeline to %s", folder)


def digit_caption_folder(data_dir: str | os.PathLike[str]) -> pathlib.Path:
    """Return the built-in digit caption folder in `data_dir`, writing it on first use."""
    folder = pathlib.Path(data_dir) / DIGIT_CAPTION_FOLDER
    if not (folder / "metadata.jsonl").is_file():
        write_digit_caption_folder(folder)
        logger.info("wrote the built-in digit caption folder to %s", folder)
    return folder


class TextToImageModel(nnx.Module):
    """The pipeline components a text-to-image train step runs, as one module: U-Net, VAE and text encoders."""

    def __init__(self, unet: nnx.Module, vae: nnx.Module, text_encoders: tuple[nnx.Module, ...]):
        self.unet = unet
        self.vae = vae
        self.text_encoders = nnx.List(text_encoders)


class TextToImageLoRATask(Task):
    """LoRA fine-tuning of a Stable Diffusion or SDXL U-Net on an image-caption folder."""

    model_config_type = LoRAModelConfig
    trainable = LoRAWeight

    def __init__(self, config: Config, held_out: dict[str, np.ndarray]):
        super().__init__(config, held_out)
        _check_section(config, "data", ImageCaptionDataConfig)
        _check_section(config, "diffusion", TextDiffusionConfig)
        _check_section(config, "sample", PromptSampleConfig)
        self.folder = resolve_base_folder(config.model)
        self.pipeline_type = StableDiffusionXL if config.model.xl else StableDiffusion

        from conversion.transformers_io import load_clip_tokenizer

        names = TOKENIZERS if config.model.xl else TOKENIZERS[:1]
        self.tokenizers = tuple(load_clip_tokenizer(self.folder / name) for name in names)
        self.empty_ids = tuple(ids[0] for ids in self.tokenize([""]))
        scheduler_config = json.loads((self.folder / "scheduler" / "scheduler_config.json").read_text())
        setup = from_scheduler_config(scheduler_config)
        self.schedule = setup.schedule
        self.prediction_type = setup.prediction_type
        self.pipeline = None  # loaded with the weights by build_model
        self.model = None

    # ----- data ------------------------------------------------------------------------------

    @classmethod
    def load_data(cls, config: Config) -> tuple[ImageCaptionData, dict[str, np.ndarray]]:
        """Read the image-caption folder in buckets, with empty held-out data (samples use config prompts)."""
        _check_section(config, "data", ImageCaptionDataConfig)
        data_config = config.data
        if data_config.name != "image_caption":
            raise ValueError(f"unknown data set {data_config.name!r} for task {config.task!r}; the available one "
                             "is 'image_caption'")
        if data_config.folder:
            folder = pathlib.Path(data_config.folder)
        else:
            folder = digit_caption_folder(data_config.data_dir)
        data = load_image_caption(folder, data_dir=data_config.data_dir, resolution=data_config.image_size,
                                  multiple=data_config.bucket_multiple, max_aspect_ratio=data_config.max_aspect_ratio,
                                  caption_column=data_config.caption_column)
        sizes = ", ".join(f"{h}x{w}: {len(bucket)}" for bucket in data.buckets for h, w in [bucket.size])
        logger.info("%d images of %s in %d buckets (%s)", len(data), folder, len(data.buckets), sizes)
        return data, {}

    def tokenize(self, captions: list[str]) -> tuple[np.ndarray, ...]:
        """Return int32 token ids [B, L] for each tokenizer, as the pipeline tokenizes prompts."""
        from conversion.transformers_io import tokenize

        return tuple(tokenize(tokenizer, captions, tokenizer.model_max_length)["input_ids"]
                     for tokenizer in self.tokenizers)

    def make_loader(self, train_data: ImageCaptionData) -> BucketBatchLoader:
        """Tokenize every caption once and return a resumable loader of single-bucket batches."""
        buckets = []
        for bucket in train_data.buckets:
            arrays = {"image": bucket.image}
            arrays.update(zip(INPUT_ID_KEYS, self.tokenize([str(c) for c in bucket.caption])))
            if self.config.model.xl:
                arrays["original_size"] = bucket.original_size
                arrays["crop_top_left"] = bucket.crop_top_left
            buckets.append(arrays)
        return BucketBatchLoader(buckets, self.config.data.batch_size, seed=self.config.data.seed)

    # ----- model and loss ----------------------------------------------------------------------

    def build_model(self, rngs: nnx.Rngs) -> TextToImageModel:
        """Load the base pipeline and add LoRA adapters to its U-Net."""
        if self.model is not None:
            raise RuntimeError("build_model can run once per task, because the task keeps the model it built")
        model_config = self.config.model
        self.pipeline = self.pipeline_type.from_pretrained(self.folder)
        self._check_bucket_multiple()
        paths = apply_lora(self.pipeline.unet, rank=model_config.rank, alpha=model_config.alpha,
                           target_modules=model_config.target_modules, rngs=rngs)
        logger.info("base pipeline %s: LoRA adapters (rank %d, alpha %g) on %d U-Net layers", self.folder,
                    model_config.rank, model_config.alpha, len(paths))
        self.model = TextToImageModel(self.pipeline.unet, self.pipeline.vae, self.pipeline.text_encoders)
        return self.model

    def _check_bucket_multiple(self) -> None:
        unet = self.pipeline.unet
        multiple = self.pipeline.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        if self.config.data.bucket_multiple % multiple:
            raise ValueError(
                f"data.bucket_multiple={self.config.data.bucket_multiple} does not fit this pipeline, whose VAE "
                f"downsamples by {self.pipeline.vae_scale_factor} and whose U-Net halves the latents "
                f"{len(unet.config.block_out_channels) - 1} times; use a multiple of {multiple}"
            )

    def loss_fn(self, model: TextToImageModel, batch, key):
        latent_key, drop_key, t_key, noise_key = jax.random.split(key, 4)
        images = batch["image"].astype(jnp.float32) / 127.5 - 1.0
        latents = jax.lax.stop_gradient(model.vae.latents_from_images(images, latent_key))

        # One draw per example, shared by both tokenizers, so SDXL drops both captions of an example together.
        drop_prob = self.config.diffusion.caption_dropout_prob
        ids = tuple(guidance.drop_condition(drop_key, batch[name], empty, drop_prob)
                    for name, empty in zip(INPUT_ID_KEYS, self.empty_ids))
        # The pipeline's prompt encoding, so that training conditions the U-Net as generation does.
        condition = jax.lax.stop_gradient(self.pipeline._encode(tuple(model.text_encoders), ids, zero=False))
        context = condition.pop("context")
        if self.config.model.xl:
            condition["time_ids"] = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], images.shape[1:3])

        t = jax.random.randint(t_key, (latents.shape[0],), 0, self.schedule.num_train_timesteps)
        noise = jax.random.normal(noise_key, latents.shape, latents.dtype)
        x_t = forward.q_sample(self.schedule, latents, t, noise)
        output = model.unet(x_t, t, context, **condition)
        per_example = forward.diffusion_loss(self.schedule, output, latents, noise, t,
                                             prediction_type=self.prediction_type,
                                             min_snr_gamma=self.config.diffusion.min_snr_gamma)
        loss = per_example.mean()
        return loss, {"loss": loss}

    # ----- outputs -----------------------------------------------------------------------------

    def _set_adapters(self, params: nnx.State) -> None:
        # Copies, because the trainer donates the state buffers to the next train step.
        nnx.update(self.model, jax.tree.map(jnp.copy, params))

    def write_samples(self, graphdef, rest, params, step, workdir):
        sample_config = self.config.sample
        if not sample_config.prompts:
            return None
        self._set_adapters(params)
        size = self.config.data.image_size
        images = self.pipeline(list(sample_config.prompts), num_inference_steps=sample_config.num_steps,
                               guidance_scale=sample_config.guidance_scale, height=size, width=size,
                               seed=sample_config.seed)
        path = workdir / "samples" / f"step_{step:06d}.png"
        # Small images are enlarged to about 256 pixels so that the grid can be inspected.
        return image_io.save_grid(images * 2.0 - 1.0, path, ncols=len(sample_config.prompts),
                                  upscale=max(1, 256 // size))

    def export(self, graphdef, rest, params, step, workdir):
        """Write the adapters as lora/pytorch_lora_weights.safetensors in the run folder, replacing the last one."""
        from conversion.lora_io import save_lora_weights

        self._set_adapters(params)
        target = workdir / LORA_FOLDER / LORA_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the folder and renamed, so the folder never contains a partial or second .safetensors
        # file. diffusers 0.42.1 picks a folder's weights file by name and warns when it finds several.
        scratch = save_lora_weights(workdir / f".{LORA_FILE}.partial.safetensors", {"unet": self.pipeline.unet})
        scratch.replace(target)
        return target


def sdxl_time_ids(original_size: jax.Array, crop_top_left: jax.Array, target_size: tuple[int, int]) -> jax.Array:
    """Return SDXL's time_ids float32 [B, 6]: original (height, width), crop (top, left), target (height, width).

    original_size and crop_top_left are int [B, 2], and target_size is the bucket's (H, W).
    """
    target = jnp.broadcast_to(jnp.asarray(target_size, jnp.int32), original_size.shape)
    return jnp.concatenate([original_size, crop_top_left, target], axis=-1).astype(jnp.float32)


def _check_section(config: Config, name: str, expected: type) -> None:
    value = getattr(config, name)
    if not isinstance(value, expected):
        raise ValueError(f"task {config.task!r} needs config.{name} of type {expected.__name__}, got "
                         f"{type(value).__name__}; see configs/sd_lora.py")


__all__ = ["TextToImageLoRATask", "TextToImageModel", "digit_caption_folder", "resolve_base_folder", "sdxl_time_ids"]
