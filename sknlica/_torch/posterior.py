"""Sampling the posterior p(z | x) under a decoder: MALA from resampled nodes."""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Acceptance rate MALA step sizes are tuned towards (Roberts & Rosenthal, 1998).
TARGET_ACCEPTANCE = 0.574


def log_joint(
    x: torch.Tensor,
    z: torch.Tensor,
    decoder: Callable[[torch.Tensor], torch.Tensor],
    noise_variance: torch.Tensor,
) -> torch.Tensor:
    """``log p(x, z)`` up to its z-independent constant; ``z`` is ``(R, S, m)``."""
    residual = x[:, None, :] - decoder(z)
    return -0.5 * (residual.square().sum(-1) / noise_variance + z.square().sum(-1))


def mala(
    x: torch.Tensor,
    z: torch.Tensor,
    decoder: Callable[[torch.Tensor], torch.Tensor],
    noise_variance: torch.Tensor,
    *,
    n_steps: int,
    step_size: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Run ``n_steps`` Metropolis-adjusted Langevin steps on every chain at once.

    ``z`` has shape ``(R, S, m)``: ``S`` chains for each of the ``R`` rows of
    ``x``.  ``step_size`` (shape ``(R,)``) is adapted per row during the first
    half of the steps and frozen afterwards, so the second half is a valid
    MCMC kernel targeting p(z | x).
    """
    n_adapt = n_steps // 2

    def value_and_grad(state):
        state = state.detach().requires_grad_(True)
        with torch.enable_grad():
            value = log_joint(x, state, decoder, noise_variance)
            (grad,) = torch.autograd.grad(value.sum(), state)
        return value.detach(), grad

    def log_proposal(to, frm, grad_frm, h):
        mean = frm + 0.5 * h[:, None, None] ** 2 * grad_frm
        return -((to - mean).square().sum(-1)) / (2 * h[:, None] ** 2)

    value, grad = value_and_grad(z)
    h = step_size.clone()
    for step in range(n_steps):
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        proposal = z + 0.5 * h[:, None, None] ** 2 * grad + h[:, None, None] * noise
        new_value, new_grad = value_and_grad(proposal)
        log_ratio = (
            new_value
            - value
            + log_proposal(z, proposal, new_grad, h)
            - log_proposal(proposal, z, grad, h)
        )
        uniform = torch.rand(log_ratio.shape, generator=generator, dtype=z.dtype)
        accept = torch.log(uniform.to(z.device)) < log_ratio
        z = torch.where(accept[..., None], proposal, z)
        value = torch.where(accept, new_value, value)
        grad = torch.where(accept[..., None], new_grad, grad)
        if step < n_adapt:
            rate = accept.to(z.dtype).mean(1)
            h = h * torch.where(rate > TARGET_ACCEPTANCE, 1.1, 0.9).to(h.dtype)
    return z.detach()
