"""Low-rank adapters (LoRA) for the nnx.Linear layers of any Flax NNX model, added by module surgery.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") keeps a linear layer's
kernel W [in, out] frozen and learns a low-rank update:

    y = x @ W + b + (alpha / r) * (x @ A) @ B,    A: [in, r],  B: [r, out]

`apply_lora` swaps matching nnx.Linear attributes of a model for `LoRALinear` layers, which keep
the base `kernel` and `bias` at the same state paths. So conversion.rules still loads and saves
the base weights of an adapted model. The adapter matrices are `LoRAWeight` variables, which are
not nnx.Param: conversion.rules converts only nnx.Param and nnx.BatchStat, so it neither requires
nor writes them, and training selects them with the filter `LoRAWeight`:

    paths = apply_lora(unet, rank=4, alpha=4, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(unet, optax.adamw(1e-4), wrt=LoRAWeight)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, LoRAWeight))(unet, batch)
    optimizer.update(unet, grads)
    merge_lora(unet)  # plain nnx.Linear layers again, with W + (alpha / r) * A @ B

Module paths are the dotted NNX paths, which equal the torch module names of diffusers and
transformers models ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0").
A target name matches a path that equals it or ends with "." plus the name, as peft matches
`target_modules`.

NOTE: checkpoints written from `nnx.state(model, nnx.Param)` leave the adapters out. Save them
with `lora_state` or conversion.lora_io.save_lora_weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "CLIP_TARGET_MODULES",
    "UNET_TARGET_MODULES",
    "LoRAAdapter",
    "LoRALinear",
    "LoRAWeight",
    "add_lora_adapters",
    "apply_lora",
    "fold_lora_adapters",
    "lora_modules",
    "lora_state",
    "merge_lora",
]

# Attention projections of the diffusers U-Net (Attention.to_q, ..., to_out[0]), the targets of
# diffusers' SD LoRA training scripts.
UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
# Attention projections of transformers' CLIP text encoder (CLIPAttention).
CLIP_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")


class LoRAWeight(nnx.Variable):
    """Adapter matrix of a LoRALinear layer (lora_A or lora_B).

    Deliberately not an nnx.Param (unlike flax's nnx.LoRAParam), so that base-weight conversion
    and `wrt=nnx.Param` optimizers leave it alone.
    """


def _kaiming_uniform_a(key: jax.Array, shape: tuple[int, int], dtype: jnp.dtype) -> jax.Array:
    """Initialise A [in, r] uniformly in +-1/sqrt(in), as peft's default init does.

    peft (src/peft/tuners/lora/layer.py, reset_lora_parameters) calls torch's
    kaiming_uniform_(a=sqrt(5)) on lora_A, whose bound is sqrt(6 / ((1 + 5) * fan_in)).
    """
    bound = 1.0 / np.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


def _check_rank_alpha(rank: int, alpha: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive finite number, got {alpha!r}. alpha = rank gives scale 1.")


class LoRALinear(nnx.Linear):
    """An nnx.Linear plus the low-rank update (alpha / rank) * (x @ lora_A) @ lora_B.

    Built from an existing layer: it takes over that layer's `kernel` and `bias` variables (same
    names, so the same state paths) and its dtype settings. lora_A [in, rank] starts like peft's
    default (uniform in +-1/sqrt(in)) and lora_B [rank, out] at zero, so the output starts equal
    to the base layer's.

    Attributes:
        rank: r, the inner dimension of the update.
        alpha: the update is scaled by alpha / rank.
        lora_A: LoRAWeight [in, rank].
        lora_B: LoRAWeight [rank, out].
    """

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        if not isinstance(base, nnx.Linear) or isinstance(base, LoRALinear):
            raise TypeError(f"LoRALinear wraps a plain nnx.Linear, got {type(base).__name__}.")
        _check_rank_alpha(rank, alpha)
        kernel, bias = base.kernel, base.bias
        # The initialisers return the base arrays, so nothing new is allocated. The variables
        # themselves are then taken over to keep their metadata.
        super().__init__(
            base.in_features,
            base.out_features,
            use_bias=base.use_bias,
            dtype=base.dtype,
            param_dtype=base.param_dtype,
            precision=base.precision,
            kernel_init=lambda *_: kernel.get_value(),
            bias_init=lambda *_: bias.get_value(),
            dot_general=base.dot_general,
            promote_dtype=base.promote_dtype,
            preferred_element_type=base.preferred_element_type,
            rngs=rngs,
        )
        self.kernel = kernel
        if base.use_bias:
            self.bias = bias
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.lora_A = LoRAWeight(_kaiming_uniform_a(rngs.params(), (base.in_features, rank), base.param_dtype))
        self.lora_B = LoRAWeight(jnp.zeros((rank, base.out_features), base.param_dtype))

    @classmethod
    def from_arrays(cls, base: nnx.Linear, lora_A: jax.Array, lora_B: jax.Array, *, alpha: float) -> LoRALinear:
        """Wrap `base` with given adapter matrices lora_A [in, r] and lora_B [r, out]."""
        lora_A = jnp.asarray(lora_A, base.param_dtype)
        lora_B = jnp.asarray(lora_B, base.param_dtype)
        rank = lora_A.shape[-1] if lora_A.ndim == 2 else -1
        expected_A, expected_B = (base.in_features, rank), (rank, base.out_features)
        if lora_A.shape != expected_A or lora_B.shape != expected_B:
            raise ValueError(
                f"LoRA matrices of shapes A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)} do not fit a "
                f"Linear({base.in_features} -> {base.out_features}). Expected A [in, r] = [{base.in_features}, r] "
                f"and B [r, out] = [r, {base.out_features}] with the same r."
            )
        layer = cls(base, rank=rank, alpha=alpha, rngs=nnx.Rngs(0))
        layer.lora_A.set_value(lora_A)
        layer.lora_B.set_value(lora_B)
        return layer

    @property
    def scaling(self) -> float:
        """alpha / rank, the factor on the low-rank update."""
        return self.alpha / self.rank

    def delta_kernel(self) -> jax.Array:
        """Return (alpha / rank) * lora_A @ lora_B [in, out] in float32, the update to the kernel."""
        lora_A = self.lora_A.get_value().astype(jnp.float32)
        lora_B = self.lora_B.get_value().astype(jnp.float32)
        return self.scaling * jnp.matmul(lora_A, lora_B, precision=jax.lax.Precision.HIGHEST)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        """Map inputs [..., in] to [..., out]: the base layer plus the scaled low-rank update."""
        y = super().__call__(inputs, out_sharding=out_sharding)
        x, lora_A, lora_B = self.promote_dtype(
            (inputs, self.lora_A.get_value(), self.lora_B.get_value()), dtype=self.dtype
        )
        update = jnp.matmul(jnp.matmul(x, lora_A, precision=self.precision), lora_B, precision=self.precision)
        return y + (self.scaling * update).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class LoRAAdapter:
    """Adapter matrices for one layer, in jaxgen layout, as read from a file.

    Attributes:
        lora_A: [in, r] (torch's lora_A / lora_down weight, transposed).
        lora_B: [r, out] (torch's lora_B / lora_up weight, transposed).
        alpha: the update is scaled by alpha / r.
    """

    lora_A: np.ndarray
    lora_B: np.ndarray
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[-1])


# ----- module tree ---------------------------------------------------------------------------


def _dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def _modules_by_path(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Module]]:
    """Map each dotted module path of `model` to its path tuple and module (root is "")."""
    return {_dotted(path): (tuple(path), module) for path, module in nnx.iter_modules(model)}


def _replace_module(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    if not path:
        raise ValueError("Cannot replace the root module. Pass the model that contains the layer.")
    parent = model
    for part in path[:-1]:
        parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    last = path[-1]
    if isinstance(last, int):
        parent[last] = new
    else:
        setattr(parent, last, new)


def _matches(path: str, targets: Iterable[str]) -> bool:
    return any(path == target or path.endswith("." + target) for target in targets)


def _examples(paths: Iterable[str], count: int = 5) -> str:
    """Return up to `count` sorted paths joined by commas, with the total when some are left out."""
    paths = sorted(paths)
    if not paths:
        return "(none)"
    text = ", ".join(paths[:count])
    if len(paths) > count:
        text += f", ... ({len(paths)} in all)"
    return text


def apply_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str] = UNET_TARGET_MODULES,
    rngs: nnx.Rngs,
) -> list[str]:
    """Replace every nnx.Linear whose path matches `target_modules` with a LoRALinear, in place.

    Args:
        model: any NNX module, modified in place.
        rank: r of every adapter.
        alpha: the updates are scaled by alpha / rank.
        target_modules: module names or dotted path suffixes, such as "to_q" or "to_out.0"
            (the U-Net default) or CLIP_TARGET_MODULES for a CLIP text encoder.
        rngs: keys for the lora_A initialisation (the "params" stream).

    Returns:
        The dotted paths of the adapted layers, sorted.

    Raises:
        ValueError: no module matches, a match is not an nnx.Linear (for example a 1x1 conv
            proj_in), or a match already has an adapter.
    """
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    _check_rank_alpha(rank, alpha)
    modules = _modules_by_path(model)
    matched = {name: entry for name, entry in modules.items() if name and _matches(name, target_modules)}
    if not matched:
        linears = [name for name, (_, module) in modules.items() if isinstance(module, nnx.Linear)]
        raise ValueError(
            f"No module of {type(model).__name__} matches target_modules={list(target_modules)}. "
            f"Its nnx.Linear layers include: {_examples(linears)}."
        )
    adapted = [name for name, (_, module) in matched.items() if isinstance(module, LoRALinear)]
    if adapted:
        raise ValueError(f"These layers already have LoRA adapters: {_examples(adapted)}. Call merge_lora first.")
    wrong_type = [f"{name} ({type(module).__name__})" for name, (_, module) in matched.items()
                  if not isinstance(module, nnx.Linear)]
    if wrong_type:
        raise ValueError(
            f"LoRA supports nnx.Linear layers only, but target_modules={list(target_modules)} also matches "
            f"{_examples(wrong_type)}. Name the Linear layers more precisely."
        )
    for name in sorted(matched):
        path, module = matched[name]
        _replace_module(model, path, LoRALinear(module, rank=rank, alpha=alpha, rngs=rngs))
    return sorted(matched)


def lora_modules(model: nnx.Module) -> dict[str, LoRALinear]:
    """Return the LoRALinear layers of `model` by dotted path."""
    return {name: module for name, (_, module) in _modules_by_path(model).items() if isinstance(module, LoRALinear)}


def lora_state(model: nnx.Module) -> nnx.State:
    """Return the adapter matrices (LoRAWeight variables) of `model` and nothing else."""
    return nnx.state(model, LoRAWeight)


def _plain_linear(layer: nnx.Linear, kernel: nnx.Variable) -> nnx.Linear:
    """Build an nnx.Linear with the settings of `layer`, the given kernel variable and its bias."""
    bias = layer.bias
    linear = nnx.Linear(
        layer.in_features,
        layer.out_features,
        use_bias=layer.use_bias,
        dtype=layer.dtype,
        param_dtype=layer.param_dtype,
        precision=layer.precision,
        kernel_init=lambda *_: kernel.get_value(),
        bias_init=lambda *_: bias.get_value(),
        dot_general=layer.dot_general,
        promote_dtype=layer.promote_dtype,
        preferred_element_type=layer.preferred_element_type,
        rngs=nnx.Rngs(0),
    )
    linear.kernel = kernel
    if layer.use_bias:
        linear.bias = bias
    return linear


def merge_lora(model: nnx.Module) -> list[str]:
    """Fold every adapter into its base kernel and turn each LoRALinear back into an nnx.Linear.

    The new kernel is W + (alpha / rank) * lora_A @ lora_B, computed in float32 and stored in
    the kernel's dtype. Returns the dotted paths of the merged layers, sorted.
    """
    modules = _modules_by_path(model)
    merged = sorted(name for name, (_, module) in modules.items() if isinstance(module, LoRALinear))
    for name in merged:
        path, layer = modules[name]
        old = layer.kernel.get_value()
        kernel = layer.kernel.replace((old.astype(jnp.float32) + layer.delta_kernel()).astype(old.dtype))
        _replace_module(model, path, _plain_linear(layer, kernel))
    return merged


# ----- adapters from files -------------------------------------------------------------------


def _resolve_targets(model: nnx.Module, adapters: Mapping[str, LoRAAdapter]) -> dict[str, tuple[tuple, nnx.Module]]:
    modules = _modules_by_path(model)
    missing = [name for name in adapters if not name or name not in modules]
    if missing:
        raise ValueError(f"No module of {type(model).__name__} at these adapter paths: {_examples(missing)}.")
    return {name: modules[name] for name in adapters}


def add_lora_adapters(model: nnx.Module, adapters: Mapping[str, LoRAAdapter]) -> list[str]:
    """Turn the nnx.Linear at each path of `adapters` into a LoRALinear with those matrices.

    Raises:
        ValueError: a path names no module, a layer that is not an nnx.Linear (use
            fold_lora_adapters for 1x1 convolutions) or a layer that already has an adapter,
            or the matrix shapes do not fit the layer.
    """
    targets = _resolve_targets(model, adapters)
    adapted = [name for name, (_, module) in targets.items() if isinstance(module, LoRALinear)]
    if adapted:
        raise ValueError(f"These layers already have LoRA adapters: {_examples(adapted)}. Call merge_lora first.")
    not_linear = [f"{name} ({type(module).__name__})" for name, (_, module) in targets.items()
                  if not isinstance(module, nnx.Linear)]
    if not_linear:
        raise ValueError(
            f"Unmerged LoRA supports nnx.Linear layers only, and these targets are not: {_examples(not_linear)}. "
            "Fold the adapters into the base weights instead (merge=True)."
        )
    for name in sorted(targets):
        path, module = targets[name]
        adapter = adapters[name]
        layer = LoRALinear.from_arrays(module, adapter.lora_A, adapter.lora_B, alpha=adapter.alpha)
        _replace_module(model, path, layer)
    return sorted(targets)


def fold_lora_adapters(model: nnx.Module, adapters: Mapping[str, LoRAAdapter]) -> list[str]:
    """Add (alpha / r) * lora_A @ lora_B to the kernel of each nnx.Linear or 1x1 nnx.Conv at the paths.

    The module types stay the same. A LoRALinear target gets the update in its base kernel and
    keeps its own adapter. Returns the dotted paths, sorted.
    """
    targets = _resolve_targets(model, adapters)
    updates = {}
    for name, (_, module) in targets.items():
        kernel = getattr(module, "kernel", None)
        shape = tuple(kernel.get_value().shape) if isinstance(kernel, nnx.Variable) else None
        adapter = adapters[name]
        fits = (
            isinstance(module, (nnx.Linear, nnx.Conv))
            and shape is not None
            and all(size == 1 for size in shape[:-2])
            and shape[-2:] == (adapter.lora_A.shape[0], adapter.lora_B.shape[-1])
            and adapter.lora_A.shape[-1] == adapter.lora_B.shape[0]
        )
        if not fits:
            raise ValueError(
                f"LoRA matrices A {tuple(adapter.lora_A.shape)} and B {tuple(adapter.lora_B.shape)} cannot be "
                f"folded into {name} ({type(module).__name__}, kernel shape {shape}). Only nnx.Linear and 1x1 "
                "nnx.Conv layers with kernel [..., in, out] matching A [in, r] and B [r, out] are supported."
            )
        delta = (adapter.alpha / adapter.rank) * (
            np.asarray(adapter.lora_A, np.float64) @ np.asarray(adapter.lora_B, np.float64)
        )
        updates[name] = (kernel, delta.reshape(shape))
    for kernel, delta in updates.values():
        old = kernel.get_value()
        kernel.set_value((old.astype(jnp.float32) + jnp.asarray(delta, jnp.float32)).astype(old.dtype))
    return sorted(targets)
