"""Hostile use: warm starts and set_params, collapsing rules, real Ctrl-C.

Each section is one fuzz category of the robustness issue; every test runs
on both estimators.
"""

import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning

from sknlica import (
    NonlinearICAMLE,
    NonlinearICAVAE,
    TrainingDivergedError,
    marginal_log_likelihood,
)
from sknlica.datasets import make_nonlinear_ica

SMALL = {
    NonlinearICAMLE: {"n_nodes": 64, "n_eval_nodes": 256, "hidden_layer_sizes": (8,)},
    NonlinearICAVAE: {"n_eval_samples": 64, "hidden_layer_sizes": (8,)},
}
ESTIMATORS = list(SMALL)

#: Every parameter that shapes the fitted model, with a different value.
ARCHITECTURE_CHANGES = {
    NonlinearICAMLE: [
        ("n_components", 3),
        ("hidden_layer_sizes", (4,)),
        ("activation", "tanh"),
        ("output_activation", "sigmoid"),
        ("learn_noise_variance", False),
        ("noise", "diagonal"),
    ],
    NonlinearICAVAE: [
        ("n_components", 3),
        ("hidden_layer_sizes", (4,)),
        ("activation", "tanh"),
        ("output_activation", "sigmoid"),
        ("learn_noise_variance", False),
        ("encoder_hidden_layer_sizes", (4, 4)),
        ("amortized_variance", True),
        ("noise", "diagonal"),
    ],
}


@pytest.fixture(scope="module")
def data():
    X, _ = make_nonlinear_ica(200, 2, 5, random_state=0)
    return X


@pytest.fixture(autouse=True)
def _quiet_convergence():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _cases():
    return [
        (E, name, value) for E in ESTIMATORS for name, value in ARCHITECTURE_CHANGES[E]
    ]


# ------------------------------------------- warm starts and set_params
@pytest.mark.parametrize(("Estimator", "name", "value"), _cases())
def test_warm_start_refuses_a_changed_architecture(Estimator, name, value, data):
    model = Estimator(**SMALL[Estimator], max_iter=2, warm_start=True, random_state=0)
    model.fit(data)
    before = model.score_samples(data)
    model.set_params(**{name: value})
    with pytest.raises(ValueError, match=f"{name}=.*fitted: .*warm_start=False"):
        model.fit(data)
    # The fitted model is untouched, and inference uses only fitted state.
    np.testing.assert_array_equal(model.score_samples(data), before)
    assert model.transform(data).shape == (len(data), 2)
    assert model.sample(3, return_latent=True)[1].shape == (3, 2)
    # Without warm_start the new architecture trains from scratch.
    model.set_params(warm_start=False).fit(data)
    assert np.all(np.isfinite(model.score_samples(data)))


@pytest.mark.parametrize(("Estimator", "name", "value"), _cases())
def test_partial_fit_refuses_a_changed_architecture(Estimator, name, value, data):
    model = Estimator(**SMALL[Estimator], random_state=0).partial_fit(data)
    model.set_params(**{name: value})
    with pytest.raises(ValueError, match=f"partial_fit continues .*{name}="):
        model.partial_fit(data)


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_a_fixed_noise_variance_is_part_of_the_architecture(Estimator, data):
    model = Estimator(
        **SMALL[Estimator],
        max_iter=1,
        learn_noise_variance=False,
        noise_variance=0.5,
        warm_start=True,
    ).fit(data)
    model.set_params(noise_variance=0.7)
    with pytest.raises(ValueError, match="noise_variance=0.7 .fitted: 0.5."):
        model.fit(data)


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_inference_after_set_params_uses_the_fitted_model(Estimator, data):
    model = Estimator(**SMALL[Estimator], max_iter=1, random_state=0).fit(data)
    expected = (model.transform(data), model.score_samples(data), model.sample(4, 0))
    model.set_params(n_components=3, hidden_layer_sizes=(5, 5), activation="tanh")
    got = (model.transform(data), model.score_samples(data), model.sample(4, 0))
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)
    assert model.inverse_transform(expected[0]).shape == data.shape
    assert len(model.get_feature_names_out()) == 2


# ------------------------------------------------ rules that collapse
@pytest.mark.parametrize("integration", ["grid", "gauss_hermite"])
def test_a_grid_with_one_node_per_axis_is_refused(integration):
    X = np.random.default_rng(0).normal(size=(40, 25))
    model = NonlinearICAMLE(n_components=20, integration=integration)
    with pytest.raises(ValueError, match="1 node per axis.*n_nodes >= 1048576"):
        model.fit(X)
    with pytest.raises(ValueError, match="integration='qmc'"):
        marginal_log_likelihood(
            X[:, :3],
            lambda z: z[:, :3],
            1.0,
            n_components=20,
            integration=integration,
            n_nodes=1000,
        )
    # "auto" never collapses: it takes QMC at this size.
    NonlinearICAMLE(n_components=20, max_iter=1, hidden_layer_sizes=(4,)).fit(X)


# --------------------------------------------------------------- Ctrl-C
_CHILD = """
import sys, time
import sknlica._torch.training as training
from sknlica import {estimator}
from sknlica.datasets import make_nonlinear_ica

run_epoch = training.run_epoch


def announcing_run_epoch(*args, **kwargs):
    # Tells the parent when the first epoch is done, so that the signal
    # arrives mid-fit however slow the machine is.
    loss = run_epoch(*args, **kwargs)
    print("epoch", flush=True)
    training.run_epoch = run_epoch
    return loss


training.run_epoch = announcing_run_epoch
X, _ = make_nonlinear_ica(2000, 2, 10, random_state=0)
model = {estimator}(n_init=3, max_iter=10**6, n_iter_no_change=10**6, random_state=0)
print("fitting", flush=True)
model.fit(X)
print("done", model.n_iter_, model.best_epoch_, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_one_sigint_stops_the_whole_fit_and_keeps_the_best_model(Estimator):
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_CHILD.format(estimator=Estimator.__name__)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "fitting"
    assert child.stdout.readline().strip() == "epoch"
    time.sleep(1.0)  # a few more epochs of the first restart
    child.send_signal(signal.SIGINT)
    try:
        out, err = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        pytest.fail("one SIGINT did not stop the fit within 60 s")
    assert child.returncode == 0, err
    assert "interrupted after" in err and "restart 1 of 3" in err
    n_iter, best_epoch = map(int, out.split()[1:])
    assert 1 <= best_epoch <= n_iter


# ----------------------------------------------- units: exact equivariance
#: Fits of ``a X + b`` and of ``X`` agree to this, relative (nats per row,
#: noise variances): the difference is rounding amplified by three epochs
#: of training (measured: 1e-13 in float64).
EQUIVARIANCE_RTOL = 1e-9
EQUIVARIANCE_RTOL_FLOAT32 = 1e-3


def _affine_fits(Estimator, a, b, dtype=np.float64, **extra):
    """Fits of ``a X + b`` and of the same information in X's units."""
    X, _ = make_nonlinear_ica(120, 2, 4, random_state=1)
    moved = (a * X + b).astype(dtype)
    # a X + b is rounded (with a = 1e-8 and b = 1e4 it keeps ~4 digits of
    # X): the reference is fitted to what it carries, mapped back.
    back = ((moved.astype(np.float64) - b) / a).astype(dtype)
    params = {**SMALL[Estimator], "max_iter": 3, "random_state": 0, **extra}
    model = Estimator(**params).fit(moved[:100])
    reference = Estimator(**params).fit(back[:100])
    return model, reference, moved[100:], back[100:]


def _check_equivariance(Estimator, a, b, dtype, rtol, **extra):
    # a X + b carries X only to about eps |b| / a: the training mean of the
    # moved data, rounded at that level, is where the two fits start to
    # differ (measured: 1e-8 relative for a = 1e-6, b = 1e3).
    rtol = max(rtol, 100 * np.finfo(dtype).eps * abs(b) / a)
    model, reference, moved, back = _affine_fits(Estimator, a, b, dtype, **extra)
    n_features = moved.shape[1]
    # Scores differ by the Jacobian of the map, -n log a per row.
    got = model.score_samples(moved).astype(np.float64) + n_features * np.log(a)
    np.testing.assert_allclose(got, reference.score_samples(back), rtol=rtol)
    np.testing.assert_allclose(
        model.noise_variance_, a**2 * np.asarray(reference.noise_variance_), rtol=rtol
    )
    # Latents are unit-free; decoded means follow the map.
    Z = reference.transform(back)
    np.testing.assert_allclose(model.transform(moved), Z, rtol=1e3 * rtol, atol=1e-6)
    decoded = model.inverse_transform(Z).astype(np.float64)
    expected = a * reference.inverse_transform(Z).astype(np.float64) + b
    np.testing.assert_allclose(decoded, expected, rtol=rtol, atol=rtol * (abs(b) + a))


@settings(max_examples=6)
@given(log10_a=st.floats(-8, 8), b=st.floats(-1e4, 1e4))
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_fits_are_equivariant_under_affine_maps_of_the_data(Estimator, log10_a, b):
    _check_equivariance(Estimator, 10.0**log10_a, b, np.float64, EQUIVARIANCE_RTOL)


@pytest.mark.parametrize(("a", "b"), [(1e8, 0.0), (1e-8, 0.0), (1.0, 1e3)])
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_float32_fits_are_equivariant_too(Estimator, a, b):
    _check_equivariance(Estimator, a, b, np.float32, EQUIVARIANCE_RTOL_FLOAT32)


@pytest.mark.parametrize(("a", "b"), [(1e6, -3.0), (1e-6, 1e3)])
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_per_feature_noise_fits_are_equivariant(Estimator, a, b):
    _check_equivariance(
        Estimator, a, b, np.float64, EQUIVARIANCE_RTOL, noise="diagonal"
    )


# ----------------------------------------------- rows that are far away
@settings(max_examples=10)
@given(
    magnitude=st.floats(1e3, 1e200),
    sign=st.sampled_from([-1.0, 1.0]),
    column=st.integers(0, 3),
)
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_an_outlying_row_changes_no_other_row(
    Estimator, fitted, magnitude, sign, column
):
    model, rows = fitted[Estimator]
    outlier = rows[:1].copy()
    outlier[0, column] = sign * magnitude
    both = np.vstack([rows, outlier])
    scores, latents = model.score_samples(both), model.transform(both)
    # Other rows are scored independently: bit for bit the same.
    np.testing.assert_array_equal(scores[:-1], model.score_samples(rows))
    np.testing.assert_array_equal(latents[:-1], model.transform(rows))
    # The outlier itself: a finite score or -inf, never NaN; finite latents.
    assert not np.isnan(scores[-1]) and scores[-1] < model.score_samples(rows).min()
    assert np.all(np.isfinite(latents[-1]))


@pytest.mark.parametrize("Estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_near_the_float_limit_score_minus_infinity_not_nan(Estimator, dtype):
    X, _ = make_nonlinear_ica(100, 2, 4, random_state=0)
    model = Estimator(**SMALL[Estimator], max_iter=1, random_state=0)
    model.fit(X.astype(dtype))
    huge = np.finfo(dtype).max / 10
    rows = np.array([[huge, 0, 0, 0], [1e17, 1e17, -1e17, 1e17]], dtype=dtype)
    scores = model.score_samples(rows)
    assert not np.any(np.isnan(scores)) and np.all(scores < -1e10)
    assert np.all(np.isfinite(model.transform(rows[1:])))


@pytest.fixture(scope="module")
def fitted():
    X, _ = make_nonlinear_ica(120, 2, 4, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return {
            E: (E(**SMALL[E], max_iter=2, random_state=0).fit(X[:100]), X[100:])
            for E in ESTIMATORS
        }


# -------------------------------------------------- fits that blow up
@pytest.mark.parametrize("Estimator", ESTIMATORS)
@pytest.mark.parametrize("learning_rate", [10.0, 100.0])
def test_an_exploded_fit_raises_and_keeps_no_model(Estimator, learning_rate):
    X, _ = make_nonlinear_ica(600, 2, 10, random_state=0)
    model = Estimator(
        **SMALL[Estimator], max_iter=3, learning_rate_init=learning_rate, random_state=0
    )
    with pytest.raises(
        TrainingDivergedError, match="below that of a Gaussian.*smaller"
    ):
        model.fit(X)
    assert not hasattr(model, "decoder_")


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_an_exploded_warm_start_keeps_the_previous_model(Estimator):
    X, _ = make_nonlinear_ica(600, 2, 10, random_state=0)
    model = Estimator(**SMALL[Estimator], max_iter=3, warm_start=True, random_state=0)
    before = model.fit(X).score_samples(X)
    model.set_params(learning_rate_init=100.0)
    with pytest.raises(TrainingDivergedError, match="previous model was kept"):
        model.fit(X)
    np.testing.assert_array_equal(model.score_samples(X), before)


def test_a_converged_fit_worse_than_a_gaussian_warns():
    # At learning rate 10 the MLE does not blow up: it stops, measured 46
    # epochs, at a model worse than the Gaussian it contains.
    X, _ = make_nonlinear_ica(600, 2, 10, random_state=0)
    bad = NonlinearICAMLE(
        **SMALL[NonlinearICAMLE], learning_rate_init=10.0, init="random"
    )
    with pytest.warns(ConvergenceWarning, match="worse than a Gaussian"):
        bad.set_params(random_state=0).fit(X)
    assert bad.converged_


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_a_normal_fit_beats_the_gaussian_silently(Estimator):
    X, _ = make_nonlinear_ica(600, 2, 10, random_state=0)
    good = Estimator(**SMALL[Estimator], n_iter_no_change=3, tol=1e-2, random_state=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        good.fit(X)
    assert good.converged_
    assert not any("worse than a Gaussian" in str(w.message) for w in record)
