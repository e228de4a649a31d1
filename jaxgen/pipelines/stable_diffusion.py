"""Text-to-image and image-to-image with Stable Diffusion 1.x/2.x and SDXL from a local diffusers folder.

A pipeline folder is what `DiffusionPipeline.save_pretrained` writes: model_index.json and one subfolder
per component (unet/, vae/, text_encoder/, tokenizer/, scheduler/, and for SDXL text_encoder_2/ and
tokenizer_2/). `StableDiffusion.from_pretrained(path)` and `StableDiffusionXL.from_pretrained(path)` load
it without the network. Generation is one jitted program per shape and step count: prompt encoding, the
whole denoising loop with classifier-free guidance, and VAE decoding.

Axis letters: B prompts, L tokens, E context features, h and w latent height and width (image size / 8),
C latent channels, H and W image height and width.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen.diffusion import samplers


logger = logging.getLogger(__name__)

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = (*SD_COMPONENTS, "text_encoder_2", "tokenizer_2")


class PipelineFolderError(FileNotFoundError):
    """A pipeline folder that is missing, or lacks a component the pipeline needs."""


def check_pipeline_folder(path: str | pathlib.Path, components: Sequence[str]) -> dict[str, Any]:
    """Return model_index.json of a diffusers pipeline folder after checking that every component is present."""
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise PipelineFolderError(
            f"pipeline folder {folder} does not exist; pass the folder that contains model_index.json, e.g. one "
            "written by diffusers' DiffusionPipeline.save_pretrained"
        )
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise PipelineFolderError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder")
    index = json.loads(index_path.read_text())
    missing = [name for name in components if not (folder / name).is_dir() or index.get(name) in (None, [None, None])]
    if missing:
        raise PipelineFolderError(
            f"pipeline folder {folder} lacks the component(s) {', '.join(missing)}; a "
            f"{index.get('_class_name', 'Stable Diffusion')} folder needs {', '.join(components)}. Copy the "
            "missing subfolders from the original checkpoint"
        )
    return index


def _to_unit_images(images: jax.Array) -> jax.Array:
    """Map decoded images about [-1, 1] to [0, 1], as diffusers' image processor does."""
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


@dataclasses.dataclass
class _Components:
    unet: nnx.Module
    vae: nnx.Module
    text_encoders: tuple[nnx.Module, ...]
    tokenizers: tuple[Any, ...]
    scheduler_config: dict[str, Any]


class _Pipeline:
    """The generation loop that Stable Diffusion 1.x/2.x and SDXL share; subclasses encode the prompts."""

    components: tuple[str, ...] = SD_COMPONENTS

    def __init__(self, parts: _Components, *, folder: pathlib.Path | None = None, index: dict | None = None):
        self.unet = parts.unet
        self.vae = parts.vae
        self.text_encoders = parts.text_encoders
        self.tokenizers = parts.tokenizers
        self.scheduler_config = parts.scheduler_config
        self.folder = folder
        self.index = index or {}
        self.vae_scale_factor = 2 ** self.vae.config.num_downsamplers
        self._compiled: dict[tuple, Any] = {}

    # ----- loading -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path, *, dtype: jnp.dtype | None = None):
        """Load every component of a diffusers pipeline folder from disk.

        Raises:
            PipelineFolderError: the folder, model_index.json or a component is missing.
            conversion.CheckpointMismatchError: a component's weights do not match its config.
        """
        from conversion import diffusers_io, transformers_io

        folder = pathlib.Path(path)
        index = check_pipeline_folder(folder, cls.components)
        encoders = [transformers_io.load_clip_text(folder / "text_encoder", dtype=dtype)]
        tokenizers = [transformers_io.load_clip_tokenizer(folder / "tokenizer")]
        if "text_encoder_2" in cls.components:
            encoders.append(transformers_io.load_clip_text(folder / "text_encoder_2", dtype=dtype))
            tokenizers.append(transformers_io.load_clip_tokenizer(folder / "tokenizer_2"))
        scheduler_path = folder / "scheduler" / "scheduler_config.json"
        if not scheduler_path.is_file():
            raise PipelineFolderError(f"{scheduler_path} not found; copy the scheduler/ subfolder of the checkpoint")
        parts = _Components(
            unet=diffusers_io.load_unet(folder / "unet", dtype=dtype),
            vae=diffusers_io.load_vae(folder / "vae", dtype=dtype),
            text_encoders=tuple(encoders),
            tokenizers=tuple(tokenizers),
            scheduler_config=json.loads(scheduler_path.read_text()),
        )
        return cls(parts, folder=folder, index=index)

    # ----- LoRA ----------------------------------------------------------------------------------

    def lora_components(self) -> dict[str, nnx.Module]:
        """Return the models a LoRA file may adapt, under the component names of diffusers' LoRA files."""
        names = ("text_encoder", "text_encoder_2")
        return {"unet": self.unet, **dict(zip(names, self.text_encoders))}

    def load_lora_weights(self, path: str | pathlib.Path, *, merge: bool = False):
        """Load a diffusers/peft or kohya LoRA file into the U-Net and text encoders, in place.

        With merge=False the adapters stay separate LoRALinear layers; merge=True folds them into the base
        weights (needed for kohya adapters on 1x1 convolutions). Raises conversion.lora_io.LoRAFileError when
        the file's keys match no layer. Returns conversion.lora_io.LoRALoadResult.
        """
        from conversion.lora_io import load_lora_weights

        result = load_lora_weights(path, self.lora_components(), merge=merge)
        self._compiled.clear()  # the module structure changed, so every compiled program is stale
        return result

    # ----- prompts -----------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, ...]:
        """Return input_ids int32 [B, L] for each tokenizer, padded and truncated with a warning."""
        from conversion.transformers_io import tokenize

        return tuple(tokenize(tokenizer, list(prompts), tokenizer.model_max_length)["input_ids"]
                     for tokenizer in self.tokenizers)

    def _encode(self, encoders, ids: tuple[jax.Array, ...], zero: bool) -> dict[str, jax.Array]:
        raise NotImplementedError

    def _added_conditions(self, height: int, width: int, batch: int) -> dict[str, jax.Array]:
        return {}

    # ----- generation ----------------------------------------------------------------------

    def _check_size(self, height: int, width: int) -> tuple[int, int]:
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % self.vae_scale_factor:
                raise ValueError(f"{name}={value!r} is invalid; use a positive multiple of {self.vae_scale_factor}")
        latent_multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        for name, value in (("height", height), ("width", width)):
            if value % latent_multiple:
                raise ValueError(
                    f"{name}={value} is invalid for this U-Net, which halves the latents "
                    f"{len(self.unet.config.block_out_channels) - 1} times; use a multiple of {latent_multiple}"
                )
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        latents: np.ndarray | jax.Array | None = None,
        image: np.ndarray | None = None,
        strength: float = 0.8,
        eta: float = 0.0,
    ) -> np.ndarray:
        """Generate images float32 [B, H, W, 3] in [0, 1] for one or several prompts.

        Args:
            prompt: one prompt or a list (the batch B).
            negative_prompt: one for all prompts, one per prompt, or None for the empty prompt (zeros for
                SDXL configs with force_zeros_for_empty_prompt).
            num_inference_steps: sampler steps; at most the schedule's training timesteps.
            guidance_scale: classifier-free guidance scale s; s <= 1 runs without the unconditional pass.
            height, width: image size, multiples of the VAE factor (8); defaults to the U-Net's sample_size
                times that factor.
            seed: PRNG seed of the initial noise and of stochastic samplers.
            latents: initial noise [B, h, w, C] (channels-last) in place of the seeded draw. The sampler
                scales it by its initial noise level, as diffusers does.
            image: for image-to-image, images [B, H, W, 3] in [0, 1]; `strength` in (0, 1] sets how much of the
                denoising schedule runs (1 ignores the image's content).
            eta: DDIM's eta (0 is deterministic).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty; pass a string or a list of strings")
        batch = len(prompts)
        if negative_prompt is None:
            negatives = [""] * batch
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * batch
        else:
            negatives = list(negative_prompt)
            if len(negatives) != batch:
                raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts; pass one or one per prompt")
        zero_negative = negative_prompt is None and bool(self.index.get("force_zeros_for_empty_prompt", False))

        sample_size = self.unet.config.sample_size or 64
        default = sample_size if isinstance(sample_size, int) else sample_size[0]
        height = height if height is not None else default * self.vae_scale_factor
        width = width if width is not None else default * self.vae_scale_factor
        latent_h, latent_w = self._check_size(height, width)
        latent_shape = (batch, latent_h, latent_w, self.unet.config.in_channels)

        from jaxgen.diffusion.scheduler_config import from_scheduler_config

        setup = from_scheduler_config(self.scheduler_config)
        if num_inference_steps > setup.schedule.num_train_timesteps or num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is invalid; use 1 to {setup.schedule.num_train_timesteps}"
            )
        options = dict(setup.options)
        options["num_steps"] = num_inference_steps
        if "eta" in samplers.sampler_options(setup.sampler):
            options["eta"] = eta

        key = jax.random.key(seed)
        noise_key, sampler_key, encode_key = jax.random.split(key, 3)
        if latents is None:
            noise = jax.random.normal(noise_key, latent_shape, jnp.float32)
        else:
            noise = jnp.asarray(latents, jnp.float32)
            if noise.shape != latent_shape:
                raise ValueError(f"latents have shape {noise.shape}, expected {latent_shape} (channels-last)")

        start_step = 0
        init_latents = None
        if image is not None:
            if not 0.0 < strength <= 1.0:
                raise ValueError(f"strength={strength} is invalid; use a value in (0, 1]")
            pixels = jnp.asarray(image, jnp.float32)
            if pixels.shape != (batch, height, width, 3):
                raise ValueError(f"image has shape {pixels.shape}, expected {(batch, height, width, 3)} in [0, 1]")
            init_latents = self.vae.latents_from_images(pixels * 2 - 1, encode_key)
            start_step = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
            if start_step >= num_inference_steps:
                raise ValueError(f"strength={strength} leaves no denoising step of {num_inference_steps}; raise it")

        ids = self.tokenize(prompts)
        negative_ids = self.tokenize(negatives)
        run = self._compiled_generate(setup.sampler, tuple(sorted(options.items())), guidance_scale > 1.0,
                                      zero_negative, start_step)
        images = run(
            nnx.state(self.unet), nnx.state(self.vae), tuple(nnx.state(e) for e in self.text_encoders),
            tuple(jnp.asarray(i) for i in ids), tuple(jnp.asarray(i) for i in negative_ids),
            setup.schedule, noise, init_latents, sampler_key, jnp.float32(guidance_scale),
            self._added_conditions(height, width, batch),
        )
        return np.asarray(images)

    def _compiled_generate(self, sampler: str, options: tuple, guided: bool, zero_negative: bool, start_step: int):
        cache_key = (sampler, options, guided, zero_negative, start_step)
        if cache_key not in self._compiled:
            self._compiled[cache_key] = jax.jit(functools.partial(
                self._generate, nnx.graphdef(self.unet), nnx.graphdef(self.vae),
                tuple(nnx.graphdef(e) for e in self.text_encoders), sampler, dict(options), guided, zero_negative,
                start_step,
            ))
        return self._compiled[cache_key]

    def _generate(self, unet_def, vae_def, encoder_defs, sampler, options, guided, zero_negative, start_step, unet_state, vae_state, encoder_states, ids, negative_ids, schedule, noise,
                  init_latents, key, guidance_scale, added):
        unet = nnx.merge(unet_def, unet_state)
        vae = nnx.merge(vae_def, vae_state)
        encoders = tuple(nnx.merge(d, s) for d, s in zip(encoder_defs, encoder_states))
        cond = self._encode(encoders, ids, zero=False)
        cond.update(added)
        if guided:
            uncond = self._encode(encoders, negative_ids, zero=zero_negative)
            uncond.update(added)
            cond = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)

        def model_fn(x, t, condition):
            if guided:
                x, t = jnp.concatenate([x, x]), jnp.concatenate([t, t])
            out = unet(x, t, condition["context"], **{k: v for k, v in condition.items() if k != "context"})
            if guided:
                out_uncond, out_cond = jnp.split(out, 2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            return out

        if init_latents is None:
            x_start = noise
        else:
            # Image-to-image: the encoded image noised to the timestep of grid step `start_step`.
            x_start = samplers.start_sample(sampler, schedule, init_latents, noise, start_step=start_step, **options)
            options = dict(options, start_step=start_step)
        latents = samplers.sample(sampler, model_fn, schedule, x_start, key, cond, **options)
        return _to_unit_images(vae.images_from_latents(latents))


class StableDiffusion(_Pipeline):
    """Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden state is the U-Net's context."""

    components = SD_COMPONENTS

    def _encode(self, encoders, ids, zero):
        context = encoders[0](ids[0]).last_hidden_state
        return {"context": jnp.zeros_like(context) if zero else context}


class StableDiffusionXL(_Pipeline):
    """SDXL: two CLIP text encoders, pooled text embeddings and size/crop micro-conditioning.

    The context is the concatenation of both encoders' penultimate hidden states, and the pooled embedding
    is the second encoder's projected end-of-text output, as diffusers' StableDiffusionXLPipeline builds them.
    """

    components = SDXL_COMPONENTS

    def _encode(self, encoders, ids, zero):
        first = encoders[0](ids[0])
        second = encoders[1](ids[1])
        context = jnp.concatenate([first.hidden_states[-2], second.hidden_states[-2]], axis=-1)
        pooled = second.text_embeds
        if zero:
            context, pooled = jnp.zeros_like(context), jnp.zeros_like(pooled)
        return {"context": context, "text_embeds": pooled}

    def _added_conditions(self, height, width, batch):
        # original size, crop top-left, target size; the pipeline generates uncropped images at full size.
        time_ids = jnp.asarray([[height, width, 0, 0, height, width]] * batch, jnp.float32)
        return {"time_ids": time_ids}
