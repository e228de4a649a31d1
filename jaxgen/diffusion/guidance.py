"""Classifier-free and classifier guidance as wrappers around a sampler's model function.

The wrappers keep the sampler contract ``model_fn(x_t, t, cond) -> model_output`` (x_t [B, ...],
t int32 [B]), so a guided model function goes into any sampler in samplers.py.

Sources: classifier-free guidance, Ho & Salimans 2022, "Classifier-Free Diffusion Guidance".
Classifier guidance, Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", in
its eps form eps - s * sigma_t * grad log p(y | x_t), which any sampler can use.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxgen.diffusion.forward import broadcast_to_sample, predict_eps
from jaxgen.diffusion.samplers import ModelFn
from jaxgen.diffusion.schedules import NoiseSchedule

LogProbFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def cfg_combine(out_cond: jax.Array, out_uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
    """Combine conditional and unconditional outputs: out_uncond + scale * (out_cond - out_uncond).

    scale is a scalar or a per-example [B] array; 1 returns out_cond and 0 returns out_uncond.
    """
    scale = broadcast_to_sample(jnp.asarray(scale, dtype=out_cond.dtype), out_cond)
    return out_uncond + scale * (out_cond - out_uncond)


def _broadcast_null(cond_leaf: jax.Array, null_leaf: Any) -> jax.Array:
    null_leaf = jnp.asarray(null_leaf, dtype=cond_leaf.dtype)
    try:
        return jnp.broadcast_to(null_leaf, cond_leaf.shape)
    except ValueError as error:
        raise ValueError(
            f"null_cond leaf of shape {null_leaf.shape} does not broadcast to the condition's shape "
            f"{cond_leaf.shape}; give one null condition per example or one shared by all."
        ) from error


def cfg_model_fn(model_fn: ModelFn, guidance_scale: float | jax.Array, null_cond: Any) -> ModelFn:
    """Wrap model_fn with classifier-free guidance, evaluated in one batched forward pass.

    The returned function concatenates (x_t, t, cond) with (x_t, t, null_cond) along the batch axis,
    calls model_fn once on the 2B batch and returns cfg_combine(out_cond, out_uncond, guidance_scale).
    null_cond has cond's pytree structure. Each of its leaves is broadcast to the matching cond
    leaf's shape, so one scalar null label or one null embedding serves the whole batch.
    guidance_scale may be a traced scalar or a per-example [B] array.
    """

    def guided(x_t: jax.Array, t: jax.Array, cond: Any) -> jax.Array:
        batch = x_t.shape[0]
        null = jax.tree.map(_broadcast_null, cond, null_cond)
        both_cond = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null)
        output = model_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0), both_cond)
        return cfg_combine(output[:batch], output[batch:], guidance_scale)

    return guided


def drop_condition(
    key: jax.Array, labels: jax.Array, null_label: Any, drop_prob: float | jax.Array
) -> jax.Array:
    """Replace each example's label by null_label with probability drop_prob (classifier-free training).

    labels is [B] or [B, ...] (for example class ids or embeddings); one Bernoulli draw per example
    decides for all of its entries. null_label broadcasts to labels.shape[1:].

    Raises:
      ValueError: drop_prob is a concrete number outside [0, 1].
    """
    try:
        probability = float(drop_prob)
    except (TypeError, jax.errors.ConcretizationTypeError):
        probability = None
    if probability is not None and not 0.0 <= probability <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1] (0.1 is common), got {probability}.")
    drop = jax.random.bernoulli(key, drop_prob, (labels.shape[0],))
    drop = broadcast_to_sample(drop, labels)
    return jnp.where(drop, jnp.asarray(null_label, dtype=labels.dtype), labels)


def classifier_guided_model_fn(
    model_fn: ModelFn,
    log_prob_fn: LogProbFn,
    schedule: NoiseSchedule,
    scale: float | jax.Array,
    *,
    prediction_type: str = "epsilon",
) -> ModelFn:
    """Wrap model_fn with classifier guidance; the wrapped function outputs eps.

    log_prob_fn(x_t, t, y) returns log p(y | x_t, t) per example [B]. The wrapped function converts
    the model's output (of prediction_type) to eps and returns
    eps - scale * sigma_t * grad_{x_t} log p(y | x_t, t), with sigma_t = sqrt(1 - alpha_bar_t) and
    the gradient taken of the batch sum (examples do not interact). Because the output is eps, call
    samplers with prediction_type="epsilon" whatever the model predicts.

    With classifier-free guidance, wrap the CFG function: classifier_guided_model_fn(cfg_model_fn(
    model_fn, s, null), log_prob_fn, ...). The other order would pass null_cond to the classifier.
    """

    def guided(x_t: jax.Array, t: jax.Array, y: Any) -> jax.Array:
        eps = predict_eps(schedule, x_t, t, model_fn(x_t, t, y), prediction_type=prediction_type)
        grad = jax.grad(lambda x: jnp.sum(log_prob_fn(x, t, y)))(x_t)
        sigma = broadcast_to_sample(schedule.alpha_sigma(t)[1], x_t)
        return eps - scale * sigma * grad.astype(eps.dtype)

    return guided
