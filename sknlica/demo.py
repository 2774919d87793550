"""A short tour of sknlica: ``python -m sknlica.demo`` (``make demo``).

In under a minute on two cores (31 s measured, load 1.1):

1. both estimators on the report's setting (``make_nonlinear_ica``: m = 2
   Gaussian latents, n = 20 features, relu, noise variance 1; 5,000 training
   and 2,000 held-out rows), with their held-out log-likelihood against the
   true model's (the gap, in nats per row) and their recovery of the latents;
2. one real data set (scikit-learn's breast cancer data, standardised),
   ``NonlinearICAMLE(noise="diagonal")`` (which starts at factor analysis's
   solution and leaves it as far as held-out rows say it should) against
   probabilistic PCA and factor analysis by held-out log-likelihood;
3. figures (learning curves, reconstructions) written to ``--output``.

The report's full study stays one command away: ``python -m
sknlica.experiments`` (``--quick`` for a reduced version).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from sklearn.datasets import load_breast_cancer
from sklearn.decomposition import PCA, FactorAnalysis
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from sknlica import NonlinearICAMLE, NonlinearICAVAE, marginal_log_likelihood
from sknlica.datasets import make_nonlinear_ica
from sknlica.metrics import procrustes_disparity

#: Rows of the report's setting; ``small`` sizes are for the test suite.
SIZES = {"full": (5000, 2000, 200), "small": (300, 200, 3)}


def _fit(model, X):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
    return time.perf_counter() - start


def report_setting(n_train, n_test, max_iter, progress):
    X, Z, mixing = make_nonlinear_ica(
        n_train + n_test, 2, 20, random_state=0, return_mixing=True
    )
    train, test, Z_test = X[:n_train], X[n_train:], Z[n_train:]
    true = marginal_log_likelihood(test, mixing, mixing.noise_variance).mean()
    lines = [
        "1. The report's setting (m = 2, n = 20, relu, sigma^2 = 1): held-out "
        f"log-likelihood of the true model {true:.3f} nats per row.",
    ]
    fitted = {}
    for name, cls in (
        ("NonlinearICAMLE", NonlinearICAMLE),
        ("NonlinearICAVAE", NonlinearICAVAE),
    ):
        progress.set_description(f"fitting {name}")
        model = cls(random_state=0, max_iter=max_iter)
        seconds = _fit(model, train)
        score = model.score(test)
        disparity = procrustes_disparity(Z_test, model.transform(test))
        lines.append(
            f"   {name}: held-out {score:.3f}, gap to the true model "
            f"{true - score:.3f} nats per row, sigma^2 {model.noise_variance_:.3f}, "
            f"latent Procrustes disparity {disparity:.3f}, {model.n_iter_} epochs "
            f"in {seconds:.1f} s."
        )
        fitted[name] = (model, test, true)
        progress.update()
    return lines, fitted


def real_data(max_iter, progress, small) -> list[str]:
    X = load_breast_cancer().data
    if small:
        X = X[:200]
    train, test = train_test_split(X, test_size=0.2, random_state=0)
    scaler = StandardScaler().fit(train)
    train, test = scaler.transform(train), scaler.transform(test)
    progress.set_description("fitting on breast_cancer")
    mle = NonlinearICAMLE(noise="diagonal", random_state=0, max_iter=max_iter)
    seconds = _fit(mle, train)
    scores = {
        "probabilistic PCA": PCA(2).fit(train).score(test),
        "factor analysis": FactorAnalysis(2, random_state=0).fit(train).score(test),
        "NonlinearICAMLE(noise='diagonal')": mle.score(test),
    }
    progress.update()
    lines = [
        "2. Real data: scikit-learn's breast cancer data (30 features, "
        f"{len(train)} training rows, standardised), m = 2, held-out "
        "log-likelihood per row:"
    ]
    lines += [f"   {name}: {score:.2f}" for name, score in scores.items()]
    lines.append(
        f"   (the nonlinear fit: max_iter={max_iter}, {mle.n_iter_} epochs in "
        f"{seconds:.1f} s; benchmarks/bench_real_data.py compares every data set "
        "and model.)"
    )
    return lines


def figures(fitted, output: Path, progress) -> list[str]:
    try:
        from sknlica import plotting

        plt = plotting._pyplot()
    except ImportError:
        return [
            "3. Figures skipped: matplotlib is not installed (pip install matplotlib)."
        ]
    progress.set_description("drawing")
    output.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(10, 8), layout="constrained")
    for (name, (model, test, true)), row in zip(fitted.items(), axes, strict=True):
        # The true model's held-out log-likelihood as the reference line.
        plotting.plot_learning_curve(model, reference=true, ax=row[0])
        row[0].set_title(f"{name}: learning curve")
        reconstruction = model.inverse_transform(model.transform(test))
        plotting.plot_reconstruction(test, reconstruction, ax=row[1])
        row[1].set_title(f"{name}: reconstruction")
    path = output / "demo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    progress.update()
    return [f"3. Figures written to {path}."]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("sknlica_results"))
    parser.add_argument(
        "--small", action="store_true", help="tiny sizes (seconds), for tests"
    )
    args = parser.parse_args(argv)
    n_train, n_test, max_iter = SIZES["small" if args.small else "full"]
    start = time.perf_counter()
    with tqdm(total=4, desc="sknlica demo") as progress:
        lines, fitted = report_setting(n_train, n_test, max_iter, progress)
        lines += real_data(max_iter, progress, args.small)
        lines += figures(fitted, args.output, progress)
    lines.append(
        f"Done in {time.perf_counter() - start:.0f} s.  The report's full study: "
        "python -m sknlica.experiments (--quick for a reduced version)."
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
