"""Every Gaussian density the models use, written once.

The model is ``z ~ N(0, I_m)``, ``x | z ~ N(g(z), sigma^2 I_n)``; encoders
and proposals are Gaussians with diagonal or full covariances.  Everything
here keeps the normalising constants, so that densities of different
components can be mixed and compared, and works on any batch shape (the
last axis is the event axis) unless it says otherwise.

Pairwise forms (``rows x nodes``) expand the squared distance as ``||x||^2 -
2 x.g + ||g||^2`` so that the largest temporary is ``B x K``, never ``B x K
x n``.  Both sides are first shifted by a ``centre`` near the data, which is
exact (the distance is translation invariant) and keeps the expansion from
cancelling catastrophically in float32 when the features have a large mean.
The centre must come from fitted state (the training mean), never from the
rows passed: otherwise one outlying row would change every other row's
value.  ``centre=None`` means no shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

LOG_2PI = math.log(2 * math.pi)


# ------------------------------------------------------------ single points
def isotropic_log_density_from_squared(
    squared: torch.Tensor, variance: torch.Tensor, n_features: int
) -> torch.Tensor:
    """``log N(x; g, variance I)`` from the squared distance ``||x - g||^2``."""
    return -0.5 * (n_features * torch.log(2 * math.pi * variance) + squared / variance)


def gaussian_log_density(
    x: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor
) -> torch.Tensor:
    """``log N(x; mean, diag(variance))`` summed over the last axis.

    ``variance`` is a scalar tensor (isotropic noise), has shape ``(n,)``
    (one variance per feature: ``noise="diagonal"``), or has the batch shape
    of ``mean`` with a trailing axis of length 1 (one variance per row: the
    VAE's amortised head).
    """
    residual = (x - mean).square()
    n_features = x.shape[-1]
    if _per_feature(variance, n_features):
        log_normaliser = torch.log(2 * math.pi * variance).sum()
        return -0.5 * (log_normaliser + (residual / variance).sum(-1))
    if variance.ndim:
        variance = variance[..., 0]
    return isotropic_log_density_from_squared(residual.sum(-1), variance, n_features)


def _per_feature(variance: torch.Tensor, n_features: int) -> bool:
    """Whether ``variance`` holds one noise variance per feature."""
    return variance.ndim == 1 and variance.shape[0] == n_features and n_features > 1


def noise_log_normaliser(noise_variance: torch.Tensor, n_features: int):
    """``sum_k log(2 pi psi_k)``: ``n log(2 pi s2)`` for a scalar variance."""
    if _per_feature(noise_variance, n_features):
        return torch.log(2 * math.pi * noise_variance).sum()
    return n_features * torch.log(2 * math.pi * noise_variance)


def standard_normal_log_density(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over the last axis."""
    return -0.5 * (z.square().sum(-1) + z.shape[-1] * LOG_2PI)


def diagonal_normal_log_density(
    z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor
) -> torch.Tensor:
    """``log N(z; mean, diag exp(log_var))`` summed over the last axis."""
    terms = (z - mean).square() * torch.exp(-log_var) + log_var + LOG_2PI
    return -0.5 * terms.sum(-1)


def cholesky_normal_log_density(
    z: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor
) -> torch.Tensor:
    """``log N(z_bk; mean_b, L_b L_b^T)``, ``z`` of shape ``(B, K, m)``."""
    centred = (z - mean[:, None, :]).transpose(1, 2)  # (B, m, K)
    white = torch.linalg.solve_triangular(factor, centred, upper=False)
    log_det = torch.log(torch.diagonal(factor, dim1=1, dim2=2)).sum(1)
    m = z.shape[-1]
    return -0.5 * (white.square().sum(1) + m * LOG_2PI) - log_det[:, None]


def latent_log_joint(
    x: torch.Tensor,
    z: torch.Tensor,
    decoder: Callable[[torch.Tensor], torch.Tensor],
    noise_variance: torch.Tensor,
) -> torch.Tensor:
    """The model's ``log p(x_i, z_ik) = log N(x_i; g(z_ik), s2 I) + log N(z_ik; 0, I)``.

    ``x`` has shape ``(B, n)`` and ``z`` shape ``(B, K, m)``: ``K`` latents per
    row, decoded in one call on ``B * K`` points.  Returns ``(B, K)``.
    """
    rows, n_nodes, n_components = z.shape
    g = decoder(z.reshape(rows * n_nodes, n_components)).reshape(rows, n_nodes, -1)
    return gaussian_log_density(
        x[:, None, :], g, noise_variance
    ) + standard_normal_log_density(z)


def kl_to_standard_normal(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, diag exp(log_var)) || N(0, I))`` summed over the last axis.

    The report's closed form ``-1/2 sum_j (1 + log s_j^2 - mu_j^2 - s_j^2)``.
    """
    return 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var).sum(-1)


def reparameterize(
    mean: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """``z = mean + exp(log_var / 2) * eps``; ``eps`` broadcasts against ``mean``."""
    return mean + torch.exp(0.5 * log_var) * eps


def standard_normal_draws(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``N(0, I)`` draws from ``generator`` (on the CPU, then moved: reproducible)."""
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def effective_sample_size(log_posterior: torch.Tensor) -> torch.Tensor:
    """``1 / sum_j W_j^2`` of normalised log-weights over the last axis."""
    return torch.exp(-torch.logsumexp(2 * log_posterior, dim=-1))


# --------------------------------------------------------- rows x nodes
def centred(
    x: torch.Tensor, g: torch.Tensor, centre: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``g`` shifted by ``centre`` (unchanged when it is ``None``)."""
    if centre is None:
        return x, g
    return x - centre, g - centre


def squared_distances(
    x: torch.Tensor, g: torch.Tensor, centre: torch.Tensor | None = None
) -> torch.Tensor:
    """``||x_i - g_j||^2`` for all pairs, shape ``(B, K)``, via one matmul."""
    x, g = centred(x, g, centre)
    sq = (x * x).sum(1, keepdim=True) - 2.0 * (x @ g.T) + (g * g).sum(1)
    return sq.clamp_min(0.0)


def whitened(
    x: torch.Tensor,
    g: torch.Tensor,
    noise_variance: torch.Tensor,
    centre: torch.Tensor | None,
):
    """``x`` and ``g`` centred, in units of the noise, and what remains.

    Returns ``(x, g, inverse_variance, log_normaliser)`` such that ``log
    N(x_i; g_j, noise) = -(log_normaliser + ||x_i - g_j||^2 inverse_variance)
    / 2``: a scalar noise variance is kept as a factor (one multiplication of
    the product); per-feature variances ``(n,)`` are divided out of the
    features, leaving unit variance.
    """
    x, g = centred(x, g, centre)
    log_normaliser = noise_log_normaliser(noise_variance, x.shape[1])
    if _per_feature(noise_variance, x.shape[1]):
        inverse_sd = torch.rsqrt(noise_variance)
        return x * inverse_sd, g * inverse_sd, 1.0, log_normaliser
    return x, g, 1.0 / noise_variance, log_normaliser


def pairwise_log_density(
    x: torch.Tensor,
    g: torch.Tensor,
    noise_variance: torch.Tensor,
    centre: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log N(x_i; g_j, noise)`` for all pairs, shape ``(B, K)``."""
    x, g, inverse_variance, log_normaliser = whitened(x, g, noise_variance, centre)
    return -0.5 * (log_normaliser + squared_distances(x, g) * inverse_variance)


def pairwise_log_joint_parts(
    x: torch.Tensor,
    g: torch.Tensor,
    log_weights: torch.Tensor,
    noise_variance: torch.Tensor,
    centre: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pairwise_log_joint` as ``(node and cross terms, row terms)``.

    ``x`` is ``(B, n)``, ``g`` the decoded nodes ``(K, n)``, ``log_weights``
    ``(K,)``, ``noise_variance`` a scalar tensor or one variance per feature
    ``(n,)``, and ``centre`` ``(n,)`` or ``None``.

    The log-joint is the first minus the second, ``(B, K) - (B, 1)``.  The
    row terms ``||x_i||^2 / (2 s2)`` do not depend on the node, so the first
    part alone gives each row's posterior weights, even for a row so far
    away that its row term overflows.  Fused into one ``addmm``: the node
    terms ``log w_j - n/2 log(2 pi s2) - ||g_j||^2 / (2 s2)`` form the bias
    row and ``x.g / s2`` the product, so the ``B x K`` matrix is written once
    or twice instead of about eight times.  Per-feature variances are
    divided out of ``x`` and ``g`` first (:func:`whitened`).
    """
    x, g, inverse_variance, log_normaliser = whitened(x, g, noise_variance, centre)
    node_terms = log_weights - 0.5 * (
        log_normaliser + (g * g).sum(1) * inverse_variance
    )
    row_terms = (0.5 * inverse_variance) * (x * x).sum(1, keepdim=True)
    return torch.addmm(node_terms, x * inverse_variance, g.T), row_terms


def pairwise_log_joint(x, g, log_weights, noise_variance, centre=None):
    """``log w_j + log N(x_i; g_j, s2 I)``, shape ``(B, K)``: the hot path.

    Arguments and the fused computation as :func:`pairwise_log_joint_parts`.
    A row so far away that its norm overflows gets ``-inf`` (never NaN).
    """
    cross, row_terms = pairwise_log_joint_parts(
        x, g, log_weights, noise_variance, centre
    )
    joint = cross - row_terms
    overflow = torch.isinf(row_terms)
    if bool(overflow.any()):  # inf - inf would be NaN; checked to keep one pass
        joint = torch.where(overflow, -math.inf, joint)
    return joint
