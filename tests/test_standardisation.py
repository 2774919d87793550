"""``sknlica._torch.standardisation``: standard units and the exact fold back."""

import copy

import pytest
import torch

from sknlica._torch.models import AmortizedVariance, MLEModel, VAEModel
from sknlica._torch.networks import GaussianHead, NoiseVariance, make_mlp
from sknlica._torch.standardisation import Standardisation

F64 = torch.float64


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _data(n_features=5):
    gen = _generator(0)
    scales = torch.linspace(0.5, 3.0, n_features, dtype=F64)
    return 1e3 + scales * torch.randn(200, n_features, generator=gen, dtype=F64)


@pytest.mark.parametrize(
    ("output_activation", "shifted", "scaled"),
    [
        ("identity", True, True),
        ("relu", False, True),
        ("leaky_relu", False, True),
        ("tanh", False, False),
        ("sigmoid", False, False),
    ],
)
def test_what_each_output_activation_can_absorb(output_activation, shifted, scaled):
    data = _data()
    units = Standardisation.of(data, output_activation)
    torch.testing.assert_close(units.mean, data.mean(0))
    assert bool(units.location.abs().max() > 0) == shifted
    assert (units.scale != 1.0) == scaled
    standard = units.apply(data)
    if scaled:
        variance = standard.var(0, unbiased=False).mean()
        assert float(variance) == pytest.approx(1.0, rel=1e-12)
    assert units.log_jacobian(5) == pytest.approx(
        -5 * torch.log(torch.tensor(units.scale)).item()
    )


def test_constant_data_keep_a_unit_scale():
    units = Standardisation.of(torch.full((10, 3), 7.0, dtype=F64), "identity")
    assert units.scale == 1.0
    torch.testing.assert_close(
        units.apply(torch.full((1, 3), 7.0, dtype=F64)), torch.zeros(1, 3, dtype=F64)
    )


def _mle(noise):
    decoder = make_mlp(2, (8,), 5, generator=_generator(1))
    return MLEModel(decoder, noise)


def _vae(amortized):
    encoder = GaussianHead(5, (8,), 2, generator=_generator(2))
    decoder = make_mlp(2, (8,), 5, generator=_generator(3))
    if amortized:
        noise = AmortizedVariance(
            8,
            0.5,
            floor=1e-6,
            scale=1.0,
            dtype=F64,
            device="cpu",
            generator=_generator(4),
        )
    else:
        noise = NoiseVariance(0.5, learn=True, floor=1e-6)
    return VAEModel(encoder, decoder, noise)


MODELS = {
    "mle isotropic": lambda: _mle(NoiseVariance(0.5, learn=True, floor=1e-6)),
    "mle fixed": lambda: _mle(NoiseVariance(0.5, learn=False, floor=0.0)),
    "mle diagonal": lambda: _mle(
        NoiseVariance(torch.linspace(0.2, 1.0, 5, dtype=F64), learn=True, floor=1e-6)
    ),
    "vae": lambda: _vae(amortized=False),
    "vae amortized": lambda: _vae(amortized=True),
}


@pytest.mark.parametrize("name", MODELS)
def test_the_folded_model_is_the_standard_model_in_data_units(name):
    data = _data()
    units = Standardisation.of(data, "identity")
    model = MODELS[name]()
    folded = copy.deepcopy(model)
    units.fold(folded)
    z = torch.randn(30, 2, generator=_generator(5), dtype=F64)
    with torch.no_grad():
        # The decoder's mean maps by the affine map ...
        torch.testing.assert_close(
            folded.decoder(z), units.location + units.scale * model.decoder(z)
        )
        # ... the noise variance by its square ...
        if name == "vae amortized":
            h = model.decoder[:-2](z)
            torch.testing.assert_close(folded.noise(h), units.scale**2 * model.noise(h))
        else:
            torch.testing.assert_close(folded.noise(), units.scale**2 * model.noise())
        # ... and the encoder reads data units.
        if isinstance(model, VAEModel):
            for a, b in zip(
                folded.encode(data[:7]), model.encode(units.apply(data[:7]))
            ):
                torch.testing.assert_close(a, b)
    # Unfolding undoes it (up to rounding).
    units.unfold(folded)
    for a, b in zip(folded.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
