"""Helpers shared by the benchmark scripts.

* Command line and output: :func:`base_parser` (``--quick``, ``--output``),
  :func:`benchmark_parser` (plus ``--threads``, ``--wait-quiet`` and the
  hidden ``--child``), :func:`write_results` and :func:`markdown_table`.
* Measurement plumbing: threads, load, peak memory of a fresh subprocess
  (:func:`run_child`), per-epoch times from ``history_``, medians of
  per-round ratios of alternating A/B measurements (:func:`ratio_summary`),
  waiting for other jobs to leave the CPUs (:class:`QuietWaiter`), batches of
  repeated calls timed in turns (:func:`paired_per_call_us`).
* What the performance benchmarks share (``bench_speed.py``,
  ``bench_breakdown.py``, ``bench_memory.py``, ``bench_report_settings.py``):
  the data, the configurations, the minimal hand-written torch loops, and the
  estimators' bare training objects built from the numeric layer.
* Building and scoring decoders as the estimators do, from the numeric layer
  (:func:`default_decoder`, :func:`mle_log_likelihood`).

Benchmarks use only the public API (``sknlica``, ``sknlica.datasets``,
``sknlica.metrics``, the estimators' parameters, public methods and fitted
attributes) and the numeric layer ``sknlica._torch``;
``tests/test_benchmarks.py`` checks that no benchmark imports
``sknlica._base``, ``sknlica._mle``, ``sknlica._vae`` or ``sknlica._marginal``
or touches an underscore attribute.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica._torch.evaluation import decoded_evaluation_rule, evaluate
from sknlica._torch.integration import prior_rule
from sknlica._torch.mle_objectives import make_mle_objective
from sknlica._torch.models import MLEModel, VAEModel
from sknlica._torch.networks import GaussianHead, NoiseVariance, make_mlp
from sknlica._torch.training import (
    make_optimizer,
    mean_feature_variance,
    optimizer_step,
)
from sknlica._torch.vae_objectives import MONITOR_SAMPLES, VAEObjective
from sknlica.datasets import make_nonlinear_ica

RESULTS = Path(__file__).parent / "results"

#: A child process prints its result on one line starting with this marker.
CHILD_MARKER = "BENCH-CHILD-RESULT "


# ------------------------------------------------------- command line, output
def default_threads(default: int) -> int:
    """``OMP_NUM_THREADS`` when it is set to a positive integer, else ``default``."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else default


def base_parser(
    doc: str, quick_help: str | None = None, *, threads: int = 2
) -> argparse.ArgumentParser:
    """``--quick``, ``--output DIR`` and ``--threads``: what every benchmark has.

    ``threads`` is the benchmark's own default number of torch threads;
    ``OMP_NUM_THREADS``, when set, replaces it (``tests/test_benchmarks.py``
    runs every ``--quick`` with one).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=quick_help
        or "smoke test: every section with tiny sizes and few repeats, in "
        "seconds (its numbers are not results); writes NAME_quick.*",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        metavar="DIR",
        help="directory for the JSON and Markdown results "
        "(default: benchmarks/results)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(threads),
        help=f"torch threads (default {threads}, or OMP_NUM_THREADS when set)",
    )
    return parser


def benchmark_parser(doc: str, quick_help: str | None = None):
    """:func:`base_parser` plus the performance benchmarks' options."""
    parser = base_parser(doc, quick_help)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement wait for other jobs to use < 0.3 CPUs, "
        "up to SECONDS in total (default 0: measure whatever the load is)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def environment() -> dict:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "load_average_at_write": [round(v, 2) for v in os.getloadavg()],
    }


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as a Markdown table; floats with 4 significant digits."""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(
    name: str, payload: dict, markdown: str, *, output: Path, quick: bool
) -> None:
    """Write ``OUTPUT/NAME.json`` and ``.md`` (``NAME_quick.*`` when quick)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    name = f"{name}_quick" if quick else name
    payload = {"environment": environment(), "quick": quick, **payload}
    (output / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (output / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {output / name}.json and .md")


class SectionClock:
    """Seconds per named section, printed as each starts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.name: str | None = None
        self.start = time.perf_counter()

    def mark(self, name: str | None) -> None:
        """End the running section and start ``name`` (``None``: just end)."""
        if self.name is not None:
            self.seconds[self.name] = time.perf_counter() - self.start
        self.name, self.start = name, time.perf_counter()
        if name is not None:
            print(f"== {name}", flush=True)


def finish_settings(settings: dict, waiter, clock: SectionClock | None = None):
    """Record the end of a run in ``settings``: the sections' seconds, the
    load average and the time waited for quiet."""
    if clock is not None:
        clock.mark(None)
        settings["section_seconds"] = clock.seconds
    settings["load_average_end"] = load_averages()
    settings["waited_for_quiet_s"] = waiter.waited_s


def timed_run(run_sections, args) -> dict:
    """``run_sections(args)`` with its wall time in ``["settings"]``."""
    start = time.perf_counter()
    out = run_sections(args)
    out["settings"]["wall_seconds"] = time.perf_counter() - start
    return out


# ------------------------------------------------------------ measurement
def load_average() -> float:
    """The one-minute load average (other jobs sharing the CPUs)."""
    return round(os.getloadavg()[0], 2)


def load_averages() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded."""
    return [round(v, 2) for v in os.getloadavg()]


def set_threads(threads: int) -> None:
    """Torch intra-op threads for this process (the benchmarks default to 2)."""
    torch.set_num_threads(threads)


def thread_params(estimator_class, threads: int) -> dict:
    """``{"n_threads": threads}`` when the estimator has that parameter."""
    params = estimator_class().get_params()
    return {"n_threads": threads} if "n_threads" in params else {}


def epoch_seconds(history: list[dict]) -> list[float]:
    """Per-epoch seconds from ``history_`` (its ``seconds`` are cumulative)."""
    seconds = [entry["seconds"] for entry in history]
    return [b - a for a, b in zip([0.0, *seconds[:-1]], seconds)]


def median_after_first(values: list[float]) -> float:
    """Median of per-epoch times, dropping the first (warm-up) when possible."""
    values = list(values)
    return float(statistics.median(values[1:] if len(values) > 1 else values))


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark that
    ``ru_maxrss`` reports for a single process, except that (a) it can be
    reset (:func:`reset_peak_rss`) and (b) it is this process's own:
    ``ru_maxrss`` of a child started by fork + exec from a large parent
    starts at the *parent's* peak (the kernel carries the replaced memory
    map's high-water mark over at exec), which hid every fit smaller than
    the benchmark process itself.  Elsewhere: ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS (Linux >= 4.0).

    Without it the peak of the imports and of the data generation can hide
    a smaller fit.  Returns whether it worked.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def current_rss_mib() -> float:
    """Current resident set size (Linux ``/proc/self/statm``; else the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mib()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak and retained memory of the block, over a baseline taken at entry.

    At entry: garbage collection, the high-water mark reset
    (:func:`reset_peak_rss`), the baseline peak and current RSS.  After the
    block: ``peak_mib`` (growth of the peak RSS) and ``retained_mib``
    (growth of the current RSS).
    """

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self.peak_reset = reset_peak_rss()
        self.baseline_mib = peak_rss_mib()
        self.rss_before_mib = current_rss_mib()
        return self

    def __exit__(self, *exc) -> None:
        self.peak_mib = peak_rss_mib() - self.baseline_mib
        self.retained_mib = current_rss_mib() - self.rss_before_mib


def run_child(script: str | Path, config: dict, *, timeout: float = 900) -> dict:
    """Run ``python SCRIPT --child JSON`` in a fresh process; return its result.

    A fresh process per configuration is what makes ``ru_maxrss`` a per-fit
    peak.  The child prints one line ``CHILD_MARKER + json``; a failure comes
    back as ``{"error": ...}`` rather than raising, so one bad configuration
    does not lose the others.
    """
    command = [sys.executable, str(script), "--child", json.dumps(config)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(CHILD_MARKER):
            return json.loads(line[len(CHILD_MARKER) :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {done.returncode}: " + " | ".join(tail)}


def child_result(result: dict) -> None:
    """Print a child's result for :func:`run_child` to pick up."""
    print(CHILD_MARKER + json.dumps(result), flush=True)


def ratio_summary(pairs: list[tuple[float, float]]) -> dict:
    """Medians of interleaved (estimator, reference) times and their ratios.

    ``ratio`` is the median of the per-round ratios (each round's two
    measurements were taken back to back, so background load cancels);
    ``ratio_of_medians`` is the plain ratio of the two medians.
    """
    ours = [a for a, _ in pairs]
    reference = [b for _, b in pairs]
    return {
        "seconds": float(np.median(ours)),
        "reference_seconds": float(np.median(reference)),
        "ratio": float(np.median([a / b for a, b in pairs])),
        "ratio_of_medians": float(np.median(ours) / np.median(reference)),
        "ratio_min": float(min(a / b for a, b in pairs)),
        "ratio_max": float(max(a / b for a, b in pairs)),
    }


def busy_cpus(interval: float = 0.25) -> float:
    """CPUs the whole machine kept busy over ``interval`` s (``/proc/stat``).

    Called while this process sleeps, so it is the load of *other* jobs;
    ``nan`` where ``/proc/stat`` does not exist.
    """

    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError):
        return float("nan")
    busy = 1.0 - (idle1 - idle0) / max(1, total1 - total0)
    return round((os.cpu_count() or 1) * busy, 2)


class QuietWaiter:
    """Wait for other jobs to go quiet, from a total budget of seconds.

    ``wait()`` polls :func:`busy_cpus` until other jobs use less than
    ``threshold`` CPUs or the budget is spent, and returns the last reading
    (recorded with each measurement).  A zero budget only measures.
    """

    def __init__(self, budget_s: float = 0.0, threshold: float = 0.3) -> None:
        self.budget_s = budget_s
        self.threshold = threshold
        self.waited_s = 0.0

    def wait(self) -> float:
        busy = busy_cpus()
        while busy >= self.threshold and self.waited_s < self.budget_s:
            time.sleep(1.0)
            self.waited_s += 1.25
            busy = busy_cpus()
        return busy


def paired_per_call_us(fns: dict, *, reps: int, repeats: int) -> dict:
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


def per_call_us(fn, *, reps: int, repeats: int) -> float:
    """Microseconds per call of ``fn``: the minimum over ``repeats`` batches."""
    return paired_per_call_us({"fn": fn}, reps=reps, repeats=repeats)["fn"]


def timed_fit(model, X) -> float:
    """Seconds of ``model.fit(X)``, without the ConvergenceWarning of short fits."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
    return time.perf_counter() - start


def quiet_fit(model, X):
    """``model.fit(X)`` without the ConvergenceWarning of short fits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(X)


# ------------------------------------- the performance benchmarks' set-up
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


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repeat counts of the performance benchmarks."""

    #: Training rows of ``make_nonlinear_ica`` (m=2, n=20).
    rows: int
    #: Training nodes of the MLE (its ``n_nodes``) and of the minimal loop.
    nodes: int
    #: Epochs per timed block (the first is dropped as warm-up).
    epochs: int
    #: Alternating rounds per configuration.
    rounds: int
    #: Calls per timed batch of a microbenchmark.
    reps: int
    #: Timed batches per microbenchmark (the minimum is kept).
    repeats: int


FULL = Sizes(rows=N_ROWS, nodes=N_NODES, epochs=6, rounds=6, reps=40, repeats=15)
#: ``--quick``: a smoke test of every section; its numbers are not results.
QUICK = Sizes(rows=4 * BATCH, nodes=256, epochs=2, rounds=1, reps=2, repeats=2)


def make_data(n_rows=N_ROWS, n_features=N_FEATURES, dtype=np.float64, seed=0):
    X, _ = make_nonlinear_ica(n_rows, N_COMPONENTS, n_features, random_state=seed)
    return np.ascontiguousarray(X, dtype=dtype)


def mle_configs(quick: bool) -> list[dict]:
    """Every rule x gradient x dtype, and the adaptive rule per dtype."""
    configs = [
        {"rule": rule, "gradient": gradient, "dtype": dtype}
        for dtype in DTYPES
        for rule in RULES
        for gradient in ("autograd", "analytic")
    ]
    configs += [
        {"rule": "adaptive", "gradient": "autograd", "dtype": d} for d in DTYPES
    ]
    # Quick: a fixed rule, a fresh-node rule with the analytic gradient in
    # float32, and the adaptive rule (each code path once).
    return [configs[0], configs[11], configs[16]] if quick else configs


def vae_configs(quick: bool) -> list[dict]:
    configs = [{"vae": name, "dtype": d} for d in DTYPES for name in VAE_CONFIGS]
    return configs[:1] if quick else configs


def config_label(row: dict) -> str:
    if "vae" in row:
        return f"VAE {row['vae']}, {row['dtype']}"
    return f"MLE {row['rule']}/{row['gradient']}, {row['dtype']}"


def estimator_for(kind: str, config: dict, *, n_nodes: int = N_NODES):
    """The estimator class and the parameters a configuration sets."""
    if kind == "mle":
        params = {"integration": config["rule"], "n_nodes": n_nodes}
        if config["rule"] != "adaptive":
            params["gradient"] = config["gradient"]
        return NonlinearICAMLE, params
    return NonlinearICAVAE, dict(VAE_CONFIGS[config["vae"]])


def estimator_params(estimator_class, threads: int, **params) -> dict:
    """Parameters of a timed fit: no validation pass, no stopping, seeded."""
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


def minimal_for(kind: str, x, config: dict, *, n_nodes=N_NODES, fused=False):
    """The minimal loop's step for a configuration (adaptive: the grid loop)."""
    if kind == "mle":
        return minimal_mle_step(
            x,
            rule="grid" if config["rule"] in ("adaptive", "auto") else config["rule"],
            n_nodes=config.get("n_nodes", n_nodes),
            half_width=config.get("grid_half_width"),
            fused=fused,
        )
    params = VAE_CONFIGS[config["vae"]]
    return minimal_vae_step(
        x, objective=params["objective"], n_draws=params.get("n_importance_samples")
    )


# ------------------------------- the estimators' objects, from the numeric layer
#: The learned noise variance's floor relative to the mean feature variance
#: of the training data, as ``NonlinearICAMLE`` documents it
#: (``learn_noise_variance``).  The constant itself lives in the estimators'
#: private module, which benchmarks do not import.
NOISE_VARIANCE_FLOOR = 1e-6


def estimator_defaults(estimator_class, **params) -> dict:
    """The estimator's parameters: its defaults (``get_params``) and ``params``."""
    defaults = estimator_class().get_params()
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"{estimator_class.__name__} has no parameters {unknown}")
    return {**defaults, **params}


def default_decoder(
    estimator_class,
    n_features: int,
    *,
    generator: torch.Generator,
    dtype=torch.float64,
    **params,
) -> nn.Sequential:
    """A fresh decoder as ``estimator_class(**params)`` builds it (numeric layer:
    ``make_mlp`` with the estimator's decoder parameters)."""
    p = estimator_defaults(estimator_class, **params)
    return make_mlp(
        p["n_components"],
        tuple(p["hidden_layer_sizes"]),
        n_features,
        activation=p["activation"],
        output_activation=p["output_activation"],
        dtype=dtype,
        generator=generator,
    )


def _noise(p: dict, scale: float, dtype) -> NoiseVariance:
    # noise_variance=None starts at the data's mean feature variance, as fit
    # does (it trains in standard units, where that is 1).
    initial = scale if p["noise_variance"] is None else p["noise_variance"]
    return NoiseVariance(
        initial,
        learn=p["learn_noise_variance"],
        floor=NOISE_VARIANCE_FLOOR * scale,
        dtype=dtype,
    )


def _optimizers(p: dict, blocks) -> list:
    return [
        make_optimizer(
            p["solver"],
            list(parameters),
            list(noise_parameters),
            learning_rate=p["learning_rate_init"],
            noise_learning_rate=p["noise_learning_rate"],
        )
        for parameters, noise_parameters in blocks
        if parameters or noise_parameters
    ]


def mle_training_objects(x: torch.Tensor, *, seed: int = 0, **params):
    """``NonlinearICAMLE(**params)``'s model, objective and optimizers on ``x``.

    Built from the numeric layer with the estimator's parameters (its
    defaults from ``get_params`` where ``params`` does not set them), as its
    ``fit`` builds them: ``MLEModel(make_mlp(...), NoiseVariance(...))``,
    ``make_mle_objective(...)`` and ``make_optimizer`` per parameter block
    (Adam: one; SGD: the decoder, then sigma^2).  Draws come from a
    generator seeded with ``seed`` (``fit`` derives its own from
    ``random_state``).
    """
    p = estimator_defaults(NonlinearICAMLE, **params)
    generator = torch.Generator().manual_seed(seed)
    n_features = x.shape[1]
    decoder = default_decoder(
        NonlinearICAMLE, n_features, generator=generator, dtype=x.dtype, **params
    )
    noise = _noise(p, mean_feature_variance(x.var(dim=0, unbiased=False)), x.dtype)
    model = MLEModel(decoder, noise)
    objective = make_mle_objective(
        p["integration"],
        n_components=p["n_components"],
        n_nodes=p["n_nodes"],
        n_eval_nodes=p["n_eval_nodes"],
        grid_half_width=p["grid_half_width"],
        gradient=p["gradient"],
        generator=generator,
        dtype=x.dtype,
        device=x.device,
        # fit centres the distance expansion on the training mean.
        centre=x.mean(dim=0),
    )
    decoder_params, noise_params = list(decoder.parameters()), list(noise.parameters())
    if p["solver"] == "adam":
        blocks = [(decoder_params, noise_params)]
    else:
        blocks = [(decoder_params, []), ([], noise_params)]
    return model, objective, _optimizers(p, blocks), p


def vae_objective(p: dict, n_features: int, generator: torch.Generator):
    """The ``VAEObjective`` of ``NonlinearICAVAE`` parameters ``p``."""
    return VAEObjective(
        bound=p["objective"],
        gradient_estimator=p["gradient_estimator"],
        n_draws=(
            p["n_importance_samples"] if p["objective"] == "iwae" else p["n_mc_samples"]
        ),
        beta=p["beta"],
        kl_warmup_epochs=p["kl_warmup_epochs"],
        n_components=p["n_components"],
        monitor_samples=min(MONITOR_SAMPLES, p["n_eval_samples"]),
        # The widest layer the decoder produces per latent (sizes the chunks).
        width=max((n_features, *tuple(p["hidden_layer_sizes"]))),
        generator=generator,
    )


def vae_training_objects(x: torch.Tensor, *, seed: int = 0, **params):
    """``NonlinearICAVAE(**params)``'s model, objective and optimizers on ``x``.

    Built from the numeric layer with the estimator's parameters (defaults
    from ``get_params``), as its ``fit`` builds them: a ``GaussianHead``
    encoder mirroring the decoder unless ``encoder_hidden_layer_sizes`` is
    set, the decoder, a global ``NoiseVariance`` (the variance head,
    ``amortized_variance=True``, is not rebuilt here), ``VAEObjective`` and
    one Adam (joint) or an encoder then a decoder optimizer (alternating).
    """
    p = estimator_defaults(NonlinearICAVAE, **params)
    if p["amortized_variance"]:
        raise ValueError("amortized_variance=True is not rebuilt here")
    generator = torch.Generator().manual_seed(seed)
    n_features = x.shape[1]
    encoder_sizes = p["encoder_hidden_layer_sizes"]
    if encoder_sizes is None:
        encoder_sizes = tuple(reversed(tuple(p["hidden_layer_sizes"])))
    encoder = GaussianHead(
        n_features,
        tuple(encoder_sizes),
        p["n_components"],
        activation=p["activation"],
        generator=generator,
        dtype=x.dtype,
    )
    decoder = default_decoder(
        NonlinearICAVAE, n_features, generator=generator, dtype=x.dtype, **params
    )
    noise = _noise(p, mean_feature_variance(x.var(dim=0, unbiased=False)), x.dtype)
    model = VAEModel(encoder, decoder, noise)
    parts = [list(m.parameters()) for m in (encoder, decoder, noise)]
    if p["training"] == "alternating":
        blocks = [(parts[0], []), (parts[1], parts[2])]
    else:
        blocks = [(parts[0] + parts[1], parts[2])]
    objective = vae_objective(p, n_features, generator)
    return model, objective, _optimizers(p, blocks), p


def bare_training(kind: str, x: torch.Tensor, config: dict, *, n_nodes=N_NODES):
    """The estimator's own training objects for a configuration and its bare
    step, ``optimizer_step(model, objective, optimizers, batch)``: what each
    minibatch of ``fit`` runs, without the epoch loop around it."""
    _, params = estimator_for(kind, config, n_nodes=n_nodes)
    build = mle_training_objects if kind == "mle" else vae_training_objects
    model, objective, optimizers, p = build(x, **params)

    def step(batch):
        return optimizer_step(model, objective, optimizers, batch)

    return SimpleNamespace(
        model=model, objective=objective, optimizers=optimizers, params=p, step=step
    )


def same_modules(model: nn.Module, estimator) -> bool:
    """Whether ``model``'s parts print as the fitted estimator's ``<part>_``
    attributes do (same layers and sizes): a check that the numeric-layer
    rebuild still matches what ``fit`` builds."""
    return all(
        str(getattr(model, part)) == str(getattr(estimator, f"{part}_"))
        for part in model.parts
    )


# ----------------------------------------------------- scoring any decoder
def mle_log_likelihood(
    X, decoder, noise_variance: float, *, n_components: int
) -> np.ndarray:
    """Per-row ``log p(x)`` of any decoder as ``NonlinearICAMLE.score_samples``
    computes it for its own (numeric layer, ``sknlica._torch.evaluation``).

    The fixed ``"auto"`` rule of the estimator's default ``n_eval_nodes``
    (16,384) nodes for every row, and the posterior-adapted rule for the
    rows whose effective sample size there is low: accurate at small noise,
    so two estimators' decoders (or the true generator,
    ``mixing.to_torch_module()``) are scored alike.  Float64 throughout.
    """
    n_eval_nodes = NonlinearICAMLE().get_params()["n_eval_nodes"]
    x = torch.tensor(np.ascontiguousarray(X), dtype=torch.float64)
    noise = torch.tensor(float(noise_variance), dtype=torch.float64)
    rule = decoded_evaluation_rule(
        decoder, n_components, n_eval_nodes, dtype=torch.float64
    )
    return evaluate(x, rule, decoder, noise, with_mean=False).log_marginal.numpy()
