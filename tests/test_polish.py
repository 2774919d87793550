"""The L-BFGS polish: its frozen likelihood against oracles, and what it delivers.

The frozen estimate is checked against closed forms (a linear decoder's
marginal is Gaussian) and dense quadrature, its accumulated gradient
against finite differences of its own value (it is deterministic), and the
estimator's polished fit against probabilistic PCA's closed-form maximum.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _gradients import assert_matches_finite_differences, frozen_value
from scipy.stats import multivariate_normal
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning

from sknlica import NonlinearICAMLE
from sknlica._torch.integration import prior_rule
from sknlica._torch.models import MLEModel
from sknlica._torch.networks import NoiseVariance, make_mlp
from sknlica._torch.polish import FrozenLikelihood
from sknlica._torch.training import TrainingRows, WeightPenalty


def _model(n_features, hidden=(), activation="identity", noise=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    decoder = make_mlp(
        2, hidden, n_features, activation=activation, generator=generator
    )
    return MLEModel(decoder, NoiseVariance(noise, learn=True, floor=1e-6))


def _frozen(x, model, adaptive, n_nodes=256):
    rule = prior_rule("grid", 2, n_nodes, dtype=torch.float64)
    frozen = FrozenLikelihood(TrainingRows(x), rule, adaptive=adaptive)
    frozen.refresh(model)
    return frozen


def _linear_log_likelihood(model, x):
    linear = model.decoder[0]
    w = linear.weight.detach().numpy()
    b = linear.bias.detach().numpy()
    noise = float(model.noise().detach())
    covariance = w @ w.T + noise * np.eye(w.shape[0])
    return multivariate_normal(b, covariance).logpdf(x.numpy())


@pytest.mark.parametrize("noise", [1.0, 0.01])
def test_frozen_rows_are_exact_for_a_linear_decoder(noise):
    # The posterior of a linear decoder is Gaussian with the Gauss-Newton
    # covariance, so adaptive Gauss-Hermite at the mode is exact.
    x = torch.randn(
        40, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    model = _model(6, noise=noise)
    frozen = _frozen(x, model, "all")
    assert frozen.n_adaptive == 40
    expected = _linear_log_likelihood(model, x).mean()
    assert -frozen_value(frozen, model) == pytest.approx(expected, abs=1e-10)


def test_frozen_estimate_matches_dense_quadrature_for_a_nonlinear_decoder():
    generator = torch.Generator().manual_seed(2)
    model = _model(8, hidden=(6,), activation="tanh", noise=0.3)
    with torch.no_grad():
        x = model.decoder(torch.randn(30, 2, generator=generator, dtype=torch.float64))
        x += 0.3**0.5 * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    nodes, log_weights = prior_rule("grid", 2, 400**2, half_width=7.0)
    with torch.no_grad():
        g = model.decoder(nodes)
        joint = log_weights - 0.5 * ((x[:, None, :] - g) ** 2).sum(-1) / 0.3
        dense = torch.logsumexp(joint, 1) - 4 * math.log(2 * math.pi * 0.3)
    for adaptive in ("all", "low_ess"):
        frozen = _frozen(x, model, adaptive, n_nodes=1024)
        assert -frozen_value(frozen, model) == pytest.approx(
            float(dense.mean()), abs=2e-3
        )


def test_frozen_gradient_matches_finite_differences_of_its_value():
    x = torch.randn(
        25, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    model = _model(5, hidden=(4,), activation="tanh", noise=0.2)
    frozen = _frozen(x, model, "low_ess", n_nodes=64)
    assert 0 < frozen.n_adaptive < 25  # both kinds of rows contribute
    penalty = WeightPenalty(model.decoder, alpha=3.0, n_rows=25)
    model.zero_grad(set_to_none=True)
    frozen.backward(model, penalty)
    parameters = list(model.parameters())
    analytic = [p.grad.clone() for p in parameters]
    assert_matches_finite_differences(
        lambda: frozen_value(frozen, model, penalty), parameters, analytic
    )


def test_frozen_estimate_does_not_depend_on_the_other_rows():
    x = torch.randn(
        30, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    model = _model(5, hidden=(4,), activation="tanh", noise=0.1)
    whole = _frozen(x, model, "low_ess")
    half = _frozen(x[:15], model, "low_ess")
    rest = _frozen(x[15:], model, "low_ess")
    combined = (frozen_value(half, model) + frozen_value(rest, model)) / 2
    assert frozen_value(whole, model) == pytest.approx(combined, abs=1e-12)


def _linear_gaussian(n_rows=1500, scale=1.0, seed=0):
    rng = np.random.RandomState(seed)
    loadings = rng.randn(6, 2)
    loadings[:, 0] *= scale
    return rng.randn(n_rows, 2) @ loadings.T + rng.randn(n_rows, 6)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_polished_linear_fit_reaches_the_ppca_maximum(scale):
    X = _linear_gaussian(scale=scale)
    pca = PCA(2).fit(X)
    mle = NonlinearICAMLE(
        hidden_layer_sizes=(),
        activation="identity",
        early_stopping=False,
        max_polish_iter="auto",
        n_nodes=256,
        n_eval_nodes=1024,
        random_state=0,
    ).fit(X)
    model = MLEModel(mle.decoder_, mle.noise_)
    fitted = _linear_log_likelihood(model, torch.from_numpy(X)).mean()
    # Fitted on all rows (no validation split): the same data as PCA.
    assert fitted == pytest.approx(pca.score(X), abs=2e-4)
    assert mle.noise_variance_ == pytest.approx(pca.noise_variance_, rel=2e-3)
    assert mle.converged_ and mle.n_polish_iter_ > 0
    assert mle.history_[-1]["phase"] == "lbfgs"


def test_lbfgs_solver_counts_iterations_and_refuses_partial_fit():
    X = _linear_gaussian(400)
    mle = NonlinearICAMLE(
        hidden_layer_sizes=(),
        activation="identity",
        solver="lbfgs",
        max_iter=60,
        n_nodes=256,
        n_eval_nodes=1024,
        random_state=0,
    ).fit(X)
    assert {entry["phase"] for entry in mle.history_} == {"lbfgs"}
    assert mle.n_iter_ == mle.history_[-1]["iterations"] <= 60
    assert mle.converged_
    assert mle.score(X) > PCA(2).fit(X).score(X) - 0.02
    assert not hasattr(mle, "partial_fit")
    with pytest.raises(AttributeError) as error:
        mle.partial_fit(X)
    assert "solver='lbfgs'" in str(error.value.__cause__)


def _small_mle(**params):
    """A small, seeded MLE for the estimator-level tests."""
    return NonlinearICAMLE(n_nodes=64, n_eval_nodes=256, random_state=0, **params)


def _quiet_fit(model, X):
    """``model.fit(X)`` without the ConvergenceWarning of short fits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X)


def test_polish_keeps_the_best_scoring_parameters():
    X = _linear_gaussian(600) ** 2  # skewed: far from the linear model
    mle = _small_mle(max_polish_iter="auto", hidden_layer_sizes=(8,), max_iter=5)
    _quiet_fit(mle, X)
    scores = [entry["validation_log_likelihood"] for entry in mle.history_]
    kept = mle.history_[mle.best_epoch_ - 1]
    assert kept["validation_log_likelihood"] == max(scores)
    epochs = [e for e in mle.history_ if e["phase"] == "adam"]
    assert mle.n_iter_ == len(epochs) == 5


def test_polish_budget_exhausted_warns_with_its_parameter_name():
    X = _linear_gaussian(400)
    mle = _small_mle(
        hidden_layer_sizes=(),
        activation="identity",
        max_iter=3,
        max_polish_iter=1,
        init="random",  # the linear start is the optimum here
    )
    with pytest.warns(ConvergenceWarning, match="max_polish_iter=1"):
        mle.fit(X)
    assert mle.n_polish_iter_ == 1 and not mle.converged_


def test_no_polish_leaves_only_epochs():
    X = _linear_gaussian(300)
    mle = _quiet_fit(
        _small_mle(hidden_layer_sizes=(4,), max_iter=3, max_polish_iter=0), X
    )
    assert mle.n_polish_iter_ == 0
    assert {entry["phase"] for entry in mle.history_} == {"adam"}


def test_interrupt_during_polish_keeps_a_usable_model(monkeypatch):
    X = _linear_gaussian(300)
    calls = {"n": 0}
    original = FrozenLikelihood.backward

    def interrupting(self, model, penalty=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, model, penalty)

    monkeypatch.setattr(FrozenLikelihood, "backward", interrupting)
    mle = _small_mle(max_polish_iter=200, hidden_layer_sizes=(4,), max_iter=3)
    with pytest.warns(UserWarning, match="nterrupt"):
        mle.fit(X)
    assert np.isfinite(mle.score(X))


def test_alpha_shrinks_the_decoder_weights():
    X = _linear_gaussian(400)
    norms = {}
    for alpha in (0.0, 1e3):
        mle = _quiet_fit(
            _small_mle(hidden_layer_sizes=(8,), alpha=alpha, max_iter=5, init="random"),
            X,
        )
        norms[alpha] = sum(
            float(layer.weight.square().sum())
            for layer in mle.decoder_
            if isinstance(layer, torch.nn.Linear)
        )
    assert norms[1e3] < 0.9 * norms[0.0]
