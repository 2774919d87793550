"""
==========================================
Quick start: fit the MLE and the VAE
==========================================

Draw data from the report's generator (m = 2 Gaussian latents, n = 20
features, ReLU, noise variance 1), fit :class:`sknlica.NonlinearICAMLE` and
:class:`sknlica.NonlinearICAVAE`, and compare their held-out log-likelihood
with that of the true model, computed by
:func:`sknlica.marginal_log_likelihood`. The two ``score`` values are in the
same unit (nats per sample) and directly comparable: the VAE's is an
importance-sampling estimate of ``log p(x)``, not its ELBO.

Set ``SKNLICA_EXAMPLE_QUICK=1`` to run with smaller sizes (used by the
tests).
"""

# %%
# Data and models
# ---------------
import os

import matplotlib.pyplot as plt

from sknlica import NonlinearICAMLE, NonlinearICAVAE, marginal_log_likelihood
from sknlica.datasets import make_nonlinear_ica
from sknlica.metrics import procrustes_disparity
from sknlica.plotting import plot_learning_curve, plot_reconstruction

quick = os.environ.get("SKNLICA_EXAMPLE_QUICK") == "1"
n_train, n_test = (400, 200) if quick else (2000, 1000)
max_iter = 3 if quick else 15
# Quick runs also evaluate with fewer nodes / draws than the defaults.
mle_quick = {"n_nodes": 256, "n_eval_nodes": 2048} if quick else {}
vae_quick = {"n_eval_samples": 256} if quick else {}

X, Z, mixing = make_nonlinear_ica(
    n_train + n_test, 2, 20, activation="relu", random_state=0, return_mixing=True
)
X_train, X_test, Z_test = X[:n_train], X[n_train:], Z[n_train:]

mle = NonlinearICAMLE(n_components=2, max_iter=max_iter, random_state=0, **mle_quick)
vae = NonlinearICAVAE(n_components=2, max_iter=max_iter, random_state=0, **vae_quick)
mle.fit(X_train)
vae.fit(X_train)

# %%
# Held-out log-likelihood and recovery of the latents
# ----------------------------------------------------
# The true model's log-likelihood is an upper reference: a fitted model may
# exceed it only by chance on a finite test set.
true_score = marginal_log_likelihood(X_test, mixing, mixing.noise_variance).mean()
print(f"true model        log p(x) = {true_score:8.3f} nats/sample")
for name, model in [("NonlinearICAMLE", mle), ("NonlinearICAVAE", vae)]:
    disparity = procrustes_disparity(Z_test, model.transform(X_test))
    print(
        f"{name:<17} log p(x) = {model.score(X_test):8.3f}, "
        f"sigma^2 = {model.noise_variance_:.3f}, "
        f"Procrustes disparity = {disparity:.3f}"
    )

# %%
# Reconstruction and learning curves
# -----------------------------------
# Top: test data (blue) against the decoder at the posterior mean (red), on
# the first two principal components of the data (report, Figures 2 and 4).
# Bottom: per-epoch log-likelihood, and for the VAE the ELBO below it
# (Figures 3 and 5); the dotted line is the true model's score on the test
# set, the grey one the epoch kept by early stopping.
fig, axes = plt.subplots(2, 2, figsize=(10, 8), layout="constrained")
for column, (name, model) in enumerate([("MLE", mle), ("VAE", vae)]):
    plot_reconstruction(X_test, model, ax=axes[0, column])
    axes[0, column].set_title(f"{name}: observed and reconstructed")
    plot_learning_curve(model, reference=true_score, ax=axes[1, column])
    axes[1, column].set_title(f"{name}: learning curve")
plt.show()
