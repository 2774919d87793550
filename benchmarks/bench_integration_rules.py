"""Accuracy of each integration rule for log p(x), against dense quadrature.

For the report's generator (W ~ U[0, 3), b ~ U[0, 1), sigma^2 = 1, n = 20) and
every activation, evaluate the TRUE model's log p(x) on held-out rows with
each rule at several node budgets, and report the mean absolute error per row
against a dense reference: a midpoint rule with the prior density on
[-8, 8]^m (20,000 nodes for m = 1, 10^6 for m = 2, 160^3 for m = 3), whose
own error is checked against one with half as many nodes per axis.  The rule
``grid (l=2.5)`` is the report's box.  This is what picks
``integration="auto"``.

Run: ``python benchmarks/bench_integration_rules.py [--quick] [--output DIR]``
(``--quick``: m = 2, relu and tanh, 50 rows, budgets 64 and 256 against a
200 x 200 reference, one seed; seconds).  Writes
``DIR/integration_rules.json`` and ``.md`` (``integration_rules_quick.*`` with
``--quick``; ``DIR`` defaults to ``benchmarks/results``).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from _common import base_parser, write_results

from sknlica._torch.integration import RULES, grid_rule, prior_rule
from sknlica._torch.likelihood import log_marginal_chunked
from sknlica.datasets import make_nonlinear_ica

ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu", "gelu")
REFERENCE_HALF_WIDTH = 8.0
RULE_NAMES = (*RULES, "grid (l=2.5)")


def log_p(X, mixing, nodes, log_weights):
    s2 = torch.tensor(mixing.noise_variance, dtype=torch.float64)
    g = mixing(nodes)
    return log_marginal_chunked(torch.tensor(X), g, log_weights, s2).numpy()


def reference(X, mixing, per_axis):
    m = mixing.n_components
    nodes, log_weights = grid_rule(m, per_axis**m, half_width=REFERENCE_HALF_WIDTH)
    return log_p(X, mixing, nodes, log_weights)


def main() -> None:
    args = base_parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        n_rows, budgets, dims = 50, (64, 256), (2,)
        activations, seeds = ("relu", "tanh"), (0,)
        reference_per_axis = {2: 200}
    else:
        n_rows, budgets, dims = 300, (64, 256, 1024, 4096, 16384), (1, 2, 3)
        activations, seeds = ACTIVATIONS, (0, 1, 2)
        reference_per_axis = {1: 20000, 2: 1000, 3: 160}
    rows = []
    for m in dims:
        for activation in activations:
            X, _, mixing = make_nonlinear_ica(
                n_rows,
                m,
                20,
                activation=activation,
                random_state=0,
                return_mixing=True,
            )
            ref = reference(X, mixing, reference_per_axis[m])
            coarse = reference(X, mixing, reference_per_axis[m] // 2)
            ref_error = float(np.mean(np.abs(ref - coarse)))
            for rule in RULE_NAMES:
                for budget in budgets:
                    randomised = rule in ("monte_carlo", "qmc")
                    errors, seconds = [], []
                    for seed in seeds if randomised else seeds[:1]:
                        generator = torch.Generator().manual_seed(seed)
                        nodes, log_weights = prior_rule(
                            rule.split()[0],
                            m,
                            budget,
                            generator=generator,
                            half_width=2.5 if "2.5" in rule else None,
                        )
                        start = time.perf_counter()
                        estimate = log_p(X, mixing, nodes, log_weights)
                        seconds.append(time.perf_counter() - start)
                        errors.append(np.mean(np.abs(estimate - ref)))
                    rows.append(
                        {
                            "m": m,
                            "activation": activation,
                            "rule": rule,
                            "n_nodes": int(nodes.shape[0]),
                            "mean_abs_error": float(np.mean(errors)),
                            "reference_self_error": ref_error,
                            "ms_per_1000_rows": 1000 * np.mean(seconds) * 1000 / n_rows,
                        }
                    )
                    print(rows[-1], flush=True)
    md = ["# Integration rules: mean |error| of log p(x) per row (nats)", ""]
    md.append(
        f"True model of `make_nonlinear_ica` (n=20, sigma^2=1), {n_rows} rows; "
        f"randomised rules averaged over {len(seeds)} seeds; reference: "
        "prior-weighted "
        f"midpoint grid on [-{REFERENCE_HALF_WIDTH:g}, {REFERENCE_HALF_WIDTH:g}]^m."
    )
    for m in dims:
        for activation in activations:
            subset = [r for r in rows if r["m"] == m and r["activation"] == activation]
            md += [
                "",
                f"## m={m}, {activation} (reference self-error "
                f"{subset[0]['reference_self_error']:.1e})",
                "",
            ]
            md.append(_rule_table(subset))

    write_results(
        "integration_rules",
        {"rows": rows},
        "\n".join(md),
        output=args.output,
        quick=args.quick,
    )


def _rule_table(subset):
    budgets = sorted({r["n_nodes"] for r in subset if r["rule"] == "qmc"})
    lines = ["| rule | " + " | ".join(f"{b} nodes" for b in budgets) + " |"]
    lines.append("|" + "---|" * (len(budgets) + 1))
    for rule in RULE_NAMES:
        rule_rows = sorted(
            (r for r in subset if r["rule"] == rule), key=lambda r: r["n_nodes"]
        )
        cells = [f"{r['mean_abs_error']:.3g} ({r['n_nodes']})" for r in rule_rows]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
