"""sknlica.plotting: return types, given axes, labels, artists, errors."""

import builtins
import subprocess
import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from sknlica import (  # noqa: E402
    NonlinearICAMLE,
    NonlinearICAVAE,
    plotting,  # noqa: E402
)
from sknlica.datasets import make_nonlinear_ica  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def data():
    X, Z = make_nonlinear_ica(200, 2, 5, random_state=0)
    return X, Z


@pytest.fixture(scope="module")
def mle(data):
    return NonlinearICAMLE(
        max_iter=3,
        hidden_layer_sizes=(8,),
        n_nodes=64,
        n_eval_nodes=256,
        random_state=0,
    ).fit(data[0])


@pytest.fixture(scope="module")
def vae(data):
    return NonlinearICAVAE(
        max_iter=3, hidden_layer_sizes=(8,), n_eval_samples=64, random_state=0
    ).fit(data[0])


def _labelled(ax):
    return ax.get_xlabel() != "" and ax.get_ylabel() != ""


def _scatters(ax):
    return [c for c in ax.collections if isinstance(c, PathCollection)]


# ----------------------------------------------------------- lazy import
def test_missing_matplotlib_raises_install_hint(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r'pip install "sknlica\[plot\]"'):
        plotting.plot_learning_curve([{"epoch": 1, "train_log_likelihood": -1.0}])


def test_matplotlib_is_imported_only_when_plotting():
    # Neither the package nor the plotting module imports matplotlib eagerly.
    code = (
        "import sys, sknlica\n"
        "assert 'sknlica.plotting' not in sys.modules\n"
        "import sknlica.plotting\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------- plot_latent_and_observed
def test_latent_and_observed_default_grid_is_figure_1():
    axes = plotting.plot_latent_and_observed(n_samples=50)
    assert axes.shape == (3, 5)
    assert all(isinstance(ax, Axes) and _labelled(ax) for ax in axes.ravel())
    # n = 1: histograms; n = 2: one scatter per panel.
    assert len(axes[0, 1].patches) > 0 and not _scatters(axes[0, 1])
    assert len(_scatters(axes[2, 3])) == 1
    assert axes[0, 0].get_ylabel() == "density"


def test_latent_and_observed_uses_given_axes():
    fig, given = plt.subplots(1, 3)
    axes = plotting.plot_latent_and_observed(
        ["relu", "tanh"], [(2, 2)], n_samples=30, axes=given
    )
    assert axes[0, 2] is given[2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dims": [(3, 2)]}, "1 <= m, n <= 2"),
        ({"activations": []}, "at least one activation"),
        (
            {"axes": np.empty((2, 2), dtype=object)},
            r"one axes per panel, shape \(3, 5\)",
        ),
    ],
)
def test_latent_and_observed_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plotting.plot_latent_and_observed(n_samples=10, **kwargs)


# ------------------------------------------------------ plot_reconstruction
def test_reconstruction_from_arrays_projects_with_pca(data):
    X = data[0]
    fig, ax = plt.subplots()
    out = plotting.plot_reconstruction(X, 0.5 * X, ax=ax)
    assert out is ax
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("PC 1", "PC 2")
    assert len(_scatters(ax)) == 2
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "observed",
        "reconstruction",
    ]


def test_reconstruction_two_and_one_features():
    X = np.random.default_rng(0).normal(size=(50, 2))
    ax = plotting.plot_reconstruction(X, X)
    assert ax.get_xlabel() == "$x_1$" and ax.get_ylabel() == "$x_2$"
    ax = plotting.plot_reconstruction(X[:, :1], X[:, :1])
    assert ax.get_ylabel() == "density" and not _scatters(ax)
    assert len(ax.patches) > 0


def test_reconstruction_from_fitted_estimators(data, mle, vae):
    for estimator in (mle, vae):
        ax = plotting.plot_reconstruction(data[0], estimator, max_points=50)
        assert _labelled(ax)
        assert [len(c.get_offsets()) for c in _scatters(ax)] == [50, 50]
    # Any transformer with inverse_transform works.
    ax = plotting.plot_reconstruction(data[0], PCA(2).fit(data[0]))
    assert len(_scatters(ax)) == 2


@pytest.mark.parametrize(
    "reconstruction, match",
    [
        (np.zeros((3, 5)), "same shape as X"),
        (np.full((200, 5), np.nan), "finite"),
    ],
)
def test_reconstruction_bad_input(data, reconstruction, match):
    with pytest.raises(ValueError, match=match):
        plotting.plot_reconstruction(data[0], reconstruction)


def test_reconstruction_rejects_1d_X():
    with pytest.raises(ValueError, match="2-D array"):
        plotting.plot_reconstruction(np.zeros(5), np.zeros(5))


# ------------------------------------------------------ plot_learning_curve
def test_learning_curve_mle(mle):
    fig, ax = plt.subplots()
    out = plotting.plot_learning_curve(mle, reference=-10.0, ax=ax)
    assert out is ax and _labelled(ax)
    labels = [line.get_label() for line in ax.get_lines()]
    # Early stopping is on by default: train and validation curves.
    assert labels == [
        "train log-likelihood",
        "validation log-likelihood",
        "true model",
        "kept epoch",
    ]
    # Every history entry: the epochs, then the default's L-BFGS polish.
    assert len(ax.get_lines()[0].get_xdata()) == len(mle.history_)


def test_learning_curve_vae_has_elbo(vae):
    ax = plotting.plot_learning_curve(vae.history_)
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == [
        "train log-likelihood",
        "validation log-likelihood",
        "train ELBO",
        "validation ELBO",
    ]


@pytest.mark.parametrize(
    "history, match",
    [
        ([], "non-empty list"),
        ({"epoch": 1}, "non-empty list"),
        ([{"train_log_likelihood": 1.0}], "'epoch' key"),
        ([{"epoch": 1, "seconds": 0.1}], "none of the keys"),
    ],
)
def test_learning_curve_bad_input(history, match):
    with pytest.raises(ValueError, match=match):
        plotting.plot_learning_curve(history)


# ------------------------------------------------ metric scaling helpers
@pytest.fixture(scope="module")
def records():
    return plotting.compute_metric_scaling(
        {"PCA": lambda m, n: PCA(m), "PCA+1": lambda m, n: PCA(m + 1)},
        [(2, 3), (2, 5), (1, 5)],
        n_repeats=3,
        n_samples=60,
        n_test=40,
    )


def test_compute_metric_scaling_records(records):
    assert len(records) == 3 * 3 * 2
    assert {r["estimator"] for r in records} == {"PCA", "PCA+1"}
    for r in records:
        assert 0.0 <= r["procrustes_disparity"] <= 1.0
        assert 0.0 <= r["canonical_correlation"] <= 1.0


def test_compute_metric_scaling_with_sknlica_estimator():
    records = plotting.compute_metric_scaling(
        {
            "MLE": lambda m, n: NonlinearICAMLE(
                m, hidden_layer_sizes=(8,), max_iter=3, n_nodes=64, n_eval_nodes=256
            )
        },
        [(1, 3)],
        n_repeats=1,
        n_samples=60,
        n_test=20,
    )
    assert [r["n_features"] for r in records] == [3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"estimators": {}}, "non-empty dict"),
        ({"n_repeats": 0}, "n_repeats >= 1"),
    ],
)
def test_compute_metric_scaling_bad_input(kwargs, match):
    args = {"estimators": {"PCA": lambda m, n: PCA(m)}, "dims": [(1, 2)]}
    with pytest.raises(ValueError, match=match):
        plotting.compute_metric_scaling(**{**args, **kwargs})


def test_metric_scaling_against_n_at_fixed_m(records):
    fig, given = plt.subplots(1, 2)
    axes = plotting.plot_metric_scaling(records, vary="n_features", fixed=2, axes=given)
    assert list(axes) == list(given)
    for ax in axes:
        assert _labelled(ax)
        # One mean line and one confidence band per estimator.
        assert len(ax.get_lines()) == 2
        assert len(ax.collections) == 2
        assert list(ax.get_lines()[0].get_xdata()) == [3, 5]
    assert axes[0].get_ylabel() == "Procrustes disparity"


def test_metric_scaling_against_m_and_one_metric(records):
    axes = plotting.plot_metric_scaling(
        records, vary="n_components", fixed=5, metrics=["canonical_correlation"]
    )
    assert len(axes) == 1
    assert list(axes[0].get_lines()[0].get_xdata()) == [1, 2]


def test_metric_scaling_single_repeat_has_no_band_width():
    records = [
        {
            "estimator": "A",
            "n_components": 2,
            "n_features": n,
            "procrustes_disparity": 0.5,
            "canonical_correlation": 0.5,
        }
        for n in (3, 4)
    ]
    axes = plotting.plot_metric_scaling(records)
    band = axes[0].collections[0].get_paths()[0].vertices
    assert np.allclose(band[:, 1], 0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "several n_components values"),
        ({"fixed": 7}, "No record has n_components=7"),
        ({"vary": "width"}, "vary='n_features'"),
        ({"fixed": 2, "metrics": ["mcc"]}, "metrics among"),
        ({"fixed": 2, "confidence": 1.5}, r"confidence in \(0, 1\)"),
    ],
)
def test_metric_scaling_bad_input(records, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plotting.plot_metric_scaling(records, **kwargs)


def test_metric_scaling_rejects_records_without_keys():
    with pytest.raises(ValueError, match="compute_metric_scaling"):
        plotting.plot_metric_scaling([{"estimator": "A"}])


# ----------------------------------------------------------- plot_posterior
def test_posterior_from_arrays_uses_given_axes():
    rng = np.random.default_rng(0)
    fig, given = plt.subplots(1, 3)
    axes = plotting.plot_posterior(
        rng.normal(size=(3, 20, 2)), exact=rng.normal(size=(3, 30, 2)), axes=given
    )
    assert list(axes) == list(given)
    for ax in axes:
        assert _labelled(ax)
        assert [len(c.get_offsets()) for c in _scatters(ax)] == [30, 20]


def test_posterior_one_latent_is_histograms():
    rng = np.random.default_rng(0)
    axes = plotting.plot_posterior(
        rng.normal(size=(2, 20, 1)), exact=rng.normal(size=(2, 20, 1))
    )
    assert axes[0].get_ylabel() == "density" and not _scatters(axes[0])


def test_posterior_vae_against_its_mcmc_and_against_mle(data, mle, vae):
    X = data[0][:2]
    axes = plotting.plot_posterior(vae, X, n_samples=10, n_steps=2)
    assert len(axes) == 2 and all(len(_scatters(ax)) == 2 for ax in axes)
    # Hidden spare panels: 2 rows drawn in a 1 x 2 grid, nothing left over.
    axes = plotting.plot_posterior(vae, X, exact=mle, n_samples=10, n_steps=2)
    assert all(_labelled(ax) for ax in axes)


@pytest.mark.parametrize(
    "approximate, kwargs, match",
    [
        (np.zeros((2, 5)), {"exact": np.zeros((2, 5, 2))}, "n_rows, n_draws"),
        (np.zeros((2, 5, 2)), {}, "needs a fitted estimator"),
        (np.zeros((2, 5, 2)), {"exact": np.zeros((3, 5, 2))}, "same rows"),
        (np.zeros((13, 5, 2)), {"exact": np.zeros((13, 5, 2))}, "at most 12 rows"),
    ],
)
def test_posterior_bad_input(approximate, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plotting.plot_posterior(approximate, **kwargs)


def test_posterior_estimator_needs_X(vae):
    with pytest.raises(ValueError, match="pass X"):
        plotting.plot_posterior(vae)
