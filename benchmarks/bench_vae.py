"""NonlinearICAVAE quality and speed on the report's generator.

On ``make_nonlinear_ica(m=2, n=20, sigma^2=1)`` with 5,000 training and
2,000 held-out rows, for every activation and for the variants (ELBO vs
IWAE, joint vs alternating, reparameterised vs score-function gradients,
amortised variance head vs one global sigma^2), record:

* ``gap_to_truth``: the true model's held-out log-likelihood (quadrature,
  ``sknlica.marginal_log_likelihood``) minus the fitted ``score`` (the
  importance-sampling estimate), nats per sample; target <= 0.1;
* ``is_error``: quadrature of the *fitted* model minus its importance-sampling
  ``score`` (global sigma^2 only): the honesty of ``score_samples``;
* ``elbo_gap``: ``score - mean(elbo)``, the held-out KL(q || p(z | x));
* ``noise_variance``: the fitted ``noise_variance_`` (true value 1);
* ``fit_seconds`` and the epochs run / kept;
* ``best_elbo_epoch`` vs ``best_ll_epoch``: where the validation ELBO and
  log-likelihood peak (they move apart when the bound misleads);
* for the gradient estimators, the variance of the encoder gradient over
  repeated draws on one fixed minibatch of the fitted default model.

The gradient estimators are rebuilt from the numeric layer as the
estimator's ``fit`` builds them (``_common.vae_objective``: the
``VAEObjective`` of the fitted model's parameters with the estimator's
settings changed), and evaluated on a copy of the fitted ``encoder_``,
``decoder_`` and ``noise_`` (a ``VAEModel``), each with the same seeded
draws.

Usage::

    python benchmarks/bench_vae.py                # everything (a few minutes)
    python benchmarks/bench_vae.py --quick        # smoke test, seconds
    python benchmarks/bench_vae.py --output DIR   # results elsewhere

``--quick``: relu, one seed, three variants, 400 training and 200 held-out
rows, 3 epochs, 5 gradient replicates (its numbers are not results).  Writes
``DIR/vae.json`` and ``vae.md`` (``vae_quick.*`` with ``--quick``; ``DIR``
defaults to ``benchmarks/results``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from _common import (
    base_parser,
    estimator_defaults,
    markdown_table,
    timed_fit,
    vae_objective,
    write_results,
)

from sknlica import NonlinearICAVAE, marginal_log_likelihood
from sknlica._torch.elbo import score_function_elbo
from sknlica._torch.gaussian import (
    diagonal_normal_log_density,
    gaussian_log_density,
    kl_to_standard_normal,
    reparameterize,
    standard_normal_draws,
)
from sknlica._torch.models import VAEModel
from sknlica.datasets import make_nonlinear_ica

ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu", "gelu")


@dataclass(frozen=True)
class Sizes:
    n_train: int = 5000
    n_test: int = 2000
    #: Nodes of the quadratures (``marginal_log_likelihood``).
    truth_nodes: int = 2**16
    #: Gradient estimates per estimator on the fixed minibatch.
    n_replicates: int = 300
    #: Parameters every fit gets on top of its own (``--quick``: few epochs).
    fit_params: tuple = ()


FULL = Sizes()
QUICK = Sizes(
    n_train=400,
    n_test=200,
    truth_nodes=4096,
    n_replicates=5,
    fit_params=(("max_iter", 3),),
)
#: The issue's targets for the default estimator.
TARGET_GAP, TARGET_NOISE_REL, TARGET_SECONDS = 0.1, 0.05, 20.0

VARIANTS = {
    "default (iwae K=8, joint, reparam)": {},
    "elbo": {"objective": "elbo"},
    "elbo, 8 draws": {"objective": "elbo", "n_mc_samples": 8},
    "iwae K=16": {"n_importance_samples": 16},
    "alternating (Alg. 1.1)": {"training": "alternating"},
    "elbo, alternating": {"objective": "elbo", "training": "alternating"},
    "score function (VIMCO)": {"gradient_estimator": "score_function"},
    "elbo, score function (baseline g(mu))": {
        "objective": "elbo",
        "gradient_estimator": "score_function",
    },
    "elbo, score function (leave-one-out, 4 draws)": {
        "objective": "elbo",
        "gradient_estimator": "score_function",
        "n_mc_samples": 4,
    },
    "amortized variance head": {"amortized_variance": True},
    "elbo, amortized variance head": {"objective": "elbo", "amortized_variance": True},
}
QUICK_VARIANTS = (
    "default (iwae K=8, joint, reparam)",
    "elbo",
    "score function (VIMCO)",
)

#: Gradient-variance estimators, measured on the same fitted model and
#: minibatch so that only the estimator differs.  ``None`` is the plain
#: log-derivative estimator of notes 002/003 without any baseline.
GRADIENT_ESTIMATORS = {
    "elbo, reparameterization, 1 draw": {"objective": "elbo"},
    "elbo, score function, no baseline, 1 draw": None,
    "elbo, score function, baseline g(mu), 1 draw": {
        "objective": "elbo",
        "gradient_estimator": "score_function",
    },
    "elbo, reparameterization, 4 draws": {"objective": "elbo", "n_mc_samples": 4},
    "elbo, score function, leave-one-out, 4 draws": {
        "objective": "elbo",
        "gradient_estimator": "score_function",
        "n_mc_samples": 4,
    },
    "iwae K=8, reparameterization": {},
    "iwae K=8, score function (VIMCO)": {"gradient_estimator": "score_function"},
}


def make_data(activation: str, seed: int, sizes: Sizes = FULL):
    X, _, mixing = make_nonlinear_ica(
        sizes.n_train + sizes.n_test,
        2,
        20,
        activation=activation,
        noise_variance=1.0,
        random_state=seed,
        return_mixing=True,
    )
    X_train, X_test = X[: sizes.n_train], X[sizes.n_train :]
    true_ll = marginal_log_likelihood(
        X_test, mixing, mixing.noise_variance, n_nodes=sizes.truth_nodes
    )
    return X_train, X_test, float(true_ll.mean())


def run(params: dict, activation: str, seed: int, data, sizes: Sizes = FULL):
    """One fit and its scores; returns the row and the fitted estimator."""
    X_train, X_test, true_ll = data
    model = NonlinearICAVAE(random_state=0, **dict(sizes.fit_params), **params)
    seconds = timed_fit(model, X_train)
    score = model.score(X_test)
    bound = float(np.mean(model.elbo(X_test)))
    row = {
        "activation": activation,
        "data_seed": seed,
        "params": params,
        "true_ll": true_ll,
        "score": score,
        "gap_to_truth": true_ll - score,
        "elbo": bound,
        "elbo_gap": score - bound,
        "noise_variance": model.noise_variance_,
        "fit_seconds": seconds,
        "n_iter": model.n_iter_,
        "best_epoch": model.best_epoch_,
        "best_elbo_epoch": _argmax_epoch(model, "validation_elbo"),
        "best_ll_epoch": _argmax_epoch(model, "validation_log_likelihood"),
    }
    row["meets_targets"] = (
        row["gap_to_truth"] < TARGET_GAP
        and abs(row["noise_variance"] - 1) < TARGET_NOISE_REL
        and seconds <= TARGET_SECONDS
    )
    if not model.amortized_variance:
        quadrature = marginal_log_likelihood(
            X_test, model.decoder_, model.noise_variance_, n_nodes=sizes.truth_nodes
        ).mean()
        row["is_error"] = float(quadrature - score)
    return row, model


def _argmax_epoch(model, key: str) -> int:
    values = [h[key] for h in model.history_]
    return int(np.argmax(values)) + 1


def gradient_variance(fitted: NonlinearICAVAE, X, n_replicates: int = 300) -> list:
    """Encoder-gradient variance of each estimator at the fitted default model."""
    batch = torch.tensor(X[:128])
    rows = []
    for label, params in GRADIENT_ESTIMATORS.items():
        # The same draws for every estimator: a fresh generator seeded 0.
        generator = torch.Generator().manual_seed(0)
        if params is None:
            loss = _score_function_without_baseline(generator)
        else:
            settings = estimator_defaults(
                NonlinearICAVAE, **{**fitted.get_params(), **params}
            )
            objective = vae_objective(settings, batch.shape[1], generator)

            def loss(model, batch, objective=objective):
                return objective.loss(model, batch, None)

        grads = _encoder_gradients(loss, fitted, batch, n_replicates)
        total_variance = float(grads.var(0).sum())
        squared_norm = float(grads.mean(0).square().sum())
        rows.append(
            {
                "estimator": label,
                "total_variance": total_variance,
                "squared_norm_of_mean": squared_norm,
                "snr": squared_norm / max(total_variance, 1e-300),
            }
        )
    reference = rows[0]["total_variance"]
    for row in rows:
        row["variance_vs_reparameterized"] = row["total_variance"] / reference
    return rows


def _encoder_gradients(loss, fitted, batch, n_replicates):
    # A private copy of the fitted modules, so the fitted model is untouched.
    model = copy.deepcopy(VAEModel(fitted.encoder_, fitted.decoder_, fitted.noise_))
    out = []
    for _ in range(n_replicates):
        model.zero_grad(set_to_none=True)
        loss(model, batch).backward()
        out.append(torch.cat([p.grad.flatten() for p in model.encoder.parameters()]))
    return torch.stack(out)


def _score_function_without_baseline(generator):
    """The plain log-derivative ELBO estimator, one draw, no baseline."""

    def loss(model, batch):
        mean, log_var = model.encode(batch)
        eps = standard_normal_draws(
            (1, *mean.shape), generator=generator, dtype=mean.dtype
        )
        z = reparameterize(mean, log_var, eps).detach()
        log_lik = gaussian_log_density(batch, *model.decode(z))
        log_q = diagonal_normal_log_density(z, mean, log_var)
        kl = kl_to_standard_normal(mean, log_var)
        zero = torch.zeros_like(log_lik)
        return -score_function_elbo(log_lik, log_q, kl, zero).mean()

    return loss


COLUMNS = [
    "seed",
    "gap",
    "IS error",
    "ELBO gap",
    "sigma^2",
    "fit s",
    "epochs (best)",
    "best ELBO / LL epoch",
    "meets targets",
]


def markdown(results: dict, sizes: Sizes) -> str:
    lines = [
        "# NonlinearICAVAE quality and speed",
        "",
        f"`make_nonlinear_ica`, m=2, n=20, sigma^2=1, {sizes.n_train} train / "
        f"{sizes.n_test} held-out rows, {torch.get_num_threads()} threads. "
        "gap = true model's "
        "held-out log-likelihood minus the fitted `score` (nats/sample); IS error = "
        "the fitted model's quadrature log-likelihood minus its importance-sampling "
        "`score`; ELBO gap = `score - mean(elbo)`. Targets: gap < "
        f"{TARGET_GAP}, |sigma^2 - 1| < {TARGET_NOISE_REL}, fit <= "
        f"{TARGET_SECONDS:g} s.",
        "",
        "## Default estimator, every activation",
        "",
        markdown_table(
            [_display(row, row["activation"]) for row in results["activations"]],
            ["activation", *COLUMNS],
        ),
        "",
        "## objective='elbo', every activation (data seed 0)",
        "",
        markdown_table(
            [_display(row, row["activation"]) for row in results["elbo_activations"]],
            ["activation", *COLUMNS],
        ),
        "",
        "## Variants (relu, data seed 0)",
        "",
        markdown_table(
            [_display(row, row["variant"]) for row in results["variants"]],
            ["variant", *COLUMNS],
        ),
    ]
    if results.get("gradient_variance"):
        lines += [
            "",
            "## Encoder-gradient variance (fitted default model, one minibatch)",
            "",
            f"{sizes.n_replicates} gradient estimates on the same 128 rows; "
            "total variance = sum of "
            "per-coordinate variances over the encoder's parameters; SNR = squared "
            "norm of the mean gradient / total variance.",
            "",
            markdown_table(results["gradient_variance"]),
        ]
    return "\n".join(lines)


def _display(row: dict, name: str) -> dict:
    return {
        "activation": name,
        "variant": name,
        "seed": row["data_seed"],
        "gap": row["gap_to_truth"],
        "IS error": row.get("is_error", ""),
        "ELBO gap": row["elbo_gap"],
        "sigma^2": row["noise_variance"],
        "fit s": row["fit_seconds"],
        "epochs (best)": f"{row['n_iter']} ({row['best_epoch']})",
        "best ELBO / LL epoch": f"{row['best_elbo_epoch']} / {row['best_ll_epoch']}",
        "meets targets": row["meets_targets"],
    }


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="data seeds"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    seeds = args.seeds[:1] if args.quick else args.seeds
    activations = ("relu",) if args.quick else ACTIVATIONS
    variants = QUICK_VARIANTS if args.quick else tuple(VARIANTS)
    results = {"activations": [], "elbo_activations": [], "variants": []}
    default_fit = None
    for activation in activations:
        for seed in seeds:
            data = make_data(activation, seed, sizes)
            row, model = run({}, activation, seed, data, sizes)
            results["activations"].append(row)
            if activation == "relu" and seed == seeds[0]:
                default_fit = (row, model)
            _report(activation, row)
    # The ELBO objective on every activation, against the IWAE default.
    for activation in activations:
        data = make_data(activation, seeds[0], sizes)
        row, _ = run({"objective": "elbo"}, activation, seeds[0], data, sizes)
        results["elbo_activations"].append(row)
        _report(f"{activation}, elbo", row)
    relu = make_data("relu", seeds[0], sizes)
    for name in variants:
        if not VARIANTS[name] and default_fit is not None:
            row = dict(default_fit[0])
        else:
            row, _ = run(VARIANTS[name], "relu", seeds[0], relu, sizes)
        row["variant"] = name
        results["variants"].append(row)
        _report(name, row)
    results["gradient_variance"] = gradient_variance(
        default_fit[1], relu[0], sizes.n_replicates
    )
    write_results(
        "vae",
        results,
        markdown(results, sizes),
        output=args.output,
        quick=args.quick,
    )


def _report(name, row):
    print(
        f"{name:45s} gap {row['gap_to_truth']:.3f}  elbo gap {row['elbo_gap']:.3f}  "
        f"s2 {row['noise_variance']:.3f}  {row['fit_seconds']:.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
