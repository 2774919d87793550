"""The conditional prior's linear start: linear nonstationary ICA by joint
diagonalisation of the segments' covariances."""

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica._linear_start import (
    SEGMENT_MIN_ROWS,
    SEGMENT_VARIANCE_FLOOR,
    fit_segment_linear_model,
    joint_diagonalise,
)
from sknlica._torch.linear_start import LinearFactorModel, start_segment_prior
from sknlica._torch.segments import SegmentPrior
from sknlica.metrics import mean_corr_coef


def _off_diagonal(matrices):
    return np.abs(matrices - np.einsum("kii->ki", matrices)[:, :, None] * np.eye(4))


@pytest.mark.parametrize("seed", range(3))
def test_joint_diagonalisation_recovers_a_shared_eigenbasis(seed):
    rng = np.random.default_rng(seed)
    basis = ortho_group.rvs(4, random_state=seed)
    spectra = rng.uniform(0.1, 3.0, size=(6, 4))
    matrices = np.einsum("ij,kj,lj->kil", basis, spectra, basis)
    rotation = joint_diagonalise(matrices)
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(4), atol=1e-12)
    rotated = np.einsum("ji,kjl,lm->kim", rotation, matrices, rotation)
    assert _off_diagonal(rotated).max() < 1e-9
    # The basis up to the order and signs of its columns.
    match = np.abs(basis.T @ rotation)
    np.testing.assert_allclose(np.sort(match.max(axis=0)), np.ones(4), atol=1e-9)


def test_joint_diagonalisation_of_noisy_matrices_beats_any_one_of_them():
    rng = np.random.default_rng(0)
    basis = ortho_group.rvs(4, random_state=0)
    spectra = rng.uniform(0.1, 3.0, size=(20, 4))
    noise = rng.normal(scale=0.05, size=(20, 4, 4))
    matrices = np.einsum("ij,kj,lj->kil", basis, spectra, basis)
    matrices += noise + noise.transpose(0, 2, 1)
    joint = joint_diagonalise(matrices)
    single = np.linalg.eigh(matrices[0])[1]
    off = [
        _off_diagonal(np.einsum("ji,kjl,lm->kim", v, matrices, v)).sum()
        for v in (joint, single)
    ]
    assert off[0] < off[1]


def _nonstationary_linear(n_features, n_segments=12, n_rows=1500, seed=0, noise=0.01):
    rng = np.random.default_rng(seed)
    n_components = 3
    loadings = rng.normal(size=(n_features, n_components))
    scales = rng.uniform(0.1, 3.0, size=(n_segments, n_components))
    means = rng.uniform(-1.0, 1.0, size=(n_segments, n_components))
    codes = np.repeat(np.arange(n_segments), n_rows)
    sources = means[codes] + scales[codes] * rng.normal(size=(len(codes), 3))
    x = sources @ loadings.T + noise * rng.normal(size=(len(codes), n_features)) + 7.0
    return x, codes, sources, loadings


@pytest.mark.parametrize("n_features", (3, 6))
def test_segment_linear_model_identifies_the_sources(n_features):
    x, codes, sources, loadings = _nonstationary_linear(n_features)
    model = fit_segment_linear_model(x, codes, 12, 3)
    recovered = (x - model.mean) @ np.linalg.pinv(model.loadings).T
    assert mean_corr_coef(sources, recovered) > 0.995
    # Each loading column is a true one, up to order and scale.
    correlation = np.abs(np.corrcoef(loadings.T, model.loadings.T)[:3, 3:])
    assert correlation.max(axis=1).min() > 0.995
    # Unit pooled variance, as the standard model's latents (up to the
    # variance floor, where the square case's noise share left a segment's
    # variance below it).
    weights = np.bincount(codes) / len(codes)
    pooled = weights @ (model.segment_variances + model.segment_means**2)
    np.testing.assert_allclose(
        pooled, np.ones(3), rtol=1e-6 if n_features > 3 else 1e-2
    )
    if n_features > 3:
        assert model.noise_variance == pytest.approx(1e-4, rel=0.1)


def test_segment_linear_model_edge_cases():
    x, codes, _, _ = _nonstationary_linear(6, n_rows=50)
    # A segment with no training rows keeps the standard prior.
    model = fit_segment_linear_model(x, codes, 13, 3)
    assert model.segment_variances[12] == pytest.approx(np.ones(3))
    assert model.segment_means[12] == pytest.approx(np.zeros(3))
    assert model.segment_variances.min() >= SEGMENT_VARIANCE_FLOOR
    few = codes.copy()
    few[: SEGMENT_MIN_ROWS - 1] = 12  # too few rows for a covariance
    model = fit_segment_linear_model(x, few, 13, 3)
    assert model.segment_variances[12] == pytest.approx(np.ones(3))
    assert model.segment_means[12] == pytest.approx(np.zeros(3))
    # One segment, or segments of a row each (a continuous y): undefined.
    assert fit_segment_linear_model(x, np.zeros(len(x), int), 1, 3) is None
    assert fit_segment_linear_model(x, np.arange(len(x)), len(x), 3) is None
    assert fit_segment_linear_model(x[:, :2], codes, 12, 3) is None
    bad = x.copy()
    bad[0, 0] = np.nan
    assert fit_segment_linear_model(bad, codes, 12, 3) is None


@pytest.mark.parametrize("learn_means", (True, False))
def test_segment_prior_starts_at_the_linear_model(learn_means):
    means = np.array([[0.5, -1.0], [0.0, 2.0]])
    variances = np.array([[0.25, 1.0], [4.0, 0.01]])
    model = LinearFactorModel(
        np.eye(2), np.zeros(2), 0.1, segment_means=means, segment_variances=variances
    )
    prior = SegmentPrior(
        [3, 5], 2, learn_means=learn_means, dtype=torch.float64, device="cpu"
    )
    start_segment_prior(prior, model)
    if learn_means:
        np.testing.assert_allclose(prior.means.detach().numpy(), means)
        np.testing.assert_allclose(prior.variances.detach().numpy(), variances)
    else:
        # Fixed zero means: the segments keep their second moments.
        np.testing.assert_allclose(prior.means.numpy(), 0.0)
        np.testing.assert_allclose(
            prior.variances.detach().numpy(), variances + means**2
        )


@pytest.mark.parametrize("Estimator", (NonlinearICAMLE, NonlinearICAVAE))
def test_conditional_estimators_start_at_linear_nonstationary_ica(Estimator):
    # Noise at which the VAE's start scores above the Gaussian baseline (its
    # encoder starts at the standard prior's posterior, which the
    # conditional prior's standardised latents do not match).
    x, codes, sources, _ = _nonstationary_linear(6, n_rows=300, noise=1.0)
    frozen = {
        "prior": "conditional",
        "learning_rate_init": 1e-12,  # steps that change nothing
        "max_iter": 1,
        "max_polish_iter": 0,
        "early_stopping": False,
        "random_state": 0,
    }
    linear = Estimator(3, init="linear", **frozen).fit(x, codes)
    start = fit_segment_linear_model(x, codes, 12, 3)
    np.testing.assert_allclose(linear.prior_variances_, start.segment_variances)
    np.testing.assert_allclose(linear.prior_means_, start.segment_means, atol=1e-12)
    Z = np.random.default_rng(0).normal(size=(5, 3))
    np.testing.assert_allclose(
        linear.inverse_transform(Z), Z @ start.loadings.T + start.mean, atol=1e-9
    )
    if Estimator is NonlinearICAVAE:
        # The encoder speaks of z: at the start it is the linear model's
        # posterior under the pooled prior, whatever the segment.
        pooled = LinearFactorModel(start.loadings, start.mean, linear.noise_variance_)
        posterior_map, _ = pooled.posterior()
        expected = (x - start.mean) @ posterior_map.T
        np.testing.assert_allclose(linear.transform(x, codes), expected, atol=1e-8)
    else:
        # The posterior means of the linear-Gaussian start, in closed form.
        loadings, noise = start.loadings, float(linear.noise_variance_)
        expected = np.empty((len(x), 3))
        for segment in range(12):
            rows = codes == segment
            prior_precision = np.diag(1.0 / start.segment_variances[segment])
            covariance = np.linalg.inv(loadings.T @ loadings / noise + prior_precision)
            data = (x[rows] - start.mean) @ loadings / noise
            prior = prior_precision @ start.segment_means[segment]
            expected[rows] = (data + prior) @ covariance
        # To the evaluation's accuracy (measured: 0.0016 on average, 0.017 at
        # worst).  Its grid ends at |eps| = 2.88; before the rows near that
        # edge were refined (evaluation.EDGE_WEIGHT) a few were off by 0.39.
        error = np.abs(linear.transform(x, codes) - expected)
        assert error.mean() < 0.005
        assert error.max() < 0.05
        random = Estimator(3, init="random", **frozen).fit(x, codes)
        assert mean_corr_coef(sources, random.transform(x, codes)) < 0.8
