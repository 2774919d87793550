"""Decoder Jacobians of the mode search against autograd (the oracle)."""

import numpy as np
import pytest
import torch
from torch import nn

from sknlica._torch.jacobians import (
    decoder_jacobian,
    forward_mode_jacobian,
    sequential_jacobian,
)
from sknlica._torch.networks import ACTIVATIONS, make_mlp
from sknlica._torch.segments import SegmentPrior, ShiftedDecoder


def _autograd_jacobians(decoder, z):
    """``(B, n, m)`` by reverse mode, one row at a time."""
    return torch.stack(
        [torch.autograd.functional.jacobian(decoder, row) for row in z]
    ).detach()


def _check(decoder, z, atol):
    g, jacobian = decoder_jacobian(decoder, z)
    np.testing.assert_allclose(g.detach(), decoder(z).detach(), rtol=0, atol=atol)
    np.testing.assert_allclose(
        jacobian.detach(), _autograd_jacobians(decoder, z), rtol=0, atol=atol
    )


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("hidden", [(), (8,), (8, 6)])
@pytest.mark.parametrize("output_activation", ["identity", "relu", "tanh"])
def test_mlp_jacobian_matches_autograd(activation, hidden, output_activation):
    generator = torch.Generator().manual_seed(0)
    decoder = make_mlp(
        3,
        hidden,
        5,
        activation=activation,
        output_activation=output_activation,
        generator=generator,
    )
    z = torch.randn(7, 3, dtype=torch.float64, generator=generator)
    _check(decoder, z, atol=1e-12)


def test_mlp_jacobian_matches_forward_mode_in_float32():
    generator = torch.Generator().manual_seed(1)
    decoder = make_mlp(
        2, (16, 16), 4, activation="tanh", dtype=torch.float32, generator=generator
    )
    z = torch.randn(11, 2, generator=generator)
    with torch.no_grad():
        g, jacobian = sequential_jacobian(decoder, z)
        g_ad, jacobian_ad = forward_mode_jacobian(decoder, z)
    assert jacobian.dtype == torch.float32
    np.testing.assert_allclose(g, g_ad, rtol=0, atol=1e-6)
    np.testing.assert_allclose(jacobian, jacobian_ad, rtol=0, atol=1e-5)


def test_relu_kink_follows_torch_convention():
    # At a unit's kink (pre-activation exactly 0) relu's slope is 0, leaky
    # relu's its negative slope: as torch's own derivatives.
    decoder = nn.Sequential(nn.Linear(1, 1, dtype=torch.float64), nn.ReLU())
    leaky = nn.Sequential(decoder[0], nn.LeakyReLU(0.2))
    with torch.no_grad():
        decoder[0].weight.fill_(1.0)
        decoder[0].bias.zero_()
    z = torch.zeros(1, 1, dtype=torch.float64)
    for model in (decoder, leaky):
        with torch.no_grad():
            _, jacobian = sequential_jacobian(model, z)
            _, expected = forward_mode_jacobian(model, z)
        assert float(jacobian) == float(expected)


class _Quadratic(nn.Module):
    def forward(self, z):
        return torch.cat([z, z**2], dim=-1)


def test_other_decoders_fall_back_to_forward_mode():
    z = torch.randn(4, 2, dtype=torch.float64)
    _check(_Quadratic(), z, atol=1e-12)
    # GELU's tanh approximation has no slope in the table.
    generator = torch.Generator().manual_seed(2)
    approximate = nn.Sequential(
        make_mlp(2, (), 6, generator=generator)[0], nn.GELU(approximate="tanh")
    )
    _check(approximate, z, atol=1e-12)


def test_shifted_decoder_jacobian_is_in_standardised_latents():
    generator = torch.Generator().manual_seed(3)
    decoder = make_mlp(3, (8,), 4, activation="leaky_relu", generator=generator)
    prior = SegmentPrior(
        torch.tensor([5, 7]), 3, learn_means=True, dtype=torch.float64, device="cpu"
    )
    with torch.no_grad():
        prior.means.copy_(torch.randn(2, 3, generator=generator, dtype=torch.float64))
        prior.log_variances.copy_(
            torch.randn(2, 3, generator=generator, dtype=torch.float64)
        )
    shifted = ShiftedDecoder(decoder, prior, segment=1)
    eps = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    _check(shifted, eps, atol=1e-12)
