"""Training in standard units, and mapping the trained modules back to data units.

The model family is closed under ``x -> location + scale * x`` when the
decoder's output activation is the identity (and under ``x -> scale * x``
when it is positively homogeneous: relu, leaky relu), so fitting
``a X + b`` should give the fit of ``X`` mapped by ``g -> a g + b``,
``sigma^2 -> a^2 sigma^2``.  Optimisation is not equivariant by itself (the
initialisation, learning rates and floors have fixed scales), so training
runs on ``(x - location) / scale`` with ``scale`` the root mean feature
variance, and the trained modules are mapped back afterwards by folding the
affine map into them exactly:

* the decoder's last linear layer (``W -> s W``, ``b -> s b + location``),
* the encoder's first linear layers (``W -> W / s``, ``b -> b - W location
  / s``),
* the noise variance (``sigma^2 -> s^2 sigma^2``, floor included).

Log-likelihoods differ by the Jacobian, ``log p(x) = log p_std(x_std) - n
log s``.  Warm starts unfold the fitted modules again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sknlica._torch.models import AmortizedVariance
from sknlica._torch.networks import GaussianHead, NoiseVariance

#: Output activations the decoder's last layer can absorb a location and a
#: scale into (affine), or only a positive scale (positively homogeneous).
AFFINE_OUTPUTS = ("identity",)
HOMOGENEOUS_OUTPUTS = ("identity", "relu", "leaky_relu")


@dataclass(frozen=True)
class Standardisation:
    """``x_std = (x - location) / scale``, fixed from the training data.

    Attributes
    ----------
    location : Tensor of shape (n_features,)
        Subtracted: the training mean, or zeros when the decoder cannot
        absorb a shift.
    scale : float
        Divides: the root mean feature variance, or 1 when the decoder cannot
        absorb a scale (or the data are constant).
    mean : Tensor of shape (n_features,)
        The training mean in data units: the centre of the distance
        expansion at evaluation (fitted state, never the batch's).
    """

    location: torch.Tensor
    scale: float
    mean: torch.Tensor

    @classmethod
    def of(
        cls,
        data: torch.Tensor,
        output_activation: str,
        feature_variance: torch.Tensor | None = None,
    ) -> Standardisation:
        """The standardisation of ``data`` for a decoder with that output.

        ``feature_variance``, ``data.var(dim=0, unbiased=False)`` when the
        caller has it already, saves a pass over the data.
        """
        if feature_variance is None:
            feature_variance = data.var(dim=0, unbiased=False)
        mean = data.mean(dim=0)
        variance = float(feature_variance.mean())
        rescale = output_activation in HOMOGENEOUS_OUTPUTS and variance > 0
        location = (
            mean if output_activation in AFFINE_OUTPUTS else torch.zeros_like(mean)
        )
        return cls(location, math.sqrt(variance) if rescale else 1.0, mean)

    def to(self, dtype: torch.dtype, device) -> Standardisation:
        return Standardisation(
            self.location.to(dtype=dtype, device=device),
            self.scale,
            self.mean.to(dtype=dtype, device=device),
        )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Data units to standard units."""
        return (x - self.location) / self.scale

    @property
    def standard_mean(self) -> torch.Tensor:
        """The training mean in standard units (zero when the location is)."""
        return self.apply(self.mean)

    def log_jacobian(self, n_features: int) -> float:
        """``log p(x) - log p_std(x_std)`` for every row: ``-n log scale``."""
        return -n_features * math.log(self.scale)

    # ------------------------------------------------------------ folding
    @torch.no_grad()
    def fold(self, model: nn.Module) -> None:
        """Map a model trained in standard units to data units, in place."""
        self._map(model, inverse=False)

    @torch.no_grad()
    def unfold(self, model: nn.Module) -> None:
        """Map a model in data units to standard units, in place."""
        self._map(model, inverse=True)

    def _map(self, model, *, inverse):
        s = self.scale if not inverse else 1.0 / self.scale
        log_s2 = 2.0 * math.log(s)
        location = self.location.to(next(model.parameters()).dtype)
        last = _last_linear(model.decoder)
        if inverse:
            last.bias.sub_(location)
        last.weight.mul_(s)
        last.bias.mul_(s)
        if not inverse:
            last.bias.add_(location)
        encoder = getattr(model, "encoder", None)
        if encoder is not None:
            for linear in _input_linears(encoder):
                # Only the columns that read x: a conditional encoder's last
                # columns read the segment's one-hot code, which is not data.
                weight = linear.weight[:, : location.shape[0]]
                if inverse:
                    linear.bias.add_(weight @ location)
                weight.div_(s)
                if not inverse:
                    linear.bias.sub_(weight @ location)
        _map_noise(model.noise, s**2, log_s2)


def _last_linear(decoder: nn.Sequential) -> nn.Linear:
    # make_mlp: [Linear, act, ..., Linear, output_act].
    return decoder[-2]


def _input_linears(encoder: GaussianHead) -> list[nn.Linear]:
    """The linear layers that read ``x`` directly."""
    if isinstance(encoder.trunk, nn.Sequential):
        return [encoder.trunk[0]]
    return [encoder.mean, encoder.log_var]


def _map_noise(noise: nn.Module, factor: float, log_factor: float) -> None:
    if isinstance(noise, NoiseVariance):
        noise.floor.mul_(factor)
        if noise.learn:
            noise.raw.add_(log_factor)
        else:
            noise.raw.mul_(factor)
        return
    if isinstance(noise, AmortizedVariance):
        noise.floor *= factor
        noise.low += log_factor
        noise.high += log_factor
        noise.linear.bias.add_(log_factor)
        noise.summary.mul_(factor)
        return
    raise TypeError(f"Cannot rescale a noise module of type {type(noise).__name__}.")
