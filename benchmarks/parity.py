"""Compare jaxgen with its PyTorch counterparts on the same weights: output error and speed side by side.

Each row runs one model in jaxgen (jax.jit) and in PyTorch, both eager and through torch.compile, on the same
weights and the same float32 inputs, and compares their outputs. jaxgen runs on JAX's default backend and the
torch side on --device.

Rows:
  vae, clip_text, clip_text_projection, unet_sd15, unet_sd2, unet_sdxl
      Stable Diffusion components against diffusers and transformers. Each is built small but with the block
      layout of its family by the reference library, gets seeded noise added to every weight, is saved with
      save_pretrained into a temporary folder and is loaded into jaxgen through `conversion`.
  sd_pipeline, sdxl_pipeline
      The tiny pipeline folders of jaxgen.pipelines.tiny as written, against diffusers' pipelines: a whole
      20-step DDIM generation with classifier-free guidance from fixed initial latents, including prompt
      encoding and VAE decoding. The images are compared pixel by pixel in [0, 1].
  unet_digits
      The full-size class-conditional U-Net of configs/ddpm_digits.py against its torch twin
      (torch_npu_backend.models.build_torch_model) with seeded noise added to every weight, converted with
      jaxgen_model_from_torch. It predicts noise for a batch of noisy 16x16 images, timesteps and labels.
  ddim50_digits, dpmpp20_digits
      Whole sampler runs of that model: DDIM with 50 steps and DPM-Solver++(2M) with 20 steps, classifier-free
      guidance 3, one image per digit from the same x_T. jaxgen runs samplers.sample with guidance.cfg_model_fn
      in one jitted program, and torch runs torch_npu_backend.sampling.make_sample_fn's Python loop. Both clip
      x_0 to [-1, 1].

  python -m benchmarks.parity --models all
  python -m benchmarks.parity --models vae,unet_sdxl --repeats 3 --threads 2
  python -m benchmarks.parity --models unet_digits,ddim50_digits,dpmpp20_digits --device npu
  python -m benchmarks.parity --models unet_digits --no-compile

Columns of the printed table, the Markdown file and the JSON rows:
  timed               what one timed call runs: a forward pass, a whole sampler run or a whole pipeline run
  max abs error       max |jaxgen - torch eager| over every compared output value
  max relative error  that maximum divided by max |torch eager|
  jaxgen ms           median time of one jitted call after compilation, waiting for the result
  compile s           first jitted call's wall time minus that median: tracing plus XLA compilation
  torch ms            median time of one eager call under torch.no_grad(), after one untimed call
  torch / jaxgen      torch ms divided by jaxgen ms; above 1 means jaxgen is faster
  torch.compile ...   the same five numbers for the torch side run through torch.compile (default backend,
                      inductor), with its errors also measured against jaxgen and its compile time taken
                      from its first call. The JSON holds them under "torch_compile". A row whose
                      torch.compile fails keeps its other numbers and records the error text instead.

Both compile times shrink when a persistent cache already contains the compiled program: JAX's compilation cache
when JAX_COMPILATION_CACHE_DIR is set, and inductor's on-disk cache (torchinductor_<user> in the temporary
folder, or TORCHINDUCTOR_CACHE_DIR), which earlier runs on the same machine fill.

What torch.compile wraps: the whole module for the component and U-Net rows, and the U-Net alone for the
pipeline and sampler rows, whose loops stay eager. --no-compile leaves torch.compile out (its columns
disappear and the JSON rows hold "torch_compile": null).

--device auto|cpu|cuda|npu (default cpu) puts the torch side's weights and inputs on the device that
torch_npu_backend.device.resolve_device returns; "auto" uses JAXGEN_TORCH_DEVICE if set, else the first
available of npu, cuda and cpu. A device that is not available stops the run with a message that names what is
missing. The JSON and the table header record the device. Timings are wall-clock, and each torch call ends by
copying its outputs to the host, which also waits for an accelerator. They depend on what else runs on the
machine, so the JSON records the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from flax import nnx

    from jaxgen.config import Config

logger = logging.getLogger("benchmarks.parity")

MODELS = ("vae", "clip_text", "clip_text_projection", "unet_sd15", "unet_sd2", "unet_sdxl", "sd_pipeline",
          "sdxl_pipeline", "unet_digits", "ddim50_digits", "dpmpp20_digits")
DEVICES = ("auto", "cpu", "cuda", "npu")
PROMPTS = ("a handwritten digit seven in white on a blue background", "a photo of a cat")
NEGATIVE_PROMPT = "blurry"
PIPELINE_STEPS = 20
GUIDANCE_SCALE = 7.5
IMAGE_SIZE = 64  # the tiny pipelines' VAE maps 8x8 latents to 64x64 images
BATCH = 2  # a guided step runs the U-Net on the unconditional and the conditional half together
CONTEXT_TOKENS = 77  # Stable Diffusion's text length
UNET_LATENT_SIZE = 16  # latent height and width of the U-Net rows (128x128 images through an 8x VAE)

# U-Nets of the three Stable Diffusion families at about a tenth of their channel counts, keeping each
# family's block layout. SD 1.5 has four levels, eight heads in every attention block and convolutional
# projections around the transformers. SD 2.x adds linear projections and a head count per block, with
# heads 16 wide here (64 in SD 2.x). SDXL has three levels, no attention at the top level, deeper
# transformers further down, and the "text_time" embedding of pooled text and size conditioning.
UNET_SD15 = dict(
    sample_size=UNET_LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=16, cross_attention_dim=64, attention_head_dim=8,
)
UNET_SD2 = dict(UNET_SD15, cross_attention_dim=96, attention_head_dim=(2, 4, 8, 8), use_linear_projection=True)
SDXL_POOLED_DIM = 64
SDXL_TIME_EMBED_DIM = 8
UNET_SDXL = dict(
    sample_size=UNET_LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16, cross_attention_dim=128, attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 3),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_TIME_EMBED_DIM,
)
UNET_CONFIGS = {"unet_sd15": UNET_SD15, "unet_sd2": UNET_SD2, "unet_sdxl": UNET_SDXL}
# Scale of the noise added to every reference weight. Fresh norm layers have weight 1 and bias 0, so a
# transposed or swapped norm parameter would change nothing without it.
WEIGHT_NOISE = 0.1

DIGITS_CONFIG = "ddpm_digits"
# The digits rows' U-Net batch: noisy images at these timesteps with these labels (10 is the null class).
DIGITS_TIMESTEPS = (999, 600, 250, 0)
DIGITS_LABELS = (0, 4, 9, 10)
DIGITS_GUIDANCE_SCALE = 3.0
# Sampler rows: (SampleConfig.sampler, num_steps). The rest of the SampleConfig comes from the config file.
DIGITS_SAMPLERS = {"ddim50_digits": ("ddim", 50), "dpmpp20_digits": ("dpmpp_2m", 20)}


def parse_models(text: str) -> list[str]:
    """Parse --models: "all" or a comma-separated list of names from MODELS, in the order given."""
    if text.strip() == "all":
        return list(MODELS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"invalid model name(s) {', '.join(unknown) or repr(text)}; use 'all' or a comma-separated list of "
            f"{', '.join(MODELS)}"
        )
    return list(dict.fromkeys(names))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=parse_models, default=list(MODELS),
                        help=f"'all' (default) or a comma-separated list of: {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per backend and model; the tables report their median")
    parser.add_argument("--out", default="benchmarks/results/parity.json", help="JSON output path")
    parser.add_argument("--markdown", default=None,
                        help="Markdown table output path (default: the --out path with the suffix .md)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (torch.set_num_threads); default: torch's own choice")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="device of the torch side (default: cpu, even when JAXGEN_TORCH_DEVICE is set); 'auto' "
                             "uses JAXGEN_TORCH_DEVICE if set, else the first available of npu, cuda and cpu. jaxgen "
                             "runs on JAX's default backend")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile columns, which compile every torch model first (minutes)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} is invalid; use 1 or more")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads={args.threads} is invalid; use 1 or more")
    return args


# ----- one model built by both libraries ---------------------------------------------------------


@dataclasses.dataclass
class Case:
    """A model loaded in both backends with its inputs bound.

    Every run function returns the compared outputs as numpy arrays in jaxgen's layout (channels-last) on the
    host, so timing it measures the whole computation. `compile_reference` wraps the torch module in
    torch.compile and returns a run function that calls the compiled module. The compilation itself
    happens in that function's first call.
    """

    model: str
    parameters: int
    inputs: str
    compared: str
    run_jaxgen: Callable[[], list[np.ndarray]]
    run_reference: Callable[[], list[np.ndarray]]
    compile_reference: Callable[[], Callable[[], list[np.ndarray]]] | None = None
    timed: str = "forward pass"


def count_parameters(*modules) -> int:
    return sum(parameter.numel() for module in modules for parameter in module.parameters())


def perturb_weights(module, seed: int) -> None:
    """Add WEIGHT_NOISE * standard normal noise, seeded, to every parameter of a torch module."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(WEIGHT_NOISE * torch.randn(parameter.shape, generator=generator))


def jitted(model, forward: Callable[..., Any], *inputs) -> Callable[[], list[np.ndarray]]:
    """Return a call of jax.jit(forward)(model, *inputs) over nnx.split(model) that returns numpy arrays."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda state, *args: forward(nnx.merge(graphdef, state), *args))
    inputs = tuple(jax.device_put(value) for value in inputs)

    def run() -> list[np.ndarray]:
        outputs = jax.block_until_ready(compiled(state, *inputs))
        return [np.asarray(output) for output in outputs]

    return run


def torch_call(forward: Callable[[], Sequence[Any]]) -> Callable[[], list[np.ndarray]]:
    """Return a call of a torch forward under torch.no_grad() that returns its output tensors as numpy arrays.

    `forward` returns tensors already in jaxgen's layout (a permuted view is enough), on any device.
    """
    import torch

    def run() -> list[np.ndarray]:
        with torch.no_grad():
            return [output.cpu().numpy() for output in forward()]

    return run


def torch_runs(module, bind: Callable[[Any], Callable[[], Sequence[Any]]]) -> dict[str, Any]:
    """Return the run_reference and compile_reference fields of a Case for a torch module.

    `bind(module)` returns a forward without arguments that calls `module` on the row's inputs. It is called
    once with the module and once, in compile_reference, with torch.compile(module).
    """
    import torch

    def compile_reference() -> Callable[[], list[np.ndarray]]:
        return torch_call(bind(torch.compile(module)))

    return {"run_reference": torch_call(bind(module)), "compile_reference": compile_reference}


def nchw_to_nhwc(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1))


class TinyFolders:
    """Tiny random pipeline folders from jaxgen.pipelines.tiny, written on first use under `root`."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self._written: dict[bool, pathlib.Path] = {}

    def pipeline(self, xl: bool) -> pathlib.Path:
        from jaxgen.pipelines.tiny import write_tiny_pipeline

        if xl not in self._written:
            self._written[xl] = write_tiny_pipeline(self.root / ("tiny_sdxl" if xl else "tiny_sd"), xl=xl, seed=0)
        return self._written[xl]


def prompt_ids(folder: pathlib.Path) -> np.ndarray:
    """Tokenize PROMPTS with a tiny pipeline's tokenizer into input_ids int32 [B, L]."""
    from conversion.transformers_io import load_clip_tokenizer, tokenize

    tokenizer = load_clip_tokenizer(folder / "tokenizer")
    return tokenize(tokenizer, list(PROMPTS), tokenizer.model_max_length)["input_ids"].astype(np.int32)


# ----- the rows ----------------------------------------------------------------------------------


def build_vae(folders: TinyFolders, scratch: pathlib.Path, device: torch.device) -> Case:
    """Build the VAE row: the tiny SD pipeline's VAE reconstructs images through its posterior mode."""
    import torch
    from diffusers import AutoencoderKL

    from conversion.diffusers_io import load_vae
    from torch_npu_backend.precision import to_device

    reference = AutoencoderKL.from_pretrained(folders.pipeline(False) / "vae", dtype=torch.float32).eval()
    perturb_weights(reference, seed=11)
    reference.save_pretrained(scratch / "vae")
    model = load_vae(scratch / "vae")

    images = np.random.default_rng(1).uniform(-1, 1, (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    images_torch = to_device(torch.from_numpy(images), device, "images")
    parameters = count_parameters(reference)
    reference = to_device(reference, device, "vae")
    return Case(
        model="vae", parameters=parameters,
        inputs=f"images {BATCH}x{IMAGE_SIZE}x{IMAGE_SIZE}x3", compared="reconstruction (posterior mode)",
        run_jaxgen=jitted(model, lambda vae, x: (vae(x),), nchw_to_nhwc(images)),
        **torch_runs(reference, lambda vae: lambda: [vae(images_torch).sample.permute(0, 2, 3, 1)]),
    )


def build_clip_text(folders: TinyFolders, scratch: pathlib.Path, device: torch.device, *,
                    projection: bool) -> Case:
    """Build a CLIP text row from SD's text_encoder, or with `projection` from SDXL's text_encoder_2."""
    import torch
    import transformers

    from conversion.transformers_io import load_clip_text
    from torch_npu_backend.precision import to_device

    folder = folders.pipeline(projection)
    subfolder = "text_encoder_2" if projection else "text_encoder"
    reference_class = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    reference = reference_class.from_pretrained(folder / subfolder, dtype=torch.float32).eval()
    perturb_weights(reference, seed=12 + projection)
    reference.save_pretrained(scratch / subfolder)
    model = load_clip_text(scratch / subfolder, with_projection=projection)

    ids = prompt_ids(folder)
    ids_torch = to_device(torch.from_numpy(ids.astype(np.int64)), device, "input_ids")
    # The second output: the projected embedding with a projection, else the pooled last hidden state.
    second = "text_embeds" if projection else "pooler_output"

    def forward(encoder, input_ids):
        output = encoder(input_ids)
        return output.last_hidden_state, getattr(output, second)

    def bind(encoder):
        return lambda: forward(encoder, ids_torch)

    parameters = count_parameters(reference)
    reference = to_device(reference, device, subfolder)
    return Case(
        model="clip_text_projection" if projection else "clip_text", parameters=parameters,
        inputs=f"token ids {ids.shape[0]}x{ids.shape[1]}", compared=f"last_hidden_state, {second}",
        run_jaxgen=jitted(model, forward, ids), **torch_runs(reference, bind),
    )


def build_unet(name: str, scratch: pathlib.Path, device: torch.device) -> Case:
    """Build a U-Net row: a small U-Net of one Stable Diffusion family predicts noise for a batch of latents."""
    import torch
    from diffusers import UNet2DConditionModel

    from conversion.diffusers_io import load_unet
    from torch_npu_backend.precision import to_device

    config = UNET_CONFIGS[name]
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**config).eval()
    perturb_weights(reference, seed=14)
    reference.save_pretrained(scratch / name)
    model = load_unet(scratch / name)

    rng = np.random.default_rng(2)
    size = config["sample_size"]
    sample = rng.standard_normal((BATCH, config["in_channels"], size, size)).astype(np.float32)
    timesteps = np.array([999, 421][:BATCH], np.int32)
    context = rng.standard_normal((BATCH, CONTEXT_TOKENS, config["cross_attention_dim"])).astype(np.float32)
    added: dict[str, np.ndarray] = {}
    if config.get("addition_embed_type") == "text_time":
        added["text_embeds"] = rng.standard_normal((BATCH, SDXL_POOLED_DIM)).astype(np.float32)
        # original height and width, crop top and left, target height and width, in pixels
        added["time_ids"] = np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (BATCH, 1))

    sample_torch, timesteps_torch, context_torch, added_torch = to_device(
        (torch.from_numpy(sample), torch.from_numpy(timesteps.astype(np.int64)), torch.from_numpy(context),
         {key: torch.from_numpy(value) for key, value in added.items()}),
        device, "inputs")

    def bind(unet):
        return lambda: [unet(sample_torch, timesteps_torch, context_torch,
                             added_cond_kwargs=added_torch or None).sample.permute(0, 2, 3, 1)]

    parameters = count_parameters(reference)
    reference = to_device(reference, device, name)
    inputs = f"latents {BATCH}x{size}x{size}x{config['in_channels']}, context {CONTEXT_TOKENS} tokens"
    return Case(
        model=name, parameters=parameters, inputs=inputs, compared="predicted noise",
        run_jaxgen=jitted(model, lambda unet, x, t, c, extra: (unet(x, t, c, **extra),), nchw_to_nhwc(sample),
                          timesteps, context, added),
        **torch_runs(reference, bind),
    )


def build_pipeline(folders: TinyFolders, device: torch.device, *, xl: bool) -> Case:
    """Build a pipeline row: a tiny pipeline generates images with 20 guided DDIM steps from fixed latents.

    The torch.compile side is a second diffusers pipeline from the same folder whose U-Net alone is compiled.
    """
    import diffusers
    import torch

    from jaxgen.pipelines import StableDiffusion, StableDiffusionXL
    from torch_npu_backend.precision import to_device

    folder = folders.pipeline(xl)
    reference_class = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    pipeline = (StableDiffusionXL if xl else StableDiffusion).from_pretrained(folder)

    def load_reference():
        reference = reference_class.from_pretrained(folder, dtype=torch.float32)
        reference.set_progress_bar_config(disable=True)
        for name, component in reference.components.items():
            if isinstance(component, torch.nn.Module):
                to_device(component, device, name)
        return reference

    latent_size = IMAGE_SIZE // 8
    latents = np.random.default_rng(3).standard_normal((len(PROMPTS), latent_size, latent_size, 4))
    latents = latents.astype(np.float32)
    latents_torch = to_device(torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), device, "latents")
    options = dict(num_inference_steps=PIPELINE_STEPS, guidance_scale=GUIDANCE_SCALE, height=IMAGE_SIZE,
                   width=IMAGE_SIZE)

    def run_jaxgen() -> list[np.ndarray]:
        return [pipeline(list(PROMPTS), NEGATIVE_PROMPT, latents=latents, **options)]

    def generate(reference) -> Callable[[], list[np.ndarray]]:
        def run() -> list[np.ndarray]:
            with torch.no_grad():
                result = reference(prompt=list(PROMPTS), negative_prompt=[NEGATIVE_PROMPT] * len(PROMPTS),
                                   latents=latents_torch, output_type="np", **options)
            return [np.asarray(result.images)]

        return run

    def compile_reference() -> Callable[[], list[np.ndarray]]:
        compiled = load_reference()
        compiled.unet = torch.compile(compiled.unet)
        return generate(compiled)

    reference = load_reference()
    components = [reference.unet, reference.vae, reference.text_encoder]
    if xl:
        components.append(reference.text_encoder_2)
    return Case(
        model="sdxl_pipeline" if xl else "sd_pipeline", parameters=count_parameters(*components),
        inputs=f"{len(PROMPTS)} prompts, {IMAGE_SIZE}x{IMAGE_SIZE} images, {PIPELINE_STEPS} DDIM steps, "
               f"guidance {GUIDANCE_SCALE:g}",
        compared="images in [0, 1]", run_jaxgen=run_jaxgen, run_reference=generate(reference),
        compile_reference=compile_reference, timed="whole pipeline run",
    )


def digits_models(seed: int) -> tuple[Config, torch.nn.Module, nnx.Module]:
    """Return the ddpm_digits config, its torch twin with seeded weight noise, and the jaxgen model converted from it.

    The twin stays on the CPU and in eval mode.
    """
    import torch

    from jaxgen.config import load_config
    from torch_npu_backend.models import build_torch_model, jaxgen_model_from_torch

    config = load_config(DIGITS_CONFIG)
    torch.manual_seed(seed)
    twin = build_torch_model(config).eval()
    perturb_weights(twin, seed=seed)
    return config, twin, jaxgen_model_from_torch(twin.state_dict(), config)


def build_digits_unet(device: torch.device) -> Case:
    """Build the unet_digits row: the digits U-Net predicts noise for noisy images at several timesteps and labels."""
    import torch

    from torch_npu_backend.precision import to_device

    config, twin, model = digits_models(seed=15)
    size, channels = config.model.sample_size, config.model.in_channels
    batch = len(DIGITS_LABELS)
    images = np.random.default_rng(4).standard_normal((batch, channels, size, size)).astype(np.float32)
    timesteps = np.array(DIGITS_TIMESTEPS, np.int32)
    labels = np.array(DIGITS_LABELS, np.int32)
    images_torch, timesteps_torch, labels_torch = to_device(
        (torch.from_numpy(images), torch.from_numpy(timesteps.astype(np.int64)),
         torch.from_numpy(labels.astype(np.int64))),
        device, "inputs")

    def bind(unet):
        return lambda: [unet(images_torch, timesteps_torch, labels_torch).permute(0, 2, 3, 1)]

    parameters = count_parameters(twin)
    twin = to_device(twin, device, "unet_digits")
    return Case(
        model="unet_digits", parameters=parameters,
        inputs=f"images {batch}x{size}x{size}x{channels}, timesteps {', '.join(map(str, DIGITS_TIMESTEPS))}, "
               f"labels {', '.join(map(str, DIGITS_LABELS))}",
        compared="predicted noise",
        run_jaxgen=jitted(model, lambda unet, x, t, y: (unet(x, t, y),), nchw_to_nhwc(images), timesteps, labels),
        **torch_runs(twin, bind),
    )


def build_digits_sampler(name: str, device: torch.device) -> Case:
    """Build a sampler row: a whole guided sampler run of the digits U-Net, one image per digit from one x_T."""
    import jax.numpy as jnp
    import torch

    from jaxgen.diffusion import guidance, samplers
    from jaxgen.sampling import sampler_name, sampler_options, schedule_from_config, with_sampler
    from torch_npu_backend.precision import to_device

    try:
        from torch_npu_backend.sampling import make_sample_fn
    except ImportError as error:
        raise RuntimeError(
            f"the {name} row needs torch_npu_backend.sampling.make_sample_fn, which failed to import ({error}); "
            "run the other rows, or add that module"
        ) from error

    config, twin, model = digits_models(seed=16)
    sampler, num_steps = DIGITS_SAMPLERS[name]
    sample_config = with_sampler(config.sample, sampler=sampler, num_steps=num_steps,
                                 guidance_scale=DIGITS_GUIDANCE_SCALE)
    schedule = schedule_from_config(config)
    options = sampler_options(sample_config)
    null_label = model.null_label
    size, channels = config.model.sample_size, config.model.in_channels
    labels = np.arange(null_label, dtype=np.int32)  # one image per class: the ten digits
    x_T = np.random.default_rng(5).standard_normal((len(labels), size, size, channels)).astype(np.float32)

    def draw_jaxgen(unet, x_T, labels):
        guided = guidance.cfg_model_fn(unet, DIGITS_GUIDANCE_SCALE, jnp.full_like(labels, null_label))
        x_0 = samplers.sample(sampler_name(sample_config), guided, schedule, x_T, None, labels,
                              prediction_type=config.diffusion.prediction_type, **options)
        return (jnp.clip(x_0, -1.0, 1.0),)

    x_T_torch, labels_torch = to_device(
        (torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels.astype(np.int64))),
        device, "inputs")

    def bind(unet):
        draw = make_sample_fn(config, unet, sample_config)
        return lambda: [draw(x_T_torch, labels_torch, DIGITS_GUIDANCE_SCALE).permute(0, 2, 3, 1)]

    parameters = count_parameters(twin)
    twin = to_device(twin, device, name)
    return Case(
        model=name, parameters=parameters,
        inputs=f"x_T {len(labels)}x{size}x{size}x{channels}, labels 0-{len(labels) - 1}, {num_steps} "
               f"{sampler} steps, guidance {DIGITS_GUIDANCE_SCALE:g}",
        compared="images in [-1, 1]",
        run_jaxgen=jitted(model, draw_jaxgen, x_T, labels),
        timed="whole sampler run",
        **torch_runs(twin, bind),
    )


def build_case(name: str, folders: TinyFolders, scratch: pathlib.Path, device: torch.device) -> Case:
    if name == "vae":
        return build_vae(folders, scratch, device)
    if name in ("clip_text", "clip_text_projection"):
        return build_clip_text(folders, scratch, device, projection=name == "clip_text_projection")
    if name in UNET_CONFIGS:
        return build_unet(name, scratch, device)
    if name == "unet_digits":
        return build_digits_unet(device)
    if name in DIGITS_SAMPLERS:
        return build_digits_sampler(name, device)
    return build_pipeline(folders, device, xl=name == "sdxl_pipeline")


# ----- measuring ---------------------------------------------------------------------------------


def timed(run: Callable[[], list[np.ndarray]]) -> tuple[list[np.ndarray], float]:
    started = time.perf_counter()
    outputs = run()
    return outputs, time.perf_counter() - started


def compare(model: str, jaxgen_outputs: list[np.ndarray], torch_outputs: list[np.ndarray]) -> tuple[float, float]:
    """Return the max absolute error of jaxgen's outputs against torch's, and that error over max |torch|."""
    for ours, theirs in zip(jaxgen_outputs, torch_outputs, strict=True):
        if ours.shape != theirs.shape:
            raise ValueError(f"{model}: jaxgen output has shape {ours.shape}, but the torch output has {theirs.shape}")
    ours = np.concatenate([output.astype(np.float64).ravel() for output in jaxgen_outputs])
    theirs = np.concatenate([output.astype(np.float64).ravel() for output in torch_outputs])
    max_abs_error = float(np.max(np.abs(ours - theirs)))
    return max_abs_error, max_abs_error / float(np.max(np.abs(theirs)))


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def start_compiled(case: Case) -> tuple[Callable[[], list[np.ndarray]] | None, float | str]:
    """Wrap the case's torch side in torch.compile and make its first call, which compiles.

    Returns the compiled run function and the wall time of that first call in seconds, or None and the error
    text when the row has no torch.compile side or compiling fails.
    """
    import torch

    if case.compile_reference is None:
        return None, "torch.compile is not set up for this row"
    # Each row compiles from an empty dynamo cache. Rows share module classes, so their cache entries would
    # otherwise count toward dynamo's recompile limit.
    torch._dynamo.reset()
    try:
        run_compiled = case.compile_reference()
        _, first_call = timed(run_compiled)
    except Exception as error:  # noqa: BLE001 - a failed compile is a result of the row, not the end of the run
        logger.error("%s: torch.compile failed:\n%s", case.model, traceback.format_exc())
        return None, error_text(error)
    return run_compiled, first_call


def measure(case: Case, repeats: int, *, compile_torch: bool = True) -> dict[str, Any]:
    """Run each side, compare the torch outputs with jaxgen's and return the table row.

    The sides are jaxgen, torch eager and, with `compile_torch`, torch.compile. Timed calls alternate between
    the sides, so that a change in the machine's load during the row affects all of them alike. The last
    outputs of each side are compared.
    """
    _, first_call = timed(case.run_jaxgen)
    case.run_reference()  # untimed warm-up
    run_compiled, compiled_first_call = start_compiled(case) if compile_torch else (None, None)
    compile_failure = compiled_first_call if isinstance(compiled_first_call, str) else None

    jaxgen_seconds, reference_seconds, compiled_seconds = [], [], []
    for _ in range(repeats):
        jaxgen_outputs, seconds = timed(case.run_jaxgen)
        jaxgen_seconds.append(seconds)
        reference_outputs, seconds = timed(case.run_reference)
        reference_seconds.append(seconds)
        if run_compiled is not None:
            try:
                compiled_outputs, seconds = timed(run_compiled)
            except Exception as error:  # noqa: BLE001 - as in start_compiled
                logger.error("%s: torch.compile run failed:\n%s", case.model, traceback.format_exc())
                run_compiled, compile_failure = None, error_text(error)
            else:
                compiled_seconds.append(seconds)

    max_abs_error, max_relative_error = compare(case.model, jaxgen_outputs, reference_outputs)
    jaxgen_ms = 1000 * statistics.median(jaxgen_seconds)
    torch_ms = 1000 * statistics.median(reference_seconds)
    row = {
        "model": case.model,
        "parameters": case.parameters,
        "inputs": case.inputs,
        "compared": case.compared,
        "timed": case.timed,
        "max_abs_error": max_abs_error,
        "max_relative_error": max_relative_error,
        "jaxgen_ms": jaxgen_ms,
        "compile_seconds": max(first_call - jaxgen_ms / 1000, 0.0),
        "torch_ms": torch_ms,
        "torch_over_jaxgen": torch_ms / jaxgen_ms,
        "jaxgen_seconds": jaxgen_seconds,
        "torch_seconds": reference_seconds,
        "torch_compile": None,
    }
    if compile_failure is not None:
        row["torch_compile"] = {"error": compile_failure}
    elif compile_torch:
        compiled_ms = 1000 * statistics.median(compiled_seconds)
        compiled_abs_error, compiled_relative_error = compare(case.model, jaxgen_outputs, compiled_outputs)
        row["torch_compile"] = {
            "max_abs_error": compiled_abs_error,
            "max_relative_error": compiled_relative_error,
            "ms": compiled_ms,
            "compile_seconds": max(compiled_first_call - compiled_ms / 1000, 0.0),
            "over_jaxgen": compiled_ms / jaxgen_ms,
            "seconds": compiled_seconds,
        }
    return row


def environment(torch_threads: int) -> dict[str, Any]:
    """Return the versions of the compared libraries, a description of the CPU and the thread settings."""
    import diffusers
    import flax
    import jax
    import torch
    import transformers

    cpu_model = None
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu_model = names[0] if names else None
    return {
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "cpu": {"processor": platform.processor(), "model": cpu_model, "machine": platform.machine(),
                "cpu_count": os.cpu_count()},
        "jax_backend": jax.default_backend(),
        "torch_threads": torch_threads,
    }


# ----- reporting ---------------------------------------------------------------------------------


TABLE_COLUMNS = ("model", "parameters", "inputs", "timed", "max abs error", "max relative error", "jaxgen ms",
                 "compile s", "torch ms", "torch / jaxgen")
COMPILE_COLUMNS = ("torch.compile max abs error", "torch.compile max relative error", "torch.compile ms",
                   "torch.compile compile s", "torch.compile / jaxgen")


def format_table(result: dict) -> str:
    """Render the result as Markdown: the command, the setup, then one table row per model."""
    versions = result["environment"]["versions"]
    cpu = result["environment"]["cpu"]
    with_compile = result["torch_compile"] is not None
    columns = TABLE_COLUMNS + (COMPILE_COLUMNS if with_compile else ())
    compile_note = (f"torch.compile backend {result['torch_compile']['backend']}" if with_compile
                    else "torch.compile skipped (--no-compile)")
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"{cpu['model'] or cpu['processor'] or cpu['machine']}, {cpu['cpu_count']} CPUs; jaxgen on JAX backend "
        f"{result['environment']['jax_backend']}; torch device {result['torch_device']}; {compile_note}; torch "
        f"threads {result['environment']['torch_threads']}; median of {result['repeats']} timed calls; load "
        f"average {result['load_average_start']} at the start. "
        + ", ".join(f"{name} {version}" for name, version in versions.items()) + ".",
        "",
        *busy_machine_note(result),
        "| " + " | ".join(columns) + " |",
        "|" + " --- |" * len(columns),
    ]
    for row in result["rows"]:
        if "error" in row:
            cells = [row["model"], f"failed: {row['error']}"] + [""] * (len(columns) - 2)
        else:
            cells = [
                row["model"], f"{row['parameters']:,}", row["inputs"], row["timed"], f"{row['max_abs_error']:.1e}",
                f"{row['max_relative_error']:.1e}", f"{row['jaxgen_ms']:.1f}", f"{row['compile_seconds']:.1f}",
                f"{row['torch_ms']:.1f}", f"{row['torch_over_jaxgen']:.2f}",
            ]
            if with_compile:
                cells += compile_cells(row["torch_compile"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compile_cells(compiled: dict | None) -> list[str]:
    """Return the five torch.compile cells of a table row: numbers, or the error in the first cell."""
    if compiled is None:
        return ["skipped", "", "", "", ""]
    if "error" in compiled:
        return [f"failed: {markdown_cell(compiled['error'])}", "", "", "", ""]
    return [f"{compiled['max_abs_error']:.1e}", f"{compiled['max_relative_error']:.1e}", f"{compiled['ms']:.1f}",
            f"{compiled['compile_seconds']:.1f}", f"{compiled['over_jaxgen']:.2f}"]


def markdown_cell(text: str, max_length: int = 200) -> str:
    """Escape pipes and shorten text to max_length characters so that it fits in one Markdown table cell."""
    text = text.replace("|", "\\|")
    return text if len(text) <= max_length else text[:max_length - 3] + "..."


def busy_machine_note(result: dict) -> list[str]:
    """Return a Markdown paragraph when the 1-minute load average exceeded the CPU count, else nothing."""
    cpus = result["environment"]["cpu"]["cpu_count"]
    loads = [pair[0] for pair in (result["load_average_start"], result.get("load_average_end")) if pair]
    if not loads or not cpus or max(loads) <= cpus:
        return []
    note = (f"The 1-minute load average was {max(loads):.1f} on {cpus} CPUs at the start or end of the run, so "
            "other processes shared the CPU and the timings are slower and noisier than on an idle machine.")
    if result["environment"]["torch_threads"] > 1:
        # Measured with the digits U-Net (batch 4) on 2 CPUs at load average 6: 0.07 s per eager forward with
        # one torch thread, 1 to 3.5 s with two.
        note += (f" torch ran {result['environment']['torch_threads']} threads, and on a busy machine its eager "
                 "times grow far more with several threads than with one (--threads 1).")
    return [note, ""]


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None  # not available on this platform


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    import diffusers
    import torch
    import transformers

    from torch_npu_backend.device import DeviceUnavailableError, resolve_device

    try:
        device = resolve_device(None if args.device == "auto" else args.device)
    except DeviceUnavailableError as error:
        print(f"benchmarks.parity: --device {args.device} is unavailable: {error}\nChoose --device cpu, or "
              "--device auto to use the first available device.", file=sys.stderr)
        return 2

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command_args = sys.argv[1:] if argv is None else list(argv)
    result: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.parity", *command_args]),
        "repeats": args.repeats,
        "torch_device": str(device),
        "torch_compile": {"backend": "inductor"} if args.compile else None,
        "environment": environment(torch.get_num_threads()),
        "load_average_start": load_average(),
        "rows": [],
    }

    with tempfile.TemporaryDirectory(prefix="jaxgen_parity_") as scratch:
        scratch = pathlib.Path(scratch)
        folders = TinyFolders(scratch)
        for name in args.models:
            logger.info("%s: building", name)
            try:
                row = measure(build_case(name, folders, scratch, device), args.repeats, compile_torch=args.compile)
            except Exception as error:  # noqa: BLE001 - one failed row must not hide the others
                logger.error("%s failed:\n%s", name, traceback.format_exc())
                row = {"model": name, "error": error_text(error)}
            else:
                logger.info("%s: max abs error %.2e, jaxgen %.1f ms, torch %.1f ms", name, row["max_abs_error"],
                            row["jaxgen_ms"], row["torch_ms"])
            result["rows"].append(row)
    result["load_average_end"] = load_average()

    table = format_table(result)
    print(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    markdown = pathlib.Path(args.markdown) if args.markdown else out.with_suffix(".md")
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(table + "\n")
    print(f"wrote {markdown}")
    failed = [row["model"] for row in result["rows"] if "error" in row]
    if failed:
        logger.error("failed rows: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
