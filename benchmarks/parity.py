"""Compare jaxgen with diffusers and transformers on the same weights: output error and speed side by side.

Each model is built small but with the block layout of its family by the reference library, with seeded
random weights, saved with save_pretrained into a temporary folder and loaded into jaxgen through
`conversion`. Both backends then run the same inputs in float32 on the CPU. The component and U-Net rows
add seeded noise to every reference weight first, and the pipeline rows use the tiny pipeline folders of
jaxgen.pipelines.tiny as written.

  python -m benchmarks.parity --models all
  python -m benchmarks.parity --models vae,unet_sdxl --repeats 3 --threads 2

Columns of the printed table, the Markdown file and the JSON rows:
  max abs error       max |jaxgen - reference| over every compared output value
  max relative error  that maximum divided by max |reference|
  jaxgen ms           median time of one jitted forward after compilation, waiting for the result
  compile s           first jitted call's wall time minus that median: tracing plus XLA compilation
  torch ms            median time of one eager forward under torch.no_grad(), after one untimed call
  torch / jaxgen      torch ms divided by jaxgen ms; above 1 means jaxgen is faster

The pipeline rows time a whole 20-step DDIM generation with classifier-free guidance from fixed initial
latents, including prompt encoding and VAE decoding, and compare the images pixel by pixel in [0, 1].
Timings are wall-clock and depend on what else runs on the machine, so the JSON records the load average.
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
from typing import Any

import numpy as np

logger = logging.getLogger("benchmarks.parity")

MODELS = ("vae", "clip_text", "clip_text_projection", "unet_sd15", "unet_sd2", "unet_sdxl", "sd_pipeline",
          "sdxl_pipeline")
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
    parser.add_argument("--markdown", default="benchmarks/results/parity.md", help="Markdown table output path")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (torch.set_num_threads); default: torch's own choice")
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

    Both run functions return the compared outputs as numpy arrays in jaxgen's layout (channels-last).
    `run_jaxgen` waits for the device, so timing it measures the whole computation.
    """

    model: str
    parameters: int
    inputs: str
    compared: str
    run_jaxgen: Callable[[], list[np.ndarray]]
    run_reference: Callable[[], list[np.ndarray]]


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


def eager(forward: Callable[[], Sequence[Any]]) -> Callable[[], list[np.ndarray]]:
    """Return a call of a torch forward under torch.no_grad() that returns its output tensors as numpy arrays.

    `forward` returns tensors already in jaxgen's layout (a permuted view is enough).
    """
    import torch

    def run() -> list[np.ndarray]:
        with torch.no_grad():
            return [output.numpy() for output in forward()]

    return run


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


def build_vae(folders: TinyFolders, scratch: pathlib.Path) -> Case:
    """Build the VAE row: the tiny SD pipeline's VAE reconstructs images through its posterior mode."""
    import torch
    from diffusers import AutoencoderKL

    from conversion.diffusers_io import load_vae

    reference = AutoencoderKL.from_pretrained(folders.pipeline(False) / "vae", dtype=torch.float32).eval()
    perturb_weights(reference, seed=11)
    reference.save_pretrained(scratch / "vae")
    model = load_vae(scratch / "vae")

    images = np.random.default_rng(1).uniform(-1, 1, (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    images_torch = torch.from_numpy(images)
    return Case(
        model="vae", parameters=count_parameters(reference),
        inputs=f"images {BATCH}x{IMAGE_SIZE}x{IMAGE_SIZE}x3", compared="reconstruction (posterior mode)",
        run_jaxgen=jitted(model, lambda vae, x: (vae(x),), nchw_to_nhwc(images)),
        run_reference=eager(lambda: [reference(images_torch).sample.permute(0, 2, 3, 1)]),
    )


def build_clip_text(folders: TinyFolders, scratch: pathlib.Path, *, projection: bool) -> Case:
    """Build a CLIP text row from SD's text_encoder, or with `projection` from SDXL's text_encoder_2."""
    import torch
    import transformers

    from conversion.transformers_io import load_clip_text

    folder = folders.pipeline(projection)
    subfolder = "text_encoder_2" if projection else "text_encoder"
    reference_class = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    reference = reference_class.from_pretrained(folder / subfolder, dtype=torch.float32).eval()
    perturb_weights(reference, seed=12 + projection)
    reference.save_pretrained(scratch / subfolder)
    model = load_clip_text(scratch / subfolder, with_projection=projection)

    ids = prompt_ids(folder)
    ids_torch = torch.from_numpy(ids.astype(np.int64))
    if projection:
        def forward(encoder, input_ids):
            output = encoder(input_ids)
            return output.last_hidden_state, output.text_embeds

        def forward_reference():
            output = reference(ids_torch)
            return output.last_hidden_state, output.text_embeds

        compared = "last_hidden_state, text_embeds"
    else:
        def forward(encoder, input_ids):
            output = encoder(input_ids)
            return output.last_hidden_state, output.pooler_output

        def forward_reference():
            output = reference(ids_torch)
            return output.last_hidden_state, output.pooler_output

        compared = "last_hidden_state, pooler_output"
    return Case(
        model="clip_text_projection" if projection else "clip_text", parameters=count_parameters(reference),
        inputs=f"token ids {ids.shape[0]}x{ids.shape[1]}", compared=compared,
        run_jaxgen=jitted(model, forward, ids), run_reference=eager(forward_reference),
    )


def build_unet(name: str, scratch: pathlib.Path) -> Case:
    """Build a U-Net row: a small U-Net of one Stable Diffusion family predicts noise for a batch of latents."""
    import torch
    from diffusers import UNet2DConditionModel

    from conversion.diffusers_io import load_unet

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

    sample_torch = torch.from_numpy(sample)
    timesteps_torch = torch.from_numpy(timesteps.astype(np.int64))
    context_torch = torch.from_numpy(context)
    added_torch = {key: torch.from_numpy(value) for key, value in added.items()} or None
    inputs = f"latents {BATCH}x{size}x{size}x{config['in_channels']}, context {CONTEXT_TOKENS} tokens"
    return Case(
        model=name, parameters=count_parameters(reference), inputs=inputs, compared="predicted noise",
        run_jaxgen=jitted(model, lambda unet, x, t, c, extra: (unet(x, t, c, **extra),), nchw_to_nhwc(sample),
                          timesteps, context, added),
        run_reference=eager(lambda: [reference(sample_torch, timesteps_torch, context_torch,
                                               added_cond_kwargs=added_torch).sample.permute(0, 2, 3, 1)]),
    )


def build_pipeline(folders: TinyFolders, *, xl: bool) -> Case:
    """Build a pipeline row: a tiny pipeline generates images with 20 guided DDIM steps from fixed latents."""
    import diffusers
    import torch

    from jaxgen.pipelines import StableDiffusion, StableDiffusionXL

    folder = folders.pipeline(xl)
    reference_class = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    reference = reference_class.from_pretrained(folder, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    pipeline = (StableDiffusionXL if xl else StableDiffusion).from_pretrained(folder)

    latent_size = IMAGE_SIZE // 8
    latents = np.random.default_rng(3).standard_normal((len(PROMPTS), latent_size, latent_size, 4))
    latents = latents.astype(np.float32)
    latents_torch = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    options = dict(num_inference_steps=PIPELINE_STEPS, guidance_scale=GUIDANCE_SCALE, height=IMAGE_SIZE,
                   width=IMAGE_SIZE)

    def run_jaxgen() -> list[np.ndarray]:
        return [pipeline(list(PROMPTS), NEGATIVE_PROMPT, latents=latents, **options)]

    def run_reference() -> list[np.ndarray]:
        with torch.no_grad():
            result = reference(prompt=list(PROMPTS), negative_prompt=[NEGATIVE_PROMPT] * len(PROMPTS),
                               latents=latents_torch, output_type="np", **options)
        return [np.asarray(result.images)]

    components = [reference.unet, reference.vae, reference.text_encoder]
    if xl:
        components.append(reference.text_encoder_2)
    return Case(
        model="sdxl_pipeline" if xl else "sd_pipeline", parameters=count_parameters(*components),
        inputs=f"{len(PROMPTS)} prompts, {IMAGE_SIZE}x{IMAGE_SIZE} images, {PIPELINE_STEPS} DDIM steps, "
               f"guidance {GUIDANCE_SCALE:g}",
        compared="images in [0, 1]", run_jaxgen=run_jaxgen, run_reference=run_reference,
    )


def build_case(name: str, folders: TinyFolders, scratch: pathlib.Path) -> Case:
    if name == "vae":
        return build_vae(folders, scratch)
    if name in ("clip_text", "clip_text_projection"):
        return build_clip_text(folders, scratch, projection=name == "clip_text_projection")
    if name in UNET_CONFIGS:
        return build_unet(name, scratch)
    return build_pipeline(folders, xl=name == "sdxl_pipeline")


# ----- measuring ---------------------------------------------------------------------------------


def timed(run: Callable[[], list[np.ndarray]]) -> tuple[list[np.ndarray], float]:
    started = time.perf_counter()
    outputs = run()
    return outputs, time.perf_counter() - started


def measure(case: Case, repeats: int) -> dict[str, Any]:
    """Run both backends, compare their last outputs and return the table row.

    Timed calls alternate between the backends, so that a change in the machine's load during the row
    affects both sides alike.
    """
    _, first_call = timed(case.run_jaxgen)
    case.run_reference()  # untimed warm-up
    jaxgen_seconds, reference_seconds = [], []
    for _ in range(repeats):
        jaxgen_outputs, seconds = timed(case.run_jaxgen)
        jaxgen_seconds.append(seconds)
        reference_outputs, seconds = timed(case.run_reference)
        reference_seconds.append(seconds)

    for ours, theirs in zip(jaxgen_outputs, reference_outputs, strict=True):
        if ours.shape != theirs.shape:
            raise ValueError(
                f"{case.model}: jaxgen output has shape {ours.shape}, but the reference output has {theirs.shape}"
            )
    ours = np.concatenate([output.astype(np.float64).ravel() for output in jaxgen_outputs])
    theirs = np.concatenate([output.astype(np.float64).ravel() for output in reference_outputs])
    max_abs_error = float(np.max(np.abs(ours - theirs)))
    jaxgen_ms = 1000 * statistics.median(jaxgen_seconds)
    torch_ms = 1000 * statistics.median(reference_seconds)
    return {
        "model": case.model,
        "parameters": case.parameters,
        "inputs": case.inputs,
        "compared": case.compared,
        "max_abs_error": max_abs_error,
        "max_relative_error": max_abs_error / float(np.max(np.abs(theirs))),
        "jaxgen_ms": jaxgen_ms,
        "compile_seconds": max(first_call - jaxgen_ms / 1000, 0.0),
        "torch_ms": torch_ms,
        "torch_over_jaxgen": torch_ms / jaxgen_ms,
        "jaxgen_seconds": jaxgen_seconds,
        "torch_seconds": reference_seconds,
    }


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


def format_table(result: dict) -> str:
    """Render the result as Markdown: the command, the setup, then one table row per model."""
    versions = result["environment"]["versions"]
    cpu = result["environment"]["cpu"]
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"{cpu['model'] or cpu['processor'] or cpu['machine']}, {cpu['cpu_count']} CPUs; torch threads "
        f"{result['environment']['torch_threads']}; median of {result['repeats']} timed calls; load average "
        f"{result['load_average_start']} at the start. "
        + ", ".join(f"{name} {version}" for name, version in versions.items()) + ".",
        "",
        *busy_machine_note(result),
        "| model | parameters | inputs | max abs error | max relative error | jaxgen ms | compile s | torch ms "
        "| torch / jaxgen |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['model']} | failed: {row['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {row['model']} | {row['parameters']:,} | {row['inputs']} | {row['max_abs_error']:.1e} | "
            f"{row['max_relative_error']:.1e} | {row['jaxgen_ms']:.1f} | {row['compile_seconds']:.1f} | "
            f"{row['torch_ms']:.1f} | {row['torch_over_jaxgen']:.2f} |"
        )
    return "\n".join(lines)


def busy_machine_note(result: dict) -> list[str]:
    """Return a Markdown paragraph when the 1-minute load average exceeded the CPU count, else nothing."""
    cpus = result["environment"]["cpu"]["cpu_count"]
    loads = [pair[0] for pair in (result["load_average_start"], result.get("load_average_end")) if pair]
    if not loads or not cpus or max(loads) <= cpus:
        return []
    return [f"The 1-minute load average was {max(loads):.1f} on {cpus} CPUs at the start or end of the run, so "
            "other processes shared the CPU and the timings are slower and noisier than on an idle machine.", ""]


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

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command_args = sys.argv[1:] if argv is None else list(argv)
    result: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.parity", *command_args]),
        "repeats": args.repeats,
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
                row = measure(build_case(name, folders, scratch), args.repeats)
            except Exception as error:  # noqa: BLE001 - one failed row must not hide the others
                logger.error("%s failed:\n%s", name, traceback.format_exc())
                row = {"model": name, "error": f"{type(error).__name__}: {error}".splitlines()[0]}
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
    markdown = pathlib.Path(args.markdown)
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
