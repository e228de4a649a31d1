"""Shared fixtures: a persistent XLA compilation cache and tiny trained runs built once per session."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> pathlib.Path:
    """Return a compilation cache folder shared by this session's subprocesses."""
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
    """Return a TFDS folder for the digits data set, shared by the whole session."""
    return tmp_path_factory.mktemp("tfds")


def jaxgen_env(compile_cache: pathlib.Path) -> dict[str, str]:
    """Return an environment for jaxgen subprocesses: one CPU device and a shared compilation cache."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(compile_cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
    )
    return env


def run_module(module: str, args: list[str], env: dict[str, str], *, check: bool = True,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m module args` from the repository root and return the finished process."""
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def train_args(cfg: str, workdir: pathlib.Path, data_dir: pathlib.Path, *extra: str) -> list[str]:
    """Return `jaxgen.train` arguments for the tiny preset of `cfg`, writing to `workdir`."""
    return ["--cfg", cfg, "--cfg-arg", "tiny", "--set", f"train.workdir={workdir}", "--set",
            f"data.data_dir={data_dir}", "--set", "train.host_devices=1", *extra]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, compile_cache, data_dir) -> dict[str, pathlib.Path]:
    """Train the tiny diffusion model, digit classifier and noise-aware classifier once per session."""
    root = tmp_path_factory.mktemp("runs")
    env = jaxgen_env(compile_cache)
    runs = {}
    for name, cfg in [("diffusion", "ddpm_digits"), ("scorer", "digit_classifier"),
                      ("noisy_classifier", "noisy_classifier_digits")]:
        runs[name] = root / name
        run_module("jaxgen.train", train_args(cfg, runs[name], data_dir), env)
    return runs
