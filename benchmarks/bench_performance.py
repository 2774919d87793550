"""Per-epoch speed and memory of the estimators against minimal torch loops.

Targets (issue: performance), on ``make_nonlinear_ica`` with m=2, n=20,
N=5,000 rows, batch 128, 2 CPU threads:

- ``NonlinearICAMLE``: per-epoch training time at most 1.3x that of a minimal
  hand-written torch loop doing the same work on the same shapes (decoder
  MLP ``Linear(m, 64) -> ReLU -> Linear(64, n)`` on the 1,024 nodes, squared
  distances by the matmul expansion, logsumexp, backward, Adam, a learned log
  noise variance), for every integration rule (``grid``, ``qmc``,
  ``monte_carlo``, ``gauss_hermite``; ``adaptive`` against the same prior-node
  loop, which is not like for like), autograd vs analytic gradient, float64
  and float32;
- ``NonlinearICAVAE``: at most 1.2x a minimal torch VAE loop of the same
  architecture (encoder ``Linear(n, 64) -> ReLU`` with mean and log-variance
  heads, the same decoder) and batch size, for the default IWAE bound with 8
  importance samples and for the 1-draw ELBO.

How: the estimators are fitted with ``early_stopping=False`` (no validation
pass: an epoch is pure training), ``max_iter=E`` and ``n_iter_no_change=10**6``;
per-epoch times are the differences of ``history_[i]["seconds"]`` and the
median over the epochs after the first.  Each configuration alternates an
estimator block and a minimal-loop block (A B, then B A, ...), so background
load hits both alike; the ratio reported is the median of the per-round
ratios.  Also measured: the per-epoch cost of the default
``early_stopping=True`` (work the minimal loop does not do), a breakdown of
the remaining gap by microbenchmarks of each extra cost (node draws, the
likelihood's forward and backward, gradient clipping, log-variance clamping,
``_is_finite``, the ``state_dict`` copy, per-epoch monitoring, ...), 1 vs 2
threads, the peak memory of each configuration in a fresh subprocess (growth
of the peak RSS over a baseline taken after the data exist; ``VmHWM``, the
high-water mark ``ru_maxrss`` reports, read from ``/proc`` because it can be
reset there and, unlike ``ru_maxrss``, does not start at the parent's peak in
a child), and the report's own
settings (Monte Carlo with 1,000 draws at n=20 and n=100, and its 51 x 51 grid
on [-2.5, 2.5]^2 at n=100) beside the report's timings.

Benchmarks measure and report; nothing here asserts.

Run: ``python benchmarks/bench_performance.py [--quick] [--threads T]
[--wait-quiet SECONDS]`` (``--quick``: a smoke test of every section, under
two minutes on a quiet machine; ``--wait-quiet``: before each measurement
wait, up to SECONDS in all, for other jobs to leave the CPUs).  Writes
``benchmarks/results/performance.json`` and ``.md`` (``performance_quick.*``
with ``--quick``).
"""

from __future__ import annotations

import copy
import gc
import inspect
import json
import math
import os
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
from _common import (
    QuietWaiter,
    benchmark_parser,
    child_result,
    current_rss_mib,
    epoch_seconds,
    load_average,
    markdown_table,
    median_after_first,
    peak_rss_mib,
    ratio_summary,
    reset_peak_rss,
    run_child,
    set_threads,
    thread_params,
    write_results,
)
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica._torch.integration import prior_rule
from sknlica.datasets import make_nonlinear_ica

N_ROWS, N_FEATURES, N_COMPONENTS = 5000, 20, 2
BATCH, HIDDEN, N_NODES, LEARNING_RATE = 128, 64, 1024, 3e-3
MLE_TARGET, VAE_TARGET = 1.3, 1.2
RULES = ("grid", "qmc", "monte_carlo", "gauss_hermite")
#: Rules whose nodes are redrawn every step: the minimal loop draws fresh
#: ``randn`` nodes (the cheapest fresh node set) for them.
FRESH_RULES = ("qmc", "monte_carlo")
DTYPES = {"float64": np.float64, "float32": np.float32}
VAE_CONFIGS = {
    "iwae K=8 (default)": {"objective": "iwae", "n_importance_samples": 8},
    "elbo (1 draw)": {"objective": "elbo"},
}
#: The report's settings (issue text and /work/shared/seeds/001_*.txt: "k = 51,
#: l = 2.5" for its grid; 1,000 Monte Carlo draws; batch 128; 10,000 rows),
#: and the timings the issue quotes for the report's own code.
REPORT_ROWS = 10_000
REPORT_SETTINGS = (
    ("monte_carlo, 1,000 draws", 20, {"integration": "monte_carlo", "n_nodes": 1000}),
    ("monte_carlo, 1,000 draws", 100, {"integration": "monte_carlo", "n_nodes": 1000}),
    (
        "grid 51 x 51 on [-2.5, 2.5]^2",
        20,
        {"integration": "grid", "n_nodes": 51**2, "grid_half_width": 2.5},
    ),
    (
        "grid 51 x 51 on [-2.5, 2.5]^2",
        100,
        {"integration": "grid", "n_nodes": 51**2, "grid_half_width": 2.5},
    ),
)
REPORT_TIMINGS = {
    ("monte_carlo, 1,000 draws", 20): "1.4 s/batch, ~110 s/epoch",
    ("monte_carlo, 1,000 draws", 100): "31 s/batch",
    ("grid 51 x 51 on [-2.5, 2.5]^2", 100): "out of memory (24 GB)",
}


def make_data(n_rows=N_ROWS, n_features=N_FEATURES, dtype=np.float64, seed=0):
    X, _ = make_nonlinear_ica(n_rows, N_COMPONENTS, n_features, random_state=seed)
    return np.ascontiguousarray(X, dtype=dtype)


# ------------------------------------------------------------ the estimators
def estimator_params(estimator_class, threads: int, **params) -> dict:
    base = {
        "early_stopping": False,
        "n_iter_no_change": 10**6,
        "random_state": 0,
        **thread_params(estimator_class, threads),
    }
    return {**base, **params}


def fit_epochs(estimator_class, X, n_epochs: int, threads: int, **params) -> list:
    """Per-epoch seconds of one fit (``history_`` differences)."""
    params = estimator_params(estimator_class, threads, max_iter=n_epochs, **params)
    estimator = estimator_class(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(X)
    return epoch_seconds(estimator.history_)


# ------------------------------------------------------------ minimal loops
def _mlp(sizes, dtype):
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out, dtype=dtype), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def minimal_mle_step(x, *, rule, n_nodes=N_NODES, half_width=None, fused=False):
    """The simplest torch code for one MLE training step, as a closure.

    Fixed rules use the estimator's own nodes (same shapes, same values);
    fresh-node rules draw ``randn`` nodes with equal weights every step.
    ``fused=True`` is the same loop with the estimator's one optimisation of
    the arithmetic (node terms as the bias of one ``addmm``, so the batch x
    nodes matrix is written twice rather than about eight times), to
    separate that from the estimator's plumbing.
    """
    dtype, n = x.dtype, x.shape[1]
    decoder = _mlp([N_COMPONENTS, HIDDEN, n], dtype)
    log_s2 = torch.zeros((), dtype=dtype, requires_grad=True)
    optimizer = torch.optim.Adam([*decoder.parameters(), log_s2], lr=LEARNING_RATE)
    fresh = rule in FRESH_RULES
    nodes, log_w = prior_rule(
        "monte_carlo" if fresh else rule,
        N_COMPONENTS,
        n_nodes,
        generator=torch.Generator().manual_seed(0),
        dtype=dtype,
        half_width=half_width,
    )

    def step(xb):
        z = torch.randn(n_nodes, N_COMPONENTS, dtype=dtype) if fresh else nodes
        g = decoder(z)
        s2 = log_s2.exp()
        if fused:
            inv = 1 / s2
            bias = log_w - 0.5 * (
                n * torch.log(2 * math.pi * s2) + (g * g).sum(1) * inv
            )
            rows = (0.5 * inv) * (xb * xb).sum(1, keepdim=True)
            log_joint = torch.addmm(bias, xb * inv, g.T) - rows
        else:
            sq = (xb * xb).sum(1, keepdim=True) - 2 * xb @ g.T + (g * g).sum(1)
            log_joint = log_w - 0.5 * (n * torch.log(2 * math.pi * s2) + sq / s2)
        loss = -torch.logsumexp(log_joint, 1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def minimal_vae_step(x, *, objective, n_draws):
    """The simplest torch code for one VAE step (IWAE with ``n_draws`` or ELBO)."""
    dtype, n, m = x.dtype, x.shape[1], N_COMPONENTS
    trunk = nn.Sequential(nn.Linear(n, HIDDEN, dtype=dtype), nn.ReLU())
    mean_head = nn.Linear(HIDDEN, m, dtype=dtype)
    log_var_head = nn.Linear(HIDDEN, m, dtype=dtype)
    decoder = _mlp([m, HIDDEN, n], dtype)
    log_s2 = torch.zeros((), dtype=dtype, requires_grad=True)
    params = [
        *trunk.parameters(),
        *mean_head.parameters(),
        *log_var_head.parameters(),
        *decoder.parameters(),
        log_s2,
    ]
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    log_2pi = math.log(2 * math.pi)

    def step(xb):
        h = trunk(xb)
        mu, log_var = mean_head(h), log_var_head(h)
        s2 = log_s2.exp()
        if objective == "iwae":
            eps = torch.randn(n_draws, *mu.shape, dtype=dtype)
            z = mu + (0.5 * log_var).exp() * eps
            sq = (xb - decoder(z)).square().sum(-1)
            log_lik = -0.5 * (n * (log_2pi + s2.log()) + sq / s2)
            log_p = -0.5 * (z.square() + log_2pi).sum(-1)
            log_q = -0.5 * ((z - mu).square() / log_var.exp() + log_var + log_2pi)
            log_w = log_lik + log_p - log_q.sum(-1)
            loss = -(torch.logsumexp(log_w, 0) - math.log(n_draws)).mean()
        else:
            z = mu + (0.5 * log_var).exp() * torch.randn(mu.shape, dtype=dtype)
            sq = (xb - decoder(z)).square().sum(-1)
            log_lik = -0.5 * (n * (log_2pi + s2.log()) + sq / s2)
            kl = 0.5 * (mu.square() + log_var.exp() - 1 - log_var).sum(-1)
            loss = -(log_lik - kl).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def minimal_epochs(step, x, n_epochs: int, batch_size: int = BATCH) -> list:
    """Per-epoch seconds of ``step`` over shuffled minibatches of ``x``."""
    times = []
    for _ in range(n_epochs):
        start = time.perf_counter()
        order = torch.randperm(x.shape[0])
        for first in range(0, x.shape[0], batch_size):
            step(x[order[first : first + batch_size]])
        times.append(time.perf_counter() - start)
    return times


def minimal_for(kind: str, x, config: dict, *, fused: bool = False):
    if kind == "mle":
        return minimal_mle_step(
            x,
            rule="grid" if config["rule"] in ("adaptive", "auto") else config["rule"],
            n_nodes=config.get("n_nodes", N_NODES),
            half_width=config.get("grid_half_width"),
            fused=fused,
        )
    params = VAE_CONFIGS[config["vae"]]
    return minimal_vae_step(
        x, objective=params["objective"], n_draws=params.get("n_importance_samples")
    )


def estimator_for(kind: str, config: dict):
    if kind == "mle":
        params = {"integration": config["rule"]}
        if config["rule"] != "adaptive":
            params["gradient"] = config["gradient"]
        return NonlinearICAMLE, params
    return NonlinearICAVAE, dict(VAE_CONFIGS[config["vae"]])


# ---------------------------------------------------------- paired timing
def paired_timing(kind, config, X, *, n_epochs, rounds, threads, waiter) -> dict:
    """Alternate estimator and minimal-loop blocks; medians and ratios."""
    estimator_class, params = estimator_for(kind, config)
    x = torch.from_numpy(X)
    blocks = ["est", "min"] + (["fused"] if kind == "mle" else [])
    times = {block: [] for block in blocks}
    loads, busy = [], []
    for r in range(rounds):
        busy.append(waiter.wait())
        loads.append(load_average())
        # Rotate the order so that no loop always runs first or last.
        for block in blocks[r % len(blocks) :] + blocks[: r % len(blocks)]:
            if block == "est":
                epochs = fit_epochs(estimator_class, X, n_epochs, threads, **params)
            else:
                torch.manual_seed(r)
                step = minimal_for(kind, x, config, fused=block == "fused")
                epochs = minimal_epochs(step, x, n_epochs)
            times[block].append(median_after_first(epochs))
    pairs = list(zip(times["est"], times["min"]))
    summary = ratio_summary(pairs)
    fused = {}
    if "fused" in times:
        fused_summary = ratio_summary(list(zip(times["est"], times["fused"])))
        fused = {
            "fused_ms": 1e3 * fused_summary["reference_seconds"],
            "ratio_vs_fused": fused_summary["ratio"],
            "fused_pairs_s": list(zip(times["est"], times["fused"])),
        }
    return {
        **config,
        "epoch_ms": 1e3 * summary["seconds"],
        "minimal_ms": 1e3 * summary["reference_seconds"],
        "ratio": summary["ratio"],
        "ratio_range": f"{summary['ratio_min']:.2f}-{summary['ratio_max']:.2f}",
        "ratio_of_medians": summary["ratio_of_medians"],
        "spread_pct": 100 * (max(times["est"]) / min(times["est"]) - 1),
        "gap_ms": 1e3 * (summary["seconds"] - summary["reference_seconds"]),
        "rounds": rounds,
        "epochs_per_block": n_epochs,
        "load_avg": float(np.mean(loads)),
        "other_cpus": float(np.mean(busy)),
        "pairs_s": pairs,
        **fused,
    }


def thread_comparison(kind, config, X, *, n_epochs, rounds, waiter) -> dict:
    """The estimator's per-epoch time with 1 and with 2 torch threads."""
    estimator_class, params = estimator_for(kind, config)
    previous = torch.get_num_threads()
    times = {1: [], 2: []}
    busy = []
    for r in range(rounds):
        busy.append(waiter.wait())
        for threads in (1, 2) if r % 2 == 0 else (2, 1):
            set_threads(threads)
            epochs = fit_epochs(estimator_class, X, n_epochs, threads, **params)
            times[threads].append(median_after_first(epochs))
    set_threads(previous)
    one, two = (float(np.median(times[t])) for t in (1, 2))
    return {
        **config,
        "estimator": kind.upper(),
        "epoch_ms_1_thread": 1e3 * one,
        "epoch_ms_2_threads": 1e3 * two,
        "speedup_2_threads": one / two,
        "other_cpus": float(np.mean(busy)),
        "other_cpus_max": float(np.max(busy)),
    }


def early_stopping_overhead(
    kind, config, X, *, n_epochs, rounds, threads, waiter
) -> dict:
    """Per-epoch cost of the default ``early_stopping=True``.

    ``early_stopping=True`` on the N rows trains on 90% of them; the
    reference is ``early_stopping=False`` on that many rows, so the difference
    is the validation score (and the rest of the per-epoch selection work).
    """
    estimator_class, params = estimator_for(kind, config)
    n_train = X.shape[0] - math.ceil(0.1 * X.shape[0])
    pairs, busy = [], []
    for r in range(rounds):
        busy.append(waiter.wait())
        ours = reference = None
        for which in ("es", "plain") if r % 2 == 0 else ("plain", "es"):
            if which == "es":
                ours = median_after_first(
                    fit_epochs(
                        estimator_class,
                        X,
                        n_epochs,
                        threads,
                        early_stopping=True,
                        **params,
                    )
                )
            else:
                reference = median_after_first(
                    fit_epochs(
                        estimator_class, X[:n_train], n_epochs, threads, **params
                    )
                )
        pairs.append((ours, reference))
    summary = ratio_summary(pairs)
    return {
        **config,
        "epoch_ms_early_stopping": 1e3 * summary["seconds"],
        "epoch_ms_without": 1e3 * summary["reference_seconds"],
        "overhead_ms": 1e3 * float(np.median([a - b for a, b in pairs])),
        "overhead_pct": 100 * (summary["ratio"] - 1),
        "train_rows": n_train,
        "other_cpus": float(np.mean(busy)),
    }


# ------------------------------------------------------------- breakdown
REPEATS = 15


def per_call_us(fn, *, reps: int, repeats: int = REPEATS) -> float:
    """Microseconds per call of ``fn``: the minimum over ``repeats`` batches."""
    return paired_per_call_us({"fn": fn}, reps=reps, repeats=repeats)["fn"]


def paired_per_call_us(fns: dict, *, reps: int, repeats: int = REPEATS) -> dict:
    """Microseconds per call of each function, batches of calls alternating.

    Each function runs ``reps`` calls per batch, the functions taking turns
    ``repeats`` times, and the minimum per function is kept: drift in the
    machine's speed then hits all of them alike.
    """
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / reps)
    return {name: 1e6 * value for name, value in best.items()}


def aten_ops_per_call(fn, calls: int = 5) -> float:
    """Aten operator calls (nested ones included) per call of ``fn``."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        for _ in range(calls):
            fn()
    events = p.key_averages()
    return sum(e.count for e in events if e.key.startswith("aten::")) / calls


def _training_objects(estimator, x):
    """The estimator's own model, optimizers and step callable (internals)."""
    generator = torch.Generator().manual_seed(0)
    scale = float(x.var(0).mean())
    model = estimator._build_model(
        x.shape[1],
        scale=scale,
        dtype=x.dtype,
        device=torch.device("cpu"),
        generator=generator,
    )
    optimizers = estimator._make_optimizers(model)
    signature = inspect.signature(estimator._optimizer_step).parameters
    extra = {"rows": None} if "rows" in signature else {}

    def step(xb):
        return estimator._optimizer_step(model, optimizers, xb, generator, **extra)

    return model, optimizers, step


def _paired_steps(est_step, min_step, batches, reps) -> dict:
    steps = paired_per_call_us(
        {
            "step_us": _cycling(est_step, batches),
            "minimal_step_us": _cycling(min_step, batches),
        },
        reps=reps,
    )
    steps["aten_ops_per_step"] = aten_ops_per_call(_cycling(est_step, batches))
    steps["minimal_aten_ops_per_step"] = aten_ops_per_call(_cycling(min_step, batches))
    return steps


def _batches(x, count: int = 40):
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    return [x[order[i * BATCH : (i + 1) * BATCH]] for i in range(count)]


def _cycling(step, batches):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(batches)
        return step(batches[state["i"]])

    return call


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()

    return call


def _epoch_bookkeeping(model, losses):
    """What ``_train`` does per epoch beyond the steps (``_base.py``)."""
    from sknlica._base import _is_finite

    return {
        "loss_stack_item": lambda: torch.stack(losses).mean().item(),
        "is_finite": lambda: _is_finite(model),
        "state_dict_deepcopy": lambda: copy.deepcopy(model.state_dict()),
        "noise_float": _no_grad(lambda: float(model.noise())),
    }


def _breakdown_start(kind: str, config, X, *, reps: int) -> SimpleNamespace:
    """What both breakdowns start from: the estimator's training objects and
    ``out``, holding ``config`` and the paired step timings."""
    x = torch.from_numpy(X)
    estimator_class, params = estimator_for(kind, config)
    estimator = estimator_class(**estimator_params(estimator_class, 1, **params))
    model, optimizers, est_step = _training_objects(estimator, x)
    torch.manual_seed(0)
    min_step = minimal_for(kind, x, config)
    batches = _batches(x)
    return SimpleNamespace(
        x=x,
        steps_per_epoch=math.ceil(x.shape[0] / BATCH),
        estimator=estimator,
        model=model,
        optimizers=optimizers,
        est_step=est_step,
        batches=batches,
        out={**config, **_paired_steps(est_step, min_step, batches, reps)},
    )


def mle_breakdown(config, X, *, reps: int) -> dict:
    """Microbenchmarks of each cost the estimator has beyond the minimal loop."""
    from sknlica._torch.likelihood import GRADIENTS

    start = _breakdown_start("mle", config, X, reps=reps)
    x, model, batches, out = start.x, start.model, start.batches, start.out
    steps_per_epoch = start.steps_per_epoch
    # Node draw: the estimator's sampler against the minimal loop's.
    if config["rule"] in FRESH_RULES:
        draws = paired_per_call_us(
            {
                "draw_us": model.sampler.draw,
                "minimal_draw_us": lambda: torch.randn(
                    N_NODES, N_COMPONENTS, dtype=x.dtype
                ),
            },
            reps=5 * reps,
        )
        out.update(draws)
    else:
        out["draw_us"] = per_call_us(model.sampler.draw, reps=5 * reps)
        out["minimal_draw_us"] = 0.0
    # The likelihood's forward and backward on fixed decoded nodes.
    nodes, log_w = model.sampler.draw()
    g = model.decoder(nodes).detach().requires_grad_()
    raw = torch.zeros((), dtype=x.dtype, requires_grad=True)
    xb, n = batches[0], x.shape[1]
    if config["rule"] != "adaptive":
        gradient = GRADIENTS[config["gradient"]]

        def ours():
            gradient(xb, g, log_w, raw.exp()).mean().backward()

        def theirs():
            s2 = raw.exp()
            sq = (xb * xb).sum(1, keepdim=True) - 2 * xb @ g.T + (g * g).sum(1)
            log_joint = log_w - 0.5 * (n * torch.log(2 * math.pi * s2) + sq / s2)
            torch.logsumexp(log_joint, 1).mean().backward()

        out.update(
            paired_per_call_us(
                {"likelihood_us": ours, "minimal_likelihood_us": theirs}, reps=reps
            )
        )
    losses = [torch.tensor(0.5, dtype=x.dtype) for _ in range(steps_per_epoch)]
    for name, fn in _epoch_bookkeeping(model, losses).items():
        out[f"{name}_us"] = per_call_us(fn, reps=max(10, reps // 4))
    out["detach_append_us"] = per_call_us(
        lambda: losses.append(losses[0].detach()) or losses.pop(), reps=reps
    )
    return _summarise_breakdown(out, steps_per_epoch)


def vae_breakdown(config, X, *, reps: int) -> dict:
    from sknlica._torch.elbo import soft_clamp

    start = _breakdown_start("vae", config, X, reps=reps)
    x, model, batches, out = start.x, start.model, start.batches, start.out
    estimator, optimizers, est_step = start.estimator, start.optimizers, start.est_step
    steps_per_epoch = start.steps_per_epoch
    # Gradient clipping as the estimator does it (after a backward, so the
    # gradients exist): its own clip where it has one, else torch's.
    est_step(batches[0])
    out["clip_grad_norm_us"] = per_call_us(_estimator_clip(optimizers[0]), reps=reps)
    # Soft clamp of the encoder log-variances, forward and backward.
    log_var = torch.zeros(BATCH, N_COMPONENTS, dtype=x.dtype, requires_grad=True)
    clamp = paired_per_call_us(
        {
            "with": lambda: soft_clamp(log_var, -20.0, 5.0).sum().backward(),
            "without": lambda: log_var.sum().backward(),
        },
        reps=5 * reps,
    )
    out["soft_clamp_us"] = clamp["with"] - clamp["without"]
    # Per-epoch monitoring: _epoch_scores without a validation set.
    rows = _training_rows(x)
    model.eval()
    with torch.no_grad():
        out["epoch_scores_us"] = per_call_us(
            lambda: estimator._epoch_scores(model, rows, None, 0.0),
            reps=max(2, reps // 10),
        )
    losses = [torch.tensor(0.5, dtype=x.dtype) for _ in range(steps_per_epoch)]
    for name, fn in _epoch_bookkeeping(model, losses).items():
        out[f"{name}_us"] = per_call_us(fn, reps=max(10, reps // 4))
    return _summarise_breakdown(out, steps_per_epoch)


def _estimator_clip(optimizer):
    try:
        from sknlica._vae import GRADIENT_CLIP_NORM, clip_gradient_norm
    except ImportError:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        return lambda: torch.nn.utils.clip_grad_norm_(params, 1e3)
    return lambda: clip_gradient_norm(optimizer, GRADIENT_CLIP_NORM)


def _training_rows(x):
    """What ``_train`` passes as the training set: ``TrainingRows`` if it exists."""
    try:
        from sknlica._base import TrainingRows
    except ImportError:
        return x
    return TrainingRows(x)


def _summarise_breakdown(out: dict, steps: int) -> dict:
    """Per-epoch milliseconds of each cost, from the per-call microseconds."""
    ms = {}
    ms["step_total"] = steps * (out["step_us"] - out["minimal_step_us"]) / 1e3
    if "draw_us" in out:
        ms["node_draw"] = steps * (out["draw_us"] - out["minimal_draw_us"]) / 1e3
    if "likelihood_us" in out:
        ms["likelihood_fwd_bwd"] = (
            steps * (out["likelihood_us"] - out["minimal_likelihood_us"]) / 1e3
        )
    if "clip_grad_norm_us" in out:
        ms["clip_grad_norm"] = steps * out["clip_grad_norm_us"] / 1e3
        ms["soft_clamp"] = steps * out["soft_clamp_us"] / 1e3
    if "detach_append_us" in out:
        ms["loss_detach_append"] = steps * out["detach_append_us"] / 1e3
    named = sum(v for k, v in ms.items() if k != "step_total")
    ms["step_rest"] = ms["step_total"] - named
    if "epoch_scores_us" in out:
        ms["epoch_monitoring"] = out["epoch_scores_us"] / 1e3
    for name in ("loss_stack_item", "is_finite", "state_dict_deepcopy", "noise_float"):
        ms[name] = out[f"{name}_us"] / 1e3
    per_epoch = [k for k in ms if k not in ("step_total",)]
    ms["explained_total"] = sum(ms[k] for k in per_epoch)
    out["per_epoch_ms"] = ms
    return out


# ----------------------------------------------------------------- memory
def memory_child(config: dict) -> dict:
    """In a fresh process: peak RSS of a few epochs of one configuration."""
    set_threads(config["threads"])
    kind, loop = config["kind"], config["loop"]
    dtype = DTYPES[config["dtype"]]
    X = make_data(config.get("n_rows", N_ROWS), config.get("n_features", N_FEATURES))
    X = X.astype(dtype)
    x = torch.from_numpy(X)
    # Warm-up on tiny shapes: libraries and thread pools, not the working set.
    tiny = X[:32]
    if loop == "estimator":
        estimator_class, params = estimator_for(kind, config)
        params = {**params, **config.get("params", {})}
        fit_epochs(
            estimator_class,
            tiny,
            1,
            config["threads"],
            **{**params, "batch_size": 8, **({"n_nodes": 16} if kind == "mle" else {})},
        )
    else:
        small = torch.from_numpy(tiny)
        minimal_epochs(minimal_for(kind, small, config), small, 1, 8)
    gc.collect()
    reset = reset_peak_rss()
    baseline = peak_rss_mib()
    rss_before = current_rss_mib()
    if loop == "estimator":
        times = fit_epochs(
            estimator_class, X, config["n_epochs"], config["threads"], **params
        )
    else:
        times = minimal_epochs(minimal_for(kind, x, config), x, config["n_epochs"])
    return {
        "peak_mib": peak_rss_mib() - baseline,
        "rss_before_mib": rss_before,
        "baseline_peak_mib": baseline,
        "data_mib": X.nbytes / 2**20,
        "peak_reset": reset,
        "epoch_s": times,
    }


def report_child(config: dict) -> dict:
    """The report's settings: per-batch and per-epoch time, and peak memory."""
    set_threads(config["threads"])
    X = make_data(REPORT_ROWS, config["n_features"], DTYPES[config["dtype"]])
    fit_epochs(
        NonlinearICAMLE,
        X[:32],
        1,
        config["threads"],
        **{**config["params"], "n_nodes": 16, "batch_size": 8},
    )
    gc.collect()
    reset = reset_peak_rss()
    baseline = peak_rss_mib()
    times = fit_epochs(
        NonlinearICAMLE, X, config["n_epochs"], config["threads"], **config["params"]
    )
    epoch = median_after_first(times)
    return {
        "epoch_s": epoch,
        "batch_s": epoch / math.ceil(REPORT_ROWS / BATCH),
        "peak_mib": peak_rss_mib() - baseline,
        "data_mib": X.nbytes / 2**20,
        "peak_reset": reset,
        "epochs": times,
    }


# ------------------------------------------------------------------- main
def run_sections(args) -> dict:
    quick, threads = args.quick, args.threads
    waiter = QuietWaiter(args.wait_quiet)
    n_epochs = 3 if quick else 6
    rounds = 1 if quick else 6
    reps = 10 if quick else 40
    out = {
        "settings": {
            "rows": N_ROWS,
            "features": N_FEATURES,
            "components": N_COMPONENTS,
            "batch_size": BATCH,
            "nodes": N_NODES,
            "epochs_per_block": n_epochs,
            "rounds": rounds,
            "threads": threads,
            "load_average_start": [round(v, 2) for v in os.getloadavg()],
        }
    }
    data = {name: make_data(dtype=dtype) for name, dtype in DTYPES.items()}
    seconds = out["settings"]["section_seconds"] = {}
    clock = {"name": None, "start": time.perf_counter()}

    def mark(name):
        if clock["name"] is not None:
            seconds[clock["name"]] = time.perf_counter() - clock["start"]
        clock["name"], clock["start"] = name, time.perf_counter()
        if name is not None:
            print(f"== {name}", flush=True)

    mle_configs = [
        {"rule": rule, "gradient": gradient, "dtype": dtype}
        for dtype in DTYPES
        for rule in RULES
        for gradient in ("autograd", "analytic")
    ]
    mle_configs += [
        {"rule": "adaptive", "gradient": "autograd", "dtype": d} for d in DTYPES
    ]
    vae_configs = [{"vae": name, "dtype": d} for d in DTYPES for name in VAE_CONFIGS]
    if quick:
        mle_configs = [mle_configs[0], mle_configs[3], mle_configs[8]]
        vae_configs = vae_configs[:1]

    mark("MLE per-epoch time")
    out["mle"] = []
    for config in mle_configs:
        adaptive = config["rule"] == "adaptive"
        row = paired_timing(
            "mle",
            config,
            data[config["dtype"]],
            n_epochs=max(3, n_epochs // 2) if adaptive else n_epochs,
            rounds=max(1, rounds // 2) if adaptive else rounds,
            threads=threads,
            waiter=waiter,
        )
        row["meets_target"] = (not adaptive) and row["ratio"] <= MLE_TARGET
        out["mle"].append(row)
        print({k: v for k, v in row.items() if "pairs" not in k}, flush=True)

    mark("VAE per-epoch time")
    out["vae"] = []
    for config in vae_configs:
        row = paired_timing(
            "vae",
            config,
            data[config["dtype"]],
            n_epochs=n_epochs,
            rounds=rounds,
            threads=threads,
            waiter=waiter,
        )
        row["meets_target"] = row["ratio"] <= VAE_TARGET
        out["vae"].append(row)
        print({k: v for k, v in row.items() if "pairs" not in k}, flush=True)

    mark("early-stopping overhead")
    out["early_stopping"] = []
    es_configs = [
        ("mle", {"rule": "auto", "gradient": "autograd", "dtype": d}) for d in DTYPES
    ]
    es_configs += [("vae", {"vae": "iwae K=8 (default)", "dtype": d}) for d in DTYPES]
    for kind, config in es_configs[::2] if quick else es_configs:
        row = early_stopping_overhead(
            kind,
            config,
            data[config["dtype"]],
            n_epochs=n_epochs,
            rounds=rounds,
            threads=threads,
            waiter=waiter,
        )
        row["estimator"] = "MLE" if kind == "mle" else "VAE"
        out["early_stopping"].append(row)
        print(row, flush=True)

    mark("1 vs 2 threads")
    out["threads"] = []
    thread_configs = [
        ("mle", {"rule": "auto", "gradient": "autograd", "dtype": "float64"}),
        ("vae", {"vae": "iwae K=8 (default)", "dtype": "float64"}),
    ]
    for kind, config in thread_configs:
        row = thread_comparison(
            kind,
            config,
            data[config["dtype"]],
            n_epochs=n_epochs,
            rounds=rounds,
            waiter=waiter,
        )
        out["threads"].append(row)
        print(row, flush=True)

    mark("breakdown (microbenchmarks)")
    out["breakdown_mle"] = []
    for config in mle_configs:
        if config["rule"] == "adaptive":
            continue
        waiter.wait()
        try:
            row = mle_breakdown(config, data[config["dtype"]], reps=reps)
        except Exception as error:  # internals may have moved; report, go on
            row = {**config, "error": repr(error)}
        out["breakdown_mle"].append(row)
        print(row, flush=True)
    out["breakdown_vae"] = []
    for config in vae_configs:
        waiter.wait()
        try:
            row = vae_breakdown(config, data[config["dtype"]], reps=reps)
        except Exception as error:
            row = {**config, "error": repr(error)}
        out["breakdown_vae"].append(row)
        print(row, flush=True)

    mark("peak memory (fresh subprocess per configuration)")
    out["memory"] = []
    memory_configs = [("mle", c) for c in mle_configs] + [
        ("vae", c) for c in vae_configs
    ]
    minimal_configs = [
        ("mle", {"rule": "grid", "gradient": "-", "dtype": d}) for d in DTYPES
    ] + [("vae", c) for c in vae_configs]
    if quick:
        memory_configs, minimal_configs = memory_configs[:1], minimal_configs[:1]
    jobs = [(k, c, "estimator") for k, c in memory_configs]
    jobs += [(k, c, "minimal") for k, c in minimal_configs]
    for kind, config, loop in jobs:
        child = {
            **config,
            "kind": kind,
            "loop": loop,
            "threads": threads,
            "n_epochs": 2,
        }
        waiter.wait()
        result = run_child(__file__, {"section": "memory", **child})
        row = {**config, "estimator": kind.upper(), "loop": loop, **result}
        out["memory"].append(row)
        print(row, flush=True)

    mark("the report's settings")
    out["report"] = []
    settings = REPORT_SETTINGS[:1] if quick else REPORT_SETTINGS
    for label, n_features, params in settings:
        for dtype in ("float64",) if quick else DTYPES:
            child = {
                "section": "report",
                "n_features": n_features,
                "params": params,
                "dtype": dtype,
                "threads": threads,
                "n_epochs": 2 if quick else 3,
            }
            busy = waiter.wait()
            result = {**run_child(__file__, child), "other_cpus": busy}
            row = {
                "setting": label,
                "n": n_features,
                "dtype": dtype,
                **result,
                "report": REPORT_TIMINGS.get((label, n_features), "-"),
            }
            out["report"].append(row)
            print(row, flush=True)
    mark(None)
    out["settings"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    out["settings"]["waited_for_quiet_s"] = waiter.waited_s
    return out


# --------------------------------------------------------------- markdown
COST_NOTES = {
    "node_draw": "node draw per step (`PriorNodeSampler.draw`): QMC adds a "
    "random shift to the Sobol set and maps it through `ndtri` in float64, "
    "Monte Carlo draws float64 `randn`, both then cast; grid and Gauss-Hermite "
    "return fixed tensors. Minimal loop: float `randn` or nothing",
    "likelihood_fwd_bwd": "likelihood forward + backward: centring x and g on "
    "the batch mean (float32 accuracy) and the fused `addmm` of "
    "`log_joint_weights`; the analytic gradient's custom Function recomputes "
    "the log-joint and four products in backward. Negative = faster than the "
    "minimal expansion",
    "clip_grad_norm": "gradient clipping every step (`_vae.clip_gradient_norm` "
    "where it exists: one foreach norm, a `float()` sync, a rescale only "
    "when the 1e3 cap binds, which it never does here; else "
    "`torch.nn.utils.clip_grad_norm_`, which always rescales)",
    "soft_clamp": "soft clamp of the encoder log-variances (two `softplus` "
    "and their backward on 128 x 2)",
    "loss_detach_append": "`loss.detach()` and a list append per step (for "
    "the epoch's mean loss)",
    "step_rest": "rest of the step (whole-step difference minus the named "
    "parts): Python dispatch through `_optimizer_step` / `_training_loss`, "
    "`NoiseVariance` (floor + exp), the draws from a `torch.Generator`, "
    "`log_importance_weights` vs the inline formula, and timing noise",
    "epoch_monitoring": "per-epoch monitoring that runs even with "
    "`early_stopping=False` (`_epoch_scores`: importance-sampled log p(x) and "
    "ELBO of 500 training rows with 64 QMC draws: 32,000 decoder "
    "evaluations; an epoch of IWAE K=8 steps makes 40,000 with backward, "
    "of 1-draw ELBO steps 5,000)",
    "loss_stack_item": "`torch.stack(losses).mean().item()` at the end of each epoch",
    "is_finite": "`_is_finite(model)`: `isfinite().all()` and a `bool()` per "
    "parameter tensor, every epoch",
    "state_dict_deepcopy": "`copy.deepcopy(model.state_dict())` each epoch "
    "the monitored score improves (every epoch early in training)",
    "noise_float": "`float(model.noise())` for the history entry",
}


def _fmt_config(row: dict) -> str:
    if "vae" in row:
        return f"VAE {row['vae']}, {row['dtype']}"
    return f"MLE {row['rule']}/{row['gradient']}, {row['dtype']}"


def render(out: dict) -> str:
    s = out["settings"]
    memory = {}
    for row in out["memory"]:
        key = (row["loop"], row.get("vae") or (row["rule"], row.get("gradient")))
        memory[(key, row["dtype"])] = row.get("peak_mib", row.get("error"))
    for row in out["mle"]:
        row["peak_mib"] = memory.get(
            (("estimator", (row["rule"], row["gradient"])), row["dtype"]), ""
        )
        row["minimal_peak_mib"] = memory.get(
            (("minimal", ("grid", "-")), row["dtype"]), ""
        )
    for row in out["vae"]:
        row["peak_mib"] = memory.get((("estimator", row["vae"]), row["dtype"]), "")
        row["minimal_peak_mib"] = memory.get(
            (("minimal", row["vae"]), row["dtype"]), ""
        )
    md = [
        "# Performance: the estimators against minimal torch loops",
        "",
        f"`make_nonlinear_ica`, m={s['components']}, n={s['features']}, "
        f"N={s['rows']:,} rows, batch {s['batch_size']}, {s['nodes']} nodes, "
        f"{s['threads']} torch threads, {os.cpu_count()} CPUs. Load average "
        f"(1/5/15 min) at start {s['load_average_start']}, at end "
        f"{s['load_average_end']}; `other_cpus` is the number of CPUs other "
        "jobs kept busy just before each round (`/proc/stat`, mean over the "
        "rounds): above ~0.3 the two loops still see the same load (they "
        "alternate), but two threads then stall on each other (see the "
        "threads table) and the ratio ranges widen. Waited for quiet: "
        f"{s.get('waited_for_quiet_s', 0):.0f} s.",
        "",
        f"Per-epoch times: `early_stopping=False`, median over epochs 2..E of "
        f"each block, E={s['epochs_per_block']} (adaptive: fewer), "
        f"{s['rounds']} alternating rounds per configuration; `ratio` is the "
        "median of the per-round ratios estimator / minimal loop, "
        "`ratio_range` their min-max, `ratio_of_medians` the ratio of the two "
        "medians; `spread_pct`: how much the estimator's own (identical, "
        "same seed) blocks differed between rounds, max/min - 1: the "
        "measurement noise of this machine. Peak memory (`peak_mib`): growth of the "
        "process's peak RSS (`VmHWM`, the figure `ru_maxrss` reports, reset "
        "at the baseline) during a 2-epoch run in a fresh subprocess, over a "
        "baseline taken after the data exist and a tiny warm-up fit; the data "
        "are 0.76 MiB (float64).",
        "",
        f"## NonlinearICAMLE per epoch (target ratio <= {MLE_TARGET})",
        "",
        markdown_table(
            out["mle"],
            [
                "rule",
                "gradient",
                "dtype",
                "epoch_ms",
                "minimal_ms",
                "ratio",
                "ratio_range",
                "ratio_of_medians",
                "spread_pct",
                "meets_target",
                "fused_ms",
                "ratio_vs_fused",
                "peak_mib",
                "minimal_peak_mib",
                "other_cpus",
            ],
        ),
        "",
        "`fused_ms`: the minimal loop with the estimator's one arithmetic "
        "optimisation (the node terms as the bias of a single `addmm`, so the "
        "128 x 1,024 matrix is written twice instead of about eight times); "
        "`ratio_vs_fused` isolates the estimator's plumbing from that gain. "
        "The minimal loop's memory is that of the unfused expression.",
        "",
        "`adaptive` runs Gauss-Newton mode searches and 64 proposal nodes per "
        "row: different, heavier work than the prior-node minimal loop it is "
        "divided by, so its ratio is a cost factor, not an overhead.",
        "",
        f"## NonlinearICAVAE per epoch (target ratio <= {VAE_TARGET})",
        "",
        markdown_table(
            out["vae"],
            [
                "vae",
                "dtype",
                "epoch_ms",
                "minimal_ms",
                "ratio",
                "ratio_range",
                "ratio_of_medians",
                "spread_pct",
                "meets_target",
                "peak_mib",
                "minimal_peak_mib",
                "other_cpus",
            ],
        ),
        "",
        "## Per-epoch cost of the default early_stopping=True",
        "",
        "Fit with `early_stopping=True` on all rows (90% train) against "
        "`early_stopping=False` on the same number of rows; the difference is "
        "the per-epoch validation score (work the minimal loop never does).",
        "",
        markdown_table(
            out["early_stopping"],
            [
                "estimator",
                "dtype",
                "epoch_ms_early_stopping",
                "epoch_ms_without",
                "overhead_ms",
                "overhead_pct",
            ],
        ),
    ]
    md += [
        "",
        "## 1 vs 2 torch threads (default estimators)",
        "",
        "The same fits with `torch.set_num_threads(1)` and `(2)`, alternating. "
        "`other_cpus`: CPUs other jobs kept busy just before each round (mean, "
        "max). With both cores partly taken by other jobs, two threads wait on "
        "each other at every parallel operation.",
        "",
        markdown_table(
            out["threads"],
            [
                "estimator",
                "dtype",
                "epoch_ms_1_thread",
                "epoch_ms_2_threads",
                "speedup_2_threads",
                "other_cpus",
                "other_cpus_max",
            ],
        ),
    ]
    md += ["", "## Where the extra time goes", ""] + _explanation(out)
    md += [
        "",
        "## The report's settings",
        "",
        f"Our `NonlinearICAMLE` (`early_stopping=False`, batch 128) on "
        f"{REPORT_ROWS:,} rows, m=2; per batch = per epoch / "
        f"{math.ceil(REPORT_ROWS / BATCH)} batches. `report` is the timing the "
        "issue quotes for the report's own code (its hardware unknown). The "
        "report's text gives its grid as k = 51 points per axis on [-2.5, 2.5] "
        "(2,601 nodes); our grid puts 51 midpoints on that box.",
        "",
        markdown_table(
            [_report_row(row) for row in out["report"]],
            [
                "setting",
                "n",
                "dtype",
                "batch_s",
                "epoch_s",
                "peak_mib",
                "report",
                "speedup",
            ],
        ),
    ]
    return "\n".join(md)


def _report_row(row: dict) -> dict:
    row = dict(row)
    quoted = {
        ("monte_carlo, 1,000 draws", 20): 1.4,
        ("monte_carlo, 1,000 draws", 100): 31,
    }
    base = quoted.get((row["setting"], row["n"]))
    if base and isinstance(row.get("batch_s"), float):
        row["speedup"] = f"{base / row['batch_s']:.0f}x"
    if "error" in row:
        row["batch_s"] = row["error"]
    return row


def _explanation(out: dict) -> list[str]:
    lines = [
        "Each cost is a microbenchmark (minimum over 15 batches of repeated "
        "calls, so it is the unloaded cost) times its calls per epoch "
        "(40 steps); the step totals are the estimator's own "
        "`_optimizer_step` on its own model against the minimal step, on the "
        "same 40 minibatches. `gap_ms` is the measured per-epoch difference "
        "from the tables above (under whatever load there was); "
        "`explained_ms` is the sum of the per-epoch costs below it. Aten ops "
        "per step are counted by `torch.profiler` (nested calls included).",
        "",
    ]
    gaps = {
        _fmt_config(r): r["gap_ms"] for r in out["mle"] + out["vae"] if "gap_ms" in r
    }
    table, keys = [], []
    for row in out["breakdown_mle"] + out["breakdown_vae"]:
        entry = {"config": _fmt_config(row)}
        if "error" in row:
            entry["error"] = row["error"]
            table.append(entry)
            continue
        entry["gap_ms"] = gaps.get(entry["config"], "")
        ms = row["per_epoch_ms"]
        entry["explained_ms"] = ms["explained_total"]
        entry["aten_ops"] = f"{row['aten_ops_per_step']:.0f} vs " + (
            f"{row['minimal_aten_ops_per_step']:.0f}"
        )
        entry["step_us"] = f"{row['step_us']:.0f} vs {row['minimal_step_us']:.0f}"
        for key, value in ms.items():
            if key in ("explained_total",):
                continue
            entry[key] = value
            if key not in keys:
                keys.append(key)
        table.append(entry)
    if table:
        columns = ["config", "gap_ms", "explained_ms", "step_us", "aten_ops", *keys]
        if any("error" in e for e in table):
            columns.append("error")
        lines += [markdown_table(table, columns), ""]
    for row in out["breakdown_mle"][:1] + out["breakdown_vae"][:1]:
        if "error" in row:
            continue
        ms = row["per_epoch_ms"]
        lines.append(f"One line per cost, {_fmt_config(row)} (ms per epoch):")
        lines.append("")
        for key, value in ms.items():
            if key in COST_NOTES:
                lines.append(f"- {value:+.2f} ms: {COST_NOTES[key]}.")
        lines.append("")
    return lines


def main() -> None:
    parser = benchmark_parser(__doc__, "smoke test of every section (< 2 min)")
    args = parser.parse_args()
    if args.child:
        config = json.loads(args.child)
        section = config.pop("section")
        child_result({"memory": memory_child, "report": report_child}[section](config))
        return
    set_threads(args.threads)
    start = time.perf_counter()
    out = run_sections(args)
    out["settings"]["wall_seconds"] = time.perf_counter() - start
    name = "performance_quick" if args.quick else "performance"
    write_results(name, out, render(out))


if __name__ == "__main__":
    main()
