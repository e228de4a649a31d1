"""Training state of the PyTorch backend: AdamW with optax's schedule, gradient clipping, EMA and checkpoints.

Each piece follows the jaxgen trainer (jaxgen.trainer.make_optimizer, ema_decay), so a config trains with
the same update rule in both backends. Checkpoints are folders of safetensors weights plus a torch.save
file that torch.load(weights_only=True) reads.
"""

from __future__ import annotations

import dataclasses
import math
import logging
import os
import pathlib
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from jaxgen import config as config_lib

__all__ = [
    "ADAM_EPS",
    "EMA",
    "Checkpoint",
    "CheckpointStore",
    "CorruptCheckpointError",
    "clip_grad_global_norm_",
    "ema_decay",
    "learning_rate_factor",
    "load_optimizer_state",
    "make_optimizer",
]

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
CHECKPOINT_FILES = (MODEL_FILE, EMA_FILE, TRAINING_STATE_FILE)

logger = logging.getLogger(__name__)

# Adam's epsilon, optax's and torch's default.
ADAM_EPS = 1e-8


# ---- optimizer, learning rate, clipping and EMA --------------------------------------------------------


def learning_rate_factor(count: int, optim: config_lib.OptimConfig, num_steps: int) -> float:
    """Return the learning rate of update `count` divided by optim.learning_rate.

    This is optax.warmup_cosine_decay_schedule(init_value=0, peak_value=lr, warmup_steps=W,
    decay_steps=max(optim.decay_steps or num_steps, W + 1), end_value=lr * end_learning_rate_fraction),
    as jaxgen's trainer builds it: count / W during warm-up, then a cosine from 1 down to the end fraction
    over the remaining decay steps, and the end fraction after them. With warm-up, update 0 has learning
    rate 0, as in jaxgen.
    """
    warmup = optim.warmup_steps
    if count < warmup:
        return count / warmup
    decay_steps = max(optim.decay_steps or num_steps, warmup + 1)
    cosine_steps = decay_steps - warmup
    progress = min(count - warmup, cosine_steps) / cosine_steps
    end = optim.end_learning_rate_fraction
    return (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress)) + end


def make_optimizer(parameters: Iterable[nn.Parameter], optim: config_lib.OptimConfig,
                   num_steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """Build AdamW and its warm-up + cosine LambdaLR from `config.optim`, matching jaxgen's optax chain.

    optax.adamw and torch.optim.AdamW use the same update, p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p),
    with bias-corrected moments and decay on every parameter. Call `scheduler.step()` after each
    `optimizer.step()`, so update n uses `learning_rate_factor(n)`, as optax's step count does.
    """

    def factor(count: int) -> float:
        # A plain function, so LambdaLR.state_dict() stores no callable and torch.load(weights_only=True) reads it.
        return learning_rate_factor(count, optim, num_steps)

    optimizer = torch.optim.AdamW(parameters, lr=optim.learning_rate, betas=(optim.b1, optim.b2), eps=ADAM_EPS,
                                  weight_decay=optim.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_optimizer_state(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                         training_state: Mapping[str, Any], optim: config_lib.OptimConfig) -> None:
    """Restore AdamW and its LambdaLR from a checkpoint's training state, with the settings of `optim`.

    Adam's moments and the update count come from the checkpoint. The learning rate, betas and weight
    decay come from the config, as in jaxgen, whose trainer rebuilds its optax chain from the config on
    resume. So a resumed run can lower optim.learning_rate after a NaN loss.
    """
    optimizer.load_state_dict(training_state["optimizer"])
    scheduler.load_state_dict(training_state["scheduler"])
    scheduler.base_lrs = [optim.learning_rate] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(betas=(optim.b1, optim.b2), eps=ADAM_EPS, weight_decay=optim.weight_decay,
                     initial_lr=optim.learning_rate, lr=optim.learning_rate * factor(scheduler.last_epoch))
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def clip_grad_global_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients in place by their global L2 norm as optax.clip_by_global_norm does, and return the norm.

    The gradients are kept when norm < max_norm and scaled by max_norm / norm otherwise. Unlike
    torch.nn.utils.clip_grad_norm_, no epsilon is added to the norm. The norm stays on the device.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        raise ValueError("no parameter has a gradient; call loss.backward() before clipping")
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    scale = torch.where(norm < max_norm, torch.ones_like(norm), max_norm / norm)
    torch._foreach_mul_(grads, scale)
    return norm


def ema_decay(step: int, max_decay: float) -> float:
    """Return the EMA decay after update `step` (0-based): min(max_decay, (1 + n) / (10 + n)), as in jaxgen."""
    return min(max_decay, (1.0 + step) / (10.0 + step))


class EMA:
    """An exponential moving average of a model's parameters, keyed by state_dict name.

    Buffers are not averaged, and `state_dict` takes them from the model.
    """

    def __init__(self, model: nn.Module, max_decay: float):
        self.max_decay = max_decay
        self.averages = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend in the parameters after update `step`: average = d * average + (1 - d) * parameter."""
        decay = ema_decay(step, self.max_decay)
        averages = list(self.averages.values())
        parameters = [p.detach() for _, p in model.named_parameters()]
        torch._foreach_mul_(averages, decay)
        torch._foreach_add_(averages, parameters, alpha=1.0 - decay)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Return the model's state_dict with every parameter replaced by its average."""
        return {name: self.averages.get(name, value) for name, value in model.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy averages from a state_dict written by `state_dict`, naming missing keys."""
        missing = sorted(set(self.averages) - set(state_dict))
        if missing:
            raise KeyError(f"the EMA weights of the checkpoint lack {len(missing)} parameters of the model, e.g. "
                           f"{missing[:5]}; the checkpoint belongs to another model, so train into another run folder")
        for name, average in self.averages.items():
            average.copy_(state_dict[name])


# ---- checkpoints -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The contents of one checkpoint, on the CPU."""

    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    # step, optimizer, scheduler, loader, parameter_names (in the optimizer's order) and world_size
    training_state: dict[str, Any]


class CorruptCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read."""


class CheckpointStore:
    """Checkpoints of one run folder: checkpoints/<step>/ with model, EMA and training-state files.

    A checkpoint is written into a temporary folder that is renamed to its step with os.replace, so a
    killed run leaves either a complete checkpoint or none. Only folders named by a step count that contain
    all three files count as checkpoints. Other step folders are skipped with a warning.
    """

    def __init__(self, workdir: pathlib.Path, *, max_to_keep: int):
        self.directory = workdir / CHECKPOINT_DIR
        self.max_to_keep = max_to_keep

    def steps(self) -> list[int]:
        """Return the steps of the complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        steps = []
        for path in self.directory.iterdir():
            if not path.name.isdigit():
                continue
            missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
            if missing:
                logger.warning("skipping the incomplete checkpoint %s: it lacks %s", path, ", ".join(missing))
                continue
            steps.append(int(path.name))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """Return the step of the newest complete checkpoint, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def remove_partial(self) -> None:
        """Delete the temporary folders of checkpoints whose writing was interrupted.

        A step's previous checkpoint that `save` had moved aside (.tmp-stale-<step>-<pid>) is moved back when
        the run was killed before the new one took its place, so no complete checkpoint is lost.
        """
        if not self.directory.is_dir():
            return
        for path in self.directory.glob(".tmp-stale-*"):
            final = self.directory / path.name.split("-")[2]
            if not final.exists():
                os.replace(path, final)
        for path in self.directory.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)

    def save(self, checkpoint: Checkpoint) -> pathlib.Path:
        """Write `checkpoint`, delete the oldest ones beyond max_to_keep and return its folder."""
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / str(checkpoint.step)
        partial = self.directory / f".tmp-{checkpoint.step}-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        metadata = {"format": "pt", "step": str(checkpoint.step)}
        save_file(_contiguous(checkpoint.model), partial / MODEL_FILE, metadata=metadata)
        save_file(_contiguous(checkpoint.ema), partial / EMA_FILE, metadata=metadata)
        torch.save(checkpoint.training_state, partial / TRAINING_STATE_FILE)
        if final.exists():
            # Rewriting a step (a run restarted with a longer schedule that saves it again): os.replace
            # cannot replace a non-empty folder, so the old one is moved aside and deleted afterwards.
            stale = self.directory / f".tmp-stale-{checkpoint.step}-{os.getpid()}"
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(partial, final)
        for step in self.steps()[:-self.max_to_keep]:
            shutil.rmtree(self.directory / str(step), ignore_errors=True)
        return final

    def restore(self, step: int) -> Checkpoint:
        """Read the checkpoint of `step` onto the CPU."""
        from safetensors.torch import load_file

        folder = self.directory / str(step)
        missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {folder} lacks {', '.join(missing)}; delete the folder to resume "
                                    "from the checkpoint before it")
        current = folder / TRAINING_STATE_FILE
        try:
            training_state = torch.load(current, map_location="cpu", weights_only=True)
            current = folder / MODEL_FILE
            model = load_file(current)
            current = folder / EMA_FILE
            ema = load_file(current)
        except Exception as error:  # noqa: BLE001 - safetensors and torch.load raise several unrelated types
            raise CorruptCheckpointError(
                f"checkpoint file {current} is unreadable ({type(error).__name__}: {error}); delete {folder} to "
                "resume from the checkpoint before it"
            ) from error
        return Checkpoint(step=step, model=model, ema=ema, training_state=training_state)


def _contiguous(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors writes only contiguous CPU tensors that share no memory.
    return {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}
