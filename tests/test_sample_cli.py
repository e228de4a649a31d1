"""Tests of `jaxgen.sample`, the quality benchmark and the sampling notebook on tiny trained runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, jaxgen_env, run_module


def test_sample_cli_writes_grid_and_npz(tiny_runs, compile_cache, tmp_path):
    out = tmp_path / "grid.png"
    result = run_module("jaxgen.sample", ["--run", str(tiny_runs["diffusion"]), "--sampler", "dpmpp_2m",
                                          "--steps", "4", "--guidance", "2", "--labels", "0,3,9", "--out", str(out),
                                          "--save-npz"], jaxgen_env(compile_cache))
    assert "wrote 3 samples" in result.stdout
    grid = np.asarray(Image.open(out))
    assert grid.shape == (1 + 16 * 4 + 1, 1 + 3 * (16 * 4 + 1))
    saved = np.load(out.with_suffix(".npz"))
    np.testing.assert_array_equal(saved["labels"], [0, 3, 9])
    assert saved["images"].shape == (3, 16, 16, 1)
    assert np.abs(saved["images"]).max() <= 1.0


def test_sample_cli_classifier_guidance(tiny_runs, compile_cache, tmp_path):
    out = tmp_path / "guided.png"
    run_module("jaxgen.sample", ["--run", str(tiny_runs["diffusion"]), "--sampler", "ddim", "--steps", "3",
                                 "--guidance", "0", "--classifier", str(tiny_runs["noisy_classifier"]),
                                 "--classifier-scale", "2", "--per-class", "1", "--out", str(out)],
               jaxgen_env(compile_cache))
    assert out.is_file()


@pytest.mark.parametrize("args, message", [
    (["--run", "/nonexistent/run"], "does not exist"),
    (["--labels", "3,10"], "outside the model's classes 0..9"),
])
def test_sample_cli_bad_input(tiny_runs, compile_cache, args, message):
    base = ["--run", str(tiny_runs["diffusion"]), "--steps", "2"]
    result = run_module("jaxgen.sample", base + args, jaxgen_env(compile_cache), check=False)
    assert result.returncode == 2
    assert message in result.stderr


def test_sample_cli_rejects_classifier_run_as_model(tiny_runs, compile_cache):
    result = run_module("jaxgen.sample", ["--run", str(tiny_runs["scorer"])], jaxgen_env(compile_cache), check=False)
    assert result.returncode == 2
    assert "belongs to a 'classifier' model" in result.stderr


def test_sample_quality_benchmark_writes_table(tiny_runs, compile_cache, tmp_path):
    out = tmp_path / "quality.json"
    markdown = tmp_path / "quality.md"
    run_module("benchmarks.sample_quality", [
        "--run", str(tiny_runs["diffusion"]), "--scorer", str(tiny_runs["scorer"]),
        "--classifier", str(tiny_runs["noisy_classifier"]), "--preset", "demo", "--per-class", "2",
        "--out", str(out), "--markdown", str(markdown)], jaxgen_env(compile_cache))
    result = json.loads(out.read_text())
    assert [(r["sampler"], r["guidance"]) for r in result["rows"]] == [
        ("DDIM-50", "1"), ("DDIM-50", "3"), ("DPM-Solver++-20", "1"), ("DPM-Solver++-20", "3")]
    for row in result["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert np.isfinite(row["frechet_distance"])
        assert row["frechet_distance"] >= 0.0
        assert row["samples"] == 20
    assert result["real_vs_real_frechet_distance"] >= 0.0
    assert "| DDIM-50 | 3 |" in markdown.read_text()


def test_notebook_executes(tiny_runs, compile_cache):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    import os

    notebook = nbformat.read(REPO_ROOT / "notebooks" / "sample_digits.ipynb", as_version=4)
    env = jaxgen_env(compile_cache)
    env["JAXGEN_RUN"] = str(tiny_runs["diffusion"])
    previous = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(REPO_ROOT / "notebooks")}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(previous)
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "DDIM-50: first call" in outputs
    assert "mean absolute round-trip error" in outputs


@pytest.mark.parametrize("override, field", [("diffusion.beta_end=0.03", "diffusion.beta_end"),
                                             ("data.image_size=32", "data.image_size")])
def test_classifier_of_other_schedule_rejected(override, field):
    from jaxgen import config as config_lib
    from jaxgen import sampling

    model_config = config_lib.load_config("ddpm_digits", [], arg="tiny")
    classifier_config = config_lib.load_config("noisy_classifier_digits", [override], arg="tiny")
    with pytest.raises(ValueError) as error:
        sampling.check_classifier_matches(model_config, classifier_config)
    assert field in str(error.value)


def test_classifier_of_same_schedule_accepted():
    from jaxgen import config as config_lib
    from jaxgen import sampling

    model_config = config_lib.load_config("ddpm_digits", [], arg="tiny")
    classifier_config = config_lib.load_config("noisy_classifier_digits", [], arg="tiny")
    sampling.check_classifier_matches(model_config, classifier_config)  # the test fails if this raises
