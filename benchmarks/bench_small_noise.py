"""Where the held-out gap at small noise comes from: fit, generalisation, optimiser.

``bench_adaptive.py`` measures the held-out gap of each training method to
the true model.  This benchmark splits that gap for the defaults, on the
same data (``make_nonlinear_ica``, relu, m = 2, n = 20, 5,000 training and
2,000 held-out rows, ``random_state=0``, one torch thread):

Part 1, decomposition, at sigma^2 in {1, 0.04}: for ``NonlinearICAMLE`` and
``NonlinearICAVAE`` with their defaults, the *training* gap (true model's
mean log-likelihood on the training rows minus the fitted model's) and the
*held-out* gap; their difference is the generalisation gap; and the held-out
gap by tercile of the norm of the rows' true latents (where in the latent
space the model is off).  Both decoders
are scored by ``NonlinearICAMLE.score`` (accurate at small noise through its
per-row adaptive switch), so the two estimators' decoders are compared on
the same footing, not through the VAE's own importance-sampled score.

Part 2, optimiser noise floor, at sigma^2 = 0.04: the default 64-unit
decoder set to represent the true generator exactly (20 of its hidden units
carry the generator's weights, the output layer selects them), then trained
by ``integration="adaptive"`` for 40 epochs without early stopping (so
nothing is kept from the start) at three Adam learning rates, with the
default parameter averaging (``ema_decay=0.998``) and, at the default rate,
without it.  A model that starts at the truth and drifts away measures what
the optimiser itself costs, not a failure to find the optimum.

Run: ``python benchmarks/bench_small_noise.py``.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from _common import markdown_table, mle_with_decoder, quiet_fit, write_results

from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica.datasets import make_nonlinear_ica

N_TRAIN, N_TEST = 5000, 2000
#: (learning_rate_init, ema_decay) of part 2: the default rate without and
#: with the default averaging, then smaller rates.
OPTIMISER_SETTINGS = ((3e-3, 0.0), (3e-3, 0.998), (1e-3, 0.998), (3e-4, 0.998))


def make_problem(noise_variance: float):
    """Training rows, held-out rows, their true latents, the true mixing."""
    X, Z, mixing = make_nonlinear_ica(
        N_TRAIN + N_TEST,
        2,
        20,
        noise_variance=noise_variance,
        random_state=0,
        return_mixing=True,
    )
    return X[:N_TRAIN], X[N_TRAIN:], Z[N_TRAIN:], mixing


def gaps(decoder, noise_variance, truth, train, test, test_latents=None) -> dict:
    scored = mle_with_decoder(decoder, noise_variance, train[:200])
    train_gap = truth.score(train) - scored.score(train)
    per_row = truth.score_samples(test) - scored.score_samples(test)
    result = {
        "train gap": train_gap,
        "held-out gap": float(per_row.mean()),
        "generalisation": float(per_row.mean()) - train_gap,
    }
    if test_latents is not None:
        radius = np.linalg.norm(test_latents, axis=1)
        tercile = np.searchsorted(np.quantile(radius, [1 / 3, 2 / 3]), radius)
        for k, name in enumerate(("inner", "middle", "outer")):
            result[f"held-out, {name} |z|"] = float(per_row[tercile == k].mean())
    return result


def decomposition_rows() -> list[dict]:
    rows = []
    for noise_variance in (1.0, 0.04):
        train, test, latents, mixing = make_problem(noise_variance)
        truth = mle_with_decoder(
            mixing.to_torch_module().requires_grad_(False), noise_variance, train[:200]
        )
        for estimator in (NonlinearICAMLE, NonlinearICAVAE):
            began = time.perf_counter()
            model = quiet_fit(estimator(random_state=0), train)
            seconds = time.perf_counter() - began
            rows.append(
                {
                    "noise_variance": noise_variance,
                    "estimator": estimator.__name__,
                    **gaps(
                        model.decoder_,
                        model.noise_variance_,
                        truth,
                        train,
                        test,
                        latents,
                    ),
                    "epochs": model.n_iter_,
                    "fit seconds": seconds,
                }
            )
            print(rows[-1], flush=True)
    return rows


def true_generator_in_default_decoder(mixing) -> torch.nn.Module:
    """The default (64,) relu decoder computing exactly ``relu(W z + b)``."""
    decoder = (
        NonlinearICAMLE()
        ._build_model(
            mixing.weights.shape[0],
            scale=1.0,
            dtype=torch.float64,
            device="cpu",
            generator=torch.Generator().manual_seed(0),
        )
        .decoder
    )
    first, last = decoder[0], decoder[2]
    n_features = mixing.weights.shape[0]
    with torch.no_grad():
        first.weight[:n_features] = torch.tensor(mixing.weights)
        first.bias[:n_features] = torch.tensor(mixing.bias)
        last.weight.zero_()
        last.weight[:, :n_features] = torch.eye(n_features)
        last.bias.zero_()
    return decoder


def noise_floor_rows() -> list[dict]:
    noise_variance = 0.04
    train, test, _, mixing = make_problem(noise_variance)
    truth = mle_with_decoder(
        mixing.to_torch_module().requires_grad_(False), noise_variance, train[:200]
    )
    rows = []
    for learning_rate, ema_decay in OPTIMISER_SETTINGS:
        model = quiet_fit(
            NonlinearICAMLE(
                integration="adaptive",
                early_stopping=False,
                max_iter=1,
                warm_start=True,
                random_state=0,
            ),
            train[:50],
        )
        model.decoder_ = true_generator_in_default_decoder(mixing)
        with torch.no_grad():
            model.noise_.raw.fill_(math.log(noise_variance - model.noise_.floor))
        model.noise_variance_ = noise_variance
        start = gaps(model.decoder_, noise_variance, truth, train, test)
        model.set_params(
            max_iter=40,
            tol=0.0,
            n_iter_no_change=40,
            learning_rate_init=learning_rate,
            ema_decay=ema_decay,
        )
        began = time.perf_counter()
        quiet_fit(model, train)
        rows.append(
            {
                "learning_rate_init": learning_rate,
                "ema_decay": ema_decay,
                "train gap at start": start["train gap"],
                **gaps(model.decoder_, model.noise_variance_, truth, train, test),
                "fitted sigma^2": model.noise_variance_,
                "fit seconds": time.perf_counter() - began,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    decomposition = decomposition_rows()
    floor = noise_floor_rows()
    load_after = os.getloadavg()
    markdown = (
        "## Gap decomposition (defaults; nats/sample against the true model)\n\n"
        + markdown_table(decomposition)
        + "\n\n## From the true generator inside the default decoder "
        + "(sigma^2 = 0.04, adaptive, 40 epochs, no early stopping)\n\n"
        + markdown_table(floor)
        + "\n\nLoad average (1, 5, 15 min), 2 shared cores: "
        + "{:.2f}, {:.2f}, {:.2f} before, ".format(*load_before)
        + "{:.2f}, {:.2f}, {:.2f} after.".format(*load_after)
    )
    write_results(
        "small_noise",
        {"decomposition": decomposition, "noise_floor": floor},
        markdown,
    )


if __name__ == "__main__":
    main()
