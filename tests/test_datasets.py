"""Tests for sknlica.datasets."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from scipy.special import erf
from sklearn.utils._param_validation import InvalidParameterError

from sknlica.datasets import NonlinearMixing, make_nonlinear_ica

ACTIVATIONS = ["relu", "sigmoid", "tanh", "leaky_relu", "gelu", "identity"]

# Independent reference formulas, written out rather than imported.
REFERENCE = {
    "relu": lambda x: np.where(x > 0, x, 0.0),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
    "gelu": lambda x: x * 0.5 * (1.0 + erf(x / np.sqrt(2.0))),
    "identity": lambda x: x,
}

TORCH_MODULES = {
    "relu": torch.nn.ReLU(),
    "sigmoid": torch.nn.Sigmoid(),
    "tanh": torch.nn.Tanh(),
    "leaky_relu": torch.nn.LeakyReLU(),
    "gelu": torch.nn.GELU(),
    "identity": torch.nn.Identity(),
}


def _noiseless(activation="relu", **kwargs):
    kwargs.setdefault("n_samples", 200)
    kwargs.setdefault("random_state", 0)
    return make_nonlinear_ica(
        activation=activation, noise_variance=0.0, return_mixing=True, **kwargs
    )


def test_shapes_and_dtype():
    X, Z = make_nonlinear_ica(
        n_samples=50, n_components=3, n_features=7, random_state=0
    )
    assert X.shape == (50, 7)
    assert Z.shape == (50, 3)
    assert X.dtype == np.float64
    assert Z.dtype == np.float64


def test_defaults():
    X, Z, mixing = make_nonlinear_ica(random_state=0, return_mixing=True)
    assert X.shape == (1000, 20)
    assert Z.shape == (1000, 2)
    assert mixing.activation == "relu"
    assert mixing.noise_variance == 1.0
    assert (mixing.n_features, mixing.n_components) == (20, 2)
    assert mixing.weights.shape == (20, 2)
    assert mixing.bias.shape == (20,)


def test_same_seed_gives_identical_arrays():
    first = make_nonlinear_ica(n_samples=100, random_state=42, return_mixing=True)
    second = make_nonlinear_ica(n_samples=100, random_state=42, return_mixing=True)
    assert_array_equal(first[0], second[0])
    assert_array_equal(first[1], second[1])
    assert_array_equal(first[2].weights, second[2].weights)
    assert_array_equal(first[2].bias, second[2].bias)


def test_random_state_instance_is_accepted_and_deterministic():
    X1, _ = make_nonlinear_ica(n_samples=20, random_state=np.random.RandomState(3))
    X2, _ = make_nonlinear_ica(n_samples=20, random_state=np.random.RandomState(3))
    assert_array_equal(X1, X2)


def test_different_seeds_differ():
    X1, Z1 = make_nonlinear_ica(n_samples=100, random_state=0)
    X2, Z2 = make_nonlinear_ica(n_samples=100, random_state=1)
    assert not np.allclose(X1, X2)
    assert not np.allclose(Z1, Z2)


def test_noise_is_drawn_last():
    # Changing the noise level must not change W, b or Z for a fixed seed.
    _, Z0, mix0 = _noiseless()
    _, Z1, mix1 = make_nonlinear_ica(
        n_samples=200, noise_variance=2.0, random_state=0, return_mixing=True
    )
    assert_array_equal(Z0, Z1)
    assert_array_equal(mix0.weights, mix1.weights)
    assert_array_equal(mix0.bias, mix1.bias)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_noiseless_data_is_the_mixing(activation):
    X, Z, mixing = _noiseless(activation)
    assert_array_equal(X, mixing(Z))
    reference = REFERENCE[activation](Z @ mixing.weights.T + mixing.bias)
    assert_allclose(X, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_on_negative_inputs(activation):
    # Negative pre-activations exercise the nonlinear branches (weights and
    # biases of the default generator are non-negative).
    mixing = NonlinearMixing(np.array([[1.0]]), np.zeros(1), activation)
    x = np.linspace(-4.0, 4.0, 17).reshape(-1, 1)
    assert_allclose(mixing(x), REFERENCE[activation](x), rtol=1e-12, atol=1e-15)


def test_weights_and_bias_ranges():
    _, _, mixing = _noiseless(n_components=5, n_features=200)
    assert mixing.weights.min() >= 0.0
    assert mixing.weights.max() < 3.0
    assert mixing.bias.min() >= 0.0
    assert mixing.bias.max() < 1.0
    # Uniform draws fill the ranges rather than sitting in a corner.
    assert mixing.weights.max() > 2.9
    assert mixing.bias.max() > 0.9


def test_custom_ranges():
    _, _, mixing = _noiseless(
        n_features=100, weight_range=(-1.0, 1.0), bias_range=(0.0, 0.0)
    )
    assert mixing.weights.min() >= -1.0
    assert mixing.weights.max() < 1.0
    assert mixing.weights.min() < -0.9
    assert_array_equal(mixing.bias, 0.0)


def test_latents_are_standard_normal():
    _, Z = make_nonlinear_ica(n_samples=20_000, n_components=3, random_state=0)
    # Standard errors: mean 1/sqrt(n) = 0.007, covariance entries ~0.01.
    assert_allclose(Z.mean(axis=0), 0.0, atol=0.03)
    assert_allclose(np.cov(Z.T), np.eye(3), atol=0.05)


@pytest.mark.parametrize("noise_variance", [0.25, 1.0, 4.0])
def test_noise_variance(noise_variance):
    X, Z, mixing = make_nonlinear_ica(
        n_samples=5000,
        n_features=20,
        noise_variance=noise_variance,
        random_state=0,
        return_mixing=True,
    )
    noise = X - mixing(Z)
    # 100,000 draws: the sample variance has relative standard error 0.45%.
    assert noise.var() == pytest.approx(noise_variance, rel=0.03)
    assert_allclose(noise.mean(axis=0), 0.0, atol=0.1 * np.sqrt(noise_variance))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mixing_accepts_torch_tensors(activation):
    _, Z, mixing = _noiseless(activation, n_samples=50)
    Z_torch = torch.tensor(Z, requires_grad=True)
    out = mixing(Z_torch)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float64
    assert out.device == Z_torch.device
    assert_allclose(out.detach().numpy(), mixing(Z), rtol=1e-12, atol=1e-12)
    out.sum().backward()  # differentiable with respect to the latents
    assert Z_torch.grad is not None
    assert Z_torch.grad.shape == Z_torch.shape


def test_mixing_keeps_float32_dtype():
    _, Z, mixing = _noiseless("gelu", n_samples=20)
    out = mixing(torch.tensor(Z, dtype=torch.float32))
    assert out.dtype == torch.float32
    assert_allclose(out.numpy(), mixing(Z), rtol=1e-5, atol=1e-5)


def test_mixing_rejects_integer_tensor():
    mixing = NonlinearMixing(np.eye(2), np.zeros(2), "relu")
    with pytest.raises(TypeError, match="floating-point tensor"):
        mixing(torch.ones(3, 2, dtype=torch.int64))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_to_torch_module_agrees(activation):
    _, Z, mixing = _noiseless(activation, n_samples=50)
    module = mixing.to_torch_module()
    assert isinstance(module, torch.nn.Module)
    assert isinstance(module[1], type(TORCH_MODULES[activation]))
    Z_torch = torch.tensor(Z)
    with torch.no_grad():
        out = module(Z_torch)
    assert out.dtype == torch.float64
    assert_allclose(out.numpy(), mixing(Z), rtol=1e-12, atol=1e-12)
    assert_allclose(out.numpy(), mixing(Z_torch).numpy(), rtol=1e-12, atol=1e-12)


def test_to_torch_module_dtype_and_global_rng_untouched():
    mixing = NonlinearMixing(np.ones((3, 2)), np.zeros(3), "tanh")
    state = torch.get_rng_state()
    module = mixing.to_torch_module(dtype=torch.float32)
    assert torch.equal(state, torch.get_rng_state())
    assert module[0].weight.dtype == torch.float32
    assert module[0].weight.shape == (3, 2)


def test_global_numpy_rng_untouched_with_seed():
    # Reading the legacy global state is the point of this test.
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    make_nonlinear_ica(n_samples=10, random_state=0)
    assert_array_equal(state, np.random.get_state()[1])  # noqa: NPY002


def test_mixing_is_read_only():
    _, _, mixing = _noiseless(n_samples=10)
    with pytest.raises(ValueError, match="read-only"):
        mixing.weights[0, 0] = 1.0
    with pytest.raises(AttributeError):
        mixing.activation = "tanh"


def test_mixing_repr():
    mixing = NonlinearMixing(np.ones((4, 2)), np.zeros(4), "gelu", 0.5)
    assert repr(mixing) == (
        "NonlinearMixing(n_features=4, n_components=2, activation='gelu', "
        "noise_variance=0.5)"
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": np.ones(3), "bias": np.ones(3)}, "shape \\(n_features, n_comp"),
        ({"weights": np.ones((3, 2)), "bias": np.ones(2)}, "bias of shape \\(3,\\)"),
        ({"weights": np.ones((3, 2)), "bias": [np.nan] * 3}, "finite"),
        ({"activation": "softplus"}, "activation in"),
        ({"noise_variance": -1.0}, "noise_variance >= 0"),
    ],
)
def test_mixing_validation(kwargs, match):
    params = {"weights": np.ones((3, 2)), "bias": np.zeros(3), "activation": "relu"}
    params.update(kwargs)
    with pytest.raises(ValueError, match=match):
        NonlinearMixing(**params)


@pytest.mark.parametrize("bad", [np.ones((5, 3)), np.ones(2), torch.ones(5, 3)])
def test_mixing_rejects_wrong_latent_shape(bad):
    mixing = NonlinearMixing(np.ones((4, 2)), np.zeros(4), "relu")
    with pytest.raises(ValueError, match="shape \\(n_samples, 2\\)"):
        mixing(bad)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n_samples": 0}, "n_samples"),
        ({"n_samples": 2.5}, "n_samples"),
        ({"n_components": 0}, "n_components"),
        ({"n_features": -1}, "n_features"),
        ({"activation": "softplus"}, "activation"),
        ({"noise_variance": -0.1}, "noise_variance"),
        ({"noise_variance": np.inf}, "noise_variance"),
        ({"weight_range": [0.0, 3.0]}, "weight_range"),
        ({"weight_range": (3.0, 0.0)}, "weight_range"),
        ({"bias_range": (0.0, 1.0, 2.0)}, "bias_range"),
        ({"bias_range": (0.0, np.nan)}, "bias_range"),
        ({"random_state": "seed"}, "random_state"),
        ({"return_mixing": "yes"}, "return_mixing"),
    ],
)
def test_invalid_parameters(kwargs, name):
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter"):
        make_nonlinear_ica(**kwargs)
