"""Does NonlinearICAMLE reach the maximum likelihood?  The L-BFGS polish, measured.

Part 1, linear-Gaussian data (m = 2, n = 10, 4,000 rows, loadings with
N(0, 1) entries, unit noise; one loading column scaled by 1, 3 and 10 for
well-separated to sharp posteriors): ``NonlinearICAMLE(hidden_layer_sizes=(),
activation="identity")`` with the default (``max_polish_iter="auto"``,
which polishes linear decoders with L-BFGS), Adam alone
(``max_polish_iter=0``), and
``FactorAnalysis(2)``.  Reported: the training log-likelihood (closed form
for the fitted linear decoder: N(b, W W^T + sigma^2 I)) minus
``PCA(2).score`` on the same rows, which is the maximum; the fitted
sigma^2 over ``PCA.noise_variance_``; iterations; seconds.  The MLE fits
hold out 10% for early stopping, so they see 90% of the rows PCA sees.

Part 2, the report's generator (relu, m = 2, n = 20, 5,000 training and
2,000 held-out rows) at sigma^2 in {1, 0.1, 0.04, 0.01}: Adam alone
(``max_polish_iter=0``), the default (``"auto"``: polished only when the
epochs ran out), ``max_polish_iter=200``, ``integration="adaptive"`` and
``NonlinearICAVAE``.  Reported: held-out and training
gaps to the true model (both decoders scored as ``NonlinearICAMLE.score``
scores its own, ``_common.mle_log_likelihood``), epochs, L-BFGS
iterations, seconds.

Part 3, wider data at sigma^2 = 1 (n in {20, 100}; ``--large`` adds
n = 1,000): Adam alone, the default and the polished fit against
``integration="grid"``, gaps and seconds.

One torch thread (``--threads``); the fits run one after another.  Run:
``python benchmarks/bench_convergence.py [--quick] [--large] [--seeds K]
[--output DIR]`` (``--quick``: tiny sizes and 2 epochs, seconds; its numbers
are not results).  Writes ``DIR/convergence.json`` and ``.md``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from _common import (
    base_parser,
    markdown_table,
    mle_log_likelihood,
    timed_fit,
    write_results,
)
from sklearn.decomposition import PCA, FactorAnalysis

from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica.datasets import make_nonlinear_ica


@dataclass(frozen=True)
class Sizes:
    linear_rows: int = 4000
    n_train: int = 5000
    n_test: int = 2000
    noise_variances: tuple = (1.0, 0.1, 0.04, 0.01)
    widths: tuple = (20, 100)
    max_iter: int = 200


FULL = Sizes()
QUICK = Sizes(
    linear_rows=300,
    n_train=300,
    n_test=100,
    noise_variances=(0.1,),
    widths=(20,),
    max_iter=2,
)


def _linear_log_likelihood(model, X) -> float:
    """Closed-form mean log-likelihood of a fitted linear decoder."""
    linear = model.decoder_[0]
    w = linear.weight.detach().double().numpy()
    b = linear.bias.detach().double().numpy()
    covariance = w @ w.T + model.noise_variance_ * np.eye(X.shape[1])
    _, log_det = np.linalg.slogdet(covariance)
    centred = X - b
    quadratic = np.einsum("ij,ij->i", centred @ np.linalg.inv(covariance), centred)
    return float(np.mean(-0.5 * (quadratic + log_det + X.shape[1] * np.log(2 * np.pi))))


def linear_rows(sizes: Sizes, seed: int) -> list[dict]:
    rows = []
    for scale in (1.0, 3.0, 10.0):
        rng = np.random.RandomState(seed)
        loadings = rng.randn(10, 2)
        loadings[:, 0] *= scale
        X = rng.randn(sizes.linear_rows, 2) @ loadings.T + rng.randn(
            sizes.linear_rows, 10
        )
        pca = PCA(2).fit(X)
        best = pca.score(X)
        linear = {"hidden_layer_sizes": (), "activation": "identity"}
        fits = {
            'default (max_polish_iter="auto": polished)': NonlinearICAMLE(
                random_state=seed, **linear
            ),
            "Adam only (max_polish_iter=0)": NonlinearICAMLE(
                max_polish_iter=0, random_state=seed, **linear
            ),
        }
        for name, model in fits.items():
            seconds = timed_fit(model, X)
            rows.append(
                {
                    "seed": seed,
                    "column scale": scale,
                    "fit": name,
                    "gap to PCA.score": best - _linear_log_likelihood(model, X),
                    "sigma^2 / PCA's": model.noise_variance_ / pca.noise_variance_,
                    "epochs": model.n_iter_,
                    "L-BFGS iterations": model.n_polish_iter_,
                    "seconds": seconds,
                }
            )
            print(rows[-1], flush=True)
        start = time.perf_counter()
        fa = FactorAnalysis(2, random_state=seed).fit(X)
        rows.append(
            {
                "seed": seed,
                "column scale": scale,
                "fit": "FactorAnalysis",
                "gap to PCA.score": best - fa.score(X),
                "sigma^2 / PCA's": float(np.mean(fa.noise_variance_))
                / pca.noise_variance_,
                "epochs": fa.n_iter_,
                "L-BFGS iterations": 0,
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def _methods(sizes: Sizes, seed: int) -> dict:
    common = {"max_iter": sizes.max_iter, "random_state": seed}
    return {
        "MLE Adam only (max_polish_iter=0)": NonlinearICAMLE(
            max_polish_iter=0, **common
        ),
        'MLE default (max_polish_iter="auto")': NonlinearICAMLE(**common),
        "MLE polished (max_polish_iter=200)": NonlinearICAMLE(
            max_polish_iter=200, **common
        ),
        "MLE adaptive": NonlinearICAMLE(integration="adaptive", **common),
        "VAE default": NonlinearICAVAE(**common),
    }


def _data(n_features, noise_variance, sizes: Sizes):
    X, _, mixing = make_nonlinear_ica(
        sizes.n_train + sizes.n_test,
        2,
        n_features,
        noise_variance=noise_variance,
        random_state=0,
        return_mixing=True,
    )
    train, test = X[: sizes.n_train], X[sizes.n_train :]
    decoder = mixing.to_torch_module().requires_grad_(False)

    def true(rows):
        return float(
            mle_log_likelihood(rows, decoder, noise_variance, n_components=2).mean()
        )

    return train, test, true(train), true(test)


def _gap_row(model, name, train, test, true_train, true_test, seconds) -> dict:
    return {
        "method": name,
        "held-out gap": true_test - model.score(test),
        "training gap": true_train - model.score(train),
        "epochs": model.n_iter_,
        "L-BFGS iterations": getattr(model, "n_polish_iter_", 0),
        "seconds": seconds,
    }


def small_noise_rows(sizes: Sizes, seed: int) -> list[dict]:
    rows = []
    for noise_variance in sizes.noise_variances:
        train, test, true_train, true_test = _data(20, noise_variance, sizes)
        for name, model in _methods(sizes, seed).items():
            seconds = timed_fit(model, train)
            row = _gap_row(model, name, train, test, true_train, true_test, seconds)
            rows.append({"seed": seed, "sigma^2": noise_variance, **row})
            print(rows[-1], flush=True)
    return rows


def width_rows(sizes: Sizes, widths, seed: int) -> list[dict]:
    rows = []
    for n_features in widths:
        train, test, true_train, true_test = _data(n_features, 1.0, sizes)
        common = {"max_iter": sizes.max_iter, "random_state": seed}
        for name, model in {
            "MLE grid": NonlinearICAMLE(integration="grid", **common),
            "MLE Adam only": NonlinearICAMLE(max_polish_iter=0, **common),
            'MLE default ("auto")': NonlinearICAMLE(**common),
            "MLE polished": NonlinearICAMLE(max_polish_iter=200, **common),
        }.items():
            seconds = timed_fit(model, train)
            row = _gap_row(model, name, train, test, true_train, true_test, seconds)
            rows.append({"seed": seed, "n_features": n_features, **row})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = base_parser(__doc__, threads=1)
    parser.add_argument("--large", action="store_true", help="add n = 1,000")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..K-1")
    parser.add_argument(
        "--parts", default="123", help="which parts to run (default: 123)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    widths = sizes.widths + ((1000,) if args.large and not args.quick else ())
    load_before = os.getloadavg()
    payload, markdown = {}, []
    parts = {
        "1": ("linear", "Linear-Gaussian data: training gap to PCA.score", linear_rows),
        "2": (
            "small_noise",
            "The report's generator: gaps to the true model",
            small_noise_rows,
        ),
        "3": (
            "widths",
            "Wider data at sigma^2 = 1",
            lambda sizes, seed: width_rows(sizes, widths, seed),
        ),
    }
    for key in args.parts:
        name, title, run = parts[key]
        rows = [row for seed in range(args.seeds) for row in run(sizes, seed)]
        payload[name] = rows
        markdown.append(f"## {title}\n\n" + markdown_table(rows))
    load_after = os.getloadavg()
    payload["load_average"] = {"before": load_before, "after": load_after}
    markdown.append(
        f"{args.threads} torch thread(s). Load average (1, 5, 15 min) of the "
        "2-core machine: {:.2f}, {:.2f}, {:.2f} before, ".format(*load_before)
        + "{:.2f}, {:.2f}, {:.2f} after.".format(*load_after)
    )
    write_results(
        "convergence" + ("" if args.parts == "123" else "_part" + args.parts),
        payload,
        "\n\n".join(markdown),
        output=args.output,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
