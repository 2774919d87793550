"""``sknlica._torch.models``: the trained modules map tensors to tensors.

Oracles: the formulas the docstrings state (the clamped encoder
log-variance, ``s^2 = floor + exp(soft_clamp(W h + b))`` on the decoder's last
hidden layer), computed here from the submodules directly.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from sknlica._torch.models import (
    DECODER_LOG_VAR_RANGE,
    ENCODER_LOG_VAR_RANGE,
    AmortizedVariance,
    MLEModel,
    VAEModel,
)
from sknlica._torch.networks import GaussianHead, NoiseVariance, make_mlp, soft_clamp

F64 = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _FixedEncoder(nn.Module):
    """An encoder returning the given means and log-variances for every input."""

    def __init__(self, mean, log_var):
        super().__init__()
        self.register_buffer("fixed_mean", mean)
        self.register_buffer("fixed_log_var", log_var)

    def forward(self, x):
        shape = (x.shape[0], self.fixed_mean.shape[0])
        return self.fixed_mean.expand(shape), self.fixed_log_var.expand(shape)


def _noise(value=0.7):
    return NoiseVariance(value, learn=True, floor=1e-6)


def _head(n_hidden=6, initial=0.5, floor=1e-4, scale=2.0, seed=0):
    return AmortizedVariance(
        n_hidden,
        initial,
        floor=floor,
        scale=scale,
        dtype=F64,
        device="cpu",
        generator=_generator(seed),
    )


def _vae(amortized: bool, seed=0):
    generator = _generator(seed)
    encoder = GaussianHead(5, (6,), 2, generator=generator)
    decoder = make_mlp(2, (6,), 5, activation="tanh", generator=generator)
    noise = _head(6, seed=seed + 1) if amortized else _noise()
    return VAEModel(encoder, decoder, noise)


# --------------------------------------------------------------------- parts
@pytest.mark.parametrize("Model", [MLEModel, VAEModel])
def test_parts_name_the_constructor_arguments_in_order(Model):
    arguments = list(inspect.signature(Model.__init__).parameters)[1:]
    # Then the optional conditional prior, which is not a part of every model.
    assert [*Model.parts, "prior"] == arguments


def test_mle_model_holds_its_parts():
    decoder, noise = make_mlp(2, (4,), 3, generator=_generator(0)), _noise()
    model = MLEModel(decoder, noise)
    assert model.decoder is decoder and model.noise is noise
    assert {name for name, _ in model.named_children()} == set(MLEModel.parts)
    # Its parameters are exactly its parts' (nothing of its own).
    assert len(list(model.parameters())) == len(list(decoder.parameters())) + 1


def test_vae_model_holds_its_parts():
    encoder = GaussianHead(5, (6,), 2, generator=_generator(0))
    decoder = make_mlp(2, (6,), 5, generator=_generator(1))
    noise = _noise()
    model = VAEModel(encoder, decoder, noise)
    for name, part in zip(VAEModel.parts, (encoder, decoder, noise), strict=True):
        assert getattr(model, name) is part


def test_amortized_property():
    assert not _vae(amortized=False).amortized
    assert _vae(amortized=True).amortized
    fixed = NoiseVariance(0.3, learn=False, floor=0.0)
    assert not VAEModel(
        _FixedEncoder(torch.zeros(2), torch.zeros(2)), nn.Identity(), fixed
    ).amortized


# -------------------------------------------------------------------- encode
def test_encode_soft_clamps_the_log_variance_and_keeps_the_mean():
    low, high = ENCODER_LOG_VAR_RANGE
    raw = torch.tensor([-1e4, low - 5, -10.0, -3.0, 0.0, high + 5, 1e4], dtype=F64)
    mean = torch.linspace(-50, 50, 7, dtype=F64)
    model = VAEModel(_FixedEncoder(mean, raw), nn.Identity(), _noise())
    got_mean, log_var = model.encode(torch.zeros(3, 4, dtype=F64))
    assert torch.equal(got_mean, mean.expand(3, 7))  # means are never clamped
    assert log_var.shape == (3, 7)
    assert torch.all((log_var >= low) & (log_var <= high))
    torch.testing.assert_close(log_var, soft_clamp(raw, low, high).expand(3, 7))
    # Well inside the range (at least 5 from a bound) the clamp is the
    # identity to exp(-5) = 7e-3.
    inside = slice(2, 5)
    torch.testing.assert_close(log_var[0, inside], raw[inside], atol=1e-2, rtol=0)
    # Far outside it saturates at the bounds.
    assert float(log_var[0, 0]) == pytest.approx(low, abs=1e-9)
    assert float(log_var[0, -1]) == pytest.approx(high, abs=1e-9)


def test_encode_keeps_exp_finite_in_float32():
    raw = torch.tensor([1e3, -1e3])
    model = VAEModel(_FixedEncoder(torch.zeros(2), raw), nn.Identity(), _noise())
    _, log_var = model.encode(torch.zeros(1, 3))
    assert torch.all(torch.isfinite(torch.exp(log_var)))
    assert torch.all(torch.isfinite(torch.exp(-log_var)))


# -------------------------------------------------------------------- decode
def test_decode_without_a_head_returns_a_scalar_variance():
    model = _vae(amortized=False)
    z = torch.randn(4, 9, 2, generator=_generator(3), dtype=F64)
    g, variance = model.decode(z)
    assert g.shape == (4, 9, 5)
    torch.testing.assert_close(g, model.decoder(z), rtol=0, atol=0)
    assert variance.shape == ()
    assert float(variance.detach()) == pytest.approx(0.7, rel=1e-12)


def test_decode_with_a_head_returns_a_variance_per_latent():
    model = _vae(amortized=True)
    z = torch.randn(4, 9, 2, generator=_generator(3), dtype=F64)
    g, variance = model.decode(z)
    # The mean is the whole decoder's; the head reads its last hidden layer.
    torch.testing.assert_close(g, model.decoder(z), rtol=0, atol=0)
    assert variance.shape == (4, 9, 1)  # one per latent, trailing axis kept
    head = model.noise
    h = torch.tanh(model.decoder[0](z))  # decoder = Linear, tanh, Linear, identity
    expected = head.floor + torch.exp(soft_clamp(head.linear(h), head.low, head.high))
    torch.testing.assert_close(variance, expected, rtol=1e-14, atol=0)
    assert torch.all(variance > head.floor)
    # It depends on z: different latents, different variances.
    assert variance.std() > 0


def test_decode_with_a_head_without_hidden_layers_reads_z():
    decoder = make_mlp(2, (), 5, generator=_generator(0))
    model = VAEModel(GaussianHead(5, (), 2, generator=_generator(1)), decoder, _head(2))
    z = torch.randn(7, 2, generator=_generator(2), dtype=F64)
    _, variance = model.decode(z)
    head = model.noise
    expected = head.floor + torch.exp(soft_clamp(head.linear(z), head.low, head.high))
    torch.testing.assert_close(variance, expected, rtol=1e-14, atol=0)


# ---------------------------------------------------------- AmortizedVariance
def test_amortized_variance_starts_almost_constant_at_the_initial_value():
    head = _head(n_hidden=6, initial=0.5, floor=1e-4)
    h = torch.rand(200, 6, generator=_generator(4), dtype=F64)  # relu-like >= 0
    variance = head(h)
    # Bias log(initial - floor), weights scaled by 0.1 (|w| <= 0.1 / sqrt(6)):
    # |W h| <= 0.1 * sqrt(6) on [0, 1]^6, so s^2 / (initial - floor) is
    # within exp(+-0.245).
    bound = math.exp(0.1 * math.sqrt(6))
    excess = (variance - 1e-4) / (0.5 - 1e-4)
    assert torch.all((excess >= 1 / bound) & (excess <= bound))
    # Called without h: the summary buffer, which starts at the initial value.
    assert head().shape == ()
    assert float(head()) == 0.5
    assert "summary" in dict(head.named_buffers())
    assert "summary" not in dict(head.named_parameters())


def test_amortized_variance_is_clamped_relative_to_the_data_scale():
    scale, floor = 3.0, 1e-5
    head = _head(n_hidden=2, floor=floor, scale=scale)
    assert head.low == pytest.approx(math.log(scale) + DECODER_LOG_VAR_RANGE[0])
    assert head.high == pytest.approx(math.log(scale) + DECODER_LOG_VAR_RANGE[1])
    with torch.no_grad():
        head.linear.weight.fill_(100.0)
        head.linear.bias.zero_()
    h = torch.tensor([[-10.0, -10.0], [10.0, 10.0]], dtype=F64)
    with torch.no_grad():
        low, high = head(h)
    assert float(low) == pytest.approx(floor + scale * math.exp(-20.0), rel=1e-9)
    assert float(high) == pytest.approx(floor + scale * math.exp(5.0), rel=1e-9)
