"""Where the held-out gap at small noise comes from: fit, generalisation, optimiser.

``bench_adaptive.py`` measures the held-out gap of each training method to
the true model.  This benchmark splits that gap for the defaults, on the
same data (``make_nonlinear_ica``, relu, m = 2, n = 20, 5,000 training and
2,000 held-out rows, ``random_state=0``, one torch thread unless
``--threads`` says otherwise):

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
the optimiser itself costs, not a failure to find the optimum.  The decoder
is built as the estimator builds its default one (``make_mlp`` of the
numeric layer with ``NonlinearICAMLE``'s decoder parameters,
``_common.default_decoder``), and the fit starts from it by ``warm_start``:
a one-epoch fit on 50 rows, whose fitted ``decoder_`` and ``noise_`` are
then replaced by the true generator and a ``NoiseVariance`` at the true
sigma^2 (the public fitted attributes a warm start continues from).

Run: ``python benchmarks/bench_small_noise.py [--quick] [--output DIR]``
(``--quick``: 200 training and 100 held-out rows, 2 epochs per fit, two
optimiser settings: seconds; its numbers are not results).  Writes
``DIR/small_noise.json`` and ``.md`` (``small_noise_quick.*`` with
``--quick``; ``DIR`` defaults to ``benchmarks/results``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from _common import (
    base_parser,
    default_decoder,
    markdown_table,
    mle_log_likelihood,
    quiet_fit,
    write_results,
)

from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica._torch.networks import NoiseVariance
from sknlica.datasets import make_nonlinear_ica

#: (learning_rate_init, ema_decay) of part 2: the default rate without and
#: with the default averaging, then smaller rates.
OPTIMISER_SETTINGS = ((3e-3, 0.0), (3e-3, 0.998), (1e-3, 0.998), (3e-4, 0.998))


@dataclass(frozen=True)
class Sizes:
    n_train: int = 5000
    n_test: int = 2000
    #: Epochs of part 2's fits from the true generator.
    floor_epochs: int = 40
    #: How many of :data:`OPTIMISER_SETTINGS` part 2 runs.
    n_settings: int = len(OPTIMISER_SETTINGS)
    #: Parameters part 1's fits get on top of the defaults.
    fit_params: tuple = ()


FULL = Sizes()
QUICK = Sizes(
    n_train=200, n_test=100, floor_epochs=2, n_settings=2, fit_params=(("max_iter", 2),)
)


def make_problem(noise_variance: float, sizes: Sizes):
    """Training rows, held-out rows, their true latents, the true mixing."""
    X, Z, mixing = make_nonlinear_ica(
        sizes.n_train + sizes.n_test,
        2,
        20,
        noise_variance=noise_variance,
        random_state=0,
        return_mixing=True,
    )
    n_train = sizes.n_train
    return X[:n_train], X[n_train:], Z[n_train:], mixing


class Truth:
    """The true model's per-row log-likelihood of the training and held-out rows."""

    def __init__(self, mixing, noise_variance, train, test) -> None:
        decoder = mixing.to_torch_module().requires_grad_(False)
        self.train = mle_log_likelihood(train, decoder, noise_variance, n_components=2)
        self.test = mle_log_likelihood(test, decoder, noise_variance, n_components=2)


def gaps(decoder, noise_variance, truth, train, test, test_latents=None) -> dict:
    def log_likelihood(X):
        return mle_log_likelihood(X, decoder, noise_variance, n_components=2)

    train_gap = float(truth.train.mean() - log_likelihood(train).mean())
    per_row = truth.test - log_likelihood(test)
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


def decomposition_rows(sizes: Sizes = FULL) -> list[dict]:
    rows = []
    for noise_variance in (1.0, 0.04):
        train, test, latents, mixing = make_problem(noise_variance, sizes)
        truth = Truth(mixing, noise_variance, train, test)
        for estimator in (NonlinearICAMLE, NonlinearICAVAE):
            began = time.perf_counter()
            model = estimator(random_state=0, **dict(sizes.fit_params))
            model = quiet_fit(model, train)
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
    n_features = mixing.weights.shape[0]
    decoder = default_decoder(
        NonlinearICAMLE, n_features, generator=torch.Generator().manual_seed(0)
    )
    first, last = decoder[0], decoder[2]
    with torch.no_grad():
        first.weight[:n_features] = torch.tensor(mixing.weights)
        first.bias[:n_features] = torch.tensor(mixing.bias)
        last.weight.zero_()
        last.weight[:, :n_features] = torch.eye(n_features)
        last.bias.zero_()
    return decoder


def noise_floor_rows(sizes: Sizes = FULL) -> list[dict]:
    noise_variance = 0.04
    train, test, _, mixing = make_problem(noise_variance, sizes)
    truth = Truth(mixing, noise_variance, train, test)
    rows = []
    for learning_rate, ema_decay in OPTIMISER_SETTINGS[: sizes.n_settings]:
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
        # Where the warm start continues from: the true generator and sigma^2,
        # with the floor of the fitted noise.
        model.decoder_ = true_generator_in_default_decoder(mixing)
        model.noise_ = NoiseVariance(
            noise_variance, learn=True, floor=model.noise_.floor
        )
        model.noise_variance_ = float(model.noise_().detach())
        start = gaps(model.decoder_, noise_variance, truth, train, test)
        model.set_params(
            max_iter=sizes.floor_epochs,
            tol=0.0,
            n_iter_no_change=sizes.floor_epochs,
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
    args = base_parser(__doc__, threads=1).parse_args()
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    load_before = os.getloadavg()
    decomposition = decomposition_rows(sizes)
    floor = noise_floor_rows(sizes)
    load_after = os.getloadavg()
    markdown = (
        "## Gap decomposition (defaults; nats/sample against the true model)\n\n"
        + markdown_table(decomposition)
        + "\n\n## From the true generator inside the default decoder "
        + f"(sigma^2 = 0.04, adaptive, {sizes.floor_epochs} epochs, no early "
        + "stopping)\n\n"
        + markdown_table(floor)
        + f"\n\n{args.threads} torch thread(s). Load average (1, 5, 15 min), "
        + "2 shared cores: "
        + "{:.2f}, {:.2f}, {:.2f} before, ".format(*load_before)
        + "{:.2f}, {:.2f}, {:.2f} after.".format(*load_after)
    )
    write_results(
        "small_noise",
        {"decomposition": decomposition, "noise_floor": floor},
        markdown,
        output=args.output,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
