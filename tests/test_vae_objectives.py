"""``sknlica._torch.vae_objectives``: the VAE's training loss, schedule and scores.

Oracles: the KL warm-up written out by hand, the bounds recomputed from the
densities of ``gaussian.py`` with the same draws (the objective's generator
replayed), ``torch.nn.utils.clip_grad_norm_``-style norms, and
``torch.distributions`` for the MCMC target.
"""

from __future__ import annotations

import math

import pytest
import torch

from sknlica._torch import gaussian
from sknlica._torch.elbo import importance_sampled_log_likelihood
from sknlica._torch.integration import evaluation_generator, prior_rule
from sknlica._torch.models import AmortizedVariance, VAEModel
from sknlica._torch.networks import GaussianHead, NoiseVariance, make_mlp
from sknlica._torch.training import TRAIN_SCORE, VALIDATION_SCORE, TrainingRows
from sknlica._torch.vae_objectives import (
    GRADIENT_CLIP_NORM,
    MONITOR_ROWS,
    VAEObjective,
    encoder_estimate,
    evaluation_draws,
    mean_head_variance,
    posterior_log_joint,
)

F64 = torch.float64
M, N = 2, 5


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(amortized=False, seed=0):
    generator = _generator(seed)
    encoder = GaussianHead(N, (6,), M, generator=generator)
    decoder = make_mlp(M, (6,), N, activation="tanh", generator=generator)
    if amortized:
        noise = AmortizedVariance(
            6, 0.8, floor=1e-6, scale=1.0, dtype=F64, device="cpu", generator=generator
        )
    else:
        noise = NoiseVariance(0.8, learn=True, floor=1e-6)
    return VAEModel(encoder, decoder, noise)


def _objective(bound="elbo", estimator="reparameterization", n_draws=1, **params):
    settings = {
        "bound": bound,
        "gradient_estimator": estimator,
        "n_draws": n_draws,
        "beta": 1.0,
        "kl_warmup_epochs": 0,
        "n_components": M,
        "monitor_samples": 16,
        "width": 6,
        "generator": _generator(7),
    }
    return VAEObjective(**{**settings, **params})


def _rows(n_rows, seed=1):
    return torch.randn(n_rows, N, generator=_generator(seed), dtype=F64)


# ---------------------------------------------------------------- KL warm-up
@pytest.mark.parametrize(
    ("warmup", "expected"),
    [
        (0, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        (1, [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        (4, [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]),
    ],
)
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_kl_weight_warms_up_linearly_to_beta(warmup, expected, beta):
    objective = _objective(kl_warmup_epochs=warmup, beta=beta)
    assert objective.kl_weight == beta  # before any epoch
    weights = []
    for epoch in range(6):
        objective.begin_epoch(epoch)
        weights.append(objective.kl_weight)
    assert weights == pytest.approx([beta * w for w in expected], rel=1e-15)


def test_kl_weight_depends_only_on_the_epoch_passed():
    # A warm start or partial_fit passes the model's total epoch count.
    objective = _objective(kl_warmup_epochs=4)
    objective.begin_epoch(2)
    assert objective.kl_weight == pytest.approx(0.6)
    objective.begin_epoch(0)
    assert objective.kl_weight == pytest.approx(0.2)
    objective.begin_epoch(100)
    assert objective.kl_weight == 1.0


# --------------------------------------------------------------------- loss
def _replayed_draws(n_draws, mean):
    """The draws the objective takes: its generator (seed 7) replayed."""
    return gaussian.standard_normal_draws(
        (n_draws, *mean.shape), generator=_generator(7), dtype=mean.dtype
    )


@pytest.mark.parametrize("n_draws", [1, 3])
@pytest.mark.parametrize("estimator", ["reparameterization", "score_function"])
@pytest.mark.parametrize("amortized", [False, True])
def test_elbo_loss_is_minus_the_sgvb_bound(n_draws, estimator, amortized):
    model, x = _model(amortized), _rows(4)
    objective = _objective("elbo", estimator, n_draws, kl_warmup_epochs=4)
    objective.begin_epoch(1)  # KL weight 0.4
    loss = objective.loss(model, x, None)
    with torch.no_grad():
        mean, log_var = model.encode(x)
        z = gaussian.reparameterize(mean, log_var, _replayed_draws(n_draws, mean))
        g, variance = model.decode(z)
        log_lik = gaussian.gaussian_log_density(x, g, variance)
        kl = gaussian.kl_to_standard_normal(mean, log_var)
        expected = -(log_lik.mean(0) - 0.4 * kl).mean()
    # The score-function surrogate has the bound as its value too.
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)
    assert loss.shape == () and loss.requires_grad


@pytest.mark.parametrize("estimator", ["reparameterization", "score_function"])
def test_iwae_loss_is_minus_the_importance_weighted_bound(estimator):
    model, x = _model(), _rows(4)
    objective = _objective("iwae", estimator, 5, kl_warmup_epochs=1)
    objective.begin_epoch(0)  # KL weight 0.5 on log p(z) - log q(z | x)
    loss = objective.loss(model, x, None)
    with torch.no_grad():
        mean, log_var = model.encode(x)
        z = gaussian.reparameterize(mean, log_var, _replayed_draws(5, mean))
        log_lik = gaussian.gaussian_log_density(x, *model.decode(z))
        log_ratio = gaussian.standard_normal_log_density(
            z
        ) - gaussian.diagonal_normal_log_density(z, mean, log_var)
        log_w = log_lik + 0.5 * log_ratio
        expected = -(torch.logsumexp(log_w, 0) - math.log(5)).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)


def test_losses_train_the_encoder_and_decoder():
    for bound, estimator, n_draws in [
        ("elbo", "reparameterization", 1),
        ("elbo", "score_function", 1),
        ("elbo", "score_function", 3),
        ("iwae", "reparameterization", 4),
        ("iwae", "score_function", 4),
    ]:
        model = _model()
        _objective(bound, estimator, n_draws).loss(model, _rows(4), None).backward()
        for part in (model.encoder, model.decoder, model.noise):
            grads = [p.grad for p in part.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads), (bound, estimator)


# ----------------------------------------------------------------- clipping
def test_before_step_clips_the_gradient_norm():
    parameters = [torch.nn.Parameter(torch.zeros(s, dtype=F64)) for s in (30, (4, 5))]
    optimizer = torch.optim.SGD(parameters, lr=1.0)
    for p in parameters:
        p.grad = torch.full_like(p, 1e5)
    _objective().before_step(optimizer)
    total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in parameters]))
    assert float(total) == pytest.approx(GRADIENT_CLIP_NORM, rel=1e-6)
    # Gradients below the cap are left exactly as they are.
    for p in parameters:
        p.grad = torch.full_like(p, 1.0)
    _objective().before_step(optimizer)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in parameters)


# ------------------------------------------------------------- epoch scores
def test_epoch_scores_without_validation_have_only_training_keys():
    model, objective = _model(), _objective()
    scores = objective.epoch_scores(model, TrainingRows(_rows(30)), None, -1.0)
    assert set(scores) == {TRAIN_SCORE, "train_elbo"}
    assert all(math.isfinite(v) for v in scores.values())


def test_epoch_scores_with_validation_add_the_validation_keys():
    model, objective = _model(), _objective()
    rows, validation = TrainingRows(_rows(30)), _rows(8, seed=2)
    scores = objective.epoch_scores(model, rows, validation, -1.0)
    assert set(scores) == {
        TRAIN_SCORE,
        "train_elbo",
        VALIDATION_SCORE,
        "validation_elbo",
    }
    eps = evaluation_draws(M, 16, dtype=F64, device="cpu")
    log_px, elbo = encoder_estimate(model, validation, eps, width=6)
    assert scores[VALIDATION_SCORE] == pytest.approx(float(log_px.mean()), rel=1e-12)
    assert scores["validation_elbo"] == pytest.approx(float(elbo.mean()), rel=1e-12)


def test_epoch_scores_monitor_at_most_monitor_rows_evenly_spaced_rows():
    n_rows = 2 * MONITOR_ROWS + 7
    data = _rows(n_rows + 3)
    index = torch.arange(n_rows + 3).flip(0)[:n_rows]  # training rows, reordered
    rows = TrainingRows(data, index)
    model, objective = _model(), _objective()
    scores = objective.epoch_scores(model, rows, None, -1.0)
    # Stride n_rows // MONITOR_ROWS = 2: positions 0, 2, 4, ..., the first 500.
    positions = torch.arange(0, n_rows, 2)[:MONITOR_ROWS]
    eps = evaluation_draws(M, 16, dtype=F64, device="cpu")
    log_px, elbo = encoder_estimate(model, rows.take(positions), eps, width=6)
    assert scores[TRAIN_SCORE] == pytest.approx(float(log_px.mean()), rel=1e-12)
    assert scores["train_elbo"] == pytest.approx(float(elbo.mean()), rel=1e-12)


def test_epoch_scores_update_the_variance_heads_summary():
    model, objective = _model(amortized=True), _objective()
    x = _rows(30)
    assert float(model.noise()) == pytest.approx(0.8)  # the initial summary
    objective.epoch_scores(model, TrainingRows(x), None, -1.0)
    expected = float(mean_head_variance(model, x))
    assert float(model.noise()) == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx(0.8, rel=1e-6)


# ------------------------------------------------------- evaluation helpers
def test_evaluation_draws_are_the_fixed_sobol_normals():
    draws = evaluation_draws(3, 64, dtype=torch.float32, device="cpu")
    expected, _ = prior_rule("qmc", 3, 64, generator=evaluation_generator())
    assert draws.shape == (64, 3) and draws.dtype == torch.float32
    torch.testing.assert_close(draws, expected.float(), rtol=0, atol=0)
    assert torch.equal(
        draws, evaluation_draws(3, 64, dtype=torch.float32, device="cpu")
    )


def test_encoder_estimate_is_the_importance_sampled_likelihood_of_the_encoder():
    model, x = _model(), _rows(9)
    eps = evaluation_draws(M, 32, dtype=F64, device="cpu")
    log_px, elbo = encoder_estimate(model, x, eps, width=6)
    with torch.no_grad():
        mean, log_var = model.encode(x)
        expected = importance_sampled_log_likelihood(
            x, mean, log_var, model.decode, eps, width=6
        )
    torch.testing.assert_close(log_px, expected[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(elbo, expected[1], rtol=1e-12, atol=0)
    # Rows are independent: a subset gives the same rows.
    sub_px, sub_elbo = encoder_estimate(model, x[3:5], eps, width=6)
    torch.testing.assert_close(sub_px, log_px[3:5], rtol=1e-12, atol=0)
    torch.testing.assert_close(sub_elbo, elbo[3:5], rtol=1e-12, atol=0)
    assert not log_px.requires_grad


def test_mean_head_variance_is_the_heads_average_at_the_encoder_means():
    model, x = _model(amortized=True), _rows(12)
    with torch.no_grad():
        mean, _ = model.encode(x)
        h = model.decoder[:-2](mean)
        expected = model.noise(h).mean()
    torch.testing.assert_close(mean_head_variance(model, x), expected, rtol=0, atol=0)


# -------------------------------------------------------------- MCMC target
@pytest.mark.parametrize("amortized", [False, True])
def test_mcmc_target_of_the_amortized_head_is_the_joint(amortized):
    model = _model(amortized)
    x = _rows(3, seed=4)
    z = torch.randn(3, 50, M, generator=_generator(0), dtype=x.dtype)
    with torch.no_grad():
        got = posterior_log_joint(model, x)(z)
        # Independent oracle: torch.distributions with the head's s^2(z).
        h = model.decoder[:-2](z)
        g = model.decoder[-2:](h)
        variance = model.noise(h)[..., 0] if amortized else model.noise().expand(3, 50)
        normal = torch.distributions.Normal(g, variance.sqrt()[..., None])
        prior = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
        expected = normal.log_prob(x[:, None, :]).sum(-1) + prior.log_prob(z).sum(-1)
    assert got.shape == (3, 50)
    torch.testing.assert_close(got, expected)
