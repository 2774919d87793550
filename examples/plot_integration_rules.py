"""
==========================================================
Integration rules of the MLE: log p(x) error against nodes
==========================================================

:class:`sknlica.NonlinearICAMLE` integrates the latent out numerically,

.. math:: \\log p(x) \\approx \\operatorname{logsumexp}_j \\left[\\log w_j +
          \\log \\varphi(x; g(z_j), \\sigma^2 I)\\right],

with nodes ``z_j`` and log-weights ``log w_j`` from one of four rules over the
N(0, I) prior: Monte Carlo, scrambled Sobol points (``"qmc"``), a midpoint
grid with the prior density in its weights (``"grid"``), and tensor-product
Gauss-Hermite. This example evaluates the *true* model's ``log p(x)`` on the
report's generator (m = 2, n = 20, sigma^2 = 1) with each rule at several
node budgets, and plots the mean absolute error per row against a dense
reference grid on ``[-8, 8]^2``. It is a small version of
``benchmarks/bench_integration_rules.py``, which picked ``integration="auto"``.

Set ``SKNLICA_EXAMPLE_QUICK=1`` to run with smaller sizes (used by the
tests).
"""

# %%
# Evaluate every rule against a dense reference
# ---------------------------------------------
import os

import matplotlib.pyplot as plt
import numpy as np

from sknlica import marginal_log_likelihood
from sknlica.datasets import make_nonlinear_ica

quick = os.environ.get("SKNLICA_EXAMPLE_QUICK") == "1"
n_rows = 50 if quick else 200
budgets = [64, 256, 1024] if quick else [64, 256, 1024, 4096]
activations = ["relu"] if quick else ["relu", "tanh"]
reference_per_axis = 300 if quick else 600
seeds = [0, 1, 2]  # randomised rules: error averaged over these
RULES = ["monte_carlo", "qmc", "grid", "gauss_hermite"]

errors = {}  # (activation, rule) -> list of (n_nodes, mean |error|)
for activation in activations:
    X, _, mixing = make_nonlinear_ica(
        n_rows, 2, 20, activation=activation, random_state=0, return_mixing=True
    )
    s2 = mixing.noise_variance
    # Dense prior-weighted midpoint grid: the tails beyond 8 are negligible.
    reference = marginal_log_likelihood(
        X,
        mixing,
        s2,
        integration="grid",
        n_nodes=reference_per_axis**2,
        grid_half_width=8.0,
    )
    for rule in RULES:
        randomised = rule in ("monte_carlo", "qmc")
        for budget in budgets:
            per_seed = []
            for seed in seeds if randomised else seeds[:1]:
                estimate = marginal_log_likelihood(
                    X, mixing, s2, integration=rule, n_nodes=budget, random_state=seed
                )
                per_seed.append(np.mean(np.abs(estimate - reference)))
            # Grid rules round the budget to a square number of nodes.
            n_nodes = budget if randomised else round(budget**0.5) ** 2
            errors.setdefault((activation, rule), []).append(
                (n_nodes, float(np.mean(per_seed)))
            )

for (activation, rule), points in errors.items():
    cells = ", ".join(f"{k}: {e:.1e}" for k, e in points)
    print(f"{activation:>5} {rule:<14} {cells}")

# %%
# Plot the error against the number of nodes
# -------------------------------------------
# On log-log axes Monte Carlo falls as ``1 / sqrt(K)`` and QMC faster. The
# prior-weighted grid is the most accurate per node for both activations
# (ReLU's kinks slow every rule down); Gauss-Hermite spends many nodes far
# in the prior's tails, where the posterior of these models has no mass.
# This is why ``integration="auto"`` picks the grid for m <= 2.
fig, axes = plt.subplots(
    1, len(activations), figsize=(5 * len(activations), 4.2), layout="constrained"
)
axes = np.atleast_1d(axes)
for ax, activation in zip(axes, activations):
    for rule in RULES:
        n_nodes, mean_error = zip(*errors[(activation, rule)])
        ax.loglog(n_nodes, mean_error, "o-", label=rule)
    ax.set_xlabel("number of nodes K")
    ax.set_ylabel("mean |error| of log p(x) per row (nats)")
    ax.set_title(f"true model, {activation}, m = 2, n = 20")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
plt.show()
