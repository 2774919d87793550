"""Identifiable nonlinear ICA: does the conditional prior recover the sources?

Data from ``sknlica.datasets.make_nonstationary_ica`` (Gaussian sources
whose variances change per segment, leaky-ReLU mixing, noise variance 0.01):

* ``square``: m = n = 5, 40 segments x 500 rows, 2 mixing layers;
* ``deep``: the same with 4 mixing layers;
* ``overcomplete``: m = 3, n = 20, 20 segments x 250 rows, 2 layers.

Each segment's rows are split 80/20 (stratified) into training and held-out
rows. Fitted: ``NonlinearICAMLE`` and ``NonlinearICAVAE`` with
``prior="conditional"`` (``fit(X, u)``) and with ``prior="standard"``,
otherwise at their defaults with ``n_components = m`` and ``max_iter``
epochs (``--max-iter``, default 60). Reported per fit, on the held-out rows:
``mcc`` (strong: ``mean_corr_coef(S, transform(X, u))`` for the conditional
prior, ``transform(X)`` for the standard one), ``weak_mcc`` (the mean
canonical correlation, invariant to linear maps, so a rotation does not
lower it), ``marginal_mcc`` (the conditional fit's ``transform(X)`` without
``u``, on the first 500 held-out rows), ``score`` (``log p(x | u)`` for the
conditional prior, ``log p(x)`` for the standard one), for ``overcomplete``
``gap`` (the true model's ``log p(x | u)``, by
``marginal_log_likelihood(integration="adaptive")`` with 8,192 proposal
nodes per row and the true per-row prior, minus the conditional fit's) and
``train_gap`` (the same on the first 1,000 training rows),
epochs (and how many trained with the MLE's adaptive rule), median seconds
per epoch of each kind, and seconds. The summary gives the mean and spread
(min-max) over seeds, and the conditional fit's time over the standard
one's.

One torch thread (``--threads``); fits run one after another.  Run:
``python benchmarks/bench_identifiability.py [--quick] [--seeds K |
--seed-list 0,2,4] [--configs square,deep,overcomplete] [--estimators
vae,mle] [--priors conditional,standard] [--max-iter E] [--params JSON]
[--tag T] [--output DIR]``
(``--params``: estimator parameters for every fit, e.g. ``'{"alpha":
1000}'``; ``--quick``: tiny sizes, 2 epochs, its numbers are not
results).  Writes
``DIR/identifiability<T>.json`` and ``.md``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from _common import base_parser, markdown_table, write_results
from sklearn.model_selection import train_test_split

from sknlica import NonlinearICAMLE, NonlinearICAVAE, marginal_log_likelihood
from sknlica.datasets import make_nonstationary_ica
from sknlica.metrics import canonical_correlations, mean_corr_coef


@dataclass(frozen=True)
class Config:
    n_segments: int
    n_per_segment: int
    n_components: int
    n_features: int
    n_layers: int


FULL = {
    "square": Config(40, 500, 5, 5, 2),
    "deep": Config(40, 500, 5, 5, 4),
    "overcomplete": Config(20, 250, 3, 20, 2),
}
QUICK = {
    "square": Config(4, 40, 2, 2, 2),
    "deep": Config(4, 40, 2, 2, 4),
    "overcomplete": Config(4, 40, 2, 5, 2),
}
NOISE_VARIANCE = 0.01
MARGINAL_ROWS = 500
TRAIN_GAP_ROWS = 1000
ESTIMATORS = {"mle": NonlinearICAMLE, "vae": NonlinearICAVAE}


def fit_row(name, config, kind, prior, seed, quick, max_iter, extra=None) -> dict:
    X, u, S, mixing, means, variances = make_nonstationary_ica(
        config.n_segments,
        config.n_per_segment,
        config.n_components,
        config.n_features,
        n_layers=config.n_layers,
        noise_variance=NOISE_VARIANCE,
        random_state=seed,
        return_mixing=True,
    )
    X_train, X_test, u_train, u_test, _, S_test = train_test_split(
        X, u, S, test_size=0.2, stratify=u, random_state=seed
    )
    params = {"n_components": config.n_components, "prior": prior}
    params["max_iter"] = max_iter
    params.update(extra or {})
    if quick:
        params.update(max_iter=2, hidden_layer_sizes=(8,))
    estimator = ESTIMATORS[kind](random_state=seed, **params)
    conditional = prior == "conditional"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimator.fit(X_train, u_train if conditional else None)
    seconds = time.perf_counter() - start
    y_test = u_test if conditional else None
    Z = estimator.transform(X_test, y_test)
    row = {
        "config": name,
        "estimator": kind,
        "prior": prior,
        "seed": seed,
        "mcc": mean_corr_coef(S_test, Z),
        "weak_mcc": float(canonical_correlations(S_test, Z).mean()),
        # Under the marginal prior every row is evaluated under every
        # segment's model (n_segments times the cost): on the first
        # MARGINAL_ROWS held-out rows.
        "marginal_mcc": (
            mean_corr_coef(
                S_test[:MARGINAL_ROWS], estimator.transform(X_test[:MARGINAL_ROWS])
            )
            if conditional
            else float("nan")
        ),
        "score": estimator.score(X_test, y_test),
        "epochs": estimator.n_iter_,
        "adaptive_epochs": sum(
            bool(entry.get("adaptive_training")) for entry in estimator.history_
        ),
        "s/epoch": epoch_seconds(estimator.history_, adaptive=False),
        "s/adaptive epoch": epoch_seconds(estimator.history_, adaptive=True),
        "seconds": seconds,
    }
    if name == "overcomplete" and conditional:
        truth = (mixing, means, variances, quick)
        row["gap"] = true_score(X_test, u_test, *truth) - row["score"]
        # The same on training rows: a fit above the true model there and
        # below it held out is limited by its parameters, not its optimiser.
        X_seen, u_seen = X_train[:TRAIN_GAP_ROWS], u_train[:TRAIN_GAP_ROWS]
        row["train_gap"] = true_score(X_seen, u_seen, *truth) - estimator.score(
            X_seen, u_seen
        )
    return row


def true_score(X, u, mixing, means, variances, quick) -> float:
    """The true model's mean ``log p(x | u)`` of the rows, nats/row."""
    truth = marginal_log_likelihood(
        X,
        mixing,
        NOISE_VARIANCE,
        n_components=means.shape[1],
        # At sigma^2 = 0.01 the posterior is far narrower than any grid
        # over the prior: posterior-adapted importance sampling.
        integration="adaptive",
        n_nodes=256 if quick else 8192,
        prior_mean=means[u],
        prior_variance=variances[u],
    )
    return float(truth.mean())


def epoch_seconds(history: list[dict], *, adaptive: bool) -> float:
    """Median seconds of the epochs that trained adaptively (or did not):
    the MLE's switch to the adaptive rule, not the prior, dominates a fit's
    time once it fires, so the conditional/standard ratio is per kind."""
    times = [entry["seconds"] for entry in history]
    spans = np.diff([0.0, *times])
    chosen = [
        span
        for span, entry in zip(spans, history)
        if bool(entry.get("adaptive_training")) == adaptive
    ]
    return float(np.median(chosen)) if chosen else float("nan")


def summary_rows(rows: list[dict]) -> list[dict]:
    """Mean and min-max over seeds per configuration, estimator and prior."""
    summary = []
    keys = sorted({(r["config"], r["estimator"], r["prior"]) for r in rows})
    for config, kind, prior in keys:
        group = [
            r
            for r in rows
            if (r["config"], r["estimator"], r["prior"]) == (config, kind, prior)
        ]
        entry = {"config": config, "estimator": kind, "prior": prior}
        for key in ("mcc", "weak_mcc", "seconds", "s/epoch"):
            values = np.array([r[key] for r in group])
            entry[key] = f"{values.mean():.3f} ({values.min():.3f}-{values.max():.3f})"
        for key in ("gap", "train_gap"):
            if key in group[0]:
                entry[key] = f"{np.mean([r[key] for r in group]):.3f}"
        standard = [
            r["seconds"]
            for r in rows
            if (r["config"], r["estimator"], r["prior"]) == (config, kind, "standard")
        ]
        if prior == "conditional" and standard:
            times = np.mean([r["seconds"] for r in group]) / np.mean(standard)
            entry["time vs standard"] = f"{times:.2f}x"
            per_epoch = np.mean([r["s/epoch"] for r in group]) / np.mean(
                [
                    r["s/epoch"]
                    for r in rows
                    if (r["config"], r["estimator"], r["prior"])
                    == (config, kind, "standard")
                ]
            )
            entry["s/epoch vs standard"] = f"{per_epoch:.2f}x"
        entry["seeds"] = len(group)
        summary.append(entry)
    return summary


def main() -> None:
    parser = base_parser(__doc__, threads=1)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..K-1")
    parser.add_argument(
        "--seed-list",
        default=None,
        help="comma-separated seeds, instead of --seeds (to split a run "
        "between processes)",
    )
    parser.add_argument(
        "--configs", default="square,deep,overcomplete", help="comma-separated"
    )
    parser.add_argument(
        "--estimators", default="vae,mle", help="comma-separated: vae, mle"
    )
    parser.add_argument(
        "--max-iter",
        type=int,
        default=60,
        help="epochs per fit (default 60: the MLE's adaptive epochs at m = 5 "
        "and sigma^2 = 0.01 take about 8 s each on one thread)",
    )
    parser.add_argument(
        "--priors", default="conditional,standard", help="comma-separated"
    )
    parser.add_argument(
        "--params",
        default="{}",
        help="estimator parameters as JSON, e.g. '{\"alpha\": 1000}' (both priors)",
    )
    parser.add_argument("--tag", default="", help="suffix of the output name")
    args = parser.parse_args()
    extra = json.loads(args.params)
    torch.set_num_threads(args.threads)
    configs = QUICK if args.quick else FULL
    if args.quick:
        seeds = [0]
    elif args.seed_list:
        seeds = [int(seed) for seed in args.seed_list.split(",")]
    else:
        seeds = range(args.seeds)
    load_before = os.getloadavg()
    rows = []
    for name in args.configs.split(","):
        for seed in seeds:
            for kind in args.estimators.split(","):
                for prior in args.priors.split(","):
                    rows.append(
                        fit_row(
                            name,
                            configs[name],
                            kind,
                            prior,
                            seed,
                            args.quick,
                            args.max_iter,
                            extra,
                        )
                    )
                    print(rows[-1], flush=True)
    load_after = os.getloadavg()
    summary = summary_rows(rows)
    markdown = [
        "## Held-out MCC, mean (min-max) over seeds\n\n" + markdown_table(summary),
        "## Every fit\n\n" + markdown_table(rows),
        f"{args.threads} torch thread(s). Load average (1, 5, 15 min) of the "
        "2-core machine: {:.2f}, {:.2f}, {:.2f} before, ".format(*load_before)
        + "{:.2f}, {:.2f}, {:.2f} after.".format(*load_after),
    ]
    write_results(
        "identifiability" + args.tag,
        {
            "rows": rows,
            "summary": summary,
            "params": extra,
            "load_average": {"before": load_before, "after": load_after},
        },
        "\n\n".join(markdown),
        output=args.output,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
