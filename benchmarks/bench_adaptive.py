"""Posterior-adapted integration against prior rules when the noise is small.

Part 1, accuracy: mean absolute error of ``log p(x)`` per row under the true
model of ``make_nonlinear_ica`` (relu and tanh, m = 2, n = 10, sigma in {1,
0.3, 0.1}), against a dense 600 x 600 midpoint grid on ``[-8, 8]^2``, for
prior rules (Gauss-Hermite and the prior-weighted grid) and the adaptive rule
of ``sknlica._torch.adaptive`` at several node counts per row, plus what the
estimator's ``score_samples`` (prior grid with the per-row ESS switch) gets.

Part 2, training on ``make_nonlinear_ica`` (relu,
m = 2, n = 20, 5,000 training and 2,000 held-out rows) at sigma^2 in {1, 0.1,
0.04, 0.01}: ``NonlinearICAMLE`` with the prior grid alone
(``integration="grid"``, what ``"auto"`` trained with before it could switch),
with ``"adaptive"``, with the default ``"auto"``, and ``NonlinearICAVAE`` with
its defaults.  Reported: the held-out log-likelihood gap to the true model
(the true decoder scored as ``NonlinearICAMLE.score`` scores its own, from
the numeric layer: ``_common.mle_log_likelihood``, whose per-row switch to
the adaptive rule keeps it accurate at small noise), the fitted sigma^2,
the epochs and the fit time.  Torch runs on one thread (``--threads``,
default 1), the fits one after another.

Run: ``python benchmarks/bench_adaptive.py [--quick] [--output DIR]``
(``--quick``: both parts with tiny sizes -- 40 rows against a 200 x 200
grid, one sigma^2 of 0.1 with 300 training rows and 2 epochs -- in seconds;
its numbers are not results).  Writes ``DIR/adaptive.json`` and ``.md``
(``adaptive_quick.*`` with ``--quick``; ``DIR`` defaults to
``benchmarks/results``).
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

from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica._torch import adaptive
from sknlica._torch.integration import grid_rule, prior_rule
from sknlica._torch.likelihood import log_marginal_chunked
from sknlica.datasets import make_nonlinear_ica

PRIOR_RULES = (("gauss_hermite", 1024), ("grid", 1024), ("grid", 16384))
#: Training methods of part 2: NonlinearICAMLE's integration rules, and the VAE.
METHODS = ("grid", "adaptive", "auto", "vae")


@dataclass(frozen=True)
class Sizes:
    #: Part 1: rows, noise levels, adaptive nodes per row, dense grid per axis.
    n_rows: int = 200
    sigmas: tuple = (1.0, 0.3, 0.1)
    adaptive_nodes: tuple = (256, 1024)
    dense_per_axis: int = 600
    #: Part 2: training and held-out rows, every fit's epoch budget.
    n_train: int = 5000
    n_test: int = 2000
    max_iter: int = 200


FULL = Sizes()
QUICK = Sizes(
    n_rows=40,
    sigmas=(1.0, 0.1),
    adaptive_nodes=(64,),
    dense_per_axis=200,
    n_train=300,
    n_test=100,
    max_iter=2,
)


def accuracy_rows(sizes: Sizes = FULL) -> list[dict]:
    dense = sizes.dense_per_axis
    dense_nodes, dense_log_weights = grid_rule(2, dense**2, half_width=8)
    rows = []
    for activation in ("relu", "tanh"):
        for sigma in sizes.sigmas:
            X, _, mixing = make_nonlinear_ica(
                sizes.n_rows,
                2,
                10,
                activation=activation,
                noise_variance=sigma**2,
                random_state=1,
                return_mixing=True,
            )
            x = torch.tensor(X)
            s2 = torch.tensor(sigma**2, dtype=torch.float64)
            reference = log_marginal_chunked(
                x, mixing(dense_nodes), dense_log_weights, s2
            )
            row = {"activation": activation, "sigma": sigma}
            for name, n_nodes in PRIOR_RULES:
                nodes, log_weights = prior_rule(name, 2, n_nodes)
                estimate = log_marginal_chunked(x, mixing(nodes), log_weights, s2)
                row[f"{name} {n_nodes}"] = float((estimate - reference).abs().mean())
            start_nodes, start_log_weights = prior_rule("auto", 2, 1024)
            start = adaptive.prior_start(
                x, start_nodes, mixing(start_nodes), start_log_weights, s2
            )
            for n_nodes in sizes.adaptive_nodes:
                proposal = adaptive.proposal_normals(
                    2, n_nodes, generator=torch.Generator().manual_seed(0)
                )
                began = time.perf_counter()
                estimate = adaptive.adaptive_chunked(x, mixing, s2, start, proposal)[0]
                row[f"adaptive {n_nodes}/row"] = float(
                    (estimate - reference).abs().mean()
                )
                row[f"adaptive {n_nodes} ms/row"] = (
                    1e3 * (time.perf_counter() - began) / sizes.n_rows
                )
            decoder = mixing.to_torch_module().requires_grad_(False)
            estimate = mle_log_likelihood(X, decoder, sigma**2, n_components=2)
            row["score_samples"] = float(np.abs(estimate - reference.numpy()).mean())
            rows.append(row)
    return rows


def fit_rows(noise_variances, sizes: Sizes = FULL) -> list[dict]:
    rows = []
    n_train = sizes.n_train
    for noise_variance in noise_variances:
        X, _, mixing = make_nonlinear_ica(
            n_train + sizes.n_test,
            2,
            20,
            noise_variance=noise_variance,
            random_state=0,
            return_mixing=True,
        )
        train, test = X[:n_train], X[n_train:]
        true_score = float(
            mle_log_likelihood(
                test,
                mixing.to_torch_module().requires_grad_(False),
                noise_variance,
                n_components=2,
            ).mean()
        )
        for method in METHODS:
            if method == "vae":
                model = NonlinearICAVAE(max_iter=sizes.max_iter, random_state=0)
            else:
                model = NonlinearICAMLE(
                    integration=method, max_iter=sizes.max_iter, random_state=0
                )
            seconds = timed_fit(model, train)
            rows.append(
                {
                    "noise_variance": noise_variance,
                    "method": "NonlinearICAVAE" if method == "vae" else f"MLE {method}",
                    "gap (nats/sample)": true_score - model.score(test),
                    "fitted sigma^2": model.noise_variance_,
                    "epochs": model.n_iter_,
                    "fit seconds": seconds,
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = base_parser(__doc__, threads=1)
    parser.add_argument(
        "--noise-variances",
        type=float,
        nargs="+",
        default=[1.0, 0.1, 0.04, 0.01],
        help="sigma^2 values of the training part (--quick: 0.1 only)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    noise_variances = [0.1] if args.quick else args.noise_variances
    accuracy = accuracy_rows(sizes)
    markdown = "## log p(x) error (nats/row) vs dense quadrature\n\n" + markdown_table(
        accuracy
    )
    payload = {"accuracy": accuracy}
    load_before = os.getloadavg()
    training = fit_rows(noise_variances, sizes)
    load_after = os.getloadavg()
    payload["training"] = training
    payload["load_average"] = {"before": load_before, "after": load_after}
    markdown += (
        f"\n\n## Training (relu, m=2, n=20, {args.threads} torch thread(s))\n\n"
        + markdown_table(training)
        + "\n\nLoad average (1, 5, 15 min) of the machine, 2 cores shared with "
        + "other jobs: {:.2f}, {:.2f}, {:.2f} before the training part, ".format(
            *load_before
        )
        + "{:.2f}, {:.2f}, {:.2f} after it.".format(*load_after)
    )
    write_results("adaptive", payload, markdown, output=args.output, quick=args.quick)


if __name__ == "__main__":
    main()
