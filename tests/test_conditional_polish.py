"""The L-BFGS polish with prior="conditional": the frozen objectives segment by segment.

The oracle for the MLE's frozen likelihood is the linear-Gaussian case,
where ``x | u ~ N(W mu_u + b, W Lambda_u W^T + sigma^2 I)`` in closed form;
its gradient, the segment priors' included, is checked against finite
differences of its own value (it is deterministic).  The VAE's frozen bound
summed over segments is checked against each segment's bound on its view.
The estimators' polished conditional fits reach a stationary point of the
closed-form likelihood (linear) and keep the best held-out score.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _gradients import assert_matches_finite_differences, frozen_value
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning

from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica._torch.integration import prior_rule
from sknlica._torch.models import MLEModel, VAEModel
from sknlica._torch.networks import GaussianHead, NoiseVariance, make_mlp
from sknlica._torch.polish import FrozenLikelihood
from sknlica._torch.segments import SegmentedFrozen, SegmentPrior, segment_view
from sknlica._torch.training import TrainingRows, WeightPenalty
from sknlica._torch.vae_polish import FrozenBound
from sknlica.datasets import make_nonstationary_ica

F64 = torch.float64
LINEAR = {"hidden_layer_sizes": (), "activation": "identity"}


def _prior(n_segments=3, seed=0):
    """Segment priors away from N(0, I), with unequal weights."""
    generator = torch.Generator().manual_seed(seed)
    prior = SegmentPrior(
        torch.arange(2, 2 + n_segments),
        2,
        learn_means=True,
        dtype=F64,
        device="cpu",
    )
    with torch.no_grad():
        prior.means.copy_(torch.randn(n_segments, 2, generator=generator, dtype=F64))
        prior.log_variances.copy_(
            torch.randn(n_segments, 2, generator=generator, dtype=F64)
        )
    return prior


def _mle_model(n_features=5, hidden=(), activation="identity", noise=0.2):
    generator = torch.Generator().manual_seed(1)
    decoder = make_mlp(
        2, hidden, n_features, activation=activation, generator=generator
    ).double()
    return MLEModel(
        decoder, NoiseVariance(noise, learn=True, floor=1e-6).double(), _prior()
    )


def _segment_rows(n_rows=36, n_features=5, seed=2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, n_features, generator=generator, dtype=F64)
    codes = torch.arange(n_rows) % 3
    return TrainingRows(x, groups=codes)


def _frozen_likelihood(rows, model, adaptive, n_nodes=256):
    def make(part, denominator):
        rule = prior_rule("grid", 2, n_nodes, dtype=F64)
        return FrozenLikelihood(part, rule, adaptive=adaptive, denominator=denominator)

    frozen = SegmentedFrozen(rows, make)
    frozen.refresh(model)
    return frozen


def _linear_conditional_log_likelihood(model, x, codes):
    """Closed-form ``log p(x | u)`` per row of a linear decoder."""
    w = model.decoder[0].weight.detach().numpy()
    b = model.decoder[0].bias.detach().numpy()
    noise = float(model.noise().detach())
    log_p = np.empty(len(x))
    for segment in np.unique(codes):
        mean, variance = (
            part[segment].detach().numpy()
            for part in (model.prior.means, model.prior.variances)
        )
        covariance = w @ np.diag(variance) @ w.T + noise * np.eye(w.shape[0])
        rows = codes == segment
        log_p[rows] = multivariate_normal(w @ mean + b, covariance).logpdf(x[rows])
    return log_p


@pytest.mark.parametrize("noise", [1.0, 0.01])
def test_segmented_frozen_likelihood_is_exact_for_a_linear_decoder(noise):
    # Each segment's view is a linear decoder of eps, so the adaptive
    # Gauss-Hermite rules at its modes are exact.
    rows = _segment_rows()
    model = _mle_model(noise=noise)
    frozen = _frozen_likelihood(rows, model, "all")
    assert frozen.n_adaptive == len(rows)
    expected = _linear_conditional_log_likelihood(
        model, rows.data.numpy(), rows.groups.numpy()
    ).mean()
    assert -frozen_value(frozen, model) == pytest.approx(expected, abs=1e-10)


def test_segmented_frozen_gradient_reaches_the_segment_priors():
    rows = _segment_rows(n_rows=30)
    model = _mle_model(hidden=(4,), activation="tanh", noise=0.1)
    frozen = _frozen_likelihood(rows, model, "low_ess", n_nodes=64)
    assert 0 < frozen.n_adaptive < len(rows)  # both kinds of rows contribute
    penalty = WeightPenalty(model.decoder, alpha=3.0, n_rows=len(rows))
    model.zero_grad(set_to_none=True)
    frozen.backward(model, penalty)
    parameters = [p for p in model.parameters() if p.requires_grad]
    assert any(p is model.prior.log_variances for p in parameters)
    analytic = [p.grad.clone() for p in parameters]
    assert all(bool(g.abs().sum() > 0) for g in analytic)
    assert_matches_finite_differences(
        lambda: frozen_value(frozen, model, penalty), parameters, analytic
    )


def _vae_model(n_features=5):
    generator = torch.Generator().manual_seed(3)
    # The encoder reads x with the segment's one-hot code appended.
    encoder = GaussianHead(
        n_features + 3, (4,), 2, activation="tanh", generator=generator
    )
    decoder = make_mlp(2, (4,), n_features, activation="tanh", generator=generator)
    noise = NoiseVariance(0.3, learn=True, floor=1e-6)
    return VAEModel(encoder, decoder, noise, _prior()).double()


def test_segmented_frozen_bound_is_the_row_weighted_sum_of_the_segment_bounds():
    rows = _segment_rows(n_rows=30)
    model = _vae_model()

    def bound(part, denominator=None):
        return FrozenBound(
            part,
            2,
            width=5,
            generator=torch.Generator().manual_seed(0),
            n_draws=32,
            denominator=denominator,
        )

    frozen = SegmentedFrozen(rows, bound)
    expected = 0.0
    for segment in range(3):
        part = rows.subset((rows.groups == segment).nonzero().squeeze(1))
        expected += frozen_value(bound(part), segment_view(model, segment)) * len(part)
    assert frozen_value(frozen, model) == pytest.approx(expected / len(rows), rel=1e-12)
    model.zero_grad(set_to_none=True)
    frozen.backward(model)
    parameters = list(model.parameters())
    analytic = [p.grad.clone() for p in parameters]
    assert_matches_finite_differences(
        lambda: frozen_value(frozen, model), parameters, analytic
    )


def _segment_data(seed=0):
    return make_nonstationary_ica(
        3,
        80,
        2,
        4,
        n_layers=1,
        noise_variance=0.1,
        source_means=True,
        random_state=seed,
    )


def _closed_form_shortfall(mle, X, u):
    """How far the mean closed-form ``log p(x | u)`` of a fitted linear model
    rises when L-BFGS maximises it from the fitted parameters (in the data's
    units): zero at a maximum."""
    parameters = [
        torch.tensor(value, requires_grad=True)
        for value in (
            mle.decoder_[0].weight.detach().double().numpy(),
            mle.decoder_[0].bias.detach().double().numpy(),
            np.log(mle.noise_variance_),
            mle.prior_means_,
            np.log(mle.prior_variances_),
        )
    ]
    x = torch.from_numpy(X)
    rows = [torch.from_numpy(np.asarray(u) == label) for label in mle.segments_]

    def mean_log_likelihood():
        W, b, log_noise, means, log_variances = parameters
        total = 0.0
        for segment, chosen in enumerate(rows):
            covariance = W @ torch.diag(torch.exp(log_variances[segment])) @ W.T
            covariance = covariance + torch.exp(log_noise) * torch.eye(
                X.shape[1], dtype=F64
            )
            normal = torch.distributions.MultivariateNormal(
                W @ means[segment] + b, covariance
            )
            total = total + normal.log_prob(x[chosen]).sum()
        return total / len(X)

    fitted = float(mean_log_likelihood().detach())
    optimizer = torch.optim.LBFGS(
        parameters, max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-10
    )

    def closure():
        optimizer.zero_grad()
        loss = -mean_log_likelihood()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(mean_log_likelihood().detach()) - fitted


def test_lbfgs_conditional_mle_reaches_a_maximum_of_the_closed_form():
    X, u, _ = _segment_data()
    common = {
        "prior": "conditional",
        "early_stopping": False,
        "n_nodes": 256,
        "n_eval_nodes": 1024,
        "random_state": 0,
        **LINEAR,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        adam = NonlinearICAMLE(max_iter=30, max_polish_iter=0, **common).fit(X, u)
    lbfgs = NonlinearICAMLE(solver="lbfgs", max_iter=300, tol=1e-6, **common)
    lbfgs.fit(X, u)
    assert lbfgs.converged_
    assert {entry["phase"] for entry in lbfgs.history_} == {"lbfgs"}
    assert lbfgs.n_iter_ == lbfgs.n_polish_iter_ == lbfgs.history_[-1]["iterations"]
    assert 0 <= _closed_form_shortfall(lbfgs, X, u) < 1e-5
    assert _closed_form_shortfall(adam, X, u) > 1e-3
    assert lbfgs.score(X, u) > adam.score(X, u)


@pytest.mark.parametrize("estimator", [NonlinearICAMLE, NonlinearICAVAE])
def test_polish_after_the_epochs_keeps_the_best_held_out_score(estimator):
    X, u, _ = _segment_data(seed=1)
    model = estimator(
        prior="conditional",
        hidden_layer_sizes=(6,),
        max_iter=3,
        max_polish_iter=20,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, u)
    phases = [entry["phase"] for entry in model.history_]
    assert phases[:3] == ["adam"] * 3 and "lbfgs" in phases
    assert model.n_polish_iter_ > 0
    scores = [entry["validation_log_likelihood"] for entry in model.history_]
    assert model.history_[model.best_epoch_ - 1]["validation_log_likelihood"] == max(
        scores
    )
    assert np.isfinite(model.score(X, u))
