"""Tests for sknlica.metrics."""

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.testing import assert_allclose
from scipy.spatial import procrustes
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV, KFold, cross_validate
from sklearn.utils._param_validation import InvalidParameterError
from threadpoolctl import threadpool_limits

from sknlica.datasets import make_nonlinear_ica
from sknlica.metrics import (
    CCAScorer,
    MCCScorer,
    ProcrustesScorer,
    canonical_correlations,
    mean_corr_coef,
    procrustes_disparity,
)

# Deterministic and quick; no example database written into the checkout.
PROPERTY = settings(derandomize=True, deadline=None, max_examples=30, database=None)

FINITE = st.floats(
    -1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False
)


# --------------------------------------------------------------------------- #
# Helpers and strategies
# --------------------------------------------------------------------------- #


def _orthogonal(rng, p):
    """Haar-random orthogonal matrix (a reflection half of the time)."""
    Q, R = np.linalg.qr(rng.standard_normal((p, p)))
    return Q * np.sign(np.diag(R))


def _invertible(rng, p):
    """Random invertible matrix with condition number at most 4."""
    scales = rng.uniform(0.5, 2.0, size=p)
    return _orthogonal(rng, p) @ np.diag(scales) @ _orthogonal(rng, p)


@st.composite
def gaussian_pairs(draw, same_width=False, max_width=5):
    """``(A, B, rng)``: Gaussian A, B partly linearly dependent on A.

    Drawing a seed and building matrices with numpy keeps them well
    conditioned; the noise level sets how related A and B are.
    """
    seed = draw(st.integers(0, 2**32 - 1))
    n_rows = draw(st.integers(20, 80))
    p = draw(st.integers(1, max_width))
    q = p if same_width else draw(st.integers(1, max_width))
    noise = draw(st.floats(0.1, 3.0))
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n_rows, p))
    B = A @ rng.standard_normal((p, q)) + noise * rng.standard_normal((n_rows, q))
    return A, B, rng


@st.composite
def finite_matrices(draw, n_rows):
    """Arbitrary finite matrix with ``n_rows`` rows and 1-4 columns."""
    width = draw(st.integers(1, 4))
    return draw(hnp.arrays(np.float64, (n_rows, width), elements=FINITE))


def _similarity(rng, X):
    """Random shift, positive scaling and rotation/reflection of X."""
    scale = rng.uniform(0.1, 10.0)
    shift = rng.uniform(-5.0, 5.0, size=X.shape[1])
    return scale * X @ _orthogonal(rng, X.shape[1]) + shift


# --------------------------------------------------------------------------- #
# procrustes_disparity
# --------------------------------------------------------------------------- #


@PROPERTY
@given(gaussian_pairs())
def test_disparity_invariant_to_similarity_of_either_side(pair):
    A, B, rng = pair
    expected = procrustes_disparity(A, B)
    assert procrustes_disparity(_similarity(rng, A), B) == pytest.approx(
        expected, abs=1e-10
    )
    assert procrustes_disparity(A, _similarity(rng, B)) == pytest.approx(
        expected, abs=1e-10
    )


@PROPERTY
@given(gaussian_pairs())
def test_disparity_invariant_to_reflection_of_one_column(pair):
    A, B, _ = pair
    flipped = B.copy()
    flipped[:, 0] *= -1.0
    assert procrustes_disparity(A, flipped) == pytest.approx(
        procrustes_disparity(A, B), abs=1e-10
    )


@PROPERTY
@given(gaussian_pairs())
def test_disparity_zero_for_identical_and_similar(pair):
    A, _, rng = pair
    assert procrustes_disparity(A, A) == pytest.approx(0.0, abs=1e-12)
    assert procrustes_disparity(A, _similarity(rng, A)) == pytest.approx(0.0, abs=1e-10)


@PROPERTY
@given(gaussian_pairs(same_width=True))
def test_disparity_symmetric_and_agrees_with_scipy(pair):
    A, B, _ = pair
    disparity = procrustes_disparity(A, B)
    assert procrustes_disparity(B, A) == pytest.approx(disparity, abs=1e-12)
    assert disparity == pytest.approx(procrustes(A, B)[2], abs=1e-12)


@PROPERTY
@given(gaussian_pairs())
def test_disparity_pads_narrower_input_with_zeros(pair):
    A, B, _ = pair
    width = max(A.shape[1], B.shape[1])
    padded_A = np.pad(A, ((0, 0), (0, width - A.shape[1])))
    padded_B = np.pad(B, ((0, 0), (0, width - B.shape[1])))
    assert procrustes_disparity(A, B) == pytest.approx(
        procrustes(padded_A, padded_B)[2], abs=1e-12
    )


@PROPERTY
@given(st.integers(2, 15).flatmap(lambda n: st.tuples(*[finite_matrices(n)] * 2)))
def test_disparity_in_unit_interval(pair):
    A, B = pair
    assume(np.ptp(A, axis=0).max() > 1e-3 and np.ptp(B, axis=0).max() > 1e-3)
    assert 0.0 <= procrustes_disparity(A, B) <= 1.0


def test_disparity_rejects_constant_input():
    A = np.ones((10, 2))
    B = np.arange(20.0).reshape(10, 2)
    with pytest.raises(ValueError, match="at least two distinct rows in A"):
        procrustes_disparity(A, B)
    with pytest.raises(ValueError, match="at least two distinct rows in B"):
        procrustes_disparity(B, A)


def test_disparity_accepts_lists():
    A = [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]
    assert procrustes_disparity(A, A) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- #
# canonical_correlations
# --------------------------------------------------------------------------- #


def _naive_canonical_correlations(A, B):
    """Textbook formula: sqrt of the eigenvalues of Saa^-1 Sab Sbb^-1 Sba."""
    A = A - A.mean(axis=0)
    B = B - B.mean(axis=0)
    S_aa, S_bb, S_ab = A.T @ A, B.T @ B, A.T @ B
    M = np.linalg.solve(S_aa, S_ab) @ np.linalg.solve(S_bb, S_ab.T)
    eigenvalues = np.sort(np.linalg.eigvals(M).real)[::-1]
    return np.sqrt(np.clip(eigenvalues[: min(A.shape[1], B.shape[1])], 0, 1))


@PROPERTY
@given(gaussian_pairs())
def test_canonical_correlations_range_order_length(pair):
    A, B, _ = pair
    correlations = canonical_correlations(A, B)
    assert correlations.shape == (min(A.shape[1], B.shape[1]),)
    assert np.all((correlations >= 0.0) & (correlations <= 1.0))
    assert np.all(np.diff(correlations) <= 0.0)


@PROPERTY
@given(gaussian_pairs())
def test_canonical_correlations_agree_with_naive_formula(pair):
    A, B, _ = pair
    assert_allclose(
        canonical_correlations(A, B), _naive_canonical_correlations(A, B), atol=1e-6
    )


@PROPERTY
@given(gaussian_pairs())
def test_canonical_correlations_invariant_to_invertible_maps(pair):
    A, B, rng = pair
    expected = canonical_correlations(A, B)
    A_mapped = A @ _invertible(rng, A.shape[1]) + rng.uniform(-5, 5, A.shape[1])
    B_mapped = B @ _invertible(rng, B.shape[1]) + rng.uniform(-5, 5, B.shape[1])
    assert_allclose(canonical_correlations(A_mapped, B), expected, atol=1e-10)
    assert_allclose(canonical_correlations(A, B_mapped), expected, atol=1e-10)
    assert_allclose(canonical_correlations(B, A), expected, atol=1e-10)


@PROPERTY
@given(gaussian_pairs())
def test_canonical_correlations_one_for_linear_map(pair):
    A, B, rng = pair
    # B's columns lie in A's column span, so every canonical correlation is 1.
    mapped = A @ rng.standard_normal((A.shape[1], B.shape[1])) + 1.0
    assert_allclose(canonical_correlations(A, mapped), 1.0, atol=1e-10)


@PROPERTY
@given(st.integers(2, 15).flatmap(lambda n: st.tuples(*[finite_matrices(n)] * 2)))
def test_canonical_correlations_in_unit_interval_for_any_finite_input(pair):
    A, B = pair
    correlations = canonical_correlations(A, B)
    assert correlations.size <= min(A.shape[1], B.shape[1])
    assert np.all((correlations >= 0.0) & (correlations <= 1.0))


def test_canonical_correlations_rank_deficient_input():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((100, 3))
    B = rng.standard_normal((100, 2))
    # A constant column (large offset) and a duplicated column add no rank.
    A_degenerate = np.column_stack([A, np.full(100, 1e6), 2.0 * A[:, 0]])
    correlations = canonical_correlations(A_degenerate, B)
    assert np.all(np.isfinite(correlations))
    assert_allclose(correlations, canonical_correlations(A, B), atol=1e-10)
    assert canonical_correlations(A_degenerate, A_degenerate).shape == (3,)


def test_canonical_correlations_empty_for_constant_input():
    A = np.full((10, 2), 3.0)
    B = np.arange(20.0).reshape(10, 2)
    assert canonical_correlations(A, B).shape == (0,)


# --------------------------------------------------------------------------- #
# mean_corr_coef
# --------------------------------------------------------------------------- #


def _brute_force_mcc(A, B, method):
    """Try every matching of min(p, q) columns; np.corrcoef / ranks."""
    if method == "spearman":
        A = np.argsort(np.argsort(A, axis=0), axis=0).astype(float)
        B = np.argsort(np.argsort(B, axis=0), axis=0).astype(float)
    p, q = A.shape[1], B.shape[1]
    corr = np.abs(np.corrcoef(A.T, B.T)[:p, p:])
    if p > q:
        corr = corr.T
    return max(
        np.mean([corr[i, j] for i, j in enumerate(cols)])
        for cols in itertools.permutations(range(corr.shape[1]), corr.shape[0])
    )


@PROPERTY
@given(gaussian_pairs(max_width=4), st.sampled_from(["pearson", "spearman"]))
def test_mcc_agrees_with_brute_force(pair, method):
    A, B, _ = pair  # continuous data: no ties, so argsort ranks are exact
    assert mean_corr_coef(A, B, method=method) == pytest.approx(
        _brute_force_mcc(A, B, method), abs=1e-10
    )


@PROPERTY
@given(gaussian_pairs(), st.sampled_from(["pearson", "spearman"]))
def test_mcc_one_under_permutation_and_rescaling(pair, method):
    A, _, rng = pair
    p = A.shape[1]
    scales = rng.uniform(0.1, 10.0, size=p) * rng.choice([-1.0, 1.0], size=p)
    B = A[:, rng.permutation(p)] * scales + rng.uniform(-5, 5, size=p)
    assert mean_corr_coef(A, B, method=method) == pytest.approx(1.0, abs=1e-10)


@PROPERTY
@given(gaussian_pairs())
def test_mcc_spearman_invariant_to_monotone_transforms(pair):
    A, B, _ = pair
    transforms = [np.exp, np.arctan, lambda x: x**3, lambda x: -np.sinh(x)]
    B_transformed = np.column_stack(
        [transforms[j % len(transforms)](B[:, j]) for j in range(B.shape[1])]
    )
    assert mean_corr_coef(A, B_transformed, method="spearman") == pytest.approx(
        mean_corr_coef(A, B, method="spearman"), abs=1e-10
    )


@PROPERTY
@given(gaussian_pairs())
def test_mcc_in_unit_interval(pair):
    A, B, _ = pair
    for method in ("pearson", "spearman"):
        assert 0.0 <= mean_corr_coef(A, B, method=method) <= 1.0 + 1e-12


def test_mcc_constant_column_counts_as_uncorrelated():
    A = np.column_stack([np.arange(10.0), np.ones(10)])
    assert mean_corr_coef(A, A) == pytest.approx(0.5)


def test_mcc_rejects_unknown_method():
    A = np.arange(20.0).reshape(10, 2)
    with pytest.raises(InvalidParameterError, match="'method' parameter"):
        mean_corr_coef(A, A, method="kendall")


# --------------------------------------------------------------------------- #
# The report's table (section 4.2): independent data, N = 5,000 rows
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "width, disparity_range, first_cc_range",
    [
        # Report: disparity 1.0, first CC 0.017. For independent data
        # N * (sum of squared CCs) is approximately chi-squared with
        # width**2 = 4 degrees of freedom, so the first CC is O(1/sqrt(N))
        # ~ 0.02 (< 0.06 except with probability ~1e-3) and the disparity is
        # 1 - O(1/N). Seeds 0-5 gave disparity 0.9988-0.9999, first CC
        # 0.015-0.042.
        (2, (0.99, 1.0), (0.0, 0.06)),
        # Report: disparity 0.93, first CC 0.594. With c = width / N = 0.1 the
        # largest CC tends to the Wachter edge sqrt(4 c (1 - c)) = 0.6, and the
        # disparity is roughly 1 - (mean CC)**2 with mean CC ~ 0.27, i.e. ~0.93.
        # Seeds 0-5 gave disparity 0.9292-0.9297, first CC 0.593-0.599.
        (500, (0.91, 0.95), (0.55, 0.63)),
    ],
)
def test_report_table_independent_gaussians(width, disparity_range, first_cc_range):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((5000, width))
    B = rng.standard_normal((5000, width))
    # Multithreaded OpenBLAS QR slows down ~25x when the cores are busy (e.g.
    # parallel test runs); one thread keeps this at about a second.
    with threadpool_limits(limits=1, user_api="blas"):
        disparity = procrustes_disparity(A, B)
        first_cc = canonical_correlations(A, B)[0]
    assert disparity_range[0] <= disparity <= disparity_range[1]
    assert first_cc_range[0] <= first_cc <= first_cc_range[1]


# --------------------------------------------------------------------------- #
# Input validation
# --------------------------------------------------------------------------- #

GOOD = np.arange(20.0).reshape(10, 2)


def _with(value, index):
    bad = GOOD.copy()
    bad[index] = value
    return bad


@pytest.mark.parametrize(
    "metric", [procrustes_disparity, canonical_correlations, mean_corr_coef]
)
@pytest.mark.parametrize(
    "A, B, match",
    [
        (GOOD, np.ones((12, 2)), r"A has 10 rows but B has 12; pass matching rows"),
        (_with(np.nan, (3, 1)), GOOD, r"finite values in A, got 1 NaN and 0 inf"),
        (GOOD, _with(np.inf, (0, 0)), r"finite values in B, got 0 NaN and 1 inf"),
        (GOOD[:1], GOOD[:1], r"at least 2 rows \(samples\) in A, got 1"),
        (
            GOOD[:, 0],
            GOOD,
            r"Expected a 2-D array .* for A, got 1-D array of shape \(10,\); "
            r"reshape with A.reshape\(-1, 1\)",
        ),
        (GOOD, GOOD.reshape(10, 2, 1), r"for B, got 3-D array of shape \(10, 2, 1\)"),
        (GOOD, np.ones((10, 0)), r"at least 1 column in B"),
    ],
)
def test_bad_input(metric, A, B, match):
    with pytest.raises(ValueError, match=match):
        metric(A, B)


@pytest.mark.parametrize(
    "metric", [procrustes_disparity, canonical_correlations, mean_corr_coef]
)
def test_non_array_input_raises_invalid_parameter(metric):
    with pytest.raises(InvalidParameterError, match="'A' parameter"):
        metric(3.0, GOOD)


# --------------------------------------------------------------------------- #
# Scorers
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def ica_data():
    return make_nonlinear_ica(n_samples=300, n_features=10, random_state=0)


ALL_SCORERS = [
    ProcrustesScorer(),
    CCAScorer(),
    CCAScorer(reduce="mean"),
    MCCScorer(),
    MCCScorer(method="spearman"),
]


def test_grid_search_with_procrustes_scorer(ica_data):
    X, Z = ica_data
    search = GridSearchCV(
        PCA(), {"n_components": [1, 2]}, scoring=ProcrustesScorer(), cv=3
    )
    search.fit(X, Z)
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores))
    assert search.best_params_ == {"n_components": 2}
    assert scores[1] > scores[0]


def test_cross_validate_with_several_scorers(ica_data):
    X, Z = ica_data
    scoring = {
        "procrustes": ProcrustesScorer(),
        "cca": CCAScorer(reduce="mean"),
        "mcc": MCCScorer(),
        "reconstruction": ProcrustesScorer(target="reconstruction"),
    }
    results = cross_validate(
        PCA(n_components=2), X, Z, scoring=scoring, cv=KFold(3), error_score="raise"
    )
    for name in scoring:
        scores = results[f"test_{name}"]
        assert scores.shape == (3,)
        assert np.all((scores >= 0.0) & (scores <= 1.0))


@pytest.mark.parametrize("scorer", ALL_SCORERS, ids=repr)
def test_better_model_scores_higher(ica_data, scorer):
    X, Z = ica_data
    two = scorer(PCA(n_components=2).fit(X), X, Z)
    one = scorer(PCA(n_components=1).fit(X), X, Z)
    assert isinstance(two, float)
    assert two > one


@pytest.mark.parametrize(
    "scorer", [ProcrustesScorer(target="reconstruction"), CCAScorer("reconstruction")]
)
def test_reconstruction_target_needs_no_latents(ica_data, scorer):
    X, _ = ica_data
    two = scorer(PCA(n_components=2).fit(X), X)
    five = scorer(PCA(n_components=5).fit(X), X)
    assert 0.0 <= two <= five <= 1.0


@pytest.mark.parametrize(
    "scorer", [ProcrustesScorer(), CCAScorer(), MCCScorer()], ids=repr
)
def test_latent_scorer_without_y_explains_what_to_pass(ica_data, scorer):
    X, _ = ica_data
    pca = PCA(n_components=2).fit(X)
    with pytest.raises(ValueError, match=r"must be passed as y.*search.fit\(X, Z\)"):
        scorer(pca, X)


def test_one_dimensional_latent_as_y():
    X, Z = make_nonlinear_ica(n_samples=200, n_components=1, random_state=0)
    pca = PCA(n_components=1).fit(X)
    for scorer in ALL_SCORERS:
        assert scorer(pca, X, Z.ravel()) == pytest.approx(scorer(pca, X, Z))


def test_scorers_validate_parameters_when_called(ica_data):
    X, Z = ica_data
    pca = PCA(n_components=2).fit(X)
    bad = [
        (ProcrustesScorer(target="latents"), "'target' parameter of ProcrustesScorer"),
        (CCAScorer(reduce="max"), "'reduce' parameter of CCAScorer"),
        (MCCScorer(method="kendall"), "'method' parameter of MCCScorer"),
    ]
    for scorer, match in bad:  # constructing them did not raise
        with pytest.raises(InvalidParameterError, match=match):
            scorer(pca, X, Z)


def test_scorer_repr():
    assert repr(ProcrustesScorer()) == "ProcrustesScorer(target='latent')"
    assert (
        repr(CCAScorer("reconstruction", reduce="mean"))
        == "CCAScorer(target='reconstruction', reduce='mean')"
    )
    assert repr(MCCScorer()) == "MCCScorer(method='pearson')"


class _ConstantTransformer(TransformerMixin, BaseEstimator):
    """Maps everything to zeros; has no inverse_transform."""

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return np.zeros((len(X), 2))


def test_constant_estimate(ica_data):
    X, Z = ica_data
    estimator = _ConstantTransformer().fit(X)
    assert CCAScorer()(estimator, X, Z) == 0.0
    assert MCCScorer()(estimator, X, Z) == 0.0
    with pytest.raises(ValueError, match="distinct rows"):
        ProcrustesScorer()(estimator, X, Z)


def test_reconstruction_needs_inverse_transform(ica_data):
    X, _ = ica_data
    with pytest.raises(TypeError, match="_ConstantTransformer has no inverse_tr"):
        ProcrustesScorer(target="reconstruction")(_ConstantTransformer(), X)
