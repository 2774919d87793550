"""Matplotlib helpers for the report's figures (matplotlib imported lazily).

Every function takes arrays or a fitted estimator, accepts ``ax=None`` (or
``axes=None``), creates a figure only when none is given, and returns what it
drew on.  Install matplotlib with ``pip install "sknlica[plot]"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.utils import check_random_state

from sknlica.datasets import make_nonlinear_ica
from sknlica.metrics import canonical_correlations, procrustes_disparity

__all__ = [
    "compute_metric_scaling",
    "plot_latent_and_observed",
    "plot_learning_curve",
    "plot_metric_scaling",
    "plot_posterior",
    "plot_reconstruction",
]

#: The report's Figure 1: (m, n) rows and activation columns.
FIGURE1_DIMS = ((1, 1), (1, 2), (2, 2))
FIGURE1_ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu")

#: Metric names of :func:`compute_metric_scaling` and their axis labels.
SCALING_METRICS = {
    "procrustes_disparity": "Procrustes disparity",
    "canonical_correlation": "First canonical correlation",
}

#: More panels than this in :func:`plot_posterior` become illegible.
MAX_POSTERIOR_ROWS = 12

_TRUTH_COLOR = "tab:blue"
_MODEL_COLOR = "tab:red"


def _pyplot():
    """Import ``matplotlib.pyplot`` or raise an ImportError with the install hint."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "sknlica.plotting needs matplotlib, which is not installed. Install "
            'it with: pip install "sknlica[plot]"'
        ) from exc
    return plt


def _axes_or_new(ax, **subplots_kw):
    if ax is not None:
        return ax
    return _pyplot().subplots(**subplots_kw)[1]


def _as_2d(X, name):
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(
            f"Expected {name} of shape (n_samples, n_features), got shape "
            f"{X.shape}; pass a non-empty 2-D array (X.reshape(-1, 1) for one "
            "feature)."
        )
    if not np.isfinite(X).all():
        raise ValueError(
            f"Expected finite values in {name}, got NaN or infinity; drop or "
            "impute those rows first."
        )
    return X


def _draw_points(ax, points, *, color, label, bins=40):
    """Histogram for one column, scatter for two."""
    if points.shape[1] == 1:
        ax.hist(
            points[:, 0], bins=bins, density=True, alpha=0.5, color=color, label=label
        )
    else:
        ax.scatter(
            points[:, 0],
            points[:, 1],
            s=4,
            alpha=0.4,
            color=color,
            label=label,
            rasterized=True,
        )


def plot_latent_and_observed(
    activations: Sequence[str] = FIGURE1_ACTIVATIONS,
    dims: Sequence[tuple[int, int]] = FIGURE1_DIMS,
    *,
    n_samples: int = 2000,
    noise_variance: float = 1.0,
    random_state=0,
    axes=None,
):
    """Draw latents ``z`` and observations ``x`` for each activation (Figure 1).

    One row per ``(m, n)`` in ``dims``; the first column shows ``z`` and the
    others ``x`` from :func:`sknlica.datasets.make_nonlinear_ica` with each
    activation.  One-dimensional variables are histograms, two-dimensional
    ones scatter plots.

    Parameters
    ----------
    activations : sequence of str, default=("relu", "sigmoid", "tanh", \
"leaky_relu")
        Activations, one column each.
    dims : sequence of (int, int), default=((1, 1), (1, 2), (2, 2))
        ``(n_components, n_features)`` of each row; both at most 2.
    n_samples : int, default=2000
        Points per panel.
    noise_variance : float, default=1.0
        Observation noise, as in the report's experiments.
    random_state : int, default=0
        Seed; the same seed is used for every activation of a row, so the
        columns share ``W``, ``b`` and ``z``.
    axes : ndarray of matplotlib Axes of shape (len(dims), \
len(activations) + 1), default=None
        Axes to draw on; a new figure when ``None``.

    Returns
    -------
    axes : ndarray of matplotlib Axes
        The grid of axes.

    Examples
    --------
    >>> from sknlica.plotting import plot_latent_and_observed
    >>> axes = plot_latent_and_observed(["relu"], [(1, 2)], n_samples=50)
    >>> axes.shape
    (1, 2)
    """
    activations = list(activations)
    dims = [tuple(d) for d in dims]
    if not activations or not dims:
        raise ValueError(
            f"Expected at least one activation and one (m, n) pair, got "
            f"activations={activations!r} and dims={dims!r}."
        )
    for pair in dims:
        if len(pair) != 2 or not all(1 <= int(d) <= 2 for d in pair):
            raise ValueError(
                f"Expected (m, n) pairs with 1 <= m, n <= 2 (they are drawn "
                f"directly, without projection), got {pair!r}."
            )
    shape = (len(dims), len(activations) + 1)
    if axes is None:
        plt = _pyplot()
        _, axes = plt.subplots(
            *shape,
            figsize=(2.6 * shape[1], 2.4 * shape[0]),
            squeeze=False,
            layout="constrained",
        )
    axes = np.asarray(axes, dtype=object)
    if axes.size != shape[0] * shape[1]:
        raise ValueError(
            f"Expected one axes per panel, shape {shape} (rows: dims; columns: "
            f"z then each activation), got {axes.size} axes."
        )
    axes = axes.reshape(shape)
    for i, (m, n) in enumerate(dims):
        for j, activation in enumerate(activations):
            X, Z = make_nonlinear_ica(
                n_samples,
                m,
                n,
                activation=activation,
                noise_variance=noise_variance,
                random_state=random_state,
            )
            if j == 0:
                _draw_points(axes[i, 0], Z, color="tab:gray", label="z")
                _label_panel(axes[i, 0], m, "z", f"z, m={m}")
            _draw_points(axes[i, j + 1], X, color=_TRUTH_COLOR, label="x")
            _label_panel(axes[i, j + 1], n, "x", f"x, {activation}, n={n}")
    return axes


def _label_panel(ax, width, symbol, title):
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(f"${symbol}_1$")
    ax.set_ylabel("density" if width == 1 else f"${symbol}_2$")


def plot_reconstruction(
    X,
    reconstruction,
    *,
    ax=None,
    max_points: int = 2000,
    random_state=0,
):
    """Observed data against their reconstruction (Figures 2 and 4).

    Data and reconstruction are drawn in the same plane: the features
    themselves when ``n <= 2``, else the first two principal components of
    ``X`` (the reconstruction is projected with the same PCA).

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Observations.
    reconstruction : array-like of shape (n_samples, n_features) or estimator
        The reconstruction, or a fitted estimator, whose reconstruction
        ``inverse_transform(transform(X))`` (the decoder at the posterior
        mean) is used.
    ax : matplotlib Axes, default=None
        Axes to draw on; a new figure when ``None``.
    max_points : int, default=2000
        At most this many rows are drawn (a random subset), to stay legible.
    random_state : int, RandomState instance or None, default=0
        Seeds the subset.

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> import numpy as np
    >>> from sknlica.plotting import plot_reconstruction
    >>> X = np.random.default_rng(0).normal(size=(100, 5))
    >>> ax = plot_reconstruction(X, 0.9 * X)
    >>> ax.get_xlabel()
    'PC 1'
    """
    X = _as_2d(X, "X")
    if hasattr(reconstruction, "inverse_transform"):
        reconstruction = reconstruction.inverse_transform(reconstruction.transform(X))
    X_hat = _as_2d(reconstruction, "reconstruction")
    if X_hat.shape != X.shape:
        raise ValueError(
            f"Expected a reconstruction of the same shape as X {X.shape}, got "
            f"{X_hat.shape}; pass one reconstructed row per row of X."
        )
    if X.shape[0] > max_points:
        rows = check_random_state(random_state).choice(
            X.shape[0], max_points, replace=False
        )
        X, X_hat = X[rows], X_hat[rows]
    if X.shape[1] > 2:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2).fit(X)
        X, X_hat = pca.transform(X), pca.transform(X_hat)
        names = ("PC 1", "PC 2")
    else:
        names = ("$x_1$", "$x_2$" if X.shape[1] == 2 else "density")
    ax = _axes_or_new(ax, figsize=(5, 4.5), layout="constrained")
    _draw_points(ax, X, color=_TRUTH_COLOR, label="observed")
    _draw_points(ax, X_hat, color=_MODEL_COLOR, label="reconstruction")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.legend(loc="best", markerscale=3)
    return ax


#: history_ keys drawn by plot_learning_curve, with their style.
_CURVES = (
    ("train_log_likelihood", "train log-likelihood", "tab:blue", "-"),
    ("validation_log_likelihood", "validation log-likelihood", "tab:orange", "-"),
    ("train_elbo", "train ELBO", "tab:blue", "--"),
    ("validation_elbo", "validation ELBO", "tab:orange", "--"),
)


def plot_learning_curve(history, *, reference: float | None = None, ax=None):
    """Training and validation log-likelihood (and ELBO) per epoch (Figs 3, 5).

    Parameters
    ----------
    history : list of dict or fitted estimator
        A ``history_`` list (dicts with ``epoch`` and any of
        ``train_log_likelihood``, ``validation_log_likelihood``,
        ``train_elbo``, ``validation_elbo``), or an estimator that has one;
        the epoch kept by early stopping (``best_epoch_``) is then marked.
    reference : float, default=None
        A horizontal line, e.g. the true model's mean log-likelihood on the
        validation data.
    ax : matplotlib Axes, default=None
        Axes to draw on; a new figure when ``None``.

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> from sknlica.plotting import plot_learning_curve
    >>> history = [{"epoch": e, "train_log_likelihood": -30.0 + e} for e in (1, 2)]
    >>> ax = plot_learning_curve(history)
    >>> len(ax.get_lines())
    1
    """
    best_epoch = getattr(history, "best_epoch_", None)
    if hasattr(history, "history_"):
        history = history.history_
    if isinstance(history, dict) or not isinstance(history, Sequence) or not history:
        raise ValueError(
            "Expected a non-empty list of per-epoch dicts (an estimator's "
            f"history_) or a fitted estimator, got {type(history).__name__}; fit "
            "the estimator first."
        )
    if not all(isinstance(entry, dict) and "epoch" in entry for entry in history):
        raise ValueError(
            "Expected every history entry to be a dict with an 'epoch' key, as in "
            "an estimator's history_."
        )
    ax = _axes_or_new(ax, figsize=(6, 4), layout="constrained")
    epochs = np.array([entry["epoch"] for entry in history])
    drawn = 0
    for key, label, color, style in _CURVES:
        values = np.array([entry.get(key, np.nan) for entry in history], dtype=float)
        if np.isnan(values).all():
            continue
        ax.plot(epochs, values, style, color=color, label=label)
        drawn += 1
    if not drawn:
        raise ValueError(
            "history has none of the keys "
            f"{[key for key, *_ in _CURVES]}; pass an estimator's history_."
        )
    if reference is not None:
        ax.axhline(reference, color="black", ls=":", label="true model")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", lw=0.8, label="kept epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per sample")
    ax.legend(loc="lower right")
    ax.grid(True, alpha=0.3)
    return ax


def compute_metric_scaling(
    estimators: dict[str, Callable],
    dims: Sequence[tuple[int, int]],
    *,
    n_repeats: int = 3,
    n_samples: int = 2000,
    n_test: int = 1000,
    activation: str = "relu",
    random_state=0,
) -> list[dict]:
    """Fit each estimator on fresh data per ``(m, n)`` and repeat (Figure 6).

    For every ``(m, n)`` in ``dims`` and every repeat, data are drawn from
    :func:`sknlica.datasets.make_nonlinear_ica` (a new mixing per repeat),
    each estimator is fitted on ``n_samples`` rows and its posterior means on
    ``n_test`` held-out rows are compared with the true latents.

    Parameters
    ----------
    estimators : dict of str to callable
        ``label -> factory(n_components, n_features)`` returning an unfitted
        estimator with ``fit`` and ``transform``.
    dims : sequence of (int, int)
        ``(n_components, n_features)`` pairs.
    n_repeats : int, default=3
        Repeats (data sets) per pair.
    n_samples : int, default=2000
        Training rows.
    n_test : int, default=1000
        Held-out rows the metrics are computed on.
    activation : str, default="relu"
        Activation of the generator.
    random_state : int, default=0
        Base seed; repeat ``r`` of every pair uses data seed
        ``random_state + r``.

    Returns
    -------
    records : list of dict
        One per (estimator, pair, repeat), with keys ``estimator``,
        ``n_components``, ``n_features``, ``repeat``,
        ``procrustes_disparity`` and ``canonical_correlation`` (the first).

    Examples
    --------
    >>> from sklearn.decomposition import PCA
    >>> from sknlica.plotting import compute_metric_scaling
    >>> records = compute_metric_scaling(
    ...     {"PCA": lambda m, n: PCA(m)}, [(2, 5)], n_repeats=2, n_samples=100
    ... )
    >>> len(records), sorted(records[0])[:2]
    (2, ['canonical_correlation', 'estimator'])
    """
    if not estimators or not all(callable(f) for f in estimators.values()):
        raise ValueError(
            "Expected a non-empty dict of label -> factory(n_components, "
            f"n_features), got {estimators!r}."
        )
    if int(n_repeats) < 1:
        raise ValueError(f"Expected n_repeats >= 1, got {n_repeats!r}.")
    records = []
    for m, n in dims:
        for repeat in range(int(n_repeats)):
            X, Z = make_nonlinear_ica(
                n_samples + n_test,
                m,
                n,
                activation=activation,
                random_state=random_state + repeat,
            )
            X_train, X_test, Z_test = X[:n_samples], X[n_samples:], Z[n_samples:]
            for label, factory in estimators.items():
                Z_hat = factory(m, n).fit(X_train).transform(X_test)
                records.append(
                    {
                        "estimator": label,
                        "n_components": m,
                        "n_features": n,
                        "repeat": repeat,
                        "procrustes_disparity": procrustes_disparity(Z_test, Z_hat),
                        "canonical_correlation": float(
                            canonical_correlations(Z_test, Z_hat)[0]
                        ),
                    }
                )
    return records


def _interval(values, confidence):
    """Mean and half-width of the Student-t confidence interval of the mean."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean = values.mean()
    if values.size < 2:
        return mean, 0.0
    sem = values.std(ddof=1) / np.sqrt(values.size)
    return mean, sem * stats.t.ppf(0.5 + confidence / 2, values.size - 1)


def plot_metric_scaling(
    records,
    *,
    vary: str = "n_features",
    fixed: int | None = None,
    metrics: Sequence[str] = tuple(SCALING_METRICS),
    confidence: float = 0.95,
    axes=None,
):
    """Recovery metrics against a dimension, with confidence intervals (Fig. 6).

    One panel per metric; one line per estimator: the mean over repeats and
    a band with the Student-t ``confidence`` interval of that mean.

    Parameters
    ----------
    records : list of dict
        As returned by :func:`compute_metric_scaling`: dicts with keys
        ``estimator``, ``n_components``, ``n_features`` and the metrics.
    vary : {"n_features", "n_components"}, default="n_features"
        The dimension on the x-axis.
    fixed : int, default=None
        Value of the other dimension to keep; required when the records hold
        more than one.
    metrics : sequence of str, default=("procrustes_disparity", \
"canonical_correlation")
        Metrics to draw, one panel each.
    confidence : float, default=0.95
        Level of the interval, in (0, 1).
    axes : sequence of matplotlib Axes, default=None
        One per metric; a new figure when ``None``.

    Returns
    -------
    axes : ndarray of matplotlib Axes

    Examples
    --------
    >>> from sknlica.plotting import plot_metric_scaling
    >>> records = [
    ...     {"estimator": "VAE", "n_components": 2, "n_features": n,
    ...      "procrustes_disparity": d, "canonical_correlation": 1 - d}
    ...     for n, d in [(5, 0.1), (5, 0.2), (10, 0.15), (10, 0.25)]
    ... ]
    >>> axes = plot_metric_scaling(records)
    >>> [ax.get_ylabel() for ax in axes]
    ['Procrustes disparity', 'First canonical correlation']
    """
    other = {"n_features": "n_components", "n_components": "n_features"}.get(vary)
    if other is None:
        raise ValueError(f"Expected vary='n_features' or 'n_components', got {vary!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"Expected confidence in (0, 1), got {confidence!r}.")
    unknown = [m for m in metrics if m not in SCALING_METRICS]
    if unknown or not metrics:
        raise ValueError(
            f"Expected metrics among {list(SCALING_METRICS)}, got {list(metrics)!r}."
        )
    records = list(records)
    needed = {"estimator", vary, other, *metrics}
    if not records or not all(
        isinstance(r, dict) and needed <= set(r) for r in records
    ):
        raise ValueError(
            f"Expected a non-empty list of dicts with keys {sorted(needed)}, as "
            "returned by compute_metric_scaling."
        )
    others = sorted({r[other] for r in records})
    if fixed is None and len(others) > 1:
        raise ValueError(
            f"The records hold several {other} values {others}; pass fixed= one "
            f"of them to plot against {vary} at that {other}."
        )
    fixed = others[0] if fixed is None else fixed
    records = [r for r in records if r[other] == fixed]
    if not records:
        raise ValueError(f"No record has {other}={fixed!r}; choose among {others}.")
    if axes is None:
        _, axes = _pyplot().subplots(
            1,
            len(metrics),
            figsize=(4.5 * len(metrics), 3.8),
            squeeze=False,
            layout="constrained",
        )
    axes = np.asarray(axes, dtype=object).ravel()
    if axes.size != len(metrics):
        raise ValueError(
            f"Expected one axes per metric ({len(metrics)}), got {axes.size}."
        )
    names = {
        "n_features": ("observed dimension", "n"),
        "n_components": ("latent dimension", "m"),
    }
    labels = list(dict.fromkeys(r["estimator"] for r in records))
    ticks = sorted({r[vary] for r in records})
    for ax, metric in zip(axes, metrics):
        for label in labels:
            own = [r for r in records if r["estimator"] == label]
            xs = sorted({r[vary] for r in own})
            stats = [
                _interval([r[metric] for r in own if r[vary] == x], confidence)
                for x in xs
            ]
            mean, half = (np.array(s) for s in zip(*stats))
            (line,) = ax.plot(xs, mean, "o-", label=label)
            # Both metrics live in [0, 1]; a t-interval from few repeats may not.
            low, high = np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1)
            ax.fill_between(xs, low, high, alpha=0.2, color=line.get_color())
        ax.set_xticks(ticks)
        ax.set_xlabel(
            f"{names[vary][0]} {names[vary][1]} ({names[other][1]} = {fixed})"
        )
        ax.set_ylabel(SCALING_METRICS[metric])
        ax.grid(True, alpha=0.3)
        ax.legend(title=f"mean, {confidence:.0%} CI", fontsize="small")
    return axes


def plot_posterior(
    approximate,
    X=None,
    *,
    exact=None,
    n_samples: int = 200,
    n_steps: int = 50,
    random_state=0,
    axes=None,
):
    """Exact posterior draws against the approximate ``q(z | x)``, per row.

    One panel per row of ``X``: a histogram (m = 1) or scatter plot of the
    first two latent coordinates of each set of draws.

    Parameters
    ----------
    approximate : fitted NonlinearICAVAE or array of shape (n_rows, \
n_draws, n_components)
        The approximate posterior: an estimator's ``sample_posterior(X,
        n_samples, n_steps=0)`` (the encoder's draws), or such draws.
    X : array-like of shape (n_rows, n_features), default=None
        The rows; required when ``approximate`` or ``exact`` is an estimator.
    exact : estimator or array of shape (n_rows, n_draws, n_components), \
default=None
        Exact posterior draws, or a fitted estimator giving them with
        ``sample_posterior(X, n_samples, n_steps=n_steps)`` (e.g. a
        :class:`~sknlica.NonlinearICAMLE`, or the VAE itself, whose chains
        are then corrected by MCMC).  ``None`` uses ``approximate`` with
        ``n_steps`` MCMC steps.
    n_samples : int, default=200
        Draws per row, for the estimators.
    n_steps : int, default=50
        MCMC steps of the exact draws.
    random_state : int, RandomState instance or None, default=0
        Seeds the draws.
    axes : sequence of matplotlib Axes, default=None
        Where to draw, one per row; ``None`` makes a new figure.

    Returns
    -------
    axes : ndarray of matplotlib Axes
        The axes drawn on, one per row.

    Examples
    --------
    >>> import numpy as np
    >>> from sknlica.plotting import plot_posterior
    >>> rng = np.random.default_rng(0)
    >>> axes = plot_posterior(rng.normal(size=(2, 50, 2)),
    ...                       exact=rng.normal(size=(2, 50, 2)))
    >>> len(axes)
    2
    """
    if X is not None:
        X = _as_2d(X, "X")
    q = _draws(approximate, X, n_samples, 0, random_state, "approximate")
    if exact is None:
        if not hasattr(approximate, "sample_posterior"):
            raise ValueError(
                "exact=None draws the exact posterior from `approximate` with "
                "MCMC, which needs a fitted estimator; pass exact draws instead."
            )
        exact = approximate
    p = _draws(exact, X, n_samples, n_steps, random_state, "exact")
    if q.shape[0] != p.shape[0] or q.shape[2] != p.shape[2]:
        raise ValueError(
            f"Expected approximate and exact draws for the same rows and latent "
            f"dimension, got shapes {q.shape} and {p.shape}."
        )
    n_rows, m = q.shape[0], q.shape[2]
    if n_rows > MAX_POSTERIOR_ROWS:
        raise ValueError(
            f"Expected at most {MAX_POSTERIOR_ROWS} rows (one panel each), got "
            f"{n_rows}; pass a few rows, e.g. X[:4]."
        )
    if axes is None:
        n_cols = min(n_rows, 4)
        n_fig_rows = -(-n_rows // n_cols)
        _, axes = _pyplot().subplots(
            n_fig_rows,
            n_cols,
            figsize=(3.4 * n_cols, 3.2 * n_fig_rows),
            squeeze=False,
            layout="constrained",
        )
        for ax in axes.ravel()[n_rows:]:
            ax.set_visible(False)
    axes = np.asarray(axes, dtype=object).ravel()
    if axes.size < n_rows:
        raise ValueError(f"Expected one axes per row ({n_rows}), got {axes.size}.")
    axes = axes[:n_rows]
    names = ("$z_1$", "$z_2$" if m > 1 else "density")
    for i, ax in enumerate(axes):
        _draw_points(ax, p[i, :, :2], color=_TRUTH_COLOR, label="exact p(z | x)")
        _draw_points(ax, q[i, :, :2], color=_MODEL_COLOR, label="q(z | x)")
        ax.set_title(f"row {i}", fontsize="medium")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    axes[0].legend(loc="best", markerscale=3, fontsize="small")
    return axes


def _draws(source, X, n_samples, n_steps, random_state, name):
    if hasattr(source, "sample_posterior"):
        if X is None:
            raise ValueError(
                f"{name} is an estimator, so the rows X are needed; pass X."
            )
        return source.sample_posterior(
            X, n_samples, n_steps=n_steps, random_state=random_state
        )
    draws = np.asarray(source, dtype=np.float64)
    if draws.ndim != 3 or 0 in draws.shape:
        raise ValueError(
            f"Expected {name} draws of shape (n_rows, n_draws, n_components) or a "
            f"fitted estimator, got an array of shape {draws.shape}."
        )
    return draws
