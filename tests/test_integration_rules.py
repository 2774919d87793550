"""Oracle and property tests for the prior integration rules.

Every rule approximates ``E_{z ~ N(0, I_m)}[h(z)]`` by ``sum_j w_j h(z_j)`` with
``log w_j`` returned in log space.  The oracles used here are exact identities
of the standard normal (moments ``E[z^(2p)] = (2p-1)!!``), of Gauss quadrature
(exactness up to degree ``2k - 1`` and the known error ``k!`` at degree ``2k``),
NumPy's independent ``hermegauss``, SciPy's truncated normal, and the
stratification property of scrambled Sobol nets.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _properties import property_settings
from hypothesis import given
from hypothesis import strategies as st
from numpy.polynomial.hermite_e import hermegauss
from scipy import stats
from scipy.special import gammaln, logsumexp, ndtr

from sknlica._torch import integration

PROPERTY = property_settings(30)

# float64 log-weights are normalised by a logsumexp over at most ~1e4 terms:
# the sum is exact to a few ulps times log(n_nodes).
LOGSUMEXP_TOL_F64 = 1e-12
# The same after rounding every log-weight to float32 (eps 1.2e-7, |log w| < 40).
LOGSUMEXP_TOL_F32 = 1e-5
# hermegauss polishes its nodes by Newton steps: measured agreement with our
# Golub-Welsch nodes is 8e-15 relative for orders <= 150.
HERMEGAUSS_NODE_RTOL = 1e-12
# Christoffel weights vs hermegauss weights: measured worst 4e-12 in log space
# (tail weights near 1e-130 are the least accurate in both).
HERMEGAUSS_LOG_WEIGHT_ATOL = 1e-9
# Moments of Gauss rules computed as sums of positive terms: measured relative
# errors <= 3e-15 for degree <= 20 and orders <= 2000.
MOMENT_RTOL = 1e-11
# Symmetry of the Golub-Welsch nodes: eigenvalue error ~ eps * ||J|| ~ eps *
# 2 sqrt(order) (measured 1.3e-12 at order 2000).
NODE_SYMMETRY_ATOL = 1e-10
# Log-weights of symmetric nodes: measured 1e-10 at order 2000, in tail
# weights ~exp(-3900); the bulk agrees far better.
LOG_WEIGHT_SYMMETRY_ATOL = 1e-8
# Christoffel-sum weights vs the independent formula n! / (n He_{n-1}(x))^2:
# measured 3e-13 (order 50), 2e-11 (500), 1.3e-10 (2000) in log space.
CHRISTOFFEL_DARBOUX_LOG_ATOL = 1e-8
# The report's grid box, [-2.5, 2.5]^m.
REPORT_HALF_WIDTH = 2.5
# Default-width grid, E[z^2] at k = 128 nodes: measured error 5e-10.
GRID_DEFAULT_K128_TOL = 1e-8
# Midpoint grid of k nodes per axis on [-2.5, 2.5]: O(h^2) error against the
# truncated normal, measured 3.1e-5 at k = 100 (h = 0.05).
GRID_TRUNCNORM_TOL_K100 = 1e-4
# Plain Monte Carlo at n = 4096 has a standard error sqrt(2 / 4096) = 0.022 on
# the variance; scrambled Sobol points were measured at <= 2.6e-3 (m <= 4).
QMC_MOMENT_TOL = 1e-2
# Cranley-Patterson shifts of the same net, compared through ndtr(ndtri(u)):
# round trip error ~1e-16 absolute, the clamp at eps acts only at u < 2.2e-16.
CP_SHIFT_ATOL = 1e-9


def double_factorial(k: int) -> int:
    """``k!!`` with ``(-1)!! = 0!! = 1``."""
    return math.prod(range(k, 0, -2)) if k > 0 else 1


def normal_moment(power: int) -> int:
    """``E[z^power]`` for ``z ~ N(0, 1)``."""
    return 0 if power % 2 else double_factorial(power - 1)


def weighted_abs_moment(nodes: np.ndarray, log_weights: np.ndarray, power: int):
    """``sum_j w_j |x_j|^power`` evaluated in log space (never over/underflows)."""
    with np.errstate(divide="ignore"):
        log_abs = np.log(np.abs(nodes))
    if power == 0:
        return math.exp(logsumexp(log_weights))
    return math.exp(logsumexp(log_weights + power * log_abs))


def expected_n_nodes(name: str, n_components: int, n_nodes: int) -> int:
    if name == "auto":
        name = integration.auto_rule(n_components, n_nodes)
    if name in ("grid", "gauss_hermite"):
        return integration.nodes_per_axis(n_nodes, n_components) ** n_components
    return n_nodes


# --------------------------------------------------------------------------
# nodes_per_axis
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_nodes", "n_components", "expected"),
    [
        (1, 1, 1),
        (1, 4, 1),
        (0, 2, 1),  # never zero nodes per axis
        (7, 1, 7),
        (100, 2, 10),
        (101, 2, 10),
        (110, 2, 10),  # sqrt(110) = 10.49 rounds down
        (111, 2, 11),  # sqrt(111) = 10.54 rounds up
        (8, 3, 2),
        (10, 5, 2),
        (1000, 3, 10),
    ],
)
def test_nodes_per_axis_values(n_nodes, n_components, expected):
    assert integration.nodes_per_axis(n_nodes, n_components) == expected


@PROPERTY
@given(k=st.integers(1, 60), m=st.integers(1, 4))
def test_nodes_per_axis_inverts_exact_powers(k, m):
    # 64 ** (1/3) == 3.9999999999999996 in floating point: must still give 4.
    assert integration.nodes_per_axis(k**m, m) == k


@PROPERTY
@given(n=st.integers(1, 5000), m=st.integers(1, 4))
def test_nodes_per_axis_is_monotone_and_close(n, m):
    k = integration.nodes_per_axis(n, m)
    assert k >= 1
    assert integration.nodes_per_axis(n + 1, m) >= k
    # Rounding the m-th root: k is the nearest integer to n ** (1/m).
    assert abs(k - n ** (1.0 / m)) <= 0.5 + 1e-12


# --------------------------------------------------------------------------
# Every rule through prior_rule: shapes, normalisation, dtype, device
# --------------------------------------------------------------------------


@PROPERTY
@given(
    name=st.sampled_from([*sorted(integration.RULES), "auto"]),
    m=st.integers(1, 4),
    n_nodes=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_prior_rule_shapes_and_normalisation(name, m, n_nodes, seed):
    generator = torch.Generator().manual_seed(seed)
    nodes, log_weights = integration.prior_rule(name, m, n_nodes, generator=generator)
    n_expected = expected_n_nodes(name, m, n_nodes)
    assert nodes.shape == (n_expected, m)
    assert log_weights.shape == (n_expected,)
    assert nodes.dtype == log_weights.dtype == torch.float64
    assert torch.isfinite(nodes).all()
    assert torch.isfinite(log_weights).all()
    total = torch.logsumexp(log_weights, 0).item()
    assert abs(total) < LOGSUMEXP_TOL_F64


@pytest.mark.parametrize("name", sorted(integration.RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="no CUDA device"
            ),
        ),
    ],
)
def test_prior_rule_follows_dtype_and_device(name, dtype, device):
    generator = torch.Generator().manual_seed(3)
    nodes, log_weights = integration.prior_rule(
        name, 2, 64, generator=generator, dtype=dtype, device=device
    )
    for tensor in (nodes, log_weights):
        assert tensor.dtype == dtype
        assert tensor.device.type == torch.device(device).type
    tol = LOGSUMEXP_TOL_F32 if dtype == torch.float32 else LOGSUMEXP_TOL_F64
    assert abs(torch.logsumexp(log_weights.double(), 0).item()) < tol
    # The float32 rule is the float64 rule rounded, not a different rule.
    ref_nodes, ref_log_weights = integration.prior_rule(
        name, 2, 64, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(nodes.cpu().double(), ref_nodes, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        log_weights.cpu().double(), ref_log_weights, rtol=1e-6, atol=1e-6
    )


def test_prior_rule_rejects_unknown_name():
    with pytest.raises(KeyError, match="simpson"):
        integration.prior_rule("simpson", 1, 10)


@pytest.mark.parametrize("name", ["monte_carlo", "qmc"])
def test_random_rules_have_equal_weights(name):
    _, log_weights = integration.prior_rule(
        name, 3, 500, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(
        log_weights, torch.full_like(log_weights, -math.log(500)), rtol=0, atol=0
    )


# --------------------------------------------------------------------------
# One-dimensional Gauss-Hermite
# --------------------------------------------------------------------------


def test_gauss_hermite_order_one_is_the_mean():
    nodes, log_weights = integration.gauss_hermite_1d(1)
    np.testing.assert_array_equal(nodes, [0.0])
    np.testing.assert_array_equal(log_weights, [0.0])


@PROPERTY
@given(order=st.integers(2, 150))
def test_gauss_hermite_matches_hermegauss(order):
    nodes, log_weights = integration.gauss_hermite_1d(order)
    ref_nodes, ref_weights = hermegauss(order)
    ref_weights = ref_weights / math.sqrt(2 * math.pi)  # N(0, 1) normalisation
    assert nodes.shape == log_weights.shape == (order,)
    assert np.all(np.diff(nodes) > 0), "nodes must be sorted and distinct"
    np.testing.assert_allclose(
        nodes, ref_nodes, rtol=0, atol=HERMEGAUSS_NODE_RTOL * max(1, ref_nodes[-1])
    )
    assert np.all(ref_weights > 0)  # hermegauss is still representable here
    np.testing.assert_allclose(
        log_weights, np.log(ref_weights), rtol=0, atol=HERMEGAUSS_LOG_WEIGHT_ATOL
    )


@pytest.mark.parametrize("order", [500, 2000])
def test_gauss_hermite_high_order_is_finite_and_exact(order):
    nodes, log_weights = integration.gauss_hermite_1d(order)
    assert np.all(np.isfinite(nodes))
    assert np.all(np.isfinite(log_weights))
    # The regime is real: the smallest weights are below the smallest float64
    # subnormal (exp(-745)), so linear-space weights would be exactly zero.
    assert log_weights.min() < -745.0
    assert np.all(np.diff(nodes) > 0)
    np.testing.assert_allclose(nodes, -nodes[::-1], rtol=0, atol=NODE_SYMMETRY_ATOL)
    np.testing.assert_allclose(
        log_weights, log_weights[::-1], rtol=0, atol=LOG_WEIGHT_SYMMETRY_ATOL
    )
    weights = np.exp(log_weights)
    for p in range(0, 11):
        even = weighted_abs_moment(nodes, log_weights, 2 * p)
        assert even == pytest.approx(double_factorial(2 * p - 1), rel=MOMENT_RTOL), p
        # Odd moments vanish: compare with the size of the terms that cancel.
        odd = np.sum(weights * nodes ** (2 * p + 1))
        scale = weighted_abs_moment(nodes, log_weights, 2 * p + 1)
        assert abs(odd) <= MOMENT_RTOL * scale, p


def log_weights_from_hermite_value(nodes: np.ndarray, order: int) -> np.ndarray:
    """``log w_i = log(n!) - 2 log(n |He_{n-1}(x_i)|)`` (N(0, 1)-normalised).

    A formula independent of the Christoffel sum used by the library.
    ``He_{n-1}`` comes from the monic recurrence ``He_{k+1} = x He_k - k
    He_{k-1}``, rescaled as it grows so the tails (weights far below the
    float64 range) stay representable.
    """
    previous, current = np.zeros_like(nodes), np.ones_like(nodes)
    log_scale = np.zeros_like(nodes)
    for k in range(order - 1):  # ends with current = He_{order-1} / scale
        previous, current = current, nodes * current - k * previous
        factor = np.where(np.abs(current) > 1e50, np.abs(current), 1.0)
        current /= factor
        previous /= factor
        log_scale += np.log(factor)
    log_hermite = np.log(np.abs(current)) + log_scale
    return gammaln(order + 1) - 2 * math.log(order) - 2 * log_hermite


@pytest.mark.parametrize("order", [50, 500, 2000])
def test_gauss_hermite_tail_log_weights_match_hermite_formula(order):
    # The tails (weights down to exp(-3900)) never affect a moment test, so
    # they get their own oracle: this is what checks the running rescaling.
    nodes, log_weights = integration.gauss_hermite_1d(order)
    expected = log_weights_from_hermite_value(nodes, order)
    np.testing.assert_allclose(
        log_weights, expected, rtol=0, atol=CHRISTOFFEL_DARBOUX_LOG_ATOL
    )


@PROPERTY
@given(order=st.integers(1, 25), data=st.data())
def test_gauss_hermite_degree_of_exactness(order, data):
    """Exact below degree ``2k``; at degree ``2k`` the error is exactly ``k!``.

    ``x^(2k) = He_k(x)^2 + (lower degree)`` and the rule sees ``He_k = 0`` at
    its nodes, so it misses ``E[He_k^2] = k!``.  This pins the number of nodes:
    a rule secretly using more nodes would pass exactness but fail here.  (For
    k <= 25, k! / (2k-1)!! > 2e-7, far above MOMENT_RTOL.)
    """
    power = data.draw(st.integers(0, 2 * order), label="power")
    nodes, log_weights = integration.gauss_hermite_1d(order)
    weights = np.exp(log_weights)
    if power < 2 * order:
        expected = normal_moment(power)
    else:
        expected = double_factorial(power - 1) - math.factorial(order)
    scale = weighted_abs_moment(nodes, log_weights, power)
    got = np.sum(weights * nodes.astype(np.float64) ** power)
    assert abs(got - expected) <= MOMENT_RTOL * max(scale, 1.0), (got, expected)


# --------------------------------------------------------------------------
# Tensor-product Gauss-Hermite
# --------------------------------------------------------------------------


@PROPERTY
@given(
    m=st.integers(2, 3),
    k=st.integers(1, 8),
    exponents=st.lists(st.integers(0, 15), min_size=3, max_size=3),
)
def test_tensor_product_gauss_hermite_is_exact_per_axis(m, k, exponents):
    exponents = [min(e, 2 * k - 1) for e in exponents[:m]]
    nodes, log_weights = integration.prior_rule("gauss_hermite", m, k**m)
    assert nodes.shape == (k**m, m)
    integrand = torch.ones(k**m, dtype=torch.float64)
    for axis, power in enumerate(exponents):
        integrand = integrand * nodes[:, axis] ** power
    got = (log_weights.exp() * integrand).sum().item()
    expected = math.prod(normal_moment(e) for e in exponents)
    scale = (log_weights.exp() * integrand.abs()).sum().item()
    assert abs(got - expected) <= MOMENT_RTOL * max(scale, 1.0), (got, expected)


def test_tensor_product_gauss_hermite_named_moments():
    nodes, log_weights = integration.prior_rule("gauss_hermite", 2, 25)  # 5 / axis
    w = log_weights.exp()
    z1, z2 = nodes.T
    assert (w * z1**2 * z2**4).sum().item() == pytest.approx(3.0, rel=MOMENT_RTOL)
    assert (w * z1**8 * z2**2).sum().item() == pytest.approx(105.0, rel=MOMENT_RTOL)
    assert abs((w * z1 * z2**3).sum().item()) < MOMENT_RTOL
    nodes, log_weights = integration.prior_rule("gauss_hermite", 3, 4**3)
    w = log_weights.exp()
    z1, z2, z3 = nodes.T
    value = (w * z1**2 * z2**4 * z3**6).sum().item()
    assert value == pytest.approx(1 * 3 * 15, rel=MOMENT_RTOL)
    # Degree 8 on one axis with 4 nodes per axis is not exact (error 4! = 24).
    value = (w * z3**8).sum().item()
    assert value == pytest.approx(105.0 - 24.0, rel=MOMENT_RTOL)


# --------------------------------------------------------------------------
# Grid rule: the prior density lives in the weights
# --------------------------------------------------------------------------


def _grid_second_moment(k: int, half_width: float | None) -> float:
    nodes, log_weights = integration.prior_rule("grid", 1, k, half_width=half_width)
    return (log_weights.exp() * nodes[:, 0] ** 2).sum().item()


def test_grid_rule_integrates_against_the_gaussian_prior():
    # The report's box, [-2.5, 2.5]: the rule must converge to the Gaussian
    # prior truncated to the box, not to the uniform distribution on it.
    truncated = stats.truncnorm(-REPORT_HALF_WIDTH, REPORT_HALF_WIDTH).moment(2)
    uniform_box = REPORT_HALF_WIDTH**2 / 3  # 2.083: the report's uniform prior
    got = _grid_second_moment(100, REPORT_HALF_WIDTH)
    assert abs(got - truncated) < GRID_TRUNCNORM_TOL_K100  # truncated = 0.9113
    assert abs(got - uniform_box) > 1.0


def test_grid_rule_converges_at_second_order_on_a_fixed_box():
    truncated = stats.truncnorm(-REPORT_HALF_WIDTH, REPORT_HALF_WIDTH).moment(2)
    errors = [
        abs(_grid_second_moment(k, REPORT_HALF_WIDTH) - truncated)
        for k in (50, 100, 200)
    ]
    # Midpoint rule: halving h divides the error by 4 (measured 4.00, 4.00).
    for coarse, fine in zip(errors[:-1], errors[1:]):
        assert 3.5 < coarse / fine < 4.5, errors


def test_grid_rule_default_width_converges_to_the_full_prior():
    # With the default half-width growing with k, both the truncation and the
    # spacing vanish: E[z^2] -> 1 (measured errors 1e-1, 8e-3, 4e-5, 5e-10 at
    # k = 16, 32, 64, 128).
    errors = [abs(_grid_second_moment(k, None) - 1.0) for k in (16, 32, 64, 128)]
    assert all(fine < coarse for coarse, fine in zip(errors[:-1], errors[1:]))
    assert errors[-1] < GRID_DEFAULT_K128_TOL, errors
    for k in (1, 7, 64):
        nodes, _ = integration.prior_rule("grid", 1, k)
        half_width = integration.default_half_width(k)
        expected = -half_width + (np.arange(k) + 0.5) * (2 * half_width / k)
        np.testing.assert_allclose(nodes[:, 0].numpy(), expected, atol=1e-14)


def test_grid_rule_geometry_and_tensor_structure():
    k, half_width = 10, REPORT_HALF_WIDTH
    nodes, log_weights = integration.prior_rule("grid", 2, k * k, half_width=half_width)
    axis = np.sort(np.unique(nodes[:, 0].numpy()))
    expected_axis = -half_width + (np.arange(k) + 0.5) * (2 * half_width / k)
    np.testing.assert_allclose(axis, expected_axis, rtol=0, atol=1e-14)
    # Weights proportional to phi(z1) phi(z2): log w + |z|^2 / 2 is constant.
    residual = log_weights + 0.5 * (nodes**2).sum(1)
    assert (residual.max() - residual.min()).item() < 1e-12
    # Product structure of the moments: E[z1^2 z2^2] = E[z1^2] E[z2^2].
    w = log_weights.exp()
    m2 = (w * nodes[:, 0] ** 2).sum()
    torch.testing.assert_close((w * nodes[:, 0] ** 2 * nodes[:, 1] ** 2).sum(), m2**2)
    # A custom half-width is honoured by the rule itself too.
    nodes, _ = integration.grid_rule(1, 4, half_width=1.0)
    np.testing.assert_allclose(nodes[:, 0].numpy(), [-0.75, -0.25, 0.25, 0.75])


@pytest.mark.parametrize(
    ("m", "k", "half_width"), [(1, 40, 2.5), (2, 32, None), (3, 25, None)]
)
def test_grid_box_log_mass_is_the_prior_mass_of_the_box(m, k, half_width):
    width = integration.default_half_width(k) if half_width is None else half_width
    expected = m * math.log(ndtr(width) - ndtr(-width))
    got = integration.grid_box_log_mass(m, k**m, half_width)
    assert got == pytest.approx(expected, rel=1e-12)
    # With it the weights are the midpoint rule's own, phi(z) h^m (no
    # renormalisation), to the midpoint rule's O(h^2) error on the box's mass.
    nodes, log_weights = integration.prior_rule("grid", m, k**m, half_width=half_width)
    h = 2 * width / k
    midpoint = (
        -0.5 * (nodes**2).sum(1) - 0.5 * m * math.log(2 * math.pi) + m * math.log(h)
    )
    torch.testing.assert_close(log_weights + got, midpoint, rtol=0, atol=h**2 / 100)


def test_sampler_grid_honours_half_width():
    sampler = integration.PriorNodeSampler(
        "grid",
        1,
        4,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
        device="cpu",
        half_width=1.0,
    )
    nodes, _ = sampler.draw()
    np.testing.assert_allclose(nodes[:, 0].numpy(), [-0.75, -0.25, 0.25, 0.75])


# --------------------------------------------------------------------------
# "auto"
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "n_nodes", "expected"),
    [
        (1, 64, "grid"),
        (2, 1024, "grid"),
        (2, 64, "qmc"),  # 8 per axis: too coarse for the grid
        (3, 1000, "qmc"),
        (3, 4096, "grid"),
        (5, 16384, "qmc"),
    ],
)
def test_auto_rule_picks_the_grid_from_16_nodes_per_axis(m, n_nodes, expected):
    assert integration.auto_rule(m, n_nodes) == expected


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_auto_rule_resolves_to_a_registered_rule(m):
    name = integration.auto_rule(m, 64)
    assert name in integration.RULES
    auto = integration.prior_rule(
        "auto", m, 64, generator=torch.Generator().manual_seed(1)
    )
    explicit = integration.prior_rule(
        name, m, 64, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(auto[0], explicit[0], rtol=0, atol=0)
    torch.testing.assert_close(auto[1], explicit[1], rtol=0, atol=0)
    sampler = integration.PriorNodeSampler(
        "auto",
        m,
        64,
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float64,
        device="cpu",
    )
    assert sampler.name == name
    nodes, log_weights = sampler.draw()
    assert nodes.shape == (expected_n_nodes(name, m, 64), m)
    assert abs(torch.logsumexp(log_weights, 0).item()) < LOGSUMEXP_TOL_F64


# --------------------------------------------------------------------------
# Quasi-Monte Carlo
# --------------------------------------------------------------------------


def _moment_error(nodes: torch.Tensor) -> float:
    mean_error = nodes.mean(0).abs().max().item()
    variance_error = (nodes.pow(2).mean(0) - 1).abs().max().item()
    return max(mean_error, variance_error)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_qmc_moments_beat_monte_carlo(m):
    n = 4096
    qmc_errors, mc_errors = [], []
    for seed in range(6):
        nodes, _ = integration.prior_rule(
            "qmc", m, n, generator=torch.Generator().manual_seed(seed)
        )
        qmc_errors.append(_moment_error(nodes))
        nodes, _ = integration.prior_rule(
            "monte_carlo", m, n, generator=torch.Generator().manual_seed(seed)
        )
        mc_errors.append(_moment_error(nodes))
    assert max(qmc_errors) < QMC_MOMENT_TOL, qmc_errors
    # Root-mean-square over seeds: QMC at least 10x tighter (measured ~30x).
    qmc_rms = math.sqrt(np.mean(np.square(qmc_errors)))
    mc_rms = math.sqrt(np.mean(np.square(mc_errors)))
    assert qmc_rms < 0.1 * mc_rms, (qmc_rms, mc_rms)


def test_monte_carlo_nodes_are_standard_normal():
    n = 20_000
    nodes, _ = integration.prior_rule(
        "monte_carlo", 3, n, generator=torch.Generator().manual_seed(12)
    )
    # Five standard errors: sd(mean) = 1/sqrt(n), sd(variance) = sqrt(2/n).
    assert nodes.mean(0).abs().max().item() < 5 / math.sqrt(n)
    assert (nodes.var(0) - 1).abs().max().item() < 5 * math.sqrt(2 / n)
    correlation = torch.corrcoef(nodes.T) - torch.eye(3, dtype=torch.float64)
    assert correlation.abs().max().item() < 5 / math.sqrt(n)
    for axis in range(3):
        assert stats.kstest(nodes[:, axis].numpy(), "norm").pvalue > 1e-3


@pytest.mark.parametrize("m", [1, 3])
def test_qmc_nodes_are_normal_quantiles_of_a_stratified_net(m):
    # A scrambled Sobol net of 2^10 points puts exactly one point in each
    # interval [i / 1024, (i + 1) / 1024) of every coordinate.
    n = 1024
    nodes, _ = integration.prior_rule(
        "qmc", m, n, generator=torch.Generator().manual_seed(11)
    )
    uniforms = ndtr(nodes.numpy())
    for axis in range(m):
        cells = np.sort(np.floor(uniforms[:, axis] * n).astype(int))
        np.testing.assert_array_equal(cells, np.arange(n))


def test_qmc_is_deterministic_per_seed_and_differs_across_seeds():
    def rule(seed):
        return integration.prior_rule(
            "qmc", 3, 256, generator=torch.Generator().manual_seed(seed)
        )[0]

    torch.testing.assert_close(rule(5), rule(5), rtol=0, atol=0)
    assert not torch.allclose(rule(5), rule(6))
    # monte_carlo likewise
    a = integration.prior_rule(
        "monte_carlo", 3, 50, generator=torch.Generator().manual_seed(9)
    )
    b = integration.prior_rule(
        "monte_carlo", 3, 50, generator=torch.Generator().manual_seed(9)
    )
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


def test_uniforms_to_normal_is_finite_and_inverts_ndtr():
    u = torch.tensor(
        [0.0, 1e-300, 1e-10, 0.25, 0.5, 0.9, 1 - 1e-10, 1.0], dtype=torch.float64
    )
    z = integration.uniforms_to_normal(u)
    assert torch.isfinite(z).all()
    assert torch.all(torch.diff(z) >= 0)
    inner = slice(2, 7)
    np.testing.assert_allclose(ndtr(z[inner].numpy()), u[inner].numpy(), rtol=1e-9)


# --------------------------------------------------------------------------
# PriorNodeSampler
# --------------------------------------------------------------------------


def _sampler(name, seed=0, m=2, n=256, dtype=torch.float64):
    return integration.PriorNodeSampler(
        name,
        m,
        n,
        generator=torch.Generator().manual_seed(seed),
        dtype=dtype,
        device="cpu",
    )


@pytest.mark.parametrize("name", ["grid", "gauss_hermite"])
def test_sampler_deterministic_rules_are_fixed(name):
    sampler = _sampler(name)
    first = sampler.draw()
    second = sampler.draw()
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=0)
    torch.testing.assert_close(first[1], second[1], rtol=0, atol=0)
    ref = integration.prior_rule(name, 2, 256)
    torch.testing.assert_close(first[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(first[1], ref[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["monte_carlo", "qmc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampler_random_rules_redraw_valid_rules(name, dtype):
    sampler = _sampler(name, n=512, dtype=dtype)
    draws = [sampler.draw() for _ in range(4)]
    for nodes, log_weights in draws:
        assert nodes.shape == (512, 2)
        assert nodes.dtype == log_weights.dtype == dtype
        assert torch.isfinite(nodes).all()
        tol = LOGSUMEXP_TOL_F32 if dtype == torch.float32 else LOGSUMEXP_TOL_F64
        assert abs(torch.logsumexp(log_weights.double(), 0).item()) < tol
    for (a, _), (b, _) in zip(draws[:-1], draws[1:]):
        assert not torch.allclose(a, b)


def test_sampler_same_seed_same_sequence():
    for name in ("monte_carlo", "qmc"):
        a, b, c = _sampler(name, 7), _sampler(name, 7), _sampler(name, 8)
        for _ in range(3):
            na, nb, nc = a.draw()[0], b.draw()[0], c.draw()[0]
            torch.testing.assert_close(na, nb, rtol=0, atol=0)
            assert not torch.allclose(na, nc)


def test_sampler_qmc_draws_stay_low_discrepancy():
    sampler = _sampler("qmc", seed=1, m=3, n=4096)
    for _ in range(5):
        nodes, _ = sampler.draw()
        assert _moment_error(nodes) < QMC_MOMENT_TOL


def test_sampler_qmc_draws_are_shifts_of_one_net():
    """Cranley-Patterson rotation: draw t is ``(u + s_t) mod 1`` for one net."""
    sampler = _sampler("qmc", seed=2, m=2, n=512)
    uniforms = [ndtr(sampler.draw()[0].numpy()) for _ in range(3)]
    for a, b in zip(uniforms[:-1], uniforms[1:]):
        shift = np.mod(b - a, 1.0)
        # Circular spread of the per-point shift, per coordinate.
        spread = np.abs(((shift - shift[0] + 0.5) % 1.0) - 0.5)
        assert spread.max() < CP_SHIFT_ATOL
        # ... and the shift is not trivially zero.
        assert np.all(np.minimum(shift[0], 1 - shift[0]) > 1e-6)


# --------------------------------------------------------------------------
# ShiftedSobol
# --------------------------------------------------------------------------


def test_shifted_sobol_draws_fresh_shifts_of_one_net():
    sobol = integration.ShiftedSobol(3, 256, torch.Generator().manual_seed(0))
    assert sobol.uniforms.shape == (256, 3)
    draws = [sobol.draw() for _ in range(3)]
    for nodes in draws:
        assert nodes.shape == (256, 3) and nodes.dtype == torch.float64
        assert torch.isfinite(nodes).all()
        # Each draw is (u + s) mod 1 of the instance's own net, for one shift
        # s per draw and coordinate.
        shift = np.mod(ndtr(nodes.numpy()) - sobol.uniforms.numpy(), 1.0)
        spread = np.abs(((shift - shift[0] + 0.5) % 1.0) - 0.5)
        assert spread.max() < CP_SHIFT_ATOL
    for a, b in zip(draws[:-1], draws[1:]):
        assert not torch.allclose(a, b)  # a fresh shift every draw


def test_shifted_sobol_is_reproducible_for_a_seed():
    def draws(seed):
        sobol = integration.ShiftedSobol(2, 128, torch.Generator().manual_seed(seed))
        return [sobol.draw() for _ in range(3)]

    for a, b in zip(draws(5), draws(5), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not any(
        torch.allclose(a, c) for a, c in zip(draws(5), draws(6), strict=True)
    )


def test_shifted_sobol_draws_keep_qmc_accuracy():
    sobol = integration.ShiftedSobol(2, 4096, torch.Generator().manual_seed(3))
    for _ in range(3):
        assert _moment_error(sobol.draw()) < QMC_MOMENT_TOL
