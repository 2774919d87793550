"""The linear start: an MLP set to an affine map, and estimators that start at
probabilistic PCA / factor analysis."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA, FactorAnalysis

from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica._linear_start import fit_linear_factor_model
from sknlica._torch.linear_start import (
    LinearFactorModel,
    carries_linear_map,
    start_decoder,
    start_encoder,
)
from sknlica._torch.networks import GaussianHead, make_mlp

EXACT = ("identity", "relu", "leaky_relu", "gelu")
SIZES = ((), (6,), (6, 9), (16, 8, 6))


def _model(n_features=5, n_components=3, seed=0):
    rng = np.random.default_rng(seed)
    return LinearFactorModel(
        rng.normal(size=(n_features, n_components)),
        rng.normal(size=n_features),
        rng.uniform(0.2, 2.0, size=n_features),
    )


@pytest.mark.parametrize("activation", EXACT)
@pytest.mark.parametrize("sizes", SIZES)
def test_decoder_start_is_the_affine_map_exactly(activation, sizes):
    model = _model()
    decoder = make_mlp(3, sizes, 5, activation=activation)
    start_decoder(decoder, activation, model)
    z = 3 * torch.randn(200, 3, dtype=torch.float64)
    expected = z @ torch.as_tensor(model.loadings).T + torch.as_tensor(model.mean)
    torch.testing.assert_close(decoder(z), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", EXACT)
@pytest.mark.parametrize("sizes", SIZES)
def test_encoder_start_is_the_factor_posterior(activation, sizes):
    model = _model()
    # Two extra inputs, as a conditional encoder's segment code: ignored.
    encoder = GaussianHead(7, sizes, 3, activation=activation)
    start_encoder(encoder, activation, model)
    x = torch.randn(50, 7, dtype=torch.float64)
    mean, log_var = encoder(x)
    # The posterior of the linear model, from its joint covariance.
    loadings = model.loadings
    covariance = loadings @ loadings.T + np.diag(model.noise_variance)
    gain = np.linalg.solve(covariance, loadings).T  # L^T Sigma^-1
    expected = (x[:, :5].numpy() - model.mean) @ gain.T
    np.testing.assert_allclose(mean.detach().numpy(), expected, atol=1e-10)
    posterior_variance = np.diag(np.eye(3) - gain @ loadings)
    np.testing.assert_allclose(
        log_var.detach().numpy(), np.log(posterior_variance) * np.ones((50, 1))
    )


@pytest.mark.parametrize("activation", ("tanh", "sigmoid"))
def test_saturating_activations_start_nearly_linear(activation):
    model = _model()
    decoder = make_mlp(3, (8,), 5, activation=activation)
    start_decoder(decoder, activation, model)
    z = torch.randn(200, 3, dtype=torch.float64)
    expected = z @ torch.as_tensor(model.loadings).T + torch.as_tensor(model.mean)
    error = (decoder(z) - expected).abs().max() / expected.abs().max()
    assert error < 0.05


def test_width_rule():
    assert carries_linear_map((), 5)
    assert carries_linear_map((4, 6), 2)
    assert not carries_linear_map((64, 3), 2)


def test_linear_factor_models_match_sklearn():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    for diagonal, reference in ((False, PCA(2)), (True, FactorAnalysis(2))):
        fitted = fit_linear_factor_model(x, 2, diagonal=diagonal)
        reference.fit(x)
        covariance = fitted.loadings @ fitted.loadings.T + np.diag(
            np.broadcast_to(fitted.noise_variance, (6,))
        )
        np.testing.assert_allclose(covariance, reference.get_covariance())


def test_linear_factor_model_undefined_or_padded():
    rng = np.random.default_rng(2)
    assert fit_linear_factor_model(rng.normal(size=(1, 4)), 2, diagonal=True) is None
    assert fit_linear_factor_model(np.ones((10, 3)), 2, diagonal=False) is None
    # As many components as features: one is left for the noise.
    for n_components in (3, 4):
        x = rng.normal(size=(50, 3))
        padded = fit_linear_factor_model(x, n_components, diagonal=False)
        assert padded.loadings.shape == (3, n_components)
        np.testing.assert_array_equal(padded.loadings[:, 2:], 0.0)
        assert padded.noise_variance == pytest.approx(
            np.linalg.eigvalsh(np.cov(x.T))[0]
        )
    # Rank-deficient data: the noise stays positive.
    x = rng.normal(size=(50, 2)) @ rng.normal(size=(2, 4))
    for diagonal in (False, True):
        degenerate = fit_linear_factor_model(x, 2, diagonal=diagonal)
        assert np.all(np.asarray(degenerate.noise_variance) > 0)


def _linear_gaussian(n_rows=600, seed=0):
    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(6, 2))
    noise = rng.uniform(0.1, 1.0, size=6)
    z = rng.normal(size=(n_rows, 2))
    x = z @ loadings.T + rng.normal(size=(n_rows, 6)) * np.sqrt(noise)
    # Units far from 1, so that the start must survive the standardisation.
    return 100.0 * x + 5.0


@pytest.mark.parametrize(
    ("noise", "reference"), (("isotropic", PCA), ("diagonal", FactorAnalysis))
)
def test_mle_starts_at_the_linear_model(noise, reference):
    X = _linear_gaussian()
    frozen = NonlinearICAMLE(
        2,
        noise=noise,
        init="linear",
        learning_rate_init=1e-12,  # steps that change nothing
        max_iter=1,
        max_polish_iter=0,
        early_stopping=False,
        random_state=0,
    )
    frozen.fit(X)
    linear = reference(2).fit(X)
    assert frozen.score(X) == pytest.approx(linear.score(X), abs=2e-3)
    if noise == "isotropic":
        # Unique (factor analysis's noise is not: its likelihood is flat
        # along directions that trade noise for loadings).
        assert frozen.noise_variance_ == pytest.approx(linear.noise_variance_)


def test_vae_encoder_starts_at_the_factor_posterior():
    X = _linear_gaussian()
    vae = NonlinearICAVAE(
        2,
        noise="diagonal",
        init="linear",
        learning_rate_init=1e-12,
        max_iter=1,
        early_stopping=False,
        random_state=0,
    ).fit(X)
    # The decoder is affine at the start: read its loadings off it, and
    # compute that model's posterior mean in closed form.
    mean = vae.inverse_transform(np.zeros((1, 2)))[0]
    loadings = (vae.inverse_transform(np.eye(2)) - mean).T
    model = LinearFactorModel(loadings, mean, vae.noise_variance_)
    posterior_map, _ = model.posterior()
    expected = (X - mean) @ posterior_map.T
    np.testing.assert_allclose(vae.transform(X), expected, atol=1e-8)


def test_random_start_differs_and_auto_falls_back():
    X = _linear_gaussian(200)
    common = {"max_iter": 2, "max_polish_iter": 0, "random_state": 0}
    for noise in ("isotropic", "diagonal"):
        common["noise"] = noise
        linear = NonlinearICAMLE(2, init="linear", **common).fit(X)
        auto = NonlinearICAMLE(2, **common).fit(X)
        random = NonlinearICAMLE(2, init="random", **common).fit(X)
        assert random.score(X) != linear.score(X)
        # "auto" starts at the linear model with diagonal noise only.
        assert auto.score(X) == (linear if noise == "diagonal" else random).score(X)
    # Too narrow for the linear start: "auto" starts at random.
    narrow = {"hidden_layer_sizes": (3,), **common}
    assert NonlinearICAMLE(2, **narrow).fit(X).score(X) == NonlinearICAMLE(
        2, init="random", **narrow
    ).fit(X).score(X)


@pytest.mark.parametrize("Estimator", (NonlinearICAMLE, NonlinearICAVAE))
def test_linear_start_needs_wide_hidden_layers(Estimator):
    X = _linear_gaussian(50)
    with pytest.raises(ValueError, match=r"init='linear' needs at least 2 \* n_comp"):
        Estimator(3, hidden_layer_sizes=(5,), init="linear").fit(X)
