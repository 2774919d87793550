"""The contract both estimators share: one parametrised test per behaviour.

Everything here runs on :class:`NonlinearICAMLE` and :class:`NonlinearICAVAE`
alike (the machinery is ``sknlica._base`` and ``sknlica._torch.training``);
where the two differ (extra history keys, their own parameters), the test
says so with a per-estimator table or a small branch.  Estimator-specific
behaviour (oracles of each approximation, learning) lives in ``test_mle.py``
and ``test_vae.py``.  Speed is measured in ``benchmarks/``, never asserted
here.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from _doubles import hooked
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import InvalidParameterError

import sknlica._torch.training
from sknlica import NonlinearICAMLE, NonlinearICAVAE, TrainingDivergedError
from sknlica._torch.averaging import ParameterAverage
from sknlica.datasets import make_nonlinear_ica

#: Small, fast configurations of each estimator.
SMALL = {
    NonlinearICAMLE: {"n_nodes": 64, "n_eval_nodes": 256, "hidden_layer_sizes": (8,)},
    NonlinearICAVAE: {"n_eval_samples": 64, "hidden_layer_sizes": (8,)},
}
ESTIMATORS = list(SMALL)

#: The configurations the per-estimator test files used for their contract
#: tests (four epochs on the report's m = 2, n = 20 generator).
FAST = {
    NonlinearICAMLE: {
        "max_iter": 4,
        "n_nodes": 256,
        "n_eval_nodes": 2048,
        "hidden_layer_sizes": (16,),
    },
    NonlinearICAVAE: {
        "max_iter": 4,
        "n_eval_samples": 256,
        "hidden_layer_sizes": (16,),
    },
}

#: The fitted modules of each estimator (public fitted attributes).
PARTS = {
    NonlinearICAMLE: ("decoder_", "noise_"),
    NonlinearICAVAE: ("encoder_", "decoder_", "noise_"),
}


def _base(Estimator):
    """The public estimator behind ``Estimator`` (or behind a test double)."""
    (base,) = [cls for cls in Estimator.__mro__ if cls in SMALL]
    return base


def epochs_only(Estimator) -> dict:
    """Parameters that keep a fit to its epochs: the MLE's default polishes
    fits that run out of ``max_iter`` on small data with L-BFGS, which
    appends to ``history_`` and can converge where the epochs did not."""
    return {"max_polish_iter": 0} if _base(Estimator) is NonlinearICAMLE else {}


def small(Estimator, **params):
    """``Estimator`` (or a test double of it) in its small configuration."""
    return Estimator(**{**SMALL[_base(Estimator)], **params})


def fast(Estimator, **params):
    """``Estimator`` (or a test double of it) in its :data:`FAST` configuration."""
    return Estimator(**{**FAST[_base(Estimator)], **params})


def _parameters(model):
    """Copies of every parameter and buffer of every fitted module."""
    return [
        tensor.detach().clone()
        for part in PARTS[_base(type(model))]
        for tensor in (
            *getattr(model, part).parameters(),
            *getattr(model, part).buffers(),
        )
    ]


def _modules(model):
    return [getattr(model, part) for part in PARTS[_base(type(model))]]


@pytest.fixture(scope="module")
def data():
    X, _ = make_nonlinear_ica(300, 2, 5, random_state=0)
    return X


@pytest.fixture(scope="module")
def relu_data():
    """The report's generator: 1,000 training and 500 held-out rows, n = 20."""
    X, _ = make_nonlinear_ica(1500, 2, 20, random_state=0)
    return X[:1000], X[1000:]


@pytest.fixture(scope="module")
def fitted(relu_data):
    """``fitted(Estimator)``: a :data:`FAST` fit on 300 rows, made once per module."""
    cache = {}

    def get(Estimator):
        if Estimator not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = fast(Estimator, random_state=0)
                cache[Estimator] = model.fit(relu_data[0][:300])
        return cache[Estimator]

    return get


# ------------------------------------------------ warnings point at the caller
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_convergence_warning_points_at_the_callers_line(Estimator, data):
    with pytest.warns(ConvergenceWarning, match="max_iter=2") as record:
        small(Estimator, max_iter=2, random_state=0, **epochs_only(Estimator)).fit(data)
    # Only ours: torch's DeprecationWarnings of its first forward-mode AD
    # call in a process are recorded too when this test runs first.
    ours = [w.filename for w in record if w.category is ConvergenceWarning]
    assert ours == [__file__]


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_interruption_warning_points_at_the_callers_line(Estimator, data):
    model = small(hooked(Estimator), max_iter=5, random_state=0)
    model.interrupt_at = 5  # 3 steps per epoch: during the second epoch
    with pytest.warns(UserWarning, match="interrupted after 1 epoch;") as record:
        model.fit(data)
    assert [w.filename for w in record] == [__file__]


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_cuda_fallback_warning_points_at_the_callers_line(Estimator, data):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the fallback path is not taken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.warns(UserWarning, match="CUDA is not available") as record:
            small(Estimator, max_iter=1, device="cuda").fit(data)
    assert [w.filename for w in record if "CUDA" in str(w.message)] == [__file__]


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_max_iter_without_convergence_warns(Estimator, relu_data):
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        fast(Estimator, max_iter=2, random_state=0, **epochs_only(Estimator)).fit(
            relu_data[0]
        )


# --------------------------------------------------------- interrupts
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_one_interrupt_stops_every_restart(Estimator, data):
    model = small(hooked(Estimator), max_iter=3, n_init=3, random_state=0)
    model.interrupt_at = 5
    with pytest.warns(UserWarning, match="restart 1 of 3 .the remaining 2 were not"):
        model.fit(data)
    # The interrupted restart's first epoch is kept; no other restart ran.
    assert model.steps == 5 and model.n_iter_ == 1 and model.best_epoch_ == 1
    assert np.all(np.isfinite(model.transform(data)))


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_interrupt_before_any_epoch_reraises(Estimator, data):
    model = small(hooked(Estimator), max_iter=3, random_state=0)
    model.interrupt_at = 2
    with pytest.raises(KeyboardInterrupt):
        model.fit(data)
    assert not hasattr(model, "decoder_")


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_keyboard_interrupt_keeps_the_best_model(Estimator, relu_data):
    X = relu_data[0][:256]  # 230 training rows = 2 steps per epoch
    model = fast(hooked(Estimator), random_state=0)
    model.interrupt_at = 5
    with pytest.warns(UserWarning, match="interrupted after 2 epochs"):
        model.fit(X)
    assert model.n_iter_ == 2 and not model.converged_
    assert np.all(np.isfinite(model.transform(X)))


# ------------------------------------------------------- epoch schedules
def test_kl_warmup_is_the_same_under_fit_and_partial_fit(data):
    params = {"kl_warmup_epochs": 4, "beta": 1.0, "random_state": 0}
    fitted = small(hooked(NonlinearICAVAE), **params, max_iter=4)
    fitted.set_params(early_stopping=False, n_iter_no_change=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted.fit(data)
    incremental = small(hooked(NonlinearICAVAE), **params)
    for _ in range(4):
        incremental.partial_fit(data)
    expected = [0.2, 0.4, 0.6, 0.8]
    np.testing.assert_allclose(fitted.kl_weights, expected)
    np.testing.assert_allclose(incremental.kl_weights, expected)
    # A later partial_fit, or a warm fit, continues the schedule: weight 1.
    incremental.partial_fit(data)
    assert incremental.kl_weights[-1] == 1.0


def test_warm_start_continues_the_kl_warmup(data):
    model = small(hooked(NonlinearICAVAE), kl_warmup_epochs=4, random_state=0)
    model.set_params(max_iter=2, early_stopping=False, warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(data)
        model.fit(data)
    np.testing.assert_allclose(model.kl_weights, [0.2, 0.4, 0.6, 0.8])


# ------------------------------------------------------ determinism, RNGs
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_same_random_state_same_model_and_global_rngs_untouched(Estimator, relu_data):
    X = relu_data[0][:300]
    np_state = np.random.get_state()  # noqa: NPY002 - checking it is untouched
    torch_state = torch.get_rng_state()
    a = fast(Estimator, random_state=7).fit(X)
    b = fast(Estimator, random_state=7).fit(X)
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    np.testing.assert_array_equal(a.score_samples(X), b.score_samples(X))
    assert (
        a.history_[-1]["train_log_likelihood"] == b.history_[-1]["train_log_likelihood"]
    )
    a.sample_posterior(X[:3], n_samples=5, n_steps=2, random_state=0)
    a.sample(3, random_state=0)
    assert np.all(np.random.get_state()[1] == np_state[1])  # noqa: NPY002
    assert torch.equal(torch.get_rng_state(), torch_state)
    c = fast(Estimator, random_state=8).fit(X)
    assert not np.array_equal(a.transform(X), c.transform(X))


# ---------------------------------------------------------- outputs, dtypes
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_float32_in_float32_out_and_float64_in_float64_out(Estimator, relu_data):
    X = relu_data[0][:300]
    for dtype in (np.float32, np.float64):
        model = fast(Estimator, random_state=0).fit(X.astype(dtype))
        expected = torch.float32 if dtype == np.float32 else torch.float64
        for module in _modules(model):
            assert all(p.dtype == expected for p in module.parameters())
        Xd = X[:20].astype(dtype)
        Z = model.transform(Xd)
        assert Z.dtype == dtype
        assert model.score_samples(Xd).dtype == dtype
        assert model.inverse_transform(Z).dtype == dtype
        assert model.sample_posterior(Xd[:2], n_samples=3).dtype == dtype
        if Estimator is NonlinearICAVAE:
            assert model.elbo(Xd).dtype == dtype
    # Inference in the other dtype leaves the fitted (float64) modules untouched.
    model.score_samples(X[:5].astype(np.float32))
    model.transform(X[:5].astype(np.float32))
    assert next(model.decoder_.parameters()).dtype == torch.float64


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_inference_in_another_dtype_leaves_the_fitted_model_intact(
    Estimator, relu_data
):
    X = relu_data[0][:300]
    model = fast(Estimator, random_state=0).fit(X)
    before = model.score_samples(X)
    parameters = _parameters(model)
    assert model.transform(X.astype(np.float32)).dtype == np.float32
    assert model.score_samples(X.astype(np.float32)).dtype == np.float32
    assert next(model.decoder_.parameters()).dtype == torch.float64
    for old, new in zip(parameters, _parameters(model), strict=True):
        assert old.dtype == new.dtype and torch.equal(old, new)
    np.testing.assert_array_equal(model.score_samples(X), before)


#: History keys every estimator records every epoch.
HISTORY_KEYS = {
    "epoch",
    "train_objective",
    "train_log_likelihood",
    "validation_log_likelihood",
    "noise_variance",
    "seconds",
}
#: Keys beyond :data:`HISTORY_KEYS` (as each class documents ``history_``).
EXTRA_HISTORY_KEYS = {
    NonlinearICAMLE: {"low_ess_fraction", "adaptive_training"},
    NonlinearICAVAE: {"train_elbo", "validation_elbo"},
}
#: Keys recorded only with a validation split (``early_stopping=True``).
VALIDATION_KEYS = {
    NonlinearICAMLE: {
        "validation_log_likelihood",
        "low_ess_fraction",
        "adaptive_training",
    },
    NonlinearICAVAE: {"validation_log_likelihood", "validation_elbo"},
}


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_history_records_every_epoch(Estimator, fitted, relu_data):
    model = fitted(Estimator)
    keys = HISTORY_KEYS | EXTRA_HISTORY_KEYS[Estimator]
    # The MLE's default may append L-BFGS entries after the epochs.
    epochs = [h for h in model.history_ if h["phase"] != "lbfgs"]
    assert len(epochs) == model.n_iter_
    assert model.history_[: model.n_iter_] == epochs
    assert all(keys <= set(h) for h in model.history_)
    entries = list(range(1, len(model.history_) + 1))
    assert [h["epoch"] for h in model.history_] == entries
    seconds = [h["seconds"] for h in model.history_]
    assert seconds == sorted(seconds)
    if Estimator is NonlinearICAVAE:
        assert all(
            h["validation_elbo"] <= h["validation_log_likelihood"]
            for h in model.history_
        )
    no_val = fast(Estimator, early_stopping=False, random_state=0)
    no_val.fit(relu_data[0][:200])
    assert not VALIDATION_KEYS[Estimator] & set(no_val.history_[0])
    assert (keys - VALIDATION_KEYS[Estimator]) <= set(no_val.history_[0])


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_fixed_noise_variance_is_not_learned(Estimator, relu_data):
    model = fast(
        Estimator, noise_variance=0.7, learn_noise_variance=False, random_state=0
    ).fit(relu_data[0][:300])
    assert model.noise_variance_ == pytest.approx(0.7, rel=1e-12)
    assert all(h["noise_variance"] == pytest.approx(0.7) for h in model.history_)
    assert list(model.noise_.parameters()) == []


# ---------------------------------------------------------------- sampling
#: Variance of 1,000 sampled residuals against sigma^2: the standard error
#: is about 5% (sqrt(2 / 1000)); measured ratio 0.996 for both estimators.
SAMPLE_NOISE_RTOL = 0.3


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_sample_shapes_and_reproducibility(Estimator, fitted):
    model = fitted(Estimator)
    X1, Z1 = model.sample(50, random_state=1, return_latent=True)
    X2 = model.sample(50, random_state=1)
    _, Z2 = model.sample(50, random_state=1, return_latent=True)
    assert X1.shape == (50, 20) and Z1.shape == (50, 2)
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(Z1, Z2)
    assert not np.array_equal(X1, model.sample(50, random_state=2))
    # The residuals are the observation noise: variance sigma^2.
    residual = X1 - model.inverse_transform(Z1)
    assert residual.var() == pytest.approx(model.noise_variance_, rel=SAMPLE_NOISE_RTOL)
    with pytest.raises(ValueError, match="n_samples should be a positive integer"):
        model.sample(0)


def _linear_gaussian(n_samples=400, n_features=4, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n_features, 2))
    b = rng.normal(size=n_features)
    Z = rng.standard_normal((n_samples, 2))
    return Z @ A.T + b + 0.5 * rng.standard_normal((n_samples, n_features))


#: Parameters of the linear-decoder fits whose posterior is Gaussian.  The
#: VAE's encoder gets a hidden layer so that it is *not* the exact posterior
#: after 20 epochs: MALA has something to correct.
LINEAR = {
    NonlinearICAMLE: {},
    NonlinearICAVAE: {"encoder_hidden_layer_sizes": (8,)},
}
#: 2,000 correlated MALA draws (40 steps) against the exact posterior: means
#: within this many posterior standard deviations (measured 0.04 MLE, 0.02
#: VAE; the VAE's encoder draws alone, n_steps=0, miss by 1.4) ...
POSTERIOR_MEAN_TOL = 0.15
#: ... and covariances within these tolerances (measured at most 67% and 53%
#: of them; the encoder alone: 13 times them).
POSTERIOR_COV_RTOL, POSTERIOR_COV_ATOL = 0.2, 0.02


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_sample_posterior_with_mcmc_reaches_the_exact_posterior(Estimator):
    # Linear decoder: p(z | x) is Gaussian with a closed form.
    X = _linear_gaussian(n_samples=300)
    model = Estimator(
        hidden_layer_sizes=(),
        activation="identity",
        max_iter=20,
        random_state=0,
        **LINEAR[Estimator],
    ).fit(X)
    linear = model.decoder_[0]
    A = linear.weight.detach().double().numpy()
    b = linear.bias.detach().double().numpy()
    s2 = model.noise_variance_
    post_cov = np.linalg.inv(np.eye(2) + A.T @ A / s2)
    rows = X[:3]
    post_mean = (rows - b) @ A @ post_cov.T / s2
    draws = model.sample_posterior(rows, n_samples=2000, n_steps=40, random_state=0)
    assert draws.shape == (3, 2000, 2)
    std = np.sqrt(np.diag(post_cov))
    assert np.all(np.abs(draws.mean(1) - post_mean) < POSTERIOR_MEAN_TOL * std)
    for row in range(3):
        np.testing.assert_allclose(
            np.cov(draws[row].T),
            post_cov,
            rtol=POSTERIOR_COV_RTOL,
            atol=POSTERIOR_COV_ATOL,
        )


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_sample_posterior_validates_its_counts(Estimator, fitted, relu_data):
    model = fitted(Estimator)
    rows = relu_data[1][:2]
    with pytest.raises(ValueError, match="n_steps should be an integer >= 0"):
        model.sample_posterior(rows, n_steps=-1)
    with pytest.raises(ValueError, match="n_samples should be an integer >= 1"):
        model.sample_posterior(rows, n_samples=0)
    draws = model.sample_posterior(rows, n_samples=7, n_steps=0, random_state=0)
    again = model.sample_posterior(rows, n_samples=7, n_steps=0, random_state=0)
    assert draws.shape == (2, 7, 2)
    np.testing.assert_array_equal(draws, again)


# -------------------------------------------------------------- sklearn glue
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_pickle_and_clone_roundtrip(Estimator, fitted, relu_data):
    model = fitted(Estimator)
    X = relu_data[1][:50]
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.transform(X), model.transform(X))
    np.testing.assert_array_equal(restored.score_samples(X), model.score_samples(X))
    for module in _modules(restored):
        assert all(p.device.type == "cpu" for p in module.parameters())
    fresh = clone(model)
    assert not hasattr(fresh, "decoder_")
    assert fresh.get_params() == model.get_params()


#: A warm fit may end slightly below the model it started from (minibatch
#: noise), never far: measured +11.8 (MLE) and +10.5 (VAE) nats above it
#: after four more epochs, and 32 and 19 above a one-epoch cold fit.
WARM_START_SLACK = 0.05


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_warm_start_continues_from_the_fitted_model(Estimator, relu_data):
    # The rows each estimator's own test file used.
    X = relu_data[0][: {NonlinearICAMLE: 1000, NonlinearICAVAE: 400}[Estimator]]
    model = fast(Estimator, warm_start=True, random_state=0).fit(X)
    before = model.score(X)
    model.fit(X)
    # A warm restart resumes at the fitted optimum rather than a fresh init.
    assert model.score(X) > before - WARM_START_SLACK
    cold = fast(Estimator, max_iter=1, random_state=0).fit(X)
    assert model.score(X) > cold.score(X)


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_n_init_keeps_the_best_initialisation(Estimator, relu_data):
    X = relu_data[0][:400]
    model = fast(hooked(Estimator), n_init=3, random_state=0).fit(X)
    assert model.history_
    best = max(h["validation_log_likelihood"] for h in model.history_)
    assert np.isfinite(best)
    # Three restarts ran (each at least one epoch), and the kept history is
    # one restart's, numbered from 1.
    assert model.epochs_begun.count(0) == 3
    assert model.history_[0]["epoch"] == 1


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_verbose_shows_a_progress_bar(Estimator, relu_data, capsys):
    fast(Estimator, max_iter=2, verbose=1, random_state=0).fit(relu_data[0][:200])
    assert Estimator.__name__ in capsys.readouterr().err


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_silent_by_default(Estimator, data, capsys):
    small(Estimator, max_iter=1, random_state=0).fit(data)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# ------------------------------------------------------------------ devices
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_cuda_request_falls_back_to_cpu_with_warning(Estimator, relu_data):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the fallback path is not taken")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        model = fast(Estimator, device="cuda", random_state=0).fit(relu_data[0][:200])
    for module in _modules(model):
        assert all(p.device.type == "cpu" for p in module.parameters())


@needs_cuda
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_cuda_fit_stores_cpu_state(Estimator, relu_data):
    model = fast(Estimator, device="cuda", random_state=0).fit(relu_data[0])
    for module in _modules(model):
        assert all(p.device.type == "cpu" for p in module.parameters())
    assert np.isfinite(model.score(relu_data[1]))


@needs_cuda
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_cuda_training_paths_end_in_cpu_state(Estimator, scale_data):
    data = scale_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = scaled(Estimator, max_iter=2, device="cuda").fit(data)
    model.partial_fit(data.astype(np.float32))
    for module in _modules(model):
        assert all(p.device.type == "cpu" for p in module.parameters())
        assert all(b.device.type == "cpu" for b in module.buffers())
    for state in model._optimizer_states_:
        for values in state["state"].values():
            assert all(
                v.device.type == "cpu"
                for v in values.values()
                if isinstance(v, torch.Tensor)
            )
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_allclose(restored.transform(data), model.transform(data))
    assert np.isfinite(restored.sample(5, random_state=0)).all()


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("Estimator", ESTIMATORS)
@pytest.mark.parametrize(
    ("X", "match"),
    [
        (np.full((10, 3), np.nan), "NaN"),
        (np.full((10, 3), np.inf), "infinity"),
        (np.ones((10, 3)) + 1j, "Complex data not supported"),
        (np.ones((1, 3)), "1 sample"),
        (np.ones(5), "Expected 2D array"),
    ],
    ids=["nan", "inf", "complex", "one_row", "1d"],
)
def test_bad_training_input_raises_clear_errors(Estimator, X, match):
    with pytest.raises(ValueError, match=match):
        fast(Estimator).fit(X)


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_sparse_input_is_rejected_with_advice(Estimator):
    from scipy.sparse import csr_matrix

    with pytest.raises(TypeError, match="dense data is required"):
        fast(Estimator).fit(csr_matrix(np.eye(5)))


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_wrong_width_at_inference(Estimator, fitted):
    model = fitted(Estimator)
    name = Estimator.__name__
    for method in (model.transform, model.score_samples):
        with pytest.raises(ValueError, match=f"X has 3 features, but {name}"):
            method(np.ones((4, 3)))
    with pytest.raises(ValueError, match=f"X has 3 features, but {name}"):
        model.sample_posterior(np.ones((4, 3)), n_samples=2)
    with pytest.raises(ValueError, match="n_components=2 columns, got 3"):
        model.inverse_transform(np.ones((4, 3)))


#: Invalid values of parameters both estimators take.
SHARED_INVALID = [
    ({"noise_variance": -1.0}, "noise_variance"),
    ({"solver": "newton"}, "solver"),
    ({"activation": "swish"}, "activation"),
    ({"batch_size": 0}, "batch_size"),
    ({"max_iter": 0}, "max_iter"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"n_init": 0}, "n_init"),
    ({"device": "tpu"}, "device"),
]
#: Invalid values of each estimator's own parameters.
OWN_INVALID = {
    NonlinearICAMLE: [
        ({"integration": "simpson"}, "integration"),
        ({"gradient": "numeric"}, "gradient"),
        ({"n_nodes": 0}, "n_nodes"),
    ],
    NonlinearICAVAE: [
        ({"objective": "vr"}, "objective"),
        ({"gradient_estimator": "pathwise"}, "gradient_estimator"),
        ({"training": "em"}, "training"),
        ({"n_mc_samples": 0}, "n_mc_samples"),
        ({"n_importance_samples": 0}, "n_importance_samples"),
        ({"beta": -1.0}, "beta"),
        ({"kl_warmup_epochs": -1}, "kl_warmup_epochs"),
        ({"n_eval_samples": 0}, "n_eval_samples"),
        ({"amortized_variance": "yes"}, "amortized_variance"),
    ],
}


@pytest.mark.parametrize(
    ("Estimator", "params", "name"),
    [
        pytest.param(Estimator, params, name, id=f"{Estimator.__name__}-{name}")
        for Estimator in ESTIMATORS
        for params, name in SHARED_INVALID + OWN_INVALID[Estimator]
    ],
)
def test_invalid_parameters_name_the_parameter(Estimator, params, name):
    X = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter"):
        Estimator(**params).fit(X)


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_invalid_hidden_layer_sizes(Estimator):
    with pytest.raises(ValueError, match="sequence of positive integers"):
        Estimator(hidden_layer_sizes=(4, 0)).fit(np.ones((10, 2)) + np.eye(10, 2))


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_early_stopping_needs_enough_rows(Estimator):
    X = np.random.default_rng(0).normal(size=(2, 3))
    with pytest.raises(ValueError, match="set early_stopping=False"):
        fast(Estimator, validation_fraction=0.99).fit(X)


# ------------------------------------------------------------------- faults
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_non_finite_loss_keeps_the_best_finite_model(Estimator, relu_data):
    X = relu_data[0][:256]  # 230 training rows = 2 steps per epoch
    # A random start: the linear start's first epoch is already its best.
    model = fast(hooked(Estimator), init="random", random_state=0)
    model.fail_at = 5
    with pytest.raises(TrainingDivergedError, match="learning_rate_init"):
        model.fit(X)
    for module in _modules(model):
        assert all(torch.isfinite(p).all() for p in module.parameters())
    assert np.isfinite(model.noise_variance_)
    assert np.all(np.isfinite(model.transform(X)))
    assert np.all(np.isfinite(model.score_samples(X)))
    assert model.best_epoch_ == 2


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_non_finite_loss_in_the_first_epoch_leaves_no_model(Estimator, relu_data):
    model = fast(hooked(Estimator), random_state=0)
    model.fail_at = 1
    with pytest.raises(TrainingDivergedError, match="first epoch"):
        model.fit(relu_data[0][:256])
    assert not hasattr(model, "decoder_")


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_failed_warm_start_leaves_the_fitted_model_intact(Estimator, relu_data):
    X = relu_data[0][:256]
    model = fast(hooked(Estimator), warm_start=True, random_state=0)
    model.fail_at = 10**9
    model.fit(X)
    before, parameters = model.score_samples(X), _parameters(model)
    model.fail_at = model.steps + 1  # the warm fit's first step
    with pytest.raises(TrainingDivergedError, match="first epoch"):
        model.fit(X)
    np.testing.assert_array_equal(model.score_samples(X), before)
    for old, new in zip(parameters, _parameters(model), strict=True):
        assert torch.equal(old, new)


# ---------------------------------------- regression: negative strides
@pytest.mark.parametrize("Estimator", ESTIMATORS)
@pytest.mark.parametrize(
    "view",
    [lambda X: X[::-1], lambda X: X[:, ::-1], lambda X: X[::-2]],
    ids=["rows_reversed", "columns_reversed", "every_other_row_reversed"],
)
def test_inference_accepts_views_with_negative_strides(Estimator, view, fitted):
    # Reversed views once crashed torch.tensor ("negative strides").
    model = fitted(Estimator)
    X = np.random.default_rng(0).normal(size=(12, 20))
    reversed_view = view(X)
    assert any(stride < 0 for stride in reversed_view.strides)
    copy = np.ascontiguousarray(reversed_view)
    methods = ["score_samples", "transform"]
    if Estimator is NonlinearICAVAE:
        methods.append("elbo")
    for name in methods:
        method = getattr(model, name)
        np.testing.assert_array_equal(method(reversed_view), method(copy))
    np.testing.assert_array_equal(
        model.sample_posterior(reversed_view, 4, n_steps=2, random_state=0),
        model.sample_posterior(copy, 4, n_steps=2, random_state=0),
    )


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_reversed_rows_give_the_same_rows_reversed(Estimator, fitted):
    # A row's values do not depend on the other rows passed, nor their order
    # (up to round-off: evaluation centres on the batch's mean).
    model = fitted(Estimator)
    X = np.random.default_rng(1).normal(size=(12, 20))
    np.testing.assert_allclose(
        model.score_samples(X[::-1]), model.score_samples(X)[::-1], rtol=1e-10
    )
    np.testing.assert_allclose(
        model.transform(X[::-1]), model.transform(X)[::-1], rtol=1e-8, atol=1e-10
    )


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_fit_accepts_views_with_negative_strides(Estimator, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = small(Estimator, max_iter=2, random_state=0).fit(data[::-1])
        b = small(Estimator, max_iter=2, random_state=0).fit(data[::-1].copy())
    np.testing.assert_array_equal(a.transform(data), b.transform(data))
    a.partial_fit(data[::-1])
    b.partial_fit(data[::-1].copy())
    np.testing.assert_array_equal(a.transform(data), b.transform(data))


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_inverse_transform_accepts_views_with_negative_strides(Estimator, fitted):
    model = fitted(Estimator)
    Z = np.random.default_rng(0).normal(size=(6, 2))
    np.testing.assert_array_equal(
        model.inverse_transform(Z[::-1]), model.inverse_transform(Z[::-1].copy())
    )


# ------------------------------------------- incremental training (partial_fit)
#: The configuration of the incremental-training, threading and large-data
#: tests: 600 rows of n = 6, minibatches of 64 (so ``partial_fit`` makes
#: several steps per call).
SCALE = {"hidden_layer_sizes": (16,), "batch_size": 64, "random_state": 0}


def scaled(Estimator, **params):
    return small(Estimator, **{**SCALE, **params})


@pytest.fixture(scope="module")
def scale_data():
    X, _ = make_nonlinear_ica(600, n_components=2, n_features=6, random_state=0)
    return X


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_partial_fit_trains_one_epoch_per_call(Estimator, scale_data):
    data = scale_data
    model = scaled(Estimator)
    chunks = np.array_split(data, 3)
    for i, chunk in enumerate(chunks, start=1):
        model.partial_fit(chunk)
        assert model.n_iter_ == len(model.history_) == i
        assert model.history_[-1]["epoch"] == i
    # Repeated passes over the data improve the fit (the first call starts
    # from a random decoder).
    before = model.score(data)
    for _ in range(5):
        model.partial_fit(data)
    assert model.score(data) > before
    assert np.isfinite(model.transform(data)).all()


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_partial_fit_is_reproducible_and_survives_pickling(Estimator, scale_data):
    data = scale_data
    a = scaled(Estimator).partial_fit(data[:300])
    b = pickle.loads(pickle.dumps(scaled(Estimator).partial_fit(data[:300])))
    # The optimizer state travels with the pickle, so both continue alike.
    a.partial_fit(data[300:])
    b.partial_fit(data[300:])
    np.testing.assert_array_equal(a.transform(data), b.transform(data))


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_partial_fit_continues_a_fit_and_fit_starts_over(Estimator, scale_data):
    data = scale_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = scaled(Estimator, max_iter=2).fit(data)
        model.partial_fit(data)
        epochs = [entry for entry in model.history_ if entry["phase"] != "lbfgs"]
        assert model.n_iter_ == 3 == len(epochs)
        assert model.best_epoch_ == len(model.history_)
        model.fit(data)
    epochs = [entry for entry in model.history_ if entry["phase"] != "lbfgs"]
    assert model.n_iter_ == 2 == len(epochs)


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_partial_fit_unavailable_with_restarts(Estimator):
    model = Estimator(n_init=3)
    assert not hasattr(model, "partial_fit")
    with pytest.raises(AttributeError, match="partial_fit") as error:
        model.partial_fit(np.zeros((4, 2)))
    # The reason and the fix show in the traceback as the direct cause.
    assert "set n_init=1" in str(error.value.__cause__)
    assert hasattr(Estimator(n_init=1), "partial_fit")
    # "auto" is one fit with the standard prior.
    assert hasattr(Estimator(n_init="auto"), "partial_fit")


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_partial_fit_rejects_a_different_feature_count(Estimator, scale_data):
    model = scaled(Estimator).partial_fit(scale_data)
    with pytest.raises(ValueError, match="features"):
        model.partial_fit(scale_data[:, :4])


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_diverged_partial_fit_keeps_the_previous_model(Estimator, scale_data):
    model = scaled(hooked(Estimator))
    model.partial_fit(scale_data)
    before, history = _parameters(model), list(model.history_)
    model.fail = True
    with pytest.raises(TrainingDivergedError, match="previous model was kept"):
        model.partial_fit(scale_data)
    for old, new in zip(before, _parameters(model), strict=True):
        torch.testing.assert_close(old, new, rtol=0, atol=0)
    assert model.history_ == history and model.n_iter_ == 1


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_diverged_first_partial_fit_leaves_no_model(Estimator, scale_data):
    model = scaled(hooked(Estimator))
    model.fail = True
    with pytest.raises(TrainingDivergedError, match=r"partial_fit diverged.*\. Try"):
        model.partial_fit(scale_data)
    assert not hasattr(model, "decoder_")


# ---------------------------------------------------------------- n_threads
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_n_threads_applies_inside_and_is_restored_after(Estimator, scale_data):
    outside = torch.get_num_threads()
    inside = 2 if outside == 1 else 1
    model = scaled(hooked(Estimator), max_iter=1, n_threads=inside)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(scale_data)
    assert model.seen_threads == inside
    assert torch.get_num_threads() == outside
    model.partial_fit(scale_data)
    assert model.seen_threads == inside
    assert torch.get_num_threads() == outside


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_n_threads_does_not_change_results(Estimator, scale_data):
    data = scale_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = scaled(Estimator, max_iter=2, n_threads=1).fit(data)
        b = scaled(Estimator, max_iter=2).fit(data)
    np.testing.assert_allclose(a.transform(data), b.transform(data), rtol=1e-9)
    np.testing.assert_allclose(a.score_samples(data), b.score_samples(data))


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_invalid_n_threads_is_rejected_with_a_clear_message(Estimator, scale_data):
    with pytest.raises(ValueError, match="n_threads"):
        scaled(Estimator, n_threads=0).fit(scale_data)
    model = scaled(Estimator).partial_fit(scale_data)
    model.set_params(n_threads=-2)  # set_params does not validate
    with pytest.raises(ValueError, match="n_threads should be None or a positive"):
        model.transform(scale_data)


# --------------------------------------------------------------- large data
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_fit_reads_a_read_only_memory_map_without_changing_it(
    Estimator, scale_data, tmp_path
):
    data = scale_data
    path = tmp_path / "X.npy"
    np.save(path, data)
    X = np.load(path, mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "not writable"
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = scaled(Estimator, max_iter=2).fit(X)
        model.partial_fit(X)
    np.testing.assert_array_equal(np.load(path), data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference = scaled(Estimator, max_iter=2).fit(data.copy())
    np.testing.assert_allclose(
        reference.partial_fit(data).transform(data), model.transform(data)
    )


PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    import numpy as np, torch
    torch.set_num_threads(1)
    from sknlica import {estimator}

    def status(key):  # kB, from the kernel's accounting of this process
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    params = dict(hidden_layer_sizes=(8,), batch_size=1024, max_iter=1,
                  random_state=0, {extra})
    X = np.random.default_rng(0).standard_normal((int(sys.argv[1]), 20))
    warnings.simplefilter("ignore")
    {estimator}(**params).fit(X[:4096])  # lazy initialisation happens here
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    before = status("VmRSS")
    {estimator}(**params).fit(X)
    print(status("VmHWM") - before)
    """
)


def _can_reset_peak_memory():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(
    not _can_reset_peak_memory(), reason="needs Linux's /proc/self/clear_refs"
)
@pytest.mark.parametrize(
    "estimator, extra",
    [
        # Enough evaluation nodes that the validation pass works in chunks of
        # their fixed size (sknlica._torch.chunks.PAIRWISE_ELEMENTS) at both sizes.
        ("NonlinearICAMLE", "n_nodes=256, n_eval_nodes=1024"),
        ("NonlinearICAVAE", "n_importance_samples=2"),
    ],
)
def test_fit_memory_does_not_grow_with_the_number_of_rows(estimator, extra):
    # Peak memory of fit above the resident set it starts from (which holds
    # the data), at 100k and 500k rows: one copy of the training data would
    # add 61 MB between them.  Measured: 6-17 MB for the indices, the 10%
    # validation copy, the permutations and allocator noise.  Two bugs this
    # caught: per-step loss tensors, and per-chunk evaluation results kept in
    # lists, pinned glibc's heap above the freed temporaries (+130 MB per
    # epoch at 400k rows; +1.9 GB for a validation pass over 100k rows).
    script = PEAK_MEMORY_SCRIPT.format(estimator=estimator, extra=extra)

    def peak_growth(n_rows):
        out = subprocess.run(
            [sys.executable, "-c", script, str(n_rows)],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.strip())

    small_rows, large_rows = 100_000, 500_000
    data_growth = (large_rows - small_rows) * 20 * 8
    growth = peak_growth(large_rows) - peak_growth(small_rows)
    assert growth < 0.5 * data_growth, (growth, data_growth)


# ------------------------------------------------ parameter averaging (ema_decay)
@pytest.fixture(scope="module")
def averaging_data():
    X, _ = make_nonlinear_ica(400, n_components=2, n_features=5, random_state=0)
    return X


class _RecordingAverage(ParameterAverage):
    """Keeps a copy of the average each time it is applied (once per epoch)."""

    instances: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.snapshots = []
        self.instances.append(self)

    def applied(self):
        self.snapshots.append([a.clone() for a in self.average])
        return super().applied()


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_fit_keeps_the_average_of_the_best_epoch(
    Estimator, averaging_data, monkeypatch
):
    _RecordingAverage.instances = []
    monkeypatch.setattr(sknlica._torch.training, "ParameterAverage", _RecordingAverage)
    model = small(
        Estimator,
        max_iter=6,
        batch_size=50,
        ema_decay=0.9,
        random_state=0,
        **epochs_only(Estimator),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(averaging_data)
    (average,) = _RecordingAverage.instances
    assert len(average.snapshots) == model.n_iter_
    # 360 training rows in batches of 50: 8 steps per epoch.
    assert average.n_updates == 8 * model.n_iter_
    kept = average.snapshots[model.best_epoch_ - 1]
    position = {id(p): i for i, p in enumerate(average.parameters)}
    # On the CPU the fitted decoder is the trained module itself, so its
    # parameters are found in the average by identity; training ran in
    # standard units, so the fitted model, mapped back to them, is the kept
    # average (up to the rounding of the map and its inverse).
    fitted = list(model.decoder_.parameters())
    assert fitted and all(id(p) in position for p in fitted)
    trained = copy.deepcopy(model._fitted_model())
    model._standardisation_.unfold(trained)
    for parameter, unfolded in zip(fitted, trained.decoder.parameters(), strict=True):
        torch.testing.assert_close(
            unfolded.detach(), kept[position[id(parameter)]], rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_zero_decay_trains_without_averaging(Estimator, averaging_data, monkeypatch):
    _RecordingAverage.instances = []
    monkeypatch.setattr(sknlica._torch.training, "ParameterAverage", _RecordingAverage)
    settings = {
        "max_iter": 3,
        "batch_size": 50,
        "random_state": 0,
        **epochs_only(Estimator),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        raw = small(Estimator, ema_decay=0.0, **settings).fit(averaging_data)
        assert _RecordingAverage.instances == []
        averaged = small(Estimator, **settings).fit(averaging_data)
    assert len(_RecordingAverage.instances) == 1
    # Same seed, same steps: only the kept parameters differ.
    assert [h["train_objective"] for h in raw.history_] == [
        h["train_objective"] for h in averaged.history_
    ]
    assert not all(
        torch.equal(a, b)
        for a, b in zip(
            raw.decoder_.parameters(), averaged.decoder_.parameters(), strict=True
        )
    )


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_partial_fit_does_not_average(Estimator, averaging_data, monkeypatch):
    _RecordingAverage.instances = []
    monkeypatch.setattr(sknlica._torch.training, "ParameterAverage", _RecordingAverage)
    small(Estimator, ema_decay=0.9, random_state=0).partial_fit(averaging_data)
    assert _RecordingAverage.instances == []


@pytest.mark.parametrize("Estimator", ESTIMATORS)
@pytest.mark.parametrize("decay", [1.0, -0.5])
def test_invalid_ema_decay_gets_a_clear_error(Estimator, decay, averaging_data):
    with pytest.raises(InvalidParameterError, match="ema_decay"):
        Estimator(ema_decay=decay).fit(averaging_data)
