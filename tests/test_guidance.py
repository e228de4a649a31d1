"""Tests for jaxgen.diffusion.guidance: classifier-free guidance, condition dropout, classifier guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.diffusion import (
    cfg_combine,
    cfg_model_fn,
    classifier_guided_model_fn,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    dpmpp_2m_sample,
    drop_condition,
    make_schedule,
    predict_eps,
    velocity_target,
)

B, H, W, C = 3, 2, 2, 2
NUM_CLASSES = 4
NULL_LABEL = NUM_CLASSES  # The learned null class of classifier-free guidance.
ATOL = 1e-5
RTOL = 1e-5


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("linear")


def label_model(x, t, labels):
    """Return a fixed output that depends on x, t and the class label."""
    label_term = 0.1 * labels.astype(jnp.float32)[:, None, None, None]
    time_term = 1e-4 * t.astype(jnp.float32)[:, None, None, None]
    return 0.5 * x + label_term + time_term


def sample_inputs(seed=0):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((B, H, W, C)), dtype=jnp.float32)
    t = jnp.array([900, 400, 20], dtype=jnp.int32)
    labels = jnp.array([0, 2, 3], dtype=jnp.int32)
    return x, t, labels


# Toy analytic classifier: log p(y | x) = log_softmax(W x + b)[y], with W and b fixed.
CLASSIFIER_W = np.random.default_rng(7).standard_normal((H * W * C, NUM_CLASSES)).astype(np.float32)
CLASSIFIER_B = np.linspace(-0.5, 0.5, NUM_CLASSES, dtype=np.float32)


def classifier_log_prob(x, t, labels):
    del t
    logits = x.reshape(x.shape[0], -1) @ CLASSIFIER_W + CLASSIFIER_B
    return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]


def classifier_grad_by_hand(x, labels):
    """Compute grad_x log_softmax(W x + b)[y] = W[:, y] - W softmax(W x + b), in float64."""
    x_flat = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
    logits = x_flat @ CLASSIFIER_W + CLASSIFIER_B
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    grad = CLASSIFIER_W.T[np.asarray(labels)] - probs @ CLASSIFIER_W.T
    return grad.reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, 1.0, 7.5])
def test_cfg_combine_formula(scale):
    out_cond = np.random.default_rng(0).normal(size=(B, H, W, C)).astype(np.float32)
    out_uncond = np.random.default_rng(1).normal(size=(B, H, W, C)).astype(np.float32)
    expected = out_uncond + scale * (out_cond - out_uncond)
    np.testing.assert_allclose(
        np.asarray(cfg_combine(jnp.asarray(out_cond), jnp.asarray(out_uncond), scale)),
        expected,
        rtol=RTOL,
        atol=ATOL,
    )


def test_cfg_combine_per_example_scale():
    out_cond = jnp.ones((B, H, W, C))
    out_uncond = jnp.zeros((B, H, W, C))
    scale = jnp.array([0.0, 2.0, 5.0])
    combined = np.asarray(cfg_combine(out_cond, out_uncond, scale))
    for i in range(B):
        np.testing.assert_allclose(combined[i], np.full((H, W, C), float(scale[i])), rtol=RTOL, atol=ATOL)


def test_cfg_model_fn_one_doubled_call():
    x, t, labels = sample_inputs()
    calls = []

    def recording_model(x_in, t_in, cond_in):
        calls.append((x_in, t_in, cond_in))
        return label_model(x_in, t_in, cond_in)

    guided = cfg_model_fn(recording_model, 3.0, NULL_LABEL)(x, t, labels)

    assert len(calls) == 1
    x_in, t_in, cond_in = calls[0]
    assert x_in.shape == (2 * B, H, W, C)
    np.testing.assert_array_equal(np.asarray(x_in), np.concatenate([np.asarray(x)] * 2))
    np.testing.assert_array_equal(np.asarray(t_in), np.concatenate([np.asarray(t)] * 2))
    expected_cond = np.concatenate([np.asarray(labels), np.full(B, NULL_LABEL)])
    np.testing.assert_array_equal(np.asarray(cond_in), expected_cond)

    out_cond = label_model(x, t, labels)
    out_uncond = label_model(x, t, jnp.full((B,), NULL_LABEL))
    expected = np.asarray(out_uncond) + 3.0 * (np.asarray(out_cond) - np.asarray(out_uncond))
    np.testing.assert_allclose(np.asarray(guided), expected, rtol=RTOL, atol=ATOL)


def test_cfg_model_fn_pytree_condition():
    x, t, labels = sample_inputs()
    embeddings = jnp.arange(B * 5, dtype=jnp.float32).reshape(B, 5)
    null_embedding = jnp.full((5,), -1.0)  # One null embedding shared by the whole batch.

    def dict_model(x_in, t_in, cond_in):
        text_term = jnp.sum(cond_in["text"], axis=1)[:, None, None, None]
        return label_model(x_in, t_in, cond_in["label"]) + text_term

    cond = {"label": labels, "text": embeddings}
    null_cond = {"label": NULL_LABEL, "text": null_embedding}
    guided = cfg_model_fn(dict_model, 2.0, null_cond)(x, t, cond)
    out_cond = dict_model(x, t, cond)
    batch_null = {"label": jnp.full((B,), NULL_LABEL), "text": jnp.broadcast_to(null_embedding, (B, 5))}
    out_uncond = dict_model(x, t, batch_null)
    expected = cfg_combine(out_cond, out_uncond, 2.0)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(expected), rtol=RTOL, atol=ATOL)


def test_cfg_model_fn_rejects_mismatched_null():
    x, t, labels = sample_inputs()
    with pytest.raises(ValueError, match="null_cond"):
        cfg_model_fn(label_model, 2.0, jnp.zeros((B + 1,), jnp.int32))(x, t, labels)


def test_cfg_traced_scale_does_not_recompile():
    x, t, labels = sample_inputs()
    traces = {"count": 0}

    def counting_model(x_in, t_in, cond_in):
        traces["count"] += 1
        return label_model(x_in, t_in, cond_in)

    @jax.jit
    def guided(scale):
        return cfg_model_fn(counting_model, scale, NULL_LABEL)(x, t, labels)

    low = guided(1.0)
    high = guided(5.0)
    assert traces["count"] == 1
    out_uncond = label_model(x, t, jnp.full((B,), NULL_LABEL))
    np.testing.assert_allclose(
        np.asarray(high - out_uncond), 5.0 * np.asarray(low - out_uncond), rtol=1e-4, atol=1e-5
    )


# ----------------------------------------------------------------------------------------------
# Condition dropout.
# ----------------------------------------------------------------------------------------------


def test_drop_condition_extremes():
    labels = jnp.arange(16, dtype=jnp.int32) % NUM_CLASSES
    key = jax.random.key(0)
    kept = drop_condition(key, labels, NULL_LABEL, 0.0)
    dropped = drop_condition(key, labels, NULL_LABEL, 1.0)
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(labels))
    np.testing.assert_array_equal(np.asarray(dropped), np.full(16, NULL_LABEL))


def test_drop_condition_rate_and_values():
    num = 20000
    labels = jnp.arange(num, dtype=jnp.int32) % NUM_CLASSES
    dropped = np.asarray(drop_condition(jax.random.key(1), labels, NULL_LABEL, 0.1))
    is_null = dropped == NULL_LABEL
    # Binomial(20000, 0.1) has standard deviation 0.0021 in the rate; 0.01 is about 5 deviations.
    assert abs(is_null.mean() - 0.1) < 0.01
    np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])


def test_drop_condition_whole_embeddings():
    embeddings = jnp.ones((64, 3, 5))
    dropped = np.asarray(drop_condition(jax.random.key(2), embeddings, 0.0, 0.5))
    per_example = dropped.reshape(64, -1)
    assert np.all((per_example == 0.0).all(axis=1) | (per_example == 1.0).all(axis=1))
    assert 0 < (per_example == 0.0).all(axis=1).sum() < 64


def test_drop_condition_rejects_bad_probability():
    with pytest.raises(ValueError, match="drop_prob"):
        drop_condition(jax.random.key(0), jnp.zeros((4,), jnp.int32), NULL_LABEL, 1.5)


# ----------------------------------------------------------------------------------------------
# Classifier guidance.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_classifier_guided_eps_matches_hand_computation(schedule, prediction_type):
    x, t, labels = sample_inputs(1)
    scale = 2.5
    guided = classifier_guided_model_fn(
        label_model, classifier_log_prob, schedule, scale, prediction_type=prediction_type
    )
    ours = np.asarray(guided(x, t, labels))

    eps = np.asarray(predict_eps(schedule, x, t, label_model(x, t, labels), prediction_type=prediction_type))
    alpha_bar = np.asarray(schedule.alphas_cumprod, dtype=np.float64)[np.asarray(t)]
    sigma = np.sqrt(1.0 - alpha_bar)[:, None, None, None]
    expected = eps - scale * sigma * classifier_grad_by_hand(x, labels)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_classifier_guided_step_raises_log_prob(schedule):
    x, t, labels = sample_inputs(2)
    t_prev = t - 50
    plain_eps = label_model(x, t, labels)
    guided_eps = classifier_guided_model_fn(label_model, classifier_log_prob, schedule, 5.0)(x, t, labels)
    plain_next, _ = ddim_step(schedule, plain_eps, t, t_prev, x)
    guided_next, _ = ddim_step(schedule, guided_eps, t, t_prev, x)
    gain = classifier_log_prob(guided_next, t_prev, labels) - classifier_log_prob(plain_next, t_prev, labels)
    assert np.all(np.asarray(gain) > 0), f"log p(y | x) changed by {np.asarray(gain)}"


def test_classifier_guidance_scale_zero_is_eps(schedule):
    x, t, labels = sample_inputs(3)
    def v_model(x_in, t_in, y):
        return velocity_target(schedule, x_in, label_model(x_in, t_in, y), t_in)

    guided = classifier_guided_model_fn(
        v_model, classifier_log_prob, schedule, 0.0, prediction_type="v_prediction"
    )
    expected = predict_eps(schedule, x, t, v_model(x, t, labels), prediction_type="v_prediction")
    np.testing.assert_allclose(np.asarray(guided(x, t, labels)), np.asarray(expected), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "sampler, options",
    [
        (ddim_sample, {"num_steps": 5, "eta": 0.5}),
        (dpmpp_2m_sample, {"num_steps": 5}),
        (ddpm_sample, {"num_steps": 5}),
    ],
)
def test_guidance_composes_in_samplers(schedule, sampler, options):
    x_T, _, labels = sample_inputs(4)
    seen_labels = []

    def recording_log_prob(x, t, y):
        seen_labels.append(y)
        return classifier_log_prob(x, t, y)

    cfg = cfg_model_fn(label_model, 3.0, NULL_LABEL)

    @jax.jit
    def run(x_T, key, labels, classifier_scale):
        guided = classifier_guided_model_fn(cfg, recording_log_prob, schedule, classifier_scale)
        return sampler(guided, schedule, x_T, key, labels, **options)

    result = run(x_T, jax.random.key(0), labels, 2.0)
    unguided = run(x_T, jax.random.key(0), labels, 0.0)

    assert result.shape == x_T.shape
    assert bool(jnp.all(jnp.isfinite(result)))
    assert len(seen_labels) == 1  # Traced once inside the scan, and not again for the new scale.
    assert seen_labels[0].shape == (B,)  # The classifier gets the labels, not the doubled CFG batch.
    assert float(jnp.max(jnp.abs(result - unguided))) > 1e-3
