"""
=====================================================
VAE objectives and gradient estimators compared
=====================================================

:class:`sknlica.NonlinearICAVAE` can train on the ELBO (SGVB) or the
importance-weighted bound (IWAE), with the reparameterised or the
score-function (REINFORCE, with a baseline) gradient of the encoder, and
update encoder and decoder jointly or alternately. This example fits each
combination for a few epochs on small data from the report's generator and
compares, on held-out rows:

- ``score``: the importance-sampled ``log p(x)``, comparable across models
  and with the true model;
- ``elbo``: the bound itself; the gap ``score - elbo`` estimates
  ``KL(q(z | x) || p(z | x))``, how far the encoder is from the posterior.

With this few epochs nothing has converged: the point is the ordering. The
ELBO-trained encoders sit closest to the posterior (smallest gap), while
IWAE trains the better decoder (higher ``log p(x)``) with a looser ELBO.

Set ``SKNLICA_EXAMPLE_QUICK=1`` to run with smaller sizes (used by the
tests).
"""

# %%
# Fit every variant
# -----------------
import os
import warnings

import matplotlib.pyplot as plt
from sklearn.exceptions import ConvergenceWarning

from sknlica import NonlinearICAVAE, marginal_log_likelihood
from sknlica.datasets import make_nonlinear_ica

quick = os.environ.get("SKNLICA_EXAMPLE_QUICK") == "1"
n_train, n_test = (300, 100) if quick else (1500, 500)
max_iter = 2 if quick else 10
n_eval_samples = 256 if quick else 1024  # 1024: the default

X, _, mixing = make_nonlinear_ica(
    n_train + n_test, 2, 20, activation="relu", random_state=0, return_mixing=True
)
X_train, X_test = X[:n_train], X[n_train:]
true_score = marginal_log_likelihood(X_test, mixing, mixing.noise_variance).mean()

variants = {
    "ELBO, reparam.": {"objective": "elbo"},
    "IWAE (K=8), reparam.": {"objective": "iwae"},
    "ELBO, score function": {
        "objective": "elbo",
        "gradient_estimator": "score_function",
        "n_mc_samples": 8,
    },
    "IWAE (K=8), VIMCO": {"objective": "iwae", "gradient_estimator": "score_function"},
    "ELBO, alternating": {"objective": "elbo", "training": "alternating"},
}
models = {}
for name, params in variants.items():
    vae = NonlinearICAVAE(
        max_iter=max_iter,
        early_stopping=False,
        n_eval_samples=n_eval_samples,
        random_state=0,
        **params,
    )
    with warnings.catch_warnings():
        # A few epochs on purpose: no convergence expected.
        warnings.simplefilter("ignore", ConvergenceWarning)
        models[name] = vae.fit(X_train)

print(f"true model: log p(x) = {true_score:.3f} nats/sample (held out)")
print(f"{'variant':<22} {'log p(x)':>9} {'ELBO':>9} {'gap':>6} {'seconds':>8}")
results = {}
for name, vae in models.items():
    score, elbo = vae.score(X_test), vae.elbo(X_test).mean()
    results[name] = (score, elbo)
    seconds = vae.history_[-1]["seconds"]
    print(f"{name:<22} {score:9.3f} {elbo:9.3f} {score - elbo:6.3f} {seconds:8.1f}")

# %%
# Held-out scores and training curves
# -----------------------------------
# Left: held-out log-likelihood (circle) and ELBO (square) of each variant,
# joined by the gap; the dotted line is the true model. Right: the training
# log-likelihood per epoch (estimated on up to 500 training rows).
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
names = list(results)
for position, name in enumerate(names):
    score, elbo = results[name]
    left.plot([elbo, score], [position, position], color="grey", lw=1)
left.plot([results[n][0] for n in names], range(len(names)), "o", label="log p(x)")
left.plot([results[n][1] for n in names], range(len(names)), "s", label="ELBO")
left.axvline(true_score, color="black", ls=":", label="true model")
left.set_yticks(range(len(names)), labels=names)
left.set_ylim(len(names) - 0.5, -0.5)  # first variant on top
left.set_xlabel("held-out nats per sample")
left.set_ylabel("objective, gradient estimator")
left.grid(True, axis="x", alpha=0.3)
left.legend(loc="lower left")
for name, vae in models.items():
    epochs = [h["epoch"] for h in vae.history_]
    right.plot(epochs, [h["train_log_likelihood"] for h in vae.history_], label=name)
right.axhline(true_score, color="black", ls=":", label="true model")
right.set_xlabel("epoch")
right.set_ylabel("training log-likelihood (nats per sample)")
right.grid(True, alpha=0.3)
right.legend(fontsize="small")
plt.show()
