"""The linear factor model an estimator's ``init="linear"`` starts at.

Probabilistic PCA (one noise variance) or factor analysis (one per feature)
of the training rows, by scikit-learn; with the conditional prior, linear
nonstationary ICA by joint diagonalisation of the segments' covariances.
``sknlica/_torch/linear_start.py`` embeds it in the networks.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.decomposition import PCA, FactorAnalysis

from sknlica._torch.linear_start import LinearFactorModel

#: Rows the linear model is fitted on, at most (a random subset beyond): it
#: is a start, and factor analysis on them takes well under a second.
LINEAR_START_ROWS = 10_000

#: The linear start's noise variance, at least, relative to the data's.
NOISE_FLOOR = 1e-6


def fit_linear_factor_model(
    x: np.ndarray, n_components: int, *, diagonal: bool
) -> LinearFactorModel | None:
    """Probabilistic PCA (``diagonal=False``) or factor analysis of ``x``.

    Returns ``None`` where the fit is not defined or not finite (fewer than
    two rows or features, constant data): the caller then starts at random.
    At most ``n_features - 1`` and ``n_rows - 1`` components are fitted, so
    that some variance is left for the noise (a linear model with as many
    components as features explains everything and has none); the extra
    loading columns are zero.  The noise is at least :data:`NOISE_FLOOR`
    times the data's variance (each feature's with factor analysis), as
    rank-deficient data leave none.
    """
    n_rows, n_features = x.shape
    rank = min(n_components, n_features - 1, n_rows - 1)
    if rank < 1 or not np.all(np.isfinite(x)) or np.ptp(x, axis=0).max() == 0:
        return None
    with warnings.catch_warnings():
        # A start needs no converged factor analysis: its first iterations
        # are most of the way.
        warnings.simplefilter("ignore")
        if diagonal:
            fitted = FactorAnalysis(rank, random_state=0).fit(x)
            loadings = fitted.components_.T
        else:
            fitted = PCA(rank).fit(x)
            excess = np.maximum(fitted.explained_variance_ - fitted.noise_variance_, 0)
            loadings = fitted.components_.T * np.sqrt(excess)
        variance = x.var(axis=0)
        noise = np.maximum(
            fitted.noise_variance_,
            NOISE_FLOOR * (variance if diagonal else variance.mean()),
        )
    full = np.zeros((n_features, n_components))
    full[:, :rank] = loadings
    if not (np.all(np.isfinite(full)) and np.all(np.isfinite(noise))):
        return None
    return LinearFactorModel(full, fitted.mean_.copy(), noise)


#: Jacobi sweeps of :func:`joint_diagonalise`, at most, and the rotation
#: sine below which a pair counts as diagonalised.
JOINT_DIAGONALISATION_SWEEPS = 100
JOINT_DIAGONALISATION_TOL = 1e-10

#: With as many features as components, the linear start's noise variance
#: is this share of the pooled covariance's smallest eigenvalue.
SQUARE_NOISE_SHARE = 0.1

#: Rows a segment needs for its own moments in the linear start (fewer:
#: the standard prior).  With one or two rows per segment (a continuous
#: ``y`` read as labels) the segments' "covariances" were noise, and fits
#: from them fell below the Gaussian baseline.
SEGMENT_MIN_ROWS = 10

#: A segment's latent variance in the linear start, at least (the report's
#: sources scale from 0.01, variance 1e-4).
SEGMENT_VARIANCE_FLOOR = 1e-4


def joint_diagonalise(matrices: np.ndarray) -> np.ndarray:
    """The orthogonal ``V`` making every ``V^T M_k V`` as diagonal as possible.

    Cardoso and Souloumiac's Jacobi angles (SIAM J. Matrix Anal. Appl.,
    1996): sweeps of plane rotations, each chosen in closed form to minimise
    the sum of squared off-diagonal entries over ``k`` of the pair it
    rotates.  ``matrices``: ``(K, m, m)`` symmetric.
    """
    stacked = np.array(matrices, dtype=np.float64)
    m = stacked.shape[1]
    rotation = np.eye(m)
    for _ in range(JOINT_DIAGONALISATION_SWEEPS):
        rotated = False
        for p in range(m - 1):
            for q in range(p + 1, m):
                pair = [p, q]
                h = np.stack(
                    [
                        stacked[:, p, p] - stacked[:, q, q],
                        stacked[:, p, q] + stacked[:, q, p],
                    ]
                )
                g = h @ h.T
                on, off = g[0, 0] - g[1, 1], g[0, 1] + g[1, 0]
                theta = 0.5 * np.arctan2(off, on + np.hypot(on, off))
                c, s = np.cos(theta), np.sin(theta)
                if abs(s) <= JOINT_DIAGONALISATION_TOL:
                    continue
                rotated = True
                plane = np.array([[c, -s], [s, c]])
                rotation[:, pair] = rotation[:, pair] @ plane
                stacked[:, pair, :] = np.einsum("ji,kjl->kil", plane, stacked[:, pair])
                stacked[:, :, pair] = stacked[:, :, pair] @ plane
        if not rotated:
            break
    return rotation


def fit_segment_linear_model(
    x: np.ndarray, codes: np.ndarray, n_segments: int, n_components: int
) -> LinearFactorModel | None:
    """Linear nonstationary ICA: ``x = L z + mean + e`` with ``z | u ~ N(mean_u,
    diag variance_u)``, identified by the segments' covariances.

    Each segment's covariance is ``L diag(variance_u) L^T + sigma^2 I``, so
    after whitening by the pooled second moment (less the noise) the
    segments' covariances share their eigenvectors: their orthogonal
    :func:`joint_diagonalise` gives the rotation the standard prior cannot
    see.  ``sigma^2`` is the mean of the pooled covariance's ``n - m``
    smallest eigenvalues (probabilistic PCA's), or
    :data:`SQUARE_NOISE_SHARE` of the smallest when ``n = m`` leaves none
    (at least :data:`NOISE_FLOOR` of the data's variance).  The latents are
    scaled to unit pooled variance, as the standard model's.  ``None`` where the
    model is not defined (fewer than two segments of
    :data:`SEGMENT_MIN_ROWS` rows, fewer features than components,
    non-finite data); a segment of fewer rows keeps the standard prior.
    """
    n_rows, n_features = x.shape
    # A segment of a few rows has no covariance worth diagonalising; it
    # keeps the standard prior.
    enough = np.bincount(codes, minlength=n_segments) >= SEGMENT_MIN_ROWS
    present = np.flatnonzero(enough)
    if n_features < n_components or len(present) < 2 or not np.all(np.isfinite(x)):
        return None
    mean = x.mean(axis=0)
    centred = x - mean
    total = centred.T @ centred / n_rows
    eigenvalues, eigenvectors = np.linalg.eigh(total)
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    floor = NOISE_FLOOR * max(float(np.mean(np.diag(total))), np.finfo(float).tiny)
    if n_features > n_components:
        noise = max(float(eigenvalues[n_components:].mean()), floor)
    else:
        # No variance is left over to tell the noise: a share of the
        # weakest direction's, so that the nonlinear part the linear model
        # misses starts as noise (a start at the floor diverged).
        noise = max(SQUARE_NOISE_SHARE * float(eigenvalues[n_components - 1]), floor)
    signal = eigenvalues[:n_components] - noise
    if signal.min() <= 0:
        return None
    whitening = eigenvectors[:, :n_components].T / np.sqrt(signal)[:, None]
    # The noise's covariance, whitened: sigma^2 whitening whitening^T.
    whitened_noise = noise * whitening @ whitening.T
    means = np.zeros((n_segments, n_components))
    covariances = np.zeros((n_segments, n_components, n_components))
    for segment in present:
        part = centred[codes == segment] @ whitening.T
        means[segment] = part.mean(axis=0)
        residual = part - means[segment]
        covariances[segment] = residual.T @ residual / len(part) - whitened_noise
    rotation = joint_diagonalise(covariances[present])
    variances = np.einsum("ji,kjl,li->ki", rotation, covariances, rotation)
    # The other segments' means stayed zero.
    variances[~enough] = 1.0
    loadings = eigenvectors[:, :n_components] * np.sqrt(signal) @ rotation
    model = LinearFactorModel(
        loadings,
        mean,
        noise,
        segment_means=means @ rotation,
        segment_variances=np.maximum(variances, SEGMENT_VARIANCE_FLOOR),
    )
    finite = all(
        np.all(np.isfinite(part))
        for part in (model.loadings, model.segment_means, model.segment_variances)
    )
    return model if finite else None
