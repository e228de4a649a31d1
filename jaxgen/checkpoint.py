"""Run folders and Orbax checkpoints.

A run folder contains `config.json` (the job that made it), `checkpoints/<step>/` (Orbax writes each step into a
temporary folder and renames it when complete, so a killed run never leaves a half-written checkpoint behind),
`metrics.jsonl` and `samples/`. Each checkpoint stores the training state pytree and, as JSON, the data loader
position, so a resumed run sees the same batches and PRNG keys as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxgen import config as config_lib

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class RunFolderError(ValueError):
    """A run folder that is missing, incomplete or made by another model."""


def model_signature(config: config_lib.Config) -> dict[str, Any]:
    """Return what must match for a checkpoint to load into a model: the task and the model config."""
    return {"task": config.task, "model": config_lib.config_to_dict(config.model)}


def check_run_folder(workdir: pathlib.Path, config: config_lib.Config) -> None:
    """Raise if `workdir` already contains a run of a different task or model than `config`."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return
    existing = config_lib.read_config(path)
    old_signature, new_signature = model_signature(existing), model_signature(config)
    if old_signature != new_signature:
        if existing.task == config.task and type(existing.model) is type(config.model):
            changed = "; ".join(
                f"model.{name} was {old_signature['model'].get(name)!r}, now {new_signature['model'].get(name)!r}"
                for name in sorted(set(old_signature["model"]) | set(new_signature["model"]))
                if old_signature["model"].get(name) != new_signature["model"].get(name)
            )
        else:
            changed = (f"task {existing.task!r} with {type(existing.model).__name__}, now task {config.task!r} with "
                       f"{type(config.model).__name__}")
        raise RunFolderError(
            f"run folder {workdir} contains a checkpoint of another model ({changed}); set the saved values back "
            f"(see {path}), or choose a new run folder (--set train.workdir=PATH, or --workdir PATH for "
            f"torch_npu_backend.train) or delete {workdir}"
        )
    changed = [(name, old, new) for name, old, new in _resume_fields(existing, config) if old != new]
    if changed:
        listed = "; ".join(f"{name} was {old!r}, now {new!r}" for name, old, new in changed)
        raise RunFolderError(
            f"run folder {workdir} was trained with other data or noise settings, so resuming it would not continue "
            f"the same run: {listed}. Set them back to the saved values (see {path}), or start a new run with "
            "--set train.workdir=PATH"
        )


# Settings that fix the batches, PRNG keys and training targets of a run. A resumed run must keep them,
# while the optimizer settings and train.num_steps may change on resume (to lower a learning rate after
# a NaN loss, or to train for longer).
_RESUME_FIELDS = (
    ("data", ("name", "image_size", "batch_size", "seed")),
    ("train", ("seed",)),
    ("diffusion", None),  # every field
)


def _resume_fields(existing: config_lib.Config, config: config_lib.Config):
    for section, names in _RESUME_FIELDS:
        old_section, new_section = getattr(existing, section), getattr(config, section)
        old_values, new_values = config_lib.config_to_dict(old_section), config_lib.config_to_dict(new_section)
        for name in names or sorted(set(old_values) | set(new_values)):
            if name.startswith("__"):
                continue
            yield f"{section}.{name}", old_values.get(name), new_values.get(name)


def read_run_config(workdir: str | pathlib.Path, *, expected_task: str | None = None) -> config_lib.Config:
    """Read the config of a finished or running run folder, checking that it exists and has a checkpoint."""
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise RunFolderError(
            f"run folder {workdir} does not exist; train one first, e.g. python -m jaxgen.train --cfg ddpm_digits"
        )
    path = workdir / CONFIG_FILE
    if not path.is_file():
        raise RunFolderError(f"{workdir} is not a jaxgen run folder: it has no {CONFIG_FILE}")
    config = config_lib.read_config(path)
    if expected_task is not None and config.task != expected_task:
        raise RunFolderError(
            f"run folder {workdir} belongs to a {config.task!r} model, but a {expected_task!r} model is needed here"
        )
    return config


class CheckpointStore:
    """Save and restore the training state and loader position of one run folder."""

    def __init__(self, workdir: pathlib.Path, *, max_to_keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False)
        self.directory = (workdir / CHECKPOINT_DIR).resolve()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """Return the step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Write `state` (a pytree of arrays) and `meta` (JSON data) as the checkpoint of `step`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Read the checkpoint of `step` into the structure of `abstract_state` (shape/dtype/sharding leaves)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.meta

    def close(self) -> None:
        """Finish pending writes and release the manager."""
        self.manager.close()


def restore_params(workdir: str | pathlib.Path, abstract_state: Any, *, step: int | None = None) -> tuple[Any, int]:
    """Read a run's training state for inference, from the newest checkpoint unless `step` is given."""
    store = CheckpointStore(pathlib.Path(workdir), max_to_keep=1_000_000)
    try:
        step = store.latest_step() if step is None else step
        if step is None:
            raise RunFolderError(f"run folder {workdir} has no complete checkpoint under {store.directory}")
        state, _ = store.restore(step, abstract_state)
    finally:
        store.close()
    return state, step


def truncate_metrics(path: pathlib.Path, last_step: int) -> None:
    """Drop metric lines written after `last_step`, so a resumed run appends after its checkpoint.

    A line that is not a JSON object, such as the last line of a run killed while writing it, is dropped
    with a warning naming the file and the line number.
    """
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record.get("step", 0)
        except (ValueError, AttributeError):
            logger.warning("%s line %d is not a JSON metrics record (%r); dropped it", path, number, line[:80])
            continue
        if step <= last_step:
            kept.append(line)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def abstract_like(tree: Any) -> Any:
    """Return a tree of jax.ShapeDtypeStruct (with sharding) matching `tree`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
