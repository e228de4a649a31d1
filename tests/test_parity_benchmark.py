"""benchmarks.parity: the JSON and Markdown it writes, its error bound on cheap models, failed rows.

Timings are recorded but never checked, because they depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from benchmarks import parity
from conftest import jaxgen_env, run_module

pytest.importorskip("torch")
pytest.importorskip("diffusers")

# float32 bound on both the absolute and the relative error. On a 2-core x86 CPU the tiny VAE and CLIP
# text encoder measured at most 8e-6 absolute and 3e-6 relative error.
ERROR_BOUND = 1e-4
ROW_FIELDS = {"model", "parameters", "inputs", "compared", "max_abs_error", "max_relative_error", "jaxgen_ms",
              "compile_seconds", "torch_ms", "torch_over_jaxgen", "jaxgen_seconds", "torch_seconds"}


@pytest.fixture(scope="module")
def cheap_run(tmp_path_factory):
    """Run the benchmark on the VAE and the CLIP text encoder once; return its JSON and Markdown."""
    folder = tmp_path_factory.mktemp("parity")
    out, markdown = folder / "parity.json", folder / "parity.md"
    args = ["--models", "vae,clip_text", "--repeats", "1", "--threads", "1", "--out", str(out),
            "--markdown", str(markdown)]
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


def test_rows_have_every_field(cheap_run):
    result, _, _ = cheap_run
    assert [row["model"] for row in result["rows"]] == ["vae", "clip_text"]
    for row in result["rows"]:
        assert set(row) == ROW_FIELDS, row["model"]
        assert row["parameters"] > 0, row["model"]
        assert len(row["jaxgen_seconds"]) == 1, row["model"]
        assert len(row["torch_seconds"]) == 1, row["model"]


@pytest.mark.parametrize("model", ["vae", "clip_text"])
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


def test_model_list_parsing():
    assert parity.parse_models("all") == list(parity.MODELS)
    assert parity.parse_models("unet_sdxl, vae,vae") == ["unet_sdxl", "vae"]
    with pytest.raises(argparse.ArgumentTypeError, match="unet_sd3"):
        parity.parse_models("vae,unet_sd3")


def test_busy_machine_note():
    result = {"environment": {"cpu": {"cpu_count": 2}}, "load_average_start": [0.5, 0.4, 0.3],
              "load_average_end": [9.0, 5.0, 3.0]}
    assert "9.0 on 2 CPUs" in parity.busy_machine_note(result)[0]
    result["load_average_end"] = [1.5, 1.0, 1.0]
    assert parity.busy_machine_note(result) == []


def test_failed_row_recorded_and_others_kept(tmp_path, monkeypatch):
    def fake_case(name, folders, scratch):
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
