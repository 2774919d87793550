"""Quality and speed of NonlinearICAMLE on the report's generator.

Targets (issue: NonlinearICAMLE), on ``make_nonlinear_ica`` with m=2, n=20,
sigma^2=1, 5,000 training and 2,000 held-out rows, 2 CPU threads:

- the default estimator's held-out ``score`` within 0.05 nats/sample of the
  true model's log-likelihood, and ``noise_variance_`` within 3% of 1;
- the default fit in at most 20 s.

Also reported: every activation, n = 100 and 1,000, every integration rule,
and autograd vs the analytic gradient.  The true model's log-likelihood comes
from :func:`sknlica.marginal_log_likelihood` on the generator's mixing.

Run: ``python benchmarks/bench_mle.py [--quick] [--max-features 100]``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from _common import markdown_table, write_results
from sklearn.exceptions import ConvergenceWarning

from sknlica import NonlinearICAMLE, marginal_log_likelihood
from sknlica.datasets import make_nonlinear_ica

N_TRAIN, N_TEST = 5000, 2000
ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu", "gelu")
GAP_TARGET, NOISE_TARGET, SECONDS_TARGET = 0.05, 0.03, 20.0


def measure(params: dict, *, activation="relu", n_features=20, seed=0) -> dict:
    X, _, mixing = make_nonlinear_ica(
        N_TRAIN + N_TEST,
        2,
        n_features,
        activation=activation,
        random_state=seed,
        return_mixing=True,
    )
    X_train, X_test = X[:N_TRAIN], X[N_TRAIN:]
    true_ll = float(marginal_log_likelihood(X_test, mixing, 1.0).mean())
    model = NonlinearICAMLE(random_state=seed, **params)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X_train)
    seconds = time.perf_counter() - start
    score = model.score(X_test)
    row = {
        "activation": activation,
        "n": n_features,
        "params": ", ".join(f"{k}={v}" for k, v in params.items()) or "default",
        "held_out_ll": score,
        "true_ll": true_ll,
        "gap": score - true_ll,
        "noise_variance": model.noise_variance_,
        "fit_seconds": seconds,
        "epochs": model.n_iter_,
        "seconds_per_epoch": seconds / model.n_iter_,
    }
    row["meets_targets"] = (
        row["gap"] > -GAP_TARGET
        and abs(row["noise_variance"] - 1) < NOISE_TARGET
        and seconds <= SECONDS_TARGET
    )
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="relu defaults only")
    parser.add_argument(
        "--max-features",
        type=int,
        default=1000,
        help="largest n of the dimensions section (100 skips n = 1000, whose "
        "default fit trains adaptively and takes over 25 minutes)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    sections = {"activations": [], "dimensions": [], "rules": [], "gradients": []}
    for activation in ACTIVATIONS[:1] if args.quick else ACTIVATIONS:
        sections["activations"].append(measure({}, activation=activation))
    if not args.quick:
        for n_features in (n for n in (100, 1000) if n <= args.max_features):
            sections["dimensions"].append(measure({}, n_features=n_features))
        for rule in ("grid", "qmc", "gauss_hermite", "monte_carlo"):
            sections["rules"].append(measure({"integration": rule}))
        sections["rules"].append(
            measure({"integration": "grid", "grid_half_width": 2.5})
        )
        for gradient in ("autograd", "analytic"):
            sections["gradients"].append(measure({"gradient": gradient}))
    columns = [
        "activation",
        "n",
        "params",
        "held_out_ll",
        "true_ll",
        "gap",
        "noise_variance",
        "fit_seconds",
        "epochs",
        "meets_targets",
    ]
    md = [
        "# NonlinearICAMLE quality and speed",
        "",
        f"`make_nonlinear_ica`, m=2, sigma^2=1, {N_TRAIN} train / {N_TEST} held-out "
        f"rows, {torch.get_num_threads()} threads. Targets: gap > -{GAP_TARGET} "
        f"nats, |sigma^2 - 1| < {NOISE_TARGET}, fit <= {SECONDS_TARGET:g} s.",
    ]
    if not args.quick and args.max_features < 1000:
        md += [
            "",
            f"Dimensions above n = {args.max_features} skipped (--max-features).",
        ]
    for name, rows in sections.items():
        if rows:
            md += ["", f"## {name}", "", markdown_table(rows, columns)]
    write_results("mle_quick" if args.quick else "mle", sections, "\n".join(md))


if __name__ == "__main__":
    main()
