"""The VAE's L-BFGS polish: its frozen bound against oracles, and the estimator.

The bound with fixed draws is checked against the closed form (a linear
decoder with orthogonal columns and an encoder at its exact posterior: every
importance weight equals ``p(x)``), against the draws' own ELBO and IWAE
computed directly, its accumulated gradient against finite differences of
its value (it is deterministic), and for independence of the row chunking.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _gradients import assert_matches_finite_differences, frozen_value
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning

from sknlica import NonlinearICAVAE
from sknlica._torch.elbo import importance_sampled_log_likelihood
from sknlica._torch.models import ENCODER_LOG_VAR_RANGE, VAEModel
from sknlica._torch.networks import GaussianHead, NoiseVariance, make_mlp
from sknlica._torch.training import TrainingRows
from sknlica._torch.vae_polish import FrozenBound

F64 = torch.float64


def _model(n_features=5, hidden=(4,), seed=0, noise=0.3):
    generator = torch.Generator().manual_seed(seed)
    encoder = GaussianHead(
        n_features, hidden, 2, activation="tanh", generator=generator
    )
    decoder = make_mlp(2, hidden, n_features, activation="tanh", generator=generator)
    return VAEModel(encoder, decoder, NoiseVariance(noise, learn=True, floor=1e-6))


def _rows(n_rows=30, n_features=5, seed=1):
    return torch.randn(
        n_rows, n_features, generator=torch.Generator().manual_seed(seed), dtype=F64
    )


def _bound(x, bound="iwae", beta=1.0, n_draws=64, seed=0):
    return FrozenBound(
        TrainingRows(x),
        2,
        width=5,
        generator=torch.Generator().manual_seed(seed),
        bound=bound,
        beta=beta,
        n_draws=n_draws,
    )


def test_exact_posterior_encoder_makes_the_bound_the_log_likelihood():
    # g(z) = W z + b with orthogonal columns: the posterior is
    # N(S W^T (x - b) / s2, S) with S = diag(1 / (|w_j|^2 / s2 + 1)), which a
    # linear encoder represents exactly; every weight p(x, z) / q(z) is p(x).
    rng = np.random.default_rng(0)
    n, s2 = 5, 0.3
    W = np.linalg.qr(rng.normal(size=(n, 2)))[0] * np.array([2.0, 0.7])
    b = rng.normal(size=n)
    S = 1.0 / ((W**2).sum(0) / s2 + 1.0)
    model = _model(hidden=(), noise=s2)
    with torch.no_grad():
        model.decoder[0].weight.copy_(torch.tensor(W))
        model.decoder[0].bias.copy_(torch.tensor(b))
        model.encoder.mean.weight.copy_(torch.tensor(S[:, None] * W.T / s2))
        model.encoder.mean.bias.copy_(torch.tensor(-S * (W.T @ b) / s2))
        model.encoder.log_var.weight.zero_()
        # Undo the encoder's soft clamp of the log-variance (its upper
        # softplus moves log S by ~1e-4 here; the lower one by ~3e-8).
        high = ENCODER_LOG_VAR_RANGE[1]
        model.encoder.log_var.bias.copy_(
            torch.tensor(high - np.log(np.expm1(high - np.log(S))))
        )
    x = _rows()
    exact = multivariate_normal(b, W @ W.T + s2 * np.eye(n)).logpdf(x.numpy())
    assert frozen_value(_bound(x), model) == pytest.approx(-exact.mean(), abs=1e-7)
    # The ELBO equals log p(x) only in expectation over the draws (64 QMC
    # draws: measured 0.004 nats/row off).
    elbo = frozen_value(_bound(x, "elbo"), model)
    assert elbo == pytest.approx(-exact.mean(), abs=0.02)


@pytest.mark.parametrize("bound", ["iwae", "elbo"])
def test_the_bound_is_the_draws_own_estimate(bound):
    model = _model()
    x = _rows()
    frozen = _bound(x, bound)
    with torch.no_grad():
        mean, log_var = model.encode(x)
        log_px, elbo = importance_sampled_log_likelihood(
            x, mean, log_var, model.decode, frozen.eps
        )
    expected = -(log_px if bound == "iwae" else elbo).mean()
    assert frozen_value(frozen, model) == pytest.approx(float(expected), rel=1e-12)


def test_beta_weighs_the_kl():
    model = _model()
    x = _rows()
    # The ELBO is linear in beta: E log p(x | z) - beta KL.
    values = [frozen_value(_bound(x, "elbo", beta), model) for beta in (0.0, 1.0, 2.0)]
    assert values[2] - values[1] == pytest.approx(values[1] - values[0], rel=1e-9)
    assert values[1] != pytest.approx(values[0])


def test_gradient_matches_finite_differences_of_the_value():
    model = _model()
    frozen = _bound(_rows(12))
    model.zero_grad(set_to_none=True)
    frozen.backward(model)
    parameters = list(model.parameters())
    analytic = [p.grad.clone() for p in parameters]
    assert_matches_finite_differences(
        lambda: frozen_value(frozen, model), parameters, analytic, samples=3
    )


def test_row_chunks_do_not_change_the_value_or_gradient():
    model = _model()
    x = _rows()
    whole, pieces = _bound(x), _bound(x)
    pieces.rows_per_chunk = 7
    results = []
    for frozen in (whole, pieces):
        model.zero_grad(set_to_none=True)
        value = frozen.backward(model)
        results.append((value, [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_draws_come_from_the_fit_not_the_evaluation_seed():
    # The held-out monitor uses the fixed evaluation draws; the polished
    # bound's must differ, or L-BFGS would fit the draws that judge it.
    x = _rows()
    a, b = _bound(x, seed=0), _bound(x, seed=1)
    assert not torch.equal(a.eps, b.eps)
    assert a.eps.shape == (64, 2) and abs(float(a.eps.mean())) < 0.1


# -------------------------------------------------------------- the estimator
def _skewed(n_rows=300, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n_rows, 2))
    return np.column_stack([Z[:, 0], Z[:, 1], Z[:, 0] ** 2, Z.sum(1) ** 2, Z[:, 1]])


def test_polish_runs_after_the_epochs_and_keeps_the_best_held_out_score():
    X = _skewed()
    vae = NonlinearICAVAE(
        hidden_layer_sizes=(8,), max_iter=4, max_polish_iter=30, random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        vae.fit(X)
    phases = [entry["phase"] for entry in vae.history_]
    assert phases[:4] == ["adam"] * 4 and set(phases[4:]) == {"lbfgs"}
    assert vae.n_iter_ == 4 and 0 < vae.n_polish_iter_ <= 30
    scores = [entry["validation_log_likelihood"] for entry in vae.history_]
    assert vae.history_[vae.best_epoch_ - 1]["validation_log_likelihood"] == max(scores)
    # The polished bound rose over the rounds (L-BFGS with a line search).
    bounds = [e["train_objective"] for e in vae.history_ if e["phase"] == "lbfgs"]
    assert bounds == sorted(bounds)
    assert np.isfinite(vae.score(X))


def test_the_default_does_not_polish():
    X = _skewed(200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        vae = NonlinearICAVAE(hidden_layer_sizes=(4,), max_iter=2).fit(X)
    assert vae.n_polish_iter_ == 0
    assert {entry["phase"] for entry in vae.history_} == {"adam"}
