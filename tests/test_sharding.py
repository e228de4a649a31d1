"""Tests of the ("data", "fsdp") mesh, the FSDP layout of the training state and sharded training runs.

XLA fixes the number of CPU devices when JAX starts, so the tests in TestFourDeviceLayout and
TestFourDeviceTraining skip in a session with fewer than 4 devices. test_four_device_layout and
test_four_device_training rerun them in a pytest subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=4. The training tests also start a two-process
jax.distributed job whose coordinator listens on a free port of 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from conftest import REPO_ROOT, jaxgen_env
from jaxgen import checkpoint as ckpt
from jaxgen import config as config_lib
from jaxgen import sharding, trainer
from jaxgen.data import load_digits_split

P = PartitionSpec
NUM_STEPS = 6
STOP_STEP = 3


def read_losses(workdir: pathlib.Path) -> dict[int, float]:
    """Return {step: loss} from a run's metrics.jsonl."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


def tiny_overrides(workdir: pathlib.Path, data_dir: pathlib.Path, host_devices: int, fsdp: int,
                   num_steps: int = NUM_STEPS, checkpoint_every: int = NUM_STEPS) -> list[str]:
    """Return the overrides of the tiny digits diffusion preset used here, on host_devices with train.fsdp=fsdp.

    optim.decay_steps is fixed, so a run stopped early follows the same learning-rate schedule as a full one.
    """
    return [f"train.workdir={workdir}", f"data.data_dir={data_dir}", f"train.host_devices={host_devices}",
            f"train.fsdp={fsdp}", f"train.num_steps={num_steps}", f"optim.decay_steps={NUM_STEPS}",
            f"train.checkpoint_every={checkpoint_every}", "train.sample_every=0"]


def tiny_config(workdir: pathlib.Path, data_dir: pathlib.Path, host_devices: int, fsdp: int,
                num_steps: int = NUM_STEPS, checkpoint_every: int = NUM_STEPS,
                extra: Sequence[str] = ()) -> config_lib.Config:
    """Return the tiny digits diffusion config with tiny_overrides and `extra`."""
    overrides = [*tiny_overrides(workdir, data_dir, host_devices, fsdp, num_steps, checkpoint_every), *extra]
    return config_lib.load_config("ddpm_digits", overrides, arg="tiny")


def start_two_process_training(workdir: pathlib.Path, data_dir: pathlib.Path,
                               fsdp: int) -> tuple[list[subprocess.Popen], list[pathlib.Path]]:
    """Start `jaxgen.train` as one job of two processes with 2 CPU devices each; return them and their logs.

    The processes meet through a coordinator that process 0 starts on a free port of 127.0.0.1.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["--cfg", "ddpm_digits", "--cfg-arg", "tiny"]
    for override in tiny_overrides(workdir, data_dir, 2, fsdp):
        args += ["--set", override]
    log_paths = [workdir.parent / f"{workdir.name}.process{index}.log" for index in range(2)]
    processes = []
    for index, log_path in enumerate(log_paths):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   **{sharding.COORDINATOR_ENV: f"127.0.0.1:{port}", sharding.NUM_PROCESSES_ENV: "2",
                      sharding.PROCESS_ID_ENV: str(index)})
        with log_path.open("w") as log:
            processes.append(subprocess.Popen([sys.executable, "-m", "jaxgen.train", *args], cwd=REPO_ROOT,
                                              env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes, log_paths


def wait_for_processes(processes: list[subprocess.Popen], log_paths: list[pathlib.Path],
                       timeout: float) -> tuple[list[int], list[str]]:
    """Wait for `processes`, killing any still running after `timeout` s; return exit codes (-1: killed) and logs."""
    deadline = time.monotonic() + timeout
    try:
        codes = [process.wait(timeout=max(1.0, deadline - time.monotonic())) for process in processes]
    except subprocess.TimeoutExpired:
        codes = [-1] * len(processes)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return codes, [path.read_text() for path in log_paths]


# ---- layout rules, no devices needed -----------------------------------------------------------------------


@pytest.mark.parametrize("shape, fsdp, expected", [
    ((3, 3, 8, 16), 2, P(None, None, None, "fsdp")),  # conv kernel: the output channels are largest
    ((3, 3, 16, 8), 2, P(None, None, "fsdp", None)),
    ((6, 512), 4, P(None, "fsdp")),
    ((512, 6), 4, P("fsdp", None)),
    ((64, 64), 2, P("fsdp", None)),  # equal sizes: the first axis
    ((1022, 6), 4, P()),  # large enough, but 4 divides no axis
    ((1022, 6), 2, P("fsdp", None)),
    ((16,), 2, P()),  # fewer elements than min_size
    ((), 2, P()),
    ((3, 3, 8, 16), 1, P()),  # fsdp=1: pure data parallelism replicates everything
])
def test_fsdp_partition_spec_cases(shape, fsdp, expected):
    assert sharding.fsdp_partition_spec(shape, fsdp, min_size=1024) == expected


def test_fsdp_partition_spec_min_size():
    assert sharding.fsdp_partition_spec((8, 8), 2, min_size=64) == P("fsdp", None)
    assert sharding.fsdp_partition_spec((8, 8), 2, min_size=65) == P()


# ---- errors and process set-up -----------------------------------------------------------------------------


def test_make_mesh_fsdp_not_dividing_rejected():
    with pytest.raises(ValueError, match=r"train\.fsdp=3 does not divide the 4 devices") as error:
        sharding.make_mesh(4, 3)
    assert "[1, 2, 4]" in str(error.value)


def test_make_mesh_too_many_devices_rejected():
    requested = jax.device_count() * 2
    with pytest.raises(ValueError, match=rf"{requested} devices were requested") as error:
        sharding.make_mesh(requested, 1)
    assert "xla_force_host_platform_device_count" in str(error.value)
    assert "jax.distributed" in str(error.value)
    assert "JAXGEN_COORDINATOR_ADDRESS" in str(error.value)


def test_make_mesh_nonpositive_rejected():
    with pytest.raises(ValueError, match=r"fsdp=0 are invalid"):
        sharding.make_mesh(1, 0)


def test_trainer_mesh_falls_back_when_data_parallel(caplog):
    available = jax.device_count()
    with caplog.at_level("WARNING", logger="jaxgen.trainer"):
        mesh = trainer.make_mesh(available + 1, 1)
    assert dict(mesh.shape) == {"data": available, "fsdp": 1}
    assert f"train.host_devices={available + 1}" in caplog.text


def test_trainer_mesh_fsdp_needs_every_device():
    available = jax.device_count()
    with pytest.raises(ValueError, match=r"devices were requested"):
        trainer.make_mesh(2 * (available + 1), 2)


def test_train_bad_fsdp_fails_before_writing(tmp_path):
    workdir = tmp_path / "run"
    config = tiny_config(workdir, tmp_path / "tfds", host_devices=4, fsdp=3)
    with pytest.raises(ValueError, match=r"train\.fsdp=3"):
        trainer.train(config)
    assert not workdir.exists()


@pytest.fixture
def no_distributed_env(monkeypatch):
    for name in (sharding.COORDINATOR_ENV, sharding.NUM_PROCESSES_ENV, sharding.PROCESS_ID_ENV,
                 sharding.AUTO_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_initialize_distributed_without_env(no_distributed_env):
    assert sharding.initialize_distributed() is False


def test_initialize_distributed_missing_count(no_distributed_env):
    no_distributed_env.setenv(sharding.COORDINATOR_ENV, "127.0.0.1:1")
    no_distributed_env.setenv(sharding.PROCESS_ID_ENV, "0")
    with pytest.raises(ValueError, match=r"JAXGEN_NUM_PROCESSES is missing"):
        sharding.initialize_distributed()


def test_initialize_distributed_bad_process_id(no_distributed_env):
    no_distributed_env.setenv(sharding.COORDINATOR_ENV, "127.0.0.1:1")
    no_distributed_env.setenv(sharding.NUM_PROCESSES_ENV, "2")
    no_distributed_env.setenv(sharding.PROCESS_ID_ENV, "first")
    with pytest.raises(ValueError, match=r"JAXGEN_PROCESS_ID='first' is invalid"):
        sharding.initialize_distributed()


def test_initialize_distributed_bad_auto_value(no_distributed_env):
    no_distributed_env.setenv(sharding.AUTO_ENV, "yes")
    with pytest.raises(ValueError, match=r"JAXGEN_DISTRIBUTED='yes' is invalid"):
        sharding.initialize_distributed()


# ---- four CPU devices --------------------------------------------------------------------------------------


SKIP_REASON = "needs 4 devices; test_four_device_layout and test_four_device_training run it in a subprocess"


@pytest.fixture
def four_devices() -> None:
    if jax.device_count() < 4:
        pytest.skip(SKIP_REASON)


def record_shardings(tree) -> dict[str, str]:
    """Return {key path: PartitionSpec text} for every array of `tree`."""
    return {jax.tree_util.keystr(path): str(leaf.sharding.spec)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def four_device_runs(tmp_path_factory, data_dir):
    """Train the tiny config on several layouts in this process; return run folders and recorded shardings.

    Checkpoint saves and restores are wrapped to record the PartitionSpec of every array of the state,
    so the tests see the layout the train step returned and the layout a restore produced. Only the
    uninterrupted fsdp=2 run draws its end-of-run samples, because compiling the sampler for each layout
    would double the time of this fixture.
    """
    if jax.device_count() < 4:
        pytest.skip(SKIP_REASON)
    root = tmp_path_factory.mktemp("layouts")
    saved: dict[str, dict[int, dict[str, str]]] = {}
    restored: dict[str, dict[int, dict[str, str]]] = {}
    current = {"run": ""}
    original_save, original_restore = ckpt.CheckpointStore.save, ckpt.CheckpointStore.restore
    original_write_samples = trainer._write_samples

    def save(self, step, state, meta):
        saved.setdefault(current["run"], {})[step] = record_shardings(state)
        return original_save(self, step, state, meta)

    def restore(self, step, abstract_state):
        state, meta = original_restore(self, step, abstract_state)
        restored.setdefault(current["run"], {})[step] = record_shardings(state)
        return state, meta

    def write_samples(*args):
        if current["run"] == "4x2":
            original_write_samples(*args)

    runs = {"1x1": (1, 1), "4x1": (4, 1), "4x2": (4, 2)}
    # Prepare the data set once, before several processes read it. The two-process job then runs alongside
    # the runs below, so its start-up and compilation overlap with theirs.
    load_digits_split(data_dir, "train")
    job = start_two_process_training(root / "2 processes", data_dir, fsdp=4)
    timeout = 0.0  # kills the job unless the runs below finish
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ckpt.CheckpointStore, "save", save)
            patch.setattr(ckpt.CheckpointStore, "restore", restore)
            patch.setattr(trainer, "_write_samples", write_samples)
            for name, (host_devices, fsdp) in runs.items():
                current["run"] = name
                checkpoint_every = STOP_STEP if name == "4x2" else NUM_STEPS
                trainer.train(tiny_config(root / name, data_dir, host_devices, fsdp,
                                          checkpoint_every=checkpoint_every))
            # Stop the fsdp=2 run at STOP_STEP, then rerun it to NUM_STEPS from its checkpoint.
            current["run"] = "4x2 resumed"
            trainer.train(tiny_config(root / "4x2 resumed", data_dir, 4, 2, num_steps=STOP_STEP))
            trainer.train(tiny_config(root / "4x2 resumed", data_dir, 4, 2, num_steps=NUM_STEPS))
        timeout = 400.0
    finally:
        two_processes = wait_for_processes(*job, timeout=timeout)
    return {"folders": {name: root / name for name in [*runs, "4x2 resumed", "2 processes"]}, "saved": saved,
            "restored": restored, "two processes": two_processes}


class TestFourDeviceLayout:
    """Mesh, layout and checkpoint tests on a 4-device CPU mesh."""

    def test_make_mesh_shapes(self, four_devices):
        assert dict(sharding.make_mesh(4, 2).shape) == {"data": 2, "fsdp": 2}
        assert dict(sharding.make_mesh(4, 4).shape) == {"data": 1, "fsdp": 4}
        assert dict(sharding.make_mesh(4, 1).shape) == {"data": 4, "fsdp": 1}
        assert dict(sharding.make_mesh(2, 2).shape) == {"data": 1, "fsdp": 2}

    @pytest.mark.parametrize("fsdp", [2, 4])
    def test_param_sharding_places_shards(self, four_devices, fsdp):
        mesh = sharding.make_mesh(4, fsdp)
        tree = {"kernel": jnp.arange(3 * 3 * 8 * 16, dtype=jnp.float32).reshape(3, 3, 8, 16),
                "bias": jnp.ones((16,)), "odd": jnp.ones((33, 35)), "count": jnp.int32(0)}
        shardings = sharding.param_sharding(tree, mesh)
        assert shardings["kernel"].spec == P(None, None, None, "fsdp")
        assert shardings["bias"].spec == P()
        assert shardings["odd"].spec == P()
        assert shardings["count"].spec == P()

        placed = jax.device_put(tree, shardings)
        shards = placed["kernel"].addressable_shards
        assert len(shards) == 4
        assert {shard.data.shape for shard in shards} == {(3, 3, 8, 16 // fsdp)}
        # Each fsdp slice is stored once per "data" row, and together the slices make the whole array.
        slices = {shard.index[3].start for shard in shards}
        assert slices == set(range(0, 16, 16 // fsdp))
        for shard in shards:
            np.testing.assert_array_equal(shard.data, np.asarray(tree["kernel"])[shard.index])
        assert placed["odd"].addressable_shards[0].data.shape == (33, 35)

    def test_train_state_layout_mirrors_params(self, four_devices):
        mesh = sharding.make_mesh(4, 2)
        params = {"dense": jnp.ones((64, 32)), "bias": jnp.zeros((32,))}
        tx = optax.adamw(1e-3)
        state, shardings = trainer.init_train_state(params, tx, mesh)

        assert state.params["dense"].sharding.spec == P("fsdp", None)
        assert state.ema_params["dense"].sharding.spec == P("fsdp", None)
        assert state.params["bias"].sharding.spec == P()
        adam = state.opt_state[0]
        assert adam.mu["dense"].sharding.spec == P("fsdp", None)
        assert adam.nu["dense"].sharding.spec == P("fsdp", None)
        assert adam.count.sharding.spec == P()
        assert state.step.sharding.spec == P()
        assert shardings.params["dense"].spec == P("fsdp", None)
        np.testing.assert_array_equal(state.ema_params["dense"], params["dense"])
        np.testing.assert_array_equal(adam.mu["dense"], np.zeros((64, 32)))
        # The EMA is a copy, not the same buffers, so donating the state is safe.
        assert (state.ema_params["dense"].addressable_shards[0].data.unsafe_buffer_pointer()
                != state.params["dense"].addressable_shards[0].data.unsafe_buffer_pointer())

    def test_batch_sharding_splits_rows_in_device_order(self, four_devices):
        mesh = sharding.make_mesh(4, 2)
        batch = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}
        placed = sharding.shard_batch(batch, sharding.batch_sharding(mesh))["image"]
        assert placed.sharding.spec == P(("data", "fsdp"))
        by_device = {shard.device: shard for shard in placed.addressable_shards}
        for position, device in enumerate(mesh.devices.flat):
            shard = by_device[device]
            assert shard.data.shape == (2, 3)
            np.testing.assert_array_equal(shard.data, batch["image"][2 * position:2 * position + 2])

    def test_checkpoint_restores_sharded_layout(self, four_devices, tmp_path):
        mesh = sharding.make_mesh(4, 2)
        params = {"dense": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32)}
        state, _ = trainer.init_train_state(params, optax.adamw(1e-3), mesh)
        store = ckpt.CheckpointStore(tmp_path, max_to_keep=1)
        try:
            store.save(1, state, {"step": 1})
            restored, _ = store.restore(1, ckpt.abstract_like(state))
        finally:
            store.close()
        assert record_shardings(restored) == record_shardings(state)
        np.testing.assert_array_equal(restored.params["dense"], params["dense"])

    def test_train_batch_not_divisible_rejected(self, four_devices, tmp_path):
        config = tiny_config(tmp_path / "run", tmp_path / "tfds", 4, 2, extra=["data.batch_size=6"])
        with pytest.raises(ValueError, match=r"data\.batch_size=6 does not split over the 4 devices"):
            trainer.train(config)


class TestFourDeviceTraining:
    """Tiny training runs on 1 and 4 devices with fsdp 1 and 2, and on two processes with fsdp 4.

    The two-process job shards the large parameters across both processes (mesh data=1, fsdp=4), the
    layout with the most cross-process traffic.
    """

    @pytest.mark.parametrize("layout", ["4x1", "4x2"])
    def test_losses_match_single_device(self, four_device_runs, layout):
        reference = read_losses(four_device_runs["folders"]["1x1"])
        losses = read_losses(four_device_runs["folders"][layout])
        assert sorted(losses) == list(range(1, NUM_STEPS + 1))
        worst = max(abs(losses[step] - reference[step]) / abs(reference[step]) for step in reference)
        print(f"{layout}: max relative loss difference to 1x1 over {NUM_STEPS} steps: {worst:.2e}")
        for step in reference:
            np.testing.assert_allclose(losses[step], reference[step], rtol=1e-5, atol=0,
                                       err_msg=f"{layout} step {step}")

    def test_fsdp_run_keeps_params_sharded(self, four_device_runs):
        final = four_device_runs["saved"]["4x2"][NUM_STEPS]
        params = {path: spec for path, spec in final.items() if path.startswith(".params")}
        sharded = [path for path, spec in params.items() if "fsdp" in spec]
        assert sharded, f"no parameter of the fsdp=2 run is sharded over 'fsdp': {params}"
        for path in sharded:
            assert final[path.replace(".params", ".ema_params", 1)] == params[path]
        assert final[".step"] == str(P())
        # The layout after the last step equals the layout of the first checkpoint.
        assert four_device_runs["saved"]["4x2"][STOP_STEP] == final
        assert (four_device_runs["folders"]["4x2"] / "samples" / f"step_{NUM_STEPS:06d}.png").is_file()

    def test_two_processes_match_single_device(self, four_device_runs):
        codes, logs = four_device_runs["two processes"]
        assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
        assert "{'data': 1, 'fsdp': 4} over 4 cpu devices in 2 process(es)" in logs[0]
        folder = four_device_runs["folders"]["2 processes"]
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        # Only process 0 writes metrics, so each step appears once.
        assert [record["step"] for record in records if "loss" in record] == list(range(1, NUM_STEPS + 1))
        reference, losses = read_losses(four_device_runs["folders"]["1x1"]), read_losses(folder)
        worst = max(abs(losses[step] - reference[step]) / abs(reference[step]) for step in reference)
        print(f"2 processes: max relative loss difference to 1x1 over {NUM_STEPS} steps: {worst:.2e}")
        for step in reference:
            np.testing.assert_allclose(losses[step], reference[step], rtol=1e-5, atol=0, err_msg=f"step {step}")
        assert (folder / "checkpoints" / str(NUM_STEPS)).is_dir()

    def test_data_parallel_run_replicates_params(self, four_device_runs):
        final = four_device_runs["saved"]["4x1"][NUM_STEPS]
        assert set(final.values()) == {str(P())}

    def test_resume_under_fsdp_matches_uninterrupted(self, four_device_runs):
        folders = four_device_runs["folders"]
        restored = four_device_runs["restored"]["4x2 resumed"]
        assert list(restored) == [STOP_STEP]
        assert restored[STOP_STEP] == four_device_runs["saved"]["4x2"][STOP_STEP]
        expected, resumed = read_losses(folders["4x2"]), read_losses(folders["4x2 resumed"])
        assert sorted(resumed) == list(range(1, NUM_STEPS + 1))
        for step in expected:
            np.testing.assert_allclose(resumed[step], expected[step], rtol=1e-6, atol=0, err_msg=f"step {step}")


def run_on_four_devices(test_class: str, compile_cache: pathlib.Path) -> subprocess.CompletedProcess:
    """Run the tests of `test_class` in a pytest subprocess whose JAX has 4 CPU devices."""
    env = jaxgen_env(compile_cache)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    command = [sys.executable, "-m", "pytest", f"{pathlib.Path(__file__)}::{test_class}", "-q", "-s",
               "-p", "no:cacheprovider"]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_four_device_layout(compile_cache):
    result = run_on_four_devices("TestFourDeviceLayout", compile_cache)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "skipped" not in result.stdout, result.stdout[-3000:]
    assert " passed" in result.stdout, result.stdout[-3000:]


@pytest.mark.slow
def test_four_device_training(compile_cache):
    result = run_on_four_devices("TestFourDeviceTraining", compile_cache)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "skipped" not in result.stdout, result.stdout[-3000:]
    assert " passed" in result.stdout, result.stdout[-3000:]
    print("\n".join(line for line in result.stdout.splitlines() if "relative loss difference" in line))
