"""The contract both estimators share: one parametrised test per behaviour."""

import warnings

import numpy as np
import pytest
from _doubles import hooked
from sklearn.exceptions import ConvergenceWarning

from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica.datasets import make_nonlinear_ica

#: Small, fast configurations of each estimator.
SMALL = {
    NonlinearICAMLE: {"n_nodes": 64, "n_eval_nodes": 256, "hidden_layer_sizes": (8,)},
    NonlinearICAVAE: {"n_eval_samples": 64, "hidden_layer_sizes": (8,)},
}
ESTIMATORS = list(SMALL)


def small(Estimator, **params):
    """``Estimator`` (or a test double of it) in its small configuration."""
    (base,) = [cls for cls in Estimator.__mro__ if cls in SMALL]
    return Estimator(**{**SMALL[base], **params})


@pytest.fixture(scope="module")
def data():
    X, _ = make_nonlinear_ica(300, 2, 5, random_state=0)
    return X


# ------------------------------------------------ warnings point at the caller
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_convergence_warning_points_at_the_callers_line(Estimator, data):
    with pytest.warns(ConvergenceWarning, match="max_iter=2") as record:
        small(Estimator, max_iter=2, random_state=0).fit(data)
    assert [w.filename for w in record] == [__file__]


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_interruption_warning_points_at_the_callers_line(Estimator, data):
    model = small(hooked(Estimator), max_iter=5, random_state=0)
    model.interrupt_at = 5  # 3 steps per epoch: during the second epoch
    with pytest.warns(UserWarning, match="interrupted after 1 epoch;") as record:
        model.fit(data)
    assert [w.filename for w in record] == [__file__]


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_cuda_fallback_warning_points_at_the_callers_line(Estimator, data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the fallback path is not taken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.warns(UserWarning, match="CUDA is not available") as record:
            small(Estimator, max_iter=1, device="cuda").fit(data)
    assert [w.filename for w in record if "CUDA" in str(w.message)] == [__file__]


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
