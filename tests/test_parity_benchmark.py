"""benchmarks.parity: the JSON and Markdown it writes, its error bound on cheap models, failed rows, the
torch.compile columns and --device.

Timings are recorded but never checked, because they depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from benchmarks import parity
from conftest import jaxgen_env, run_module

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from jaxgen.config import load_config  # noqa: E402
from torch_npu_backend import models  # noqa: E402 - imports torch and diffusers, so after the skips

# float32 bound on both the absolute and the relative error. On a 2-core x86 CPU the tiny VAE and CLIP
# text encoder measured at most 8e-6 absolute and 3e-6 relative error, and the digits U-Net 4.2e-6 absolute
# and 1.1e-6 relative error.
ERROR_BOUND = 1e-4
# float32 bound for whole sampler runs, whose images lie in [-1, 1]. A 20- or 50-step loop accumulates the
# per-step differences. DDIM with 50 steps measured 6.8e-5 and DPM-Solver++(2M) with 20 steps 7.3e-5 on the
# same CPU.
SAMPLER_ERROR_BOUND = 1e-3
ROW_FIELDS = {"model", "parameters", "inputs", "compared", "timed", "max_abs_error", "max_relative_error",
              "jaxgen_ms", "compile_seconds", "torch_ms", "torch_over_jaxgen", "jaxgen_seconds", "torch_seconds",
              "torch_compile"}
COMPILE_FIELDS = {"max_abs_error", "max_relative_error", "ms", "compile_seconds", "over_jaxgen", "seconds"}
CHEAP_MODELS = ["vae", "clip_text", "unet_digits"]


@pytest.fixture(scope="module")
def cheap_run(tmp_path_factory):
    """Run the benchmark without torch.compile on CHEAP_MODELS once; return its JSON and Markdown."""
    folder = tmp_path_factory.mktemp("parity")
    out, markdown = folder / "parity.json", folder / "parity.md"
    args = ["--models", ",".join(CHEAP_MODELS), "--repeats", "1", "--threads", "1", "--no-compile", "--out",
            str(out), "--markdown", str(markdown)]
    cache = tmp_path_factory.mktemp("xla_cache")
    run_module("benchmarks.parity", args, jaxgen_env(cache), timeout=300)
    return json.loads(out.read_text()), markdown.read_text(), args


def test_json_records_versions_and_cpu(cheap_run):
    result, _, _ = cheap_run
    assert set(result["environment"]["versions"]) == {"jax", "flax", "torch", "diffusers", "transformers"}
    assert result["environment"]["cpu"]["cpu_count"] >= 1
    assert "processor" in result["environment"]["cpu"]
    assert result["environment"]["torch_threads"] == 1
    assert result["repeats"] == 1
    assert result["torch_device"] == "cpu"
    assert result["torch_compile"] is None


def test_rows_have_every_field(cheap_run):
    result, _, _ = cheap_run
    assert [row["model"] for row in result["rows"]] == CHEAP_MODELS
    for row in result["rows"]:
        assert set(row) == ROW_FIELDS, row["model"]
        assert row["parameters"] > 0, row["model"]
        assert row["timed"] == "forward pass", row["model"]
        assert len(row["jaxgen_seconds"]) == 1, row["model"]
        assert len(row["torch_seconds"]) == 1, row["model"]
        assert row["torch_compile"] is None, row["model"]


def test_digits_row_uses_full_config(cheap_run):
    result, _, _ = cheap_run
    row = next(row for row in result["rows"] if row["model"] == "unet_digits")
    twin = models.build_torch_model(load_config("ddpm_digits"))
    assert row["parameters"] == sum(parameter.numel() for parameter in twin.parameters())
    assert row["inputs"].startswith("images 4x16x16x1")


@pytest.mark.parametrize("model", CHEAP_MODELS)
def test_errors_below_bound(cheap_run, model):
    result, _, _ = cheap_run
    row = next(row for row in result["rows"] if row["model"] == model)
    assert row["max_abs_error"] < ERROR_BOUND
    assert row["max_relative_error"] < ERROR_BOUND


def test_markdown_starts_with_command(cheap_run):
    result, markdown, args = cheap_run
    first_line = markdown.splitlines()[0]
    assert first_line == f"Command: `python -m benchmarks.parity {' '.join(args)}`"
    assert result["command"] == f"python -m benchmarks.parity {' '.join(args)}"
    assert "| vae | " in markdown
    assert "| clip_text | " in markdown
    assert "| unet_digits | " in markdown
    assert "torch device cpu; torch.compile skipped (--no-compile)" in markdown
    assert "torch.compile ms" not in markdown


def test_compile_column_on_tiny_module(tmp_path, monkeypatch):
    """A real torch.compile of a linear layer fills every torch.compile field and column."""
    torch = pytest.importorskip("torch")
    layer = torch.nn.Linear(4, 3).eval()
    inputs = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32))
    with torch.no_grad():
        expected = [layer(inputs).numpy().copy()]

    def fake_case(name, folders, scratch, device):
        return parity.Case(model=name, parameters=15, inputs="2x4", compared="linear output",
                           run_jaxgen=lambda: expected,
                           **parity.torch_runs(layer, lambda module: lambda: [module(inputs)]))

    monkeypatch.setattr(parity, "build_case", fake_case)
    out, markdown = tmp_path / "parity.json", tmp_path / "parity.md"
    code = parity.main(["--models", "vae", "--repeats", "2", "--out", str(out), "--markdown", str(markdown)])
    result = json.loads(out.read_text())
    compiled = result["rows"][0]["torch_compile"]
    assert code == 0
    assert result["torch_compile"] == {"backend": "inductor"}
    assert set(compiled) == COMPILE_FIELDS
    assert compiled["max_abs_error"] < 1e-6
    assert compiled["max_relative_error"] < 1e-6
    assert len(compiled["seconds"]) == 2
    assert compiled["compile_seconds"] > 0.0
    assert compiled["over_jaxgen"] == pytest.approx(compiled["ms"] / result["rows"][0]["jaxgen_ms"])
    assert "torch.compile backend inductor" in markdown.read_text()
    assert "| torch.compile ms |" in markdown.read_text()


def test_compile_failure_keeps_row(tmp_path, monkeypatch):
    same = [np.array([1.0, -2.0], np.float32)]

    def fail_to_compile():
        raise RuntimeError("inductor failed on purpose\nsecond line of the message")

    def fake_case(name, folders, scratch, device):
        return parity.Case(model=name, parameters=2, inputs="two numbers", compared="identity",
                           run_jaxgen=lambda: same, run_reference=lambda: same, compile_reference=fail_to_compile)

    monkeypatch.setattr(parity, "build_case", fake_case)
    out, markdown = tmp_path / "parity.json", tmp_path / "parity.md"
    code = parity.main(["--models", "vae", "--repeats", "1", "--out", str(out), "--markdown", str(markdown)])
    row = json.loads(out.read_text())["rows"][0]
    assert code == 0
    assert row["torch_compile"] == {"error": "RuntimeError: inductor failed on purpose"}
    assert row["max_abs_error"] == 0.0
    assert "| failed: RuntimeError: inductor failed on purpose |" in markdown.read_text()


@pytest.mark.parametrize("device, message", [("npu", "torch_npu package is not installed"),
                                             ("cuda", "CUDA")])
def test_unavailable_device_stops_run(tmp_path, monkeypatch, capsys, device, message):
    torch = pytest.importorskip("torch")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu raises ModuleNotFoundError
    out = tmp_path / "parity.json"
    code = parity.main(["--models", "vae", "--device", device, "--out", str(out), "--markdown",
                        str(tmp_path / "parity.md")])
    error = capsys.readouterr().err
    assert code == 2
    assert f"--device {device} is unavailable" in error
    assert message in error
    assert "Traceback" not in error
    assert not out.exists()


def test_argument_errors(capsys):
    with pytest.raises(SystemExit):
        parity.parse_args(["--device", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parity.parse_args(["--repeats", "0"])
    assert "--repeats=0 is invalid" in capsys.readouterr().err
    assert parity.parse_args([]).device == "cpu"
    assert parity.parse_args([]).compile is True
    assert parity.parse_args(["--no-compile"]).compile is False


def test_markdown_cell_escapes_and_shortens():
    assert parity.markdown_cell("a | b") == "a \\| b"
    shortened = parity.markdown_cell("x" * 300)
    assert len(shortened) == 200
    assert shortened.endswith("...")


def test_model_list_parsing():
    assert parity.parse_models("all") == list(parity.MODELS)
    assert {"unet_digits", "ddim50_digits", "dpmpp20_digits"} <= set(parity.parse_models("all"))
    assert parity.parse_models("unet_sdxl, vae,vae") == ["unet_sdxl", "vae"]
    with pytest.raises(argparse.ArgumentTypeError, match="unet_sd3"):
        parity.parse_models("vae,unet_sd3")


def test_busy_machine_note():
    result = {"environment": {"cpu": {"cpu_count": 2}, "torch_threads": 1}, "load_average_start": [0.5, 0.4, 0.3],
              "load_average_end": [9.0, 5.0, 3.0]}
    assert "9.0 on 2 CPUs" in parity.busy_machine_note(result)[0]
    assert "torch ran" not in parity.busy_machine_note(result)[0]
    result["environment"]["torch_threads"] = 2
    assert "torch ran 2 threads" in parity.busy_machine_note(result)[0]
    result["load_average_end"] = [1.5, 1.0, 1.0]
    assert parity.busy_machine_note(result) == []


def test_failed_row_recorded_and_others_kept(tmp_path, monkeypatch):
    def fake_case(name, folders, scratch, device):
        if name == "unet_sd2":
            raise RuntimeError("conversion failed on purpose")
        same = [np.array([1.0, -2.0], np.float32)]
        return parity.Case(model=name, parameters=2, inputs="two numbers", compared="identity",
                           run_jaxgen=lambda: same, run_reference=lambda: same)

    monkeypatch.setattr(parity, "build_case", fake_case)
    out, markdown = tmp_path / "parity.json", tmp_path / "parity.md"
    code = parity.main(["--models", "unet_sd2,vae", "--repeats", "2", "--out", str(out), "--markdown", str(markdown)])
    rows = json.loads(out.read_text())["rows"]
    assert code == 1
    assert rows[0] == {"model": "unet_sd2", "error": "RuntimeError: conversion failed on purpose"}
    assert rows[1]["model"] == "vae"
    assert rows[1]["max_abs_error"] == 0.0
    assert "failed: RuntimeError" in markdown.read_text()


@pytest.mark.slow
def test_sampler_rows_below_bound(tmp_path, compile_cache):
    """Whole guided DDIM-50 and DPM-Solver++(2M)-20 runs agree between jaxgen and torch eager."""
    out = tmp_path / "parity.json"
    args = ["--models", "ddim50_digits,dpmpp20_digits", "--repeats", "1", "--threads", "1", "--no-compile",
            "--out", str(out), "--markdown", str(tmp_path / "parity.md")]
    run_module("benchmarks.parity", args, jaxgen_env(compile_cache), timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [row["model"] for row in rows] == ["ddim50_digits", "dpmpp20_digits"]
    for row in rows:
        assert row["timed"] == "whole sampler run", row["model"]
        assert row["max_abs_error"] < SAMPLER_ERROR_BOUND, row["model"]
        assert row["max_relative_error"] < SAMPLER_ERROR_BOUND, row["model"]


@pytest.mark.slow
def test_compile_column_on_clip_text(tmp_path, compile_cache):
    """torch.compile of a real row (the CLIP text encoder) agrees with jaxgen as closely as torch eager."""
    out = tmp_path / "parity.json"
    args = ["--models", "clip_text", "--repeats", "1", "--threads", "1", "--out", str(out), "--markdown",
            str(tmp_path / "parity.md")]
    run_module("benchmarks.parity", args, jaxgen_env(compile_cache), timeout=600)
    compiled = json.loads(out.read_text())["rows"][0]["torch_compile"]
    assert set(compiled) == COMPILE_FIELDS
    assert compiled["max_abs_error"] < ERROR_BOUND
    assert compiled["max_relative_error"] < ERROR_BOUND
