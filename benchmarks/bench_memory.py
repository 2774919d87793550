"""Peak memory of the estimators' training against minimal torch loops.

Target (issue: performance): training memory that grows with batch x nodes
(and nodes x n), never with a copy of the data; on ``make_nonlinear_ica``
with m=2, n=20, N=5,000 rows, batch 128, 1,024 nodes, 2 CPU threads, every
configuration of ``bench_speed.py`` (each MLE rule x gradient x dtype, the
adaptive rule, the VAE's IWAE K=8 and 1-draw ELBO) beside the minimal
hand-written loops of the same shapes.

How: each configuration runs in a fresh subprocess (``python
bench_memory.py --child JSON``): the data are created, a tiny warm-up fit
(or minimal-loop epoch) on 32 rows loads the libraries and thread pools,
the peak-RSS high-water mark is reset, and 2 epochs run
(``early_stopping=False``).  ``peak_mib`` is the growth of the peak RSS over
that baseline (``VmHWM`` from ``/proc``, the high-water mark ``ru_maxrss``
reports, read there because it can be reset and because, unlike
``ru_maxrss``, it does not start at the parent's peak in a child; see
``_common.peak_rss_mib``).  The data are 0.76 MiB (float64).

Benchmarks measure and report; nothing here asserts.

Run: ``python benchmarks/bench_memory.py [--quick] [--output DIR]
[--threads T] [--wait-quiet SECONDS]`` (``--quick``: one estimator and one
minimal-loop configuration on 512 rows: two subprocesses, seconds).  Writes
``DIR/memory.json`` and ``.md`` (``memory_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import json

import torch
from _common import (
    DTYPES,
    FULL,
    N_FEATURES,
    QUICK,
    PeakMemory,
    QuietWaiter,
    benchmark_parser,
    child_result,
    config_label,
    estimator_for,
    finish_settings,
    fit_epochs,
    load_averages,
    make_data,
    markdown_table,
    minimal_epochs,
    minimal_for,
    mle_configs,
    run_child,
    set_threads,
    timed_run,
    vae_configs,
    write_results,
)

#: Epochs of each measured run.
N_EPOCHS = 2


def memory_child(config: dict) -> dict:
    """In a fresh process: peak RSS of a few epochs of one configuration."""
    set_threads(config["threads"])
    kind, loop, n_nodes = config["kind"], config["loop"], config["n_nodes"]
    X = make_data(config["n_rows"], config.get("n_features", N_FEATURES))
    X = X.astype(DTYPES[config["dtype"]])
    x = torch.from_numpy(X)
    # Warm-up on tiny shapes: libraries and thread pools, not the working set.
    tiny = X[:32]
    if loop == "estimator":
        estimator_class, params = estimator_for(kind, config, n_nodes=n_nodes)
        warm_up = {**params, "batch_size": 8}
        if kind == "mle":
            warm_up["n_nodes"] = 16
        fit_epochs(estimator_class, tiny, 1, config["threads"], **warm_up)
    else:
        small = torch.from_numpy(tiny)
        minimal_epochs(minimal_for(kind, small, config, n_nodes=n_nodes), small, 1, 8)
    with PeakMemory() as memory:
        if loop == "estimator":
            times = fit_epochs(
                estimator_class, X, config["n_epochs"], config["threads"], **params
            )
        else:
            step = minimal_for(kind, x, config, n_nodes=n_nodes)
            times = minimal_epochs(step, x, config["n_epochs"])
    return {
        "peak_mib": memory.peak_mib,
        "rss_before_mib": memory.rss_before_mib,
        "baseline_peak_mib": memory.baseline_mib,
        "data_mib": X.nbytes / 2**20,
        "peak_reset": memory.peak_reset,
        "epoch_s": times,
    }


def jobs(quick: bool) -> list[tuple[str, dict, str]]:
    """(kind, configuration, loop) of every subprocess."""
    estimator = [("mle", c) for c in mle_configs(quick)]
    estimator += [("vae", c) for c in vae_configs(quick)]
    minimal = [("mle", {"rule": "grid", "gradient": "-", "dtype": d}) for d in DTYPES]
    minimal += [("vae", c) for c in vae_configs(quick)]
    if quick:
        estimator, minimal = estimator[:1], minimal[:1]
    return [(k, c, "estimator") for k, c in estimator] + [
        (k, c, "minimal") for k, c in minimal
    ]


def run_sections(args) -> dict:
    sizes = QUICK if args.quick else FULL
    waiter = QuietWaiter(args.wait_quiet)
    settings = {
        "rows": sizes.rows,
        "nodes": sizes.nodes,
        "epochs": N_EPOCHS,
        "threads": args.threads,
        "load_average_start": load_averages(),
    }
    rows = []
    for kind, config, loop in jobs(args.quick):
        child = {
            **config,
            "kind": kind,
            "loop": loop,
            "threads": args.threads,
            "n_epochs": N_EPOCHS,
            "n_rows": sizes.rows,
            "n_nodes": sizes.nodes,
        }
        busy = waiter.wait()
        result = run_child(__file__, child)
        row = {
            **config,
            "estimator": kind.upper(),
            "loop": loop,
            "other_cpus": busy,
            **result,
        }
        rows.append(row)
        print(row, flush=True)
    finish_settings(settings, waiter)
    return {"settings": settings, "memory": rows}


def render(out: dict) -> str:
    s = out["settings"]
    table = []
    for row in out["memory"]:
        label = (
            config_label(row)
            if row["loop"] == "estimator"
            else (
                "minimal MLE loop (every rule), " + row["dtype"]
                if row["estimator"] == "MLE"
                else "minimal " + config_label(row)
            )
        )
        table.append({"configuration": label, **row})
        if "error" in row:
            table[-1]["peak_mib"] = row["error"]
    md = [
        "# Peak memory: the estimators against minimal torch loops",
        "",
        f"`make_nonlinear_ica`, m=2, n={N_FEATURES}, N={s['rows']:,} rows, "
        f"batch 128, {s['nodes']} nodes, {s['threads']} torch threads; "
        f"{s['epochs']} epochs per fresh subprocess, `early_stopping=False`. "
        "`peak_mib`: growth of the process's peak RSS (`VmHWM`, the figure "
        "`ru_maxrss` reports, reset at the baseline) over a baseline taken "
        "after the data exist and a tiny warm-up fit; `data_mib`: the data "
        "(a fit that copied them would add about that much). The minimal MLE "
        "loop's memory is that of the unfused expression, the same for every "
        f"rule. Load average (1/5/15 min) at start {s['load_average_start']}, "
        f"at end {s['load_average_end']}.",
        "",
        markdown_table(
            table,
            [
                "configuration",
                "loop",
                "peak_mib",
                "data_mib",
                "baseline_peak_mib",
                "peak_reset",
                "other_cpus",
            ],
        ),
    ]
    return "\n".join(md)


def main() -> None:
    args = benchmark_parser(__doc__).parse_args()
    if args.child:
        child_result(memory_child(json.loads(args.child)))
        return
    out = timed_run(run_sections, args)
    write_results("memory", out, render(out), output=args.output, quick=args.quick)


if __name__ == "__main__":
    main()
