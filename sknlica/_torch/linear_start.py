"""A data-driven start: the networks begin as the best linear factor model.

A random decoder starts far from any good model, and on small real data sets
(a few hundred rows, thirty features) minibatch training from there stopped
below :class:`~sklearn.decomposition.FactorAnalysis`, a model the decoder
family contains.  Starting at the linear model instead, ``g(z) = L z + mu``
with the noise of probabilistic PCA (isotropic noise) or factor analysis
(diagonal noise), the fit begins at that model's likelihood and early
stopping keeps a nonlinear model only where it scores better on the
validation rows.

An MLP represents an affine map exactly without any change to its
architecture: each hidden layer carries ``t`` (``m`` numbers) in ``2 m`` of
its units as ``a(s t)`` and ``a(-s t)``, and ``a(s t) - a(-s t) = gain * t``
recovers it.  That is exact for ``relu`` (``relu(t) - relu(-t) = t``),
``leaky_relu`` (gain ``1 + slope``), ``gelu`` (``t Phi(t) + t Phi(-t) = t``)
and ``identity`` (gain 2); for ``tanh`` and ``sigmoid`` a small input scale
``s`` keeps the units in their nearly linear range (the start is then linear
to about 3% at ``|t| = 3``).  The remaining hidden units keep their random
input weights and get zero output weights, so they change nothing at the
start and learn from the first step.

The linear model itself is fitted by scikit-learn, outside this package
(``sknlica/_linear_start.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

#: Per hidden activation: the input scale ``s`` of the carrying units and the
#: gain with ``a(s t) - a(-s t) = gain * t`` (to first order for tanh and
#: sigmoid: ``2 a'(0) s``).
PASS_THROUGH: dict[str, tuple[float, float]] = {
    "identity": (1.0, 2.0),
    "relu": (1.0, 1.0),
    "leaky_relu": (1.0, 1.0 + nn.LeakyReLU().negative_slope),
    "gelu": (1.0, 1.0),
    "tanh": (0.1, 0.2),
    "sigmoid": (0.1, 0.05),
}


@dataclass(frozen=True)
class LinearFactorModel:
    """``x = loadings z + mean + e``, ``z ~ N(0, I)``, ``e ~ N(0, noise)``.

    Attributes
    ----------
    loadings : ndarray of shape (n_features, n_components)
    mean : ndarray of shape (n_features,)
    noise_variance : float or ndarray of shape (n_features,)
        A scalar for probabilistic PCA, one per feature for factor analysis.
    """

    loadings: np.ndarray
    mean: np.ndarray
    noise_variance: float | np.ndarray
    #: With the conditional prior: each segment's latent means and variances
    #: ``(n_segments, n_components)`` (``z | u ~ N(mean_u, diag variance_u)``),
    #: the loadings then those of linear nonstationary ICA.
    segment_means: np.ndarray | None = None
    segment_variances: np.ndarray | None = None

    def posterior(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A, C)`` with ``z | x ~ N(A (x - mean), C)``."""
        n_features, n_components = self.loadings.shape
        precision = np.broadcast_to(1.0 / self.noise_variance, (n_features,))
        weighted = self.loadings.T * precision  # L^T Psi^-1
        covariance = np.linalg.inv(np.eye(n_components) + weighted @ self.loadings)
        return covariance @ weighted, covariance


def carries_linear_map(hidden_layer_sizes, n_carried: int) -> bool:
    """Whether every hidden layer has the ``2 n_carried`` units needed."""
    return all(width >= 2 * n_carried for width in hidden_layer_sizes)


@torch.no_grad()
def embed_affine_map(
    linears: list[nn.Linear],
    activation: str,
    projection: torch.Tensor,
    offset: torch.Tensor,
    readout: torch.Tensor,
    bias: torch.Tensor,
) -> None:
    """Set ``linears`` (an MLP's linear layers, ``activation`` between them)
    so that the network computes ``readout (projection u + offset) + bias``.

    ``projection`` (k, n_in) and ``offset`` (k,) make the carried ``t``;
    ``readout`` (n_out, k) and ``bias`` (n_out,) map it to the output.  Every
    hidden layer needs ``2 k`` units (:func:`carries_linear_map`).
    """
    as_weight = {"dtype": linears[0].weight.dtype, "device": linears[0].weight.device}
    projection, offset, readout, bias = (
        value.to(**as_weight) for value in (projection, offset, readout, bias)
    )
    if len(linears) == 1:
        linears[0].weight.copy_(readout @ projection)
        linears[0].bias.copy_(readout @ offset + bias)
        return
    scale, gain = PASS_THROUGH[activation]
    k = projection.shape[0]
    first, *middle, last = linears
    first.weight[:k] = scale * projection
    first.weight[k : 2 * k] = -scale * projection
    first.bias[:k] = scale * offset
    first.bias[k : 2 * k] = -scale * offset
    identity = torch.eye(k, **as_weight)
    relay = torch.cat(
        [torch.cat([identity, -identity], 1), torch.cat([-identity, identity], 1)]
    ) * (scale / gain)
    for linear in middle:
        # The carrying units read only the previous layer's carrying units.
        linear.weight[: 2 * k] = 0.0
        linear.weight[: 2 * k, : 2 * k] = relay
        linear.bias[: 2 * k] = 0.0
    last.weight.zero_()
    last.weight[:, :k] = readout / gain
    last.weight[:, k : 2 * k] = -readout / gain
    last.bias.copy_(bias)


def linear_layers(network: nn.Sequential) -> list[nn.Linear]:
    """The linear layers of a ``make_mlp`` network, input to output."""
    return [layer for layer in network if isinstance(layer, nn.Linear)]


def start_decoder(decoder: nn.Sequential, activation: str, model) -> None:
    """``g(z) = loadings z + mean`` (before the output activation)."""
    loadings = torch.as_tensor(model.loadings)
    n_components = loadings.shape[1]
    embed_affine_map(
        linear_layers(decoder),
        activation,
        torch.eye(n_components, dtype=loadings.dtype),
        torch.zeros(n_components, dtype=loadings.dtype),
        loadings,
        torch.as_tensor(model.mean),
    )


@torch.no_grad()
def start_encoder(encoder, activation: str, model) -> None:
    """``q(z | x) = N(A (x - mean), C)``, the linear model's posterior, with
    the diagonal of ``C`` (the encoder's variances do not depend on ``x``
    at the start).  Inputs beyond the data's features (a conditional
    encoder's segment code) get zero weights."""
    trunk = encoder.trunk
    linears = linear_layers(trunk) if isinstance(trunk, nn.Sequential) else []
    linears.append(encoder.mean)
    posterior_map, covariance = (torch.as_tensor(v) for v in model.posterior())
    n_components, n_features = posterior_map.shape
    n_inputs = linears[0].in_features
    projection = torch.zeros(n_components, n_inputs, dtype=posterior_map.dtype)
    projection[:, :n_features] = posterior_map
    offset = -posterior_map @ torch.as_tensor(model.mean)
    embed_affine_map(
        linears,
        activation,
        projection,
        offset,
        torch.eye(n_components, dtype=projection.dtype),
        torch.zeros(n_components, dtype=projection.dtype),
    )
    encoder.log_var.weight.zero_()
    encoder.log_var.bias.copy_(torch.log(torch.diagonal(covariance)))


@torch.no_grad()
def start_segment_prior(prior: nn.Module, model: LinearFactorModel) -> None:
    """A :class:`~sknlica._torch.segments.SegmentPrior` at ``model``'s segment
    means and variances (nothing without them).  With the means fixed at
    zero, each segment's variance is its second moment about zero, so that
    the segment keeps its spread."""
    if model.segment_variances is None:
        return
    like = {"dtype": prior.log_variances.dtype, "device": prior.log_variances.device}
    means = torch.as_tensor(model.segment_means).to(**like)
    variances = torch.as_tensor(model.segment_variances).to(**like)
    if isinstance(prior.means, nn.Parameter):
        prior.means.copy_(means)
    else:
        variances = variances + means.square()
    prior.log_variances.copy_(torch.log(variances))
