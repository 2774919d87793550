"""
=====================================================
Recovery metrics against the dimensions (tiny study)
=====================================================

The report's Figure 6 plots the Procrustes disparity and the first
canonical correlation between true and estimated latents against the
observed dimension n at fixed m = 2 and against the latent dimension m at
fixed n, for the VAE only and from one run per point; its TODO asked for
confidence intervals over repeats and the same for the MLE. This example
runs that study at a toy scale with
:func:`sknlica.plotting.compute_metric_scaling` (fresh data and mixing per
repeat, metrics on held-out rows) and draws it with
:func:`sknlica.plotting.plot_metric_scaling`: the mean over repeats and a
95% Student-t interval of that mean.

The models here train for a few epochs only, so the numbers are far from
converged; the full study belongs to the benchmarks.

Set ``SKNLICA_EXAMPLE_QUICK=1`` to run with smaller sizes (used by the
tests).
"""

# %%
# Run the study
# -------------
import os
import warnings

import matplotlib.pyplot as plt
from sklearn.exceptions import ConvergenceWarning

from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica.plotting import compute_metric_scaling, plot_metric_scaling

quick = os.environ.get("SKNLICA_EXAMPLE_QUICK") == "1"
n_repeats = 2 if quick else 3
n_samples, n_test = (200, 200) if quick else (800, 500)
max_iter = 2 if quick else 8
fixed_m, fixed_n = 2, 20
n_values = [5, 20] if quick else [5, 10, 20, 40]
m_values = [1, 2] if quick else [1, 2, 3]

estimators = {
    "MLE": lambda m, n: NonlinearICAMLE(
        m,
        hidden_layer_sizes=(32,),
        n_nodes=256,
        n_eval_nodes=2048,
        max_iter=max_iter,
        random_state=0,
    ),
    "VAE": lambda m, n: NonlinearICAVAE(
        m,
        hidden_layer_sizes=(32,),
        n_eval_samples=256,
        max_iter=max_iter,
        random_state=0,
    ),
}
dims = [(fixed_m, n) for n in n_values]
dims += [(m, fixed_n) for m in m_values if (m, fixed_n) not in dims]
with warnings.catch_warnings():
    # A few epochs on purpose.
    warnings.simplefilter("ignore", ConvergenceWarning)
    records = compute_metric_scaling(
        estimators, dims, n_repeats=n_repeats, n_samples=n_samples, n_test=n_test
    )

for r in records:
    print(
        f"{r['estimator']} m={r['n_components']} n={r['n_features']:>2} "
        f"repeat {r['repeat']}: disparity {r['procrustes_disparity']:.3f}, "
        f"first CC {r['canonical_correlation']:.3f}"
    )

# %%
# Plot against n at fixed m, and against m at fixed n
# ---------------------------------------------------
# Top row: the observed dimension n varies at m = 2. Bottom row: the latent
# dimension m varies at n = 20. Bands: 95% intervals over the repeats
# (each repeat draws a new mixing), clipped to [0, 1].
fig, axes = plt.subplots(2, 2, figsize=(10, 8), layout="constrained")
plot_metric_scaling(records, vary="n_features", fixed=fixed_m, axes=axes[0])
plot_metric_scaling(records, vary="n_components", fixed=fixed_n, axes=axes[1])
plt.show()
