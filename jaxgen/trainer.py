"""The training loop shared by every task: data, jitted train step, EMA, checkpoints, metrics and samples.

The train step is a pure function of (TrainState, rest, batch, key) compiled once. TrainState holds the
variables the task trains (its `trainable` filter: nnx.Param, or only the LoRA adapters of a fine-tune), and
`rest` is the remaining, frozen model state. The frozen state is an argument rather than a closure constant,
so gigabytes of base weights are not embedded in the compiled program. The loop keeps losses on the
device and reads them only every `log_every` steps and before each checkpoint, so the host waits for the device
only at those points. Before a checkpoint is written, every pending loss is checked: a NaN or inf stops
the run, names the step and leaves the last good checkpoint as the newest one.

Determinism across restarts: the step key is `fold_in(PRNGKey(seed), step)` and the loader position is
saved with each checkpoint, so a resumed run draws the same batches and keys as an uninterrupted one.

Devices: the step runs on a ("data", "fsdp") mesh of train.host_devices devices. Batches are split over the
whole mesh, and the trainable state (parameters, EMA, optimizer moments) and the frozen state are sharded
over the train.fsdp devices of the "fsdp" axis. jaxgen.sharding describes the layout and multi-host runs.
The compiled step takes and returns the state in that layout, so donation reuses its buffers, and a
resumed run restores every array straight into its shards.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxgen import checkpoint as ckpt
from jaxgen import config as config_lib
from jaxgen import sharding as sharding_lib
from jaxgen import tasks as tasks_lib

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@struct.dataclass
class TrainState:
    """Everything a train step reads and writes; checkpointed as one pytree."""

    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: nnx.State  # the task's trainable variables
    ema_params: nnx.State
    opt_state: optax.OptState


def make_optimizer(optim: config_lib.OptimConfig, num_steps: int) -> optax.GradientTransformation:
    """Build AdamW with linear warm-up, cosine decay and global-norm gradient clipping."""
    decay_steps = optim.decay_steps or num_steps
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.learning_rate,
        warmup_steps=optim.warmup_steps,
        decay_steps=max(decay_steps, optim.warmup_steps + 1),
        end_value=optim.learning_rate * optim.end_learning_rate_fraction,
    )
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip_norm),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay),
    )


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
    """Return the EMA decay for update `step`: min(max_decay, (1 + n) / (10 + n))."""
    n = step.astype(jnp.float32)
    return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))


def create_model(task: tasks_lib.Task, seed: int) -> nnx.Module:
    """Initialise the task's model from `seed`, drawing the initial weights with the "rbg" PRNG.

    Initialisation runs eagerly, so XLA compiles one small program per distinct parameter shape. With the
    default threefry PRNG those programs dominate start-up; rbg's compile faster. On the 2-core CPU machine
    the digits U-Net took 14-17 s this way, against 31 s compiled as one nnx.jit program and 60 s eagerly
    with threefry keys (a one-off measurement with other jobs sharing the cores).
    """
    return task.build_model(nnx.Rngs(jax.random.key(seed, impl="rbg")))


def make_train_step(task: tasks_lib.Task, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    max_ema_decay: float):
    """Build the pure train step (state, rest, batch, key) -> (state, metrics).

    `rest` is the model state outside the task's trainable filter; it is read, never differentiated or changed.
    """

    def loss_of_params(params, rest, batch, key):
        model = nnx.merge(graphdef, params, rest)
        return task.loss_fn(model, batch, key)

    def train_step(state: TrainState, rest: nnx.State, batch, key):
        if getattr(task, "loss_needs_step", False):
            batch = dict(batch, step=state.step)  # e.g. a GAN loss that switches on after a warm-up
        grads, metrics = jax.grad(loss_of_params, has_aux=True)(state.params, rest, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, max_ema_decay)
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def all_finite(tree: Any) -> bool:
    """Return whether every element of every array in `tree` is finite."""
    if not jax.tree.leaves(tree):
        return True
    return bool(_all_finite_flag(tree))


@jax.jit
def _all_finite_flag(tree: Any) -> jax.Array:
    # One compiled program rather than one eager op per array: with several CPU processes, hundreds of eager
    # ops that each contain a cross-process reduction deadlocked the Gloo collectives (JAX 0.10.2).
    return jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]).all()


def make_mesh(num_devices: int, fsdp: int = 1) -> jax.sharding.Mesh:
    """Build the ("data", "fsdp") training mesh for train.host_devices=num_devices and train.fsdp=fsdp.

    With several processes the mesh spans every device of every process, whatever `num_devices` is. A single
    process with fsdp=1 that requests more devices than exist trains on all of them and logs a warning,
    because the default train.host_devices=2 is a CPU setting and a one-GPU machine must still train. With
    fsdp > 1 a missing device raises ValueError (see jaxgen.sharding.make_mesh).
    """
    available = jax.device_count()
    if jax.process_count() > 1:
        num_devices = available
    elif fsdp == 1 and num_devices > available:
        logger.warning("train.host_devices=%d but only %d %s device(s) exist; training data-parallel on %d",
                       num_devices, available, jax.devices()[0].platform, available)
        num_devices = available
    return sharding_lib.make_mesh(num_devices, fsdp)


def init_train_state(params: nnx.State, tx: optax.GradientTransformation,
                     mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState]:
    """Build the step-0 TrainState in the FSDP layout on `mesh`; returns (state, its tree of NamedSharding).

    The optimizer state is created by a jitted tx.init straight into its shards, so no device stores a
    whole copy of the moments.
    NOTE: `params` come from eager initialisation on the default device, so that device must still fit one
    whole copy of the trainable parameters.
    """
    abstract = jax.eval_shape(
        lambda p: TrainState(step=jnp.int32(0), params=p, ema_params=p, opt_state=tx.init(p)), params
    )
    shardings = sharding_lib.param_sharding(abstract, mesh)
    params = jax.device_put(params, shardings.params)
    # The EMA starts as a copy: donating the state must not see one buffer twice.
    ema_params = jax.tree.map(jnp.copy, params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.int32(0), shardings.step)
    return TrainState(step=step, params=params, ema_params=ema_params, opt_state=opt_state), shardings


def load_data(config: config_lib.Config) -> tuple[Any, dict[str, np.ndarray]]:
    """Load the training data and the held-out split of the config's task (see Task.load_data)."""
    return tasks_lib.task_type(config.task).load_data(config)


class MetricsWriter:
    """Append metric records as JSON lines to `metrics.jsonl`."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train(config: config_lib.Config) -> pathlib.Path:
    """Train the job `config` describes, resuming from the newest checkpoint in its run folder.

    In a multi-process job (jaxgen.sharding.initialize_distributed) every process runs this function, and
    only process 0 writes config.json and metrics.jsonl.
    """
    sharding_lib.initialize_distributed()
    is_main_process = jax.process_index() == 0
    t = config.train
    # The mesh is checked before anything is loaded or written, so a bad layout fails fast.
    mesh = make_mesh(t.host_devices, t.fsdp)
    if config.data.batch_size % mesh.size:
        raise ValueError(
            f"data.batch_size={config.data.batch_size} does not split over the {mesh.size} devices of the mesh; "
            f"choose a multiple of {mesh.size}, or use fewer devices (train.host_devices, which train.fsdp "
            "must divide)"
        )
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = sharding_lib.batch_sharding(mesh)
    workdir = pathlib.Path(t.workdir)
    ckpt.check_run_folder(workdir, config)
    workdir.mkdir(parents=True, exist_ok=True)

    train_data, held_out = load_data(config)
    task = tasks_lib.make_task(config, held_out)
    model = create_model(task, t.seed)
    graphdef, params, rest = nnx.split(model, task.trainable, ...)
    summary = tasks_lib.model_summary(model, task.trainable)
    logger.info("task %s: %s parameters, %s of them trainable", config.task, f"{summary['parameters']:,}",
                f"{summary['trainable']:,}")

    tx = make_optimizer(config.optim, t.num_steps)
    state, state_shardings = init_train_state(params, tx, mesh)
    rest_shardings = sharding_lib.param_sharding(rest, mesh)
    rest = jax.device_put(rest, rest_shardings)
    logger.info("mesh %s over %d %s devices in %d process(es); training state: %s", dict(mesh.shape), mesh.size,
                mesh.devices.flat[0].platform, jax.process_count(),
                sharding_lib.describe_layout(state, state_shardings))

    loader = task.make_loader(train_data)
    store = ckpt.CheckpointStore(workdir, max_to_keep=t.keep_checkpoints)
    metrics_path = workdir / "metrics.jsonl"
    start = store.latest_step()
    if start is not None:
        # Orbax reads each array straight into the sharding of its abstract leaf, the layout of `state`.
        state, meta = store.restore(start, ckpt.abstract_like(state))
        loader.restore(meta["loader"])
        if is_main_process:
            ckpt.truncate_metrics(metrics_path, start)
        logger.info("resumed from the checkpoint of step %d in %s", start, store.directory)
    else:
        start = 0
        if is_main_process:
            metrics_path.unlink(missing_ok=True)
    metrics_out = MetricsWriter(metrics_path)

    train_step = jax.jit(make_train_step(task, graphdef, tx, config.optim.ema_decay), donate_argnums=0,
                         in_shardings=(state_shardings, rest_shardings, batch_sharding, replicated),
                         out_shardings=(state_shardings, replicated))
    base_key = jax.random.PRNGKey(t.seed)
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last_checkpoint = start if start else None
    progress = tqdm(total=t.num_steps, initial=start, desc=f"train {config.task}", unit="step",
                    dynamic_ncols=True, mininterval=1.0, disable=not is_main_process)
    window_start, window_steps = time.perf_counter(), 0

    def flush() -> dict[str, float]:
        """Read the pending metrics from the device, check them and write their mean."""
        nonlocal window_start, window_steps
        if not pending:
            return {}
        host = [(step, {k: float(v) for k, v in jax.device_get(m).items()}) for step, m in pending]
        pending.clear()
        for step, record in host:
            if not math.isfinite(record["loss"]):
                kept = (f"the newest checkpoint is step {last_checkpoint} in {store.directory}"
                        if last_checkpoint is not None else "no checkpoint was written yet")
                raise NonFiniteLossError(
                    f"training loss became {record['loss']} at step {step}; stopped without saving, and {kept}. "
                    "Lower optim.learning_rate or optim.grad_clip_norm, then rerun the same command to resume"
                )
        elapsed = time.perf_counter() - window_start
        mean = {k: float(np.mean([r[k] for _, r in host])) for k in host[0][1]}
        record = {"step": host[-1][0], **mean, "steps_per_s": window_steps / max(elapsed, 1e-9)}
        if is_main_process:
            metrics_out.write(record)
        progress.set_postfix(loss=f"{mean['loss']:.4f}", steps_per_s=f"{record['steps_per_s']:.2f}")
        window_start, window_steps = time.perf_counter(), 0
        return record

    def save(step: int) -> None:
        nonlocal last_checkpoint, window_start
        flush()
        if not all_finite(state.params):
            kept = (f"the newest checkpoint is step {last_checkpoint} in {store.directory}"
                    if last_checkpoint is not None else "no checkpoint was written yet")
            raise NonFiniteLossError(
                f"parameters became NaN or infinite by step {step} although the loss was finite; stopped "
                f"without saving, and {kept}. Check optim.learning_rate={config.optim.learning_rate!r}"
            )
        # config.json is written with the checkpoint, so a run that fails earlier leaves no claim on the folder.
        if is_main_process:
            config_lib.save_config(config, workdir / ckpt.CONFIG_FILE)
        store.save(step, state, {"loader": loader.state(), "step": step})
        last_checkpoint = step
        exported = task.export(graphdef, rest, state.ema_params, step, workdir)
        if exported is not None:
            logger.info("step %d: wrote %s", step, exported)
        window_start = time.perf_counter()  # keep checkpoint and export writing out of the steps/s figure

    try:
        for step in range(start, t.num_steps):
            batch = sharding_lib.shard_batch(next(loader), batch_sharding)
            step_started = time.perf_counter()
            state, metrics = train_step(state, rest, batch, jax.random.fold_in(base_key, step))
            if step == start:
                jax.block_until_ready(metrics)
                logger.info("compiled and ran the first train step in %.1f s", time.perf_counter() - step_started)
                window_start = time.perf_counter()
            else:
                window_steps += 1
            pending.append((step + 1, metrics))
            progress.update(1)
            done = step + 1
            if done % t.log_every == 0:
                flush()
            if done % t.checkpoint_every == 0 and done < t.num_steps:
                save(done)
            # TODO: with several processes every process runs the task's evaluation, sampling and export
            # and writes their files; only process 0 should write them.
            if t.eval_every and done % t.eval_every == 0:
                _evaluate(task, graphdef, rest, state, done, metrics_out)
            if t.sample_every and done % t.sample_every == 0:
                _write_samples(task, graphdef, rest, state, done, workdir)
        if start < t.num_steps:
            done = t.num_steps
            save(done)
            if not (t.eval_every and done % t.eval_every == 0):
                _evaluate(task, graphdef, rest, state, done, metrics_out)
            if not (t.sample_every and done % t.sample_every == 0):
                _write_samples(task, graphdef, rest, state, done, workdir)
    finally:
        progress.close()
        store.close()
    logger.info("run folder: %s (metrics.jsonl, checkpoints/, samples/)", workdir)
    return workdir


def _evaluate(task, graphdef, rest, state, step, metrics_out) -> None:
    model = nnx.merge(graphdef, state.ema_params, rest)
    metrics = task.evaluate(model)
    if metrics and jax.process_index() == 0:
        metrics_out.write({"step": step, **metrics})
        logger.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def _write_samples(task, graphdef, rest, state, step, workdir) -> None:
    path = task.write_samples(graphdef, rest, state.ema_params, step, workdir)
    if path is not None:
        logger.info("step %d: wrote samples to %s", step, path)


def build_inference_model(config: config_lib.Config, workdir: str | pathlib.Path, *, use_ema: bool = True,
                          step: int | None = None) -> tuple[nnx.GraphDef, nnx.State, nnx.State, int]:
    """Restore a trained model from a run folder: returns (graphdef, params, rest, step).

    Raises:
        ValueError: the task trains only part of a model loaded from elsewhere (a LoRA fine-tune), so the
            checkpoint alone does not make the model.
    """
    if tasks_lib.task_type(config.task).trainable is not nnx.Param:
        raise ValueError(
            f"task {config.task!r} checkpoints only its trainable variables, not a whole model; use the files "
            f"its run exports into {workdir} instead (for LoRA, lora/pytorch_lora_weights.safetensors)"
        )
    held_out_stub = {"image": np.zeros((1, config.data.image_size, config.data.image_size, 1), np.float32),
                     "label": np.zeros((1,), np.int32)}
    task = tasks_lib.make_task(config, held_out_stub)
    model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(config.train.seed)))
    graphdef, params, rest = nnx.split(model, task.trainable, ...)
    tx = make_optimizer(config.optim, config.train.num_steps)
    abstract = jax.eval_shape(
        lambda: TrainState(step=jnp.int32(0), params=params, ema_params=params, opt_state=tx.init(params))
    )
    # Restore onto this process's first device, whatever device layout the run was trained with.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    state, restored_step = ckpt.restore_params(workdir, abstract, step=step)
    if jax.tree.leaves(rest):
        # Variables outside the trainable filter (fixed buffers such as STDiT3's y_embedding) are not
        # checkpointed: training draws them from train.seed, so rebuild them the same way.
        _, _, rest = nnx.split(create_model(task, config.train.seed), task.trainable, ...)
    return graphdef, (state.ema_params if use_ema else state.params), rest, restored_step


__all__ = ["NonFiniteLossError", "TrainState", "build_inference_model", "make_optimizer", "train"]
