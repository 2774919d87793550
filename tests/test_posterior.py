"""``sknlica._torch.posterior.mala`` on targets whose moments are known.

The target is a correlated 2-D Gaussian given only through its log density
(up to a constant), as the estimators give ``log p(x, z)``.  The chains start
from N(0, I), far from the targets' means, so a kernel that did not move them
(or moved them to the wrong place) fails by tens of standard errors.
"""

from __future__ import annotations

import torch

from sknlica._torch.posterior import mala

F64 = torch.float64

#: Independent chains per target: their final states are (after burn-in)
#: independent draws, so sample moments have the usual standard errors.
N_CHAINS = 2000
#: Steps per chain: 20 adapting the step size, 20 at the frozen size.  From
#: N(0, I) starts at a step size of 0.5, measured errors over ten seeds were
#: at most 2.4 standard errors (means) and 2.2 (covariance entries).
N_STEPS = 40
#: "Within a few standard errors": a two-sided 5-sigma band.
N_SE = 5.0

#: Two targets, one per row: means and covariances.
MEANS = torch.tensor([[1.0, -2.0], [0.0, 3.0]], dtype=F64)
COVARIANCES = torch.tensor(
    [[[1.0, 0.8], [0.8, 1.0]], [[0.25, -0.1], [-0.1, 0.5]]], dtype=F64
)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _log_target(z):
    """``log N(z; mean_r, cov_r)`` up to a constant, for z of shape (R, S, m)."""
    precision = torch.linalg.inv(COVARIANCES)
    centred = z - MEANS[:, None, :]
    return -0.5 * ((centred @ precision) * centred).sum(-1)


def _start(seed=0, n_chains=N_CHAINS):
    return torch.randn(2, n_chains, 2, generator=_generator(seed), dtype=F64)


def _run(z, n_steps=N_STEPS, seed=1):
    return mala(
        _log_target,
        z,
        n_steps=n_steps,
        step_size=torch.full((2,), 0.5, dtype=F64),
        generator=_generator(seed),
    )


def test_mala_reaches_the_mean_and_covariance_of_a_correlated_gaussian():
    z = _run(_start())
    for row in range(2):
        draws, mean, cov = z[row], MEANS[row], COVARIANCES[row]
        # Means: standard error sqrt(Sigma_ii / S).
        se = torch.sqrt(torch.diagonal(cov) / N_CHAINS)
        assert torch.all((draws.mean(0) - mean).abs() <= N_SE * se), row
        # Sample covariances: var(S_ij) = (Sigma_ij^2 + Sigma_ii Sigma_jj) / (S - 1).
        variances = torch.diagonal(cov)
        cov_se = torch.sqrt(
            (cov.square() + variances[:, None] * variances[None, :]) / (N_CHAINS - 1)
        )
        assert torch.all((torch.cov(draws.T) - cov).abs() <= N_SE * cov_se), row


def test_the_start_is_far_from_the_target():
    # The oracle above is discriminating: the starting points fail it.
    z = _start()
    se = torch.sqrt(torch.diagonal(COVARIANCES, dim1=1, dim2=2) / N_CHAINS)
    assert torch.any((z.mean(1) - MEANS).abs() > 10 * N_SE * se)


def test_output_is_detached_with_the_shape_and_dtype_of_the_start():
    z = _start(n_chains=5).requires_grad_(True)
    out = _run(z, n_steps=4)
    assert out.shape == z.shape and out.dtype == z.dtype
    assert not out.requires_grad and out.grad_fn is None
    assert torch.all(torch.isfinite(out))
    # Some proposals were accepted.
    assert not torch.equal(out, z.detach())


def test_zero_steps_return_the_start():
    z = _start(n_chains=5)
    out = _run(z, n_steps=0)
    assert torch.equal(out, z)
    assert not out.requires_grad


def test_same_generator_same_chains():
    a = _run(_start(n_chains=50), n_steps=6, seed=3)
    b = _run(_start(n_chains=50), n_steps=6, seed=3)
    c = _run(_start(n_chains=50), n_steps=6, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_is_untouched():
    state = torch.get_rng_state()
    _run(_start(n_chains=10), n_steps=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_tiny_step_barely_moves_the_chains():
    # With h -> 0 every proposal is z + O(h): after the adaptation (which at
    # most multiplies h by 1.1 per step) the chains are within a few h of the
    # start, whatever the target.
    z = _start(n_chains=200)
    h = 1e-6
    out = mala(
        _log_target,
        z,
        n_steps=4,
        step_size=torch.full((2,), h, dtype=F64),
        generator=_generator(0),
    )
    # Four steps of (h^2 / 2) |grad| + h |noise| with h <= 1.1^2 * 1e-6.
    assert (out - z).abs().max() < 4 * 1.21 * h * 10
