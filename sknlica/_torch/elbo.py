"""Variational bounds on ``log p(x)``: SGVB, IWAE, score-function surrogates.

The model is the report's (section 3.2): ``z ~ N(0, I_m)``, ``x | z ~ N(g(z),
s^2 I_n)`` with an encoder ``q(z | x) = N(mu(x), diag exp(log_var(x)))``.
A draw is reparameterised as ``z = mu + exp(log_var / 2) * eps`` with ``eps ~
N(0, I)``.  For the ``K`` draws ``z_k`` of a row the log importance weights
are ``log w_k = log p(x | z_k) + log p(z_k) - log q(z_k | x)``, and

* the SGVB ELBO is ``mean_k log p(x | z_k) - KL(q || N(0, I))``, KL analytic;
* the IWAE bound is ``logsumexp_k log w_k - log K`` (the notes' importance
  sampling bound; ELBO <= IWAE_K <= IWAE_K' <= log p(x) in expectation);
* with ``K`` large and the draws shared by all rows, the same quantity is the
  importance-sampling estimate of ``log p(x)`` itself.

A ``decode`` callable maps latents of shape ``(..., m)`` to ``(mean,
variance)``: ``mean`` of shape ``(..., n)`` and ``variance`` a scalar tensor
(one ``sigma^2`` for all rows), one variance per feature ``(n,)``, or of shape
``(..., 1)`` (the report's head ``log s^2 = W_2 h + b_2``); see
``gaussian.gaussian_log_density``.  Shapes below: ``x`` is ``(B, n)``,
``mean``/``log_var`` ``(B, m)``, draws ``eps`` ``(K, B, m)`` (fresh per row in
training) or ``(K, m)`` (shared by all rows at evaluation), weights ``(K, B)``.

Nothing here imports scikit-learn; everything takes and returns tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sknlica._torch.chunks import IMPORTANCE_ELEMENTS
from sknlica._torch.gaussian import (
    diagonal_normal_log_density,
    gaussian_log_density,
    kl_to_standard_normal,
    reparameterize,
    standard_normal_log_density,
)

Decode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------- bounds
def log_importance_weights(
    x: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    log_var: torch.Tensor,
    decode: Decode,
    *,
    prior_weight: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log w = log p(x | z) + prior_weight * (log p(z) - log q(z | x))``.

    ``prior_weight`` is the KL weight ``beta`` (1 gives the true weights).
    Returns ``(log_w, log_likelihood, log_q)``, each of shape ``(K, B)``.
    """
    g, variance = decode(z)
    log_likelihood = gaussian_log_density(x, g, variance)
    log_q = diagonal_normal_log_density(z, mean, log_var)
    log_w = log_likelihood + prior_weight * (standard_normal_log_density(z) - log_q)
    return log_w, log_likelihood, log_q


def sgvb_elbo(
    log_likelihood: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """SGVB estimate ``mean_k log p(x | z_k) - beta * KL`` per row, shape ``(B,)``."""
    return log_likelihood.mean(0) - beta * kl


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """``logsumexp_k log w_k - log K`` per row, shape ``(B,)``."""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


# --------------------------------------------------- score-function gradients
def _score(log_q: torch.Tensor) -> torch.Tensor:
    # Zero in value, grad log q(z | x) in gradient (z itself is detached).
    return log_q - log_q.detach()


def leave_one_out_baseline(values: torch.Tensor) -> torch.Tensor:
    """For each draw, the mean of ``values`` over the *other* draws (axis 0).

    Independent of draw ``k`` itself, so subtracting it leaves the
    score-function gradient unbiased.  Needs at least two draws.
    """
    n_draws = values.shape[0]
    if n_draws < 2:
        raise ValueError(
            f"A leave-one-out baseline needs at least 2 draws, got {n_draws}."
        )
    values = values.detach()
    return (values.sum(0, keepdim=True) - values) / (n_draws - 1)


def score_function_elbo(
    log_likelihood: torch.Tensor,
    log_q: torch.Tensor,
    kl: torch.Tensor,
    baseline: torch.Tensor,
    *,
    beta: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Surrogate with the SGVB ELBO as value and the log-derivative gradient.

    ``log_likelihood`` and ``log_q`` are evaluated at draws ``z`` detached
    from the encoder, so the encoder gradient of the reconstruction term is
    ``mean_k (log p(x | z_k) - b_k) grad log q(z_k | x)`` (notes 002, lemma
    1.2, with a baseline ``b_k`` that does not depend on ``z_k``); the KL term
    stays analytic and the decoder gradient is the usual ``grad log p(x | z)``.
    """
    signal = (log_likelihood - baseline).detach()
    return (log_likelihood + signal * _score(log_q)).mean(0) - beta * kl


def vimco_iwae(log_w: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Surrogate with the IWAE bound as value and the VIMCO gradient.

    Mnih & Rezende (2016): the learning signal of draw ``k`` is the bound
    minus the bound with ``log w_k`` replaced by the mean of the other
    log-weights, a baseline independent of ``z_k``.  ``log_w`` and ``log_q``
    are evaluated at draws detached from the encoder; ``log_w`` still carries
    the direct ``-log q`` dependence, which autograd differentiates.
    """
    n_draws = log_w.shape[0]
    if n_draws < 2:
        raise ValueError(f"VIMCO needs at least 2 importance draws, got {n_draws}.")
    bound = iwae_bound(log_w)
    detached = log_w.detach()
    replaced = detached.expand(n_draws, *detached.shape).clone()
    diagonal = torch.arange(n_draws, device=log_w.device)
    replaced[diagonal, diagonal] = leave_one_out_baseline(detached)
    leave_one_out = torch.logsumexp(replaced, 1) - math.log(n_draws)
    signal = bound.detach() - leave_one_out
    return bound + (signal * _score(log_q)).sum(0)


# ------------------------------------------------------------- evaluation
@torch.no_grad()
def importance_sampled_log_likelihood(
    x: torch.Tensor,
    mean: torch.Tensor,
    log_var: torch.Tensor,
    decode: Decode,
    eps: torch.Tensor,
    *,
    width: int | None = None,
    max_elements: int = IMPORTANCE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-sampling ``log p(x)`` and the ELBO, with draws shared by all rows.

    ``eps`` has shape ``(K, m)``: every row uses ``z_k = mu + s * eps_k``, so
    a row's estimate depends on no other row (subset invariance) and is
    deterministic for fixed ``eps``.  Returns per-row ``(log_px, elbo)`` with
    ``log_px = logsumexp_k log w_k - log K`` (the encoder is the proposal) and
    ``elbo = mean_k log p(x | z_k) - KL``.

    Rows and draws are processed in chunks so that no temporary exceeds about
    ``max_elements`` entries (``width`` is the widest layer the decoder
    produces per latent; ``x.shape[1]`` by default).  Both sums are carried
    across draw chunks exactly (a running logsumexp), so the result does not
    depend on the chunking beyond round-off.
    """
    n_draws = eps.shape[0]
    width = max(width or x.shape[1], 1)
    rows_per_chunk = max(1, max_elements // (n_draws * width))
    draws_per_chunk = max(1, min(n_draws, max_elements // width))
    kl = kl_to_standard_normal(mean, log_var)
    # Preallocated outputs: see sknlica._torch.likelihood.log_marginal_chunked.
    log_px = x.new_empty(x.shape[0])
    mean_log_lik = x.new_empty(x.shape[0])
    for start in range(0, x.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        lse, total = [], 0.0
        for first in range(0, n_draws, draws_per_chunk):
            e = eps[first : first + draws_per_chunk, None, :]
            z = reparameterize(mean[rows], log_var[rows], e)
            log_w, log_lik, _ = log_importance_weights(
                x[rows], z, mean[rows], log_var[rows], decode
            )
            lse.append(torch.logsumexp(log_w, 0))
            total = total + log_lik.sum(0)
        log_px[rows] = torch.logsumexp(torch.stack(lse), 0) - math.log(n_draws)
        mean_log_lik[rows] = total / n_draws
    return log_px, mean_log_lik - kl
