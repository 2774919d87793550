"""``sknlica._torch.evaluation``: per-row ``log p(x)``, ``E[z | x]`` and draws.

The model is linear-Gaussian, ``g(z) = A z + b``, so ``p(x) = N(b, A A^T +
sigma^2 I)`` is an exact oracle; the posterior weights over the prior rule
(and their effective sample size) are recomputed here by a direct broadcast.
At ``sigma^2 = 0.3`` most rows have ESS ~ 32 over the 1,024-node grid and the
outlying rows (scaled by 3) ~ 4: a mix of rows the prior rule serves well and
rows it does not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from sknlica._torch import adaptive
from sknlica._torch.evaluation import (
    EDGE_WEIGHT,
    ESS_THRESHOLD,
    EVALUATION_NODES,
    EVALUATION_STARTS,
    HIGH_DIMENSION_ESS_THRESHOLD,
    DecodedRule,
    decode_nodes,
    decoded_evaluation_rule,
    ess_threshold_for,
    evaluate,
    resample_posterior,
)
from sknlica._torch.integration import (
    default_half_width,
    evaluation_generator,
    grid_box_log_mass,
    prior_rule,
)

F64 = torch.float64
NOISE = 0.3
N_NODES = 1024
#: Refined (adaptive) rows against the closed form: the issue's target of
#: 0.01 nats; measured 0.003 here (the prior rule alone errs by ~6 nats on
#: the same rows).
REFINED_ATOL = 0.01
#: Rows the prior rule serves (ESS >= 30) against the closed form: measured
#: 1.3e-3 nats on average.
PRIOR_MEAN_ATOL = 0.01
#: Evaluation centres on the rows' mean: subsets agree to round-off.
SUBSET_RTOL = 1e-10


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    A, b = rng.normal(size=(6, 2)), rng.normal(size=6)
    decoder = torch.nn.Linear(2, 6, dtype=F64)
    with torch.no_grad():
        decoder.weight.copy_(torch.tensor(A))
        decoder.bias.copy_(torch.tensor(b))
    decoder.requires_grad_(False)
    Z = rng.normal(size=(40, 2))
    X = Z @ A.T + b + math.sqrt(NOISE) * rng.normal(size=(40, 6))
    X[:5] *= 3  # outliers: posteriors in the prior's tails
    exact = multivariate_normal(b, A @ A.T + NOISE * np.eye(6)).logpdf(X)
    rule = decoded_evaluation_rule(decoder, 2, N_NODES, dtype=F64)
    noise = torch.tensor(NOISE, dtype=F64)
    return torch.tensor(X), decoder, noise, rule, exact, (A, b)


@pytest.fixture(scope="module")
def prior(problem):
    """``evaluate`` of every row without refinement (the prior rule's values)."""
    x, decoder, noise, rule, _, _ = problem
    return evaluate(x, rule, decoder, noise, refine=False)


@pytest.fixture(scope="module")
def refined(problem):
    """``evaluate`` of every row, low-ESS rows refined (the default)."""
    x, decoder, noise, rule, _, _ = problem
    return evaluate(x, rule, decoder, noise)


def _oracle_weights(x, rule, noise):
    """Posterior weights over the rule's nodes by a direct broadcast."""
    nodes, log_weights, g, _ = rule
    sq = ((x[:, None, :] - g[None]) ** 2).sum(-1)
    log_lik = -0.5 * (x.shape[1] * torch.log(2 * math.pi * noise) + sq / noise)
    joint = log_lik + log_weights
    return torch.logsumexp(joint, 1), torch.softmax(joint, 1)


def _is_a_node(z, nodes):
    """Whether each draw of ``z`` (..., m) equals one of ``nodes`` exactly."""
    return (z.reshape(-1, 1, z.shape[-1]) == nodes).all(-1).any(-1)


# ------------------------------------------------------------------ evaluate
def test_the_problem_has_rows_on_both_sides_of_the_threshold(problem):
    x, _, noise, rule, _, _ = problem
    _, weights = _oracle_weights(x, rule, noise)
    ess = 1.0 / weights.square().sum(1)
    assert 1 <= int((ess < ESS_THRESHOLD).sum()) < len(x) // 2


@pytest.mark.parametrize("threshold", [ESS_THRESHOLD, 10.0, 32.5, 0.0, math.inf])
def test_evaluate_flags_exactly_the_rows_below_the_threshold(problem, threshold):
    x, decoder, noise, rule, _, _ = problem
    _, weights = _oracle_weights(x, rule, noise)
    ess = 1.0 / weights.square().sum(1)
    # No row sits within round-off of the threshold (the flags are unambiguous).
    assert torch.all((ess - threshold).abs() > 1e-6 * ess)
    result = evaluate(
        x,
        rule,
        decoder,
        noise,
        ess_threshold=threshold,
        refine=False,
        check_modes=False,
        check_edge=False,
    )
    torch.testing.assert_close(result.ess, ess, rtol=1e-10, atol=0)
    assert torch.equal(result.low_ess, ess < threshold)
    n_low = int(result.low_ess.sum())
    # The adaptive rule's starts, for the flagged rows only.
    assert result.start.point.shape == (n_low, EVALUATION_STARTS, 2)
    assert result.start.mean.shape == (n_low, 2)
    assert result.start.covariance.shape == (n_low, 2, 2)


def test_refine_false_leaves_the_prior_rule_values(problem, prior):
    x, _, noise, rule, _, _ = problem
    result = prior
    assert result.low_ess.any()
    log_marginal, weights = _oracle_weights(x, rule, noise)
    torch.testing.assert_close(result.log_marginal, log_marginal, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        result.posterior_mean, weights @ rule.nodes, rtol=0, atol=1e-12
    )


def test_refining_changes_only_the_flagged_rows_and_makes_them_accurate(
    problem, prior, refined
):
    exact = problem[4]
    low = refined.low_ess
    assert torch.equal(low, prior.low_ess)
    # Rows the prior rule serves keep its values exactly ...
    assert torch.equal(refined.log_marginal[~low], prior.log_marginal[~low])
    assert torch.equal(refined.posterior_mean[~low], prior.posterior_mean[~low])
    error = np.abs(prior.log_marginal.numpy() - exact)
    assert error[~low.numpy()].mean() < PRIOR_MEAN_ATOL
    # ... the rows flagged by their ESS, where the prior rule is far off, are
    # refined, and so are those the grid's box truncates (one here, off by
    # 0.019).
    assert error[(prior.ess < ESS_THRESHOLD).numpy()].min() > 10 * REFINED_ATOL
    assert (error[low.numpy()] > REFINED_ATOL).all()
    refined_error = np.abs(refined.log_marginal.numpy() - exact)
    assert refined_error[low.numpy()].max() < REFINED_ATOL


def test_refined_posterior_means_match_the_closed_form(problem, refined):
    x, _, _, _, _, (A, b) = problem
    covariance = A @ A.T + NOISE * np.eye(6)
    expected = (x.numpy() - b) @ np.linalg.solve(covariance, A)
    low = refined.low_ess.numpy()
    # Posterior std is ~0.2 per latent here; refined means within 1% of it.
    np.testing.assert_allclose(
        refined.posterior_mean.numpy()[low], expected[low], rtol=0, atol=2e-3
    )


def test_without_a_mean_only_the_likelihood_is_returned(problem, refined):
    x, decoder, noise, rule, _, _ = problem
    with_mean = refined
    without = evaluate(x, rule, decoder, noise, with_mean=False)
    assert without.posterior_mean is None
    torch.testing.assert_close(
        without.log_marginal, with_mean.log_marginal, rtol=1e-12, atol=0
    )


@pytest.mark.parametrize(
    "subset", [[0], [7], [3, 20, 1], list(range(10, 40)), list(range(39, -1, -1))]
)
def test_a_rows_result_does_not_depend_on_the_other_rows(problem, refined, subset):
    x, decoder, noise, rule, _, _ = problem
    full = refined
    part = evaluate(x[subset], rule, decoder, noise)
    assert torch.equal(part.low_ess, full.low_ess[subset])
    for name in ("log_marginal", "posterior_mean", "ess"):
        torch.testing.assert_close(
            getattr(part, name),
            getattr(full, name)[subset],
            rtol=SUBSET_RTOL,
            atol=1e-12,
            msg=name,
        )


def test_evaluation_is_deterministic(problem, refined):
    x, decoder, noise, rule, _, _ = problem
    a, b = refined, evaluate(x, rule, decoder, noise)
    assert torch.equal(a.log_marginal, b.log_marginal)
    assert torch.equal(a.posterior_mean, b.posterior_mean)


# -------------------------------------------------------- resample_posterior
def test_resample_posterior_shapes_and_reproducibility(problem):
    x, decoder, noise, rule, _, _ = problem

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return resample_posterior(x, rule, decoder, noise, 25, generator=generator)

    z, spread = draw(0)
    assert z.shape == (40, 25, 2) and spread.shape == (40,)
    assert torch.all(torch.isfinite(z)) and torch.all(spread > 0)
    again, _ = draw(0)
    assert torch.equal(z, again)
    assert not torch.equal(z, draw(1)[0])


def test_resampled_rows_served_by_the_prior_rule_are_its_nodes(problem, prior):
    x, decoder, noise, rule, _, _ = problem
    generator = torch.Generator().manual_seed(0)
    z, spread = resample_posterior(x, rule, decoder, noise, 25, generator=generator)
    low = prior.low_ess
    nodes = rule.nodes
    # Served rows: every draw is (exactly) a node of the rule ...
    assert torch.all(_is_a_node(z[~low], nodes))
    # ... and the spread is the posterior variance over the nodes, averaged
    # over the latent axes.
    _, weights = _oracle_weights(x, rule, noise)
    variance = weights @ nodes.square() - (weights @ nodes).square()
    torch.testing.assert_close(
        spread[~low], variance.mean(1)[~low], rtol=1e-10, atol=1e-14
    )
    # Flagged rows draw from the adaptive rule's nodes instead.
    assert not torch.any(_is_a_node(z[low], nodes))


def test_resampled_flagged_rows_center_on_their_posterior(problem, prior):
    x, decoder, noise, rule, _, (A, b) = problem
    generator = torch.Generator().manual_seed(0)
    z, _ = resample_posterior(x, rule, decoder, noise, 400, generator=generator)
    low = prior.low_ess.numpy()
    covariance = A @ A.T + NOISE * np.eye(6)
    mean = (x.numpy() - b) @ np.linalg.solve(covariance, A)
    posterior_cov = np.linalg.inv(np.eye(2) + A.T @ A / NOISE)
    # 400 resampled draws (with repeats): within 5 standard errors of the
    # exact posterior mean, counting each draw once.
    se = np.sqrt(np.diag(posterior_cov) / 400)
    assert np.all(np.abs(z.numpy()[low].mean(1) - mean[low]) < 5 * se)


# --------------------------------------------------------------- decode_nodes
def test_decode_nodes_accepts_numpy_returning_callables():
    A = np.random.default_rng(0).normal(size=(2, 3))
    nodes = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    calls = []

    def decoder(z):
        calls.append(len(z))
        return np.tanh(np.asarray(z) @ A)  # a numpy array, not a tensor

    got = decode_nodes(decoder, nodes, chunk=4)
    assert isinstance(got, torch.Tensor) and got.dtype == F64
    np.testing.assert_allclose(got.numpy(), np.tanh(nodes.numpy() @ A), rtol=1e-15)
    assert calls == [4, 4, 2]  # in chunks
    as_list = decode_nodes(lambda z: np.tanh(np.asarray(z) @ A).tolist(), nodes)
    torch.testing.assert_close(as_list, got, rtol=0, atol=0)


def test_decode_nodes_runs_a_module_in_its_own_dtype():
    module = torch.nn.Linear(2, 3)  # float32 parameters
    seen = []
    module.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    nodes = torch.randn(5, 2, dtype=F64)
    out = decode_nodes(module, nodes)
    assert seen == [torch.float32]
    assert out.dtype == F64  # returned in the nodes' dtype
    with torch.no_grad():
        expected = module(nodes.float()).double()
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)


def test_decoded_evaluation_rule_is_the_fixed_auto_rule():
    decoder = torch.nn.Linear(2, 3, dtype=F64)
    rule = decoded_evaluation_rule(decoder, 2, 256, dtype=F64)
    assert isinstance(rule, DecodedRule)
    nodes, log_weights = prior_rule("auto", 2, 256, generator=evaluation_generator())
    assert torch.equal(rule.nodes, nodes)
    # The grid's weights sum to the prior's mass in its box, not to one.
    box = math.erf(default_half_width(16) / math.sqrt(2)) ** 2
    torch.testing.assert_close(rule.log_weights, log_weights + math.log(box))
    assert torch.logsumexp(rule.log_weights, 0).item() < 0
    # Its outer layer: the 4 * 15 nodes on the box's boundary rows and columns.
    assert int(rule.edge.sum()) == 16**2 - 14**2
    reach = nodes.abs().amax(1)
    assert torch.equal(rule.edge, reach > reach.max() - 1e-9)
    with torch.no_grad():
        torch.testing.assert_close(rule.g, decoder(nodes), rtol=0, atol=0)
    assert not rule.g.requires_grad
    # Random (qmc) rules too are fixed: the same nodes every call.
    wide = torch.nn.Linear(5, 3, dtype=F64)
    qmc = decoded_evaluation_rule(wide, 5, 256, dtype=F64)
    again = decoded_evaluation_rule(wide, 5, 256, dtype=F64)
    assert torch.equal(qmc.nodes, again.nodes)
    # Without a box there is no edge, and the weights sum to one.
    assert qmc.edge is None
    assert abs(torch.logsumexp(qmc.log_weights, 0).item()) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("m", "n_nodes"), [(2, 16384), (3, 16384), (3, 4096)])
def test_the_edge_is_the_grids_whole_outer_layer(m, n_nodes, dtype):
    decoder = torch.nn.Linear(m, 4).to(dtype)
    rule = decoded_evaluation_rule(decoder, m, n_nodes, dtype=dtype)
    k = round(n_nodes ** (1 / m))
    assert int(rule.edge.sum()) == k**m - (k - 2) ** m


# ------------------------------------------------------- multimodal posteriors
def _folded(z):
    """``g(z) = (z_1^2, z_2)``: ``p(z | x)`` has modes at ``z_1 = +-sqrt(x_1)``."""
    return torch.stack([z[:, 0].square(), z[:, 1]], dim=1)


def _folded_log_marginal(x, noise):
    """``log p(x)`` of :func:`_folded`: a dense 1-D sum over ``z_1`` times the
    closed form ``N(x_2; 0, 1 + sigma^2)`` of the linear coordinate."""
    z1 = torch.linspace(-8, 8, 400_001, dtype=F64)
    log_prior = -0.5 * (z1.square() + math.log(2 * math.pi)) + math.log(z1[1] - z1[0])
    log_lik = -0.5 * (
        (x[:, :1] - z1.square()).square() / noise + math.log(2 * math.pi * noise)
    )
    first = torch.logsumexp(log_lik + log_prior, dim=1)
    second = -0.5 * (
        x[:, 1].square() / (1 + noise) + math.log(2 * math.pi * (1 + noise))
    )
    return first + second


def test_spread_starts_reach_both_modes_and_the_score_counts_both():
    noise = torch.tensor(0.01, dtype=F64)
    x = torch.tensor([[1.0, 0.3], [2.0, -0.5], [3.0, 1.0], [1.5, 0.0]], dtype=F64)
    rule = decoded_evaluation_rule(_folded, 2, 4096, dtype=F64)
    result = evaluate(x, rule, _folded, noise, ess_threshold=math.inf)
    # The starts lie near both signs of z_1 (the modes +-sqrt(x_1)).
    signs = torch.sign(result.start.point[:, :, 0])
    assert torch.all((signs > 0).any(1) & (signs < 0).any(1))
    expected = _folded_log_marginal(x, noise)
    # Measured: at most 0.006 nats; with one start (one Laplace component, the
    # other mode left to the moment-matched and prior ones) up to 0.13.
    torch.testing.assert_close(result.log_marginal, expected, atol=0.02, rtol=0)


def test_spread_best_nodes_are_spaced_and_start_at_the_best():
    generator = torch.Generator().manual_seed(0)
    # 100 nodes: the 64 best spread wide enough for four spaced starts.
    nodes = torch.randn(100, 2, generator=generator, dtype=F64)
    joint = -((nodes - torch.tensor([1.0, 0.0], dtype=F64)).square().sum(1))[None]
    points = adaptive.spread_best_nodes(joint, nodes, 4)[0]
    assert torch.equal(points[0], nodes[joint.argmax()])
    gaps = torch.cdist(points, points) + torch.eye(4, dtype=F64) * 1e9
    assert gaps.min() > adaptive.START_SPACING
    # Each later start is the best candidate spaced from those before it.
    order = joint[0].argsort(descending=True)[: adaptive.START_CANDIDATES]
    for k in range(1, 4):
        spaced = [
            i
            for i in order.tolist()
            if torch.cdist(nodes[i : i + 1], points[:k]).min() > adaptive.START_SPACING
        ]
        assert torch.equal(points[k], nodes[spaced[0]])


def test_a_high_ess_row_whose_posterior_misses_every_node_is_refined():
    # A sharp posterior at the origin (g(z) = 50 z, x = 0) and a rule whose
    # 100 equally weighted nodes all lie on a circle of radius 0.5 around it:
    # every node weighs the same, so the ESS is 100, yet the rule misses the
    # posterior by hundreds of nats.  The mode check finds the mass.
    def steep(z):
        return 50.0 * z

    angles = torch.linspace(0, 2 * math.pi, 101, dtype=F64)[:-1]
    nodes = 0.5 * torch.stack([angles.cos(), angles.sin()], dim=1)
    log_weights = torch.full((100,), -math.log(100), dtype=F64)
    rule = DecodedRule(nodes, log_weights, steep(nodes))
    noise = torch.tensor(1.0, dtype=F64)
    x = torch.zeros(1, 2, dtype=F64)
    unchecked = evaluate(x, rule, steep, noise, check_modes=False)
    checked = evaluate(x, rule, steep, noise)
    # Closed form: x ~ N(0, (2500 + 1) I).
    expected = -math.log(2 * math.pi * 2501.0)
    assert unchecked.ess.item() == pytest.approx(100.0)
    assert not unchecked.low_ess.any()
    assert unchecked.log_marginal.item() < expected - 100
    assert checked.low_ess.all()
    assert checked.log_marginal.item() == pytest.approx(expected, abs=0.02)


# ------------------------------------------------------- the grid's outer layer
#: Closed-form checks of m = 3 at sigma^2 = 1 on the 25^3 evaluation grid
#: (|z| <= 2.88): measured on 20,000 rows, refining the rows with more than
#: EDGE_WEIGHT of their weight on the outer layer left posterior means within
#: 0.035 and log p(x) within 0.018 (0.47 and 0.94 without the check).
EDGE_MEAN_ATOL = 0.05
EDGE_LOG_P_ATOL = 0.03


@pytest.fixture(scope="module")
def wide_posteriors():
    """A linear-Gaussian model with three latents and broad posteriors, its
    rows' exact ``log p(x)`` and ``E[z | x]``, and the evaluation rule."""
    rng = np.random.default_rng(1)
    A = rng.normal(size=(6, 3))
    decoder = torch.nn.Linear(3, 6, bias=False, dtype=F64).requires_grad_(False)
    with torch.no_grad():
        decoder.weight.copy_(torch.tensor(A))
    X = rng.normal(size=(2000, 3)) @ A.T + rng.normal(size=(2000, 6))
    covariance = A @ A.T + np.eye(6)
    exact = multivariate_normal(np.zeros(6), covariance).logpdf(X)
    mean = X @ np.linalg.solve(covariance, A)
    rule = decoded_evaluation_rule(decoder, 3, EVALUATION_NODES, dtype=F64)
    return torch.tensor(X), decoder, rule, exact, mean


def test_rows_the_grid_truncates_are_refined(wide_posteriors):
    x, decoder, rule, exact, mean = wide_posteriors
    noise = torch.tensor(1.0, dtype=F64)
    checked = evaluate(x, rule, decoder, noise)
    unchecked = evaluate(x, rule, decoder, noise, check_edge=False)
    # The edge weight: the posterior weights' sum over the outer layer
    # (squared distances by matrix products: a broadcast would take 2 GB).
    sq = (x**2).sum(1)[:, None] - 2 * x @ rule.g.T + (rule.g**2).sum(1)[None]
    weights = torch.softmax(rule.log_weights - 0.5 * sq, dim=1)
    edge_weight = weights[:, rule.edge].sum(1)
    extra = checked.low_ess & ~unchecked.low_ess
    assert torch.equal(extra, (edge_weight > EDGE_WEIGHT) & ~unchecked.low_ess)
    # Without the check the truncated rows are far off (at high ESS) ...
    far = np.abs(unchecked.posterior_mean.numpy() - mean).max(1) > 4 * EDGE_MEAN_ATOL
    assert far.any() and extra.numpy()[far].all()
    assert (unchecked.ess[torch.from_numpy(far)] > HIGH_DIMENSION_ESS_THRESHOLD).all()
    # ... with it every row is close to the closed form.
    np.testing.assert_allclose(
        checked.posterior_mean.numpy(), mean, rtol=0, atol=EDGE_MEAN_ATOL
    )
    np.testing.assert_allclose(
        checked.log_marginal.numpy(), exact, rtol=0, atol=EDGE_LOG_P_ATOL
    )
    # The box's mass in the weights: the rows inside the box keep a bias of
    # -2.3e-3 nats on average (measured), against +5.8e-3 with weights that
    # sum to one.
    inner = ~checked.low_ess.numpy()
    error = (checked.log_marginal.numpy() - exact)[inner]
    renormalised = error - grid_box_log_mass(3, EVALUATION_NODES)
    assert abs(error.mean()) < 3e-3 < 5e-3 < abs(renormalised.mean())


def test_posterior_draws_of_truncated_rows_come_from_the_adaptive_rule(
    wide_posteriors,
):
    x, decoder, rule, _, mean = wide_posteriors
    noise = torch.tensor(1.0, dtype=F64)
    unchecked = evaluate(x, rule, decoder, noise, refine=False, check_edge=False)
    truncated = evaluate(x, rule, decoder, noise, refine=False).low_ess
    truncated &= ~unchecked.low_ess
    rows = truncated.nonzero().squeeze(1)[:50]
    generator = torch.Generator().manual_seed(0)
    z, _ = resample_posterior(x[rows], rule, decoder, noise, 400, generator=generator)
    # Not the grid's nodes, and centred on the exact posterior: within 5
    # standard errors (posterior sd <= 0.6 here; the grid's own draws were
    # off by up to 0.47).
    reach = rule.nodes.abs().max()
    assert (z.abs() > reach).any()
    A = decoder.weight.numpy()
    sd = np.sqrt(np.diag(np.linalg.inv(np.eye(3) + A.T @ A)))
    error = np.abs(z.numpy().mean(1) - mean[rows.numpy()])
    assert np.all(error < 5 * sd / np.sqrt(400))


# --------------------------------------------------------------- the retry
def _eight_modes():
    """``g(z) = A |z|`` with ``m = 3``: the posterior has a mode in each of
    the eight orthants, all of the same mass, more than the four searches
    of a first pass can reach."""
    rng = np.random.default_rng(0)
    m, n, noise = 3, 8, 0.01
    A = rng.normal(size=(n, m))

    def folded(z):
        return z.abs() @ torch.tensor(A, dtype=z.dtype).T

    Z = rng.uniform(0.6, 1.5, size=(12, m)) * rng.choice([-1, 1], size=(12, m))
    X = np.abs(Z) @ A.T + math.sqrt(noise) * rng.normal(size=(12, n))
    # p(x) = 2^m N(x; 0, A A^T + sigma^2 I) P(z >= 0 | x) under the linear
    # model z -> A z: the orthant's share of its Gaussian posterior.
    linear = multivariate_normal(np.zeros(n), A @ A.T + noise * np.eye(n))
    covariance = np.linalg.inv(A.T @ A / noise + np.eye(m))
    means = X @ A @ covariance / noise
    orthant = [multivariate_normal(np.zeros(m), covariance).cdf(mu) for mu in means]
    exact = m * math.log(2) + linear.logpdf(X) + np.log(orthant)
    return torch.tensor(X), folded, torch.tensor(noise, dtype=F64), exact


def test_rows_whose_searches_all_find_different_modes_are_retried():
    x, folded, noise, exact = _eight_modes()
    rule = decoded_evaluation_rule(folded, 3, 16384, dtype=F64)
    first = evaluate(x, rule, folded, noise, with_mean=False, retry_ess=0.0)
    retried = evaluate(x, rule, folded, noise, with_mean=False)
    # Measured: without the retry 10 of the 12 rows were 0.15-1.5 nats off
    # (about log 2 where the four searches reached four of the eight modes);
    # with it every row within 0.002.
    assert np.abs(first.log_marginal.numpy() - exact).max() > 0.5
    np.testing.assert_allclose(retried.log_marginal.numpy(), exact, atol=0.01)


def test_the_retry_keeps_results_independent_of_the_other_rows():
    x, folded, noise, _ = _eight_modes()

    # Shifted: |z| alone maps nodes z and -z to the same mean, and the
    # starts among such exact ties depend on round-off.
    def shifted(z):
        return folded(z + 0.1)

    rule = decoded_evaluation_rule(shifted, 3, 16384, dtype=F64)
    whole = evaluate(x, rule, shifted, noise, with_mean=False)
    first = evaluate(x, rule, shifted, noise, with_mean=False, retry_ess=0.0)
    # Every row was retried (measured: each moved by 0.28-0.75 nats).
    assert ((whole.log_marginal - first.log_marginal).abs() > 0.1).all()
    for rows in (slice(0, 1), slice(3, 9)):
        part = evaluate(x[rows], rule, shifted, noise, with_mean=False).log_marginal
        torch.testing.assert_close(part, whole.log_marginal[rows], rtol=0, atol=1e-9)


def test_no_row_of_a_unimodal_posterior_is_retried(problem):
    # The linear-Gaussian problem: one mode per row, high ESS; the retry
    # changes nothing.
    x, decoder, noise, rule, _, _ = problem
    with_retry = evaluate(x, rule, decoder, noise, ess_threshold=math.inf)
    without = evaluate(x, rule, decoder, noise, ess_threshold=math.inf, retry_ess=0.0)
    torch.testing.assert_close(with_retry.log_marginal, without.log_marginal)


# ------------------------------------------------- the threshold at m >= 3
def test_five_latents_refine_rows_below_the_higher_threshold():
    # Linear-Gaussian with m = 5 (closed form).  Measured over seeds 0-2: the
    # rows of ESS 30-100 over the 16,384-node prior rule were 0.05-0.06 nats
    # off on average (0.28-0.51 at worst) under the prior rule, 0.013-0.015
    # (0.03-0.04) refined; every row within 0.09 by default.
    rng = np.random.default_rng(0)
    m, n, noise = 5, 13, 1.5
    A = rng.normal(size=(n, m))
    decoder = torch.nn.Linear(m, n, bias=False, dtype=F64).requires_grad_(False)
    with torch.no_grad():
        decoder.weight.copy_(torch.tensor(A))
    X = rng.normal(size=(300, m)) @ A.T + math.sqrt(noise) * rng.normal(size=(300, n))
    exact = multivariate_normal(np.zeros(n), A @ A.T + noise * np.eye(n)).logpdf(X)
    rule = decoded_evaluation_rule(decoder, m, 16384, dtype=F64)
    x, s2 = torch.tensor(X), torch.tensor(noise, dtype=F64)
    assert ess_threshold_for(m) == HIGH_DIMENSION_ESS_THRESHOLD > ESS_THRESHOLD
    assert ess_threshold_for(2) == ESS_THRESHOLD
    default = evaluate(x, rule, decoder, s2, with_mean=False)
    assert torch.equal(default.low_ess, default.ess < HIGH_DIMENSION_ESS_THRESHOLD)
    lenient = evaluate(x, rule, decoder, s2, with_mean=False, ess_threshold=30.0)
    band = ((default.ess >= 30) & (default.ess < 100)).numpy()
    assert band.sum() >= 50
    lenient_error = np.abs(lenient.log_marginal.numpy() - exact)
    default_error = np.abs(default.log_marginal.numpy() - exact)
    assert lenient_error[band].mean() > 0.03 and lenient_error[band].max() > 0.2
    assert default_error[band].mean() < 0.02
    assert default_error.max() < 0.15
