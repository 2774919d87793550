"""The trained modules: what a fit learns, and nothing about how it learns it.

Each holds parameters (and, for the amortised variance, one summary buffer)
and maps tensors to tensors.  Training state (node samplers, mode caches,
KL weights, switches) belongs to the objectives in ``mle_objectives.py`` and
``vae_objectives.py``; the loop that trains them is ``training.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sknlica._torch.networks import NoiseVariance, make_mlp, soft_clamp

#: Encoder log-variances are soft-clamped to this range.  The upper end keeps
#: ``exp`` finite in float32 and is far above any posterior (which is never
#: much wider than the N(0, I) prior); the lower end (std 4.5e-5) is below the
#: posterior width of any model whose noise variance is above the floor, and
#: keeps ``1 / s^2`` in log q finite.
ENCODER_LOG_VAR_RANGE = (-20.0, 5.0)

#: The amortised decoder log-variance is soft-clamped to ``log(scale)`` plus
#: this range, ``scale`` being the mean feature variance of the training data:
#: the noise cannot exceed 150 times the data's own variance or fall below
#: 1e-9 of it (the noise-variance floor sits above that).
DECODER_LOG_VAR_RANGE = (-20.0, 5.0)


class MLEModel(nn.Module):
    """Decoder mean ``g`` and noise variance ``sigma^2`` of the generative model."""

    #: The submodules, in the order the constructor takes them.
    parts = ("decoder", "noise")

    def __init__(
        self, decoder: nn.Module, noise: NoiseVariance, prior: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.noise = noise
        #: The conditional prior (``segments.SegmentPrior``), or ``None`` for
        #: the standard ``N(0, I)``.
        self.prior = prior


class AmortizedVariance(nn.Module):
    """The report's decoder variance head ``log s^2 = W_2 h + b_2``.

    ``h`` is the decoder's last hidden layer (``z`` itself without hidden
    layers).  ``s^2 = floor + exp(soft_clamp(W_2 h + b_2))``.  Called without
    ``h`` it returns ``summary``: the average ``s^2`` at the encoder means of
    the monitored training rows, which the VAE's per-epoch scoring updates
    (and the best-epoch snapshot restores), and which ``noise_variance_``
    reports.
    """

    def __init__(self, n_hidden, initial, *, floor, scale, dtype, device, generator):
        super().__init__()
        (self.linear, _) = make_mlp(
            n_hidden, (), 1, dtype=dtype, device=device, generator=generator
        )
        self.floor = float(floor)
        self.low = math.log(scale) + DECODER_LOG_VAR_RANGE[0]
        self.high = math.log(scale) + DECODER_LOG_VAR_RANGE[1]
        with torch.no_grad():
            # Start almost constant at the initial variance, as the global one.
            self.linear.weight.mul_(0.1)
            self.linear.bias.fill_(math.log(max(initial - self.floor, self.floor)))
        self.register_buffer("summary", torch.tensor(initial, dtype=dtype))

    def forward(self, h: torch.Tensor | None = None) -> torch.Tensor:
        if h is None:
            return self.summary
        # (..., 1): a per-row variance keeps a trailing axis, so that it is
        # never mistaken for per-feature variances (gaussian_log_density).
        log_var = soft_clamp(self.linear(h), self.low, self.high)
        return self.floor + torch.exp(log_var)


class VAEModel(nn.Module):
    """Encoder ``q(z | x)``, decoder mean and noise variance (or variance head)."""

    #: The submodules, in the order the constructor takes them.
    parts = ("encoder", "decoder", "noise")

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        noise: nn.Module,
        prior: nn.Module | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.noise = noise
        #: The conditional prior (``segments.SegmentPrior``; the encoder then
        #: reads ``x`` and the segment's one-hot code), or ``None``.
        self.prior = prior

    @property
    def amortized(self) -> bool:
        """Whether the noise variance depends on ``z`` (the variance head)."""
        return isinstance(self.noise, AmortizedVariance)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (clamped) log-variance of ``q(z | x)``."""
        mean, log_var = self.encoder(x)
        return mean, soft_clamp(log_var, *ENCODER_LOG_VAR_RANGE)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``g(z)`` and noise variance (a scalar, or per latent with a head)."""
        if not self.amortized:
            return self.decoder(z), self.noise()
        # decoder = hidden layers + [last Linear, output activation].
        h = self.decoder[:-2](z)
        return self.decoder[-2:](h), self.noise(h)
