"""Device mesh and array layouts for training: data parallelism plus FSDP (ZeRO-3) sharding of the state.

The mesh has two axes, ("data", "fsdp"), of shape (num_devices // fsdp, fsdp). Each batch is split along
its leading axis over both axes, so every device gets `batch_size / num_devices` examples. The parameters,
their EMA and the optimizer state are split over "fsdp" only: each array is cut along its largest axis
that the fsdp size divides, and arrays smaller than `min_size` elements stay replicated. Inside the jitted
train step XLA's SPMD partitioner all-gathers each sharded weight where it is used, and each device updates
only its own shards, so between steps a device stores 1/fsdp of every sharded array. With fsdp=1 every
array is replicated and training is plain data parallelism.

Several hosts (multi-process training):

Start the same command on every host, with three environment variables that tell JAX how to meet:

    JAXGEN_COORDINATOR_ADDRESS=host0.example:12345  # host:port of process 0, reachable from every host
    JAXGEN_NUM_PROCESSES=2                          # number of processes in the job
    JAXGEN_PROCESS_ID=0                             # 0 on host0, 1 on the next host, and so on
    python -m jaxgen.train --cfg ddpm_digits --set train.fsdp=8

Under Slurm, Open MPI, Kubernetes or on Cloud TPU, set JAXGEN_DISTRIBUTED=auto instead, and JAX reads the
process layout from the cluster's own variables. `initialize_distributed` does either before the first
JAX computation. The mesh then spans the devices of all processes, so train.host_devices sets only the
number of CPU devices in each process. `data.batch_size` stays the global batch size, and it must be a
multiple of the total device count. Every process's loader draws the same global batch, because its order
comes from `data.seed`, and `shard_batch` copies to each device only the rows that device stores
(jax.make_array_from_process_local_data). A single process keeps the plain jax.device_put path. Orbax
writes each checkpoint from all processes together, and only process 0 writes config.json and metrics.jsonl.

NOTE: the multi-process path is tested with two CPU processes on one machine (tests/test_sharding.py), not
on several GPU or TPU hosts.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"

# Arrays with fewer elements stay replicated. Biases and norm scales are a negligible share of the memory,
# and replicating them saves one gather per array and step.
DEFAULT_MIN_SHARD_SIZE = 1024

COORDINATOR_ENV = "JAXGEN_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAXGEN_NUM_PROCESSES"
PROCESS_ID_ENV = "JAXGEN_PROCESS_ID"
AUTO_ENV = "JAXGEN_DISTRIBUTED"


def make_mesh(num_devices: int, fsdp: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ("data", "fsdp") mesh of shape (num_devices // fsdp, fsdp) over the first `num_devices` devices.

    `devices` defaults to jax.devices(), the devices of all processes.

    Raises:
        ValueError: a count is below 1, `fsdp` does not divide `num_devices`, or fewer devices exist.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices < 1 or fsdp < 1:
        raise ValueError(
            f"num_devices={num_devices} and fsdp={fsdp} are invalid; both must be positive integers "
            "(train.host_devices and train.fsdp)"
        )
    if num_devices % fsdp:
        divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
        raise ValueError(
            f"train.fsdp={fsdp} does not divide the {num_devices} devices of the mesh (train.host_devices); "
            f"set train.fsdp to one of {divisors}, or use a device count that is a multiple of {fsdp}"
        )
    if num_devices > len(devices):
        platform = devices[0].platform if devices else "no"
        raise ValueError(
            f"{num_devices} devices were requested, but only {len(devices)} {platform} device(s) exist. "
            "On CPU, jaxgen.train creates train.host_devices devices per process by setting "
            "XLA_FLAGS=--xla_force_host_platform_device_count before JAX starts; other programs must set that "
            "flag themselves. For more GPUs or TPUs, start one process per host with jax.distributed "
            f"({COORDINATOR_ENV}, {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}; see jaxgen.sharding), or lower "
            "train.host_devices"
        )
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((num_devices // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS), axis_types=(auto, auto),
                         devices=devices[:num_devices])


def fsdp_partition_spec(shape: Sequence[int], fsdp: int, min_size: int = DEFAULT_MIN_SHARD_SIZE) -> PartitionSpec:
    """Return the FSDP PartitionSpec of an array of `shape`: its largest axis divisible by `fsdp` on "fsdp".

    Scalars, arrays of fewer than `min_size` elements and arrays with no axis divisible by `fsdp` get
    PartitionSpec(), which replicates them. Among equally long axes the first one is sharded.
    """
    if fsdp == 1 or len(shape) == 0 or math.prod(shape) < min_size:
        return PartitionSpec()
    divisible = [axis for axis, size in enumerate(shape) if size % fsdp == 0]
    if not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda a: shape[a])  # max() keeps the first of equal sizes
    spec = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return PartitionSpec(*spec)


def param_sharding(tree: Any, mesh: Mesh, *, min_size: int = DEFAULT_MIN_SHARD_SIZE) -> Any:
    """Return a tree of NamedSharding with the FSDP layout of every array in `tree` (see fsdp_partition_spec).

    `tree` may contain arrays or jax.ShapeDtypeStruct leaves, e.g. a whole TrainState. The layout depends
    only on each leaf's shape, so optimizer moments and EMA copies get the layout of their parameter,
    and scalars such as the optimizer's step count stay replicated.
    """
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_partition_spec(np.shape(leaf), fsdp, min_size)),
                        tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Return the batch layout: the leading axis split over ("data", "fsdp"), the other axes whole."""
    return NamedSharding(mesh, PartitionSpec((DATA_AXIS, FSDP_AXIS)))


def shard_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Place a global batch of host arrays on the mesh with `sharding`.

    With several processes every process must pass the same global batch, and each copies only the rows
    its own devices store.
    """
    if jax.process_count() == 1:
        return {name: jax.device_put(value, sharding) for name, value in batch.items()}
    return {name: jax.make_array_from_process_local_data(sharding, value, np.shape(value))
            for name, value in batch.items()}


def describe_layout(tree: Any, shardings: Any) -> str:
    """Summarise how `shardings` splits `tree`: sharded array count and bytes stored per device."""
    leaves = jax.tree.leaves(tree)
    leaf_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    total_bytes = per_device_bytes = 0
    sharded = 0
    for leaf, sharding in zip(leaves, leaf_shardings, strict=True):
        shape, itemsize = np.shape(leaf), leaf.dtype.itemsize
        shard_shape = sharding.shard_shape(shape)
        total_bytes += math.prod(shape) * itemsize
        per_device_bytes += math.prod(shard_shape) * itemsize
        sharded += tuple(shard_shape) != tuple(shape)
    return (f"{sharded} of {len(leaves)} arrays sharded, {per_device_bytes / 2**20:.2f} MiB per device "
            f"of {total_bytes / 2**20:.2f} MiB")


def initialize_distributed() -> bool:
    """Join a multi-process JAX job when the JAXGEN_* variables ask for one; return whether one was joined.

    Call this before any other JAX computation. It does nothing when the variables are unset or the process
    has already joined. JAXGEN_COORDINATOR_ADDRESS with JAXGEN_NUM_PROCESSES and JAXGEN_PROCESS_ID set the
    job explicitly, and JAXGEN_DISTRIBUTED=auto leaves the detection to JAX (Slurm, Open MPI, Kubernetes,
    Cloud TPU).

    Raises:
        ValueError: a variable is missing or is not an integer, or JAXGEN_DISTRIBUTED is not "auto".
    """
    address = os.environ.get(COORDINATOR_ENV)
    auto = os.environ.get(AUTO_ENV)
    if not address and not auto:
        return False
    if jax.distributed.is_initialized():
        logger.info("jax.distributed is already initialized; this is process %d of %d",
                    jax.process_index(), jax.process_count())
        return True
    if address:
        num_processes = _int_from_env(NUM_PROCESSES_ENV, address)
        process_id = _int_from_env(PROCESS_ID_ENV, address)
        logger.info("joining the job at %s as process %d of %d", address, process_id, num_processes)
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                                   process_id=process_id)
    elif auto.strip().lower() == "auto":
        logger.info("joining a multi-process job detected by JAX (%s=auto)", AUTO_ENV)
        jax.distributed.initialize()
    else:
        raise ValueError(f"{AUTO_ENV}={auto!r} is invalid; set it to 'auto' or unset it")
    logger.info("process %d of %d: %d local devices, %d in total", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())
    return True


def _int_from_env(name: str, address: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise ValueError(f"{COORDINATOR_ENV}={address} is set but {name} is missing; set {NUM_PROCESSES_ENV} "
                         f"and {PROCESS_ID_ENV} on every process, or unset {COORDINATOR_ENV}")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is invalid; use an integer") from None


__all__ = ["DATA_AXIS", "DEFAULT_MIN_SHARD_SIZE", "FSDP_AXIS", "batch_sharding", "describe_layout",
           "fsdp_partition_spec", "initialize_distributed", "make_mesh", "param_sharding", "shard_batch"]
