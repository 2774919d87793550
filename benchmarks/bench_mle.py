"""Quality and speed of NonlinearICAMLE on the report's generator.

Targets (issue: NonlinearICAMLE), on ``make_nonlinear_ica`` with m=2, n=20,
sigma^2=1, 5,000 training and 2,000 held-out rows, 2 CPU threads:

- the default estimator's held-out ``score`` within 0.05 nats/sample of the
  true model's log-likelihood, and ``noise_variance_`` within 3% of 1;
- the default fit in at most 20 s.

Also reported: every activation, n = 100 and 1,000, every integration rule,
and autograd vs the analytic gradient.  The true model's log-likelihood comes
from :func:`sknlica.marginal_log_likelihood` on the generator's mixing.

Run: ``python benchmarks/bench_mle.py [--quick] [--output DIR]
[--max-features 100]`` (``--quick``: one fit per section, 400 training and
200 held-out rows, 3 epochs, a 4,096-node truth: seconds; its numbers are
not results).  Writes ``DIR/mle.json`` and ``.md`` (``mle_quick.*`` with
``--quick``; ``DIR`` defaults to ``benchmarks/results``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from _common import base_parser, markdown_table, timed_fit, write_results

from sknlica import NonlinearICAMLE, marginal_log_likelihood
from sknlica.datasets import make_nonlinear_ica

ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu", "gelu")
GAP_TARGET, NOISE_TARGET, SECONDS_TARGET = 0.05, 0.03, 20.0


@dataclass(frozen=True)
class Sizes:
    n_train: int = 5000
    n_test: int = 2000
    #: Nodes of the true model's ``marginal_log_likelihood``.
    truth_nodes: int = 2**16
    #: Parameters every fit gets on top of its own (``--quick``: few epochs).
    fit_params: tuple = ()


FULL = Sizes()
QUICK = Sizes(n_train=400, n_test=200, truth_nodes=4096, fit_params=(("max_iter", 3),))


def measure(params: dict, sizes=FULL, *, activation="relu", n_features=20, seed=0):
    n_train = sizes.n_train
    X, _, mixing = make_nonlinear_ica(
        n_train + sizes.n_test,
        2,
        n_features,
        activation=activation,
        random_state=seed,
        return_mixing=True,
    )
    X_train, X_test = X[:n_train], X[n_train:]
    truth = marginal_log_likelihood(X_test, mixing, 1.0, n_nodes=sizes.truth_nodes)
    true_ll = float(truth.mean())
    model = NonlinearICAMLE(random_state=seed, **dict(sizes.fit_params), **params)
    seconds = timed_fit(model, X_train)
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
    parser = base_parser(__doc__)
    parser.add_argument(
        "--max-features",
        type=int,
        default=1000,
        help="largest n of the dimensions section (100 skips n = 1000, whose "
        "default fit trains adaptively and takes over 25 minutes)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    sections = {"activations": [], "dimensions": [], "rules": [], "gradients": []}
    for activation in ACTIVATIONS[:1] if args.quick else ACTIVATIONS:
        sections["activations"].append(measure({}, sizes, activation=activation))
    dimensions = [n for n in (100, 1000) if n <= args.max_features]
    rules = [
        {"integration": r} for r in ("grid", "qmc", "gauss_hermite", "monte_carlo")
    ]
    rules.append({"integration": "grid", "grid_half_width": 2.5})
    gradients = [{"gradient": g} for g in ("autograd", "analytic")]
    if args.quick:
        # One fit per section: the cheapest dimension, the report's grid box
        # (a parameter no default fit sets), the analytic gradient.
        dimensions, rules, gradients = dimensions[:1], rules[-1:], gradients[1:]
    for n_features in dimensions:
        sections["dimensions"].append(measure({}, sizes, n_features=n_features))
    for params in rules:
        sections["rules"].append(measure(params, sizes))
    for params in gradients:
        sections["gradients"].append(measure(params, sizes))
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
        f"`make_nonlinear_ica`, m=2, sigma^2=1, {sizes.n_train} train / "
        f"{sizes.n_test} held-out "
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
    if args.quick:
        md += ["", f"Quick run (smoke test, not results): {dict(sizes.fit_params)}."]
    write_results("mle", sections, "\n".join(md), output=args.output, quick=args.quick)


if __name__ == "__main__":
    main()
