"""
==========================================================
Procrustes disparity versus canonical correlation by width
==========================================================

How similar do two *independent* data sets look? Ideally a similarity measure
says "not at all", whatever their number of columns. This example draws pairs
of independent standard normal matrices with N = 5,000 rows and an increasing
number of columns, and compares

- the Procrustes disparity (:func:`sknlica.metrics.procrustes_disparity`),
  where 1 means "no similarity", and
- the first canonical correlation
  (:func:`sknlica.metrics.canonical_correlations`), where 0 means
  "no similarity".

The first canonical correlation climbs quickly with the width: CCA may choose
any linear combination of either side, and with many columns it always finds
one that correlates by chance. With ``c = width / N`` it approaches
``sqrt(4 c (1 - c))``, i.e. 0.6 at width 500. The Procrustes disparity only
allows a rotation and a scaling, and stays close to 1. This is why
Procrustes analysis is preferred to compare estimated and true latents.
"""

# %%
# Compute both measures for independent pairs
# -------------------------------------------
import matplotlib.pyplot as plt
import numpy as np

from sknlica.metrics import canonical_correlations, procrustes_disparity

n_samples = 5_000
widths = [2, 5, 10, 20, 50, 100, 200, 500]
rng = np.random.default_rng(0)

disparities, first_ccs = [], []
for width in widths:
    A = rng.standard_normal((n_samples, width))
    B = rng.standard_normal((n_samples, width))
    disparities.append(procrustes_disparity(A, B))
    first_ccs.append(canonical_correlations(A, B)[0])

# Asymptotic largest canonical correlation for independent data (Wachter).
ratio = np.asarray(widths) / n_samples
cc_edge = np.sqrt(4 * ratio * (1 - ratio))

print(f"{'width':>6} {'disparity':>10} {'first CC':>9} {'CC limit':>9}")
for width, disparity, first_cc, edge in zip(widths, disparities, first_ccs, cc_edge):
    print(f"{width:>6} {disparity:>10.3f} {first_cc:>9.3f} {edge:>9.3f}")

# %%
# Plot both against the width
# ---------------------------
# An unbiased measure would stay flat: disparity at 1, correlation at 0.
fig, ax = plt.subplots(figsize=(7, 4.5))
ax.plot(widths, disparities, "o-", label="Procrustes disparity (1 = unrelated)")
ax.plot(widths, first_ccs, "s-", label="First canonical correlation (0 = unrelated)")
ax.plot(
    widths,
    cc_edge,
    ":",
    color="grey",
    label=r"CC limit $\sqrt{4c(1-c)}$, $c$ = width / N",
)
ax.set_xscale("log")
ax.set_xticks(widths, labels=[str(w) for w in widths])
ax.set_ylim(-0.02, 1.05)
ax.set_xlabel("Number of columns of each matrix (width)")
ax.set_ylabel("Value of the measure")
ax.set_title(f"Two independent standard normal matrices, N = {n_samples:,} rows")
ax.grid(True, alpha=0.3)
ax.legend(loc="center left")
fig.tight_layout()
plt.show()
