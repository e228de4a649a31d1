"""Train a jaxgen config with the PyTorch backend: `python -m torch_npu_backend.train --cfg ddpm_digits`.

Two jobs, picked by config.task:

    diffusion            the digits diffusion model (configs/ddpm_digits.py), described below;
    text_to_image_lora   LoRA fine-tuning of a Stable Diffusion or SDXL U-Net (configs/sd_lora.py,
                         configs/sdxl_lora.py) with peft and diffusers, in torch_npu_backend.train_lora,
                         whose docstring describes it. Both jobs share the loop, the metrics, the
                         checkpoints and the resume logic of `TrainingRun`.

The config file, the `--set` overrides, the `--cfg-arg` presets, the data and the batch order are jaxgen's:
the same `load_config`, `load_digits_split` and `BatchLoader` with `data.seed`. The model is the config's
torch twin (`torch_npu_backend.models`), trained with AdamW, linear warm-up and cosine decay, global-norm
gradient clipping and an EMA of the weights, set from `config.optim` as jaxgen's trainer sets them.

Mixed precision: `--precision bfloat16` (the usual choice on Ascend NPUs) or `--precision float16` runs the
forward pass under torch.autocast. The trained weights, the optimizer state, the norm layers
(`precision.keep_norms_in_float32`) and the loss stay in float32, and float16 also scales the loss with a
GradScaler whose state is saved in the checkpoints. The default is float32.

Distributed training on one host:

    python -m torch.distributed.run --nproc_per_node 2 --standalone -m torch_npu_backend.train --cfg ddpm_digits

Every process draws the same global batch (`data.batch_size` examples) and the same noise, and trains on
its contiguous slice of it under DistributedDataParallel. Process group backend: HCCL on NPU, NCCL on
CUDA, gloo on CPU. The losses that are logged are averaged over the processes, and process 0 writes the
run folder.

Run folder (`train.workdir` + "_torch", or `--workdir`): config.json, metrics.jsonl and
checkpoints/<step>/ with model.safetensors and ema.safetensors (the twin's state_dict keys, which are
the torch keys of the jaxgen model) and training_state.pt (optimizer, scheduler and loader state,
readable with torch.load(weights_only=True)). Rerunning the same command resumes from the newest
checkpoint and logs the same losses as an uninterrupted run. `--export-jaxgen DIR` writes the newest
checkpoint as a jaxgen run folder that `python -m jaxgen.sample --run DIR` and `python -m jaxgen.train`
read (diffusion job only).

Differences from `python -m jaxgen.train`:
    - Random draws come from a torch CPU generator seeded from (train.seed, step), not from JAX keys, and
      the initial weights come from torch's initialisers. So losses match jaxgen's in distribution, not
      value by value. tests/test_torch_train.py compares one step from shared weights and noise.
    - The learning rate schedule, Adam update, weight decay and clipping use optax's formulas, but torch
      computes the learning rate in float64 on the host and optax in float32, and both round the update in
      their own order. After six updates of the same gradients the parameters differed by at most 4e-7, having
      moved by 5e-3 (test_optimizer_matches_jaxgen in tests/test_torch_train.py).
    - `--export-jaxgen` converts Adam's moments too, so `python -m jaxgen.train` can continue the run.
    - No sample grids and no held-out evaluation are written. train.sample_every, train.eval_every and
      train.host_devices (a JAX setting) are ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from jaxgen import config as config_lib
from torch_npu_backend.train_state import (
    EMA,
    Checkpoint,
    CheckpointStore,
    clip_grad_global_norm_,
    load_optimizer_state,
    make_optimizer,
)

logger = logging.getLogger("torch_npu_backend.train")

METRICS_FILE = "metrics.jsonl"


# ---- distributed set-up ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the run: rank, number of processes and device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder and the logs."""
        return self.rank == 0


def setup_process(preferred_device: str | None = None) -> ProcessInfo:
    """Pick the device and, when launched by torchrun with WORLD_SIZE > 1, join the process group.

    With several processes on an accelerator, process LOCAL_RANK uses device LOCAL_RANK.

    NOTE: only the CPU path (gloo) has run, in tests/test_torch_train.py. The CUDA and NPU paths (NCCL, HCCL,
    set_device, DDP device_ids) follow the torch and torch_npu documentation but are untested here.
    """
    from torch_npu_backend.device import distributed_backend, resolve_device

    device = resolve_device(preferred_device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessInfo(rank=0, world_size=1, device=device)
    if device.type != "cpu":
        device = torch.device(device.type, int(os.environ.get("LOCAL_RANK", "0")))
        getattr(torch, device.type).set_device(device)
    dist.init_process_group(backend=distributed_backend(device))
    return ProcessInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


# ---- data ------------------------------------------------------------------------------------------------


def load_train_data(config: config_lib.Config) -> dict[str, np.ndarray]:
    """Load the training split the config names, as jaxgen's Task.load_data does."""
    from jaxgen.data import load_digits_split

    if config.data.name != "digits":
        raise ValueError(f"unknown data set {config.data.name!r}; the available one is 'digits'")
    images, labels = load_digits_split(config.data.data_dir, "train", image_size=config.data.image_size)
    return {"image": images, "label": labels}


def _load_train_data_in_order(config: config_lib.Config, process: ProcessInfo) -> dict[str, np.ndarray]:
    """Load the training data in every process, process 0 first, because it prepares the files on first use."""
    if process.is_main:
        data = load_train_data(config)
    if process.world_size > 1:
        dist.barrier()
    if not process.is_main:
        data = load_train_data(config)
    return data


# ---- the training loop -----------------------------------------------------------------------------------


def default_workdir(config: config_lib.Config) -> pathlib.Path:
    """Return the torch run folder of a config: train.workdir + "_torch"."""
    return pathlib.Path(f"{config.train.workdir}_torch")


# --precision choices: the dtype autocast runs the model in. The trained weights, the optimizer state, the
# norms and the loss stay in float32 (see torch_npu_backend.precision).
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tasks with a torch training job. Task "diffusion" also needs a torch twin of its model in
# torch_npu_backend.models.TWINS.
SUPPORTED_TASKS = ("diffusion", "text_to_image_lora")


LOCK_FILE = ".lock"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists but belongs to another user
    return True


def lock_run_folder(workdir: pathlib.Path) -> pathlib.Path:
    """Create workdir/.lock with this process's host and PID, so that two runs cannot train in one folder.

    A lock left by a process that no longer runs on this host is replaced. A lock of this process is kept.

    Raises:
        jaxgen.checkpoint.RunFolderError: another live process holds the lock; the message names it.
    """
    import socket

    from jaxgen import checkpoint as jaxgen_checkpoint

    path = workdir / LOCK_FILE
    owner = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid_text = path.read_text().strip().partition(" ")
            pid = int(pid_text) if pid_text.isdigit() else None
            if host == socket.gethostname() and pid == os.getpid():
                return path
            if host == socket.gethostname() and pid is not None and not _process_alive(pid):
                logger.warning("removing the stale lock %s of process %d, which no longer runs", path, pid)
                path.unlink(missing_ok=True)
                continue
            raise jaxgen_checkpoint.RunFolderError(
                f"run folder {workdir} is in use by process {pid_text or '?'} on host {host or '?'} (lock file "
                f"{path}); wait for that run to finish or stop it, use another --workdir, or delete {path} if that "
                "process no longer runs"
            ) from None
        with os.fdopen(descriptor, "w") as file:
            file.write(owner + "\n")
        return path
    raise jaxgen_checkpoint.RunFolderError(f"could not take the lock {path}; delete it if no run uses {workdir}")


def training_run_class(task: str) -> type[TrainingRun]:
    """Return the TrainingRun subclass that trains `task`.

    Raises:
        ValueError: the task has no torch training job; the message lists the supported tasks.
    """
    if task == "diffusion":
        return TorchTrainingRun
    if task == "text_to_image_lora":
        from torch_npu_backend.train_lora import LoRATrainingRun

        return LoRATrainingRun
    supported = ", ".join(repr(name) for name in SUPPORTED_TASKS)
    raise ValueError(f"task {task!r} has no torch training job; the supported tasks are {supported}. Train it with "
                     "python -m jaxgen.train instead")


def train(config: config_lib.Config, *, workdir: str | pathlib.Path | None = None,
          device: str | None = None, precision: str = "float32") -> pathlib.Path:
    """Train the job `config` describes with torch, resuming from the newest checkpoint in its run folder.

    Args:
        config: a diffusion config, such as configs/ddpm_digits.py, or a LoRA config (task
            "text_to_image_lora"), such as configs/sd_lora.py and configs/sdxl_lora.py.
        workdir: the run folder, or None for `default_workdir(config)`.
        device: "npu", "cuda" or "cpu", optionally with an index, or None to pick one (see resolve_device).
        precision: a key of PRECISIONS; "bfloat16" and "float16" train under autocast, and "float16" also
            scales the loss with a GradScaler.

    Raises:
        jaxgen.trainer.NonFiniteLossError: the loss or the parameters became NaN or infinite.
        jaxgen.checkpoint.RunFolderError: the run folder contains a run of another model or other data.
        ValueError: the task has no torch training job, the config has no torch twin, or data.batch_size
            does not split over the processes.
    """
    run_class = training_run_class(config.task)
    process = setup_process(device)
    run = None
    try:
        run = run_class(config, pathlib.Path(workdir) if workdir is not None else default_workdir(config), process,
                        precision=precision)
        return run.run()
    finally:
        if run is not None:
            run.release()
        if process.world_size > 1:
            dist.destroy_process_group()


class TrainingRun:
    """One process's share of a training run: the loop, the metrics and the checkpoints of every torch job.

    A subclass calls this __init__ first and then builds its job. It sets `loader` (a jaxgen loader with
    state() and restore()), `model` (the trained weights: an nn.Module, or any object with its
    named_parameters, state_dict, load_state_dict(strict=True) and train methods), `parameters` and
    `parameter_names` (the trained parameters in the optimizer's order), `optimizer`, `scheduler` and
    `ema`. It implements `train_step` and may override `training_module`.

    Args:
        config: the job.
        workdir: the run folder.
        process: this process's rank, the number of processes and the device (see `setup_process`).
        precision: a key of PRECISIONS. Subclasses run their forward pass and loss inside `autocast()` and
            update with `apply_gradients`, which scale the loss for float16.

    Raises:
        ValueError: data.batch_size does not split over the processes, or precision is unknown.
        jaxgen.checkpoint.RunFolderError: `workdir` contains a run of another model or other data.
    """

    def __init__(self, config: config_lib.Config, workdir: pathlib.Path, process: ProcessInfo, *,
                 precision: str = "float32"):
        from jaxgen import checkpoint as jaxgen_checkpoint
        from jaxgen.trainer import MetricsWriter
        from torch_npu_backend.precision import grad_scaler

        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is invalid; choose one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self.compute_dtype = PRECISIONS[precision]
        # Enabled only for float16: bfloat16 has float32's exponent range and needs no loss scaling.
        self.grad_scaler = grad_scaler(process.device, self.compute_dtype)

        batch_size = config.data.batch_size
        if batch_size % process.world_size:
            raise ValueError(f"data.batch_size={batch_size} does not split over {process.world_size} processes; "
                             f"choose a multiple of {process.world_size} or start fewer processes")
        self.config, self.workdir, self.process = config, workdir, process
        self.local_batch = batch_size // process.world_size
        # This process trains on these rows of every global batch.
        self.rows = slice(process.rank * self.local_batch, (process.rank + 1) * self.local_batch)
        self.lock_path: pathlib.Path | None = None
        if process.is_main:
            jaxgen_checkpoint.check_run_folder(workdir, config)
            workdir.mkdir(parents=True, exist_ok=True)
            self.lock_path = lock_run_folder(workdir)
        self.store = CheckpointStore(workdir, max_to_keep=config.train.keep_checkpoints)
        self.metrics_path = workdir / METRICS_FILE
        self.metrics_out = MetricsWriter(self.metrics_path)

        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, [loss, grad_norm]) still on the device
        self.last_checkpoint: int | None = None
        self.window_start, self.window_steps = time.perf_counter(), 0

    def release(self) -> None:
        """Remove the run folder's lock file, so another run may train in the folder."""
        if self.lock_path is not None:
            self.lock_path.unlink(missing_ok=True)
            self.lock_path = None

    def log_setup(self) -> None:
        """Log the task, the number of trained parameters, the device and the batch split."""
        count = sum(p.numel() for p in self.parameters)
        logger.info("task %s: %s parameters on %s in %s, %d process(es) of %d examples each", self.config.task,
                    f"{count:,}", self.process.device, self.precision, self.process.world_size, self.local_batch)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Return the autocast context of --precision on this process's device (a no-op for float32)."""
        from torch_npu_backend.precision import autocast

        return autocast(self.process.device, self.compute_dtype)

    def keep_norms_in_float32(self, module: nn.Module) -> None:
        """Run the norm layers of `module` in float32 under autocast, when --precision is not float32."""
        from torch_npu_backend.precision import keep_norms_in_float32

        if self.compute_dtype != torch.float32:
            keep_norms_in_float32(module)

    def apply_gradients(self, loss: torch.Tensor, before_clip: Callable[[], None] | None = None) -> torch.Tensor:
        """Backpropagate `loss`, clip the gradients, step the optimizer and the scheduler; return the grad norm.

        For float16 the loss is scaled before backward and the gradients unscaled before clipping. A step
        whose gradients overflow is skipped by the scaler, which then lowers its scale. `before_clip` runs
        after backward on the (still scaled) gradients, for example to average them over the processes.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_scaler.scale(loss).backward()
        if before_clip is not None:
            before_clip()
        self.grad_scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_global_norm_(self.parameters, self.config.optim.grad_clip_norm)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.scheduler.step()
        return grad_norm

    def training_module(self) -> Any:
        """Return what `train_step` runs. This is the model itself, and subclasses may wrap it for several processes."""
        return self.model

    def train_step(self, trained: Any, step: int) -> torch.Tensor:
        """Run update `step` (0-based) on this process's rows and return [loss, grad_norm] on the device."""
        raise NotImplementedError

    def run(self) -> pathlib.Path:
        """Train from the newest checkpoint to train.num_steps and return the run folder."""
        t = self.config.train
        start = self.resume()
        trained = self.training_module()
        self.model.train()
        for step in range(start, t.num_steps):
            step_started = time.perf_counter()
            self.pending.append((step + 1, self.train_step(trained, step)))
            if step == start:
                logger.info("ran the first train step in %.1f s", time.perf_counter() - step_started)
                self.window_start = time.perf_counter()
            else:
                self.window_steps += 1
            done = step + 1
            if done % t.log_every == 0:
                self.flush()
            if done % t.checkpoint_every == 0 and done < t.num_steps:
                self.save(done)
        if start < t.num_steps:
            self.save(t.num_steps)
        else:
            logger.info("the newest checkpoint is step %d of train.num_steps=%d; nothing to train", start,
                        t.num_steps)
        logger.info("run folder: %s (metrics.jsonl, checkpoints/)", self.workdir)
        return self.workdir

    def resume(self) -> int:
        """Load the newest checkpoint, if any, prepare metrics.jsonl and return the step to start from."""
        from jaxgen import checkpoint as jaxgen_checkpoint

        step = self.store.latest_step() if self.process.is_main else None
        if self.process.world_size > 1:
            # Process 0 decides, so every process resumes from the same step.
            shared = [step]
            dist.broadcast_object_list(shared, src=0)
            step = shared[0]
        if self.process.is_main:
            self.store.remove_partial()
        if step is None:
            if self.process.is_main:
                self.metrics_path.unlink(missing_ok=True)
            return 0

        checkpoint = self.store.restore(step)
        self.model.load_state_dict(checkpoint.model, strict=True)
        self.ema.load_state_dict(checkpoint.ema)
        load_optimizer_state(self.optimizer, self.scheduler, checkpoint.training_state, self.config.optim)
        self.loader.restore(checkpoint.training_state["loader"])
        if self.grad_scaler.is_enabled() and "grad_scaler" in checkpoint.training_state:
            self.grad_scaler.load_state_dict(checkpoint.training_state["grad_scaler"])
        self.last_checkpoint = step
        if self.process.is_main:
            jaxgen_checkpoint.truncate_metrics(self.metrics_path, step)
            logger.info("resumed from the checkpoint of step %d in %s", step, self.store.directory)
        return step

    def _kept_message(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        return f"the newest checkpoint is step {self.last_checkpoint} in {self.store.directory}"

    def flush(self) -> None:
        """Average the pending metrics over the processes, check them and write their mean (process 0).

        Raises:
            jaxgen.trainer.NonFiniteLossError: a pending loss is NaN or infinite. The message names the step.
        """
        from jaxgen.trainer import NonFiniteLossError

        if not self.pending:
            return
        steps = [step for step, _ in self.pending]
        values = torch.stack([value for _, value in self.pending])  # [n, 2]
        self.pending.clear()
        if self.process.world_size > 1:
            dist.all_reduce(values)
            values = values / self.process.world_size
        host = values.cpu().numpy()
        for step, (loss, _) in zip(steps, host):
            if not math.isfinite(float(loss)):
                raise NonFiniteLossError(
                    f"training loss became {float(loss)} at step {step}; stopped without saving, and "
                    f"{self._kept_message()}. Lower optim.learning_rate or optim.grad_clip_norm, then rerun the "
                    "same command to resume"
                )
        elapsed = time.perf_counter() - self.window_start
        record = {"step": steps[-1], "loss": float(np.mean(host[:, 0], dtype=np.float64)),
                  "grad_norm": float(np.mean(host[:, 1], dtype=np.float64)),
                  "steps_per_s": self.window_steps / max(elapsed, 1e-9)}
        if self.process.is_main:
            self.metrics_out.write(record)
            logger.info("step %d: loss %.4f, grad norm %.3f, %.2f steps/s", record["step"], record["loss"],
                        record["grad_norm"], record["steps_per_s"])
        self.window_start, self.window_steps = time.perf_counter(), 0

    def save(self, step: int) -> None:
        """Flush the metrics, check the parameters and write the checkpoint of `step` (process 0).

        Raises:
            jaxgen.trainer.NonFiniteLossError: a parameter is NaN or infinite, and nothing is written.
        """
        from jaxgen import checkpoint as jaxgen_checkpoint
        from jaxgen.trainer import NonFiniteLossError

        self.flush()
        if not bool(torch.stack([p.isfinite().all() for p in self.parameters]).all()):
            raise NonFiniteLossError(
                f"parameters became NaN or infinite by step {step} although the loss was finite; stopped without "
                f"saving, and {self._kept_message()}. Check optim.learning_rate={self.config.optim.learning_rate!r}"
            )
        if self.process.is_main:
            # config.json is written with the checkpoint, so a run that fails earlier leaves no claim on the folder.
            config_lib.save_config(self.config, self.workdir / jaxgen_checkpoint.CONFIG_FILE)
            training_state = {
                "step": step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "loader": self.loader.state(),
                "parameter_names": self.parameter_names,
                "world_size": self.process.world_size,
            }
            if self.grad_scaler.is_enabled():
                training_state["grad_scaler"] = self.grad_scaler.state_dict()
            self.store.save(Checkpoint(step, self.model.state_dict(), self.ema.state_dict(self.model), training_state))
        self.last_checkpoint = step
        self.window_start = time.perf_counter()  # keep checkpoint writing out of the steps/s figure


class TorchTrainingRun(TrainingRun):
    """One process's share of a diffusion training run on the digits: the torch twin, AdamW, EMA and data.

    Arguments and errors are those of TrainingRun, plus ValueError when the config has no torch twin.
    """

    def __init__(self, config: config_lib.Config, workdir: pathlib.Path, process: ProcessInfo, *,
                 precision: str = "float32"):
        from jaxgen.data import BatchLoader
        from torch_npu_backend import diffusion
        from torch_npu_backend.models import build_torch_model

        super().__init__(config, workdir, process, precision=precision)
        train_data = _load_train_data_in_order(config, process)
        self.loader = BatchLoader(train_data, config.data.batch_size, seed=config.data.seed)
        _, height, width, channels = train_data["image"].shape
        self.image_shape = (channels, height, width)

        torch.manual_seed(config.train.seed)
        self.model = build_torch_model(config).to(process.device)
        self.keep_norms_in_float32(self.model)
        self.parameter_names = [name for name, _ in self.model.named_parameters()]  # the optimizer's order
        self.parameters = list(self.model.parameters())
        self.optimizer, self.scheduler = make_optimizer(self.parameters, config.optim, config.train.num_steps)
        self.ema = EMA(self.model, config.optim.ema_decay)
        self.schedule = diffusion.schedule_from_config(config).to(process.device)
        self.log_setup()

    def training_module(self) -> nn.Module:
        """Return the model, wrapped in DistributedDataParallel when there are several processes."""
        from torch.nn.parallel import DistributedDataParallel

        if self.process.world_size == 1:
            return self.model
        device_ids = None if self.process.device.type == "cpu" else [self.process.device]
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def train_step(self, trained: nn.Module, step: int) -> torch.Tensor:
        """Run update `step` (0-based) on this process's rows and return [loss, grad_norm] on the device.

        `trained` is the model, or its DistributedDataParallel wrapper, which averages the gradients over
        the processes during backward.
        """
        from torch_npu_backend import diffusion

        d, device = self.config.diffusion, self.process.device
        batch = next(self.loader)  # the global batch, the same in every process
        images = torch.from_numpy(batch["image"][self.rows]).permute(0, 3, 1, 2).to(device)  # [b, C, H, W]
        labels = torch.from_numpy(batch["label"][self.rows]).long().to(device)
        draws = diffusion.draw_noise(diffusion.step_generator(self.config.train.seed, step),
                                     self.config.data.batch_size, self.image_shape, d.num_train_timesteps)
        draws = draws.slice(self.rows.start, self.rows.stop)
        labels = diffusion.drop_labels(labels, self.model.null_label, d.cond_drop_prob, draws.drop_uniform.to(device))
        with self.autocast():
            loss = diffusion.training_loss(trained, self.schedule, images, labels, draws.noise.to(device),
                                           draws.timesteps.to(device), prediction_type=d.prediction_type,
                                           min_snr_gamma=d.min_snr_gamma)
        grad_norm = self.apply_gradients(loss)
        self.ema.update(self.model, step)
        return torch.stack([loss.detach(), grad_norm.detach()])


# ---- export to jaxgen ------------------------------------------------------------------------------------


def export_jaxgen(config: config_lib.Config, torch_workdir: str | pathlib.Path, jaxgen_workdir: str | pathlib.Path,
                  *, step: int | None = None) -> pathlib.Path:
    """Write a torch checkpoint as a jaxgen run folder that jaxgen.sample and jaxgen.train read.

    The model and EMA weights go through conversion.rules.torch_to_nnx, and Adam's moments and step count
    become the optax state of jaxgen's optimizer, so `python -m jaxgen.train` continues the run from there.
    The data loader position is kept. `step` None exports the newest checkpoint.

    Raises:
        jaxgen.checkpoint.RunFolderError: the torch run folder has no checkpoint, or `jaxgen_workdir`
            contains a run of another model or a checkpoint of the exported step or a later one.
    """
    from jaxgen import checkpoint as jaxgen_checkpoint

    store = CheckpointStore(pathlib.Path(torch_workdir), max_to_keep=1)
    step = store.latest_step() if step is None else step
    if step is None:
        raise jaxgen_checkpoint.RunFolderError(f"torch run folder {torch_workdir} has no checkpoint under "
                                               f"{store.directory}; train first")
    checkpoint = store.restore(step)
    jaxgen_workdir = pathlib.Path(jaxgen_workdir)
    jaxgen_checkpoint.check_run_folder(jaxgen_workdir, config)
    jaxgen_workdir.mkdir(parents=True, exist_ok=True)
    jaxgen_store = jaxgen_checkpoint.CheckpointStore(jaxgen_workdir, max_to_keep=config.train.keep_checkpoints)
    try:
        newest = jaxgen_store.latest_step()
        if newest is not None and newest >= step:
            raise jaxgen_checkpoint.RunFolderError(
                f"jaxgen run folder {jaxgen_workdir} already has a checkpoint of step {newest}, not older than the "
                f"exported step {step}; export into another folder or delete {jaxgen_store.directory}"
            )
        state = _jaxgen_train_state(config, checkpoint)
        config_lib.save_config(config, jaxgen_workdir / jaxgen_checkpoint.CONFIG_FILE)
        jaxgen_store.save(step, state, {"loader": checkpoint.training_state["loader"], "step": step})
    finally:
        jaxgen_store.close()
    return jaxgen_workdir


def _jaxgen_train_state(config: config_lib.Config, checkpoint: Checkpoint) -> Any:
    """Convert a torch checkpoint into the jaxgen.trainer.TrainState that jaxgen's trainer checkpoints."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxgen import trainer
    from torch_npu_backend.models import jaxgen_model_from_torch

    def params_of(state_dict: Mapping[str, torch.Tensor]) -> nnx.State:
        return nnx.state(jaxgen_model_from_torch(state_dict, config), nnx.Param)

    params = params_of(checkpoint.model)
    tx = trainer.make_optimizer(config.optim, config.train.num_steps)
    opt_state = tx.init(params)
    adam = _adam_moments(checkpoint, params_of)
    if adam is not None:
        mu, nu, count = adam
        # Both `count` fields of the chain (Adam's bias correction and the schedule) count updates.
        opt_state = optax.tree_utils.tree_set(opt_state, mu=mu, nu=nu, count=jnp.asarray(count, jnp.int32))
    return trainer.TrainState(step=jnp.int32(checkpoint.step), params=params, ema_params=params_of(checkpoint.ema),
                              opt_state=opt_state)


def _adam_moments(checkpoint: Checkpoint, params_of) -> tuple[Any, Any, int] | None:
    """Return (mu, nu, update count) of a checkpoint's AdamW state as jaxgen params, or None before any update."""
    # torch keys its optimizer state by parameter index, in the order of model.parameters().
    names = checkpoint.training_state["parameter_names"]
    state = checkpoint.training_state["optimizer"]["state"]
    if not state:
        return None
    mu = params_of({name: state[index]["exp_avg"] for index, name in enumerate(names)})
    nu = params_of({name: state[index]["exp_avg_sq"] for index, name in enumerate(names)})
    return mu, nu, int(state[0]["step"])


# ---- command line ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of `torch_npu_backend.train`."""
    parser = argparse.ArgumentParser(prog="python -m torch_npu_backend.train", description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", required=True, help="config file, or the name of a file in configs/")
    parser.add_argument("--cfg-arg", default=None, help="argument passed to the config's get_config(arg)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.learning_rate=3e-4 (repeatable)")
    parser.add_argument("--workdir", default=None,
                        help="run folder (default: the config's train.workdir followed by _torch)")
    parser.add_argument("--device", default=None,
                        help="npu, cuda or cpu, optionally with an index (default: JAXGEN_TORCH_DEVICE, else the "
                             "first available of npu, cuda, cpu)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="float32",
                        help="compute dtype under autocast; weights, norms and the loss stay float32, and float16 "
                             "scales the loss (default: float32; bfloat16 suits Ascend NPUs)")
    parser.add_argument("--export-jaxgen", default=None, metavar="DIR",
                        help="after training, write the newest checkpoint as a jaxgen run folder DIR")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run `torch_npu_backend.train` and return the process exit code."""
    args = parse_args(argv)
    # JAX only builds the noise schedule and the export here, on the host. Keep it off the accelerator that
    # torch trains on: a CUDA build of jaxlib reserves most of the GPU memory in every process that uses it.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        config = config_lib.load_config(args.cfg, args.overrides, arg=args.cfg_arg)
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print("\n".join(config_lib.describe(config)))
        return 0

    from jaxgen import checkpoint as jaxgen_checkpoint
    from jaxgen.trainer import NonFiniteLossError
    from torch_npu_backend.device import DeviceUnavailableError

    if args.export_jaxgen and config.task != "diffusion":
        logger.error("--export-jaxgen converts diffusion checkpoints, not task %r; a LoRA run writes its adapters to "
                     "lora/pytorch_lora_weights.safetensors in the run folder, which jaxgen's load_lora_weights "
                     "reads. Drop --export-jaxgen", config.task)
        return 2
    workdir = pathlib.Path(args.workdir) if args.workdir else default_workdir(config)
    try:
        train(config, workdir=workdir, device=args.device, precision=args.precision)
        if args.export_jaxgen and is_main:
            exported = export_jaxgen(config, workdir, args.export_jaxgen)
            logger.info("wrote the jaxgen run folder %s", exported)
    except (NonFiniteLossError, jaxgen_checkpoint.RunFolderError) as error:
        logger.error("%s", error)
        return 1
    except DeviceUnavailableError as error:
        logger.error("%s", error)
        return 2
    except (ValueError, FileNotFoundError) as error:
        # Config values the job rejects, unreadable checkpoints (CorruptCheckpointError) and missing files.
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
