"""Oracle and property tests for the variational bounds in ``_torch/elbo.py``.

Model (report section 3.2): ``z ~ N(0, I_m)``, ``x | z ~ N(g(z), s^2 I_n)``,
encoder ``q(z | x) = N(mu, diag exp(log_var))``.  Oracles: scipy densities,
the linear-Gaussian model (whose posterior is Gaussian, so every bound is
tight), Monte Carlo estimates with standard errors, and ``log p(x)`` by a
dense Gauss-Hermite quadrature (100 nodes per axis, m <= 2) on random smooth
networks with noise variance near 1, where it is accurate to ~1e-10.  The
densities the bounds are built from are tested in ``test_gaussian.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _properties import property_settings
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from sknlica._torch import elbo, gaussian
from sknlica._torch.integration import prior_rule
from sknlica._torch.networks import make_mlp

PROPERTY = property_settings(10)

F64 = torch.float64

#: "Within a few standard errors": a two-sided 5-sigma band has a false alarm
#: rate of 6e-7 per comparison, negligible over the few hundred made here.
N_SE = 5.0
#: Gauss-Hermite with 100 nodes per axis on a tanh network at s^2 >= 0.5:
#: measured agreement with 200 nodes per axis below 1e-9 nats.
QUADRATURE_ATOL = 1e-7
#: Importance sampling with a proposal wider than the prior (bounded weights)
#: against the quadrature: measured worst mean error over 60 random models
#: 0.08, 0.018 and 4e-4 nats with 2^6, 2^10 and 2^16 scrambled-Sobol draws.
IS_LARGE_K_ATOL = 2e-3
#: The ELBO of the exact posterior averaged over 2^12 Sobol draws (its Monte
#: Carlo part is not constant in z): measured error 4.4e-4 nats, the same
#: on every row (the Sobol points' second moment is 1 - O(1/K), not 1).
EXACT_ELBO_ATOL = 2e-3


# ------------------------------------------------------------- strategies
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class RandomModel:
    """A random smooth decoder with a global or per-latent noise variance."""

    def __init__(self, seed: int, m: int, n: int, amortized: bool) -> None:
        generator = _generator(seed)
        self.m, self.n = m, n
        self.decoder = make_mlp(m, (8,), n, activation="tanh", generator=generator)
        self.head = make_mlp(m, (), 1, generator=generator) if amortized else None
        u = torch.rand(1, generator=generator, dtype=F64)
        self.noise_variance = (0.7 + 0.8 * u).squeeze()  # in [0.7, 1.5)
        self.rows = torch.randn(3, n, generator=generator, dtype=F64) * 1.5
        # A deliberately imperfect proposal: random means and variances.
        self.mean = torch.randn(3, m, generator=generator, dtype=F64) * 0.5
        self.log_var = torch.rand(3, m, generator=generator, dtype=F64) * 1.5 - 1.5

    def decode(self, z):
        g = self.decoder(z)
        if self.head is None:
            return g, self.noise_variance
        # Variance between 0.5 and ~1.5 that depends smoothly on z.
        return g, 0.5 + torch.sigmoid(self.head(z))  # (..., 1): one per row

    def quadrature_log_px(self, x, nodes_per_axis=100):
        nodes, log_weights = prior_rule("gauss_hermite", self.m, nodes_per_axis**self.m)
        with torch.no_grad():
            g, variance = self.decode(nodes)
            log_lik = gaussian.gaussian_log_density(x[:, None, :], g[None], variance)
        return torch.logsumexp(log_lik + log_weights, 1)


models = st.builds(
    RandomModel,
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 2),
    n=st.integers(1, 5),
    amortized=st.booleans(),
)


def _mean_and_se(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over axis 0."""
    return values.mean(0), values.std(0) / math.sqrt(values.shape[0])


def _iwae_replicates(model, x, n_draws, n_replicates, seed):
    """``n_replicates`` independent IWAE_K estimates per row, shape (R, B)."""
    shape = (n_replicates * n_draws, *model.mean.shape)
    eps = torch.randn(shape, generator=_generator(seed), dtype=F64)
    z = gaussian.reparameterize(model.mean, model.log_var, eps)
    log_w, _, _ = elbo.log_importance_weights(
        x, z, model.mean, model.log_var, model.decode
    )
    log_w = log_w.reshape(n_replicates, n_draws, -1).transpose(0, 1)
    return elbo.iwae_bound(log_w)


# ------------------------------------------------------------------ bounds
@given(models, st.integers(0, 2**31 - 1))
@PROPERTY
def test_bounds_are_ordered_in_expectation_up_to_log_px(model, seed):
    # ELBO <= IWAE_K <= IWAE_K' (K < K') <= log p(x), each expectation
    # estimated from 2,000 replicates and compared within N_SE standard errors.
    x = model.rows
    log_px = model.quadrature_log_px(x)
    with torch.no_grad():
        iwae = {
            k: _mean_and_se(_iwae_replicates(model, x, k, 2000, seed + k))
            for k in (1, 4, 16)
        }
        eps = torch.randn(
            (4000, *model.mean.shape), generator=_generator(seed), dtype=F64
        )
        z = gaussian.reparameterize(model.mean, model.log_var, eps)
        log_lik = gaussian.gaussian_log_density(x, *model.decode(z))
    kl = gaussian.kl_to_standard_normal(model.mean, model.log_var)
    elbo_mean, elbo_se = _mean_and_se(log_lik - kl)
    # With the analytic KL the ELBO is exactly E[IWAE_1].
    assert torch.all(
        (elbo_mean - iwae[1][0]).abs() <= N_SE * _hypot(elbo_se, iwae[1][1])
    )
    chain = [(elbo_mean, elbo_se), iwae[1], iwae[4], iwae[16]]
    for (low, low_se), (high, high_se) in zip(chain[:-1], chain[1:]):
        assert torch.all(low <= high + N_SE * _hypot(low_se, high_se))
    assert torch.all(iwae[16][0] <= log_px + N_SE * iwae[16][1])


def _hypot(a, b):
    return torch.sqrt(a**2 + b**2)


def test_iwae_with_one_draw_is_the_log_weight():
    log_w = torch.randn(1, 7, dtype=F64)
    torch.testing.assert_close(elbo.iwae_bound(log_w), log_w[0])
    many = torch.full((5, 3), -2.0, dtype=F64)
    torch.testing.assert_close(elbo.iwae_bound(many), torch.full((3,), -2.0, dtype=F64))


def test_exact_posterior_makes_every_bound_tight():
    # Linear decoder with orthogonal columns: the posterior is Gaussian with a
    # diagonal covariance, so q = p(z | x) is in the family and every log
    # weight equals log p(x) (closed form N(b, A A^T + s^2 I)).
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(4, 2)))
    A = q * np.array([2.0, 0.7])
    b, s2 = rng.normal(size=4), 0.6
    x = rng.normal(size=(5, 4)) * 2 + b
    post_var = 1.0 / (1.0 + (A**2).sum(0) / s2)
    post_mean = (x - b) @ A * post_var / s2
    expected = stats.multivariate_normal(b, A @ A.T + s2 * np.eye(4)).logpdf(x)
    At, bt, xt = (torch.tensor(v) for v in (A, b, x))
    mean, log_var = torch.tensor(post_mean), torch.tensor(np.log(post_var)).expand(5, 2)

    def decode(z):
        return z @ At.T + bt, torch.tensor(s2, dtype=F64)

    eps = torch.randn(64, 2, generator=_generator(0), dtype=F64)
    log_px, _ = elbo.importance_sampled_log_likelihood(xt, mean, log_var, decode, eps)
    # Every log weight is log p(x): the estimate is exact for any draws.
    np.testing.assert_allclose(log_px.numpy(), expected, rtol=1e-12)
    sobol, _ = prior_rule("qmc", 2, 2**12, generator=_generator(0))
    _, bound = elbo.importance_sampled_log_likelihood(xt, mean, log_var, decode, sobol)
    np.testing.assert_allclose(bound.numpy(), expected, atol=EXACT_ELBO_ATOL)
    z = gaussian.reparameterize(mean, log_var, eps[:, None])
    log_w, _, _ = elbo.log_importance_weights(xt, z, mean, log_var, decode)
    np.testing.assert_allclose(
        log_w.numpy(), np.broadcast_to(expected, (64, 5)), rtol=1e-12
    )


# -------------------------------------------------- importance sampling
@given(models)
@PROPERTY
def test_importance_sampling_converges_to_quadrature(model):
    x = model.rows
    log_px = model.quadrature_log_px(x)
    # Wider than the prior: the weights p(x | z) p(z) / q(z) are bounded.
    log_var = torch.full_like(model.log_var, 0.3)
    errors = []
    for log2_k in (6, 10, 16):
        eps, _ = prior_rule("qmc", model.m, 2**log2_k, generator=_generator(0))
        estimate, _ = elbo.importance_sampled_log_likelihood(
            x, model.mean, log_var, model.decode, eps
        )
        errors.append(float((estimate - log_px).abs().mean()))
    assert errors[-1] < IS_LARGE_K_ATOL
    assert errors[-1] <= errors[0] + 1e-9


def test_quadrature_oracle_is_converged():
    model = RandomModel(3, 2, 4, amortized=True)
    torch.testing.assert_close(
        model.quadrature_log_px(model.rows, 100),
        model.quadrature_log_px(model.rows, 200),
        atol=QUADRATURE_ATOL,
        rtol=0,
    )


def test_importance_sampling_is_subset_and_chunk_invariant():
    model = RandomModel(5, 2, 5, amortized=False)
    eps = torch.randn(300, 2, generator=_generator(1), dtype=F64)
    x = torch.cat([model.rows] * 4) + torch.randn(12, 5, generator=_generator(2))
    mean = torch.cat([model.mean] * 4)
    log_var = torch.cat([model.log_var] * 4)
    full = elbo.importance_sampled_log_likelihood(x, mean, log_var, model.decode, eps)
    # Tiny chunks: one row and a few draws at a time.
    tiny = elbo.importance_sampled_log_likelihood(
        x, mean, log_var, model.decode, eps, max_elements=40
    )
    subset = elbo.importance_sampled_log_likelihood(
        x[5:7], mean[5:7], log_var[5:7], model.decode, eps
    )
    for a, b in zip(full, tiny):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(full, subset):
        torch.testing.assert_close(a[5:7], b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------- gradient estimators
def _replicated_leaves(model, n_replicates):
    # Each replicate gets its own leaf, so one backward pass returns
    # n_replicates independent gradient estimates (rows do not interact).
    mean = model.mean[:1].expand(n_replicates, -1).clone().requires_grad_(True)
    log_var = model.log_var[:1].expand(n_replicates, -1).clone().requires_grad_(True)
    x = model.rows[:1].expand(n_replicates, -1)
    return x, mean, log_var


def _gradients(objective, mean, log_var):
    objective.sum().backward()
    return torch.cat([mean.grad, log_var.grad], 1)


def _elbo_gradients(model, n_draws, estimator, seed, n_replicates=20000):
    x, mean, log_var = _replicated_leaves(model, n_replicates)
    eps = torch.randn((n_draws, *mean.shape), generator=_generator(seed), dtype=F64)
    z = gaussian.reparameterize(mean, log_var, eps)
    kl = gaussian.kl_to_standard_normal(mean, log_var)
    if estimator == "reparameterization":
        log_lik = gaussian.gaussian_log_density(x, *model.decode(z))
        return _gradients(elbo.sgvb_elbo(log_lik, kl), mean, log_var)
    z = z.detach()
    log_lik = gaussian.gaussian_log_density(x, *model.decode(z))
    log_q = gaussian.diagonal_normal_log_density(z, mean, log_var)
    if n_draws >= 2:
        baseline = elbo.leave_one_out_baseline(log_lik)
    else:
        baseline = gaussian.gaussian_log_density(x, *model.decode(mean)).detach()
    objective = elbo.score_function_elbo(log_lik, log_q, kl, baseline)
    return _gradients(objective, mean, log_var)


def _iwae_gradients(model, n_draws, estimator, seed, n_replicates=20000):
    x, mean, log_var = _replicated_leaves(model, n_replicates)
    eps = torch.randn((n_draws, *mean.shape), generator=_generator(seed), dtype=F64)
    z = gaussian.reparameterize(mean, log_var, eps)
    if estimator == "score_function":
        z = z.detach()
    log_w, _, log_q = elbo.log_importance_weights(x, z, mean, log_var, model.decode)
    if estimator == "score_function":
        objective = elbo.vimco_iwae(log_w, log_q)
    else:
        objective = elbo.iwae_bound(log_w)
    return _gradients(objective, mean, log_var)


def _assert_same_expectation(a, b):
    (mean_a, se_a), (mean_b, se_b) = _mean_and_se(a), _mean_and_se(b)
    assert torch.all((mean_a - mean_b).abs() <= N_SE * _hypot(se_a, se_b) + 1e-9)


@pytest.mark.parametrize("n_draws", [1, 3])
@given(models, st.integers(0, 2**30))
@settings(max_examples=4)
def test_score_function_and_reparameterized_elbo_gradients_agree(n_draws, model, seed):
    reparameterized = _elbo_gradients(model, n_draws, "reparameterization", seed)
    score = _elbo_gradients(model, n_draws, "score_function", seed + 1)
    _assert_same_expectation(reparameterized, score)
    # The baseline is what makes the estimator usable: still noisier.
    assert score.var(0).sum() > reparameterized.var(0).sum()


@given(models, st.integers(0, 2**30))
@settings(max_examples=4)
def test_vimco_and_reparameterized_iwae_gradients_agree(model, seed):
    _assert_same_expectation(
        _iwae_gradients(model, 4, "reparameterization", seed),
        _iwae_gradients(model, 4, "score_function", seed + 1),
    )


def test_score_function_surrogate_values_are_the_bounds():
    model = RandomModel(7, 2, 3, amortized=False)
    x, mean, log_var = model.rows, model.mean, model.log_var
    eps = torch.randn(5, 3, 2, generator=_generator(0), dtype=F64)
    z = gaussian.reparameterize(mean, log_var, eps)
    log_w, log_lik, log_q = elbo.log_importance_weights(
        x, z, mean, log_var, model.decode
    )
    kl = gaussian.kl_to_standard_normal(mean, log_var)
    baseline = elbo.leave_one_out_baseline(log_lik)
    torch.testing.assert_close(
        elbo.score_function_elbo(log_lik, log_q, kl, baseline),
        elbo.sgvb_elbo(log_lik, kl),
    )
    torch.testing.assert_close(elbo.vimco_iwae(log_w, log_q), elbo.iwae_bound(log_w))


def test_leave_one_out_needs_two_draws():
    with pytest.raises(ValueError, match="at least 2 draws, got 1"):
        elbo.leave_one_out_baseline(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least 2 importance draws, got 1"):
        elbo.vimco_iwae(torch.zeros(1, 3), torch.zeros(1, 3))
    values = torch.tensor([[1.0], [2.0], [6.0]])
    torch.testing.assert_close(
        elbo.leave_one_out_baseline(values), torch.tensor([[4.0], [3.5], [1.5]])
    )
