"""Sampling a posterior with Metropolis-adjusted Langevin steps (MALA)."""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Acceptance rate MALA step sizes are tuned towards (Roberts & Rosenthal, 1998).
TARGET_ACCEPTANCE = 0.574


def mala(
    log_target: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    *,
    n_steps: int,
    step_size: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Run ``n_steps`` Metropolis-adjusted Langevin steps on every chain at once.

    Parameters
    ----------
    log_target : callable
        Maps latents of shape ``(R, S, m)`` to the log target density of each,
        ``(R, S)``, with torch ops (differentiable); constants may be dropped.
        For a model's posterior ``p(z | x_r)`` that is ``log p(x_r, z)``.
    z : Tensor of shape (R, S, m)
        Starting points: ``S`` chains for each of ``R`` targets.
    n_steps : int
        Steps per chain.  The step size ``h`` (shape ``(R,)``, started at
        ``step_size``) is adapted per target towards
        :data:`TARGET_ACCEPTANCE` during the first half and frozen after, so
        the second half is a valid MCMC kernel for the target.
    step_size : Tensor of shape (R,)
    generator : torch.Generator

    Returns
    -------
    z : Tensor of shape (R, S, m)
        The chains' final states (detached).
    """
    n_adapt = n_steps // 2

    def value_and_grad(state):
        state = state.detach().requires_grad_(True)
        with torch.enable_grad():
            value = log_target(state)
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
