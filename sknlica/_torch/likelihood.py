"""The marginal log-likelihood over a prior rule's nodes, in log space.

For rows ``x_i`` (shape ``(B, n)``), decoded nodes ``g_j = g(z_j)`` (shape
``(K, n)``) and log-weights ``log w_j``::

    log p(x_i) ~= logsumexp_j [log w_j + log N(x_i; g_j, sigma^2 I)].

Two gradients of that estimate (autograd through the fused log-joint, and
the report's hand-derived formulas), and one chunked pass that returns, per
row, the log-likelihood, the posterior mean and the effective sample size of
the posterior weights, with bounded memory.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from sknlica._torch.chunks import PAIRWISE_ELEMENTS, chunk_rows
from sknlica._torch.gaussian import (
    centred,
    effective_sample_size,
    pairwise_log_density,
    pairwise_log_joint,
    pairwise_log_joint_parts,
)


def log_marginal_autograd(x, g, log_weights, noise_variance, centre=None):
    """Per-row ``log p(x_i)``; gradients by backpropagation through logsumexp.

    Arguments as :func:`~sknlica._torch.gaussian.pairwise_log_joint_parts`.
    """
    joint = pairwise_log_joint(x, g, log_weights, noise_variance, centre)
    return torch.logsumexp(joint, 1)


class _LogMarginalAnalytic(torch.autograd.Function):
    """Per-row ``log p(x_i)`` with the report's section 3.1 gradients.

    With posterior weights ``W_ij = softmax_j(log w_j + log phi_ij)`` and the
    noise variance ``psi`` (a scalar, or one per feature), featurewise:

    * ``d/dg_j   = sum_i W_ij (x_i - g_j) / psi``  (then one VJP through g),
    * ``d/dpsi_k = sum_ij W_ij ((x_ik - g_jk)^2 / psi_k - 1) / (2 psi_k)``,
      summed over the features for a scalar ``psi``,
    * ``d/dx_i   = sum_j W_ij (g_j - x_i) / psi``,
    * ``d/dlog w_j = sum_i W_ij``.

    Each is weighted by the incoming per-row gradient; the squared residuals
    are summed over rows and nodes by three products, never formed as a
    ``B x K x n`` tensor.  The forward pass is the unfused expansion (not the
    ``addmm`` of autograd's path); only the ``B x K`` log-joint is saved.
    """

    @staticmethod
    def forward(ctx, x, g, log_weights, noise_variance, centre):
        log_joint = log_weights + pairwise_log_density(x, g, noise_variance, centre)
        log_marginal = torch.logsumexp(log_joint, dim=1)
        ctx.save_for_backward(x, g, noise_variance, log_joint, log_marginal)
        ctx.centre = centre
        return log_marginal

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, g, noise_variance, log_joint, log_marginal = ctx.saved_tensors
        # Posterior weights scaled by the upstream gradient of each row.
        weighted = torch.exp(log_joint - log_marginal[:, None]) * grad_output[:, None]
        grad_x = grad_g = grad_log_weights = grad_noise_variance = None
        # Centre as in the forward pass: both gradients are differences x - g,
        # and uncentred products lose all float32 precision for large means.
        x, g = centred(x, g, ctx.centre)
        weighted_g = weighted @ g
        column_mass = weighted.sum(0)
        if ctx.needs_input_grad[0]:
            grad_x = (weighted_g - grad_output[:, None] * x) / noise_variance
        if ctx.needs_input_grad[1]:
            grad_g = (weighted.T @ x - column_mass[:, None] * g) / noise_variance
        if ctx.needs_input_grad[2]:
            grad_log_weights = column_mass
        if ctx.needs_input_grad[3]:
            # sum_ij W_ij (x_ik - g_jk)^2, feature by feature.
            residual = (
                (grad_output[:, None] * x * x).sum(0)
                - 2 * (x * weighted_g).sum(0)
                + (column_mass[:, None] * g * g).sum(0)
            )
            per_feature = (residual / noise_variance - grad_output.sum()) / (
                2 * noise_variance
            )
            if per_feature.shape != noise_variance.shape:
                per_feature = per_feature.sum().reshape(noise_variance.shape)
            grad_noise_variance = per_feature
        return grad_x, grad_g, grad_log_weights, grad_noise_variance, None


def log_marginal_analytic(x, g, log_weights, noise_variance, centre=None):
    """Per-row ``log p(x_i)``; gradients from the hand-derived formulas.

    Arguments as :func:`~sknlica._torch.gaussian.pairwise_log_joint_parts`.
    """
    return _LogMarginalAnalytic.apply(x, g, log_weights, noise_variance, centre)


GRADIENTS = {"autograd": log_marginal_autograd, "analytic": log_marginal_analytic}


class PriorRulePass(NamedTuple):
    """Per-row results of one pass over a prior rule's nodes."""

    #: ``log p(x_i)``, shape ``(B,)``.
    log_marginal: torch.Tensor
    #: ``E[z | x_i] ~= sum_j W_ij z_j``, shape ``(B, m)``; only given ``nodes``.
    posterior_mean: torch.Tensor | None
    #: Effective sample size of the posterior weights, shape ``(B,)``; only
    #: with ``with_ess=True``.
    ess: torch.Tensor | None
    #: Index of each row's node of largest posterior weight, shape ``(B,)``;
    #: only with ``with_best=True``.
    best: torch.Tensor | None = None
    #: Posterior weight of the nodes in ``edge``, shape ``(B,)``; only given
    #: ``edge``.
    edge_weight: torch.Tensor | None = None


@torch.no_grad()
def prior_rule_pass(
    x: torch.Tensor,
    g: torch.Tensor,
    log_weights: torch.Tensor,
    noise_variance: torch.Tensor,
    *,
    nodes: torch.Tensor | None = None,
    with_ess: bool = False,
    with_best: bool = False,
    edge: torch.Tensor | None = None,
    centre: torch.Tensor | None = None,
    max_elements: int = PAIRWISE_ELEMENTS,
) -> PriorRulePass:
    """Per-row log-likelihood, and optionally posterior mean, ESS, best
    node and posterior weight of the nodes in ``edge`` (a boolean mask over
    the nodes), in chunks.

    ``g`` holds the decoded ``nodes``; the posterior mean needs the nodes
    themselves.  Rows are independent given the shared nodes, so the results
    do not depend on the chunking.
    """
    n_rows = x.shape[0]
    # Preallocated outputs filled chunk by chunk: lists of small per-chunk
    # results interleaved with the large temporaries pinned glibc's heap, and
    # a validation pass over 100k rows grew the process by 1.9 GB
    # (benchmarks/bench_scaling.py, tests/test_estimator_contract.py).
    log_marginal = x.new_empty(n_rows)
    mean = None if nodes is None else x.new_empty((n_rows, nodes.shape[1]))
    ess = x.new_empty(n_rows) if with_ess else None
    best = x.new_empty(n_rows, dtype=torch.long) if with_best else None
    edge_weight = None if edge is None else x.new_empty(n_rows)
    # The mask as 0/1 weights: a row's edge weight is one product.
    on_edge = None if edge is None else edge.to(x.dtype)
    step = chunk_rows(g.shape[0], max_elements)
    for first in range(0, n_rows, step):
        rows = slice(first, first + step)
        cross, row_terms = pairwise_log_joint_parts(
            x[rows], g, log_weights, noise_variance, centre
        )
        cross_marginal = torch.logsumexp(cross, dim=1)
        # -inf (never NaN) for a row whose norm overflows.
        log_marginal[rows] = torch.where(
            torch.isinf(row_terms[:, 0]), -math.inf, cross_marginal - row_terms[:, 0]
        )
        if best is not None:
            best[rows] = cross.argmax(dim=1)
        if mean is None and ess is None and edge_weight is None:
            continue
        # Posterior weights without the row term, which they do not depend on.
        log_posterior = cross - cross_marginal[:, None]
        if ess is not None:
            ess[rows] = effective_sample_size(log_posterior)
        if mean is None and edge_weight is None:
            continue
        weights = torch.exp(log_posterior)
        if mean is not None:
            mean[rows] = weights @ nodes
        if edge_weight is not None:
            edge_weight[rows] = weights @ on_edge
    return PriorRulePass(log_marginal, mean, ess, best, edge_weight)


def log_marginal_chunked(x, g, log_weights, noise_variance, **options):
    """``log p(x_i)`` for many rows with bounded peak memory (no gradient).

    :func:`prior_rule_pass` without the posterior moments; ``options`` are its
    keywords (``centre``, ``max_elements``).
    """
    return prior_rule_pass(x, g, log_weights, noise_variance, **options).log_marginal
