"""Hostile inputs: the data's units, outlying rows, learning rates that blow up.

What the robustness issue measured before its fixes, measured again:

- **Units.**  Both estimators fitted (defaults, ``random_state=0``) on ``X``
  and on ``a X + b`` for the issue's maps (``a`` = 1e8, 1e-8, 1; ``b`` = 0,
  1e3); reported: the largest difference, over held-out rows, between the
  second fit's score and the first's minus ``n log a`` (0 for an
  equivariant fit; the issue saw 1e6 to 1e15 nats for ``a = 1e8``), and the
  ratio of the noise variances to ``a^2``; beside them the same comparison
  for a fit of ``X`` itself with another ``random_state``, for scale.
- **Outliers.**  How far the scores and latents of 20 ordinary rows move
  when one row of ``1e12`` or ``1e200`` is scored with them (the issue saw
  1e6 nats, 0.24 in the latents, and NaN for ``1e200``), and the outlier's
  own score.
- **Explosions.**  ``learning_rate_init`` 10 and 100: whether ``fit`` raises
  ``TrainingDivergedError`` (the issue saw a finite VAE scoring -4e3 / -3e8
  nats per row, a normal fit -18), with the seconds until it does.

Benchmarks measure; nothing here asserts (``tests/test_robustness.py``
does).  Run: ``python benchmarks/bench_robustness.py [--quick]``.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from _common import base_parser, load_average, markdown_table, write_results
from sklearn.exceptions import ConvergenceWarning

from sknlica import NonlinearICAMLE, NonlinearICAVAE, TrainingDivergedError
from sknlica.datasets import make_nonlinear_ica

ESTIMATORS = {"MLE": NonlinearICAMLE, "VAE": NonlinearICAVAE}
MAPS = ((1e8, 0.0), (1e-8, 0.0), (1.0, 1e3))
OUTLIERS = (1e12, 1e200)
LEARNING_RATES = (10.0, 100.0)


def units_rows(X_train, X_test, params):
    rows = []
    for name, Estimator in ESTIMATORS.items():
        reference = Estimator(**params).fit(X_train)
        expected = reference.score_samples(X_test)
        cases = [(a, b, params) for a, b in MAPS]
        # For scale: the same data with another seed.
        cases.append((1.0, 0.0, {**params, "random_state": params["random_state"] + 1}))
        for a, b, case_params in cases:
            model = Estimator(**case_params).fit(a * X_train + b)
            got = model.score_samples(a * X_test + b) + X_test.shape[1] * np.log(a)
            error = np.abs(got - expected)
            rows.append(
                {
                    "estimator": name,
                    "a": a,
                    "b": b,
                    "random_state": case_params["random_state"],
                    "mean |score error| (nats/row)": float(error.mean()),
                    "max |score error|": float(error.max()),
                    "epochs": model.n_iter_,
                    "epochs of the fit of X": reference.n_iter_,
                    "sigma^2 / (a^2 sigma^2_X)": model.noise_variance_
                    / (a**2 * reference.noise_variance_),
                }
            )
            print(rows[-1], flush=True)
    return rows


def outlier_rows(X_train, X_test, params):
    rows = []
    ordinary = X_test[:20]
    for name, Estimator in ESTIMATORS.items():
        model = Estimator(**params).fit(X_train)
        scores, latents = model.score_samples(ordinary), model.transform(ordinary)
        for magnitude in OUTLIERS:
            both = np.vstack([ordinary, np.full((1, X_test.shape[1]), magnitude)])
            moved_scores, moved_latents = (
                model.score_samples(both),
                model.transform(both),
            )
            rows.append(
                {
                    "estimator": name,
                    "outlier": magnitude,
                    "others' scores moved by": float(
                        np.abs(moved_scores[:-1] - scores).max()
                    ),
                    "others' latents moved by": float(
                        np.abs(moved_latents[:-1] - latents).max()
                    ),
                    "outlier score": float(moved_scores[-1]),
                    "outlier latents finite": bool(
                        np.isfinite(moved_latents[-1]).all()
                    ),
                }
            )
            print(rows[-1], flush=True)
    return rows


def explosion_rows(X_train, params):
    rows = []
    for name, Estimator in ESTIMATORS.items():
        for learning_rate in LEARNING_RATES:
            model = Estimator(**params, learning_rate_init=learning_rate)
            start = time.perf_counter()
            try:
                model.fit(X_train)
                outcome = f"fitted, score {model.score(X_train):.4g}"
            except TrainingDivergedError:
                outcome = "TrainingDivergedError"
            rows.append(
                {
                    "estimator": name,
                    "learning_rate_init": learning_rate,
                    "outcome": outcome,
                    "seconds": time.perf_counter() - start,
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    args = base_parser(__doc__, threads=1).parse_args()
    torch.set_num_threads(args.threads)
    n_rows, max_iter = (300, 3) if args.quick else (3000, 200)
    X, _ = make_nonlinear_ica(n_rows + 500, 2, 20, random_state=0)
    X_train, X_test = X[:n_rows], X[n_rows:]
    params = {"random_state": 0, "max_iter": max_iter}
    load_start = load_average()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        units = units_rows(X_train, X_test, params)
        outliers = outlier_rows(X_train, X_test, params)
        explosions = explosion_rows(X_train, params)
    md = [
        "# Robustness: units, outliers, explosions",
        "",
        f"`make_nonlinear_ica` (m=2, n=20, relu), {n_rows} training rows, "
        f"defaults with max_iter={max_iter}, {args.threads} thread(s); load "
        f"average {load_start:.2f} at the start, {load_average():.2f} at the end.",
        "",
        "## Units: fits of a X + b against the fit of X",
        "",
        markdown_table(units),
        "",
        "## One outlying row among 20 ordinary ones",
        "",
        markdown_table(outliers),
        "",
        "## Learning rates that blow up",
        "",
        markdown_table(explosions),
    ]
    write_results(
        "robustness",
        {"units": units, "outliers": outliers, "explosions": explosions},
        "\n".join(md),
        output=args.output,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
