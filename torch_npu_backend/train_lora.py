"""LoRA fine-tuning of a Stable Diffusion or SDXL U-Net with PyTorch, peft and diffusers (task `text_to_image_lora`).

    python -m torch_npu_backend.train --cfg sdxl_lora
    python -m torch_npu_backend.train --cfg sd_lora --cfg-arg tiny
    python -m torch.distributed.run --nproc_per_node 2 --standalone -m torch_npu_backend.train --cfg sdxl_lora

This is the torch side of jaxgen.tasks_text_to_image. It takes from jaxgen everything that fixes what is
trained, through jaxgen's own TextToImageLoRATask:
    - the base pipeline folder (`resolve_base_folder`, which writes the same tiny random base when
      model.pretrained is empty);
    - the image-caption buckets, tokenization and batch order (`load_data`, and `make_loader` with data.seed);
    - the token ids of the empty caption;
    - the noise schedule and prediction type, read from the folder's scheduler config.

The models are the folder's diffusers UNet2DConditionModel and AutoencoderKL and its transformers CLIP
text encoders. The VAE, the text encoders and the U-Net's base weights are frozen. peft adds LoRA layers
(model.rank, model.alpha, model.target_modules) to the U-Net, and only those are trained, with
train_state.make_optimizer. Attention runs through NPUAttnProcessor, which calls the attention modules'
to_q, to_k, to_v and to_out[0], so the peft layers that replace those projections stay in the forward pass.

Each train step does what jaxgen's loss_fn does, with the random draws passed in (`LoRANoiseDraw`):

1. images uint8 [B, H, W, 3] are mapped to [-1, 1] and encoded into latents z_0 [B, C, h, w], a sample
   mean + std * eps of the VAE posterior, normalised with the VAE config's scaling (and shift) factor;
2. the token ids of example i are replaced by those of the empty caption where drop_uniform[i] <
   diffusion.caption_dropout_prob, for both tokenizers of SDXL at once;
3. the text encoders give the context: SD uses the last hidden state, SDXL concatenates both encoders'
   penultimate hidden states and adds the second encoder's projected pooled output and
   time_ids = (original height, width, crop top, left, bucket height, width);
4. z_t = q_sample(z_0, t, noise), and the loss is the MSE of the U-Net output against the target of the
   prediction type (with min-SNR weighting when diffusion.min_snr_gamma is set).

Distributed training: every process draws the same global batch and the same noise and trains on its
contiguous slice, like the digits job. The adapter gradients are averaged over the processes with one
all_reduce per step. DistributedDataParallel is not used, because it would broadcast every frozen base
weight at start.

Run folder (train.workdir + "_torch", or --workdir): config.json, metrics.jsonl, checkpoints/<step>/ with
model.safetensors and ema.safetensors holding only the adapters (peft parameter names, such as
"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight") and training_state.pt,
and lora/pytorch_lora_weights.safetensors. That file is rewritten at each checkpoint from the EMA adapters,
as jaxgen's trainer exports its EMA. The LoRA configs set optim.ema_decay=0, so these are the latest adapters.
That file has diffusers' layout ("unet.<module path>.lora_A.weight" [r, in], ".lora_B.weight" [out, r],
and the peft LoraConfig in the "lora_adapter_metadata" header), which conversion.lora_io.load_lora_weights,
the jaxgen pipelines' load_lora_weights and diffusers' pipeline.load_lora_weights read.

Differences from `python -m jaxgen.train`:
    - The random draws come from a torch CPU generator seeded from (train.seed, step), and lora_A starts
      from peft's default initialisation (uniform in +-1/sqrt(in), as jaxgen's, but from torch's
      generator seeded with train.seed). So the losses match jaxgen's in distribution, not value by value.
      tests/test_torch_lora_train.py compares one step from the same weights and draws.
    - The weights are float32, and `--precision bfloat16` or `float16` runs the forward pass under autocast
      (see torch_npu_backend.train). No sample images are written (sample.prompts is ignored).

Axis letters: B batch, H W image height and width, h w latent height and width, C latent channels, L tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from jaxgen import config as config_lib
from torch_npu_backend.diffusion import TorchNoiseSchedule
from torch_npu_backend.train import ProcessInfo, TrainingRun
from torch_npu_backend.train_state import EMA, make_optimizer

__all__ = [
    "LoRAAdapters",
    "LoRAComponents",
    "LoRANoiseDraw",
    "LoRATrainingRun",
    "batch_to_tensors",
    "draw_lora_noise",
    "encode_prompts",
    "latents_from_images",
    "load_lora_components",
    "lora_file_state_dict",
    "schedule_to_torch",
    "text_to_image_loss",
    "write_lora_file",
]

logger = logging.getLogger(__name__)

# The batch keys of the token ids of each tokenizer, as jaxgen.tasks_text_to_image names them.
INPUT_ID_KEYS = ("input_ids", "input_ids_2")
# The peft adapter name. diffusers' add_adapter uses it when none is given.
ADAPTER_NAME = "default"


# ---- models ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoRAComponents:
    """The torch models of one LoRA job: the U-Net with peft adapters, and the frozen VAE and text encoders."""

    unet: nn.Module  # diffusers UNet2DConditionModel
    vae: nn.Module  # diffusers AutoencoderKL
    text_encoders: tuple[nn.Module, ...]  # CLIPTextModel, plus CLIPTextModelWithProjection for SDXL
    xl: bool


def load_lora_components(folder: str | os.PathLike[str], model: config_lib.LoRAModelConfig,
                         device: torch.device | str = "cpu") -> LoRAComponents:
    """Load the U-Net, VAE and text encoders of a diffusers pipeline folder and add LoRA adapters to the U-Net.

    Every base weight is frozen (requires_grad False). The adapters follow model.rank, model.alpha and
    model.target_modules, with peft's default initialisation (lora_B zero), so they start from the
    current torch random state. The U-Net's attention runs through NPUAttnProcessor.

    Raises:
        ValueError: a target module matches no layer of the U-Net (peft's message names the targets), or
            matches a layer that is not an nn.Linear, which jaxgen's apply_lora rejects too.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from torch_npu_backend.attention import NPUAttnProcessor

    folder = pathlib.Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32)
    encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)]
    if model.xl:
        encoders.append(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=torch.float32))
    for frozen in (unet, vae, *encoders):
        frozen.requires_grad_(False)
    for frozen in (vae, *encoders):
        frozen.eval()

    # Freezing first leaves requires_grad True on exactly the parameters that add_adapter creates.
    config = LoraConfig(r=model.rank, lora_alpha=model.alpha, target_modules=list(model.target_modules),
                        init_lora_weights=True)
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    not_linear = sorted(f"{name} ({type(module.get_base_layer()).__name__})" for name, module in unet.named_modules()
                        if isinstance(module, LoraLayer) and not isinstance(module.get_base_layer(), nn.Linear))
    if not_linear:
        raise ValueError(f"LoRA supports Linear layers only, but model.target_modules={list(model.target_modules)} "
                         f"also matches {', '.join(not_linear[:5])}; name the Linear layers more precisely")
    unet.set_attn_processor(NPUAttnProcessor())
    components = LoRAComponents(unet=unet, vae=vae, text_encoders=tuple(encoders), xl=model.xl)
    for module in (unet, vae, *encoders):
        module.to(device)
    return components


class LoRAAdapters:
    """The trainable LoRA parameters of a peft U-Net, by peft parameter name.

    It has the parts of the nn.Module interface that TrainingRun, EMA and the checkpoints use
    (named_parameters, parameters, state_dict, load_state_dict, train), so a checkpoint contains only the
    adapters.
    """

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self._parameters = {name: p for name, p in unet.named_parameters() if p.requires_grad}
        if not self._parameters:
            raise ValueError("the U-Net has no trainable parameters; add LoRA adapters with load_lora_components")
        not_lora = sorted(name for name in self._parameters if ".lora_" not in name)
        if not_lora:
            raise ValueError(f"U-Net parameters other than LoRA adapters are trainable: {not_lora[:5]}; freeze the "
                             "base weights with requires_grad_(False) before adding the adapters")

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self._parameters.items())

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self._parameters.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self._parameters.items()}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Copy adapter weights by name. Keys and shapes must match exactly, whatever `strict` is.

        Raises:
            KeyError: a key is missing or unexpected. The message names up to five of each.
            ValueError: a shape differs. The message names the parameter and both shapes.
        """
        missing = sorted(set(self._parameters) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self._parameters))
        if missing or unexpected:
            raise KeyError(f"the adapter weights do not match this U-Net's adapters: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}; the checkpoint belongs to other model.target_modules or "
                           "another base, so train into another run folder")
        for name, parameter in self._parameters.items():
            value = state_dict[name]
            if tuple(value.shape) != tuple(parameter.shape):
                raise ValueError(f"adapter {name} has shape {tuple(value.shape)} in the checkpoint and "
                                 f"{tuple(parameter.shape)} in the model; model.rank differs from the checkpoint's")
            parameter.copy_(value)

    def train(self, mode: bool = True) -> LoRAAdapters:
        self.unet.train(mode)
        return self


# ---- one train step ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoRANoiseDraw:
    """The random inputs of one LoRA train step for a whole batch, on the CPU."""

    drop_uniform: torch.Tensor  # float32 [B], U[0, 1): the caption of example i is dropped where < the probability
    timesteps: torch.Tensor  # int64 [B] in [0, T)
    latent_noise: torch.Tensor  # float32 [B, C, h, w], standard normal: the VAE posterior sample's eps
    noise: torch.Tensor  # float32 [B, C, h, w], standard normal: the diffusion noise

    def slice(self, start: int, stop: int) -> LoRANoiseDraw:
        """Return the draws of examples [start, stop)."""
        return LoRANoiseDraw(*(getattr(self, field.name)[start:stop] for field in dataclasses.fields(self)))


def draw_lora_noise(generator: torch.Generator, batch_size: int, latent_shape: tuple[int, int, int],
                    num_train_timesteps: int) -> LoRANoiseDraw:
    """Draw the caption-dropout uniforms, timesteps, posterior eps and diffusion noise of a batch, in that order.

    Every process draws the whole batch and keeps its slice, so the draws do not depend on the number of
    processes. `latent_shape` is (C, h, w) of the batch's bucket.
    """
    drop_uniform = torch.rand((batch_size,), generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    latent_noise = torch.randn((batch_size, *latent_shape), generator=generator)
    noise = torch.randn((batch_size, *latent_shape), generator=generator)
    return LoRANoiseDraw(drop_uniform, timesteps, latent_noise, noise)


def batch_to_tensors(batch: Mapping[str, np.ndarray], rows: slice,
                     device: torch.device | str) -> dict[str, torch.Tensor]:
    """Convert rows of a jaxgen LoRA batch to torch: images float32 [b, 3, H, W] in [-1, 1], token ids int64 [b, L].

    SDXL batches also carry original_size and crop_top_left, int64 [b, 2].
    """
    images = torch.from_numpy(np.asarray(batch["image"][rows], np.float32) / 127.5 - 1.0)
    tensors = {"image": images.permute(0, 3, 1, 2).contiguous()}
    for name in (*INPUT_ID_KEYS, "original_size", "crop_top_left"):
        if name in batch:
            tensors[name] = torch.from_numpy(np.asarray(batch[name][rows], np.int64))
    return {name: value.to(device) for name, value in tensors.items()}


def vae_scale_factor(vae: nn.Module) -> int:
    """Return the VAE's downsampling factor from image to latent sides, 2 ** (levels - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latents_from_images(vae: nn.Module, images: torch.Tensor, latent_noise: torch.Tensor) -> torch.Tensor:
    """Encode images [B, 3, H, W] in [-1, 1] into normalised latents [B, C, h, w], a posterior sample.

    z = mean + std * latent_noise, then (z - latents_mean) * scaling_factor / latents_std per channel when
    the VAE config sets latents_mean and latents_std, else (z - shift_factor) * scaling_factor, as
    jaxgen's AutoencoderKL.latents_from_images computes it.
    """
    posterior = vae.encode(images).latent_dist
    z = posterior.mean + posterior.std * latent_noise
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean, dtype=z.dtype, device=z.device).reshape(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, dtype=z.dtype, device=z.device).reshape(1, -1, 1, 1)
        return (z - mean) * config.scaling_factor / std
    shift = getattr(config, "shift_factor", None) or 0.0
    return (z - shift) * config.scaling_factor


def encode_prompts(components: LoRAComponents, input_ids: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """Return the U-Net's text conditions, as jaxgen's pipelines build them from token ids [B, L].

    "context" [B, L, E] is the text encoder's last hidden state (SD), or for SDXL the concatenated
    penultimate hidden states of both encoders, and SDXL adds "text_embeds" [B, P], the second encoder's
    projected pooled output.
    """
    if not components.xl:
        return {"context": components.text_encoders[0](input_ids[0]).last_hidden_state}
    first = components.text_encoders[0](input_ids[0], output_hidden_states=True)
    second = components.text_encoders[1](input_ids[1], output_hidden_states=True)
    context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return {"context": context, "text_embeds": second.text_embeds}


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor,
                  target_size: tuple[int, int]) -> torch.Tensor:
    """Return SDXL's time_ids float32 [B, 6]: original (height, width), crop (top, left), target (height, width)."""
    target = torch.tensor(target_size, dtype=original_size.dtype, device=original_size.device).expand_as(original_size)
    return torch.cat([original_size, crop_top_left, target], dim=-1).float()


def schedule_to_torch(schedule) -> TorchNoiseSchedule:
    """Copy a jaxgen NoiseSchedule, such as the task's, into a float32 TorchNoiseSchedule on the CPU."""
    return TorchNoiseSchedule(betas=torch.from_numpy(np.array(schedule.betas, dtype=np.float32)),
                              alphas_cumprod=torch.from_numpy(np.array(schedule.alphas_cumprod, dtype=np.float32)))


def text_to_image_loss(components: LoRAComponents, schedule: TorchNoiseSchedule, batch: Mapping[str, torch.Tensor],
                       draws: LoRANoiseDraw, *, empty_ids: tuple[torch.Tensor, ...], caption_dropout_prob: float,
                       prediction_type: str, min_snr_gamma: float | None = None) -> torch.Tensor:
    """Compute the scalar LoRA training loss of a batch from given draws (jaxgen's loss_fn with the draws passed in).

    Args:
        components: the models, from load_lora_components.
        schedule: the noise schedule, on the batch's device.
        batch: from batch_to_tensors.
        draws: the draws of these rows, on the batch's device.
        empty_ids: the token ids [L] of the empty caption, one per tokenizer.
        caption_dropout_prob: probability of replacing a caption by the empty caption.
        prediction_type, min_snr_gamma: the training target, as in diffusion.diffusion_loss.
    """
    from torch_npu_backend import diffusion

    images = batch["image"]
    with torch.no_grad():
        latents = latents_from_images(components.vae, images, draws.latent_noise)
        # One decision per example for both tokenizers, so SDXL drops both captions of an example together.
        drop = (draws.drop_uniform < caption_dropout_prob)[:, None]
        ids = tuple(torch.where(drop, empty[None, :], batch[name])
                    for name, empty in zip(INPUT_ID_KEYS, empty_ids))
        condition = encode_prompts(components, ids)
    added = None
    if components.xl:
        added = {"text_embeds": condition["text_embeds"],
                 "time_ids": sdxl_time_ids(batch["original_size"], batch["crop_top_left"], tuple(images.shape[2:]))}

    x_t = diffusion.q_sample(schedule, latents, draws.timesteps, draws.noise)
    # The loss is computed in float32 also when the U-Net runs under bfloat16 or float16 autocast.
    output = components.unet(x_t, draws.timesteps, encoder_hidden_states=condition["context"],
                             added_cond_kwargs=added).sample.float()
    per_example = diffusion.diffusion_loss(schedule, output, latents, draws.noise, draws.timesteps,
                                           prediction_type=prediction_type, min_snr_gamma=min_snr_gamma)
    return per_example.mean()


# ---- the LoRA file -----------------------------------------------------------------------------------------


def lora_file_state_dict(unet: nn.Module, adapter_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename adapters from peft parameter names to LoRA-file names ("<module path>.lora_A.weight") on the CPU.

    The keys carry no component prefix, because the pipeline's save_lora_weights adds "unet.".
    """
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, state_dict=dict(adapter_state), adapter_name=ADAPTER_NAME)
    return {name: value.detach().cpu().contiguous() for name, value in state.items()}


def write_lora_file(workdir: pathlib.Path, unet: nn.Module, adapter_state: Mapping[str, torch.Tensor], *,
                    xl: bool) -> pathlib.Path:
    """Write the adapters as <workdir>/lora/pytorch_lora_weights.safetensors with diffusers' writer and return its path.

    The file is written into a scratch folder beside it and moved into lora/ with os.replace, so lora/
    never contains a partial file or a second .safetensors file.
    """
    import diffusers

    from jaxgen.tasks_text_to_image import LORA_FILE, LORA_FOLDER

    pipeline_class = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    # to_dict() gives every LoraConfig field. diffusers stores them under "unet." in the file header,
    # and loaders read r, lora_alpha and the patterns from there.
    metadata = unet.peft_config[ADAPTER_NAME].to_dict()
    # peft stores target_modules as a set, whose order changes between processes; sorting keeps the file's
    # bytes the same for the same adapters.
    if isinstance(metadata.get("target_modules"), (set, frozenset, list, tuple)):
        metadata["target_modules"] = sorted(metadata["target_modules"])
    scratch = workdir / f".{LORA_FOLDER}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    pipeline_class.save_lora_weights(scratch, unet_lora_layers=lora_file_state_dict(unet, adapter_state),
                                     weight_name=LORA_FILE, unet_lora_adapter_metadata=metadata)
    target = workdir / LORA_FOLDER / LORA_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(scratch / LORA_FILE, target)
    shutil.rmtree(scratch, ignore_errors=True)
    return target


# ---- the training run --------------------------------------------------------------------------------------


class LoRATrainingRun(TrainingRun):
    """One process's share of a LoRA fine-tuning run: the jaxgen data and settings, the torch models and adapters.

    Arguments and errors are those of TrainingRun, plus jaxgen.pipelines.PipelineFolderError when
    model.pretrained is not a complete pipeline folder, and ValueError when its kind differs from model.xl.

    NOTE: only CPU runs (one process, and two gloo processes) have run, in tests/test_torch_lora_train.py.
    On NPU and CUDA the models, batches and draws are moved to the process's device, but that path is untested.

    Attributes beyond TrainingRun's:
        components: the U-Net with adapters, the VAE and the text encoders.
        task: the jaxgen TextToImageLoRATask that supplies the base folder, data, schedule and empty caption.
    """

    def __init__(self, config: config_lib.Config, workdir: pathlib.Path, process: ProcessInfo, *,
                 precision: str = "float32"):
        super().__init__(config, workdir, process, precision=precision)
        # Process 0 goes first, because it writes the random base pipeline and the digit caption folder on first use.
        if process.is_main:
            self.task, train_data = _make_task(config)
        if process.world_size > 1:
            dist.barrier()
        if not process.is_main:
            self.task, train_data = _make_task(config)
        self.loader = self.task.make_loader(train_data)

        torch.manual_seed(config.train.seed)
        self.components = load_lora_components(self.task.folder, config.model, process.device)
        for module in (self.components.unet, self.components.vae, *self.components.text_encoders):
            self.keep_norms_in_float32(module)
        self.model = LoRAAdapters(self.components.unet)
        self.parameter_names = [name for name, _ in self.model.named_parameters()]  # the optimizer's order
        self.parameters = list(self.model.parameters())
        self.optimizer, self.scheduler = make_optimizer(self.parameters, config.optim, config.train.num_steps)
        self.ema = EMA(self.model, config.optim.ema_decay)
        self.schedule = schedule_to_torch(self.task.schedule).to(process.device)
        self.empty_ids = tuple(torch.from_numpy(np.asarray(ids, np.int64)).to(process.device)
                               for ids in self.task.empty_ids)
        self.latent_channels = self.components.vae.config.latent_channels
        self.latent_factor = vae_scale_factor(self.components.vae)
        logger.info("base pipeline %s: LoRA adapters (rank %d, alpha %g) on %d U-Net layers", self.task.folder,
                    config.model.rank, config.model.alpha, len(self.parameter_names) // 2)
        self.log_setup()

    def draws(self, step: int, image_size: tuple[int, int]) -> LoRANoiseDraw:
        """Return the draws of update `step` (0-based) for the global batch, for images of `image_size` (H, W)."""
        from torch_npu_backend import diffusion

        height, width = image_size
        latent_shape = (self.latent_channels, height // self.latent_factor, width // self.latent_factor)
        return draw_lora_noise(diffusion.step_generator(self.config.train.seed, step), self.config.data.batch_size,
                               latent_shape, self.schedule.num_train_timesteps)

    def train_step(self, trained: Any, step: int) -> torch.Tensor:
        """Run update `step` (0-based) on this process's rows and return [loss, grad_norm] on the device.

        With several processes the adapter gradients are averaged with one all_reduce before clipping.
        """
        device = self.process.device
        batch = next(self.loader)  # the global batch, the same in every process
        draws = self.draws(step, batch["image"].shape[1:3]).slice(self.rows.start, self.rows.stop)
        draws = LoRANoiseDraw(*(getattr(draws, field.name).to(device) for field in dataclasses.fields(draws)))
        with self.autocast():
            loss = text_to_image_loss(self.components, self.schedule, batch_to_tensors(batch, self.rows, device),
                                      draws, empty_ids=self.empty_ids,
                                      caption_dropout_prob=self.config.diffusion.caption_dropout_prob,
                                      prediction_type=self.task.prediction_type,
                                      min_snr_gamma=self.config.diffusion.min_snr_gamma)
        grad_norm = self.apply_gradients(loss, self._average_gradients if self.process.world_size > 1 else None)
        self.ema.update(self.model, step)
        return torch.stack([loss.detach(), grad_norm.detach()])

    def _average_gradients(self) -> None:
        for parameter in self.parameters:
            if parameter.grad is None:  # an adapter outside this step's forward pass
                parameter.grad = torch.zeros_like(parameter)
        grads = [p.grad for p in self.parameters]
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat)
        flat /= self.process.world_size
        parts = flat.split([grad.numel() for grad in grads])
        torch._foreach_copy_(grads, [part.view_as(grad) for part, grad in zip(parts, grads)])

    def save(self, step: int) -> None:
        """Write the checkpoint of `step`, then (process 0) the LoRA file of the EMA adapters."""
        super().save(step)
        if self.process.is_main:
            path = write_lora_file(self.workdir, self.components.unet, self.ema.state_dict(self.model),
                                   xl=self.components.xl)
            logger.info("step %d: wrote %s", step, path)


def _make_task(config: config_lib.Config) -> tuple[Any, Any]:
    """Return jaxgen's TextToImageLoRATask for `config` and its training data, preparing the folders on first use."""
    from jaxgen.tasks_text_to_image import TextToImageLoRATask

    train_data, held_out = TextToImageLoRATask.load_data(config)
    return TextToImageLoRATask(config, held_out), train_data
