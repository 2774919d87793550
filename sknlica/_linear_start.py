"""The linear factor model an estimator's ``init="linear"`` starts at.

Probabilistic PCA (one noise variance) or factor analysis (one per feature)
of the training rows, by scikit-learn; ``sknlica/_torch/linear_start.py``
embeds it in the networks.
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
