"""Posterior-adapted integration against prior rules when the noise is small.

Part 1, accuracy: mean absolute error of ``log p(x)`` per row under the true
model of ``make_nonlinear_ica`` (relu and tanh, m = 2, n = 10, sigma in {1,
0.3, 0.1}), against a dense 600 x 600 midpoint grid on ``[-8, 8]^2``, for
prior rules (Gauss-Hermite and the prior-weighted grid) and the adaptive rule
of ``sknlica._torch.adaptive`` at several node counts per row, plus what the
estimator's ``score_samples`` (prior grid with the per-row ESS switch) gets.

Part 2 (skipped with ``--quick``), training on ``make_nonlinear_ica`` (relu,
m = 2, n = 20, 5,000 training and 2,000 held-out rows) at sigma^2 in {1, 0.1,
0.04, 0.01}: ``NonlinearICAMLE`` with the prior grid alone
(``integration="grid"``, what ``"auto"`` trained with before it could switch),
with ``"adaptive"``, with the default ``"auto"``, and ``NonlinearICAVAE`` with
its defaults.  Reported: the held-out log-likelihood gap to the true model
(the true decoder scored by ``NonlinearICAMLE.score``, whose per-row switch
to the adaptive rule keeps it accurate at small noise), the fitted sigma^2,
the epochs and the fit time.  Torch runs on one thread
(``torch.set_num_threads(1)``), the fits one after another.

Run: ``python benchmarks/bench_adaptive.py [--quick]`` (``--quick`` writes
``results/adaptive_quick.*``, leaving the full results alone).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch
from _common import markdown_table, mle_with_decoder, write_results
from sklearn.exceptions import ConvergenceWarning

from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica._torch import adaptive
from sknlica._torch.integration import grid_rule, prior_rule
from sknlica._torch.likelihood import log_marginal_chunked
from sknlica.datasets import make_nonlinear_ica

N_ROWS = 200
SIGMAS = (1.0, 0.3, 0.1)
PRIOR_RULES = (("gauss_hermite", 1024), ("grid", 1024), ("grid", 16384))
ADAPTIVE_NODES = (256, 1024)
#: Training methods of part 2: NonlinearICAMLE's integration rules, and the VAE.
METHODS = ("grid", "adaptive", "auto", "vae")


def accuracy_rows() -> list[dict]:
    dense_nodes, dense_log_weights = grid_rule(2, 600**2, half_width=8)
    rows = []
    for activation in ("relu", "tanh"):
        for sigma in SIGMAS:
            X, _, mixing = make_nonlinear_ica(
                N_ROWS,
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
            for n_nodes in ADAPTIVE_NODES:
                normals, counts = adaptive.proposal_normals(
                    2, n_nodes, generator=torch.Generator().manual_seed(0)
                )
                began = time.perf_counter()
                estimate, _ = adaptive.adaptive_chunked(
                    x, mixing, s2, start, normals, counts
                )
                row[f"adaptive {n_nodes}/row"] = float(
                    (estimate - reference).abs().mean()
                )
                row[f"adaptive {n_nodes} ms/row"] = (
                    1e3 * (time.perf_counter() - began) / N_ROWS
                )
            model = mle_with_decoder(
                mixing.to_torch_module().requires_grad_(False), sigma**2, X
            )
            row["score_samples"] = float(
                np.abs(model.score_samples(X) - reference.numpy()).mean()
            )
            rows.append(row)
    return rows


def fit_rows(noise_variances, n_train=5000, n_test=2000, max_iter=200) -> list[dict]:
    rows = []
    for noise_variance in noise_variances:
        X, _, mixing = make_nonlinear_ica(
            n_train + n_test,
            2,
            20,
            noise_variance=noise_variance,
            random_state=0,
            return_mixing=True,
        )
        train, test = X[:n_train], X[n_train:]
        truth = mle_with_decoder(
            mixing.to_torch_module().requires_grad_(False), noise_variance, train[:200]
        )
        true_score = truth.score(test)
        for method in METHODS:
            if method == "vae":
                model = NonlinearICAVAE(random_state=0)
            else:
                model = NonlinearICAMLE(
                    integration=method, max_iter=max_iter, random_state=0
                )
            began = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(train)
            seconds = time.perf_counter() - began
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="accuracy part only")
    parser.add_argument(
        "--noise-variances",
        type=float,
        nargs="+",
        default=[1.0, 0.1, 0.04, 0.01],
        help="sigma^2 values of the training part",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    accuracy = accuracy_rows()
    markdown = "## log p(x) error (nats/row) vs dense quadrature\n\n" + markdown_table(
        accuracy
    )
    payload = {"accuracy": accuracy}
    if not args.quick:
        load_before = os.getloadavg()
        training = fit_rows(args.noise_variances)
        load_after = os.getloadavg()
        payload["training"] = training
        payload["load_average"] = {"before": load_before, "after": load_after}
        markdown += (
            "\n\n## Training (relu, m=2, n=20, one torch thread)\n\n"
            + markdown_table(training)
            + "\n\nLoad average (1, 5, 15 min) of the machine, 2 cores shared with "
            + "other jobs: {:.2f}, {:.2f}, {:.2f} before the training part, ".format(
                *load_before
            )
            + "{:.2f}, {:.2f}, {:.2f} after it.".format(*load_after)
        )
    write_results("adaptive_quick" if args.quick else "adaptive", payload, markdown)


if __name__ == "__main__":
    main()
