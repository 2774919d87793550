"""Metrics and scorers comparing estimated and true latents.

Nonlinear ICA with Gaussian latents is identifiable at best up to an
orthogonal transform (and, in practice, scale and shift), so recovered latents
are compared with the truth by measures invariant to those transforms:

- :func:`procrustes_disparity`: residual after the best similarity transform.
- :func:`canonical_correlations`: invariant to any invertible linear map.
- :func:`mean_corr_coef`: invariant to permutation and rescaling of columns.

The scorer classes wrap them for scikit-learn model selection
(``GridSearchCV``, ``cross_validate``), with the true latents passed as ``y``.
"""

import numpy as np
from scipy.linalg import qr
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata
from sklearn.utils import check_array
from sklearn.utils._param_validation import (
    StrOptions,
    validate_parameter_constraints,
    validate_params,
)

__all__ = [
    "CCAScorer",
    "MCCScorer",
    "ProcrustesScorer",
    "canonical_correlations",
    "mean_corr_coef",
    "procrustes_disparity",
]


# --------------------------------------------------------------------------- #
# Input validation and linear-algebra helpers
# --------------------------------------------------------------------------- #


def _check_matrix(X, name):
    """Return ``X`` as a finite float64 matrix with >= 2 rows and >= 1 column."""
    X = check_array(
        X,
        dtype=np.float64,
        ensure_2d=False,
        allow_nd=True,
        ensure_all_finite=False,  # checked below with a more helpful message
        ensure_min_samples=0,
        ensure_min_features=0,
        input_name=name,
    )
    if X.ndim != 2:
        hint = (
            f"reshape with {name}.reshape(-1, 1) for one column"
            if X.ndim == 1
            else "pass a (n_samples, n_columns) matrix"
        )
        raise ValueError(
            f"Expected a 2-D array (n_samples, n_columns) for {name}, got "
            f"{X.ndim}-D array of shape {X.shape}; {hint}."
        )
    finite = np.isfinite(X)
    if not finite.all():
        n_nan = int(np.isnan(X).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ValueError(
            f"Expected only finite values in {name}, got {n_nan} NaN and {n_inf} "
            "infinite entries; drop or impute them (e.g. with "
            "sklearn.impute.SimpleImputer) first."
        )
    if X.shape[0] < 2:
        raise ValueError(
            f"Expected at least 2 rows (samples) in {name}, got {X.shape[0]}; "
            "pass more samples."
        )
    if X.shape[1] < 1:
        raise ValueError(
            f"Expected at least 1 column in {name}, got shape {X.shape}; "
            "pass a matrix with one column per variable."
        )
    return X


def _check_pair(A, B):
    """Validate ``A`` and ``B`` and check that they have matching rows."""
    A = _check_matrix(A, "A")
    B = _check_matrix(B, "B")
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"A has {A.shape[0]} rows but B has {B.shape[0]}; pass matching rows "
            "(the same samples in the same order)."
        )
    return A, B


def _centre(X):
    """Centre columns; constant columns become exactly zero.

    Subtracting the mean of a constant column can leave rounding noise, which
    normalisation would then amplify into spurious signal.
    """
    Xc = X - X.mean(axis=0)
    Xc[:, np.ptp(X, axis=0) == 0] = 0.0
    return Xc


def _orthonormal_basis(Xc):
    """Orthonormal basis of the column space of ``Xc`` (numerical rank only)."""
    # Thin QR first: much cheaper than an SVD of the tall matrix. The SVD of
    # the small triangular factor then reveals the numerical rank.
    Q, R = qr(Xc, mode="economic", check_finite=False)
    U, s, _ = np.linalg.svd(R)
    if s.size == 0 or s[0] == 0:
        return Q[:, :0]
    # Same tolerance as numpy.linalg.matrix_rank.
    tol = s[0] * max(Xc.shape) * np.finfo(Xc.dtype).eps
    rank = int((s > tol).sum())
    if rank == Q.shape[1]:
        return Q  # full rank: Q already spans the column space
    return Q @ U[:, :rank]


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #


@validate_params(
    {"A": ["array-like"], "B": ["array-like"]},
    prefer_skip_nested_validation=True,
)
def procrustes_disparity(A, B) -> float:
    """Disparity after the best similarity transform of ``B`` onto ``A``.

    Orthogonal Procrustes analysis as in :func:`scipy.spatial.procrustes`:
    both matrices are centred and scaled to unit Frobenius norm, then ``B`` is
    rotated/reflected and scaled to best match ``A``. The minimised sum of
    squared differences is ``1 - (sum of singular values of A.T @ B)**2``.

    Unlike scipy, ``A`` and ``B`` may have different numbers of columns: the
    narrower one is treated as zero-padded to the width of the other, which
    gives exactly what ``scipy.spatial.procrustes`` returns on the padded
    inputs.

    Parameters
    ----------
    A : array-like of shape (n_samples, n_columns_A)
        Reference matrix, e.g. the true latents.
    B : array-like of shape (n_samples, n_columns_B)
        Matrix to transform onto ``A``, e.g. the estimated latents. Rows must
        be the same samples, in the same order, as in ``A``.

    Returns
    -------
    disparity : float
        In ``[0, 1]``: 0 when ``B`` is a similarity transform (shift, scale,
        rotation, reflection) of ``A``, close to 1 for independent
        low-dimensional data. Lower is better.

    Raises
    ------
    ValueError
        If an input is not a finite 2-D matrix with at least 2 rows, if the row
        counts differ, or if an input is constant (all rows identical).

    See Also
    --------
    scipy.spatial.procrustes : Same analysis for equal shapes, also returning
        the transformed matrices.
    ProcrustesScorer : Scorer for model selection, ``1 - disparity``.

    Examples
    --------
    >>> import numpy as np
    >>> from sknlica.metrics import procrustes_disparity
    >>> rng = np.random.default_rng(0)
    >>> A = rng.standard_normal((100, 2))
    >>> rotation = np.array([[0.0, -1.0], [1.0, 0.0]])
    >>> round(procrustes_disparity(A, 3.0 * A @ rotation + 1.0), 6)
    0.0
    >>> procrustes_disparity(A, rng.standard_normal((100, 2))) > 0.9
    True
    """
    A, B = _check_pair(A, B)
    A, B = _centre(A), _centre(B)
    for X, name in ((A, "A"), (B, "B")):
        if not X.any():
            raise ValueError(
                f"Expected at least two distinct rows in {name}, got a constant "
                f"matrix of shape {X.shape}; Procrustes analysis is undefined "
                "without spread."
            )
    A /= np.linalg.norm(A)
    B /= np.linalg.norm(B)
    # Zero columns only add zero singular values, so the singular values of
    # the rectangular A.T @ B equal those of the zero-padded problem.
    nuclear_norm = np.linalg.svd(A.T @ B, compute_uv=False).sum()
    return float(np.clip(1.0 - nuclear_norm**2, 0.0, 1.0))


@validate_params(
    {"A": ["array-like"], "B": ["array-like"]},
    prefer_skip_nested_validation=True,
)
def canonical_correlations(A, B) -> np.ndarray:
    """Sample canonical correlations between the columns of ``A`` and ``B``.

    Computed stably: both matrices are centred, orthonormal bases of their
    column spaces are found by SVD (dropping numerically rank-deficient
    directions, e.g. from constant or collinear columns), and the canonical
    correlations are the singular values of ``Q_A.T @ Q_B``, clipped to
    ``[0, 1]``.

    Parameters
    ----------
    A : array-like of shape (n_samples, n_columns_A)
        First set of variables.
    B : array-like of shape (n_samples, n_columns_B)
        Second set of variables, same rows as ``A``. The widths may differ.

    Returns
    -------
    correlations : ndarray of shape (min(rank_A, rank_B),)
        Canonical correlations in ``[0, 1]``, in descending order. ``rank_A``
        is the numerical rank of the centred ``A``; the array is empty when
        either input is constant.

    Raises
    ------
    ValueError
        If an input is not a finite 2-D matrix with at least 2 rows, or if the
        row counts differ.

    See Also
    --------
    CCAScorer : Scorer for model selection.
    sklearn.cross_decomposition.CCA : Iterative CCA estimator.

    Notes
    -----
    Canonical correlations are invariant to any invertible linear map of
    either side, so they cannot tell a rotation from a shear. With many columns
    relative to rows they are also strongly biased upwards for independent
    data: the largest one approaches
    ``sqrt(c_A (1 - c_B)) + sqrt(c_B (1 - c_A))`` with ``c = n_columns /
    n_samples``.

    Examples
    --------
    >>> import numpy as np
    >>> from sknlica.metrics import canonical_correlations
    >>> A = np.random.default_rng(0).standard_normal((100, 2))
    >>> B = A @ np.array([[1.0, 2.0], [0.5, -1.0]]) + 3.0
    >>> canonical_correlations(A, B).round(6)
    array([1., 1.])
    >>> canonical_correlations(A, np.random.default_rng(1).normal(size=(100, 3))).shape
    (2,)
    """
    A, B = _check_pair(A, B)
    Q_A = _orthonormal_basis(_centre(A))
    Q_B = _orthonormal_basis(_centre(B))
    correlations = np.linalg.svd(Q_A.T @ Q_B, compute_uv=False)
    return np.clip(correlations, 0.0, 1.0)


def _column_correlations(A, B):
    """Pearson correlations between columns of A and of B; constant gives 0."""
    A, B = _centre(A), _centre(B)
    for X in (A, B):
        norms = np.linalg.norm(X, axis=0)
        np.divide(X, norms, out=X, where=norms > 0)
    return np.clip(A.T @ B, -1.0, 1.0)


@validate_params(
    {
        "A": ["array-like"],
        "B": ["array-like"],
        "method": [StrOptions({"pearson", "spearman"})],
    },
    prefer_skip_nested_validation=True,
)
def mean_corr_coef(A, B, method: str = "pearson") -> float:
    """Mean absolute correlation of optimally matched columns (MCC).

    The absolute correlation between every column of ``A`` and every column of
    ``B`` is computed; columns are then paired one-to-one to maximise the total
    absolute correlation (:func:`scipy.optimize.linear_sum_assignment`), and
    the mean over the ``min(n_columns_A, n_columns_B)`` pairs is returned.

    Parameters
    ----------
    A : array-like of shape (n_samples, n_columns_A)
        First set of variables, e.g. the true latents.
    B : array-like of shape (n_samples, n_columns_B)
        Second set of variables, same rows as ``A``. The widths may differ.
    method : {"pearson", "spearman"}, default="pearson"
        Correlation coefficient. ``"spearman"`` correlates ranks (ties get
        their average rank), so it is invariant to strictly monotone
        transforms of each column.

    Returns
    -------
    mcc : float
        In ``[0, 1]``; 1 when ``B`` equals ``A`` up to permutation, rescaling
        (including sign flips) and shift of columns. A constant column counts
        as uncorrelated with everything.

    Raises
    ------
    ValueError
        For the inputs :func:`canonical_correlations` rejects.

    See Also
    --------
    MCCScorer : Scorer for model selection.

    Notes
    -----
    MCC is the usual metric for nonlinear ICA with non-Gaussian sources, where
    latents are identifiable up to permutation and elementwise transforms.
    With Gaussian latents they are identifiable at most up to a rotation,
    which MCC penalises; prefer :func:`procrustes_disparity` there.

    Examples
    --------
    >>> import numpy as np
    >>> from sknlica.metrics import mean_corr_coef
    >>> A = np.random.default_rng(0).standard_normal((100, 2))
    >>> B = np.column_stack([-2.0 * A[:, 1], np.exp(A[:, 0])])
    >>> round(mean_corr_coef(A, B, method="spearman"), 6)
    1.0
    """
    A, B = _check_pair(A, B)
    if method == "spearman":
        A, B = rankdata(A, axis=0), rankdata(B, axis=0)
    abs_corr = np.abs(_column_correlations(A, B))
    rows, cols = linear_sum_assignment(abs_corr, maximize=True)
    return float(abs_corr[rows, cols].mean())


# --------------------------------------------------------------------------- #
# Scorers
# --------------------------------------------------------------------------- #

_TARGETS = StrOptions({"latent", "reconstruction"})


class _BaseScorer:
    """Scorer comparing latents (``target="latent"``) or reconstructions.

    Subclasses set ``_parameter_constraints`` and implement ``_score``.
    Parameters are stored untouched in ``__init__`` and validated in
    ``__call__``, as scikit-learn estimators do in ``fit``.
    """

    _parameter_constraints: dict = {}

    def _params(self):
        return {name: getattr(self, name) for name in self._parameter_constraints}

    def __repr__(self):
        args = ", ".join(f"{key}={value!r}" for key, value in self._params().items())
        return f"{type(self).__name__}({args})"

    def _target(self):
        return self.target

    def __call__(self, estimator, X, y=None) -> float:
        """Score a fitted estimator on ``X``; greater is better.

        Parameters
        ----------
        estimator : object
            Fitted transformer with ``transform`` (and ``inverse_transform``
            for ``target="reconstruction"``).
        X : array-like of shape (n_samples, n_features)
            Observations.
        y : array-like of shape (n_samples, n_components) or (n_samples,), \
default=None
            True latents; required for ``target="latent"``, ignored otherwise.

        Returns
        -------
        score : float
            Greater is better.
        """
        validate_parameter_constraints(
            self._parameter_constraints,
            self._params(),
            caller_name=type(self).__name__,
        )
        truth, estimate = self._pair(estimator, X, y)
        return float(self._score(truth, estimate))

    def _pair(self, estimator, X, y):
        """Return ``(truth, estimate)`` according to the target."""
        if self._target() == "reconstruction":
            self._require(estimator, ("transform", "inverse_transform"))
            return X, estimator.inverse_transform(estimator.transform(X))
        if y is None:
            alternative = (
                "; without true latents use target='reconstruction'"
                if "target" in self._parameter_constraints
                else ""
            )
            raise ValueError(
                f"{self!r} compares estimator.transform(X) with the true latents, "
                "which must be passed as y, but got y=None. Pass them as the "
                "target, e.g. search.fit(X, Z) or cross_validate(estimator, X, Z, "
                f"scoring=...){alternative}."
            )
        self._require(estimator, ("transform",))
        y = np.asarray(y)
        if y.ndim == 1:
            y = y.reshape(-1, 1)  # a single latent
        return y, estimator.transform(X)

    def _require(self, estimator, methods):
        missing = [m for m in methods if not hasattr(estimator, m)]
        if missing:
            raise TypeError(
                f"{self!r} needs an estimator with {' and '.join(methods)}; "
                f"{type(estimator).__name__} has no {', '.join(missing)}. Use a "
                "transformer with these methods or another target."
            )


class ProcrustesScorer(_BaseScorer):
    """Scorer ``1 - procrustes_disparity``; greater is better.

    A plain callable ``scorer(estimator, X, y)`` usable as ``scoring`` in
    scikit-learn's model selection tools with any transformer.

    Parameters
    ----------
    target : {"latent", "reconstruction"}, default="latent"
        ``"latent"`` compares ``estimator.transform(X)`` with the true latents
        passed as ``y`` (e.g. ``search.fit(X, Z)``; estimators ignore ``y``).
        ``"reconstruction"`` compares ``X`` with
        ``estimator.inverse_transform(estimator.transform(X))`` and needs no
        ``y``.

    See Also
    --------
    procrustes_disparity : The underlying metric.
    CCAScorer : Scorer based on canonical correlations.

    Examples
    --------
    >>> from sklearn.decomposition import PCA
    >>> from sklearn.model_selection import GridSearchCV
    >>> from sknlica.datasets import make_nonlinear_ica
    >>> from sknlica.metrics import ProcrustesScorer
    >>> X, Z = make_nonlinear_ica(n_samples=300, random_state=0)
    >>> search = GridSearchCV(
    ...     PCA(), {"n_components": [1, 2]}, scoring=ProcrustesScorer()
    ... )
    >>> search.fit(X, Z).best_params_
    {'n_components': 2}
    """

    _parameter_constraints: dict = {"target": [_TARGETS]}

    def __init__(self, target="latent"):
        self.target = target

    def _score(self, truth, estimate):
        return 1.0 - procrustes_disparity(truth, estimate)


class CCAScorer(_BaseScorer):
    """Scorer from canonical correlations; greater is better.

    Used like :class:`ProcrustesScorer`: ``scoring=CCAScorer()`` in any of
    scikit-learn's model selection tools, with any transformer.

    Parameters
    ----------
    target : {"latent", "reconstruction"}, default="latent"
        What is compared, as for :class:`ProcrustesScorer`: the estimate with
        the true latents passed as ``y``, or ``X`` with its reconstruction.
    reduce : {"first", "mean"}, default="first"
        Return the largest canonical correlation, or the mean over the columns
        of the truth (``y`` or ``X``), where directions the estimate lacks
        count as 0. So with ``"mean"`` a model with too few components is not
        rewarded, mirroring the zero-padding of :func:`procrustes_disparity`.
        The score is 0 if either side is constant.

    See Also
    --------
    canonical_correlations : The underlying metric.
    ProcrustesScorer : Stricter scorer, also sensitive to shear.

    Notes
    -----
    Canonical correlations of independent data grow with the number of
    columns (see :func:`canonical_correlations`), so compare scores only at a
    fixed width; :class:`ProcrustesScorer` suffers much less from this.

    Examples
    --------
    >>> from sklearn.decomposition import PCA
    >>> from sknlica.datasets import make_nonlinear_ica
    >>> from sknlica.metrics import CCAScorer
    >>> X, Z = make_nonlinear_ica(n_samples=300, random_state=0)
    >>> pca = PCA(n_components=2).fit(X)
    >>> CCAScorer(reduce="mean")
    CCAScorer(target='latent', reduce='mean')
    >>> 0.0 <= CCAScorer(reduce="mean")(pca, X, Z) <= 1.0
    True
    """

    _parameter_constraints: dict = {
        "target": [_TARGETS],
        "reduce": [StrOptions({"first", "mean"})],
    }

    def __init__(self, target="latent", reduce="first"):
        self.target = target
        self.reduce = reduce

    def _score(self, truth, estimate):
        correlations = canonical_correlations(truth, estimate)
        if correlations.size == 0:
            return 0.0
        if self.reduce == "first":
            return correlations[0]
        # Missing directions count as 0 so too few components are not rewarded.
        return correlations.sum() / np.shape(truth)[1]


class MCCScorer(_BaseScorer):
    """Scorer from the mean correlation coefficient; greater is better.

    A plain callable ``scorer(estimator, X, y)`` usable as ``scoring`` in
    scikit-learn's model selection tools with any transformer. The true
    latents must be passed as ``y`` (e.g. ``search.fit(X, Z)``).  MCC on the
    sources themselves measures "strong" identifiability, the natural score
    of ``prior="conditional"`` fits; "weak" identifiability (up to a linear
    map) is the mean of :func:`canonical_correlations`.  An estimator with
    ``prior="conditional"`` needs ``y`` for its segments, so in a search
    score it by its likelihood and compute the MCC outside (see the user
    guide's identifiability page).

    The mean is taken over the true latents: when the estimate has fewer
    columns, the unmatched latents count as correlation 0, so a model with too
    few components is not rewarded. With at least as many estimated as true
    columns this equals ``mean_corr_coef(y, estimator.transform(X))``.

    Parameters
    ----------
    method : {"pearson", "spearman"}, default="pearson"
        Correlation coefficient, see :func:`mean_corr_coef`.

    See Also
    --------
    mean_corr_coef : The underlying metric.

    Examples
    --------
    >>> from sklearn.decomposition import FastICA
    >>> from sknlica.datasets import make_nonlinear_ica
    >>> from sknlica.metrics import MCCScorer
    >>> X, Z = make_nonlinear_ica(300, activation="identity", random_state=0)
    >>> ica = FastICA(n_components=2, random_state=0).fit(X)
    >>> score = MCCScorer(method="spearman")(ica, X, Z)
    >>> bool(0.0 <= score <= 1.0)
    True
    """

    _parameter_constraints: dict = {"method": [StrOptions({"pearson", "spearman"})]}

    def __init__(self, method="pearson"):
        self.method = method

    def _target(self):
        return "latent"

    def _score(self, truth, estimate):
        n_matched = min(truth.shape[1], estimate.shape[1])
        mcc = mean_corr_coef(truth, estimate, method=self.method)
        # Unmatched true latents count as 0 so too few components are not
        # rewarded.
        return mcc * n_matched / truth.shape[1]
