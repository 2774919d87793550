"""The evaluation grid's box: rows whose posterior it truncates, measured.

Linear-Gaussian models with a closed form (``g(z) = A z``, ``A`` with N(0, 1)
entries, m = 3 latents, n = 6 features, 20,000 rows drawn from the model):
``log p(x) = log N(x; 0, A A^T + sigma^2 I)`` and ``E[z | x]`` are exact.  At
m = 3 the 16,384 evaluation nodes are a 25^3 grid on ``[-3, 3]^3`` (outer
layer at ``|z_k| = 2.88``).  Each row is evaluated as the estimators score
it (``evaluation.evaluate``) four ways:

* ``previous``: weights summing to one, no edge check (the evaluation before
  ``EDGE_WEIGHT`` and ``grid_box_log_mass``);
* ``box mass``: the weights sum to the prior's mass in the box;
* ``edge check``: rows with more than ``EDGE_WEIGHT`` of their posterior
  weight on the outer layer are refined too;
* ``both``: the default now.

Reported per noise variance: rows refined, the posterior means' largest
and 99th-percentile error (max over latents), ``log p(x)``'s largest error
and mean signed error, and seconds.  One torch thread by default.  Run:
``python benchmarks/bench_evaluation_edge.py [--quick] [--output DIR]``.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from _common import base_parser, markdown_table, write_results

from sknlica._torch import evaluation
from sknlica._torch.evaluation import (
    EVALUATION_NODES,
    DecodedRule,
    decoded_evaluation_rule,
    evaluate,
)
from sknlica._torch.integration import grid_box_log_mass

NOISE_VARIANCES = (2.0, 1.0, 0.5)
N_COMPONENTS, N_FEATURES = 3, 6


def problem(noise_variance: float, n_rows: int, seed: int):
    """Rows of a linear-Gaussian model, their exact ``log p(x)`` and means."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(N_FEATURES, N_COMPONENTS))
    X = rng.normal(size=(n_rows, N_COMPONENTS)) @ A.T + math.sqrt(
        noise_variance
    ) * rng.normal(size=(n_rows, N_FEATURES))
    covariance = A @ A.T + noise_variance * np.eye(N_FEATURES)
    _, log_det = np.linalg.slogdet(covariance)
    solved = np.linalg.solve(covariance, X.T).T
    log_p = -0.5 * (N_FEATURES * math.log(2 * math.pi) + log_det + (X * solved).sum(1))
    mean = solved @ A
    decoder = torch.nn.Linear(N_COMPONENTS, N_FEATURES, bias=False)
    decoder = decoder.double().requires_grad_(False)
    with torch.no_grad():
        decoder.weight.copy_(torch.from_numpy(A))
    return torch.from_numpy(X), decoder, log_p, mean


def variants(rule: DecodedRule) -> dict:
    """The four evaluations: (rule, check_edge) each."""
    shift = grid_box_log_mass(N_COMPONENTS, EVALUATION_NODES)
    renormalised = DecodedRule(rule.nodes, rule.log_weights - shift, rule.g, rule.edge)
    return {
        "previous": (renormalised, False),
        "box mass": (rule, False),
        "edge check": (renormalised, True),
        "both (default)": (rule, True),
    }


def main() -> None:
    parser = base_parser(__doc__, threads=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_rows = 300 if args.quick else 20000
    load_before = os.getloadavg()
    rows = []
    for noise_variance in NOISE_VARIANCES:
        x, decoder, log_p, mean = problem(noise_variance, n_rows, args.seed)
        rule = decoded_evaluation_rule(
            decoder, N_COMPONENTS, EVALUATION_NODES, dtype=torch.float64
        )
        noise = torch.tensor(noise_variance, dtype=torch.float64)
        for name, (variant, check_edge) in variants(rule).items():
            start = time.perf_counter()
            result = evaluate(x, variant, decoder, noise, check_edge=check_edge)
            seconds = time.perf_counter() - start
            mean_error = np.abs(result.posterior_mean.numpy() - mean).max(1)
            log_p_error = result.log_marginal.numpy() - log_p
            rows.append(
                {
                    "sigma^2": noise_variance,
                    "evaluation": name,
                    "rows refined": int(result.low_ess.sum()),
                    "mean error, max": float(mean_error.max()),
                    "mean error, p99": float(np.quantile(mean_error, 0.99)),
                    "log p error, max": float(np.abs(log_p_error).max()),
                    "log p error, mean": float(log_p_error.mean()),
                    "seconds": seconds,
                }
            )
            print(rows[-1], flush=True)
    load_after = os.getloadavg()
    markdown = "\n".join(
        [
            f"## Evaluation against the closed form (m = 3, n = 6, {n_rows:,} "
            f"rows, seed {args.seed}; EDGE_WEIGHT = {evaluation.EDGE_WEIGHT})",
            "",
            markdown_table(rows),
            "",
            f"{torch.get_num_threads()} torch thread(s). Load average (1, 5, 15 "
            f"min): {', '.join(f'{v:.2f}' for v in load_before)} before, "
            f"{', '.join(f'{v:.2f}' for v in load_after)} after.",
        ]
    )
    payload = {
        "rows": rows,
        "n_rows": n_rows,
        "seed": args.seed,
        "load_average": {"before": load_before, "after": load_after},
    }
    write_results(
        "evaluation_edge", payload, markdown, output=args.output, quick=args.quick
    )


if __name__ == "__main__":
    main()
