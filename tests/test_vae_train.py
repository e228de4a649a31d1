"""Tests of the `vae` task: its loss terms, gradient separation, LPIPS, the PatchGAN and the CLI run."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from conftest import jaxgen_env, run_module, train_args
from conversion import lpips_io
from conversion.rules import CheckpointMismatchError, nnx_to_torch
from jaxgen import config as config_lib
from jaxgen import tasks as tasks_lib
from jaxgen import trainer
from jaxgen.data import load_digits_split
from jaxgen.models.discriminator import NLayerDiscriminator, NLayerDiscriminatorConfig
from jaxgen.models.lpips import _unit_normalize

# torchvision's VGG16 ("configuration D"): conv widths, "M" for a 2x2 max pool. Written out here rather than
# imported from jaxgen.models.lpips, so the reference trunk does not share a layout bug with the module.
TORCHVISION_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def tiny_config(*overrides: str) -> config_lib.Config:
    return config_lib.load_config("vae_digits", list(overrides), arg="tiny")


DISC_START = tiny_config().model.loss.disc_start


def param_state(model: nnx.Module, name: str) -> nnx.State:
    return nnx.state(getattr(model, name), nnx.Param)


def global_norm(tree) -> float:
    return float(optax.global_norm(tree))


def assert_trees_close(actual, expected, *, rtol: float, atol: float, label: str) -> None:
    flat_actual = jax.tree_util.tree_leaves_with_path(actual)
    flat_expected = jax.tree.leaves(expected)
    assert len(flat_actual) == len(flat_expected), label
    for (path, a), e in zip(flat_actual, flat_expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol,
                                   err_msg=f"{label} at {jax.tree_util.keystr(path)}")


# ---- the loss and its gradients (tiny preset, in process) -------------------------------------------------


@pytest.fixture(scope="module")
def digits_32(data_dir) -> np.ndarray:
    images, _ = load_digits_split(data_dir, "test", image_size=32)
    return images


@pytest.fixture(scope="module")
def tiny_task(digits_32):
    """The tiny preset's task, its model split into (graphdef, params, rest), and a compiled gradient function.

    The function returns the gradients of loss, generator_loss and disc_loss, and the metrics, at any step,
    so every test here shares one compilation.
    """
    config = tiny_config()
    task = tasks_lib.make_task(config, {"image": digits_32[:16], "label": np.zeros(16, np.int32)})
    model = trainer.create_model(task, seed=0)
    graphdef, params, rest = nnx.split(model, task.trainable, ...)

    def term(name):
        def loss(params, rest, batch, key):
            _, metrics = task.loss_fn(nnx.merge(graphdef, params, rest), batch, key)
            return metrics[name], metrics
        return loss

    @jax.jit
    def gradients(params, rest, batch, key):
        total, metrics = jax.grad(term("loss"), has_aux=True)(params, rest, batch, key)
        generator, _ = jax.grad(term("generator_loss"), has_aux=True)(params, rest, batch, key)
        discriminator, _ = jax.grad(term("disc_loss"), has_aux=True)(params, rest, batch, key)
        return {"loss": total, "generator_loss": generator, "disc_loss": discriminator}, metrics

    return types.SimpleNamespace(task=task, graphdef=graphdef, params=params, rest=rest, gradients=gradients,
                                 images=jnp.asarray(digits_32[:8]))


def run_gradients(tiny_task, step: int):
    batch = {"image": tiny_task.images, "step": jnp.int32(step)}
    grads, metrics = tiny_task.gradients(tiny_task.params, tiny_task.rest, batch, jax.random.PRNGKey(1))
    return {name: nnx.merge(tiny_task.graphdef, tree, tiny_task.rest) for name, tree in grads.items()}, metrics


def test_discriminator_off_before_disc_start(tiny_task):
    grads, metrics = run_gradients(tiny_task, DISC_START - 1)
    assert float(metrics["disc_factor"]) == 0.0
    assert float(metrics["disc_loss"]) == 0.0
    assert float(metrics["adversarial_loss"]) == 0.0
    assert float(metrics["loss"]) == float(metrics["generator_loss"])
    assert global_norm(param_state(grads["loss"], "discriminator")) == 0.0
    assert global_norm(param_state(grads["loss"], "vae")) > 0.0


def test_discriminator_on_from_disc_start(tiny_task):
    grads, metrics = run_gradients(tiny_task, DISC_START)
    assert float(metrics["disc_factor"]) == 1.0
    assert float(metrics["disc_loss"]) > 0.0
    assert float(metrics["adversarial_loss"]) != 0.0
    assert global_norm(param_state(grads["loss"], "discriminator")) > 0.0


def test_gradients_separated_between_vae_and_discriminator(tiny_task):
    """With the discriminator on, each parameter set gets the gradient of its own loss term only."""
    grads, _ = run_gradients(tiny_task, DISC_START)
    assert global_norm(param_state(grads["generator_loss"], "discriminator")) == 0.0
    assert global_norm(param_state(grads["disc_loss"], "vae")) == 0.0
    assert global_norm(param_state(grads["generator_loss"], "vae")) > 0.0
    assert global_norm(param_state(grads["disc_loss"], "discriminator")) > 0.0
    assert_trees_close(param_state(grads["loss"], "vae"), param_state(grads["generator_loss"], "vae"),
                       rtol=1e-6, atol=1e-9, label="VAE gradient of loss vs generator_loss")
    assert_trees_close(param_state(grads["loss"], "discriminator"), param_state(grads["disc_loss"], "discriminator"),
                       rtol=1e-6, atol=1e-9, label="discriminator gradient of loss vs disc_loss")


def test_reconstruction_loss_decreases(tiny_task):
    """Twenty Adam steps on one fixed batch, discriminator off, lower the reconstruction loss."""
    tx = optax.adam(3e-3)
    params = tiny_task.params
    opt_state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    losses = []
    for _ in range(20):
        batch = {"image": tiny_task.images, "step": jnp.int32(0)}
        grads, metrics = tiny_task.gradients(params, tiny_task.rest, batch, jax.random.PRNGKey(1))
        updates, opt_state = update(grads["loss"], opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(metrics["rec_loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


# ---- LPIPS ----------------------------------------------------------------------------------------------


def random_vgg16_state_dict(seed: int) -> dict[str, np.ndarray]:
    """Return a torchvision-style VGG16 state_dict with He-normal conv weights and a dummy classifier."""
    rng = np.random.default_rng(seed)
    state_dict, index, in_channels = {}, 0, 3
    for entry in TORCHVISION_VGG16:
        if entry == "M":
            index += 1
            continue
        std = np.sqrt(2.0 / (in_channels * 9))
        state_dict[f"features.{index}.weight"] = (rng.standard_normal((entry, in_channels, 3, 3)) * std).astype(np.float32)
        state_dict[f"features.{index}.bias"] = (rng.standard_normal(entry) * 0.05).astype(np.float32)
        in_channels, index = entry, index + 2
    state_dict["classifier.0.weight"] = np.zeros((4, 8), np.float32)  # dropped by the loader
    return state_dict


def save_torch(state_dict: dict[str, np.ndarray], path) -> None:
    torch.save({key: torch.from_numpy(value) for key, value in state_dict.items()}, path)


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "vgg16.pth"
    save_torch(random_vgg16_state_dict(0), path)
    return path


@pytest.fixture(scope="module")
def lpips_heads_file(tmp_path_factory):
    """Random LPIPS linear heads (lin<k>.model.1.weight, [1, C, 1, 1]), so no lpips package is needed."""
    rng = np.random.default_rng(1)
    heads = {f"lin{k}.model.1.weight": rng.uniform(0.0, 0.1, (1, channels, 1, 1)).astype(np.float32)
             for k, channels in enumerate((64, 128, 256, 512, 512))}
    path = tmp_path_factory.mktemp("lpips_heads") / "vgg.pth"
    save_torch(heads, path)
    return path


def torchvision_stand_in() -> types.ModuleType:
    """Return a `torchvision` module whose models.vgg16(pretrained=False).features is VGG16's trunk in torch."""

    def vgg16(pretrained=False, **unused):
        assert not pretrained, "the stand-in has no pretrained weights"
        layers, in_channels = [], 3
        for entry in TORCHVISION_VGG16:
            if entry == "M":
                layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [torch.nn.Conv2d(in_channels, entry, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
                in_channels = entry
        return types.SimpleNamespace(features=torch.nn.Sequential(*layers))

    module = types.ModuleType("torchvision")
    module.models = types.SimpleNamespace(vgg16=vgg16)
    return module


@pytest.fixture
def lpips_package(monkeypatch):
    """Import the lpips package. Without torchvision, lpips gets a stand-in VGG16 trunk written in torch.

    The torchvision wheel that matches this torch (2.13.0+cpu) is a CUDA build that fails to import, so the
    stand-in provides only the trunk layout. Scaling, layer taps, normalisation, heads and averaging are
    the lpips package's own code.
    """
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("the lpips package is not installed")
    if importlib.util.find_spec("torchvision") is None:
        monkeypatch.setitem(sys.modules, "torchvision", torchvision_stand_in())
    import lpips

    return lpips


def test_lpips_matches_lpips_package(lpips_package, vgg16_file, tmp_path):
    reference = lpips_package.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False).eval()
    vgg16 = lpips_io.read_torch_weights(vgg16_file)
    with torch.no_grad():
        for key, value in reference.state_dict().items():
            if key.startswith("net.slice"):
                _, _, index, leaf = key.split(".")
                value.copy_(torch.from_numpy(vgg16[f"features.{index}.{leaf}"]))

    # Both file layouts: torchvision VGG16 + bundled heads, and a whole lpips state_dict.
    from_torchvision = lpips_io.load_lpips(vgg16_file)
    whole_file = tmp_path / "lpips_whole.pth"
    torch.save(reference.state_dict(), whole_file)
    from_lpips = lpips_io.load_lpips(whole_file)
    assert_trees_close(nnx.state(from_lpips, nnx.Param), nnx.state(from_torchvision, nnx.Param), rtol=0, atol=0,
                       label="LPIPS weights from the two file layouts")

    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (3, 32, 48, 3)).astype(np.float32)
    x1 = np.clip(x0 + rng.normal(0, 0.3, x0.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x0.transpose(0, 3, 1, 2)), torch.from_numpy(x1.transpose(0, 3, 1, 2)))
    distance = jax.jit(lambda model, a, b: model(a, b))
    actual = distance(from_torchvision, jnp.asarray(x0), jnp.asarray(x1))
    # Measured: 7.5e-9 absolute on distances of about 0.026 (fp32, CPU).
    np.testing.assert_allclose(np.asarray(actual), expected.numpy().reshape(-1), rtol=1e-5, atol=1e-8)
    same = distance(from_torchvision, jnp.asarray(x0), jnp.asarray(x0))
    np.testing.assert_allclose(np.asarray(same), 0.0, rtol=0, atol=1e-7)


def test_lpips_loader_lists_missing_keys(tmp_path):
    state_dict = random_vgg16_state_dict(1)
    del state_dict["features.28.weight"]
    path = tmp_path / "vgg16_incomplete.pth"
    save_torch(state_dict, path)
    heads = tmp_path / "heads.pth"
    save_torch({f"lin{k}.model.1.weight": np.ones((1, c, 1, 1), np.float32)
                for k, c in enumerate((64, 128, 256, 512, 512))}, heads)
    with pytest.raises(CheckpointMismatchError, match=r"missing key: features\.28\.weight"):
        lpips_io.load_lpips(path, heads)


def test_lpips_normalization_gradient_finite_at_zero():
    """ReLU features are often all zero at a pixel; normalising them must give a finite gradient there."""
    features = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([3.0, 4.0, 0.0, 0.0]))
    normalized = _unit_normalize(features)
    np.testing.assert_allclose(np.asarray(normalized[0, 0, 0]), [0.6, 0.8, 0.0, 0.0], rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(normalized[0, 1, 1]), 0.0, rtol=0, atol=0)
    grad = jax.grad(lambda f: jnp.sum(_unit_normalize(f) * jnp.arange(4.0)))(features)
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_perceptual_loss_frozen_in_task(vgg16_file, lpips_heads_file, digits_32):
    config = tiny_config("model.loss.perceptual_weight=1.0", f"model.loss.lpips_vgg16_weights={str(vgg16_file)!r}",
                         f"model.loss.lpips_linear_weights={str(lpips_heads_file)!r}", "model.loss.disc_weight=0.0")
    task = tasks_lib.make_task(config, {"image": digits_32[:8], "label": np.zeros(8, np.int32)})
    model = trainer.create_model(task, seed=0)
    trainable_paths = [path for path, _ in nnx.to_flat_state(nnx.state(model, task.trainable))]
    assert trainable_paths
    assert not [path for path in trainable_paths if path[0] == "lpips"]
    expected = lpips_io.load_lpips(vgg16_file, lpips_heads_file)
    assert_trees_close(nnx.state(model.lpips, nnx.Param), nnx.state(expected, nnx.Param), rtol=0, atol=0,
                       label="LPIPS weights in the task model")
    batch = {"image": jnp.asarray(digits_32[:2]), "step": jnp.int32(0)}
    _, metrics = jax.jit(task.loss_fn)(model, batch, jax.random.PRNGKey(0))
    assert float(metrics["perceptual_loss"]) > 0.0
    assert np.isfinite(float(metrics["loss"]))


# ---- the discriminator ------------------------------------------------------------------------------------


class TorchPatchDiscriminator(torch.nn.Module):
    """taming-transformers' NLayerDiscriminator layout with GroupNorm in place of BatchNorm, for num_layers=2."""

    def __init__(self, base: int, groups: int):
        super().__init__()
        self.main = torch.nn.Sequential(
            torch.nn.Conv2d(3, base, 4, 2, 1),
            torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(base, 2 * base, 4, 2, 1, bias=False),
            torch.nn.GroupNorm(groups, 2 * base),
            torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(2 * base, 4 * base, 4, 1, 1, bias=False),
            torch.nn.GroupNorm(groups, 4 * base),
            torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(4 * base, 1, 4, 1, 1),
        )

    def forward(self, x):
        return self.main(x)


def test_discriminator_matches_torch_layout():
    config = NLayerDiscriminatorConfig(in_channels=3, base_channels=8, num_layers=2, norm_num_groups=4)
    model = NLayerDiscriminator(config, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    reference = TorchPatchDiscriminator(8, 4)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in nnx_to_torch(nnx.state(model)).items()}, strict=True)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    actual = np.asarray(jax.jit(lambda m, images: m(images))(model, jnp.asarray(x)))
    assert actual.shape == (2, 6, 6, 1)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=2e-6)  # measured 4.2e-7 on logits up to 0.9


def test_discriminator_rejects_small_images():
    config = NLayerDiscriminatorConfig(base_channels=8, num_layers=3, norm_num_groups=4)
    # The input check runs before any layer, so an abstract model (no weights allocated) suffices.
    model = nnx.eval_shape(lambda: NLayerDiscriminator(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"side >= 24"):
        model(jnp.zeros((1, 16, 16, 3)))


# ---- config and the command line --------------------------------------------------------------------------


def test_vae_config_json_round_trip(tmp_path):
    config = config_lib.load_config("vae_digits", ["model.loss.reconstruction=mse", "model.loss.kl_weight=1e-5"])
    config_lib.save_config(config, tmp_path / "config.json")
    assert config_lib.read_config(tmp_path / "config.json") == config


def test_vae_config_rejects_unknown_reconstruction():
    with pytest.raises(config_lib.ConfigError, match=r"use one of \('l1', 'mse'\)"):
        config_lib.load_config("vae_digits", ["model.loss.reconstruction=l2"])


def test_tiny_preset_trains_from_cli(tmp_path, compile_cache, data_dir):
    workdir = tmp_path / "vae"
    run_module("jaxgen.train", train_args("vae_digits", workdir, data_dir), jaxgen_env(compile_cache))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = {r["step"]: r for r in records if "loss" in r}
    assert sorted(train_records) == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) for r in train_records.values())
    # Update n (0-based) is logged as step n + 1, and the discriminator counts from update DISC_START.
    assert [train_records[s]["disc_loss"] for s in range(1, DISC_START + 1)] == [0.0] * DISC_START
    assert all(train_records[s]["disc_loss"] > 0 for s in range(DISC_START + 1, 7))
    held_out = [r for r in records if "held_out_l1" in r]
    assert [r["step"] for r in held_out] == [6]
    assert np.isfinite(held_out[0]["held_out_psnr_db"])
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    assert (workdir / "samples" / "step_000006.png").is_file()

    # The exported diffusers folder contains the EMA VAE of the last checkpoint.
    from conversion.diffusers_io import load_vae
    from jaxgen import checkpoint

    config = checkpoint.read_run_config(workdir)
    graphdef, params, rest, step = trainer.build_inference_model(config, workdir)
    assert step == 6
    exported = load_vae(workdir / "vae")
    assert_trees_close(nnx.state(exported, nnx.Param), param_state(nnx.merge(graphdef, params, rest), "vae"),
                       rtol=0, atol=0, label="exported VAE vs checkpoint")
