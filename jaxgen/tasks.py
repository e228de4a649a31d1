"""Training tasks: what a model is, what it is trained to minimise and how it is checked during training.

Each task builds its model from `config.model`, defines a loss that the trainer differentiates inside one
jitted step, and evaluates or samples from the EMA weights at intervals. Tasks are looked up by the config's
`task` name.

| task | model | loss |
| --- | --- | --- |
| `diffusion` | LabelConditionedUNet | ε/v/x0 MSE on q(x_t | x_0) with label dropout for classifier-free guidance |
| `classifier` | DigitClassifier | cross-entropy on clean images (the scorer of generated samples) |
| `noisy_classifier` | NoisyClassifier | cross-entropy on noised images x_t at random t (for classifier guidance) |
| `text_to_image_lora` | LoRA adapters on a Stable Diffusion or SDXL U-Net | ε/v MSE on VAE latents with caption dropout (in `jaxgen.tasks_text_to_image`) |
| `vae` | AutoencoderKL, optionally with a PatchGAN discriminator | L1/MSE + KL, optional LPIPS and hinge GAN loss (in `jaxgen.tasks_vae`) |
| `opensora` | two stages, `opensora_vae` then `opensora_stdit` | see `jaxgen.tasks_opensora` |
| `opensora_vae` | Open-Sora 1.2's video VAE, optionally with a per-frame PatchGAN | L1/MSE + KL per clip, optional LPIPS and GAN per frame |
| `opensora_stdit` | STDiT3 on frozen video-VAE latents and frozen T5 features | rectified-flow velocity MSE with caption dropout |

A task also names which model variables the trainer differentiates, optimises and checkpoints (`trainable`,
nnx.Param unless a task overrides it), loads its data and builds its batch loader.
"""

from __future__ import annotations

import importlib
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgen import images as image_io
from jaxgen import sampling
from jaxgen.config import Config
from jaxgen.data import BatchLoader, load_digits_split
from jaxgen.diffusion import forward, guidance
from jaxgen.models.classifier import DigitClassifier, DigitClassifierConfig, NoisyClassifier, NoisyClassifierConfig
from jaxgen.models.label_unet import LabelConditionedUNet
from jaxgen.models.unet_2d_condition import UNet2DConditionConfig

Batch = dict[str, jax.Array]


class Task:
    """Base class: a model, its loss and its periodic checks. Subclasses fill in the three methods."""

    model_config_type: type = object
    # The variables the trainer differentiates, optimises, averages and checkpoints. The rest of the model
    # state is passed to the train step unchanged.
    trainable: nnx.filterlib.Filter = nnx.Param

    def __init__(self, config: Config, held_out: dict[str, np.ndarray]):
        if not isinstance(config.model, self.model_config_type):
            raise ValueError(
                f"task {config.task!r} needs model config {self.model_config_type.__name__}, "
                f"got {type(config.model).__name__}"
            )
        self.config = config
        self.held_out = held_out

    @classmethod
    def load_data(cls, config: Config) -> tuple[Any, dict[str, np.ndarray]]:
        """Return (training data for `make_loader`, held-out data for the constructor), by default the digits."""
        if config.data.name != "digits":
            raise ValueError(f"unknown data set {config.data.name!r}; the available one is 'digits'")
        train = load_digits_split(config.data.data_dir, "train", image_size=config.data.image_size)
        test = load_digits_split(config.data.data_dir, "test", image_size=config.data.image_size)
        return {"image": train[0], "label": train[1]}, {"image": test[0], "label": test[1]}

    def make_loader(self, train_data: Any) -> BatchLoader:
        """Return an endless, resumable batch iterator with `state()` and `restore(state)` over `train_data`."""
        return BatchLoader(train_data, self.config.data.batch_size, seed=self.config.data.seed)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    def loss_fn(self, model: nnx.Module, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def evaluate(self, model: nnx.Module) -> dict[str, float]:
        """Return held-out metrics of `model` (the EMA weights); empty when the task has none."""
        return {}

    def write_samples(self, graphdef: nnx.GraphDef, rest: nnx.State, params: nnx.State, step: int,
                      workdir: pathlib.Path) -> pathlib.Path | None:
        """Write a sample grid for `step` and return its path; None when the task draws no samples."""
        return None

    def export(self, graphdef: nnx.GraphDef, rest: nnx.State, params: nnx.State, step: int,
               workdir: pathlib.Path) -> pathlib.Path | None:
        """Write the trained weights in a format other tools read, after each checkpoint; None when nothing is written.

        `params` are the EMA weights of the `trainable` variables and `rest` the other model state.
        """
        return None


class DiffusionTask(Task):
    """Class-conditional denoising diffusion with a learned null class."""

    model_config_type = UNet2DConditionConfig

    def __init__(self, config: Config, held_out: dict[str, np.ndarray]):
        super().__init__(config, held_out)
        self.schedule = sampling.schedule_from_config(config)
        sampling.sampler_options(config.sample)  # reject an unknown sampler before training starts
        self._sample_fn = None

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return LabelConditionedUNet(self.config.model, rngs=rngs)

    def loss_fn(self, model, batch, key):
        d = self.config.diffusion
        images, labels = batch["image"], batch["label"]
        drop_key, t_key, noise_key = jax.random.split(key, 3)
        labels = guidance.drop_condition(drop_key, labels, model.null_label, d.cond_drop_prob)
        t = jax.random.randint(t_key, (images.shape[0],), 0, d.num_train_timesteps)
        noise = jax.random.normal(noise_key, images.shape, images.dtype)
        x_t = forward.q_sample(self.schedule, images, t, noise)
        output = model(x_t, t, labels)
        per_example = forward.diffusion_loss(
            self.schedule, output, images, noise, t, prediction_type=d.prediction_type, min_snr_gamma=d.min_snr_gamma
        )
        loss = per_example.mean()
        return loss, {"loss": loss}

    def write_samples(self, graphdef, rest, params, step, workdir):
        s = self.config.sample
        num_classes = self.config.model.num_class_embeds - 1
        if self._sample_fn is None:
            self._sample_fn = sampling.make_sample_fn(
                graphdef,
                rest,
                self.schedule,
                s,
                image_shape=self.held_out["image"].shape[1:],
                prediction_type=self.config.diffusion.prediction_type,
                null_label=num_classes,
            )
        labels = jnp.tile(jnp.arange(num_classes, dtype=jnp.int32), s.samples_per_class)
        key = jax.random.PRNGKey(self.config.train.seed)
        images = self._sample_fn(params, key, labels, jnp.float32(s.guidance_scale))
        path = workdir / "samples" / f"step_{step:06d}.png"
        return image_io.save_grid(np.asarray(images), path, ncols=num_classes)


class ClassifierTask(Task):
    """A digit classifier on clean images; its features also score generated samples."""

    model_config_type = DigitClassifierConfig

    def build_model(self, rngs):
        return DigitClassifier(self.config.model, rngs=rngs)

    def loss_fn(self, model, batch, key):
        images = _augment(key, batch["image"])
        logits = model(images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        return loss, {"loss": loss, "accuracy": accuracy}

    def evaluate(self, model):
        logits = jax.jit(lambda m, x: m(x))(model, jnp.asarray(self.held_out["image"]))
        accuracy = float((np.asarray(logits).argmax(-1) == self.held_out["label"]).mean())
        return {"held_out_accuracy": accuracy}


class NoisyClassifierTask(Task):
    """A classifier p(y | x_t, t) trained on images noised by the diffusion forward process."""

    model_config_type = NoisyClassifierConfig

    def __init__(self, config: Config, held_out: dict[str, np.ndarray]):
        super().__init__(config, held_out)
        self.schedule = sampling.schedule_from_config(config)

    def build_model(self, rngs):
        return NoisyClassifier(self.config.model, rngs=rngs)

    def loss_fn(self, model, batch, key):
        images, labels = batch["image"], batch["label"]
        t_key, noise_key = jax.random.split(key)
        t = jax.random.randint(t_key, (images.shape[0],), 0, self.config.diffusion.num_train_timesteps)
        x_t = forward.q_sample(self.schedule, images, t, jax.random.normal(noise_key, images.shape))
        logits = model(x_t, t)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, {"loss": loss}

    def evaluate(self, model):
        """Return held-out accuracy at a few noise levels, with fixed noise."""
        images = jnp.asarray(self.held_out["image"])
        noise = jax.random.normal(jax.random.PRNGKey(0), images.shape)
        metrics = {}
        for t_value in (0, 250, 500, 750):
            t = jnp.full((images.shape[0],), t_value, jnp.int32)
            x_t = forward.q_sample(self.schedule, images, t, noise)
            logits = jax.jit(lambda m, x, tt: m(x, tt))(model, x_t, t)
            metrics[f"held_out_accuracy_t{t_value}"] = float((np.asarray(logits).argmax(-1) == self.held_out["label"]).mean())
        return metrics


def _augment(key: jax.Array, images: jax.Array, max_shift: int = 1) -> jax.Array:
    """Shift each image by up to `max_shift` pixels, so the scorer does not key on exact pixel positions."""
    shifts = jax.random.randint(key, (images.shape[0], 2), -max_shift, max_shift + 1)
    return jax.vmap(lambda image, shift: jnp.roll(image, shift, axis=(0, 1)))(images, shifts)


TASKS: dict[str, type[Task]] = {
    "diffusion": DiffusionTask,
    "classifier": ClassifierTask,
    "noisy_classifier": NoisyClassifierTask,
}
# Tasks defined in other modules as (module, class). They subclass Task, so this module imports them on
# first use rather than at import time, which would be circular.
OTHER_MODULE_TASKS: dict[str, tuple[str, str]] = {
    "text_to_image_lora": ("jaxgen.tasks_text_to_image", "TextToImageLoRATask"),
    "vae": ("jaxgen.tasks_vae", "VAETask"),
    "opensora": ("jaxgen.tasks_opensora", "OpenSoraTask"),
    "opensora_vae": ("jaxgen.tasks_opensora", "OpenSoraVAETask"),
    "opensora_stdit": ("jaxgen.tasks_opensora", "OpenSoraSTDiTTask"),
}


def task_type(name: str) -> type[Task]:
    """Return the Task class registered under `name`."""
    if name in TASKS:
        return TASKS[name]
    if name in OTHER_MODULE_TASKS:
        module, class_name = OTHER_MODULE_TASKS[name]
        return getattr(importlib.import_module(module), class_name)
    raise ValueError(f"unknown task {name!r}; choose one of {sorted([*TASKS, *OTHER_MODULE_TASKS])}")


def stage_configs(config: Config) -> list[Config]:
    """Return the configs the trainer runs in order: the stages of a multi-stage task, else [config]."""
    stages = getattr(task_type(config.task), "stage_configs", None)
    return list(stages(config)) if stages is not None else [config]


def make_task(config: Config, held_out: dict[str, np.ndarray]) -> Task:
    """Build the task a config names."""
    return task_type(config.task)(config, held_out)


def model_summary(model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param) -> dict[str, Any]:
    """Return the parameter count (nnx.Param) of a model and the size of its `trainable` variables."""

    def count(state: nnx.State) -> int:
        return int(sum(x.size for x in jax.tree.leaves(state)))

    return {"parameters": count(nnx.state(model, nnx.Param)), "trainable": count(nnx.state(model, trainable))}
