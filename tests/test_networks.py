"""``sknlica._torch.networks``: MLPs, the Gaussian encoder head, sigma^2, soft clamps.

Oracles: the layer structure the docstrings describe, PyTorch's own
``nn.Linear`` initialisation bounds (``kaiming_uniform`` with ``a = sqrt(5)``
for the weights, ``1 / sqrt(fan_in)`` for the biases, computed here with
``torch.nn.init.calculate_gain``), and the closed forms of ``soft_clamp``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _properties import property_settings
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from sknlica._torch import networks
from sknlica._torch.networks import (
    ACTIVATIONS,
    GaussianHead,
    NoiseVariance,
    make_mlp,
    soft_clamp,
)

PROPERTY = property_settings(30)
F64 = torch.float64
finite = {"allow_nan": False, "allow_infinity": False}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear_bounds(fan_in: int) -> tuple[float, float]:
    """nn.Linear.reset_parameters' uniform bounds (weight, bias), from torch."""
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    return gain * math.sqrt(3.0 / fan_in), 1.0 / math.sqrt(fan_in)


# ------------------------------------------------------------------ make_mlp
@pytest.mark.parametrize(
    ("hidden", "activation", "output_activation"),
    [((), "relu", "identity"), ((8,), "tanh", "relu"), ((8, 4, 6), "gelu", "sigmoid")],
)
def test_make_mlp_alternates_linear_layers_and_activations(
    hidden, activation, output_activation
):
    mlp = make_mlp(
        3,
        hidden,
        5,
        activation=activation,
        output_activation=output_activation,
        generator=_generator(0),
    )
    sizes = [3, *hidden, 5]
    assert len(mlp) == 2 * (len(hidden) + 1)
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear, act = mlp[2 * i], mlp[2 * i + 1]
        assert type(linear) is nn.Linear
        assert (linear.in_features, linear.out_features) == (fan_in, fan_out)
        last = i == len(sizes) - 2
        assert type(act) is ACTIVATIONS[output_activation if last else activation]
    out = mlp(torch.randn(7, 3, generator=_generator(1), dtype=F64))
    assert out.shape == (7, 5) and out.dtype == F64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_make_mlp_follows_the_dtype(dtype):
    mlp = make_mlp(2, (4,), 3, dtype=dtype, generator=_generator(0))
    assert all(p.dtype == dtype for p in mlp.parameters())
    assert all(p.requires_grad for p in mlp.parameters())


def test_make_mlp_weights_come_from_the_generator_only():
    torch_state = torch.get_rng_state()
    a = make_mlp(4, (16, 8), 3, generator=_generator(5))
    b = make_mlp(4, (16, 8), 3, generator=_generator(5))
    c = make_mlp(4, (16, 8), 3, generator=_generator(6))
    assert torch.equal(torch.get_rng_state(), torch_state)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not any(
        torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True)
    )


def test_make_mlp_uses_the_bounds_of_nn_linears_default_init():
    mlp = make_mlp(200, (300,), 100, generator=_generator(0))
    for linear in (mlp[0], mlp[2]):
        weight_bound, bias_bound = _linear_bounds(linear.in_features)
        for tensor, bound in ((linear.weight, weight_bound), (linear.bias, bias_bound)):
            values = tensor.detach().abs()
            assert values.max() <= bound
            # Uniform on [-bound, bound]: 20,000+ weights reach its edge, and
            # their mean |w| is bound / 2 (standard error < 1% of it).
            if tensor is linear.weight:
                assert values.max() > 0.99 * bound
                assert float(values.mean()) == pytest.approx(bound / 2, rel=0.02)
    # The same bounds as a layer torch initialises itself.
    torch_layer = nn.Linear(200, 300, dtype=F64)
    weight_bound, bias_bound = _linear_bounds(200)
    assert torch_layer.weight.abs().max() <= weight_bound
    assert torch_layer.weight.abs().max() > 0.99 * weight_bound
    assert torch_layer.bias.abs().max() <= bias_bound


# -------------------------------------------------------------- GaussianHead
@pytest.mark.parametrize("hidden", [(), (8,), (8, 6)])
def test_gaussian_head_outputs_a_mean_and_a_log_variance(hidden):
    head = GaussianHead(5, hidden, 3, generator=_generator(0))
    x = torch.randn(11, 5, generator=_generator(1), dtype=F64)
    mean, log_var = head(x)
    assert mean.shape == log_var.shape == (11, 3)
    assert mean.dtype == log_var.dtype == F64
    if not hidden:
        assert isinstance(head.trunk, nn.Identity)
    else:
        # The trunk ends in the activation: both heads read the last hidden layer.
        assert head.trunk[-2].out_features == hidden[-1]
        assert isinstance(head.trunk[-1], nn.ReLU)
    assert head.mean.in_features == head.log_var.in_features == (hidden or (5,))[-1]


def test_gaussian_head_starts_near_unit_variance():
    head = GaussianHead(5, (8,), 3, generator=_generator(0))
    assert torch.equal(head.log_var.bias, torch.zeros(3, dtype=F64))
    weight_bound, _ = _linear_bounds(8)
    # Scaled by 0.1 from the default init.
    assert head.log_var.weight.abs().max() <= 0.1 * weight_bound
    x = torch.randn(500, 5, generator=_generator(1), dtype=F64)
    mean, log_var = head(x)
    # On standard-normal inputs: log-variances within 0.5 of 0 (variances
    # within a factor 1.6 of the prior's 1), much less spread than the means.
    assert log_var.abs().max() < 0.5
    assert log_var.std() < 0.2 * mean.std()


def test_gaussian_head_is_reproducible_from_its_generator():
    torch_state = torch.get_rng_state()
    a = GaussianHead(4, (6,), 2, generator=_generator(3))
    b = GaussianHead(4, (6,), 2, generator=_generator(3))
    assert torch.equal(torch.get_rng_state(), torch_state)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


# ------------------------------------------------------------- NoiseVariance
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_learned_noise_variance_is_floor_plus_exp(dtype):
    noise = NoiseVariance(0.7, learn=True, floor=1e-3, dtype=dtype)
    (raw,) = noise.parameters()
    assert raw is noise.raw and raw.requires_grad and raw.dtype == dtype
    # The floor is a buffer, so that it follows the module's dtype and device.
    (floor,) = noise.buffers()
    assert floor is noise.floor and float(floor) == pytest.approx(1e-3)
    # Starts at the initial value ...
    assert float(noise().detach()) == pytest.approx(0.7, rel=1e-6)
    # ... is floor + exp(raw) ...
    with torch.no_grad():
        raw.fill_(-2.0)
    assert float(noise().detach()) == pytest.approx(1e-3 + math.exp(-2.0), rel=1e-6)
    # ... never falls below the floor ...
    with torch.no_grad():
        raw.fill_(-1e4)
    assert float(noise().detach()) == pytest.approx(1e-3, rel=1e-6)
    # ... and learns: the gradient of sigma^2 with respect to raw is exp(raw).
    with torch.no_grad():
        raw.fill_(0.5)
    noise().backward()
    assert float(raw.grad) == pytest.approx(math.exp(0.5), rel=1e-6)


def test_learned_noise_variance_below_the_floor_starts_above_it():
    # An initial value under twice the floor starts at 2 * floor: exp(raw)
    # is at least the floor, so the start is strictly above it.
    noise = NoiseVariance(1e-4, learn=True, floor=1e-3)
    assert float(noise().detach()) == pytest.approx(2e-3, rel=1e-12)


def test_fixed_noise_variance_is_a_buffer_without_parameters():
    noise = NoiseVariance(0.7, learn=False, floor=1e-3)
    assert list(noise.parameters()) == []
    assert not noise.raw.requires_grad
    # The value itself, without a floor.
    assert float(noise.floor) == 0.0
    assert float(noise()) == 0.7
    assert "raw" in noise.state_dict()
    tiny = NoiseVariance(1e-9, learn=False, floor=1e-3)
    assert float(tiny()) == 1e-9


# ---------------------------------------------------------------- soft_clamp
LOW, HIGH = -20.0, 5.0


@given(hnp.arrays(np.float64, 20, elements=st.floats(-1e6, 1e6, **finite)))
@PROPERTY
def test_soft_clamp_stays_in_range_and_is_identity_inside(values):
    v = torch.tensor(values, requires_grad=True)
    out = soft_clamp(v, LOW, HIGH)
    assert torch.all((out >= LOW) & (out <= HIGH))
    inside = (v > -15) & (v < 0)
    torch.testing.assert_close(out[inside], v[inside], atol=1e-2, rtol=0)
    out.sum().backward()
    assert torch.all(v.grad >= 0) and torch.all(torch.isfinite(v.grad))


@given(st.floats(LOW + 1e-3, HIGH - 1e-3, **finite))
@PROPERTY
def test_soft_clamp_is_within_exp_minus_distance_of_the_identity(value):
    # The docstring's bound: |soft_clamp(v) - v| < exp(-distance to the
    # nearer bound), plus float64 round-off of the softplus terms.
    v = torch.tensor(value, dtype=F64)
    distance = min(value - LOW, HIGH - value)
    error = abs(float(soft_clamp(v, LOW, HIGH)) - value)
    assert error <= math.exp(-distance) + 1e-13


#: How far above ``high`` the gradient of soft_clamp stays non-zero:
#: ``F.softplus`` (default ``threshold=20``) returns its input unchanged, with
#: gradient exactly 1, above 20, so beyond ``high + 20`` the two softplus
#: gradients cancel exactly.
SOFTPLUS_THRESHOLD = 20.0


@given(st.floats(-60, HIGH + SOFTPLUS_THRESHOLD - 0.5, **finite))
@PROPERTY
def test_soft_clamp_has_a_positive_gradient_where_clamp_has_none(value):
    v = torch.tensor(value, dtype=F64, requires_grad=True)
    soft_clamp(v, LOW, HIGH).backward()
    # d/dv = sigmoid(v - low) - sigmoid(v - high) in (0, 1].
    assert 0.0 < float(v.grad) <= 1.0
    w = torch.tensor(value, dtype=F64, requires_grad=True)
    torch.clamp(w, LOW, HIGH).backward()
    if not LOW <= value <= HIGH:
        assert float(w.grad) == 0.0


@pytest.mark.parametrize("distance", [25.0, 100.0, 500.0])
@pytest.mark.parametrize("side", [-1.0, 1.0])
def test_soft_clamp_gradient_far_outside_the_bounds(distance, side):
    # Once zero beyond high + 20 (softplus's linear regime cancelled it);
    # the gradient is exp(-distance), positive until that underflows.
    value = HIGH + distance if side > 0 else LOW - distance
    v = torch.tensor(value, dtype=F64, requires_grad=True)
    soft_clamp(v, LOW, HIGH).backward()
    assert float(v.grad) == pytest.approx(math.exp(-distance), rel=1e-6)


def test_soft_clamp_is_continuous_where_softplus_turns_linear():
    # softplus(u) switches to u at u = 20; the value used to jump by 2e-9.
    for edge in (LOW + 20.0, HIGH + 20.0, LOW - 20.0, HIGH - 20.0):
        v = torch.tensor([edge - 1e-9, edge, edge + 1e-9], dtype=F64)
        steps = torch.diff(soft_clamp(v, LOW, HIGH))
        assert float(steps.abs().max()) <= 2e-9


def test_soft_clamp_is_monotone_and_saturates_at_the_bounds():
    v = torch.linspace(-100, 80, 2001, dtype=F64)
    out = soft_clamp(v, LOW, HIGH)
    # Non-decreasing, flat once saturated, up to the round-off of the softplus
    # difference (v - low) - (v - high): a few ulps of |v| (measured 7e-15).
    assert torch.all(out[1:] >= out[:-1] - 8 * torch.finfo(F64).eps * v[1:].abs())
    assert out[-1] > out[0]
    assert torch.all((out > LOW - 1e-12) & (out < HIGH + 1e-12))
    assert float(out[0]) == pytest.approx(LOW, abs=1e-12)
    assert float(out[-1]) == pytest.approx(HIGH, abs=1e-12)
    # Halfway between the bounds it is the identity to ~exp(-12.5).
    middle = torch.tensor((LOW + HIGH) / 2, dtype=F64)
    assert abs(float(soft_clamp(middle, LOW, HIGH) - middle)) < 1e-5


def test_activations_are_module_classes():
    for name, cls in networks.ACTIVATIONS.items():
        layer = cls()
        assert isinstance(layer, nn.Module), name
        x = torch.linspace(-2, 2, 9, dtype=F64)
        assert layer(x).shape == x.shape
    assert torch.equal(networks.ACTIVATIONS["identity"]()(torch.ones(2)), torch.ones(2))


def test_noise_variance_per_feature():
    initial = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    noise = NoiseVariance(initial, learn=True, floor=initial * 1e-3)
    assert noise().shape == (3,)
    torch.testing.assert_close(noise().detach(), initial)
    with torch.no_grad():
        noise.raw.fill_(-1e4)
    torch.testing.assert_close(noise().detach(), initial * 1e-3)
    fixed = NoiseVariance(initial, learn=False, floor=0.0)
    torch.testing.assert_close(fixed(), initial)
    assert list(fixed.parameters()) == []
