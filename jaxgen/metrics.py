"""Sample-quality metrics: the Fréchet distance between feature sets, and conditional accuracy.

The Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2) is

    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)),

as in Heusel et al. (2017), "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
Nash Equilibrium", where the features come from an Inception network (FID). Here the features
come from any encoder the caller picks, for example `DigitClassifier.features`, so values are
comparable only between runs that use the same encoder and sample counts.

The functions run on the host in float64 NumPy and accept NumPy or JAX arrays.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

# Largest imaginary part, relative to the real diagonal, that the matrix square root may carry
# before it counts as a failure rather than rounding error.
_IMAGINARY_TOLERANCE = 1e-3


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Compute the mean [D] and unbiased covariance [D, D] of features [N, D] with N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(
            f"features has shape {features.shape}; expected [N, D], one feature vector per row."
        )
    if features.shape[0] < 2:
        raise ValueError(
            f"features has {features.shape[0]} sample(s); a covariance needs at least 2 rows."
        )
    non_finite = int(np.size(features) - np.count_nonzero(np.isfinite(features)))
    if non_finite:
        raise ValueError(
            f"features contains {non_finite} NaN or infinite value(s); check the encoder output."
        )
    mu = features.mean(axis=0)
    sigma = np.atleast_2d(np.cov(features, rowvar=False))
    return mu, sigma


def _validate_gaussian(mu: np.ndarray, sigma: np.ndarray, suffix: str) -> None:
    """Raise ValueError unless mu is [D] and sigma is [D, D]."""
    if mu.ndim != 1:
        raise ValueError(f"mu{suffix} has shape {mu.shape}; expected a mean vector [D].")
    dim = mu.shape[0]
    if sigma.shape != (dim, dim):
        raise ValueError(
            f"sigma{suffix} has shape {sigma.shape}; expected ({dim}, {dim}) to match "
            f"mu{suffix} of shape {mu.shape}."
        )


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray | None:
    """Compute (sigma1 sigma2)^(1/2), or None when SciPy warns that the product is singular.

    The result may still be complex or non-finite.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            return scipy.linalg.sqrtm(sigma1 @ sigma2)
        except scipy.linalg.LinAlgWarning:
            return None


def _is_usable(covmean: np.ndarray | None) -> bool:
    """Return whether a matrix square root exists and is finite and real up to rounding."""
    if covmean is None or not np.all(np.isfinite(covmean)):
        return False
    if not np.iscomplexobj(covmean):
        return True
    diagonal = np.diagonal(covmean)
    scale = max(1.0, float(np.max(np.abs(diagonal.real))))
    return float(np.max(np.abs(diagonal.imag))) <= _IMAGINARY_TOLERANCE * scale


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """Compute the Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Singular covariances (fewer samples than feature dimensions, or constant features) can make
    the product sigma1 @ sigma2 singular, or its square root non-finite or complex beyond
    rounding error. Then the distance is recomputed with `eps` added to both diagonals, and any
    remaining imaginary part within rounding error is dropped. Raises ValueError when even the
    shifted square root is unusable, when eps is not positive, or when the shapes do not match.
    """
    if not eps > 0.0:
        raise ValueError(f"eps={eps} is invalid; use a small positive value such as 1e-6.")
    mu1 = np.asarray(mu1, dtype=np.float64)
    mu2 = np.asarray(mu2, dtype=np.float64)
    sigma1 = np.asarray(sigma1, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    _validate_gaussian(mu1, sigma1, "1")
    _validate_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"mu1 has shape {mu1.shape} but mu2 has shape {mu2.shape}; both Gaussians must "
            f"have the same feature dimension."
        )

    covmean = _sqrtm_product(sigma1, sigma2)
    if not _is_usable(covmean):
        # Shift the traces as well as the square root, so the result is the exact distance
        # between the regularised Gaussians and a set compared with itself still gives 0.
        offset = eps * np.eye(mu1.shape[0])
        sigma1 = sigma1 + offset
        sigma2 = sigma2 + offset
        covmean = _sqrtm_product(sigma1, sigma2)
        if not _is_usable(covmean):
            raise ValueError(
                f"the matrix square root of sigma1 @ sigma2 is not finite and real even with "
                f"eps={eps} added to the diagonals; check the covariances or raise eps."
            )
    covmean = np.real(covmean)

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_from_features(features1, features2, *, eps: float = 1e-6) -> float:
    """Compute the Fréchet distance between the Gaussians fitted to features [N1, D] and [N2, D]."""
    features1 = np.asarray(features1)
    features2 = np.asarray(features2)
    if features1.ndim == 2 and features2.ndim == 2 and features1.shape[1] != features2.shape[1]:
        raise ValueError(
            f"features1 has shape {features1.shape} and features2 has shape {features2.shape}; "
            f"both need the same feature dimension D, so use the same encoder for both sets."
        )
    mu1, sigma1 = feature_statistics(features1)
    mu2, sigma2 = feature_statistics(features2)
    return frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)


def conditional_accuracy(logits_or_predictions, requested_labels) -> float:
    """Compute the fraction of samples that a classifier assigns to the label they were requested for.

    `logits_or_predictions` is either logits [N, K], reduced with argmax, or integer predicted
    labels [N]. `requested_labels` is the integer [N] vector of labels that conditioned the
    samples.
    """
    values = np.asarray(logits_or_predictions)
    labels = np.asarray(requested_labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"requested_labels has shape {labels.shape} and dtype {labels.dtype}; expected an "
            f"integer vector [N]."
        )
    if labels.shape[0] == 0:
        raise ValueError("requested_labels is empty; accuracy needs at least one sample.")

    if values.ndim == 2:
        predictions = np.argmax(values, axis=-1)
    elif values.ndim == 1 and np.issubdtype(values.dtype, np.integer):
        predictions = values
    else:
        raise ValueError(
            f"logits_or_predictions has shape {values.shape} and dtype {values.dtype}; expected "
            f"logits [N, K] or integer predictions [N]."
        )
    if predictions.shape != labels.shape:
        raise ValueError(
            f"logits_or_predictions has {values.shape[0]} sample(s) but requested_labels has "
            f"{labels.shape[0]}; pass one requested label per sample."
        )
    return float(np.mean(predictions == labels))
