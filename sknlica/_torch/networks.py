"""Multilayer perceptrons used as decoders g(z) and Gaussian encoders q(z | x)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


def make_mlp(
    n_inputs: int,
    hidden_layer_sizes: Sequence[int],
    n_outputs: int,
    *,
    activation: str = "relu",
    output_activation: str = "identity",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """Build ``Linear -> act -> ... -> Linear -> output_act``.

    Weights are drawn from ``generator`` (PyTorch's default Kaiming-uniform
    scheme) so that a seeded estimator never touches the global RNG.
    """
    sizes = [n_inputs, *hidden_layer_sizes, n_outputs]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = _seeded_linear(fan_in, fan_out, dtype, device, generator)
        layers.append(linear)
        is_last = i == len(sizes) - 2
        layers.append(ACTIVATIONS[output_activation if is_last else activation]())
    return nn.Sequential(*layers)


def _seeded_linear(fan_in, fan_out, dtype, device, generator) -> nn.Linear:
    # skip_init: nn.Linear's own initialisation would draw from the global RNG.
    linear = torch.nn.utils.skip_init(
        nn.Linear, fan_in, fan_out, dtype=dtype, device=device
    )
    _reset_linear(linear, generator)
    return linear


@torch.no_grad()
def _reset_linear(linear: nn.Linear, generator: torch.Generator | None) -> None:
    # Same bounds as nn.Linear.reset_parameters (kaiming_uniform with a=sqrt(5)),
    # drawn from our own generator.
    bound = 1.0 / linear.in_features**0.5 if linear.in_features > 0 else 0.0
    for param in (linear.weight, linear.bias):
        noise = torch.rand(
            param.shape, generator=generator, dtype=param.dtype, device="cpu"
        )
        param.copy_((2 * noise - 1).mul_(bound).to(param.device))


class GaussianHead(nn.Module):
    """An MLP trunk with two linear heads: a mean and a log-variance.

    Used as the VAE encoder q(z | x) = N(mu(x), diag exp(log_var(x))).
    """

    def __init__(
        self,
        n_inputs: int,
        hidden_layer_sizes: Sequence[int],
        n_outputs: int,
        *,
        activation: str = "relu",
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        last = hidden_layer_sizes[-1] if hidden_layer_sizes else n_inputs
        self.trunk = (
            make_mlp(
                n_inputs,
                hidden_layer_sizes[:-1],
                last,
                activation=activation,
                output_activation=activation,
                dtype=dtype,
                device=device,
                generator=generator,
            )
            if hidden_layer_sizes
            else nn.Identity()
        )
        self.mean = _seeded_linear(last, n_outputs, dtype, device, generator)
        self.log_var = _seeded_linear(last, n_outputs, dtype, device, generator)
        with torch.no_grad():
            # Start close to the prior's unit variance: small log-variances.
            self.log_var.weight.mul_(0.1)
            self.log_var.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.mean(h), self.log_var(h)


class NoiseVariance(nn.Module):
    """The observation noise variance, learned on the log scale or fixed.

    One variance for all features (a scalar) or one per feature (``initial``
    and ``floor`` of shape ``(n,)``: the nonlinear analogue of factor
    analysis).  Learned: ``variance = floor + exp(raw)`` so it stays above
    ``floor`` (which keeps the likelihood bounded when the decoder
    interpolates a row exactly).  Fixed: a buffer holding the variance
    itself, no floor.
    """

    def __init__(
        self,
        initial,
        *,
        learn: bool,
        floor,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.learn = learn
        value = torch.as_tensor(initial, dtype=dtype).to(device)
        floor = torch.as_tensor(floor, dtype=dtype).to(device) * float(learn)
        self.register_buffer("floor", floor)
        if learn:
            excess = torch.maximum(value - floor, floor)
            self.raw = nn.Parameter(torch.log(excess))
        else:
            self.register_buffer("raw", value.clone())

    def forward(self) -> torch.Tensor:
        if self.learn:
            return self.floor + torch.exp(self.raw)
        return self.raw


def soft_clamp(value: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Smoothly squash ``value`` into ``(low, high)``; identity well inside.

    ``low + softplus(v - low) - softplus(v - high)`` differs from ``v`` by
    less than ``exp(-distance to the nearer bound)`` and, unlike ``clamp``,
    keeps a positive gradient, ``exp(-distance past the bound)``, until that
    underflows.  Above the midpoint it is computed as the equal ``high +
    softplus(low - v) - softplus(high - v)``: there the first form subtracts
    two nearly equal numbers, and ``softplus``'s linear regime (beyond 20)
    made its gradient exactly 0 and its value jump by 2e-9.
    """
    upper = value > 0.5 * (low + high)
    # One form when every entry is on the same side (the usual case: a step
    # then computes half the terms), both and a selection otherwise.
    if bool(upper.all()):
        return high + F.softplus(low - value) - F.softplus(high - value)
    below = low + F.softplus(value - low) - F.softplus(value - high)
    if not bool(upper.any()):
        return below
    above = high + F.softplus(low - value) - F.softplus(high - value)
    return torch.where(upper, above, below)
