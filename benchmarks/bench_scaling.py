"""How NonlinearICAMLE's cost and quality scale with n, m and N.

On the report's generator (relu, sigma^2 = 1; training rows drawn from the
same mixing as the held-out rows, with independent latents), the default
estimator (``integration="auto"``: the grid for m <= 2, QMC for m >= 3;
1,024 training nodes, batch 128, float64, 2 CPU threads) with
``early_stopping=False`` and a fixed epoch budget, along three axes:

- n in {20, 100, 1,000, 5,000} at m=2, N=5,000;
- m in {1, 2, 3, 5, 10} at n=20, N=5,000;
- N in {1e3, 1e4, 1e5, 1e6} at m=2, n=20 (fewer epochs for 1e5 and 1e6),
  plus, at N=1e6, the default ``early_stopping=True`` and float32 input.

Recorded per configuration, each in a fresh subprocess: time per epoch (median
of the per-epoch differences of ``history_[i]["seconds"]`` after the first),
peak memory of the fit (the peak RSS after the fit minus the peak RSS taken
after the data were created and a tiny warm-up fit, with the high-water mark
reset there so earlier peaks cannot hide the fit's; ``VmHWM`` from ``/proc``,
the figure ``ru_maxrss`` reports, see ``_common.peak_rss_mib``), the data
size (a fit that copied its input would add about that much), the held-out
log-likelihood (``score``) and, for m <= 3 and n <= 100, its gap to the true
model's ``sknlica.marginal_log_likelihood(X_test, mixing, 1.0)`` (65,536
nodes) with that quadrature's own accuracy check (its change from 16,384
nodes).  The target is memory that grows with batch x nodes (and nodes x n),
not with N.

Benchmarks measure and report; nothing here asserts.

Run: ``python benchmarks/bench_scaling.py [--quick] [--output DIR]
[--threads T] [--wait-quiet SECONDS]`` (``--quick``: one subprocess, m=3,
1,000 float32 rows, ``early_stopping=True``, 2 epochs, 100 held-out rows,
4,096 and 1,024 truth nodes: seconds, its numbers are not results).  Writes
``DIR/scaling.json`` and ``.md`` (``scaling_quick.*`` with ``--quick``;
``DIR`` defaults to ``benchmarks/results``).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
from _common import (
    PeakMemory,
    QuietWaiter,
    benchmark_parser,
    child_result,
    epoch_seconds,
    markdown_table,
    median_after_first,
    run_child,
    set_threads,
    thread_params,
    timed_fit,
    write_results,
)

from sknlica import NonlinearICAMLE, marginal_log_likelihood
from sknlica._torch.integration import auto_rule
from sknlica.datasets import make_nonlinear_ica

BATCH, N_NODES, SEED = 128, 1024, 0
N_TEST = 1000
#: Fewer held-out rows where scoring them dominates the run: at n=5,000 every
#: row takes the adaptive evaluation (2,048 nodes x a 5,000-wide decoder).
TEST_ROWS_BY_FEATURES = {5000: 200}
#: Epochs per fit: a fixed budget at N <= 1e4, one or two passes beyond.
EPOCHS = 10
EPOCHS_BY_ROWS = {100_000: 3, 1_000_000: 2}
#: The true model's log-likelihood is computed where quadrature is
#: affordable and meaningful (m <= 3, n <= 100); its accuracy is checked
#: against a quarter of the nodes.  At n >= 1,000 the posterior (width about
#: 1 / sqrt(3 n) on this generator) is narrower than the grid's spacing, the
#: check moves by tenths to whole nats, and the two quadratures took minutes.
TRUTH_MAX_COMPONENTS = 3
TRUTH_MAX_FEATURES = 100
TRUTH_NODES, TRUTH_CHECK_NODES = 2**16, 2**14
#: ``gap_reliable`` when the truth moved less than this from 16,384 nodes.
TRUTH_TOLERANCE = 0.05
GENERATION_CHUNK = 100_000


#: ``--quick``: epochs, held-out rows and the truth's nodes of every fit.
QUICK_EPOCHS, QUICK_TEST_ROWS, QUICK_TRUTH_NODES = 2, 100, (2**12, 2**10)


def axes(quick: bool) -> list[dict]:
    if quick:
        # Every code path of the child once, in one subprocess: QMC training
        # (m=3), float32 input, early stopping, the truth and its check.
        return [
            {
                "axis": "m",
                "n": 20,
                "m": 3,
                "N": 1000,
                "dtype": "float32",
                "early_stopping": True,
            }
        ]
    configs = [{"axis": "n", "n": n, "m": 2, "N": 5000} for n in (20, 100, 1000, 5000)]
    configs += [{"axis": "m", "n": 20, "m": m, "N": 5000} for m in (1, 2, 3, 5, 10)]
    configs += [
        {"axis": "N", "n": 20, "m": 2, "N": N}
        for N in (1000, 10_000, 100_000, 1_000_000)
    ]
    configs += [
        {"axis": "N", "n": 20, "m": 2, "N": 1_000_000, "early_stopping": True},
        {"axis": "N", "n": 20, "m": 2, "N": 1_000_000, "dtype": "float32"},
    ]
    return configs


def make_data(n_rows: int, n_components: int, n_features: int, dtype, n_test=N_TEST):
    """Held-out rows and the mixing, then training rows in chunks.

    ``make_nonlinear_ica`` draws W and b first, so the held-out call fixes the
    true model; training rows reuse that mixing with latents and noise from an
    independent stream, written chunk by chunk into one array so that the
    process's peak memory is the data itself, not the generator's temporaries.
    """
    X_test, _, mixing = make_nonlinear_ica(
        n_test, n_components, n_features, random_state=SEED, return_mixing=True
    )
    rng = np.random.default_rng(SEED + 1)
    X = np.empty((n_rows, n_features), dtype=dtype)
    for first in range(0, n_rows, GENERATION_CHUNK):
        rows = min(GENERATION_CHUNK, n_rows - first)
        Z = rng.standard_normal((rows, n_components))
        X[first : first + rows] = mixing(Z) + rng.standard_normal((rows, n_features))
    return X, X_test.astype(dtype), mixing


def child(config: dict) -> dict:
    """One configuration in this (fresh) process."""
    threads = config["threads"]
    set_threads(threads)
    n, m, n_rows = config["n"], config["m"], config["N"]
    dtype = np.float32 if config.get("dtype") == "float32" else np.float64
    n_test = config.get("test_rows") or TEST_ROWS_BY_FEATURES.get(n, N_TEST)
    truth_nodes, check_nodes = config.get(
        "truth_nodes", (TRUTH_NODES, TRUTH_CHECK_NODES)
    )
    X, X_test, mixing = make_data(n_rows, m, n, dtype, n_test)
    params = {
        "n_components": m,
        "early_stopping": config.get("early_stopping", False),
        "max_iter": config["epochs"],
        "n_iter_no_change": 10**6,
        "random_state": 0,
        **thread_params(NonlinearICAMLE, threads),
    }
    # Warm-up on tiny shapes: libraries and thread pools, not the working set.
    warm_up = {**params, "max_iter": 1, "n_nodes": 16, "batch_size": 8}
    timed_fit(NonlinearICAMLE(**warm_up), X[:64])
    estimator = NonlinearICAMLE(**params)
    with PeakMemory() as memory:
        fit_s = timed_fit(estimator, X)
    epochs = epoch_seconds(estimator.history_)
    out = {
        "epoch_s": median_after_first(epochs),
        "epochs_s": epochs,
        "fit_s": fit_s,
        "peak_mib": memory.peak_mib,
        "retained_mib": memory.retained_mib,
        "data_mib": X.nbytes / 2**20,
        "baseline_rss_mib": memory.rss_before_mib,
        "peak_reset": memory.peak_reset,
        "n_epochs": estimator.n_iter_,
        "steps": estimator.n_iter_ * math.ceil(len(X) / BATCH),
        "noise_variance": estimator.noise_variance_,
        "threads_after_fit": torch.get_num_threads(),
        "test_rows": n_test,
    }
    start = time.perf_counter()
    out["held_out_ll"] = estimator.score(X_test)
    out["score_s"] = time.perf_counter() - start
    if m <= TRUTH_MAX_COMPONENTS and n <= TRUTH_MAX_FEATURES:
        start = time.perf_counter()
        truth = marginal_log_likelihood(X_test, mixing, 1.0, n_nodes=truth_nodes)
        coarse = marginal_log_likelihood(X_test, mixing, 1.0, n_nodes=check_nodes)
        out["true_ll"] = float(truth.mean())
        out["truth_check"] = float(abs(truth.mean() - coarse.mean()))
        out["gap"] = out["held_out_ll"] - out["true_ll"]
        out["truth_s"] = time.perf_counter() - start
    return out


def render(rows: list[dict], settings: dict) -> str:
    for row in rows:
        itemsize = 4 if row.get("dtype") == "float32" else 8
        row["auto_rule"] = auto_rule(row["m"], N_NODES)
        row["B_x_K_mib"] = BATCH * N_NODES * itemsize / 2**20
        row["K_x_n_mib"] = N_NODES * row["n"] * itemsize / 2**20
        row["variant"] = ", ".join(
            [row.get("dtype", "float64")]
            + (["early_stopping=True"] if row.get("early_stopping") else [])
        )
        if "truth_check" in row:
            row["gap_reliable"] = row["truth_check"] < TRUTH_TOLERANCE
        if "error" in row:
            row["epoch_s"] = row["error"]
    columns = [
        "n",
        "m",
        "N",
        "variant",
        "auto_rule",
        "n_epochs",
        "steps",
        "epoch_s",
        "peak_mib",
        "retained_mib",
        "data_mib",
        "B_x_K_mib",
        "K_x_n_mib",
        "test_rows",
        "held_out_ll",
        "true_ll",
        "gap",
        "truth_check",
        "gap_reliable",
        "other_cpus",
    ]
    budgets = ", ".join(f"N={k:,}: {v}" for k, v in EPOCHS_BY_ROWS.items())
    md = [
        "# NonlinearICAMLE scaling in n, m and N",
        "",
        f"Relu generator, sigma^2 = 1, {N_TEST:,} held-out rows (n=5,000: "
        f"{TEST_ROWS_BY_FEATURES[5000]}); default "
        f"estimator (`integration='auto'`, {N_NODES} training nodes, batch "
        f"{BATCH}, float64 unless stated) with `early_stopping=False` and "
        f"{EPOCHS} epochs ({budgets}), {settings['threads']} torch threads, "
        f"{os.cpu_count()} CPUs. Load "
        f"average (1/5/15 min) at start {settings['load_average_start']}, at "
        f"end {settings['load_average_end']}; `other_cpus` is the CPUs other "
        "jobs kept busy just before each configuration (`/proc/stat`).",
        "",
        "`epoch_s`: median per-epoch time after the first epoch (the only one "
        "when there is one). `peak_mib`: growth of the peak RSS (`VmHWM`, "
        "what `ru_maxrss` reports) during `fit` over a baseline taken after "
        "the data exist (high-water mark reset there); `retained_mib`: growth "
        "of the current RSS. A fit that copied "
        "its input would add about `data_mib`; the training working set "
        "scales with `B_x_K_mib` (one batch x nodes matrix) and `K_x_n_mib` "
        "(the decoded nodes). `held_out_ll`: `score` (nats per row, after "
        "the epoch budget: not converged); `true_ll`: the true model by "
        f"`marginal_log_likelihood` with {TRUTH_NODES:,} nodes (m <= 3 and "
        "n <= 100 only: beyond, the posterior is narrower than the grid "
        "spacing and this quadrature of the truth is off by more than the "
        "gap); "
        "`truth_check`: its change from "
        f"{TRUTH_CHECK_NODES:,} nodes, an accuracy indicator for `gap` "
        f"(`gap_reliable`: below {TRUTH_TOLERANCE} nats; for large n the "
        "posterior is narrower than the grid spacing and the prior-rule "
        "quadrature of the truth fails).",
    ]
    titles = {
        "n": "Observed dimension n (m=2, N=5,000)",
        "m": "Latent dimension m (n=20, N=5,000)",
        "N": "Rows N (m=2, n=20)",
    }
    for axis, title in titles.items():
        selected = [r for r in rows if r["axis"] == axis]
        if selected:
            md += ["", f"## {title}", "", markdown_table(selected, columns)]
    return "\n".join(md)


def main() -> None:
    args = benchmark_parser(__doc__).parse_args()
    if args.child:
        child_result(child(json.loads(args.child)))
        return
    set_threads(args.threads)
    waiter = QuietWaiter(args.wait_quiet)
    settings = {
        "threads": args.threads,
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "epochs": EPOCHS,
        "epochs_by_rows": EPOCHS_BY_ROWS,
        "test_rows": N_TEST,
    }
    start = time.perf_counter()
    rows = []
    for config in axes(args.quick):
        config = {
            **config,
            "threads": args.threads,
            "epochs": EPOCHS_BY_ROWS.get(config["N"], EPOCHS),
        }
        if args.quick:
            config["epochs"] = QUICK_EPOCHS
            config["test_rows"] = QUICK_TEST_ROWS
            config["truth_nodes"] = QUICK_TRUTH_NODES
        busy = waiter.wait()
        result = run_child(__file__, config, timeout=1800)
        row = {**config, **result, "other_cpus": busy}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "epochs_s"}, flush=True)
    settings["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    settings["waited_for_quiet_s"] = waiter.waited_s
    settings["wall_seconds"] = time.perf_counter() - start
    write_results(
        "scaling",
        {"settings": settings, "rows": rows},
        render(rows, settings),
        output=args.output,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
