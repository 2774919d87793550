"""Oracle and property tests for every Gaussian density in ``_torch/gaussian.py``.

Oracles: scipy's and ``torch.distributions``' densities, Monte Carlo
estimates with standard errors (the KL), direct ``B x K x n`` broadcasts (the
pairwise forms, which expand the squared distance instead), and the
definition of the effective sample size.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _properties import property_settings
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from sknlica._torch import gaussian
from sknlica._torch.networks import make_mlp

PROPERTY = property_settings(10)
PAIRWISE_PROPERTY = settings(PROPERTY, max_examples=30)

F64 = torch.float64

#: "Within a few standard errors": a two-sided 5-sigma band has a false alarm
#: rate of 6e-7 per comparison.
N_SE = 5.0
#: Closed forms against scipy / torch.distributions in float64: both evaluate
#: the same terms in a different order, so they agree to a few ulps of the
#: largest term (|log density| < 100 here).
DENSITY_RTOL = 1e-12
DENSITY_ATOL = 1e-11
# Expanded vs broadcast squared distances in float64: the expansion loses
# eps * (||x_c||^2 + ||g_c||^2) / sigma^2 <= 2.2e-16 * 1e3 / 1e-2 ~ 2e-11.
DIRECT_F64_ATOL = 1e-10
DIRECT_F64_RTOL = 1e-12
# float32 with |features| ~ 1000, n = 1000: values ~ -2000 (float32 ulp 1.2e-4);
# measured worst error 2.5e-4 thanks to centring (uncentred: ~400).
LARGE_MEAN_F32_ATOL = 1e-2


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(generator, *shape, dtype=F64):
    return torch.randn(*shape, generator=generator, dtype=dtype)


def direct_log_likelihood(x, g, noise_variance):
    """``log phi(x_i; g_j, sigma^2 I)`` by broadcasting ``B x K x n``."""
    n = x.shape[1]
    sq = ((x[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    return -0.5 * (n * torch.log(2 * math.pi * noise_variance) + sq / noise_variance)


def _mean_and_se(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over axis 0."""
    return values.mean(0), values.std(0) / math.sqrt(values.shape[0])


finite = {"allow_nan": False, "allow_infinity": False}
gaussians = st.integers(1, 4).flatmap(
    lambda m: st.tuples(
        hnp.arrays(np.float64, m, elements=st.floats(-3, 3, **finite)),
        hnp.arrays(np.float64, m, elements=st.floats(-3, 1.5, **finite)),
    )
)


# ------------------------------------------------------------ single points
def test_densities_match_scipy():
    rng = np.random.default_rng(0)
    x, mean = rng.normal(size=(2, 5, 4))
    log_var = rng.normal(size=(5, 4))
    variance = np.exp(rng.normal(size=5))
    # One variance per row: a trailing axis of length 1.
    got = gaussian.gaussian_log_density(
        torch.tensor(x), torch.tensor(mean), torch.tensor(variance)[:, None]
    )
    expected = [
        stats.multivariate_normal(mean[i], variance[i] * np.eye(4)).logpdf(x[i])
        for i in range(5)
    ]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # One variance per feature: shape (n,).
    per_feature = np.exp(rng.normal(size=4))
    got = gaussian.gaussian_log_density(
        torch.tensor(x), torch.tensor(mean), torch.tensor(per_feature)
    )
    expected = stats.multivariate_normal(np.zeros(4), np.diag(per_feature)).logpdf(
        x - mean
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    got = gaussian.diagonal_normal_log_density(
        torch.tensor(x), torch.tensor(mean), torch.tensor(log_var)
    )
    expected = stats.norm(mean, np.exp(0.5 * log_var)).logpdf(x).sum(1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    got = gaussian.standard_normal_log_density(torch.tensor(x))
    np.testing.assert_allclose(got.numpy(), stats.norm().logpdf(x).sum(1))


def test_isotropic_density_takes_a_scalar_variance_and_any_batch_shape():
    gen = _generator(1)
    x, mean = randn(gen, 3, 7, 4), randn(gen, 3, 7, 4)
    variance = torch.tensor(0.4, dtype=F64)
    got = gaussian.gaussian_log_density(x, mean, variance)
    assert got.shape == (3, 7)
    expected = torch.distributions.Normal(mean, variance.sqrt()).log_prob(x).sum(-1)
    torch.testing.assert_close(got, expected, rtol=DENSITY_RTOL, atol=DENSITY_ATOL)
    squared = (x - mean).square().sum(-1)
    torch.testing.assert_close(
        gaussian.isotropic_log_density_from_squared(squared, variance, 4),
        got,
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("m", [1, 2, 4])
def test_cholesky_normal_matches_torch_distributions(m):
    gen = _generator(m)
    rows, draws = 3, 6
    mean = randn(gen, rows, m)
    # A random lower-triangular factor with a positive diagonal.
    factor = torch.tril(randn(gen, rows, m, m), diagonal=-1)
    diagonal = 0.3 + torch.rand(rows, m, generator=gen, dtype=F64)
    factor = factor + torch.diag_embed(diagonal)
    z = mean[:, None, :] + randn(gen, rows, draws, m)
    got = gaussian.cholesky_normal_log_density(z, mean, factor)
    assert got.shape == (rows, draws)
    normal = torch.distributions.MultivariateNormal(
        mean[:, None, :], scale_tril=factor[:, None]
    )
    torch.testing.assert_close(
        got, normal.log_prob(z), rtol=DENSITY_RTOL, atol=DENSITY_ATOL
    )
    # ... and scipy with the covariance L L^T, row by row.
    covariance = (factor @ factor.transpose(1, 2)).numpy()
    for row in range(rows):
        expected = stats.multivariate_normal(mean[row].numpy(), covariance[row])
        np.testing.assert_allclose(
            got[row].numpy(), expected.logpdf(z[row].numpy()), rtol=DENSITY_RTOL
        )


def test_cholesky_normal_with_the_identity_factor_is_the_diagonal_normal():
    gen = _generator(5)
    mean = randn(gen, 4, 3)
    z = randn(gen, 4, 9, 3)
    identity = torch.eye(3, dtype=F64).expand(4, 3, 3)
    torch.testing.assert_close(
        gaussian.cholesky_normal_log_density(z, mean, identity),
        gaussian.diagonal_normal_log_density(
            z, mean[:, None, :], torch.zeros(4, 1, 3, dtype=F64)
        ),
        rtol=DENSITY_RTOL,
        atol=DENSITY_ATOL,
    )


@pytest.mark.parametrize("m", [1, 2, 3])
def test_latent_log_joint_matches_torch_distributions(m):
    gen = _generator(10 + m)
    rows, nodes, n = 4, 5, 6
    decoder = make_mlp(m, (7,), n, activation="tanh", generator=gen)
    x = randn(gen, rows, n)
    z = randn(gen, rows, nodes, m)
    s2 = torch.tensor(0.35, dtype=F64)
    calls = []

    def counting_decoder(points):
        calls.append(points.shape)
        return decoder(points)

    with torch.no_grad():
        got = gaussian.latent_log_joint(x, z, counting_decoder, s2)
        likelihood = torch.distributions.Normal(decoder(z), s2.sqrt())
        prior = torch.distributions.Normal(torch.zeros((), dtype=F64), 1.0)
        expected = likelihood.log_prob(x[:, None, :]).sum(-1)
        expected = expected + prior.log_prob(z).sum(-1)
    assert got.shape == (rows, nodes)
    torch.testing.assert_close(got, expected, rtol=DENSITY_RTOL, atol=DENSITY_ATOL)
    # One decoder call on all B * K points.
    assert calls == [(rows * nodes, m)]


@given(gaussians, st.integers(0, 2**31 - 1))
@PROPERTY
def test_analytic_kl_matches_monte_carlo(params, seed):
    mean, log_var = (torch.tensor(p) for p in params)
    kl = gaussian.kl_to_standard_normal(mean, log_var)
    eps = torch.randn(20000, mean.shape[0], generator=_generator(seed), dtype=F64)
    z = gaussian.reparameterize(mean, log_var, eps)
    samples = gaussian.diagonal_normal_log_density(
        z, mean, log_var
    ) - gaussian.standard_normal_log_density(z)
    estimate, se = _mean_and_se(samples)
    assert abs(float(kl - estimate)) <= N_SE * float(se) + 1e-12


@given(gaussians)
@PROPERTY
def test_kl_is_zero_only_at_the_prior(params):
    mean, log_var = (torch.tensor(p) for p in params)
    assert float(gaussian.kl_to_standard_normal(torch.zeros(3), torch.zeros(3))) == 0.0
    kl = float(gaussian.kl_to_standard_normal(mean, log_var))
    # 0.5 * (mu^2 + e^v - 1 - v) >= 0 with equality iff mu = v = 0; below
    # |mu|, |v| ~ 1e-8 the positive value underflows against the 1.
    if torch.all(mean.abs() < 1e-6) and torch.all(log_var.abs() < 1e-6):
        assert kl == pytest.approx(0.0, abs=1e-11)
    else:
        assert kl > 0.0


def test_kl_matches_torch_distributions():
    gen = _generator(3)
    mean, log_var = randn(gen, 6, 3), randn(gen, 6, 3)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * log_var))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(
        gaussian.kl_to_standard_normal(mean, log_var),
        torch.distributions.kl_divergence(q, p).sum(-1),
        rtol=DENSITY_RTOL,
        atol=DENSITY_ATOL,
    )


def test_reparameterize_is_mean_plus_standard_deviation_times_eps():
    rng = np.random.default_rng(4)
    mean, log_var = rng.normal(size=(2, 5, 3))
    eps = rng.normal(size=(7, 5, 3))  # draws on a leading axis
    z = gaussian.reparameterize(
        torch.tensor(mean), torch.tensor(log_var), torch.tensor(eps)
    )
    assert z.shape == (7, 5, 3)
    np.testing.assert_allclose(
        z.numpy(), mean + np.exp(0.5 * log_var) * eps, rtol=1e-15
    )
    # Gradients flow to the mean and log-variance (the reparameterisation).
    mean_t = torch.tensor(mean, requires_grad=True)
    log_var_t = torch.tensor(log_var, requires_grad=True)
    gaussian.reparameterize(mean_t, log_var_t, torch.tensor(eps)).sum().backward()
    np.testing.assert_allclose(mean_t.grad.numpy(), np.full((5, 3), 7.0))
    np.testing.assert_allclose(
        log_var_t.grad.numpy(), (0.5 * np.exp(0.5 * log_var) * eps).sum(0)
    )


def test_reparameterized_draws_have_the_encoder_moments():
    mean = torch.tensor([1.0, -2.0], dtype=F64)
    log_var = torch.tensor([0.5, -1.0], dtype=F64)
    eps = randn(_generator(6), 20000, 2)
    z = gaussian.reparameterize(mean, log_var, eps)
    estimate, se = _mean_and_se(z)
    assert torch.all((estimate - mean).abs() <= N_SE * se)
    # Variance of 20,000 normal draws: relative standard error sqrt(2/20000).
    np.testing.assert_allclose(
        z.var(0).numpy(), np.exp(log_var.numpy()), rtol=N_SE * math.sqrt(2 / 20000)
    )


def test_standard_normal_draws_come_from_the_generator_only():
    torch_state = torch.get_rng_state()
    a = gaussian.standard_normal_draws((4, 3), generator=_generator(0), dtype=F64)
    b = gaussian.standard_normal_draws((4, 3), generator=_generator(0), dtype=F64)
    c = gaussian.standard_normal_draws((4, 3), generator=_generator(1), dtype=F64)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert a.shape == (4, 3) and a.dtype == F64 and a.device.type == "cpu"
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a, torch.randn(4, 3, generator=_generator(0), dtype=F64))
    f32 = gaussian.standard_normal_draws(
        (4, 3), generator=_generator(0), dtype=torch.float32
    )
    assert f32.dtype == torch.float32


def test_effective_sample_size_of_uniform_and_one_hot_weights():
    for k in (1, 5, 64):
        uniform = torch.full((3, k), -math.log(k), dtype=F64)
        torch.testing.assert_close(
            gaussian.effective_sample_size(uniform),
            torch.full((3,), float(k), dtype=F64),
        )
    one_hot = torch.full((2, 10), -math.inf, dtype=F64)
    one_hot[0, 3] = one_hot[1, 9] = 0.0
    torch.testing.assert_close(
        gaussian.effective_sample_size(one_hot), torch.ones(2, dtype=F64)
    )


def test_effective_sample_size_matches_its_definition():
    gen = _generator(7)
    log_posterior = torch.log_softmax(3 * randn(gen, 4, 50), -1)
    weights = log_posterior.exp().numpy()
    expected = 1.0 / (weights**2).sum(-1)
    ess = gaussian.effective_sample_size(log_posterior)
    np.testing.assert_allclose(ess.numpy(), expected, rtol=1e-12)
    assert torch.all((ess >= 1 - 1e-12) & (ess <= 50 + 1e-9))


# --------------------------------------------------------- rows x nodes
@PAIRWISE_PROPERTY
@given(
    batch=st.integers(1, 20),
    n_nodes=st.integers(1, 20),
    n_features=st.integers(1, 30),
    log10_variance=st.floats(-2, 1),
    offset=st.sampled_from([0.0, 5.0, -100.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pairwise_log_density_matches_direct(
    batch, n_nodes, n_features, log10_variance, offset, seed
):
    gen = torch.Generator().manual_seed(seed)
    x = offset + randn(gen, batch, n_features)
    g = offset + randn(gen, n_nodes, n_features)
    s2 = torch.tensor(10.0**log10_variance, dtype=F64)
    # The centre comes from fitted state (a training mean) near the data.
    centre = torch.full((n_features,), offset, dtype=F64)
    got = gaussian.pairwise_log_density(x, g, s2, centre)
    assert got.shape == (batch, n_nodes)
    torch.testing.assert_close(
        got,
        direct_log_likelihood(x, g, s2),
        rtol=DIRECT_F64_RTOL,
        atol=DIRECT_F64_ATOL,
    )


def test_pairwise_log_density_matches_multivariate_normal():
    gen = torch.Generator().manual_seed(0)
    x, g = randn(gen, 6, 4), randn(gen, 5, 4)
    s2 = torch.tensor(0.3, dtype=F64)
    mvn = torch.distributions.MultivariateNormal(
        g, covariance_matrix=s2 * torch.eye(4, dtype=F64)
    )
    expected = mvn.log_prob(x[:, None, :])  # broadcast (6, 1, 4) over (5,) -> (6, 5)
    torch.testing.assert_close(
        gaussian.pairwise_log_density(x, g, s2), expected, rtol=0, atol=1e-12
    )
    sq = gaussian.squared_distances(x, g)
    assert (sq >= 0).all()
    torch.testing.assert_close(sq, torch.cdist(x, g) ** 2, rtol=1e-12, atol=1e-12)


def test_squared_distances_are_never_negative_and_zero_on_the_diagonal():
    # Identical points far from the origin: the expansion cancels to round-off,
    # which the clamp keeps at >= 0 (a negative distance would raise the density).
    gen = _generator(8)
    x = 1e4 + randn(gen, 30, 50)
    sq = gaussian.squared_distances(x, x)
    assert (sq >= 0).all()
    assert sq.diagonal().abs().max() < 1e-6 * sq.max()


def test_pairwise_log_density_float32_large_mean():
    gen = torch.Generator().manual_seed(1)
    batch, n_nodes, n_features = 64, 128, 1000
    x32 = (1000 + randn(gen, batch, n_features)).float()
    g32 = (1000 + randn(gen, n_nodes, n_features)).float()
    s2 = torch.tensor(1.0)
    # Reference: float64 direct evaluation of the same float32-rounded inputs.
    ref = direct_log_likelihood(x32.double(), g32.double(), s2.double())
    centre = torch.full((n_features,), 1000.0)  # the training mean, fitted state
    got = gaussian.pairwise_log_density(x32, g32, s2, centre)
    assert got.dtype == torch.float32
    assert (got.double() - ref).abs().max().item() < LARGE_MEAN_F32_ATOL
    # The regime is discriminating: the uncentred expansion is off by ~400.
    naive_sq = (x32 * x32).sum(1, keepdim=True) - 2 * x32 @ g32.T + (g32 * g32).sum(1)
    naive = -0.5 * (n_features * math.log(2 * math.pi) + naive_sq)
    assert (naive.double() - ref).abs().max().item() > 100 * LARGE_MEAN_F32_ATOL


def test_pairwise_log_joint_adds_log_weights():
    gen = torch.Generator().manual_seed(2)
    x, g = randn(gen, 3, 2), randn(gen, 4, 2)
    log_weights = torch.log_softmax(randn(gen, 4), 0)
    s2 = torch.tensor(0.5, dtype=F64)
    torch.testing.assert_close(
        gaussian.pairwise_log_joint(x, g, log_weights, s2),
        direct_log_likelihood(x, g, s2) + log_weights,
        rtol=0,
        atol=1e-12,
    )


def test_pairwise_log_joint_float32_large_mean():
    # The fused addmm centres like pairwise_log_density: same float32 accuracy.
    centre = torch.full((500,), 1000.0)
    gen = torch.Generator().manual_seed(3)
    x32 = (1000 + randn(gen, 32, 500)).float()
    g32 = (1000 + randn(gen, 64, 500)).float()
    log_weights = torch.full((64,), -math.log(64))
    s2 = torch.tensor(1.0)
    ref = direct_log_likelihood(x32.double(), g32.double(), s2.double())
    ref = ref + log_weights.double()
    got = gaussian.pairwise_log_joint(x32, g32, log_weights, s2, centre)
    assert got.dtype == torch.float32
    assert (got.double() - ref).abs().max().item() < LARGE_MEAN_F32_ATOL


def test_pairwise_forms_take_the_centre_from_the_caller_not_the_rows():
    # One outlying row must not move the others: the expansion is centred on
    # a fixed centre, so every row's value is computed as if alone.
    gen = torch.Generator().manual_seed(4)
    x, g = randn(gen, 5, 3), randn(gen, 7, 3)
    log_weights = torch.full((7,), -math.log(7), dtype=F64)
    s2 = torch.tensor(0.5, dtype=F64)
    centre = x.mean(0)
    alone = gaussian.pairwise_log_joint(x, g, log_weights, s2, centre)
    outlier = torch.full((1, 3), 1e12, dtype=F64)
    both = gaussian.pairwise_log_joint(
        torch.cat([x, outlier]), g, log_weights, s2, centre
    )
    torch.testing.assert_close(both[:5], alone, rtol=0, atol=0)


def test_pairwise_log_joint_overflow_is_minus_infinity_not_nan():
    g = torch.zeros(3, 2)
    log_weights = torch.full((3,), -math.log(3))
    x = torch.tensor([[3e19, -3e19], [0.5, 0.5]])  # float32: ||x||^2 overflows
    joint = gaussian.pairwise_log_joint(x, g, log_weights, torch.tensor(1.0))
    assert torch.all(joint[0] == -math.inf) and torch.all(torch.isfinite(joint[1]))
    cross, row = gaussian.pairwise_log_joint_parts(x, g, log_weights, torch.tensor(1.0))
    # The node terms alone stay finite: the posterior weights need nothing else.
    assert torch.all(torch.isfinite(cross)) and torch.isinf(row[0, 0])


# ------------------------------------------------- one variance per feature
def test_pairwise_forms_with_one_variance_per_feature_match_scipy():
    rng = np.random.default_rng(5)
    x, g = rng.normal(size=(6, 4)) + 3.0, rng.normal(size=(5, 4)) + 3.0
    psi = np.exp(rng.normal(size=4))
    log_weights = np.log(rng.dirichlet(np.ones(5)))
    expected = np.array(
        [
            [stats.multivariate_normal(gj, np.diag(psi)).logpdf(xi) for gj in g]
            for xi in x
        ]
    )
    t = {k: torch.tensor(v) for k, v in dict(x=x, g=g, psi=psi, w=log_weights).items()}
    centre = torch.full((4,), 3.0, dtype=F64)
    density = gaussian.pairwise_log_density(t["x"], t["g"], t["psi"], centre)
    np.testing.assert_allclose(density.numpy(), expected, rtol=1e-12)
    joint = gaussian.pairwise_log_joint(t["x"], t["g"], t["w"], t["psi"], centre)
    np.testing.assert_allclose(joint.numpy(), expected + log_weights, rtol=1e-12)
    # A single variance given per feature is the isotropic case.
    same = torch.full((4,), 0.7, dtype=F64)
    torch.testing.assert_close(
        gaussian.pairwise_log_joint(t["x"], t["g"], t["w"], same, centre),
        gaussian.pairwise_log_joint(
            t["x"], t["g"], t["w"], torch.tensor(0.7, dtype=F64), centre
        ),
    )


def test_latent_log_joint_with_one_variance_per_feature():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(3, 2)), rng.normal(size=3)
    psi = np.exp(rng.normal(size=3))
    x, z = rng.normal(size=(4, 3)), rng.normal(size=(4, 5, 2))

    def decoder(latents):
        return latents @ torch.tensor(a).T + torch.tensor(b)

    got = gaussian.latent_log_joint(
        torch.tensor(x), torch.tensor(z), decoder, torch.tensor(psi)
    )
    expected = np.array(
        [
            [
                stats.multivariate_normal(a @ zk + b, np.diag(psi)).logpdf(x[i])
                + stats.multivariate_normal(np.zeros(2), np.eye(2)).logpdf(zk)
                for zk in z[i]
            ]
            for i in range(4)
        ]
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
