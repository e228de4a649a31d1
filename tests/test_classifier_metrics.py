"""Tests for the digit classifiers and the sample-quality metrics."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgen import metrics
from jaxgen.models.classifier import (
    DigitClassifier,
    DigitClassifierConfig,
    NoisyClassifier,
    NoisyClassifierConfig,
    timestep_embedding,
)

BATCH = 3


def _random_images(seed: int, batch: int = BATCH, size: int = 16, channels: int = 1) -> jax.Array:
    return jax.random.uniform(
        jax.random.key(seed), (batch, size, size, channels), minval=-1.0, maxval=1.0
    )


def _parameter_count(model: nnx.Module) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


# Models are built and run under jit in most tests, because eager mode compiles one XLA program
# per primitive and shape, which made these tests several times slower on a 2-core CPU.


def _build(model_type, config, seed: int = 0):
    return nnx.jit(lambda: model_type(config, rngs=nnx.Rngs(seed)))()


def _jit_call(model: nnx.Module, method: str, *args) -> jax.Array:
    graphdef, state = nnx.split(model)

    def apply(state, *args):
        return getattr(nnx.merge(graphdef, state), method)(*args)

    return jax.jit(apply)(state, *args)


@pytest.fixture(scope="module")
def digit_model() -> DigitClassifier:
    return _build(DigitClassifier, DigitClassifierConfig())


@pytest.fixture(scope="module")
def noisy_model() -> NoisyClassifier:
    return _build(NoisyClassifier, NoisyClassifierConfig())


def _random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


# Fréchet distance.


def test_frechet_distance_self_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 8))
    distance = metrics.frechet_distance_from_features(features, features)
    np.testing.assert_allclose(distance, 0.0, atol=1e-8)


def test_frechet_distance_matches_diagonal_closed_form():
    rng = np.random.default_rng(1)
    dim = 6
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    var1, var2 = rng.uniform(0.1, 3.0, size=dim), rng.uniform(0.1, 3.0, size=dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2.0 * np.sqrt(var1 * var2))

    distance = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))

    np.testing.assert_allclose(distance, expected, rtol=1e-8, atol=1e-10)


def test_frechet_distance_from_samples_matches_closed_form():
    # 40,000 samples per set: the sampling error of the estimate is about 1% of the value.
    rng = np.random.default_rng(2)
    dim = 4
    mu1, mu2 = np.zeros(dim), np.full(dim, 0.5)
    std1, std2 = np.array([1.0, 0.5, 2.0, 1.5]), np.array([0.7, 1.0, 1.0, 1.5])
    features1 = mu1 + std1 * rng.normal(size=(40_000, dim))
    features2 = mu2 + std2 * rng.normal(size=(40_000, dim))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((std1 - std2) ** 2)

    distance = metrics.frechet_distance_from_features(features1, features2)

    np.testing.assert_allclose(distance, expected, rtol=0.05)


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(3)
    dim = 5
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim)

    forward = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    backward = metrics.frechet_distance(mu2, sigma2, mu1, sigma1)

    assert forward > 0.1
    np.testing.assert_allclose(forward, backward, rtol=1e-8, atol=1e-10)


def test_frechet_distance_grows_with_mean_shift():
    rng = np.random.default_rng(4)
    dim = 5
    mu = rng.normal(size=dim)
    sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
    direction = np.ones(dim) / np.sqrt(dim)
    shifts = [0.0, 0.5, 1.0, 2.0, 4.0]

    distances = [
        metrics.frechet_distance(mu, sigma1, mu + shift * direction, sigma2) for shift in shifts
    ]

    assert all(later > earlier for earlier, later in zip(distances, distances[1:]))
    # The mean term adds exactly the squared shift on top of the covariance term.
    np.testing.assert_allclose(
        np.array(distances) - distances[0], np.square(shifts), rtol=1e-8, atol=1e-8
    )


def test_frechet_distance_handles_singular_covariances():
    rng = np.random.default_rng(5)
    # Fewer samples than dimensions, and a set whose features are all constant.
    few = rng.normal(size=(5, 16))
    constant = np.zeros((50, 4))

    assert np.isfinite(metrics.frechet_distance_from_features(few, rng.normal(size=(5, 16))))
    np.testing.assert_allclose(metrics.frechet_distance_from_features(few, few), 0.0, atol=1e-5)
    np.testing.assert_allclose(
        metrics.frechet_distance_from_features(constant, constant), 0.0, atol=1e-8
    )
    np.testing.assert_allclose(
        metrics.frechet_distance_from_features(constant, constant + 1.0), 4.0, atol=1e-6
    )


def test_feature_statistics_match_numpy():
    features = np.random.default_rng(6).normal(size=(200, 3))

    mu, sigma = metrics.feature_statistics(features)

    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.T), rtol=1e-12, atol=1e-12)
    assert metrics.feature_statistics(features[:, :1])[1].shape == (1, 1)


def test_feature_statistics_reject_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        metrics.feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"expected \[N, D\]"):
        metrics.feature_statistics(np.zeros(4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.feature_statistics(np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_frechet_distance_rejects_bad_shapes():
    features = np.zeros((10, 4))
    with pytest.raises(ValueError, match="same feature dimension"):
        metrics.frechet_distance_from_features(features, np.zeros((10, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.frechet_distance_from_features(features, np.zeros((1, 4)))
    with pytest.raises(ValueError, match="sigma1 has shape"):
        metrics.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="mu2 has shape"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="eps="):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), eps=0.0)


# Conditional accuracy.


def test_conditional_accuracy_from_logits():
    logits = np.array(
        [
            [5.0, 0.0, 0.0],
            [0.0, 3.0, 1.0],
            [0.0, 1.0, 2.0],
            [4.0, 0.0, 1.0],
        ]
    )
    # Argmax is [0, 1, 2, 0], but the last sample was requested as class 2.
    requested = np.array([0, 1, 2, 2])

    assert metrics.conditional_accuracy(logits, requested) == pytest.approx(0.75, abs=1e-12)
    assert metrics.conditional_accuracy(jnp.asarray(logits), jnp.asarray(requested)) == (
        pytest.approx(0.75, abs=1e-12)
    )


def test_conditional_accuracy_from_predictions():
    predictions = np.array([3, 3, 1, 0, 9])
    requested = np.array([3, 2, 1, 1, 9])

    assert metrics.conditional_accuracy(predictions, requested) == pytest.approx(0.6, abs=1e-12)


def test_conditional_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="one requested label per sample"):
        metrics.conditional_accuracy(np.zeros((4, 10)), np.zeros(3, dtype=np.int32))
    with pytest.raises(ValueError, match="integer predictions"):
        metrics.conditional_accuracy(np.zeros(3), np.zeros(3, dtype=np.int32))
    with pytest.raises(ValueError, match="integer vector"):
        metrics.conditional_accuracy(np.zeros(3, dtype=np.int32), np.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        metrics.conditional_accuracy(np.zeros((0, 10)), np.zeros(0, dtype=np.int32))


# Classifiers.


def test_digit_classifier_shapes(digit_model):
    config = DigitClassifierConfig()
    images = _random_images(0)

    assert _jit_call(digit_model, "__call__", images).shape == (BATCH, config.num_classes)
    assert _jit_call(digit_model, "features", images).shape == (BATCH, config.feature_dim)
    assert _parameter_count(digit_model) <= 100_000


def test_digit_classifier_other_geometry():
    config = DigitClassifierConfig(
        image_size=8, in_channels=3, num_classes=4, channels=(8, 16, 16), feature_dim=12
    )
    # Shapes only, so an abstract model and jax.eval_shape avoid compiling anything.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DigitClassifier(config, rngs=nnx.Rngs(0))))
    images = jax.ShapeDtypeStruct((BATCH, 8, 8, 3), jnp.float32)

    logits = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, images)
    features = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state).features(x), state, images)

    assert logits.shape == (BATCH, 4)
    assert features.shape == (BATCH, 12)


def test_noisy_classifier_shapes(noisy_model):
    config = NoisyClassifierConfig()
    x_t = _random_images(2)
    t = jnp.array([0, 500, 999], dtype=jnp.int32)
    y = jnp.array([0, 1, 2], dtype=jnp.int32)

    assert _jit_call(noisy_model, "__call__", x_t, t).shape == (BATCH, config.num_classes)
    assert _jit_call(noisy_model, "features", x_t, t).shape == (BATCH, config.feature_dim)
    assert _jit_call(noisy_model, "log_prob", x_t, t, y).shape == (BATCH,)
    assert _parameter_count(noisy_model) <= 100_000


def test_noisy_classifier_depends_on_timestep(noisy_model):
    x_t = jnp.broadcast_to(_random_images(3, batch=1), (2, 16, 16, 1))

    logits = _jit_call(noisy_model, "__call__", x_t, jnp.array([0, 999], dtype=jnp.int32))

    assert float(jnp.max(jnp.abs(logits[0] - logits[1]))) > 1e-3


def test_noisy_log_prob_equals_log_softmax_gather(noisy_model):
    x_t = _random_images(4)
    t = jnp.array([10, 20, 30], dtype=jnp.int32)
    y = jnp.array([7, 0, 3], dtype=jnp.int32)

    logits = _jit_call(noisy_model, "__call__", x_t, t)
    expected = jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(y, 10), axis=-1)
    log_prob = _jit_call(noisy_model, "log_prob", x_t, t, y)

    np.testing.assert_allclose(log_prob, expected, rtol=1e-6, atol=1e-6)


def test_log_prob_gradient_matches_finite_difference(noisy_model):
    graphdef, state = nnx.split(noisy_model)
    x_t = _random_images(5)
    t = jnp.array([100, 400, 900], dtype=jnp.int32)
    y = jnp.array([1, 5, 9], dtype=jnp.int32)

    @jax.jit
    def total_log_prob(images):
        return jnp.sum(nnx.merge(graphdef, state).log_prob(images, t, y))

    gradient = jax.jit(jax.grad(total_log_prob))(x_t)

    assert gradient.shape == x_t.shape
    assert bool(jnp.all(jnp.isfinite(gradient)))
    assert float(jnp.max(jnp.abs(gradient))) > 1e-6
    # A central difference along a random unit direction checks that the gradient is correct and
    # that log_prob is smooth in x_t. Its error is O(step^2) plus float32 rounding.
    direction = jax.random.normal(jax.random.key(6), x_t.shape)
    direction = direction / jnp.linalg.norm(direction)
    step = 1e-2
    finite_difference = (
        total_log_prob(x_t + step * direction) - total_log_prob(x_t - step * direction)
    ) / (2 * step)
    np.testing.assert_allclose(
        jnp.vdot(gradient, direction), finite_difference, rtol=2e-2, atol=1e-4
    )


def test_noisy_classifier_eager_matches_jit(noisy_model):
    # The noisy model runs every layer type that the plain one has, so one eager run covers both.
    images = _random_images(7)
    t = jnp.array([1, 2, 3], dtype=jnp.int32)
    y = jnp.array([4, 5, 6], dtype=jnp.int32)

    eager = noisy_model.log_prob(images, t, y)
    jitted = _jit_call(noisy_model, "log_prob", images, t, y)

    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_values():
    embedding = timestep_embedding(jnp.array([0, 3]), dim=8, max_period=10000.0)
    frequencies = 10000.0 ** (-np.arange(4) / 4)
    expected = np.concatenate([np.cos(3 * frequencies), np.sin(3 * frequencies)])

    assert embedding.shape == (2, 8)
    np.testing.assert_allclose(embedding[0], np.r_[np.ones(4), np.zeros(4)], atol=1e-7)
    np.testing.assert_allclose(embedding[1], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((16, 16, 1), "rank 3"),
        ((BATCH, 8, 8, 1), r"expected \[B, 16, 16, 1\]"),
        ((BATCH, 16, 16, 3), r"expected \[B, 16, 16, 1\]"),
    ],
)
def test_classifiers_reject_bad_image_shapes(shape, match, digit_model, noisy_model):
    digit, noisy = digit_model, noisy_model
    images = jnp.zeros(shape)
    t = jnp.zeros((BATCH,), dtype=jnp.int32)

    with pytest.raises(ValueError, match=match):
        digit(images)
    with pytest.raises(ValueError, match=match):
        digit.features(images)
    with pytest.raises(ValueError, match=match):
        noisy(images, t)


def test_noisy_classifier_rejects_bad_timesteps_and_labels(noisy_model):
    model = noisy_model
    x_t = _random_images(8)
    t = jnp.zeros((BATCH,), dtype=jnp.int32)

    with pytest.raises(ValueError, match=r"t has shape \(2,\); expected \(3,\)"):
        model(x_t, jnp.zeros((2,), dtype=jnp.int32))
    with pytest.raises(ValueError, match=r"t has shape \(\); expected \(3,\)"):
        model(x_t, jnp.int32(5))
    with pytest.raises(ValueError, match="t has dtype float32"):
        model(x_t, jnp.zeros((BATCH,), dtype=jnp.float32))
    with pytest.raises(ValueError, match=r"y has shape \(3, 1\)"):
        model.log_prob(x_t, t, jnp.zeros((BATCH, 1), dtype=jnp.int32))


@pytest.mark.parametrize(
    "config_type, overrides, match",
    [
        (DigitClassifierConfig, {"channels": (32, 60)}, "multiple of norm_groups"),
        (DigitClassifierConfig, {"channels": ()}, "non-empty tuple"),
        (DigitClassifierConfig, {"image_size": 18, "channels": (8, 8, 8)}, "not divisible by 4"),
        (DigitClassifierConfig, {"num_classes": 0}, "num_classes=0"),
        (DigitClassifierConfig, {"dropout": 1.0}, "dropout=1.0"),
        (NoisyClassifierConfig, {"time_embed_dim": 63}, "positive even number"),
        (NoisyClassifierConfig, {"num_timesteps": 0}, "num_timesteps=0"),
        (NoisyClassifierConfig, {"max_period": 1.0}, "max_period=1.0"),
    ],
)
def test_configs_reject_invalid_values(config_type, overrides, match):
    with pytest.raises(ValueError, match=match):
        config_type(**overrides)


# Training on scikit-learn's 8x8 digits, upsampled to 16x16.

TRAIN_SIZE = 1400
TRAIN_STEPS = 150
TRAIN_BATCH = 64


def _load_digits_16x16() -> tuple[jax.Array, jax.Array]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = jnp.asarray(digits.images, dtype=jnp.float32) / 8.0 - 1.0  # pixel values 0..16
    images = jax.image.resize(images[..., None], (images.shape[0], 16, 16, 1), method="linear")
    return images, jnp.asarray(digits.target, dtype=jnp.int32)


def test_digit_classifier_learns_digits(digit_model):
    start = time.perf_counter()
    images, labels = _load_digits_16x16()
    order = np.random.default_rng(0).permutation(labels.shape[0])
    train, held_out = order[:TRAIN_SIZE], order[TRAIN_SIZE:]
    train_images, train_labels = images[train], labels[train]

    # Training below is functional, so the shared fixture's own parameters stay untouched.
    graphdef, params, rest = nnx.split(digit_model, nnx.Param, ...)
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, batch_images, batch_labels):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params, rest)(batch_images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch_rng = np.random.default_rng(1)
    for _ in range(TRAIN_STEPS):
        batch = batch_rng.integers(0, TRAIN_SIZE, TRAIN_BATCH)
        params, opt_state, loss = train_step(
            params, opt_state, train_images[batch], train_labels[batch]
        )

    logits = nnx.merge(graphdef, params, rest)(images[held_out])
    accuracy = metrics.conditional_accuracy(logits, labels[held_out])
    elapsed = time.perf_counter() - start
    print(f"held-out accuracy {accuracy:.3f} after {TRAIN_STEPS} steps in {elapsed:.1f} s")

    assert bool(jnp.isfinite(loss))
    assert accuracy >= 0.85
